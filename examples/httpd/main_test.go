//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/extest"

	"github.com/shellflip-go/shellflip"
	"golang.org/x/sys/unix"
)

// These tests drive the example as its users do: it is built once with go
// build (with the race detector if this test binary has it), started as a
// real process (alone, or under systemd-socket-activate), restarted with
// its own "restart" command or over the control socket, and loaded by real
// HTTP clients, Go's and wrk. Every generation of a server writes to the
// stdout and stderr of the first, which are pipes the test reads line by
// line; the end of stdout means that every generation has exited. Waits
// are for events (a line, a response, a written request, an exit), each
// with a deadline. Of the library they use only what a user would,
// RequestRestart; the example under systemd is tested in the repository's
// root (TestSystemdHTTPD), with the harness that boots systemd.

// httpdDeadline bounds every wait; a healthy run is far quicker.
const httpdDeadline = 30 * time.Second

var (
	httpdRestartRE = regexp.MustCompile(`^Restart succeeded, child pid is ([1-9]\d*)\n$`)
	httpdBodyRE    = regexp.MustCompile(`^pid=([1-9]\d*) generation=(\d+)\n$`)
)

func TestHTTPDExample(t *testing.T) {
	fds := extest.OpenFDs(t)
	t.Cleanup(func() {
		// Runs after every subtest and its cleanups.
		if n := extest.OpenFDs(t); n != fds {
			t.Errorf("the test process has %d fds open, %d before: the tests leaked some", n, fds)
		}
	})
	bin := extest.Build(t, "httpd")
	t.Run("Basic", func(t *testing.T) { httpdTestBasic(t, bin) })
	t.Run("Drain", func(t *testing.T) { httpdTestDrain(t, bin) })
	t.Run("BadDeploy", func(t *testing.T) { httpdTestBadDeploy(t, bin) })
	t.Run("ZeroDowntime", func(t *testing.T) { httpdTestZeroDowntime(t, bin) })
	t.Run("Wrk", func(t *testing.T) { httpdTestWrk(t, bin) })
	t.Run("SocketActivation", func(t *testing.T) { httpdTestSocketActivation(t, bin) })
	t.Run("Demo", func(t *testing.T) { httpdTestDemo(t, bin) })
}

// httpdTestBasic: a GET shows the pid and generation 0; "httpd restart"
// prints the new pid, which then answers on the same address with
// generation 1; bad input gets a 400; a failed restart request and bad
// arguments are reported; SIGTERM stops the server.
func httpdTestBasic(t *testing.T, bin string) {
	s := httpdStart(t, bin, "-listen", "127.0.0.1:0")
	c := httpdNewClient(t, s.addr, false)
	r := c.get("/")
	if r.pid != s.cmd.Process.Pid || r.gen != 0 {
		t.Fatalf("GET / answered %q, want pid=%d generation=0", r.body, s.cmd.Process.Pid)
	}
	for _, q := range []string{"", "?ms=", "?ms=abc", "?ms=-1", "?ms=+5", "?ms=1.5", "?ms=10001",
		"?ms=99999999999999999999", "?ms=1&ms=2"} {
		if r := c.do("/slow" + q); r.status != http.StatusBadRequest {
			t.Errorf("GET /slow%s: %d %q, want 400", q, r.status, r.body)
		}
	}
	if r := c.get("/slow?ms=10"); r.pid != s.cmd.Process.Pid {
		t.Errorf("GET /slow?ms=10 answered %q", r.body)
	}
	if r := c.do("/nothing"); r.status != http.StatusNotFound {
		t.Errorf("GET /nothing: %d, want 404", r.status)
	}

	pid := httpdRestart(t, bin, s.socket)
	s.instance(1)
	if r := c.get("/"); r.pid != pid || r.gen != 1 {
		t.Fatalf("after the restart GET / answered %q, want pid=%d generation=1", r.body, pid)
	}

	stdout, stderr, code := httpdRun(t, bin, "-socket", filepath.Join(t.TempDir(), "none.sock"), "restart")
	if code != 1 || stdout != "" || !strings.HasPrefix(stderr, "Restart failed: ") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("restart without a server: exit code %d, stdout %q, stderr %q; want 1, nothing, one \"Restart failed: \" line", code, stdout, stderr)
	}
	for _, args := range [][]string{{"bogus"}, {"restart", "now"}, {"-drain", "0"}, {"demo", "-restarts", "-1"}} {
		if stdout, stderr, code := httpdRun(t, bin, args...); code != 2 || stdout != "" || stderr == "" {
			t.Errorf("httpd %q: exit code %d, stdout %q, stderr %q; want 2 and a complaint", args, code, stdout, stderr)
		}
	}

	// A stop signal: the new process drains and exits, and so did the old
	// one; nothing is left.
	if err := unix.Kill(pid, unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	s.waitGone()
	if code := s.exitCode(); code != 0 {
		t.Errorf("the first generation exited with %d, want 0", code)
	}
}

