//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cross-process harness: TestMain, the child roles, and the helpers
// that the tests of every concern share.

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
	envTestWatchdog    = "SHELLFLIP_TEST_WATCHDOG"     // generation 0 sets WATCHDOG_USEC and WATCHDOG_PID as systemd would
	envTestPIDFile     = "SHELLFLIP_TEST_PIDFILE"      // Config.PIDFile
	envTestHoldHandOff = "SHELLFLIP_TEST_HOLD_HANDOFF" // an old process's NewProcessReady waits for a line on this fifo
	envTestDieHandOff  = "SHELLFLIP_TEST_DIE_HANDOFF"  // an old process's NewProcessReady exits 9: the old process dies mid-handover
	envTestLinger      = "SHELLFLIP_TEST_LINGER"       // a replaced process waits for a line on this fifo before it exits
	envTestSignal      = "SHELLFLIP_TEST_SIGNAL"       // "HUP": Config.Signal is SIGHUP
	envTestUmask       = "SHELLFLIP_TEST_UMASK"        // octal umask set at start
	envTestPath        = "SHELLFLIP_TEST_PATH"         // Config.Path
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
	"server":     testServer,
	"fds":        testReportFDs,
	"client":     testClient,
	"fakeserver": testFakeServer,
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
	if m := os.Getenv(envTestUmask); m != "" {
		u, _ := strconv.ParseUint(m, 8, 32)
		syscall.Umask(int(u))
	}
	if os.Getenv(envTestWatchdog) != "" && !startedByRestart() {
		os.Setenv("WATCHDOG_USEC", "3000000")
		os.Setenv("WATCHDOG_PID", strconv.Itoa(pid))
	}
	st, err := ReceiveState()
	if err != nil {
		report("error pid=%d receive: %v", pid, err)
		return 1
	}
	if st != nil {
		br := bufio.NewReader(st)
		line, err := br.ReadString('\n')
		if err != nil {
			// The old process may have failed the restart meanwhile.
			report("stateerr pid=%d err=%v", pid, err)
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
				report("error pid=%d listen: %v (registry: %q)", pid, err, registryNames())
				return 1
			}
			a = ln.Addr()
			go serveHello(ln, gen)
		}
		addrs = append(addrs, a.Network()+"="+a.String())
	}
	if startedByRestart() {
		waitFIFO(os.Getenv(envTestHoldFIFO))
	}
	if startedByRestart() && takeKnob(envTestFailFile) {
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
	var sig os.Signal
	if os.Getenv(envTestSignal) == "HUP" {
		sig = syscall.SIGHUP
	}
	r, err := Start(context.Background(), Config{
		SocketPath:   os.Getenv(envTestSocket),
		ReadyTimeout: timeout,
		PIDFile:      os.Getenv(envTestPIDFile),
		Path:         os.Getenv(envTestPath),
		Signal:       sig,
		Broker:       testBroker(),
		Logger:       slog.New(reportLogs{}),
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
				if os.Getenv(envTestDieHandOff) != "" {
					os.Exit(9)
				}
				waitFIFO(os.Getenv(envTestHoldHandOff))
			},
		},
	})
	if err != nil {
		report("error pid=%d err=start: %v", pid, err)
		return 1
	}
	wd, wdOn, wdErr := WatchdogInterval()
	report("main pid=%d", pid)
	report("ready pid=%d gen=%d addrs=%s watchdog=%v/%v/%v", pid, gen, strings.Join(addrs, ","), wd, wdOn, wdErr)
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
	report("replaced pid=%d new=%d", pid, p)
	if fifo := os.Getenv(envTestLinger); fifo != "" {
		report("draining pid=%d", pid)
		waitFIFO(fifo)
	}
	return 0
}

// waitFIFO waits for a line on the fifo at path, if path is set.
func waitFIFO(path string) {
	if path == "" {
		return
	}
	if f, err := os.Open(path); err == nil {
		bufio.NewReader(f).ReadString('\n')
		f.Close()
	}
}

// releaseFIFO writes the line that a process in waitFIFO waits for; it
// blocks until that process has opened the fifo.
func releaseFIFO(t *testing.T, path string) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.WriteString("go\n")
			f.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(testDeadline):
		t.Fatalf("nobody opened the fifo %s in %v", path, testDeadline)
	}
}

