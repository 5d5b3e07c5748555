//go:build linux

package shellflip

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The drain coordinator (shutdown.go).

// shutdownTimeout bounds tests that run on the real clock, so that a bug
// fails the test instead of hanging it. Passing tests never wait for it.
const shutdownTimeout = 10 * time.Second

// shutdownStart runs c.Shutdown(ctx) in a new goroutine and returns a
// channel that receives its result.
func shutdownStart(c *ShutdownCoordinator, ctx context.Context) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- c.Shutdown(ctx) }()
	return errc
}

// shutdownWaiting fails t if the Shutdown call that reports to errc has
// returned, once every goroutine of the synctest bubble is durably
// blocked: with a handle held, it must still be waiting.
func shutdownWaiting(t *testing.T, what string, errc <-chan error) {
	t.Helper()
	synctest.Wait()
	select {
	case err := <-errc:
		t.Fatalf("%s returned %v with a handle held", what, err)
	default:
	}
}

// shutdownIsClosed reports whether ch is closed, without blocking.
func shutdownIsClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestShutdownNoTasks(t *testing.T) {
	c := NewShutdownCoordinator()
	// A context that is already done: Shutdown must still report the
	// completed drain, not the context's error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with no tasks: %v, want nil", err)
	}
	if n := c.Active(); n != 0 {
		t.Fatalf("Active = %d, want 0", n)
	}
}

func TestShutdownWaitsForOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		if h == nil {
			t.Fatal("Acquire before shutdown returned nil")
		}
		errc := shutdownStart(c, context.Background())

		// Shutdown must be waiting for h, not have returned.
		shutdownWaiting(t, "Shutdown", errc)
		if !shutdownIsClosed(h.Done()) {
			t.Fatal("handle Done not closed while Shutdown waits")
		}

		h.Release()
		if err := <-errc; err != nil {
			t.Fatalf("Shutdown: %v, want nil", err)
		}
	})
}

func TestShutdownWaitsForMany(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 50
		c := NewShutdownCoordinator()

		// Each task holds its handle until shutdown begins, then
		// reports that it is about to release.
		var finished atomic.Int32
		for range n {
			h := c.Acquire()
			go func() {
				defer h.Release()
				<-h.Done()
				finished.Add(1)
			}()
		}
		if got := c.Active(); got != n {
			t.Fatalf("Active = %d, want %d", got, n)
		}

		if err := c.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown: %v, want nil", err)
		}
		if got := finished.Load(); got != n {
			t.Fatalf("Shutdown returned after %d of %d tasks finished", got, n)
		}
		if got := c.Active(); got != 0 {
			t.Fatalf("Active after Shutdown = %d, want 0", got)
		}
	})
}

func TestShutdownDeadline(t *testing.T) {
	// Inside the bubble time is fake, so the one-second deadline passes
	// as soon as every goroutine is blocked, without waiting for real.
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		err := c.Shutdown(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown with a handle held: %v, want %v", err, context.DeadlineExceeded)
		}
		if got := c.Active(); got != 1 {
			t.Fatalf("Active after deadline = %d, want 1", got)
		}

		// The held task still counts: it can register more work, and
		// a second Shutdown waits for all of it.
		h2 := c.Acquire()
		if h2 == nil {
			t.Fatal("Acquire after a timed-out Shutdown returned nil with a handle held")
		}
		errc := shutdownStart(c, context.Background())
		h.Release()
		shutdownWaiting(t, "second Shutdown", errc)
		h2.Release()
		if err := <-errc; err != nil {
			t.Fatalf("second Shutdown: %v, want nil", err)
		}
	})
}

func TestShutdownReleaseIdempotent(t *testing.T) {
	c := NewShutdownCoordinator()
	h1 := c.Acquire()
	h2 := c.Acquire()

	h1.Release()
	h1.Release()
	if got := c.Active(); got != 1 {
		t.Fatalf("Active after releasing one handle twice = %d, want 1", got)
	}

	// Concurrent double release must also count once.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(h2.Release)
	}
	wg.Wait()
	if got := c.Active(); got != 0 {
		t.Fatalf("Active = %d, want 0", got)
	}

	// A handle released before Shutdown does not hold it, and releasing
	// again after the drain changes nothing.
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	h1.Release()
	h2.Release()
	if got := c.Active(); got != 0 {
		t.Fatalf("Active after late Release = %d, want 0", got)
	}
}

func TestShutdownNilHandle(t *testing.T) {
	var h *ShutdownHandle
	h.Release()
	h.Release()
	if !shutdownIsClosed(h.Done()) {
		t.Fatal("Done on a nil handle is not closed")
	}
}

func TestShutdownAcquireAfterShutdown(t *testing.T) {
	c := NewShutdownCoordinator()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for range 3 {
		if h := c.Acquire(); h != nil {
			h.Release()
			t.Fatal("Acquire after Shutdown finished returned a handle")
		}
	}
	if got := c.Active(); got != 0 {
		t.Fatalf("Active = %d, want 0", got)
	}
	// The idiomatic caller pattern works on the nil result.
	h := c.Acquire()
	defer h.Release()
	if !shutdownIsClosed(h.Done()) {
		t.Fatal("Done on the nil handle from a drained coordinator is not closed")
	}
}