// httpdTestDrain: a slow request in flight at a restart completes, from the
// old process; a keep-alive client's next request gets the new process
// without an error; a connection that stays idle is closed cleanly; and
// then the old process exits.
func httpdTestDrain(t *testing.T, bin string) {
	s := httpdStart(t, bin, "-listen", "127.0.0.1:0")
	old := s.cmd.Process.Pid
	ka := httpdNewClient(t, s.addr, true)
	if r := ka.get("/"); r.pid != old {
		t.Fatalf("GET / answered %q, want pid %d", r.body, old)
	}

	// A connection that has had one request and then says nothing.
	idle, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.SetDeadline(time.Now().Add(httpdDeadline))
	br := bufio.NewReader(idle)
	fmt.Fprintf(idle, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", s.addr)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.Close {
		t.Fatal("the server closes a keep-alive connection before any restart")
	}

	// A slow request, written before the restart begins.
	slow := httpdNewClient(t, s.addr, false)
	wrote := make(chan struct{})
	type result struct {
		r   httpdReply
		err error
	}
	slowDone := make(chan result, 1)
	go func() {
		r, err := httpdDo(slow.c, "http://"+s.addr+"/slow?ms=1000", func() { close(wrote) })
		slowDone <- result{r, err}
	}()
	select {
	case <-wrote:
	case <-time.After(httpdDeadline):
		t.Fatal("the slow request was not written")
	}

	pid := httpdRestart(t, bin, s.socket)
	s.instance(1)

	// The keep-alive client's next request goes out on its connection to
	// the old process, and the new process answers it; the connection is
	// closed after that response, and the next request opens one to the
	// new process.
	r := ka.get("/")
	if r.pid != pid || r.gen != 1 {
		t.Errorf("the keep-alive client's first request after the restart got %q, want pid=%d generation=1", r.body, pid)
	}
	if !r.reused || !r.closed {
		t.Errorf("that request went out on a reused connection: %v, and its response closed it: %v; want both", r.reused, r.closed)
	}
	if r := ka.get("/"); r.pid != pid || r.reused || r.closed {
		t.Errorf("the next request got %q (reused connection %v, closed %v), want pid %d on a new connection to it", r.body, r.reused, r.closed, pid)
	}

	select {
	case res := <-slowDone:
		if res.err != nil {
			t.Fatalf("the slow request in flight during the restart failed: %v", res.err)
		}
		if res.r.status != http.StatusOK || res.r.pid != old || res.r.gen != 0 {
			t.Errorf("the slow request in flight during the restart got %d %q, want 200 from pid %d generation 0", res.r.status, res.r.body, old)
		}
	case <-time.After(httpdDeadline):
		t.Fatal("the slow request in flight during the restart did not complete")
	}

	// The idle connection is closed (a FIN: it had nothing unread), and
	// the old process exits.
	if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("reading the idle connection to the old process: %d bytes, %v; want EOF", n, err)
	}
	select {
	case <-s.exited:
		if code := s.exitCode(); code != 0 {
			t.Errorf("the old process exited with %d, want 0", code)
		}
	case <-time.After(httpdDeadline):
		t.Fatalf("the old process %d is still running %v after the restart", old, httpdDeadline)
	}
}

