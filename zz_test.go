//go:build linux

package shellflip

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"math"
	"math/bits"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/iotest"
	"testing/synctest"
	"time"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ==========================================================================
// The cross-process harness, and the restart engine (restart.go, notify.go, ctlsock.go)
// ==========================================================================

// The cross-process tests re-execute the test binary. TestMain sees
// $SHELLFLIP_TEST_ROLE and runs that role instead of the tests; a restart
// re-executes the same command line with the same environment, so every
// generation of a test server runs the same role. Processes report what
// they see as lines on a datagram socket owned by the test
// ($SHELLFLIP_TEST_REPORT), and the test waits for those reports with a
// deadline: no sleeps.

const (
	envTestRole   = "SHELLFLIP_TEST_ROLE"
	envTestReport = "SHELLFLIP_TEST_REPORT"
	envTestSocket = "SHELLFLIP_TEST_SOCKET"
	// A knob applies once: the process that manages to remove the file
	// named by the variable misbehaves; the next generation does not.
	envTestFailFile    = "SHELLFLIP_TEST_FAIL_FILE"  // ...before Ready, as $SHELLFLIP_TEST_FAIL_MODE says
	envTestFailMode    = "SHELLFLIP_TEST_FAIL_MODE"  // exit3, hang, closeready, halfstate, garbage
	envTestStateFail   = "SHELLFLIP_TEST_STATE_FAIL" // the old process's SendState fails
	envTestHoldFIFO    = "SHELLFLIP_TEST_HOLD_FIFO"  // a new process waits for a line on this fifo before Ready
	envTestTimeout     = "SHELLFLIP_TEST_READY_TIMEOUT"
	envTestListen      = "SHELLFLIP_TEST_LISTEN"       // comma-separated network=address pairs to Listen on
	envTestStateSize   = "SHELLFLIP_TEST_STATE_SIZE"   // bytes of filler state after the generation line
	envTestSelfRestart = "SHELLFLIP_TEST_SELF_RESTART" // generation 0 calls Restarter.Restart
)

// testDeadline bounds every wait in these tests; a healthy run is far
// quicker, and a broken one fails with a message instead of hanging.
const testDeadline = 30 * time.Second

func TestMain(m *testing.M) {
	if role := os.Getenv(envTestRole); role != "" {
		os.Exit(runTestRole(role))
	}
	os.Exit(m.Run())
}

// testRoles maps $SHELLFLIP_TEST_ROLE values to what the re-executed test
// binary does; test files add their own roles in init functions.
var testRoles = map[string]func() int{
	"server": testServer,
	"fds":    testReportFDs,
	"client": testClient,
}

func runTestRole(role string) int {
	if f := testRoles[role]; f != nil {
		return f()
	}
	fmt.Fprintf(os.Stderr, "unknown test role %q\n", role)
	return 2
}

// report sends one line to the test.
func report(format string, args ...any) {
	addr := os.Getenv(envTestReport)
	if addr == "" {
		return
	}
	c, err := net.Dial("unixgram", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "report: %v\n", err)
		return
	}
	defer c.Close()
	fmt.Fprintf(c, format, args...)
}

// takeKnob reports whether this process removed the file named by env.
func takeKnob(env string) bool {
	p := os.Getenv(env)
	return p != "" && os.Remove(p) == nil
}

// testServer is a minimal service: it receives its generation from the old
// process, listens where asked, starts the restarter and, when a restart
// succeeded, reports the new pid and exits.
func testServer() int {
	gen := 0
	pid := os.Getpid()
	report("started pid=%d", pid)
	st, err := ReceiveState()
	if err != nil {
		report("error pid=%d receive: %v", pid, err)
		return 1
	}
	if st != nil {
		br := bufio.NewReader(st)
		line, err := br.ReadString('\n')
		if err != nil {
			report("error pid=%d state: %v", pid, err)
			return 1
		}
		g, err := strconv.Atoi(strings.TrimSpace(line))
		if err != nil {
			report("error pid=%d state %q", pid, line)
			return 1
		}
		gen = g + 1
		if os.Getenv(envTestFailMode) == "halfstate" && takeKnob(envTestFailFile) {
			// Die with the state half read.
			var b [1 << 16]byte
			io.ReadFull(br, b[:])
			os.Exit(4)
		}
		n, err := io.Copy(io.Discard, br)
		if err != nil {
			report("error pid=%d state: %v", pid, err)
			return 1
		}
		report("state pid=%d bytes=%d", pid, n)
		st.Close()
	}
	var addrs []string
	for _, spec := range strings.Split(os.Getenv(envTestListen), ",") {
		network, address, ok := strings.Cut(spec, "=")
		if !ok {
			continue
		}
		var a net.Addr
		if strings.HasPrefix(network, "udp") || network == "unixgram" {
			pc, err := ListenPacket(network, address)
			if err != nil {
				report("error pid=%d listen: %v", pid, err)
				return 1
			}
			a = pc.LocalAddr()
		} else {
			ln, err := Listen(network, address)
			if err != nil {
				report("error pid=%d listen: %v (registry: %q)", pid, err, Names())
				return 1
			}
			a = ln.Addr()
			go serveHello(ln, gen)
		}
		addrs = append(addrs, a.Network()+"="+a.String())
	}
	if fifo := os.Getenv(envTestHoldFIFO); fifo != "" && StartedByRestart() {
		f, err := os.Open(fifo)
		if err == nil {
			bufio.NewReader(f).ReadString('\n')
			f.Close()
		}
	}
	if StartedByRestart() && takeKnob(envTestFailFile) {
		switch os.Getenv(envTestFailMode) {
		case "exit3":
			os.Exit(3)
		case "hang":
			select {}
		case "closeready":
			unix.Close(inherited.readyFD)
			select {}
		case "garbage":
			unix.Write(inherited.readyFD, []byte{'x'})
			select {}
		}
	}
	timeout, _ := time.ParseDuration(os.Getenv(envTestTimeout))
	stateSize, _ := strconv.Atoi(os.Getenv(envTestStateSize))
	r, err := Start(context.Background(), Config{
		SocketPath:   os.Getenv(envTestSocket),
		ReadyTimeout: timeout,
		Lifecycle: &Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				if takeKnob(envTestStateFail) {
					return errors.New("state refused by test knob")
				}
				if _, err := fmt.Fprintf(w, "%d\n", gen); err != nil {
					return err
				}
				_, err := w.Write(make([]byte, stateSize))
				return err
			},
			NewProcessFailed: func(_ context.Context, err error) {
				report("hookfailed pid=%d err=%v", pid, err)
			},
			NewProcessReady: func(_ context.Context, newPid int) {
				report("hookready pid=%d new=%d", pid, newPid)
			},
		},
	})
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	report("ready pid=%d gen=%d addrs=%s", pid, gen, strings.Join(addrs, ","))
	if gen == 0 && os.Getenv(envTestSelfRestart) != "" {
		// The program restarts itself: twice at once, to show that the
		// second call joins the first restart.
		type res struct {
			pid int
			err error
		}
		results := make(chan res, 2)
		for range 2 {
			go func() {
				p, err := r.Restart(context.Background())
				results <- res{p, err}
			}()
		}
		a, b := <-results, <-results
		report("self pid=%d new=%d other=%d err=%v", pid, a.pid, b.pid, errors.Join(a.err, b.err))
		_, err := r.Restart(context.Background())
		report("again pid=%d err=%v", pid, err)
	}
	p, err := r.Wait()
	if err != nil {
		report("ended pid=%d err=%v", pid, err)
		return 1
	}
	report("replaced pid=%d new=%d", pid, p.Pid)
	return 0
}

// serveHello greets every connection with the pid and generation.
func serveHello(ln net.Listener, gen int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(c, "pid=%d gen=%d\n", os.Getpid(), gen)
		c.Close()
	}
}

// testReportFDs reports the fds it was started with, then behaves as a
// server; it runs first thing, before the runtime opens any fd of its own.
func testReportFDs() int {
	// Listing /proc/self/fd opens one fd of its own; read the links first,
	// then drop that fd from the report by its target (the listing dir).
	ents, _ := os.ReadDir("/proc/self/fd")
	var fds []string
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || strings.HasPrefix(target, "/proc/") {
			continue // the listing's own fd, closed by now
		}
		kind := "other(" + target + ")"
		switch {
		case strings.HasPrefix(target, "socket:"):
			kind = "socket"
		case strings.HasPrefix(target, "pipe:"):
			kind = "pipe"
		case strings.HasPrefix(target, "anon_inode:"), strings.HasPrefix(target, "/sys/fs/cgroup/"):
			// The runtime's own (epoll, eventfd, pidfd, and the cgroup
			// CPU limit files it watches for GOMAXPROCS), opened
			// close-on-exec after the exec; not inherited.
			continue
		}
		fd, _ := strconv.Atoi(e.Name())
		if fd <= 2 {
			kind = "stdio"
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err == nil && fl&unix.FD_CLOEXEC != 0 {
			kind += "+cloexec"
		}
		fds = append(fds, e.Name()+":"+kind)
	}
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LISTEN_") || strings.HasPrefix(kv, "SHELLFLIP_") && !strings.HasPrefix(kv, "SHELLFLIP_TEST_") {
			env = append(env, kv)
		}
	}
	report("fds pid=%d open=%s env=%s", os.Getpid(), strings.Join(fds, ","), strings.Join(env, ";"))
	return testServer()
}

// testClient asks for a restart and reports the outcome: it runs as another
// uid in TestControlSocketForeignUID.
func testClient() int {
	pid, err := RequestRestart(context.Background(), os.Getenv(envTestSocket))
	report("client pid=%d err=%v", pid, err)
	return 0
}

// testReports receives the lines the test's processes send. A goroutine
// reads them as they come: a datagram socket queues only a few unread
// messages, and a role blocked on a full queue could stall a restart.
type testReports struct {
	t     *testing.T
	conn  *net.UnixConn
	path  string
	lines chan string
	seen  []string
}

func newTestReports(t *testing.T, dir string) *testReports {
	path := filepath.Join(dir, "report.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	r := &testReports{t: t, conn: c, path: path, lines: make(chan string, 1<<14)}
	go func() {
		defer close(r.lines)
		var buf [8192]byte
		for {
			n, err := c.Read(buf[:])
			if err != nil {
				return
			}
			r.lines <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { c.Close() })
	return r
}

// next returns the next report that starts with prefix, failing the test if
// none arrives in time or a process reports an error first.
func (r *testReports) next(prefix string) map[string]string {
	r.t.Helper()
	timeout := time.After(testDeadline)
	for {
		for i, line := range r.seen {
			if strings.HasPrefix(line, prefix+" ") {
				r.seen = slices.Delete(r.seen, i, i+1)
				return parseReport(line)
			}
		}
		select {
		case line, ok := <-r.lines:
			if !ok {
				r.t.Fatalf("waiting for a %q report: the report socket is closed (unclaimed reports: %q)", prefix, r.seen)
			}
			if strings.HasPrefix(line, "error ") && prefix != "error" {
				r.t.Fatalf("a test process failed: %s", line)
			}
			r.seen = append(r.seen, line)
		case <-timeout:
			r.t.Fatalf("waiting for a %q report: none in %v (unclaimed reports: %q)", prefix, testDeadline, r.seen)
		}
	}
}

// drain returns the reports that arrived and were not claimed, for failure
// messages.
func (r *testReports) drain() []string {
	for {
		select {
		case line, ok := <-r.lines:
			if !ok {
				return r.seen
			}
			r.seen = append(r.seen, line)
		case <-time.After(100 * time.Millisecond):
			return r.seen
		}
	}
}

// parseReport turns "kind k=v k=v" into a map, with the kind under "".
func parseReport(line string) map[string]string {
	m := map[string]string{}
	kind, rest, _ := strings.Cut(line, " ")
	m[""] = kind
	for rest != "" {
		var field string
		field, rest, _ = strings.Cut(rest, " ")
		k, v, _ := strings.Cut(field, "=")
		if k == "err" { // the error text runs to the end of the line
			if rest != "" {
				v += " " + rest
			}
			rest = ""
		}
		m[k] = v
	}
	return m
}

// testCluster is a test server and every generation it restarts into.
type testCluster struct {
	t       *testing.T
	dir     string
	socket  string
	reports *testReports
	exited  chan struct{} // closed when generation 0 has exited and was reaped
	mu      sync.Mutex
	pids    []int
}

func newTestCluster(t *testing.T) *testCluster {
	dir := t.TempDir()
	c := &testCluster{t: t, dir: dir, socket: filepath.Join(dir, "ctl.sock"), exited: make(chan struct{})}
	c.reports = newTestReports(t, dir)
	t.Cleanup(c.killAll)
	return c
}

// start runs generation 0 of the test server with extra environment, and
// waits until it is ready.
func (c *testCluster) start(role string, env ...string) map[string]string {
	c.t.Helper()
	return c.startBin(os.Args[0], role, env...)
}

// startBin is start with the test binary at bin.
func (c *testCluster) startBin(bin, role string, env ...string) map[string]string {
	c.t.Helper()
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(),
		// A race-enabled binary otherwise sleeps a second at exit.
		"GORACE=atexit_sleep_ms=0",
		envTestRole+"="+role,
		envTestReport+"="+c.reports.path,
		envTestSocket+"="+c.socket)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	// The first generation is our child: reap it in the background. Later
	// generations are its children, reaped by it, or reparented.
	go func() {
		cmd.Wait()
		close(c.exited)
	}()
	c.track(cmd.Process.Pid)
	c.reports.next("started")
	rep := c.reports.next("ready")
	if rep["pid"] != strconv.Itoa(cmd.Process.Pid) {
		c.t.Fatalf("ready report from pid %s, started %d", rep["pid"], cmd.Process.Pid)
	}
	return rep
}

func (c *testCluster) track(pid int) {
	c.mu.Lock()
	c.pids = append(c.pids, pid)
	c.mu.Unlock()
}

func (c *testCluster) killAll() {
	c.mu.Lock()
	started := len(c.pids) > 0
	for _, pid := range c.pids {
		unix.Kill(pid, unix.SIGKILL)
	}
	c.mu.Unlock()
	// Wait for generation 0 to be reaped, so that exec.Cmd's fds for it
	// are closed before the next test counts fds.
	if started {
		select {
		case <-c.exited:
		case <-time.After(testDeadline):
			c.t.Errorf("generation 0 was not reaped after SIGKILL")
		}
	}
}

// restart asks for a restart over the control socket and waits for the new
// generation's ready report and the old one's exit report.
func (c *testCluster) restart(oldPid string) (newReady map[string]string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err != nil {
		c.t.Fatalf("RequestRestart: %v (reports: %q)", err, c.reports.drain())
	}
	c.track(pid)
	ready := c.reports.next("ready")
	if ready["pid"] != strconv.Itoa(pid) {
		c.t.Fatalf("RequestRestart returned pid %d, but pid %s became ready", pid, ready["pid"])
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != oldPid || repl["new"] != strconv.Itoa(pid) {
		c.t.Fatalf("old process reported %v, want pid=%s new=%d", repl, oldPid, pid)
	}
	return ready
}

// requestErr asks for a restart that is expected to fail.
func (c *testCluster) requestErr() error {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err == nil {
		c.track(pid)
		c.t.Fatalf("RequestRestart succeeded (pid %d), want a failure", pid)
	}
	return err
}

// waitGone waits until pid no longer exists: it was reaped, not a zombie.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	// A pidfd becomes readable when the process exits; kill(pid, 0) then
	// tells a reaped process (ESRCH) from a zombie.
	pfd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return
	}
	if err != nil {
		t.Fatalf("pidfd_open(%d): %v", pid, err)
	}
	defer unix.Close(pfd)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	if n, err := unix.Poll(fds, int(testDeadline/time.Millisecond)); err != nil || n == 0 {
		t.Fatalf("pid %d still running after %v", pid, testDeadline)
	}
	// Exited; the old process reaps it before it answers, so by the time a
	// test calls this after an answer, there is no zombie either.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		t.Fatalf("pid %d exited but was not reaped: %s", pid, st)
	}
}

func TestRestartBySocket(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	r1 := c.restart(r0["pid"])
	// NewProcessReady ran in the old process, for the new one. (That it
	// runs before anyone is told is what TestRestarterExample's clients
	// show: every one that connects after the restart reaches the new
	// process, because the example stops accepting in the hook.)
	if h := c.reports.next("hookready"); h["pid"] != r0["pid"] || h["new"] != r1["pid"] {
		t.Errorf("NewProcessReady reported %v, want pid=%s new=%s", h, r0["pid"], r1["pid"])
	}
	if r1["gen"] != "1" {
		t.Errorf("new process reports generation %s, want 1 (state handover)", r1["gen"])
	}
	r2 := c.restart(r1["pid"])
	if r2["gen"] != "2" {
		t.Errorf("third process reports generation %s, want 2", r2["gen"])
	}
}

func TestRestartBySignal(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	pid, _ := strconv.Atoi(r0["pid"])
	if err := unix.Kill(pid, unix.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	r1 := c.reports.next("ready")
	np, _ := strconv.Atoi(r1["pid"])
	c.track(np)
	if r1["gen"] != "1" {
		t.Errorf("generation %s, want 1", r1["gen"])
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != r0["pid"] || repl["new"] != r1["pid"] {
		t.Errorf("old process reported %v", repl)
	}
	select {
	case <-c.exited:
	case <-time.After(testDeadline):
		t.Fatalf("old process %d did not exit", pid)
	}
}

// TestRestartByProgram: Restarter.Restart restarts, concurrent calls share
// one restart, and a call after it is answered, not blocked.
func TestRestartByProgram(t *testing.T) {
	c := newTestCluster(t)
	c.start("server", envTestSelfRestart+"=1")
	self := c.reports.next("self")
	if self["new"] == "0" || self["new"] != self["other"] || self["err"] != "<nil>" {
		t.Fatalf("Restart: %v, want one new pid for both calls and no error", self)
	}
	np, _ := strconv.Atoi(self["new"])
	c.track(np)
	if r := c.reports.next("ready"); r["pid"] != self["new"] || r["gen"] != "1" {
		t.Errorf("new process reported %v, want pid %s, generation 1", r, self["new"])
	}
	if again := c.reports.next("again"); !strings.Contains(again["err"], "replaced already") {
		t.Errorf("Restart after the restart: %v, want an error saying so", again)
	}
}

// TestRestartDeletedBinary: when the program's file is gone (a binary that
// "go run" built and removed, say), the running executable is restarted.
func TestRestartDeletedBinary(t *testing.T) {
	c := newTestCluster(t)
	bin := filepath.Join(c.dir, "gone.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	r0 := c.startBin(bin, "server")
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if r1 := c.restart(r0["pid"]); r1["gen"] != "1" {
		t.Errorf("new process reports generation %s, want 1", r1["gen"])
	}
}

func TestRestartLargeState(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server", envTestStateSize+"="+strconv.Itoa(8<<20))
	c.restart(r0["pid"])
	st := c.reports.next("state")
	if st["bytes"] != strconv.Itoa(8<<20) {
		t.Errorf("new process read %s bytes of filler state, want %d", st["bytes"], 8<<20)
	}
}

// TestRestartFailures starts new processes that fail in each way we know
// and checks that the requester learns why, the failed process is gone, and
// the old process keeps serving: the next restart succeeds.
func TestRestartFailures(t *testing.T) {
	for _, tc := range []struct {
		mode, knob, timeout string
		want                string
	}{
		{"exit3", envTestFailFile, "", "exited before it was ready (exit status 3)"},
		{"hang", envTestFailFile, "1s", "not ready within 1s (signal: killed)"},
		{"closeready", envTestFailFile, "", "closed its readiness socket before it was ready (signal: killed)"},
		{"garbage", envTestFailFile, "", "unexpected byte 0x78 on the readiness socket (signal: killed)"},
		{"halfstate", envTestFailFile, "", "exit status 4)"},
		{"statefail", envTestStateFail, "", "sending state: state refused by test knob (signal: killed)"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			c := newTestCluster(t)
			knob := filepath.Join(c.dir, "knob")
			if err := os.WriteFile(knob, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			env := []string{tc.knob + "=" + knob, envTestFailMode + "=" + tc.mode}
			if tc.mode == "halfstate" {
				env = append(env, envTestStateSize+"="+strconv.Itoa(1<<20))
			}
			if tc.timeout != "" {
				env = append(env, envTestTimeout+"="+tc.timeout)
			}
			r0 := c.start("server", env...)
			err := c.requestErr()
			if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("RequestRestart error %q, want ErrRestartFailed with %q", err, tc.want)
			}
			var bad int
			if _, serr := fmt.Sscanf(err.Error(), "new process %d:", &bad); serr != nil {
				t.Fatalf("error %q does not name the failed pid", err)
			}
			if h := c.reports.next("hookfailed"); h["pid"] != r0["pid"] || h["err"] != err.Error() {
				t.Errorf("NewProcessFailed reported %v, want pid=%s and the error the requester got", h, r0["pid"])
			}
			waitGone(t, bad)
			c.restart(r0["pid"])
		})
	}
}

func TestRestartConcurrentRequesters(t *testing.T) {
	c := newTestCluster(t)
	fifo := filepath.Join(c.dir, "hold")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("server", envTestHoldFIFO+"="+fifo)
	const n = 16
	pids := make(chan int, n)
	errs := make(chan error, n)
	ask := func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		pid, err := RequestRestart(ctx, c.socket)
		pids <- pid
		errs <- err
	}
	go ask()
	// The new process is now held before Ready: the restart is in flight.
	c.reports.next("started")
	for range n - 1 {
		go ask()
	}
	// Release the new process once all requesters are queued on the old
	// one's socket; opening the fifo for writing blocks until the new
	// process opens it for reading.
	waitQueued(t, c.socket, n)
	f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("go\n")
	f.Close()
	want := -1
	for range n {
		pid, err := <-pids, <-errs
		if err != nil {
			t.Fatalf("requester: %v", err)
		}
		if want == -1 {
			want = pid
			c.track(pid)
		}
		if pid != want {
			t.Errorf("requesters got pids %d and %d; all should get the one restart's outcome", want, pid)
		}
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != r0["pid"] || repl["new"] != strconv.Itoa(want) {
		t.Errorf("old process reported %v", repl)
	}
}

// waitQueued waits until n connections to the unix socket at path are
// established, as the kernel's socket table (/proc/net/unix) shows them.
func waitQueued(t *testing.T, path string, n int) {
	t.Helper()
	deadline := time.Now().Add(testDeadline)
	for {
		b, err := os.ReadFile("/proc/net/unix")
		if err != nil {
			t.Fatal(err)
		}
		count := 0
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			// Num RefCount Protocol Flags Type St Inode Path: St 03 is connected.
			if len(f) == 8 && f[7] == path && f[5] == "03" {
				count++
			}
		}
		if count >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d connections to %s established", count, n, path)
		}
		// Polling the kernel's table is the only way to observe another
		// process's accepted connections; yield briefly between reads.
		time.Sleep(5 * time.Millisecond)
	}
}

// TestControlSocketSilentClient: a client that connects and says nothing
// delays nobody, and is answered (not silently dropped) when its time is up.
func TestControlSocketSilentClient(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	silent, err := net.Dial("unix", c.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c.restart(r0["pid"])
	silent.SetReadDeadline(time.Now().Add(testDeadline))
	var scratch [512]byte
	payload, err := readFrame(silent, scratch[:])
	if err != nil {
		t.Fatalf("silent client got no answer: %v", err)
	}
	m, err := decodeMessage(payload)
	if err != nil || m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request: no request received before this process stopped serving restarts (replaced by pid") {
		t.Fatalf("silent client got %+v, %v; want a RestartFailed naming a bad request", m, err)
	}
}

// TestControlSocketBadFrames: garbage, oversized and half frames get a clear
// answer and do not disturb the next request.
func TestControlSocketBadFrames(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	for _, tc := range []struct {
		name, send, want string
	}{
		{"garbage", "\x00\x00\x00\x05hello", "bad request"},
		{"oversized", "\x40\x00\x00\x00", "exceeds"},
		{"response", string(appendRestartComplete(nil, 7)), "unexpected message"},
		{"empty", "\x00\x00\x00\x00", "bad request"},
	} {
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte(tc.send))
		conn.SetReadDeadline(time.Now().Add(testDeadline))
		var scratch [512]byte
		payload, err := readFrame(conn, scratch[:])
		conn.Close()
		if err != nil {
			t.Fatalf("%s: no answer: %v", tc.name, err)
		}
		m, err := decodeMessage(payload)
		if err != nil || m.kind != msgRestartFailed || !strings.Contains(m.text, tc.want) {
			t.Errorf("%s: got %+v, %v; want RestartFailed containing %q", tc.name, m, err, tc.want)
		}
	}
	c.restart(r0["pid"])
}

// TestControlSocketForeignUID: a client of another uid is refused by
// SO_PEERCRED even when the socket's mode lets it connect.
func TestControlSocketForeignUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid; CI runs as root")
	}
	c := newTestCluster(t)
	r0 := c.start("server")
	// Let uid 65534 reach the socket: the directory and the socket itself.
	os.Chmod(c.dir, 0o755)
	os.Chmod(c.reports.path, 0o777)
	if err := os.Chmod(c.socket, 0o777); err != nil {
		t.Fatal(err)
	}
	// The test binary must be reachable for uid 65534 too: copy it out of
	// the go command's private build directory.
	bin := filepath.Join(c.dir, "client.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	for d := c.dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestRole+"=client", envTestReport+"="+c.reports.path, envTestSocket+"="+c.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	rep := c.reports.next("client")
	if !strings.Contains(rep["err"], "permission denied: uid 65534") {
		t.Fatalf("foreign client got %v, want a permission error", rep)
	}
	c.restart(r0["pid"])
}

// TestControlSocketPathInTheWay: whatever is at the socket path and is not
// a stale socket is an error, and is left exactly as it was.
func TestControlSocketPathInTheWay(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("precious"), 0o600)
	sub := filepath.Join(dir, "dir")
	os.Mkdir(sub, 0o700)
	link := filepath.Join(dir, "link")
	os.Symlink(file, link)
	dangling := filepath.Join(dir, "dangling")
	os.Symlink(filepath.Join(dir, "nowhere"), dangling)
	live := filepath.Join(dir, "live")
	ln, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range []struct{ path, want string }{
		{file, "regular file is in the way"},
		{sub, "directory is in the way"},
		{link, "symlink is in the way"},
		{dangling, "symlink is in the way"},
		{live, "another process is listening"},
	} {
		var before unix.Stat_t
		unix.Lstat(tc.path, &before)
		fd, err := bindControl(tc.path)
		if err == nil {
			unix.Close(fd)
			t.Errorf("%s: bound, want an error", tc.path)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q, want %q", tc.path, err, tc.want)
		}
		var after unix.Stat_t
		if err := unix.Lstat(tc.path, &after); err != nil || after.Ino != before.Ino || after.Mode != before.Mode {
			t.Errorf("%s: changed: %v", tc.path, err)
		}
	}
	if b, _ := os.ReadFile(file); string(b) != "precious" {
		t.Errorf("file content changed to %q", b)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".shellflip-*"))
	if len(leftovers) > 0 {
		t.Errorf("temporary sockets left behind: %v", leftovers)
	}
}

// TestControlSocketStaleAndMode: a stale socket file is replaced, and the
// new socket has mode 0600.
func TestControlSocketStaleAndMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves a stale socket file behind
	fd, err := bindControl(path)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Mode&0o777 != 0o600 {
		t.Errorf("socket mode %o, want a socket with 0600", st.Mode)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the new socket does not accept: %v", err)
	}
	c.Close()
}

// TestNewProcessFDs: the new process starts with exactly stdio, the passed
// listeners at 3.., and the library's own fds, and once the package is
// initialised all of them are close-on-exec and the variables are gone.
func TestNewProcessFDs(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("fds", envTestListen+"=tcp=127.0.0.1:0,unix="+filepath.Join(c.dir, "l.sock"))
	c.reports.next("fds") // generation 0 was started by exec.Cmd: not ours to judge
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err != nil {
		t.Fatalf("%v (reports: %q)", err, c.reports.drain())
	}
	c.track(pid)
	rep := c.reports.next("fds")
	open := strings.Split(rep["open"], ",")
	fdNum := func(s string) int { n, _, _ := strings.Cut(s, ":"); i, _ := strconv.Atoi(n); return i }
	sort.Slice(open, func(i, j int) bool { return fdNum(open[i]) < fdNum(open[j]) })
	// stdio; the two listeners at 3 and 4; readiness, state and control
	// socket; all but stdio close-on-exec once the package is initialised.
	want := []string{"0:stdio", "1:stdio", "2:stdio", "3:socket+cloexec", "4:socket+cloexec",
		"5:socket+cloexec", "6:pipe+cloexec", "7:socket+cloexec"}
	if !slices.Equal(open, want) {
		t.Errorf("new process started with fds\n%v, want\n%v", open, want)
	}
	if rep["env"] != "" {
		t.Errorf("variables left in the environment: %s", rep["env"])
	}
	r1 := c.reports.next("ready")
	c.reports.next("replaced")
	// The listeners were inherited, not re-bound: same addresses.
	if r1["addrs"] != r0["addrs"] {
		t.Errorf("new process listens on %s, old on %s", r1["addrs"], r0["addrs"])
	}
}

func TestChildEnv(t *testing.T) {
	env := childEnv(
		[]string{"PATH=/bin", "LISTEN_FDS=9", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "SHELLFLIP_READY_FD=4", "KEEP=1", "OVER=old"},
		[]string{"OVER=new", "EXTRA=1"},
		[]string{"a", "b"}, 5, 6, 7)
	want := []string{"PATH=/bin", "KEEP=1", "OVER=new", "EXTRA=1", "LISTEN_PID=auto", "LISTEN_FDS=2", "LISTEN_FDNAMES=a:b",
		"SHELLFLIP_READY_FD=5", "SHELLFLIP_STATE_FD=6", "SHELLFLIP_CONTROL_FD=7"}
	if !slices.Equal(env, want) {
		t.Errorf("childEnv:\n got %q\nwant %q", env, want)
	}
}

// TestTakeInheritanceHostile feeds the fd takeover environments that name
// fds that are closed, of the wrong type, out of range or malformed.
func TestTakeInheritanceHostile(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	// In each environment, P stands for a fresh pipe's read end, S for a
	// fresh socket, C for a closed fd.
	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"closed", map[string]string{envReadyFD: "C", envStateFD: "P"}, "bad file descriptor"},
		{"opened here", map[string]string{envReadyFD: "O", envStateFD: "P"}, "was not inherited"},
		{"wrong type", map[string]string{envReadyFD: "P", envStateFD: "P"}, "is a pipe, want a socket"},
		{"same fd twice", map[string]string{envReadyFD: "S", envStateFD: "S"}, "overlaps"},
		{"negative", map[string]string{envReadyFD: "-1", envStateFD: "P"}, "not an fd number"},
		{"garbage", map[string]string{envReadyFD: "4x", envStateFD: "P"}, "not an fd number"},
		{"leading zero", map[string]string{envReadyFD: "04", envStateFD: "P"}, "not an fd number"},
		{"huge", map[string]string{envReadyFD: "99999999999", envStateFD: "P"}, "not an fd number"},
		{"stdio", map[string]string{envReadyFD: "1", envStateFD: "P"}, "overlaps"},
		{"alone", map[string]string{envReadyFD: "S"}, "must be set together"},
		{"control not a socket", map[string]string{envReadyFD: "S", envStateFD: "P", envControlFD: "P"}, "overlaps"},
		{"listen count", map[string]string{envListenPID: pid, envListenFDs: "x"}, "not a count"},
		{"listen too many", map[string]string{envListenPID: pid, envListenFDs: "100000000"}, "not a count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countFDs(t)
			// Without close-on-exec, as fds inherited across execve are.
			var p [2]int
			if err := unix.Pipe2(p[:], 0); err != nil {
				t.Fatal(err)
			}
			sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			// A socket of this process's own, close-on-exec as Go makes
			// every fd: never to be taken, whatever the variables say.
			own, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			env := map[string]string{}
			for k, v := range tc.env {
				v = strings.NewReplacer("P", strconv.Itoa(p[0]), "S", strconv.Itoa(sp[0]), "C", strconv.Itoa(p[1]+1000),
					"O", strconv.Itoa(own[0])).Replace(v)
				env[k] = v
			}
			var unset []string
			inh := takeInheritance(func(k string) (string, bool) { v, ok := env[k]; return v, ok },
				func(k string) error { unset = append(unset, k); return nil })
			if inh.err == nil || !strings.Contains(inh.err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", inh.err, tc.want)
			}
			if inh.readyFD >= 0 || inh.stateFD >= 0 {
				t.Errorf("took fds %d, %d despite the error", inh.readyFD, inh.stateFD)
			}
			for k := range tc.env {
				if !strings.HasPrefix(k, "LISTEN_") && !slices.Contains(unset, k) {
					t.Errorf("%s was not removed from the environment", k)
				}
			}
			// What was validated and then refused is closed, not leaked;
			// close what was not.
			unix.Close(p[0])
			unix.Close(sp[0])
			unix.Close(p[1])
			unix.Close(sp[1])
			unix.Close(own[0])
			unix.Close(own[1])
			if after := countFDs(t); after != before {
				t.Errorf("%d fds open before, %d after", before, after)
			}
		})
	}
}

// buildExample builds ./examples/name into a temporary directory, with the
// race detector if this test binary has it, and returns the binary's path.
func buildExample(t *testing.T, name string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool on $PATH to build examples/%s with: %v", name, err)
	}
	bin := filepath.Join(t.TempDir(), name)
	args := []string{"build", "-o", bin}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "-race" && s.Value == "true" {
				args = append(args, "-race")
			}
		}
	}
	cmd := exec.Command(goTool, append(args, "./examples/"+name)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(cmd.Args[1:], " "), err, out)
	}
	return bin
}

// openFDs counts the test process's open fds, once the runtime's poller
// (which opens fds of its own on first use) is up.
func openFDs(t *testing.T) int {
	t.Helper()
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	return countFDs(t)
}

// countFDs counts this process's open fds.
func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestRequestRestartNoServer: a missing socket is a plain dial error, not
// ErrRestartFailed.
func TestRequestRestartNoServer(t *testing.T) {
	_, err := RequestRestart(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || errors.Is(err, ErrRestartFailed) {
		t.Fatalf("got %v, want a dial error", err)
	}
}

var _ = binary.BigEndian

func copyExecutable(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

// ==========================================================================
// The control-socket protocol (wire.go)
// ==========================================================================

// wireFrameOf returns payload with its 4-byte big-endian length header.
func wireFrameOf(payload string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

func TestWireEncodeExact(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"TryRestart", appendTryRestart(nil),
			"\x00\x00\x00\x18" + `{"Request":"TryRestart"}`},
		{"RestartComplete 1234", appendRestartComplete(nil, 1234),
			"\x00\x00\x00\x25" + `{"Response":{"RestartComplete":1234}}`},
		{"RestartComplete 0", appendRestartComplete(nil, 0),
			"\x00\x00\x00\x22" + `{"Response":{"RestartComplete":0}}`},
		{"RestartComplete max", appendRestartComplete(nil, 4294967295),
			"\x00\x00\x00\x2b" + `{"Response":{"RestartComplete":4294967295}}`},
		{"RestartFailed", appendRestartFailed(nil, "huge success"),
			"\x00\x00\x00\x2d" + `{"Response":{"RestartFailed":"huge success"}}`},
		{"RestartFailed empty", appendRestartFailed(nil, ""),
			"\x00\x00\x00\x21" + `{"Response":{"RestartFailed":""}}`},
		{"appends to dst", appendTryRestart([]byte("xyz")),
			"xyz\x00\x00\x00\x18" + `{"Request":"TryRestart"}`},
		{"two frames", appendRestartComplete(appendTryRestart(nil), 7),
			"\x00\x00\x00\x18" + `{"Request":"TryRestart"}` + "\x00\x00\x00\x22" + `{"Response":{"RestartComplete":7}}`},
	}
	for _, tt := range tests {
		if string(tt.got) != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, tt.got, tt.want)
		}
	}
	// The header lengths above were counted by hand; count them again.
	for _, tt := range tests[:6] {
		if n := binary.BigEndian.Uint32([]byte(tt.want)); int(n) != len(tt.want)-4 {
			t.Errorf("%s: test header says %d, payload has %d bytes", tt.name, n, len(tt.want)-4)
		}
	}
}

// wireEscapes maps a RestartFailed text to the inside of the JSON string
// serde_json writes for it (after from_utf8_lossy for invalid UTF-8).
var wireEscapes = []struct {
	in, want string
}{
	{"", ""},
	{"plain text", "plain text"},
	{`"`, `\"`},
	{`\`, `\\`},
	{`say "hi" \o/`, `say \"hi\" \\o/`},
	{"/", "/"}, // serde_json does not escape the solidus
	{"\b\f\n\r\t", `\b\f\n\r\t`},
	{"\x00\x01\x07\x0b\x0e\x1a\x1f", `\u0000\u0001\u0007\u000b\u000e\u001a\u001f`}, // lowercase hex
	{"\x7f", "\x7f"},                 // DEL is not escaped
	{" ~", " ~"},                     // printable ASCII bounds
	{"<>&'", "<>&'"},                 // no HTML escaping
	{"é€😀", "é€😀"},                   // non-ASCII raw
	{"\u2028\u2029", "\u2028\u2029"}, // unlike encoding/json, serde_json writes these raw
	{"\ufffd", "\ufffd"},             // a real U+FFFD stays one U+FFFD

	// Invalid UTF-8: one U+FFFD per maximal subpart, as Rust's from_utf8_lossy.
	{"\xff", "\ufffd"},
	{"a\x80b", "a\ufffdb"},
	{"\xe2\x82", "\ufffd"},                               // truncated 3-byte sequence: one, not two
	{"\xe2\x82x", "\ufffdx"},                             // same, mid-string
	{"Hello \xF0\x90\x80World", "Hello \ufffdWorld"},     // the example in Rust's from_utf8_lossy docs
	{"\xf0\x90\x80", "\ufffd"},                           // truncated 4-byte sequence
	{"\xf1\x80\x80\xf1\x80\x80\x80", "\ufffd\U00040000"}, // truncated, then a valid one
	{"\xc0\xaf", "\ufffd\ufffd"},                         // overlong '/': C0 is never valid
	{"\xe0\x80\xaf", "\ufffd\ufffd\ufffd"},               // overlong: E0 needs A0..BF next
	{"\xed\xa0\x80", "\ufffd\ufffd\ufffd"},               // UTF-8-encoded surrogate U+D800
	{"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"},     // past U+10FFFF
	{"\xf5\x80", "\ufffd\ufffd"},                         // F5 is never valid
	{"\x80\x80\x80", "\ufffd\ufffd\ufffd"},               // lone continuation bytes, one each
	{"\xe2\x82\xe2\x82\xac", "\ufffd€"},                  // truncated, then a valid euro sign
	{"\xc3", "\ufffd"},                                   // truncated at the very end
	{"\"\xff\n", `\"` + "\ufffd" + `\n`},
}

func TestWireEscape(t *testing.T) {
	for _, tt := range wireEscapes {
		frame := appendRestartFailed(nil, tt.in)
		want := wireFrameOf(`{"Response":{"RestartFailed":"` + tt.want + `"}}`)
		if !bytes.Equal(frame, want) {
			t.Errorf("appendRestartFailed(%q) = %q, want %q", tt.in, frame, want)
			continue
		}
		if got := wireRefLossy(tt.in); got != wireMustUnquote(t, tt.want) {
			t.Errorf("reference lossy(%q) = %q, disagrees with the table", tt.in, got)
		}
		m, err := decodeMessage(frame[4:])
		if err != nil || m != (message{kind: msgRestartFailed, text: wireRefLossy(tt.in)}) {
			t.Errorf("decode(encode(%q)) = %+v, %v", tt.in, m, err)
		}
	}
}

// wireMustUnquote decodes the inside of a JSON string with encoding/json.
func wireMustUnquote(t testing.TB, inner string) string {
	t.Helper()
	var s string
	if err := json.Unmarshal([]byte(`"`+inner+`"`), &s); err != nil {
		t.Fatalf("unquote %q: %v", inner, err)
	}
	return s
}

// wireRefLossy is String::from_utf8_lossy written a second way: a maximal
// subpart is the longest prefix that is not yet a full rune to
// utf8.FullRuneInString, which reports false exactly for a proper prefix of a
// valid encoding.
func wireRefLossy(s string) string {
	var b strings.Builder
	for len(s) > 0 {
		r, size := utf8.DecodeRuneInString(s)
		if r == utf8.RuneError && size == 1 {
			size = wireRefInvalidLen(s)
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[:size])
		}
		s = s[size:]
	}
	return b.String()
}

func wireRefInvalidLen(s string) int {
	n := 1
	for n < len(s) && n < utf8.UTFMax && !utf8.FullRuneInString(s[:n+1]) {
		n++
	}
	return n
}

// TestWireInvalidLen compares wireInvalidLen with the reference on every
// invalid sequence of up to three bytes and on every 4-byte one whose first
// three bytes could start a valid sequence.
func TestWireInvalidLen(t *testing.T) {
	check := func(s string) {
		if r, size := utf8.DecodeRuneInString(s); r != utf8.RuneError || size != 1 {
			return
		}
		if got, want := wireInvalidLen(s), wireRefInvalidLen(s); got != want {
			t.Fatalf("wireInvalidLen(%q) = %d, want %d", s, got, want)
		}
	}
	var b [4]byte
	for b0 := 0x80; b0 <= 0xff; b0++ {
		b[0] = byte(b0)
		check(string(b[:1]))
		for b1 := range 256 {
			b[1] = byte(b1)
			check(string(b[:2]))
			for b2 := range 256 {
				b[2] = byte(b2)
				check(string(b[:3]))
				if b0 < 0xf0 || b0 > 0xf4 || b1 < 0x80 || b1 > 0xbf || b2 < 0x80 || b2 > 0xbf {
					continue
				}
				for b3 := range 256 {
					b[3] = byte(b3)
					check(string(b[:4]))
				}
			}
		}
	}
}

// TestWireEscapeMatchesEncodingJSON checks the escaper against encoding/json,
// which escapes exactly like serde_json once HTML escaping is off, except
// that it also escapes U+2028 and U+2029 (left out here).
func TestWireEscapeMatchesEncodingJSON(t *testing.T) {
	var all []byte
	for c := range 0x80 {
		all = append(all, byte(c))
	}
	all = append(all, "é€😀\U0010ffff"...)
	for _, s := range []string{string(all), "abc", `"\`} {
		if got, want := string(appendRestartFailed(nil, s)[4:]), wireRefPayloadFailed(s); got != want {
			t.Errorf("text %q:\n got %q\nwant %q", s, got, want)
		}
	}
}

// wireRefPayloadFailed builds the RestartFailed payload for valid UTF-8 text
// with encoding/json. The text must not contain U+2028 or U+2029.
func wireRefPayloadFailed(text string) string {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]map[string]string{"Response": {"RestartFailed": text}}); err != nil {
		panic(err)
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func TestWireTruncate(t *testing.T) {
	const budget = maxFrameLen - len(`{"Response":{"RestartFailed":""}}`) // 65503
	tests := []struct {
		name     string
		text     string
		wantText string
	}{
		{"ascii, longer than a frame", strings.Repeat("a", 100000), strings.Repeat("a", budget)},
		{"ascii, exactly fits", strings.Repeat("a", budget), strings.Repeat("a", budget)},
		{"6-byte escapes", strings.Repeat("\x01", 20000), strings.Repeat("\x01", budget/6)},
		{"2-byte escapes", strings.Repeat("\n", 40000), strings.Repeat("\n", budget/2)},
		{"3-byte runes", strings.Repeat("€", 30000), strings.Repeat("€", budget/3)},
		{"4-byte runes", strings.Repeat("😀", 20000), strings.Repeat("😀", budget/4)},
		{"invalid UTF-8", strings.Repeat("\xff", 30000), strings.Repeat("\ufffd", budget/3)},
		{"escape would be split", strings.Repeat("a", budget-3) + "\x01", strings.Repeat("a", budget-3)},
		{"short escape would be split", strings.Repeat("a", budget-1) + `"`, strings.Repeat("a", budget-1)},
		{"rune would be split", strings.Repeat("a", budget-1) + "é", strings.Repeat("a", budget-1)},
		{"rune exactly fits", strings.Repeat("a", budget-2) + "é", strings.Repeat("a", budget-2) + "é"},
		{"replacement would be split", strings.Repeat("a", budget-2) + "\xe2\x82", strings.Repeat("a", budget-2)},
	}
	for _, tt := range tests {
		frame := appendRestartFailed(nil, tt.text)
		n := binary.BigEndian.Uint32(frame)
		if int(n) != len(frame)-4 || n > maxFrameLen {
			t.Errorf("%s: header %d, payload %d bytes, limit %d", tt.name, n, len(frame)-4, maxFrameLen)
		}
		m, err := decodeMessage(frame[4:])
		if err != nil {
			t.Errorf("%s: decode: %v", tt.name, err)
			continue
		}
		if m.text != tt.wantText {
			t.Errorf("%s: got %d bytes of text, want %d", tt.name, len(m.text), len(tt.wantText))
		}
	}
}

func TestWireRoundTrip(t *testing.T) {
	msgs := []message{
		{kind: msgTryRestart},
		{kind: msgRestartComplete, pid: 0},
		{kind: msgRestartComplete, pid: 1},
		{kind: msgRestartComplete, pid: 4294967295},
		{kind: msgRestartFailed, text: ""},
		{kind: msgRestartFailed, text: "fork/exec /usr/bin/app: permission denied"},
		{kind: msgRestartFailed, text: "line 1\nline 2\t\"quoted\" \\ \x00 é 😀"},
	}
	var stream []byte
	for _, m := range msgs {
		stream = wireAppend(stream, m)
	}
	r := bytes.NewReader(stream)
	scratch := make([]byte, 0, 64)
	for _, want := range msgs {
		payload, err := readFrame(r, scratch)
		if err != nil {
			t.Fatalf("readFrame: %v", err)
		}
		got, err := decodeMessage(payload)
		if err != nil || got != want {
			t.Errorf("got %+v, %v; want %+v", got, err, want)
		}
	}
	if _, err := readFrame(r, scratch); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

// wireAppend encodes m with the encoder for its kind.
func wireAppend(dst []byte, m message) []byte {
	switch m.kind {
	case msgTryRestart:
		return appendTryRestart(dst)
	case msgRestartComplete:
		return appendRestartComplete(dst, m.pid)
	case msgRestartFailed:
		return appendRestartFailed(dst, m.text)
	}
	panic(fmt.Sprintf("wireAppend: kind %d", m.kind))
}

// wireAccepted lists payloads serde_json::from_slice::<RestartMessage> accepts.
var wireAccepted = []struct {
	in   string
	want message
}{
	// What serde_json::to_string writes.
	{`{"Request":"TryRestart"}`, message{kind: msgTryRestart}},
	{`{"Response":{"RestartComplete":1234}}`, message{kind: msgRestartComplete, pid: 1234}},
	{`{"Response":{"RestartFailed":"huge success"}}`, message{kind: msgRestartFailed, text: "huge success"}},

	// A unit variant may also be an object whose value is null.
	{`{"Request":{"TryRestart":null}}`, message{kind: msgTryRestart}},

	// Whitespace around every token, and after the value.
	{" \t\r\n{ \"Request\" : \"TryRestart\" } \n", message{kind: msgTryRestart}},
	{"{\n\t\"Request\"\r:\n{ \"TryRestart\"\t:\tnull\n}\r}\r\n", message{kind: msgTryRestart}},
	{` { "Response" : { "RestartComplete" : 42 } } `, message{kind: msgRestartComplete, pid: 42}},
	{` { "Response" : { "RestartFailed" : "x" } } `, message{kind: msgRestartFailed, text: "x"}},

	// Names are compared after unescaping.
	{`{"Req\u0075est":"TryRestart"}`, message{kind: msgTryRestart}},
	{`{"\u0052\u0065\u0071\u0075\u0065\u0073\u0074":"\u0054ry\u0052estart"}`, message{kind: msgTryRestart}},
	{`{"Request":{"Try\u0052estart":null}}`, message{kind: msgTryRestart}},
	{`{"Respons\u0065":{"Restart\u0043omplete":7}}`, message{kind: msgRestartComplete, pid: 7}},
	{`{"Response":{"Restart\u0046ailed":""}}`, message{kind: msgRestartFailed}},

	// PIDs: the whole u32 range, plain integers.
	{`{"Response":{"RestartComplete":0}}`, message{kind: msgRestartComplete, pid: 0}},
	{`{"Response":{"RestartComplete":4294967295}}`, message{kind: msgRestartComplete, pid: 4294967295}},

	// Text: every escape, surrogate pairs in either case, raw UTF-8 and DEL.
	{`{"Response":{"RestartFailed":"\"\\\/\b\f\n\r\t"}}`, message{kind: msgRestartFailed, text: "\"\\/\b\f\n\r\t"}},
	{`{"Response":{"RestartFailed":"\u0000\u001f\u00e9\u00E9\u20ac"}}`, message{kind: msgRestartFailed, text: "\x00\x1féé€"}},
	{`{"Response":{"RestartFailed":"\ud83d\ude00\uD83D\uDE00\udbff\udfff"}}`, message{kind: msgRestartFailed, text: "😀😀\U0010ffff"}},
	{`{"Response":{"RestartFailed":"é€😀` + "\x7f" + `"}}`, message{kind: msgRestartFailed, text: "é€😀\x7f"}},
	{`{"Response":{"RestartFailed":"\ufffd` + "\ufffd" + `"}}`, message{kind: msgRestartFailed, text: "\ufffd\ufffd"}},
	{`{"Response":{"RestartFailed":"{\"Request\":\"TryRestart\"}"}}`, message{kind: msgRestartFailed, text: `{"Request":"TryRestart"}`}},
}

// wireRejected lists payloads serde_json::from_slice::<RestartMessage> refuses.
var wireRejected = []struct {
	in     string
	reason string
}{
	{"", "empty payload"},
	{" \n", "whitespace only"},
	{"null", "not an enum"},
	{"[]", "not an enum"},
	{`["Request","TryRestart"]`, "enums are not arrays"},
	{`"Request"`, "a newtype variant as a bare string"},
	{`"TryRestart"`, "not a RestartMessage variant"},
	{`{}`, "an enum object needs one key"},
	{`{"Request"}`, "no colon, no value"},
	{`{"Request":}`, "no value"},
	{`{"Request":"TryRestart"`, "no closing brace"},
	{`{"Request":"TryRestart"`, "no closing brace"},
	{`{"Request`, "unterminated key"},
	{`{`, "ends after the brace"},
	{`{"Request":"TryRestart"}}`, "trailing brace"},
	{`{"Request":"TryRestart"}x`, "trailing data"},
	{`{"Request":"TryRestart"}{"Request":"TryRestart"}`, "two values"},
	{`{"Request":"TryRestart"}` + "\x00", "trailing NUL"},
	{"\f" + `{"Request":"TryRestart"}`, "form feed is not JSON whitespace"},
	{`{"Request":"TryRestart"}` + "\v", "vertical tab is not JSON whitespace"},
	{"\xef\xbb\xbf" + `{"Request":"TryRestart"}`, "a byte order mark is not whitespace"},
	{"\u00a0" + `{"Request":"TryRestart"}`, "no-break space is not JSON whitespace"},
	{`{"Request":"TryRestart","Request":"TryRestart"}`, "second key, even a duplicate"},
	{`{"Request":"TryRestart","Response":{"RestartComplete":1}}`, "second key"},
	{`{"Request":"TryRestart",}`, "trailing comma"},
	{`{"request":"TryRestart"}`, "names are case-sensitive"},
	{`{"Request":"tryrestart"}`, "names are case-sensitive"},
	{`{"Request ":"TryRestart"}`, "names are exact"},
	{`{"Request":"TryRestart "}`, "names are exact"},
	{`{"Request\u0000":"TryRestart"}`, "names are exact, NUL included"},
	{`{"Request":"TryRestartTryRestartTryRestartTryRestartTryRestart"}`, "unknown long name"},
	{`{"Requests":"TryRestart"}`, "unknown variant"},
	{`{"Request":"Restart"}`, "unknown variant"},
	{`{"Response":"RestartComplete"}`, "a newtype variant as a bare string"},
	{`{"Response":"RestartFailed"}`, "a newtype variant as a bare string"},
	{`{"Request":{"TryRestart":{}}}`, "a unit is null"},
	{`{"Request":{"TryRestart":""}}`, "a unit is null"},
	{`{"Request":{"TryRestart":0}}`, "a unit is null"},
	{`{"Request":{"TryRestart":nul}}`, "truncated null"},
	{`{"Request":{"TryRestart":nulll}}`, "null followed by garbage"},
	{`{"Request":{"TryRestart":Null}}`, "null is lowercase"},
	{`{"Request":{"TryRestart"}}`, "no colon"},
	{`{"Request":{"TryRestart":null,"TryRestart":null}}`, "second key in the inner enum"},
	{`{"Request":{}}`, "an enum object needs one key"},
	{`{"Request":null}`, "not an enum"},
	{`{"Request":["TryRestart"]}`, "not an enum"},
	{`{"Response":{"RestartComplete":"1234"}}`, "the PID is a number, not a string"},
	{`{"Response":{"RestartComplete":-1}}`, "negative"},
	{`{"Response":{"RestartComplete":-0}}`, "serde_json parses -0 as a float"},
	{`{"Response":{"RestartComplete":+1}}`, "no plus sign in JSON"},
	{`{"Response":{"RestartComplete":1.0}}`, "a float"},
	{`{"Response":{"RestartComplete":1.}}`, "not even a JSON number"},
	{`{"Response":{"RestartComplete":1e3}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":1E3}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":0e0}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":01}}`, "leading zero"},
	{`{"Response":{"RestartComplete":00}}`, "leading zero"},
	{`{"Response":{"RestartComplete":4294967296}}`, "larger than u32"},
	{`{"Response":{"RestartComplete":18446744073709551616}}`, "larger than u64"},
	{`{"Response":{"RestartComplete":0x10}}`, "no hex in JSON"},
	{`{"Response":{"RestartComplete":1 2}}`, "two numbers"},
	{`{"Response":{"RestartComplete":null}}`, "not a number"},
	{`{"Response":{"RestartComplete":}}`, "no value"},
	{`{"Response":{"RestartComplete":1,"RestartFailed":"x"}}`, "second key"},
	{`{"Response":{"RestartFailed":1}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":null}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":["x"]}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":"abc`, "unterminated string"},
	{`{"Response":{"RestartFailed":"abc\`, "unterminated escape"},
	{`{"Response":{"RestartFailed":"abc\"}}`, "escaped quote does not terminate"},
	{`{"Response":{"RestartFailed":"a` + "\x01" + `b"}}`, "raw control character"},
	{`{"Response":{"RestartFailed":"a` + "\n" + `b"}}`, "raw newline"},
	{`{"Response":{"RestartFailed":"a` + "\t" + `b"}}`, "raw tab"},
	{`{"Response":{"RestartFailed":"` + "\x1f" + `"}}`, "raw unit separator"},
	{`{"Response":{"RestartFailed":"\x41"}}`, "no \\x escape in JSON"},
	{`{"Response":{"RestartFailed":"\U0041"}}`, "\\u is lowercase"},
	{`{"Response":{"RestartFailed":"\a"}}`, "no \\a escape in JSON"},
	{`{"Response":{"RestartFailed":"\'"}}`, "no \\' escape in JSON"},
	{`{"Response":{"RestartFailed":"\u12"}}`, "short \\u escape"},
	{`{"Response":{"RestartFailed":"\u12G4"}}`, "bad hex digit"},
	{`{"Response":{"RestartFailed":"\u`, "truncated \\u escape"},
	{`{"Response":{"RestartFailed":"\ud800"}}`, "lone high surrogate"},
	{`{"Response":{"RestartFailed":"\ud800x"}}`, "high surrogate followed by a character"},
	{`{"Response":{"RestartFailed":"\ud800\n"}}`, "high surrogate followed by another escape"},
	{`{"Response":{"RestartFailed":"\ud800\u0041"}}`, "high surrogate followed by a non-surrogate"},
	{`{"Response":{"RestartFailed":"\ud800\ud800"}}`, "two high surrogates"},
	{`{"Response":{"RestartFailed":"\udc00"}}`, "lone low surrogate"},
	{`{"Response":{"RestartFailed":"\ude00\ud83d"}}`, "surrogates in the wrong order"},
	{`{"Response":{"RestartFailed":"\ud800\`, "truncated after a high surrogate"},
	{`{"Response":{"RestartFailed":"\ud800\u`, "truncated in the low surrogate"},
	{`{"Response":{"RestartFailed":"` + "\xff" + `"}}`, "invalid UTF-8"},
	{`{"Response":{"RestartFailed":"` + "\xe2\x82" + `"}}`, "truncated UTF-8 sequence"},
	{`{"Response":{"RestartFailed":"` + "\xc0\xaf" + `"}}`, "overlong UTF-8"},
	{`{"Response":{"RestartFailed":"` + "\xed\xa0\x80" + `"}}`, "UTF-8-encoded surrogate"},
	{`{"Response":{"RestartFailed":"` + "\xf4\x90\x80\x80" + `"}}`, "UTF-8 past U+10FFFF"},
	{`{"Response":{"RestartFailed":"x\u0041` + "\xff" + `"}}`, "invalid UTF-8 after an escape"},
	{`{"Re` + "\xff" + `quest":"TryRestart"}`, "invalid UTF-8 in a key"},
	{`{"Req` + "\n" + `uest":"TryRestart"}`, "raw control character in a key"},
	{`{"Request":"Try\ud800Restart"}`, "lone surrogate in a variant name"},
	{`{"Request":` + "\xff" + `}`, "invalid UTF-8 outside a string"},
	{`{'Request':'TryRestart'}`, "single quotes"},
	{`{Request:TryRestart}`, "unquoted names"},
	{`{"Request":"TryRestart"/**/}`, "no comments in JSON"},
}

func TestWireDecodeAccepted(t *testing.T) {
	for _, tt := range wireAccepted {
		got, err := decodeMessage([]byte(tt.in))
		if err != nil || got != tt.want {
			t.Errorf("decodeMessage(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		// The table must agree with the reference decoder, or one of them is wrong.
		if ref, err := wireRefDecode([]byte(tt.in)); err != nil || ref != tt.want {
			t.Errorf("reference(%q) = %+v, %v; want %+v", tt.in, ref, err, tt.want)
		}
	}
}

func TestWireDecodeRejected(t *testing.T) {
	for _, tt := range wireRejected {
		got, err := decodeMessage([]byte(tt.in))
		if err == nil {
			t.Errorf("decodeMessage(%q) = %+v, want an error (%s)", tt.in, got, tt.reason)
		} else if !strings.HasPrefix(err.Error(), "wire: ") {
			t.Errorf("decodeMessage(%q): error %q lacks the package prefix", tt.in, err)
		}
		if ref, err := wireRefDecode([]byte(tt.in)); err == nil {
			t.Errorf("reference(%q) = %+v, want an error (%s)", tt.in, ref, tt.reason)
		}
	}
}

// TestWireDecodeErrors checks that errors say what was wrong.
func TestWireDecodeErrors(t *testing.T) {
	tests := []struct {
		in   string
		want string
	}{
		{``, `wire: empty message`},
		{`{"Foo":1}`, `wire: unknown variant "Foo" at offset 1, expected "Request" or "Response"`},
		{`{"Request":"Foo"}`, `wire: unknown variant "Foo" at offset 11, expected "TryRestart"`},
		{`{"Response":{"Foo":1}}`, `wire: unknown variant "Foo" at offset 13, expected "RestartComplete" or "RestartFailed"`},
		{`{"Request":"TryRestartTryRestartTryRestartTryRestart"}`, `wire: unknown variant "TryRestartTryRestartTryRestartTr"... at offset 11`},
		{`"Request"`, `wire: variant "Request" at offset 0 carries a value`},
		{`{}`, `wire: empty object at offset 1`},
		{`{"Request":"TryRestart","x":1}`, `wire: second key at offset 23`},
		{`{"Request":"TryRestart"}x`, `wire: unexpected 'x' at offset 24, expected the end of the message`},
		{`{"Request":"TryRestart"`, `wire: message ends at offset 23, expected '}'`},
		{`{"Response":{"RestartComplete":-0}}`, `wire: unexpected '-' at offset 31, expected a process ID`},
		{`{"Response":{"RestartComplete":01}}`, `wire: number with a leading zero at offset 31`},
		{`{"Response":{"RestartComplete":1.5}}`, `wire: number at offset 31 is not an integer`},
		{`{"Response":{"RestartComplete":4294967296}}`, `wire: number at offset 31 is larger than 4294967295`},
		{`{"Response":{"RestartFailed":"` + "\x01" + `"}}`, `wire: raw control character 0x01 in string at offset 30`},
		{`{"Response":{"RestartFailed":"` + "\xff" + `"}}`, `wire: invalid UTF-8 in string at offset 30`},
		{`{"Response":{"RestartFailed":"\q"}}`, `wire: invalid escape \'q' in string at offset 30`},
		{`{"Response":{"RestartFailed":"\ud800"}}`, `wire: unpaired high surrogate \ud800 at offset 30`},
		{`{"Response":{"RestartFailed":"\udc00"}}`, `wire: unpaired low surrogate \udc00 at offset 30`},
		{`{"Response":{"RestartFailed":"abc`, `wire: string at offset 29 is not terminated`},
		{"\xef\xbb\xbf{}", `wire: unexpected byte 0xef at offset 0`},
	}
	for _, tt := range tests {
		_, err := decodeMessage([]byte(tt.in))
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("decodeMessage(%q) error = %v, want it to start with %q", tt.in, err, tt.want)
		}
	}
}

// TestWireDecodeCopiesText checks that a decoded text does not alias the
// payload, which readFrame reuses for the next frame.
func TestWireDecodeCopiesText(t *testing.T) {
	for _, in := range []string{`{"Response":{"RestartFailed":"abc"}}`, `{"Response":{"RestartFailed":"a\nc"}}`} {
		p := []byte(in)
		m, err := decodeMessage(p)
		if err != nil {
			t.Fatal(err)
		}
		before := m.text
		for i := range p {
			p[i] = 'X'
		}
		if m.text != strings.Clone(before) || (m.text != "abc" && m.text != "a\nc") {
			t.Errorf("text changed with the payload: %q", m.text)
		}
	}
}

func TestWireReadFrame(t *testing.T) {
	errBoom := errors.New("boom")
	tests := []struct {
		name    string
		r       io.Reader
		want    string // payload, when wantErr is nil
		wantErr error  // checked with errors.Is, or exactly for io.EOF
		errText string
	}{
		{name: "clean EOF", r: bytes.NewReader(nil), wantErr: io.EOF},
		{name: "header 1 byte", r: bytes.NewReader([]byte{0}), wantErr: io.ErrUnexpectedEOF, errText: "header cut short after 1 of 4 bytes"},
		{name: "header 3 bytes", r: bytes.NewReader([]byte{0, 0, 0}), wantErr: io.ErrUnexpectedEOF},
		{name: "payload missing", r: bytes.NewReader([]byte{0, 0, 0, 5}), wantErr: io.ErrUnexpectedEOF, errText: "payload cut short after 0 of 5 bytes"},
		{name: "payload short", r: bytes.NewReader([]byte{0, 0, 0, 5, 'a', 'b'}), wantErr: io.ErrUnexpectedEOF, errText: "after 2 of 5 bytes"},
		{name: "zero length", r: bytes.NewReader([]byte{0, 0, 0, 0}), want: ""},
		{name: "one frame", r: bytes.NewReader(wireFrameOf("hello")), want: "hello"},
		{name: "trailing bytes stay unread", r: bytes.NewReader(append(wireFrameOf("hi"), 0, 0)), want: "hi"},
		{name: "one byte at a time", r: iotest.OneByteReader(bytes.NewReader(wireFrameOf("hello"))), want: "hello"},
		{name: "data with EOF", r: iotest.DataErrReader(bytes.NewReader(wireFrameOf("hello"))), want: "hello"},
		{name: "exactly the limit", r: bytes.NewReader(append(binary.BigEndian.AppendUint32(nil, maxFrameLen), make([]byte, maxFrameLen)...)), want: string(make([]byte, maxFrameLen))},
		{name: "limit + 1", r: bytes.NewReader(binary.BigEndian.AppendUint32(nil, maxFrameLen+1)), errText: "wire: frame of 65537 bytes exceeds the 65536-byte limit"},
		{name: "1 GiB", r: bytes.NewReader(binary.BigEndian.AppendUint32(nil, 1<<30)), errText: "wire: frame of 1073741824 bytes exceeds the 65536-byte limit"},
		{name: "4 GiB - 1", r: bytes.NewReader([]byte{0xff, 0xff, 0xff, 0xff}), errText: "wire: frame of 4294967295 bytes exceeds the 65536-byte limit"},
		{name: "error in header", r: iotest.ErrReader(errBoom), wantErr: errBoom, errText: "reading frame header"},
		{name: "error in payload", r: io.MultiReader(bytes.NewReader([]byte{0, 0, 0, 5}), iotest.ErrReader(errBoom)), wantErr: errBoom, errText: "reading 5-byte frame payload"},
	}
	for _, tt := range tests {
		for _, scratch := range [][]byte{nil, make([]byte, 0, 3), make([]byte, 0, 16), make([]byte, 0, maxFrameLen)} {
			if r, ok := tt.r.(*bytes.Reader); ok {
				r.Seek(0, io.SeekStart)
			}
			got, err := readFrame(tt.r, scratch)
			switch {
			case tt.wantErr == nil && tt.errText == "":
				if err != nil || string(got) != tt.want || got == nil {
					t.Errorf("%s (scratch %d): got %q, %v; want %q", tt.name, cap(scratch), got, err, tt.want)
				}
			case tt.wantErr == io.EOF:
				if err != io.EOF || got != nil {
					t.Errorf("%s: got %q, %v; want exactly io.EOF", tt.name, got, err)
				}
			default:
				if err == nil || got != nil ||
					(tt.wantErr != nil && !errors.Is(err, tt.wantErr)) ||
					!strings.Contains(err.Error(), tt.errText) ||
					(tt.wantErr != io.ErrUnexpectedEOF && errors.Is(err, io.ErrUnexpectedEOF)) ||
					errors.Is(err, io.EOF) {
					t.Errorf("%s: got %q, %v; want error %v containing %q", tt.name, got, err, tt.wantErr, tt.errText)
				}
			}
			// Only the readers that can be rewound are tried with every scratch.
			if _, ok := tt.r.(*bytes.Reader); !ok {
				break
			}
		}
	}
}

func TestWireReadFrameScratch(t *testing.T) {
	frame := wireFrameOf("hello")
	scratch := make([]byte, 0, 16)
	got, err := readFrame(bytes.NewReader(frame), scratch)
	if err != nil || string(got) != "hello" {
		t.Fatalf("got %q, %v", got, err)
	}
	if &got[0] != &scratch[:1][0] {
		t.Error("the payload was not read into scratch, which had room")
	}
	small := make([]byte, 0, 4)
	got, err = readFrame(bytes.NewReader(frame), small)
	if err != nil || string(got) != "hello" {
		t.Fatalf("got %q, %v", got, err)
	}
	if &got[0] == &small[:1][0] {
		t.Error("the payload overran scratch")
	}
}

// TestWireReadFrameRefusesBeforeAllocating shows that a header claiming a
// huge frame costs a small, fixed amount whatever the length it claims: the
// error and nothing else. (The error names the length, so it has to be built
// then; fmt.Errorf takes about three allocations and 170 bytes, a little
// more under -race, where sync.Pool drops fmt's buffers at random.)
func TestWireReadFrameRefusesBeforeAllocating(t *testing.T) {
	const maxAllocs, maxBytes = 6, 512
	scratch := make([]byte, 0, 64)
	for _, n := range []uint32{maxFrameLen + 1, 1 << 20, 1 << 30, 1<<32 - 1} {
		hdr := binary.BigEndian.AppendUint32(nil, n)
		r := bytes.NewReader(hdr)
		run := func() {
			r.Reset(hdr)
			if _, err := readFrame(r, scratch); err == nil {
				t.Fatal("no error")
			}
		}
		allocs := testing.AllocsPerRun(100, run)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range 100 {
			run()
		}
		runtime.ReadMemStats(&after)
		perCall := (after.TotalAlloc - before.TotalAlloc) / 100
		if allocs > maxAllocs || perCall > maxBytes {
			t.Errorf("header claiming %d bytes: %v allocs, %d bytes per call; want at most %d and %d",
				n, allocs, perCall, maxAllocs, maxBytes)
		}
	}
}

func TestWireAllocs(t *testing.T) {
	buf := make([]byte, 0, maxFrameLen+4)
	text200 := strings.Repeat("restart failed: ", 12) + "12345678" // 200 bytes
	mixed := strings.Repeat("a\"\\\n\x01é\xff", 20)
	huge := strings.Repeat("x", 100000)
	zero := []struct {
		name string
		fn   func()
	}{
		{"appendTryRestart", func() { buf = appendTryRestart(buf[:0]) }},
		{"appendRestartComplete", func() { buf = appendRestartComplete(buf[:0], 4294967295) }},
		{"appendRestartFailed 200 bytes", func() { buf = appendRestartFailed(buf[:0], text200) }},
		{"appendRestartFailed escapes", func() { buf = appendRestartFailed(buf[:0], mixed) }},
		{"appendRestartFailed truncated", func() { buf = appendRestartFailed(buf[:0], huge) }},
	}
	for _, in := range []string{
		`{"Request":"TryRestart"}`,
		`{"Request":{"TryRestart":null}}`,
		" { \"Req\\u0075est\" : { \"Try\\u0052estart\" : null } } ",
		`{"Response":{"RestartComplete":1234}}`,
	} {
		p := []byte(in)
		zero = append(zero, struct {
			name string
			fn   func()
		}{"decodeMessage " + in, func() {
			if _, err := decodeMessage(p); err != nil {
				t.Fatal(err)
			}
		}})
	}
	frame := appendRestartFailed(nil, text200)
	r := bytes.NewReader(frame)
	scratch := make([]byte, 0, maxFrameLen)
	zero = append(zero, struct {
		name string
		fn   func()
	}{"readFrame into scratch", func() {
		r.Reset(frame)
		if _, err := readFrame(r, scratch); err != nil {
			t.Fatal(err)
		}
	}})
	for _, tt := range zero {
		if n := testing.AllocsPerRun(100, tt.fn); n != 0 {
			t.Errorf("%s: %v allocs, want 0", tt.name, n)
		}
	}

	// RestartFailed allocates its text: once, or twice if it has escapes.
	for _, tt := range []struct {
		in   string
		want float64
	}{
		{`{"Response":{"RestartFailed":"` + text200 + `"}}`, 1},
		{`{"Response":{"RestartFailed":"a\nb"}}`, 2},
	} {
		p := []byte(tt.in)
		if n := testing.AllocsPerRun(100, func() { decodeMessage(p) }); n > tt.want {
			t.Errorf("decodeMessage(%.40q...): %v allocs, want at most %v", tt.in, n, tt.want)
		}
	}
}

// wireRefDecode is a reference decoder built on encoding/json, for checking
// decodeMessage. It applies serde_json's rules for RestartMessage where
// encoding/json differs from serde_json:
//   - encoding/json replaces invalid UTF-8 in strings with U+FFFD; serde_json
//     refuses it. Invalid UTF-8 outside strings is a syntax error in both, so
//     the whole payload must be valid UTF-8.
//   - encoding/json replaces an unpaired surrogate escape with U+FFFD;
//     serde_json refuses it. wireRefLoneSurrogate checks.
//   - encoding/json keeps the last of duplicate keys; an enum object must
//     have exactly one key, so the keys are counted with Decoder.Token.
//   - encoding/json has no enums: the two forms of a unit variant and the
//     object form of a newtype variant are spelt out below, and a u32 is
//     checked against the JSON integer grammar (which has no "-0").
//
// Whitespace, literals, escapes and the rule against raw control characters
// are the same in both and left to encoding/json.
func wireRefDecode(p []byte) (message, error) {
	if !utf8.Valid(p) {
		return message{}, errors.New("invalid UTF-8")
	}
	if !json.Valid(p) {
		return message{}, errors.New("invalid JSON")
	}
	if wireRefLoneSurrogate(p) {
		return message{}, errors.New("unpaired surrogate")
	}
	name, value, isObject, err := wireRefEnum(p)
	if err != nil {
		return message{}, err
	}
	if !isObject {
		return message{}, errors.New("RestartMessage variants carry a value")
	}
	inner, innerValue, innerIsObject, err := wireRefEnum(value)
	if err != nil {
		return message{}, err
	}
	switch name {
	case "Request":
		if inner != "TryRestart" {
			return message{}, errors.New("unknown RestartRequest variant")
		}
		if innerIsObject && string(innerValue) != "null" {
			return message{}, errors.New("a unit variant's value is null")
		}
		return message{kind: msgTryRestart}, nil
	case "Response":
		if !innerIsObject {
			return message{}, errors.New("RestartResponse variants carry a value")
		}
		switch inner {
		case "RestartComplete":
			if !wireRefUint.Match(innerValue) {
				return message{}, errors.New("not a JSON integer without sign, fraction or exponent")
			}
			n, err := strconv.ParseUint(string(innerValue), 10, 32)
			if err != nil {
				return message{}, err
			}
			return message{kind: msgRestartComplete, pid: uint32(n)}, nil
		case "RestartFailed":
			if innerValue[0] != '"' {
				return message{}, errors.New("not a string")
			}
			var s string
			if err := json.Unmarshal(innerValue, &s); err != nil {
				return message{}, err
			}
			return message{kind: msgRestartFailed, text: s}, nil
		}
		return message{}, errors.New("unknown RestartResponse variant")
	}
	return message{}, errors.New("unknown RestartMessage variant")
}

var wireRefUint = regexp.MustCompile(`^(0|[1-9][0-9]*)$`)

// wireRefEnum splits an externally tagged enum, valid JSON, into its variant
// name and, for the object form, the value (without surrounding whitespace).
func wireRefEnum(raw []byte) (name string, value []byte, isObject bool, err error) {
	raw = bytes.Trim(raw, " \t\r\n")
	switch raw[0] {
	case '"':
		err = json.Unmarshal(raw, &name)
		return name, nil, false, err
	case '{':
		dec := json.NewDecoder(bytes.NewReader(raw))
		if _, err := dec.Token(); err != nil { // '{'
			return "", nil, false, err
		}
		tok, err := dec.Token()
		if err != nil {
			return "", nil, false, err
		}
		name, ok := tok.(string)
		if !ok {
			return "", nil, false, errors.New("an enum object needs a key")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return "", nil, false, err
		}
		if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
			return "", nil, false, errors.New("an enum object has one key")
		}
		return name, bytes.Trim(v, " \t\r\n"), true, nil
	}
	return "", nil, false, errors.New("an enum is a string or an object")
}

// wireRefLoneSurrogate reports whether valid JSON p has a \u escape for a
// surrogate that is not part of a high-low pair.
func wireRefLoneSurrogate(p []byte) bool {
	surrogate := func(i int) (r rune, ok bool) { // the \uXXXX at p[i:], if any
		if i+6 > len(p) || p[i] != '\\' || p[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(p[i+2:i+6]), 16, 32)
		if err != nil {
			return 0, false
		}
		return rune(n), true
	}
	inString := false
	for i := 0; i < len(p); i++ {
		switch {
		case p[i] == '"':
			inString = !inString
		case inString && p[i] == '\\':
			r, ok := surrogate(i)
			if !ok { // a one-character escape
				i++
				continue
			}
			switch {
			case 0xdc00 <= r && r <= 0xdfff:
				return true
			case 0xd800 <= r && r <= 0xdbff:
				lo, ok := surrogate(i + 6)
				if !ok || lo < 0xdc00 || lo > 0xdfff {
					return true
				}
				i += 6
			}
			i += 5
		}
	}
	return false
}

// FuzzWireDecode checks decodeMessage against the encoding/json reference:
// both must accept the same payloads and agree on the message. What is
// accepted must also survive a re-encoding unchanged.
func FuzzWireDecode(f *testing.F) {
	for _, tt := range wireAccepted {
		f.Add([]byte(tt.in))
	}
	for _, tt := range wireRejected {
		f.Add([]byte(tt.in))
	}
	for _, tt := range wireEscapes {
		f.Add(appendRestartFailed(nil, tt.in)[4:])
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		got, err := decodeMessage(p)
		want, refErr := wireRefDecode(p)
		if (err == nil) != (refErr == nil) {
			t.Fatalf("decodeMessage(%q) = %+v, %v; reference: %+v, %v", p, got, err, want, refErr)
		}
		if err != nil {
			if !strings.HasPrefix(err.Error(), "wire: ") {
				t.Fatalf("error %q lacks the package prefix", err)
			}
			return
		}
		if got != want {
			t.Fatalf("decodeMessage(%q) = %+v; reference: %+v", p, got, want)
		}
		frame := wireAppend(nil, got)
		again, err := decodeMessage(frame[4:])
		if err != nil || again != got {
			t.Fatalf("re-encoded %+v as %q, which decodes to %+v, %v", got, frame, again, err)
		}
	})
}

// FuzzWireRoundTrip encodes arbitrary messages, reads them back through
// readFrame and decodeMessage, and checks the text against the reference
// lossy conversion and truncation rule, and the bytes against encoding/json.
func FuzzWireRoundTrip(f *testing.F) {
	for _, tt := range wireEscapes {
		f.Add(tt.in, uint32(len(tt.in)))
	}
	for _, tt := range wireAccepted {
		f.Add(tt.want.text, tt.want.pid)
	}
	f.Add(strings.Repeat("\x01", 20000), uint32(1<<32-1))
	f.Add(strings.Repeat("a", maxFrameLen-34)+"é", uint32(0))
	f.Fuzz(func(t *testing.T, text string, pid uint32) {
		var stream []byte
		stream = appendRestartFailed(stream, text)
		stream = appendRestartComplete(stream, pid)
		stream = appendTryRestart(stream)
		r := bytes.NewReader(stream)
		scratch := make([]byte, 0, 256)

		payload, err := readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if len(payload) > maxFrameLen {
			t.Fatalf("payload of %d bytes", len(payload))
		}
		m, err := decodeMessage(payload)
		if err != nil || m.kind != msgRestartFailed {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}
		full := wireRefLossy(text)
		if !strings.HasPrefix(full, m.text) {
			t.Fatalf("text %q came back as %q, not a prefix of %q", text, m.text, full)
		}
		if len(m.text) < len(full) {
			// Cut short: the next character must not have fit.
			next, _ := utf8.DecodeRuneInString(full[len(m.text):])
			if len(payload)+wireRefEscapedLen(next) <= maxFrameLen {
				t.Fatalf("text cut at %d of %d bytes, but %q would fit in a %d-byte payload", len(m.text), len(full), next, len(payload))
			}
		}
		if !strings.ContainsAny(full, "\u2028\u2029") {
			if want := wireRefPayloadFailed(m.text); string(payload) != want {
				t.Fatalf("payload %q, encoding/json writes %q", payload, want)
			}
		}
		var ref map[string]map[string]string
		if err := json.Unmarshal(payload, &ref); err != nil || ref["Response"]["RestartFailed"] != m.text {
			t.Fatalf("encoding/json reads %q as %v, %v", payload, ref, err)
		}

		payload, err = readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf(`{"Response":{"RestartComplete":%d}}`, pid); string(payload) != want {
			t.Fatalf("payload %q, want %q", payload, want)
		}
		if m, err := decodeMessage(payload); err != nil || m != (message{kind: msgRestartComplete, pid: pid}) {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}

		payload, err = readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if m, err := decodeMessage(payload); err != nil || m != (message{kind: msgTryRestart}) {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}
		if _, err := readFrame(r, scratch); err != io.EOF {
			t.Fatalf("at the end: %v, want io.EOF", err)
		}
	})
}

// wireRefEscapedLen is how many bytes serde_json writes for r in a string.
func wireRefEscapedLen(r rune) int {
	switch {
	case r == '"' || r == '\\' || r == '\b' || r == '\f' || r == '\n' || r == '\r' || r == '\t':
		return 2
	case r < 0x20:
		return 6
	}
	return utf8.RuneLen(r)
}

// FuzzWireReadFrame feeds readFrame arbitrary streams and checks each result
// against a direct reading of the stream's headers.
func FuzzWireReadFrame(f *testing.F) {
	f.Add([]byte{}, uint16(0))
	f.Add([]byte{0, 0, 0}, uint16(64))
	f.Add([]byte{0, 0, 0, 0}, uint16(64))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint16(64))
	f.Add([]byte{0, 1, 0, 1}, uint16(64))
	f.Add([]byte{0, 0, 0, 5, 'a'}, uint16(2))
	for _, tt := range wireAccepted {
		f.Add(wireFrameOf(tt.in), uint16(16))
	}
	for _, tt := range wireRejected {
		f.Add(wireFrameOf(tt.in), uint16(64))
	}
	f.Add(appendTryRestart(appendRestartComplete(appendRestartFailed(nil, "x"), 1)), uint16(32))
	f.Fuzz(func(t *testing.T, data []byte, scratchCap uint16) {
		r := bytes.NewReader(data)
		scratch := make([]byte, 0, int(scratchCap))
		rest := data
		for {
			payload, err := readFrame(r, scratch)
			switch {
			case len(rest) == 0:
				if err != io.EOF || payload != nil {
					t.Fatalf("at the end: %q, %v; want io.EOF", payload, err)
				}
				return
			case len(rest) < 4:
				if !errors.Is(err, io.ErrUnexpectedEOF) || payload != nil {
					t.Fatalf("%d header bytes: %q, %v", len(rest), payload, err)
				}
				return
			}
			n := binary.BigEndian.Uint32(rest)
			switch {
			case n > maxFrameLen:
				if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
					!strings.Contains(err.Error(), strconv.FormatUint(uint64(n), 10)) || payload != nil {
					t.Fatalf("length %d: %q, %v", n, payload, err)
				}
				return
			case uint64(len(rest)-4) < uint64(n):
				if !errors.Is(err, io.ErrUnexpectedEOF) || payload != nil {
					t.Fatalf("length %d with %d bytes left: %q, %v", n, len(rest)-4, payload, err)
				}
				return
			}
			if err != nil || !bytes.Equal(payload, rest[4:4+n]) || payload == nil {
				t.Fatalf("length %d: %q, %v; want %q", n, payload, err, rest[4:4+n])
			}
			rest = rest[4+n:]
			// Whatever the payload, decoding it must not panic, and what it
			// accepts must encode to something it accepts again.
			if m, err := decodeMessage(payload); err == nil {
				if again, err := decodeMessage(wireAppend(nil, m)[4:]); err != nil || again != m {
					t.Fatalf("%+v: re-decoded as %+v, %v", m, again, err)
				}
			}
		}
	})
}

// ==========================================================================
// sd_notify, against the real systemd-notify (sdnotify.go)
// ==========================================================================

// sdWait bounds every wait for an event in these tests. It is a deadline,
// never a sleep: a passing test does not wait for it.
const sdWait = 10 * time.Second

// sdListener plays the service manager: a SOCK_DGRAM socket owned by the test,
// at a path or an abstract address.
type sdListener struct {
	addr string // the NOTIFY_SOCKET value
	conn *net.UnixConn
}

var sdListenerSeq atomic.Int64

func sdListen(tb testing.TB, abstract bool) *sdListener {
	tb.Helper()
	if abstract {
		return sdListenAt(tb, fmt.Sprintf("@shellflip-test-%d-%d", os.Getpid(), sdListenerSeq.Add(1)))
	}
	// Not tb.TempDir: its long names would not fit in sun_path.
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return sdListenAt(tb, filepath.Join(dir, "notify"))
}

func sdListenAt(tb testing.TB, addr string) *sdListener {
	tb.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		tb.Fatalf("listening on %q: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	return &sdListener{addr: addr, conn: conn}
}

// recvErr waits up to sdWait for one datagram. The fds that came with it are
// the caller's to close. Safe to call from any goroutine.
func (l *sdListener) recvErr() (string, []int, error) {
	if err := l.conn.SetReadDeadline(time.Now().Add(sdWait)); err != nil {
		return "", nil, err
	}
	buf := make([]byte, 2*sdMaxDatagram)
	oob := make([]byte, unix.CmsgSpace(4*sdMaxFDs))
	n, oobn, flags, _, err := l.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return "", nil, fmt.Errorf("receiving on %q: %w", l.addr, err)
	}
	fds, err := sdParseRights(oob[:oobn])
	if err != nil {
		return "", nil, err
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		sdCloseFDs(fds)
		return "", nil, fmt.Errorf("truncated datagram (flags %#x)", flags)
	}
	return string(buf[:n]), fds, nil
}

func (l *sdListener) recv(tb testing.TB) (string, []int) {
	tb.Helper()
	msg, fds, err := l.recvErr()
	if err != nil {
		tb.Fatal(err)
	}
	return msg, fds
}

// recvNow is a non-blocking recvmsg: ok is false if nothing is queued. A
// datagram is queued on the receiver by the time the sender's sendmsg returns,
// so this proves what was, and was not, sent.
func (l *sdListener) recvNow(tb testing.TB) (msg string, fds []int, ok bool) {
	tb.Helper()
	if err := l.conn.SetReadDeadline(time.Time{}); err != nil {
		tb.Fatal(err)
	}
	rc, err := l.conn.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, 2*sdMaxDatagram)
	oob := make([]byte, unix.CmsgSpace(4*sdMaxFDs))
	var n, oobn int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return true
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	if rerr == unix.EAGAIN {
		return "", nil, false
	}
	if rerr != nil {
		tb.Fatalf("recvmsg: %v", rerr)
	}
	fds, err = sdParseRights(oob[:oobn])
	if err != nil {
		tb.Fatal(err)
	}
	return string(buf[:n]), fds, true
}

// expectNone fails the test if a datagram is queued.
func (l *sdListener) expectNone(tb testing.TB) {
	tb.Helper()
	if msg, fds, ok := l.recvNow(tb); ok {
		sdCloseFDs(fds)
		tb.Errorf("a datagram was sent: %q with %d fds", msg, len(fds))
	}
}

// drain reads and discards datagrams until stop is called, and closes reached
// once it has read want of them. It allocates nothing per datagram, so it can
// run beside testing.AllocsPerRun, which counts every goroutine's mallocs.
func (l *sdListener) drain(tb testing.TB, want int) (reached <-chan struct{}, stop func()) {
	tb.Helper()
	if err := l.conn.SetReadDeadline(time.Time{}); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	r := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2*sdMaxDatagram)
		for count := 0; ; {
			if _, err := l.conn.Read(buf); err != nil {
				return
			}
			if count++; count == want {
				close(r)
			}
		}
	}()
	return r, func() { l.conn.Close(); <-done }
}

func sdParseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing control messages: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			sdCloseFDs(fds)
			return nil, fmt.Errorf("parsing SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func sdCloseFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func sdNewNotifier(tb testing.TB, addr string) *SdNotifier {
	tb.Helper()
	n, err := NewSdNotifier(addr)
	if err != nil {
		tb.Fatalf("NewSdNotifier(%q): %v", addr, err)
	}
	tb.Cleanup(func() { n.Close() })
	return n
}

// sdOpenFDs lists this process's open fds and what they are.
func sdOpenFDs(tb testing.TB) map[int]string {
	tb.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	fds := make(map[int]string, len(ents))
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // ReadDir's own fd, closed by now
		}
		fds[fd] = link
	}
	return fds
}

// sdCheckFDs fails the test for every fd open now that was not in before.
func sdCheckFDs(tb testing.TB, before map[int]string) {
	tb.Helper()
	for fd, link := range sdOpenFDs(tb) {
		if old, ok := before[fd]; !ok || old != link {
			tb.Errorf("leaked fd %d (%s)", fd, link)
		}
	}
}

func sdSystemdNotifyPath(tb testing.TB) string {
	tb.Helper()
	p, err := exec.LookPath("systemd-notify")
	if err != nil {
		tb.Skipf("systemd-notify not found (install the systemd package): %v", err)
	}
	return p
}

// sdSystemdNotifyCmd prepares systemd-notify with NOTIFY_SOCKET=addr.
func sdSystemdNotifyCmd(ctx context.Context, bin, addr string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+addr)
	return cmd
}

// sdSystemdNotify runs systemd-notify --no-block args... and returns the one
// datagram it sent to l.
func sdSystemdNotify(tb testing.TB, bin string, l *sdListener, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), sdWait)
	defer cancel()
	cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, append([]string{"--no-block"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	msg, fds := l.recv(tb)
	if len(fds) != 0 {
		sdCloseFDs(fds)
		tb.Errorf("systemd-notify --no-block %q sent %d fds", args, len(fds))
	}
	return msg
}

func sdAddrKinds() []struct {
	name     string
	abstract bool
} {
	return []struct {
		name     string
		abstract bool
	}{{"path", false}, {"abstract", true}}
}

// TestSdNotifyMatchesSystemdNotify compares our datagrams with those of the
// real systemd-notify(1), byte for byte, on a path and an abstract socket.
func TestSdNotifyMatchesSystemdNotify(t *testing.T) {
	bin := sdSystemdNotifyPath(t)
	status64 := strings.Repeat("0123456789abcdef", 4)
	cases := []struct {
		name   string
		args   []string
		fields []SdField
	}{
		{"ready", []string{"--ready"}, []SdField{SdReady()}},
		{"status", []string{"--status=Serving 3 listeners: 0/3 draining"}, []SdField{SdStatus("Serving 3 listeners: 0/3 draining")}},
		{"status-64", []string{"--status=" + status64}, []SdField{SdStatus(status64)}},
		{"status-utf8", []string{"--status=Grüße ✓"}, []SdField{SdStatus("Grüße ✓")}},
		{"status-empty", []string{"--status="}, []SdField{SdStatus("")}},
		{"pid", []string{"--pid=4242"}, []SdField{SdMainPID(4242)}},
		{"ready-status", []string{"--ready", "--status=x"}, []SdField{SdReady(), SdStatus("x")}},
		{"ready-status-pid", []string{"--ready", "--status=hello world", "--pid=123"}, []SdField{SdReady(), SdStatus("hello world"), SdMainPID(123)}},
		{"raw-mainpid-ready", []string{"MAINPID=77", "READY=1"}, []SdField{SdMainPID(77), SdReady()}},
		{"raw-stopping", []string{"STOPPING=1"}, []SdField{SdStopping()}},
		{"raw-errno", []string{"ERRNO=2"}, []SdField{SdErrno(syscall.ENOENT)}},
		{"raw-extend", []string{"EXTEND_TIMEOUT_USEC=5000000"}, []SdField{SdExtendTimeout(5 * time.Second)}},
		{"raw-watchdog", []string{"WATCHDOG=1"}, []SdField{SdWatchdog()}},
		{"raw-watchdog-trigger", []string{"WATCHDOG=trigger"}, []SdField{SdWatchdogTrigger()}},
		{"raw-fdstore", []string{"FDSTORE=1", "FDNAME=listener-0"}, []SdField{SdFDStore("listener-0")}},
		{"raw-fdstore-pollof", []string{"FDSTORE=1", "FDNAME=x", "FDPOLL=0"}, []SdField{SdFDStore("x"), SdFDPollOff()}},
		{"raw-fdstoreremove", []string{"FDSTOREREMOVE=1", "FDNAME=old"}, []SdField{SdFDStoreRemove("old")}},
		{"raw-stopping-status", []string{"STOPPING=1", "STATUS=draining"}, []SdField{SdStopping(), SdStatus("draining")}},
	}
	for _, k := range sdAddrKinds() {
		l := sdListen(t, k.abstract)
		n := sdNewNotifier(t, l.addr)
		for _, c := range cases {
			t.Run(k.name+"/"+c.name, func(t *testing.T) {
				want := sdSystemdNotify(t, bin, l, c.args...)
				if err := n.Send(c.fields...); err != nil {
					t.Fatalf("Send: %v", err)
				}
				got, fds := l.recv(t)
				sdCloseFDs(fds)
				if got != want || len(fds) != 0 {
					t.Errorf("ours %q (%d fds), systemd-notify %s: %q", got, len(fds), c.args, want)
				}
			})
		}
		// systemd 252's systemd-notify has no --reloading: send ours, then
		// the same assignments through its raw form.
		t.Run(k.name+"/reloading", func(t *testing.T) {
			if err := n.Send(SdReloading(), SdStatus("reloading")); err != nil {
				t.Fatal(err)
			}
			got, _ := l.recv(t)
			lines := strings.Split(got, "\n")
			if len(lines) != 3 {
				t.Fatalf("got %q", got)
			}
			want := sdSystemdNotify(t, bin, l, lines...)
			if got != want {
				t.Errorf("ours %q, systemd-notify %q: %q", got, lines, want)
			}
		})
	}
}

// TestSdNotifyBarrierMatchesSystemdNotify: without --no-block, systemd-notify
// follows its message with BARRIER=1 and a pipe's write end, and waits for it
// to be closed. Ours must look the same.
func TestSdNotifyBarrierMatchesSystemdNotify(t *testing.T) {
	bin := sdSystemdNotifyPath(t)
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, "--ready")
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			msg, fds := l.recv(t)
			sdCloseFDs(fds)
			if msg != "READY=1" || len(fds) != 0 {
				t.Errorf("systemd-notify sent %q with %d fds first", msg, len(fds))
			}
			want, wantFDs := l.recv(t)
			wantDesc := sdDescribeFDs(t, wantFDs)
			sdCloseFDs(wantFDs)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%s: %v\n%s", cmd, err, out.String())
			}

			n := sdNewNotifier(t, l.addr)
			errc := make(chan error, 1)
			go func() { errc <- n.Barrier(ctx) }()
			got, gotFDs := l.recv(t)
			gotDesc := sdDescribeFDs(t, gotFDs)
			sdCloseFDs(gotFDs)
			if err := <-errc; err != nil {
				t.Fatalf("Barrier: %v", err)
			}
			if got != want || gotDesc != wantDesc {
				t.Errorf("ours %q with %s, systemd-notify %q with %s", got, gotDesc, want, wantDesc)
			}
			t.Logf("BARRIER datagram: %q with %s", got, gotDesc)
		})
	}
}

// sdDescribeFDs says how many fds there are and what kind.
func sdDescribeFDs(tb testing.TB, fds []int) string {
	tb.Helper()
	var parts []string
	for _, fd := range fds {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			tb.Fatal(err)
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil {
			tb.Fatal(err)
		}
		kind := "other"
		if st.Mode&unix.S_IFMT == unix.S_IFIFO {
			kind = "pipe"
		}
		switch fl & unix.O_ACCMODE {
		case unix.O_RDONLY:
			kind += " read end"
		case unix.O_WRONLY:
			kind += " write end"
		}
		parts = append(parts, kind)
	}
	return fmt.Sprintf("%d fds %q", len(fds), parts)
}

// TestSdNotifyFormat checks the bytes of fields systemd-notify cannot be
// asked for, and rounding.
func TestSdNotifyFormat(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	cases := []struct {
		fields []SdField
		want   string
	}{
		{[]SdField{SdExtendTimeout(0)}, "EXTEND_TIMEOUT_USEC=0"},
		{[]SdField{SdExtendTimeout(1)}, "EXTEND_TIMEOUT_USEC=1"},
		{[]SdField{SdExtendTimeout(1500 * time.Nanosecond)}, "EXTEND_TIMEOUT_USEC=2"},
		{[]SdField{SdExtendTimeout(90 * time.Second)}, "EXTEND_TIMEOUT_USEC=90000000"},
		{[]SdField{SdErrno(0)}, "ERRNO=0"},
		{[]SdField{SdErrno(4095)}, "ERRNO=4095"},
		{[]SdField{SdMainPID(1)}, "MAINPID=1"},
		{[]SdField{SdMainPID(1<<31 - 1)}, "MAINPID=2147483647"},
		{[]SdField{SdFDStore("")}, "FDSTORE=1\nFDNAME="},
		{[]SdField{SdFDStore(" ~")}, "FDSTORE=1\nFDNAME= ~"},
		{[]SdField{SdStatus("tab\there")}, "STATUS=tab\there"},
		{[]SdField{SdWatchdog(), SdStatus("alive"), SdExtendTimeout(time.Second)}, "WATCHDOG=1\nSTATUS=alive\nEXTEND_TIMEOUT_USEC=1000000"},
	}
	for _, c := range cases {
		if err := n.Send(c.fields...); err != nil {
			t.Errorf("Send(%q): %v", c.want, err)
			continue
		}
		if got, fds := l.recv(t); got != c.want || len(fds) != 0 {
			sdCloseFDs(fds)
			t.Errorf("got %q with %d fds, want %q", got, len(fds), c.want)
		}
	}
}

// TestSdNotifyReloading: MONOTONIC_USEC is CLOCK_MONOTONIC at send time.
func TestSdNotifyReloading(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	f := SdReloading() // made before the clock is read: the value must be read at send time
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &before); err != nil {
		t.Fatal(err)
	}
	if err := n.Send(f); err != nil {
		t.Fatal(err)
	}
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &after); err != nil {
		t.Fatal(err)
	}
	got, _ := l.recv(t)
	v, ok := strings.CutPrefix(got, "RELOADING=1\nMONOTONIC_USEC=")
	if !ok {
		t.Fatalf("got %q", got)
	}
	usec, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		t.Fatalf("got %q: %v", got, err)
	}
	if lo, hi := before.Nano()/1e3, after.Nano()/1e3; usec < lo || usec > hi {
		t.Errorf("MONOTONIC_USEC=%d, want within [%d, %d]", usec, lo, hi)
	}
}

// TestSdNotifyFDStore: fds go as SCM_RIGHTS, arrive working and in order, and
// the sender keeps its own.
func TestSdNotifyFDStore(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)

	var p1, p2 [2]int
	for _, p := range []*[2]int{&p1, &p2} {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.SendFDs([]int{p1[0], p2[0]}, SdFDStore("pair"), SdFDPollOff()); err != nil {
		t.Fatal(err)
	}
	got, fds := l.recv(t)
	if want := "FDSTORE=1\nFDNAME=pair\nFDPOLL=0"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if len(fds) != 2 {
		t.Fatalf("got %d fds, want 2", len(fds))
	}
	// Write into our ends (still open: SendFDs closes nothing), read from
	// the received ones.
	for i, w := range []int{p1[1], p2[1]} {
		msg := []byte("fd" + strconv.Itoa(i))
		if _, err := unix.Write(w, msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16)
		k, err := unix.Read(fds[i], buf)
		if err != nil || string(buf[:k]) != string(msg) {
			t.Errorf("received fd %d: read %q, %v; want %q", i, buf[:k], err, msg)
		}
	}
	sdCloseFDs(fds)
	sdCloseFDs(append(p1[:], p2[:]...))
	sdCheckFDs(t, before)
}

// TestSdNotifyFDLimit: the kernel passes at most SCM_MAX_FD fds in one
// message; SendFDs takes exactly that many and refuses one more.
func TestSdNotifyFDLimit(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer sdCloseFDs(p[:])
	many := make([]int, sdMaxFDs+1)
	for i := range many {
		many[i] = p[0]
	}
	if err := n.SendFDs(many, SdFDStore("many")); err == nil {
		t.Errorf("SendFDs with %d fds: no error", len(many))
	}
	l.expectNone(t)
	if err := n.SendFDs(many[:sdMaxFDs], SdFDStore("many")); err != nil {
		t.Fatalf("SendFDs with %d fds: %v", sdMaxFDs, err)
	}
	_, fds := l.recv(t)
	sdCloseFDs(fds)
	if len(fds) != sdMaxFDs {
		t.Errorf("received %d fds, want %d", len(fds), sdMaxFDs)
	}
}

// TestSdNotifyValidation: a bad field is an error and nothing is sent, not
// even the valid fields before it.
func TestSdNotifyValidation(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	maxStatus := strings.Repeat("s", sdMaxDatagram-len("STATUS="))
	cases := []struct {
		name   string
		fds    []int
		fields []SdField
	}{
		{"no-fields", nil, nil},
		{"zero-field", nil, []SdField{{}}},
		{"status-newline", nil, []SdField{SdStatus("ok\nMAINPID=1")}},
		{"status-cr", nil, []SdField{SdStatus("ok\rMAINPID=1")}},
		{"status-nul", nil, []SdField{SdStatus("ok\x00")}},
		{"status-not-utf8", nil, []SdField{SdStatus("ok\xff")}},
		{"ready-then-bad-status", nil, []SdField{SdReady(), SdStatus("a\nb")}},
		{"fdname-colon", nil, []SdField{SdFDStore("a:b")}},
		{"fdname-del", nil, []SdField{SdFDStore("a\x7f")}},
		{"fdname-control", nil, []SdField{SdFDStore("a\tb")}},
		{"fdname-newline", nil, []SdField{SdFDStoreRemove("a\nMAINPID=1")}},
		{"fdname-non-ascii", nil, []SdField{SdFDStore("é")}},
		{"fdname-256", nil, []SdField{SdFDStore(strings.Repeat("n", 256))}},
		{"mainpid-0", nil, []SdField{SdMainPID(0)}},
		{"mainpid-negative", nil, []SdField{SdMainPID(-5)}},
		{"mainpid-too-big", nil, []SdField{SdMainPID(1 << 31)}},
		{"errno-too-big", nil, []SdField{SdErrno(4096)}},
		{"extend-negative", nil, []SdField{SdExtendTimeout(-time.Microsecond)}},
		{"repeated-status", nil, []SdField{SdStatus("a"), SdStatus("b")}},
		{"repeated-ready", nil, []SdField{SdReady(), SdReady()}},
		{"watchdog-and-trigger", nil, []SdField{SdWatchdog(), SdWatchdogTrigger()}},
		{"two-fdnames", nil, []SdField{SdFDStore("a"), SdFDStoreRemove("b")}},
		{"too-long", nil, []SdField{SdStatus(maxStatus + "s")}},
		{"too-long-with-ready", nil, []SdField{SdReady(), SdStatus(maxStatus[len("READY=1\n"):] + "s")}},
		{"too-long-fdname-last", nil, []SdField{SdStatus(maxStatus[:len(maxStatus)-20]), SdFDStore("name")}},
		{"fd-negative", []int{-1}, []SdField{SdFDStore("x")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := n.SendFDs(c.fds, c.fields...)
			if err == nil {
				t.Errorf("no error")
			} else {
				t.Logf("error: %.120s", err)
			}
			l.expectNone(t)
		})
	}
	// The limits themselves are fine.
	t.Run("largest", func(t *testing.T) {
		for _, fields := range [][]SdField{
			{SdStatus(maxStatus)},
			{SdReady(), SdStatus(maxStatus[len("READY=1\n"):])},
			{SdFDStore(strings.Repeat("n", 255))},
		} {
			if err := n.Send(fields...); err != nil {
				t.Fatal(err)
			}
			got, _ := l.recv(t)
			if len(got) > sdMaxDatagram {
				t.Errorf("sent %d bytes", len(got))
			}
		}
		if size := len("STATUS=" + maxStatus); size != 4096 {
			t.Errorf("largest STATUS datagram is %d bytes, want 4096", size)
		}
	})
}

func TestSdNotifyFDNameValid(t *testing.T) {
	cases := []struct {
		s    string
		want bool
	}{
		{"", true},
		{"stored", true},
		{" !~", true},
		{strings.Repeat("x", 255), true},
		{strings.Repeat("x", 256), false},
		{"a:b", false},
		{":", false},
		{"\x7f", false},
		{"\x1f", false},
		{"\x00", false},
		{"\n", false},
		{"\xc3\xa9", false},
		{"\x80", false},
	}
	for _, c := range cases {
		if got := fdnameValid(c.s); got != c.want {
			t.Errorf("fdnameValid(%q) = %v, want %v", c.s, got, c.want)
		}
	}
}

func TestSdNotifyAddresses(t *testing.T) {
	bad := []struct {
		addr         string
		notSupported bool
	}{
		{"vsock:2:1234", true},
		{"vsock-dgram:2:1234", true},
		{"vsock-stream:1:2", true},
		{"relative/notify", false},
		{"notify", false},
		{"./notify", false},
		{"@", false},
		{"/", false},
		{"/tmp/a\x00b", false},
		{"\x00abstract", false},
		{"/" + strings.Repeat("p", 107), false}, // 108 bytes: no room for the NUL
		{"@" + strings.Repeat("a", 108), false}, // 109 bytes
	}
	for _, c := range bad {
		n, err := NewSdNotifier(c.addr)
		if err == nil {
			n.Close()
			t.Errorf("NewSdNotifier(%.40q): no error", c.addr)
			continue
		}
		if n != nil {
			t.Errorf("NewSdNotifier(%.40q): non-nil notifier with error", c.addr)
		}
		if got := errors.Is(err, ErrNotSupported); got != c.notSupported {
			t.Errorf("NewSdNotifier(%.40q) = %v; errors.Is(ErrNotSupported) = %v, want %v", c.addr, err, got, c.notSupported)
		}
	}

	// Nothing listening: connect fails, and says why.
	if _, err := NewSdNotifier("/nonexistent-shellflip-dir/notify"); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("missing socket: %v, want ENOENT", err)
	}

	// The longest names that fit in sun_path work.
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	longPath := dir + "/" + strings.Repeat("p", 107-len(dir)-1)
	longAbstract := "@" + strings.Repeat("a", 107)
	for _, addr := range []string{longPath, longAbstract} {
		l := sdListenAt(t, addr)
		n := sdNewNotifier(t, addr)
		if err := n.Send(SdReady()); err != nil {
			t.Errorf("%d-byte address: %v", len(addr), err)
			continue
		}
		if got, _ := l.recv(t); got != "READY=1" {
			t.Errorf("%d-byte address: got %q", len(addr), got)
		}
	}
}

// TestSdNotifyDisabled: without NOTIFY_SOCKET (and on a nil notifier) every
// call is a no-op returning nil, even for fields that would be refused.
func TestSdNotifyDisabled(t *testing.T) {
	before := sdOpenFDs(t)
	n, err := NewSdNotifier("")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*SdNotifier{n, nil} {
		if n.Enabled() {
			t.Error("Enabled")
		}
		for _, err := range []error{
			n.Send(SdReady()),
			n.Send(SdStatus("bad\n")),
			n.Send(),
			n.SendFDs([]int{0}, SdFDStore("x")),
			n.Barrier(context.Background()),
			n.Close(),
			n.Close(),
		} {
			if err != nil {
				t.Error(err)
			}
		}
	}
	sdCheckFDs(t, before)
}

func TestSdNotifyClose(t *testing.T) {
	l := sdListen(t, false)
	before := sdOpenFDs(t)
	n, err := NewSdNotifier(l.addr)
	if err != nil {
		t.Fatal(err)
	}
	if !n.Enabled() {
		t.Fatal("not Enabled")
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := n.Send(SdReady()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Send after Close: %v, want net.ErrClosed", err)
	}
	if err := n.Barrier(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Barrier after Close: %v, want net.ErrClosed", err)
	}
	l.expectNone(t)
	sdCheckFDs(t, before)
}

// TestSdNotifyBarrier: Barrier returns once the manager has closed the fd,
// not before, and follows everything sent before it.
func TestSdNotifyBarrier(t *testing.T) {
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			n := sdNewNotifier(t, l.addr)
			before := sdOpenFDs(t)
			if err := n.Send(SdStatus("before the barrier")); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- n.Barrier(ctx) }()
			if got, _ := l.recv(t); got != "STATUS=before the barrier" {
				t.Errorf("first datagram %q", got)
			}
			got, fds := l.recv(t)
			if got != "BARRIER=1" || len(fds) != 1 {
				t.Fatalf("got %q with %d fds, want BARRIER=1 with 1", got, len(fds))
			}
			select {
			case err := <-errc:
				t.Fatalf("Barrier returned %v while the manager still held the fd", err)
			default:
			}
			sdCloseFDs(fds)
			if err := <-errc; err != nil {
				t.Fatalf("Barrier: %v", err)
			}
			sdCheckFDs(t, before)
		})
	}
}

// TestSdNotifyBarrierDeadline: a manager that never closes the fd. Barrier
// returns when ctx expires, and leaves no fd open: the manager's copy of the
// write end is all that remains until it closes it.
func TestSdNotifyBarrierDeadline(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	err := n.Barrier(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Barrier: %v, want context.DeadlineExceeded", err)
	}
	got, fds, ok := l.recvNow(t)
	if !ok || got != "BARRIER=1" || len(fds) != 1 {
		t.Fatalf("got %q with %d fds (queued: %v), want BARRIER=1 with 1", got, len(fds), ok)
	}
	sdCloseFDs(fds)
	sdCheckFDs(t, before)
}

// TestSdNotifyBarrierCancel: cancelling ctx ends the wait.
func TestSdNotifyBarrierCancel(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- n.Barrier(ctx) }()
	got, fds := l.recv(t)
	if got != "BARRIER=1" || len(fds) != 1 {
		t.Errorf("got %q with %d fds, want BARRIER=1 with 1", got, len(fds))
	}
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Barrier: %v, want context.Canceled", err)
		}
	case <-time.After(sdWait):
		t.Fatal("Barrier did not return after cancel")
	}
	sdCloseFDs(fds)
	sdCheckFDs(t, before)

	// A context that is already done: nothing is sent, nothing is opened.
	if err := n.Barrier(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Barrier with a done ctx: %v", err)
	}
	l.expectNone(t)
	sdCheckFDs(t, before)
}

func TestSdNotifyConcurrent(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	const senders, each = 4, 100
	errc := make(chan error, senders)
	for g := range senders {
		go func() {
			for i := range each {
				if err := n.Send(SdStatus(fmt.Sprintf("g%d-%d", g, i)), SdWatchdog()); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	seen := make(map[string]bool)
	for range senders * each {
		got, _ := l.recv(t)
		if seen[got] {
			t.Errorf("duplicate %q", got)
		}
		seen[got] = true
	}
	for range senders {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	for g := range senders {
		for i := range each {
			if want := fmt.Sprintf("STATUS=g%d-%d\nWATCHDOG=1", g, i); !seen[want] {
				t.Errorf("missing %q", want)
			}
		}
	}
}

func TestSdNotifyWatchdogInterval(t *testing.T) {
	const unset = "<unset>"
	pid := strconv.Itoa(os.Getpid())
	other := strconv.Itoa(os.Getpid() + 1)
	cases := []struct {
		usec, pid string
		interval  time.Duration
		enabled   bool
		err       bool
	}{
		{unset, unset, 0, false, false},
		{unset, pid, 0, false, false},
		{"30000000", unset, 15 * time.Second, true, false},
		{"30000000", pid, 15 * time.Second, true, false},
		{"1", pid, 500 * time.Nanosecond, true, false},
		{"30000000", other, 0, false, false},
		{"30000000", "1", 0, false, false},
		{"", unset, 0, false, true},
		{"abc", unset, 0, false, true},
		{"0", unset, 0, false, true},
		{"-1", unset, 0, false, true},
		{" 5", unset, 0, false, true},
		{"5s", unset, 0, false, true},
		{"18446744073709551615", unset, 0, false, true}, // USEC_INFINITY
		{"9223372036854776", unset, 0, false, true},     // beyond time.Duration
		{"30000000", "", 0, false, true},
		{"30000000", "abc", 0, false, true},
		{"30000000", "0", 0, false, true},
		{"30000000", "-1", 0, false, true},
		{"30000000", "4294967297", 0, false, true},
	}
	for _, c := range cases {
		sdSetenv(t, "WATCHDOG_USEC", c.usec, unset)
		sdSetenv(t, "WATCHDOG_PID", c.pid, unset)
		interval, enabled, err := SdWatchdogInterval()
		if interval != c.interval || enabled != c.enabled || (err != nil) != c.err {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: got %v, %v, %v; want %v, %v, error %v",
				c.usec, c.pid, interval, enabled, err, c.interval, c.enabled, c.err)
		}
	}
}

// sdSetenv sets key to v, or unsets it if v == unset, until the test ends.
func sdSetenv(t *testing.T, key, v, unset string) {
	t.Setenv(key, "") // restores the old value at cleanup
	if v == unset {
		os.Unsetenv(key)
	} else {
		os.Setenv(key, v)
	}
}

// TestSdNotifySendAllocs: once set up, sending allocates nothing.
func TestSdNotifySendAllocs(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	status := strings.Repeat("x", 64)
	var sendErr error
	cases := []struct {
		name string
		send func()
	}{
		{"READY", func() { sendErr = n.Send(SdReady()) }},
		{"STATUS", func() { sendErr = n.Send(SdStatus(status)) }},
		{"MAINPID+READY", func() { sendErr = n.Send(SdMainPID(12345), SdReady()) }},
		{"WATCHDOG", func() { sendErr = n.Send(SdWatchdog()) }},
		{"RELOADING", func() { sendErr = n.Send(SdReloading()) }},
	}
	const runs = 100
	reached, stop := l.drain(t, len(cases)*(runs+1)) // AllocsPerRun makes one warm-up call
	defer stop()
	for _, c := range cases {
		if allocs := testing.AllocsPerRun(runs, c.send); allocs != 0 {
			t.Errorf("Send(%s): %v allocations, want 0", c.name, allocs)
		}
		if sendErr != nil {
			t.Fatalf("Send(%s): %v", c.name, sendErr)
		}
	}
	select {
	case <-reached:
	case <-time.After(sdWait):
		t.Fatal("not every datagram arrived")
	}
}

// TestSdNotifySystemdNotifierEnv runs TestSdNotifyHelperProcess in a new
// process with NOTIFY_SOCKET set, so that SystemdNotifier's sync.Once reads
// it fresh.
func TestSdNotifySystemdNotifierEnv(t *testing.T) {
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestSdNotifyHelperProcess$", "-test.count=1")
			cmd.Env = append(os.Environ(), "SHELLFLIP_SD_HELPER=1", "NOTIFY_SOCKET="+l.addr)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("helper: %v\n%s", err, out)
			}
			if got, _ := l.recv(t); got != "READY=1\nSTATUS=NOTIFY_SOCKET kept" {
				t.Errorf("helper sent %q", got)
			}
		})
	}
}

// TestSdNotifyHelperProcess is the child of TestSdNotifySystemdNotifierEnv.
func TestSdNotifyHelperProcess(t *testing.T) {
	if os.Getenv("SHELLFLIP_SD_HELPER") != "1" {
		t.Skip("helper process for TestSdNotifySystemdNotifierEnv")
	}
	n, err := SystemdNotifier()
	if err != nil {
		t.Fatal(err)
	}
	n2, err2 := SystemdNotifier()
	if n2 != n || err2 != err {
		t.Fatal("SystemdNotifier returned a different notifier the second time")
	}
	status := "NOTIFY_SOCKET kept"
	if os.Getenv("NOTIFY_SOCKET") == "" {
		status = "NOTIFY_SOCKET unset"
	}
	if err := n.Send(SdReady(), SdStatus(status)); err != nil {
		t.Fatal(err)
	}
}

// FuzzSdNotifyFields: whatever the caller's string, either Send refuses it and
// sends nothing, or the manager, splitting on '\n' and '\r' as systemd does,
// sees exactly the assignments asked for: no injection.
func FuzzSdNotifyFields(f *testing.F) {
	for _, s := range []string{"", "ok", "a\nMAINPID=1", "a\rb", "x\x00", "\xff", "a:b", "~", strings.Repeat("z", 300)} {
		f.Add(s)
	}
	l := sdListen(f, false)
	n := sdNewNotifier(f, l.addr)
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, c := range []struct {
			field SdField
			want  []string
		}{
			{SdStatus(s), []string{"STATUS=" + s}},
			{SdFDStore(s), []string{"FDSTORE=1", "FDNAME=" + s}},
		} {
			if err := n.Send(SdReady(), c.field); err != nil {
				l.expectNone(t)
				continue
			}
			got, _ := l.recv(t)
			want := append([]string{"READY=1"}, c.want...)
			if strings.Join(want, "\n") != got {
				t.Fatalf("sent %q, want %q", got, want)
			}
			if parts := split(got); !slices.Equal(parts, want) {
				t.Fatalf("%q splits into %q, want %q", got, parts, want)
			}
		}
	})
}

func ExampleSdNotifier() {
	n, err := SystemdNotifier()
	if err != nil {
		log.Printf("sd_notify disabled: %v", err) // n is nil: its methods do nothing
	}
	// ... listen, start serving ...
	if err := n.Send(SdReady(), SdStatus("serving on :8080")); err != nil {
		log.Printf("sd_notify: %v", err)
	}

	// Later, on SIGTERM:
	_ = n.Send(SdStopping(), SdStatus("draining connections"))
}

func ExampleSdWatchdogInterval() {
	n, _ := SystemdNotifier()
	interval, enabled, err := SdWatchdogInterval()
	if err != nil {
		log.Fatal(err)
	}
	if !enabled {
		return
	}
	go func() {
		for range time.Tick(interval) {
			_ = n.Send(SdWatchdog())
		}
	}()
}

// ==========================================================================
// The drain coordinator (shutdown.go)
// ==========================================================================

// shutdownTimeout bounds tests that run on the real clock, so that a bug
// fails the test instead of hanging it. Passing tests never wait for it.
const shutdownTimeout = 10 * time.Second

// shutdownStart runs c.Shutdown(ctx) in a new goroutine and returns a
// channel that receives its result.
func shutdownStart(c *ShutdownCoordinator, ctx context.Context) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- c.Shutdown(ctx) }()
	return errc
}

// shutdownIsClosed reports whether ch is closed, without blocking.
func shutdownIsClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestShutdownNoTasks(t *testing.T) {
	c := NewShutdownCoordinator()
	// A context that is already done: Shutdown must still report the
	// completed drain, not the context's error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with no tasks: %v, want nil", err)
	}
	if n := c.Active(); n != 0 {
		t.Fatalf("Active = %d, want 0", n)
	}
}

func TestShutdownWaitsForOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		if h == nil {
			t.Fatal("Acquire before shutdown returned nil")
		}
		errc := shutdownStart(c, context.Background())

		// Wait until Shutdown is durably blocked: it must be waiting
		// for h, not have returned.
		synctest.Wait()
		select {
		case err := <-errc:
			t.Fatalf("Shutdown returned %v with a handle held", err)
		default:
		}
		if !shutdownIsClosed(h.Done()) {
			t.Fatal("handle Done not closed while Shutdown waits")
		}

		h.Release()
		if err := <-errc; err != nil {
			t.Fatalf("Shutdown: %v, want nil", err)
		}
	})
}

func TestShutdownWaitsForMany(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 50
		c := NewShutdownCoordinator()

		// Each task holds its handle until shutdown begins, then
		// reports that it is about to release.
		var finished atomic.Int32
		for range n {
			h := c.Acquire()
			go func() {
				defer h.Release()
				<-h.Done()
				finished.Add(1)
			}()
		}
		if got := c.Active(); got != n {
			t.Fatalf("Active = %d, want %d", got, n)
		}

		if err := c.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown: %v, want nil", err)
		}
		if got := finished.Load(); got != n {
			t.Fatalf("Shutdown returned after %d of %d tasks finished", got, n)
		}
		if got := c.Active(); got != 0 {
			t.Fatalf("Active after Shutdown = %d, want 0", got)
		}
	})
}

func TestShutdownDeadline(t *testing.T) {
	// Inside the bubble time is fake, so the one-second deadline passes
	// as soon as every goroutine is blocked, without waiting for real.
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		err := c.Shutdown(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown with a handle held: %v, want %v", err, context.DeadlineExceeded)
		}
		if got := c.Active(); got != 1 {
			t.Fatalf("Active after deadline = %d, want 1", got)
		}

		// The held task still counts: it can register more work, and
		// a second Shutdown waits for all of it.
		h2 := c.Acquire()
		if h2 == nil {
			t.Fatal("Acquire after a timed-out Shutdown returned nil with a handle held")
		}
		errc := shutdownStart(c, context.Background())
		h.Release()
		synctest.Wait()
		select {
		case err := <-errc:
			t.Fatalf("second Shutdown returned %v with a handle held", err)
		default:
		}
		h2.Release()
		if err := <-errc; err != nil {
			t.Fatalf("second Shutdown: %v, want nil", err)
		}
	})
}

func TestShutdownReleaseIdempotent(t *testing.T) {
	c := NewShutdownCoordinator()
	h1 := c.Acquire()
	h2 := c.Acquire()

	h1.Release()
	h1.Release()
	if got := c.Active(); got != 1 {
		t.Fatalf("Active after releasing one handle twice = %d, want 1", got)
	}

	// Concurrent double release must also count once.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(h2.Release)
	}
	wg.Wait()
	if got := c.Active(); got != 0 {
		t.Fatalf("Active = %d, want 0", got)
	}

	// A handle released before Shutdown does not hold it, and releasing
	// again after the drain changes nothing.
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	h1.Release()
	h2.Release()
	if got := c.Active(); got != 0 {
		t.Fatalf("Active after late Release = %d, want 0", got)
	}
}

func TestShutdownNilHandle(t *testing.T) {
	var h *ShutdownHandle
	h.Release()
	h.Release()
	if !shutdownIsClosed(h.Done()) {
		t.Fatal("Done on a nil handle is not closed")
	}
}

func TestShutdownAcquireAfterShutdown(t *testing.T) {
	c := NewShutdownCoordinator()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for range 3 {
		if h := c.Acquire(); h != nil {
			h.Release()
			t.Fatal("Acquire after Shutdown finished returned a handle")
		}
	}
	if got := c.Active(); got != 0 {
		t.Fatalf("Active = %d, want 0", got)
	}
	// The idiomatic caller pattern works on the nil result.
	h := c.Acquire()
	defer h.Release()
	if !shutdownIsClosed(h.Done()) {
		t.Fatal("Done on the nil handle from a drained coordinator is not closed")
	}
}

func TestShutdownAcquireDuringShutdown(t *testing.T) {
	// Before the drain, Acquire succeeds even though shutdown has begun,
	// and Shutdown waits for the new handle too.
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		errc := shutdownStart(c, context.Background())
		<-c.Done()

		sub := c.Acquire()
		if sub == nil {
			t.Fatal("Acquire while a handle is held returned nil")
		}
		h.Release()
		synctest.Wait()
		select {
		case err := <-errc:
			t.Fatalf("Shutdown returned %v while a late handle is held", err)
		default:
		}
		sub.Release()
		if err := <-errc; err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if c.Acquire() != nil {
			t.Fatal("Acquire after the drain returned a handle")
		}
	})
}

// TestShutdownAcquireRace races Acquire against concurrent Shutdown calls
// and checks the invariant callers rely on: once a Shutdown has returned
// nil, no handle is unreleased and no Acquire succeeds. Run it with -race.
func TestShutdownAcquireRace(t *testing.T) {
	const (
		rounds    = 200
		acquirers = 32
		shutdowns = 3
	)
	for range rounds {
		shutdownRaceRound(t, acquirers, shutdowns)
		if t.Failed() {
			return
		}
	}
}

func shutdownRaceRound(t *testing.T, acquirers, shutdowns int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()

	c := NewShutdownCoordinator()
	var (
		returned atomic.Bool  // some Shutdown has returned nil
		held     atomic.Int64 // handles acquired and not yet released
		start    = make(chan struct{})
		wg       sync.WaitGroup
	)

	for range acquirers {
		wg.Go(func() {
			<-start
			h := c.Acquire()
			if h == nil {
				return
			}
			held.Add(1)
			// While h is held, no Shutdown can have returned nil...
			if returned.Load() {
				t.Error("Acquire returned a handle after Shutdown returned nil")
			}
			// ...and a task holding a handle can always register
			// a sub-task.
			sub := c.Acquire()
			if sub == nil {
				t.Error("Acquire returned nil while a handle is held")
			}
			sub.Release()
			held.Add(-1)
			h.Release()
		})
	}

	errs := make(chan error, shutdowns)
	for range shutdowns {
		wg.Go(func() {
			<-start
			err := c.Shutdown(ctx)
			if err == nil {
				if n := held.Load(); n != 0 {
					t.Errorf("Shutdown returned nil with %d handles held", n)
				}
				returned.Store(true)
			}
			errs <- err
		})
	}

	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	}
	if n := c.Active(); n != 0 {
		t.Fatalf("Active after the round = %d, want 0", n)
	}
	if h := c.Acquire(); h != nil {
		t.Fatal("Acquire after the round returned a handle")
	}
}

func TestShutdownSignals(t *testing.T) {
	c := NewShutdownCoordinator()
	h := c.Acquire()
	ctx := c.Context()
	if c.Context() != ctx {
		t.Fatal("Context returned different contexts")
	}
	if shutdownIsClosed(c.Done()) || shutdownIsClosed(h.Done()) || ctx.Err() != nil {
		t.Fatal("shutdown signalled before Shutdown was called")
	}

	errc := shutdownStart(c, context.Background())
	// Every signal fires while Shutdown is still waiting for h.
	timeout, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for name, ch := range map[string]<-chan struct{}{
		"coordinator Done": c.Done(),
		"handle Done":      h.Done(),
		"Context Done":     ctx.Done(),
	} {
		select {
		case <-ch:
		case <-timeout.Done():
			t.Fatalf("%s not closed after Shutdown began", name)
		}
	}
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("Context().Err() = %v, want %v", ctx.Err(), context.Canceled)
	}
	h.Release()
	if err := <-errc; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestShutdownTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		first := shutdownStart(c, context.Background())
		second := shutdownStart(c, context.Background())

		// Both calls wait.
		synctest.Wait()
		select {
		case err := <-first:
			t.Fatalf("first Shutdown returned %v with a handle held", err)
		case err := <-second:
			t.Fatalf("second Shutdown returned %v with a handle held", err)
		default:
		}

		h.Release()
		if err := <-first; err != nil {
			t.Fatalf("first Shutdown: %v", err)
		}
		if err := <-second; err != nil {
			t.Fatalf("second Shutdown: %v", err)
		}
		// A call after the drain returns at once.
		if err := c.Shutdown(context.Background()); err != nil {
			t.Fatalf("third Shutdown: %v", err)
		}
	})
}

func TestShutdownAllocs(t *testing.T) {
	c := NewShutdownCoordinator()
	h := c.Acquire()
	defer h.Release()
	if n := testing.AllocsPerRun(100, func() {
		_ = h.Done()
		_ = c.Done()
		_ = c.Active()
	}); n != 0 {
		t.Errorf("Done and Active allocate %v times, want 0", n)
	}
	// Acquire allocates the handle and nothing else.
	if n := testing.AllocsPerRun(100, func() {
		c.Acquire().Release()
	}); n != 1 {
		t.Errorf("Acquire and Release allocate %v times, want 1", n)
	}
}

func BenchmarkShutdownAcquireRelease(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		c := NewShutdownCoordinator()
		for b.Loop() {
			c.Acquire().Release()
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		c := NewShutdownCoordinator()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.Acquire().Release()
			}
		})
	})
}

// ==========================================================================
// The fd registry: listeners across restarts, socket activation (fdpass.go)
// ==========================================================================

// Tests of the named-fd registry across real restarts: every kind of fd is
// passed on under its name and is the same socket or file in the new
// process; LISTEN_* look as systemd sets them; socket activation by the real
// systemd-socket-activate; unclaimed fds are closed at Ready; hostile
// LISTEN_* environments are refused or ignored without a panic or a leak.
//
// The roles report what they see with fdpassSay: "kind pid=N key=value...",
// each value query-escaped so that names, paths and errors survive the
// space-separated report format; the tests read them back with fdpassField.

const (
	// Role "fdpass": what each generation listens on, adds and claims, as
	// comma-separated kind|name|network|address[|g0] items (see
	// fdpassParseSpecs).
	envFDPassSpecs = "SHELLFLIP_TEST_FDPASS_SPECS"
	// Role "fdpass": every generation works in this directory (it matters to
	// a relative unlink, which is what TestFDPassUnclaimed guards against).
	envFDPassDir = "SHELLFLIP_TEST_FDPASS_DIR"
	// Role "fdpass-overlap": a fifo the new process reads a line from
	// between claiming its listener and Ready.
	envFDPassHold = "SHELLFLIP_TEST_FDPASS_HOLD"
	// Role "fdpass-many": prefix of the abstract socket names.
	envFDPassTag = "SHELLFLIP_TEST_FDPASS_TAG"
	// Role "fdpass-hostile": comma-separated names to claim with ListenNamed.
	envFDPassClaim = "SHELLFLIP_TEST_FDPASS_CLAIM"
	// Role "fdpass-hostile": open a file before the package's init, as a
	// package that reads one in its own init does; the first os.Open starts
	// the runtime's poller, whose epoll and eventfd fds take the lowest
	// free numbers.
	envFDPassOpenEarly = "SHELLFLIP_TEST_FDPASS_OPEN_EARLY"
)

// fdpassScanFDs bounds the fd numbers the snapshot looks at.
const fdpassScanFDs = 2048

// fdpassManyN is how many listeners role "fdpass-many" passes on.
const fdpassManyN = 1000

func init() {
	testRoles["fdpass"] = fdpassRole
	testRoles["fdpass-overlap"] = fdpassOverlapRole
	testRoles["fdpass-hook"] = fdpassHookRole
	testRoles["fdpass-many"] = fdpassManyRole
	testRoles["fdpass-hostile"] = fdpassHostileRole
}

// fdpassAtInit is the process as it was before the package's init took the
// inherited fds. Package-level variables are initialised before any init
// function of the package runs (Go spec, "Package initialization"), so this
// sees what execve passed, plus whatever the runtime opened before package
// initialisation (on cgroup hosts, its CPU limit files: at the lowest free
// fd numbers). Only the fdpass roles take the snapshot, with raw syscalls:
// an os.Open here would start the runtime's poller and so change what it
// looks at.
var fdpassAtInit = fdpassSnapshot()

type fdpassSnap struct {
	env  url.Values       // LISTEN_* as os.LookupEnv saw them
	exec url.Values       // LISTEN_* in /proc/self/environ: what execve passed
	fds  map[int]fdpassFD // fds 3 and up
}

// fdpassFD identifies an open file: its /proc/self/fd link and device and
// inode numbers, which are the same in every process that shares the file.
// cloexec is its close-on-exec flag when it was taken: at initialisation,
// an fd with the flag set cannot have come through execve, so this process
// (the Go runtime) opened it.
type fdpassFD struct {
	target   string
	dev, ino uint64
	cloexec  bool
}

func fdpassSnapshot() fdpassSnap {
	if !strings.HasPrefix(os.Getenv(envTestRole), "fdpass") {
		return fdpassSnap{}
	}
	if os.Getenv(envFDPassOpenEarly) != "" {
		os.ReadFile("/proc/self/stat")
	}
	s := fdpassSnap{env: fdpassListenEnv(os.LookupEnv), exec: url.Values{}, fds: map[int]fdpassFD{}}
	for fd := 3; fd < fdpassScanFDs; fd++ {
		if id, err := fdpassStat(fd); err == nil {
			s.fds[fd] = id
		}
	}
	// Read after the scan, so that its transient fd is not in it.
	for _, kv := range strings.Split(fdpassReadRaw("/proc/self/environ"), "\x00") {
		k, v, _ := strings.Cut(kv, "=")
		if k == envListenPID || k == envListenFDs || k == envListenFDNames {
			s.exec.Set(k, v)
		}
	}
	return s
}

// fdpassReadRaw reads a file with plain syscalls, past the runtime's poller.
func fdpassReadRaw(path string) string {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	var out []byte
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if n <= 0 || err != nil {
			return string(out)
		}
		out = append(out, buf[:n]...)
	}
}

// fdpassListenEnv returns the LISTEN_* variables that lookup finds.
func fdpassListenEnv(lookup func(string) (string, bool)) url.Values {
	v := url.Values{}
	for _, k := range []string{envListenPID, envListenFDs, envListenFDNames} {
		if s, ok := lookup(k); ok {
			v.Set(k, s)
		}
	}
	return v
}

func fdpassStat(fd int) (fdpassFD, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fdpassFD{}, err
	}
	target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return fdpassFD{target: target, dev: st.Dev, ino: st.Ino, cloexec: err == nil && fl&unix.FD_CLOEXEC != 0}, nil
}

// state tells whether fd still holds the file it held when id was taken:
// "same", "closed" or "other" (closed and the number reused).
func (id fdpassFD) state(fd int) string {
	cur, err := fdpassStat(fd)
	switch {
	case err == unix.EBADF:
		return "closed"
	case err != nil:
		return "error:" + err.Error()
	case cur.dev == id.dev && cur.ino == id.ino:
		return "same"
	}
	return "other"
}

// fdpassSay reports a line to the test: kind, this pid, then key=value
// pairs with the values query-escaped.
func fdpassSay(kind string, kv ...string) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s pid=%d", kind, os.Getpid())
	for i := 0; i+1 < len(kv); i += 2 {
		b.WriteString(" " + kv[i] + "=" + url.QueryEscape(kv[i+1]))
	}
	report("%s", b.String())
}

// fdpassFail reports an error, which fails the test at its next wait.
func fdpassFail(format string, args ...any) int {
	report("error pid=%d %s", os.Getpid(), fmt.Sprintf(format, args...))
	return 1
}

// fdpassField returns the unescaped value of key in a report.
func fdpassField(rep map[string]string, key string) string {
	v, err := url.QueryUnescape(rep[key])
	if err != nil {
		return "(bad escape: " + rep[key] + ")"
	}
	return v
}

// fdpassValues decodes a field that holds url.Values.
func fdpassValues(t *testing.T, rep map[string]string, key string) url.Values {
	t.Helper()
	v, err := url.ParseQuery(fdpassField(rep, key))
	if err != nil {
		t.Fatalf("report field %s: %v", key, err)
	}
	return v
}

// fdpassNames splits a ':'-joined list of names; "" is the empty list.
func fdpassNames(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ":")
}

// fdpassInspect returns the O_NONBLOCK flag of the open file description
// behind c and its inode, inside Control: no (*os.File).Fd, which would make
// the shared description blocking.
func fdpassInspect(c syscall.Conn) (nonblock bool, ino uint64, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return false, 0, err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if err != nil {
			ferr = os.NewSyscallError("fcntl F_GETFL", err)
			return
		}
		nonblock = fl&unix.O_NONBLOCK != 0
		var st unix.Stat_t
		if err := unix.Fstat(int(fd), &st); err != nil {
			ferr = os.NewSyscallError("fstat", err)
			return
		}
		ino = st.Ino
	}); err != nil {
		return false, 0, err
	}
	return nonblock, ino, ferr
}

// fdpassBoot begins every restartable fdpass role: it reports "started",
// moves to $SHELLFLIP_TEST_FDPASS_DIR, and returns this process's
// generation, one more than the old process's (its state is that number).
func fdpassBoot() (gen int, ok bool) {
	fdpassSay("started")
	if d := os.Getenv(envFDPassDir); d != "" {
		if err := os.Chdir(d); err != nil {
			fdpassFail("chdir: %v", err)
			return 0, false
		}
	}
	st, err := ReceiveState()
	if err != nil {
		fdpassFail("receive: %v", err)
		return 0, false
	}
	if st == nil {
		return 0, true
	}
	defer st.Close()
	b, err := io.ReadAll(st)
	if err != nil {
		fdpassFail("state: %v", err)
		return 0, false
	}
	g, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		fdpassFail("state %q", b)
		return 0, false
	}
	return g + 1, true
}

// fdpassTail is what a role does around the end that fdpassServe runs;
// every hook is optional.
type fdpassTail struct {
	afterStart func()          // right after Start (and so Ready) returned
	ready      func() []string // extra fields of the ready report
	retire     func()          // after the restart, before "replaced"
	linger     func()          // after "replaced", before exiting
}

// fdpassServe is the end of every restartable fdpass role: Start (which
// calls Ready), a "ready" report with gen, then wait to be replaced and
// report "replaced" as testCluster.restart expects; the hooks run in
// between.
func fdpassServe(gen int, tail fdpassTail) int {
	r, err := Start(context.Background(), Config{
		SocketPath: os.Getenv(envTestSocket),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprintf(w, "%d\n", gen)
			return err
		}},
	})
	if err != nil {
		return fdpassFail("start: %v", err)
	}
	if tail.afterStart != nil {
		tail.afterStart()
	}
	fields := []string{"gen", strconv.Itoa(gen)}
	if tail.ready != nil {
		fields = append(fields, tail.ready()...)
	}
	fdpassSay("ready", fields...)
	p, err := r.Wait()
	if err != nil {
		fdpassSay("ended", "err", err.Error())
		return 1
	}
	if tail.retire != nil {
		tail.retire()
	}
	fdpassSay("replaced", "new", strconv.Itoa(p.Pid))
	if tail.linger != nil {
		tail.linger()
	}
	return 0
}

// fdpassSpec is one thing role "fdpass" holds.
//
//	listen: Listen (name "-") or ListenNamed; greets every connection
//	packet: ListenPacket (name "-") or ListenPacketNamed; reports datagrams
//	conn:   generation 0 dials network/address and Adds the connection;
//	        later ones take it with Conn; reports lines, answers "pong"
//	file:   generation 0 opens address (a regular file or a fifo) and Adds
//	        it; later ones take it with File. A regular file gets "g<gen>;"
//	        appended at the shared offset; a fifo's lines are reported.
//
// firstOnly (a trailing "|g0"): only generation 0 takes it; later ones
// leave the inherited fd unclaimed.
type fdpassSpec struct {
	kind, name, network, address string
	firstOnly                    bool
}

func fdpassParseSpecs(s string) ([]fdpassSpec, error) {
	var specs []fdpassSpec
	for _, item := range strings.Split(s, ",") {
		if item == "" {
			continue
		}
		f := strings.Split(item, "|")
		if len(f) < 4 || len(f) > 5 || len(f) == 5 && f[4] != "g0" {
			return nil, fmt.Errorf("bad spec %q", item)
		}
		specs = append(specs, fdpassSpec{f[0], f[1], f[2], f[3], len(f) == 5})
	}
	return specs, nil
}

func (sp fdpassSpec) String() string {
	s := strings.Join([]string{sp.kind, sp.name, sp.network, sp.address}, "|")
	if sp.firstOnly {
		s += "|g0"
	}
	return s
}

// regName is the name the spec's fd is registered under.
func (sp fdpassSpec) regName() string {
	if sp.name == "-" {
		return ListenerName(sp.network, sp.address)
	}
	return sp.name
}

// fdpassRole is a service that holds what $SHELLFLIP_TEST_FDPASS_SPECS
// says, exercises it for the test, and reports:
//
//	fdpass-env       LISTEN_* at exec, at variable initialisation and in
//	                 main, and whether FixupListenPID works
//	fdpass-socks     the inherited names, the names after claiming, and for
//	                 each spec s<i>=name|address|inode|nonblock
//	fdpass-inherited each inherited fd's state before and after Start
//	fdpass-paths     for unix specs bound to a path: the file before and
//	                 after Start
//	fdpass-recv      data that arrived (name, gen, data)
//
// Odd generations claim in reverse order, so that the registry's order
// must not follow the order of claims.
func fdpassRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	fdpassReportEnv(gen)
	specs, err := fdpassParseSpecs(os.Getenv(envFDPassSpecs))
	if err != nil {
		return fdpassFail("%v", err)
	}
	inheritedNames := Names()
	order := make([]int, len(specs))
	for i := range order {
		order[i] = i
	}
	if gen%2 == 1 {
		slices.Reverse(order)
	}
	var held []io.Closer
	descs := make([]string, len(specs))
	for _, i := range order {
		sp := specs[i]
		if sp.firstOnly && gen > 0 {
			continue
		}
		desc, c, err := fdpassClaim(sp, gen)
		if err != nil {
			return fdpassFail("%s: %v (registry %q)", sp, err, Names())
		}
		descs[i] = desc
		held = append(held, c)
	}
	socks := []string{"gen", strconv.Itoa(gen), "inherited", strings.Join(inheritedNames, ":"), "names", strings.Join(Names(), ":")}
	for i, d := range descs {
		socks = append(socks, "s"+strconv.Itoa(i), d)
	}
	fdpassSay("fdpass-socks", socks...)

	// The inherited fds as the environment named them before the package's
	// init, and the socket files of unix specs, before Start...
	inh := fdpassInheritedFDs()
	before := url.Values{}
	for _, f := range inh {
		before.Add(f.name, f.id.state(f.fd))
	}
	paths := url.Values{}
	for i, sp := range specs {
		if strings.HasPrefix(sp.network, "unix") && sp.kind != "file" && !strings.HasPrefix(sp.address, "@") {
			paths.Set("s"+strconv.Itoa(i), fdpassPathKind(sp.address))
		}
	}
	// ...and after: Start calls Ready, which closes the unclaimed ones.
	// Checked before anything else can open an fd at a freed number.
	afterStart := func() {
		if len(inh) == 0 {
			return // a fresh start: nothing inherited, nothing to report
		}
		after := url.Values{}
		for _, f := range inh {
			after.Add(f.name, f.id.state(f.fd))
		}
		fdpassSay("fdpass-inherited", "gen", strconv.Itoa(gen), "before", before.Encode(), "after", after.Encode())
		for k := range paths {
			i, _ := strconv.Atoi(k[1:])
			paths.Set(k, paths.Get(k)+","+fdpassPathKind(specs[i].address))
		}
		fdpassSay("fdpass-paths", "gen", strconv.Itoa(gen), "paths", paths.Encode())
	}
	return fdpassServe(gen, fdpassTail{
		afterStart: afterStart,
		ready:      func() []string { return []string{"names", strings.Join(Names(), ":")} },
		retire: func() {
			// Close everything this process holds, listeners included:
			// closing them must neither unlink a socket file nor stop the
			// new process. Close waits for pending Accepts and Reads to
			// return, so from here on only the new process takes
			// connections and data.
			for _, c := range held {
				c.Close()
			}
		},
	})
}

// fdpassClaim takes what sp describes and starts exercising it. It returns
// name|address|inode|nonblock and what to close at retirement.
func fdpassClaim(sp fdpassSpec, gen int) (string, io.Closer, error) {
	name := sp.regName()
	var (
		c    io.Closer
		sc   syscall.Conn
		addr string
	)
	switch sp.kind {
	case "listen":
		var ln net.Listener
		var err error
		if sp.name == "-" {
			ln, err = Listen(sp.network, sp.address)
		} else {
			ln, err = ListenNamed(sp.name, nil, sp.network, sp.address)
		}
		if err != nil {
			return "", nil, err
		}
		go fdpassGreet(ln, gen, name)
		c, sc, addr = ln, ln.(syscall.Conn), ln.Addr().String()
	case "packet":
		var pc net.PacketConn
		var err error
		if sp.name == "-" {
			pc, err = ListenPacket(sp.network, sp.address)
		} else {
			pc, err = ListenPacketNamed(sp.name, nil, sp.network, sp.address)
		}
		if err != nil {
			return "", nil, err
		}
		go func() {
			var buf [512]byte
			for {
				n, _, err := pc.ReadFrom(buf[:])
				if err != nil {
					return
				}
				fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", string(buf[:n]))
			}
		}()
		c, sc, addr = pc, pc.(syscall.Conn), pc.LocalAddr().String()
	case "conn":
		var conn net.Conn
		var err error
		if gen == 0 {
			if conn, err = net.Dial(sp.network, sp.address); err != nil {
				return "", nil, err
			}
			if err := Add(name, conn.(syscall.Conn)); err != nil {
				return "", nil, err
			}
		} else if conn, err = Conn(name); err != nil || conn == nil {
			return "", nil, fmt.Errorf("Conn(%q) = %v, %v", name, conn, err)
		}
		go func() {
			sc := bufio.NewScanner(conn)
			for sc.Scan() {
				fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", sc.Text())
				fmt.Fprintf(conn, "pong pid=%d gen=%d\n", os.Getpid(), gen)
			}
		}()
		c, sc, addr = conn, conn.(syscall.Conn), conn.LocalAddr().String()+">"+conn.RemoteAddr().String()
	case "file":
		var f *os.File
		var err error
		if gen == 0 {
			if f, err = os.OpenFile(sp.address, os.O_RDWR|os.O_CREATE, 0o600); err != nil {
				return "", nil, err
			}
			if err := Add(name, f); err != nil {
				return "", nil, err
			}
		} else if f, err = File(name); err != nil || f == nil {
			return "", nil, fmt.Errorf("File(%q) = %v, %v", name, f, err)
		}
		fi, err := f.Stat()
		if err != nil {
			return "", nil, err
		}
		if fi.Mode().IsRegular() {
			// Written at the offset of the shared open file description:
			// only the same description continues where the last
			// generation stopped.
			if _, err := fmt.Fprintf(f, "g%d;", gen); err != nil {
				return "", nil, err
			}
		} else {
			go func() {
				sc := bufio.NewScanner(f)
				for sc.Scan() {
					fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", sc.Text())
				}
			}()
		}
		c, sc, addr = f, f, "-"
	default:
		return "", nil, fmt.Errorf("unknown kind %q", sp.kind)
	}
	nonblock, ino, err := fdpassInspect(sc)
	if err != nil {
		c.Close()
		return "", nil, err
	}
	return strings.Join([]string{name, addr, strconv.FormatUint(ino, 10), strconv.FormatBool(nonblock)}, "|"), c, nil
}

// fdpassGreet greets every connection with pid, generation and name.
func fdpassGreet(ln net.Listener, gen int, name string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(c, "pid=%d gen=%d name=%s\n", os.Getpid(), gen, name)
		c.Close()
	}
}

// fdpassPathKind says what is at path: "sock", "gone" or something else.
func fdpassPathKind(path string) string {
	var st unix.Stat_t
	switch err := unix.Lstat(path, &st); {
	case err == unix.ENOENT:
		return "gone"
	case err != nil:
		return err.Error()
	case st.Mode&unix.S_IFMT == unix.S_IFSOCK:
		return "sock"
	}
	return fmt.Sprintf("mode%o", st.Mode)
}

type fdpassInherited struct {
	name string
	fd   int
	id   fdpassFD
}

// fdpassInheritedFDs lists the fds that LISTEN_FDS and LISTEN_FDNAMES named
// before the package's init, with what was at each then.
func fdpassInheritedFDs() []fdpassInherited {
	n, err := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs))
	if err != nil {
		return nil
	}
	names := strings.Split(fdpassAtInit.env.Get(envListenFDNames), ":")
	var out []fdpassInherited
	for i := 0; i < n && i < len(names); i++ {
		out = append(out, fdpassInherited{names[i], listenFDsStart + i, fdpassAtInit.fds[listenFDsStart+i]})
	}
	return out
}

// fdpassReportEnv reports what the role can observe of LISTEN_*: the
// environment execve passed (/proc/self/environ, which no later setenv or
// unsetenv changes), what Go code saw before the package's init, what main
// sees with os.LookupEnv and in os.Environ (what a child would inherit),
// the inodes of the fds at 3.. at initialisation, and whether
// FixupListenPID turns "auto" into this pid and leaves other values alone.
func fdpassReportEnv(gen int) {
	var environ []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LISTEN_") {
			environ = append(environ, kv)
		}
	}
	var inos []string
	n, _ := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs))
	for i := 0; i < n && i < 64; i++ {
		inos = append(inos, strconv.FormatUint(fdpassAtInit.fds[listenFDsStart+i].ino, 10))
	}
	fixup := "ok"
	if _, set := os.LookupEnv(envListenPID); set {
		fixup = "LISTEN_PID is still set in main"
	} else {
		os.Setenv(envListenPID, listenPIDAuto)
		FixupListenPID()
		if got := os.Getenv(envListenPID); got != strconv.Itoa(os.Getpid()) {
			fixup = "auto became " + got
		}
		os.Setenv(envListenPID, "1")
		FixupListenPID()
		if got := os.Getenv(envListenPID); got != "1" {
			fixup = "1 became " + got
		}
		os.Unsetenv(envListenPID)
	}
	fdpassSay("fdpass-env", "gen", strconv.Itoa(gen),
		"exec", fdpassAtInit.exec.Encode(),
		"init", fdpassAtInit.env.Encode(),
		"main", fdpassListenEnv(os.LookupEnv).Encode(),
		"environ", strings.Join(environ, "\n"),
		"initfds", strings.Join(inos, ","),
		"fixup", fixup)
}

// fdpassSock is one s<i> field of an fdpass-socks report.
type fdpassSock struct{ name, addr, ino, nonblock string }

func fdpassSocks(t *testing.T, rep map[string]string, n int) []fdpassSock {
	t.Helper()
	socks := make([]fdpassSock, n)
	for i := range socks {
		v := fdpassField(rep, "s"+strconv.Itoa(i))
		if v == "" {
			continue // not claimed by this generation
		}
		f := strings.Split(v, "|")
		if len(f) != 4 {
			t.Fatalf("bad socket description %q", v)
		}
		socks[i] = fdpassSock{f[0], f[1], f[2], f[3]}
	}
	return socks
}

// fdpassGreeting connects to a listener of role "fdpass" and returns what
// it says.
func fdpassGreeting(t *testing.T, network, addr string) string {
	t.Helper()
	s, err := fdpassTryGreeting(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func fdpassTryGreeting(network, addr string) (string, error) {
	c, err := net.DialTimeout(network, addr, testDeadline)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(testDeadline))
	b, err := io.ReadAll(c)
	return string(b), err
}

// fdpassWaitExit waits until pid has exited (reaped or not): a pidfd
// becomes readable then. Processes of later generations are not the
// test's children, so it cannot wait for them.
func fdpassWaitExit(t *testing.T, pid int) {
	t.Helper()
	pfd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return
	}
	if err != nil {
		t.Fatalf("pidfd_open(%d): %v", pid, err)
	}
	defer unix.Close(pfd)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, int(testDeadline/time.Millisecond))
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			t.Fatalf("pid %d still running after %v", pid, testDeadline)
		}
		return
	}
}

// fdpassWaitExited waits until the cluster's generation 0 has exited.
func fdpassWaitExited(t *testing.T, c *testCluster) {
	t.Helper()
	select {
	case <-c.exited:
	case <-time.After(testDeadline):
		t.Fatalf("generation 0 did not exit")
	}
}

// fdpassGorace is a GORACE setting for the processes these tests start: a
// race-enabled binary sleeps a second on exit by default (atexit_sleep_ms),
// and several tests wait for an old process to exit.
func fdpassGorace() string {
	return "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")
}

func fdpassHaveIPv6() (bool, error) {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false, err
	}
	ln.Close()
	return true, nil
}

// TestFDPassEveryKind passes every kind of fd through two real restarts:
// listeners (tcp, tcp4, tcp6, unix, unixpacket), packet conns (udp,
// unixgram), a connected TCP socket (Add/Conn), a fifo and a regular file
// (Add/File). Each generation must hold the same socket or open file (same
// inode, same address), under the same name, with Names() in the order of
// generation 0 although generation 1 claims in reverse order; sockets stay
// non-blocking; and what the test sends after a restart reaches the new
// process: a greeting from each listener, each datagram, data on the
// connection (and its answer back), a line in the fifo. Each generation
// appends to the regular file at the offset the last one left.
func TestFDPassEveryKind(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	peer, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	fifo := filepath.Join(c.dir, "pipe")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(c.dir, "file")
	specs := []fdpassSpec{
		{kind: "listen", name: "-", network: "tcp", address: "127.0.0.1:0"},
		{kind: "listen", name: "-", network: "tcp4", address: "127.0.0.1:0"},
		{kind: "listen", name: "-", network: "unix", address: filepath.Join(c.dir, "stream.sock")},
		{kind: "listen", name: "-", network: "unixpacket", address: filepath.Join(c.dir, "seqpacket.sock")},
		{kind: "packet", name: "-", network: "udp", address: "127.0.0.1:0"},
		{kind: "packet", name: "-", network: "unixgram", address: filepath.Join(c.dir, "dgram.sock")},
		{kind: "conn", name: "conn", network: "tcp", address: peer.Addr().String()},
		{kind: "file", name: "pipe", network: "fifo", address: fifo},
		{kind: "file", name: "file", network: "file", address: file},
	}
	ipv6, v6err := fdpassHaveIPv6()
	if ipv6 {
		specs = append(specs, fdpassSpec{kind: "listen", name: "-", network: "tcp6", address: "[::1]:0"})
	}
	var items []string
	for _, sp := range specs {
		items = append(items, sp.String())
	}
	r0 := c.start("fdpass", fdpassGorace(), envFDPassSpecs+"="+strings.Join(items, ","))
	s0 := c.reports.next("fdpass-socks")
	names0 := fdpassNames(fdpassField(s0, "names"))
	var want []string
	for _, sp := range specs {
		want = append(want, sp.regName())
	}
	if !slices.Equal(names0, want) {
		t.Fatalf("generation 0 registered %q, want %q", names0, want)
	}
	if inh := fdpassField(s0, "inherited"); inh != "" {
		t.Errorf("generation 0 inherited %q from nowhere", inh)
	}
	socks0 := fdpassSocks(t, s0, len(specs))
	for i, sp := range specs {
		if sp.kind != "file" && socks0[i].nonblock != "true" {
			// A blocking shared socket would also hang the old process's
			// retirement: stop here.
			t.Fatalf("generation 0 %s: the socket is in blocking mode once registered", sp)
		}
	}
	peer.(*net.TCPListener).SetDeadline(time.Now().Add(testDeadline))
	peerConn, err := peer.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peerConn.Close()
	peerConn.SetDeadline(time.Now().Add(testDeadline))
	peerLines := bufio.NewReader(peerConn)

	pid := r0["pid"]
	for gen := 1; gen <= 2; gen++ {
		ready := c.restart(pid)
		pid = ready["pid"]
		s := c.reports.next("fdpass-socks")
		if s["pid"] != pid {
			t.Fatalf("generation %d's sockets reported by pid %s, want %s", gen, s["pid"], pid)
		}
		if got := fdpassNames(fdpassField(s, "inherited")); !slices.Equal(got, names0) {
			t.Errorf("generation %d inherited names %q, want generation 0's %q in that order", gen, got, names0)
		}
		if got := fdpassNames(fdpassField(s, "names")); !slices.Equal(got, names0) {
			t.Errorf("generation %d's registry after claiming: %q, want %q", gen, got, names0)
		}
		socks := fdpassSocks(t, s, len(specs))
		for i, sp := range specs {
			got, was := socks[i], socks0[i]
			if got != (fdpassSock{was.name, was.addr, was.ino, got.nonblock}) {
				t.Errorf("generation %d %s: got %+v, generation 0 had %+v: not the same socket or file", gen, sp, got, was)
			}
			if sp.kind != "file" && got.nonblock != "true" {
				t.Errorf("generation %d %s: the shared socket is in blocking mode", gen, sp)
			}
		}
		// Generation gen-1 closed all it held before it reported that it was
		// replaced: from here on only generation gen can answer.
		for i, sp := range specs {
			addr := socks[i].addr
			switch sp.kind {
			case "listen":
				wantGreet := fmt.Sprintf("pid=%s gen=%d name=%s\n", pid, gen, sp.regName())
				if got := fdpassGreeting(t, sp.network, addr); got != wantGreet {
					t.Errorf("%s: greeted with %q, want %q", sp, got, wantGreet)
				}
			case "packet":
				pc, err := net.Dial(sp.network, addr)
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(pc, "ping%d", gen)
				pc.Close()
				fdpassWantRecv(t, c, pid, gen, sp.regName(), fmt.Sprintf("ping%d", gen))
			case "conn":
				fmt.Fprintf(peerConn, "ping%d\n", gen)
				fdpassWantRecv(t, c, pid, gen, sp.name, fmt.Sprintf("ping%d", gen))
				line, err := peerLines.ReadString('\n')
				if wantLine := fmt.Sprintf("pong pid=%s gen=%d\n", pid, gen); line != wantLine || err != nil {
					t.Errorf("answer on the passed connection: %q, %v; want %q", line, err, wantLine)
				}
			case "file":
				if sp.network != "fifo" {
					continue
				}
				// Readers hold the fifo open, so this open does not block.
				w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(w, "ping%d\n", gen)
				w.Close()
				fdpassWantRecv(t, c, pid, gen, sp.name, fmt.Sprintf("ping%d", gen))
			}
		}
	}
	if b, err := os.ReadFile(file); string(b) != "g0;g1;g2;" {
		t.Errorf("regular file holds %q, %v; want %q: every generation writes at the shared offset", b, err, "g0;g1;g2;")
	}
	if !ipv6 {
		t.Run("tcp6", func(t *testing.T) { t.Skipf("no IPv6 loopback on this machine (%v): tcp6 not tested", v6err) })
	}
}

// fdpassWantRecv waits for the report of data that reached pid.
func fdpassWantRecv(t *testing.T, c *testCluster, pid string, gen int, name, data string) {
	t.Helper()
	r := c.reports.next("fdpass-recv")
	if r["pid"] != pid || fdpassField(r, "gen") != strconv.Itoa(gen) || fdpassField(r, "name") != name || fdpassField(r, "data") != data {
		t.Errorf("received %v; want %q on %q by pid %s (generation %d)", r, data, name, pid, gen)
	}
}

// TestFDPassListenEnv checks LISTEN_* as a process started by a restart
// observes them:
//   - as execve passed them (/proc/self/environ): LISTEN_FDS the number of
//     fds, LISTEN_FDNAMES their names in the old process's Names() order,
//     joined by ':' (sd_listen_fds_with_names(3)), and LISTEN_PID either
//     this pid or "auto", the placeholder the library documents (the old
//     process cannot know the pid before the fork); never the old pid;
//   - the same in Go code that runs before the package's init;
//   - the fds at 3.. are the passed sockets and files, in that order;
//   - the package's init made LISTEN_PID this pid: the fds were adopted,
//     which takeListenFDs does only for LISTEN_PID == getpid(), and
//     FixupListenPID turns "auto" into this pid and leaves other pids alone;
//   - in main all three are unset (os.LookupEnv) and absent from
//     os.Environ(), so no child inherits them.
func TestFDPassListenEnv(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	specs := []string{
		"listen|-|tcp|127.0.0.1:0",
		"listen|-|unix|" + filepath.Join(c.dir, "l.sock"),
		"packet|-|udp|127.0.0.1:0",
		"file|state-file|file|" + filepath.Join(c.dir, "file"),
	}
	r0 := c.start("fdpass", fdpassGorace(), envFDPassSpecs+"="+strings.Join(specs, ","))
	e0 := c.reports.next("fdpass-env")
	for _, k := range []string{"exec", "init", "main", "environ"} {
		if v := fdpassField(e0, k); v != "" {
			t.Errorf("generation 0 (a fresh start) sees LISTEN_* %s: %q", k, v)
		}
	}
	names0 := fdpassNames(fdpassField(c.reports.next("fdpass-socks"), "names"))
	r1 := c.restart(r0["pid"])
	e1 := c.reports.next("fdpass-env")
	s1 := c.reports.next("fdpass-socks")
	if e1["pid"] != r1["pid"] || s1["pid"] != r1["pid"] {
		t.Fatalf("reports from pids %s and %s, want %s", e1["pid"], s1["pid"], r1["pid"])
	}
	atExec := fdpassValues(t, e1, "exec")
	if got := atExec.Get(envListenFDs); got != strconv.Itoa(len(names0)) {
		t.Errorf("LISTEN_FDS=%q at exec, want %d", got, len(names0))
	}
	if got := atExec.Get(envListenFDNames); got != strings.Join(names0, ":") {
		t.Errorf("LISTEN_FDNAMES=%q at exec, want %q", got, strings.Join(names0, ":"))
	}
	switch got := atExec.Get(envListenPID); got {
	case r1["pid"]:
	case listenPIDAuto:
		t.Logf("LISTEN_PID=%s at exec (systemd would put the pid there); the package's init replaces it", got)
	default:
		t.Errorf("LISTEN_PID=%q at exec, want %s or %q (old process: %s)", got, r1["pid"], listenPIDAuto, r0["pid"])
	}
	if init := fdpassValues(t, e1, "init"); init.Encode() != atExec.Encode() {
		t.Errorf("before the package's init Go code saw %q, execve passed %q", init.Encode(), atExec.Encode())
	}
	if got := fdpassNames(fdpassField(s1, "inherited")); !slices.Equal(got, names0) {
		t.Errorf("inherited %q: LISTEN_PID was not taken as this process's pid?", got)
	}
	socks := fdpassSocks(t, s1, len(specs))
	var wantInos []string
	for _, name := range names0 {
		for _, s := range socks {
			if s.name == name {
				wantInos = append(wantInos, s.ino)
			}
		}
	}
	if got := fdpassField(e1, "initfds"); got != strings.Join(wantInos, ",") {
		t.Errorf("inodes at fds 3.. at exec: %s, want the named fds' %s in LISTEN_FDNAMES order", got, strings.Join(wantInos, ","))
	}
	if got := fdpassField(e1, "main"); got != "" {
		t.Errorf("main sees LISTEN_* %q after the package's init", got)
	}
	if got := fdpassField(e1, "environ"); got != "" {
		t.Errorf("os.Environ() in main still has %q", got)
	}
	if got := fdpassField(e1, "fixup"); got != "ok" {
		t.Errorf("FixupListenPID: %s", got)
	}
}

// TestFDPassSocketActivation runs the role under the real
// systemd-socket-activate, which binds 127.0.0.1:PORT, waits for the first
// connection and execs the role with LISTEN_FDS=1, LISTEN_FDNAMES=web and
// LISTEN_PID set. The role claims "web" with ListenNamed and an address of
// "127.0.0.1:0", so a bind of its own would show as another port: its
// listener must be the socket at fd 3 (same inode) on PORT, and the first
// connection, queued before the role existed, gets its greeting. After a
// restart the new process has the same socket under the same name and
// serves it.
func TestFDPassSocketActivation(t *testing.T) {
	t.Parallel()
	ssa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skipf("systemd-socket-activate not found (%v); install systemd to run this test (CI does)", err)
	}
	c := newTestCluster(t)
	cmd, port := fdpassStartActivator(t, c, ssa)
	addr := "127.0.0.1:" + strconv.Itoa(port)

	// The first connection activates the service. A failure here is only
	// reported: the role's reports below say more about what went wrong.
	greet, err := fdpassTryGreeting("tcp", addr)
	if want := fmt.Sprintf("pid=%d gen=0 name=web\n", cmd.Process.Pid); greet != want || err != nil {
		t.Errorf("first connection greeted with %q, %v; want %q", greet, err, want)
	}
	c.reports.next("started")
	e0 := c.reports.next("fdpass-env")
	s0 := c.reports.next("fdpass-socks")
	r0 := c.reports.next("ready")
	if r0["pid"] != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("ready report from pid %s, systemd-socket-activate's pid is %d", r0["pid"], cmd.Process.Pid)
	}
	atExec := fdpassValues(t, e0, "exec")
	want := url.Values{envListenFDs: {"1"}, envListenFDNames: {"web"}, envListenPID: {r0["pid"]}}
	if atExec.Encode() != want.Encode() {
		t.Errorf("systemd-socket-activate passed %q, want %q", atExec.Encode(), want.Encode())
	}
	if got := fdpassField(e0, "main"); got != "" {
		t.Errorf("main sees LISTEN_* %q after the package's init", got)
	}
	if got := fdpassField(s0, "inherited"); got != "web" {
		t.Errorf("registry at start: %q, want \"web\"", got)
	}
	sock0 := fdpassSocks(t, s0, 1)[0]
	if sock0.addr != addr {
		t.Errorf("the role listens on %s, systemd-socket-activate bound %s", sock0.addr, addr)
	}
	if initIno := fdpassField(e0, "initfds"); sock0.ino != initIno {
		t.Errorf("the role's listener is inode %s, fd 3 from systemd-socket-activate was %s", sock0.ino, initIno)
	}

	r1 := c.restart(r0["pid"])
	s1 := c.reports.next("fdpass-socks")
	if got := fdpassField(s1, "inherited"); got != "web" {
		t.Errorf("new process inherited %q, want \"web\"", got)
	}
	if sock1 := fdpassSocks(t, s1, 1)[0]; sock1 != sock0 {
		t.Errorf("new process holds %+v, the activated one held %+v", sock1, sock0)
	}
	if greet := fdpassGreeting(t, "tcp", addr); greet != fmt.Sprintf("pid=%s gen=1 name=web\n", r1["pid"]) {
		t.Errorf("after the restart greeted with %q, want generation 1 (pid %s)", greet, r1["pid"])
	}
}

// fdpassStartActivator starts systemd-socket-activate on a free port with
// role "fdpass" claiming "web", and waits until it listens (it says so on
// stderr). A port taken between choosing and binding is retried.
func fdpassStartActivator(t *testing.T, c *testCluster, ssa string) (*exec.Cmd, int) {
	t.Helper()
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		listen := "127.0.0.1:" + strconv.Itoa(port)
		cmd := exec.Command(ssa, "-l", listen, "--fdname=web",
			// systemd-socket-activate passes only TERM, PATH, USER, HOME
			// and these to the program.
			"-E", envTestRole+"=fdpass",
			"-E", envTestReport+"="+c.reports.path,
			"-E", envTestSocket+"="+c.socket,
			"-E", envFDPassSpecs+"=listen|web|tcp|127.0.0.1:0",
			"-E", fdpassGorace(),
			os.Args[0], "-test.run=^$")
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = os.Stderr, w
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		c.track(cmd.Process.Pid)
		// Lines go to the loop below until it found what it waits for, and
		// on to our stderr after that: the role inherits this pipe as its
		// stderr and must never block on it.
		lines, found := make(chan string), make(chan struct{})
		go func() {
			defer r.Close()
			br := bufio.NewReader(r)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					close(lines)
					return
				}
				select {
				case lines <- line:
				case <-found:
					os.Stderr.WriteString(line)
				}
			}
		}()
		var said []string
		timeout := time.After(testDeadline)
	wait:
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					break wait
				}
				said = append(said, line)
				if strings.HasPrefix(line, "Listening on "+listen) {
					close(found)
					go func() {
						cmd.Wait()
						close(c.exited)
					}()
					return cmd, port
				}
			case <-timeout:
				t.Fatalf("systemd-socket-activate did not say it listens: %q", said)
			}
		}
		cmd.Wait()
		if attempt == 2 {
			t.Fatalf("systemd-socket-activate failed: %q", said)
		}
	}
}

// TestFDPassUnclaimed: a process started by a restart inherits five
// listeners and claims two (a tcp and a unix one). Before Ready every
// inherited fd is still open, so a program may claim late; after Ready the
// unclaimed fd numbers are closed and the claimed ones stay, the unclaimed
// unix listener's socket file is unlinked and the claimed one's is kept.
// The abstract listener has no file: nothing is unlinked for it, not even
// a file named like it in the working directory. Once the old process has
// exited too, the unclaimed tcp port and the abstract name refuse
// connections; the claimed listeners serve.
func TestFDPassUnclaimed(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	abstract := fmt.Sprintf("@shellflip-fdpass-%d-%d", os.Getpid(), time.Now().UnixNano())
	// A socket file named like the abstract socket, in the role's working
	// directory: what a relative unlink of the abstract name would hit.
	decoyPath := filepath.Join(c.dir, abstract)
	decoy, err := net.Listen("unix", decoyPath)
	if err != nil {
		t.Fatal(err)
	}
	defer decoy.Close()
	specs := []fdpassSpec{
		{kind: "listen", name: "keep", network: "tcp", address: "127.0.0.1:0"},
		{kind: "listen", name: "drop", network: "tcp", address: "127.0.0.1:0", firstOnly: true},
		{kind: "listen", name: "keepunix", network: "unix", address: filepath.Join(c.dir, "keep.sock")},
		{kind: "listen", name: "dropunix", network: "unix", address: filepath.Join(c.dir, "drop.sock"), firstOnly: true},
		{kind: "listen", name: "dropabstract", network: "unix", address: abstract, firstOnly: true},
	}
	var items []string
	for _, sp := range specs {
		items = append(items, sp.String())
	}
	r0 := c.start("fdpass", fdpassGorace(), envFDPassSpecs+"="+strings.Join(items, ","), envFDPassDir+"="+c.dir)
	socks0 := fdpassSocks(t, c.reports.next("fdpass-socks"), len(specs))
	r1 := c.restart(r0["pid"])
	inh := c.reports.next("fdpass-inherited")
	if inh["pid"] != r1["pid"] {
		t.Fatalf("inherited fds reported by %s, want %s", inh["pid"], r1["pid"])
	}
	before, after := fdpassValues(t, inh, "before"), fdpassValues(t, inh, "after")
	for _, sp := range specs {
		if got := before.Get(sp.name); got != "same" {
			t.Errorf("%s: before Ready the inherited fd is %q, want it open (same socket)", sp.name, got)
		}
		want := "same"
		if sp.firstOnly {
			want = "closed"
		}
		if got := after.Get(sp.name); got != want {
			t.Errorf("%s: after Ready the inherited fd is %q, want %q", sp.name, got, want)
		}
	}
	paths := fdpassValues(t, c.reports.next("fdpass-paths"), "paths")
	if got := paths.Get("s2"); got != "sock,sock" {
		t.Errorf("claimed unix listener's file before,after Ready: %s, want sock,sock", got)
	}
	if got := paths.Get("s3"); got != "sock,gone" {
		t.Errorf("unclaimed unix listener's file before,after Ready: %s, want sock,gone", got)
	}
	if names := fdpassNames(fdpassField(r1, "names")); !slices.Equal(names, []string{"keep", "keepunix"}) {
		t.Errorf("registry after Ready: %q, want only the claimed names", names)
	}
	if got := fdpassPathKind(decoyPath); got != "sock" {
		t.Errorf("the file named like the abstract socket is %s after Ready: unlinked for an abstract listener", got)
	}

	fdpassWaitExited(t, c)
	for _, i := range []int{1, 4} {
		conn, err := net.DialTimeout(specs[i].network, socks0[i].addr, testDeadline)
		if err == nil {
			conn.Close()
			t.Errorf("%s (%s) still accepts connections after both processes let go of it", specs[i].name, socks0[i].addr)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %v, want connection refused", specs[i].name, err)
		}
	}
	for _, i := range []int{0, 2} {
		want := fmt.Sprintf("pid=%s gen=1 name=%s\n", r1["pid"], specs[i].name)
		if got := fdpassGreeting(t, specs[i].network, socks0[i].addr); got != want {
			t.Errorf("%s greeted with %q, want %q", specs[i].name, got, want)
		}
	}
}

// TestFDPassOldKeepsSocketFile: the old process closes its unix listeners
// (stream, seqpacket, datagram) on its way out and exits; the socket files
// stay, and the new process still serves on them.
func TestFDPassOldKeepsSocketFile(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	stream, seq, dgram := filepath.Join(c.dir, "s.sock"), filepath.Join(c.dir, "q.sock"), filepath.Join(c.dir, "d.sock")
	r0 := c.start("fdpass", fdpassGorace(), envFDPassSpecs+"=listen|-|unix|"+stream+",listen|-|unixpacket|"+seq+",packet|-|unixgram|"+dgram)
	r1 := c.restart(r0["pid"])
	// The old process closed its listeners before it reported "replaced".
	fdpassWaitExited(t, c)
	for _, p := range []string{stream, seq, dgram} {
		if got := fdpassPathKind(p); got != "sock" {
			t.Errorf("%s is %s after the old process closed its listener and exited", p, got)
		}
	}
	if got, want := fdpassGreeting(t, "unix", stream), fmt.Sprintf("pid=%s gen=1 name=%s\n", r1["pid"], ListenerName("unix", stream)); got != want {
		t.Errorf("unix listener greeted with %q, want %q", got, want)
	}
	if got, want := fdpassGreeting(t, "unixpacket", seq), fmt.Sprintf("pid=%s gen=1 name=%s\n", r1["pid"], ListenerName("unixpacket", seq)); got != want {
		t.Errorf("unixpacket listener greeted with %q, want %q", got, want)
	}
	pc, err := net.Dial("unixgram", dgram)
	if err != nil {
		t.Fatal(err)
	}
	pc.Write([]byte("ping"))
	pc.Close()
	fdpassWantRecv(t, c, r1["pid"], 1, ListenerName("unixgram", dgram), "ping")
}

// TestFDPassDynamicPorts: generation 0 of the "server" role binds
// 127.0.0.1:0 for tcp and udp; generations 1 and 2 inherit the same ports
// (the name is the address as written, not the port the kernel chose), and
// generation 2 serves on it.
func TestFDPassDynamicPorts(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	r0 := c.start("server", fdpassGorace(), envTestListen+"=tcp=127.0.0.1:0,udp=127.0.0.1:0")
	addrs := r0["addrs"]
	for _, a := range strings.Split(addrs, ",") {
		if strings.HasSuffix(a, ":0") || !strings.Contains(a, "127.0.0.1:") {
			t.Fatalf("generation 0 listens on %q", addrs)
		}
	}
	r1 := c.restart(r0["pid"])
	r2 := c.restart(r1["pid"])
	if r1["addrs"] != addrs || r2["addrs"] != addrs {
		t.Errorf("addresses by generation: %s, %s, %s; want the same ports in all", addrs, r1["addrs"], r2["addrs"])
	}
	// The server role keeps accepting until it exits: wait for both old
	// generations, so that only generation 2 can answer.
	fdpassWaitExited(t, c)
	p1, _ := strconv.Atoi(r1["pid"])
	fdpassWaitExit(t, p1)
	tcp := strings.TrimPrefix(strings.Split(addrs, ",")[0], "tcp=")
	if got, want := fdpassGreeting(t, "tcp", tcp), fmt.Sprintf("pid=%s gen=2\n", r2["pid"]); got != want {
		t.Errorf("greeted with %q, want %q", got, want)
	}
}

// fdpassOverlapRole holds a tcp listener and a udp socket. Generation 0
// serves the listener before, during and after the restart, until a client
// says "bye"; every greeting carries O_NONBLOCK of both shared sockets at
// that moment. Later generations claim both, report their flags, wait for
// a line on the hold fifo, become ready, and never accept: whatever is
// accepted is accepted by generation 0.
func fdpassOverlapRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	ln, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen: %v", err)
	}
	pc, err := ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen packet: %v", err)
	}
	flags := func() string {
		a, _, err1 := fdpassInspect(ln.(syscall.Conn))
		b, _, err2 := fdpassInspect(pc.(syscall.Conn))
		if err := errors.Join(err1, err2); err != nil {
			return err.Error()
		}
		return fmt.Sprintf("%t,%t", a, b)
	}
	bye := make(chan struct{})
	if gen == 0 {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "pid=%d nonblock=%s\n", os.Getpid(), flags())
				c.SetReadDeadline(time.Now().Add(testDeadline))
				line, _ := bufio.NewReader(c).ReadString('\n')
				c.Close()
				if line == "bye\n" {
					close(bye)
					return
				}
			}
		}()
	} else {
		fdpassSay("fdpass-claimed", "gen", strconv.Itoa(gen), "nonblock", flags(), "addr", ln.Addr().String())
		f, err := os.Open(os.Getenv(envFDPassHold))
		if err != nil {
			return fdpassFail("hold: %v", err)
		}
		bufio.NewReader(f).ReadString('\n')
		f.Close()
	}
	return fdpassServe(gen, fdpassTail{
		ready: func() []string { return []string{"nonblock", flags(), "tcp", ln.Addr().String()} },
		linger: func() {
			if gen > 0 {
				return
			}
			select {
			case <-bye:
			case <-time.After(testDeadline):
			}
		},
	})
}

// TestFDPassNonblockOverlap: the inherited sockets keep O_NONBLOCK, checked
// with fcntl(F_GETFL) on the shared open file description from both sides,
// and the old process's listener keeps working while the new process holds
// it before Ready and after the handover, until the old process stops.
func TestFDPassNonblockOverlap(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	hold := filepath.Join(c.dir, "hold")
	if err := unix.Mkfifo(hold, 0o600); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("fdpass-overlap", fdpassGorace(), envFDPassHold+"="+hold)
	oldPid, addr := r0["pid"], fdpassField(r0, "tcp")
	talk := func(when, say string) {
		t.Helper()
		conn, err := net.DialTimeout("tcp", addr, testDeadline)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(testDeadline))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if want := fmt.Sprintf("pid=%s nonblock=true,true\n", oldPid); line != want || err != nil {
			t.Errorf("%s: old process said %q, %v; want %q", when, line, err, want)
		}
		fmt.Fprintf(conn, "%s\n", say)
	}
	talk("before the restart", "next")

	type result struct {
		pid int
		err error
	}
	res := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		pid, err := RequestRestart(ctx, c.socket)
		res <- result{pid, err}
	}()
	claimed := c.reports.next("fdpass-claimed")
	np, _ := strconv.Atoi(claimed["pid"])
	c.track(np)
	if got := fdpassField(claimed, "nonblock"); got != "true,true" {
		t.Errorf("new process, after claiming: O_NONBLOCK of listener,udp = %s", got)
	}
	talk("while the new process holds the listener", "next")

	f, err := os.OpenFile(hold, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("go\n")
	f.Close()
	r := <-res
	if r.err != nil {
		t.Fatalf("RequestRestart: %v", r.err)
	}
	ready := c.reports.next("ready")
	if ready["pid"] != strconv.Itoa(r.pid) || ready["pid"] != claimed["pid"] || fdpassField(ready, "tcp") != addr {
		t.Fatalf("ready report %v, restart says pid %d", ready, r.pid)
	}
	if got := fdpassField(ready, "nonblock"); got != "true,true" {
		t.Errorf("new process, after Ready: O_NONBLOCK of listener,udp = %s", got)
	}
	if repl := c.reports.next("replaced"); repl["pid"] != oldPid {
		t.Fatalf("replaced report %v", repl)
	}
	talk("after the handover", "bye")
	fdpassWaitExited(t, c)
}

// fdpassHookRole creates a tcp listener and a udp socket with a
// ListenConfig whose Control hook sets SO_REUSEPORT in generation 0 and
// fails in later ones, and reports how often the hook ran, SO_REUSEPORT on
// each socket and the addresses and inodes.
func fdpassHookRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	var calls atomic.Int32
	lc := &net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		calls.Add(1)
		if gen > 0 {
			return errors.New("Control hook called for an inherited socket")
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := ListenNamed("hook-tcp", lc, "tcp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen: %v", err)
	}
	pc, err := ListenPacketNamed("hook-udp", lc, "udp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen packet: %v", err)
	}
	reuse := func(c syscall.Conn) string {
		rc, _ := c.SyscallConn()
		v, gerr := -1, error(nil)
		rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT) })
		if gerr != nil {
			return gerr.Error()
		}
		return strconv.Itoa(v)
	}
	_, tino, _ := fdpassInspect(ln.(syscall.Conn))
	_, uino, _ := fdpassInspect(pc.(syscall.Conn))
	return fdpassServe(gen, fdpassTail{
		ready: func() []string {
			return []string{
				"calls", strconv.Itoa(int(calls.Load())),
				"tcp", ln.Addr().String(), "udp", pc.LocalAddr().String(),
				"tcpreuse", reuse(ln.(syscall.Conn)), "udpreuse", reuse(pc.(syscall.Conn)),
				"tcpino", strconv.FormatUint(tino, 10), "udpino", strconv.FormatUint(uino, 10),
			}
		},
		retire: func() { ln.Close(); pc.Close() },
	})
}

// TestFDPassControlHook: a ListenConfig's Control hook runs once per socket
// created (SO_REUSEPORT set, as getsockopt and the kernel see it: another
// socket with SO_REUSEPORT binds the same port, one without does not), and
// is not run for an inherited socket, which keeps the option.
func TestFDPassControlHook(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	r0 := c.start("fdpass-hook", fdpassGorace())
	if got := fdpassField(r0, "calls"); got != "2" {
		t.Errorf("generation 0 ran the Control hook %s times, want 2 (one per socket)", got)
	}
	r1 := c.restart(r0["pid"])
	if got := fdpassField(r1, "calls"); got != "0" {
		t.Errorf("generation 1 ran the Control hook %s times for inherited sockets, want 0", got)
	}
	for _, k := range []string{"tcp", "udp", "tcpino", "udpino"} {
		if fdpassField(r1, k) != fdpassField(r0, k) {
			t.Errorf("%s: generation 0 had %s, generation 1 has %s", k, fdpassField(r0, k), fdpassField(r1, k))
		}
	}
	for _, r := range []map[string]string{r0, r1} {
		if fdpassField(r, "tcpreuse") != "1" || fdpassField(r, "udpreuse") != "1" {
			t.Errorf("pid %s: SO_REUSEPORT tcp=%s udp=%s, want 1", r["pid"], fdpassField(r, "tcpreuse"), fdpassField(r, "udpreuse"))
		}
	}
	reusePort := &net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return serr
	}}
	ctx := context.Background()
	if l, err := reusePort.Listen(ctx, "tcp", fdpassField(r1, "tcp")); err != nil {
		t.Errorf("binding the inherited tcp port with SO_REUSEPORT: %v", err)
	} else {
		l.Close()
	}
	if l, err := reusePort.ListenPacket(ctx, "udp", fdpassField(r1, "udp")); err != nil {
		t.Errorf("binding the inherited udp port with SO_REUSEPORT: %v", err)
	} else {
		l.Close()
	}
	if l, err := net.Listen("tcp", fdpassField(r1, "tcp")); err == nil {
		l.Close()
		t.Errorf("bound the inherited tcp port without SO_REUSEPORT: it is not held")
	}
}

// fdpassManyRole: generation 0 registers fdpassManyN abstract unix
// listeners under names many0000...; later generations check that they
// inherited all of them, in order, each name on the socket that was bound
// under it and at fd 3+i, and report the count and the first mismatch.
func fdpassManyRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	// Generation 0 holds fdpassManyN registry fds; a later one as many
	// inherited ones plus a transient duplicate per claim. Go raises the
	// soft limit to the hard one at startup; do it here in any case, as a
	// program that passes this many fds must.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fdpassFail("getrlimit: %v", err)
	}
	if need := uint64(2*fdpassManyN + 100); lim.Cur < need {
		lim.Cur = min(need, lim.Max)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fdpassFail("setrlimit: %v", err)
		}
	}
	tag := os.Getenv(envFDPassTag)
	name := func(i int) string { return fmt.Sprintf("many%04d", i) }
	addr := func(i int) string { return fmt.Sprintf("@%s-%04d", tag, i) }
	bad := ""
	names := Names()
	if gen > 0 && len(names) != fdpassManyN {
		bad = fmt.Sprintf("inherited %d names", len(names))
	}
	for i := 0; i < fdpassManyN && bad == ""; i++ {
		if gen > 0 && names[i] != name(i) {
			bad = fmt.Sprintf("name %d is %q", i, names[i])
			break
		}
		ln, err := ListenNamed(name(i), nil, "unix", addr(i))
		if err != nil {
			bad = fmt.Sprintf("%s: %v", name(i), err)
			break
		}
		if got := ln.Addr().String(); got != addr(i) {
			bad = fmt.Sprintf("%s is bound to %s, want %s", name(i), got, addr(i))
		}
		_, ino, err := fdpassInspect(ln.(syscall.Conn))
		if gen > 0 && (err != nil || ino != fdpassAtInit.fds[listenFDsStart+i].ino) {
			bad = fmt.Sprintf("%s is inode %d, fd %d was %d (%v)", name(i), ino, listenFDsStart+i, fdpassAtInit.fds[listenFDsStart+i].ino, err)
		}
		// The registry keeps its own copy listening; the program's may go.
		ln.Close()
	}
	return fdpassServe(gen, fdpassTail{
		ready: func() []string { return []string{"n", strconv.Itoa(len(Names())), "bad", bad} },
	})
}

// TestFDPassThousand: 1000 listeners pass through a restart, each under its
// name, in order, at fd 3+i, and still listening once the old process is
// gone.
func TestFDPassThousand(t *testing.T) {
	t.Parallel()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if need := uint64(2*fdpassManyN + 100); lim.Max < need {
		t.Skipf("RLIMIT_NOFILE hard limit %d is below the %d fds this test needs", lim.Max, need)
	}
	c := newTestCluster(t)
	tag := fmt.Sprintf("shellflip-fdpass-many-%d-%d", os.Getpid(), time.Now().UnixNano())
	r0 := c.start("fdpass-many", fdpassGorace(), envFDPassTag+"="+tag)
	if fdpassField(r0, "n") != strconv.Itoa(fdpassManyN) || fdpassField(r0, "bad") != "" {
		t.Fatalf("generation 0: %d names, problem %q", fdpassManyN, fdpassField(r0, "bad"))
	}
	r1 := c.restart(r0["pid"])
	if n, bad := fdpassField(r1, "n"), fdpassField(r1, "bad"); n != strconv.Itoa(fdpassManyN) || bad != "" {
		t.Fatalf("generation 1: %s names, problem %q", n, bad)
	}
	fdpassWaitExited(t, c)
	for _, i := range []int{0, fdpassManyN / 2, fdpassManyN - 1} {
		conn, err := net.DialTimeout("unix", fmt.Sprintf("@%s-%04d", tag, i), testDeadline)
		if err != nil {
			t.Errorf("listener %d after the old process exited: %v", i, err)
			continue
		}
		conn.Close()
	}
}

// fdpassHostileRole runs in a process whose LISTEN_* the test made up. It
// reports what the package's init made of them: the registry, the
// variables in main, each fd's state (fds open at initialisation and those
// LISTEN_FDS names), claims by name, Start's error, each fd's state after
// Ready, and whether a fresh Listen works.
func fdpassHostileRole() int {
	v := url.Values{}
	v.Set("names", strings.Join(Names(), ":"))
	v.Set("main", fdpassListenEnv(os.LookupEnv).Encode())
	fds := map[int]fdpassFD{}
	for fd, id := range fdpassAtInit.fds {
		fds[fd] = id
	}
	if n, err := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs)); err == nil {
		for i := 0; i < n && i < 64; i++ {
			if _, ok := fds[listenFDsStart+i]; !ok {
				fds[listenFDsStart+i] = fdpassFD{target: "closed"}
			}
		}
	}
	state := map[int]string{}
	for fd, id := range fds {
		cloexec := "-"
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			cloexec = strconv.FormatBool(fl&unix.FD_CLOEXEC != 0)
		}
		state[fd] = id.target + "|" + strconv.FormatBool(id.cloexec) + "|" + id.state(fd) + "|" + cloexec
	}
	for i, name := range strings.Split(os.Getenv(envFDPassClaim), ",") {
		if name == "" {
			continue
		}
		ln, err := ListenNamed(name, nil, "tcp", "127.0.0.1:0")
		if err != nil {
			v.Set("claim"+strconv.Itoa(i), "error: "+err.Error())
			continue
		}
		_, ino, _ := fdpassInspect(ln.(syscall.Conn))
		v.Set("claim"+strconv.Itoa(i), fmt.Sprintf("socket:[%d]", ino))
		ln.Close()
	}
	r, err := Start(context.Background(), Config{})
	for fd, id := range fds {
		v.Set("fd"+strconv.Itoa(fd), state[fd]+"|"+id.state(fd))
	}
	if err != nil {
		v.Set("start", err.Error())
	} else {
		r.Stop()
	}
	ln, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		v.Set("listen", err.Error())
	} else {
		ln.Close()
		v.Set("listen", "ok")
	}
	fdpassSay("fdpass-hostile", "v", v.Encode())
	return 0
}

// TestFDPassHostileEnv starts fresh processes with made-up LISTEN_*
// environments, never the test process itself: the package's init there
// closes fds 3.. that it refuses. LISTEN_PID is the real pid (set by a
// shell that then execs the test binary, as systemd sets it before exec)
// unless the case says otherwise. Each case must give its error from Start
// (or none, if it is acceptable or ignored), no panic, and no leak: a
// refused fd is closed, an adopted one is close-on-exec and, unclaimed,
// closed at Ready; an ignored one is left alone, as are the variables.
// Fds that the test did not pass (the Go runtime's own, opened
// close-on-exec at the lowest free numbers before package initialisation)
// must be untouched whatever LISTEN_FDS says.
//
// Also observed, and kept as the cases' expectations: an empty name is a
// name (systemd allows it); duplicate names are kept, as a socket unit with
// two Listen lines and one FileDescriptorName gives them, but ListenNamed
// returns the first fd every time and the second, unreachable, is closed
// at Ready; a LISTEN_FDS that is not a count is an error whose fds are left
// open, not close-on-exec, as sd_listen_fds(3) leaves them; a LISTEN_PID
// that is not a number is taken as another process's.
func TestFDPassHostileEnv(t *testing.T) {
	t.Parallel()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skipf("no sh to set LISTEN_PID to the pid before exec: %v", err)
	}
	long := strings.Repeat("x", 256)
	for _, tc := range []struct {
		name   string
		pass   int               // sockets passed at fds 3..
		env    map[string]string // LISTEN_PID: "self" unless set
		claim  string
		err    string   // "" for no error
		names  []string // the registry at main
		fdMain string   // the passed fds in main: refused, adopted, ignored
		fdEnd  []string // the passed fds after Ready: same or closed
		kept   bool     // the variables are left in the environment
	}{
		{name: "names fewer than fds", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "a"},
			err: "names 1 fds, $LISTEN_FDS says 2", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "names more than fds", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "a:b"},
			err: "names 2 fds, $LISTEN_FDS says 1", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "trailing colon", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "a:b:"},
			err: "names 3 fds, $LISTEN_FDS says 2", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "control character", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "a\tb"},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "not ASCII", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "caf\u00e9"},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "name too long", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "ok:" + long},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "empty names", pass: 3, env: map[string]string{envListenFDs: "3", envListenFDNames: "a::b"}, claim: "a",
			names: []string{"a", "", "b"}, fdMain: "adopted", fdEnd: []string{"same", "closed", "closed"}},
		{name: "no names", pass: 1, env: map[string]string{envListenFDs: "1"}, claim: "unknown",
			names: []string{"unknown"}, fdMain: "adopted", fdEnd: []string{"same"}},
		{name: "duplicate names", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "dup:dup"}, claim: "dup,dup",
			names: []string{"dup", "dup"}, fdMain: "adopted", fdEnd: []string{"same", "closed"}},
		{name: "closed fd", pass: 1, env: map[string]string{envListenFDs: "2", envListenFDNames: "a:b"},
			err: "fd 4", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "closed fds", pass: 1, env: map[string]string{envListenFDs: "12"},
			err: "LISTEN_FDS=12", fdMain: "refused", fdEnd: []string{"closed"}},
		// The same where a package opened a file in its init, before this
		// package's: the runtime's poller fds are in the range too.
		{name: "closed fds after an early open", pass: 1, env: map[string]string{envListenFDs: "12", envFDPassOpenEarly: "1"},
			err: "LISTEN_FDS=12", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "count not a number", pass: 1, env: map[string]string{envListenFDs: "1x", envListenFDNames: "a"},
			err: "is not a count of fds", fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "count too large", pass: 1, env: map[string]string{envListenFDs: "70000"},
			err: "is not a count of fds", fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "zero fds", env: map[string]string{envListenFDs: "0"}},
		{name: "names without fds", pass: 1, env: map[string]string{envListenFDNames: "a"},
			fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "other pid", pass: 1, env: map[string]string{envListenPID: strconv.Itoa(os.Getpid()), envListenFDs: "1", envListenFDNames: "x"}, claim: "x",
			fdMain: "ignored", fdEnd: []string{"same"}, kept: true},
		{name: "pid not a number", pass: 1, env: map[string]string{envListenPID: "1x", envListenFDs: "1", envListenFDNames: "x"},
			fdMain: "ignored", fdEnd: []string{"same"}, kept: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fdpassHostileCase(t, sh, tc.pass, tc.env, tc.claim, tc.err, tc.names, tc.fdMain, tc.fdEnd, tc.kept)
		})
	}
}

func fdpassHostileCase(t *testing.T, sh string, pass int, env map[string]string, claim, wantErr string,
	wantNames []string, fdMain string, fdEnd []string, kept bool) {
	dir := t.TempDir()
	reports := newTestReports(t, dir)
	var files []*os.File
	inos := map[string]int{} // "socket:[ino]" -> fd in the child
	for i := 0; i < pass; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f, err := ln.(*net.TCPListener).File()
		ln.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		inos[fmt.Sprintf("socket:[%d]", fi.Sys().(*syscall.Stat_t).Ino)] = listenFDsStart + i
		files = append(files, f)
	}
	var cmdEnv []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); !strings.HasPrefix(k, "LISTEN_") && k != "NOTIFY_SOCKET" &&
			!(strings.HasPrefix(k, "SHELLFLIP_") && !strings.HasPrefix(k, "SHELLFLIP_TEST_")) {
			cmdEnv = append(cmdEnv, kv)
		}
	}
	cmdEnv = append(cmdEnv, envTestRole+"=fdpass-hostile", envTestReport+"="+reports.path, envFDPassClaim+"="+claim, fdpassGorace())
	for k, v := range env {
		cmdEnv = append(cmdEnv, k+"="+v)
	}
	var cmd *exec.Cmd
	if _, ok := env[envListenPID]; ok {
		cmd = exec.Command(os.Args[0], "-test.run=^$")
	} else {
		// The shell's pid is the test binary's after exec.
		cmd = exec.Command(sh, "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" -test.run=^$`, os.Args[0])
	}
	cmd.Env = cmdEnv
	cmd.ExtraFiles = files
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	out := strings.SplitAfterN(stderr.String(), "\n", 12)
	errOut := strings.Join(out[:min(len(out), 11)], "")
	if err != nil || strings.Contains(stderr.String(), "panic") || strings.Contains(stderr.String(), "fatal error") {
		t.Fatalf("the process with this environment crashed: %v\n%s", err, errOut)
	}
	// The process has exited: its report, if it sent one, is queued
	// already, so a short deadline only bounds the failure case.
	var line string
	select {
	case line = <-reports.lines:
	case <-time.After(time.Second):
	}
	if line == "" {
		t.Fatalf("the process with this environment exited without a report; its stderr:\n%s", errOut)
	}
	v := fdpassValues(t, parseReport(line), "v")
	t.Logf("report: %v", v)

	if got := v.Get("start"); wantErr == "" && got != "" || wantErr != "" && !strings.Contains(got, wantErr) {
		t.Errorf("Start error %q, want one containing %q", got, wantErr)
	}
	if got := fdpassNames(v.Get("names")); !slices.Equal(got, wantNames) {
		t.Errorf("registry %q, want %q", got, wantNames)
	}
	main, err := url.ParseQuery(v.Get("main"))
	if err != nil {
		t.Fatal(err)
	}
	for k, val := range env {
		if kept && strings.HasPrefix(k, "LISTEN_") && main.Get(k) != val {
			t.Errorf("%s in main is %q, want it left alone (%q)", k, main.Get(k), val)
		}
	}
	if !kept && len(main) != 0 {
		t.Errorf("LISTEN_* in main: %q, want them removed", main.Encode())
	}
	if v.Get("listen") != "ok" {
		t.Errorf("Listen after Start: %s", v.Get("listen"))
	}
	// Every fd of the child: fd<N> = target at init|close-on-exec at
	// init|state in main|close-on-exec in main|state after Ready.
	for key := range v {
		if !strings.HasPrefix(key, "fd") {
			continue
		}
		fd, _ := strconv.Atoi(key[2:])
		f := strings.Split(v.Get(key), "|")
		if len(f) != 5 {
			t.Fatalf("%s=%q", key, v.Get(key))
		}
		target, initCloexec, inMain, cloexec, end := f[0], f[1], f[2], f[3], f[4]
		passed := fd >= listenFDsStart && fd < listenFDsStart+pass
		switch {
		case target == "closed":
			// Named by LISTEN_FDS but not open at initialisation.
		case !passed && initCloexec == "false":
			// Inherited from whatever started the test: not ours to
			// judge (LISTEN_FDS may name it).
		case !passed:
			if inMain != "same" || end != "same" {
				t.Errorf("fd %d (%s) was not passed, but was %s after the package's init and %s after Ready: the library closed an fd it does not own",
					fd, target, inMain, end)
			}
		default:
			if inos[target] != fd {
				t.Fatalf("fd %d at init is %s, not the socket passed there", fd, target)
			}
			want := map[string]string{"refused": "closed|-", "adopted": "same|true", "ignored": "same|false"}[fdMain]
			if got := inMain + "|" + cloexec; got != want {
				t.Errorf("fd %d in main: %s (state|close-on-exec), want %s (%s)", fd, got, want, fdMain)
			}
			if w := fdEnd[fd-listenFDsStart]; end != w {
				t.Errorf("fd %d after Ready: %s, want %s", fd, end, w)
			}
			if fdMain == "ignored" && cloexec == "false" && wantErr != "" {
				t.Logf("fd %d stays open without close-on-exec: LISTEN_FDS is not a count, so nothing says which fds were meant (sd_listen_fds(3) leaves them too)", fd)
			}
		}
	}
	for key, val := range v {
		if strings.HasPrefix(key, "claim") {
			t.Logf("ListenNamed claim %s: %s (passed sockets: %v)", key, val[0], inos)
		}
	}
}

// TestFDPassListenTwice: in one process, a second Listen (or ListenNamed)
// of a name already registered does not bind again: it returns another
// listener on the same socket (same address and inode, whatever address the
// second call names), and the name is registered once. Both listeners work
// and closing one leaves the other working. The registry's own copy keeps
// the socket listening after the program closed both, until Remove. A
// second call for another kind of socket under that name is refused.
// Observed and documented here, since the package does not say.
func TestFDPassListenTwice(t *testing.T) {
	fdpassWarmUp(t)
	before := countFDs(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "twice.sock")
	name := ListenerName("unix", path)
	l1, err := Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := Listen("unix", path)
	if err != nil {
		t.Fatalf("second Listen under %q: %v", name, err)
	}
	_, ino1, _ := fdpassInspect(l1.(syscall.Conn))
	_, ino2, _ := fdpassInspect(l2.(syscall.Conn))
	if l1.Addr().String() != l2.Addr().String() || ino1 != ino2 {
		t.Errorf("second Listen: %s inode %d, first %s inode %d; want the same socket", l2.Addr(), ino2, l1.Addr(), ino1)
	}
	if n := fdpassCount(Names(), name); n != 1 {
		t.Errorf("%q registered %d times", name, n)
	}
	fdpassAcceptOne(t, l2, "unix", path)
	l1.Close()
	fdpassAcceptOne(t, l2, "unix", path)
	l2.Close()
	// Only the registry holds the socket now: it still listens.
	conn, err := net.DialTimeout("unix", path, testDeadline)
	if err != nil {
		t.Errorf("after closing both listeners: %v; the registry's copy should still listen", err)
	} else {
		conn.Close()
	}
	if _, err := ListenPacketNamed(name, nil, "unixgram", path); err == nil {
		t.Errorf("ListenPacketNamed under a stream listener's name succeeded")
	}
	if _, err := ListenNamed(name, nil, "tcp", "127.0.0.1:0"); err == nil {
		t.Errorf("ListenNamed tcp under a unix listener's name succeeded")
	}
	if !Remove(name) || Remove(name) {
		t.Errorf("Remove(%q): want true once, then false", name)
	}
	if _, err := net.DialTimeout("unix", path, testDeadline); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("after Remove: %v, want connection refused", err)
	}

	// ListenNamed twice with different addresses: the second address is
	// not looked at.
	tname := fmt.Sprintf("fdpass-twice-%d", time.Now().UnixNano())
	t1, err := ListenNamed(tname, nil, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t2, err := ListenNamed(tname, nil, "tcp", "127.0.0.1:1")
	if err != nil {
		t.Fatalf("second ListenNamed with another address: %v", err)
	}
	if t1.Addr().String() != t2.Addr().String() {
		t.Errorf("second ListenNamed listens on %s, first on %s", t2.Addr(), t1.Addr())
	}
	fdpassAcceptOne(t, t1, "tcp", t1.Addr().String())
	fdpassAcceptOne(t, t2, "tcp", t1.Addr().String())
	t1.Close()
	t2.Close()
	Remove(tname)
	if after := countFDs(t); after != before {
		t.Errorf("%d fds open before, %d after", before, after)
	}
}

// fdpassAcceptOne dials addr and checks that ln accepts the connection.
func fdpassAcceptOne(t *testing.T, ln net.Listener, network, addr string) {
	t.Helper()
	conn, err := net.DialTimeout(network, addr, testDeadline)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	switch l := ln.(type) {
	case *net.TCPListener:
		l.SetDeadline(time.Now().Add(testDeadline))
	case *net.UnixListener:
		l.SetDeadline(time.Now().Add(testDeadline))
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
	a.Close()
}

func fdpassCount(names []string, name string) int {
	n := 0
	for _, s := range names {
		if s == name {
			n++
		}
	}
	return n
}

// fdpassWarmUp makes the runtime open what it opens on first use of the
// network (the poller), so that fd counts around a test compare like with
// like.
func fdpassWarmUp(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}

// TestFDPassNameRules: names systemd would refuse (':', control
// characters, non-ASCII, over 255 bytes) are refused by ListenNamed,
// ListenPacketNamed and Add without creating anything; ListenerName encodes
// an address so that it is always a valid name; Add refuses a name in use
// with ErrNameTaken without leaking its duplicate; unknown names give
// (nil, nil) from File and Conn; networks of the wrong kind are refused.
func TestFDPassNameRules(t *testing.T) {
	fdpassWarmUp(t)
	before := countFDs(t)
	dir := t.TempDir()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	before++ // devnull
	for _, bad := range []string{"a:b", ":", "tab\there", "new\nline", "del\x7f", "caf\u00e9", strings.Repeat("x", 256)} {
		if ln, err := ListenNamed(bad, nil, "tcp", "127.0.0.1:0"); err == nil {
			ln.Close()
			t.Errorf("ListenNamed(%q) succeeded", bad)
		}
		if pc, err := ListenPacketNamed(bad, nil, "udp", "127.0.0.1:0"); err == nil {
			pc.Close()
			t.Errorf("ListenPacketNamed(%q) succeeded", bad)
		}
		if err := Add(bad, devnull); err == nil || errors.Is(err, ErrNameTaken) {
			t.Errorf("Add(%q) = %v, want an invalid-name error", bad, err)
		}
		if slices.Contains(Names(), bad) {
			t.Errorf("%q registered", bad)
			Remove(bad)
		}
	}
	longest := "fdpass-" + strings.Repeat("m", 255-len("fdpass-"))
	if err := Add(longest, devnull); err != nil {
		t.Errorf("Add of a 255-byte name: %v", err)
	}
	if err := Add(longest, devnull); !errors.Is(err, ErrNameTaken) {
		t.Errorf("second Add(%q) = %v, want ErrNameTaken", longest, err)
	}
	f, err := File(longest)
	if err != nil || f == nil {
		t.Errorf("File(%q) = %v, %v", longest, f, err)
	} else {
		f.Close()
	}
	Remove(longest)

	// A path with ':' and '%' in it: ListenerName encodes them.
	path := filepath.Join(dir, "a:b%c.sock")
	ln, err := Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	name := ListenerName("unix", path)
	if want := "unix/" + strings.NewReplacer(":", "%3A", "%", "%25").Replace(path); name != want {
		t.Errorf("ListenerName = %q, want %q", name, want)
	}
	if !slices.Contains(Names(), name) {
		t.Errorf("%q not in the registry %q", name, Names())
	}
	if err := Add(name, devnull); !errors.Is(err, ErrNameTaken) {
		t.Errorf("Add under a listener's name = %v, want ErrNameTaken", err)
	}
	ln.Close()
	Remove(name)

	unknown := fmt.Sprintf("fdpass-unknown-%d", time.Now().UnixNano())
	if f, err := File(unknown); f != nil || err != nil {
		t.Errorf("File(unknown) = %v, %v; want nil, nil", f, err)
	}
	if c, err := Conn(unknown); c != nil || err != nil {
		t.Errorf("Conn(unknown) = %v, %v; want nil, nil", c, err)
	}
	closed, _ := os.Open(os.DevNull)
	closed.Close()
	if err := Add(unknown, closed); err == nil {
		t.Errorf("Add of a closed file succeeded")
		Remove(unknown)
	}
	for _, network := range []string{"udp", "unixgram", "ip4:icmp", ""} {
		if l, err := Listen(network, "127.0.0.1:0"); err == nil {
			l.Close()
			t.Errorf("Listen(%q) succeeded", network)
		}
	}
	for _, network := range []string{"tcp", "unix", "unixpacket", "ip4:icmp"} {
		if c, err := ListenPacket(network, "127.0.0.1:0"); err == nil {
			c.Close()
			t.Errorf("ListenPacket(%q) succeeded", network)
		}
	}
	if after := countFDs(t); after != before {
		t.Errorf("%d fds open before, %d after", before, after)
	}
}

// ==========================================================================
// examples/restarter, driven as a user would
// ==========================================================================

// These tests drive examples/restarter as a user would: the example is
// built once, started as a real process, restarted with its own "restart"
// command, and talked to by real TCP clients. Every generation of a server
// writes to the stdout and stderr of the first, so the test reads them from
// pipes it owns for as long as the test runs, line by line with deadlines.

// restarterDeadline bounds every wait; a healthy run is far quicker.
const restarterDeadline = 30 * time.Second

var (
	restarterInstanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (127\.0\.0\.1:\d+)$`)
	restarterSuccessRE  = regexp.MustCompile(`^Restart succeeded, child pid is ([1-9]\d*)\n$`)
	restarterGreetingRE = regexp.MustCompile(`^Hello, this is process ([1-9]\d*)\n$`)
)

func TestRestarterExample(t *testing.T) {
	fds := openFDs(t)
	t.Cleanup(func() {
		// This runs after every subtest and its cleanups. Fewer fds than
		// before is no leak of ours: an earlier test's process handle may
		// have been released meanwhile.
		if n := openFDs(t); n > fds {
			t.Errorf("the test process has %d fds open, %d before: the tests leaked some", n, fds)
		}
	})
	bin := buildExample(t, "restarter")
	t.Run("Restart", func(t *testing.T) {
		t.Parallel()
		restarterTestRestart(t, bin)
	})
	t.Run("MaxGeneration", func(t *testing.T) {
		t.Parallel()
		restarterTestMaxGeneration(t, bin)
	})
	t.Run("NoServer", func(t *testing.T) {
		t.Parallel()
		socket := filepath.Join(restarterTempDir(t), "none.sock")
		if text := restarterRestartFails(t, bin, socket); !strings.Contains(text, socket) {
			t.Errorf("failure text %q does not name the socket %s", text, socket)
		}
	})
	t.Run("BadDeploy", func(t *testing.T) {
		t.Parallel()
		restarterTestBadDeploy(t, bin)
	})
	t.Run("State", func(t *testing.T) {
		t.Parallel()
		restarterTestState(t, bin)
	})
	t.Run("Usage", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{{"bogus"}, {"restart", "now"}, {"-max-generation", "-1"}} {
			stdout, stderr, code := restarterRun(t, bin, args...)
			if code != 2 || stdout != "" || !strings.Contains(stderr, "Usage:") {
				t.Errorf("restarter %q: exit code %d, stdout %q, stderr %q; want 2, nothing, a usage message", args, code, stdout, stderr)
			}
		}
	})
}

// restarterTestRestart restarts a server with a client connected, and checks
// who serves whom until the old process has exited.
func restarterTestRestart(t *testing.T, bin string) {
	srv := restarterStart(t, bin)
	addr := srv.expectInstance(0, "")
	old := restarterDial(t, addr)
	if old.pid != srv.cmd.Process.Pid {
		t.Fatalf("client greeted by pid %d, want the server's %d", old.pid, srv.cmd.Process.Pid)
	}
	old.echo("before the restart")

	newPid := srv.restart(1, addr)
	if newPid == srv.cmd.Process.Pid {
		t.Fatalf("the new process has the old one's pid %d", newPid)
	}

	// The old process stopped accepting before the restart command got its
	// answer: every new client reaches the new process. Several of them,
	// so that one landing in the old process by chance would show.
	var fresh *restarterClient
	for i := range 5 {
		c := restarterDial(t, addr)
		if c.pid != newPid {
			t.Fatalf("client %d after the restart greeted by pid %d, want the new process %d", i, c.pid, newPid)
		}
		c.echo("new client " + strconv.Itoa(i))
		if fresh == nil {
			fresh = c
		} else {
			c.close()
		}
	}

	// The new process is ready and serving, and the old one still serves
	// the client it had: it has not exited while that client is connected.
	old.echo("after the restart")
	select {
	case <-srv.exited:
		t.Fatalf("the old process exited (%v) while its client was still connected", srv.cmd.ProcessState)
	default:
	}
	old.close()
	select {
	case <-srv.exited:
	case <-time.After(restarterDeadline):
		t.Fatalf("the old process is still running %v after its last client left", restarterDeadline)
	}
	if st := srv.cmd.ProcessState; !st.Success() {
		t.Fatalf("the old process ended with %v, want exit status 0", st)
	}
	fresh.echo("after the old process exited")
	fresh.close()
}

// restarterTestMaxGeneration checks that generations up to -max-generation
// restart, and that the next one refuses, every time, and keeps serving.
func restarterTestMaxGeneration(t *testing.T, bin string) {
	srv := restarterStart(t, bin, "-listen", "127.0.0.1:0", "-max-generation", "1")
	addr := srv.expectInstance(0, "")
	var pid int
	for gen := 1; gen <= 2; gen++ {
		pid = srv.restart(gen, addr)
	}

	var first string
	for i := range 2 {
		text := restarterRestartFails(t, bin, srv.socket)
		if i == 0 {
			first = text
			for _, want := range []string{"instance no. 2", "-max-generation 1"} {
				if !strings.Contains(text, want) {
					t.Errorf("failure text %q does not mention %q", text, want)
				}
			}
		} else if text != first {
			t.Errorf("second refusal %q differs from the first %q", text, first)
		}
		c := restarterDial(t, addr)
		if c.pid != pid {
			t.Fatalf("after the refusal, a client was greeted by pid %d, want generation 2's %d", c.pid, pid)
		}
		c.echo("still serving " + strconv.Itoa(i))
		c.close()
	}
}

// restarterTestBadDeploy replaces the server's binary with one that fails
// to start: the restart fails, the old process takes new clients again, and
// once the binary is fixed the next restart succeeds.
func restarterTestBadDeploy(t *testing.T, bin string) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skipf("no /bin/sh for a failing binary: %v", err)
	}
	deployed := filepath.Join(restarterTempDir(t), "restarter")
	deploy := func(b []byte) {
		t.Helper()
		// Write and rename, as a deploy would: the running binary is
		// left alone, and the next restart runs the new one.
		if err := os.WriteFile(deployed+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(deployed+".new", deployed); err != nil {
			t.Fatal(err)
		}
	}
	good, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	deploy(good)
	srv := restarterStart(t, deployed)
	addr := srv.expectInstance(0, "")
	held := restarterDial(t, addr)

	// The new process starts, and exits before it is ready; by then the
	// old process had stopped accepting to hand over.
	deploy([]byte("#!/bin/sh\nexit 3\n"))
	restarterRestartFails(t, bin, srv.socket)
	for i := range 3 {
		c := restarterDial(t, addr)
		if c.pid != srv.cmd.Process.Pid {
			t.Fatalf("client %d after the failed restart greeted by pid %d, want the old process %d", i, c.pid, srv.cmd.Process.Pid)
		}
		c.echo("after the failed restart")
		c.close()
	}
	held.echo("after the failed restart")

	deploy(good)
	newPid := srv.restart(1, addr)
	c := restarterDial(t, addr)
	if c.pid != newPid {
		t.Fatalf("client after the fixed restart greeted by pid %d, want the new process %d", c.pid, newPid)
	}
	held.echo("after the fixed restart")
	held.close()
	select {
	case <-srv.exited:
	case <-time.After(restarterDeadline):
		t.Fatalf("the old process is still running %v after its last client left", restarterDeadline)
	}
	if st := srv.cmd.ProcessState; !st.Success() {
		t.Fatalf("the old process ended with %v, want exit status 0", st)
	}
}

// restarterTestState starts the example as the new process of a restart,
// with the test in the old process's place, and checks what it makes of the
// state it is handed.
func restarterTestState(t *testing.T, bin string) {
	for _, tc := range []struct {
		name  string
		state []byte
		gen   int // -1: the state must be refused
	}{
		// The old process sends its generation as 4 bytes, big-endian.
		{"generation 7", binary.BigEndian.AppendUint32(nil, 7), 8},
		{"generation 256", binary.BigEndian.AppendUint32(nil, 256), 257},
		{"empty", nil, -1},
		{"short", []byte{0, 0, 7}, -1},
		{"long", append(binary.BigEndian.AppendUint32(nil, 7), 0), -1},
		{"last generation", binary.BigEndian.AppendUint32(nil, 1<<32-1), -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			readyOld, readyNew := restarterSocketpair(t)
			stateR, stateW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer stateR.Close()
			// A few bytes fit in the pipe: write them all and close, so
			// the new process reads them and then EOF.
			_, err = stateW.Write(tc.state)
			stateW.Close()
			if err != nil {
				t.Fatal(err)
			}

			srv := restarterStartWith(t, bin, func(cmd *exec.Cmd) {
				cmd.ExtraFiles = []*os.File{readyNew, stateR} // fds 3 and 4
				cmd.Env = append(cmd.Env, envReadyFD+"=3", envStateFD+"=4")
			})
			readyNew.Close()
			stateR.Close()

			var b [1]byte
			readyOld.SetReadDeadline(time.Now().Add(restarterDeadline))
			n, rerr := readyOld.Read(b[:])
			if tc.gen >= 0 {
				if n != 1 || b[0] != readyByte {
					t.Fatalf("readiness socket: read %q, %v; want %q", b[:n], rerr, readyByte)
				}
				srv.expectInstance(tc.gen, "")
				return
			}
			if rerr != io.EOF {
				t.Errorf("readiness socket: read %q, %v; want EOF, as the state was refused", b[:n], rerr)
			}
			select {
			case <-srv.exited:
			case <-time.After(restarterDeadline):
				t.Fatalf("still running %v after being handed bad state", restarterDeadline)
			}
			if code := srv.cmd.ProcessState.ExitCode(); code != 1 {
				t.Errorf("exit code %d after bad state, want 1", code)
			}
			if line, ok := <-srv.lines; ok {
				t.Errorf("stdout after bad state: %q, want nothing", line)
			}
			srv.closePipes() // the process is gone: its stderr is complete
			if log := srv.stderr(); !strings.Contains(log, "cannot take over from the old process") {
				t.Errorf("stderr does not say why the state was refused:\n%s", log)
			}
		})
	}
}

// restarterTempDir returns a directory short enough for a socket path
// (sun_path holds 108 bytes; t.TempDir's names grow with the test's).
func restarterTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "restarter")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// restarterEnv is the test's environment without what would make the
// example think it was started by systemd or by a restart, and with the
// race detector's pause at exit (a second by default) turned off.
func restarterEnv() []string {
	var env []string
	race := "atexit_sleep_ms=0"
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		switch {
		case k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "SHELLFLIP_"):
			continue
		case k == "GORACE":
			race = v + " " + race
			continue
		}
		env = append(env, kv)
	}
	return append(env, "GORACE="+race)
}

// restarterServer is generation 0 of a server and every generation it
// restarted into; they share its stdout and stderr.
type restarterServer struct {
	t      *testing.T
	bin    string
	socket string
	cmd    *exec.Cmd
	lines  chan string   // stdout, line by line; closed at EOF
	exited chan struct{} // closed once generation 0 has exited and cmd.ProcessState is set

	outR, errR *os.File
	logDone    chan struct{} // closed when stderr is read to EOF or closed
	logMu      sync.Mutex
	log        bytes.Buffer
	later      []*os.Process // later generations, held by pidfd
}

// restarterStart starts generation 0 of a server with args after -socket.
func restarterStart(t *testing.T, bin string, args ...string) *restarterServer {
	return restarterStartWith(t, bin, func(cmd *exec.Cmd) { cmd.Args = append(cmd.Args, args...) })
}

// restarterStartWith starts the example with -socket and whatever setup
// adds to the command, and arranges for every generation to be killed when
// the test ends.
func restarterStartWith(t *testing.T, bin string, setup func(*exec.Cmd)) *restarterServer {
	t.Helper()
	s := &restarterServer{
		t: t, bin: bin,
		socket:  filepath.Join(restarterTempDir(t), "ctl.sock"),
		lines:   make(chan string, 16),
		exited:  make(chan struct{}),
		logDone: make(chan struct{}),
	}
	s.cmd = exec.Command(bin, "-socket", s.socket)
	s.cmd.Env = restarterEnv()
	setup(s.cmd)

	// Our own pipes rather than Cmd's: later generations keep writing to
	// them after generation 0 has exited and was waited for, which would
	// have closed Cmd's read ends under them.
	var outW, errW *os.File
	var err error
	if s.outR, outW, err = os.Pipe(); err != nil {
		t.Fatal(err)
	}
	if s.errR, errW, err = os.Pipe(); err != nil {
		s.outR.Close()
		outW.Close()
		t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = outW, errW
	err = s.cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		s.outR.Close()
		s.errR.Close()
		t.Fatal(err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	done := make(chan struct{})
	go func() {
		defer close(s.lines)
		sc := bufio.NewScanner(s.outR)
		for sc.Scan() {
			select {
			case s.lines <- sc.Text():
			case <-done:
				return
			}
		}
	}()
	go func() {
		defer close(s.logDone)
		var buf [4096]byte
		for {
			n, err := s.errR.Read(buf[:])
			s.logMu.Lock()
			s.log.Write(buf[:n])
			s.logMu.Unlock()
			if err != nil {
				return
			}
		}
	}()

	t.Cleanup(func() {
		s.cmd.Process.Kill()
		for _, p := range s.later {
			p.Kill()
			p.Release()
		}
		select {
		case <-s.exited:
		case <-time.After(restarterDeadline):
			t.Errorf("pid %d outlived SIGKILL by %v", s.cmd.Process.Pid, restarterDeadline)
		}
		close(done)
		s.closePipes()
		if t.Failed() {
			t.Logf("the servers' stderr:\n%s", s.stderr())
		}
	})
	return s
}

// closePipes closes the read ends of stdout and stderr, and waits until the
// stderr reader has stopped.
func (s *restarterServer) closePipes() {
	s.outR.Close()
	s.errR.Close()
	<-s.logDone
}

func (s *restarterServer) stderr() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// expectInstance waits for the next line on stdout, which must announce
// generation gen, on addr unless addr is "", and returns the address.
func (s *restarterServer) expectInstance(gen int, addr string) string {
	s.t.Helper()
	var line string
	var ok bool
	select {
	case line, ok = <-s.lines:
	case <-time.After(restarterDeadline):
		s.t.Fatalf("no instance no. %d on stdout within %v", gen, restarterDeadline)
	}
	if !ok {
		s.t.Fatalf("stdout closed while waiting for instance no. %d", gen)
	}
	m := restarterInstanceRE.FindStringSubmatch(line)
	if m == nil || m[1] != strconv.Itoa(gen) || addr != "" && m[2] != addr {
		s.t.Fatalf("stdout: %q, want instance no. %d listening on %s", line, gen, cmp.Or(addr, "127.0.0.1:PORT"))
	}
	return m[2]
}

// restart runs "restarter restart", which must succeed, and waits until the
// new process, of generation gen, announces itself on addr. It returns the
// new pid.
func (s *restarterServer) restart(gen int, addr string) int {
	s.t.Helper()
	stdout, stderr, code := restarterRun(s.t, s.bin, "-socket", s.socket, "restart")
	m := restarterSuccessRE.FindStringSubmatch(stdout)
	if code != 0 || m == nil || stderr != "" {
		s.t.Fatalf("restart to generation %d: exit code %d, stdout %q, stderr %q; want 0, the new pid, nothing", gen, code, stdout, stderr)
	}
	pid, _ := strconv.Atoi(m[1])
	// A pidfd, taken while the process surely runs (it is a server, it
	// stays until killed or replaced), so that the cleanup's kill cannot
	// hit another process that reused the pid.
	p, err := os.FindProcess(pid)
	if err != nil {
		s.t.Fatalf("pid %d: %v", pid, err)
	}
	s.later = append(s.later, p)
	s.expectInstance(gen, addr)
	return pid
}

// restarterRestartFails runs "restarter restart", which must fail, and
// returns the failure text.
func restarterRestartFails(t *testing.T, bin, socket string) string {
	t.Helper()
	stdout, stderr, code := restarterRun(t, bin, "-socket", socket, "restart")
	text, ok := strings.CutPrefix(stderr, "Restart failed: ")
	if code != 1 || stdout != "" || !ok || !strings.HasSuffix(text, "\n") || strings.Count(text, "\n") != 1 {
		t.Fatalf("restart: exit code %d, stdout %q, stderr %q; want 1, nothing, one \"Restart failed: \" line", code, stdout, stderr)
	}
	return strings.TrimSuffix(text, "\n")
}

// restarterRun runs the example to completion and returns what it printed
// and its exit code.
func restarterRun(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), restarterDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = restarterEnv()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) || ctx.Err() != nil {
		t.Fatalf("restarter %q: %v (context: %v)", args, err, ctx.Err())
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// restarterClient is a TCP client of the example, greeted by pid.
type restarterClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	pid  int
}

func restarterDial(t *testing.T, addr string) *restarterClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, restarterDeadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &restarterClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(restarterDeadline))
	line, err := c.r.ReadString('\n')
	m := restarterGreetingRE.FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("greeting: %q, %v", line, err)
	}
	c.pid, _ = strconv.Atoi(m[1])
	return c
}

// echo sends msg and a newline, and checks that they come back.
func (c *restarterClient) echo(msg string) {
	c.t.Helper()
	c.conn.SetDeadline(time.Now().Add(restarterDeadline))
	if _, err := io.WriteString(c.conn, msg+"\n"); err != nil {
		c.t.Fatalf("pid %d: sending %q: %v", c.pid, msg, err)
	}
	got, err := c.r.ReadString('\n')
	if got != msg+"\n" {
		c.t.Fatalf("pid %d: sent %q, got back %q, %v", c.pid, msg+"\n", got, err)
	}
}

func (c *restarterClient) close() { c.conn.Close() }

// restarterSocketpair returns the two ends of a unix stream socketpair: the
// old process's end, pollable so that deadlines work, and the new one's.
func restarterSocketpair(t *testing.T) (oldEnd, newEnd *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(os.NewSyscallError("socketpair", err))
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		t.Fatal(os.NewSyscallError("setnonblock", err))
	}
	oldEnd, newEnd = os.NewFile(uintptr(fds[0]), "ready-old"), os.NewFile(uintptr(fds[1]), "ready-new")
	t.Cleanup(func() {
		oldEnd.Close()
		newEnd.Close()
	})
	return oldEnd, newEnd
}

// ==========================================================================
// examples/httpd: zero downtime under load, wrk, socket activation, the demo
// ==========================================================================

// These tests drive examples/httpd as its users do: the example is built
// once, started as a real process (alone, or under systemd-socket-activate),
// restarted with its own "restart" command or over the control socket, and
// loaded by real HTTP clients, Go's and wrk. Every generation of a server
// writes to the stdout and stderr of the first, which are pipes the test
// reads line by line; the end of stdout means that every generation has
// exited. Waits are for events (a line, a response, a written request, an
// exit), each with a deadline.

// httpdDeadline bounds every wait; a healthy run is far quicker.
const httpdDeadline = 30 * time.Second

var (
	httpdInstanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (\S+)$`)
	httpdRestartRE  = regexp.MustCompile(`^Restart succeeded, child pid is ([1-9]\d*)\n$`)
	httpdBodyRE     = regexp.MustCompile(`^pid=([1-9]\d*) generation=(\d+)\n$`)
)

func TestHTTPDExample(t *testing.T) {
	fds := openFDs(t)
	t.Cleanup(func() {
		// Runs after every subtest and its cleanups.
		if n := openFDs(t); n != fds {
			t.Errorf("the test process has %d fds open, %d before: the tests leaked some", n, fds)
		}
	})
	bin := buildExample(t, "httpd")
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
	if err := copyExecutable(bin, deployed); err != nil {
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
		pid, err := RequestRestart(ctx, s.socket)
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

// httpdEnv is the environment of the processes the tests start. A binary
// built with the race detector sleeps a second before it exits, unless told
// otherwise (GORACE atexit_sleep_ms, 1000 by default): a second per "httpd
// restart" and per old process would slow the tests down and stretch every
// restart past the server's idle grace.
func httpdEnv() []string {
	gorace := "atexit_sleep_ms=0"
	if v := os.Getenv("GORACE"); v != "" {
		gorace = v + " " + gorace
	}
	return append(os.Environ(), "GORACE="+gorace)
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
	m := httpdInstanceRE.FindStringSubmatch(s.out.wait(s.t, "the server", regexp.MustCompile(`^Instance no\. `)))
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
// /slow?ms=200, against addr.
func httpdStartLoad(t *testing.T, addr string, n int) *httpdLoad {
	l := &httpdLoad{t: t, quit: make(chan struct{}), changed: make(chan struct{}),
		byPid: map[int]int{}, retired: map[int]bool{}}
	t.Cleanup(l.stop)
	for range n {
		l.client(addr, true, "/")
		l.client(addr, false, "/")
		l.client(addr, true, "/slow?ms=200")
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

// ==========================================================================
// A real systemd 252 in private namespaces: reloads, fd store, notify-reload
// ==========================================================================

// Tests of the library under a real systemd 252, and of the datagrams it
// sends to a notify socket owned by the test where systemd 252 cannot be
// the judge (Type=notify-reload came in 253).
//
// systemd runs as PID 1 of private pid, mount, cgroup, net, uts and ipc
// namespaces (unshare(1), then testdata/systemd/boot.sh), in a cgroup2
// sub-cgroup of its own, with a pty as its console so that its log reaches
// the test, and is driven with systemctl through nsenter(1). The service is this test
// binary, copied where the namespaced systemd can exec it, running the
// "systemd-service" role; ExecReload= runs another copy in the
// "systemd-reload" role, which calls RequestRestart. Everything is torn
// down by the test: systemd is killed with SIGKILL (which takes the whole
// pid namespace with it), and the cgroup is removed depth first.
//
// What systemd 252 did here that is worth knowing:
//
//   - A regular file bind-mounted over /dev/console gets no log at all:
//     PID 1 opens the console with open_terminal(), which refuses a
//     non-tty, and its stdio are /dev/null. A pty slave works.
//   - The default NotifyAccess= of Type=notify is "main" (systemctl show
//     says so), so a datagram from any other pid is dropped with the
//     warning "Got notification message from PID X, but reception only
//     permitted for main PID Y". BARRIER=1 is exempt: the manager handles
//     it before it looks for the sending unit, so the old process can wait
//     on a barrier after it has handed MAINPID over.
//   - A MAINPID= naming a process that is not systemd's child (the new
//     process is the old one's) is accepted, with the warning "Supervising
//     process X which is not our child. We'll most likely not notice when
//     it exits." once per restart. It does notice: once the old process
//     has exited, PID 1 is the new one's parent, and when the new one is
//     killed the unit fails with "Main process exited, code=killed".
//   - READY=1 during a reload does not end the reload while ExecReload= is
//     still running (service_notify_message checks control_pid): the reload
//     job ends when the reload client exits, with its exit status, and
//     `systemctl reload` returns then. A failed ExecReload= leaves the unit
//     active with ReloadResult=exit-code.
//   - After a successful ExecReload=, systemd re-reads PIDFile= if the unit
//     has one (service_sigchld_event, SERVICE_RELOAD) and takes the pid in
//     it as the main pid. A pid file that still names the old process at
//     that moment undoes MAINPID=: seen here as "Reloaded" followed by
//     "Deactivated successfully" when the old process exited, with the new
//     one killed. That is also why the PIDFile= test boots a unit of its
//     own: with PIDFile= the re-read would hide a missing MAINPID=.
//   - ExecReload= runs without $NOTIFY_SOCKET (NotifyAccess=main gives it
//     only to the main process); a control process that wants to talk to
//     systemd must know the socket's path.
//   - The fd store survives `systemctl restart` in 252 without
//     FileDescriptorStorePreserve= (added in 254): systemd releases a
//     unit's resources only when it is inactive with no job queued, and a
//     restart job stays queued from the stop through the start.
//   - Not systemd's, but it bit here: a race-enabled Go binary sleeps 1 s
//     on exit (GORACE atexit_sleep_ms defaults to 1000), so every reload
//     would wait 1 s for the reload client; the unit sets
//     atexit_sleep_ms=0.

// Knobs of the systemd roles, in the environment of the service.
const (
	envSystemdListen       = "SHELLFLIP_TEST_SD_LISTEN"        // unix socket path to serve pid and generation on
	envSystemdAccept       = "SHELLFLIP_TEST_SD_ACCEPT"        // "inherited": accept only on a listener this process inherited
	envSystemdStore        = "SHELLFLIP_TEST_SD_STORE"         // non-empty: push the registry to systemd's fd store
	envSystemdNotifyReload = "SHELLFLIP_TEST_SD_NOTIFY_RELOAD" // non-empty: Config{NotifyReload: true, Signal: SIGHUP}
	envSystemdPIDFile      = "SHELLFLIP_TEST_SD_PIDFILE"       // Config.PIDFile
	envSystemdStray        = "SHELLFLIP_TEST_SD_STRAY"         // knob: the reload client sends a datagram of its own and exits
	envSystemdLog          = "SHELLFLIP_TEST_SD_LOG"           // non-empty: the library logs to stderr
)

const (
	systemdUnit   = "shellflip-test.service"
	systemdTarget = "shellflip-test.target"
	// systemdNotMainWarning is what systemd logs when it drops a datagram
	// from a pid other than the main one under NotifyAccess=main.
	systemdNotMainWarning = "but reception only permitted for main PID"
)

func init() {
	testRoles["systemd-service"] = systemdServiceRole
	testRoles["systemd-reload"] = systemdReloadRole
}

// systemdServiceRole is the service. Every generation reports, in order:
//
//	started pid= restarted= names=   (names: the registry before Listen)
//	early pid= err=                  (restarted only: a Send before Ready)
//	notmain pid= err=                (restarted only: a Send after Ready)
//	ready pid= gen= inherited= ino=  (Start returned)
//	main pid= err=                   (IsMain: STATUS=main pid=N, then a barrier)
//	replaced pid= new=               (a restart succeeded; it stops accepting and exits)
//
// A restarted process that removes $SHELLFLIP_TEST_FAIL_FILE exits with
// status 3 right after its early report, before Ready.
func systemdServiceRole() int {
	pid := os.Getpid()
	names := Names()
	n, err := SystemdNotifier()
	if err != nil {
		report("error pid=%d notifier: %v", pid, err)
		return 1
	}
	report("started pid=%d restarted=%t names=%s", pid, StartedByRestart(), strings.Join(names, ","))
	if StartedByRestart() {
		report("early pid=%d err=%v", pid, n.Send(SdStatus("early")))
		if takeKnob(envTestFailFile) {
			os.Exit(3)
		}
	}

	gen := 0
	st, err := ReceiveState()
	if err != nil {
		report("error pid=%d receive: %v", pid, err)
		return 1
	}
	if st != nil {
		line, err := bufio.NewReader(st).ReadString('\n')
		st.Close()
		if err == nil {
			gen, err = strconv.Atoi(strings.TrimSpace(line))
		}
		if err != nil {
			report("error pid=%d state %q: %v", pid, line, err)
			return 1
		}
		gen++
	}

	inherited, ino := false, uint64(0)
	var ln net.Listener
	if path := os.Getenv(envSystemdListen); path != "" {
		inherited = slices.Contains(names, ListenerName("unix", path))
		ln, err = Listen("unix", path)
		if err != nil {
			report("error pid=%d listen: %v", pid, err)
			return 1
		}
		if ino, err = systemdInode(ln.(syscall.Conn)); err != nil {
			report("error pid=%d fstat: %v", pid, err)
			return 1
		}
		if os.Getenv(envSystemdAccept) != "inherited" || inherited {
			go serveHello(ln, gen)
		}
	}
	if os.Getenv(envSystemdStore) != "" {
		if err := StoreFDs(); err != nil {
			report("error pid=%d store: %v", pid, err)
			return 1
		}
	}

	cfg := Config{
		Logger:     systemdLogger(),
		SocketPath: os.Getenv(envTestSocket),
		PIDFile:    os.Getenv(envSystemdPIDFile),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprintf(w, "%d\n", gen)
			return err
		}},
	}
	if os.Getenv(envSystemdNotifyReload) != "" {
		cfg.NotifyReload, cfg.Signal = true, syscall.SIGHUP
	}
	r, err := Start(context.Background(), cfg)
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	if StartedByRestart() {
		report("notmain pid=%d err=%v", pid, n.Send(SdStatus("not main yet")))
	}
	go func() {
		<-MainChan()
		err := n.Send(SdStatus("main pid=" + strconv.Itoa(pid)))
		if err == nil {
			// Once the barrier returns, systemd has read the status: the
			// test can ask for it as soon as it has this report.
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			err = n.Barrier(ctx)
			cancel()
		}
		report("main pid=%d err=%v", pid, err)
	}()
	report("ready pid=%d gen=%d inherited=%t ino=%d", pid, gen, inherited, ino)
	p, err := r.Wait()
	if err != nil {
		report("ended pid=%d err=%v", pid, err)
		return 1
	}
	if ln != nil {
		// As a real service would: stop accepting, so that the test's
		// next connection can only reach the new process.
		ln.Close()
	}
	report("replaced pid=%d new=%d", pid, p.Pid)
	return 0
}

// systemdLogger logs to stderr, which the unit appends to service.log,
// if the role was asked to.
func systemdLogger() *slog.Logger {
	if os.Getenv(envSystemdLog) == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
}

// systemdReloadRole is the unit's ExecReload=: it asks the service for a
// restart, prints the outcome for the unit's log, reports it, and exits 0
// on success, 1 on failure. When it removes the $SHELLFLIP_TEST_SD_STRAY
// knob it instead sends a datagram to systemd itself (it is not the main
// process, so systemd must drop it with a warning) and exits 0.
func systemdReloadRole() int {
	pid := os.Getpid()
	if takeKnob(envSystemdStray) {
		// systemd 252 gives control processes no $NOTIFY_SOCKET unless
		// NotifyAccess=all; the manager's socket is at its usual place.
		addr := os.Getenv("NOTIFY_SOCKET")
		if addr == "" {
			addr = "/run/systemd/notify"
		}
		n, err := NewSdNotifier(addr)
		if err == nil {
			err = n.Send(SdStatus("stray"))
			n.Close()
		}
		report("stray pid=%d err=%v", pid, err)
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	newPid, err := RequestRestart(ctx, os.Getenv(envTestSocket))
	if err != nil {
		fmt.Printf("reload failed: %v\n", err)
		report("reloaded pid=%d new=0 err=%v", pid, err)
		return 1
	}
	fmt.Printf("reloaded: new main pid %d\n", newPid)
	report("reloaded pid=%d new=%d err=<nil>", pid, newPid)
	return 0
}

// systemdInode returns the inode of c's socket: the same number in every
// process that holds the same socket, a different one for a re-bound socket.
func systemdInode(c syscall.Conn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var st unix.Stat_t
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil {
		return 0, err
	}
	return st.Ino, os.NewSyscallError("fstat", serr)
}

// systemdNS is a systemd booted as PID 1 of private namespaces, managing
// one test unit.
type systemdNS struct {
	t       *testing.T
	dir     string // shared with the namespace: units, binaries, sockets, logs
	pid     int    // the namespaced systemd, as this process sees it
	console *systemdConsole
	reports *testReports
}

// systemdSkip skips the test unless this machine can boot a private systemd.
func systemdSkip(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("booting systemd in private namespaces needs root; CI runs as root")
	}
	for _, tool := range []string{"unshare", "nsenter", "systemctl", "ip", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
	if _, err := os.Stat("/lib/systemd/systemd"); err != nil {
		t.Skipf("systemd is not installed: %v", err)
	}
}

var systemdSeq atomic.Int64

// systemdTempDir returns a new directory with a short name, so that the
// sockets in it fit in sun_path, removed at cleanup.
func systemdTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdns")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// systemdBoot boots systemd with the test unit, whose [Service] section
// gets the extra lines ("{dir}" in them stands for the test's directory),
// and waits until systemd has finished starting up; the unit itself is not
// started. Everything it creates goes away at cleanup, on every path.
func systemdBoot(t *testing.T, extra ...string) *systemdNS {
	t.Helper()
	systemdSkip(t)
	script, err := filepath.Abs("testdata/systemd/boot.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := systemdTempDir(t)
	// Copies of the test binary: the service's can be replaced, as a
	// deploy would, without touching the reload client's.
	for _, bin := range []string{"svc", "client"} {
		if err := copyExecutable(os.Args[0], filepath.Join(dir, bin)); err != nil {
			t.Fatal(err)
		}
	}
	ns := &systemdNS{t: t, dir: dir, reports: newTestReports(t, dir)}
	ns.writeUnits(extra)

	cg, cgfd := systemdCgroup(t)
	ns.console = systemdOpenConsole(t)
	log, err := os.Create(filepath.Join(dir, "unshare.log"))
	if err != nil {
		unix.Close(cgfd)
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command("unshare", "--cgroup", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
		"--mount-proc", "--kill-child", "--", "/bin/sh", script, dir, ns.console.slavePath, systemdTarget)
	cmd.Stdout, cmd.Stderr = log, log
	// clone3(CLONE_INTO_CGROUP): unshare starts in the sub-cgroup, which
	// its --cgroup namespace then makes the root of systemd's tree.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	err = cmd.Start()
	unix.Close(cgfd)
	if err != nil {
		t.Fatalf("starting unshare in %s: %v", cg, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		// SIGKILL to PID 1 of the namespace kills every process in it,
		// and unshare (--kill-child) exits with it. Before systemd is
		// found, killing unshare takes its child down the same way.
		if ns.pid > 0 {
			unix.Kill(ns.pid, unix.SIGKILL)
		} else {
			cmd.Process.Kill()
		}
		select {
		case <-exited:
		case <-time.After(testDeadline):
			cmd.Process.Kill()
			t.Errorf("unshare (pid %d) did not exit after systemd was killed", cmd.Process.Pid)
		}
	})

	if _, err := ns.console.wait("Startup finished", exited); err != nil {
		b, _ := os.ReadFile(log.Name())
		t.Fatalf("systemd did not start up: %v\nconsole:\n%s\nunshare:\n%s", err, ns.console.text(), b)
	}
	// By now unshare's only child has exec'd systemd.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(b)); len(f) == 1 {
		ns.pid, _ = strconv.Atoi(f[0])
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", ns.pid)); ns.pid == 0 || strings.TrimSpace(string(comm)) != "systemd" {
		t.Fatalf("unshare's children are %q, want one systemd", b)
	}
	return ns
}

func (ns *systemdNS) writeUnits(extra []string) {
	ns.t.Helper()
	units := filepath.Join(ns.dir, "units")
	if err := os.Mkdir(units, 0o755); err != nil {
		ns.t.Fatal(err)
	}
	d := ns.dir
	for i, line := range extra {
		extra[i] = strings.ReplaceAll(line, "{dir}", d)
	}
	// "$$" is a literal "$" for systemd. Type=notify without NotifyAccess=:
	// the default (main) is what the library must live with.
	service := strings.Join(append([]string{
		"[Unit]",
		"DefaultDependencies=no",
		"",
		"[Service]",
		"Type=notify",
		"ExecStart=" + d + "/svc -test.run=^$$",
		"ExecReload=/usr/bin/env " + envTestRole + "=systemd-reload " + d + "/client -test.run=^$$",
		"Environment=" + envTestRole + "=systemd-service " + envTestReport + "=" + ns.reports.path +
			" " + envTestSocket + "=" + d + "/ctl.sock " + envSystemdListen + "=" + d + "/hello.sock" +
			" " + envSystemdStray + "=" + d + "/stray",
		// A race-enabled binary sleeps 1 s on exit (GORACE's
		// atexit_sleep_ms), which every reload would wait for.
		"Environment=\"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0") + "\" " + envSystemdLog + "=1",
		"StandardOutput=append:" + d + "/service.log",
		"StandardError=inherit",
		"TimeoutSec=20", // fail before systemctl's own deadline (testDeadline)
	}, extra...), "\n") + "\n"
	target := "[Unit]\nDefaultDependencies=no\n"
	for name, text := range map[string]string{systemdUnit: service, systemdTarget: target} {
		if err := os.WriteFile(filepath.Join(units, name), []byte(text), 0o644); err != nil {
			ns.t.Fatal(err)
		}
	}
}

// systemdCgroup creates a sub-cgroup of this machine's cgroup2 hierarchy
// (/sys/fs/cgroup on a pure cgroup2 host, /sys/fs/cgroup/unified on a
// hybrid one) and returns its path and an fd for CLONE_INTO_CGROUP. The
// cgroup and whatever systemd created below it are removed at cleanup.
func systemdCgroup(t *testing.T) (string, int) {
	t.Helper()
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
		root = "/sys/fs/cgroup/unified"
		if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
			t.Skip("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
		}
	}
	path := filepath.Join(root, fmt.Sprintf("shellflip-test-%d-%d", os.Getpid(), systemdSeq.Add(1)))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { systemdRemoveCgroup(t, path) })
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return path, fd
}

// systemdRemoveCgroup removes path and the cgroups below it, children first.
func systemdRemoveCgroup(t *testing.T, path string) {
	t.Helper()
	var dirs []string
	filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	// WalkDir visits a directory before what is below it.
	slices.Reverse(dirs)
	for _, d := range dirs {
		err := unix.Rmdir(d)
		if err == unix.EBUSY {
			// Still populated: the last processes are on their way out.
			systemdWaitUnpopulated(t, d)
			err = unix.Rmdir(d)
		}
		if err != nil {
			t.Errorf("removing cgroup %s: %v", d, err)
		}
	}
}

// systemdWaitUnpopulated waits until cgroup.events says "populated 0". The
// kernel signals a change of that file with POLLPRI.
func systemdWaitUnpopulated(t *testing.T, cg string) {
	f, err := os.Open(filepath.Join(cg, "cgroup.events"))
	if err != nil {
		return
	}
	defer f.Close()
	deadline := time.Now().Add(testDeadline)
	for {
		b := make([]byte, 512)
		n, _ := f.ReadAt(b, 0)
		if strings.Contains(string(b[:n]), "populated 0") {
			return
		}
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			t.Errorf("cgroup %s still populated: %s", cg, b[:n])
			return
		}
		rc, err := f.SyscallConn()
		if err != nil {
			return
		}
		rc.Control(func(fd uintptr) {
			unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}, ms)
		})
	}
}

// systemdConsole is the master side of the pty that the namespaced systemd
// has as /dev/console: everything it logs.
type systemdConsole struct {
	master    *os.File
	slave     int // held open, so that the master does not see a hang-up before systemd opens the slave
	slavePath string

	mu      sync.Mutex
	buf     []byte
	changed chan struct{} // closed and replaced whenever buf grows or the reader ends
	ended   bool
}

func systemdOpenConsole(t *testing.T) *systemdConsole {
	t.Helper()
	m, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pty for systemd's console: %v", err)
	}
	if err := unix.IoctlSetPointerInt(m, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(m)
		t.Fatal(os.NewSyscallError("ioctl TIOCSPTLCK", err))
	}
	n, err := unix.IoctlGetInt(m, unix.TIOCGPTN)
	if err != nil {
		unix.Close(m)
		t.Fatal(os.NewSyscallError("ioctl TIOCGPTN", err))
	}
	c := &systemdConsole{slavePath: "/dev/pts/" + strconv.Itoa(n), changed: make(chan struct{})}
	c.slave, err = unix.Open(c.slavePath, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(m)
		t.Fatal(err)
	}
	// Non-blocking, so that the poller serves the master and Close ends
	// a pending Read.
	unix.SetNonblock(m, true)
	c.master = os.NewFile(uintptr(m), "ptmx")
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 4096)
		for {
			n, err := c.master.Read(b)
			c.mu.Lock()
			c.buf = append(c.buf, strings.ReplaceAll(string(b[:n]), "\r", "")...)
			c.ended = err != nil
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		c.master.Close()
		<-done
		unix.Close(c.slave)
		if t.Failed() {
			t.Logf("systemd's console:\n%s", c.text())
		}
	})
	return c
}

func (c *systemdConsole) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}

// wait returns the first line that contains s, waiting for it until the
// deadline, or until stop is closed.
func (c *systemdConsole) wait(s string, stop <-chan struct{}) (string, error) {
	timer := time.NewTimer(testDeadline)
	defer timer.Stop()
	for {
		c.mu.Lock()
		text, changed, ended := string(c.buf), c.changed, c.ended
		c.mu.Unlock()
		for _, line := range strings.Split(text, "\n") {
			if strings.Contains(line, s) {
				return line, nil
			}
		}
		if ended {
			return "", fmt.Errorf("console closed before %q", s)
		}
		select {
		case <-changed:
		case <-stop:
			return "", fmt.Errorf("stopped waiting for %q", s)
		case <-timer.C:
			return "", fmt.Errorf("no %q on the console within %v", s, testDeadline)
		}
	}
}

// lines returns the console lines that contain s.
func (c *systemdConsole) lines(s string) []string {
	var out []string
	for _, line := range strings.Split(c.text(), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return out
}

// systemctl runs systemctl in the namespaces and returns its output.
func (ns *systemdNS) systemctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	argv := append([]string{"-t", strconv.Itoa(ns.pid), "-m", "-p", "-u", "-i", "-n", "--",
		"systemctl", "--no-pager", "--no-ask-password"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0")
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (ns *systemdNS) mustSystemctl(args ...string) string {
	ns.t.Helper()
	out, err := ns.systemctl(args...)
	if err != nil {
		ns.t.Fatalf("systemctl %s: %v\n%s%s", strings.Join(args, " "), err, out, ns.serviceLog())
	}
	return out
}

// show returns a property of the test unit.
func (ns *systemdNS) show(prop string) string {
	ns.t.Helper()
	return ns.mustSystemctl("show", "--property="+prop, "--value", systemdUnit)
}

// serviceLog returns what the unit's processes printed, for failure
// messages.
func (ns *systemdNS) serviceLog() string {
	b, _ := os.ReadFile(filepath.Join(ns.dir, "service.log"))
	if len(b) == 0 {
		return ""
	}
	return "\nservice output:\n" + string(b)
}

// systemctlAsync runs systemctl in the background, so that the caller can
// read the reports meanwhile: a datagram socket queues only
// net.unix.max_dgram_qlen (10) unread datagrams, and a role blocked on a
// report would stall the very restart systemctl waits for. The returned
// function waits for systemctl (bounded by its own deadline).
func (ns *systemdNS) systemctlAsync(args ...string) (wait func() (string, error)) {
	type result struct {
		out string
		err error
	}
	ch := make(chan result, 1)
	go func() {
		out, err := ns.systemctl(args...)
		ch <- result{out, err}
	}()
	return func() (string, error) {
		r := <-ch
		return r.out, r.err
	}
}

// mustWait fails the test if the systemctl command behind wait failed.
func (ns *systemdNS) mustWait(what string, wait func() (string, error)) string {
	ns.t.Helper()
	out, err := wait()
	if err != nil {
		ns.t.Fatalf("systemctl %s: %v\n%s%s", what, err, out, ns.serviceLog())
	}
	return out
}

// start starts the unit and checks that its first process is running,
// main and serving. It returns that process's pid.
func (ns *systemdNS) start() string {
	ns.t.Helper()
	wait := ns.systemctlAsync("start", systemdUnit)
	st := ns.reports.next("started")
	if st["restarted"] != "false" {
		ns.t.Errorf("the first process says restarted=%s", st["restarted"])
	}
	pid := ns.reports.next("ready")["pid"]
	if pid != st["pid"] {
		ns.t.Fatalf("started %s, but %s became ready", st["pid"], pid)
	}
	ns.mustWait("start", wait)
	ns.checkMain(pid, "0")
	return pid
}

// reload runs `systemctl reload`, expects it to succeed, and follows the
// handover from old to the new process in the reports. It returns the new
// process's pid after checking that systemd knows it as the main pid.
func (ns *systemdNS) reload(old, gen string) string {
	ns.t.Helper()
	wait := ns.systemctlAsync("reload", systemdUnit)
	rel := ns.reports.next("reloaded")
	pid := rel["new"]
	if rel["err"] != "<nil>" || pid == "0" {
		ns.t.Fatalf("the reload client reported %v%s", rel, ns.serviceLog())
	}
	ns.followRestart(old, pid)
	ns.mustWait("reload", wait)
	ns.checkMain(pid, gen)
	return pid
}

// followRestart checks the reports of a restart from old to pid that
// succeeded.
func (ns *systemdNS) followRestart(old, pid string) {
	ns.t.Helper()
	r := ns.reports
	if st := r.next("started"); st["pid"] != pid || st["restarted"] != "true" {
		ns.t.Fatalf("RequestRestart returned %s, but %v started", pid, st)
	}
	if early := r.next("early"); !strings.Contains(early["err"], ErrNotMain.Error()) {
		ns.t.Errorf("a new process's Send before Ready returned %q, want ErrNotMain", early["err"])
	}
	// Whether the Send after Ready was refused depends on how soon the old
	// process gets systemd's answer to its barrier; either way systemd must
	// not complain about it (checked on the console by the callers).
	r.next("notmain")
	if ready := r.next("ready"); ready["pid"] != pid {
		ns.t.Fatalf("RequestRestart returned %s, but %s became ready", pid, ready["pid"])
	}
	if repl := r.next("replaced"); repl["pid"] != old || repl["new"] != pid {
		ns.t.Fatalf("old process reported %v, want pid=%s new=%s", repl, old, pid)
	}
}

// checkMain checks that systemd knows pid as the unit's main process, the
// unit is active, the process's own datagram was accepted, and the process
// answers on the unit's socket as generation gen.
func (ns *systemdNS) checkMain(pid, gen string) {
	ns.t.Helper()
	if m := ns.reports.next("main"); m["pid"] != pid || m["err"] != "<nil>" {
		ns.t.Fatalf("main report %v, want pid=%s err=<nil>", m, pid)
	}
	if got := ns.show("MainPID"); got != pid {
		ns.t.Errorf("MainPID=%s, want %s", got, pid)
	}
	if got := ns.show("ActiveState") + "/" + ns.show("SubState"); got != "active/running" {
		ns.t.Errorf("unit is %s, want active/running", got)
	}
	if got, want := ns.show("StatusText"), "main pid="+pid; got != want {
		ns.t.Errorf("StatusText=%q, want %q: systemd did not take the main process's datagram", got, want)
	}
	h := systemdHello(ns.t, filepath.Join(ns.dir, "hello.sock"))
	if h["pid"] != pid || h["gen"] != gen {
		ns.t.Errorf("the unit's socket answered %v, want pid=%s gen=%s", h, pid, gen)
	}
}

// checkNoWarnings checks that systemd dropped no datagram from a pid other
// than the main one.
func (ns *systemdNS) checkNoWarnings() {
	ns.t.Helper()
	if w := ns.console.lines(systemdNotMainWarning); len(w) > 0 {
		ns.t.Errorf("systemd dropped notifications from non-main pids:\n%s", strings.Join(w, "\n"))
	}
}

// systemdHello connects to a "systemd-service" socket and returns what the
// process that accepted says about itself.
func systemdHello(t *testing.T, path string) map[string]string {
	t.Helper()
	c, err := net.DialTimeout("unix", path, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return systemdReadHello(t, c)
}

func systemdReadHello(t *testing.T, c net.Conn) map[string]string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testDeadline))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the greeting: %v", err)
	}
	return parseReport("hello " + strings.TrimSpace(line))
}

// systemdInstall puts a copy of src at dst as a deploy would: a new file
// renamed over the old one, which a running process may still be executing.
func systemdInstall(t *testing.T, src, dst string) {
	t.Helper()
	if err := copyExecutable(src, dst+".new"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dst+".new", dst); err != nil {
		t.Fatal(err)
	}
}

// TestSystemdReloadFollowsMainPID: a Type=notify unit with the default
// NotifyAccess (main) and ExecReload= calling RequestRestart. Every reload
// succeeds, MainPID follows the new process, the unit stays active, the new
// process's own datagrams are accepted, and systemd never drops a datagram
// from a non-main pid. A datagram that is from a non-main pid, sent on
// purpose at the end, is logged: the console does show such warnings. And
// systemd notices when the last new process, not its child, is killed.
func TestSystemdReloadFollowsMainPID(t *testing.T) {
	ns := systemdBoot(t)
	if got := ns.show("NotifyAccess"); got != "main" {
		t.Errorf("NotifyAccess=%s, want systemd's default for Type=notify, main", got)
	}
	pid := ns.start()
	for gen := 1; gen <= 3; gen++ {
		pid = ns.reload(pid, strconv.Itoa(gen))
	}
	ns.checkNoWarnings()

	// The positive control, which also flushes the log: systemd handles
	// datagrams in order, so once it has logged this one it has handled
	// every earlier one, including anything the old processes sent
	// before they exited.
	if err := os.WriteFile(filepath.Join(ns.dir, "stray"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ns.mustSystemctl("reload", systemdUnit)
	stray := ns.reports.next("stray")
	if stray["err"] != "<nil>" {
		t.Fatalf("the stray datagram was not sent: %v", stray)
	}
	want := "Got notification message from PID " + stray["pid"] + ", " + systemdNotMainWarning + " " + pid
	if _, err := ns.console.wait(want, nil); err != nil {
		t.Fatalf("the stray datagram was not reported: %v", err)
	}
	if w := ns.console.lines(systemdNotMainWarning); len(w) != 1 {
		t.Errorf("want only the stray datagram dropped, got:\n%s", strings.Join(w, "\n"))
	}
	if got := ns.show("MainPID"); got != pid {
		t.Errorf("MainPID=%s after the stray datagram, want %s", got, pid)
	}

	// systemd warned that it supervises a process that is not its child;
	// it does notice when that process dies.
	ns.mustSystemctl("kill", "--kill-who=main", "--signal=SIGKILL", systemdUnit)
	if _, err := ns.console.wait("Main process exited, code=killed", nil); err != nil {
		t.Fatalf("systemd did not notice that main process %s was killed: %v", pid, err)
	}
	if got := ns.show("Result"); got != "signal" {
		t.Errorf("Result=%s after the main process was killed, want signal", got)
	}
}

// TestSystemdReloadWithBrokenBinary: a reload after a bad deploy (the
// service's binary replaced by one that exits at once) fails, and says why;
// the old process stays the main process and keeps serving, and a reload
// after the good binary is back succeeds.
func TestSystemdReloadWithBrokenBinary(t *testing.T) {
	ns := systemdBoot(t)
	old := ns.start()
	svc := filepath.Join(ns.dir, "svc")
	systemdInstall(t, "/bin/false", svc)

	wait := ns.systemctlAsync("reload", systemdUnit)
	rel := ns.reports.next("reloaded")
	// Most often "exited before it was ready (exit status 1)"; "sending
	// state: ... broken pipe (exit status 1)" when false exits before the
	// old process has written the state.
	if !strings.HasPrefix(rel["err"], "new process ") || !strings.HasSuffix(rel["err"], "(exit status 1)") {
		t.Errorf("the reload client reported %v, want a new process that exited with status 1", rel)
	}
	if out, err := wait(); err == nil {
		t.Errorf("systemctl reload succeeded with a broken binary:\n%s", out)
	}
	if !strings.Contains(ns.serviceLog(), "reload failed: "+rel["err"]) {
		t.Errorf("the reload client's explanation is not in the unit's output:%s", ns.serviceLog())
	}
	if got := ns.show("ReloadResult"); got != "exit-code" {
		t.Errorf("ReloadResult=%s, want exit-code", got)
	}
	if got := ns.show("MainPID"); got != old {
		t.Errorf("MainPID=%s after a failed reload, want the old process %s", got, old)
	}
	if got := ns.show("ActiveState") + "/" + ns.show("SubState"); got != "active/running" {
		t.Errorf("unit is %s after a failed reload, want active/running", got)
	}
	if h := systemdHello(t, filepath.Join(ns.dir, "hello.sock")); h["pid"] != old || h["gen"] != "0" {
		t.Errorf("after a failed reload the unit's socket answered %v, want pid=%s gen=0", h, old)
	}

	systemdInstall(t, os.Args[0], svc)
	ns.reload(old, "1")
	ns.checkNoWarnings()
}

// TestSystemdFDStoreSurvivesRestart: a listener pushed to systemd's fd store
// (FileDescriptorStoreMax=) reaches the process that `systemctl restart`
// starts, under its name, and it is the same socket, not a new bind: the
// first process never accepts, and a connection queued in the backlog
// before the restart is accepted by the second.
func TestSystemdFDStoreSurvivesRestart(t *testing.T) {
	ns := systemdBoot(t,
		"FileDescriptorStoreMax=16",
		"Environment="+envSystemdStore+"=1 "+envSystemdAccept+"=inherited")
	name := ListenerName("unix", filepath.Join(ns.dir, "hello.sock"))

	wait := ns.systemctlAsync("start", systemdUnit)
	first := ns.reports.next("started")
	if first["names"] != "" {
		t.Errorf("a fresh start inherited %q", first["names"])
	}
	r0 := ns.reports.next("ready")
	ns.mustWait("start", wait)
	if r0["inherited"] != "false" {
		t.Fatalf("the first process reports %v, want a listener of its own", r0)
	}
	// StoreFDs sent FDSTORE=1 before READY=1, and systemd handles the
	// datagrams in order: by the time start returned, the fd was stored.
	if got := ns.show("NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	queued, err := net.DialTimeout("unix", filepath.Join(ns.dir, "hello.sock"), testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer queued.Close()

	wait = ns.systemctlAsync("restart", systemdUnit)
	second := ns.reports.next("started")
	if second["restarted"] != "false" || second["names"] != name {
		t.Errorf("the process systemd started reports %v, want restarted=false names=%s", second, name)
	}
	r1 := ns.reports.next("ready")
	ns.mustWait("restart", wait)
	if r1["pid"] == r0["pid"] || r1["inherited"] != "true" || r1["ino"] != r0["ino"] {
		t.Errorf("after the restart: %v; before: %v; want a new pid serving the same socket (ino)", r1, r0)
	}
	if h := systemdReadHello(t, queued); h["pid"] != r1["pid"] {
		t.Errorf("the connection queued before the restart was answered by %v, want pid=%s", h, r1["pid"])
	}
	if got := ns.show("MainPID"); got != r1["pid"] {
		t.Errorf("MainPID=%s, want %s", got, r1["pid"])
	}
	// The second process stored the same socket again; systemd keeps one.
	if got := ns.show("NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the second StoreFDs, want 1", got)
	}
	ns.checkNoWarnings()
}

// TestSystemdPIDFileReload: with PIDFile= in the unit, systemd re-reads the
// file after every successful ExecReload= and takes the pid in it as the
// main pid; the file must name the new process by then, or systemd would go
// back to the old one, which is about to exit.
func TestSystemdPIDFileReload(t *testing.T) {
	ns := systemdBoot(t, "PIDFile={dir}/svc.pid", "Environment="+envSystemdPIDFile+"={dir}/svc.pid")
	pidFile := filepath.Join(ns.dir, "svc.pid")
	pid := ns.start()
	if got := systemdReadPIDFile(t, pidFile); got != pid {
		t.Errorf("pid file holds %s, want %s", got, pid)
	}
	for gen := 1; gen <= 3; gen++ {
		pid = ns.reload(pid, strconv.Itoa(gen))
		if got := systemdReadPIDFile(t, pidFile); got != pid {
			t.Errorf("after reload %d the pid file holds %s, want %s", gen, got, pid)
		}
	}
	ns.checkNoWarnings()
}

func systemdReadPIDFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 || b[len(b)-1] != '\n' {
		t.Errorf("pid file %q is not one line", b)
	}
	return strings.TrimSpace(string(b))
}

// systemdNotifyRecorder plays systemd's notify socket for tests that need
// no systemd: a datagram socket with SO_PASSCRED, so that every datagram
// comes with its sender's pid, as systemd receives them.
type systemdNotifyRecorder struct {
	path string
	conn *net.UnixConn
}

// systemdDatagram is one notification: who sent it, its text, and the fds
// that came with it (the receiver's to close).
type systemdDatagram struct {
	pid  int
	text string
	fds  []int
}

func systemdListenNotify(t *testing.T, dir string) *systemdNotifyRecorder {
	t.Helper()
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	return &systemdNotifyRecorder{path: path, conn: conn}
}

// recv returns the next datagram, waiting for it up to testDeadline if
// wait is set; without wait it only takes one already queued. A datagram
// is queued by the time its sender's sendmsg returns, so a recv without
// wait tells exactly what was sent so far.
func (r *systemdNotifyRecorder) recv(t *testing.T, wait bool) (systemdDatagram, bool) {
	t.Helper()
	if err := r.conn.SetReadDeadline(time.Now().Add(testDeadline)); err != nil {
		t.Fatal(err)
	}
	rc, err := r.conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, sdMaxDatagram+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*sdMaxFDs))
	var n, oobn, flags int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return !wait || rerr != unix.EAGAIN
			}
		}
	})
	if err != nil {
		t.Fatalf("waiting for a notification on %s: %v", r.path, err)
	}
	if rerr == unix.EAGAIN {
		return systemdDatagram{}, false
	}
	if rerr != nil {
		t.Fatal(os.NewSyscallError("recvmsg", rerr))
	}
	d := systemdDatagram{text: string(buf[:n])}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level != unix.SOL_SOCKET:
		case m.Header.Type == unix.SCM_CREDENTIALS:
			cred, err := unix.ParseUnixCredentials(&m)
			if err != nil {
				t.Fatal(err)
			}
			d.pid = int(cred.Pid)
		case m.Header.Type == unix.SCM_RIGHTS:
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				t.Fatal(err)
			}
			d.fds = append(d.fds, fds...)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		sdCloseFDs(d.fds)
		t.Fatalf("truncated datagram %q (flags %#x)", d.text, flags)
	}
	return d, true
}

// expect checks that the next datagram is text from pid, without fds.
func (r *systemdNotifyRecorder) expect(t *testing.T, pid int, text string) {
	t.Helper()
	d, _ := r.recv(t, true)
	sdCloseFDs(d.fds)
	if d.pid != pid || d.text != text || len(d.fds) != 0 {
		t.Fatalf("got %q from pid %d with %d fds, want %q from pid %d", d.text, d.pid, len(d.fds), text, pid)
	}
}

// barrier checks that the next datagram is BARRIER=1 from pid with one fd,
// the write end of a pipe, and returns that fd: the sender's Barrier waits
// until it is closed.
func (r *systemdNotifyRecorder) barrier(t *testing.T, pid int) int {
	t.Helper()
	d, _ := r.recv(t, true)
	if d.pid != pid || d.text != "BARRIER=1" || len(d.fds) != 1 {
		sdCloseFDs(d.fds)
		t.Fatalf("got %q from pid %d with %d fds, want BARRIER=1 from pid %d with one fd", d.text, d.pid, len(d.fds), pid)
	}
	var st unix.Stat_t
	if err := unix.Fstat(d.fds[0], &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Errorf("the barrier fd is not a pipe (mode %#o, %v)", st.Mode, err)
	}
	return d.fds[0]
}

// expectNone checks that nothing was sent that was not received yet.
func (r *systemdNotifyRecorder) expectNone(t *testing.T, why string) {
	t.Helper()
	if d, ok := r.recv(t, false); ok {
		sdCloseFDs(d.fds)
		t.Errorf("%s, pid %d sent %q with %d fds", why, d.pid, d.text, len(d.fds))
	}
}

// announced follows a "systemd-service" process's datagrams once it is the
// main process: STATUS=main pid=N and a barrier, which the test releases.
func (r *systemdNotifyRecorder) announced(t *testing.T, reports *testReports, pid int) {
	t.Helper()
	r.expect(t, pid, "STATUS=main pid="+strconv.Itoa(pid))
	unix.Close(r.barrier(t, pid))
	if m := reports.next("main"); m["pid"] != strconv.Itoa(pid) || m["err"] != "<nil>" {
		t.Fatalf("main report %v, want pid=%d err=<nil>", m, pid)
	}
}

// systemdMonotonicUsec reads CLOCK_MONOTONIC in microseconds, the clock of
// MONOTONIC_USEC.
func systemdMonotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1e3
}

var systemdReloadingRE = regexp.MustCompile(`^RELOADING=1\nMONOTONIC_USEC=([0-9]+)$`)

// systemdStartNotified starts generation 0 of a "systemd-service"
// cluster whose notify socket is rec, and follows its first datagrams.
func systemdStartNotified(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, env ...string) int {
	t.Helper()
	r0 := c.start("systemd-service", append([]string{"NOTIFY_SOCKET=" + rec.path}, env...)...)
	pid, _ := strconv.Atoi(r0["pid"])
	rec.expect(t, pid, "READY=1") // a fresh start announces itself
	rec.announced(t, c.reports, pid)
	return pid
}

// systemdSighup sends the reload signal to old and checks the datagram that
// opens a Type=notify-reload reload: RELOADING=1 with MONOTONIC_USEC read
// between the signal and its arrival. It returns the pid of the new process
// the restart started, once that process reported its refused Send.
func systemdSighup(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, old int) int {
	t.Helper()
	before := systemdMonotonicUsec(t)
	if err := unix.Kill(old, unix.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d, _ := rec.recv(t, true)
	after := systemdMonotonicUsec(t)
	sdCloseFDs(d.fds)
	m := systemdReloadingRE.FindStringSubmatch(d.text)
	if d.pid != old || m == nil || len(d.fds) != 0 {
		t.Fatalf("got %q from pid %d with %d fds, want RELOADING=1 and MONOTONIC_USEC from pid %d", d.text, d.pid, len(d.fds), old)
	}
	if usec, _ := strconv.ParseInt(m[1], 10, 64); usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC=%d, want it between %d and %d, around the signal", usec, before, after)
	}
	st := c.reports.next("started")
	pid, _ := strconv.Atoi(st["pid"])
	c.track(pid)
	if early := c.reports.next("early"); early["pid"] != st["pid"] || !strings.Contains(early["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send before Ready: %v, want ErrNotMain", early)
	}
	return pid
}

// systemdHandOver follows the datagrams of a successful handover from old
// to pid while the test holds the barrier: MAINPID and READY=1 from old in
// one datagram, a barrier from old, and nothing from pid until the barrier
// is released. release runs while the barrier is held.
func systemdHandOver(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, old, pid int, release func()) {
	t.Helper()
	rec.expect(t, old, fmt.Sprintf("MAINPID=%d\nREADY=1", pid))
	fd := rec.barrier(t, old)
	closed := false
	defer func() {
		if !closed {
			unix.Close(fd)
		}
	}()
	// The new process is ready, and not main: its Send is refused.
	if nm := c.reports.next("notmain"); nm["pid"] != strconv.Itoa(pid) || !strings.Contains(nm["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send after Ready, before the barrier was released: %v, want ErrNotMain", nm)
	}
	if ready := c.reports.next("ready"); ready["pid"] != strconv.Itoa(pid) {
		t.Fatalf("ready report %v, want pid=%d", ready, pid)
	}
	rec.expectNone(t, "while the barrier was held")
	if release != nil {
		release()
	}
	unix.Close(fd)
	closed = true
	if repl := c.reports.next("replaced"); repl["pid"] != strconv.Itoa(old) || repl["new"] != strconv.Itoa(pid) {
		t.Fatalf("old process reported %v, want pid=%d new=%d", repl, old, pid)
	}
	rec.announced(t, c.reports, pid)
}

// TestSystemdNotifyReloadDatagrams: systemd 252 has no Type=notify-reload,
// so the datagrams a Type=notify-reload unit would see are checked against
// a notify socket of the test's. On the reload signal: RELOADING=1 with
// MONOTONIC_USEC, then from the old process MAINPID=new and READY=1 in one
// datagram, then a barrier, and nothing from the new process before the
// barrier is released. A restart that fails ends the reload with READY=1
// and a STATUS that says why, and the old process keeps serving.
func TestSystemdNotifyReloadDatagrams(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t, c.dir)
	knob := filepath.Join(c.dir, "fail")
	hello := filepath.Join(c.dir, "hello.sock")
	p0 := systemdStartNotified(t, c, rec, envSystemdNotifyReload+"=1", envTestFailFile+"="+knob, envSystemdListen+"="+hello)

	p1 := systemdSighup(t, c, rec, p0)
	systemdHandOver(t, c, rec, p0, p1, nil)

	// A bad deploy: the next new process exits before Ready.
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	bad := systemdSighup(t, c, rec, p1)
	want := fmt.Sprintf("READY=1\nSTATUS=restart failed: new process %d: exited before it was ready (exit status 3)", bad)
	rec.expect(t, p1, want)
	waitGone(t, bad)
	rec.expectNone(t, "after the failed restart")
	if h := systemdHello(t, hello); h["pid"] != strconv.Itoa(p1) {
		t.Errorf("after a failed restart the socket answered %v, want pid=%d", h, p1)
	}

	p2 := systemdSighup(t, c, rec, p1)
	systemdHandOver(t, c, rec, p1, p2, nil)
	if h := systemdHello(t, hello); h["pid"] != strconv.Itoa(p2) || h["gen"] != "2" {
		t.Errorf("the socket answered %v, want pid=%d gen=2", h, p2)
	}
}

// TestSystemdHandOverWaitsForBarrier: the old process sends MAINPID and
// READY=1, then a barrier, and answers the requester only once systemd has
// released the barrier, that is, has processed MAINPID; until then the new
// process, ready but not main, has its own Send refused with ErrNotMain.
func TestSystemdHandOverWaitsForBarrier(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t, c.dir)
	p0 := systemdStartNotified(t, c, rec)

	type result struct {
		pid      int
		err      error
		released bool // the barrier had been released when RequestRestart returned
	}
	var released atomic.Bool
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		pid, err := RequestRestart(ctx, c.socket)
		done <- result{pid, err, released.Load()}
	}()
	st := c.reports.next("started")
	p1, _ := strconv.Atoi(st["pid"])
	c.track(p1)
	if early := c.reports.next("early"); !strings.Contains(early["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send before Ready: %v, want ErrNotMain", early)
	}
	systemdHandOver(t, c, rec, p0, p1, func() {
		// The old process sent its barrier and the new process is ready:
		// an old process that did not wait for the barrier would have
		// answered by now.
		select {
		case r := <-done:
			t.Fatalf("RequestRestart returned (%d, %v) before the barrier was released", r.pid, r.err)
		default:
		}
		released.Store(true)
	})
	var r result
	select {
	case r = <-done:
	case <-time.After(testDeadline):
		t.Fatal("RequestRestart did not return after the barrier was released")
	}
	if r.err != nil || r.pid != p1 || !r.released {
		t.Errorf("RequestRestart returned (%d, %v) with the barrier released=%t, want (%d, nil) after the release", r.pid, r.err, r.released, p1)
	}
}

// TestSystemdPIDFile: Config.PIDFile is written atomically (only ever
// renamed into place, so a reader never sees it empty or partial), holds
// the process's pid once it is ready, and holds the new pid once a restart
// is complete, which is when a supervisor reads it.
func TestSystemdPIDFile(t *testing.T) {
	c := newTestCluster(t)
	run := filepath.Join(c.dir, "run")
	if err := os.Mkdir(run, 0o755); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(run, "svc.pid")
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(os.NewSyscallError("inotify_init1", err))
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, run, unix.IN_CREATE|unix.IN_MODIFY|unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_DELETE); err != nil {
		t.Fatal(os.NewSyscallError("inotify_add_watch", err))
	}

	r0 := c.start("systemd-service", "NOTIFY_SOCKET=", envSystemdPIDFile+"="+pidFile)
	if got := systemdReadPIDFile(t, pidFile); got != r0["pid"] {
		t.Errorf("pid file holds %s once the process is ready, want %s", got, r0["pid"])
	}
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err != nil {
		t.Fatal(err)
	}
	c.track(pid)
	if got := systemdReadPIDFile(t, pidFile); got != strconv.Itoa(pid) {
		t.Errorf("pid file holds %s when RequestRestart returned, want the new pid %d", got, pid)
	}
	c.reports.next("ready")
	c.reports.next("replaced")
	if got := systemdReadPIDFile(t, pidFile); got != strconv.Itoa(pid) {
		t.Errorf("pid file holds %s, want the new pid %d", got, pid)
	}

	// Every event on the pid file's own name is a rename into place.
	var renames int
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(in, buf)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			t.Fatal(os.NewSyscallError("read inotify", err))
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if name != filepath.Base(pidFile) {
				continue
			}
			if ev.Mask != unix.IN_MOVED_TO {
				t.Errorf("event %#x on %s: the pid file was written in place", ev.Mask, name)
			}
			renames++
		}
	}
	if renames != 2 {
		t.Errorf("the pid file was renamed into place %d times, want 2 (one per process)", renames)
	}
	if left, _ := filepath.Glob(filepath.Join(run, ".*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %q", left)
	}
}

// ==========================================================================
// examples/httpd and its shipped units under a real systemd
// ==========================================================================

// examples/httpd under a real systemd 252 (see zz_systemd_test.go for how it
// is booted), installed with the example's own unit files. The units are
// read from examples/httpd and changed only where this machine differs from
// a real install, each change an explicit substitution that fails the test
// if its text is no longer in the shipped file:
//
//   - httpd.service: the binary's path in ExecStart= and ExecReload=, and
//     -store-fds added to ExecStart= (the fd store is opt-in, and the flag
//     is the one the unit's users would add). ExecReload= runs a separate
//     copy of the same binary, so that a broken deploy of the server's
//     binary leaves the reload client intact and it is the library that
//     finds the new process failing. Without httpd.socket, the test also
//     drops the two lines that tie the service to it.
//   - httpd.socket: nothing. Its ListenStream=127.0.0.1:8080 is free in
//     the private net namespace, and the test connects there.
//
// A drop-in per unit adds what the test needs and the shipped units do not
// say: DefaultDependencies=no, because the default ones pull in
// sysinit.target and with it every unit of this machine's
// /lib/systemd/system; FileDescriptorStoreMax= for the fd store; the
// output of the service's processes (the reload client's verdict included)
// appended to a file the test reads; GORACE=atexit_sleep_ms=0, because the
// example is built with the race detector when this test binary is, and a
// race-enabled reload client would otherwise sleep a second before it
// exits; and, without httpd.socket, an ExecStartPre= that waits for the
// test's go-ahead, so that the test can connect while no httpd process
// exists and the fd store alone holds the listening socket.
//
// HTTP requests go to 127.0.0.1:8080 of the namespace from sockets this
// process creates on a thread that has joined the namespace's net namespace
// (sdhttpdDial); a socket stays in the net namespace it was created in.

// sdhttpdAddr is where the example listens, as httpd.socket's ListenStream=
// and as httpd's default -listen.
const sdhttpdAddr = "127.0.0.1:8080"

var sdhttpdRestartRE = regexp.MustCompile(`(?m)^Restart succeeded, child pid is ([1-9][0-9]*)$`)

// TestSystemdHTTPD: examples/httpd as a Type=notify service with the default
// NotifyAccess (main), under its own unit files.
func TestSystemdHTTPD(t *testing.T) {
	systemdSkip(t)
	bin := buildExample(t, "httpd")
	t.Run("SocketUnit", func(t *testing.T) { sdhttpdTestSocketUnit(t, bin) })
	t.Run("FDStore", func(t *testing.T) { sdhttpdTestFDStore(t, bin) })
	t.Run("StopAfterReload", func(t *testing.T) { sdhttpdTestStopAfterReload(t, bin) })
	t.Run("StoreFDsAfterReload", func(t *testing.T) { sdhttpdTestStoreFDsAfterReload(t, bin) })
}

// sdhttpdTestSocketUnit: with httpd.socket, a connection starts the
// service, whose main process is the one that answers; every `systemctl
// reload` makes a new process the main one without a word from systemd
// about a datagram from another pid; a reload into a binary that fails is
// reported as failed and changes nothing; the next good one succeeds; and
// `systemctl restart` starts a process that serves on the same socket.
func sdhttpdTestSocketUnit(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
	h.ns.mustSystemctl("start", "httpd.socket")
	if got := h.state("httpd.service"); got != "inactive/dead" {
		t.Fatalf("httpd.service is %s before the first connection, want inactive/dead", got)
	}
	if got := h.show("httpd.service", "NotifyAccess") + " " + h.show("httpd.service", "Type"); got != "main notify" {
		t.Errorf("NotifyAccess and Type are %q, want the defaults of the shipped unit, \"main notify\"", got)
	}
	ino, _ := h.listener()

	// The first request starts the service.
	pid := h.checkMain(0)
	h.checkHolds(pid, ino)

	restarts := 0
	for gen := 1; gen <= 3; gen++ {
		pid = h.reload(pid, gen, &restarts)
	}

	// A bad deploy: the server's binary now exits at once. The reload
	// client, a binary of its own, asks as usual; the old process sees its
	// new process exit before it was ready, and serves on.
	h.install([]byte("#!/bin/sh\nexit 3\n"))
	if out, err := h.ns.systemctl("reload", "httpd.service"); err == nil {
		t.Errorf("systemctl reload succeeded with a broken binary:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^Restart failed: new process [0-9]+: .*\(exit status 3\)$`).MatchString(h.log()) {
		t.Errorf("the reload client did not say that the new process exited with status 3:\n%s", h.log())
	}
	if got := h.show("httpd.service", "ReloadResult"); got != "exit-code" {
		t.Errorf("ReloadResult=%s after the failed reload, want exit-code", got)
	}
	if got := h.checkMain(3); got != pid {
		t.Errorf("after the failed reload pid %s is the main process, want the old one, %s", got, pid)
	}
	if n := len(sdhttpdRestartRE.FindAllString(h.log(), -1)); n != restarts {
		t.Errorf("the reload client reported %d successful restarts, want %d", n, restarts)
	}

	h.install(nil)
	pid = h.reload(pid, 4, &restarts)
	h.checkHolds(pid, ino)
	// Checked before the restart: after a reload, a stop does not wait for
	// the main process (see sdhttpdTestStopAfterReload), and the STOPPING=1
	// it sends on SIGTERM can then reach systemd after the new process is
	// the main one, which systemd reports as a datagram from a non-main pid.
	h.checkNoWarnings()

	// Every generation ran with -store-fds. The first one stored the
	// socket; systemd keeps one copy of a socket however often it is
	// stored.
	if got := h.show("httpd.service", "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	h.ns.mustSystemctl("restart", "httpd.service")
	fresh := h.checkMain(0)
	if fresh == pid {
		t.Fatalf("systemctl restart left pid %s the main process", pid)
	}
	h.checkHolds(fresh, ino)
	// systemd passes the socket unit's fd and the stored one, both named
	// "http": the same socket, which httpd takes once.
	if got := h.environ(fresh)["LISTEN_FDNAMES"]; got != "http:http" {
		t.Errorf("after the restart LISTEN_FDNAMES=%q, want the socket unit's and the stored fd, \"http:http\"", got)
	}
}

// sdhttpdTestFDStore: without httpd.socket, httpd binds 127.0.0.1:8080
// itself and keeps the socket in systemd's fd store. `systemctl restart`
// stops the process and starts another, and the socket lives on in the
// store in between: a connection made while no httpd process exists is
// queued, and the new process, given the socket back under "http", answers
// it without binding anything.
func sdhttpdTestFDStore(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, false)
	h.release()
	h.ns.mustSystemctl("start", "httpd.service")
	// httpd stores its socket after READY=1, so start may return first.
	h.waitShow("httpd.service", "NFileDescriptorStore", "1")
	pid := h.checkMain(0)
	ino, _ := h.listener()
	h.checkHolds(pid, ino)
	if got := h.environ(pid)["LISTEN_FDNAMES"]; got != "" {
		t.Errorf("the first process was passed fds named %q, want none", got)
	}

	wait := h.ns.systemctlAsync("restart", "httpd.service")
	h.waitShow("httpd.service", "SubState", "start-pre")
	// The old process is gone (the stop waited for it), and the new one
	// waits for the test's go-ahead before it starts: the listening socket
	// is open in systemd's fd store alone.
	if got := h.show("httpd.service", "MainPID"); got != "0" {
		t.Errorf("MainPID=%s while the new process has not started, want 0", got)
	}
	if _, err := os.Stat(h.procPath(pid, "")); err == nil {
		t.Errorf("the old process %s still exists", pid)
	}
	if got, _ := h.listener(); got != ino {
		t.Fatalf("while no httpd process runs the listening socket is inode %d, want %d", got, ino)
	}
	queued := h.dial()
	defer queued.Close()
	if _, err := io.WriteString(queued, "GET / HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if _, n := h.listener(); n != 1 {
		t.Errorf("%d connections in the listening socket's accept queue, want the test's one", n)
	}
	h.release()
	h.ns.mustWait("restart", wait)

	fresh := h.show("httpd.service", "MainPID")
	if p, gen := sdhttpdResponse(t, queued); p != fresh || gen != "0" {
		t.Errorf("the connection queued across the restart was answered by pid %s generation %s, want the new main process %s, generation 0", p, gen, fresh)
	}
	if got := h.checkMain(0); got != fresh || fresh == pid {
		t.Errorf("after the restart pid %s answers and %s is the main process, want a new process, not %s", got, fresh, pid)
	}
	h.checkHolds(fresh, ino)
	if got := h.environ(fresh)["LISTEN_FDNAMES"]; got != "http" {
		t.Errorf("after the restart LISTEN_FDNAMES=%q, want the stored socket, \"http\"", got)
	}
	if got := h.show("httpd.service", "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the restart, want 1", got)
	}
	h.checkNoWarnings()
}

// sdhttpdTestStopAfterReload: `systemctl stop` lets a request in flight
// complete, as httpd.service promises ("SIGKILL only after
// TimeoutStopSec"), before a reload and after one.
//
// After a reload it does not, under systemd 252: the main process is then
// one that systemd did not fork (MAINPID= named the old process's child),
// which systemd marks "alien" (service_set_main_pid: main_pid_alien) and
// does not wait for (unit_kill_context: "if (!main_pid_alien) wait_for_exit
// = true"). With no other process left in the cgroup, nothing is waited
// for, and service_enter_signal goes from SIGTERM straight to SIGKILL: the
// console shows "Killing process N (httpd) with signal SIGKILL" right
// after the stop began, the request in flight gets an EOF, and the unit
// ends "Failed with result 'signal'". The old process having exited makes
// no difference: systemd does not recompute main_pid_alien. In a `systemctl
// restart`, the STOPPING=1 that httpd sends on SIGTERM can then be read
// after the next process is the main one: "Got notification message from
// PID N, but reception only permitted for main PID M" (seen under load).
func sdhttpdTestStopAfterReload(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
	h.ns.mustSystemctl("start", "httpd.socket")
	pid := h.checkMain(0)
	h.stopWithRequestInFlight(pid, "before any reload")

	pid = h.checkMain(0) // the socket starts the service again
	restarts := 0
	pid = h.reload(pid, 1, &restarts)
	h.stopWithRequestInFlight(pid, "after a reload")
}

// stopWithRequestInFlight stops httpd.service while main process pid
// serves a slow request, and checks that the request completes and the
// unit stops cleanly.
func (h *sdhttpd) stopWithRequestInFlight(pid, when string) {
	h.t.Helper()
	c := h.dial()
	defer c.Close()
	// A first request on the connection shows that pid has accepted it;
	// the slow one then reaches pid alone, whether it reads it before the
	// stop or, draining, after.
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\n\r\n"); err != nil {
		h.t.Fatal(err)
	}
	br := bufio.NewReader(c)
	if got, _ := sdhttpdReadResponse(h.t, c, br); got != pid {
		h.t.Fatalf("pid %s answered, want the main process %s", got, pid)
	}
	if _, err := io.WriteString(c, "GET /slow?ms=300 HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\n\r\n"); err != nil {
		h.t.Fatal(err)
	}
	if out, err := h.ns.systemctl("stop", "httpd.service"); err != nil {
		h.t.Errorf("systemctl stop %s: %v\n%s", when, err, out)
	}
	c.SetReadDeadline(time.Now().Add(testDeadline))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		h.t.Errorf("%s, the request in flight at `systemctl stop` failed: %v", when, err)
	} else {
		resp.Body.Close()
	}
	if got := h.show("httpd.service", "Result"); got != "success" {
		h.t.Errorf("%s, `systemctl stop` ended with Result=%s, want success", when, got)
	}
	if k := h.ns.console.lines("with signal SIGKILL"); len(k) > 0 {
		h.t.Errorf("%s, systemd killed httpd at once, not after TimeoutStopSec:\n%s", when, strings.Join(k, "\n"))
	}
}

// sdhttpdTestStoreFDsAfterReload: with -store-fds, every generation stores
// the listening socket, as server.go's comment says ("every generation may
// do it"). A generation started by a reload calls StoreFDs as soon as
// Start returns, which is most often before the old process has made it
// the main process; StoreFDs then refuses with ErrNotMain, and the reload
// leaves "cannot keep the listening socket in systemd's fd store" in the
// log. (systemd still has the first generation's copy, the same socket,
// so a restart still finds it.) Three reloads, because a new process that
// loses the race to the handover stores its socket without a word.
func sdhttpdTestStoreFDsAfterReload(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
	h.ns.mustSystemctl("start", "httpd.socket")
	pid := h.checkMain(0)
	restarts := 0
	for gen := 1; gen <= 3; gen++ {
		pid = h.reload(pid, gen, &restarts)
		// After StoreFDs, httpd prints its "Instance no." line; the
		// reload may have returned before.
		h.waitLog(fmt.Sprintf("Instance no. %d listening on ", gen))
	}
	const warning = "cannot keep the listening socket in systemd's fd store"
	for _, line := range strings.Split(h.log(), "\n") {
		if strings.Contains(line, warning) {
			t.Errorf("a generation started by a reload could not store its socket:\n%s", line)
		}
	}
}

// sdhttpd is examples/httpd installed in a namespaced systemd.
type sdhttpd struct {
	t      *testing.T
	ns     *systemdNS
	bin    string   // the example, as built
	svc    string   // the server's binary, ExecStart='s
	gate   *os.File // the ExecStartPre= fifo, read and write; nil with httpd.socket
	client *http.Client
}

// sdhttpdBoot boots systemd and installs httpd.service, with httpd.socket
// if socket is set, from the files in examples/httpd. Neither is started.
func sdhttpdBoot(t *testing.T, bin string, socket bool) *sdhttpd {
	t.Helper()
	ns := systemdBoot(t)
	h := &sdhttpd{t: t, ns: ns, bin: bin, svc: filepath.Join(ns.dir, "httpd")}
	reloader := filepath.Join(ns.dir, "httpd-reload")
	for _, dst := range []string{h.svc, reloader} {
		if err := copyExecutable(bin, dst); err != nil {
			t.Fatal(err)
		}
	}

	service := sdhttpdReadUnit(t, "httpd.service")
	service = sdhttpdReplace(t, service, "\nExecStart=/usr/local/bin/httpd ", "\nExecStart="+h.svc+" -store-fds ")
	service = sdhttpdReplace(t, service, "\nExecReload=/usr/local/bin/httpd ", "\nExecReload="+reloader+" ")
	dropIn := []string{
		"[Unit]",
		"DefaultDependencies=no",
		"[Service]",
		"FileDescriptorStoreMax=4",
		"StandardOutput=append:" + filepath.Join(ns.dir, "httpd.log"),
		"StandardError=inherit",
		"Environment=\"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0") + "\"",
	}
	units := map[string]string{"httpd.service": service}
	if socket {
		sock := sdhttpdReadUnit(t, "httpd.socket")
		if !strings.Contains(sock, "\nListenStream="+sdhttpdAddr+"\n") {
			t.Fatalf("httpd.socket does not listen on %s, where the test connects:\n%s", sdhttpdAddr, sock)
		}
		units["httpd.socket"] = sock
		units["httpd.socket.d/test.conf"] = "[Unit]\nDefaultDependencies=no\n"
	} else {
		service = sdhttpdReplace(t, service, "\nRequires=httpd.socket\n", "\n")
		units["httpd.service"] = sdhttpdReplace(t, service, "\nAfter=httpd.socket\n", "\n")
		gate := filepath.Join(ns.dir, "gate")
		if err := unix.Mkfifo(gate, 0o600); err != nil {
			t.Fatal(os.NewSyscallError("mkfifo", err))
		}
		// Read and write: the test never blocks on opening or writing it,
		// and the shell never sees its end.
		f, err := os.OpenFile(gate, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		h.gate = f
		dropIn = append(dropIn, "ExecStartPre=/bin/sh -c 'read -r go < "+gate+"'")
	}
	units["httpd.service.d/test.conf"] = strings.Join(dropIn, "\n") + "\n"
	for _, line := range strings.Split(units["httpd.service"], "\n") {
		if !strings.HasPrefix(line, "#") && strings.Contains(line, "/usr/local/bin/") {
			t.Fatalf("httpd.service names /usr/local/bin in a line the test does not rewrite: %q", line)
		}
	}

	// boot.sh copied the units that were there at boot into the
	// namespace's private /run; these go there too, through systemd's
	// root, and a daemon-reload makes systemd read them.
	run := h.rootPath("/run/systemd/system")
	for name, text := range units {
		path := filepath.Join(run, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ns.mustSystemctl("daemon-reload")

	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return sdhttpdDial(ctx, ns.pid, network, addr)
		},
		// A connection per request: no idle connection keeps an old
		// process draining, or answers from a process that is not the
		// main one any more.
		DisableKeepAlives: true,
	}
	h.client = &http.Client{Transport: tr, Timeout: testDeadline}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		if b := h.log(); strings.Contains(b, "WARNING: DATA RACE") {
			t.Errorf("the race detector found a race in an httpd process:\n%s", b)
		} else if t.Failed() {
			t.Logf("httpd's output:\n%s", b)
		}
	})
	return h
}

// sdhttpdReadUnit returns the text of a unit file shipped with the example.
func sdhttpdReadUnit(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("examples", "httpd", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// sdhttpdReplace replaces old in text with repl, and fails the test unless
// old is there exactly once: a changed unit file must not go untested
// because a substitution silently did nothing.
func sdhttpdReplace(t *testing.T, text, old, repl string) string {
	t.Helper()
	if n := strings.Count(text, old); n != 1 {
		t.Fatalf("the unit file has %q %d times, want once; update the test's substitution:\n%s", old, n, text)
	}
	return strings.Replace(text, old, repl, 1)
}

// sdhttpdDial connects to addr from inside the net namespace of process
// pid. Only the socket's creation needs the namespace: the goroutine locks
// itself to its thread, moves the thread into the namespace, dials, and
// moves the thread back before it ends. It never unlocks, so that the
// runtime ends the thread with the goroutine rather than let other
// goroutines run on it; but if the thread is the main one, the runtime
// keeps it, and /proc/self/net (the main thread's namespace) would
// otherwise show the systemd namespace's sockets to every later test.
func sdhttpdDial(ctx context.Context, pid int, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("open", err)}
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("open", err)}
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("setns", err)}
			return
		}
		defer func() {
			if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
				panic("sdhttpdDial: cannot return to the test's net namespace: " + err.Error())
			}
		}()
		// An IP literal: no resolver, and a single address, which the
		// dialer tries in this goroutine.
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// dial connects to the example's address in the namespace.
func (h *sdhttpd) dial() net.Conn {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	c, err := sdhttpdDial(ctx, h.ns.pid, "tcp", sdhttpdAddr)
	if err != nil {
		h.t.Fatal(err)
	}
	return c
}

// get sends GET / and returns the pid and generation the answer names.
func (h *sdhttpd) get() (pid, gen string) {
	h.t.Helper()
	resp, err := h.client.Get("http://" + sdhttpdAddr + "/")
	if err != nil {
		h.t.Fatalf("GET /: %v", err)
	}
	defer resp.Body.Close()
	return sdhttpdBody(h.t, resp)
}

// sdhttpdResponse reads the response to a GET / written on c.
func sdhttpdResponse(t *testing.T, c net.Conn) (pid, gen string) {
	t.Helper()
	return sdhttpdReadResponse(t, c, bufio.NewReader(c))
}

// sdhttpdReadResponse reads the response to a GET / written on c, through
// br, a reader of c.
func sdhttpdReadResponse(t *testing.T, c net.Conn, br *bufio.Reader) (pid, gen string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testDeadline))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	defer resp.Body.Close()
	return sdhttpdBody(t, resp)
}

func sdhttpdBody(t *testing.T, resp *http.Response) (pid, gen string) {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	m := httpdBodyRE.FindStringSubmatch(string(b))
	if resp.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("GET / answered %s %q, want 200 and pid=PID generation=G", resp.Status, b)
	}
	return m[1], m[2]
}

// show returns a property of unit.
func (h *sdhttpd) show(unit, prop string) string {
	h.t.Helper()
	return h.ns.mustSystemctl("show", "--property="+prop, "--value", unit)
}

func (h *sdhttpd) state(unit string) string {
	h.t.Helper()
	return h.show(unit, "ActiveState") + "/" + h.show(unit, "SubState")
}

// waitShow waits until a property of unit has the value want.
func (h *sdhttpd) waitShow(unit, prop, want string) {
	h.t.Helper()
	deadline := time.Now().Add(testDeadline)
	for {
		got := h.show(unit, prop)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s of %s is %s after %v, want %s", prop, unit, got, testDeadline, want)
		}
	}
}

// checkMain sends GET / (which starts the service, with httpd.socket) and
// checks that the process that answered, as generation gen, is the main
// process of the service, which is active. It returns that pid.
func (h *sdhttpd) checkMain(gen int) string {
	h.t.Helper()
	pid, g := h.get()
	if g != strconv.Itoa(gen) {
		h.t.Errorf("pid %s answered as generation %s, want %d", pid, g, gen)
	}
	if got := h.show("httpd.service", "MainPID"); got != pid {
		h.t.Errorf("MainPID=%s, but pid %s answered", got, pid)
	}
	if got := h.state("httpd.service"); got != "active/running" {
		h.t.Errorf("httpd.service is %s, want active/running", got)
	}
	return pid
}

// reload runs `systemctl reload httpd`, which must succeed, and checks that
// the new process the reload client names is the main process and answers
// as generation gen. It returns the new pid.
func (h *sdhttpd) reload(old string, gen int, restarts *int) string {
	h.t.Helper()
	h.ns.mustSystemctl("reload", "httpd.service")
	*restarts++
	m := sdhttpdRestartRE.FindAllStringSubmatch(h.log(), -1)
	if len(m) != *restarts {
		h.t.Fatalf("the reload client reported %d successful restarts, want %d:\n%s", len(m), *restarts, h.log())
	}
	pid := m[len(m)-1][1]
	if pid == old {
		h.t.Fatalf("the reload client reported the old pid %s", pid)
	}
	if got := h.checkMain(gen); got != pid {
		h.t.Errorf("pid %s answered after the reload, the reload client said %s", got, pid)
	}
	return pid
}

// install replaces the server's binary as a deploy would: a new file renamed
// over the old one. nil installs the example.
func (h *sdhttpd) install(text []byte) {
	h.t.Helper()
	if text == nil {
		systemdInstall(h.t, h.bin, h.svc)
		return
	}
	if err := os.WriteFile(h.svc+".new", text, 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(h.svc+".new", h.svc); err != nil {
		h.t.Fatal(err)
	}
}

// release lets the next start of the service past its ExecStartPre=.
func (h *sdhttpd) release() {
	h.t.Helper()
	if _, err := h.gate.WriteString("go\n"); err != nil {
		h.t.Fatal(err)
	}
}

// waitLog waits until the service's processes have written a line that
// contains s. The file grows by appends, which inotify reports.
func (h *sdhttpd) waitLog(s string) {
	h.t.Helper()
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		h.t.Fatal(os.NewSyscallError("inotify_init1", err))
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, filepath.Join(h.ns.dir, "httpd.log"), unix.IN_MODIFY); err != nil {
		h.t.Fatal(os.NewSyscallError("inotify_add_watch", err))
	}
	deadline := time.Now().Add(testDeadline)
	buf := make([]byte, 4096)
	for !strings.Contains(h.log(), s) {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			h.t.Fatalf("no %q in httpd's output within %v", s, testDeadline)
		}
		if _, err := unix.Poll([]unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}}, ms); err != nil && err != unix.EINTR {
			h.t.Fatal(os.NewSyscallError("poll", err))
		}
		// Drain the events; the file is read again either way.
		for {
			if _, err := unix.Read(in, buf); err != nil {
				break
			}
		}
	}
}

// log returns what the service's processes wrote.
func (h *sdhttpd) log() string {
	b, _ := os.ReadFile(filepath.Join(h.ns.dir, "httpd.log"))
	return string(b)
}

// rootPath is the path of path in the namespace's mounts: under the
// namespaced systemd's root, /run is the namespace's private tmpfs and
// /proc the pid namespace's own.
func (h *sdhttpd) rootPath(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", h.ns.pid, path)
}

// procPath is the path of /proc/PID/NAME in the namespace, pid as the
// namespace knows it (MainPID=, the pid in httpd's answer).
func (h *sdhttpd) procPath(pid, name string) string {
	return h.rootPath("/proc/" + pid + "/" + name)
}

// listener returns the inode of the socket listening on sdhttpdAddr in the
// namespace, and how many connections its accept queue holds. For a
// listening socket, /proc/net/tcp's rx_queue is the accept queue's length.
func (h *sdhttpd) listener() (ino uint64, queued int) {
	h.t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", h.ns.pid))
	if err != nil {
		h.t.Fatal(err)
	}
	const local, listen = "0100007F:1F90", "0A" // 127.0.0.1:8080, TCP_LISTEN
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[1] != local || f[3] != listen {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		q, err1 := strconv.ParseUint(rx, 16, 32)
		ino, err2 := strconv.ParseUint(f[9], 10, 64)
		if err1 != nil || err2 != nil {
			h.t.Fatalf("cannot parse %q", line)
		}
		return ino, int(q)
	}
	h.t.Fatalf("nothing listens on %s in the namespace:\n%s", sdhttpdAddr, b)
	return 0, 0
}

// checkHolds checks that process pid has the socket ino open.
func (h *sdhttpd) checkHolds(pid string, ino uint64) {
	h.t.Helper()
	dir := h.procPath(pid, "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		h.t.Fatal(err)
	}
	want := fmt.Sprintf("socket:[%d]", ino)
	for _, e := range ents {
		if l, _ := os.Readlink(filepath.Join(dir, e.Name())); l == want {
			return
		}
	}
	h.t.Errorf("pid %s does not hold the listening socket %s", pid, want)
}

// environ returns the environment process pid was started with (what
// execve got, not what the process made of it since).
func (h *sdhttpd) environ(pid string) map[string]string {
	h.t.Helper()
	b, err := os.ReadFile(h.procPath(pid, "environ"))
	if err != nil {
		h.t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

// checkNoWarnings checks that systemd dropped no datagram from a pid other
// than the main one. It first sends a datagram of its own to systemd's
// notify socket, from outside the namespace, so with no pid systemd can
// see, and waits for systemd to log that it ignored it: systemd reads the
// socket in order, so by then it has logged whatever it had to say about
// every datagram sent before, by any process.
func (h *sdhttpd) checkNoWarnings() {
	h.t.Helper()
	const ignored = "Received notify message without valid credentials"
	c := h.ns.console
	before := strings.Count(c.text(), ignored)
	n, err := NewSdNotifier(h.rootPath("/run/systemd/notify"))
	if err != nil {
		h.t.Fatal(err)
	}
	err = n.Send(SdStatus("flush"))
	n.Close()
	if err != nil {
		h.t.Fatal(err)
	}
	timer := time.NewTimer(testDeadline)
	defer timer.Stop()
	for {
		c.mu.Lock()
		text, changed, ended := string(c.buf), c.changed, c.ended
		c.mu.Unlock()
		if strings.Count(text, ignored) > before {
			break
		}
		if ended {
			h.t.Fatalf("the console closed before systemd logged %q", ignored)
		}
		select {
		case <-changed:
		case <-timer.C:
			h.t.Fatalf("systemd did not log %q within %v", ignored, testDeadline)
		}
	}
	h.ns.checkNoWarnings()
}

// ==========================================================================
// Hardening: faults, storms, long runs, hostile neighbours, fuzzing
// ==========================================================================

// This file hardens the package against hostile input, faults and long
// runs: fuzzing of what a new process parses from its environment; real
// processes whose old process is SIGKILLed mid-restart, that are stormed
// with requests, or restarted 200 times in a row; fd leak checks around the
// in-process control socket code; and hostile environments handed to a real
// re-executed process.
//
// The fault tests run their generations under a subreaper (the
// "fault-reaper" role): an old generation is the parent of the new one and
// exits after the handover, so every new generation is orphaned. Under the
// subreaper, orphans are reaped at once and each exit is reported, so a test
// can wait for the exact event instead of guessing when whatever pid 1 is
// got round to it.

func init() {
	testRoles["fault-reaper"] = faultReaper
	testRoles["fault-gen"] = faultGen
	testRoles["fault-inherit"] = faultInherit
}

const (
	envFaultChild  = "SHELLFLIP_TEST_FAULT_CHILD"  // the role the reaper starts
	envFaultListen = "SHELLFLIP_TEST_FAULT_LISTEN" // a unix socket path on which fault-gen says who it is
)

// faultGorace is the GORACE setting for the processes these tests start:
// the race detector's runtime sleeps for a second when a process exits
// (atexit_sleep_ms=1000 by default), which would make every generation of
// a long chain take a second to go away.
func faultGorace() string {
	return "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")
}

// faultReaper makes itself the child subreaper, starts generation 0 of the
// role named by $SHELLFLIP_TEST_FAULT_CHILD and reaps every process that is
// orphaned below it, reporting each exit.
func faultReaper() int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		report("error pid=%d prctl: %v", os.Getpid(), err)
		return 1
	}
	env := faultSetEnv(os.Environ(), envTestRole+"="+os.Getenv(envFaultChild))
	child, err := syscall.ForkExec(os.Args[0], []string{os.Args[0], "-test.run=^$"},
		&syscall.ProcAttr{Env: env, Files: []uintptr{0, 1, 2}})
	if err != nil {
		report("error pid=%d fork: %v", os.Getpid(), err)
		return 1
	}
	report("reaper pid=%d child=%d", os.Getpid(), child)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// ECHILD: the last generation is gone.
			return 0
		}
		status := waitStatusString(syscall.WaitStatus(ws))
		report("reaped pid=%d status=%s", pid, strings.ReplaceAll(status, " ", "_"))
	}
}

// faultSetEnv returns env with each KEY=value of kvs replacing any variable
// of the same name: syscall.ForkExec, unlike os/exec, does not deduplicate.
func faultSetEnv(env []string, kvs ...string) []string {
	out := make([]string, 0, len(env)+len(kvs))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if !slices.ContainsFunc(kvs, func(s string) bool { return strings.HasPrefix(s, k+"=") }) {
			out = append(out, kv)
		}
	}
	return append(out, kvs...)
}

// faultGen is the smallest service there is: it receives its generation
// number as the state, optionally serves its identity on a unix socket,
// optionally waits on the hold fifo before Start (new processes only), and
// reports when it is ready, when it is main and when it was replaced. Every
// report carries a field after the pid so that a test can wait for one
// process's report with the prefix "kind pid=N".
func faultGen() int {
	pid := os.Getpid()
	gen := 0
	st, err := ReceiveState()
	if err != nil {
		report("error pid=%d receive: %v", pid, err)
		return 1
	}
	if st != nil {
		b, err := io.ReadAll(st)
		st.Close()
		g, aerr := strconv.Atoi(string(b))
		if err != nil || aerr != nil {
			report("error pid=%d state %q: %v", pid, b, err)
			return 1
		}
		gen = g + 1
	}
	if path := os.Getenv(envFaultListen); path != "" {
		ln, err := Listen("unix", path)
		if err != nil {
			report("error pid=%d listen: %v", pid, err)
			return 1
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "pid=%d gen=%d\n", pid, gen)
				c.Close()
			}
		}()
	}
	if fifo := os.Getenv(envTestHoldFIFO); fifo != "" && StartedByRestart() {
		report("holding pid=%d gen=%d", pid, gen)
		f, err := os.Open(fifo)
		if err == nil {
			bufio.NewReader(f).ReadString('\n')
			f.Close()
		}
	}
	r, err := Start(context.Background(), Config{
		SocketPath: os.Getenv(envTestSocket),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprint(w, gen)
			return err
		}},
	})
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	// Ready returns the first call's result: the one Start got.
	rerr := Ready()
	report("ready pid=%d gen=%d gone=%t main=%t readyerr=%v", pid, gen, errors.Is(rerr, ErrOldProcessGone), IsMain(), rerr)
	go func() {
		<-MainChan()
		report("main pid=%d gen=%d", pid, gen)
	}()
	p, err := r.Wait()
	if err != nil {
		report("ended pid=%d err=%v", pid, err)
		return 1
	}
	report("replaced pid=%d new=%d", pid, p.Pid)
	return 0
}

// faultCluster is a fault-gen service under a fault-reaper.
type faultCluster struct {
	t       *testing.T
	dir     string
	socket  string
	fifo    string // the hold fifo, if the cluster holds new processes
	reports *testReports
	reaper  *exec.Cmd
	gen0    int

	mu   sync.Mutex
	live map[int]bool // generations started and not seen reaped
}

// newFaultCluster starts a reaper and generation 0, and waits until
// generation 0 is ready. With hold, every new process waits on a fifo
// before Start until the test calls release.
func newFaultCluster(t *testing.T, hold bool, env ...string) *faultCluster {
	t.Helper()
	dir := t.TempDir()
	c := &faultCluster{t: t, dir: dir, socket: filepath.Join(dir, "ctl.sock"), live: map[int]bool{}}
	c.reports = newTestReports(t, dir)
	if hold {
		c.fifo = filepath.Join(dir, "hold")
		if err := unix.Mkfifo(c.fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		env = append(env, envTestHoldFIFO+"="+c.fifo)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		envTestRole+"=fault-reaper",
		envFaultChild+"=fault-gen",
		envTestReport+"="+c.reports.path,
		envTestSocket+"="+c.socket,
		faultGorace())
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c.reaper = cmd
	t.Cleanup(c.stop)
	rep := c.reports.next(fmt.Sprintf("reaper pid=%d", cmd.Process.Pid))
	c.gen0, _ = strconv.Atoi(rep["child"])
	c.track(c.gen0)
	c.reports.next(fmt.Sprintf("ready pid=%d", c.gen0))
	return c
}

func (c *faultCluster) track(pid int) {
	c.mu.Lock()
	c.live[pid] = true
	c.mu.Unlock()
}

// stop kills the generations still alive, then the reaper, and waits for it.
func (c *faultCluster) stop() {
	c.mu.Lock()
	for pid := range c.live {
		unix.Kill(pid, unix.SIGKILL)
	}
	c.mu.Unlock()
	c.reaper.Process.Kill()
	c.reaper.Wait()
}

// awaitReaped waits until the reaper reaped pid, and returns how it ended.
func (c *faultCluster) awaitReaped(pid int) string {
	c.t.Helper()
	rep := c.reports.next(fmt.Sprintf("reaped pid=%d", pid))
	c.mu.Lock()
	delete(c.live, pid)
	c.mu.Unlock()
	return strings.ReplaceAll(rep["status"], "_", " ")
}

// release lets one held new process go on to Start. Opening the fifo for
// writing blocks until the held process opens it for reading; if none does
// in time, the open is unblocked and the test fails.
func (c *faultCluster) release() {
	c.t.Helper()
	timer := time.AfterFunc(testDeadline, func() {
		// A reader's open unblocks the writer's.
		if f, err := os.OpenFile(c.fifo, os.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			defer f.Close()
		}
	})
	f, err := os.OpenFile(c.fifo, os.O_WRONLY, 0)
	if !timer.Stop() {
		if err == nil {
			f.Close()
		}
		c.t.Fatalf("no process held on %s within %v", c.fifo, testDeadline)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	f.WriteString("go\n")
	f.Close()
}

// restart asks for a restart of generation old, releases the new process
// if the cluster holds it, and waits until the new generation is ready and
// main, and the old one reported its replacement and was reaped. It
// returns the new pid.
func (c *faultCluster) restart(old int) int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	type result struct {
		pid int
		err error
	}
	res := make(chan result, 1)
	go func() {
		pid, err := RequestRestart(ctx, c.socket)
		res <- result{pid, err}
	}()
	if c.fifo != "" {
		held := c.reports.next("holding")
		p, _ := strconv.Atoi(held["pid"])
		c.track(p)
		c.release()
	}
	r := <-res
	if r.err != nil {
		c.t.Fatalf("RequestRestart: %v (reports: %q)", r.err, c.reports.drain())
	}
	c.track(r.pid)
	c.reports.next(fmt.Sprintf("ready pid=%d", r.pid))
	repl := c.reports.next(fmt.Sprintf("replaced pid=%d", old))
	if repl["new"] != strconv.Itoa(r.pid) {
		c.t.Fatalf("pid %d reports it was replaced by %s; RequestRestart said %d", old, repl["new"], r.pid)
	}
	if st := c.awaitReaped(old); st != "exit status 0" {
		c.t.Fatalf("old generation %d ended with %s", old, st)
	}
	c.reports.next(fmt.Sprintf("main pid=%d", r.pid))
	return r.pid
}

func faultMedian(xs []int) int {
	s := slices.Sorted(slices.Values(xs))
	return s[len(s)/2]
}

// faultProc is one line of the process table.
type faultProc struct {
	pid, ppid int
	state     byte
	comm      string
}

// faultProcs reads the process table from /proc.
func faultProcs(t *testing.T) []faultProc {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var procs []faultProc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(b)
		open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || end < open {
			continue
		}
		f := strings.Fields(s[end+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		procs = append(procs, faultProc{pid: pid, ppid: ppid, state: f[0][0], comm: s[open+1 : end]})
	}
	return procs
}

// faultZombies lists the zombies whose parent is one of parents.
func faultZombies(t *testing.T, parents map[int]bool) []faultProc {
	t.Helper()
	var zs []faultProc
	for _, p := range faultProcs(t) {
		if p.state == 'Z' && parents[p.ppid] {
			zs = append(zs, p)
		}
	}
	return zs
}

// faultFDKinds counts a process's fds by what they are: "socket", "pipe",
// "anon_inode:[eventpoll]", or the path of a file.
func faultFDKinds(t *testing.T, pid int) map[string]int {
	t.Helper()
	kinds := map[string]int{}
	for _, target := range faultFDTargets(t, pid) {
		kind, _, _ := strings.Cut(target, ":[") // socket:[123], pipe:[123]
		if strings.HasPrefix(target, "anon_inode:") {
			kind = target
		}
		kinds[kind]++
	}
	return kinds
}

// faultSettledFDKinds returns a process's fds by kind once they have
// settled: a fd or two closes a moment after the events the test waits for
// (the readiness socket after the "main" report, the report socket after
// its datagram was received), and another process's fd table can only be
// polled. With want, it polls until the fds are want, and returns the last
// reading if they never are; without, until two readings agree.
func faultSettledFDKinds(t *testing.T, pid int, want map[string]int) map[string]int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	last := faultFDKinds(t, pid)
	for time.Now().Before(deadline) {
		if want != nil && maps.Equal(last, want) {
			return last
		}
		time.Sleep(10 * time.Millisecond)
		now := faultFDKinds(t, pid)
		if want == nil && maps.Equal(now, last) {
			return now
		}
		last = now
	}
	return last
}

// faultThreads returns a process's thread count.
func faultThreads(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	t.Fatalf("no Threads: line in /proc/%d/status", pid)
	return 0
}

// TestFaultOldProcessKilled: the old process is SIGKILLed after it spawned
// the new one and before the new one is ready. The new process notices when
// it says it is ready (Ready's write fails with EPIPE: notify.go, ready,
// "if err != nil { unix.Close(fd); becomeMain() ..."), and Start carries on
// rather than failing (restart.go, Start, "if !errors.Is(err,
// ErrOldProcessGone)"). What it then does, and this test pins down: it
// serves (its listeners answer), it considers itself main (IsMain is true
// at once: there is no one else to be main), and the control socket it
// inherited still works: a later RequestRestart on it succeeds, into a
// process that is a generation further on.
func TestFaultOldProcessKilled(t *testing.T) {
	t.Parallel()
	helloPath := filepath.Join(t.TempDir(), "hello.sock")
	c := newFaultCluster(t, true, envFaultListen+"="+helloPath)
	sayHello := func() string {
		t.Helper()
		conn, err := net.Dial("unix", helloPath)
		if err != nil {
			t.Fatalf("the service does not accept connections: %v", err)
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(testDeadline))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			t.Fatalf("the service does not answer: %v", err)
		}
		return strings.TrimSpace(line)
	}
	if got, want := sayHello(), fmt.Sprintf("pid=%d gen=0", c.gen0); got != want {
		t.Fatalf("service says %q, want %q", got, want)
	}

	// The requester whose restart is cut short by the kill.
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	reqErr := make(chan error, 1)
	go func() {
		_, err := RequestRestart(ctx, c.socket)
		reqErr <- err
	}()
	held := c.reports.next("holding")
	gen1, _ := strconv.Atoi(held["pid"])
	c.track(gen1)
	// The new process has received its state and waits before Ready.
	if err := unix.Kill(c.gen0, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if st := c.awaitReaped(c.gen0); st != "signal: killed" {
		t.Fatalf("generation 0 ended with %s, want signal: killed", st)
	}
	// Its requester is not left hanging: the connection died with it.
	if err := <-reqErr; err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the requester of the interrupted restart got %v, want a connection error", err)
	} else {
		t.Logf("requester of the interrupted restart: %v", err)
	}

	c.release()
	ready := c.reports.next(fmt.Sprintf("ready pid=%d", gen1))
	if ready["gone"] != "true" {
		t.Errorf("Ready returned %q, want an error wrapping ErrOldProcessGone", ready["readyerr"])
	}
	if ready["main"] != "true" {
		t.Errorf("IsMain is %s after the old process went away, want true", ready["main"])
	}
	c.reports.next(fmt.Sprintf("main pid=%d", gen1))
	if got, want := sayHello(), fmt.Sprintf("pid=%d gen=1", gen1); got != want {
		t.Errorf("service says %q, want %q: the orphaned process serves its inherited listener", got, want)
	}

	// The inherited control socket still works.
	gen2 := c.restart(gen1)
	if got, want := sayHello(), fmt.Sprintf("pid=%d gen=2", gen2); got != want {
		t.Errorf("service says %q, want %q", got, want)
	}
	if zs := faultZombies(t, map[int]bool{c.reaper.Process.Pid: true, c.gen0: true, gen1: true, gen2: true}); len(zs) > 0 {
		t.Errorf("zombies: %+v", zs)
	}
}

// TestFaultRestartStorm: 100 clients ask for a restart at once. Every one
// gets an answer: the pid of the one new process (the restart in flight
// answers all who asked meanwhile: restart.go, run, "Requests that arrive
// meanwhile share this restart's outcome"), or, if more than
// maxControlConns were being read at once, the "too many concurrent restart
// requests" failure (ctlsock.go, accept, the slots select), or the final
// outcome if its request was still being read when the restart completed.
// None sees its connection closed without an answer, none hangs, and
// exactly one new process results.
//
// The new process is held before Start until the old one has accepted every
// connection: a connection still in the listening socket's backlog when the
// new process starts accepting on the same socket (it inherited it) is the
// new process's to serve, and would rightly restart it again.
func TestFaultRestartStorm(t *testing.T) {
	t.Parallel()
	const n = 100
	c := newFaultCluster(t, true)
	type result struct {
		pid int
		err error
	}
	results := make(chan result, n)
	var answered atomic.Int32
	start := make(chan struct{})
	for range n {
		go func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			pid, err := RequestRestart(ctx, c.socket)
			answered.Add(1)
			results <- result{pid, err}
		}()
	}
	close(start)
	held := c.reports.next("holding")
	gen1, _ := strconv.Atoi(held["pid"])
	c.track(gen1)
	faultWaitAccepted(t, c.socket, c.gen0, n, &answered)
	c.release()

	pids, busy, cut := 0, 0, 0
	for range n {
		r := <-results
		switch {
		case r.err == nil && r.pid == gen1:
			pids++
		case r.err == nil:
			t.Errorf("a client got pid %d; the restart's new process is %d", r.pid, gen1)
		case errors.Is(r.err, ErrRestartFailed) && strings.Contains(r.err.Error(), "too many concurrent restart requests"):
			busy++
		case errors.Is(r.err, ErrRestartFailed) && strings.Contains(r.err.Error(), fmt.Sprintf("(replaced by pid %d)", gen1)):
			// The final outcome, for a client whose request was still
			// being read when the restart completed (ctlsock.go, serve,
			// "finish cut the read short").
			cut++
		default:
			t.Errorf("a client got no answer: %v", r.err)
		}
	}
	t.Logf("%d clients got the new pid, %d were told there were too many, %d got the outcome as a request cut short", pids, busy, cut)
	ready := c.reports.next(fmt.Sprintf("ready pid=%d", gen1))
	if ready["gen"] != "1" {
		t.Errorf("the new process is generation %s, want 1", ready["gen"])
	}
	repl := c.reports.next(fmt.Sprintf("replaced pid=%d", c.gen0))
	if repl["new"] != strconv.Itoa(gen1) {
		t.Errorf("generation 0 reports it was replaced by %s, want %d", repl["new"], gen1)
	}
	if st := c.awaitReaped(c.gen0); st != "exit status 0" {
		t.Errorf("generation 0 ended with %s", st)
	}
	// Exactly one new process: the only process below the reaper is
	// generation 1, and the next restart makes generation 2 out of it.
	c.reports.next(fmt.Sprintf("main pid=%d", gen1))
	var below []int
	for _, p := range faultProcs(t) {
		if p.ppid == c.reaper.Process.Pid || p.ppid == gen1 {
			below = append(below, p.pid)
		}
	}
	if !slices.Equal(below, []int{gen1}) {
		t.Errorf("processes below the reaper: %v, want only generation 1 (%d)", below, gen1)
	}
	gen2 := c.restart(gen1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live[gen2] || len(c.live) != 1 {
		t.Errorf("live processes %v, want only %d", c.live, gen2)
	}
}

// faultWaitAccepted waits until each of n clients of the unix socket at path
// either has its answer (answered counts them) or has its connection
// accepted by holder, and none waits in the listening socket's backlog.
// /proc/net/unix lists the server side of every connection, accepted or
// not, under the socket's path; those holder has not accepted are in no
// fd table of holder's.
func faultWaitAccepted(t *testing.T, path string, holder, n int, answered *atomic.Int32) {
	t.Helper()
	deadline := time.Now().Add(testDeadline)
	stable := 0
	for {
		conns := map[string]bool{}
		b, err := os.ReadFile("/proc/net/unix")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			// Num RefCount Protocol Flags Type St Inode Path: St 03 is connected.
			if f := strings.Fields(line); len(f) == 8 && f[7] == path && f[5] == "03" {
				conns["socket:["+f[6]+"]"] = true
			}
		}
		accepted := 0
		dir := fmt.Sprintf("/proc/%d/fd", holder)
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if target, err := os.Readlink(dir + "/" + e.Name()); err == nil && conns[target] {
				accepted++
			}
		}
		if accepted == len(conns) && accepted+int(answered.Load()) >= n {
			// Twice in a row, a poll apart, so that a client about to
			// connect has done so.
			if stable++; stable == 2 {
				return
			}
		} else {
			stable = 0
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections, %d accepted, %d answered, of %d clients", len(conns), accepted, answered.Load(), n)
		}
		// Another process's accepted connections can only be observed by
		// polling the kernel's tables.
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFaultRestartChain restarts 200 times in a row and checks that nothing
// accumulates: after each restart the old generation exits and is reaped,
// no process of the chain leaves a zombie child, and every generation has
// the fds (by kind) that generation 1 had. Threads are compared at the end:
// the median of the last 20 generations against that of the first 20.
//
// Generation 1 is the baseline, not generation 0: generation 0 was started
// by the test, not by a restart, so it never inherited a readiness socket,
// a state pipe or a control socket, and it bound the control socket itself.
// From generation 1 on every process started the same way, and is measured
// at the same point of its life: ready, main (its readiness socket closed),
// its predecessor reaped, no request in flight.
func TestFaultRestartChain(t *testing.T) {
	t.Parallel()
	n := 200
	if testing.Short() {
		n = 20
	}
	begin := time.Now()
	c := newFaultCluster(t, false)
	c.reports.next(fmt.Sprintf("main pid=%d", c.gen0))
	parents := map[int]bool{c.reaper.Process.Pid: true, c.gen0: true}
	var base map[string]int
	threads := make([]int, n+1)
	prev := c.gen0
	for gen := 1; gen <= n; gen++ {
		pid := c.restart(prev)
		parents[pid] = true
		if zs := faultZombies(t, parents); len(zs) > 0 {
			t.Fatalf("after restart %d: zombies %+v", gen, zs)
		}
		kinds := faultSettledFDKinds(t, pid, base)
		threads[gen] = faultThreads(t, pid)
		if gen == 1 {
			base = kinds
		} else if !maps.Equal(kinds, base) {
			t.Fatalf("generation %d (pid %d) has fds %v; generation 1 had %v", gen, pid, kinds, base)
		}
		prev = pid
	}
	t.Logf("%d restarts in %v; fds of each generation: %v; threads by generation: %v",
		n, time.Since(begin).Round(time.Millisecond), base, threads[1:])
	// The Go runtime starts a thread for each goroutine blocked in a
	// syscall when it needs one, and keeps it: a process's thread count is
	// the peak of that so far, which scheduling decides (6 to 9 threads per
	// generation here, in no order). A leak that grows with the chain (the
	// only kind a chain of fresh processes can show: fds or work inherited
	// and never let go) moves the median; scheduling does not.
	first, last := faultMedian(threads[1:min(n, 20)+1]), faultMedian(threads[max(1, n-19):])
	if last > first+1 {
		t.Errorf("the last generations have %d threads (median), the first %d: threads by generation %v", last, first, threads[1:])
	}
}

// faultInherit is started by hand with fds at 3 and up and variables that
// name them, as a hostile or broken parent might. It calls Start and
// reports the error, then every fd it has open (the listing's own aside)
// with its target and whether it is close-on-exec, and the variables the
// package should have removed.
func faultInherit() int {
	r, err := Start(context.Background(), Config{})
	if r != nil {
		r.Stop()
	}
	var fds []string
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || strings.HasPrefix(target, "/proc/") {
			continue // the listing's own fd, closed by now
		}
		fd, _ := strconv.Atoi(e.Name())
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC != 0 {
			target += "+cloexec"
		}
		fds = append(fds, e.Name()+">"+target)
	}
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LISTEN_") || strings.HasPrefix(kv, "SHELLFLIP_") && !strings.HasPrefix(kv, "SHELLFLIP_TEST_") {
			env = append(env, kv)
		}
	}
	report("inherit pid=%d fds=%s env=%s err=%v", os.Getpid(), strings.Join(fds, ","), strings.Join(env, ";"), err)
	return 0
}

// TestFaultHostileInheritance starts a real process with fds at 3 and up
// and hand-written variables naming them wrongly: closed, of the wrong
// type, out of range, overlapping, or a LISTEN_FDNAMES that does not match
// LISTEN_FDS. In each case Start must return an error that names the
// variable, the process must not panic, the variables must be gone, and
// every fd it was given must be closed: a refused fd left open would leak
// into every process it starts. The fds the Go runtime opened for itself
// before the package's init ran (it keeps its cgroup CPU limit files open,
// close-on-exec, at the lowest free fds: right after the ones given) must
// stay open: they are not the package's to close.
//
// What each case guards, in notify.go:
//   - "closed", "out of range", "garbage", "overlap", "alone": takeInheritance
//     closes what it validated when it refuses the inheritance (the
//     "if inh.err != nil" block, closeFD(&inh.readyFD) ...).
//   - "ready wrong type", "state wrong type", "control wrong type": own()
//     returns -1 without closing an fd whose checkFD failed; these fail
//     until a refused fd that was inherited is closed too.
//   - "names too few", "names too many", "listen overlaps ready": the
//     LISTEN_FDNAMES count check in takeListenFDs, its closing of the
//     validated block, and the low bound in own() ("fd < low").
//   - "listen beyond given": takeListenFDs takes fds 3..3+LISTEN_FDS-1
//     with checkFD(fd, 0), which accepts any open fd, including the
//     runtime's own; Ready's closeUnclaimed then closes it.
//   - "ready names runtime fd": own() must not close an fd of the wrong type
//     that was never inherited (close-on-exec: opened by this process).
func TestFaultHostileInheritance(t *testing.T) {
	t.Parallel()
	// The runtime's own fds, as this process has them: the re-executed
	// test binary opens the same ones.
	var runtimeFDs []string
	for _, target := range faultFDTargets(t, os.Getpid()) {
		if strings.HasPrefix(target, "/sys/fs/cgroup/") {
			runtimeFDs = append(runtimeFDs, target+"+cloexec")
		}
	}
	slices.Sort(runtimeFDs)
	for _, tc := range []struct {
		name  string
		files string // one letter per fd from 3 on: P pipe, S socket
		env   []string
		want  string // in Start's error, which must also name a variable
	}{
		{"closed", "P", []string{envReadyFD + "=100", envStateFD + "=3"}, "bad file descriptor"},
		{"ready wrong type", "PP", []string{envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_READY_FD="3": fd 3 is a pipe, want a socket`},
		{"state wrong type", "SS", []string{envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_STATE_FD="4": fd 4 is a socket, want a pipe`},
		{"control wrong type", "SPP", []string{envReadyFD + "=3", envStateFD + "=4", envControlFD + "=5"}, `$SHELLFLIP_CONTROL_FD="5": fd 5 is a pipe, want a socket`},
		{"out of range", "P", []string{envReadyFD + "=99999999999", envStateFD + "=3"}, `$SHELLFLIP_READY_FD="99999999999": not an fd number`},
		{"beyond any limit", "P", []string{envReadyFD + "=2147483647", envStateFD + "=3"}, "bad file descriptor"},
		{"garbage", "P", []string{envReadyFD + "=3 ", envStateFD + "=3"}, `$SHELLFLIP_READY_FD="3 ": not an fd number`},
		{"overlap", "S", []string{envReadyFD + "=3", envStateFD + "=3"}, `$SHELLFLIP_STATE_FD="3": fd 3 overlaps`},
		{"alone", "S", []string{envReadyFD + "=3"}, "must be set together"},
		{"names too few", "SSSP", []string{envListenPID + "=auto", envListenFDs + "=2", envListenFDNames + "=a", envReadyFD + "=5", envStateFD + "=6"},
			"$LISTEN_FDNAMES names 1 fds, $LISTEN_FDS says 2"},
		{"names too many", "S", []string{envListenPID + "=auto", envListenFDs + "=1", envListenFDNames + "=a:b"}, "$LISTEN_FDNAMES names 2 fds, $LISTEN_FDS says 1"},
		{"listen overlaps ready", "SP", []string{envListenPID + "=auto", envListenFDs + "=1", envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_READY_FD="3": fd 3 overlaps`},
		{"listen beyond given", "S", []string{envListenPID + "=auto", envListenFDs + "=2"}, "$LISTEN_FDS=2: fd 4"},
		{"ready names runtime fd", "P", []string{envReadyFD + "=4", envStateFD + "=3"}, "fd 4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.name == "ready names runtime fd" && len(runtimeFDs) == 0 {
				t.Skip("the runtime keeps no fd of its own open here (no cgroup CPU limit files)")
			}
			dir := t.TempDir()
			reports := newTestReports(t, dir)
			var files []*os.File
			var given []string // the targets of the fds the process is given
			for _, k := range tc.files {
				var f, other *os.File
				switch k {
				case 'P':
					var err error
					if f, other, err = os.Pipe(); err != nil {
						t.Fatal(err)
					}
				case 'S':
					sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
					if err != nil {
						t.Fatal(err)
					}
					f, other = os.NewFile(uintptr(sp[0]), "s0"), os.NewFile(uintptr(sp[1]), "s1")
				}
				defer other.Close()
				files = append(files, f)
				target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", faultFileFD(t, f)))
				if err != nil {
					t.Fatal(err)
				}
				given = append(given, target)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), envTestRole+"=fault-inherit", envTestReport+"="+reports.path, faultGorace())
			cmd.Env = append(cmd.Env, tc.env...)
			cmd.ExtraFiles = files
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				f.Close()
			}
			rep := reports.next("inherit")
			if err := cmd.Wait(); err != nil || strings.Contains(stderr.String(), "panic") {
				t.Fatalf("process ended with %v; stderr:\n%s", err, stderr.String())
			}
			if !strings.Contains(rep["err"], tc.want) || !strings.Contains(rep["err"], "$SHELLFLIP_") && !strings.Contains(rep["err"], "$LISTEN_") {
				t.Errorf("Start returned %q, want an error naming the variable and containing %q", rep["err"], tc.want)
			}
			if rep["env"] != "" {
				t.Errorf("variables left in the environment: %s", rep["env"])
			}
			var stillOpen, runtime []string
			for _, fd := range strings.Split(rep["fds"], ",") {
				num, target, _ := strings.Cut(fd, ">")
				if slices.Contains(given, strings.TrimSuffix(target, "+cloexec")) {
					stillOpen = append(stillOpen, num+">"+target)
				}
				if strings.HasPrefix(target, "/sys/fs/cgroup/") {
					runtime = append(runtime, target)
				}
			}
			if len(stillOpen) > 0 {
				t.Errorf("fds given to the process are still open after Start refused them: %v (given: %v)", stillOpen, given)
			}
			slices.Sort(runtime)
			if !slices.Equal(runtime, runtimeFDs) {
				t.Errorf("the runtime's own fds are %v after Start, want %v: the package closed an fd it does not own (all fds: %s)", runtime, runtimeFDs, rep["fds"])
			}
		})
	}
}

// faultFileFD returns f's fd number without (*os.File).Fd, which would
// switch a socket to blocking mode.
func faultFileFD(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(s uintptr) { fd = int(s) })
	return fd
}

// faultFDTargets returns a process's fds and what they point to.
func faultFDTargets(t *testing.T, pid int) map[int]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]string{}
	for _, e := range ents {
		fd, _ := strconv.Atoi(e.Name())
		if target, err := os.Readlink(dir + "/" + e.Name()); err == nil {
			fds[fd] = target
		}
	}
	return fds
}

// TestFaultControlSocketHalfFrame: clients that send half a frame and fall
// silent tie up nothing but their own connections. Meanwhile the server
// answers a restart request (made to fail by a knob, so that the server
// stays) and a garbage frame, and when the half-frame clients' time is up
// (requestTimeout, 5 s) each is answered with an error rather than dropped;
// then a restart succeeds. It guards the per-connection read deadline (ctlsock.go,
// serve, "conn.SetReadDeadline(time.Now().Add(requestTimeout))"): without
// it the half-frame clients would wait until the process stopped serving.
// It takes requestTimeout, so it runs in parallel with the rest.
func TestFaultControlSocketHalfFrame(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	knob := filepath.Join(c.dir, "knob")
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("server", envTestFailFile+"="+knob, envTestFailMode+"=exit3")
	var stalled []net.Conn
	for _, half := range [][]byte{
		{0, 0},                                   // half a length header
		append([]byte{0, 0, 0, 20}, "{\"Req"...), // a header and a quarter of its payload
	} {
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write(half); err != nil {
			t.Fatal(err)
		}
		stalled = append(stalled, conn)
	}
	// Served meanwhile: a restart request, which fails by the knob...
	if err := c.requestErr(); !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("RequestRestart while clients stall: %v", err)
	}
	// ...and a garbage frame.
	conn, err := net.Dial("unix", c.socket)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("\x00\x00\x00\x02{}"))
	if m := faultReadAnswer(t, conn); m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") {
		t.Errorf("garbage frame answered with %+v", m)
	}
	conn.Close()
	for i, conn := range stalled {
		m := faultReadAnswer(t, conn)
		if m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") || !strings.Contains(m.text, "timeout") {
			t.Errorf("half-frame client %d answered with %+v, want a RestartFailed naming a bad request and the timeout", i, m)
		}
	}
	c.restart(r0["pid"])
}

// faultReadAnswer reads the server's one answer on conn.
func faultReadAnswer(t *testing.T, conn net.Conn) message {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(testDeadline))
	var scratch [512]byte
	payload, err := readFrame(conn, scratch[:])
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	m, err := decodeMessage(payload)
	if err != nil {
		t.Fatalf("undecodable answer %q: %v", payload, err)
	}
	return m
}

// faultFDSet lists this process's open fds with their targets, without the
// fd of the listing itself.
func faultFDSet(t *testing.T) map[int]string {
	t.Helper()
	fds := faultFDTargets(t, os.Getpid())
	for fd, target := range fds {
		if strings.HasPrefix(target, "/proc/") {
			delete(fds, fd)
		}
	}
	return fds
}

// faultCheckFDs fails t if an fd is open now that was not in before: by
// number and target, so that an fd closed meanwhile (a finalizer of an
// earlier test) cannot hide a new one.
func faultCheckFDs(t *testing.T, before map[int]string) {
	t.Helper()
	after := faultFDSet(t)
	var leaked []string
	for fd, target := range after {
		if before[fd] != target {
			leaked = append(leaked, fmt.Sprintf("%d>%s", fd, target))
		}
	}
	slices.Sort(leaked)
	if len(leaked) > 0 || len(after) > len(before) {
		t.Errorf("%d fds open before, %d after; new: %v", len(before), len(after), leaked)
	}
}

// TestFaultControlSocketFDLeak runs the in-process tests of the control
// socket and of bindControl, and more of its paths, and checks that every
// fd they opened was closed: on each bind error (bindControl's fail
// closures), after finish (the listener, its duplicate for the new process,
// every connection, answered or cut short), and for an inherited control
// socket that is adopted or refused (listenControl closes the refused one).
func TestFaultControlSocketFDLeak(t *testing.T) {
	// Not parallel: other tests' fds would come and go during the count.
	log := slog.New(slog.DiscardHandler)
	// The runtime opens its poller's fds on first use; do that first.
	warm, err := net.Listen("unix", filepath.Join(t.TempDir(), "warm.sock"))
	if err != nil {
		t.Fatal(err)
	}
	warm.Close()
	before := faultFDSet(t)

	t.Run("PathInTheWay", TestControlSocketPathInTheWay)
	t.Run("StaleAndMode", TestControlSocketStaleAndMode)
	t.Run("NoServer", TestRequestRestartNoServer)
	t.Run("BindErrors", func(t *testing.T) {
		dir := t.TempDir()
		for _, path := range []string{
			"",
			"@abstract",
			filepath.Join(dir, strings.Repeat("x", 200)), // longer than sun_path: bind fails
			filepath.Join(dir, "missing", "ctl.sock"),    // no such directory: bind fails
		} {
			if fd, err := bindControl(path); err == nil {
				unix.Close(fd)
				t.Errorf("bindControl(%q) succeeded", path)
			}
		}
		fd, err := bindControl(filepath.Join(dir, "ok.sock"))
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
	})
	t.Run("Server", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "ctl.sock")
		s, err := listenControl(path, -1, log)
		if err != nil {
			t.Fatal(err)
		}
		main := make(chan struct{})
		close(main)
		s.serveFrom(main)
		// The restart loop's part: every request restarts into pid 4242.
		loop := make(chan struct{})
		go func() {
			defer close(loop)
			for {
				select {
				case q := <-s.reqs:
					q.respond(log, 4242, nil)
				case <-s.stopped:
					return
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		if pid, err := RequestRestart(ctx, path); pid != 4242 || err != nil {
			t.Errorf("RequestRestart = %d, %v; want 4242", pid, err)
		}
		bad, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		bad.Write([]byte("\x00\x00\x00\x01x"))
		if m := faultReadAnswer(t, bad); m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") {
			t.Errorf("garbage answered with %+v", m)
		}
		bad.Close()
		// Fill every slot with a silent client; the next one is turned
		// away at once (ctlsock.go, accept, the slots select), the silent
		// ones are answered by finish.
		// The slots of the clients above are given back after their
		// answers are sent: wait for that.
		for deadline := time.Now().Add(testDeadline); len(s.slots) > 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d slots still taken with no client left", len(s.slots))
			}
		}
		var silent []net.Conn
		for range maxControlConns {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			silent = append(silent, c)
		}
		extra, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		if m := faultReadAnswer(t, extra); m.kind != msgRestartFailed || m.text != "too many concurrent restart requests" {
			t.Errorf("client beyond maxControlConns answered with %+v", m)
		}
		extra.Close()
		s.finish(4343, nil)
		<-loop
		for i, c := range silent {
			// The final outcome: as a bad request if its handler was
			// reading, as the outcome itself if it had not started.
			m := faultReadAnswer(t, c)
			if (m.kind != msgRestartFailed || !strings.Contains(m.text, "replaced by pid 4343")) &&
				m != (message{kind: msgRestartComplete, pid: 4343}) {
				t.Fatalf("silent client %d answered with %+v", i, m)
			}
			c.Close()
		}
		if _, err := RequestRestart(ctx, path); err == nil {
			t.Errorf("RequestRestart succeeded after finish")
		}
	})
	t.Run("Inherited", func(t *testing.T) {
		dir := t.TempDir()
		// Bound to the same path: adopted; finish closes it.
		same := filepath.Join(dir, "same.sock")
		fd, err := bindControl(same)
		if err != nil {
			t.Fatal(err)
		}
		s, err := listenControl(same, fd, log)
		if err != nil {
			t.Fatal(err)
		}
		if s.fd != fd {
			t.Errorf("the inherited socket on the same path was not adopted")
		}
		s.finish(0, errors.New("done"))
		// Bound elsewhere: closed, and a new socket bound.
		fd, err = bindControl(filepath.Join(dir, "elsewhere.sock"))
		if err != nil {
			t.Fatal(err)
		}
		s, err = listenControl(filepath.Join(dir, "new.sock"), fd, log)
		if err != nil {
			t.Fatal(err)
		}
		s.finish(0, errors.New("done"))
		// Not a listening socket at all: closed too.
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		s, err = listenControl(filepath.Join(dir, "pipe.sock"), p[0], log)
		if err != nil {
			t.Fatal(err)
		}
		s.finish(0, errors.New("done"))
	})
	faultCheckFDs(t, before)
}

// faultRefParseFD is what parseFD must accept: the decimal form strconv.Itoa
// writes for an fd (no sign, no leading zero, no space), up to MaxInt32.
func faultRefParseFD(s string) (int, bool) {
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		if n = n*10 + int(c-'0'); n > math.MaxInt32 {
			return 0, false
		}
	}
	return n, true
}

// FuzzParseFDEnv fuzzes parseFD, which reads the SHELLFLIP_*_FD values,
// against faultRefParseFD, and checks that it reads back every fd number
// the old process writes (childEnv uses strconv.Itoa).
func FuzzParseFDEnv(f *testing.F) {
	for _, s := range []string{"0", "3", "10", "2147483647", "2147483648", "99999999999", "-1", "+3", "03", "00",
		"", " 3", "3 ", "3\x00", "0x10", "1e3", "3_0", "٣", "4294967299"} {
		f.Add(s, int32(0))
	}
	f.Add("", int32(math.MaxInt32))
	f.Add("", int32(-1))
	f.Fuzz(func(t *testing.T, s string, n int32) {
		fd, err := parseFD(s)
		want, ok := faultRefParseFD(s)
		if (err == nil) != ok || ok && fd != want {
			t.Fatalf("parseFD(%q) = %d, %v; want %d, ok=%t", s, fd, err, want, ok)
		}
		if err != nil && fd != -1 {
			t.Fatalf("parseFD(%q) = %d with error %v; want -1", s, fd, err)
		}
		if err == nil && strconv.Itoa(fd) != s {
			t.Fatalf("parseFD(%q) = %d, which is written %q", s, fd, strconv.Itoa(fd))
		}
		fd, err = parseFD(strconv.Itoa(int(n)))
		if n >= 0 && (err != nil || fd != int(n)) || n < 0 && err == nil {
			t.Fatalf("parseFD(%q) = %d, %v", strconv.Itoa(int(n)), fd, err)
		}
	})
}

// faultRefNameValid is sd_notify(3)'s rule for an FDNAME: at most 255
// printable ASCII characters, no ':'.
func faultRefNameValid(s string) bool {
	if len(s) > 255 {
		return false
	}
	for _, c := range []byte(s) {
		if c < 0x20 || c > 0x7e || c == ':' {
			return false
		}
	}
	return true
}

// FuzzListenFDNames fuzzes the parsing of LISTEN_FDNAMES: splitNames as
// takeListenFDs calls it for LISTEN_FDS=n (at most n+1 fields, so that the
// count check sees one too many without allocating for all of them), and
// fdnameValid. Names that are valid round-trip through strings.Join.
func FuzzListenFDNames(f *testing.F) {
	f.Add("", uint16(0))
	f.Add("", uint16(1))
	f.Add(":", uint16(1))
	f.Add("a:b:c", uint16(3))
	f.Add("a:b:c", uint16(2))
	f.Add("a:b:c", uint16(65535))
	f.Add("tcp/127.0.0.1%3A8080:unix/%2Frun%2Fx.sock", uint16(2))
	f.Add("a\nb:c d:\x7f:é", uint16(4))
	f.Add(strings.Repeat("x", 256)+":"+strings.Repeat(":", 100), uint16(10))
	f.Add("::::::::", uint16(3))
	f.Fuzz(func(t *testing.T, s string, n uint16) {
		limit := int(n) + 1
		names := splitNames(s, limit)
		all := strings.Split(s, ":")
		want := all[:min(len(all), limit)]
		if !slices.Equal(names, want) {
			t.Fatalf("splitNames(%q, %d) = %q, want %q", s, limit, names, want)
		}
		// takeListenFDs's count check: the names match LISTEN_FDS=n
		// exactly when there are n of them.
		if (len(names) == int(n)) != (len(all) == int(n)) {
			t.Fatalf("splitNames(%q, %d) gives %d names of %d: the count check would be wrong", s, limit, len(names), len(all))
		}
		if len(all) <= limit && strings.Join(names, ":") != s {
			t.Fatalf("splitNames(%q, %d) = %q does not join back", s, limit, names)
		}
		if got := splitNames(s, 0); len(got) != 0 {
			t.Fatalf("splitNames(%q, 0) = %q", s, got)
		}
		for _, name := range names {
			if fdnameValid(name) != faultRefNameValid(name) {
				t.Fatalf("fdnameValid(%q) = %t", name, fdnameValid(name))
			}
		}
		// Round trip: make every name valid, join, split again.
		valid := make([]string, len(names))
		for i, name := range names {
			b := []byte(name)
			b = slices.DeleteFunc(b, func(c byte) bool { return c < 0x20 || c > 0x7e || c == ':' })
			valid[i] = string(b[:min(len(b), fdnameMax)])
			if !fdnameValid(valid[i]) {
				t.Fatalf("fdnameValid(%q) = false", valid[i])
			}
		}
		joined := strings.Join(valid, ":")
		if back := splitNames(joined, len(valid)+1); !slices.Equal(back, valid) {
			t.Fatalf("%q joined as %q splits into %q", valid, joined, back)
		}
		// One fd fewer or more than there are names is always noticed.
		if back := splitNames(joined, len(valid)); len(back) == len(valid)-1 {
			t.Fatalf("%q: LISTEN_FDS=%d would pass", joined, len(valid)-1)
		}
		if back := splitNames(joined, len(valid)+2); len(back) == len(valid)+1 {
			t.Fatalf("%q: LISTEN_FDS=%d would pass", joined, len(valid)+1)
		}
	})
}

// faultNeverOpen returns an fd number that no process can have open:
// RLIMIT_NOFILE can be raised no higher than fs.nr_open.
func faultNeverOpen() int {
	n := 1 << 20
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			n = max(n, v)
		}
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Max < math.MaxInt32 {
		n = max(n, int(rl.Max))
	}
	return n
}

// faultFDSafe reports whether every number written in v, read in any way a
// careless parser might (sign, leading zeros and junk around it ignored),
// names one of ours or an fd that cannot be open: only then may v be given
// to takeInheritance in the test process, which closes and marks the fds
// it is told are its own.
func faultFDSafe(v string, ours map[int]uint32, never int) bool {
	for i := 0; i < len(v); {
		if v[i] < '0' || v[i] > '9' {
			i++
			continue
		}
		j := i
		for j < len(v) && v[j] >= '0' && v[j] <= '9' {
			j++
		}
		run := strings.TrimLeft(v[i:j], "0")
		i = j
		if len(run) > 10 {
			continue
		}
		n, _ := strconv.Atoi(run)
		if _, ok := ours[n]; !ok && n < never {
			return false
		}
	}
	return true
}

// faultIdentity is what an fd refers to, to tell it from a later fd that
// got the same number.
type faultIdentity struct{ dev, ino uint64 }

func faultIdentityOf(fd int) (faultIdentity, bool) {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return faultIdentity{}, false
	}
	return faultIdentity{uint64(st.Dev), st.Ino}, true
}

// FuzzTakeInheritance feeds takeInheritance environments whose
// SHELLFLIP_*_FD values are arbitrary strings in which P, W, S and T stand
// for fresh fds made for each input (a pipe's read and write ends, the two
// ends of a socketpair; inheritable, as inherited fds are) and C for an fd
// that cannot be open, and checks the outcome against a model of the
// rules: each value a canonical fd number, above stdio, distinct, open, of
// the right type; ready and state together. LISTEN_* are fuzzed too, with
// LISTEN_PID naming another process or unset: they are then none of this
// process's business and must change nothing. Inputs that would name any
// other fd of the test process are skipped, so the fuzzer can never make
// the test process close or mark an fd of its own.
//
// On success the fds are the model's and close-on-exec; on failure none is
// returned and each fd that passed validation was closed. Fresh fds no
// variable names are never touched.
func FuzzTakeInheritance(f *testing.F) {
	for _, tt := range [][3]string{
		{"S", "P", ""}, {"S", "P", "T"}, {"T", "W", "S"}, {"S", "", ""}, {"", "P", ""}, {"", "", "S"},
		{"P", "P", ""}, {"S", "S", ""}, {"S", "P", "P"}, {"S", "P", "S"}, {"C", "P", ""}, {"S", "C", "T"},
		{"0S", "P", ""}, {"+S", "P", ""}, {"-S", "P", ""}, {" S", "P", ""}, {"S\x00", "P", ""},
		{"SP", "P", ""}, {"99999999999", "P", ""}, {"2147483648", "P", ""}, {"C0", "P", ""},
	} {
		f.Add(tt[0], tt[1], tt[2], "", "", uint8(0))
	}
	f.Add("S", "P", "", "0", "a", uint8(1|4))
	f.Add("S", "P", "T", "0", "", uint8(1))
	f.Add("S", "P", "", "x", "a:b", uint8(2|4))
	f.Add("S", "P", "", "", ":::", uint8(4))
	never := faultNeverOpen()
	self := os.Getpid()
	f.Fuzz(func(t *testing.T, ready, state, control, listenFDs, listenNames string, pidMode uint8) {
		// Fresh fds, without close-on-exec, as inherited ones arrive.
		var p [2]int
		if err := unix.Pipe2(p[:], 0); err != nil {
			t.Fatal(err)
		}
		sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			unix.Close(p[0])
			unix.Close(p[1])
			t.Fatal(err)
		}
		ours := map[int]uint32{p[0]: unix.S_IFIFO, p[1]: unix.S_IFIFO, sp[0]: unix.S_IFSOCK, sp[1]: unix.S_IFSOCK}
		ids := map[int]faultIdentity{}
		for fd := range ours {
			ids[fd], _ = faultIdentityOf(fd)
		}
		defer func() {
			for fd, id := range ids {
				if now, ok := faultIdentityOf(fd); ok && now == id {
					unix.Close(fd)
				}
			}
		}()
		repl := strings.NewReplacer("P", strconv.Itoa(p[0]), "W", strconv.Itoa(p[1]),
			"S", strconv.Itoa(sp[0]), "T", strconv.Itoa(sp[1]), "C", strconv.Itoa(never+7))
		vals := []string{repl.Replace(ready), repl.Replace(state), repl.Replace(control)}
		for _, v := range append(vals, listenFDs) {
			if !faultFDSafe(v, ours, never) {
				t.Skip("names an fd of the test process")
			}
		}
		env := map[string]string{envReadyFD: vals[0], envStateFD: vals[1], envControlFD: vals[2]}
		switch pidMode % 3 {
		case 1:
			env[envListenPID] = strconv.Itoa(self + 1)
		case 2:
			env[envListenPID] = listenPIDAuto // only init replaces it
		}
		if listenFDs != "" {
			env[envListenFDs] = listenFDs
		}
		if pidMode&4 != 0 {
			env[envListenFDNames] = listenNames
		}
		var unset []string
		inh := takeInheritance(func(k string) (string, bool) { v, ok := env[k]; return v, ok },
			func(k string) error { unset = append(unset, k); return nil })

		// The model.
		taken := map[int]bool{}
		named := map[int]bool{}
		wantErr := ""
		own := func(name, v string, want uint32) int {
			if v == "" {
				return -1
			}
			fd, ok := faultRefParseFD(v)
			if ok {
				named[fd] = true
			}
			if ok && fd >= listenFDsStart && !taken[fd] && ours[fd] == want {
				taken[fd] = true
				return fd
			}
			if wantErr == "" {
				wantErr = "$" + name + "="
			}
			return -1
		}
		rfd := own(envReadyFD, vals[0], unix.S_IFSOCK)
		sfd := own(envStateFD, vals[1], unix.S_IFIFO)
		cfd := own(envControlFD, vals[2], unix.S_IFSOCK)
		if (rfd < 0) != (sfd < 0) && wantErr == "" {
			wantErr = "must be set together"
		}

		if len(inh.listen) > 0 {
			t.Fatalf("took LISTEN fds %v meant for another process", inh.listen)
		}
		for i, k := range []string{envReadyFD, envStateFD, envControlFD} {
			if vals[i] != "" && !slices.Contains(unset, k) {
				t.Errorf("$%s was not removed", k)
			}
		}
		got := [3]int{inh.readyFD, inh.stateFD, inh.controlFD}
		if wantErr == "" {
			if inh.err != nil {
				t.Fatalf("env %q: error %v, want none", env, inh.err)
			}
			if got != [3]int{rfd, sfd, cfd} {
				t.Fatalf("env %q: took fds %v, want %v", env, got, [3]int{rfd, sfd, cfd})
			}
			for _, fd := range got {
				if fd < 0 {
					continue
				}
				if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
					t.Errorf("fd %d was taken but is not close-on-exec (%v)", fd, err)
				}
			}
		} else {
			if inh.err == nil || !strings.Contains(inh.err.Error(), wantErr) {
				t.Fatalf("env %q: error %v, want one about %s", env, inh.err, wantErr)
			}
			if got != [3]int{-1, -1, -1} {
				t.Fatalf("env %q: took fds %v despite the error", env, got)
			}
			for _, fd := range []int{rfd, sfd, cfd} {
				if fd < 0 {
					continue
				}
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
					t.Errorf("env %q: fd %d passed validation, the inheritance was refused, and it is still open", env, fd)
				}
			}
		}
		for fd, id := range ids {
			if named[fd] {
				continue
			}
			now, ok := faultIdentityOf(fd)
			fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
			if !ok || now != id || err != nil || fl&unix.FD_CLOEXEC != 0 {
				t.Errorf("env %q: fd %d, which no variable names, was touched", env, fd)
			}
		}
	})
}

// ==========================================================================
// Allocation budgets
// ==========================================================================

// Allocation budgets. Those of the wire format and of sd_notify are asserted
// where those are tested: TestWireAllocs (every encoder, the decoding of a
// TryRestart in both forms, readFrame into scratch: 0) and
// TestSdNotifySendAllocs (Send: 0). This file holds the budget of the old
// process's side of a restart.

func init() {
	testRoles["alloc-ready"] = allocReadyChild
}

// allocReadyChild is the new process of TestAllocsRestart: Ready, then exit
// once the old process has made it the main process (exiting at once would
// race the old process's check that its successor is alive).
func allocReadyChild() int {
	if err := Ready(); err != nil {
		return 1
	}
	<-MainChan()
	return 0
}

// allocRestartBudget bounds the heap allocations of the old process's side
// of one restart with no fds registered, no control socket and no hooks:
// Restarter.restart and Restarter.handOver, up to the reaping of the new
// process. Measured with Go 1.26 on linux/amd64: 35 (37 to 38 under
// -race). They come from, per restart:
//
//	syscall.ForkExec: path, dir, argv and envv turned into NUL-terminated
//	  C strings and arrays (2 for each array, 1 for each string), and the
//	  child's fd table                                                     ~7
//	the environment: os.Environ's copy, childEnv's slice and its
//	  SHELLFLIP_READY_FD/SHELLFLIP_STATE_FD entries                         4
//	the ready timeout: context.WithTimeoutCause (context, timer, done
//	  channel; its cause is made once, by Start)                           ~5
//	context.AfterFunc twice: the state writer's and the readiness
//	  reader's deadline on cancellation                                    ~4
//	os.NewFile for the readiness socket and the state pipe (2 each)         4
//	the child watcher (struct, channel, goroutine)                         ~3
//	the fd list of the new process (passFDs: literal and growth)            3
//	os.Stat of the program (Restarter.program)                              2
//	the slog arguments pid and path, boxed even when the logger
//	  discards them                                                        ~2
//	the returned Process                                                    1
//
// None of them grows with the size of the environment or the command line:
// ForkExec copies each into one buffer plus one pointer array. The
// registry's fds add allocRegistryAllocs.
const allocRestartBudget = 40

// allocRegistryAllocs bounds what n registered fds add to a restart: the fd
// and name slices growing by doubling (passFDs), and the LISTEN_PID,
// LISTEN_FDS and LISTEN_FDNAMES variables (childEnv). Measured: 3 for one
// fd, 8 for 16, 19 for 256.
func allocRegistryAllocs(n int) float64 {
	if n == 0 {
		return 0
	}
	return float64(4 + 2*bits.Len(uint(n)))
}

// TestAllocsRestart runs restarts in this process, with the test binary as
// the new process, and counts what the old side allocates. testing.AllocsPerRun
// counts every goroutine's allocations, so the child watcher's, the
// readiness reader's and the runtime's own (a new thread when the spawner's
// or the watcher's blocks) are in.
func TestAllocsRestart(t *testing.T) {
	registered := len(Names()) // other tests' leftovers, passed on too
	budget := allocRestartBudget + allocRegistryAllocs(registered)
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	// Under -race a process sleeps a second at exit unless told not to.
	gorace := "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")
	r, err := Start(ctx, Config{Env: []string{envTestRole + "=alloc-ready", gorace}, ReadyTimeout: testDeadline})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop()

	var restartErr error
	restart := func() {
		p, err := r.restart(ctx)
		if err != nil {
			restartErr = err
			return
		}
		r.handOver(p, nil)
		select {
		case <-p.watch.done:
		case <-ctx.Done():
			restartErr = ctx.Err()
		}
	}
	const runs = 5
	allocs := testing.AllocsPerRun(runs, restart)
	if restartErr != nil {
		t.Fatal(restartErr)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	restart()
	runtime.ReadMemStats(&after)
	if restartErr != nil {
		t.Fatal(restartErr)
	}
	t.Logf("old side of a restart with %d fds registered: %v allocations (%d bytes in the last one)",
		registered, allocs, after.TotalAlloc-before.TotalAlloc)
	if allocs > budget {
		t.Errorf("old side of a restart with %d fds registered: %v allocations, budget %v", registered, allocs, budget)
	}
}
