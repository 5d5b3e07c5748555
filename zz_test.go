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

// The cross-process harness that the tests of every concern share:
// TestMain and the table of child roles, the reports the roles send, the
// cluster of test-server generations, the fd-leak check, and the waits.
//
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
	// Role "reaper": the role it starts as generation 0.
	envTestReaperRole = "SHELLFLIP_TEST_REAPER_ROLE"
	// The knobs of role "server". A knob that names a file applies once:
	// the process that manages to remove the file misbehaves; the next
	// generation does not.
	envTestFailFile    = "SHELLFLIP_TEST_FAIL_FILE"  // ...before Ready, as $SHELLFLIP_TEST_FAIL_MODE says
	envTestFailMode    = "SHELLFLIP_TEST_FAIL_MODE"  // exit3, hang, closeready, halfstate, garbage, badconfig
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

// testRoles maps $SHELLFLIP_TEST_ROLE to what the re-executed test binary
// does instead of running tests: every role there is. The functions live
// beside the tests that start them.
var testRoles = map[string]func() int{
	// This file.
	"server": testServer, // a small restartable service, tuned by the knobs above
	"reaper": testReaper, // a subreaper over a cluster's generations

	// ctlsock_test.go
	"client":     testClient,     // RequestRestart as another uid
	"fakeserver": testFakeServer, // a control socket that always says 1234

	// notify_test.go
	"fds":          testReportFDs,   // "server", after reporting what it was started with
	"inherit":      testInherit,     // Start with the fds and variables a hostile parent gave
	"state":        stateRole,       // a service whose new process does odd things with the state
	"notify-stuck": notifyStuckRole, // Notify under a manager that never reads

	// sdnotify_test.go
	"sd-helper": testSdHelper, // processNotifier with $NOTIFY_SOCKET as the test set it

	// restart_test.go
	"alloc-ready": allocReadyChild, // the new process of TestAllocsRestart

	// fdpass_test.go
	"fdpass":         fdpassRole,
	"fdpass-overlap": fdpassOverlapRole,
	"fdpass-hook":    fdpassHookRole,
	"fdpass-many":    fdpassManyRole,
	"fdpass-hostile": fdpassHostileRole,

	// systemd_test.go
	"systemd-service": systemdServiceRole,
	"systemd-reload":  systemdReloadRole,

	// bench_test.go
	"bench-floor": benchFloorChild,
	"bench-ready": benchReadyChild,
	"bench-sink":  benchSinkChild,
	"bench-state": benchStateChild,
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

// testServer is role "server", a small service: it receives its
// generation from the old process, listens where asked, starts the
// restarter and, when a restart succeeded, reports the new pid and exits.
// Every report names the pid first, so that a test can wait for one
// process's report with the prefix "kind pid=N".
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
	if fifo := os.Getenv(envTestHoldFIFO); fifo != "" && startedByRestart() {
		report("holding pid=%d gen=%d", pid, gen)
		waitFIFO(fifo)
	}
	var badEnv []string
	if startedByRestart() && takeKnob(envTestFailFile) {
		switch os.Getenv(envTestFailMode) {
		case "badconfig":
			badEnv = []string{"NOEQUALS"} // Start fails before it is ready
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
		Env:          badEnv,
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
		if badEnv == nil { // else the failure the test wants
			report("error pid=%d err=start: %v", pid, err)
		}
		return 1
	}
	wd, wdOn, wdErr := WatchdogInterval()
	report("main pid=%d", pid)
	report("ready pid=%d gen=%d addrs=%s watchdog=%v/%v/%v watchdogpid=%v", pid, gen, strings.Join(addrs, ","), wd, wdOn, wdErr,
		os.Getenv("WATCHDOG_PID") == strconv.Itoa(pid))
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

// serveHello greets every connection with the pid and generation; see
// dialHello.
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

// dialHello connects to a listener of a test role and returns its
// greeting, a line of key=value fields (pid, gen, ...), parsed.
func dialHello(t testing.TB, network, addr string) map[string]string {
	t.Helper()
	h, err := tryHello(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// tryHello is dialHello for a caller that only reports a failure.
func tryHello(network, addr string) (map[string]string, error) {
	c, err := net.DialTimeout(network, addr, testDeadline)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return readHelloErr(c)
}

// readHello reads the greeting on a connection made earlier.
func readHello(t testing.TB, c net.Conn) map[string]string {
	t.Helper()
	h, err := readHelloErr(c)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func readHelloErr(c net.Conn) (map[string]string, error) {
	c.SetReadDeadline(time.Now().Add(testDeadline))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("reading the greeting on %s: %v", c.RemoteAddr(), err)
	}
	return parseReport("hello " + strings.TrimSpace(line)), nil
}

// testReaper is role "reaper": it makes itself the child subreaper, starts
// generation 0 of the role named by $SHELLFLIP_TEST_REAPER_ROLE, and reaps
// every process that is orphaned below it, reporting each exit. An old
// generation is the parent of the new one and exits after the handover,
// so every new generation is orphaned; under the reaper a test can wait
// for its exact exit (testCluster.waitReaped) instead of guessing when
// whatever pid 1 is got round to it.
func testReaper() int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		report("error pid=%d prctl: %v", os.Getpid(), err)
		return 1
	}
	// syscall.ForkExec, unlike os/exec, does not deduplicate: drop the
	// role before setting it anew.
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, envTestRole+"=") })
	env = append(env, envTestRole+"="+os.Getenv(envTestReaperRole))
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
		status := (&childWatch{ws: ws}).status()
		report("reaped pid=%d status=%s", pid, strings.ReplaceAll(status, " ", "_"))
	}
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
	hold    string // with clusterHeld: the fifo new processes wait on
	reaper  bool   // with clusterReaped
	reports *testReports
	first   *os.Process   // the process the test started (adopt), if any
	exited  chan struct{} // closed when first has exited and was reaped
	status  string        // how first ended, once exited is closed

	mu   sync.Mutex
	live map[int]*os.Process // started and not seen reaped; killed at cleanup
}

