//go:build linux

package shellflip

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// This file is the restart broker, both ends of it: the old process's side
// (Broker), and the broker itself, a copy of the program that this file's
// init turns into a broker before main runs.
//
// Why a process: a seccomp filter that keeps a service from starting
// programs denies execve and process clone, which a restart needs, and a Go
// program must filter all its threads at once (TSYNC), so none stays
// outside to fork from, as shellflip's restart thread does. Filters also
// pass through execve: a new process started by a filtered one would run
// under one more filter each generation, until the chain reaches the
// kernel's limit (MAX_INSNS_PER_PATH, 32768 instructions). The broker
// starts before the lockdown, and neither it nor what it starts is
// filtered.
//
// What it trusts: nothing from a message but fds and their names. The
// program, its arguments and its environment are its own, fixed when it
// started: a locked process that was taken over can make it start that
// program, with fds of its choosing, and nothing else. Each message is
// checked (fd names as systemd's, counts, the kinds of the library's own
// fds, the signal, the form of the control socket's DEV:INO); one that fails is
// answered with an error, the request's fds are closed, and nothing
// starts. It kills only its own children not reaped yet, safe from pid
// reuse as watchChild is, and exits at end of file: when its parent exits,
// however that happens.
//
// The socket is a SOCK_SEQPACKET socketpair: each send is one message,
// never merged with another or split. The old process sends
//
//	'F' names               with 1 to 253 fds of the registry, in order;
//	                        names are theirs, joined by ':'
//	'S' sig:uint8 id        with stdin, stdout, stderr, the readiness socket,
//	                        the state pipe, and the control socket if id
//	                        (its DEV:INO) is not empty: start the new
//	                        process, with the registry fds of the 'F's
//	                        since the last 'S'; sig is the restart signal,
//	                        0 for none
//	'K' pid:uint32          kill pid, if it is a child not reaped yet
//
// and the broker answers each message but a well-formed 'K' with one of
//
//	'A'                     the fds were taken
//	'P' pid:uint32 path     the new process pid runs the program at path
//	'E' text                refused, or the start failed: nothing was
//	                        started, and the request's fds were closed
//
// and reports each child's end, after its 'P':
//
//	'X' pid:uint32 status:uint32   pid exited with wait status status, and
//	                               was reaped
//
// Numbers are big-endian. A message of no bytes reads as end of file.
const (
	brokerFDs   = 'F'
	brokerStart = 'S'
	brokerKill  = 'K'
	brokerOK    = 'A'
	brokerPID   = 'P'
	brokerErr   = 'E'
	brokerExit  = 'X'

	// maxFDsPerMsg is SCM_MAX_FD, the most fds one message carries.
	maxFDsPerMsg = 253
	// maxBrokerMsg bounds a message: 253 names of 255 bytes fit.
	maxBrokerMsg = 1 << 16
)

var errBrokerGone = errors.New("shellflip: the broker exited")

// Broker starts new processes for a Restarter (Config.Broker), so that the
// process it serves needs no fork, exec, wait or kill to restart. Make it
// with NewBroker.
type Broker struct {
	conn *net.UnixConn
	pid  int

	reqMu sync.Mutex // one request at a time

	mu       sync.Mutex
	reply    chan brokerReply // the waiting request's; nil if none waits
	children map[int]*childWatch
	gone     bool
}

type brokerReply struct {
	child *childWatch
	err   error
}

