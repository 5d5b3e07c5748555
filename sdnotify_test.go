//go:build linux

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sd_notify, against the real systemd-notify (sdnotify.go).

// sdListener plays the service manager: a SOCK_DGRAM socket owned by the test,
// at a path or an abstract address.
type sdListener struct {
	addr string // the NOTIFY_SOCKET value
	conn *net.UnixConn
}

var sdListenerSeq atomic.Int64

func sdListen(tb testing.TB, abstract bool) *sdListener {
	tb.Helper()
	if abstract {
		return sdListenAt(tb, fmt.Sprintf("@shellflip-test-%d-%d", os.Getpid(), sdListenerSeq.Add(1)))
	}
	return sdListenAt(tb, filepath.Join(shortTempDir(tb, "sd"), "notify"))
}

func sdListenAt(tb testing.TB, addr string) *sdListener {
	tb.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		tb.Fatalf("listening on %q: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	return &sdListener{addr: addr, conn: conn}
}

// passCred sets SO_PASSCRED, so that every datagram comes with its
// sender's pid, as systemd receives them.
func (l *sdListener) passCred(tb testing.TB) {
	tb.Helper()
	rc, err := l.conn.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		tb.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
}

// sdDatagram is one notification: its text, the fds that came with it
// (the receiver's to close), and, on a listener with passCred, who sent it.
type sdDatagram struct {
	pid  int
	text string
	fds  []int
}

// recvMsg returns the next datagram, waiting for it up to testDeadline if
// wait is set; without wait it only takes one already queued. A datagram
// is queued by the time its sender's sendmsg returns, so a recvMsg without
// wait tells exactly what was sent so far.
func (l *sdListener) recvMsg(tb testing.TB, wait bool) (sdDatagram, bool) {
	tb.Helper()
	if err := l.conn.SetReadDeadline(time.Now().Add(testDeadline)); err != nil {
		tb.Fatal(err)
	}
	rc, err := l.conn.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, 2*sdMaxDatagram)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*sdMaxFDs))
	var n, oobn, flags int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return !wait || rerr != unix.EAGAIN
			}
		}
	})
	if err != nil {
		tb.Fatalf("waiting for a datagram on %q: %v", l.addr, err)
	}
	if rerr == unix.EAGAIN {
		return sdDatagram{}, false
	}
	if rerr != nil {
		tb.Fatal(os.NewSyscallError("recvmsg", rerr))
	}
	d := sdDatagram{text: string(buf[:n])}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		tb.Fatalf("parsing control messages: %v", err)
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level != unix.SOL_SOCKET:
		case m.Header.Type == unix.SCM_CREDENTIALS:
			cred, err := unix.ParseUnixCredentials(&m)
			if err != nil {
				tb.Fatal(err)
			}
			d.pid = int(cred.Pid)
		case m.Header.Type == unix.SCM_RIGHTS:
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				tb.Fatalf("parsing SCM_RIGHTS: %v", err)
			}
			d.fds = append(d.fds, fds...)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		sdCloseFDs(d.fds)
		tb.Fatalf("truncated datagram %q (flags %#x)", d.text, flags)
	}
	return d, true
}

// recv waits for the next datagram.
func (l *sdListener) recv(tb testing.TB) (string, []int) {
	tb.Helper()
	d, _ := l.recvMsg(tb, true)
	return d.text, d.fds
}

// recvNow is recv without waiting: ok is false if nothing is queued.
func (l *sdListener) recvNow(tb testing.TB) (msg string, fds []int, ok bool) {
	tb.Helper()
	d, ok := l.recvMsg(tb, false)
	return d.text, d.fds, ok
}

// expectNone fails the test if a datagram is queued.
func (l *sdListener) expectNone(tb testing.TB) {
	tb.Helper()
	if d, ok := l.recvMsg(tb, false); ok {
		sdCloseFDs(d.fds)
		tb.Errorf("a datagram was sent: %q with %d fds (pid %d)", d.text, len(d.fds), d.pid)
	}
}

// drain reads and discards datagrams until stop is called, and closes reached
// once it has read want of them. It allocates nothing per datagram, so it can
// run beside testing.AllocsPerRun, which counts every goroutine's mallocs.
func (l *sdListener) drain(tb testing.TB, want int) (reached <-chan struct{}, stop func()) {
	tb.Helper()
	if err := l.conn.SetReadDeadline(time.Time{}); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	r := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2*sdMaxDatagram)
		for count := 0; ; {
			if _, err := l.conn.Read(buf); err != nil {
				return
			}
			if count++; count == want {
				close(r)
			}
		}
	}()
	return r, func() { l.conn.Close(); <-done }
}

func sdCloseFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func sdNewNotifier(tb testing.TB, addr string) *notifier {
	tb.Helper()
	n, err := newNotifier(addr)
	if err != nil || n == nil {
		tb.Fatalf("newNotifier(%q) = %v, %v", addr, n, err)
	}
	tb.Cleanup(func() { n.conn.Close() })
	return n
}

