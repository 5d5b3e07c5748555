//go:build linux || darwin || freebsd

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

const (
	sdMaxDatagram = 4096 // NOTIFY_BUFFER_MAX: the manager drops a longer message
	sdMaxFDs      = 253  // SCM_MAX_FD: sendmsg fails with EINVAL beyond it
	fdnameMax     = 255  // FDNAME_MAX in systemd's src/basic/fd-util.h
)

// notifier sends datagrams to the service manager, one at a time; it is
// never closed, and a nil *notifier sends nothing. It calls sendmsg(2) in
// RawConn.Write, so that the poller waits out a full queue: net's
// WriteMsgUnix refuses a connected datagram socket, and an unconnected one
// costs a sockaddr per send.
type notifier struct {
	conn *net.UnixConn
	raw  syscall.RawConn // conn's, made once: SyscallConn allocates

	mu     sync.Mutex            // guards the fields below
	buf    []byte                // the datagram; capacity sdMaxDatagram
	oob    []byte                // its SCM_RIGHTS, or nil
	err    error                 // what sendmsg returned
	sendFn func(fd uintptr) bool // n.sendmsg, bound once: a method value per send would allocate
}

// processNotifier returns the notifier for $NOTIFY_SOCKET, made once (nil, nil
// without it). NOTIFY_SOCKET stays set for the processes a restart starts.
var processNotifier = sync.OnceValues(func() (*notifier, error) {
	return newNotifier(os.Getenv("NOTIFY_SOCKET"))
})

// newNotifier connects to addr, a value of NOTIFY_SOCKET ("" gives nil, nil).
// Datagrams go to the socket addr names now, even if the path is replaced
// later: systemd keeps its socket across daemon-reexec.
func newNotifier(addr string) (*notifier, error) {
	if addr == "" {
		return nil, nil
	}
	if err := checkNotifyAddr(addr); err != nil {
		return nil, fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: %w", addr, err)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: %w", addr, err)
	}
	raw, _ := conn.SyscallConn() // fails only on a nil conn
	n := &notifier{conn: conn, raw: raw, buf: make([]byte, 0, sdMaxDatagram)}
	n.sendFn = n.sendmsg
	return n, nil
}

// checkNotifyAddr refuses, rather than leave to connect's errno, what is not
// an absolute path or, on Linux, an @abstract name ('@' for a leading NUL);
// vsock (systemd 254) is ErrNotSupported.
func checkNotifyAddr(addr string) error {
	limit := len(unix.RawSockaddrUnix{}.Path)
	switch {
	case strings.HasPrefix(addr, "vsock:"), strings.HasPrefix(addr, "vsock-"):
		return fmt.Errorf("vsock notify sockets: %w", ErrNotSupported)
	case strings.IndexByte(addr, 0) >= 0:
		return errors.New("contains a NUL byte")
	case strings.HasPrefix(addr, "/"):
		limit-- // for the NUL that ends a path; an abstract name has none
	case !strings.HasPrefix(addr, "@"):
		return errors.New("not an absolute path or an @abstract name")
	case runtime.GOOS != "linux" && runtime.GOOS != "android":
		return fmt.Errorf("abstract sockets exist only on Linux: %w", ErrNotSupported)
	}
	if len(addr) < 2 || len(addr) > limit {
		return fmt.Errorf("%d bytes; a socket name takes 2 to %d", len(addr), limit)
	}
	return nil
}

