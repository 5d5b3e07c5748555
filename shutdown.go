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
// its tasks (connection handlers, say) that shutdown has begun, and waits
// until all have finished or a deadline passes. Each task calls Acquire
// before it starts and Release when it is done; Serve does both for the
// connections of a listener. Create one with NewShutdownCoordinator; the
// zero value is not usable. Its methods are safe for concurrent use, and it
// starts no goroutines, so there is nothing to stop if Shutdown gives up.
type ShutdownCoordinator struct {
	ctx     context.Context // cancelled when shutdown begins
	cancel  context.CancelFunc
	drained context.Context // cancelled once shutdown has begun and active is 0
	drain   context.CancelFunc

	// Not a sync.WaitGroup: Acquire may race with a drain (both decide under
	// mu), which its Add from zero may not, and its Wait cannot be abandoned.
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

// Acquire registers a task that Shutdown waits for; the caller must Release
// the handle on every return path, or every Shutdown waits to its deadline.
// Acquire keeps returning handles after shutdown has begun, so that running
// tasks can register work they depend on, and returns nil once the
// coordinator is drained (every handle released): the caller must then not
// start the task. So an accept loop that does not stop when shutdown
// begins, as Serve does, holds the drain until Shutdown's deadline.
func (c *ShutdownCoordinator) Acquire() *ShutdownHandle {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.drained.Err() != nil {
		return nil
	}
	c.active++
	return &ShutdownHandle{c: c}
}

// Serve runs handle(conn, h) on a goroutine of its own for each connection
// accepted on ln, and releases h when handle returns; handle should return
// soon after h.Done() is closed. Serve closes ln when shutdown begins and
// returns nil once ln is closed, by Serve or by the program. It closes the
// connections that arrive once drained, and retries other Accept errors
// after a pause, as net/http does.
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
// and waits until every handle is released: it then returns nil, even if
// ctx is done too, and the coordinator is drained. If ctx is done first, it
// returns ctx.Err(), and the running tasks still count: a later Shutdown
// waits for them again. It may be called more than once, concurrently.
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
// call on a handle counts, and on a nil handle it does nothing, so a caller
// may defer it at once and still call it early.
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
