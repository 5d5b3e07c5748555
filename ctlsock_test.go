//go:build linux

package shellflip

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
	if err != nil || m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request: no request received before this process stopped serving restarts (replaced by pid") {
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
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid; CI runs as root")
	}
	c := newTestCluster(t)
	r0 := c.start("server")
	// Let uid 65534 reach the socket: the directory and the socket itself.
	os.Chmod(c.dir, 0o755)
	os.Chmod(c.reports.path, 0o777)
	if err := os.Chmod(c.socket, 0o777); err != nil {
		t.Fatal(err)
	}
	// The test binary must be reachable for uid 65534 too: copy it out of
	// the go command's private build directory.
	bin := filepath.Join(c.dir, "client.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	for d := c.dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envTestRole+"=client", envTestReport+"="+c.reports.path, envTestSocket+"="+c.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
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
		fd, err := bindControl(tc.path)
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
	fd, err := bindControl(path)
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

// ErrRestartFailed.
func TestRequestRestartNoServer(t *testing.T) {
	_, err := RequestRestart(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || errors.Is(err, ErrRestartFailed) {
		t.Fatalf("got %v, want a dial error", err)
	}
}
