//go:build linux || darwin || freebsd

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// This file is the new process's side of a restart: it takes over the fds
// that the old process (or systemd) named in the environment, tells the old
// process when it is ready, and hands out the state stream.

// inheritance is what this process received at start. It is filled in once,
// by the package's init, so that the fds are close-on-exec before any
// goroutine of the program could fork, and the variables are gone before
// anything could pass them on.
type inheritance struct {
	err       error // the first problem found; the fds concerned were closed
	readyFD   int   // -1 if not started by a restart
	stateFD   int   // -1 if not started by a restart or already handed out
	controlFD int   // -1 if none was passed
	controlID string
	listen    []inheritedFD
}

type inheritedFD struct {
	name string
	fd   int
}

var (
	inherited = inheritance{readyFD: -1, stateFD: -1, controlFD: -1}
	stateMu   sync.Mutex // guards inherited.stateFD
)

func init() {
	FixupListenPID()
	recordStart()
	catchEarlySignals()
	inherited = takeInheritance(os.LookupEnv, os.Unsetenv)
	adoptInherited(inherited.listen)
}

// FixupListenPID replaces LISTEN_PID=auto and WATCHDOG_PID=auto, which the
// old process sets because it cannot know its child's pid before the fork,
// with this process's pid, so that code that checks them (sd_listen_fds(3),
// sd_watchdog_enabled(3), coreos/go-systemd) sees what systemd itself would
// have set. The package calls it at initialisation; calling it again is
// harmless.
func FixupListenPID() {
	for _, k := range []string{envListenPID, envWatchdogPID} {
		if os.Getenv(k) == listenPIDAuto {
			os.Setenv(k, strconv.Itoa(os.Getpid()))
		}
	}
}

// takeInheritance validates every fd named in the environment, marks it
// close-on-exec and removes the variables that named it. lookupEnv and
// unsetenv are parameters so that tests can feed it hostile environments.
func takeInheritance(lookupEnv func(string) (string, bool), unsetenv func(string) error) inheritance {
	getenv := func(k string) string { v, _ := lookupEnv(k); return v }
	inh := inheritance{readyFD: -1, stateFD: -1, controlFD: -1}
	fail := func(err error) {
		if inh.err == nil {
			inh.err = err
		}
	}

	listen, err := takeListenFDs(lookupEnv)
	if err != nil {
		fail(err)
	}
	inh.listen = listen
	if getenv(envListenFDs) != "" || getenv(envListenFDNames) != "" {
		pid := getenv(envListenPID)
		if pid == strconv.Itoa(os.Getpid()) {
			unsetenv(envListenPID)
			unsetenv(envListenFDs)
			unsetenv(envListenFDNames)
		}
	}

	// The library's own fds come after the LISTEN_FDS block; they must not
	// collide with it, with stdio or with each other.
	low := listenFDsStart + len(listen)
	taken := map[int]bool{}
	own := func(env string, want uint32) int {
		s := getenv(env)
		if s == "" {
			return -1
		}
		unsetenv(env)
		fd, err := parseFD(s)
		if err == nil && (fd < low || taken[fd]) {
			err = fmt.Errorf("fd %d overlaps stdio, LISTEN_FDS or another fd", fd)
		}
		if err == nil {
			var wt *wrongTypeError
			if err = checkFD(fd, want); errors.As(err, &wt) {
				// Inherited, but not what the variable says: refused,
				// and closed so that it leaks no further.
				unix.Close(fd)
			}
		}
		if err != nil {
			fail(fmt.Errorf("shellflip: $%s=%q: %w", env, s, err))
			return -1
		}
		taken[fd] = true
		return fd
	}
	inh.readyFD = own(envReadyFD, unix.S_IFSOCK)
	inh.stateFD = own(envStateFD, unix.S_IFIFO)
	inh.controlFD = own(envControlFD, unix.S_IFSOCK)
	inh.controlID = getenv(envControlID) // checked against the path by listenControl
	unsetenv(envControlID)
	if (inh.readyFD < 0) != (inh.stateFD < 0) {
		// One without the other is not something the old process sets up.
		fail(fmt.Errorf("shellflip: $%s and $%s must be set together", envReadyFD, envStateFD))
	}
	if inh.err != nil {
		// Refuse the whole inheritance rather than guess: the old process
		// sees the readiness socket close and reports the failed restart
		// at once, instead of waiting for its timeout.
		closeFD(&inh.readyFD)
		closeFD(&inh.stateFD)
		closeFD(&inh.controlFD)
		for _, f := range inh.listen {
			unix.Close(f.fd)
		}
		inh.listen = nil
	}
	return inh
}