// clusterOpt changes how a cluster's generations run.
type clusterOpt int

const (
	// clusterReaped runs generation 0 under role "reaper" (testReaper):
	// every generation is reaped as soon as it exits, and the test can
	// wait for that (waitReaped). The process the test starts, and whose
	// end closes exited, is then the reaper.
	clusterReaped clusterOpt = 1 << iota
	// clusterHeld makes every new process wait on a fifo before Start
	// (hold): restart lets it go, and a test that requests a restart by
	// itself can act while the restart is in flight.
	clusterHeld
)

func newTestCluster(t *testing.T, opts ...clusterOpt) *testCluster {
	dir := t.TempDir()
	c := &testCluster{t: t, dir: dir, socket: filepath.Join(dir, "ctl.sock"), exited: make(chan struct{}), live: map[int]*os.Process{}}
	c.reports = newTestReports(t, dir)
	for _, o := range opts {
		switch o {
		case clusterReaped:
			c.reaper = true
		case clusterHeld:
			c.hold = makeFIFO(t, dir, "hold")
		}
	}
	t.Cleanup(c.killAll)
	return c
}

// command returns a command that runs bin (a copy of the test binary) in
// role, with the test's environment as childEnv leaves it, the cluster's
// report and control sockets, and extra environment.
func (c *testCluster) command(bin, role string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = childEnv(envTestRole+"="+role, envTestReport+"="+c.reports.path, envTestSocket+"="+c.socket)
	if c.hold != "" {
		cmd.Env = append(cmd.Env, envTestHoldFIFO+"="+c.hold)
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	return cmd
}

// start runs generation 0 of role with extra environment, and waits until
// it is ready. It returns the ready report.
func (c *testCluster) start(role string, env ...string) map[string]string {
	c.t.Helper()
	return c.startCmd(os.Args[0], role, nil, env...)
}

// startCmd is start with the test binary at bin, and a chance to adjust
// the command first. If adjust is set, the ready report's pid is not
// checked against the started one (adjust may put it in another pid
// namespace).
func (c *testCluster) startCmd(bin, role string, adjust func(*exec.Cmd), env ...string) map[string]string {
	c.t.Helper()
	var cmd *exec.Cmd
	if c.reaper {
		cmd = c.command(bin, "reaper", append([]string{envTestReaperRole + "=" + role}, env...)...)
	} else {
		cmd = c.command(bin, role, env...)
	}
	if adjust != nil {
		adjust(cmd)
	}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.adopt(cmd)
	gen0 := strconv.Itoa(cmd.Process.Pid)
	if c.reaper {
		gen0 = c.reports.next("reaper pid=" + gen0)["child"]
		c.trackPid(gen0)
	}
	c.reports.next("started")
	rep := c.reports.next("ready")
	if adjust == nil && rep["pid"] != gen0 {
		c.t.Fatalf("ready report from pid %s, started %s", rep["pid"], gen0)
	}
	return rep
}

// adopt makes cmd, started by the test, the process whose end closes
// exited; it is killed at cleanup. Later generations are its children,
// reaped by it, by the reaper, or by whoever adopts them.
func (c *testCluster) adopt(cmd *exec.Cmd) {
	c.first = cmd.Process
	go func() {
		cmd.Wait()
		c.status = cmd.ProcessState.String()
		close(c.exited)
	}()
}

// track makes the cluster kill pid at cleanup. It holds the process by a
// pidfd (os.FindProcess), so that the kill cannot hit another process that
// reused the pid by then.
func (c *testCluster) track(pid int) {
	p, err := os.FindProcess(pid)
	if err != nil {
		c.t.Fatalf("pid %d: %v", pid, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.live[pid]; old != nil {
		old.Release()
	}
	c.live[pid] = p
}

// trackPid is track for a pid from a report.
func (c *testCluster) trackPid(pid string) {
	c.t.Helper()
	n, err := strconv.Atoi(pid)
	if err != nil {
		c.t.Fatalf("pid %q in a report", pid)
	}
	c.track(n)
}

// nextNew waits for the next report that starts with prefix, from a
// process the cluster tracks from then on.
func (c *testCluster) nextNew(prefix string) map[string]string {
	c.t.Helper()
	rep := c.reports.next(prefix)
	c.trackPid(rep["pid"])
	return rep
}

func (c *testCluster) killAll() {
	c.mu.Lock()
	for _, p := range c.live {
		p.Kill()
		p.Release()
	}
	clear(c.live)
	c.mu.Unlock()
	// Wait for the process the test started to be reaped, so that
	// exec.Cmd's fds for it are closed before the next test counts fds.
	if c.first != nil {
		c.first.Kill()
		select {
		case <-c.exited:
		case <-time.After(testDeadline):
			c.t.Errorf("the cluster's first process was not reaped after SIGKILL")
		}
	}
}

// waitExit waits until the process the test started has exited, and
// returns how it ended.
func (c *testCluster) waitExit() string {
	c.t.Helper()
	select {
	case <-c.exited:
		return c.status
	case <-time.After(testDeadline):
		c.t.Fatalf("the cluster's first process is still running after %v", testDeadline)
		return ""
	}
}

// waitReaped waits until the reaper (clusterReaped) reaped pid, and returns
// how it ended.
func (c *testCluster) waitReaped(pid string) string {
	c.t.Helper()
	rep := c.reports.next("reaped pid=" + pid)
	n, _ := strconv.Atoi(pid)
	c.mu.Lock()
	if p := c.live[n]; p != nil {
		p.Release()
		delete(c.live, n)
	}
	c.mu.Unlock()
	return strings.ReplaceAll(rep["status"], "_", " ")
}

// asked is the outcome of a RequestRestart.
type asked struct {
	pid int
	err error
}

// ask requests a restart on a goroutine, bounded by testDeadline; the
// channel receives the outcome.
func (c *testCluster) ask() <-chan asked {
	ch := make(chan asked, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		pid, err := RequestRestart(ctx, c.socket)
		ch <- asked{pid, err}
	}()
	return ch
}

// restart asks for a restart over the control socket, releases the new
// process if the cluster holds it, and waits for the new generation's
// ready report and the old one's "replaced" report; under the reaper, also
// until the old one exited with status 0 and was reaped. It returns the
// new generation's ready report.
func (c *testCluster) restart(oldPid string) (newReady map[string]string) {
	c.t.Helper()
	answer := c.ask()
	if c.hold != "" {
		c.nextNew("holding")
		releaseFIFO(c.t, c.hold)
	}
	a := <-answer
	if a.err != nil {
		c.t.Fatalf("RequestRestart: %v (reports: %q)", a.err, c.reports.drain())
	}
	c.track(a.pid)
	pid := strconv.Itoa(a.pid)
	ready := c.reports.next("ready")
	if ready["pid"] != pid {
		c.t.Fatalf("RequestRestart returned pid %s, but pid %s became ready", pid, ready["pid"])
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != oldPid || repl["new"] != pid {
		c.t.Fatalf("old process reported %v, want pid=%s new=%s", repl, oldPid, pid)
	}
	if c.reaper {
		if st := c.waitReaped(oldPid); st != "exit status 0" {
			c.t.Fatalf("old generation %s ended with %s", oldPid, st)
		}
	}
	return ready
}

// requestErr asks for a restart that is expected to fail.
func (c *testCluster) requestErr() error {
	c.t.Helper()
	a := <-c.ask()
	if a.err == nil {
		c.track(a.pid)
		c.t.Fatalf("RequestRestart succeeded (pid %d), want a failure", a.pid)
	}
	return a.err
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

// handoffVar reports whether the variable k is one with which a process
// passes fds to the next (LISTEN_*, or a SHELLFLIP_* that is not a test
// knob).
func handoffVar(k string) bool {
	return strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "SHELLFLIP_") && !strings.HasPrefix(k, "SHELLFLIP_TEST_")
}

// handoffEnv lists this process's handoff variables (handoffVar).
func handoffEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); handoffVar(k) {
			env = append(env, kv)
		}
	}
	return env
}

// childEnv is the environment for a process the test starts: the test's
// own, without what would make the process think that a restart or a
// service manager started it (handoff variables, NOTIFY_SOCKET,
// WATCHDOG_*), with goraceEnv, then extra.
func childEnv(extra ...string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return handoffVar(k) || k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "WATCHDOG_") || k == "GORACE"
	})
	return append(append(env, goraceEnv()), extra...)
}

