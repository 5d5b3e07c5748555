package main

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// Draining, and why it is not http.Server.Shutdown.
//
// After a restart the old process must finish what it has without failing a
// request. Requests in flight are easy: they complete, and their responses
// carry "Connection: close". The hard part is a keep-alive connection that is
// idle: the client may be sending its next request at the very moment the
// server decides to close. Shutdown and SetKeepAlivesEnabled(false) close
// idle connections at once (net/http's closeIdleConns), and a busy
// keep-alive client always has connections that are idle for an instant
// between a response and its next request. Closing one races that request:
// the client sees a reset or an EOF instead of a response. Go's own client
// quietly retries such a request; most others (wrk, curl, browsers with a
// POST) report an error. It is the race that makes "zero-downtime" restarts
// fail a few requests under load.
//
// So a draining process never closes a connection that may be carrying a
// request. It waits for each keep-alive connection's next request and answers
// it with "Connection: close", after which the client opens a new connection,
// which the new process accepts. And it does not answer that request itself:
// it forwards it to the new process (server.handOver), so that a client sees
// the new process from its first request after the restart, as it would have
// over a new connection. Only a connection on which no request came for
// idleGrace is closed: that client was idle anyway, and an idle connection
// can be closed under any client's feet (an idle timeout does the same); HTTP
// clients are built to retry then.
//
// The switch cannot wait until Wait returns: a client told "restart
// succeeded" could have its next request at the old process before Wait
// returns. So it happens in Lifecycle.NewProcessReady, which runs once the
// new process is ready and before anybody is told: from then on this process
// accepts nothing and forwards what arrives on its connections. While the
// new process starts, the old one serves as usual; if the restart fails,
// nothing has changed.

// connTracker follows the server's connections (http.Server.ConnState), so
// that a draining process knows when the last one is gone, and closes those
// that stay idle for idleGrace.
type connTracker struct {
	grace time.Duration

	mu       sync.Mutex
	conns    map[net.Conn]*trackedConn
	draining bool
	empty    chan struct{} // closed once draining and no connection is left
	isEmpty  bool          // empty is closed
}

type trackedConn struct {
	state http.ConnState
	seq   uint64      // bumped at every change; a timer armed earlier does nothing
	timer *time.Timer // closes the connection if it stays idle; nil if none
}

func newConnTracker(grace time.Duration) *connTracker {
	return &connTracker{grace: grace, conns: map[net.Conn]*trackedConn{}, empty: make(chan struct{})}
}

// setState is the http.Server's ConnState hook.
func (t *connTracker) setState(c net.Conn, state http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	tc := t.conns[c]
	if state == http.StateClosed || state == http.StateHijacked {
		if tc != nil {
			tc.disarm()
			delete(t.conns, c)
		}
		t.checkEmpty()
		return
	}
	if tc == nil {
		tc = &trackedConn{}
		t.conns[c] = tc
	}
	tc.state = state
	tc.disarm()
	if t.draining {
		t.arm(c, tc)
	}
}

// arm starts the idle timer of a connection that waits for a request: one
// that is idle between requests, or new and has not sent its first.
func (t *connTracker) arm(c net.Conn, tc *trackedConn) {
	if tc.state != http.StateIdle && tc.state != http.StateNew {
		return
	}
	seq := tc.seq
	tc.timer = time.AfterFunc(t.grace, func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		// A request may have arrived meanwhile: the state changed, and
		// with it seq.
		if t.conns[c] == tc && tc.seq == seq {
			c.Close() // the server sees the read fail, and reports StateClosed
		}
	})
}

func (tc *trackedConn) disarm() {
	tc.seq++
	if tc.timer != nil {
		tc.timer.Stop()
		tc.timer = nil
	}
}

func (t *connTracker) checkEmpty() {
	if t.draining && len(t.conns) == 0 && !t.isEmpty {
		t.isEmpty = true
		close(t.empty)
	}
}

// drain starts closing connections that wait for a request for longer than
// the grace period, and waits until no connection is left or ctx is done.
// Call it once the listener is closed and Serve has returned, so that no
// connection is added meanwhile.
func (t *connTracker) drain(ctx context.Context) error {
	t.mu.Lock()
	if !t.draining {
		t.draining = true
		for c, tc := range t.conns {
			tc.disarm()
			t.arm(c, tc)
		}
		t.checkEmpty()
	}
	t.mu.Unlock()
	select {
	case <-t.empty:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// count returns the number of connections open.
func (t *connTracker) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}