// takeListenFDs parses LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES as
// sd_listen_fds_with_names(3) does. Fds meant for another process (LISTEN_PID
// differs) are none of ours and are left alone. On error every fd of the
// block that could be validated is closed, so none leaks into a grandchild.
func takeListenFDs(lookupEnv func(string) (string, bool)) ([]inheritedFD, error) {
	pidStr, _ := lookupEnv(envListenPID)
	nStr, _ := lookupEnv(envListenFDs)
	if nStr == "" {
		return nil, nil
	}
	if pidStr != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	n, err := strconv.ParseUint(nStr, 10, 32)
	if err != nil || n > maxInheritedFDs {
		return nil, fmt.Errorf("shellflip: $%s=%q is not a count of fds", envListenFDs, nStr)
	}
	var names []string
	// An empty LISTEN_FDNAMES is a valid list: one fd with the empty name.
	if s, ok := lookupEnv(envListenFDNames); ok {
		names = splitNames(s, int(n)+1)
		if len(names) != int(n) {
			err = fmt.Errorf("shellflip: $%s names %d fds, $%s says %d", envListenFDNames, len(names), envListenFDs, n)
		}
	}
	fds := make([]inheritedFD, 0, n)
	for i := 0; i < int(n); i++ {
		fd := listenFDsStart + i
		name := "unknown" // what sd_listen_fds_with_names(3) reports for unnamed fds
		if i < len(names) {
			name = names[i]
		}
		if err == nil && !fdnameValid(name) {
			err = fmt.Errorf("shellflip: $%s: %q is not a valid fd name", envListenFDNames, name)
		}
		if cerr := checkInherited(fd); cerr != nil {
			if err == nil {
				err = fmt.Errorf("shellflip: $%s=%s: fd %d: %w", envListenFDs, nStr, fd, cerr)
			}
			continue
		}
		fds = append(fds, inheritedFD{name: name, fd: fd})
	}
	if err != nil {
		for _, f := range fds {
			unix.Close(f.fd)
		}
		return nil, err
	}
	// Every fd of the block is inherited and open: mark them all at once.
	cloexecRange(listenFDsStart, listenFDsStart+int(n)-1)
	return fds, nil
}

// splitNames splits a LISTEN_FDNAMES value at ':', giving up after max
// fields so that a hostile value cannot make it allocate without bound.
func splitNames(s string, max int) []string {
	var out []string
	for len(out) < max {
		i := 0
		for i < len(s) && s[i] != ':' {
			i++
		}
		out = append(out, s[:i])
		if i == len(s) {
			break
		}
		s = s[i+1:]
	}
	return out
}

// parseFD parses a decimal fd number as the old process wrote it.
func parseFD(s string) (int, error) {
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil || len(s) > 1 && s[0] == '0' {
		return -1, fmt.Errorf("not an fd number")
	}
	return int(n), nil
}

// wrongTypeError is an inherited fd of another type than expected.
type wrongTypeError struct{ msg string }

func (e *wrongTypeError) Error() string { return e.msg }

// checkFD verifies that fd was inherited and, if want is not 0, is of type
// want (unix.S_IFSOCK, unix.S_IFIFO), then marks it close-on-exec.
//
// An fd that is already close-on-exec cannot have survived the execve that
// started this process: it was opened since, by the runtime (which opens
// its cgroup CPU limit files, and its epoll fds, at the lowest free
// numbers) or by another package's init. It is refused, and left alone:
// taking it, let alone closing it, would pull it from under its owner.
func checkFD(fd int, want uint32) error {
	if err := checkInherited(fd); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := ignoringEINTR(func() error { return unix.Fstat(fd, &st) }); err != nil {
		return os.NewSyscallError("fstat", err)
	}
	if got := st.Mode & unix.S_IFMT; want != 0 && uint32(got) != want {
		return &wrongTypeError{fmt.Sprintf("fd %d is a %s, want a %s", fd, fileType(uint32(got)), fileType(want))}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	return nil
}

// checkInherited verifies that fd is open and was inherited: see checkFD.
// One fcntl, so that a block of a thousand listeners costs a thousand
// syscalls, not three thousand.
func checkInherited(fd int) error {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	if flags&unix.FD_CLOEXEC != 0 {
		return fmt.Errorf("fd %d was not inherited: it is close-on-exec, so this process opened it", fd)
	}
	return nil
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFIFO:
		return "pipe"
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFLNK:
		return "symlink"
	}
	return "file of unknown type"
}

