//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

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
		{"statefail", envTestStateFail, "", "sending state: state refused by test knob ("}, // killed, or exited on the closed pipe first
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
	h := handoff{names: []string{"a", "b"}, readyFD: 5, stateFD: 6, ctlFD: 7, ctlID: "1:2", signal: syscall.SIGHUP}
	env := h.environ(
		[]string{"PATH=/bin", "LISTEN_FDS=9", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "SHELLFLIP_READY_FD=4", "KEEP=1", "OVER=old"},
		[]string{"OVER=new", "EXTRA=1"})
	want := []string{"PATH=/bin", "KEEP=1", "OVER=new", "EXTRA=1", "LISTEN_PID=auto", "LISTEN_FDS=2", "LISTEN_FDNAMES=a:b",
		"SHELLFLIP_READY_FD=5", "SHELLFLIP_STATE_FD=6", "SHELLFLIP_CONTROL_FD=7", "SHELLFLIP_CONTROL_ID=1:2", "SHELLFLIP_SIGNAL=1"}
	if !slices.Equal(env, want) {
		t.Errorf("childEnv:\n got %q\nwant %q", env, want)
	}
}

// TestRestartHandsOverWatchdog: systemd gives the main process
// WATCHDOG_USEC and WATCHDOG_PID=<its pid>. A new process must see the
// watchdog as its own, or it never pings and systemd kills it one interval
// after the reload.
func TestRestartHandsOverWatchdog(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server", envTestWatchdog+"=1")
	const want = "1.5s/true/<nil>"
	if r0["watchdog"] != want {
		t.Fatalf("generation 0 sees watchdog %s, want %s", r0["watchdog"], want)
	}
	r1 := c.restart(r0["pid"])
	if r1["watchdog"] != want {
		t.Errorf("generation 1 sees watchdog %s, want %s", r1["watchdog"], want)
	}
	r2 := c.restart(r1["pid"])
	if r2["watchdog"] != want {
		t.Errorf("generation 2 sees watchdog %s, want %s", r2["watchdog"], want)
	}
}

// Allocation budgets.

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
	if _, err := Start(context.Background(), Config{}); err != nil {
		return 1
	}
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
	registered := len(registryNames()) // other tests' leftovers, passed on too
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
		out := r.restart(ctx)
		if out.err != nil {
			restartErr = out.err
			return
		}
		r.handOver(out, nil)
		select {
		case <-out.child.done:
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

// TestRestartRefusedAsPID1: as PID 1 of its pid namespace (a container's
// entrypoint), the old process's exit would take the namespace down, the new
// process with it. The restart is refused with a reason, and the process
// keeps serving.
func TestRestartRefusedAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a pid namespace (CLONE_NEWPID)")
	}
	c := newTestCluster(t)
	r0 := c.startCmd(os.Args[0], "server", func(cmd *exec.Cmd) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	}, envTestListen+"=tcp=127.0.0.1:0")
	if r0["pid"] != "1" {
		t.Fatalf("the server reports pid %s, want 1 in its own pid namespace", r0["pid"])
	}
	for range 2 {
		err := c.requestErr()
		if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), "PID 1") || !strings.Contains(err.Error(), "PR_SET_CHILD_SUBREAPER") {
			t.Fatalf("restart as PID 1: %v, want a refusal that says why and what to do", err)
		}
	}
	_, addr, _ := strings.Cut(r0["addrs"], "=")
	if hello := dialHello(t, addr); hello["pid"] != "1" {
		t.Errorf("after the refusal the listener is served by %v, want pid 1", hello)
	}
}

// dialHello connects to a test server's listener and returns its greeting.
func dialHello(t *testing.T, addr string) map[string]string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testDeadline))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the greeting: %v", err)
	}
	return parseReport("hello " + strings.TrimSpace(line))
}

