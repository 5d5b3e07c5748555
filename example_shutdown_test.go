package shellflip_test

import (
	"context"
	"fmt"
	"time"

	"github.com/shellflip-go/shellflip"
)

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

// Context carries the shutdown signal into code that takes a context.
func ExampleShutdownCoordinator_Context() {
	coord := shellflip.NewShutdownCoordinator()
	h := coord.Acquire()

	done := make(chan struct{})
	go func(ctx context.Context) {
		defer close(done)
		defer h.Release()
		<-ctx.Done()
		fmt.Println("handler:", ctx.Err())
	}(coord.Context())

	if err := coord.Shutdown(context.Background()); err != nil {
		fmt.Println(err)
	}
	<-done

	// Output:
	// handler: context canceled
}