// httpdTestBadDeploy: a restart into a binary that hangs and then fails is
// reported, and while it hangs the old process holds the requests that
// arrive, then answers them itself and serves on; the next good restart
// succeeds.
func httpdTestBadDeploy(t *testing.T, bin string) {
	dir := t.TempDir()
	deployed := filepath.Join(dir, "httpd") // where the server runs from, and restarts from
	b, err := os.ReadFile(bin)
	if err == nil {
		err = os.WriteFile(deployed, b, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	s := httpdStart(t, deployed, "-listen", "127.0.0.1:0")
	old := s.cmd.Process.Pid
	ka := httpdNewClient(t, s.addr, true)
	ka.get("/")

	// The bad binary says it started, waits for a go-ahead, and fails.
	started, goAhead := filepath.Join(dir, "started"), filepath.Join(dir, "go")
	for _, f := range []string{started, goAhead} {
		if err := unix.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	bad := filepath.Join(dir, "bad")
	script := fmt.Sprintf("#!/bin/sh\necho started > %s\nread x < %s\nexit 3\n", started, goAhead)
	if err := os.WriteFile(bad, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good")
	if err := os.Rename(deployed, good); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(bad, deployed); err != nil {
		t.Fatal(err)
	}

	type outcome struct {
		stdout, stderr string
		code           int
	}
	restarted := make(chan outcome, 1)
	go func() {
		stdout, stderr, code := httpdRun(t, bin, "-socket", s.socket, "restart")
		restarted <- outcome{stdout, stderr, code}
	}()
	// Opening a fifo blocks until the other end is opened too: the bad
	// binary runs, and the old process has begun the restart.
	f, err := os.Open(started)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, f)
	f.Close()

	// Meanwhile a request on a kept-alive connection, and one on a new
	// connection, are sent.
	type result struct {
		keepAlive bool
		r         httpdReply
		err       error
	}
	results := make(chan result, 2)
	for _, keepAlive := range []bool{true, false} {
		c := ka
		if !keepAlive {
			c = httpdNewClient(t, s.addr, false)
		}
		wrote := make(chan struct{})
		go func() {
			r, err := httpdDo(c.c, "http://"+s.addr+"/", func() { close(wrote) })
			results <- result{keepAlive, r, err}
		}()
		select {
		case <-wrote:
		case <-time.After(httpdDeadline):
			t.Fatal("a request was not written")
		}
	}
	// The old process serves as usual while the new one starts: both are
	// answered now, by the old process, and the kept-alive connection
	// stays open. (Nothing changes until the new process is ready; see
	// NewProcessReady in server.go.)
	for range 2 {
		var res result
		select {
		case res = <-results:
		case <-time.After(httpdDeadline):
			t.Fatal("a request sent during the restart was not answered")
		}
		if res.err != nil || res.r.status != http.StatusOK || res.r.pid != old || res.keepAlive && res.r.closed {
			t.Errorf("a request sent during the restart (keep-alive %v) got %d %q (closed %v), %v; want 200 from pid %d, and no close",
				res.keepAlive, res.r.status, res.r.body, res.r.closed, res.err, old)
		}
	}
	f, err = os.OpenFile(goAhead, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("fail now\n")
	f.Close()

	var o outcome
	select {
	case o = <-restarted:
	case <-time.After(httpdDeadline):
		t.Fatal("httpd restart did not return")
	}
	if o.code != 1 || o.stdout != "" || !strings.HasPrefix(o.stderr, "Restart failed: ") || !strings.Contains(o.stderr, "exit status 3") {
		t.Fatalf("httpd restart into a failing binary: exit code %d, stdout %q, stderr %q; want 1 and \"Restart failed: ...exit status 3...\"", o.code, o.stdout, o.stderr)
	}
	if r := ka.get("/"); r.pid != old || r.closed {
		t.Errorf("after the failed restart GET / got %q (closed %v), want pid %d, kept alive", r.body, r.closed, old)
	}

	if err := os.Rename(good, deployed); err != nil {
		t.Fatal(err)
	}
	pid := httpdRestart(t, bin, s.socket)
	s.instance(1)
	if r := ka.get("/"); r.pid != pid || r.gen != 1 {
		t.Errorf("after the good restart GET / got %q, want pid=%d generation=1", r.body, pid)
	}
}

// httpdTestZeroDowntime: keep-alive clients, clients with a new connection
// per request and slow requests never stop while the server restarts 10
// times, and not one request fails, nor needs the client's retry.
func httpdTestZeroDowntime(t *testing.T, bin string) {
	if testing.Short() {
		t.Skip("testing.Short(): 9 clients of 3 kinds while the server restarts 10 times")
	}
	const restarts = 10
	s := httpdStart(t, bin, "-listen", "127.0.0.1:0")
	l := httpdStartLoad(t, s.addr, 3)
	cur := s.cmd.Process.Pid
	pids := []int{cur}
	for i := 1; i <= restarts; i++ {
		// Restart while a slow request is in flight, once this
		// generation has served a few.
		l.waitFor(fmt.Sprintf("generation %d to serve and a slow request to be in flight", i-1), func() bool {
			return l.byPid[cur] >= 20 && l.slowInFlight.Load() > 0
		})
		ctx, cancel := context.WithTimeout(context.Background(), httpdDeadline)
		pid, err := shellflip.RequestRestart(ctx, s.socket)
		cancel()
		if err != nil {
			t.Fatalf("restart %d: %v", i, err)
		}
		s.instance(uint64(i))
		l.retire(cur)
		cur = pid
		pids = append(pids, pid)
	}
	l.waitFor("the last generation to serve", func() bool { return l.byPid[cur] >= 20 })
	l.stop()

	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("%d requests over %d restarts, %d answered by a replaced process while it drained, %d failed",
		l.total, restarts, l.drained, l.failed)
	if l.failed > 0 {
		t.Errorf("%d of %d requests failed; the first failures:\n%s", l.failed, l.total, strings.Join(l.errs, "\n"))
	}
	for gen, pid := range pids {
		if l.byPid[pid] == 0 {
			t.Errorf("generation %d (pid %d) answered no request", gen, pid)
		}
	}
}

// httpdTestWrk: wrk, which never retries, sees no socket error and no
// status other than 2xx while the server restarts several times.
func httpdTestWrk(t *testing.T, bin string) {
	if testing.Short() {
		t.Skip("testing.Short(): wrk loads the server for 4 s while it restarts 6 times")
	}
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (Debian package wrk: apt-get install -y wrk)")
	}
	const restarts = 6
	s := httpdStart(t, bin, "-listen", "127.0.0.1:0")
	cmd := exec.Command(wrk, "-t2", "-c32", "-d4s", "--timeout", "10s", "http://"+s.addr+"/")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var wrkErr error
	wrkDone := make(chan struct{})
	go func() {
		wrkErr = cmd.Wait()
		close(wrkDone)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill() // harmless once it has exited
		<-wrkDone
	})
	// wrk prints nothing until it is done (its stdout is a pipe, so libc
	// buffers it); its connections say that it is running.
	httpdWaitConns(t, s.addr, 32, wrkDone)

	// Spread the restarts over the run; wrk keeps its 32 connections busy
	// throughout.
	tick := time.NewTicker(400 * time.Millisecond)
	defer tick.Stop()
	during := 0
	for i := 1; i <= restarts; i++ {
		<-tick.C
		httpdRestart(t, bin, s.socket)
		s.instance(uint64(i))
		select {
		case <-wrkDone:
		default:
			during++
		}
	}
	select {
	case <-wrkDone:
	case <-time.After(httpdDeadline):
		t.Fatalf("wrk is still running after %v", httpdDeadline)
	}
	if wrkErr != nil {
		t.Fatalf("wrk: %v\n%s", wrkErr, stderr.Bytes())
	}
	report := stdout.String()
	t.Logf("wrk, with %d restarts during its run:\n%s", during, report)
	if during < 3 {
		t.Errorf("only %d restarts completed while wrk ran; the test proves little", during)
	}
	m := regexp.MustCompile(`(?m)^\s*(\d+) requests in `).FindStringSubmatch(report)
	if m == nil || m[1] == "0" {
		t.Errorf("wrk made no requests")
	}
	// wrk prints these lines only when a count is not zero.
	if m := regexp.MustCompile(`(?m)^\s*Socket errors: .*$`).FindString(report); m != "" {
		t.Errorf("wrk saw socket errors: %s", strings.TrimSpace(m))
	}
	if m := regexp.MustCompile(`(?m)^\s*Non-2xx or 3xx responses: .*$`).FindString(report); m != "" {
		t.Errorf("wrk saw bad statuses: %s", strings.TrimSpace(m))
	}
	c := httpdNewClient(t, s.addr, false)
	if r := c.get("/"); r.gen != restarts {
		t.Errorf("after the run GET / answered %q, want generation %d", r.body, restarts)
	}
}

// httpdTestSocketActivation: under systemd-socket-activate, which passes a
// listening socket named "http" as systemd does, the server serves on that
// socket and binds nothing itself, and its restarts keep serving on it.
func httpdTestSocketActivation(t *testing.T, bin string) {
	sa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skip("systemd-socket-activate is not installed (Debian package systemd)")
	}
	// A free port: the kernel picks one, and it is free again at once.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	// -listen names a port of its own choosing: were the server to bind
	// it, it would say so, and on another port than addr.
	s := httpdStartCmd(t, sa, []string{"-l", addr, "--fdname=http", bin, "-listen", "127.0.0.1:0"}, false)
	s.errs.wait(t, "systemd-socket-activate", regexp.MustCompile(`^Listening on `))
	s.addr = addr

	// The first connection activates the server, which accepts it.
	// systemd-socket-activate execs the server in its own place: same pid.
	c := httpdNewClient(t, addr, false)
	if r := c.get("/"); r.pid != s.cmd.Process.Pid || r.gen != 0 {
		t.Fatalf("GET / answered %q, want pid=%d generation=0", r.body, s.cmd.Process.Pid)
	}
	s.instance(0)
	for gen := 1; gen <= 2; gen++ {
		pid := httpdRestart(t, bin, s.socket)
		s.instance(uint64(gen))
		if r := c.get("/"); r.pid != pid || r.gen != gen {
			t.Fatalf("after restart %d GET / answered %q, want pid=%d generation=%d", gen, r.body, pid, gen)
		}
	}
}

// httpdTestDemo: "httpd demo" restarts its server under load without a
// failed request, prints its table, and leaves no process behind.
func httpdTestDemo(t *testing.T, bin string) {
	if testing.Short() {
		t.Skip("testing.Short(): the demo loads the server for 1.6 s while it restarts 3 times")
	}
	stdout, stderr, code := httpdRun(t, bin, "demo", "-restarts", "3")
	t.Logf("httpd demo -restarts 3:\n%s", stdout)
	if code != 0 {
		t.Fatalf("httpd demo exited with %d; stderr:\n%s", code, stderr)
	}
	start := regexp.MustCompile(`(?m)^start\s+-\s+([1-9]\d*)\s+\d+\.\d ms\s+-\s+-\s+\d+\s+0$`).FindStringSubmatch(stdout)
	rows := regexp.MustCompile(`(?m)^restart (\d+)\s+([1-9]\d*)\s+([1-9]\d*)\s+\d+\.\d ms\s+\d+\s+\d+\s+\d+\s+0$`).FindAllStringSubmatch(stdout, -1)
	if start == nil || len(rows) != 3 {
		t.Fatalf("the demo's table has no start row or not 3 restart rows")
	}
	pids := []string{start[1]}
	for i, row := range rows {
		if row[1] != strconv.Itoa(i+1) || row[2] != pids[i] {
			t.Errorf("row %q: want restart %d of pid %s", row[0], i+1, pids[i])
		}
		pids = append(pids, row[3])
	}
	if !regexp.MustCompile(`(?m)^OK: \d+ requests in .*, none failed, across 3 restarts; all 4 server processes have exited\.$`).MatchString(stdout) {
		t.Errorf("the demo's summary does not say that all went well")
	}

	// The demo is gone, and so is every server process it started: none
	// of the pids it reported, nor any other process, runs the binary.
	for _, p := range pids {
		pid, _ := strconv.Atoi(p)
		if httpdRuns(pid, bin) {
			t.Errorf("server process %d is still running after the demo exited", pid)
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && httpdRuns(pid, bin) {
			t.Errorf("process %d runs %s after the demo exited", pid, bin)
			unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// httpdWaitConns waits until n TCP connections to addr are established, as
// the kernel's socket table (/proc/net/tcp) shows them, or fails the test
// if stop is closed first.
func httpdWaitConns(t *testing.T, addr string, n int, stop <-chan struct{}) {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		t.Fatalf("%s: want an IPv4 address and port", addr)
	}
	// The remote address column, as the kernel prints it: the IPv4 address
	// as a 32-bit number in host (little-endian) order, and the port.
	b := ap.Addr().As4()
	remote := fmt.Sprintf("%02X%02X%02X%02X:%04X", b[3], b[2], b[1], b[0], ap.Port())
	deadline := time.Now().Add(httpdDeadline)
	for {
		tab, err := os.ReadFile("/proc/net/tcp")
		if err != nil {
			t.Fatal(err)
		}
		count := 0
		for _, line := range strings.Split(string(tab), "\n") {
			// sl local_address rem_address st ...: st 01 is established.
			if f := strings.Fields(line); len(f) > 3 && f[2] == remote && f[3] == "01" {
				count++
			}
		}
		if count >= n {
			return
		}
		select {
		case <-stop:
			t.Fatalf("the client exited before it had %d connections to %s", n, addr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d connections to %s established after %v", count, n, addr, httpdDeadline)
		}
		// Polling the kernel's table is the only way to observe another
		// process's connections; yield briefly between reads.
		time.Sleep(5 * time.Millisecond)
	}
}

// httpdRuns reports whether process pid runs the executable bin.
func httpdRuns(pid int, bin string) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return err == nil && strings.TrimSuffix(exe, " (deleted)") == bin
}

// httpdEnv is the environment of the processes the tests start: the
// demo's (demoEnv: nothing that would make a server think systemd runs it),
// with GORACE's atexit_sleep_ms at 0. A binary built with the race detector
// sleeps a second before it exits otherwise: a second per "httpd restart"
// and per old process would slow the tests down and stretch every restart
// past the server's idle grace. The last GORACE in the list is the one a
// command gets (os/exec's Cmd.Env).
func httpdEnv() []string {
	return append(demoEnv(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
}

// httpdServer is a server started by the test and every generation it
// restarted into, all in one process group.
type httpdServer struct {
	t      *testing.T
	cmd    *exec.Cmd
	socket string
	addr   string
	out    *httpdLines // stdout
	errs   *httpdLines // stderr
	exited chan struct{}
}

// httpdStart starts bin as a server with args and a control socket of its
// own, and waits until it serves.
func httpdStart(t *testing.T, bin string, args ...string) *httpdServer {
	t.Helper()
	return httpdStartCmd(t, bin, args, true)
}

// httpdStartCmd starts name with args and "-socket PATH" appended, and, if
// wait, waits for the first generation's "Instance no." line.
func httpdStartCmd(t *testing.T, name string, args []string, wait bool) *httpdServer {
	t.Helper()
	s := &httpdServer{
		t:      t,
		socket: filepath.Join(t.TempDir(), "ctl.sock"),
		out:    newHTTPDLines(),
		errs:   newHTTPDLines(),
		exited: make(chan struct{}),
	}
	s.cmd = exec.Command(name, append(args, "-socket", s.socket)...)
	s.cmd.Env = httpdEnv()
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = outW, errW
	err = s.cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		t.Fatal(err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	go s.out.read(outR)
	go s.errs.read(errR)
	t.Cleanup(s.cleanup)
	if wait {
		s.instance(0)
	}
	return s
}

// cleanup kills whatever is left of the server's processes, waits until all
// are gone, and shows their log if the test failed.
func (s *httpdServer) cleanup() {
	select {
	case <-s.out.eof():
	default:
		// Some process of the group holds stdout, so the group exists
		// and its id is not anyone else's.
		unix.Kill(-s.cmd.Process.Pid, unix.SIGKILL)
	}
	for _, l := range []*httpdLines{s.out, s.errs} {
		select {
		case <-l.eof():
		case <-time.After(httpdDeadline):
			s.t.Errorf("server processes still hold their stdout or stderr %v after SIGKILL", httpdDeadline)
		}
	}
	<-s.exited
	log := s.errs.all()
	if strings.Contains(log, "WARNING: DATA RACE") {
		s.t.Errorf("the race detector found a race in a server process:\n%s", log)
	} else if s.t.Failed() {
		s.t.Logf("the servers' stderr:\n%s", log)
	}
}

// instance waits for the "Instance no. gen" line, and returns its address,
// which must be the server's address once that is known.
func (s *httpdServer) instance(gen uint64) string {
	s.t.Helper()
	m := instanceRE.FindStringSubmatch(s.out.wait(s.t, "the server", regexp.MustCompile(`^Instance no\. `)))
	if m == nil || m[1] != strconv.FormatUint(gen, 10) || s.addr != "" && m[2] != s.addr {
		s.t.Fatalf("the server printed %q, want instance no. %d listening on %s", m, gen, s.addr)
	}
	s.addr = m[2]
	return m[2]
}

// waitGone waits until every process of the server has exited.
func (s *httpdServer) waitGone() {
	s.t.Helper()
	s.out.waitEOF(s.t, "the server")
	select {
	case <-s.exited:
	case <-time.After(httpdDeadline):
		s.t.Fatal("the first generation was not reaped")
	}
}

// exitCode returns the first generation's exit code, once it has exited.
func (s *httpdServer) exitCode() int {
	<-s.exited
	return s.cmd.ProcessState.ExitCode()
}

// httpdLines collects the lines a process writes to a pipe.
type httpdLines struct {
	mu      sync.Mutex
	lines   []string // not yet claimed by wait
	text    strings.Builder
	done    bool
	changed chan struct{} // closed and replaced at every line, and at the end
	end     chan struct{} // closed at the end
}

func newHTTPDLines() *httpdLines {
	return &httpdLines{changed: make(chan struct{}), end: make(chan struct{})}
}

func (l *httpdLines) read(r io.ReadCloser) {
	defer r.Close()
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		l.mu.Lock()
		l.text.WriteString(line)
		if line != "" {
			l.lines = append(l.lines, strings.TrimSuffix(line, "\n"))
		}
		if err != nil {
			l.done = true
			close(l.end)
		}
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// wait claims and returns the first line that matches re.
func (l *httpdLines) wait(t *testing.T, who string, re *regexp.Regexp) string {
	t.Helper()
	timeout := time.After(httpdDeadline)
	for {
		l.mu.Lock()
		for i, line := range l.lines {
			if re.MatchString(line) {
				l.lines = append(l.lines[:i], l.lines[i+1:]...)
				l.mu.Unlock()
				return line
			}
		}
		done, changed := l.done, l.changed
		l.mu.Unlock()
		if done {
			t.Fatalf("%s ended its output without a line matching %q", who, re)
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("%s printed no line matching %q within %v", who, re, httpdDeadline)
		}
	}
}

// eof returns a channel that is closed once the pipe has ended.
func (l *httpdLines) eof() <-chan struct{} { return l.end }

func (l *httpdLines) waitEOF(t *testing.T, who string) {
	t.Helper()
	select {
	case <-l.eof():
	case <-time.After(httpdDeadline):
		t.Fatalf("%s still holds its output open after %v", who, httpdDeadline)
	}
}

// all returns everything read so far.
func (l *httpdLines) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.text.String()
}

// httpdRun runs a command to its end and returns its output and exit code.
// At the deadline it is interrupted, as a user would with ^C.
func httpdRun(t *testing.T, name string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), httpdDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 15 * time.Second
	cmd.Env = httpdEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%s %q: %v\nstdout:\n%s\nstderr:\n%s", name, args, err, o.Bytes(), e.Bytes())
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

// httpdRestart runs "httpd -socket socket restart" and returns the new pid
// it prints.
func httpdRestart(t *testing.T, bin, socket string) int {
	t.Helper()
	stdout, stderr, code := httpdRun(t, bin, "-socket", socket, "restart")
	m := httpdRestartRE.FindStringSubmatch(stdout)
	if code != 0 || m == nil || stderr != "" {
		t.Fatalf("httpd restart: exit code %d, stdout %q, stderr %q; want 0 and \"Restart succeeded, child pid is PID\"", code, stdout, stderr)
	}
	pid, _ := strconv.Atoi(m[1])
	return pid
}

// httpdClient is an HTTP client of a server at addr, with a transport of
// its own, closed when the test ends.
type httpdClient struct {
	t    *testing.T
	c    *http.Client
	addr string
}

func httpdNewClient(t *testing.T, addr string, keepAlive bool) *httpdClient {
	tr := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	return &httpdClient{t: t, c: &http.Client{Transport: tr}, addr: addr}
}

// do sends GET path and fails the test on an error.
func (c *httpdClient) do(path string) httpdReply {
	c.t.Helper()
	r, err := httpdDo(c.c, "http://"+c.addr+path, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	return r
}

// get is do for a request that must succeed with a pid and a generation.
func (c *httpdClient) get(path string) httpdReply {
	c.t.Helper()
	r := c.do(path)
	if r.status != http.StatusOK || r.pid == 0 {
		c.t.Fatalf("GET %s: %d %q, want 200 and a pid and generation", path, r.status, r.body)
	}
	return r
}

// httpdReply is what a GET got.
type httpdReply struct {
	status   int
	body     string
	pid, gen int  // from the body, if it is "pid=PID generation=G\n"
	closed   bool // the response closed the connection
	reused   bool // the request went out on a connection used before
}

// httpdDo sends GET url, and calls wrote, if not nil, once the request is
// written. Go's transport quietly retries a request that failed on a reused
// connection; a retry is an error here, since it means the server broke a
// connection under a request.
func httpdDo(c *http.Client, url string, wrote func()) (httpdReply, error) {
	var attempts atomic.Int32
	var reused atomic.Bool
	var once sync.Once
	trace := &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) {
			attempts.Add(1)
			reused.Store(i.Reused)
		},
		WroteRequest: func(httptrace.WroteRequestInfo) {
			if wrote != nil {
				once.Do(wrote)
			}
		},
	}
	ctx, cancel := context.WithTimeout(httptrace.WithClientTrace(context.Background(), trace), httpdDeadline)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return httpdReply{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return httpdReply{}, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	if err != nil {
		return httpdReply{}, fmt.Errorf("GET %s: reading the body: %w", url, err)
	}
	r := httpdReply{status: resp.StatusCode, body: string(body), closed: resp.Close, reused: reused.Load()}
	if n := attempts.Load(); n > 1 {
		return r, fmt.Errorf("GET %s: answered %q only after %d attempts: a connection broke under the request", url, body, n)
	}
	if m := httpdBodyRE.FindStringSubmatch(r.body); m != nil {
		r.pid, _ = strconv.Atoi(m[1])
		r.gen, _ = strconv.Atoi(m[2])
	}
	return r, nil
}

// httpdLoad is clients that each send one request after the other until
// stopped, and count what they get.
type httpdLoad struct {
	t            *testing.T
	quit         chan struct{}
	wg           sync.WaitGroup
	stopOnce     sync.Once
	slowInFlight atomic.Int64 // slow requests written and not answered

	mu      sync.Mutex
	changed chan struct{} // closed and replaced at every request's end
	total   int
	failed  int
	errs    []string
	byPid   map[int]int  // successful requests by the pid that answered
	retired map[int]bool // pids of replaced processes
	drained int          // requests answered by a replaced process
}

// httpdStartLoad starts n keep-alive clients, n clients with a new
// connection per request, and n keep-alive clients asking for
// /slow?ms=slowMS, against addr: the demo's load, counted by pid.
func httpdStartLoad(t *testing.T, addr string, n int) *httpdLoad {
	l := &httpdLoad{t: t, quit: make(chan struct{}), changed: make(chan struct{}),
		byPid: map[int]int{}, retired: map[int]bool{}}
	t.Cleanup(l.stop)
	for range n {
		l.client(addr, true, "/")
		l.client(addr, false, "/")
		l.client(addr, true, "/slow?ms="+strconv.Itoa(slowMS))
	}
	return l
}

func (l *httpdLoad) client(addr string, keepAlive bool, path string) {
	tr := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 1}
	c := &http.Client{Transport: tr}
	slow := strings.HasPrefix(path, "/slow")
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
			var counted atomic.Bool // by whichever comes first: written, or done
			var wrote func()
			if slow {
				wrote = func() {
					if counted.CompareAndSwap(false, true) {
						l.slowInFlight.Add(1)
					}
				}
			}
			r, err := httpdDo(c, "http://"+addr+path, wrote)
			if slow && !counted.CompareAndSwap(false, true) {
				l.slowInFlight.Add(-1)
			}
			if err == nil && (r.status != http.StatusOK || r.pid == 0) {
				err = fmt.Errorf("GET %s: %d %q", path, r.status, r.body)
			}
			l.record(r.pid, err)
		}
	}()
}

func (l *httpdLoad) record(pid int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total++
	if err != nil {
		l.failed++
		if len(l.errs) < 20 {
			l.errs = append(l.errs, time.Now().Format("15:04:05.000000 ")+err.Error())
		}
	} else {
		l.byPid[pid]++
		if l.retired[pid] {
			l.drained++
		}
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// waitFor waits until cond, called with l.mu held, holds.
func (l *httpdLoad) waitFor(what string, cond func() bool) {
	l.t.Helper()
	timeout := time.After(httpdDeadline)
	for {
		l.mu.Lock()
		ok, changed := cond(), l.changed
		l.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			l.t.Fatalf("waited %v for %s", httpdDeadline, what)
		}
	}
}

func (l *httpdLoad) retire(pid int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.retired[pid] = true
}

// stop stops the clients and waits for their requests in flight.
func (l *httpdLoad) stop() {
	l.stopOnce.Do(func() { close(l.quit) })
	l.wg.Wait()
}