// sdSend sends fields without a deadline and fails the test on error.
func sdSend(tb testing.TB, n *notifier, fields ...string) {
	tb.Helper()
	if err := n.send(context.Background(), nil, fields...); err != nil {
		tb.Fatalf("send(%q): %v", fields, err)
	}
}

func sdSystemdNotifyPath(tb testing.TB) string {
	tb.Helper()
	p, err := exec.LookPath("systemd-notify")
	if err != nil {
		tb.Skipf("systemd-notify not found (install the systemd package): %v", err)
	}
	return p
}

// sdSystemdNotifyCmd prepares systemd-notify with NOTIFY_SOCKET=addr.
func sdSystemdNotifyCmd(ctx context.Context, bin, addr string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = sdEnv(addr)
	return cmd
}

// sdEnv is childEnv with NOTIFY_SOCKET=addr, or without NOTIFY_SOCKET if
// addr is "", and then extra.
func sdEnv(addr string, extra ...string) []string {
	if addr != "" {
		extra = append([]string{"NOTIFY_SOCKET=" + addr}, extra...)
	}
	return childEnv(extra...)
}

// sdSystemdNotify runs systemd-notify --no-block args... and returns the one
// datagram it sent to l.
func sdSystemdNotify(tb testing.TB, bin string, l *sdListener, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, append([]string{"--no-block"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return l.recvNoFDs(tb)
}

func sdAddrKinds() []struct {
	name     string
	abstract bool
} {
	return []struct {
		name     string
		abstract bool
	}{{"path", false}, {"abstract", true}}
}

// recvNoFDs is recv for a datagram that must come without fds.
func (l *sdListener) recvNoFDs(tb testing.TB) string {
	tb.Helper()
	msg, fds := l.recv(tb)
	if len(fds) != 0 {
		sdCloseFDs(fds)
		tb.Errorf("%q came with %d fds", msg, len(fds))
	}
	return msg
}

// recvBarrier receives the datagram of a barrier, BARRIER=1 with one fd,
// the write end of a pipe, and returns that fd, the caller's to close. If
// from is not 0, the datagram must come from that pid (see passCred).
func (l *sdListener) recvBarrier(tb testing.TB, from int) int {
	tb.Helper()
	d, _ := l.recvMsg(tb, true)
	if d.text != "BARRIER=1" || len(d.fds) != 1 || from != 0 && d.pid != from {
		sdCloseFDs(d.fds)
		tb.Fatalf("got %q from pid %d with %d fds, want BARRIER=1 with 1 (from pid %d)", d.text, d.pid, len(d.fds), from)
	}
	var st unix.Stat_t
	if err := unix.Fstat(d.fds[0], &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		tb.Errorf("the barrier fd is not a pipe (mode %#o, %v)", st.Mode, err)
	}
	return d.fds[0]
}

// expect checks that the next datagram is text from pid (see passCred),
// without fds.
func (l *sdListener) expect(tb testing.TB, pid int, text string) {
	tb.Helper()
	d, _ := l.recvMsg(tb, true)
	sdCloseFDs(d.fds)
	if d.pid != pid || d.text != text || len(d.fds) != 0 {
		tb.Fatalf("got %q from pid %d with %d fds, want %q from pid %d", d.text, d.pid, len(d.fds), text, pid)
	}
}

// sdMonotonicUsec reads CLOCK_MONOTONIC in microseconds, the clock of
// MONOTONIC_USEC.
func sdMonotonicUsec(tb testing.TB) int64 {
	tb.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		tb.Fatal(err)
	}
	return ts.Nano() / 1e3
}

// sdGoBarrier runs n.barrier(ctx) in a goroutine and returns its outcome.
func sdGoBarrier(ctx context.Context, n *notifier) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- n.barrier(ctx) }()
	return errc
}

