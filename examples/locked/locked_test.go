//go:build linux && amd64

package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shellflip-go/shellflip"
	"golang.org/x/sys/unix"
)

// These tests run the example as its users do: built with go build
// (CGO_ENABLED=0: the race detector needs cgo, and makes system calls of its
// own), started as a real process, restarted with "locked restart" or over
// its control socket. The servers run under a reaper, the test binary
// re-executed as the child subreaper of every process they leave behind,
// which reports how each one exits: the old generations and the brokers,
// which are not the test's children.

const (
	envReaper = "LOCKED_TEST_REAPER" // run the reaper role
	deadline  = 30 * time.Second     // bounds every wait
)

var lockedBin string // the example, built by TestMain

func TestMain(m *testing.M) {
	if os.Getenv(envReaper) != "" {
		os.Exit(reaper(os.Args[1:]))
	}
	dir, err := os.MkdirTemp("", "locked-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	lockedBin = filepath.Join(dir, "locked")
	build := exec.Command("go", "build", "-o", lockedBin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// reaper runs args with stdio shared, and reaps it and every process it
// leaves behind, writing "PID STATUS" to fd 3 for each (STATUS is the raw
// wait status), until none is left.
func reaper(args []string) int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		return 1
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, envReaper+"=") })
	if _, err := syscall.ForkExec(args[0], args, &syscall.ProcAttr{Env: env, Files: []uintptr{0, 1, 2}}); err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		return 1
	}
	w := os.NewFile(3, "reports")
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0 // ECHILD: all gone
		}
		fmt.Fprintf(w, "%d %d\n", pid, uint32(ws))
	}
}

// server is a locked server under a reaper, and every process it starts.
type server struct {
	t      *testing.T
	socket string
	addr   string
	pid    int         // generation 0
	lines  chan string // the servers' stdout
	exits  chan [2]int // the reaper's reports
	exited map[int]unix.WaitStatus
	stderr *strings.Builder
}

// start runs "locked -listen 127.0.0.1:0 -socket PATH args..." and waits
// until it serves.
func start(t *testing.T, args ...string) *server {
	t.Helper()
	return startAt(t, filepath.Join(t.TempDir(), "locked.sock"), nil, args...)
}

// startAt is start with the control socket at socket, and env added to
// the environment.
func startAt(t *testing.T, socket string, env []string, args ...string) *server {
	t.Helper()
	s := &server{t: t, socket: socket, lines: make(chan string, 1024),
		exits: make(chan [2]int, 4096), exited: map[int]unix.WaitStatus{}, stderr: new(strings.Builder)}
	cmd := exec.Command(os.Args[0], append([]string{lockedBin, "-listen", "127.0.0.1:0", "-socket", s.socket}, args...)...)
	cmd.Env = append(append(os.Environ(), envReaper+"=1"), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	reports, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stderr = s.stderr // read after Wait, which ends its copying
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		if t.Failed() {
			t.Logf("the servers' stderr:\n%s", s.stderr)
		}
	})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
	}()
	go func() {
		sc := bufio.NewScanner(reports)
		for sc.Scan() {
			var pid, ws int
			fmt.Sscan(sc.Text(), &pid, &ws)
			s.exits <- [2]int{pid, ws}
		}
		close(s.exits)
	}()
	s.addr = s.instance(0)
	s.pid, _ = s.hello()
	return s
}

// instance waits for the "Instance no. gen" line and returns its address,
// which must be the first generation's, if known.
func (s *server) instance(gen int) string {
	s.t.Helper()
	select {
	case line := <-s.lines:
		m := instanceRE.FindStringSubmatch(line)
		if m == nil || m[1] != strconv.Itoa(gen) || s.addr != "" && m[2] != s.addr {
			s.t.Fatalf("the server said %q, want instance no. %d on %s", line, gen, s.addr)
		}
		return m[2]
	case <-time.After(deadline):
		s.t.Fatalf("no instance no. %d within %v", gen, deadline)
	}
	return ""
}

