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

// sdWait bounds every wait for an event in these tests. It is a deadline,
// never a sleep: a passing test does not wait for it.
const sdWait = 10 * time.Second

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
	// Not tb.TempDir: its long names would not fit in sun_path.
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return sdListenAt(tb, filepath.Join(dir, "notify"))
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

// recvErr waits up to sdWait for one datagram. The fds that came with it are
// the caller's to close. Safe to call from any goroutine.
func (l *sdListener) recvErr() (string, []int, error) {
	if err := l.conn.SetReadDeadline(time.Now().Add(sdWait)); err != nil {
		return "", nil, err
	}
	buf := make([]byte, 2*sdMaxDatagram)
	oob := make([]byte, unix.CmsgSpace(4*sdMaxFDs))
	n, oobn, flags, _, err := l.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return "", nil, fmt.Errorf("receiving on %q: %w", l.addr, err)
	}
	fds, err := sdParseRights(oob[:oobn])
	if err != nil {
		return "", nil, err
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		sdCloseFDs(fds)
		return "", nil, fmt.Errorf("truncated datagram (flags %#x)", flags)
	}
	return string(buf[:n]), fds, nil
}

func (l *sdListener) recv(tb testing.TB) (string, []int) {
	tb.Helper()
	msg, fds, err := l.recvErr()
	if err != nil {
		tb.Fatal(err)
	}
	return msg, fds
}

// recvNow is a non-blocking recvmsg: ok is false if nothing is queued. A
// datagram is queued on the receiver by the time the sender's sendmsg returns,
// so this proves what was, and was not, sent.
func (l *sdListener) recvNow(tb testing.TB) (msg string, fds []int, ok bool) {
	tb.Helper()
	if err := l.conn.SetReadDeadline(time.Time{}); err != nil {
		tb.Fatal(err)
	}
	rc, err := l.conn.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, 2*sdMaxDatagram)
	oob := make([]byte, unix.CmsgSpace(4*sdMaxFDs))
	var n, oobn int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return true
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	if rerr == unix.EAGAIN {
		return "", nil, false
	}
	if rerr != nil {
		tb.Fatalf("recvmsg: %v", rerr)
	}
	fds, err = sdParseRights(oob[:oobn])
	if err != nil {
		tb.Fatal(err)
	}
	return string(buf[:n]), fds, true
}

