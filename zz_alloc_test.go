//go:build linux

package shellflip

import (
	"context"
	"math/bits"
	"os"
	"runtime"
	"strings"
	"testing"
)

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
// process. Measured with Go 1.26 on linux/amd64: 37 to 39 (39 to 41 under
// -race). They come from, per restart:
//
//	syscall.ForkExec: path, dir, argv and envv turned into NUL-terminated
//	  C strings and arrays (2 for each array, 1 for each string), and the
//	  child's fd table                                                     ~7
//	the environment: os.Environ's copy, childEnv's slice and its
//	  SHELLFLIP_READY_FD/SHELLFLIP_STATE_FD entries                         4
//	the ready timeout: context.WithTimeoutCause (context, timer, done
//	  channel) and its cause, built with fmt.Errorf on every restart       ~8
//	os.NewFile for the readiness socket and the state pipe (2 each)         4
//	the child watcher (struct, channel, goroutine) and the readiness
//	  reader (channel, goroutine)                                          ~6
//	the fd list of the new process (passFDs: literal and growth)            3
//	os.Stat of the program (Restarter.program)                              2
//	the slog arguments pid and path, boxed even when the logger
//	  discards them                                                        ~2
//	the returned Process                                                    1
//
// None of them grows with the size of the environment or the command line:
// ForkExec copies each into one buffer plus one pointer array. The
// registry's fds add allocRegistryAllocs.
const allocRestartBudget = 44

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
