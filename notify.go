//go:build linux || darwin || freebsd

package shellflip

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// This file is what passes from one generation to the next, both ends of
// it, and the new process's side of a restart:
//
//   - the environment: the variables that name the passed fds, written by
//     the old process (handoff) and taken over by the new one at init,
//     before main runs (takeInheritance);
//   - the readiness socket's messages, both ways (readyMsg, ready), with
//     which the new process asks for the state, says it is ready or why it
//     gave up, and learns that it is the main process;
//   - the state stream (ReceiveState), and whether this process may talk to
//     systemd (Notify).

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

// The readiness socket. The new process writes:
//
//	'S'                       send me the state (ReceiveState)
//	'R'                       I am ready (and read the state, if I asked for it)
//	'F' len:uint16 text       I give up, because text (GiveUp)
//
// The old process writes, once the new one is ready or has failed:
//
//	'M'                       you are the main process now
//	'P'                       the same, but I could not name you in the PID file: do it
//	'X' len:uint16 text       the restart failed, because text: you are not wanted
//
// End of file on the socket means that the other process is gone.
const (
	msgState    = 'S'
	msgReady    = 'R'
	msgGiveUp   = 'F'
	msgMain     = 'M'
	msgMainPID  = 'P'
	msgRejected = 'X'

	// maxReason bounds the text of msgGiveUp, in bytes.
	maxReason = 512
)

// readyMsg reads one message: its kind, and the reason of a msgGiveUp or
// msgRejected, made printable. Any other byte is returned as is, for the
// caller to refuse.
func readyMsg(r io.Reader) (kind byte, reason string, err error) {
	var b [2]byte
	if _, err = io.ReadFull(r, b[:1]); err != nil || b[0] != msgGiveUp && b[0] != msgRejected {
		return b[0], "", err
	}
	kind, n := b[0], b[:]
	if _, err := io.ReadFull(r, n); err != nil {
		return 0, "", err
	}
	if l := binary.BigEndian.Uint16(n[:]); l > maxReason {
		return 0, "", fmt.Errorf("a reason of %d bytes, more than %d", l, maxReason)
	}
	text := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(r, text); err != nil {
		return 0, "", err
	}
	return kind, printable(string(text)), nil
}

// printable escapes, as strconv.Quote would, what is not printable in s:
// text from another process goes to terminals and logs.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := fmt.Sprintf("%+q", r)
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}

// The new process's side.

var (
	// stateMu guards state and inherited.stateFD.
	stateMu sync.Mutex
	// state is the stream ReceiveState handed out, if it did.
	state *stateReader

	// isMain is set when this process is the service's main process: a
	// fresh process always, a process started by a restart once the old
	// process made it so (or went away). mainCh is closed then.
	isMain atomic.Bool
	mainCh = make(chan struct{})
	// retired is set in an old process once it has told systemd the new
	// main pid: from then on it must not talk to systemd.
	retired atomic.Bool
)

func becomeMain() {
	if isMain.CompareAndSwap(false, true) {
		close(mainCh)
	}
}

// startedByRestart reports whether an old process started this one.
func startedByRestart() bool { return inherited.readyFD >= 0 }

// ReceiveState asks the old process for its state, and returns the stream
// on which it comes: what the old process's Lifecycle.SendState writes,
// until io.EOF. It returns (nil, nil) in a process that was not started by
// a restart.
//
// The old process runs SendState only when asked, so that the time it must
// hold its state still runs from this call to this process's readiness.
// The state must be read to its end (io.EOF) before Start: a state that
// this process asked for and did not read to its end, or did not ask for
// at all while the old process had one to send, fails the restart, and the
// old process keeps serving with its state. To throw the state away on
// purpose, read it to the end: io.Copy(io.Discard, r).
//
// The caller owns the stream and closes it. Only the first call returns it;
// later calls return an error.
func ReceiveState() (io.ReadCloser, error) {
	if err := inherited.err; err != nil {
		return nil, err
	}
	if !startedByRestart() {
		return nil, nil
	}
	stateMu.Lock()
	defer stateMu.Unlock()
	if state != nil || inherited.stateFD < 0 {
		return nil, errors.New("shellflip: the state was asked for already")
	}
	if err := writeAll(inherited.readyFD, []byte{msgState}); err != nil {
		return nil, fmt.Errorf("shellflip: asking the old process for the state: %w", err)
	}
	f, err := pollableFile(inherited.stateFD, "shellflip-state")
	inherited.stateFD = -1
	if err != nil {
		return nil, err
	}
	state = &stateReader{f: f}
	return state, nil
}

// stateReader is the state stream; it notes whether it was read to its end.
type stateReader struct {
	f   *os.File
	mu  sync.Mutex
	eof bool // the old process's end of file was read
}

func (r *stateReader) Read(p []byte) (int, error) {
	n, err := r.f.Read(p)
	if err == io.EOF {
		r.mu.Lock()
		r.eof = true
		r.mu.Unlock()
	}
	return n, err
}

