//go:build linux

package shellflip

import (
	"os"

	"golang.org/x/sys/unix"
)

// newReadyPair returns the readiness socket; the new process inherits child.
func newReadyPair() (parent, child int, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, os.NewSyscallError("socketpair", err)
	}
	return fds[0], fds[1], nil
}

// socketCloexec creates a socket that is close-on-exec from birth.
func socketCloexec(family, typ int) (int, error) {
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	return fd, nil
}

// acceptCloexec accepts a connection on fd, close-on-exec.
func acceptCloexec(fd int) (int, error) {
	nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
	return nfd, err
}

// newStatePipe returns the state pipe with a 1 MiB buffer if pipe-max-size
// allows (pipe(7)): 64 KiB costs a large handover a third of its throughput.
func newStatePipe() (r, w int, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return -1, -1, os.NewSyscallError("pipe2", err)
	}
	unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20) // best effort
	return p[0], p[1], nil
}

// sealFDs marks every fd above stderr close-on-exec, leaked ones included,
// by close_range(2) (Linux 5.11) or sealFDsWith's fallbacks.
func sealFDs() error {
	return sealFDsWith(func() error { return unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC) }, "/proc/self/fd")
}

// cloexecRange marks the fds from first to last close-on-exec.
func cloexecRange(first, last int) {
	if first <= last && unix.CloseRange(uint(first), uint(last), unix.CLOSE_RANGE_CLOEXEC) != nil {
		for fd := first; fd <= last; fd++ {
			unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
		}
	}
}

// closeFDs closes fds, each run of consecutive fds in one close_range(2).
func closeFDs(fds []int) {
	for i := 0; i < len(fds); {
		j := i + 1
		for j < len(fds) && fds[j] == fds[j-1]+1 {
			j++
		}
		if j-i == 1 || unix.CloseRange(uint(fds[i]), uint(fds[j-1]), 0) != nil {
			for _, fd := range fds[i:j] {
				unix.Close(fd)
			}
		}
		i = j
	}
}

// watchChild starts watching pid, a child of this process. waitid(WNOWAIT)
// learns that it exited but leaves it a zombie, whose pid is not reused;
// only then, under c.mu, is it reaped, so a kill never hits a stranger: the
// race os.Process closes with pidfds, which we avoid (golang/go#69065).
func watchChild(pid int, path string) *childWatch {
	c := &childWatch{pid: pid, path: path, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		var info unix.Siginfo
		ignoringEINTR(func() (int, error) { return 0, unix.Waitid(unix.P_PID, c.pid, &info, unix.WEXITED|unix.WNOWAIT, nil) })
		c.mu.Lock()
		defer c.mu.Unlock()
		ignoringEINTR(func() (int, error) { return unix.Wait4(c.pid, &c.ws, 0, nil) })
		c.gone = true
	}()
	return c
}

// peerUID returns the effective uid a unix socket's peer had at connect(2).
func peerUID(fd int) (int, error) {
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return -1, os.NewSyscallError("getsockopt SO_PEERCRED", err)
	}
	return int(cred.Uid), nil
}

// putBack renames from to to unless something is at to: by renameat2(2)
// with RENAME_NOREPLACE or, where the filesystem refuses the flag, by
// link(2) and unlink(2), which cannot move a directory.
func putBack(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if err != unix.EINVAL {
		return err
	}
	if err := unix.Link(from, to); err != nil {
		return err
	}
	return unix.Unlink(from)
}