// hello sends GET / on a connection of its own, reads the response to the
// end of the connection, which the server closes once it has answered, and
// returns the pid and generation it names.
func (s *server) hello() (pid, gen int) {
	s.t.Helper()
	c, err := net.DialTimeout("tcp", s.addr, deadline)
	if err != nil {
		s.t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: locked\r\n\r\n")
	b, err := io.ReadAll(c)
	if err != nil {
		s.t.Fatalf("GET /: %v", err)
	}
	if _, err := fmt.Sscanf(string(b[max(0, strings.LastIndex(string(b), "\r\n\r\n")+4):]), "pid=%d generation=%d\n", &pid, &gen); err != nil || !strings.HasPrefix(string(b), "HTTP/1.1 200 ") {
		s.t.Fatalf("GET /: %q, %v", b, err)
	}
	return pid, gen
}

// exit waits until the reaper reports pid, and returns how it ended.
func (s *server) exit(pid int) unix.WaitStatus {
	s.t.Helper()
	timeout := time.After(deadline)
	for {
		if ws, ok := s.exited[pid]; ok {
			return ws
		}
		select {
		case e, ok := <-s.exits:
			if !ok {
				s.t.Fatalf("pid %d: the reaper ended without reporting it", pid)
			}
			s.exited[e[0]] = unix.WaitStatus(e[1])
		case <-timeout:
			s.t.Fatalf("pid %d did not exit within %v", pid, deadline)
		}
	}
}

// restart runs "locked restart" and returns the pid it prints.
func (s *server) restart() int {
	s.t.Helper()
	out, err := exec.Command(lockedBin, "-socket", s.socket, "restart").Output()
	var pid int
	if _, serr := fmt.Sscanf(string(out), "Restart succeeded, child pid is %d\n", &pid); err != nil || serr != nil {
		s.t.Fatalf("locked restart: %q, %v", out, err)
	}
	return pid
}

// checkLocked checks that every thread of pid runs under exactly one
// filter, in filter mode, with no_new_privs.
func checkLocked(t *testing.T, pid int) {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("pid %d: no tasks: %v", pid, err)
	}
	for _, task := range tasks {
		st := statusOf(t, fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if st["Seccomp"] != "2" || st["Seccomp_filters"] != "1" || st["NoNewPrivs"] != "1" {
			t.Errorf("pid %d, thread %s: Seccomp %s, Seccomp_filters %s, NoNewPrivs %s; want 2, 1, 1",
				pid, task.Name(), st["Seccomp"], st["Seccomp_filters"], st["NoNewPrivs"])
		}
	}
}

func statusOf(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// children lists pid's children.
func children(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, f := range strings.Fields(string(b)) {
			n, _ := strconv.Atoi(f)
			kids = append(kids, n)
		}
	}
	return kids
}

// TestLockedRestarts: three restarts with the broker, under a filter that
// kills on anything else and has neither execve nor a process clone. Each
// new process serves on the same port; every thread of every generation
// runs under its own filter and no other; each old process, and each
// broker, which is not filtered, exits 0.
func TestLockedRestarts(t *testing.T) {
	s := start(t)
	pid := s.pid
	checkLocked(t, pid)
	for gen := 1; gen <= 3; gen++ {
		kids := children(t, pid)
		if len(kids) != 1 {
			t.Fatalf("generation %d (pid %d) has children %v, want one: its broker", gen-1, pid, kids)
		}
		broker := kids[0]
		if st := statusOf(t, fmt.Sprintf("/proc/%d/status", broker)); st["Seccomp"] != "0" || st["Seccomp_filters"] != "0" {
			t.Errorf("broker %d: Seccomp %s, Seccomp_filters %s; want 0, 0", broker, st["Seccomp"], st["Seccomp_filters"])
		}
		newPid := s.restart()
		s.instance(gen)
		if p, g := s.hello(); p != newPid || g != gen {
			t.Fatalf("after restart %d: GET / answered by pid %d, generation %d; want %d, %d", gen, p, g, newPid, gen)
		}
		checkLocked(t, newPid)
		for _, p := range []int{pid, broker} {
			if ws := s.exit(p); !ws.Exited() || ws.ExitStatus() != 0 {
				t.Errorf("pid %d (old generation %d, or its broker): wait status %#x, want exit status 0", p, gen-1, uint32(ws))
			}
		}
		pid = newPid
	}
}

// TestLockedNoBroker: the same filter without a broker. The restart's
// fork is answered EPERM: the restart fails and says so, and the server
// keeps serving, with the same fds and no child.
func TestLockedNoBroker(t *testing.T) {
	s := start(t, "-broker=false")
	checkLocked(t, s.pid)
	before := fds(t, s.pid)
	cmd := exec.Command(lockedBin, "-socket", s.socket, "restart")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || len(out) != 0 ||
		!strings.HasPrefix(stderr.String(), "Restart failed: ") || !strings.Contains(stderr.String(), "operation not permitted") {
		t.Fatalf("locked restart: %v, stdout %q, stderr %q; want exit status 1 and the EPERM on stderr", err, out, stderr.String())
	}
	// Once more over a connection of the test's, read to its end: the
	// server has closed its copies of both by then.
	if text := requestRaw(t, s.socket); !strings.Contains(text, "RestartFailed") || !strings.Contains(text, "operation not permitted") {
		t.Fatalf("second restart: %q", text)
	}
	if p, g := s.hello(); p != s.pid || g != 0 {
		t.Fatalf("after the failed restarts: GET / answered by pid %d, generation %d; want %d, 0", p, g, s.pid)
	}
	if after := fds(t, s.pid); !slices.Equal(after, before) {
		t.Errorf("fds before the failed restarts:\n%q\nafter:\n%q", before, after)
	}
	if kids := children(t, s.pid); len(kids) != 0 {
		t.Errorf("children %v after the failed restarts, want none", kids)
	}
	checkLocked(t, s.pid)
}

// requestRaw asks for a restart over the control socket, and reads the
// answer to the end of the connection.
func requestRaw(t *testing.T, socket string) string {
	t.Helper()
	c, err := net.DialTimeout("unix", socket, deadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	const req = `{"Request":"TryRestart"}`
	c.Write(append(binary.BigEndian.AppendUint32(nil, uint32(len(req))), req...))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// fds lists pid's fds and what they are.
func fds(t *testing.T, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		out = append(out, e.Name()+" "+target)
	}
	return out
}

// TestLockedStaleSocket: a fresh start, inside the filter, takes a stale
// control socket away (the library's check connects to it, renames it
// aside and unlinks it) and binds its own.
func TestLockedStaleSocket(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "locked.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	s := startAt(t, socket, nil)
	checkLocked(t, s.pid)
	newPid := s.restart()
	s.instance(1)
	checkLocked(t, newPid)
}

// TestLockedNotify: under a service manager (NOTIFY_SOCKET), inside the
// filter, the first generation says READY=1, and at a restart the old one
// names the new main process and waits on a barrier, before the new one
// says READY=1: what sd_notify needs is in the filter. The test plays the
// manager.
func TestLockedNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msgs := make(chan string, 16)
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				close(msgs)
				return
			}
			// A barrier's fd: closing it is the manager's answer.
			cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for i := range cmsgs {
				fds, _ := unix.ParseUnixRights(&cmsgs[i])
				for _, fd := range fds {
					unix.Close(fd)
				}
			}
			msgs <- string(buf[:n])
		}
	}()
	next := func(want string) {
		t.Helper()
		select {
		case m := <-msgs:
			if !strings.Contains(m, want) {
				t.Fatalf("the manager got %q, want %q in it", m, want)
			}
		case <-time.After(deadline):
			t.Fatalf("no %q within %v", want, deadline)
		}
	}
	s := startAt(t, filepath.Join(t.TempDir(), "locked.sock"), []string{"NOTIFY_SOCKET=" + path})
	next("READY=1")
	newPid := s.restart()
	next("MAINPID=" + strconv.Itoa(newPid))
	next("BARRIER=1")
	next("READY=1")
	s.instance(1)
	checkLocked(t, newPid)
}

