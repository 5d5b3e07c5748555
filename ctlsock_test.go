//go:build linux

package shellflip

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The control socket (ctlsock.go): its path bound and taken over, the
// server's answers to good, bad, silent, stalled and foreign clients, and
// RequestRestart's checks of the server.

// TestControlSocketSilentClient: a client that connects and says nothing
// delays nobody, and is answered (not silently dropped) when its time is up.
func TestControlSocketSilentClient(t *testing.T) {
	if testing.Short() {
		t.Skip("testing.Short(): a client answered after requestTimeout, 5 s")
	}
	c := newTestCluster(t)
	r0 := c.start("server")
	silent, err := net.Dial("unix", c.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c.restart(r0["pid"])
	if m := readAnswer(t, silent); m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
		t.Fatalf("silent client got %+v; want a RestartFailed naming a bad request", m)
	}
}

// sendFrame connects to the control socket at path, sends data there, and
// returns the server's answer.
func sendFrame(t *testing.T, path, data string) message {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, data); err != nil {
		t.Fatal(err)
	}
	return readAnswer(t, conn)
}

// readAnswer reads the server's one answer on conn.
func readAnswer(t *testing.T, conn net.Conn) message {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(testDeadline))
	var scratch [512]byte
	payload, err := readFrame(conn, scratch[:])
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	m, err := decodeMessage(payload)
	if err != nil {
		t.Fatalf("undecodable answer %q: %v", payload, err)
	}
	return m
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
		if m := sendFrame(t, c.socket, tc.send); m.kind != msgRestartFailed || !strings.Contains(m.text, tc.want) {
			t.Errorf("%s: got %+v; want RestartFailed containing %q", tc.name, m, tc.want)
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
	cmd := c.command(bin, "client")
	asNobody(cmd)
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
	path := staleSocket(t)
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

// staleSocket returns the path of a socket file that nothing listens on
// any more, as a process that was killed leaves it, in a directory of its
// own.
func staleSocket(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	return path
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
	if testing.Short() {
		t.Skip("testing.Short(): 100 restarts one after the other")
	}
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
	path := staleSocket(t)
	dir := filepath.Dir(path)
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
	r1 := c.nextNew("ready")
	c.reports.nextFrom("replaced", r0["pid"])
	c.restart(r1["pid"])
}

// TestControlSocketFinishWaitsForServe: finish does not return while serve
// holds a client it accepted and has not yet handed over (ctlsock.go, serve,
// between AcceptUnix and handle); that client is answered first.
func TestControlSocketFinishWaitsForServe(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	s, err := listenControl(path, -1, "", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	accepted, release := make(chan struct{}), make(chan struct{})
	unblock := sync.OnceFunc(func() { close(release) })
	defer unblock()
	testHookAccepted = func() { close(accepted); <-release }
	defer func() { testHookAccepted = func() {} }()
	go s.serve()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(appendTryRestart(nil)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-accepted:
	case <-time.After(testDeadline):
		t.Fatal("the client was not accepted")
	}
	finished := make(chan struct{})
	go func() { s.finish(4242, nil, true); close(finished) }()
	waitUntil(t, func() string {
		select {
		case <-finished:
			t.Fatal("finish returned while serve held a client it had accepted")
		default:
		}
		if !parkedOnReceive(").finish(") {
			return "finish does not wait for serve"
		}
		return ""
	})
	unblock()
	select {
	case <-finished:
	case <-time.After(testDeadline):
		t.Fatal("finish did not return once serve went on")
	}
	if n := len(s.slots); n != 0 {
		t.Errorf("finish returned while %d clients were being served", n)
	}
	if m := readAnswer(t, c); m.kind != msgRestartComplete || m.pid != 4242 {
		t.Errorf("the client was answered with %+v, want the final outcome, pid 4242", m)
	}
}

// parkedOnReceive reports whether a goroutine waits on a channel receive
// in a function whose name ends with fn.
func parkedOnReceive(fn string) bool {
	buf := make([]byte, 1<<20)
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "[chan receive") && strings.Contains(g, fn) {
			return true
		}
	}
	return false
}

