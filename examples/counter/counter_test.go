//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/extest"
)

// The counter as its users run it: built with go build (with the race
// detector if this test has it), started as a real process in a directory
// of its own, restarted with its own "restart" command, and hammered by
// real HTTP clients meanwhile. Every generation writes to the first one's
// stdout, a pipe the test reads; its end means every generation has
// exited. Waits are for events (a line, a response, an exit), each with a
// deadline.

// deadline bounds every wait; a healthy run is far quicker.
const deadline = 30 * time.Second

var instanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (\S+)$`)

// TestCounter: clients (keep-alive, and a new connection per request) ask
// for the next value while the counter restarts 20 times, then once into a
// program that takes the state and fails, then once more: not one request
// fails, no value is handed out twice, and none is skipped.
func TestCounter(t *testing.T) {
	const restarts = 20
	s := startCounter(t)
	l := startLoad(t, s.addr, 4, 2)
	for i := 1; i <= restarts; i++ {
		l.waitFor(50) // the clients are busy when the restart comes
		s.restart(t)
		s.instance(t, i)
	}

	// The program at the server's path now takes the state and the
	// listener, and then fails to start: its control socket is to be
	// where none can be. The held requests are served by the old process,
	// which carries on, and restarts again once the program is good.
	l.waitFor(50)
	good := s.path + ".good"
	if err := os.Rename(s.path, good); err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("#!/bin/sh\nexec %q \"$@\" -socket %q\n", good, filepath.Join(s.path, "nowhere.sock"))
	if err := os.WriteFile(s.path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := run(t, s.path+".good", "-socket", s.socket, "restart")
	// The new process's Start fails before it is ready, and says why.
	if code != 1 || stdout != "" || !strings.HasPrefix(stderr, "Restart failed: ") || !strings.Contains(stderr, "gave up: shellflip: control socket") || !strings.Contains(stderr, "nowhere.sock") {
		t.Fatalf("counter restart into a failing program: exit code %d, stdout %q, stderr %q; want 1 and \"Restart failed: ...gave up: shellflip: control socket ...nowhere.sock...\"", code, stdout, stderr)
	}
	l.waitFor(50)
	if err := os.Rename(good, s.path); err != nil {
		t.Fatal(err)
	}
	s.restart(t)
	s.instance(t, restarts+1)
	l.waitFor(50)
	l.stop()

	ok, failed, values := l.results()
	t.Logf("%d requests across %d restarts and a failed one, %d failed", ok+failed, restarts+1, failed)
	if failed > 0 {
		t.Errorf("%d requests failed; the first: %s", failed, strings.Join(l.errs, "; "))
	}
	slices.Sort(values)
	for i, v := range values {
		if v != uint64(i+1) {
			t.Fatalf("the values handed out, sorted, have %d at position %d: a value was handed out twice, or skipped", v, i+1)
		}
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: deadline}
	if v, err := next(c, s.addr); err != nil || v != uint64(len(values)+1) {
		t.Errorf("after %d increments the next value is %d, %v; want %d", len(values), v, err, len(values)+1)
	}
	s.stop(t)
}

// TestParseState: a new process takes exactly what the old one writes,
// and nothing else.
func TestParseState(t *testing.T) {
	for _, good := range []struct {
		s          string
		gen, count uint64
	}{
		{"0 0\n", 1, 0},
		{"4 1234\n", 5, 1234},
		{"18446744073709551614 18446744073709551615\n", 18446744073709551615, 18446744073709551615},
	} {
		if gen, count, err := parseState(good.s); err != nil || gen != good.gen || count != good.count {
			t.Errorf("parseState(%q) = %d, %d, %v; want %d, %d", good.s, gen, count, err, good.gen, good.count)
		}
	}
	for _, bad := range []string{
		"", "\n", "0\n", "0 0", "0 0\n\n", "0 0 0\n", " 0 0\n", "0  0\n", "00 1\n", "+1 2\n", "-1 2\n",
		"1 -2\n", "0x1 2\n", "1 2\r\n", "1 18446744073709551616\n", "18446744073709551615 0\n",
	} {
		if gen, count, err := parseState(bad); err == nil {
			t.Errorf("parseState(%q) = %d, %d, nil; want an error", bad, gen, count)
		}
	}
}

type counter struct {
	cmd    *exec.Cmd
	path   string // the program, which restarts run
	socket string
	addr   string
	lines  chan string   // stdout, a line at a time
	gone   chan struct{} // closed at the end of stdout: every generation has exited
	stderr *lockedBuffer
	pids   []int
}

// startCounter builds the counter and starts it, in a process group of its
// own, on a port of the kernel's choosing.
func startCounter(t *testing.T) *counter {
	dir := t.TempDir()
	s := &counter{path: extest.Build(t, "counter"), socket: filepath.Join(dir, "counter.sock"),
		lines: make(chan string, 64), gone: make(chan struct{}), stderr: &lockedBuffer{}}

	s.cmd = exec.Command(s.path, "-listen", "127.0.0.1:0", "-socket", s.socket)
	s.cmd.Env = env()
	s.cmd.Stderr = s.stderr
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.pids = append(s.pids, s.cmd.Process.Pid)
	go func() {
		defer close(s.gone)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		select {
		case <-s.gone:
		default:
			syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-s.gone
		}
		s.cmd.Wait()
		if t.Failed() {
			t.Logf("the servers' stderr:\n%s", s.stderr)
		}
	})
	s.addr = s.instance(t, 0)
	return s
}

// env is the environment of the processes the test starts: the test's,
// less what would make the counter think that systemd runs it, and with
// GORACE's atexit_sleep_ms at 0: a binary built with the race detector
// sleeps a second before it exits otherwise, and every "counter restart"
// would take that long.
func env() []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return k == "NOTIFY_SOCKET" || k == "GORACE" || strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "WATCHDOG_")
	})
	return append(env, "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
}

// instance waits for "Instance no. gen listening on ADDR", on s.addr once
// known, and returns ADDR.
func (s *counter) instance(t *testing.T, gen int) string {
	t.Helper()
	select {
	case line := <-s.lines:
		m := instanceRE.FindStringSubmatch(line)
		if m == nil || m[1] != strconv.Itoa(gen) || s.addr != "" && m[2] != s.addr {
			t.Fatalf("the counter said %q; want instance no. %d, on %s if known", line, gen, s.addr)
		}
		return m[2]
	case <-s.gone:
		t.Fatal("the counter exited")
	case <-time.After(deadline):
		t.Fatalf("no instance no. %d within %v", gen, deadline)
	}
	return ""
}

// restart runs "counter restart" and checks what it prints.
func (s *counter) restart(t *testing.T) {
	t.Helper()
	stdout, stderr, code := run(t, s.path, "-socket", s.socket, "restart")
	pid, err := 0, error(nil)
	if m := regexp.MustCompile(`^Restart succeeded, child pid is ([1-9]\d*)\n$`).FindStringSubmatch(stdout); m != nil {
		pid, err = strconv.Atoi(m[1])
	}
	if code != 0 || pid == 0 || err != nil || stderr != "" {
		t.Fatalf("counter restart: exit code %d, stdout %q, stderr %q; want 0 and \"Restart succeeded, child pid is PID\"", code, stdout, stderr)
	}
	s.pids = append(s.pids, pid)
}

// stop stops the last generation with SIGTERM and waits until every
// generation has exited.
func (s *counter) stop(t *testing.T) {
	t.Helper()
	syscall.Kill(s.pids[len(s.pids)-1], syscall.SIGTERM)
	select {
	case <-s.gone:
	case <-time.After(deadline):
		t.Fatalf("server processes still running %v after SIGTERM", deadline)
	}
	if err := s.cmd.Wait(); err != nil {
		t.Errorf("the first generation: %v", err)
	}
}

// run runs the program with args and returns what it printed and its exit
// code.
func run(t *testing.T, path string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env, cmd.Stdout, cmd.Stderr = env(), &out, &errOut
	err := cmd.Run()
	if err != nil && cmd.ProcessState == nil {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// load is clients that each send POST /next after POST /next until
// stopped, and keep what they get.
type load struct {
	t        *testing.T
	quit     chan struct{}
	wg       sync.WaitGroup
	stopOnce sync.Once
	progress chan struct{} // a request completed

	mu     sync.Mutex
	ok     int
	values []uint64
	errs   []string // the first few failures
	failed int
}

func startLoad(t *testing.T, addr string, keepAlive, oneShot int) *load {
	l := &load{t: t, quit: make(chan struct{}), progress: make(chan struct{}, 1)}
	t.Cleanup(l.stop)
	for i := range keepAlive + oneShot {
		tr := &http.Transport{DisableKeepAlives: i >= keepAlive, MaxIdleConnsPerHost: 1}
		c := &http.Client{Transport: tr, Timeout: deadline}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer tr.CloseIdleConnections()
			for {
				select {
				case <-l.quit:
					return
				default:
				}
				v, err := next(c, addr)
				l.record(v, err)
			}
		}()
	}
	return l
}

func (l *load) record(v uint64, err error) {
	l.mu.Lock()
	if err != nil {
		if l.failed++; len(l.errs) < 5 {
			l.errs = append(l.errs, time.Now().Format("15:04:05.000000 ")+err.Error())
		}
	} else {
		l.ok++
		l.values = append(l.values, v)
	}
	l.mu.Unlock()
	select {
	case l.progress <- struct{}{}:
	default:
	}
}

// waitFor waits until n more requests have succeeded.
func (l *load) waitFor(n int) {
	l.t.Helper()
	l.mu.Lock()
	want := l.ok + n
	l.mu.Unlock()
	timeout := time.After(deadline)
	for {
		l.mu.Lock()
		ok := l.ok
		l.mu.Unlock()
		if ok >= want {
			return
		}
		select {
		case <-l.progress:
		case <-timeout:
			l.t.Fatalf("only %d of %d requests succeeded within %v", ok-want+n, n, deadline)
		}
	}
}

// stop tells the clients to stop and waits for their last requests. Safe
// to call more than once.
func (l *load) stop() {
	l.stopOnce.Do(func() { close(l.quit) })
	l.wg.Wait()
}

func (l *load) results() (ok, failed int, values []uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok, l.failed, slices.Clone(l.values)
}

// next sends POST /next and returns the value. A request that Go's
// transport sent twice is an error: the server broke a connection under
// it (Go retries a POST only if it knows nothing was written, but counts).
func next(c *http.Client, addr string) (uint64, error) {
	var attempts atomic.Int32
	trace := &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { attempts.Add(1) }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "POST", "http://"+addr+"/next", nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64))
	resp.Body.Close()
	if err != nil {
		return 0, err
	}
	line, nl := strings.CutSuffix(string(body), "\n")
	v, perr := strconv.ParseUint(line, 10, 64)
	switch {
	case resp.StatusCode != http.StatusOK || !nl || perr != nil:
		return 0, fmt.Errorf("POST /next: %s %q", resp.Status, body)
	case attempts.Load() > 1:
		return 0, fmt.Errorf("POST /next: answered %d only after %d attempts", v, attempts.Load())
	}
	return v, nil
}

// lockedBuffer is a bytes.Buffer that the server processes' stderr may
// write to while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
