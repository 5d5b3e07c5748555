//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip"
)

// "locked demo": start a server, load it, restart it, and tell.

func demo(args []string) int {
	if cgo {
		fmt.Fprintln(os.Stderr, "locked demo: this binary was built with cgo, which its seccomp filter does not allow for; run CGO_ENABLED=0 go run ./examples/locked demo")
		return 2
	}
	fs := flag.NewFlagSet("locked demo", flag.ContinueOnError)
	restarts := fs.Int("restarts", 5, "restart the server `N` times")
	interval := fs.Duration("interval", 300*time.Millisecond, "let the clients work for `D` between restarts")
	clients := fs.Int("clients", 8, "run `N` clients")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(os.Stderr, "locked demo: unexpected arguments %q\n", fs.Args())
		return 2
	case *restarts < 0 || *restarts > 1000, *interval < 10*time.Millisecond || *interval > time.Minute, *clients < 1 || *clients > 64:
		fmt.Fprintln(os.Stderr, "locked demo: want -restarts 0 to 1000, -interval 10ms to 1m, -clients 1 to 64")
		return 2
	}
	if err := runDemo(*restarts, *interval, *clients); err != nil {
		fmt.Fprintf(os.Stderr, "locked demo: %v\n", err)
		return 1
	}
	return 0
}

var instanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (\S+)$`)

func runDemo(restarts int, interval time.Duration, clients int) (err error) {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "locked-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	socket := filepath.Join(dir, "locked.sock")

	// Every generation, and every broker, writes to the first one's
	// stdout and stderr: the end of stdout means that all have exited.
	cmd := exec.Command(exe, "-listen", "127.0.0.1:0", "-socket", socket)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var logs tail
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		return err
	}
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	current := cmd.Process.Pid
	defer func() {
		// Stop the last generation gracefully; the others have exited,
		// or are draining, and every broker exits with its process.
		syscall.Kill(current, syscall.SIGTERM)
		for range lines {
		}
		cmd.Wait()
		if err != nil && logs.String() != "" {
			fmt.Fprintf(os.Stderr, "The servers' log ends with:\n%s", logs.String())
		}
	}()
	instance := func(gen int) (string, error) {
		select {
		case line := <-lines:
			if m := instanceRE.FindStringSubmatch(line); m != nil && m[1] == strconv.Itoa(gen) {
				return m[2], nil
			}
			return "", fmt.Errorf("the server said %q, want instance no. %d", line, gen)
		case <-time.After(restartTimeout):
			return "", fmt.Errorf("no instance no. %d within %v", gen, restartTimeout)
		}
	}

	addr, err := instance(0)
	if err != nil {
		return err
	}
	fmt.Printf("Server: %s (pid %d), on %s\n", strings.Join(cmd.Args, " "), current, addr)
	fmt.Printf("Load: %d clients, a new connection per request.\n\n", clients)
	fmt.Printf("%-10s %8s %10s %8s %15s\n", "generation", "pid", "ready in", "served", "seccomp filters")
	load := startLoad("http://"+addr+"/", clients)
	defer load.stop()
	row := func(gen, pid int, ready string) {
		fmt.Printf("%-10d %8d %10s %8d %15s\n", gen, pid, ready, load.served.Load(), procStatus(pid, "Seccomp_filters"))
	}
	row(0, current, "-")
	for gen := 1; gen <= restarts; gen++ {
		time.Sleep(interval)
		ctx, cancel := context.WithTimeout(context.Background(), restartTimeout)
		t := time.Now()
		pid, err := shellflip.RequestRestart(ctx, socket)
		took := time.Since(t)
		cancel()
		if err != nil {
			return fmt.Errorf("restart %d: %w", gen, err)
		}
		if _, err := instance(gen); err != nil {
			return err
		}
		current = pid
		row(gen, pid, strconv.FormatFloat(took.Seconds()*1000, 'f', 1, 64)+"ms")
	}
	time.Sleep(interval)
	load.stop()
	if n := load.failed.Load(); n > 0 {
		return fmt.Errorf("%d of %d requests failed; the first: %s", n, n+load.served.Load(), load.firstErr())
	}
	fmt.Printf("\nOK: %d requests, none failed, across %d restarts; every generation ran under its own filter only.\n", load.served.Load(), restarts)
	return nil
}

// procStatus returns a field of /proc/pid/status, or "?".
func procStatus(pid int, field string) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// load is clients sending GET / one after the other, each over a new
// connection, until stopped.
type load struct {
	served, failed atomic.Int64
	quit           chan struct{}
	wg             sync.WaitGroup
	once           sync.Once
	mu             sync.Mutex
	first          string
}

var bodyRE = regexp.MustCompile(`^pid=[1-9]\d* generation=\d+\n$`)

func startLoad(url string, clients int) *load {
	l := &load{quit: make(chan struct{})}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 15 * time.Second}
	for range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.quit:
					return
				default:
				}
				l.record(get(c, url))
			}
		}()
	}
	return l
}

func get(c *http.Client, url string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	switch {
	case err != nil:
		return err
	case resp.StatusCode != http.StatusOK || !bodyRE.Match(body):
		return fmt.Errorf("%s: %q", resp.Status, body)
	}
	return nil
}

func (l *load) record(err error) {
	if err == nil {
		l.served.Add(1)
		return
	}
	l.failed.Add(1)
	l.mu.Lock()
	if l.first == "" {
		l.first = err.Error()
	}
	l.mu.Unlock()
}

func (l *load) firstErr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first
}

// stop stops the clients and waits for their requests; safe to call twice.
func (l *load) stop() {
	l.once.Do(func() { close(l.quit) })
	l.wg.Wait()
}

// tail keeps the last 8 KiB written to it.
type tail struct {
	mu  sync.Mutex
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - 8<<10; over > 0 {
		t.buf = t.buf[over:]
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
