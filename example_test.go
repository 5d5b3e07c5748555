package shellflip_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/shellflip-go/shellflip"
)

// The restart API.

// A service that keeps its listener and a counter across restarts, and
// drains when a new copy of it has taken over.
func ExampleStart() {
	var served int64
	if r, err := shellflip.ReceiveState(); err != nil {
		log.Fatal(err)
	} else if r != nil {
		// Validate the state before Ready: a new process that cannot use
		// it should exit, which fails the restart and keeps the old one.
		if _, err := fmt.Fscan(r, &served); err != nil {
			log.Fatalf("state from the old process: %v", err)
		}
		r.Close()
	}

	ln, err := shellflip.Listen("tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "hello from %d\n", os.Getpid())
	})}
	go srv.Serve(ln)

	restarter, err := shellflip.Start(context.Background(), shellflip.Config{
		SocketPath: "/run/example.sock",
		Lifecycle: &shellflip.Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				_, err := fmt.Fprintln(w, served)
				return err
			},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	if p, err := restarter.Wait(); err != nil {
		log.Printf("no more restarts: %v", err)
	} else {
		log.Printf("replaced by pid %d; draining", p)
	}
	srv.SetKeepAlivesEnabled(false)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}

// The restart client: a command that asks the running service to restart.
func ExampleRequestRestart() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pid, err := shellflip.RequestRestart(ctx, "/run/example.sock")
	switch {
	case errors.Is(err, shellflip.ErrRestartFailed):
		// The service tried and failed; err is its explanation.
		fmt.Fprintf(os.Stderr, "Restart failed: %v\n", err)
		os.Exit(1)
	case err != nil:
		fmt.Fprintf(os.Stderr, "cannot reach the service: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("Restart succeeded, child pid is %d\n", pid)
}

// Names under which listeners are registered, and passed on, by default.
func ExampleListenerName() {
	fmt.Println(shellflip.ListenerName("tcp", "127.0.0.1:8080"))
	fmt.Println(shellflip.ListenerName("tcp", "[::1]:0"))
	fmt.Println(shellflip.ListenerName("unix", "/run/app.sock"))
	// Output:
	// tcp/127.0.0.1%3A8080
	// tcp/[%3A%3A1]%3A0
	// unix//run/app.sock
}

// The drain coordinator.

// A connection handler serves requests until shutdown begins, finishes the
// one in hand, and returns. The old process drains by calling Shutdown once
// the new process is ready.
func ExampleShutdownCoordinator() {
	coord := shellflip.NewShutdownCoordinator()

	requests := make(chan string)
	handle := func(h *shellflip.ShutdownHandle) {
		defer h.Release()
		for {
			select {
			case r := <-requests:
				fmt.Println("served", r)
			case <-h.Done():
				fmt.Println("handler: shutdown began, closing connection")
				return
			}
		}
	}

	// The accept loop registers each handler before starting it.
	if h := coord.Acquire(); h != nil {
		go handle(h)
	}
	requests <- "GET /a"
	requests <- "GET /b"

	// The restart succeeded: stop taking work and wait for the handler,
	// but not for longer than the drain timeout.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := coord.Shutdown(ctx); err != nil {
		fmt.Println("drain incomplete:", err)
		return
	}
	fmt.Println("drained, active handlers:", coord.Active())

	// A connection that arrives now must be refused.
	if coord.Acquire() == nil {
		fmt.Println("late connection refused")
	}

	// Output:
	// served GET /a
	// served GET /b
	// handler: shutdown began, closing connection
	// drained, active handlers: 0
	// late connection refused
}

// Shutdown gives up at its context's deadline if a task does not finish.
func ExampleShutdownCoordinator_Shutdown() {
	coord := shellflip.NewShutdownCoordinator()
	stuck := coord.Acquire() // a task that ignores Done

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	err := coord.Shutdown(ctx)
	fmt.Println(err)
	fmt.Println("still active:", coord.Active())

	stuck.Release()
	fmt.Println(coord.Shutdown(context.Background()))

	// Output:
	// context deadline exceeded
	// still active: 1
	// <nil>
}

// Serve runs an accept loop that Shutdown waits for: each connection's
// handler holds a handle, and the loop ends when shutdown begins.
func ExampleShutdownCoordinator_Serve() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	coord := shellflip.NewShutdownCoordinator()
	served := make(chan error, 1)
	go func() {
		served <- coord.Serve(ln, func(c net.Conn, h *shellflip.ShutdownHandle) {
			defer c.Close()
			io.WriteString(c, "hello\n")
			<-h.Done() // a long-lived connection, until shutdown begins
		})
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	greeting, _ := bufio.NewReader(c).ReadString('\n')
	fmt.Print(greeting)

	// The restart succeeded: stop accepting, let the handler finish.
	if err := coord.Shutdown(context.Background()); err != nil {
		fmt.Println(err)
	}
	fmt.Println("Serve returned", <-served)

	// Output:
	// hello
	// Serve returned <nil>
}
