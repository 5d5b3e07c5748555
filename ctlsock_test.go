//go:build linux

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestControlSocketSilentClient(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	silent, err := net.Dial("unix", c.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c.restart(r0["pid"])
	silent.SetReadDeadline(time.Now().Add(testDeadline))
	var scratch [512]byte
	payload, err := readFrame(silent, scratch[:])
	if err != nil {
		t.Fatalf("silent client got no answer: %v", err)
	}
	m, err := decodeMessage(payload)
	if err != nil || m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
		t.Fatalf("silent client got %+v, %v; want a RestartFailed naming a bad request", m, err)
	}
}

// TestControlSocketBadFrames: garbage, oversized and half frames get a clear
// answer and do not disturb the next request.
func TestControlSocketBadFrames(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	for _, tc := range []struct {
		name, send, want string
	}{
		{"garbage", "\x00\x00\x00\x05hello", "bad request"},
		{"oversized", "\x40\x00\x00\x00", "exceeds"},
		{"response", string(appendRestartComplete(nil, 7)), "unexpected message"},
		{"empty", "\x00\x00\x00\x00", "bad request"},
	} {
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte(tc.send))
		conn.SetReadDeadline(time.Now().Add(testDeadline))
		var scratch [512]byte
		payload, err := readFrame(conn, scratch[:])
		conn.Close()
		if err != nil {
			t.Fatalf("%s: no answer: %v", tc.name, err)
		}
		m, err := decodeMessage(payload)
		if err != nil || m.kind != msgRestartFailed || !strings.Contains(m.text, tc.want) {
			t.Errorf("%s: got %+v, %v; want RestartFailed containing %q", tc.name, m, err, tc.want)
		}
	}
	c.restart(r0["pid"])
}

// TestControlSocketForeignUID: a client of another uid is refused by
// SO_PEERCRED even when the socket's mode lets it connect.
func TestControlSocketForeignUID(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	bin := c.nobodyBinary()
	// Let uid 65534 reach the socket itself.
	if err := os.Chmod(c.socket, 0o777); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestRole+"=client", envTestReport+"="+c.reports.path, envTestSocket+"="+c.socket)
	asNobody(cmd)
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	rep := c.reports.next("client")
	if !strings.Contains(rep["err"], "permission denied: uid 65534") {
		t.Fatalf("foreign client got %v, want a permission error", rep)
	}
	c.restart(r0["pid"])
}

// TestControlSocketPathInTheWay: whatever is at the socket path and is not
// a stale socket is an error, and is left exactly as it was.
func TestControlSocketPathInTheWay(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("precious"), 0o600)
	sub := filepath.Join(dir, "dir")
	os.Mkdir(sub, 0o700)
	link := filepath.Join(dir, "link")
	os.Symlink(file, link)
	dangling := filepath.Join(dir, "dangling")
	os.Symlink(filepath.Join(dir, "nowhere"), dangling)
	live := filepath.Join(dir, "live")
	ln, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range []struct{ path, want string }{
		{file, "regular file is in the way"},
		{sub, "directory is in the way"},
		{link, "symlink is in the way"},
		{dangling, "symlink is in the way"},
		{live, "another process is listening"},
	} {
		var before unix.Stat_t
		unix.Lstat(tc.path, &before)
		fd, _, err := bindControl(tc.path)
		if err == nil {
			unix.Close(fd)
			t.Errorf("%s: bound, want an error", tc.path)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q, want %q", tc.path, err, tc.want)
		}
		var after unix.Stat_t
		if err := unix.Lstat(tc.path, &after); err != nil || after.Ino != before.Ino || after.Mode != before.Mode {
			t.Errorf("%s: changed: %v", tc.path, err)
		}
	}
	if b, _ := os.ReadFile(file); string(b) != "precious" {
		t.Errorf("file content changed to %q", b)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".shellflip-*"))
	if len(leftovers) > 0 {
		t.Errorf("temporary sockets left behind: %v", leftovers)
	}
}

