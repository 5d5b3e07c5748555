package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shellflip-go/shellflip"
)

// "httpd demo": start a server, load it, restart it, and tell.

// slowMS is what the demo's slow clients ask for: long enough that some are
// always in flight when a restart happens.
const slowMS = 200

func demo(args []string) int {
	fs := flag.NewFlagSet("httpd demo", flag.ContinueOnError)
	restarts := fs.Int("restarts", 5, "restart the server `N` times")
	interval := fs.Duration("interval", 400*time.Millisecond, "let the clients work for `D` between restarts")
	clients := fs.Int("clients", 4, "run `N` clients of each kind")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(os.Stderr, "httpd demo: unexpected arguments %q\n", fs.Args())
		return 2
	case *restarts < 0 || *restarts > 1000:
		fmt.Fprintf(os.Stderr, "httpd demo: -restarts %d: want 0 to 1000\n", *restarts)
		return 2
	case *interval < 10*time.Millisecond || *interval > time.Minute:
		fmt.Fprintf(os.Stderr, "httpd demo: -interval %v: want 10ms to 1m\n", *interval)
		return 2
	case *clients < 1 || *clients > 64:
		fmt.Fprintf(os.Stderr, "httpd demo: -clients %d: want 1 to 64\n", *clients)
		return 2
	}

	// Everything below is bounded: by the signals that stop the demo, and
	// by a deadline far beyond what a healthy run needs.
	sigCtx, stop := signal.NotifyContext(context.Background(), stopSignals...)
	defer stop()
	limit := 30*time.Second + time.Duration(*restarts)*(*interval+restartTimeout)
	ctx, cancel := context.WithTimeout(sigCtx, limit)
	defer cancel()

	d := &demoRun{restarts: *restarts, interval: *interval, clients: *clients}
	ok, err := d.run(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "httpd demo: %v\n", err)
		if d.srv != nil && sigCtx.Err() == nil {
			if tail := d.srv.log.String(); tail != "" {
				fmt.Fprintf(os.Stderr, "The servers' log ends with:\n%s", tail)
			}
		}
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}

type demoRun struct {
	restarts int
	interval time.Duration
	clients  int

	srv  *demoServer
	load *demoLoad
	rows []demoRow
}

// demoRow is one line of the table: a generation's start, and what happened
// while it was the one serving.
type demoRow struct {
	label    string
	oldPid   int // 0 for the first generation
	newPid   int
	ready    time.Duration // restart to ready; for the first, start to serving
	inFlight int64         // requests sent and not answered when the restart began
	drained  int           // responses the old process sent after it was replaced
	served   int           // requests answered while this generation was the newest
	failed   int
}

func (d *demoRun) run(ctx context.Context) (ok bool, err error) {
	out := os.Stdout
	start := time.Now()
	d.srv, err = startDemoServer()
	if err != nil {
		return false, err
	}
	defer func() {
		// Stop every server process, whatever happened: gracefully, then
		// not. After a failure the error says so, not this.
		gone := d.srv.stop(10 * time.Second)
		if err == nil && gone != nil {
			err = gone
		}
	}()

	addr, err := d.srv.instance(ctx, 0, "")
	if err != nil {
		return false, err
	}
	gen0 := d.srv.cmd.Process.Pid
	fmt.Fprintf(out, "Server: %s\n", strings.Join(d.srv.cmd.Args, " "))
	fmt.Fprintf(out, "Instance no. 0 listening on %s (pid %d)\n", addr, gen0)
	fmt.Fprintf(out, "Load: %d keep-alive clients, %d clients with a new connection per request, %d clients asking for GET /slow?ms=%d\n",
		d.clients, d.clients, d.clients, slowMS)
	fmt.Fprintf(out, "A request fails if it gets an error or a status other than 200, or if the client had to retry it.\n\n")
	printDemoHeader(out)

	d.load = newDemoLoad(addr)
	d.load.start(d.clients)
	defer d.load.stop()
	cur := demoRow{label: "start", newPid: gen0, ready: time.Since(start)}
	mark := d.load.counts()
	for i := 1; i <= d.restarts; i++ {
		if err := pause(ctx, d.interval); err != nil {
			return false, err
		}
		now := d.load.counts()
		d.finish(&cur, mark, now)
		mark = now

		inFlight := d.load.inFlight.Load()
		t := time.Now()
		pid, err := shellflip.RequestRestart(ctx, d.srv.socket)
		ready := time.Since(t)
		if err != nil {
			return false, fmt.Errorf("restart %d: %w", i, err)
		}
		d.srv.track(pid)
		d.load.retire(cur.newPid)
		if _, err := d.srv.instance(ctx, uint64(i), addr); err != nil {
			return false, err
		}
		cur = demoRow{label: fmt.Sprintf("restart %d", i), oldPid: cur.newPid, newPid: pid, ready: ready, inFlight: inFlight}
	}
	if err := pause(ctx, d.interval); err != nil {
		return false, err
	}
	d.load.stop()
	d.finish(&cur, mark, d.load.counts())

	// The last generation stops as any would; the demo is over when every
	// process it started is gone.
	if err := d.srv.stop(10 * time.Second); err != nil {
		return false, err
	}
	return d.summary(out, time.Since(start)), nil
}

