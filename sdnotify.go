//go:build linux || darwin || freebsd

// sd_notify(3) without libsystemd.
//
// The protocol: one AF_UNIX datagram per message, sent to the socket named by
// $NOTIFY_SOCKET, holding newline-separated VARIABLE=VALUE assignments, with
// file descriptors attached as SCM_RIGHTS where the message needs them. The
// service manager reads at most NOTIFY_BUFFER_MAX (PIPE_BUF, 4096) bytes,
// splits the text on '\n' and '\r', and for most variables looks only at the
// first assignment (src/core/manager.c, src/core/service.c). Everything the
// manager would silently drop or misread is refused here with an error before
// anything is sent.
//
// Only Linux runs systemd; darwin and freebsd build this file so that the
// package behaves the same there (a path NOTIFY_SOCKET would even work).
//
// The socket comes from package net: it is created SOCK_CLOEXEC where the
// platform has it (under syscall.ForkLock where it does not), and it is
// non-blocking, so a send that finds the manager's receive queue full waits
// in the Go poller rather than in a blocked thread. The datagram itself goes
// out through sendmsg(2) inside syscall.RawConn.Write: net's WriteMsgUnix
// refuses connected datagram sockets, and an unconnected one would need a
// sockaddr allocated per send.

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
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

const (
	// sdMaxDatagram is the longest notification the manager accepts: it
	// receives into NOTIFY_BUFFER_MAX (PIPE_BUF) bytes and drops a longer,
	// truncated message with a warning (manager_dispatch_notify_fd in
	// src/core/manager.c).
	sdMaxDatagram = 4096

	// sdBufSlack is room past sdMaxDatagram in the send buffer. The only
	// unbounded value, STATUS, is measured before it is appended; every other
	// field is under 300 bytes, so appending one field to a buffer that is
	// within sdMaxDatagram never reallocates, and the length is checked after
	// each field.
	sdBufSlack = 512

	// sdMaxFDs is SCM_MAX_FD (include/net/scm.h), the most descriptors Linux
	// passes in one message; sendmsg fails with EINVAL beyond it.
	sdMaxFDs = 253

	// fdnameMax is FDNAME_MAX in systemd (src/basic/fd-util.h).
	fdnameMax = 255

	// sdErrnoMax is ERRNO_MAX in systemd: parse_errno rejects larger values
	// and the manager would ignore the field.
	sdErrnoMax = 4095
)

// SdNotifier sends datagrams to the service manager. Safe for concurrent use.
//
// A notifier made from an empty address, and a nil *SdNotifier, are disabled:
// every method is a no-op that returns nil.
type SdNotifier struct {
	conn   *net.UnixConn   // nil if disabled
	raw    syscall.RawConn // conn's; made once, as SyscallConn allocates
	closed atomic.Bool
	// gated is set on the process-wide notifier of a process started by a
	// restart: until systemd knows it as the main process (IsMain), what it
	// sent would be dropped under NotifyAccess=main, so it sends nothing.
	gated bool
	// retired is set on the process-wide notifier of an old process once
	// it has named its successor the main process: what it sent from then
	// on would come from a pid that is no longer main.
	retired atomic.Bool

	mu      sync.Mutex            // serialises sends; guards the fields below
	buf     []byte                // the datagram; capacity sdMaxDatagram+sdBufSlack
	oob     []byte                // its control data (SCM_RIGHTS), or nil
	sendErr error                 // the outcome of sendmsg
	sendFn  func(fd uintptr) bool // n.sendmsg, bound once: a closure per send would allocate
}

// NewSdNotifier connects to addr, the value of NOTIFY_SOCKET.
// addr == "" returns a notifier whose methods are no-ops.
//
// addr must be an absolute path ("/run/systemd/notify") or, on Linux, an
// abstract socket name written with a leading '@' ("@name"), and must fit in
// sun_path. A vsock address ("vsock:CID:PORT", systemd 254 and later) returns
// an error wrapping ErrNotSupported. Anything else, or a socket that cannot be
// reached, is an error; no socket is left open on error.
//
// The socket is created once, close-on-exec, and connected: every datagram
// goes to the socket addr named at this call, even if the path is later
// replaced. systemd keeps its notify socket across daemon-reexec, so that is
// the socket it reads.
func NewSdNotifier(addr string) (*SdNotifier, error) {
	if addr == "" {
		return &SdNotifier{}, nil
	}
	if err := sdCheckAddr(addr); err != nil {
		return nil, err
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: %w", addr, err)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: %w", addr, err)
	}
	n := &SdNotifier{
		conn: conn,
		raw:  raw,
		buf:  make([]byte, 0, sdMaxDatagram+sdBufSlack),
	}
	n.sendFn = n.sendmsg
	return n, nil
}