// TestSdNotifyMatchesSystemdNotify compares our datagrams with those of the
// real systemd-notify(1), byte for byte, on a path and an abstract socket.
func TestSdNotifyMatchesSystemdNotify(t *testing.T) {
	bin := sdSystemdNotifyPath(t)
	status64 := strings.Repeat("0123456789abcdef", 4)
	usec, err := monotonicUsec()
	if err != nil {
		t.Fatal(err)
	}
	monotonic := "MONOTONIC_USEC=" + strconv.FormatInt(usec, 10)
	cases := []struct {
		name   string
		args   []string // systemd-notify's
		fields []string // ours; nil: args, in systemd-notify's raw form
	}{
		{"ready", []string{"--ready"}, []string{"READY=1"}},
		{"status", []string{"--status=Serving 3 listeners: 0/3 draining"}, []string{"STATUS=Serving 3 listeners: 0/3 draining"}},
		{"status-64", []string{"--status=" + status64}, []string{"STATUS=" + status64}},
		{"status-utf8", []string{"--status=Grüße ✓"}, []string{"STATUS=Grüße ✓"}},
		{"status-empty", []string{"--status="}, []string{"STATUS="}},
		{"pid", []string{"--pid=4242"}, []string{"MAINPID=4242"}},
		{"ready-status", []string{"--ready", "--status=x"}, []string{"READY=1", "STATUS=x"}},
		{"ready-status-pid", []string{"--ready", "--status=hello world", "--pid=123"}, []string{"READY=1", "STATUS=hello world", "MAINPID=123"}},
		{"raw-mainpid-ready", []string{"MAINPID=77", "READY=1"}, nil},
		{"raw-stopping", []string{"STOPPING=1"}, nil},
		{"raw-errno", []string{"ERRNO=2"}, nil},
		{"raw-extend", []string{"EXTEND_TIMEOUT_USEC=5000000"}, nil},
		{"raw-watchdog", []string{"WATCHDOG=1"}, nil},
		{"raw-watchdog-trigger", []string{"WATCHDOG=trigger"}, nil},
		{"raw-fdstore", []string{"FDSTORE=1", "FDNAME=listener-0"}, nil},
		{"raw-fdstore-pollof", []string{"FDSTORE=1", "FDNAME=x", "FDPOLL=0"}, nil},
		{"raw-fdstoreremove", []string{"FDSTOREREMOVE=1", "FDNAME=old"}, nil},
		{"raw-stopping-status", []string{"STOPPING=1", "STATUS=draining"}, nil},
		// systemd 252's systemd-notify has no --reloading.
		{"raw-reloading", []string{"RELOADING=1", monotonic, "STATUS=reloading"}, nil},
	}
	for _, k := range sdAddrKinds() {
		l := sdListen(t, k.abstract)
		n := sdNewNotifier(t, l.addr)
		for _, c := range cases {
			t.Run(k.name+"/"+c.name, func(t *testing.T) {
				want := sdSystemdNotify(t, bin, l, c.args...)
				if c.fields == nil {
					c.fields = c.args
				}
				sdSend(t, n, c.fields...)
				if got := l.recvNoFDs(t); got != want {
					t.Errorf("ours %q, systemd-notify %s: %q", got, c.args, want)
				}
			})
		}
	}
}

// TestSdNotifyBarrierMatchesSystemdNotify: without --no-block, systemd-notify
// follows its message with BARRIER=1 and a pipe's write end, and waits for it
// to be closed. Ours must look the same.
func TestSdNotifyBarrierMatchesSystemdNotify(t *testing.T) {
	bin := sdSystemdNotifyPath(t)
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, "--ready")
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			if msg := l.recvNoFDs(t); msg != "READY=1" {
				t.Errorf("systemd-notify sent %q first", msg)
			}
			want, wantFDs := l.recv(t)
			wantDesc := sdDescribeFDs(t, wantFDs)
			sdCloseFDs(wantFDs)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%s: %v\n%s", cmd, err, out.String())
			}

			n := sdNewNotifier(t, l.addr)
			errc := sdGoBarrier(ctx, n)
			got, gotFDs := l.recv(t)
			gotDesc := sdDescribeFDs(t, gotFDs)
			sdCloseFDs(gotFDs)
			if err := <-errc; err != nil {
				t.Fatalf("barrier: %v", err)
			}
			if got != want || gotDesc != wantDesc {
				t.Errorf("ours %q with %s, systemd-notify %q with %s", got, gotDesc, want, wantDesc)
			}
			t.Logf("BARRIER datagram: %q with %s", got, gotDesc)
		})
	}
}

// sdDescribeFDs says how many fds there are and what kind.
func sdDescribeFDs(tb testing.TB, fds []int) string {
	tb.Helper()
	var parts []string
	for _, fd := range fds {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			tb.Fatal(err)
		}
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil {
			tb.Fatal(err)
		}
		kind := "other"
		if st.Mode&unix.S_IFMT == unix.S_IFIFO {
			kind = "pipe"
		}
		switch fl & unix.O_ACCMODE {
		case unix.O_RDONLY:
			kind += " read end"
		case unix.O_WRONLY:
			kind += " write end"
		}
		parts = append(parts, kind)
	}
	return fmt.Sprintf("%d fds %q", len(fds), parts)
}

