//go:build linux

package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/extest"
)

// These tests drive the example as a user would: it is built with go
// build, started as a real process, restarted with its own "restart"
// command, and talked to by real TCP clients. Every generation of a server
// writes to the stdout and stderr of the first, so the test reads them from
// pipes it owns for as long as the test runs, line by line with deadlines.
// They use nothing of the library's but what the example does; the
// library's own tests play the old process of a restart by hand
// (TestGiveUpOnBadState, in the repository's root).

// restarterDeadline bounds every wait; a healthy run is far quicker.
const restarterDeadline = 30 * time.Second

var (
	restarterInstanceRE = regexp.MustCompile(`^Instance no\. (\d+) listening on (127\.0\.0\.1:\d+)$`)
	restarterSuccessRE  = regexp.MustCompile(`^Restart succeeded, child pid is ([1-9]\d*)\n$`)
	restarterGreetingRE = regexp.MustCompile(`^Hello, this is process ([1-9]\d*)\n$`)
)

// TestRestarterExampleDefaultSocket: without -socket, the server and the
// restart command meet at $XDG_RUNTIME_DIR/restarter.sock.
func TestRestarterExampleDefaultSocket(t *testing.T) {
	bin := extest.Build(t, "restarter")
	dir := restarterTempDir(t)
	t.Setenv("XDG_RUNTIME_DIR", dir)
	srv := restarterStartWith(t, bin, func(cmd *exec.Cmd) { cmd.Args = cmd.Args[:1] })
	addr := srv.expectInstance(0, "")
	stdout, stderr, code := restarterRun(t, bin, "restart")
	m := restarterSuccessRE.FindStringSubmatch(stdout)
	if code != 0 || m == nil {
		t.Fatalf("restart without -socket: exit code %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	pid, _ := strconv.Atoi(m[1])
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	srv.expectInstance(1, addr)
	if _, err := os.Stat(filepath.Join(dir, "restarter.sock")); err != nil {
		t.Errorf("no control socket in $XDG_RUNTIME_DIR: %v", err)
	}
}

func TestRestarterExample(t *testing.T) {
	fds := extest.OpenFDs(t)
	t.Cleanup(func() {
		// This runs after every subtest and its cleanups. Fewer fds than
		// before is no leak of ours: an earlier test's process handle may
		// have been released meanwhile.
		if n := extest.OpenFDs(t); n > fds {
			t.Errorf("the test process has %d fds open, %d before: the tests leaked some", n, fds)
		}
	})
	bin := extest.Build(t, "restarter")
	for _, sub := range []struct {
		name string
		test func(t *testing.T, bin string)
	}{
		{"Restart", restarterTestRestart},
		{"MaxGeneration", restarterTestMaxGeneration},
		{"NoServer", func(t *testing.T, bin string) {
			socket := filepath.Join(restarterTempDir(t), "none.sock")
			if text := restarterRestartFails(t, bin, socket); !strings.Contains(text, socket) {
				t.Errorf("failure text %q does not name the socket %s", text, socket)
			}
		}},
		{"BadDeploy", restarterTestBadDeploy},
		{"EscapedFailure", func(t *testing.T, bin string) {
			// What the server says reaches a terminal: escapes are
			// printed escaped, and the answer stays on one line.
			socket := filepath.Join(restarterTempDir(t), "fake.sock")
			restarterFakeServer(t, socket, "\x1b[2Jgone\r\nRestart succeeded, child pid is 1")
			if text := restarterRestartFails(t, bin, socket); text != `\x1b[2Jgone\r\nRestart succeeded, child pid is 1` {
				t.Errorf("failure text %q, want the server's text with its control characters escaped", text)
			}
		}},
		{"Usage", func(t *testing.T, bin string) {
			for _, args := range [][]string{{"bogus"}, {"restart", "now"}, {"-max-generation", "-1"}} {
				stdout, stderr, code := restarterRun(t, bin, args...)
				if code != 2 || stdout != "" || !strings.Contains(stderr, "Usage:") {
					t.Errorf("restarter %q: exit code %d, stdout %q, stderr %q; want 2, nothing, a usage message", args, code, stdout, stderr)
				}
			}
		}},
	} {
		t.Run(sub.name, func(t *testing.T) {
			t.Parallel()
			sub.test(t, bin)
		})
	}
}

// restarterTestRestart restarts a server with a client connected, and checks
// who serves whom until the old process has exited.
func restarterTestRestart(t *testing.T, bin string) {
	srv := restarterStart(t, bin)
	addr := srv.expectInstance(0, "")
	old := restarterDial(t, addr)
	if old.pid != srv.cmd.Process.Pid {
		t.Fatalf("client greeted by pid %d, want the server's %d", old.pid, srv.cmd.Process.Pid)
	}
	old.echo("before the restart")

	newPid := srv.restart(1, addr)
	if newPid == srv.cmd.Process.Pid {
		t.Fatalf("the new process has the old one's pid %d", newPid)
	}

	// The old process stopped accepting before the restart command got its
	// answer: every new client reaches the new process. Several of them,
	// so that one landing in the old process by chance would show.
	var fresh *restarterClient
	for i := range 5 {
		c := restarterDial(t, addr)
		if c.pid != newPid {
			t.Fatalf("client %d after the restart greeted by pid %d, want the new process %d", i, c.pid, newPid)
		}
		c.echo("new client " + strconv.Itoa(i))
		if fresh == nil {
			fresh = c
		} else {
			c.close()
		}
	}

	// The new process is ready and serving, and the old one still serves
	// the client it had: it has not exited while that client is connected.
	old.echo("after the restart")
	select {
	case <-srv.exited:
		t.Fatalf("the old process exited (%v) while its client was still connected", srv.cmd.ProcessState)
	default:
	}
	old.close()
	srv.waitLeft()
	fresh.echo("after the old process exited")
	fresh.close()
}

// restarterTestMaxGeneration checks that generations up to -max-generation
// restart, and that the next one refuses, every time, and keeps serving.
func restarterTestMaxGeneration(t *testing.T, bin string) {
	srv := restarterStart(t, bin, "-listen", "127.0.0.1:0", "-max-generation", "1")
	addr := srv.expectInstance(0, "")
	var pid int
	for gen := 1; gen <= 2; gen++ {
		pid = srv.restart(gen, addr)
	}

	var first string
	for i := range 2 {
		text := restarterRestartFails(t, bin, srv.socket)
		if i == 0 {
			first = text
			for _, want := range []string{"instance no. 2", "-max-generation 1"} {
				if !strings.Contains(text, want) {
					t.Errorf("failure text %q does not mention %q", text, want)
				}
			}
		} else if text != first {
			t.Errorf("second refusal %q differs from the first %q", text, first)
		}
		c := restarterDial(t, addr)
		if c.pid != pid {
			t.Fatalf("after the refusal, a client was greeted by pid %d, want generation 2's %d", c.pid, pid)
		}
		c.echo("still serving " + strconv.Itoa(i))
		c.close()
	}
}

// restarterTestBadDeploy replaces the server's binary with one that fails
// to start: the restart fails, the old process takes new clients again, and
// once the binary is fixed the next restart succeeds.
func restarterTestBadDeploy(t *testing.T, bin string) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skipf("no /bin/sh for a failing binary: %v", err)
	}
	deployed := filepath.Join(restarterTempDir(t), "restarter")
	deploy := func(b []byte) {
		t.Helper()
		// Write and rename, as a deploy would: the running binary is
		// left alone, and the next restart runs the new one.
		if err := os.WriteFile(deployed+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(deployed+".new", deployed); err != nil {
			t.Fatal(err)
		}
	}
	good, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	deploy(good)
	srv := restarterStart(t, deployed)
	addr := srv.expectInstance(0, "")
	held := restarterDial(t, addr)

	// The new process starts, and exits before it is ready; by then the
	// old process had stopped accepting to hand over.
	deploy([]byte("#!/bin/sh\nexit 3\n"))
	restarterRestartFails(t, bin, srv.socket)
	for i := range 3 {
		c := restarterDial(t, addr)
		if c.pid != srv.cmd.Process.Pid {
			t.Fatalf("client %d after the failed restart greeted by pid %d, want the old process %d", i, c.pid, srv.cmd.Process.Pid)
		}
		c.echo("after the failed restart")
		c.close()
	}
	held.echo("after the failed restart")

	deploy(good)
	newPid := srv.restart(1, addr)
	c := restarterDial(t, addr)
	if c.pid != newPid {
		t.Fatalf("client after the fixed restart greeted by pid %d, want the new process %d", c.pid, newPid)
	}
	held.echo("after the fixed restart")
	held.close()
	srv.waitLeft()
}

// restarterTempDir returns a directory short enough for a socket path
// (sun_path holds 108 bytes; t.TempDir's names grow with the test's).
func restarterTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "restarter")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// restarterEnv is the test's environment without what would make the
// example think it was started by systemd or by a restart, and with the
// race detector's pause at exit (a second by default) turned off.
func restarterEnv() []string {
	var env []string
	race := "atexit_sleep_ms=0"
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		switch {
		case k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "LISTEN_") || strings.HasPrefix(k, "SHELLFLIP_"):
			continue
		case k == "GORACE":
			race = v + " " + race
			continue
		}
		env = append(env, kv)
	}
	return append(env, "GORACE="+race)
}

