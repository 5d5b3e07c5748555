//go:build darwin || freebsd

package shellflip

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The restart path's primitives on darwin and FreeBSD: spawn_linux.go's,
// without SOCK_CLOEXEC, pipe2, waitid(WNOWAIT) or SO_PEERCRED.

// newReadyPair: see spawn_linux.go. darwin has no SOCK_CLOEXEC, so the
// fds are marked under syscall.ForkLock: a fork between the two steps would
// leak them.
func newReadyPair() (parent, child int, err error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		return -1, -1, os.NewSyscallError("socketpair", err)
	}
	unix.CloseOnExec(fds[0])
	unix.CloseOnExec(fds[1])
	return fds[0], fds[1], nil
}

// socketCloexec: see spawn_linux.go; marked under ForkLock as newReadyPair.
func socketCloexec(family, typ int) (int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	fd, err := unix.Socket(family, typ, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	unix.CloseOnExec(fd)
	return fd, nil
}

// acceptCloexec: see spawn_linux.go; without accept4, under ForkLock.
func acceptCloexec(fd int) (int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	nfd, _, err := unix.Accept(fd)
	if err != nil {
		return -1, err
	}
	unix.CloseOnExec(nfd)
	return nfd, nil
}

// newStatePipe: see spawn_linux.go; created under ForkLock.
func newStatePipe() (r, w int, err error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	var p [2]int
	if err := unix.Pipe(p[:]); err != nil {
		return -1, -1, os.NewSyscallError("pipe", err)
	}
	unix.CloseOnExec(p[0])
	unix.CloseOnExec(p[1])
	return p[0], p[1], nil
}

// sealFDs: see spawn_linux.go. There is no close_range flag here to do it
// in one call; /dev/fd lists the open fds.
func sealFDs() error { return sealFDsWith(func() error { return unix.ENOSYS }, "/dev/fd") }

// cloexecRange: see spawn_linux.go; one fcntl a fd.
func cloexecRange(first, last int) {
	for fd := first; fd <= last; fd++ {
		unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
	}
}

// closeFDs: see spawn_linux.go; one close a fd.
func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// watchChild: see spawn_linux.go. Without waitid(WNOWAIT), a kill that
// loses the race against the reaping wait4 by microseconds could reach a
// process given the same pid, if the pid space wrapped around meanwhile,
// as with os.Process before pidfds.
func watchChild(pid int, path string) *childWatch {
	c := &childWatch{pid: pid, path: path, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		var ws unix.WaitStatus
		ignoringEINTR(func() (int, error) { return unix.Wait4(c.pid, &ws, 0, nil) })
		c.mu.Lock()
		defer c.mu.Unlock()
		c.ws, c.gone = ws, true
	}()
	return c
}

// peerUID: see spawn_linux.go. LOCAL_PEERCRED gives the credentials at
// connect(2), as SO_PEERCRED does on Linux.
func peerUID(fd int) (int, error) {
	cred, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
	if err != nil {
		return -1, os.NewSyscallError("getsockopt LOCAL_PEERCRED", err)
	}
	return int(cred.Uid), nil
}

// putBack: see spawn_linux.go; there is no renameat2 here, so link(2) and
// unlink(2) (which cannot move a directory).
func putBack(from, to string) error {
	if err := unix.Link(from, to); err != nil {
		return err
	}
	return unix.Unlink(from)
}