// TestLockedLoad: wrk, which keeps connections alive and never retries,
// sees no error and no status but 200 while the server restarts again and
// again, for as long as wrk runs.
func TestLockedLoad(t *testing.T) {
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (Debian package wrk)")
	}
	s := start(t)
	cmd := exec.Command(wrk, "-t2", "-c16", "-d3s", "--timeout", "10s", "http://"+s.addr+"/")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	restarts := 0
	var wrkErr error
	for running := true; running; {
		select {
		case wrkErr = <-done:
			running = false
			continue
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		_, err := shellflip.RequestRestart(ctx, s.socket)
		cancel()
		if err != nil {
			t.Fatalf("restart %d: %v", restarts+1, err)
		}
		restarts++
		s.instance(restarts)
	}
	if wrkErr != nil || strings.Contains(out.String(), "Socket errors") || strings.Contains(out.String(), "Non-2xx") || !strings.Contains(out.String(), "requests in") {
		t.Errorf("wrk, during %d restarts:\n%s", restarts, out.String())
	}
	t.Logf("%d restarts under load", restarts)
}

// TestLockedDemo: "locked demo" restarts a server under load, with no
// failed request, and shows one filter in every generation.
func TestLockedDemo(t *testing.T) {
	out, err := exec.Command(lockedBin, "demo", "-restarts", "3", "-interval", "100ms", "-clients", "4").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "\nOK: ") {
		t.Fatalf("locked demo: %v\n%s", err, out)
	}
	rows := 0
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] != "generation" {
			if f[4] != "1" {
				t.Errorf("a generation runs under %s filters: %q", f[4], line)
			}
			rows++
		}
	}
	if rows != 4 {
		t.Errorf("%d generations in the table, want 4:\n%s", rows, out)
	}
}

