package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip"
)

const (
	// maxSlowMS bounds GET /slow?ms=N, so that a client cannot hold a
	// draining process for longer than this.
	maxSlowMS = 10_000

	// readyTimeout bounds how long a new process may take to serve; the
	// old process serves meanwhile.
	readyTimeout = 10 * time.Second

	// idleGrace is how long a draining process waits for the next request
	// on a connection before it closes it; see drain.go.
	idleGrace = time.Second

	// listenerName is the name of the listening socket in shellflip's
	// registry: the FileDescriptorName= of httpd.socket, and the name under
	// which the socket passes to each new process.
	listenerName = "http"
)

// serve runs one generation of the server: it takes over from the old
// process, if any, serves until a restart replaced it or a signal stopped
// it, drains, and returns the exit code.
func serve(listen, socket string, drain time.Duration, notifyReload, storeFDs bool) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
	// Every generation shares the first one's stdout and stderr. If their
	// reader goes away, a write there must fail, not kill the server with
	// SIGPIPE (Go's default for fds 1 and 2) in the middle of a restart.
	signal.Ignore(syscall.SIGPIPE)

	// Everything inherited must be taken before Start: it declares this
	// process ready and closes what was not taken.
	gen, err := receiveGeneration()
	if err != nil {
		log.Error("cannot take over from the old process", "err", err)
		return 1
	}
	ln, err := (&shellflip.ListenConfig{Name: listenerName}).Listen(context.Background(), "tcp", listen)
	if err != nil {
		log.Error("cannot listen", "addr", listen, "err", err)
		return 1
	}
	s := newServer(gen, log)

	// A stop signal ends the Restarter, and the process then drains. Later
	// signals are caught and ignored: the drain ends by itself, or at its
	// deadline, which under systemd is below TimeoutStopSec.
	ctx, stop := signal.NotifyContext(context.Background(), stopSignals...)
	defer stop()
	var reloadSignal os.Signal // nil: SIGUSR1
	if notifyReload {
		reloadSignal = syscall.SIGHUP // ReloadSignal='s default
	}
	r, err := shellflip.Start(ctx, shellflip.Config{
		SocketPath:   socket,
		Signal:       reloadSignal,
		NotifyReload: notifyReload,
		Logger:       log,
		ReadyTimeout: readyTimeout,
		Lifecycle: &shellflip.Lifecycle{
			SendState: func(_ context.Context, w io.Writer) error {
				_, err := fmt.Fprintf(w, "%d\n", gen)
				return err
			},
			NewProcessReady: func(context.Context, int) {
				// The new process is ready, and nobody knows yet. From
				// now on every request must reach it: requests on this
				// process's keep-alive connections are forwarded to it,
				// and this process stops accepting (Close waits for a
				// pending Accept; the new process has its own copy of
				// the listening socket).
				s.handOver(ln.Addr())
				ln.Close()
			},
		},
	})
	if err != nil {
		log.Error("cannot start the restarter", "err", err)
		return 1
	}
	go watchdog(ctx, log)
	if storeFDs {
		// Idempotent: systemd ignores an fd it stores already, so every
		// generation may do it. (Start has returned: this process is the
		// main process, from which systemd takes messages.)
		if err := shellflip.StoreFDs(listenerName); err != nil {
			log.Warn("cannot keep the listening socket in systemd's fd store", "err", err)
		}
	}
	served := make(chan error, 1)
	go func() { served <- s.http.Serve(ln) }()
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	p, err := r.Wait()
	if err == nil {
		log.Info("replaced by a new process; draining", "new_pid", p)
	} else {
		log.Info("stopping; draining", "reason", err)
		s.winding.Store(true)
		shellflip.Notify("STOPPING=1")
	}
	// Serve returns once the listener is closed; every connection it
	// accepted before that is tracked by then.
	ln.Close()
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		log.Error("serving stopped", "err", err)
	}
	start := time.Now()
	dctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := s.conns.drain(dctx); err != nil {
		log.Warn("drain deadline passed; closing the remaining connections", "drain", drain, "connections", s.conns.count())
		s.http.Close()
		return 0
	}
	s.http.Close() // nothing is left; this only releases the server
	log.Info("drained; exiting", "took", time.Since(start).Round(time.Millisecond))
	return 0
}

