//go:build linux

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Hardening: restarts under faults, storms and long runs.
//
// Real processes whose old process is SIGKILLed mid-restart, that are
// stormed with requests, or restarted 200 times in a row. Their
// generations run under the cluster's reaper (clusterReaped), so that a
// test can wait for each exit and see every process of the chain. The
// hostile inputs have their tests beside the code that parses them: the
// inherited environment in notify_test.go, LISTEN_* in fdpass_test.go,
// control socket frames in ctlsock_test.go and wire_test.go.

// TestFaultOldProcessKilled: the old process is SIGKILLed after it spawned
// the new one and before the new one is ready. The new process notices when
// it says it is ready (Ready's write fails with EPIPE, and the answer is
// end of file: notify.go, commit, "carrying on alone"), and Start carries on
// rather than failing (restart.go, Start, "if !errors.Is(err,
// ErrOldProcessGone)"). What it then does, and this test pins down: it
// serves (its listeners answer), it considers itself main (IsMain is true
// at once: there is no one else to be main), and the control socket it
// inherited still works: a later RequestRestart on it succeeds, into a
// process that is a generation further on.
func TestFaultOldProcessKilled(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, clusterReaped, clusterHeld)
	hello := filepath.Join(c.dir, "hello.sock")
	says := func(pid, gen string) {
		t.Helper()
		if h := dialHello(t, "unix", hello); h["pid"] != pid || h["gen"] != gen {
			t.Errorf("the service says %v, want pid=%s gen=%s", h, pid, gen)
		}
	}
	gen0 := c.start("server", envTestListen+"=unix="+hello)["pid"]
	says(gen0, "0")

	// The requester whose restart is cut short by the kill.
	answer := c.ask()
	gen1 := c.nextNew("holding")["pid"]
	// The new process has received its state and waits before Ready.
	pid0, _ := strconv.Atoi(gen0)
	if err := unix.Kill(pid0, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if st := c.waitReaped(gen0); st != "signal: killed" {
		t.Fatalf("generation 0 ended with %s, want signal: killed", st)
	}
	// Its requester is not left hanging: the connection died with it.
	if a := <-answer; a.err == nil || errors.Is(a.err, context.DeadlineExceeded) {
		t.Fatalf("the requester of the interrupted restart got %d, %v; want a connection error", a.pid, a.err)
	} else {
		t.Logf("requester of the interrupted restart: %v", a.err)
	}

	releaseFIFO(t, c.hold)
	if l := c.reports.nextFrom("log", gen1); !strings.Contains(l["msg"], "old process went away") {
		t.Errorf("the new process logged %v, want that the old process went away", l)
	}
	c.reports.nextFrom("main", gen1)
	c.reports.nextFrom("ready", gen1)
	says(gen1, "1") // the orphaned process serves its inherited listener

	// The inherited control socket still works.
	gen2 := c.restart(gen1)["pid"]
	says(gen2, "2")
	if zs := faultZombies(t, strconv.Itoa(c.first.Pid), gen0, gen1, gen2); len(zs) > 0 {
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
	c := newTestCluster(t, clusterReaped, clusterHeld)
	gen0 := c.start("server")["pid"]
	results := make(chan asked, n)
	var answered atomic.Int32
	start := make(chan struct{})
	for range n {
		go func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			pid, err := RequestRestart(ctx, c.socket)
			answered.Add(1)
			results <- asked{pid, err}
		}()
	}
	close(start)
	gen1 := c.nextNew("holding")["pid"]
	faultWaitAccepted(t, c.socket, gen0, n, &answered)
	releaseFIFO(t, c.hold)

	pids, busy, cut := 0, 0, 0
	for range n {
		r := <-results
		switch {
		case r.err == nil && strconv.Itoa(r.pid) == gen1:
			pids++
		case r.err == nil:
			t.Errorf("a client got pid %d; the restart's new process is %s", r.pid, gen1)
		case errors.Is(r.err, ErrRestartFailed) && strings.Contains(r.err.Error(), "too many concurrent restart requests"):
			busy++
		case errors.Is(r.err, ErrRestartFailed) && strings.Contains(r.err.Error(), "(replaced by pid "+gen1+")"):
			// The final outcome, for a client whose request was still
			// being read when the restart completed (ctlsock.go, serve,
			// "finish cut the read short").
			cut++
		default:
			t.Errorf("a client got no answer: %v", r.err)
		}
	}
	t.Logf("%d clients got the new pid, %d were told there were too many, %d got the outcome as a request cut short", pids, busy, cut)
	if ready := c.reports.nextFrom("ready", gen1); ready["gen"] != "1" {
		t.Errorf("the new process is generation %s, want 1", ready["gen"])
	}
	if repl := c.reports.nextFrom("replaced", gen0); repl["new"] != gen1 {
		t.Errorf("generation 0 reports it was replaced by %s, want %s", repl["new"], gen1)
	}
	if st := c.waitReaped(gen0); st != "exit status 0" {
		t.Errorf("generation 0 ended with %s", st)
	}
	// Exactly one new process: the only process below the reaper is
	// generation 1, and the next restart makes generation 2 out of it.
	var below []string
	for _, p := range faultProcs(t) {
		if ppid := strconv.Itoa(p.ppid); p.ppid == c.first.Pid || ppid == gen1 {
			below = append(below, strconv.Itoa(p.pid))
		}
	}
	if !slices.Equal(below, []string{gen1}) {
		t.Errorf("processes below the reaper: %v, want only generation 1 (%s)", below, gen1)
	}
	gen2 := c.restart(gen1)["pid"]
	c.mu.Lock()
	defer c.mu.Unlock()
	if live := slices.Collect(maps.Keys(c.live)); len(live) != 1 || strconv.Itoa(live[0]) != gen2 {
		t.Errorf("live processes %v, want only %s", live, gen2)
	}
}