// sdCheckAddr applies the rules of sd_notify(3) (sd_pid_notify_with_fds in
// src/libsystemd/sd-daemon/sd-daemon.c) and of sun_path, so that a bad
// NOTIFY_SOCKET is reported as such and not as a confusing errno from
// connect(2).
func sdCheckAddr(addr string) error {
	if strings.HasPrefix(addr, "vsock:") || strings.HasPrefix(addr, "vsock-") {
		return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: vsock notify sockets: %w", addr, ErrNotSupported)
	}
	if strings.IndexByte(addr, 0) >= 0 {
		return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: contains a NUL byte", addr)
	}
	// sun_path holds a path and its terminating NUL, or an abstract name
	// (the '@' stands for the leading NUL) with no terminator.
	limit := len(unix.RawSockaddrUnix{}.Path)
	switch addr[0] {
	case '/':
		limit--
	case '@':
		if runtime.GOOS != "linux" && runtime.GOOS != "android" {
			return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: abstract sockets exist only on Linux: %w", addr, ErrNotSupported)
		}
	default:
		return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: not an absolute path or an @abstract name", addr)
	}
	if len(addr) < 2 {
		return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: empty socket name", addr)
	}
	if len(addr) > limit {
		return fmt.Errorf("shellflip: NOTIFY_SOCKET=%q: %d bytes, longer than sun_path allows (%d)", addr, len(addr), limit)
	}
	return nil
}

var sdProcess struct {
	once sync.Once
	n    *SdNotifier
	err  error
}

// SystemdNotifier returns the process-wide notifier for $NOTIFY_SOCKET,
// created on first use. The error, if any, is kept and returned each time,
// with a nil notifier (whose methods are no-ops). It does not unset
// NOTIFY_SOCKET, so processes started later inherit it.
//
// The notifier is shared: do not Close it. In a process started by a
// restart, its Send, SendFDs and Barrier return ErrNotMain until the old
// process has made this one the main process (see IsMain and MainChan).
func SystemdNotifier() (*SdNotifier, error) {
	sdProcess.once.Do(func() {
		sdProcess.n, sdProcess.err = NewSdNotifier(os.Getenv("NOTIFY_SOCKET"))
		if sdProcess.n != nil {
			sdProcess.n.gated = startedByRestart()
		}
	})
	return sdProcess.n, sdProcess.err
}

// notMain reports ErrNotMain while a gated notifier must keep quiet.
func (n *SdNotifier) notMain() error {
	return mayNotify()
}

// Enabled reports whether n sends anything: whether it was made from a
// non-empty address. Close does not change it.
func (n *SdNotifier) Enabled() bool {
	return n != nil && n.conn != nil
}

// Send sends one datagram with all fields, in order, joined by '\n' with no
// trailing newline (what systemd-notify(1) sends). If any field is invalid,
// the fields name a variable twice, or the datagram would exceed 4096 bytes,
// Send returns an error and sends nothing. Send with no fields is an error.
//
// Like sd_notify(3), Send waits while the manager's receive queue is full.
// After Close it returns an error wrapping net.ErrClosed.
func (n *SdNotifier) Send(fields ...SdField) error {
	return n.SendFDs(nil, fields...)
}