// restarterServer is generation 0 of a server and every generation it
// restarted into; they share its stdout and stderr.
type restarterServer struct {
	t      *testing.T
	bin    string
	socket string
	cmd    *exec.Cmd
	lines  chan string   // stdout, line by line; closed at EOF
	exited chan struct{} // closed once generation 0 has exited and cmd.ProcessState is set

	outR, errR *os.File
	logDone    chan struct{} // closed when stderr is read to EOF or closed
	logMu      sync.Mutex
	log        bytes.Buffer
	later      []*os.Process // later generations, held by pidfd
}

// restarterStart starts generation 0 of a server with args after -socket.
func restarterStart(t *testing.T, bin string, args ...string) *restarterServer {
	return restarterStartWith(t, bin, func(cmd *exec.Cmd) { cmd.Args = append(cmd.Args, args...) })
}

// restarterStartWith starts the example with -socket and whatever setup
// adds to the command, and arranges for every generation to be killed when
// the test ends.
func restarterStartWith(t *testing.T, bin string, setup func(*exec.Cmd)) *restarterServer {
	t.Helper()
	s := &restarterServer{
		t: t, bin: bin,
		socket:  filepath.Join(restarterTempDir(t), "ctl.sock"),
		lines:   make(chan string, 16),
		exited:  make(chan struct{}),
		logDone: make(chan struct{}),
	}
	s.cmd = exec.Command(bin, "-socket", s.socket)
	s.cmd.Env = restarterEnv()
	setup(s.cmd)

	// Our own pipes rather than Cmd's: later generations keep writing to
	// them after generation 0 has exited and was waited for, which would
	// have closed Cmd's read ends under them.
	var outW, errW *os.File
	s.outR, outW = restarterPipe(t)
	s.errR, errW = restarterPipe(t)
	s.cmd.Stdout, s.cmd.Stderr = outW, errW
	err := s.cmd.Start()
	// Only the servers hold the write ends from here on.
	outW.Close()
	errW.Close()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	done := make(chan struct{})
	go func() {
		defer close(s.lines)
		sc := bufio.NewScanner(s.outR)
		for sc.Scan() {
			select {
			case s.lines <- sc.Text():
			case <-done:
				return
			}
		}
	}()
	go func() {
		defer close(s.logDone)
		var buf [4096]byte
		for {
			n, err := s.errR.Read(buf[:])
			s.logMu.Lock()
			s.log.Write(buf[:n])
			s.logMu.Unlock()
			if err != nil {
				return
			}
		}
	}()

	t.Cleanup(func() {
		s.cmd.Process.Kill()
		for _, p := range s.later {
			p.Kill()
			p.Release()
		}
		select {
		case <-s.exited:
		case <-time.After(restarterDeadline):
			t.Errorf("pid %d outlived SIGKILL by %v", s.cmd.Process.Pid, restarterDeadline)
		}
		close(done)
		s.closePipes()
		if t.Failed() {
			t.Logf("the servers' stderr:\n%s", s.stderr())
		}
	})
	return s
}