func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

// ignoringEINTR retries fn while it fails with EINTR. Go's runtime installs
// its signal handlers with SA_RESTART, but some syscalls (and seccomp or
// ptrace stops) still return EINTR; see os/file_posix.go.
func ignoringEINTR(fn func() error) error {
	for {
		err := fn()
		if err != unix.EINTR {
			return err
		}
	}
}

// StartedByRestart reports whether this process was started by a restart of
// an older copy of itself (as opposed to a fresh start).
func StartedByRestart() bool {
	return inherited.readyFD >= 0
}

// ReceiveState returns the stream of state that the old process wrote in its
// Lifecycle.SendState hook, or (nil, nil) when this process was not started
// by a restart. The stream ends (io.EOF) when the old process has written
// everything. The caller owns the returned reader and closes it; it should
// read and validate the state before it calls Ready, so that a new process
// that cannot use the state fails the restart instead of losing it. Only the
// first call returns the stream; later calls return an error.
//
// State that is not taken before Ready is discarded by Ready, and the old
// process then sees its write fail.
func ReceiveState() (io.ReadCloser, error) {
	if err := inherited.err; err != nil {
		return nil, err
	}
	if !StartedByRestart() {
		return nil, nil
	}
	stateMu.Lock()
	defer stateMu.Unlock()
	if inherited.stateFD < 0 {
		return nil, errors.New("shellflip: the state stream was already received or discarded")
	}
	fd := inherited.stateFD
	inherited.stateFD = -1
	// Non-blocking mode lets the runtime poller wait on the pipe, so the
	// caller can set deadlines and Close unblocks a pending Read.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("setnonblock", err)
	}
	return os.NewFile(uintptr(fd), "shellflip-state"), nil
}

var (
	readyOnce sync.Once
	readyErr  error
	// isMain is set when systemd knows this process as the main pid: always
	// for a fresh start, and after the old process confirmed MAINPID for a
	// process started by a restart.
	isMain atomic.Bool
	// mainCh is closed when isMain becomes true.
	mainCh = make(chan struct{})
	// rejected is closed if the old process gave up on this one after it
	// was ready (its restart failed meanwhile): it is not to be main.
	rejected = make(chan struct{})
	// mainNeedsPIDFile is set, before mainCh is closed, if the old
	// process did not name this one in the PID file (it died, or failed).
	mainNeedsPIDFile bool
)

// Ready tells the world that this process has finished initialising: the old
// process, if this one was started by a restart (the old one then tells
// systemd that this is the new main process and exits), or systemd, with
// READY=1, if this is a fresh start under Type=notify. It also closes the
// fds inherited from the old process or systemd that the program did not
// claim (see Listen and File), and discards state that was not received.
//
// Start calls Ready; call it directly only when not using Start. It does its
// work once: later calls return the first call's result. If the old process
// is gone, Ready returns an error wrapping ErrOldProcessGone; this process is
// then on its own, and considers itself the main process.
func Ready() error {
	readyOnce.Do(func() { readyErr = ready() })
	return readyErr
}