// goraceEnv is the GORACE setting for the processes the tests start: a
// race-enabled binary sleeps a second at exit by default
// (atexit_sleep_ms=1000), which every wait for an old generation to go
// would pay.
func goraceEnv() string {
	return "GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")
}

// shortTempDir returns a new directory, removed at cleanup, whose path
// leaves room for socket names in sun_path (108 bytes); t.TempDir's names
// grow with the test's.
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
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

// waitFIFO waits for a line on the fifo at path, if path is set: a role's
// side of releaseFIFO.
func waitFIFO(path string) {
	if path == "" {
		return
	}
	if f, err := os.Open(path); err == nil {
		bufio.NewReader(f).ReadString('\n')
		f.Close()
	}
}

// releaseFIFO writes the line that a process in waitFIFO waits for, once
// it has opened the fifo, and fails t if none does within testDeadline.
func releaseFIFO(t *testing.T, path string) {
	t.Helper()
	if err := writeFIFO(path); err != nil {
		t.Fatal(err)
	}
}

// releaseLater is releaseFIFO for each fifo in turn, for a goroutine: for
// fifos that a later step of the test reaches.
func releaseLater(fifos ...string) {
	for _, fifo := range fifos {
		if writeFIFO(fifo) != nil {
			return
		}
	}
}

