//go:build linux || darwin || freebsd

package shellflip

import (
	"cmp"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The variables that pass fds and settings to a new process or a broker.
const (
	envReadyFD       = "SHELLFLIP_READY_FD"       // socketpair end: readiness byte out, "you are main" byte in
	envStateFD       = "SHELLFLIP_STATE_FD"       // pipe read end: state from the old process
	envControlFD     = "SHELLFLIP_CONTROL_FD"     // the control socket's listening socket
	envControlID     = "SHELLFLIP_CONTROL_ID"     // DEV:INO of the control socket's file, to tell whether the path still names it
	envSignal        = "SHELLFLIP_SIGNAL"         // the restart signal's number (earlySignals)
	envBrokerFD      = "SHELLFLIP_BROKER_FD"      // a broker's end of the socketpair to its parent (NewBroker)
	envBrokerProgram = "SHELLFLIP_BROKER_PROGRAM" // the program a broker's parent was started as, which restarts run
	envListenPID     = "LISTEN_PID"
	envListenFDs     = "LISTEN_FDS"
	envListenFDNames = "LISTEN_FDNAMES"
	envWatchdogPID   = "WATCHDOG_PID"

	listenPIDAuto   = "auto"  // the new process's pid, which the old one cannot know before the fork (fixupPIDs)
	listenFDsStart  = 3       // SD_LISTEN_FDS_START from sd-daemon.h
	maxInheritedFDs = 1 << 16 // bounds LISTEN_FDS before anything is allocated for it
)

// inheritance is what this process received at start, taken in the
// package's init: the fds are close-on-exec and the variables gone before
// main runs (only the init of a package that does not import this one may
// come earlier, and fork).
type inheritance struct {
	err       error // the first problem found; if set, every fd was closed
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

// earlySignals catches the restart signal from init until Start takes it
// over (stopEarlySignals), in a process started by a restart: a signal sent
// to every process (pkill, systemctl kill) is meant for the old one, and
// Go's default for SIGHUP would kill this one. What it catches is dropped.
var earlySignals = make(chan os.Signal, 1)

func init() {
	fixupPIDs()
	recordStart()
	s := os.Getenv(envSignal)
	os.Unsetenv(envSignal)
	if n, err := strconv.Atoi(s); err == nil && validSignal(n) {
		signal.Notify(earlySignals, syscall.Signal(n))
	}
	inherited = takeInheritance(os.LookupEnv, os.Unsetenv)
}

// fixupPIDs sets LISTEN_PID=auto and WATCHDOG_PID=auto to this pid, which
// sd_listen_fds(3), sd_watchdog_enabled(3) and coreos/go-systemd check.
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
// extra), plus the variables that name the new process's fds.
func (h handoff) environ(environ, extra []string) []string {
	env := baseEnviron(environ, extra)
	if len(h.names) > 0 {
		env = append(env, envListenPID+"="+listenPIDAuto, envListenFDs+"="+strconv.Itoa(len(h.names)),
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

// baseEnviron returns environ less the variables that the library sets
// (reservedEnv) or extra sets, plus extra. A WATCHDOG_PID naming this
// process becomes "auto": the watchdog passes to the new main process. One
// naming another process, or "auto" (in a broker, whose environment was
// made here), is passed on as it is.
func baseEnviron(environ, extra []string) []string {
	ownWatchdog := envWatchdogPID + "=" + strconv.Itoa(os.Getpid())
	drop := func(k string) bool {
		return reservedEnv(k) || slices.ContainsFunc(extra, func(e string) bool {
			ek, _, _ := strings.Cut(e, "=")
			return ek == k
		})
	}
	env := make([]string, 0, len(environ)+len(extra)+8)
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case kv == ownWatchdog:
			env = append(env, envWatchdogPID+"="+listenPIDAuto)
		case k == envWatchdogPID || !drop(k):
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// reservedEnv reports whether the library sets k itself, so Config.Env may not.
func reservedEnv(k string) bool {
	return slices.Contains([]string{envListenPID, envListenFDs, envListenFDNames, envWatchdogPID,
		envReadyFD, envStateFD, envControlFD, envControlID, envSignal, envBrokerFD, envBrokerProgram}, k)
}

// takeInheritance validates every fd named in the environment, marks it
// close-on-exec and removes the variables that named it. lookupEnv and
// unsetenv are parameters so that tests can feed it hostile environments.
func takeInheritance(lookupEnv func(string) (string, bool), unsetenv func(string) error) inheritance {
	getenv := func(k string) string { v, _ := lookupEnv(k); return v }
	inh := inheritance{readyFD: -1, stateFD: -1, controlFD: -1}
	inh.listen, inh.err = takeListenFDs(lookupEnv)
	if (getenv(envListenFDs) != "" || getenv(envListenFDNames) != "") && getenv(envListenPID) == strconv.Itoa(os.Getpid()) {
		unsetenv(envListenPID)
		unsetenv(envListenFDs)
		unsetenv(envListenFDNames)
	}

	low := listenFDsStart + len(inh.listen)
	own := func(env string, want uint32) int {
		s := getenv(env)
		if s == "" {
			return -1
		}
		unsetenv(env)
		fd, err := parseFD(s)
		if err == nil && (fd < low || slices.Contains([]int{inh.readyFD, inh.stateFD}, fd)) {
			err = fmt.Errorf("fd %d overlaps stdio, LISTEN_FDS or another fd", fd)
		}
		if err == nil {
			err = checkFD(fd, want)
		}
		if err != nil {
			inh.err = cmp.Or(inh.err, fmt.Errorf("shellflip: $%s=%q: %w", env, s, err))
			return -1
		}
		return fd
	}
	inh.readyFD = own(envReadyFD, unix.S_IFSOCK)
	inh.stateFD = own(envStateFD, unix.S_IFIFO)
	inh.controlFD = own(envControlFD, unix.S_IFSOCK)
	inh.controlID = getenv(envControlID) // checked against the path by listenControl
	unsetenv(envControlID)
	if (inh.readyFD < 0) != (inh.stateFD < 0) {
		inh.err = cmp.Or(inh.err, fmt.Errorf("shellflip: $%s and $%s must be set together", envReadyFD, envStateFD))
	}
	if inh.err != nil {
		// Refuse it all rather than guess, and leak no fd to a child: the
		// old process sees the readiness socket close, and fails at once.
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
// sd_listen_fds_with_names(3) does, and leaves fds meant for another
// process (LISTEN_PID differs) alone. On error it closes what it validated.
func takeListenFDs(lookupEnv func(string) (string, bool)) ([]inheritedFD, error) {
	pid, _ := lookupEnv(envListenPID)
	nStr, _ := lookupEnv(envListenFDs)
	if nStr == "" || pid != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	n, err := strconv.ParseUint(nStr, 10, 32)
	if err != nil || n > maxInheritedFDs {
		return nil, fmt.Errorf("shellflip: $%s=%q is not a count of fds", envListenFDs, nStr)
	}
	var names []string // unset: all "unknown"; set and empty: one fd named ""
	if s, ok := lookupEnv(envListenFDNames); ok {
		names = splitNames(s, int(n)+1)
		if len(names) != int(n) {
			err = fmt.Errorf("shellflip: $%s names %d fds, $%s says %d", envListenFDNames, len(names), envListenFDs, n)
		}
	}
	fds := make([]inheritedFD, 0, n)
	for i := range int(n) {
		fd := listenFDsStart + i
		name := "unknown" // what sd_listen_fds_with_names(3) reports for unnamed fds
		if i < len(names) {
			name = names[i]
		}
		if err == nil && !fdnameValid(name) {
			err = fmt.Errorf("shellflip: $%s: %q is not a valid fd name", envListenFDNames, name)
		}
		if cerr := checkInherited(fd); cerr != nil {
			err = cmp.Or(err, fmt.Errorf("shellflip: $%s=%s: fd %d: %w", envListenFDs, nStr, fd, cerr))
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
	// Every fd of the block is inherited and open: mark them all at once,
	// where checkFD would cost three syscalls an fd.
	cloexecRange(listenFDsStart, listenFDsStart+int(n)-1)
	return fds, nil
}

// splitNames splits a LISTEN_FDNAMES value into at most max fields, so
// that a hostile value cannot make it allocate without bound.
func splitNames(s string, max int) []string { return strings.SplitN(s, ":", max) }

// parseFD parses a decimal fd number as the old process wrote it.
func parseFD(s string) (int, error) {
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil || len(s) > 1 && s[0] == '0' {
		return -1, fmt.Errorf("not an fd number")
	}
	return int(n), nil
}

// checkFD verifies that fd was inherited and, if want is not 0, is of type
// want, then marks it close-on-exec. An inherited fd of another type is
// closed, so that it leaks no further.
func checkFD(fd int, want uint32) error {
	if err := checkInherited(fd); err != nil {
		return err
	}
	var st unix.Stat_t
	if _, err := ignoringEINTR(func() (int, error) { return 0, unix.Fstat(fd, &st) }); err != nil {
		return os.NewSyscallError("fstat", err)
	}
	if got := uint32(st.Mode & unix.S_IFMT); want != 0 && got != want {
		unix.Close(fd)
		return fmt.Errorf("fd %d is a %s, want a %s", fd, fileType(got), fileType(want))
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	return nil
}

// checkInherited refuses, and leaves open, an fd already close-on-exec: it
// cannot have survived the execve that started this process, so the runtime
// (its cgroup CPU limit files, its epoll fds) or another package's init
// opened it since, and closing it would pull it from under its owner.
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

var fileTypes = map[uint32]string{
	unix.S_IFSOCK: "socket", unix.S_IFIFO: "pipe", unix.S_IFREG: "regular file", unix.S_IFDIR: "directory",
	unix.S_IFCHR: "character device", unix.S_IFBLK: "block device", unix.S_IFLNK: "symlink",
}

func fileType(mode uint32) string {
	return cmp.Or(fileTypes[mode&unix.S_IFMT], "file of unknown type")
}

// takeControlFD hands over the inherited control socket and its file's ID, once.
func takeControlFD() (int, string) {
	fd := inherited.controlFD
	inherited.controlFD = -1
	return fd, inherited.controlID
}

// validSignal reports whether n may be a restart signal: one that can be
// caught, and that nobody sends unasked (SIGCHLD comes when a child exits,
// SIGURG from the Go runtime's preemption).
func validSignal(n int) bool {
	return n > 0 && n < 65 && !slices.Contains([]unix.Signal{unix.SIGKILL, unix.SIGSTOP, unix.SIGCHLD, unix.SIGURG}, unix.Signal(n))
}

func stopEarlySignals() { signal.Stop(earlySignals) }