func TestShutdownAcquireDuringShutdown(t *testing.T) {
	// Before the drain, Acquire succeeds even though shutdown has begun,
	// and Shutdown waits for the new handle too.
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		errc := shutdownStart(c, context.Background())
		<-c.ctx.Done()

		sub := c.Acquire()
		if sub == nil {
			t.Fatal("Acquire while a handle is held returned nil")
		}
		h.Release()
		shutdownWaiting(t, "Shutdown, with a late handle held,", errc)
		sub.Release()
		if err := <-errc; err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if c.Acquire() != nil {
			t.Fatal("Acquire after the drain returned a handle")
		}
	})
}

// TestShutdownAcquireRace races Acquire against concurrent Shutdown calls
// and checks the invariant callers rely on: once a Shutdown has returned
// nil, no handle is unreleased and no Acquire succeeds. Run it with -race.
func TestShutdownAcquireRace(t *testing.T) {
	const (
		rounds    = 200
		acquirers = 32
		shutdowns = 3
	)
	for range rounds {
		shutdownRaceRound(t, acquirers, shutdowns)
		if t.Failed() {
			return
		}
	}
}

func shutdownRaceRound(t *testing.T, acquirers, shutdowns int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()

	c := NewShutdownCoordinator()
	var (
		returned atomic.Bool  // some Shutdown has returned nil
		held     atomic.Int64 // handles acquired and not yet released
		start    = make(chan struct{})
		wg       sync.WaitGroup
	)

	for range acquirers {
		wg.Go(func() {
			<-start
			h := c.Acquire()
			if h == nil {
				return
			}
			held.Add(1)
			// While h is held, no Shutdown can have returned nil...
			if returned.Load() {
				t.Error("Acquire returned a handle after Shutdown returned nil")
			}
			// ...and a task holding a handle can always register
			// a sub-task.
			sub := c.Acquire()
			if sub == nil {
				t.Error("Acquire returned nil while a handle is held")
			}
			sub.Release()
			held.Add(-1)
			h.Release()
		})
	}

	errs := make(chan error, shutdowns)
	for range shutdowns {
		wg.Go(func() {
			<-start
			err := c.Shutdown(ctx)
			if err == nil {
				if n := held.Load(); n != 0 {
					t.Errorf("Shutdown returned nil with %d handles held", n)
				}
				returned.Store(true)
			}
			errs <- err
		})
	}

	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	}
	if n := c.Active(); n != 0 {
		t.Fatalf("Active after the round = %d, want 0", n)
	}
	if h := c.Acquire(); h != nil {
		t.Fatal("Acquire after the round returned a handle")
	}
}

func TestShutdownSignals(t *testing.T) {
	c := NewShutdownCoordinator()
	h := c.Acquire()
	ctx := c.ctx
	if shutdownIsClosed(c.ctx.Done()) || shutdownIsClosed(h.Done()) || ctx.Err() != nil {
		t.Fatal("shutdown signalled before Shutdown was called")
	}

	errc := shutdownStart(c, context.Background())
	// Every signal fires while Shutdown is still waiting for h.
	timeout, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for name, ch := range map[string]<-chan struct{}{
		"handle Done":  h.Done(),
		"Context Done": ctx.Done(),
	} {
		select {
		case <-ch:
		case <-timeout.Done():
			t.Fatalf("%s not closed after Shutdown began", name)
		}
	}
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("Context().Err() = %v, want %v", ctx.Err(), context.Canceled)
	}
	h.Release()
	if err := <-errc; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestShutdownTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := NewShutdownCoordinator()
		h := c.Acquire()
		first := shutdownStart(c, context.Background())
		second := shutdownStart(c, context.Background())

		// Both calls wait.
		shutdownWaiting(t, "first Shutdown", first)
		shutdownWaiting(t, "second Shutdown", second)

		h.Release()
		if err := <-first; err != nil {
			t.Fatalf("first Shutdown: %v", err)
		}
		if err := <-second; err != nil {
			t.Fatalf("second Shutdown: %v", err)
		}
		// A call after the drain returns at once.
		if err := c.Shutdown(context.Background()); err != nil {
			t.Fatalf("third Shutdown: %v", err)
		}
	})
}

func TestShutdownAllocs(t *testing.T) {
	c := NewShutdownCoordinator()
	h := c.Acquire()
	defer h.Release()
	if n := testing.AllocsPerRun(100, func() {
		_ = h.Done()
		_ = c.Active()
	}); n != 0 {
		t.Errorf("Done and Active allocate %v times, want 0", n)
	}
	// Acquire allocates the handle and nothing else.
	if n := testing.AllocsPerRun(100, func() {
		c.Acquire().Release()
	}); n != 1 {
		t.Errorf("Acquire and Release allocate %v times, want 1", n)
	}
}

func BenchmarkShutdownAcquireRelease(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		c := NewShutdownCoordinator()
		for b.Loop() {
			c.Acquire().Release()
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		c := NewShutdownCoordinator()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.Acquire().Release()
			}
		})
	})
}