// send sends fields in one datagram, joined by '\n' as systemd-notify does,
// with duplicates of fds (the caller keeps its own). It sends nothing and
// returns an error for a field checkField refuses, a variable assigned twice
// (src/core/service.c reads the first), no field, more than sdMaxFDs fds or
// sdMaxDatagram bytes. Like sd_notify(3) it waits while the manager's queue
// is full, until ctx's deadline only: a stuck manager must not hang a restart.
func (n *notifier) send(ctx context.Context, fds []int, fields ...string) error {
	if n == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("shellflip: sd_notify: %w", err)
	}
	if len(fields) == 0 || len(fds) > sdMaxFDs {
		return fmt.Errorf("shellflip: sd_notify: %d fields and %d fds; send 1 or more fields and at most %d fds", len(fields), len(fds), sdMaxFDs)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	b := n.buf[:0]
	for i, f := range fields {
		key, err := checkField(f)
		if err != nil {
			return fmt.Errorf("shellflip: sd_notify: field %d: %w", i, err)
		}
		for _, g := range fields[:i] {
			if k, _, _ := strings.Cut(g, "="); k == key {
				return fmt.Errorf("shellflip: sd_notify: %s is assigned twice", key)
			}
		}
		if i > 0 {
			b = append(b, '\n')
		}
		if len(b)+len(f) > sdMaxDatagram {
			return fmt.Errorf("shellflip: sd_notify: more than %d bytes, all the manager reads", sdMaxDatagram)
		}
		b = append(b, f...)
	}
	n.buf, n.oob, n.err = b, nil, nil
	if len(fds) > 0 {
		n.oob = unix.UnixRights(fds...)
	}
	if d, ok := ctx.Deadline(); ok {
		n.conn.SetWriteDeadline(d) // fails only on a closed socket; so does Write
		defer n.conn.SetWriteDeadline(time.Time{})
	}
	err := n.raw.Write(n.sendFn) // on a closed socket: an error wrapping net.ErrClosed
	if err == nil {
		err = n.err
	}
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify: %w", err)
	}
	return nil
}

// sendmsg is n.raw.Write's callback, run with n.mu held; only EAGAIN, a full
// queue, makes Write wait for the poller. MSG_NOSIGNAL as in libsystemd: a
// closed peer is an error, not a SIGPIPE.
func (n *notifier) sendmsg(fd uintptr) bool {
	sent, err := ignoringEINTR(func() (int, error) {
		return unix.SendmsgN(int(fd), n.buf, n.oob, nil, unix.MSG_NOSIGNAL)
	})
	switch {
	case err == unix.EAGAIN:
		return false
	case err != nil:
		n.err = os.NewSyscallError("sendmsg", err)
	case sent != len(n.buf):
		// A datagram goes whole or not at all; this would be a kernel bug.
		n.err = fmt.Errorf("short sendmsg: %d of %d bytes", sent, len(n.buf))
	}
	return true
}

// checkField returns the variable f assigns, or why the manager would not
// read f as one assignment, VARIABLE in [A-Z_]+, of a valid value. The
// manager (src/core/manager.c) drops a datagram holding a NUL and splits the
// rest on '\n' and '\r': a value holding one could add a field (MAINPID=).
func checkField(f string) (string, error) {
	if i := strings.IndexAny(f, "\n\r\x00"); i >= 0 {
		return "", fmt.Errorf("byte %d is %q, which would split the field or void the datagram", i, f[i])
	}
	key, val, ok := strings.Cut(f, "=")
	if !ok || key == "" || strings.TrimLeft(key, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_") != "" {
		return "", fmt.Errorf("%.40q is not VARIABLE=value with VARIABLE in [A-Z_]+", f)
	}
	valid := true
	switch key {
	case "READY", "STOPPING", "RELOADING", "FDSTORE", "FDSTOREREMOVE", "BARRIER":
		valid = val == "1"
	case "WATCHDOG":
		valid = val == "1" || val == "trigger"
	case "FDPOLL":
		valid = val == "0"
	case "MAINPID":
		pid, err := strconv.ParseUint(val, 10, 31) // a positive pid_t
		valid = err == nil && pid > 0
	case "ERRNO":
		e, err := strconv.ParseUint(val, 10, 64)
		valid = err == nil && e <= 4095 // ERRNO_MAX; the manager ignores more
	case "EXTEND_TIMEOUT_USEC", "WATCHDOG_USEC", "MONOTONIC_USEC":
		_, err := strconv.ParseUint(val, 10, 64)
		valid = err == nil
	case "STATUS":
		valid = utf8.ValidString(val) // the manager ignores a status that is not
	case "FDNAME":
		valid = fdnameValid(val)
	}
	if !valid {
		return "", fmt.Errorf("%s=%.40q: not a valid value (see sd_notify(3))", key, val)
	}
	return key, nil
}