// SendFDs is Send with fds attached as SCM_RIGHTS, for FDSTORE=1. The caller
// keeps its fds: the manager receives duplicates, and SendFDs closes nothing.
// At most 253 fds (SCM_MAX_FD) fit in one datagram.
func (n *SdNotifier) SendFDs(fds []int, fields ...SdField) error {
	if !n.Enabled() {
		return nil
	}
	if err := n.notMain(); err != nil {
		return err
	}
	if len(fds) > sdMaxFDs {
		return fmt.Errorf("shellflip: sd_notify: %d fds, more than one message carries (%d)", len(fds), sdMaxFDs)
	}
	for _, fd := range fds {
		if fd < 0 {
			return fmt.Errorf("shellflip: sd_notify: invalid fd %d", fd)
		}
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.build(fields); err != nil {
		return err
	}
	return n.write(oob, time.Time{})
}

// Barrier waits until the manager has processed every datagram sent before
// it, as sd_notify_barrier(3) does: it sends BARRIER=1 with the write end of
// a fresh pipe, closes its own copy, and waits for the read end to report
// end-of-file, which happens when the manager closes the copy it received,
// after handling the earlier messages.
//
// ctx bounds the wait; when it ends, Barrier returns an error wrapping
// ctx.Err(). Sending BARRIER=1 itself, like every Send, waits if the
// manager's receive queue is full. Both pipe ends are closed on every path.
//
// The wait uses the Go poller on the read end (os.Pipe makes it
// non-blocking): EOF is the hang-up libsystemd polls for, ctx expiry becomes
// a read deadline, and no thread is held while waiting.
func (n *SdNotifier) Barrier(ctx context.Context) error {
	if !n.Enabled() {
		return nil
	}
	if err := n.notMain(); err != nil {
		return err
	}
	return n.barrier(ctx)
}

func (n *SdNotifier) barrier(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	r, w, err := os.Pipe() // close-on-exec from birth (pipe2 O_CLOEXEC on Linux)
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	defer r.Close()
	err = n.sendBarrier(w, ctx)
	// Our copy of the write end must go whether or not the send worked:
	// while it is open the read end never reports EOF.
	if cerr := w.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("shellflip: sd_notify barrier: %w", cerr)
	}
	if err != nil {
		return err
	}
	return sdWaitHangup(ctx, r)
}

// sendBarrier sends BARRIER=1 with w attached. The manager requires BARRIER=1
// alone in its datagram with exactly one fd, and otherwise ignores the
// message (manager_process_barrier_fd in src/core/manager.c).
func (n *SdNotifier) sendBarrier(w *os.File, ctx context.Context) error {
	rc, err := w.SyscallConn()
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	var serr error
	// Control keeps the fd open and valid for the duration of the call,
	// without (*os.File).Fd's switch to blocking mode.
	err = rc.Control(func(fd uintptr) {
		oob := unix.UnixRights(int(fd))
		n.mu.Lock()
		defer n.mu.Unlock()
		n.buf = append(n.buf[:0], "BARRIER=1"...)
		d, _ := ctx.Deadline()
		serr = n.write(oob, d)
	})
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	return serr
}

// sdLongAgo is a deadline in the past: setting it wakes a blocked Read.
var sdLongAgo = time.Unix(1, 0)

// sdWaitHangup reads r until EOF (every write end closed) or ctx ends.
func sdWaitHangup(ctx context.Context, r *os.File) error {
	// The poller is what makes the wait interruptible; refuse to block in a
	// read that no deadline can end.
	if err := r.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
	}
	if d, ok := ctx.Deadline(); ok {
		if err := r.SetReadDeadline(d); err != nil {
			return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
		}
	}
	// Cancellation without a deadline: wake the read. If this runs after we
	// return, r is closed and the error is of no interest.
	stop := context.AfterFunc(ctx, func() { r.SetReadDeadline(sdLongAgo) })
	defer stop()
	var b [1]byte
	for {
		_, err := r.Read(b[:])
		switch {
		case err == io.EOF:
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The poller's timer can fire a moment before the context's.
			cerr := ctx.Err()
			if cerr == nil {
				cerr = context.DeadlineExceeded
			}
			return fmt.Errorf("shellflip: sd_notify barrier: %w", cerr)
		case err != nil:
			return fmt.Errorf("shellflip: sd_notify barrier: %w", err)
		}
		// Data: the manager never writes to the pipe, but bytes are not a
		// hang-up either. Keep reading.
	}
}

// Close closes the socket. It is idempotent and safe to call concurrently
// with Send, which then fails with an error wrapping net.ErrClosed. It does
// not wait for a Barrier already sending or waiting.
func (n *SdNotifier) Close() error {
	if !n.Enabled() || !n.closed.CompareAndSwap(false, true) {
		return nil
	}
	if err := n.conn.Close(); err != nil {
		return fmt.Errorf("shellflip: sd_notify: %w", err)
	}
	return nil
}