func writeFIFO(path string) error {
	// Opening for writing blocks until a reader opens the fifo. If none
	// does in time, a reader of our own unblocks the open.
	timer := time.AfterFunc(testDeadline, func() {
		if f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			defer f.Close()
		}
	})
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if !timer.Stop() {
		if err == nil {
			f.Close()
		}
		return fmt.Errorf("nobody opened the fifo %s in %v", path, testDeadline)
	}
	if err != nil {
		return err
	}
	_, err = f.WriteString("go\n")
	return errors.Join(err, f.Close())
}

// waitExited waits until pid has exited (it may be a zombie), and reports
// whether it existed when called. A pidfd becomes readable when the
// process exits; this works for processes that are not the test's
// children.
func waitExited(t testing.TB, pid int) bool {
	t.Helper()
	pfd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return false
	}
	if err != nil {
		t.Fatalf("pidfd_open(%d): %v", pid, err)
	}
	defer unix.Close(pfd)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	n, err := ignoringEINTR(func() (int, error) { return unix.Poll(fds, int(testDeadline/time.Millisecond)) })
	if err != nil || n == 0 {
		t.Fatalf("pid %d still running after %v (%v)", pid, testDeadline, err)
	}
	return true
}

// waitGone waits until pid no longer exists: it exited and was reaped.
func waitGone(t testing.TB, pid int) {
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

// waitUntil polls cond, every few milliseconds, until it returns "", and
// fails t with the last thing it returned (what is not so yet) if that
// takes longer than testDeadline. It is for what no event announces:
// another process's fd table, the kernel's socket tables, a property of a
// systemd unit. Everything else waits for an event.
func waitUntil(t testing.TB, cond func() (notYet string)) {
	t.Helper()
	deadline := time.Now().Add(testDeadline)
	for {
		notYet := cond()
		if notYet == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", testDeadline, notYet)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// unixConns returns the server side of every connection to the unix
// socket at path, established and not yet closed, by inode
// ("socket:[N]", as a /proc/PID/fd link names it): /proc/net/unix lists
// them under the listening socket's path, accepted or not.
func unixConns(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	var conns []string
	for _, line := range strings.Split(string(b), "\n") {
		// Num RefCount Protocol Flags Type St Inode Path: St 03 is connected.
		if f := strings.Fields(line); len(f) == 8 && f[7] == path && f[5] == "03" {
			conns = append(conns, "socket:["+f[6]+"]")
		}
	}
	return conns
}

// procFDs returns the open fds of process pid ("self": this one) and what
// each refers to (its /proc/PID/fd link), without the fd of the listing
// itself.
func procFDs(pid string) (map[int]string, error) {
	dir := "/proc/" + pid + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	fds := map[int]string{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || strings.HasPrefix(target, "/proc/") {
			continue // the listing's own fd, closed by now
		}
		fds[fd] = target
	}
	return fds, nil
}

// fdTargets is procFDs for a test.
func fdTargets(t testing.TB, pid int) map[int]string {
	t.Helper()
	fds, err := procFDs(strconv.Itoa(pid))
	if err != nil {
		t.Fatal(err)
	}
	return fds
}

// fdID identifies an open file: its /proc/self/fd link, and its device
// and inode numbers, which are the same in every process that shares the
// file; and the close-on-exec flag of the fd.
type fdID struct {
	target   string
	dev, ino uint64
	cloexec  bool
}

// statFD identifies what fd refers to. It opens nothing, so that a role
// may call it before the runtime's poller is up.
func statFD(fd int) (fdID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fdID{}, err
	}
	target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	return fdID{target: target, dev: st.Dev, ino: st.Ino, cloexec: cloexec(fd)}, nil
}

// state tells whether fd still holds the file it held when id was taken:
// "same", "closed" or "other" (closed and the number reused).
func (id fdID) state(fd int) string {
	cur, err := statFD(fd)
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

// cloexec reports whether fd is open and close-on-exec.
func cloexec(fd int) bool {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil && fl&unix.FD_CLOEXEC != 0
}

// listFDs lists this process's open fds for checkFDs, once the runtime's
// poller (which opens fds of its own on first use) is up.
func listFDs(t testing.TB) map[int]string {
	t.Helper()
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	return fdTargets(t, os.Getpid())
}

// checkFDs is the fd-leak check: it fails t for every fd open now that was
// not open in before (listFDs), by number and target, so that an fd closed
// meanwhile cannot hide a new one. With exact, it also fails t for every fd
// of before that is closed now, as code that closes what it does not own
// would leave it; leave that off where an earlier test's garbage may be
// finalized meanwhile (an os.Process holds a pidfd until then).
func checkFDs(t testing.TB, before map[int]string, exact bool) {
	t.Helper()
	after := listFDs(t)
	var opened, closed []string
	for fd, target := range after {
		if before[fd] != target {
			opened = append(opened, fmt.Sprintf("%d>%s", fd, target))
		}
	}
	for fd, target := range before {
		if after[fd] != target {
			closed = append(closed, fmt.Sprintf("%d>%s", fd, target))
		}
	}
	slices.Sort(opened)
	slices.Sort(closed)
	if len(opened) > 0 {
		t.Errorf("fds left open: %v (%d fds before, %d after)", opened, len(before), len(after))
	}
	if exact && len(closed) > 0 {
		t.Errorf("fds closed that were open before: %v", closed)
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