// TestRestartSignalBeforeMain: a restart signal sent to every process
// (pkill -USR1) while a restart hands over reaches the new process before
// it is the main process. It must neither kill it (before Start) nor start a
// nested restart (after Start): it is dropped with a log line.
func TestRestartSignalBeforeMain(t *testing.T) {
	c := newTestCluster(t)
	hold := makeFIFO(t, c.dir, "hold")
	handOff := makeFIFO(t, c.dir, "handoff")
	r0 := c.start("server", envTestHoldFIFO+"="+hold, envTestHoldHandOff+"="+handOff)
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	answer := make(chan error, 1)
	go func() {
		_, err := RequestRestart(ctx, c.socket)
		answer <- err
	}()
	// Before Start: the new process is held during its initialisation.
	st := c.reports.next("started")
	np, _ := strconv.Atoi(st["pid"])
	c.track(np)
	signalAll := func() {
		for _, pid := range []string{r0["pid"], st["pid"]} {
			p, _ := strconv.Atoi(pid)
			if err := unix.Kill(p, unix.SIGUSR1); err != nil {
				t.Fatal(err)
			}
		}
	}
	signalAll()
	releaseFIFO(t, hold)
	// After Start, before it is main: the old process is held in
	// NewProcessReady, after the readiness byte.
	c.reports.next("hookready")
	signalAll()
	if l := c.reports.next("log"); l["pid"] != st["pid"] || !strings.Contains(l["msg"], "not the main process") {
		t.Fatalf("the new process logged %v, want that it dropped the signal because it is not main yet", l)
	}
	releaseFIFO(t, handOff)
	if err := <-answer; err != nil {
		t.Fatalf("the restart: %v", err)
	}
	c.reports.next("replaced")
	// One restart, not two: the next generation is 2, started by this
	// request.
	r1 := c.reports.next("ready")
	if r1["pid"] != st["pid"] {
		t.Fatalf("ready report %v, want pid %s", r1, st["pid"])
	}
	c.reports.nextFrom("main", r1["pid"])
	// The next restart goes through the same holds, in generation 2 and in
	// generation 1's NewProcessReady.
	go releaseLater(hold, handOff)
	if r2 := c.restart(r1["pid"]); r2["gen"] != "2" {
		t.Errorf("the next restart made generation %s, want 2", r2["gen"])
	}
}

// TestRestartDrainingIgnoresSignal: once its Restarter has ended, a
// draining old process ignores the restart signal instead of dying of it
// (Go's default for SIGHUP and SIGUSR1 is to exit).
func TestRestartDrainingIgnoresSignal(t *testing.T) {
	for _, sig := range []string{"USR1", "HUP"} {
		t.Run(sig, func(t *testing.T) {
			c := newTestCluster(t)
			linger := makeFIFO(t, c.dir, "linger")
			r0 := c.start("server", envTestLinger+"="+linger, envTestSignal+"="+sig)
			c.restart(r0["pid"])
			c.reports.next("draining")
			pid, _ := strconv.Atoi(r0["pid"])
			if err := unix.Kill(pid, unix.SignalNum("SIG"+sig)); err != nil {
				t.Fatal(err)
			}
			releaseFIFO(t, linger)
			<-c.exited
			if c.status != "exit status 0" {
				t.Errorf("the draining process ended with %q, want exit status 0", c.status)
			}
		})
	}
}

// TestRestartPIDFileAfterOldDies: the old process dies after the readiness
// byte and before it hands over; the new process becomes main by itself,
// and the PID file names it.
func TestRestartPIDFileAfterOldDies(t *testing.T) {
	c := newTestCluster(t)
	pidFile := filepath.Join(c.dir, "pid")
	r0 := c.start("server", envTestPIDFile+"="+pidFile, envTestDieHandOff+"=1")
	if got := readPIDFile(t, pidFile); got != r0["pid"] {
		t.Fatalf("PID file says %s, want %s", got, r0["pid"])
	}
	pid, _ := strconv.Atoi(r0["pid"])
	unix.Kill(pid, unix.SIGUSR1)
	r1 := c.reports.next("ready")
	np, _ := strconv.Atoi(r1["pid"])
	c.track(np)
	<-c.exited
	c.reports.nextFrom("main", r1["pid"])
	if got := readPIDFile(t, pidFile); got != r1["pid"] {
		t.Errorf("PID file says %s after the old process died, want the new process, %s", got, r1["pid"])
	}
}

// TestRestartFailedNeverMain: a new process whose restart failed is killed
// and reaped before its readiness socket closes, so it never takes itself
// for the main process (it would write the PID file, among other things).
func TestRestartFailedNeverMain(t *testing.T) {
	c := newTestCluster(t)
	pidFile := filepath.Join(c.dir, "pid")
	knob := filepath.Join(c.dir, "knob")
	os.WriteFile(knob, nil, 0o600)
	r0 := c.start("server", envTestPIDFile+"="+pidFile, envTestStateFail+"="+knob)
	err := c.requestErr()
	if !strings.Contains(err.Error(), "state refused by test knob") {
		t.Fatalf("RequestRestart: %v", err)
	}
	var bad int
	fmt.Sscanf(err.Error(), "new process %d:", &bad)
	waitGone(t, bad)
	if got := readPIDFile(t, pidFile); got != r0["pid"] {
		t.Errorf("PID file says %s after a failed restart, want %s", got, r0["pid"])
	}
	c.restart(r0["pid"])
	for _, l := range c.reports.drain() {
		if strings.HasPrefix(l, "main pid="+strconv.Itoa(bad)+" ") || l == "main pid="+strconv.Itoa(bad) {
			t.Errorf("the failed process %d took itself for main", bad)
		}
	}
}

func readPIDFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestRestartProgramNotExecutable: a program file that exists but cannot be
// executed (a half-done deploy) fails the restart; it does not fall back to
// the running executable, which would restart the old code and report
// success.
func TestRestartProgramNotExecutable(t *testing.T) {
	c := newTestCluster(t)
	bin := filepath.Join(c.dir, "prog.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	r0 := c.startBin(bin, "server")
	// A deploy renames a new file into place, but its mode is not set yet.
	deploy := bin + ".new"
	if err := copyExecutable(os.Args[0], deploy); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(deploy, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(deploy, bin); err != nil {
		t.Fatal(err)
	}
	err := c.requestErr()
	if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), "not executable") {
		t.Fatalf("restart with a non-executable program: %v, want a failure that says so", err)
	}
	os.Chmod(bin, 0o755)
	c.restart(r0["pid"])
}

// TestRestartEnvReserved: Config.Env may not set the variables that the
// library writes for the new process.
func TestRestartEnvReserved(t *testing.T) {
	for _, kv := range []string{"LISTEN_FDS=3", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "SHELLFLIP_READY_FD=9", "WATCHDOG_PID=1", "NOEQUALS", "=x"} {
		_, err := Start(context.Background(), Config{Env: []string{"OK=1", kv}})
		if err == nil || !strings.Contains(err.Error(), "Config.Env") {
			t.Errorf("Start with Env %q: %v, want an error naming Config.Env", kv, err)
		}
	}
}

// TestRestartRejectedBehindWrapper: the program at the path is a wrapper
// that runs the real server as its child. When the restart fails (here: the
// ready timeout), the old process's SIGKILL reaches only the wrapper; the
// server, orphaned, must learn that it was rejected instead of taking the
// closed readiness socket for the old process's death and serving beside
// it.
func TestRestartRejectedBehindWrapper(t *testing.T) {
	c := newTestCluster(t)
	hold := makeFIFO(t, c.dir, "hold")
	wrapper := filepath.Join(c.dir, "wrapper.sh")
	script := "#!/bin/sh\n" + strconv.Quote(os.Args[0]) + " \"$@\"\n" // no exec: the server is the shell's child
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("server", envTestPath+"="+wrapper, envTestHoldFIFO+"="+hold, envTestTimeout+"=3s")
	err := c.requestErr()
	if !strings.Contains(err.Error(), "not ready within 3s") {
		t.Fatalf("RequestRestart: %v, want the ready timeout", err)
	}
	st := c.reports.next("started")
	orphan, _ := strconv.Atoi(st["pid"])
	c.track(orphan)
	releaseFIFO(t, hold)
	if e := c.reports.nextFrom("error", st["pid"]); !strings.Contains(e["err"], "rejected") {
		t.Errorf("the orphaned server reported %v, want that it was rejected", e)
	}
	waitExited(t, orphan) // reaped by whoever adopted it
	// The old process still serves: the next restart, through the wrapper
	// again, succeeds.
	go releaseLater(hold)
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err != nil {
		t.Fatalf("the restart after: %v", err)
	}
	c.track(pid)
	ready := c.reports.next("ready")
	np, _ := strconv.Atoi(ready["pid"])
	c.track(np)
	c.reports.nextFrom("replaced", r0["pid"])
}

// releaseLater writes a line to each fifo in turn, once a process opens it
// for reading; for fifos that a later step of the test reaches.
func releaseLater(fifos ...string) {
	for _, fifo := range fifos {
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			f.WriteString("go\n")
			f.Close()
		}
	}
}

// TestRestartProgramFromArgv0: a restart runs the program this process is,
// whatever its parent put in argv[0]. A bare argv[0] that $PATH does not
// resolve is never looked for in the working directory, where anyone who
// may write there could have put a program of that name.
func TestRestartProgramFromArgv0(t *testing.T) {
	c := newTestCluster(t)
	marker := filepath.Join(c.dir, "planted-ran")
	planted := filepath.Join(c.dir, "planted")
	if err := os.WriteFile(planted, []byte("#!/bin/sh\ntouch "+marker+"\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.startCmd(os.Args[0], "server", func(cmd *exec.Cmd) {
		cmd.Args[0] = "planted" // as exec -a, or systemd's ExecStart=@, would set it
		cmd.Dir = c.dir
		cmd.Env = append(cmd.Env, "PATH=/usr/bin:/bin")
	})
	c.restart(r0["pid"])
	if _, err := os.Stat(marker); err == nil {
		t.Errorf("the restart ran the program planted in the working directory")
	}
}

// TestRestartStartDirGone: the directory the service started in was
// removed (an old release directory, pruned); restarts still work, in the
// directory the process has.
func TestRestartStartDirGone(t *testing.T) {
	c := newTestCluster(t)
	dir := filepath.Join(c.dir, "release-1")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.startCmd(os.Args[0], "server", func(cmd *exec.Cmd) { cmd.Dir = dir })
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	c.restart(r0["pid"])
}
