// Package httpdrain hands an http.Server over to a new process at a
// graceful restart (package shellflip) without failing or losing a request.
// A Server gives a restart what it needs:
//
//   - Hold, at the start of Lifecycle.SendState: the requests in flight
//     complete and new ones wait, so that the state the handlers change
//     stays as it is written for the new process;
//   - PassThrough, in Lifecycle.NewProcessReady: this process stops
//     accepting, and forwards every request that still reaches it on its
//     keep-alive connections, the waiting ones first, to the new process;
//   - Resume, in Lifecycle.NewProcessFailed: the waiting requests are
//     served here, and the process carries on;
//   - Drain, once Restarter.Wait returns: it waits until every connection
//     is gone.
//
// Drain is not http.Server.Shutdown, which, like SetKeepAlivesEnabled(false),
// closes idle keep-alive connections at once: a busy client's connection is
// idle for an instant between a response and its next request, which may
// be on the wire already, and fails (Go's client retries it if it may; wrk,
// curl and browsers mostly report an error). Drain lets each connection
// carry one more request, answered with "Connection: close", and closes
// only a connection on which no request comes for IdleGrace, as an idle
// timeout would. Forwarding begins in NewProcessReady, not after Wait: a
// client told that the restart succeeded must reach the new process.
//
// This package is apart from shellflip, which does not import net/http: it
// adds about 1.9 MB to a binary, which a service that does not speak HTTP,
// perhaps confined by seccomp, must not carry.
package httpdrain

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"time"
)

// IdleGrace is how long Drain waits for a request on a connection before
// it closes the connection.
const IdleGrace = time.Second

// Server serves an http.Server on a listener, and hands its requests over
// at a restart. Its methods are safe to call from any goroutine.
type Server struct {
	srv     *http.Server
	ln      net.Listener
	handler http.Handler // srv's own
	proxy   *httputil.ReverseProxy
	grace   time.Duration
	serving sync.WaitGroup // Serve calls

	mu       sync.Mutex
	held     chan struct{} // closed to let the waiting requests go on; nil unless held
	active   int           // requests being served here: neither waiting nor forwarded
	passing  bool          // PassThrough was called
	draining bool          // Drain was called
	conns    map[net.Conn]*connState
	change   chan struct{} // closed when active or conns shrink; nil unless await waits
}

type connState struct {
	state http.ConnState
	idle  *time.Timer // ends the connection if no request comes; nil until draining
}

// New returns a Server that serves srv on ln. It wraps srv.Handler
// (http.DefaultServeMux if nil) and srv.ConnState, which must not change
// afterwards; srv must be served by Serve alone, and not shut down but by
// Drain. ln serves plain HTTP (not TLS): PassThrough forwards to its
// address. Call New before shellflip.Start, whose hooks use the Server, and
// Serve once Start has returned.
func New(srv *http.Server, ln net.Listener) *Server {
	s := &Server{srv: srv, ln: ln, handler: srv.Handler, grace: IdleGrace, conns: map[net.Conn]*connState{}}
	if s.handler == nil {
		s.handler = http.DefaultServeMux
	}
	addr := ln.Addr()
	s.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", addr.String()
			pr.Out.Host = pr.In.Host
			// The new process sees the request come from this process:
			// the client's address goes after the X-Forwarded-For the
			// client sent, whose X-Forwarded-Host and -Proto stay.
			pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
			pr.SetXForwarded()
			for _, k := range []string{"X-Forwarded-Host", "X-Forwarded-Proto"} {
				if v := pr.In.Header[k]; v != nil {
					pr.Out.Header[k] = v
				}
			}
		},
		// A connection per request: none lingers once the clients are gone.
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return new(net.Dialer).DialContext(ctx, addr.Network(), addr.String())
			},
		},
		ErrorLog: srv.ErrorLog,
	}
	srv.Handler = http.HandlerFunc(s.serveHTTP)
	hook := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		s.mu.Lock()
		s.track(c, st)
		s.mu.Unlock()
		if hook != nil {
			hook(c, st)
		}
	}
	return s
}

// Serve serves srv on ln, as http.Server.Serve does, until PassThrough or
// Drain closes ln, and then returns nil. Call it once.
func (s *Server) Serve() error {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		return nil
	}
	s.serving.Add(1)
	s.mu.Unlock()
	defer s.serving.Done()
	err := s.srv.Serve(s.ln)
	if errors.Is(err, net.ErrClosed) || errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Hold makes the requests that arrive from now on wait, and waits until