// faultWaitAccepted waits until each of n clients of the unix socket at path
// either has its answer (answered counts them) or has its connection
// accepted by holder, and none waits in the listening socket's backlog:
// the server sides that holder has not accepted are in no fd table of
// holder's.
func faultWaitAccepted(t *testing.T, path, holder string, n int, answered *atomic.Int32) {
	t.Helper()
	pid, _ := strconv.Atoi(holder)
	stable := 0
	waitUntil(t, func() string {
		conns := unixConns(t, path)
		accepted := 0
		for _, target := range fdTargets(t, pid) {
			if slices.Contains(conns, target) {
				accepted++
			}
		}
		if accepted == len(conns) && accepted+int(answered.Load()) >= n {
			// Twice in a row, a poll apart, so that a client about to
			// connect has done so.
			if stable++; stable == 2 {
				return ""
			}
		} else {
			stable = 0
		}
		return fmt.Sprintf("%d connections, %d accepted, %d answered, of %d clients", len(conns), accepted, answered.Load(), n)
	})
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
	if testing.Short() {
		t.Skip("testing.Short(): 200 restarts in a row")
	}
	t.Parallel()
	const n = 200
	begin := time.Now()
	c := newTestCluster(t, clusterReaped)
	prev := c.start("server")["pid"]
	parents := []string{strconv.Itoa(c.first.Pid), prev}
	var base map[string]int
	threads := make([]int, n+1)
	for gen := 1; gen <= n; gen++ {
		pid := c.restart(prev)["pid"]
		parents = append(parents, pid)
		if zs := faultZombies(t, parents...); len(zs) > 0 {
			t.Fatalf("after restart %d: zombies %+v", gen, zs)
		}
		p, _ := strconv.Atoi(pid)
		kinds := faultSettledFDKinds(t, p, base)
		threads[gen] = faultThreads(t, p)
		if gen == 1 {
			base = kinds
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
	first, last := faultMedian(threads[1:21]), faultMedian(threads[n-19:])
	if last > first+1 {
		t.Errorf("the last generations have %d threads (median), the first %d: threads by generation %v", last, first, threads[1:])
	}
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
func faultZombies(t *testing.T, parents ...string) []faultProc {
	t.Helper()
	var zs []faultProc
	for _, p := range faultProcs(t) {
		if p.state == 'Z' && slices.Contains(parents, strconv.Itoa(p.ppid)) {
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
	for _, target := range fdTargets(t, pid) {
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
// polled. With want, it waits until the fds are want; without, until two
// readings agree.
func faultSettledFDKinds(t *testing.T, pid int, want map[string]int) map[string]int {
	t.Helper()
	var last, settled map[string]int
	waitUntil(t, func() string {
		now := faultFDKinds(t, pid)
		if want != nil && maps.Equal(now, want) || want == nil && last != nil && maps.Equal(now, last) {
			settled = now
			return ""
		}
		last = now
		return fmt.Sprintf("pid %d has fds %v; generation 1 had %v", pid, now, want)
	})
	return settled
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
