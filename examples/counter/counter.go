package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"math"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip"
	"github.com/shellflip-go/shellflip/httpdrain"
)

// The counter: one generation of the service, from taking over to exiting.

// serve runs one generation of the counter and returns the exit code.
func serve(listen, socket string) int {
	// Every generation writes to the first one's stdout and stderr: if
	// their reader goes away, a write must fail, not kill the server.
	signal.Ignore(syscall.SIGPIPE)

	// 1. Before Start: the state, if a restart started this process, and
	//    the listener, the old process's or a new one.
	gen, count, err := receiveState()
	if err != nil {
		// The old process fails the restart with this reason, and keeps
		// counting.
		shellflip.GiveUp(err)
		log.Printf("cannot take over from the old process: %v", err)
		return 1
	}
	ln, err := shellflip.Listen("tcp", listen)
	if err != nil {
		log.Print(err)
		return 1
	}
	var n atomic.Uint64
	n.Store(count)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /next", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", n.Add(1))
	})
	d := httpdrain.New(&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln)

	// 2. Start returns once this process is the one that serves, and the
	//    old one counts no more: only then serve.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := shellflip.Start(ctx, shellflip.Config{
		SocketPath: socket,
		Lifecycle: &shellflip.Lifecycle{
			// The count stops where the new process takes it up:
			// requests wait from here until the outcome.
			SendState: func(ctx context.Context, w io.Writer) error {
				if err := d.Hold(ctx); err != nil {
					return err
				}
				_, err := fmt.Fprintf(w, "%d %d\n", gen, n.Load())
				return err
			},
			// The new process counts from now on: stop accepting, and
			// forward to it what waits and what still comes here.
			NewProcessReady: func(context.Context, int) { d.PassThrough() },
			// Nobody took the count up: go on counting here.
			NewProcessFailed: func(context.Context, error) { d.Resume() },
		},
	})
	if err != nil {
		log.Print(err)
		return 1
	}
	go func() {
		if err := d.Serve(); err != nil {
			log.Print(err)
		}
	}()
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	// 3. Replaced, or stopped: finish what this process's connections carry.
	if _, err := r.Wait(); err != nil {
		log.Print(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Drain(ctx); err != nil {
		log.Print(err)
	}
	return 0
}

// receiveState returns this process's generation and the count: 0 and 0
// after a fresh start, or what SendState wrote, with the generation one up.
func receiveState() (gen, count uint64, err error) {
	state, err := shellflip.ReceiveState()
	if err != nil || state == nil {
		return 0, 0, err
	}
	defer state.Close()
	b, err := io.ReadAll(io.LimitReader(state, 64))
	if err != nil {
		return 0, 0, err
	}
	return parseState(string(b))
}

// parseState parses exactly what SendState writes, "GENERATION COUNT\n",
// and returns the next generation and the count.
func parseState(s string) (gen, count uint64, err error) {
	_, err = fmt.Sscanf(s, "%d %d\n", &gen, &count)
	if err != nil || fmt.Sprintf("%d %d\n", gen, count) != s || gen == math.MaxUint64 {
		return 0, 0, fmt.Errorf("the state %q is not what SendState writes", s)
	}
	return gen + 1, count, nil
}
