package httpdrain

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests play both processes of a restart in one: "old" is the Server
// under test; "new" is a plain http.Server on a copy of the same listening
// socket (as the new process has one), started only after PassThrough, as
// the new process serves only once shellflip.Start returns. The clients
// are Go's, with keep-alive or not, and raw connections where the test
// must see the bytes. Waits are for events, each with a deadline.

// deadline bounds every wait; a healthy run is far quicker.
const deadline = 30 * time.Second

type fixture struct {
	t       *testing.T
	d       *Server
	addr    string
	next    net.Listener // the "new process's" copy of the listening socket
	nextSrv *http.Server
	served  chan error // Serve's result

	calls   atomic.Int64  // handler calls in "old"
	holding atomic.Bool   // set while the test holds: no handler of "old" may run
	closed  chan struct{} // the Server closed its listener
	entered chan struct{} // GET /block has begun
	unblock chan struct{} // closed to end every GET /block

	mu       sync.Mutex
	watching map[string]chan struct{} // by client address: closed when a request arrives from there
}

func newFixture(t *testing.T) *fixture {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	file, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	next, err := net.FileListener(file)
	file.Close()
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{
		t: t, addr: ln.Addr().String(), next: next, served: make(chan error, 1),
		entered: make(chan struct{}, 16), unblock: make(chan struct{}), watching: map[string]chan struct{}{},
	}
	old := http.NewServeMux()
	old.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		f.calls.Add(1)
		if f.holding.Load() {
			t.Errorf("%s %s was served while held", r.Method, r.URL)
		}
		io.WriteString(w, "old\n")
	})
	old.HandleFunc("/block", func(w http.ResponseWriter, r *http.Request) {
		f.entered <- struct{}{}
		select {
		case <-f.unblock:
			io.WriteString(w, "old\n")
		case <-r.Context().Done():
		}
	})
	f.nextSrv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Got-X-Forwarded-For", r.Header.Get("X-Forwarded-For"))
		w.Header().Set("Got-X-Forwarded-Proto", r.Header.Get("X-Forwarded-Proto"))
		io.WriteString(w, "new\n")
	})}
	srv := &http.Server{Handler: old, ConnState: func(c net.Conn, st http.ConnState) {
		if st == http.StateActive {
			f.mu.Lock()
			defer f.mu.Unlock()
			if ch := f.watching[c.RemoteAddr().String()]; ch != nil {
				close(ch)
				delete(f.watching, c.RemoteAddr().String())
			}
		}
	}}
	f.closed = make(chan struct{})
	f.d = New(srv, &notifyListener{Listener: ln, closed: f.closed})
	go func() { f.served <- f.d.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		f.d.Drain(ctx)
		if err := wait(t, f.served, "Serve to return"); err != nil {
			t.Errorf("Serve: %v, want nil once the listener is closed", err)
		}
		f.nextSrv.Close()
		f.next.Close()
	})
	return f
}

// notifyListener closes closed when it is closed.
type notifyListener struct {
	net.Listener
	closed chan struct{}
	once   sync.Once
}

func (l *notifyListener) Close() error {
	err := l.Listener.Close()
	l.once.Do(func() { close(l.closed) })
	return err
}

// startNext starts the "new process": it accepts on its copy of the
// listening socket from now on.
func (f *fixture) startNext() {
	go f.nextSrv.Serve(f.next)
}

// wait receives from ch, or fails the test after deadline.
func wait[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(deadline):
		t.Fatalf("no %s within %v", what, deadline)
		panic("unreachable")
	}
}

// arrived runs send, which sends a request on the connection whose address
// is from, and waits until the request has arrived (its connection is
// active).
func (f *fixture) arrived(from string, send func()) {
	f.t.Helper()
	ch := make(chan struct{})
	f.mu.Lock()
	f.watching[from] = ch
	f.mu.Unlock()
	send()
	wait(f.t, ch, "request to arrive")
}

func newClient(t *testing.T, keepAlive bool) *http.Client {
	tr := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 1}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: deadline}
}

type reply struct {
	body           string
	closed, reused bool
	local          string // the connection's address on the client's side
	header         http.Header
}

// get sends GET path with the headers in hdr (pairs). A request that Go's
// transport had to retry is an error: a connection broke under it.
func get(c *http.Client, addr, path string, hdr ...string) (reply, error) {
	var attempts atomic.Int32
	var reused atomic.Bool
	var local atomic.Value
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		attempts.Add(1)
		reused.Store(i.Reused)
		local.Store(i.Conn.LocalAddr().String())
	}}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", "http://"+addr+path, nil)
	if err != nil {
		return reply{}, err
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return reply{}, err
	}
	r := reply{body: string(body), closed: resp.Close, reused: reused.Load(), local: local.Load().(string), header: resp.Header}
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("GET %s: %s %q", path, resp.Status, body)
	}
	if n := attempts.Load(); n > 1 {
		return r, fmt.Errorf("GET %s: answered only after %d attempts", path, n)
	}
	return r, nil
}