// write sends n.buf, with oob as ancillary data, waiting for room in the
// manager's queue until deadline (the zero time: for ever). n.mu is held.
func (n *SdNotifier) write(oob []byte, deadline time.Time) error {
	if n.closed.Load() {
		return fmt.Errorf("shellflip: sd_notify: %w", net.ErrClosed)
	}
	if !deadline.IsZero() {
		n.conn.SetWriteDeadline(deadline)
		defer n.conn.SetWriteDeadline(time.Time{})
	}
	n.oob, n.sendErr = oob, nil
	err := n.raw.Write(n.sendFn) // after Close: an error wrapping net.ErrClosed
	n.oob = nil
	if err == nil {
		err = n.sendErr
	}
	if err != nil {
		return fmt.Errorf("shellflip: sd_notify: %w", err)
	}
	return nil
}

// sendmsg is the callback of n.raw.Write, run with n.mu held and the fd
// valid. It returns false, to wait until the socket is writable, only on
// EAGAIN: the manager's receive queue is full, which is "not yet". EINTR is
// retried. MSG_NOSIGNAL, as libsystemd uses it: no SIGPIPE, only an error.
func (n *SdNotifier) sendmsg(fd uintptr) bool {
	for {
		sent, err := unix.SendmsgN(int(fd), n.buf, n.oob, nil, unix.MSG_NOSIGNAL)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false
		case err != nil:
			n.sendErr = os.NewSyscallError("sendmsg", err)
		case sent != len(n.buf):
			// A datagram goes whole or not at all; this would be a kernel bug.
			n.sendErr = fmt.Errorf("short sendmsg: %d of %d bytes", sent, len(n.buf))
		}
		return true
	}
}

// build encodes fields into n.buf. n.mu is held. On error n.buf holds junk
// and nothing must be sent.
func (n *SdNotifier) build(fields []SdField) error {
	if len(fields) == 0 {
		return errors.New("shellflip: sd_notify: no fields to send")
	}
	b := n.buf[:0]
	var seen sdVar
	for i, f := range fields {
		if f.err != nil {
			return f.err
		}
		vars := f.kind.vars()
		if vars == 0 {
			return fmt.Errorf("shellflip: sd_notify: field %d is a zero SdField; use the Sd* constructors", i)
		}
		// The manager reads the first assignment of most variables and
		// ignores the rest (strv_find_startswith in service_notify_message):
		// a repeated variable is a caller's mistake that would pass silently.
		if seen&vars != 0 {
			return fmt.Errorf("shellflip: sd_notify: field %d (%s) repeats a variable set by an earlier field", i, f.kind)
		}
		seen |= vars
		if i > 0 {
			b = append(b, '\n')
		}
		switch f.kind {
		case sdReady:
			b = append(b, "READY=1"...)
		case sdReloading:
			// The manager compares MONOTONIC_USEC with its own clock to tell
			// this reload from an older one (sd_notify(3)), so it is read
			// now, not when the field was made.
			var ts unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
				return os.NewSyscallError("clock_gettime", err)
			}
			b = append(b, "RELOADING=1\nMONOTONIC_USEC="...)
			b = strconv.AppendInt(b, ts.Nano()/1e3, 10)
		case sdStopping:
			b = append(b, "STOPPING=1"...)
		case sdStatus:
			if len(b)+len("STATUS=")+len(f.str) > sdMaxDatagram {
				return sdTooLong(len(b) + len("STATUS=") + len(f.str))
			}
			b = append(b, "STATUS="...)
			b = append(b, f.str...)
		case sdMainPID:
			b = append(b, "MAINPID="...)
			b = strconv.AppendInt(b, f.num, 10)
		case sdErrno:
			b = append(b, "ERRNO="...)
			b = strconv.AppendInt(b, f.num, 10)
		case sdExtendTimeout:
			b = append(b, "EXTEND_TIMEOUT_USEC="...)
			b = strconv.AppendInt(b, f.num, 10)
		case sdWatchdog:
			b = append(b, "WATCHDOG=1"...)
		case sdWatchdogTrigger:
			b = append(b, "WATCHDOG=trigger"...)
		case sdFDStore:
			b = append(b, "FDSTORE=1\nFDNAME="...)
			b = append(b, f.str...)
		case sdFDStoreRemove:
			b = append(b, "FDSTOREREMOVE=1\nFDNAME="...)
			b = append(b, f.str...)
		case sdFDPollOff:
			b = append(b, "FDPOLL=0"...)
		}
		if len(b) > sdMaxDatagram {
			return sdTooLong(len(b))
		}
	}
	n.buf = b
	return nil
}

func sdTooLong(size int) error {
	return fmt.Errorf("shellflip: sd_notify: datagram of at least %d bytes, the manager reads at most %d", size, sdMaxDatagram)
}