// expectNone fails the test if a datagram is queued.
func (l *sdListener) expectNone(tb testing.TB) {
	tb.Helper()
	if msg, fds, ok := l.recvNow(tb); ok {
		sdCloseFDs(fds)
		tb.Errorf("a datagram was sent: %q with %d fds", msg, len(fds))
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

func sdParseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing control messages: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			sdCloseFDs(fds)
			return nil, fmt.Errorf("parsing SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func sdCloseFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

func sdNewNotifier(tb testing.TB, addr string) *SdNotifier {
	tb.Helper()
	n, err := NewSdNotifier(addr)
	if err != nil {
		tb.Fatalf("NewSdNotifier(%q): %v", addr, err)
	}
	tb.Cleanup(func() { n.Close() })
	return n
}

// sdOpenFDs lists this process's open fds and what they are.
func sdOpenFDs(tb testing.TB) map[int]string {
	tb.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	fds := make(map[int]string, len(ents))
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // ReadDir's own fd, closed by now
		}
		fds[fd] = link
	}
	return fds
}

// sdCheckFDs fails the test for every fd open now that was not in before.
func sdCheckFDs(tb testing.TB, before map[int]string) {
	tb.Helper()
	for fd, link := range sdOpenFDs(tb) {
		if old, ok := before[fd]; !ok || old != link {
			tb.Errorf("leaked fd %d (%s)", fd, link)
		}
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
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+addr)
	return cmd
}

// sdSystemdNotify runs systemd-notify --no-block args... and returns the one
// datagram it sent to l.
func sdSystemdNotify(tb testing.TB, bin string, l *sdListener, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), sdWait)
	defer cancel()
	cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, append([]string{"--no-block"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	msg, fds := l.recv(tb)
	if len(fds) != 0 {
		sdCloseFDs(fds)
		tb.Errorf("systemd-notify --no-block %q sent %d fds", args, len(fds))
	}
	return msg
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

// TestSdNotifyMatchesSystemdNotify compares our datagrams with those of the
// real systemd-notify(1), byte for byte, on a path and an abstract socket.
func TestSdNotifyMatchesSystemdNotify(t *testing.T) {
	bin := sdSystemdNotifyPath(t)
	status64 := strings.Repeat("0123456789abcdef", 4)
	cases := []struct {
		name   string
		args   []string
		fields []SdField
	}{
		{"ready", []string{"--ready"}, []SdField{SdReady()}},
		{"status", []string{"--status=Serving 3 listeners: 0/3 draining"}, []SdField{SdStatus("Serving 3 listeners: 0/3 draining")}},
		{"status-64", []string{"--status=" + status64}, []SdField{SdStatus(status64)}},
		{"status-utf8", []string{"--status=Grüße ✓"}, []SdField{SdStatus("Grüße ✓")}},
		{"status-empty", []string{"--status="}, []SdField{SdStatus("")}},
		{"pid", []string{"--pid=4242"}, []SdField{SdMainPID(4242)}},
		{"ready-status", []string{"--ready", "--status=x"}, []SdField{SdReady(), SdStatus("x")}},
		{"ready-status-pid", []string{"--ready", "--status=hello world", "--pid=123"}, []SdField{SdReady(), SdStatus("hello world"), SdMainPID(123)}},
		{"raw-mainpid-ready", []string{"MAINPID=77", "READY=1"}, []SdField{SdMainPID(77), SdReady()}},
		{"raw-stopping", []string{"STOPPING=1"}, []SdField{SdStopping()}},
		{"raw-errno", []string{"ERRNO=2"}, []SdField{SdErrno(syscall.ENOENT)}},
		{"raw-extend", []string{"EXTEND_TIMEOUT_USEC=5000000"}, []SdField{SdExtendTimeout(5 * time.Second)}},
		{"raw-watchdog", []string{"WATCHDOG=1"}, []SdField{SdWatchdog()}},
		{"raw-watchdog-trigger", []string{"WATCHDOG=trigger"}, []SdField{SdWatchdogTrigger()}},
		{"raw-fdstore", []string{"FDSTORE=1", "FDNAME=listener-0"}, []SdField{SdFDStore("listener-0")}},
		{"raw-fdstore-pollof", []string{"FDSTORE=1", "FDNAME=x", "FDPOLL=0"}, []SdField{SdFDStore("x"), SdFDPollOff()}},
		{"raw-fdstoreremove", []string{"FDSTOREREMOVE=1", "FDNAME=old"}, []SdField{SdFDStoreRemove("old")}},
		{"raw-stopping-status", []string{"STOPPING=1", "STATUS=draining"}, []SdField{SdStopping(), SdStatus("draining")}},
	}
	for _, k := range sdAddrKinds() {
		l := sdListen(t, k.abstract)
		n := sdNewNotifier(t, l.addr)
		for _, c := range cases {
			t.Run(k.name+"/"+c.name, func(t *testing.T) {
				want := sdSystemdNotify(t, bin, l, c.args...)
				if err := n.Send(c.fields...); err != nil {
					t.Fatalf("Send: %v", err)
				}
				got, fds := l.recv(t)
				sdCloseFDs(fds)
				if got != want || len(fds) != 0 {
					t.Errorf("ours %q (%d fds), systemd-notify %s: %q", got, len(fds), c.args, want)
				}
			})
		}
		// systemd 252's systemd-notify has no --reloading: send ours, then
		// the same assignments through its raw form.
		t.Run(k.name+"/reloading", func(t *testing.T) {
			if err := n.Send(SdReloading(), SdStatus("reloading")); err != nil {
				t.Fatal(err)
			}
			got, _ := l.recv(t)
			lines := strings.Split(got, "\n")
			if len(lines) != 3 {
				t.Fatalf("got %q", got)
			}
			want := sdSystemdNotify(t, bin, l, lines...)
			if got != want {
				t.Errorf("ours %q, systemd-notify %q: %q", got, lines, want)
			}
		})
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
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			cmd := sdSystemdNotifyCmd(ctx, bin, l.addr, "--ready")
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			msg, fds := l.recv(t)
			sdCloseFDs(fds)
			if msg != "READY=1" || len(fds) != 0 {
				t.Errorf("systemd-notify sent %q with %d fds first", msg, len(fds))
			}
			want, wantFDs := l.recv(t)
			wantDesc := sdDescribeFDs(t, wantFDs)
			sdCloseFDs(wantFDs)
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%s: %v\n%s", cmd, err, out.String())
			}

			n := sdNewNotifier(t, l.addr)
			errc := make(chan error, 1)
			go func() { errc <- n.Barrier(ctx) }()
			got, gotFDs := l.recv(t)
			gotDesc := sdDescribeFDs(t, gotFDs)
			sdCloseFDs(gotFDs)
			if err := <-errc; err != nil {
				t.Fatalf("Barrier: %v", err)
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

// TestSdNotifyFormat checks the bytes of fields systemd-notify cannot be
// asked for, and rounding.
func TestSdNotifyFormat(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	cases := []struct {
		fields []SdField
		want   string
	}{
		{[]SdField{SdExtendTimeout(0)}, "EXTEND_TIMEOUT_USEC=0"},
		{[]SdField{SdExtendTimeout(1)}, "EXTEND_TIMEOUT_USEC=1"},
		{[]SdField{SdExtendTimeout(1500 * time.Nanosecond)}, "EXTEND_TIMEOUT_USEC=2"},
		{[]SdField{SdExtendTimeout(90 * time.Second)}, "EXTEND_TIMEOUT_USEC=90000000"},
		{[]SdField{SdErrno(0)}, "ERRNO=0"},
		{[]SdField{SdErrno(4095)}, "ERRNO=4095"},
		{[]SdField{SdMainPID(1)}, "MAINPID=1"},
		{[]SdField{SdMainPID(1<<31 - 1)}, "MAINPID=2147483647"},
		{[]SdField{SdFDStore("")}, "FDSTORE=1\nFDNAME="},
		{[]SdField{SdFDStore(" ~")}, "FDSTORE=1\nFDNAME= ~"},
		{[]SdField{SdStatus("tab\there")}, "STATUS=tab\there"},
		{[]SdField{SdWatchdog(), SdStatus("alive"), SdExtendTimeout(time.Second)}, "WATCHDOG=1\nSTATUS=alive\nEXTEND_TIMEOUT_USEC=1000000"},
	}
	for _, c := range cases {
		if err := n.Send(c.fields...); err != nil {
			t.Errorf("Send(%q): %v", c.want, err)
			continue
		}
		if got, fds := l.recv(t); got != c.want || len(fds) != 0 {
			sdCloseFDs(fds)
			t.Errorf("got %q with %d fds, want %q", got, len(fds), c.want)
		}
	}
}

// TestSdNotifyReloading: MONOTONIC_USEC is CLOCK_MONOTONIC at send time.
func TestSdNotifyReloading(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	f := SdReloading() // made before the clock is read: the value must be read at send time
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &before); err != nil {
		t.Fatal(err)
	}
	if err := n.Send(f); err != nil {
		t.Fatal(err)
	}
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &after); err != nil {
		t.Fatal(err)
	}
	got, _ := l.recv(t)
	v, ok := strings.CutPrefix(got, "RELOADING=1\nMONOTONIC_USEC=")
	if !ok {
		t.Fatalf("got %q", got)
	}
	usec, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		t.Fatalf("got %q: %v", got, err)
	}
	if lo, hi := before.Nano()/1e3, after.Nano()/1e3; usec < lo || usec > hi {
		t.Errorf("MONOTONIC_USEC=%d, want within [%d, %d]", usec, lo, hi)
	}
}

// TestSdNotifyFDStore: fds go as SCM_RIGHTS, arrive working and in order, and
// the sender keeps its own.
func TestSdNotifyFDStore(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)

	var p1, p2 [2]int
	for _, p := range []*[2]int{&p1, &p2} {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.SendFDs([]int{p1[0], p2[0]}, SdFDStore("pair"), SdFDPollOff()); err != nil {
		t.Fatal(err)
	}
	got, fds := l.recv(t)
	if want := "FDSTORE=1\nFDNAME=pair\nFDPOLL=0"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if len(fds) != 2 {
		t.Fatalf("got %d fds, want 2", len(fds))
	}
	// Write into our ends (still open: SendFDs closes nothing), read from
	// the received ones.
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
	sdCheckFDs(t, before)
}

// TestSdNotifyFDLimit: the kernel passes at most SCM_MAX_FD fds in one
// message; SendFDs takes exactly that many and refuses one more.
func TestSdNotifyFDLimit(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer sdCloseFDs(p[:])
	many := make([]int, sdMaxFDs+1)
	for i := range many {
		many[i] = p[0]
	}
	if err := n.SendFDs(many, SdFDStore("many")); err == nil {
		t.Errorf("SendFDs with %d fds: no error", len(many))
	}
	l.expectNone(t)
	if err := n.SendFDs(many[:sdMaxFDs], SdFDStore("many")); err != nil {
		t.Fatalf("SendFDs with %d fds: %v", sdMaxFDs, err)
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
		fields []SdField
	}{
		{"no-fields", nil, nil},
		{"zero-field", nil, []SdField{{}}},
		{"status-newline", nil, []SdField{SdStatus("ok\nMAINPID=1")}},
		{"status-cr", nil, []SdField{SdStatus("ok\rMAINPID=1")}},
		{"status-nul", nil, []SdField{SdStatus("ok\x00")}},
		{"status-not-utf8", nil, []SdField{SdStatus("ok\xff")}},
		{"ready-then-bad-status", nil, []SdField{SdReady(), SdStatus("a\nb")}},
		{"fdname-colon", nil, []SdField{SdFDStore("a:b")}},
		{"fdname-del", nil, []SdField{SdFDStore("a\x7f")}},
		{"fdname-control", nil, []SdField{SdFDStore("a\tb")}},
		{"fdname-newline", nil, []SdField{SdFDStoreRemove("a\nMAINPID=1")}},
		{"fdname-non-ascii", nil, []SdField{SdFDStore("é")}},
		{"fdname-256", nil, []SdField{SdFDStore(strings.Repeat("n", 256))}},
		{"mainpid-0", nil, []SdField{SdMainPID(0)}},
		{"mainpid-negative", nil, []SdField{SdMainPID(-5)}},
		{"mainpid-too-big", nil, []SdField{SdMainPID(1 << 31)}},
		{"errno-too-big", nil, []SdField{SdErrno(4096)}},
		{"extend-negative", nil, []SdField{SdExtendTimeout(-time.Microsecond)}},
		{"repeated-status", nil, []SdField{SdStatus("a"), SdStatus("b")}},
		{"repeated-ready", nil, []SdField{SdReady(), SdReady()}},
		{"watchdog-and-trigger", nil, []SdField{SdWatchdog(), SdWatchdogTrigger()}},
		{"two-fdnames", nil, []SdField{SdFDStore("a"), SdFDStoreRemove("b")}},
		{"too-long", nil, []SdField{SdStatus(maxStatus + "s")}},
		{"too-long-with-ready", nil, []SdField{SdReady(), SdStatus(maxStatus[len("READY=1\n"):] + "s")}},
		{"too-long-fdname-last", nil, []SdField{SdStatus(maxStatus[:len(maxStatus)-20]), SdFDStore("name")}},
		{"fd-negative", []int{-1}, []SdField{SdFDStore("x")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := n.SendFDs(c.fds, c.fields...)
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
		for _, fields := range [][]SdField{
			{SdStatus(maxStatus)},
			{SdReady(), SdStatus(maxStatus[len("READY=1\n"):])},
			{SdFDStore(strings.Repeat("n", 255))},
		} {
			if err := n.Send(fields...); err != nil {
				t.Fatal(err)
			}
			got, _ := l.recv(t)
			if len(got) > sdMaxDatagram {
				t.Errorf("sent %d bytes", len(got))
			}
		}
		if size := len("STATUS=" + maxStatus); size != 4096 {
			t.Errorf("largest STATUS datagram is %d bytes, want 4096", size)
		}
	})
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
		n, err := NewSdNotifier(c.addr)
		if err == nil {
			n.Close()
			t.Errorf("NewSdNotifier(%.40q): no error", c.addr)
			continue
		}
		if n != nil {
			t.Errorf("NewSdNotifier(%.40q): non-nil notifier with error", c.addr)
		}
		if got := errors.Is(err, ErrNotSupported); got != c.notSupported {
			t.Errorf("NewSdNotifier(%.40q) = %v; errors.Is(ErrNotSupported) = %v, want %v", c.addr, err, got, c.notSupported)
		}
	}

	// Nothing listening: connect fails, and says why.
	if _, err := NewSdNotifier("/nonexistent-shellflip-dir/notify"); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("missing socket: %v, want ENOENT", err)
	}

	// The longest names that fit in sun_path work.
	dir, err := os.MkdirTemp("", "sd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	longPath := dir + "/" + strings.Repeat("p", 107-len(dir)-1)
	longAbstract := "@" + strings.Repeat("a", 107)
	for _, addr := range []string{longPath, longAbstract} {
		l := sdListenAt(t, addr)
		n := sdNewNotifier(t, addr)
		if err := n.Send(SdReady()); err != nil {
			t.Errorf("%d-byte address: %v", len(addr), err)
			continue
		}
		if got, _ := l.recv(t); got != "READY=1" {
			t.Errorf("%d-byte address: got %q", len(addr), got)
		}
	}
}

// TestSdNotifyDisabled: without NOTIFY_SOCKET (and on a nil notifier) every
// call is a no-op returning nil, even for fields that would be refused.
func TestSdNotifyDisabled(t *testing.T) {
	before := sdOpenFDs(t)
	n, err := NewSdNotifier("")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*SdNotifier{n, nil} {
		if n.Enabled() {
			t.Error("Enabled")
		}
		for _, err := range []error{
			n.Send(SdReady()),
			n.Send(SdStatus("bad\n")),
			n.Send(),
			n.SendFDs([]int{0}, SdFDStore("x")),
			n.Barrier(context.Background()),
			n.Close(),
			n.Close(),
		} {
			if err != nil {
				t.Error(err)
			}
		}
	}
	sdCheckFDs(t, before)
}

func TestSdNotifyClose(t *testing.T) {
	l := sdListen(t, false)
	before := sdOpenFDs(t)
	n, err := NewSdNotifier(l.addr)
	if err != nil {
		t.Fatal(err)
	}
	if !n.Enabled() {
		t.Fatal("not Enabled")
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := n.Send(SdReady()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Send after Close: %v, want net.ErrClosed", err)
	}
	if err := n.Barrier(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Barrier after Close: %v, want net.ErrClosed", err)
	}
	l.expectNone(t)
	sdCheckFDs(t, before)
}

// TestSdNotifyBarrier: Barrier returns once the manager has closed the fd,
// not before, and follows everything sent before it.
func TestSdNotifyBarrier(t *testing.T) {
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			n := sdNewNotifier(t, l.addr)
			before := sdOpenFDs(t)
			if err := n.Send(SdStatus("before the barrier")); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- n.Barrier(ctx) }()
			if got, _ := l.recv(t); got != "STATUS=before the barrier" {
				t.Errorf("first datagram %q", got)
			}
			got, fds := l.recv(t)
			if got != "BARRIER=1" || len(fds) != 1 {
				t.Fatalf("got %q with %d fds, want BARRIER=1 with 1", got, len(fds))
			}
			select {
			case err := <-errc:
				t.Fatalf("Barrier returned %v while the manager still held the fd", err)
			default:
			}
			sdCloseFDs(fds)
			if err := <-errc; err != nil {
				t.Fatalf("Barrier: %v", err)
			}
			sdCheckFDs(t, before)
		})
	}
}