// goGet is get in a goroutine of its own, which sends the result to ch.
func goGet(ch chan<- result, c *http.Client, addr, path string, hdr ...string) {
	go func() {
		r, err := get(c, addr, path, hdr...)
		ch <- result{r, err}
	}()
}

type result struct {
	reply
	err error
}

func (f *fixture) mustGet(c *http.Client, want string) reply {
	f.t.Helper()
	r, err := get(c, f.addr, "/")
	if err != nil || r.body != want {
		f.t.Fatalf("GET /: %q, %v; want %q", r.body, err, want)
	}
	return r
}

// TestHold: Hold waits for the requests in flight, fails and lets go when
// its context is done first, and holds new requests until Resume, which
// serves them here, on their kept-alive connections.
func TestHold(t *testing.T) {
	f := newFixture(t)
	c, c2 := newClient(t, true), newClient(t, true)
	f.mustGet(c, "old\n")
	local2 := f.mustGet(c2, "old\n").local

	blocked := make(chan result, 1)
	goGet(blocked, newClient(t, false), f.addr, "/block")
	wait(t, f.entered, "GET /block to begin")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := f.d.Hold(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Hold with a request in flight and a cancelled context: %v, want context.Canceled", err)
	}
	local := f.mustGet(c, "old\n").local // a failed Hold holds nothing

	holdErr := make(chan error, 1)
	go func() { holdErr <- f.d.Hold(context.Background()) }()
	select {
	case err := <-holdErr:
		t.Fatalf("Hold returned %v with a request in flight", err)
	default:
	}
	close(f.unblock)
	if err := wait(t, holdErr, "Hold to return"); err != nil {
		t.Fatalf("Hold: %v", err)
	}
	if r := wait(t, blocked, "answer to GET /block"); r.err != nil || r.body != "old\n" {
		t.Fatalf("the request in flight at Hold: %q, %v", r.body, r.err)
	}

	f.holding.Store(true)
	held := make(chan result, 2)
	f.arrived(local, func() { goGet(held, c, f.addr, "/") })
	f.arrived(local2, func() { goGet(held, c2, f.addr, "/") })
	f.holding.Store(false)
	f.d.Resume()
	for range 2 {
		r := wait(t, held, "answer to a held request")
		if r.err != nil || r.body != "old\n" {
			t.Fatalf("a held request after Resume: %q, %v; want \"old\\n\"", r.body, r.err)
		}
		if !r.reused || r.closed {
			t.Errorf("a held request after Resume: reused connection %v, closed %v; want kept alive", r.reused, r.closed)
		}
	}
	f.d.Resume() // again: nothing is held, nothing happens
	f.mustGet(c, "old\n")
}