// TestSdNotifyFormat: what send accepts goes out verbatim, in order, joined
// by '\n' with no trailing newline: values at their limits, empty values,
// variables the package does not know.
func TestSdNotifyFormat(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	for _, fields := range [][]string{
		{"EXTEND_TIMEOUT_USEC=0"},
		{"EXTEND_TIMEOUT_USEC=18446744073709551615"},
		{"WATCHDOG_USEC=30000000"},
		{"ERRNO=0"},
		{"ERRNO=4095"},
		{"MAINPID=1"},
		{"MAINPID=2147483647"},
		{"FDSTORE=1", "FDNAME="},
		{"FDSTOREREMOVE=1", "FDNAME= ~"},
		{"STATUS=tab\there"},
		{"STATUS="},
		{"WATCHDOG=trigger"},
		{"WATCHDOG=1", "STATUS=alive", "EXTEND_TIMEOUT_USEC=1000000"},
		{"NOTIFYACCESS=main"},
		{"X_CUSTOM=anything = goes: ✓"},
	} {
		sdSend(t, n, fields...)
		if got, want := l.recvNoFDs(t), strings.Join(fields, "\n"); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

// TestSdNotifyReloading: monotonicUsec is CLOCK_MONOTONIC when it is called,
// and send takes the RELOADING=1 that carries it.
func TestSdNotifyReloading(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	lo := sdMonotonicUsec(t)
	usec, err := monotonicUsec()
	if err != nil {
		t.Fatal(err)
	}
	if hi := sdMonotonicUsec(t); usec < lo || usec > hi {
		t.Errorf("monotonicUsec() = %d, want within [%d, %d]", usec, lo, hi)
	}
	want := "RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10)
	sdSend(t, n, strings.Split(want, "\n")...)
	if got := l.recvNoFDs(t); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestSdNotifyFDStore: fds go as SCM_RIGHTS, arrive working and in order, and
// the sender keeps its own.
func TestSdNotifyFDStore(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := listFDs(t)

	var p1, p2 [2]int
	for _, p := range []*[2]int{&p1, &p2} {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.send(context.Background(), []int{p1[0], p2[0]}, "FDSTORE=1", "FDNAME=pair", "FDPOLL=0"); err != nil {
		t.Fatal(err)
	}
	got, fds := l.recv(t)
	if want := "FDSTORE=1\nFDNAME=pair\nFDPOLL=0"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if len(fds) != 2 {
		t.Fatalf("got %d fds, want 2", len(fds))
	}
	// Write into our ends (still open: send closes nothing), read from the
	// received ones.
	for i, w := range []int{p1[1], p2[1]} {
		msg := []byte("fd" + strconv.Itoa(i))
		if _, err := unix.Write(w, msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16)
		k, err := unix.Read(fds[i], buf)
		if err != nil || string(buf[:k]) != string(msg) {
			t.Errorf("received fd %d: read %q, %v; want %q", i, buf[:k], err, msg)
		}
	}
	sdCloseFDs(fds)
	sdCloseFDs(append(p1[:], p2[:]...))
	checkFDs(t, before, false)
}

// TestSdNotifyFDLimit: the kernel passes at most SCM_MAX_FD fds in one
// message; send takes exactly that many and refuses one more.
func TestSdNotifyFDLimit(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer sdCloseFDs(p[:])
	many := slices.Repeat([]int{p[0]}, sdMaxFDs+1)
	fields := []string{"FDSTORE=1", "FDNAME=many"}
	if err := n.send(context.Background(), many, fields...); err == nil {
		t.Errorf("send with %d fds: no error", len(many))
	}
	l.expectNone(t)
	if err := n.send(context.Background(), many[:sdMaxFDs], fields...); err != nil {
		t.Fatalf("send with %d fds: %v", sdMaxFDs, err)
	}
	_, fds := l.recv(t)
	sdCloseFDs(fds)
	if len(fds) != sdMaxFDs {
		t.Errorf("received %d fds, want %d", len(fds), sdMaxFDs)
	}
}

// TestSdNotifyValidation: a bad field is an error and nothing is sent, not
// even the valid fields before it.
func TestSdNotifyValidation(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	maxStatus := strings.Repeat("s", sdMaxDatagram-len("STATUS="))
	cases := []struct {
		name   string
		fds    []int
		fields []string
	}{
		{"no-fields", nil, nil},
		{"empty-field", nil, []string{""}},
		{"no-equals", nil, []string{"READY"}},
		{"empty-variable", nil, []string{"=1"}},
		{"lower-case", nil, []string{"ready=1"}},
		{"digit", nil, []string{"X1=a"}},
		{"space-before", nil, []string{" READY=1"}},
		{"space-in-variable", nil, []string{"READY =1"}},
		{"status-newline", nil, []string{"STATUS=ok\nMAINPID=1"}},
		{"status-cr", nil, []string{"STATUS=ok\rMAINPID=1"}},
		{"status-nul", nil, []string{"STATUS=ok\x00"}},
		{"status-not-utf8", nil, []string{"STATUS=ok\xff"}},
		{"unknown-newline", nil, []string{"X_CUSTOM=a\nMAINPID=1"}},
		{"ready-then-bad-status", nil, []string{"READY=1", "STATUS=a\nb"}},
		{"fdname-colon", nil, []string{"FDSTORE=1", "FDNAME=a:b"}},
		{"fdname-del", nil, []string{"FDSTORE=1", "FDNAME=a\x7f"}},
		{"fdname-control", nil, []string{"FDSTORE=1", "FDNAME=a\tb"}},
		{"fdname-newline", nil, []string{"FDSTOREREMOVE=1", "FDNAME=a\nMAINPID=1"}},
		{"fdname-non-ascii", nil, []string{"FDSTORE=1", "FDNAME=é"}},
		{"fdname-256", nil, []string{"FDSTORE=1", "FDNAME=" + strings.Repeat("n", 256)}},
		{"mainpid-0", nil, []string{"MAINPID=0"}},
		{"mainpid-negative", nil, []string{"MAINPID=-5"}},
		{"mainpid-plus", nil, []string{"MAINPID=+5"}},
		{"mainpid-too-big", nil, []string{"MAINPID=2147483648"}},
		{"mainpid-empty", nil, []string{"MAINPID="}},
		{"errno-too-big", nil, []string{"ERRNO=4096"}},
		{"errno-negative", nil, []string{"ERRNO=-1"}},
		{"extend-negative", nil, []string{"EXTEND_TIMEOUT_USEC=-1"}},
		{"extend-fraction", nil, []string{"EXTEND_TIMEOUT_USEC=1.5"}},
		{"extend-too-big", nil, []string{"EXTEND_TIMEOUT_USEC=18446744073709551616"}},
		{"watchdog-usec-unit", nil, []string{"WATCHDOG_USEC=5s"}},
		{"monotonic-empty", nil, []string{"RELOADING=1", "MONOTONIC_USEC="}},
		{"ready-0", nil, []string{"READY=0"}},
		{"ready-true", nil, []string{"READY=true"}},
		{"stopping-2", nil, []string{"STOPPING=2"}},
		{"fdstore-0", nil, []string{"FDSTORE=0"}},
		{"barrier-empty", nil, []string{"BARRIER="}},
		{"watchdog-2", nil, []string{"WATCHDOG=2"}},
		{"fdpoll-1", nil, []string{"FDPOLL=1"}},
		{"repeated-status", nil, []string{"STATUS=a", "STATUS=b"}},
		{"repeated-ready", nil, []string{"READY=1", "READY=1"}},
		{"repeated-unknown", nil, []string{"X=1", "READY=1", "X=1"}},
		{"watchdog-and-trigger", nil, []string{"WATCHDOG=1", "WATCHDOG=trigger"}},
		{"two-fdnames", nil, []string{"FDSTORE=1", "FDNAME=a", "FDSTOREREMOVE=1", "FDNAME=b"}},
		{"too-long", nil, []string{"STATUS=" + maxStatus + "s"}},
		{"too-long-with-ready", nil, []string{"READY=1", "STATUS=" + maxStatus[len("READY=1\n"):] + "s"}},
		{"too-long-fdname-last", nil, []string{"STATUS=" + maxStatus[:len(maxStatus)-20], "FDSTORE=1", "FDNAME=name"}},
		{"fd-negative", []int{-1}, []string{"FDSTORE=1", "FDNAME=x"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := n.send(context.Background(), c.fds, c.fields...)
			if err == nil {
				t.Errorf("no error")
			} else {
				t.Logf("error: %.120s", err)
			}
			l.expectNone(t)
		})
	}
	// The limits themselves are fine.
	t.Run("largest", func(t *testing.T) {
		for _, fields := range [][]string{
			{"STATUS=" + maxStatus},
			{"READY=1", "STATUS=" + maxStatus[len("READY=1\n"):]},
			{"FDSTORE=1", "FDNAME=" + strings.Repeat("n", 255)},
		} {
			sdSend(t, n, fields...)
			if got := l.recvNoFDs(t); len(got) > sdMaxDatagram {
				t.Errorf("sent %d bytes", len(got))
			}
		}
		if size := len("STATUS=" + maxStatus); size != 4096 {
			t.Errorf("largest STATUS datagram is %d bytes, want 4096", size)
		}
	})
}

// TestSdNotifyUserField: a program may not send what the package sends
// itself; everything else is left to send's checks.
func TestSdNotifyUserField(t *testing.T) {
	for _, f := range []string{"MAINPID=1", "MONOTONIC_USEC=1", "FDSTORE=1", "BARRIER=1", "MAINPID="} {
		if err := checkUserField(f); err == nil {
			t.Errorf("checkUserField(%q): no error", f)
		} else {
			t.Logf("%q: %v", f, err)
		}
	}
	for _, f := range []string{"READY=1", "RELOADING=1", "STATUS=MAINPID=1", "FDSTOREREMOVE=1", "FDNAME=x", "MAINPIDX=1", "junk"} {
		if err := checkUserField(f); err != nil {
			t.Errorf("checkUserField(%q): %v", f, err)
		}
	}
}

func TestSdNotifyFDNameValid(t *testing.T) {
	cases := []struct {
		s    string
		want bool
	}{
		{"", true},
		{"stored", true},
		{" !~", true},
		{strings.Repeat("x", 255), true},
		{strings.Repeat("x", 256), false},
		{"a:b", false},
		{":", false},
		{"\x7f", false},
		{"\x1f", false},
		{"\x00", false},
		{"\n", false},
		{"\xc3\xa9", false},
		{"\x80", false},
	}
	for _, c := range cases {
		if got := fdnameValid(c.s); got != c.want {
			t.Errorf("fdnameValid(%q) = %v, want %v", c.s, got, c.want)
		}
	}
}

func TestSdNotifyAddresses(t *testing.T) {
	bad := []struct {
		addr         string
		notSupported bool
	}{
		{"vsock:2:1234", true},
		{"vsock-dgram:2:1234", true},
		{"vsock-stream:1:2", true},
		{"relative/notify", false},
		{"notify", false},
		{"./notify", false},
		{"@", false},
		{"/", false},
		{"/tmp/a\x00b", false},
		{"\x00abstract", false},
		{"/" + strings.Repeat("p", 107), false}, // 108 bytes: no room for the NUL
		{"@" + strings.Repeat("a", 108), false}, // 109 bytes
	}
	for _, c := range bad {
		n, err := newNotifier(c.addr)
		if err == nil {
			t.Errorf("newNotifier(%.40q): no error", c.addr)
		}
		if n != nil {
			n.conn.Close()
			t.Errorf("newNotifier(%.40q): a notifier", c.addr)
		}
		if got := errors.Is(err, ErrNotSupported); got != c.notSupported {
			t.Errorf("newNotifier(%.40q) = %v; errors.Is(ErrNotSupported) = %v, want %v", c.addr, err, got, c.notSupported)
		}
	}

	// Nothing listening: connect fails, and says why.
	if _, err := newNotifier("/nonexistent-shellflip-dir/notify"); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("missing socket: %v, want ENOENT", err)
	}

	// The longest names that fit in sun_path work.
	dir := shortTempDir(t, "sd")
	longPath := dir + "/" + strings.Repeat("p", 107-len(dir)-1)
	longAbstract := "@" + strings.Repeat("a", 107)
	for _, addr := range []string{longPath, longAbstract} {
		l := sdListenAt(t, addr)
		sdSend(t, sdNewNotifier(t, addr), "READY=1")
		if got := l.recvNoFDs(t); got != "READY=1" {
			t.Errorf("%d-byte address: got %q", len(addr), got)
		}
	}
}

// TestSdNotifyDisabled: without NOTIFY_SOCKET there is no notifier, and a nil
// notifier does nothing and returns nil, even for fields send would refuse.
func TestSdNotifyDisabled(t *testing.T) {
	before := listFDs(t)
	n, err := newNotifier("")
	if n != nil || err != nil {
		t.Fatalf(`newNotifier("") = %v, %v; want nil, nil`, n, err)
	}
	ctx := context.Background()
	for _, err := range []error{
		n.send(ctx, nil, "READY=1"),
		n.send(ctx, nil, "STATUS=bad\n"),
		n.send(ctx, nil),
		n.send(ctx, []int{0}, "FDSTORE=1", "FDNAME=x"),
		n.barrier(ctx),
	} {
		if err != nil {
			t.Error(err)
		}
	}
	checkFDs(t, before, false)
}

// TestSdNotifyClose: on a closed socket (the package never closes its
// notifier; this is the error path) send and barrier return an error
// wrapping net.ErrClosed, send nothing, and leave no fd open.
func TestSdNotifyClose(t *testing.T) {
	l := sdListen(t, false)
	before := listFDs(t)
	n, err := newNotifier(l.addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.conn.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.send(context.Background(), nil, "READY=1"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("send after Close: %v, want net.ErrClosed", err)
	}
	if err := n.barrier(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("barrier after Close: %v, want net.ErrClosed", err)
	}
	l.expectNone(t)
	checkFDs(t, before, false)
}

// TestSdNotifyBarrier: barrier returns once the manager has closed the fd,
// not before, and follows everything sent before it.
func TestSdNotifyBarrier(t *testing.T) {
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			n := sdNewNotifier(t, l.addr)
			before := listFDs(t)
			sdSend(t, n, "STATUS=before the barrier")
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			errc := sdGoBarrier(ctx, n)
			if got := l.recvNoFDs(t); got != "STATUS=before the barrier" {
				t.Errorf("first datagram %q", got)
			}
			fd := l.recvBarrier(t, 0)
			select {
			case err := <-errc:
				t.Fatalf("barrier returned %v while the manager still held the fd", err)
			default:
			}
			unix.Close(fd)
			if err := <-errc; err != nil {
				t.Fatalf("barrier: %v", err)
			}
			checkFDs(t, before, false)
		})
	}
}

// TestSdNotifyBarrierDeadline: a manager that never closes the fd. barrier
// returns when ctx expires, and leaves no fd open: the manager's copy of the
// write end is all that remains until it closes it.
func TestSdNotifyBarrierDeadline(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := listFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	if err := n.barrier(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("barrier: %v, want context.DeadlineExceeded", err)
	}
	got, fds, ok := l.recvNow(t)
	if !ok || got != "BARRIER=1" || len(fds) != 1 {
		t.Fatalf("got %q with %d fds (queued: %v), want BARRIER=1 with 1", got, len(fds), ok)
	}
	sdCloseFDs(fds)
	checkFDs(t, before, false)
}

// TestSdNotifyBarrierCancel: cancelling ctx ends the wait.
func TestSdNotifyBarrierCancel(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	before := listFDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := sdGoBarrier(ctx, n)
	fd := l.recvBarrier(t, 0)
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("barrier: %v, want context.Canceled", err)
		}
	case <-time.After(testDeadline):
		t.Fatal("barrier did not return after cancel")
	}
	unix.Close(fd)
	checkFDs(t, before, false)

	// A context that is already done: nothing is sent, nothing stays open.
	if err := n.barrier(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("barrier with a done ctx: %v", err)
	}
	l.expectNone(t)
	checkFDs(t, before, false)
}

