//go:build linux

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// A restart from the old process's side (restart.go): the triggers, each
// way a new process can fail and what the requester learns, the handover,
// signals during it, the PID file, and the allocation budget.

func TestRestartBySocket(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	r1 := c.restart(r0["pid"])
	// NewProcessReady ran in the old process, for the new one. (That it
	// runs before anyone is told is what the clients of
	// examples/restarter's TestRestarterExample show: every one that
	// connects after the restart reaches the new process, because the
	// example stops accepting in the hook.)
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
	r1 := c.nextNew("ready")
	if r1["gen"] != "1" {
		t.Errorf("generation %s, want 1", r1["gen"])
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != r0["pid"] || repl["new"] != r1["pid"] {
		t.Errorf("old process reported %v", repl)
	}
	c.waitExit()
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
	c.trackPid(self["new"])
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
		{"statefail", envTestStateFail, "", "sending state: state refused by test knob ("}, // killed, or exited on the closed pipe first
		{"badconfig", envTestFailFile, "", `gave up: shellflip: Config.Env entry "NOEQUALS" is not KEY=value`},
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
			if _, serr := fmt.Sscanf(err.Error(), "new process %d", &bad); serr != nil {
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
	c := newTestCluster(t, clusterHeld)
	r0 := c.start("server")
	const n = 16
	answers := []<-chan asked{c.ask()}
	// The new process is now held before Ready: the restart is in flight.
	c.nextNew("holding")
	for range n - 1 {
		answers = append(answers, c.ask())
	}
	// Release the new process once all requesters are queued on the old
	// one's socket.
	waitUntil(t, func() string {
		if q := len(unixConns(t, c.socket)); q < n {
			return fmt.Sprintf("only %d of %d connections to %s established", q, n, c.socket)
		}
		return ""
	})
	releaseFIFO(t, c.hold)
	want := -1
	for _, answer := range answers {
		a := <-answer
		if a.err != nil {
			t.Fatalf("requester: %v", a.err)
		}
		if want == -1 {
			want = a.pid
		}
		if a.pid != want {
			t.Errorf("requesters got pids %d and %d; all should get the one restart's outcome", want, a.pid)
		}
	}
	repl := c.reports.next("replaced")
	if repl["pid"] != r0["pid"] || repl["new"] != strconv.Itoa(want) {
		t.Errorf("old process reported %v", repl)
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

// Allocation budgets. Those of the wire format and of sd_notify are asserted
// where those are tested: TestWireAllocs (every encoder, the decoding of a
// TryRestart in both forms, readFrame into scratch: 0) and
// TestSdNotifySendAllocs (Send: 0). This file holds the budget of the old
// process's side of a restart.

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
// process. Measured with Go 1.26 on linux/amd64: 36 to 37 (37 to 38 under
// -race; a blocked channel operation or a timer that the scheduler happens
// to need makes the count vary by one or two, so the budget leaves that
// room). They come from, per restart:
//
//	syscall.ForkExec: path, dir, argv and envv turned into NUL-terminated
//	  C strings and arrays (2 for each array, 1 for each string), and the
//	  child's fd table                                                     ~7
//	the environment: os.Environ's copy, handoff.environ's slice and its
//	  SHELLFLIP_READY_FD, SHELLFLIP_STATE_FD and SHELLFLIP_SIGNAL entries    5
//	the ready timeout: context.WithTimeoutCause (context, timer, done
//	  channel; its cause is made once, by Start)                           ~5
//	context.AfterFunc twice: the state writer's and the readiness
//	  reader's deadline on cancellation                                    ~4
//	os.NewFile for the readiness socket and the state pipe (2 each)         4
//	the child watcher (struct, channel, goroutine)                         ~3
//	the fd list of the new process (passFDs: literal and growth)            3
//	os.Stat of the program and of the working directory                     3
//	the slog arguments new_pid and path, boxed even when the logger
//	  discards them                                                        ~2
//
// None of them grows with the size of the environment or the command line:
// ForkExec copies each into one buffer plus one pointer array. The
// registry's fds add allocRegistryAllocs.
const allocRestartBudget = 42

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
	r, err := Start(ctx, Config{Env: []string{envTestRole + "=alloc-ready", goraceEnv()}, ReadyTimeout: testDeadline})
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
	if hello := dialHello(t, "tcp", addr); hello["pid"] != "1" {
		t.Errorf("after the refusal the listener is served by %v, want pid 1", hello)
	}
}

// TestRestartSignalBeforeMain: a restart signal sent to every process
// (pkill -USR1) while a restart hands over reaches the new process before
// it is the main process. It must neither kill it (before Start) nor start a
// nested restart (after Start): it is dropped with a log line.
func TestRestartSignalBeforeMain(t *testing.T) {
	c := newTestCluster(t, clusterHeld)
	handOff := makeFIFO(t, c.dir, "handoff")
	r0 := c.start("server", envTestHoldHandOff+"="+handOff)
	answer := c.ask()
	// Before Start: the new process is held during its initialisation.
	st := c.nextNew("holding")
	signalAll := func() {
		for _, pid := range []string{r0["pid"], st["pid"]} {
			p, _ := strconv.Atoi(pid)
			if err := unix.Kill(p, unix.SIGUSR1); err != nil {
				t.Fatal(err)
			}
		}
	}
	signalAll()
	releaseFIFO(t, c.hold)
	// After Start, before it is main: the old process is held in
	// NewProcessReady, after the readiness byte.
	c.reports.next("hookready")
	signalAll()
	if l := c.reports.next("log"); l["pid"] != st["pid"] || !strings.Contains(l["msg"], "not the main process") {
		t.Fatalf("the new process logged %v, want that it dropped the signal because it is not main yet", l)
	}
	releaseFIFO(t, handOff)
	if a := <-answer; a.err != nil {
		t.Fatalf("the restart: %v", a.err)
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
	go releaseLater(handOff)
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
			if st := c.waitExit(); st != "exit status 0" {
				t.Errorf("the draining process ended with %q, want exit status 0", st)
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
	r1 := c.nextNew("ready")
	c.waitExit()
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

// readPIDFile returns the pid in the PID file at path, which must be one
// line.
func readPIDFile(t *testing.T, path string) string {
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

// TestPIDFileOfAnotherUser: a PID file that another uid owns in a sticky
// directory cannot be replaced; Start fails instead of running with a PID
// file that names someone else.
func TestPIDFileOfAnotherUser(t *testing.T) {
	c := newTestCluster(t)
	bin := c.nobodyBinary()
	sticky := filepath.Join(c.dir, "run")
	os.Mkdir(sticky, 0o777)
	os.Chmod(sticky, 0o777|os.ModeSticky)
	pidFile := filepath.Join(sticky, "svc.pid")
	if err := os.WriteFile(pidFile, []byte("1\n"), 0o644); err != nil { // root's
		t.Fatal(err)
	}
	sub := filepath.Join(c.dir, "shared")
	os.Mkdir(sub, 0o777)
	os.Chmod(sub, 0o777)
	cmd := c.command(bin, "server", envTestSocket+"="+filepath.Join(sub, "ctl.sock"), envTestPIDFile+"="+pidFile)
	asNobody(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rep := c.reports.next("error")
	if !strings.Contains(rep["err"], "start:") || !strings.Contains(rep["err"], pidFile) {
		t.Errorf("Start with a foreign PID file: %v, want a Start error naming the file", rep)
	}
	if got := readPIDFile(t, pidFile); got != "1" {
		t.Errorf("PID file changed to %q", got)
	}
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

// TestRestartAfterStop: a request that run's select takes when Stop came at
// the same time starts nothing: no PreSpawn, no new process.
func TestRestartAfterStop(t *testing.T) {
	var preSpawn atomic.Bool
	r, err := Start(context.Background(), Config{Lifecycle: &Lifecycle{
		PreSpawn: func(context.Context) error { preSpawn.Store(true); return nil },
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if out := r.restart(ctx); out.err == nil || preSpawn.Load() {
		t.Errorf("restart after Stop: %v, PreSpawn ran: %t; want an error and no PreSpawn", out.err, preSpawn.Load())
	}
}

// TestStartRefusesUncatchableSignal: a Config.Signal that cannot be caught
// would leave restarts by signal silently impossible.
func TestStartRefusesUncatchableSignal(t *testing.T) {
	for _, sig := range []os.Signal{syscall.SIGKILL, syscall.SIGSTOP, syscall.SIGCHLD, syscall.SIGURG, syscall.Signal(0), syscall.Signal(300), notASignal{}} {
		if r, err := Start(context.Background(), Config{Signal: sig}); err == nil || !strings.Contains(err.Error(), "Config.Signal") {
			if r != nil {
				r.Stop()
			}
			t.Errorf("Start with Signal %v: %v, want an error naming Config.Signal", sig, err)
		}
	}
}

type notASignal struct{}

func (notASignal) String() string { return "not a signal" }
func (notASignal) Signal()        {}

// TestBaseEnvironWatchdog: the watchdog passes to the new process if it
// was this process's (or, in a broker, "auto"), and stays another
// process's if it was: WATCHDOG_USEC without its WATCHDOG_PID would make it
// whoever's reads it.
func TestBaseEnvironWatchdog(t *testing.T) {
	own := "WATCHDOG_PID=" + strconv.Itoa(os.Getpid())
	for in, want := range map[string]string{own: "WATCHDOG_PID=auto", "WATCHDOG_PID=auto": "WATCHDOG_PID=auto", "WATCHDOG_PID=1": "WATCHDOG_PID=1"} {
		if got := baseEnviron([]string{"WATCHDOG_USEC=1000000", in}, nil); !slices.Equal(got, []string{"WATCHDOG_USEC=1000000", want}) {
			t.Errorf("baseEnviron with %s: %q, want WATCHDOG_USEC and %s", in, got, want)
		}
	}
}
