//go:build linux

package shellflip

import (
	"os"
	"strconv"
	"testing"
)

// testBroker is the Broker of testServer's Config: none, unless the role
// is "broker-server", in which every generation starts one.
var testBroker = func() *Broker { return nil }

func init() {
	testRoles["broker-server"] = func() int {
		b, err := NewBroker()
		if err != nil {
			report("error pid=%d broker: %v", os.Getpid(), err)
			return 1
		}
		testBroker = func() *Broker { return b }
		return testServer()
	}
}

func TestBrokerRestart(t *testing.T) {
	c := newTestCluster(t)
	r := c.start("broker-server", envTestListen+"=tcp=127.0.0.1:0")
	for gen := 1; gen <= 3; gen++ {
		n := c.restart(r["pid"])
		if n["gen"] != strconv.Itoa(gen) || n["addrs"] != r["addrs"] {
			t.Fatalf("generation %d reports %v after %v", gen, n, r)
		}
		r = n
	}
}