// receiveGeneration returns this process's generation: 0 after a fresh
// start, one more than the old process's after a restart. The state is the
// old process's generation in decimal and a newline.
func receiveGeneration() (uint64, error) {
	state, err := shellflip.ReceiveState()
	if err != nil || state == nil {
		return 0, err
	}
	defer state.Close()
	b, err := io.ReadAll(io.LimitReader(state, 32))
	if err != nil {
		return 0, fmt.Errorf("reading the state: %w", err)
	}
	line, ok := strings.CutSuffix(string(b), "\n")
	prev, perr := strconv.ParseUint(line, 10, 64)
	if !ok || perr != nil {
		return 0, fmt.Errorf("the state %q is not a generation number and a newline", b)
	}
	if prev == math.MaxUint64 {
		return 0, fmt.Errorf("the old process is generation %d, the last there can be", prev)
	}
	return prev + 1, nil
}

// server is the HTTP side of one generation.
type server struct {
	http  *http.Server
	mux   *http.ServeMux
	conns *connTracker
	body  string // what GET / answers
	log   *slog.Logger

	// winding is set once this process serves no more new connections:
	// every response from then on carries "Connection: close".
	winding atomic.Bool
	// proxy is set after a successful restart: requests that arrive on this
	// process's keep-alive connections from then on are answered by the new
	// process (see handOver).
	proxy atomic.Pointer[httputil.ReverseProxy]
}

func newServer(gen uint64, log *slog.Logger) *server {
	s := &server{
		mux:   http.NewServeMux(),
		conns: newConnTracker(idleGrace),
		body:  fmt.Sprintf("pid=%d generation=%d\n", os.Getpid(), gen),
		log:   log,
	}
	s.mux.HandleFunc("GET /{$}", s.hello)
	s.mux.HandleFunc("GET /slow", s.slow)
	s.http = &http.Server{
		Handler:           s,
		ConnState:         s.conns.setState,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p := s.proxy.Load(); p != nil {
		w.Header().Set("Connection", "close")
		p.ServeHTTP(w, r)
		return
	}
	if s.winding.Load() {
		w.Header().Set("Connection", "close")
	}
	s.mux.ServeHTTP(w, r)
}

func (s *server) hello(w http.ResponseWriter, r *http.Request) {
	s.reply(w, http.StatusOK, s.body)
}

func (s *server) slow(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()["ms"]
	var ms uint64
	var err error
	if len(q) != 1 {
		err = errors.New("want one")
	} else {
		ms, err = strconv.ParseUint(q[0], 10, 64)
	}
	if err != nil || ms > maxSlowMS {
		s.reply(w, http.StatusBadRequest, fmt.Sprintf("ms: want a whole number of milliseconds from 0 to %d\n", maxSlowMS))
		return
	}
	t := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
		s.reply(w, http.StatusOK, s.body)
	case <-r.Context().Done():
		// The client went away, or the drain deadline passed.
	}
}

// reply sends a complete text response. A response that leaves after the
// process began to wind down closes its connection, however long ago its
// request arrived: a request in flight at a restart completes here, and the
// client's next one goes to the new process.
func (s *server) reply(w http.ResponseWriter, code int, body string) {
	h := w.Header()
	if s.winding.Load() {
		h.Set("Connection", "close")
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	io.WriteString(w, body)
}

// handOver switches this process to draining once the new process is ready
// (Lifecycle.NewProcessReady):
// responses close their connections, and a request that arrives on a
// keep-alive connection from now on is forwarded to the new process through
// the listening socket, which only the new process accepts on now. See
// drain.go for why it is forwarded rather than refused or answered here.
func (s *server) handOver(addr net.Addr) {
	target := addr.String() // 0.0.0.0 and [::] reach this host when dialled
	s.proxy.Store(&httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = target
			pr.Out.Host = pr.In.Host
			// The new process sees the request come from this one: say
			// whom it is really from.
			pr.SetXForwarded()
		},
		// One request per connection: nothing lingers between the
		// processes once the last client connection is done.
		Transport: &http.Transport{DisableKeepAlives: true},
		ErrorLog:  slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	})
	s.winding.Store(true)
}