// NewBroker starts the restart broker, which starts the new processes of
// this process's restarts (pass it in Config.Broker), so that this process,
// once it has locked itself down with seccomp, needs no fork, exec, wait or
// kill (SECURITY.md lists what it needs; examples/locked does it). Call it
// before the lockdown: the broker must start outside the filter.
//
// The broker is this program, the running executable, re-executed in a
// role that the package's init takes on, and that never returns to main.
// It restarts the program as this process was started (see Config.Path),
// with this process's arguments and its environment as they are now, and
// nothing else: Start refuses Path, Args or Env along with a Broker. The
// new process gets exactly the fds and variables it would get without a
// broker, but is the broker's child.
//
// The broker is this process's child, connected to it by a socketpair and
// nothing else, and exits when this process does; it drops SIGHUP, SIGINT
// and SIGTERM, which would end it first. Signals this process ignores when
// NewBroker is called stay ignored in the new processes, as they would
// without a broker. Linux only: elsewhere NewBroker returns
// ErrNotSupported.
func NewBroker() (*Broker, error) {
	if len(os.Args) == 0 {
		return nil, errors.New("shellflip: this process has no arguments, not even a name, to restart with")
	}
	dir, err := startDir()
	if err != nil {
		return nil, fmt.Errorf("shellflip: starting the broker: %w", err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	// The broker's socket goes at fd k, above the fds a restart will pass
	// and the copies the new process will claim: fork sizes a child's fd
	// table by its parent's highest open fd (dup_fd in fs/file.c), so the
	// broker's children get room for both, as they would from this
	// process. A table that must grow later, in a process that has
	// threads, waits for an RCU grace period (expand_fdtable), which took
	// 5 to 16 ms a growth here. The fds in between are closed in the
	// child before the exec, where growing is cheap.
	lockRegistry()
	k := 3 + 2*len(fdreg.entries) + 64
	fdreg.mu.Unlock()
	var lim unix.Rlimit // ForkExec moves fds above k on the way
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil && lim.Cur < uint64(k)+8 {
		k = max(3, int(lim.Cur)-8)
	}
	files := []uintptr{0, 1, 2}
	for len(files) < k {
		files = append(files, ^uintptr(0)) // -1: closed
	}
	files = append(files, uintptr(fds[1]))
	env := append(baseEnviron(os.Environ(), nil), envBrokerFD+"="+strconv.Itoa(k), envBrokerProgram+"="+startedAs.program)
	// /proc/self/exe: the broker runs this very binary, even if a deploy
	// replaced its file since.
	err = sealFDs()
	var pid int
	if err == nil {
		pid, err = forkExec("/proc/self/exe", os.Args, env, dir, files)
	}
	unix.Close(fds[1])
	if err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("shellflip: starting the broker: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "shellflip-broker")
	c, err := net.FileConn(f)
	f.Close() // if FileConn failed, the broker sees end of file and exits
	if err != nil {
		return nil, fmt.Errorf("shellflip: the broker's socket: %w", err)
	}
	b := &Broker{conn: c.(*net.UnixConn), pid: pid, children: map[int]*childWatch{}}
	go b.read()
	return b, nil
}

// check reports whether b can serve Start.
func (b *Broker) check() error {
	if b.conn == nil {
		return errors.New("shellflip: Config.Broker was not made by NewBroker")
	}
	return nil
}

// spawn asks the broker to start the new process with files (stdio, the
// registry's fds, which h.names names, then the library's own), and returns
// the child. ctx bounds the wait for each answer.
func (b *Broker) spawn(ctx context.Context, files []uintptr, h handoff) (*childWatch, error) {
	b.reqMu.Lock()
	defer b.reqMu.Unlock()
	reg := files[3 : 3+len(h.names)]
	for i := 0; i < len(reg); i += maxFDsPerMsg {
		j := min(i+maxFDsPerMsg, len(reg))
		if _, err := b.request(ctx, append([]byte{brokerFDs}, strings.Join(h.names[i:j], ":")...), reg[i:j]); err != nil {
			return nil, err
		}
	}
	var sig byte
	if s, ok := h.signal.(syscall.Signal); ok {
		sig = byte(s)
	}
	child, err := b.request(ctx, append([]byte{brokerStart, sig}, h.ctlID...), slices.Concat(files[:3], files[3+len(h.names):]))
	if err == nil && child == nil {
		b.close()
		err = errors.New("shellflip: the broker answered a start without a pid")
	}
	return child, err
}

// request sends msg with fds and waits for the answer.
func (b *Broker) request(ctx context.Context, msg []byte, fds []uintptr) (*childWatch, error) {
	ch := make(chan brokerReply, 1)
	b.mu.Lock()
	if b.gone {
		b.mu.Unlock()
		return nil, errBrokerGone
	}
	b.reply = ch
	b.mu.Unlock()
	ints := make([]int, len(fds))
	for i, fd := range fds {
		ints[i] = int(fd)
	}
	if _, _, err := b.conn.WriteMsgUnix(msg, unix.UnixRights(ints...), nil); err != nil {
		b.close()
		if errors.Is(err, unix.EPIPE) || errors.Is(err, unix.ECONNRESET) {
			// It died, and this send learnt it before the reader did.
			return nil, errBrokerGone
		}
		return nil, fmt.Errorf("shellflip: sending to the broker: %w", err)
	}
	select {
	case r := <-ch:
		return r.child, r.err
	case <-ctx.Done():
		// It answers at once unless something is badly wrong; a late
		// answer would be taken for the next request's. Give it up.
		b.close()
		return nil, fmt.Errorf("shellflip: the broker did not answer: %w", context.Cause(ctx))
	}
}

// read reads the broker's messages until the socket fails or closes.
func (b *Broker) read() {
	var buf [8 << 10]byte // an answer, whose path may be up to PATH_MAX
	for {
		n, err := b.conn.Read(buf[:])
		if err != nil || b.dispatch(buf[:n]) != nil {
			b.close()
			return
		}
	}
}

// dispatch hands an answer to the waiting request, or a child's end to its
// watch. Anything else ends the connection.
func (b *Broker) dispatch(m []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(m) == 9 && m[0] == brokerExit {
		if c := b.children[int(binary.BigEndian.Uint32(m[1:]))]; c != nil {
			delete(b.children, c.pid)
			c.ws = unix.WaitStatus(binary.BigEndian.Uint32(m[5:]))
			close(c.done)
		}
		return nil
	}
	ch := b.reply
	b.reply = nil
	var r brokerReply
	switch {
	case ch == nil:
		return errors.New("an answer to no request")
	case len(m) == 1 && m[0] == brokerOK:
	case len(m) > 5 && m[0] == brokerPID:
		pid := int(binary.BigEndian.Uint32(m[1:]))
		r.child = &childWatch{pid: pid, path: printable(string(m[5:])), done: make(chan struct{})}
		r.child.killer = func() { b.conn.Write(binary.BigEndian.AppendUint32([]byte{brokerKill}, uint32(pid))) }
		b.children[pid] = r.child
	case len(m) > 0 && m[0] == brokerErr:
		r.err = errors.New(printable(string(m[1:])))
	default:
		r.err = fmt.Errorf("shellflip: the broker answered %q", m)
		ch <- r
		return r.err
	}
	ch <- r
	return nil
}

// close ends the connection, and with it the broker. A waiting request
// fails, and the children's ends are lost.
func (b *Broker) close() {
	b.conn.Close()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gone {
		return
	}
	b.gone = true
	if b.reply != nil {
		b.reply <- brokerReply{err: errBrokerGone}
		b.reply = nil
	}
	for pid, c := range b.children {
		delete(b.children, pid)
		c.lost = true
		close(c.done)
	}
}

// The broker's side.

// init makes this process a broker, if NewBroker started it as one
// ($SHELLFLIP_BROKER_FD is set), and then never returns, before
// handoff.go's init (files are initialised in name order): the broker's
// WATCHDOG_PID stays "auto", which baseEnviron passes on.
func init() {
	if s, ok := os.LookupEnv(envBrokerFD); ok {
		os.Exit(serveBroker(s))
	}
}

// broker is the broker's state: what it starts, fixed at its start, and
// the request being received.
type broker struct {
	fd        int
	args, env []string
	spawner   *spawner

	mu       sync.Mutex
	children map[int]*childWatch // started and not reaped yet

	fds   []int // the registry's fds received for the next start
	names []string
}

// serveBroker takes over the socket that fdVar names, and serves it until
// end of file; it returns the exit code.
func serveBroker(fdVar string) int {
	prog := os.Getenv(envBrokerProgram)
	os.Unsetenv(envBrokerFD)
	os.Unsetenv(envBrokerProgram)
	fd, err := parseFD(fdVar)
	if err == nil {
		err = checkFD(fd, unix.S_IFSOCK)
	}
	if t, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err == nil && t != unix.SOCK_SEQPACKET {
		err = errors.New("not a SOCK_SEQPACKET socket")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "shellflip: broker: $%s=%q: %v\n", envBrokerFD, fdVar, err)
		return 2
	}
	// Where restarts start from: where its parent started, which is where
	// its parent started it.
	startedAs.dir, _ = os.Getwd()
	startedAs.dirInfo, _ = os.Stat(".")
	startedAs.program = prog
	// It lives as long as its parent: the signals that would end it first
	// (the terminal's ^C to the process group, "systemctl kill") are caught
	// and dropped. Caught, not ignored, and left ignored if they were (as
	// nohup leaves SIGHUP): the new processes it starts keep an ignored
	// signal ignored, as they would without a broker, and a caught one
	// not.
	dropped := make(chan os.Signal, 1)
	for _, s := range []os.Signal{unix.SIGHUP, unix.SIGINT, unix.SIGTERM} {
		if !signal.Ignored(s) {
			signal.Notify(dropped, s)
		}
	}

	br := &broker{fd: fd, args: os.Args, env: os.Environ(), spawner: newSpawner(), children: map[int]*childWatch{}}
	buf := make([]byte, maxBrokerMsg)
	oob := make([]byte, unix.CmsgSpace(maxFDsPerMsg*4))
	for {
		m, fds, err := brokerRecv(fd, buf, oob)
		var serr *os.SyscallError
		switch {
		case errors.As(err, &serr):
			fmt.Fprintf(os.Stderr, "shellflip: broker: %v\n", err)
			return 1
		case len(m) == 0:
			return 0 // its parent is gone
		case err == nil:
			err = br.handle(m, fds)
		default:
			closeFDs(fds)
		}
		if err != nil {
			br.reset()
			br.send(append([]byte{brokerErr}, err.Error()...))
		}
	}
}

// brokerRecv reads one message, and the fds that came with it as
// close-on-exec fds; those are returned even with an error, for the caller
// to close.
func brokerRecv(fd int, buf, oob []byte) (msg []byte, fds []int, err error) {
	var n, oobn, flags int
	if _, err := ignoringEINTR(func() (int, error) {
		var err error
		n, oobn, flags, _, err = unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		return n, err
	}); err == unix.ECONNRESET {
		// The parent exited with a message of ours unread (af_unix.c,
		// unix_release_sock): gone all the same.
		return nil, nil, nil
	} else if err != nil {
		return nil, nil, os.NewSyscallError("recvmsg", err)
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	for i := range cmsgs {
		rights, rerr := unix.ParseUnixRights(&cmsgs[i])
		if rerr != nil {
			err = errors.New("the broker refused a message: a control message other than SCM_RIGHTS")
		}
		fds = append(fds, rights...)
	}
	switch {
	case flags&unix.MSG_TRUNC != 0:
		err = fmt.Errorf("the broker refused a message: longer than %d bytes", len(buf))
	case flags&unix.MSG_CTRUNC != 0:
		err = errors.New("the broker refused a message: more fds than it could take")
	}
	return buf[:n], fds, err
}

// handle serves one message, and owns fds.
func (br *broker) handle(m []byte, fds []int) error {
	switch m[0] {
	case brokerFDs:
		return br.addFDs(string(m[1:]), fds)
	case brokerStart:
		return br.start(m[1:], fds)
	case brokerKill:
		closeFDs(fds)
		if len(m) != 5 || len(fds) > 0 {
			return errors.New("the broker refused a message: a kill is a pid and no fds")
		}
		br.mu.Lock()
		defer br.mu.Unlock()
		if c := br.children[int(binary.BigEndian.Uint32(m[1:]))]; c != nil {
			c.kill()
		}
		return nil
	}
	closeFDs(fds)
	return fmt.Errorf("the broker refused a message: unknown kind %q", m[0])
}

// addFDs takes fds of the registry for the next start.
func (br *broker) addFDs(names string, fds []int) error {
	br.fds = append(br.fds, fds...) // closed by reset if anything is wrong
	if len(fds) == 0 || len(br.fds) > maxInheritedFDs {
		return fmt.Errorf("the broker refused a message: %d fds, %d in all; want 1 to %d, at most %d in all", len(fds), len(br.fds), maxFDsPerMsg, maxInheritedFDs)
	}
	got := splitNames(names, len(fds)+1)
	if len(got) != len(fds) {
		return fmt.Errorf("the broker refused a message: %d names for %d fds", len(got), len(fds))
	}
	for _, name := range got {
		if !fdnameValid(name) {
			return fmt.Errorf("the broker refused a message: %q is not a valid fd name", name)
		}
	}
	br.names = append(br.names, got...)
	br.send([]byte{brokerOK})
	return nil
}

// start starts the new process, with stdio and the library's fds from fds
// and the registry's received before, as Restarter.spawn would. p is the
// 'S' message after its kind.
func (br *broker) start(p []byte, fds []int) error {
	defer br.reset()
	defer closeFDs(fds) // the new process has its copies
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("the broker refused a message: "+format, args...)
	}
	if len(p) == 0 {
		return refuse("a start without a signal")
	}
	sig, id := p[0], string(p[1:])
	want := []uint32{0, 0, 0, unix.S_IFSOCK, unix.S_IFIFO}
	if id != "" {
		want = append(want, unix.S_IFSOCK)
	}
	switch {
	case len(fds) != len(want):
		return refuse("%d fds with a start, want %d", len(fds), len(want))
	case sig != 0 && !validSignal(int(sig)):
		return refuse("signal %d", sig)
	case id != "" && !validFileID(id):
		return refuse("%q is not a file's DEV:INO", id)
	}
	for i, w := range want {
		var st unix.Stat_t
		if err := unix.Fstat(fds[i], &st); err != nil || w != 0 && st.Mode&unix.S_IFMT != w {
			return refuse("fd %d of the start is not a %s", i, fileType(w))
		}
	}
	n := len(br.fds)
	h := handoff{names: br.names, readyFD: 3 + n, stateFD: 4 + n, ctlFD: -1, ctlID: id}
	if id != "" {
		h.ctlFD = 5 + n
	}
	if sig != 0 {
		h.signal = syscall.Signal(sig)
	}
	files := make([]uintptr, 0, n+len(fds))
	for _, fd := range slices.Concat(fds[:3], br.fds, fds[3:]) {
		files = append(files, uintptr(fd))
	}
	// A parent that gave up waiting for this answer has closed its end:
	// it wants no new process, and would not know of it.
	hup := []unix.PollFd{{Fd: int32(br.fd)}}
	if n, _ := unix.Poll(hup, 0); n > 0 && hup[0].Revents&unix.POLLHUP != 0 {
		return errors.New("the old process is gone")
	}
	if err := sealFDs(); err != nil {
		return err
	}
	path, dir, err := program("")
	if err != nil {
		return err
	}
	pid, err := br.spawner.spawn(path, br.args, h.environ(br.env, nil), dir, files)
	if err != nil {
		return fmt.Errorf("starting %s: %w", path, err)
	}
	c := watchChild(pid, path)
	br.mu.Lock()
	br.children[pid] = c
	br.mu.Unlock()
	br.send(append(binary.BigEndian.AppendUint32([]byte{brokerPID}, uint32(pid)), path...))
	go func() { // after 'P', so that the old process knows the pid
		<-c.done
		br.mu.Lock()
		delete(br.children, pid)
		br.mu.Unlock()
		br.send(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32([]byte{brokerExit}, uint32(pid)), uint32(c.ws)))
	}()
	return nil
}

// reset closes the fds received for the next start, and forgets them.
func (br *broker) reset() {
	closeFDs(br.fds)
	br.fds, br.names = nil, nil
}

// send sends one message; if the parent is gone, the next read says so.
func (br *broker) send(m []byte) {
	unix.Sendmsg(br.fd, m, nil, nil, unix.MSG_NOSIGNAL)
}

// validFileID reports whether s is a fileID's String: DEV:INO.
func validFileID(s string) bool {
	dev, ino, _ := strings.Cut(s, ":")
	_, err1 := strconv.ParseUint(dev, 10, 64)
	_, err2 := strconv.ParseUint(ino, 10, 64)
	return err1 == nil && err2 == nil
}
