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
// waits until every one has finished or a deadline passes. Each task calls
// Acquire before it starts and Release on the returned handle when it is
// done; Serve does both for the connections of a listener. Acquire keeps
// returning handles after shutdown has begun, until the last one is
// released, so that a running task can register work it depends on; an
// accept loop that does not stop when shutdown begins, as Serve does,
// postpones the drain until Shutdown's deadline.
//
// Create one with NewShutdownCoordinator; the zero value is not usable. All
// methods are safe for concurrent use. The coordinator starts no goroutines
// of its own, so there is nothing to stop if Shutdown gives up.
type ShutdownCoordinator struct {
	ctx     context.Context // cancelled when shutdown begins
	cancel  context.CancelFunc
	drained context.Context // cancelled once shutdown has begun and active is 0
	drain   context.CancelFunc

	// Not a sync.WaitGroup: its Add from zero must happen before Wait, but
	// Acquire can race with a drain (here both decide under mu), and its
	// Wait cannot be abandoned at a deadline, where a channel can.
	mu     sync.Mutex
	active int // handles acquired and not yet released
}

// NewShutdownCoordinator returns a coordinator whose shutdown has not begun.
func NewShutdownCoordinator() *ShutdownCoordinator {
	c := &ShutdownCoordinator{}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.drained, c.drain = context.WithCancel(context.Background())
	return c
}

// Acquire registers a task that Shutdown waits for. The caller must call
// the handle's Release when the task has finished, on every return path: a
// handle never released holds every Shutdown until its deadline. Acquire
// returns nil once the coordinator is drained (Shutdown has begun and every
// handle was released), and the caller must then not start the task; so a
// task that holds an unreleased handle always gets a handle.
func (c *ShutdownCoordinator) Acquire() *ShutdownHandle {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.drained.Err() != nil {
		return nil
	}
	c.active++
	return &ShutdownHandle{c: c}
}

// Serve accepts connections on ln and runs handle for each on a goroutine
// of its own, with a handle that Serve releases when handle returns; handle
// should return soon after the handle's Done is closed. Serve closes ln
// when shutdown begins, and returns nil once ln is closed, by Serve or by
// the program (in Lifecycle.NewProcessReady, say). It closes a connection
// that arrives once the coordinator is drained, and retries other Accept
// errors (out of fds, say) after a pause, as net/http's Server.Serve does.
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

// Shutdown begins shutdown, closing every handle's Done (which ends Serve),
// and waits until every handle has been released or ctx is done. It returns
// nil if all were released, even if ctx is done too; the coordinator is
// then drained. Otherwise it returns ctx.Err(), and the tasks still running
// still count: a later Shutdown waits for them again. Shutdown may be called
// more than once, and from several goroutines at once; each call waits.
func (c *ShutdownCoordinator) Shutdown(ctx context.Context) error {
	c.cancel()
	c.mu.Lock()
	if c.active == 0 {
		c.drain()
	}
	c.mu.Unlock()

	select {
	case <-c.drained.Done():
	case <-ctx.Done():
	}
	// select picks at random among ready cases: a drain wins over ctx.
	if c.drained.Err() != nil {
		return nil
	}
	return ctx.Err()
}

// Active returns the number of handles acquired and not yet released, for
// logging and metrics: it may have changed by the time the caller looks.
func (c *ShutdownCoordinator) Active() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// A ShutdownHandle is one task registered by Acquire.
type ShutdownHandle struct {
	c        *ShutdownCoordinator
	released atomic.Bool
}

// shutdownClosed is what Done returns on a nil handle.
var shutdownClosed = make(chan struct{})

func init() { close(shutdownClosed) }

// Done returns a channel that is closed when shutdown begins: the task should
// then finish its current work and return. On a nil handle, which Acquire
// returns once the coordinator is drained, Done returns a closed channel.
func (h *ShutdownHandle) Done() <-chan struct{} {
	if h == nil {
		return shutdownClosed
	}
	return h.c.ctx.Done()
}

// Release tells the coordinator that the task has finished. Only the first
// call on a handle counts, so it is safe to both defer Release and call it
// early. On a nil handle it does nothing, so a caller may defer it before
// checking what Acquire returned.
func (h *ShutdownHandle) Release() {
	if h == nil || !h.released.CompareAndSwap(false, true) {
		return
	}
	c := h.c
	c.mu.Lock()
	defer c.mu.Unlock()
	c.active--
	if c.active == 0 && c.ctx.Err() != nil {
		c.drain()
	}
}