// finish completes a row with what the clients saw since mark, and prints
// it.
func (d *demoRun) finish(r *demoRow, mark, now demoCounts) {
	r.served = now.served - mark.served
	r.failed = now.failed - mark.failed
	if r.oldPid != 0 {
		r.drained = d.load.drainedBy(r.oldPid)
	}
	d.rows = append(d.rows, *r)
	printDemoRow(os.Stdout, *r)
}

const demoRowFormat = "%-11s %8s %8s %10s %9s %8s %8s %7s\n"

func printDemoHeader(w io.Writer) {
	fmt.Fprintf(w, demoRowFormat, "", "old pid", "new pid", "ready in", "in flight", "drained", "served", "failed")
}

func printDemoRow(w io.Writer, r demoRow) {
	dash := func(n int64, show bool) string {
		if !show {
			return "-"
		}
		return strconv.FormatInt(n, 10)
	}
	restart := r.oldPid != 0
	fmt.Fprintf(w, demoRowFormat, r.label, dash(int64(r.oldPid), restart), strconv.Itoa(r.newPid),
		fmtMS(r.ready), dash(r.inFlight, restart), dash(int64(r.drained), restart),
		strconv.Itoa(r.served), strconv.Itoa(r.failed))
}

func fmtMS(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64) + " ms"
}

// summary prints the totals and reports whether no request failed.
func (d *demoRun) summary(w io.Writer, took time.Duration) bool {
	var total demoRow
	var readies []time.Duration
	for _, r := range d.rows {
		total.inFlight += r.inFlight
		total.drained += r.drained
		total.served += r.served
		total.failed += r.failed
		if r.oldPid != 0 {
			readies = append(readies, r.ready)
		}
	}
	fmt.Fprintf(w, demoRowFormat, "total", "", "", "", strconv.FormatInt(total.inFlight, 10),
		strconv.Itoa(total.drained), strconv.Itoa(total.served), strconv.Itoa(total.failed))
	fmt.Fprintln(w)
	fmt.Fprintln(w, "ready in:  from the restart request to the answer that the new process serves")
	fmt.Fprintln(w, "in flight: requests sent and not yet answered when the restart was requested")
	fmt.Fprintln(w, "drained:   responses the old process sent after the new one took over")
	if len(readies) > 0 {
		slices.Sort(readies)
		fmt.Fprintf(w, "\nRestart to ready: min %s, median %s, max %s\n",
			fmtMS(readies[0]), fmtMS(readies[len(readies)/2]), fmtMS(readies[len(readies)-1]))
	}
	procs := len(d.srv.pids())
	if total.failed > 0 {
		fmt.Fprintf(w, "\nFAILED: %d of %d requests failed in %d restarts. The first failures:\n",
			total.failed, total.served+total.failed, d.restarts)
		for _, e := range d.load.errors() {
			fmt.Fprintf(w, "  %s\n", e)
		}
		return false
	}
	fmt.Fprintf(w, "\nOK: %d requests in %s, none failed, across %d restarts; all %d server processes have exited.\n",
		total.served, took.Round(10*time.Millisecond), d.restarts, procs)
	return true
}