// waitLeft waits until generation 0, whose last client has left, has
// exited, and fails the test unless it exited with status 0.
func (s *restarterServer) waitLeft() {
	s.t.Helper()
	select {
	case <-s.exited:
	case <-time.After(restarterDeadline):
		s.t.Fatalf("the old process is still running %v after its last client left", restarterDeadline)
	}
	if st := s.cmd.ProcessState; !st.Success() {
		s.t.Fatalf("the old process ended with %v, want exit status 0", st)
	}
}

// restarterPipe returns a pipe whose ends are closed when the test ends,
// if they were not before.
func restarterPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Close()
		w.Close()
	})
	return r, w
}

// closePipes closes the read ends of stdout and stderr, and waits until the
// stderr reader has stopped.
func (s *restarterServer) closePipes() {
	s.outR.Close()
	s.errR.Close()
	<-s.logDone
}

func (s *restarterServer) stderr() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.log.String()
}

// expectInstance waits for the next line on stdout, which must announce
// generation gen, on addr unless addr is "", and returns the address.
func (s *restarterServer) expectInstance(gen int, addr string) string {
	s.t.Helper()
	var line string
	var ok bool
	select {
	case line, ok = <-s.lines:
	case <-time.After(restarterDeadline):
		s.t.Fatalf("no instance no. %d on stdout within %v", gen, restarterDeadline)
	}
	if !ok {
		s.t.Fatalf("stdout closed while waiting for instance no. %d", gen)
	}
	m := restarterInstanceRE.FindStringSubmatch(line)
	if m == nil || m[1] != strconv.Itoa(gen) || addr != "" && m[2] != addr {
		s.t.Fatalf("stdout: %q, want instance no. %d listening on %s", line, gen, cmp.Or(addr, "127.0.0.1:PORT"))
	}
	return m[2]
}