// SdField is one assignment (or a fixed pair) in a notification. Build it
// with the Sd* constructors; the zero SdField is invalid. A constructor given
// a bad value returns a field that carries the error, and Send returns that
// error without sending anything.
type SdField struct {
	kind sdKind
	str  string // STATUS or FDNAME value
	num  int64  // MAINPID, ERRNO, EXTEND_TIMEOUT_USEC value
	err  error  // why the value is invalid
}

type sdKind uint8

const (
	sdInvalid sdKind = iota
	sdReady
	sdReloading
	sdStopping
	sdStatus
	sdMainPID
	sdErrno
	sdExtendTimeout
	sdWatchdog
	sdWatchdogTrigger
	sdFDStore
	sdFDStoreRemove
	sdFDPollOff
)

func (k sdKind) String() string {
	switch k {
	case sdReady:
		return "READY"
	case sdReloading:
		return "RELOADING"
	case sdStopping:
		return "STOPPING"
	case sdStatus:
		return "STATUS"
	case sdMainPID:
		return "MAINPID"
	case sdErrno:
		return "ERRNO"
	case sdExtendTimeout:
		return "EXTEND_TIMEOUT_USEC"
	case sdWatchdog, sdWatchdogTrigger:
		return "WATCHDOG"
	case sdFDStore:
		return "FDSTORE"
	case sdFDStoreRemove:
		return "FDSTOREREMOVE"
	case sdFDPollOff:
		return "FDPOLL"
	}
	return "invalid"
}

// sdVar is a set of variables a datagram assigns.
type sdVar uint16

const (
	sdVarReady sdVar = 1 << iota
	sdVarReloading
	sdVarStopping
	sdVarStatus
	sdVarMainPID
	sdVarErrno
	sdVarExtendTimeout
	sdVarWatchdog
	sdVarFDStore
	sdVarFDStoreRemove
	sdVarFDName
	sdVarFDPoll
)

// vars returns the variables a field assigns; 0 for the zero field.
func (k sdKind) vars() sdVar {
	switch k {
	case sdReady:
		return sdVarReady
	case sdReloading:
		return sdVarReloading // and MONOTONIC_USEC, which only it sets
	case sdStopping:
		return sdVarStopping
	case sdStatus:
		return sdVarStatus
	case sdMainPID:
		return sdVarMainPID
	case sdErrno:
		return sdVarErrno
	case sdExtendTimeout:
		return sdVarExtendTimeout
	case sdWatchdog, sdWatchdogTrigger:
		return sdVarWatchdog
	case sdFDStore:
		return sdVarFDStore | sdVarFDName
	case sdFDStoreRemove:
		return sdVarFDStoreRemove | sdVarFDName
	case sdFDPollOff:
		return sdVarFDPoll
	}
	return 0
}

// SdReady is READY=1: start-up is complete (or a reload is finished).
func SdReady() SdField { return SdField{kind: sdReady} }

// SdReloading is RELOADING=1 followed by MONOTONIC_USEC=, the value of
// CLOCK_MONOTONIC in microseconds read when the datagram is built, as
// Type=notify-reload services must send it (systemd 253 and later).
func SdReloading() SdField { return SdField{kind: sdReloading} }

// SdStopping is STOPPING=1: the service is shutting down.
func SdStopping() SdField { return SdField{kind: sdStopping} }

// SdStatus is STATUS=s, free-form text for systemctl status. s must be valid
// UTF-8 (the manager ignores a status that is not) and must not contain '\n',
// '\r' or NUL, which would end the field and let the rest of s assign other
// variables. An empty s clears the status.
func SdStatus(s string) SdField {
	if i := strings.IndexAny(s, "\n\r\x00"); i >= 0 {
		return sdBad(fmt.Errorf("shellflip: sd_notify STATUS: byte %d is %q, which would end the field", i, s[i]))
	}
	if !utf8.ValidString(s) {
		return sdBad(errors.New("shellflip: sd_notify STATUS: not valid UTF-8"))
	}
	return SdField{kind: sdStatus, str: s}
}

// SdMainPID is MAINPID=pid: pid is now the service's main process. pid must
// be positive and fit in pid_t.
func SdMainPID(pid int) SdField {
	if pid <= 0 || pid > math.MaxInt32 {
		return sdBad(fmt.Errorf("shellflip: sd_notify MAINPID: %d is not a pid", pid))
	}
	return SdField{kind: sdMainPID, num: int64(pid)}
}