// pause lets the clients work for d.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// demoServer is the server and every generation it restarted into. They all
// share the first one's stdout and stderr, which are pipes the demo reads:
// the end of stdout means that every one of them has exited.
type demoServer struct {
	cmd    *exec.Cmd
	dir    string
	socket string
	lines  chan string   // "Instance no." lines
	gone   chan struct{} // closed at the end of stdout
	exited chan struct{} // closed once the first generation was reaped
	log    tailBuffer    // stderr

	mu      sync.Mutex
	started []int
	stopped bool
	stopErr error
}

var instanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (\S+)$`)

// startDemoServer runs this very binary as a server in a directory of its
// own, in a process group of its own.
func startDemoServer() (*demoServer, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "httpd-demo-")
	if err != nil {
		return nil, err
	}
	s := &demoServer{
		dir:    dir,
		socket: filepath.Join(dir, "httpd.sock"),
		lines:  make(chan string, 16),
		gone:   make(chan struct{}),
		exited: make(chan struct{}),
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	s.cmd = exec.Command(exe, "-listen", "127.0.0.1:0", "-socket", s.socket, "-drain", "10s")
	s.cmd.Stdout, s.cmd.Stderr = outW, errW
	s.cmd.Env = demoEnv()
	startOwnGroup(s.cmd)
	err = s.cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	s.track(s.cmd.Process.Pid)
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	go func() {
		io.Copy(&s.log, errR)
		errR.Close()
	}()
	go func() {
		defer close(s.gone)
		defer outR.Close()
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			if line := sc.Text(); instanceRE.MatchString(line) {
				select {
				case s.lines <- line:
				default: // nobody asked for that many; never blocks the pipe
				}
			}
		}
		io.Copy(io.Discard, outR)
	}()
	return s, nil
}

// demoEnv is this process's environment less what would make the server
// think that systemd runs it.
func demoEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC":
			return true
		}
		return false
	})
}

// instance waits for the "Instance no. gen" line, checks that it is on addr
// (any address if addr is ""), and returns the address.
func (s *demoServer) instance(ctx context.Context, gen uint64, addr string) (string, error) {
	t := time.NewTimer(restartTimeout)
	defer t.Stop()
	select {
	case line := <-s.lines:
		m := instanceRE.FindStringSubmatch(line)
		if m[1] != strconv.FormatUint(gen, 10) || addr != "" && m[2] != addr {
			return "", fmt.Errorf("the server said %q; want instance no. %d, on %s if known", line, gen, addr)
		}
		return m[2], nil
	case <-s.gone:
		return "", errors.New("the server exited")
	case <-t.C:
		return "", fmt.Errorf("instance no. %d did not say where it listens within %v", gen, restartTimeout)
	case <-ctx.Done():
		return "", context.Cause(ctx)
	}
}

func (s *demoServer) track(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started = append(s.started, pid)
}

func (s *demoServer) pids() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.started)
}

// stop ends every server process: SIGTERM to the group, which drains, then
// SIGKILL if grace passes. It returns nil once all of them are gone, and
// removes the directory. Later calls return the first one's result.
func (s *demoServer) stop(grace time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return s.stopErr
	}
	s.stopped = true
	defer os.RemoveAll(s.dir)
	pgid := s.cmd.Process.Pid
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-s.gone:
			return true
		case <-t.C:
			return false
		}
	}
	// The group's id stays reserved while any of its processes lives, so
	// the group is signalled only while the end of stdout says one does.
	if !wait(0) {
		signalGroup(pgid, sigTerm)
		if !wait(grace) {
			signalGroup(pgid, sigKill)
			if !wait(5 * time.Second) {
				s.stopErr = fmt.Errorf("server processes (group %d) still running after SIGKILL", pgid)
				return s.stopErr
			}
			s.stopErr = fmt.Errorf("server processes still running %v after SIGTERM; killed them", grace)
		}
	}
	<-s.exited
	return s.stopErr
}

// tailBuffer keeps the last 8 KiB written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - 8<<10; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

// demoLoad is the clients: goroutines that each send one request after the
// other until stopped.
type demoLoad struct {
	base     string
	quit     chan struct{}
	wg       sync.WaitGroup
	stopOnce sync.Once
	inFlight atomic.Int64 // requests written and not answered

	mu      sync.Mutex
	served  int
	failed  int
	errs    []string
	retired map[int]bool // pids of replaced processes
	drained map[int]int  // responses from replaced processes
}

type demoCounts struct{ served, failed int }

var bodyRE = regexp.MustCompile(`^pid=([1-9]\d*) generation=\d+\n$`)

func newDemoLoad(addr string) *demoLoad {
	return &demoLoad{
		base:    "http://" + addr,
		quit:    make(chan struct{}),
		retired: map[int]bool{},
		drained: map[int]int{},
	}
}

// start runs n clients of each kind: keep-alive, a new connection for
// every request, and keep-alive asking for slow responses. Each has a
// transport of its own, so a keep-alive client's connection is never idle
// for longer than it takes to send the next request.
func (l *demoLoad) start(n int) {
	for range n {
		l.client(&http.Transport{MaxIdleConnsPerHost: 1}, "/")
		l.client(&http.Transport{DisableKeepAlives: true}, "/")
		l.client(&http.Transport{MaxIdleConnsPerHost: 1}, "/slow?ms="+strconv.Itoa(slowMS))
	}
}

func (l *demoLoad) client(tr *http.Transport, path string) {
	c := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer tr.CloseIdleConnections()
		for {
			select {
			case <-l.quit:
				return
			default:
			}
			l.do(c, path)
		}
	}()
}

// do sends one request and records the outcome.
func (l *demoLoad) do(c *http.Client, path string) {
	// Go's transport quietly retries a request that failed on a reused
	// connection; every connection it gets is an attempt, and a second
	// attempt means the first one failed.
	var attempts atomic.Int32
	var counted atomic.Bool // set by whichever comes first: written, or done
	trace := &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) { attempts.Add(1) },
		WroteRequest: func(httptrace.WroteRequestInfo) {
			if counted.CompareAndSwap(false, true) {
				l.inFlight.Add(1)
			}
		},
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", l.base+path, nil)
	if err != nil {
		l.record(path, 0, err)
		return
	}
	resp, err := c.Do(req)
	pid := 0
	if err == nil {
		body, rerr := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
		resp.Body.Close()
		m := bodyRE.FindSubmatch(body)
		switch {
		case rerr != nil:
			err = rerr
		case resp.StatusCode != http.StatusOK:
			err = fmt.Errorf("%s: %q", resp.Status, body)
		case m == nil:
			err = fmt.Errorf("unexpected body %q", body)
		default:
			pid, _ = strconv.Atoi(string(m[1]))
		}
	}
	if !counted.CompareAndSwap(false, true) {
		l.inFlight.Add(-1)
	}
	if n := attempts.Load(); err == nil && n > 1 {
		err = fmt.Errorf("answered by pid %d only after %d attempts: the client retried after a connection failed", pid, n)
	}
	l.record(path, pid, err)
}

func (l *demoLoad) record(path string, pid int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.failed++
		if len(l.errs) < 10 {
			l.errs = append(l.errs, fmt.Sprintf("%s  GET %s: %v", time.Now().Format("15:04:05.000"), path, err))
		}
		return
	}
	l.served++
	if l.retired[pid] {
		l.drained[pid]++
	}
}

func (l *demoLoad) counts() demoCounts {
	l.mu.Lock()
	defer l.mu.Unlock()
	return demoCounts{l.served, l.failed}
}

// retire notes that pid was replaced: its responses from now on count as
// drained.
func (l *demoLoad) retire(pid int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.retired[pid] = true
}

func (l *demoLoad) drainedBy(pid int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.drained[pid]
}

func (l *demoLoad) errors() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.errs)
}

// stop tells the clients to stop and waits for the requests in flight.
// Safe to call more than once.
func (l *demoLoad) stop() {
	l.stopOnce.Do(func() { close(l.quit) })
	l.wg.Wait()
}