// restart runs "restarter restart", which must succeed, and waits until the
// new process, of generation gen, announces itself on addr. It returns the
// new pid.
func (s *restarterServer) restart(gen int, addr string) int {
	s.t.Helper()
	stdout, stderr, code := restarterRun(s.t, s.bin, "-socket", s.socket, "restart")
	m := restarterSuccessRE.FindStringSubmatch(stdout)
	if code != 0 || m == nil || stderr != "" {
		s.t.Fatalf("restart to generation %d: exit code %d, stdout %q, stderr %q; want 0, the new pid, nothing", gen, code, stdout, stderr)
	}
	pid, _ := strconv.Atoi(m[1])
	// A pidfd, taken while the process surely runs (it is a server, it
	// stays until killed or replaced), so that the cleanup's kill cannot
	// hit another process that reused the pid.
	p, err := os.FindProcess(pid)
	if err != nil {
		s.t.Fatalf("pid %d: %v", pid, err)
	}
	s.later = append(s.later, p)
	s.expectInstance(gen, addr)
	return pid
}

// restarterRestartFails runs "restarter restart", which must fail, and
// returns the failure text.
func restarterRestartFails(t *testing.T, bin, socket string) string {
	t.Helper()
	stdout, stderr, code := restarterRun(t, bin, "-socket", socket, "restart")
	text, ok := strings.CutPrefix(stderr, "Restart failed: ")
	if code != 1 || stdout != "" || !ok || !strings.HasSuffix(text, "\n") || strings.Count(text, "\n") != 1 {
		t.Fatalf("restart: exit code %d, stdout %q, stderr %q; want 1, nothing, one \"Restart failed: \" line", code, stdout, stderr)
	}
	return strings.TrimSuffix(text, "\n")
}

// restarterRun runs the example to completion and returns what it printed
// and its exit code.
func restarterRun(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), restarterDeadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = restarterEnv()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) || ctx.Err() != nil {
		t.Fatalf("restarter %q: %v (context: %v)", args, err, ctx.Err())
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// restarterClient is a TCP client of the example, greeted by pid.
type restarterClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	pid  int
}

func restarterDial(t *testing.T, addr string) *restarterClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, restarterDeadline)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &restarterClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(restarterDeadline))
	line, err := c.r.ReadString('\n')
	m := restarterGreetingRE.FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("greeting: %q, %v", line, err)
	}
	c.pid, _ = strconv.Atoi(m[1])
	return c
}

// echo sends msg and a newline, and checks that they come back.
func (c *restarterClient) echo(msg string) {
	c.t.Helper()
	c.conn.SetDeadline(time.Now().Add(restarterDeadline))
	if _, err := io.WriteString(c.conn, msg+"\n"); err != nil {
		c.t.Fatalf("pid %d: sending %q: %v", c.pid, msg, err)
	}
	got, err := c.r.ReadString('\n')
	if got != msg+"\n" {
		c.t.Fatalf("pid %d: sent %q, got back %q, %v", c.pid, msg+"\n", got, err)
	}
}

func (c *restarterClient) close() { c.conn.Close() }

// restarterFakeServer listens at path as a control socket would, and
// answers the one request the test makes with a failure that says text: a
// frame of the control protocol, a 4-byte big-endian length and the JSON
// of {"Response":{"RestartFailed":text}}, as shellflip's Rust crate writes
// it.
func restarterFakeServer(t *testing.T, path, text string) {
	t.Helper()
	payload, err := json.Marshal(map[string]map[string]string{"Response": {"RestartFailed": text}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		// The request: a length, then that many bytes.
		var n [4]byte
		if _, err := io.ReadFull(conn, n[:]); err == nil {
			io.CopyN(io.Discard, conn, int64(binary.BigEndian.Uint32(n[:])))
		}
		conn.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...))
	}()
}
