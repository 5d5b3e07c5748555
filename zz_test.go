//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

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
	cmd := exec.Command(os.Args[0], "-test.run=^$")
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