func (r *stateReader) Close() error {
	r.complete()
	return r.f.Close()
}

// complete reports whether the stream was read to its end. A program that
// read exactly what the old process wrote has not seen end of file yet:
// one more read tells, waiting if need be for the old process to finish
// (it is bounded by the old process's ready timeout).
func (r *stateReader) complete() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.eof {
		var b [1]byte
		if n, err := r.f.Read(b[:]); n == 0 && err == io.EOF {
			r.eof = true
		}
	}
	return r.eof
}

// GiveUp tells the old process why this process, started by a restart,
// cannot go on: the restart fails with "new process PID gave up: " and
// reason (at most 512 bytes of it, made printable), the old process keeps
// serving, and it kills this process; the caller should exit. Call it
// instead of Start, for example when the state cannot be used. In a process
// that was not started by a restart, or once Start has declared it ready,
// GiveUp does nothing and returns nil.
func GiveUp(reason error) error {
	fd := inherited.readyFD
	if fd < 0 || readySent.Load() {
		return nil
	}
	return writeAll(fd, reasonMsg(msgGiveUp, reason.Error()))
}

// reasonMsg encodes a msgGiveUp or msgRejected with text, cut to maxReason
// bytes between characters.
func reasonMsg(kind byte, text string) []byte {
	for len(text) > maxReason {
		_, size := utf8.DecodeLastRuneInString(text)
		text = text[:len(text)-size]
	}
	msg := append([]byte{kind, 0, 0}, text...)
	binary.BigEndian.PutUint16(msg[1:], uint16(len(text)))
	return msg
}

// readySent is set once this process told the old one that it is ready.
var readySent atomic.Bool

// answer is what the old process answered a ready new process: msgMain,
// msgMainPID, msgRejected with its reason, or 0 for end of file (it is
// gone).
type answer struct {
	kind   byte
	reason string
}

// ready tells the old process that this process is ready, and returns a
// channel that receives its answer. Before that it checks the state: asked
// for and not read to its end, it is a reason to give up.
func ready() (<-chan answer, error) {
	fd := inherited.readyFD
	stateMu.Lock()
	if state != nil && !state.complete() {
		stateMu.Unlock()
		err := errors.New("the state it asked for was not read to its end")
		GiveUp(err)
		return nil, fmt.Errorf("shellflip: %w", err)
	}
	closeFD(&inherited.stateFD) // not asked for: the old process sends nothing
	stateMu.Unlock()

	ch := make(chan answer, 1)
	readySent.Store(true)
	werr := writeAll(fd, []byte{msgReady})
	go func() {
		// The old process answers once systemd knows this process as the
		// main pid; until then this process must not talk to systemd.
		// The answer is read even if the write failed: an old process
		// that rejected this one says so before it closes its end.
		f := os.NewFile(uintptr(fd), "shellflip-ready") // blocking: this goroutine waits in read(2)
		defer f.Close()
		kind, reason, err := readyMsg(f)
		if err != nil {
			kind = 0
		}
		ch <- answer{kind, reason}
	}()
	if werr != nil && werr != unix.EPIPE && werr != unix.ECONNRESET {
		return nil, os.NewSyscallError("write", werr)
	}
	return ch, nil
}

// writeAll writes b to the blocking fd, as one message would go.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := ignoringEINTR(func() (int, error) { return unix.Write(fd, b) })
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// Notify sends fields (each "KEY=VALUE", such as "STATUS=serving" or
// "WATCHDOG=1") to systemd in one datagram, as sd_notify(3) does, if the
// service runs under it ($NOTIFY_SOCKET); otherwise it does nothing. Each
// field is checked as systemd would read it: no newline or NUL (which
// would smuggle in another field), no variable twice, values of the
// variables systemd knows of their form; and the variables the library
// sends itself (MAINPID, BARRIER, FDSTORE; see StoreFDs) are refused. A
// message that breaks a rule is not sent, and the error says which.
//
// A process started by a restart gets ErrNotMain until Start has returned
// (systemd would drop its messages), and so does a process that has handed
// the service over to a new process. READY=1 is sent by Start.
func Notify(fields ...string) error {
	notifyMu.RLock()
	defer notifyMu.RUnlock()
	if err := mayNotify(); err != nil {
		return err
	}
	for _, f := range fields {
		if err := checkUserField(f); err != nil {
			return err
		}
	}
	n, err := processNotifier()
	if err != nil {
		return err
	}
	return n.send(context.Background(), nil, fields...)
}

// notifyMu orders this process's notifications against the handover:
// Notify holds it for reading, the old process's handover for writing
// while it tells systemd the new main pid and sets retired, so that
// nothing this process sends reaches systemd after that.
var notifyMu sync.RWMutex

// mayNotify reports ErrNotMain when this process must not talk to systemd:
// it was started by a restart and is not the main process yet, or it has
// handed the service over to a new main process.
func mayNotify() error {
	if !isMain.Load() && startedByRestart() || retired.Load() {
		return ErrNotMain
	}
	return nil
}