func ready() error {
	if err := inherited.err; err != nil {
		return err
	}
	// The inherited fds nobody claimed are closed on the way out, after
	// the readiness byte: with many fds that is real work, which the old
	// process need not wait for.
	defer closeUnclaimed()

	stateMu.Lock()
	closeFD(&inherited.stateFD)
	stateMu.Unlock()

	fd := inherited.readyFD
	if fd < 0 {
		becomeMain()
		n, err := SystemdNotifier()
		if err != nil {
			return err
		}
		return n.Send(SdReady())
	}
	b := [1]byte{readyByte}
	_, err := ignoringEINTRIO(func() (int, error) { return unix.Write(fd, b[:]) })
	if err != nil {
		// The old process closed its end: it died, or it gave up on this
		// process and said so first (rejectedByte, still readable here).
		n, _ := ignoringEINTRIO(func() (int, error) { return unix.Read(fd, b[:]) })
		unix.Close(fd)
		if n == 1 && b[0] == rejectedByte {
			close(rejected)
			return errRejected
		}
		becomeMain()
		if err == unix.EPIPE || err == unix.ECONNRESET {
			return fmt.Errorf("%w: telling it that this process is ready: %v", ErrOldProcessGone, err)
		}
		return os.NewSyscallError("write", err)
	}
	// Wait in the background for the old process to confirm that systemd
	// knows this process as the main pid. Until then this process must not
	// talk to systemd: with NotifyAccess=main its messages would be dropped
	// with a warning.
	go func() {
		defer unix.Close(fd)
		var b [1]byte
		ignoringEINTRIO(func() (int, error) { return unix.Read(fd, b[:]) })
		if b[0] == rejectedByte {
			close(rejected)
			return
		}
		// Whether the old process confirmed (mainByte) or went away (EOF,
		// error), there is no one else left to be the main process.
		mainNeedsPIDFile = b[0] != mainByte
		becomeMain()
	}()
	return nil
}

var errRejected = errors.New("shellflip: the old process rejected this process: the restart failed")

func becomeMain() {
	if isMain.CompareAndSwap(false, true) {
		close(mainCh)
	}
}

// IsMain reports whether systemd (if any) knows this process as the
// service's main process. A fresh start is main once it is Ready; a process
// started by a restart becomes main when the old process has told systemd
// its pid, or has gone away.
func IsMain() bool { return isMain.Load() }

// MainChan returns a channel that is closed when IsMain becomes true.
func MainChan() <-chan struct{} { return mainCh }

func ignoringEINTRIO(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if err != unix.EINTR {
			return n, err
		}
	}
}

// inheritanceErr returns the first problem found with the inherited fds.
func inheritanceErr() error { return inherited.err }

// takeControlFD hands the inherited control socket, and the identity of
// its file, to the caller, once.
func takeControlFD() (int, string) {
	fd := inherited.controlFD
	inherited.controlFD = -1
	return fd, inherited.controlID
}

// earlySignals catches the restart signal in a process started by a
// restart, from init until Start takes it over: a restart signal sent to
// every process (pkill, systemctl kill) is meant for the old one, and
// Go's default for SIGHUP would kill this one. What it catches is dropped.
var earlySignals = make(chan os.Signal, 1)

func catchEarlySignals() {
	s, ok := os.LookupEnv(envSignal)
	if !ok {
		return
	}
	os.Unsetenv(envSignal)
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n < 65 && n != int(unix.SIGKILL) && n != int(unix.SIGSTOP) {
		signal.Notify(earlySignals, syscall.Signal(n))
	}
}

// stopEarlySignals ends catchEarlySignals' watch: Start calls it once it
// catches the restart signal itself.
func stopEarlySignals() { signal.Stop(earlySignals) }

func closeFDNum(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// pollableFile wraps fd, which the caller owns and gives up, in an *os.File
// that the runtime poller serves, so that deadlines work and Close unblocks
// a pending Read or Write.
func pollableFile(fd int, name string) (*os.File, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("setnonblock", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// mainPIDTimeout bounds how long the old process waits for systemd to
// process MAINPID (the barrier) and, if it is itself a new process, to be
// confirmed as main first.
const mainPIDTimeout = 5 * time.Second

// notifyMainPID tells systemd that pid is the service's main process now,
// with READY=1 in the same datagram so that NotifyAccess=main suffices, and
// waits on a barrier until systemd has processed it: only then may the old
// process answer the requester or exit.
func notifyMainPID(pid int) error {
	n, err := SystemdNotifier()
	if err != nil || !n.Enabled() {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), mainPIDTimeout)
	defer cancel()
	select {
	case <-mainCh:
	case <-ctx.Done():
		return errors.New("this process was not confirmed as the main process in time")
	}
	return n.handOver(ctx, pid)
}