// TestControlSocketAbandon: a new process whose Start failed leaves the
// socket it shares with the old process as it was: a client in the backlog
// is not taken (nor answered), and the socket file stays.
func TestControlSocketAbandon(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	old, id, err := bindControl(path) // the old process's socket
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(old)
	fd, err := unix.FcntlInt(uintptr(old), unix.F_DUPFD_CLOEXEC, 0) // the copy the new process inherits
	if err != nil {
		t.Fatal(err)
	}
	s, err := listenControl(path, fd, id.String(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s.abandon()
	if err := unix.SetNonblock(old, true); err != nil {
		t.Fatal(err)
	}
	nfd, err := acceptCloexec(old)
	if err != nil {
		t.Fatalf("the client is no longer in the old process's backlog: %v", err)
	}
	unix.Close(nfd)
	if got, _, err := lstatID(path); err != nil || got != id {
		t.Errorf("the socket file changed: %v, %v; want %v", got, err, id)
	}
}

// TestControlSocketInheritedChecked: an inherited fd is adopted only if it
// is a listening unix stream socket bound to the path, even if the file at
// the path has the identity the old process passed; anything else is closed
// and a socket bound afresh, which serves.
func TestControlSocketInheritedChecked(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	for _, tc := range []struct {
		name, at string // at: where the fd is bound, "" for nowhere
		typ      int
		listen   bool
	}{
		{"unbound datagram", "", unix.SOCK_DGRAM, false},
		{"datagram at the path", "ctl.sock", unix.SOCK_DGRAM, false},
		{"stream not listening", "ctl.sock", unix.SOCK_STREAM, false},
		{"seqpacket listening", "ctl.sock", unix.SOCK_SEQPACKET, true},
		{"stream listening elsewhere", "other.sock", unix.SOCK_STREAM, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ctl.sock")
			if tc.at != "ctl.sock" {
				if err := os.Rename(staleSocket(t), path); err != nil {
					t.Fatal(err)
				}
			}
			fd, err := unix.Socket(unix.AF_UNIX, tc.typ|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			if tc.at != "" {
				err = unix.Bind(fd, &unix.SockaddrUnix{Name: filepath.Join(dir, tc.at)})
			}
			if err == nil && tc.listen {
				err = unix.Listen(fd, 1)
			}
			id, _, lerr := lstatID(path)
			if err = cmp.Or(err, lerr); err != nil {
				unix.Close(fd)
				t.Fatal(err)
			}
			s, err := listenControl(path, fd, id.String(), log)
			if err != nil {
				t.Fatal(err)
			}
			go s.serve()
			defer s.finish(0, errors.New("done"), false)
			if m := sendFrame(t, path, "\x00\x00\x00\x01x"); m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") {
				t.Errorf("garbage answered with %+v", m)
			}
		})
	}
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
	// Above math.MaxInt32, a pid would be negative as an int on 32-bit
	// platforms: kill(-1) signals every process.
	for _, pid := range []uint32{0, 1, math.MaxInt32 + 1, math.MaxUint32} {
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
	cmd := c.command(bin, "fakeserver", envTestSocket+"="+path)
	asNobody(cmd)
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

// testClient is role "client": it asks for a restart and reports the
// outcome. TestControlSocketForeignUID runs it as another uid.
func testClient() int {
	pid, err := RequestRestart(context.Background(), os.Getenv(envTestSocket))
	report("client pid=%d err=%v", pid, err)
	return 0
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

// TestFaultControlSocketHalfFrame: clients that send half a frame and fall
// silent tie up nothing but their own connections. Meanwhile the server
// answers a restart request (made to fail by a knob, so that the server
// stays) and a garbage frame, and when the half-frame clients' time is up
// (requestTimeout, 5 s) each is answered with an error rather than dropped;
// then a restart succeeds. It guards the per-connection read deadline (ctlsock.go,
// serve, "conn.SetReadDeadline(time.Now().Add(requestTimeout))"): without
// it the half-frame clients would wait until the process stopped serving.
// It takes requestTimeout, so it runs in parallel with the rest.
func TestFaultControlSocketHalfFrame(t *testing.T) {
	if testing.Short() {
		t.Skip("testing.Short(): clients answered after requestTimeout, 5 s")
	}
	t.Parallel()
	c := newTestCluster(t)
	knob := filepath.Join(c.dir, "knob")
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("server", envTestFailFile+"="+knob, envTestFailMode+"=exit3")
	var stalled []net.Conn
	for _, half := range [][]byte{
		{0, 0},                                   // half a length header
		append([]byte{0, 0, 0, 20}, "{\"Req"...), // a header and a quarter of its payload
	} {
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write(half); err != nil {
			t.Fatal(err)
		}
		stalled = append(stalled, conn)
	}
	// Served meanwhile: a restart request, which fails by the knob...
	if err := c.requestErr(); !strings.Contains(err.Error(), "exited before it was ready") {
		t.Fatalf("RequestRestart while clients stall: %v", err)
	}
	// ...and a garbage frame.
	if m := sendFrame(t, c.socket, "\x00\x00\x00\x02{}"); m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") {
		t.Errorf("garbage frame answered with %+v", m)
	}
	for i, conn := range stalled {
		m := readAnswer(t, conn)
		if m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
			t.Errorf("half-frame client %d answered with %+v, want a RestartFailed naming a bad request and the timeout", i, m)
		}
	}
	c.restart(r0["pid"])
}

// TestFaultControlSocketFDLeak runs the in-process tests of the control
// socket and of bindControl, and more of its paths, and checks that every
// fd they opened was closed: on each bind error (bindControl's fail
// closures), after finish or abandon (the listener, its duplicate for the
// new process, every connection, answered or cut short), and for an
// inherited control socket that is adopted or refused (listenControl closes
// the refused one).
func TestFaultControlSocketFDLeak(t *testing.T) {
	// Not parallel: other tests' fds would come and go during the count.
	log := slog.New(slog.DiscardHandler)
	before := listFDs(t)

	t.Run("PathInTheWay", TestControlSocketPathInTheWay)
	t.Run("StaleAndMode", TestControlSocketStaleAndMode)
	t.Run("NoServer", TestRequestRestartNoServer)
	t.Run("BindErrors", func(t *testing.T) {
		dir := t.TempDir()
		for _, path := range []string{
			"",
			"@abstract",
			filepath.Join(dir, strings.Repeat("x", 200)), // longer than sun_path: bind fails
			filepath.Join(dir, "missing", "ctl.sock"),    // no such directory: bind fails
		} {
			if fd, _, err := bindControl(path); err == nil {
				unix.Close(fd)
				t.Errorf("bindControl(%q) succeeded", path)
			}
		}
		fd, _, err := bindControl(filepath.Join(dir, "ok.sock"))
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(fd)
	})
	t.Run("Server", func(t *testing.T) {
		if testing.Short() {
			t.Skip("testing.Short(): clients answered after requestTimeout, 5 s")
		}
		path := filepath.Join(t.TempDir(), "ctl.sock")
		s, err := listenControl(path, -1, "", log)
		if err != nil {
			t.Fatal(err)
		}
		go s.serve()
		// The restart loop's part: every request restarts into pid 4242.
		loop := make(chan struct{})
		go func() {
			defer close(loop)
			for {
				select {
				case q := <-s.reqs:
					q.respond(log, 4242, nil)
				case <-s.stopped:
					return
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		if pid, err := RequestRestart(ctx, path); pid != 4242 || err != nil {
			t.Errorf("RequestRestart = %d, %v; want 4242", pid, err)
		}
		if m := sendFrame(t, path, "\x00\x00\x00\x01x"); m.kind != msgRestartFailed || !strings.Contains(m.text, "bad request") {
			t.Errorf("garbage answered with %+v", m)
		}
		// Fill every slot with a silent client; the next one is turned
		// away at once (ctlsock.go, accept, the slots select), the silent
		// ones are answered when their read times out.
		// The slots of the clients above are given back after their
		// answers are sent: wait for that.
		waitUntil(t, func() string {
			if n := len(s.slots); n > 0 {
				return fmt.Sprintf("%d slots still taken with no client left", n)
			}
			return ""
		})
		var silent []net.Conn
		for range maxControlConns {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			silent = append(silent, c)
		}
		extra, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		if m := readAnswer(t, extra); m.kind != msgRestartFailed || m.text != "too many concurrent restart requests" {
			t.Errorf("client beyond maxControlConns answered with %+v", m)
		}
		extra.Close()
		s.finish(4343, nil, true)
		<-loop
		for i, c := range silent {
			if m := readAnswer(t, c); m.kind != msgRestartFailed || m.text != "bad request: no request within 5s" {
				t.Fatalf("silent client %d answered with %+v", i, m)
			}
			c.Close()
		}
		if _, err := RequestRestart(ctx, path); err == nil {
			t.Errorf("RequestRestart succeeded after finish")
		}
	})
	t.Run("Inherited", func(t *testing.T) {
		dir := t.TempDir()
		// Bound to the same path: adopted; finish closes it.
		same := filepath.Join(dir, "same.sock")
		fd, id, err := bindControl(same)
		if err != nil {
			t.Fatal(err)
		}
		s, err := listenControl(same, fd, id.String(), log)
		if err != nil {
			t.Fatal(err)
		}
		if s.fd != fd {
			t.Errorf("the inherited socket on the same path was not adopted")
		}
		go s.serve()
		s.finish(0, errors.New("done"), false)
		// Bound elsewhere: closed, and a new socket bound; abandon closes it.
		fd, id, err = bindControl(filepath.Join(dir, "elsewhere.sock"))
		if err != nil {
			t.Fatal(err)
		}
		s, err = listenControl(filepath.Join(dir, "new.sock"), fd, id.String(), log)
		if err != nil {
			t.Fatal(err)
		}
		s.abandon()
		// Not a listening socket at all: closed too.
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		s, err = listenControl(filepath.Join(dir, "pipe.sock"), p[0], "", log)
		if err != nil {
			t.Fatal(err)
		}
		s.abandon()
	})
	t.Run("InheritedChecked", TestControlSocketInheritedChecked)
	t.Run("Abandon", TestControlSocketAbandon)
	checkFDs(t, before, false)
}

// TestLogLimiter: a failure that repeats (accept out of fds) is logged once
// per logEvery, with how often it happened since.
func TestLogLimiter(t *testing.T) {
	var l logLimiter
	t0 := time.Unix(1000, 0)
	if n := l.note(t0); n != 1 {
		t.Fatalf("first occurrence: %d, want it logged (1)", n)
	}
	for i := 1; i <= 199; i++ { // every 50 ms for 10 s, less one
		if n := l.note(t0.Add(time.Duration(i) * 50 * time.Millisecond)); n != 0 {
			t.Fatalf("occurrence %d, %v after the first: logged", i, time.Duration(i)*50*time.Millisecond)
		}
	}
	if n := l.note(t0.Add(logEvery)); n != 200 {
		t.Errorf("after %v: %d, want 200 occurrences reported", logEvery, n)
	}
}

// levelRecorder is a slog.Handler that keeps the level of each message.
type levelRecorder struct{ levels chan slog.Level }

func (h levelRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h levelRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h levelRecorder) WithGroup(string) slog.Handler            { return h }
func (h levelRecorder) Handle(_ context.Context, r slog.Record) error {
	h.levels <- r.Level
	return nil
}

// TestControlSocketProbeIsDebug: a client that connects and goes away
// without a word (another instance probing the path) is logged at debug
// level, not as a warning; a garbage request is still a warning.
func TestControlSocketProbeIsDebug(t *testing.T) {
	rec := levelRecorder{make(chan slog.Level, 8)}
	path := filepath.Join(t.TempDir(), "ctl.sock")
	s, err := listenControl(path, -1, "", slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.finish(0, errors.New("done"), false)
	go s.serve()
	for _, tc := range []struct {
		send string
		want slog.Level
	}{{"", slog.LevelDebug}, {"\x00\x00\x00\x01x", slog.LevelWarn}} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(tc.send))
		c.(*net.UnixConn).CloseWrite()
		io.Copy(io.Discard, c) // the answer, then end of file
		c.Close()
		select {
		case l := <-rec.levels:
			if l != tc.want {
				t.Errorf("sending %q: logged at %v, want %v", tc.send, l, tc.want)
			}
		case <-time.After(testDeadline):
			t.Fatalf("sending %q: nothing logged", tc.send)
		}
	}
}
