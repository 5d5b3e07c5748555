//go:build linux || darwin || freebsd

// sd_notify(3) without libsystemd; this file knows nothing of restarts.
//
// One AF_UNIX datagram per message to the socket $NOTIFY_SOCKET names:
// VARIABLE=value fields separated by '\n', fds attached as SCM_RIGHTS. The
// manager reads at most 4096 bytes, drops a datagram holding a NUL, splits
// the rest on '\n' and '\r', and mostly reads only a variable's first
// assignment (src/core/manager.c, src/core/service.c). So a field is a
// string, and send refuses whatever the manager would drop or misread, above
// all a value that would split off a second assignment (MAINPID=).

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
	sdErrnoMax    = 4095 // ERRNO_MAX: the manager ignores a larger ERRNO
)

// notifier sends datagrams to the service manager; safe for concurrent use,
// never closed. A nil *notifier is disabled: its methods return nil. The
// socket is net's: close-on-exec from birth, non-blocking so that a full
// queue is waited for in the poller. Datagrams go by sendmsg(2) in
// RawConn.Write: net's WriteMsgUnix refuses connected datagram sockets, and
// an unconnected one would cost a sockaddr per send.
type notifier struct {
	conn *net.UnixConn
	raw  syscall.RawConn // conn's, made once: SyscallConn allocates

	mu     sync.Mutex            // one datagram at a time; guards the fields below
	buf    []byte                // the datagram; capacity sdMaxDatagram
	oob    []byte                // its SCM_RIGHTS, or nil
	err    error                 // what sendmsg returned
	sendFn func(fd uintptr) bool // n.sendmsg, bound once: a method value per send would allocate
}

// processNotifier returns the notifier for $NOTIFY_SOCKET (nil, nil without
// it), the same notifier and error at every call. NOTIFY_SOCKET stays set,
// for the processes a restart starts.
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

// checkNotifyAddr applies the rules of sd_notify(3) and of sun_path, so that
// a bad NOTIFY_SOCKET is reported as such, not as an errno from connect: an
// absolute path or, on Linux, an @abstract name; vsock (systemd 254) is
// ErrNotSupported. sun_path holds a path and its terminating NUL, or an
// abstract name ('@' stands for its leading NUL) and no terminator.
func checkNotifyAddr(addr string) error {
	limit := len(unix.RawSockaddrUnix{}.Path)
	switch {
	case strings.HasPrefix(addr, "vsock:"), strings.HasPrefix(addr, "vsock-"):
		return fmt.Errorf("vsock notify sockets: %w", ErrNotSupported)
	case strings.IndexByte(addr, 0) >= 0:
		return errors.New("contains a NUL byte")
	case strings.HasPrefix(addr, "/"):
		limit--
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

// send sends fields joined by '\n', no trailing newline (as systemd-notify
// does), in one datagram, with duplicates of fds as SCM_RIGHTS (the caller
// keeps its own). A field is VARIABLE=value, VARIABLE in [A-Z_]+, with no
// '\n', '\r' or NUL, a variable appears once, and the values of those
// sd_notify(3) defines are checked; otherwise, or with no field, more than
// 253 fds or 4096 bytes, send returns an error and sends nothing.
//
// Like sd_notify(3), send waits while the manager's queue is full, but only
// until ctx's deadline, if it has one: a restart must not hang on a manager
// that stops reading. A send of a few fields without fds allocates nothing.
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
		// The manager would read the first assignment and ignore the
		// other: a caller's mistake that would pass silently.
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
		// Errors only on a closed socket, which Write reports.
		n.conn.SetWriteDeadline(d)
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

// sendmsg is n.raw.Write's callback, run with n.mu held. Only EAGAIN, a full
// queue, which is "not yet", makes it wait for the poller. MSG_NOSIGNAL, as
// in libsystemd: a closed peer is an error, not a SIGPIPE.
func (n *notifier) sendmsg(fd uintptr) bool {
	for {
		sent, err := unix.SendmsgN(int(fd), n.buf, n.oob, nil, unix.MSG_NOSIGNAL)
		switch {
		case err == unix.EINTR:
			continue
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
}

// checkField returns the variable f assigns, or why the manager would not
// read f as one assignment of a valid value.
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
		valid = err == nil && e <= sdErrnoMax
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

// checkUserField refuses what only the package may send, lest a program
// contradict it: a restart sends MAINPID= and the MONOTONIC_USEC= of its
// RELOADING=1, StoreFDs FDSTORE=1, barrier BARRIER=1.
func checkUserField(f string) error {
	switch key, _, _ := strings.Cut(f, "="); key {
	case "MAINPID", "MONOTONIC_USEC", "FDSTORE", "BARRIER":
		return fmt.Errorf("shellflip: sd_notify: %s= is for the package alone to send", key)
	}
	return nil
}

// barrier waits until the manager has processed every datagram sent before,
// as sd_notify_barrier(3): it sends BARRIER=1 alone (or the manager ignores
// it) with a fresh pipe's write end, closes its copy, and waits for EOF on
// the read end: the manager closed its copy. When ctx ends, barrier returns
// an error wrapping ctx.Err(). Both pipe ends are closed on every path.
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
	// No thread waits: r is in the poller (or no deadline could end the
	// read: refuse), and a past deadline set once ctx is done wakes it.
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

// monotonicUsec returns CLOCK_MONOTONIC in µs for the MONOTONIC_USEC= of
// RELOADING=1 (systemd 253), by which the manager tells this reload from an
// older one: read it just before sending.
func monotonicUsec() (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, os.NewSyscallError("clock_gettime", err)
	}
	return ts.Nano() / 1e3, nil
}

// fdnameValid is systemd's fdname_is_valid (src/basic/fd-util.c): at most
// 255 bytes 0x20..0x7e except ':', $LISTEN_FDNAMES's separator; "" is valid.
func fdnameValid(s string) bool {
	if len(s) > fdnameMax {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c > '~' || c == ':' {
			return false
		}
	}
	return true
}

// WatchdogInterval reads WATCHDOG_USEC and WATCHDOG_PID as
// sd_watchdog_enabled(3) does and returns how often to send WATCHDOG=1: half
// the timeout, as that page advises. enabled is false, with a nil error, if
// WATCHDOG_USEC is unset or WATCHDOG_PID names another process (the
// variables were meant for a parent). A WATCHDOG_USEC that is not a positive
// number of microseconds, or a WATCHDOG_PID that is not a pid, is an error.
// The variables are not unset.
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