// SdErrno is ERRNO=errno, the reason for a failure, shown by systemctl
// status. 0 clears it; values above 4095 (ERRNO_MAX) are refused.
func SdErrno(errno syscall.Errno) SdField {
	if errno > sdErrnoMax {
		return sdBad(fmt.Errorf("shellflip: sd_notify ERRNO: %d is above %d", uint64(errno), sdErrnoMax))
	}
	return SdField{kind: sdErrno, num: int64(errno)}
}

// SdExtendTimeout is EXTEND_TIMEOUT_USEC=: ask for d more before the current
// start, reload or stop times out. d is rounded up to a whole microsecond;
// a negative d is refused.
func SdExtendTimeout(d time.Duration) SdField {
	if d < 0 {
		return sdBad(fmt.Errorf("shellflip: sd_notify EXTEND_TIMEOUT_USEC: negative duration %v", d))
	}
	usec := int64(d / time.Microsecond)
	if d%time.Microsecond != 0 {
		usec++
	}
	return SdField{kind: sdExtendTimeout, num: usec}
}

// SdWatchdog is WATCHDOG=1, the keep-alive ping; see SdWatchdogInterval.
func SdWatchdog() SdField { return SdField{kind: sdWatchdog} }

// SdWatchdogTrigger is WATCHDOG=trigger: the service asks to be treated as
// if its watchdog had expired.
func SdWatchdogTrigger() SdField { return SdField{kind: sdWatchdogTrigger} }

// SdFDStore is FDSTORE=1 and FDNAME=name: the manager keeps the fds sent with
// SendFDs under name (FileDescriptorStoreMax= must allow it). name must
// satisfy systemd's fdname_is_valid: printable ASCII except ':', at most 255
// bytes; empty is allowed.
func SdFDStore(name string) SdField {
	if !fdnameValid(name) {
		return sdBad(sdBadFDName(name))
	}
	return SdField{kind: sdFDStore, str: name}
}

// SdFDStoreRemove is FDSTOREREMOVE=1 and FDNAME=name: the manager closes the
// stored fds of that name. name follows the rules of SdFDStore.
func SdFDStoreRemove(name string) SdField {
	if !fdnameValid(name) {
		return sdBad(sdBadFDName(name))
	}
	return SdField{kind: sdFDStoreRemove, str: name}
}

// SdFDPollOff is FDPOLL=0: the manager should not poll the stored fds for
// errors or hang-up (use it for fds that are not sockets or pipes).
func SdFDPollOff() SdField { return SdField{kind: sdFDPollOff} }

func sdBad(err error) SdField { return SdField{err: err} }

func sdBadFDName(name string) error {
	if len(name) > fdnameMax {
		return fmt.Errorf("shellflip: sd_notify FDNAME: %d bytes, more than %d", len(name), fdnameMax)
	}
	return fmt.Errorf("shellflip: sd_notify FDNAME %q: only printable ASCII other than ':' is allowed", name)
}

// fdnameValid reports whether s is a valid systemd fd name, as
// fdname_is_valid in systemd's src/basic/fd-util.c decides: bytes 0x20..0x7e
// except ':' (the separator in $LISTEN_FDNAMES), at most 255 bytes. The empty
// name is valid.
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

// SdWatchdogInterval reads WATCHDOG_USEC and WATCHDOG_PID as
// sd_watchdog_enabled(3) does and returns how often to send SdWatchdog: half
// the timeout, as that page advises.
//
// enabled is false, with a nil error, if WATCHDOG_USEC is unset or
// WATCHDOG_PID names another process (the variables were meant for a parent).
// A WATCHDOG_USEC that is not a positive number of microseconds, or a
// WATCHDOG_PID that is not a pid, is an error. The variables are not unset.
func SdWatchdogInterval() (interval time.Duration, enabled bool, err error) {
	s, ok := os.LookupEnv("WATCHDOG_USEC")
	if !ok {
		return 0, false, nil
	}
	usec, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("shellflip: WATCHDOG_USEC=%q: not a number of microseconds", s)
	}
	// systemd refuses 0 and USEC_INFINITY (timestamp_is_set); anything
	// beyond time.Duration's range is no watchdog a process can serve.
	if usec == 0 || usec > math.MaxInt64/uint64(time.Microsecond) {
		return 0, false, fmt.Errorf("shellflip: WATCHDOG_USEC=%q: out of range", s)
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