// TestPassThrough: after PassThrough, a held request and a request on a
// kept-alive connection reach the new process, through the listening
// socket, with the client's X-Forwarded-For chain and its address, and
// close their connections; the next request opens one to the new process.
func TestPassThrough(t *testing.T) {
	f := newFixture(t)
	c, other := newClient(t, true), newClient(t, true)
	local := f.mustGet(c, "old\n").local
	f.mustGet(other, "old\n")

	if err := f.d.Hold(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.holding.Store(true)
	held := make(chan result, 1)
	f.arrived(local, func() { goGet(held, c, f.addr, "/", "X-Forwarded-For", "192.0.2.1", "X-Forwarded-Proto", "https") })
	f.d.PassThrough()
	f.d.PassThrough() // again: nothing more
	f.startNext()
	r := wait(t, held, "answer to the held request")
	if r.err != nil || r.body != "new\n" || !r.reused || !r.closed {
		t.Fatalf("the held request after PassThrough: %q (reused connection %v, closed %v), %v; want \"new\\n\" on the old connection, closing it", r.body, r.reused, r.closed, r.err)
	}
	if got := r.header.Get("Got-X-Forwarded-For"); got != "192.0.2.1, 127.0.0.1" {
		t.Errorf("the new process got X-Forwarded-For %q, want \"192.0.2.1, 127.0.0.1\"", got)
	}
	if got := r.header.Get("Got-X-Forwarded-Proto"); got != "https" {
		t.Errorf("the new process got X-Forwarded-Proto %q, want the client's \"https\"", got)
	}
	if r := f.mustGet(other, "new\n"); !r.reused || !r.closed {
		t.Errorf("a request on another kept-alive connection: reused %v, closed %v; want both", r.reused, r.closed)
	}
	if r := f.mustGet(c, "new\n"); r.reused || r.closed {
		t.Errorf("the next request: reused %v, closed %v; want a new connection, kept alive", r.reused, r.closed)
	}
	f.d.Resume() // after PassThrough: nothing to undo
	f.holding.Store(false)

	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	if err := f.d.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
}

// TestDrainUnderLoad: a restart as shellflip runs it (Hold, or not, then
// PassThrough, then Drain) while keep-alive clients and clients with a new
// connection per request send one request after another: none fails or is
// retried, none is served by the old process once held, a request that
// arrives after PassThrough on a kept-alive connection reaches the new
// process, and Drain ends once the clients stop.
func TestDrainUnderLoad(t *testing.T) {
	t.Run("Hold", func(t *testing.T) { testDrainUnderLoad(t, true) })
	t.Run("NoHold", func(t *testing.T) { testDrainUnderLoad(t, false) })
}

func testDrainUnderLoad(t *testing.T, hold bool) {
	f := newFixture(t)
	const keepAlive, oneShot = 6, 2
	var (
		stop      = make(chan struct{})
		wg        sync.WaitGroup
		progress  = make(chan struct{}, 1)
		ok, byNew atomic.Int64
		errMu     sync.Mutex
		errs      []string
	)
	notify := func() {
		select {
		case progress <- struct{}{}:
		default:
		}
	}
	until := func(n *atomic.Int64, want int64) {
		for n.Load() < want {
			wait(t, progress, "progress")
		}
	}
	for i := range keepAlive + oneShot {
		c := newClient(t, i < keepAlive)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r, err := get(c, f.addr, "/")
				if err == nil && r.body != "old\n" && r.body != "new\n" {
					err = fmt.Errorf("unexpected answer %q", r.body)
				}
				if err != nil {
					errMu.Lock()
					errs = append(errs, err.Error())
					errMu.Unlock()
				} else if ok.Add(1); r.body == "new\n" {
					byNew.Add(1)
				}
				notify()
			}
		}()
	}
	probe := newClient(t, true)
	local := f.mustGet(probe, "old\n").local
	until(&ok, 200)

	held := make(chan result, 1)
	if hold {
		if err := f.d.Hold(context.Background()); err != nil {
			t.Fatal(err)
		}
		f.holding.Store(true) // from now on the old process serves nothing
		f.arrived(local, func() { goGet(held, probe, f.addr, "/") })
	}
	f.d.PassThrough()
	if !hold {
		goGet(held, probe, f.addr, "/")
	}
	f.startNext()
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		drained <- f.d.Drain(ctx)
	}()
	if r := wait(t, held, "answer to the held request"); r.err != nil || r.body != "new\n" || !r.closed {
		t.Errorf("a request on a kept-alive connection, held %v: %q (closed %v), %v; want \"new\\n\", closing its connection", hold, r.body, r.closed, r.err)
	}
	until(&byNew, 200)
	close(stop)
	wg.Wait()
	if err := wait(t, drained, "Drain to return"); err != nil {
		t.Errorf("Drain: %v", err)
	}
	t.Logf("%d requests, %d of them answered by the new process, %d failed", ok.Load()+int64(len(errs)), byNew.Load(), len(errs))
	if len(errs) > 0 {
		t.Errorf("%d requests failed; the first: %s", len(errs), strings.Join(errs[:min(len(errs), 5)], "; "))
	}
}

// TestDrainDeadline: a request that does not end holds Drain only until
// its context is done; then its connection is closed.
func TestDrainDeadline(t *testing.T) {
	f := newFixture(t)
	blocked := make(chan result, 1)
	c := newClient(t, true)
	c.Timeout = 0 // the request ends when the server closes its connection
	goGet(blocked, c, f.addr, "/block")
	wait(t, f.entered, "GET /block to begin")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := f.d.Drain(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "closed 1 connections") {
		t.Fatalf("Drain with a request that does not end: %v; want it to close 1 connection at the deadline", err)
	}
	if r := wait(t, blocked, "GET /block to end"); r.err == nil {
		t.Fatalf("the request cut by the drain deadline got %q and no error", r.body)
	}
}

// TestDrainIdle: once draining, with no new process, a connection idle
// between requests may carry one more request, answered here with
// "Connection: close", and one that stays idle for the grace period is
// closed cleanly (FIN, not RST).
func TestDrainIdle(t *testing.T) {
	for _, oneMore := range []bool{false, true} {
		t.Run(fmt.Sprintf("oneMore=%v", oneMore), func(t *testing.T) {
			f := newFixture(t)
			if oneMore {
				f.d.grace = deadline // the request surely comes first
			}
			conn, err := net.Dial("tcp", f.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(deadline))
			br := bufio.NewReader(conn)
			request := func() *http.Response {
				t.Helper()
				fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", f.addr)
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return resp
			}
			if resp := request(); resp.Close {
				t.Fatal("a response closed its connection before Drain")
			}
			drained := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				defer cancel()
				drained <- f.d.Drain(ctx)
			}()
			if oneMore {
				wait(t, f.closed, "Drain to close the listener") // it is draining
				calls := f.calls.Load()
				if resp := request(); !resp.Close || f.calls.Load() != calls+1 {
					t.Errorf("the request during the drain: closed %v, served here %v; want both", resp.Close, f.calls.Load() == calls+1)
				}
			}
			if n, err := br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
				t.Errorf("reading the drained connection: %d bytes, %v; want EOF", n, err)
			}
			if err := wait(t, drained, "Drain to return"); err != nil {
				t.Errorf("Drain: %v", err)
			}
		})
	}
}
