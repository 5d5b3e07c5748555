package shellflip

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// A ShutdownCoordinator lets the old process drain after a restart: it tells
// its tasks (typically connection handlers) that shutdown has begun, and
// waits until every one of them has finished or a deadline passes.
//
// Each task calls Acquire before it starts and Release on the returned
// handle when it is done; Serve does both for the connections of a
// listener. Shutdown closes the handles' Done and then waits until no
// handle is left unreleased. The coordinator starts no goroutines of its
// own, so there is nothing to stop if Shutdown gives up at its deadline.
//
// Acquire keeps returning handles after shutdown has begun, until the last
// handle has been released; from then on the coordinator is drained and
// Acquire returns nil. This lets a running task register work it depends on
// while shutdown waits for it, but it also means that a caller who keeps
// acquiring for new work after Done is closed postpones the drain until the
// Shutdown deadline. Accept loops should therefore stop accepting when
// shutdown begins, as Serve does.
//
// Create one with NewShutdownCoordinator; the zero value is not usable. All
// methods are safe for concurrent use.
type ShutdownCoordinator struct {
	// ctx is cancelled, and so its Done channel closed, when shutdown
	// begins. cancel is safe to call more than once and from several
	// goroutines, so it needs no lock.
	ctx    context.Context
	cancel context.CancelFunc

	// This is a mutex, a counter and a channel rather than a
	// sync.WaitGroup for two reasons. First, the sync package requires that
	// an Add which raises the counter from zero happen before Wait, but
	// Acquire can race with a Shutdown whose count has just reached zero;
	// here both sides decide under mu, so an Acquire either comes before
	// the drain (and the drain then waits for it) or after it (and gets
	// nil). Second, WaitGroup.Wait cannot be abandoned at a deadline
	// without leaving a goroutine blocked in it, whereas a channel can be
	// selected on together with ctx.Done.
	mu        sync.Mutex
	active    int           // handles acquired and not yet released
	begun     bool          // Shutdown has been called
	drained   chan struct{} // closed once begun is set and active is zero
	isDrained bool          // drained has been closed
}

// NewShutdownCoordinator returns a coordinator with no tasks and shutdown
// not yet begun.
func NewShutdownCoordinator() *ShutdownCoordinator {
	ctx, cancel := context.WithCancel(context.Background())
	return &ShutdownCoordinator{
		ctx:     ctx,
		cancel:  cancel,
		drained: make(chan struct{}),
	}
}

// Acquire registers a task that Shutdown waits for. The caller owns the
// returned handle and must call its Release when the task has finished, on
// every return path (defer is the usual way); a handle that is never
// released holds every Shutdown until its deadline.
//
// Acquire returns nil once the coordinator is drained, that is once
// Shutdown has begun and every handle has been released; the caller must
// then not start the task. Before that, including while Shutdown is
// waiting, Acquire returns a new handle and Shutdown waits for it too. In
// particular, a task that holds an unreleased handle always gets a non-nil
// handle from Acquire.
//
// Acquire is safe to call concurrently with itself, Release and Shutdown.
func (c *ShutdownCoordinator) Acquire() *ShutdownHandle {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isDrained {
		return nil
	}
	c.active++
	return &ShutdownHandle{c: c}
}

// Serve accepts connections on ln and runs handle for each on a goroutine
// of its own, with a handle that Shutdown waits for and that Serve releases
// when handle returns; handle should return soon after the handle's Done
// is closed. Serve closes ln when shutdown begins, and returns nil once ln
// is closed (by Serve, or by the program: in Lifecycle.NewProcessReady, say,
// which is where the old process stops accepting). A connection that
// arrives once the coordinator is drained is closed at once. Accept errors
// other than a closed listener (out of fds, say) are retried after a short
// pause, as net/http's Server.Serve does; Serve gives up on none of them.
func (c *ShutdownCoordinator) Serve(ln net.Listener, handle func(net.Conn, *ShutdownHandle)) error {
	stop := context.AfterFunc(c.ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		h := c.Acquire()
		if h == nil {
			conn.Close()
			continue
		}
		go func() {
			defer h.Release()
			handle(conn, h)
		}()
	}
}

// Shutdown begins shutdown, closing every handle's Done (and so ending
// Serve), and then waits until every acquired handle has been released or
// ctx is done, whichever comes first. It returns nil if all handles were
// released, and ctx.Err() otherwise; if both have happened by the time it
// looks, it returns nil.
//
// When Shutdown returns nil the coordinator is drained: no handle is
// unreleased and every later Acquire returns nil. When it returns an
// error, the tasks it waited for are still running and still count; a
// later Shutdown waits for them again.
//
// Shutdown is safe to call more than once and from several goroutines at
// once. Each call begins shutdown if it has not begun yet, and each call
// waits.
func (c *ShutdownCoordinator) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	c.begun = true
	c.maybeDrainLocked()
	c.mu.Unlock()

	// Cancelling outside mu keeps whatever runs on cancellation away from
	// the lock.
	c.cancel()

	select {
	case <-c.drained:
		return nil
	case <-ctx.Done():
		// select picks at random among ready cases; prefer reporting a
		// completed drain over a deadline that passed at the same time.
		select {
		case <-c.drained:
			return nil
		default:
			return ctx.Err()
		}
	}
}

// Active returns the number of handles acquired and not yet released. The
// count may have changed by the time the caller looks at it; it is meant
// for logging and metrics, not for deciding whether to wait.
func (c *ShutdownCoordinator) Active() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// release undoes one Acquire. ShutdownHandle.Release guarantees it is
// called at most once per handle, so active cannot go negative.
func (c *ShutdownCoordinator) release() {
	c.mu.Lock()
	c.active--
	c.maybeDrainLocked()
	c.mu.Unlock()
}

// maybeDrainLocked closes drained if shutdown has begun and no handle is
// left. From then on Acquire returns nil, so the count stays at zero and
// the drain is final. c.mu must be held.
func (c *ShutdownCoordinator) maybeDrainLocked() {
	if c.begun && c.active == 0 && !c.isDrained {
		c.isDrained = true
		close(c.drained)
	}
}

// A ShutdownHandle is one task registered with a ShutdownCoordinator by
// Acquire. The task that acquired it releases it when it finishes.
type ShutdownHandle struct {
	c        *ShutdownCoordinator
	released atomic.Bool
}

// shutdownClosed is what Done returns on a nil handle.
var shutdownClosed = func() chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}()

// Done returns a channel that is closed when shutdown begins. A task selects
// on it to learn that it should finish its current work and return.
//
// On a nil handle, which Acquire returns only once shutdown has finished,
// Done returns a closed channel.
func (h *ShutdownHandle) Done() <-chan struct{} {
	if h == nil {
		return shutdownClosed
	}
	return h.c.ctx.Done()
}

// Release tells the coordinator that the task has finished. Only the first
// call on a handle counts; later calls are no-ops, so it is safe to both
// defer Release and call it early. Release on a nil handle is a no-op, so
// a caller may defer it before checking what Acquire returned. Release is
// safe for concurrent use.
func (h *ShutdownHandle) Release() {
	if h == nil || !h.released.CompareAndSwap(false, true) {
		return
	}
	h.c.release()
}