// TestSdNotifyQueueFull: while the manager's queue is full, send waits; with
// a deadline, until then, after which the socket has no deadline left;
// without, until the manager reads.
func TestSdNotifyQueueFull(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	var err error
	for i := 0; err == nil; i++ {
		if i == 100000 {
			t.Fatal("the queue never filled")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		err = n.send(ctx, nil, "WATCHDOG=1")
		cancel()
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("send to a full queue: %v, want os.ErrDeadlineExceeded", err)
	}
	errc := make(chan error, 1)
	go func() { errc <- n.send(context.Background(), nil, "STATUS=waited") }()
	l.recvNoFDs(t) // room for one
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("send once there was room: %v", err)
		}
	case <-time.After(testDeadline):
		t.Fatal("send did not return once there was room")
	}
}

func TestSdNotifyConcurrent(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	const senders, each = 4, 100
	errc := make(chan error, senders)
	for g := range senders {
		go func() {
			for i := range each {
				if err := n.send(context.Background(), nil, fmt.Sprintf("STATUS=g%d-%d", g, i), "WATCHDOG=1"); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	seen := make(map[string]bool)
	for range senders * each {
		got, _ := l.recv(t)
		if seen[got] {
			t.Errorf("duplicate %q", got)
		}
		seen[got] = true
	}
	for range senders {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	for g := range senders {
		for i := range each {
			if want := fmt.Sprintf("STATUS=g%d-%d\nWATCHDOG=1", g, i); !seen[want] {
				t.Errorf("missing %q", want)
			}
		}
	}
}

func TestSdNotifyWatchdogInterval(t *testing.T) {
	const unset = "<unset>"
	pid := strconv.Itoa(os.Getpid())
	other := strconv.Itoa(os.Getpid() + 1)
	cases := []struct {
		usec, pid string
		interval  time.Duration
		enabled   bool
		err       bool
	}{
		{unset, unset, 0, false, false},
		{unset, pid, 0, false, false},
		{"30000000", unset, 15 * time.Second, true, false},
		{"30000000", pid, 15 * time.Second, true, false},
		{"1", pid, 500 * time.Nanosecond, true, false},
		{"30000000", other, 0, false, false},
		{"30000000", "1", 0, false, false},
		{"", unset, 0, false, true},
		{"abc", unset, 0, false, true},
		{"0", unset, 0, false, true},
		{"-1", unset, 0, false, true},
		{" 5", unset, 0, false, true},
		{"5s", unset, 0, false, true},
		{"18446744073709551615", unset, 0, false, true}, // USEC_INFINITY
		{"9223372036854776", unset, 0, false, true},     // beyond time.Duration
		{"30000000", "", 0, false, true},
		{"30000000", "abc", 0, false, true},
		{"30000000", "0", 0, false, true},
		{"30000000", "-1", 0, false, true},
		{"30000000", "4294967297", 0, false, true},
	}
	for _, c := range cases {
		sdSetenv(t, "WATCHDOG_USEC", c.usec, unset)
		sdSetenv(t, "WATCHDOG_PID", c.pid, unset)
		interval, enabled, err := WatchdogInterval()
		if interval != c.interval || enabled != c.enabled || (err != nil) != c.err {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: got %v, %v, %v; want %v, %v, error %v",
				c.usec, c.pid, interval, enabled, err, c.interval, c.enabled, c.err)
		}
	}
}

// sdSetenv sets key to v, or unsets it if v == unset, until the test ends.
func sdSetenv(t *testing.T, key, v, unset string) {
	t.Setenv(key, "") // restores the old value at cleanup
	if v == unset {
		os.Unsetenv(key)
	} else {
		os.Setenv(key, v)
	}
}

// TestSdNotifySendAllocs: once set up, sending a few fields allocates
// nothing, with or without a deadline, and neither does reading the clock
// for MONOTONIC_USEC.
func TestSdNotifySendAllocs(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	status := "STATUS=" + strings.Repeat("x", 64)
	bg := context.Background()
	ctx, cancel := context.WithTimeout(bg, time.Hour)
	defer cancel()
	var sendErr error
	cases := []struct {
		name string
		send func()
	}{
		{"READY", func() { sendErr = n.send(bg, nil, "READY=1") }},
		{"STATUS", func() { sendErr = n.send(bg, nil, status) }},
		{"MAINPID+READY", func() { sendErr = n.send(bg, nil, "MAINPID=12345", "READY=1") }},
		{"RELOADING", func() { sendErr = n.send(bg, nil, "RELOADING=1", "MONOTONIC_USEC=123456789") }},
		{"WATCHDOG with a deadline", func() { sendErr = n.send(ctx, nil, "WATCHDOG=1") }},
	}
	const runs = 100
	reached, stop := l.drain(t, len(cases)*(runs+1)) // AllocsPerRun makes one warm-up call
	defer stop()
	for _, c := range cases {
		if allocs := testing.AllocsPerRun(runs, c.send); allocs != 0 {
			t.Errorf("send(%s): %v allocations, want 0", c.name, allocs)
		}
		if sendErr != nil {
			t.Fatalf("send(%s): %v", c.name, sendErr)
		}
	}
	select {
	case <-reached:
	case <-time.After(testDeadline):
		t.Fatal("not every datagram arrived")
	}
	if allocs := testing.AllocsPerRun(runs, func() { _, sendErr = monotonicUsec() }); allocs != 0 {
		t.Errorf("monotonicUsec: %v allocations, want 0", allocs)
	}
}

// TestSdNotifySystemdNotifierEnv runs role "sd-helper" (testSdHelper), so
// that processNotifier's sync.OnceValues reads NOTIFY_SOCKET fresh: set to
// a listener's address, unset, and invalid.
func TestSdNotifySystemdNotifierEnv(t *testing.T) {
	helper := func(t *testing.T, addr, want string) {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
		cmd.Env = sdEnv(addr, envTestRole+"=sd-helper", envSdHelper+"="+want)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("helper: %v\n%s", err, out)
		}
	}
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			helper(t, l.addr, "send")
			if got := l.recvNoFDs(t); got != "READY=1\nSTATUS=NOTIFY_SOCKET kept" {
				t.Errorf("helper sent %q", got)
			}
		})
	}
	t.Run("unset", func(t *testing.T) { helper(t, "", "none") })
	t.Run("invalid", func(t *testing.T) { helper(t, "relative/notify", "error") })
}