// TestControlSocketStaleAndMode: a stale socket file is replaced, and the
// new socket has mode 0600.
func TestControlSocketStaleAndMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves a stale socket file behind
	fd, _, err := bindControl(path)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Mode&0o777 != 0o600 {
		t.Errorf("socket mode %o, want a socket with 0600", st.Mode)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the new socket does not accept: %v", err)
	}
	c.Close()
}

// TestRequestRestartNoServer: a missing socket is a plain dial error, not
// ErrRestartFailed.
func TestRequestRestartNoServer(t *testing.T) {
	_, err := RequestRestart(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || errors.Is(err, ErrRestartFailed) {
		t.Fatalf("got %v, want a dial error", err)
	}
}

// TestControlSocketSequentialRequests: a client that asks again as soon as
// it has its answer (two deploys in a row) gets a new restart each time,
// never the previous restart's outcome, and a strict client (one that
// writes its request before it reads) always gets an answer.
func TestControlSocketSequentialRequests(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	last, _ := strconv.Atoi(r0["pid"])
	for i := range 100 {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		pid, err := RequestRestart(ctx, c.socket)
		cancel()
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		c.track(pid)
		if pid == last {
			t.Fatalf("request %d was answered with pid %d, the outcome of the restart before it", i, pid)
		}
		last = pid
	}
}

// TestControlSocketPathSwappedDuringTakeover: a file renamed onto the
// socket path after the stale check and before the takeover is never
// deleted; the takeover fails and says so.
func TestControlSocketPathSwappedDuringTakeover(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // a stale socket
	precious := filepath.Join(dir, "precious")
	os.WriteFile(precious, []byte("precious"), 0o600)
	testHookStaleChecked = func() {
		if err := os.Rename(precious, path); err != nil {
			t.Error(err)
		}
	}
	defer func() { testHookStaleChecked = func() {} }()
	fd, _, err := bindControl(path)
	if err == nil {
		unix.Close(fd)
		t.Errorf("bound over the file that replaced the stale socket")
	}
	if b, rerr := os.ReadFile(path); rerr != nil || string(b) != "precious" {
		t.Fatalf("the file at the socket path is gone or changed (%v, %q); bind error: %v", rerr, b, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".*"))
	if len(leftovers) > 0 {
		t.Errorf("temporary files left behind: %v", leftovers)
	}
}

// TestControlSocketModeUnderUmask: the socket is 0600 whatever the umask;
// with umask 0277 it would otherwise be 0400, which even its owner cannot
// connect to.
func TestControlSocketModeUnderUmask(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server", envTestUmask+"=0277")
	var st unix.Stat_t
	if err := unix.Lstat(c.socket, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o7777 != 0o600 {
		t.Errorf("socket mode %04o under umask 0277, want 0600", st.Mode&0o7777)
	}
	c.restart(r0["pid"])
}

// TestControlSocketRecreated: after the socket file was deleted, the next
// generation binds a fresh one at the path instead of keeping an inherited
// socket that nobody can reach.
func TestControlSocketRecreated(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("server")
	if err := os.Remove(c.socket); err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(r0["pid"])
	unix.Kill(pid, unix.SIGUSR1)
	r1 := c.reports.next("ready")
	np, _ := strconv.Atoi(r1["pid"])
	c.track(np)
	c.reports.nextFrom("replaced", r0["pid"])
	c.restart(r1["pid"])
}

// fakeControlServer listens at path and answers every request with frame.
func fakeControlServer(t *testing.T, path string, frame []byte) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			var scratch [256]byte
			readFrame(conn, scratch[:])
			conn.Write(frame)
			conn.Close()
		}
	}()
}

