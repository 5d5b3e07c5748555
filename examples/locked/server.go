//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/cmdline"

	"github.com/shellflip-go/shellflip"
)

const (
	// readyTimeout bounds how long a new process may take to serve; the
	// old process serves meanwhile.
	readyTimeout = 10 * time.Second
	// drainTimeout bounds how long a replaced or stopped process waits for
	// the requests it is serving.
	drainTimeout = 10 * time.Second
)

// serve runs one generation of the server (see the package documentation
// for its steps) and returns the exit code.
func serve(listen, socket string, useBroker bool) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
	// A write to a closed stdout must fail, not kill the server (Go's
	// default for fds 1 and 2).
	signal.Ignore(syscall.SIGPIPE)

	var broker *shellflip.Broker
	if useBroker {
		var err error
		if broker, err = shellflip.NewBroker(); err != nil {
			log.Error("cannot start the restart broker", "err", err)
			return 1
		}
	}
	gen, err := cmdline.ReceiveGeneration()
	if err != nil {
		log.Error("cannot take over from the old process", "err", err)
		return 1
	}
	ln, err := shellflip.Listen("tcp", listen)
	if err != nil {
		log.Error("cannot listen", "addr", listen, "err", err)
		return 1
	}
	// What packages open lazily must be opened now, while files may be:
	// the time package reads /etc/localtime the first time the local zone
	// is used (the logs' times).
	_ = time.Local.String()
	if err := lockDown(); err != nil {
		// Before Start: the restart that started this process fails, and
		// the old one keeps serving.
		err = fmt.Errorf("locking down: %w", err)
		log.Error("cannot lock down", "err", err)
		shellflip.GiveUp(err)
		return 1
	}

	body := fmt.Sprintf("pid=%d generation=%d\n", os.Getpid(), gen)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, body) })
	// A draining process waits for its connections itself: Shutdown would
	// drop a request that it finds still being read (net/http's
	// conn.serve gives up on it), and a restart would fail it.
	var conns sync.WaitGroup
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ConnState: func(_ net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				conns.Add(1)
			case http.StateClosed, http.StateHijacked:
				conns.Done()
			}
		},
	}
	// Every response closes its connection, so that no request races the
	// close of an idle connection when this process drains. (examples/httpd
	// keeps connections alive, and shows what that takes.)
	srv.SetKeepAlivesEnabled(false)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := shellflip.Start(ctx, shellflip.Config{
		SocketPath:   socket,
		Broker:       broker,
		Logger:       log,
		ReadyTimeout: readyTimeout,
		Lifecycle: &shellflip.Lifecycle{
			SendState: func(_ context.Context, w io.Writer) error {
				_, err := fmt.Fprintf(w, "%d\n", gen)
				return err
			},
			// The new process serves: stop accepting before anyone
			// learns it. (The new process has its own copy of the
			// listening socket.)
			NewProcessReady: func(context.Context, int) { ln.Close() },
		},
	})
	if err != nil {
		log.Error("cannot start the restarter", "err", err)
		return 1
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	if p, err := r.Wait(); err == nil {
		log.Info("replaced by a new process; draining", "new_pid", p)
	} else {
		log.Info("stopping; draining", "reason", err)
	}
	ln.Close()
	<-served // every connection it accepted is counted by now
	drained := make(chan struct{})
	go func() {
		conns.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(drainTimeout):
		log.Warn("drain deadline passed; closing the remaining connections")
		srv.Close()
	}
	return 0
}