// checkUserField refuses the fields only the package sends, lest a program
// contradict it: a restart's MAINPID= and MONOTONIC_USEC=, StoreFDs's
// FDSTORE=1, barrier's BARRIER=1.
func checkUserField(f string) error {
	switch key, _, _ := strings.Cut(f, "="); key {
	case "MAINPID", "MONOTONIC_USEC", "FDSTORE", "BARRIER":
		return fmt.Errorf("shellflip: sd_notify: %s= is for the package alone to send", key)
	}
	return nil
}

// barrier waits, as sd_notify_barrier(3), until the manager has processed
// every datagram sent before: it sends BARRIER=1 alone (else the manager
// ignores it) with a pipe's write end, and reads the other end until EOF, or
// until ctx ends (an error wrapping ctx.Err()).
func (n *notifier) barrier(ctx context.Context) error {
	if n == nil {
		return nil
	}
	r, w, err := os.Pipe() // close-on-exec from birth, both ends in the poller
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	defer r.Close()
	// Fd makes w blocking, like libsystemd's pipe: harmless, w is ours.
	err = n.send(ctx, []int{int(w.Fd())}, "BARRIER=1")
	w.Close() // on every path: while our copy is open, r never reports EOF
	if err != nil {
		return err
	}
	// Only in the poller can a deadline end the read (set once ctx is done).
	if err := r.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { r.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	_, err = io.Copy(io.Discard, r) // nil at EOF; the manager writes nothing
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = ctx.Err() // set before AfterFunc ran
	}
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	return nil
}

// monotonicUsec returns CLOCK_MONOTONIC in µs, read just before sending, for
// RELOADING=1's MONOTONIC_USEC= (systemd 253): it tells reloads apart.
func monotonicUsec() (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, os.NewSyscallError("clock_gettime", err)
	}
	return ts.Nano() / 1e3, nil
}

// fdnameValid is systemd's fdname_is_valid (src/basic/fd-util.c): at most
// 255 bytes 0x20..0x7e except ':', $LISTEN_FDNAMES's separator; "" is valid.
// Any non-ASCII byte, valid UTF-8 or not, decodes to a rune above '~'.
func fdnameValid(s string) bool {
	invalid := func(r rune) bool { return r < ' ' || r > '~' || r == ':' }
	return len(s) <= fdnameMax && !strings.ContainsFunc(s, invalid)
}

// WatchdogInterval reads WATCHDOG_USEC and WATCHDOG_PID as
// sd_watchdog_enabled(3) does and returns how often to send WATCHDOG=1: half
// the timeout, as that page advises. enabled is false, with a nil error, if
// WATCHDOG_USEC is unset or WATCHDOG_PID names another process. It is an
// error if WATCHDOG_USEC is not a positive number of microseconds or
// WATCHDOG_PID not a pid. The variables are not unset.
func WatchdogInterval() (interval time.Duration, enabled bool, err error) {
	s, ok := os.LookupEnv("WATCHDOG_USEC")
	if !ok {
		return 0, false, nil
	}
	usec, err := strconv.ParseUint(s, 10, 64)
	// systemd refuses 0 and USEC_INFINITY (timestamp_is_set); anything
	// beyond time.Duration's range is no watchdog a process can serve.
	if err != nil || usec == 0 || usec > math.MaxInt64/uint64(time.Microsecond) {
		return 0, false, fmt.Errorf("shellflip: WATCHDOG_USEC=%q: not a positive number of microseconds in range", s)
	}
	if p, ok := os.LookupEnv("WATCHDOG_PID"); ok {
		pid, err := strconv.ParseInt(p, 10, 32)
		if err != nil || pid <= 0 {
			return 0, false, fmt.Errorf("shellflip: WATCHDOG_PID=%q: not a pid", p)
		}
		if int(pid) != os.Getpid() {
			return 0, false, nil
		}
	}
	return time.Duration(usec) * time.Microsecond / 2, true, nil
}