// TestRequestRestartChecksServer: the client believes only a server of its
// own uid or root, only a pid that can be a new process, and hands on the
// server's text with control characters escaped.
func TestRequestRestartChecksServer(t *testing.T) {
	dir := t.TempDir()
	ask := func(path string) (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		return RequestRestart(ctx, path)
	}
	for _, pid := range []uint32{0, 1} {
		path := filepath.Join(dir, fmt.Sprintf("pid%d.sock", pid))
		fakeControlServer(t, path, appendRestartComplete(nil, pid))
		if got, err := ask(path); err == nil || !strings.Contains(err.Error(), "not a new process") {
			t.Errorf("server answering pid %d: got %d, %v; want an error", pid, got, err)
		}
	}
	path := filepath.Join(dir, "esc.sock")
	fakeControlServer(t, path, appendRestartFailed(nil, "boom\x1b[2J\r\nSTATUS=x\u202e\x00end"))
	_, err := ask(path)
	if !errors.Is(err, ErrRestartFailed) {
		t.Fatalf("got %v, want ErrRestartFailed", err)
	}
	if want := `boom\x1b[2J\r\nSTATUS=x\u202e\x00end`; err.Error() != want {
		t.Errorf("error text %q, want %q", err.Error(), want)
	}
}

// TestRequestRestartForeignServer: a server of another uid at the path
// (one that took a path in a shared directory) is not believed.
func TestRequestRestartForeignServer(t *testing.T) {
	c := newTestCluster(t)
	bin := c.nobodyBinary()
	sub := filepath.Join(c.dir, "shared")
	os.Mkdir(sub, 0o777)
	os.Chmod(sub, 0o777)
	path := filepath.Join(sub, "ctl.sock")
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestRole+"=fakeserver", envTestReport+"="+c.reports.path, envTestSocket+"="+path)
	asNobody(cmd)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c.reports.next("fakeserver")
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, path)
	if err == nil || !strings.Contains(err.Error(), "uid 65534") {
		t.Fatalf("a server of uid 65534 answered pid %d, %v; want an error naming its uid", pid, err)
	}
}

// testFakeServer is role "fakeserver": a control socket server that says
// every restart succeeded with pid 1234.
func testFakeServer() int {
	ln, err := net.Listen("unix", os.Getenv(envTestSocket))
	if err != nil {
		report("error fakeserver: %v", err)
		return 1
	}
	report("fakeserver pid=%d", os.Getpid())
	for {
		conn, err := ln.Accept()
		if err != nil {
			return 1
		}
		var scratch [256]byte
		readFrame(conn, scratch[:])
		conn.Write(appendRestartComplete(nil, 1234))
		conn.Close()
	}
}

// TestPIDFileOfAnotherUser: a PID file that another uid owns in a sticky
// directory cannot be replaced; Start fails instead of running with a PID
// file that names someone else.
func TestPIDFileOfAnotherUser(t *testing.T) {
	c := newTestCluster(t)
	bin := c.nobodyBinary()
	sticky := filepath.Join(c.dir, "run")
	os.Mkdir(sticky, 0o777)
	os.Chmod(sticky, 0o777|os.ModeSticky)
	pidFile := filepath.Join(sticky, "svc.pid")
	if err := os.WriteFile(pidFile, []byte("1\n"), 0o644); err != nil { // root's
		t.Fatal(err)
	}
	sub := filepath.Join(c.dir, "shared")
	os.Mkdir(sub, 0o777)
	os.Chmod(sub, 0o777)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestRole+"=server", envTestReport+"="+c.reports.path,
		envTestSocket+"="+filepath.Join(sub, "ctl.sock"), envTestPIDFile+"="+pidFile)
	asNobody(cmd)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	rep := c.reports.next("error")
	if !strings.Contains(rep["err"], "start:") || !strings.Contains(rep["err"], pidFile) {
		t.Errorf("Start with a foreign PID file: %v, want a Start error naming the file", rep)
	}
	if got := readPIDFile(t, pidFile); got != "1" {
		t.Errorf("PID file changed to %q", got)
	}
}
