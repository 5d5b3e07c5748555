//go:build linux

package shellflip

import (
	"os"

	"golang.org/x/sys/unix"
)

// This file holds the Linux primitives under the restart path: fds that are
// close-on-exec from birth, sealing and closing fds in one system call,
// reaping the new process without a race against pid reuse, a peer's
// credentials, and renaming without replacing.

// defaultSignal triggers a restart when Config.Signal is nil.
var defaultSignal os.Signal = unix.SIGUSR1

// newReadyPair returns a connected pair of unix stream sockets: the old
// process keeps parent, the new one inherits child. A socketpair rather than
// a pipe because the old process answers on it once systemd knows the new
// pid (see ready in notify.go).
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

// acceptCloexec accepts a connection on the listening socket fd, as a
// close-on-exec socket.
func acceptCloexec(fd int) (int, error) {
	nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
	return nfd, err
}

// newStatePipe returns the handover pipe. Its buffer is raised to 1 MiB where
// the kernel allows (pipe(7): /proc/sys/fs/pipe-max-size, 1 MiB by default):
// with the default 64 KiB the writer and reader ping-pong on every 64 KiB,
// which costs a large handover a third of its throughput.
func newStatePipe() (r, w int, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return -1, -1, os.NewSyscallError("pipe2", err)
	}
	unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20) // best effort
	return p[0], p[1], nil
}

// sealFDs marks every fd above stderr close-on-exec, so that the new
// process receives exactly the fds listed for it: fds that leaked into this
// process from its own parent (a shell's, a supervisor's) stop here. Go
// creates its own fds close-on-exec, so for them this changes nothing.
// close_range(2) with CLOSE_RANGE_CLOEXEC does it in one call (Linux 5.11);
// older kernels get a walk of /proc/self/fd (see sealFDsWith).
func sealFDs() error {
	return sealFDsWith(func() error { return unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC) }, "/proc/self/fd")
}

// cloexecRange marks the fds from first to last close-on-exec, in one
// close_range(2) call where the kernel has it (5.11).
func cloexecRange(first, last int) {
	if first > last || unix.CloseRange(uint(first), uint(last), unix.CLOSE_RANGE_CLOEXEC) == nil {
		return
	}
	for fd := first; fd <= last; fd++ {
		unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
	}
}

// closeFDs closes fds, a run of consecutive fds at a time with one
// close_range(2) call (5.9).
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

// watchChild starts watching pid, a child of this process: a goroutine
// waits for it to exit, reaps it, and closes done.
//
// waitid(WNOWAIT) first learns that the child exited while leaving it a
// zombie, so its pid cannot be reused; only then, under c.mu, is it reaped.
// A kill under the same mutex therefore never hits a stranger that
// inherited the pid, the race that os.Process closes with pidfds. We avoid
// pidfds: a seccomp policy that answers their probes with SIGSYS kills Go
// programs (golang/go#69065), and waitid/wait4 are in every policy that
// allows fork.
func watchChild(pid int, path string) *childWatch {
	c := &childWatch{pid: pid, path: path, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		var info unix.Siginfo
		ignoringEINTR(func() (int, error) {
			return 0, unix.Waitid(unix.P_PID, c.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		})
		c.mu.Lock()
		defer c.mu.Unlock()
		ignoringEINTR(func() (int, error) { return unix.Wait4(c.pid, &c.ws, 0, nil) })
		c.gone = true
	}()
	return c
}

// peerUID returns the effective uid of the process at the other end of a
// connected unix socket, as the kernel recorded it at connect(2).
func peerUID(fd int) (int, error) {
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return -1, os.NewSyscallError("getsockopt SO_PEERCRED", err)
	}
	return int(cred.Uid), nil
}

// putBack renames from to to, unless something is at to: renameat2(2) with
// RENAME_NOREPLACE (Linux 3.15; some filesystems refuse the flag, and then
// link(2) and unlink(2) do the same for anything but a directory).
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