// makeFIFO creates a fifo in dir and returns its path.
func makeFIFO(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// reportLogs sends the library's warnings and errors to the test as "log"
// reports: "log pid=PID level=LEVEL msg=MESSAGE k=v...".
type reportLogs struct{}

func (reportLogs) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (reportLogs) WithAttrs([]slog.Attr) slog.Handler           { return reportLogs{} }
func (reportLogs) WithGroup(string) slog.Handler                { return reportLogs{} }
func (reportLogs) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "log pid=%d level=%s msg=%s", os.Getpid(), r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	report("%s", b.String())
	return nil
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
			if line == prefix || strings.HasPrefix(line, prefix+" ") {
				r.seen = slices.Delete(r.seen, i, i+1)
				return parseReport(line)
			}
		}
		select {
		case line, ok := <-r.lines:
			if !ok {
				r.t.Fatalf("waiting for a %q report: the report socket is closed (unclaimed reports: %q)", prefix, r.seen)
			}
			if strings.HasPrefix(line, "error ") && !strings.HasPrefix(prefix, "error") {
				r.t.Fatalf("a test process failed: %s", line)
			}
			r.seen = append(r.seen, line)
		case <-timeout:
			r.t.Fatalf("waiting for a %q report: none in %v (unclaimed reports: %q)", prefix, testDeadline, r.seen)
		}
	}
}

// nextFrom is next for the first report of that kind from pid.
func (r *testReports) nextFrom(prefix, pid string) map[string]string {
	r.t.Helper()
	return r.next(prefix + " pid=" + pid)
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
		if k == "err" || k == "msg" { // the text runs to the end of the line
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
	status  string        // how generation 0 ended, once exited is closed
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
	return c.startCmd(bin, role, nil, env...)
}

// startCmd is startBin with a chance to adjust the command first. If adjust
// is set, the ready report's pid is not checked against the started one
// (adjust may put it in another pid namespace).
func (c *testCluster) startCmd(bin, role string, adjust func(*exec.Cmd), env ...string) map[string]string {
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
	if adjust != nil {
		adjust(cmd)
	}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	// The first generation is our child: reap it in the background. Later
	// generations are its children, reaped by it, or reparented.
	go func() {
		cmd.Wait()
		c.status = cmd.ProcessState.String()
		close(c.exited)
	}()
	c.track(cmd.Process.Pid)
	c.reports.next("started")
	rep := c.reports.next("ready")
	if adjust == nil && rep["pid"] != strconv.Itoa(cmd.Process.Pid) {
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
	if !waitExited(t, pid) {
		return
	}
	// Exited; the old process reaps it before it answers, so by the time a
	// test calls this after an answer, there is no zombie either.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		t.Fatalf("pid %d exited but was not reaped: %s", pid, st)
	}
}

// waitExited waits until pid has exited (it may be a zombie), and reports
// whether it existed when called.
func waitExited(t *testing.T, pid int) bool {
	t.Helper()
	// A pidfd becomes readable when the process exits; kill(pid, 0) then
	// tells a reaped process (ESRCH) from a zombie.
	pfd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return false
	}
	if err != nil {
		t.Fatalf("pidfd_open(%d): %v", pid, err)
	}
	defer unix.Close(pfd)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	if n, err := ignoringEINTR(func() (int, error) { return unix.Poll(fds, int(testDeadline/time.Millisecond)) }); err != nil || n == 0 {
		t.Fatalf("pid %d still running after %v", pid, testDeadline)
	}
	return true
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

// nobodyBinary prepares c for a process of uid 65534 (nobody): c's
// directory, the path to it and the report socket become reachable, and
// the test binary is copied out of the go command's private build
// directory. It returns the copy's path.
func (c *testCluster) nobodyBinary() string {
	c.t.Helper()
	if os.Geteuid() != 0 {
		c.t.Skip("needs root to run a process as another uid; CI runs as root")
	}
	os.Chmod(c.reports.path, 0o777)
	for d := c.dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	bin := filepath.Join(c.dir, "nobody.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		c.t.Fatal(err)
	}
	return bin
}

// asNobody makes cmd run as uid and gid 65534.
func asNobody(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
}

func copyExecutable(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

// adoptInherited puts fds into the registry as if they had been inherited.
func adoptInherited(fds []inheritedFD) {
	lockRegistry()
	defer fdreg.mu.Unlock()
	for _, f := range fds {
		fdreg.entries = append(fdreg.entries, &fdEntry{name: f.name, fd: f.fd, inherited: true})
	}
}

// listenNamed and listenPacketNamed claim or create a socket under name.
func listenNamed(name string, lc *net.ListenConfig, network, address string) (net.Listener, error) {
	c := ListenConfig{Name: name}
	if lc != nil {
		c.ListenConfig = *lc
	}
	return c.Listen(context.Background(), network, address)
}

func listenPacketNamed(name string, lc *net.ListenConfig, network, address string) (net.PacketConn, error) {
	c := ListenConfig{Name: name}
	if lc != nil {
		c.ListenConfig = *lc
	}
	return c.ListenPacket(context.Background(), network, address)
}

// fdConn is FD for a connected socket.
func fdConn(name string) (net.Conn, error) {
	f, err := FD(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return net.FileConn(f)
}

// registryNames lists the registry's names, in the order they are passed on.
func registryNames() []string {
	lockRegistry()
	defer fdreg.mu.Unlock()
	var names []string
	for _, e := range fdreg.entries {
		names = append(names, e.name)
	}
	return names
}