// TestLockedChain: 500 restarts in a row (50 with -short), each new process
// locked under its own filter only; in the end every generation and every
// broker has exited 0.
func TestLockedChain(t *testing.T) {
	n := 500
	if testing.Short() {
		n = 50
	}
	s := start(t)
	pid := s.pid
	for gen := 1; gen <= n; gen++ {
		// The old generation and its broker are reaped before the next
		// restart: the new process is the broker's child until then.
		old := append(children(t, pid), pid)
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		newPid, err := shellflip.RequestRestart(ctx, s.socket)
		cancel()
		if err != nil {
			t.Fatalf("restart %d: %v", gen, err)
		}
		s.instance(gen)
		if st := statusOf(t, fmt.Sprintf("/proc/%d/status", newPid)); st["Seccomp_filters"] != "1" {
			t.Fatalf("generation %d (pid %d): Seccomp_filters %s, want 1", gen, newPid, st["Seccomp_filters"])
		}
		for _, p := range old {
			s.exit(p)
		}
		pid = newPid
	}
	checkLocked(t, pid)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	s.allGone()
	// Generations 0 to n, and a broker each.
	if len(s.exited) != 2*(n+1) {
		t.Fatalf("%d processes exited, want %d", len(s.exited), 2*(n+1))
	}
	for p, ws := range s.exited {
		if !ws.Exited() || ws.ExitStatus() != 0 {
			t.Errorf("pid %d: wait status %#x, want exit status 0", p, uint32(ws))
		}
	}
}

// allGone collects the reaper's reports until it ends: every process is
// gone.
func (s *server) allGone() {
	s.t.Helper()
	timeout := time.After(deadline)
	for {
		select {
		case e, ok := <-s.exits:
			if !ok {
				return
			}
			s.exited[e[0]] = unix.WaitStatus(e[1])
		case <-timeout:
			s.t.Fatalf("processes still running %v after the last was stopped", deadline)
		}
	}
}

// TestSecurityTable: SECURITY.md's table of a locked process's system calls
// is the filter's. The section is the one whose heading names
// examples/locked; its rows are
//
//	| `name` | answer | who makes it |
//
// with answer "allow", "EPERM", "ENOSYS", or for clone "threads only, else
// EPERM"; anything else is killed. On a mismatch, the test prints the rows
// it wants.
func TestSecurityTable(t *testing.T) {
	b, err := os.ReadFile("../../SECURITY.md")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "## ") {
			in = strings.Contains(line, "examples/locked")
		} else if in && strings.HasPrefix(line, "| `") {
			got = append(got, line)
		}
	}
	var want []string
	for _, r := range append(slices.Clone(syscalls), cloneRule) {
		answer := map[uint32]string{allow: "allow", eperm: "EPERM", enosys: "ENOSYS"}[r.ret]
		if r.name == "clone" {
			answer = "threads only, else EPERM"
		}
		want = append(want, fmt.Sprintf("| `%s` | %s | %s |", r.name, answer, r.who))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("SECURITY.md's rows for examples/locked differ from the filter's (filter.go); want, in any order:\n%s", strings.Join(want, "\n"))
	}
}