// envSdHelper says what role "sd-helper" must get from processNotifier:
// "send" a notifier, "none" nil and no error, "error" nil and an error.
const envSdHelper = "SHELLFLIP_TEST_SD_HELPER"

// testSdHelper is role "sd-helper": it checks what processNotifier returns
// against $SHELLFLIP_TEST_SD_HELPER and, with a notifier, sends READY=1 and
// whether NOTIFY_SOCKET was kept. It exits 1 with the reason on stderr if
// anything is not as it should be.
func testSdHelper() int {
	want := os.Getenv(envSdHelper)
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
		return 1
	}
	n, err := processNotifier()
	if n2, err2 := processNotifier(); n2 != n || err2 != err {
		return fail("processNotifier returned something else the second time")
	}
	if (n != nil) != (want == "send") || (err != nil) != (want == "error") {
		return fail("want %s: processNotifier() = %v, %v", want, n, err)
	}
	status := "NOTIFY_SOCKET kept"
	if os.Getenv("NOTIFY_SOCKET") == "" {
		status = "NOTIFY_SOCKET unset"
	}
	if err := n.send(context.Background(), nil, "READY=1", "STATUS="+status); err != nil {
		return fail("send: %v", err)
	}
	return 0
}

// FuzzSdNotifyFields: whatever the strings, either send refuses them and
// sends nothing, or the manager, splitting on '\n' and '\r' as systemd does,
// sees exactly the fields asked for, each assigning a variable once: no
// injection.
func FuzzSdNotifyFields(f *testing.F) {
	for _, s := range []string{"", "ok", "a\nMAINPID=1", "a\rb", "x\x00", "\xff", "a:b", "~", "=", "READY=1", "MAINPID=1\nREADY=1", strings.Repeat("z", 300)} {
		f.Add(s, "X_CUSTOM="+s)
	}
	l := sdListen(f, false)
	n := sdNewNotifier(f, l.addr)
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		for _, fields := range [][]string{
			{a, b},
			{"READY=1", "STATUS=" + a},
			{"FDSTORE=1", "FDNAME=" + a, "FDPOLL=0"},
			{"MAINPID=" + a, "ERRNO=" + b},
		} {
			if err := n.send(context.Background(), nil, fields...); err != nil {
				l.expectNone(t)
				continue
			}
			got := l.recvNoFDs(t)
			if want := strings.Join(fields, "\n"); got != want || strings.IndexByte(got, 0) >= 0 {
				t.Fatalf("sent %q, want %q", got, want)
			}
			if parts := split(got); !slices.Equal(parts, fields) {
				t.Fatalf("%q splits into %q, want %q", got, parts, fields)
			}
			seen := make(map[string]bool)
			for _, p := range fields {
				key, _, _ := strings.Cut(p, "=")
				if seen[key] {
					t.Fatalf("%q assigns %s twice", got, key)
				}
				seen[key] = true
			}
		}
	})
}

func ExampleNotify() {
	// Start sends READY=1 once the program serves; the rest is the
	// program's to say.
	if err := Notify("STATUS=serving on :8080"); err != nil {
		log.Printf("sd_notify: %v", err) // nil without NOTIFY_SOCKET
	}

	// Later, on SIGTERM:
	_ = Notify("STOPPING=1", "STATUS=draining connections")
}

func ExampleWatchdogInterval() {
	interval, enabled, err := WatchdogInterval()
	if err != nil {
		log.Fatal(err)
	}
	if !enabled {
		return
	}
	go func() {
		for range time.Tick(interval) {
			_ = Notify("WATCHDOG=1")
		}
	}()
}