// TestSdNotifyBarrierDeadline: a manager that never closes the fd. Barrier
// returns when ctx expires, and leaves no fd open: the manager's copy of the
// write end is all that remains until it closes it.
func TestSdNotifyBarrierDeadline(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	err := n.Barrier(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Barrier: %v, want context.DeadlineExceeded", err)
	}
	got, fds, ok := l.recvNow(t)
	if !ok || got != "BARRIER=1" || len(fds) != 1 {
		t.Fatalf("got %q with %d fds (queued: %v), want BARRIER=1 with 1", got, len(fds), ok)
	}
	sdCloseFDs(fds)
	sdCheckFDs(t, before)
}

// TestSdNotifyBarrierCancel: cancelling ctx ends the wait.
func TestSdNotifyBarrierCancel(t *testing.T) {
	l := sdListen(t, true)
	n := sdNewNotifier(t, l.addr)
	before := sdOpenFDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- n.Barrier(ctx) }()
	got, fds := l.recv(t)
	if got != "BARRIER=1" || len(fds) != 1 {
		t.Errorf("got %q with %d fds, want BARRIER=1 with 1", got, len(fds))
	}
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Barrier: %v, want context.Canceled", err)
		}
	case <-time.After(sdWait):
		t.Fatal("Barrier did not return after cancel")
	}
	sdCloseFDs(fds)
	sdCheckFDs(t, before)

	// A context that is already done: nothing is sent, nothing is opened.
	if err := n.Barrier(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Barrier with a done ctx: %v", err)
	}
	l.expectNone(t)
	sdCheckFDs(t, before)
}

