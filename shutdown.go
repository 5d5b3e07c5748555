package shellflip

import (
	"context"
	"sync"
	"sync/atomic"
)

// A ShutdownCoordinator lets the old process drain after a restart: it tells
// its tasks (typically connection handlers) that shutdown has begun, and
// waits until every one of them has finished or a deadline passes.
//
// Each task calls Acquire before it starts and Release on the returned
// handle when it is done. Shutdown closes Done, cancels Context and then
// waits until no handle is left unreleased. The coordinator starts no
// goroutines, so there is nothing to stop if Shutdown gives up at its
// deadline.
//
// Acquire keeps returning handles after shutdown has begun, until the last
// handle has been released; from then on the coordinator is drained and
// Acquire returns nil. This lets a running task register work it depends on
// while shutdown waits for it, but it also means that a caller who keeps
// acquiring for new work after Done is closed postpones the drain until the
// Shutdown deadline. Accept loops should therefore stop accepting when Done
// is closed.
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

// Done returns a channel that is closed when shutdown begins, that is when
// Shutdown is first called. It is the same channel as Context().Done().
func (c *ShutdownCoordinator) Done() <-chan struct{} {
	return c.ctx.Done()
}

// Context returns a context that is cancelled, with context.Canceled, when
// shutdown begins. It is meant to be passed to handlers and to anything
// they call that accepts a context. The same context is returned on every
// call.
func (c *ShutdownCoordinator) Context() context.Context {
	return c.ctx
}

// Shutdown begins shutdown, closing Done and cancelling Context, and then
// waits until every acquired handle has been released or ctx is done,
// whichever comes first. It returns nil if all handles were released, and
// ctx.Err() otherwise; if both have happened by the time it looks, it
// returns nil.
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
	// the lock. A task that sees Done closed before it is cancelled here
	// cannot tell the difference, because Done is ctx.Done.
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

// Done returns a channel that is closed when shutdown begins; it is the
// coordinator's Done channel. A task selects on it to learn that it should
// finish its current work and return.
//
// On a nil handle, which Acquire returns only once shutdown has finished,
// Done returns a closed channel.
func (h *ShutdownHandle) Done() <-chan struct{} {
	if h == nil {
		return shutdownClosed
	}
	return h.c.Done()
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
