//go:build linux

package shellflip

import (
	"strings"
	"testing"
)

// BenchmarkSdNotifySend measures one datagram to a local listener that reads
// and discards it: the encoding, the sendmsg and the wake-up of the reader.
func BenchmarkSdNotifySend(b *testing.B) {
	status := strings.Repeat("s", 64)
	cases := []struct {
		name   string
		fields []SdField
	}{
		{"READY", []SdField{SdReady()}},
		{"MAINPID+READY", []SdField{SdMainPID(12345), SdReady()}},
		{"STATUS64", []SdField{SdStatus(status)}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			l := sdListen(b, false)
			n := sdNewNotifier(b, l.addr)
			_, stop := l.drain(b, -1)
			defer stop()
			b.ReportAllocs()
			for b.Loop() {
				if err := n.Send(c.fields...); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