// those being served have completed: from then until PassThrough, Resume
// or Drain no handler runs, and what the handlers did happens before Hold
// returns. A handler that does not return keeps it waiting: a long poll,
// a connection it hijacked and serves, or one that waits for this very
// restart. If ctx is done first, Hold lets the waiting requests go on, as
// Resume does, and returns an error that wraps ctx's cause.
func (s *Server) Hold(ctx context.Context) error {
	s.mu.Lock()
	if s.held == nil {
		s.held = make(chan struct{})
	}
	s.mu.Unlock()
	if err := s.await(ctx, func() bool { return s.active == 0 }); err != nil {
		s.Resume()
		return fmt.Errorf("httpdrain: waiting for the requests in flight: %w", err)
	}
	return nil
}

// Resume lets the waiting requests go on: served here, or forwarded after
// PassThrough. It does nothing if nothing is held.
func (s *Server) Resume() {
	s.mu.Lock()
	wake(&s.held)
	s.mu.Unlock()
}

// PassThrough closes ln (the new process accepts on its own copy of the
// listening socket) and forwards every request from then on, the waiting
// ones first, to ln's address, with "Connection: close" on the response.
// It cannot be undone; calling it again does nothing.
func (s *Server) PassThrough() {
	s.ln.Close() // first: a forwarded request must not be accepted here
	s.mu.Lock()
	defer s.mu.Unlock()
	s.passing = true
	wake(&s.held)
}

// Drain closes ln, lets the waiting requests go on, and waits until every
// connection is gone: requests complete, each connection may carry one
// more, answered with "Connection: close" (and forwarded after
// PassThrough), and one that carries none for IdleGrace is closed.
// Hijacked connections are the handler's. If ctx is done first, Drain
// closes the connections left (http.Server.Close) and returns an error
// that wraps ctx's cause. Safe to call more than once.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	wake(&s.held)
	for c, tc := range s.conns {
		if tc.idle == nil {
			s.track(c, tc.state)
		}
	}
	s.mu.Unlock()
	s.ln.Close()
	s.serving.Wait() // no connection is added from now on
	n := 0
	if err := s.await(ctx, func() bool { n = len(s.conns); return n == 0 }); err != nil {
		s.srv.Close()
		return fmt.Errorf("httpdrain: closed %d connections still open: %w", n, err)
	}
	return nil
}

// await waits until cond, which reads what s.mu guards, holds, or ctx is
// done.
func (s *Server) await(ctx context.Context, cond func() bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for !cond() {
		if s.change == nil {
			s.change = make(chan struct{})
		}
		change := s.change
		s.mu.Unlock()
		select {
		case <-change:
		case <-ctx.Done():
			s.mu.Lock()
			return context.Cause(ctx)
		}
		s.mu.Lock()
	}
	return nil
}

// wake closes *ch, if it is open, and forgets it. s.mu is held.
func wake(ch *chan struct{}) {
	if *ch != nil {
		close(*ch)
		*ch = nil
	}
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	for s.held != nil {
		held := s.held
		s.mu.Unlock()
		select {
		case <-held:
		case <-r.Context().Done(): // the client left, or Drain gave up
			return
		}
		s.mu.Lock()
	}
	forward, closing := s.passing, s.passing || s.draining
	if !forward {
		s.active++
	}
	s.mu.Unlock()
	if closing {
		// The client's next request opens a connection to the new
		// process, or finds none.
		w.Header().Set("Connection", "close")
	}
	if forward {
		s.proxy.ServeHTTP(w, r)
		return
	}
	defer func() {
		s.mu.Lock()
		s.active--
		wake(&s.change)
		s.mu.Unlock()
	}()
	s.handler.ServeHTTP(w, r)
}

// track records a connection's state (srv.ConnState) and, once draining,
// gives one on which no request is under way the grace period for one.
// s.mu is held.
func (s *Server) track(c net.Conn, st http.ConnState) {
	if tc := s.conns[c]; tc != nil && tc.idle != nil {
		tc.idle.Stop()
	}
	if st == http.StateClosed || st == http.StateHijacked {
		delete(s.conns, c)
		wake(&s.change)
		return
	}
	tc := &connState{state: st}
	s.conns[c] = tc
	if s.draining && (st == http.StateNew || st == http.StateIdle) {
		tc.idle = time.AfterFunc(s.grace, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.conns[c] == tc {
				// No request came. A deadline, not Close: the server's
				// wait for a request fails and it closes the connection,
				// but once a request's first bytes have come it reads
				// the request under deadlines of its own, set after.
				c.SetReadDeadline(time.Now())
			}
		})
	}
}