func TestSdNotifyConcurrent(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	const senders, each = 4, 100
	errc := make(chan error, senders)
	for g := range senders {
		go func() {
			for i := range each {
				if err := n.Send(SdStatus(fmt.Sprintf("g%d-%d", g, i)), SdWatchdog()); err != nil {
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
		interval, enabled, err := SdWatchdogInterval()
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

// TestSdNotifySendAllocs: once set up, sending allocates nothing.
func TestSdNotifySendAllocs(t *testing.T) {
	l := sdListen(t, false)
	n := sdNewNotifier(t, l.addr)
	status := strings.Repeat("x", 64)
	var sendErr error
	cases := []struct {
		name string
		send func()
	}{
		{"READY", func() { sendErr = n.Send(SdReady()) }},
		{"STATUS", func() { sendErr = n.Send(SdStatus(status)) }},
		{"MAINPID+READY", func() { sendErr = n.Send(SdMainPID(12345), SdReady()) }},
		{"WATCHDOG", func() { sendErr = n.Send(SdWatchdog()) }},
		{"RELOADING", func() { sendErr = n.Send(SdReloading()) }},
	}
	const runs = 100
	reached, stop := l.drain(t, len(cases)*(runs+1)) // AllocsPerRun makes one warm-up call
	defer stop()
	for _, c := range cases {
		if allocs := testing.AllocsPerRun(runs, c.send); allocs != 0 {
			t.Errorf("Send(%s): %v allocations, want 0", c.name, allocs)
		}
		if sendErr != nil {
			t.Fatalf("Send(%s): %v", c.name, sendErr)
		}
	}
	select {
	case <-reached:
	case <-time.After(sdWait):
		t.Fatal("not every datagram arrived")
	}
}

// TestSdNotifySystemdNotifierEnv runs TestSdNotifyHelperProcess in a new
// process with NOTIFY_SOCKET set, so that SystemdNotifier's sync.Once reads
// it fresh.
func TestSdNotifySystemdNotifierEnv(t *testing.T) {
	for _, k := range sdAddrKinds() {
		t.Run(k.name, func(t *testing.T) {
			l := sdListen(t, k.abstract)
			ctx, cancel := context.WithTimeout(context.Background(), sdWait)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestSdNotifyHelperProcess$", "-test.count=1")
			cmd.Env = append(os.Environ(), "SHELLFLIP_SD_HELPER=1", "NOTIFY_SOCKET="+l.addr)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("helper: %v\n%s", err, out)
			}
			if got, _ := l.recv(t); got != "READY=1\nSTATUS=NOTIFY_SOCKET kept" {
				t.Errorf("helper sent %q", got)
			}
		})
	}
}

// TestSdNotifyHelperProcess is the child of TestSdNotifySystemdNotifierEnv.
func TestSdNotifyHelperProcess(t *testing.T) {
	if os.Getenv("SHELLFLIP_SD_HELPER") != "1" {
		t.Skip("helper process for TestSdNotifySystemdNotifierEnv")
	}
	n, err := SystemdNotifier()
	if err != nil {
		t.Fatal(err)
	}
	n2, err2 := SystemdNotifier()
	if n2 != n || err2 != err {
		t.Fatal("SystemdNotifier returned a different notifier the second time")
	}
	status := "NOTIFY_SOCKET kept"
	if os.Getenv("NOTIFY_SOCKET") == "" {
		status = "NOTIFY_SOCKET unset"
	}
	if err := n.Send(SdReady(), SdStatus(status)); err != nil {
		t.Fatal(err)
	}
}

// FuzzSdNotifyFields: whatever the caller's string, either Send refuses it and
// sends nothing, or the manager, splitting on '\n' and '\r' as systemd does,
// sees exactly the assignments asked for: no injection.
func FuzzSdNotifyFields(f *testing.F) {
	for _, s := range []string{"", "ok", "a\nMAINPID=1", "a\rb", "x\x00", "\xff", "a:b", "~", strings.Repeat("z", 300)} {
		f.Add(s)
	}
	l := sdListen(f, false)
	n := sdNewNotifier(f, l.addr)
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, c := range []struct {
			field SdField
			want  []string
		}{
			{SdStatus(s), []string{"STATUS=" + s}},
			{SdFDStore(s), []string{"FDSTORE=1", "FDNAME=" + s}},
		} {
			if err := n.Send(SdReady(), c.field); err != nil {
				l.expectNone(t)
				continue
			}
			got, _ := l.recv(t)
			want := append([]string{"READY=1"}, c.want...)
			if strings.Join(want, "\n") != got {
				t.Fatalf("sent %q, want %q", got, want)
			}
			if parts := split(got); !slices.Equal(parts, want) {
				t.Fatalf("%q splits into %q, want %q", got, parts, want)
			}
		}
	})
}

func ExampleSdNotifier() {
	n, err := SystemdNotifier()
	if err != nil {
		log.Printf("sd_notify disabled: %v", err) // n is nil: its methods do nothing
	}
	// ... listen, start serving ...
	if err := n.Send(SdReady(), SdStatus("serving on :8080")); err != nil {
		log.Printf("sd_notify: %v", err)
	}

	// Later, on SIGTERM:
	_ = n.Send(SdStopping(), SdStatus("draining connections"))
}

func ExampleSdWatchdogInterval() {
	n, _ := SystemdNotifier()
	interval, enabled, err := SdWatchdogInterval()
	if err != nil {
		log.Fatal(err)
	}
	if !enabled {
		return
	}
	go func() {
		for range time.Tick(interval) {
			_ = n.Send(SdWatchdog())
		}
	}()
}
