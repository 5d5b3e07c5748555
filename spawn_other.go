//go:build darwin || freebsd

package shellflip

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// spawn_linux.go's functions for darwin and FreeBSD, written for what both
// have: no SOCK_CLOEXEC, accept4 or pipe2 (darwin), so new fds are marked
// close-on-exec under syscall.ForkLock, lest a fork in between leak them;
// no waitid(WNOWAIT) or SO_PEERCRED in golang.org/x/sys/unix.

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

func acceptCloexec(fd int) (int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	nfd, _, err := unix.Accept(fd)
	if err == nil {
		unix.CloseOnExec(nfd)
	}
	return nfd, err
}

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

// sealFDs: no close_range(2) here; /dev/fd lists the open fds.
func sealFDs() error { return sealFDsWith(func() error { return unix.ENOSYS }, "/dev/fd") }

func cloexecRange(first, last int) {
	for fd := first; fd <= last; fd++ {
		unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// watchChild: without waitid(WNOWAIT), a kill that loses the race against
// the reaping wait4 by microseconds could reach a process given the same
// pid, if the pid space wrapped around meanwhile.
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

// peerUID: LOCAL_PEERCRED, like SO_PEERCRED, gives the uid at connect(2).
func peerUID(fd int) (int, error) {
	cred, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
	if err != nil {
		return -1, os.NewSyscallError("getsockopt LOCAL_PEERCRED", err)
	}
	return int(cred.Uid), nil
}

// putBack: link(2) and unlink(2), for want of renameat2 (no directories).
func putBack(from, to string) error {
	if err := unix.Link(from, to); err != nil {
		return err
	}
	return unix.Unlink(from)
}
