//go:build linux || darwin || freebsd

package shellflip

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// This file is the environment that passes from one generation to the
// next, both ends of it: the variables that name the passed fds, written by
// the old process (handoff.environ) and taken over by the new one in the
// package's init, before main runs (takeInheritance).

// Environment variables that name the library's own fds in a process started
// by a restart. They follow the LISTEN_FDS block and are removed from the
// environment as soon as the package is initialised.
const (
	envReadyFD   = "SHELLFLIP_READY_FD"   // socketpair end: readiness byte out, "you are main" byte in
	envStateFD   = "SHELLFLIP_STATE_FD"   // pipe read end: state from the old process
	envControlFD = "SHELLFLIP_CONTROL_FD" // the control socket's listening socket
	envControlID = "SHELLFLIP_CONTROL_ID" // DEV:INO of the control socket's file, to tell whether the path still names it
	envSignal    = "SHELLFLIP_SIGNAL"     // the restart signal's number: caught from init on, so that it cannot kill the new process

	// A broker's (broker.go), set by NewBroker.
	envBrokerFD      = "SHELLFLIP_BROKER_FD"      // its end of the socketpair to its parent
	envBrokerProgram = "SHELLFLIP_BROKER_PROGRAM" // the program its parent was started as, which restarts run

	envListenPID     = "LISTEN_PID"
	envListenFDs     = "LISTEN_FDS"
	envListenFDNames = "LISTEN_FDNAMES"
	envWatchdogPID   = "WATCHDOG_PID"

	// listenPIDAuto stands in for the new process's pid in LISTEN_PID and
	// WATCHDOG_PID, which the old process cannot know before the fork; the
	// new process replaces it with its own pid at initialisation .
	listenPIDAuto = "auto"

	// listenFDsStart is SD_LISTEN_FDS_START from sd-daemon.h.
	listenFDsStart = 3

	// maxInheritedFDs bounds LISTEN_FDS before anything is allocated for it.
	maxInheritedFDs = 1 << 16
)

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

var inherited = inheritance{readyFD: -1, stateFD: -1, controlFD: -1}

func init() {
	fixupPIDs()
	recordStart()
	catchEarlySignals()
	inherited = takeInheritance(os.LookupEnv, os.Unsetenv)
}

// fixupPIDs replaces LISTEN_PID=auto and WATCHDOG_PID=auto, which the old
// process sets because it cannot know its child's pid before the fork, with
// this process's pid, so that code that checks them (sd_listen_fds(3),
// sd_watchdog_enabled(3), coreos/go-systemd) sees what systemd would have
// set.
func fixupPIDs() {
	for _, k := range []string{envListenPID, envWatchdogPID} {
		if os.Getenv(k) == listenPIDAuto {
			os.Setenv(k, strconv.Itoa(os.Getpid()))
		}
	}
}

// handoff is what the old process passes to the new one besides stdio: the
// registry's fds at 3 and up, named as systemd names them, then its own.
type handoff struct {
	names            []string // the registry's fds, in order from fd 3
	readyFD, stateFD int
	ctlFD            int // -1 without a control socket
	ctlID            string
	signal           os.Signal
}

// environ returns the new process's environment: baseEnviron(environ,
// extra), plus the variables naming the new process's fds. LISTEN_PID is
// "auto": the new process's init sets its own pid there.
func (h handoff) environ(environ, extra []string) []string {
	env := baseEnviron(environ, extra)
	if len(h.names) > 0 {
		env = append(env,
			envListenPID+"="+listenPIDAuto,
			envListenFDs+"="+strconv.Itoa(len(h.names)),
			envListenFDNames+"="+strings.Join(h.names, ":"))
	}
	env = append(env, envReadyFD+"="+strconv.Itoa(h.readyFD), envStateFD+"="+strconv.Itoa(h.stateFD))
	if h.ctlFD >= 0 {
		env = append(env, envControlFD+"="+strconv.Itoa(h.ctlFD), envControlID+"="+h.ctlID)
	}
	if n, ok := h.signal.(syscall.Signal); ok {
		env = append(env, envSignal+"="+strconv.Itoa(int(n)))
	}
	return env
}

// baseEnviron returns environ (this process's) less the variables that
// describe this process's own fds, plus extra (which wins over variables of
// the same name): what every restart passes on, whatever fds it passes. A
// WATCHDOG_PID that systemd set to this process becomes "auto": the
// watchdog passes to the new main process with everything else. Applied to
// its own result, it changes nothing, which is how a broker uses it.
func baseEnviron(environ, extra []string) []string {
	ownWatchdog := envWatchdogPID + "=" + strconv.Itoa(os.Getpid())
	drop := func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		if reservedEnv(k) {
			return true
		}
		for _, e := range extra {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				return true
			}
		}
		return false
	}
	env := make([]string, 0, len(environ)+len(extra)+8)
	for _, kv := range environ {
		switch {
		case kv == ownWatchdog:
			env = append(env, envWatchdogPID+"="+listenPIDAuto)
		case !drop(kv):
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// reservedEnv reports whether the library sets the variable k for the new
// process, so that Config.Env may not.
func reservedEnv(k string) bool {
	switch k {
	case envListenPID, envListenFDs, envListenFDNames, envWatchdogPID,
		envReadyFD, envStateFD, envControlFD, envControlID, envSignal,
		envBrokerFD, envBrokerProgram:
		return true
	}
	return false
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
	if _, err := ignoringEINTR(func() (int, error) { return 0, unix.Fstat(fd, &st) }); err != nil {
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
	if n, err := strconv.Atoi(s); err == nil && validSignal(n) {
		signal.Notify(earlySignals, syscall.Signal(n))
	}
}

// validSignal reports whether n may be a restart signal.
func validSignal(n int) bool {
	return n > 0 && n < 65 && n != int(unix.SIGKILL) && n != int(unix.SIGSTOP)
}

// stopEarlySignals ends catchEarlySignals' watch: Start calls it once it
// catches the restart signal itself.
func stopEarlySignals() { signal.Stop(earlySignals) }
