//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Hardening: faults, storms, long runs, hostile neighbours, fuzzing.

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
		status := (&childWatch{ws: ws}).status()
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
	if fifo := os.Getenv(envTestHoldFIFO); fifo != "" && startedByRestart() {
		report("holding pid=%d gen=%d", pid, gen)
		f, err := os.Open(fifo)
		if err == nil {
			bufio.NewReader(f).ReadString('\n')
			f.Close()
		}
	}
	r, err := Start(context.Background(), Config{
		SocketPath: os.Getenv(envTestSocket),
		Logger:     slog.New(reportLogs{}),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprint(w, gen)
			return err
		}},
	})
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	report("ready pid=%d gen=%d", pid, gen)
	report("main pid=%d gen=%d", pid, gen)
	p, err := r.Wait()
	if err != nil {
		report("ended pid=%d err=%v", pid, err)
		return 1
	}
	report("replaced pid=%d new=%d", pid, p)
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
	if l := c.reports.nextFrom("log", strconv.Itoa(gen1)); !strings.Contains(l["msg"], "old process went away") {
		t.Errorf("the new process logged %v, want that the old process went away", l)
	}
	c.reports.next(fmt.Sprintf("ready pid=%d", gen1))
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
		if m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
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
			if fd, _, err := bindControl(path); err == nil {
				unix.Close(fd)
				t.Errorf("bindControl(%q) succeeded", path)
			}
		}
		fd, _, err := bindControl(filepath.Join(dir, "ok.sock"))
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
	})
	t.Run("Server", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "ctl.sock")
		s, err := listenControl(path, -1, "", log)
		if err != nil {
			t.Fatal(err)
		}
		go s.serve()
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
		// ones are answered when their read times out.
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
		s.finish(4343, nil, true)
		<-loop
		for i, c := range silent {
			if m := faultReadAnswer(t, c); m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
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
		fd, id, err := bindControl(same)
		if err != nil {
			t.Fatal(err)
		}
		s, err := listenControl(same, fd, id.String(), log)
		if err != nil {
			t.Fatal(err)
		}
		if s.fd != fd {
			t.Errorf("the inherited socket on the same path was not adopted")
		}
		s.finish(0, errors.New("done"), false)
		// Bound elsewhere: closed, and a new socket bound.
		fd, id, err = bindControl(filepath.Join(dir, "elsewhere.sock"))
		if err != nil {
			t.Fatal(err)
		}
		s, err = listenControl(filepath.Join(dir, "new.sock"), fd, id.String(), log)
		if err != nil {
			t.Fatal(err)
		}
		s.finish(0, errors.New("done"), false)
		// Not a listening socket at all: closed too.
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		s, err = listenControl(filepath.Join(dir, "pipe.sock"), p[0], "", log)
		if err != nil {
			t.Fatal(err)
		}
		s.finish(0, errors.New("done"), false)
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
