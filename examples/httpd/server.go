package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/cmdline"

	"github.com/shellflip-go/shellflip"
	"github.com/shellflip-go/shellflip/httpdrain"
)

const (
	// maxSlowMS bounds GET /slow?ms=N, so that a client cannot hold a
	// draining process for longer than this.
	maxSlowMS = 10_000

	// readyTimeout bounds how long a new process may take to serve; the
	// old process serves meanwhile.
	readyTimeout = 10 * time.Second

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
	gen, err := cmdline.ReceiveGeneration()
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
	d := httpdrain.New(s.http, ln)

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
			// The state is the generation alone, which no request
			// changes: nothing to hold while it is sent.
			NewProcessReady: func(context.Context, int) {
				// The new process is ready, and nobody knows yet. From
				// now on every request must reach it: this process stops
				// accepting, and forwards to it the requests on its
				// keep-alive connections.
				d.PassThrough()
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
	go func() {
		if err := d.Serve(); err != nil {
			log.Error("serving stopped", "err", err)
		}
	}()
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	p, err := r.Wait()
	if err == nil {
		log.Info("replaced by a new process; draining", "new_pid", p)
	} else {
		log.Info("stopping; draining", "reason", err)
		shellflip.Notify("STOPPING=1")
	}
	// Requests in flight complete, and each keep-alive connection may
	// carry one more, answered (or, after a restart, forwarded) with
	// "Connection: close"; see package httpdrain for why this is not
	// http.Server.Shutdown.
	start := time.Now()
	dctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := d.Drain(dctx); err != nil {
		log.Warn("drain deadline passed; closed the remaining connections", "drain", drain, "err", err)
		return 0
	}
	log.Info("drained; exiting", "took", time.Since(start).Round(time.Millisecond))
	return 0
}

// server is the HTTP side of one generation.
type server struct {
	http *http.Server
	body string // what GET / answers
}

func newServer(gen uint64, log *slog.Logger) *server {
	s := &server{body: fmt.Sprintf("pid=%d generation=%d\n", os.Getpid(), gen)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.hello)
	mux.HandleFunc("GET /slow", s.slow)
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s
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

// reply sends a complete text response.
func (s *server) reply(w http.ResponseWriter, code int, body string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	io.WriteString(w, body)
}
