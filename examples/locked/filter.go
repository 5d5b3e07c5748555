//go:build linux && amd64

package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The lockdown: a seccomp filter, assembled here by hand, that allows the
// system calls in syscalls and kills the process on any other. It is
// installed on every thread at once (SECCOMP_FILTER_FLAG_TSYNC): in Go a
// filter on one thread confines nothing, since goroutines move between
// threads and new threads are cloned from any of them.
//
// The table was made by tracing this program (strace -f) through its start,
// requests, restarts and drains, and is checked by running it: the tests
// restart it under this filter, with KILL_PROCESS for anything missing.
// SECURITY.md's table of a locked process's system calls is checked against
// it (TestSecurityTable). amd64 only: the table's numbers are amd64's, and
// another architecture's table could not be checked here by running it.

// rule is a system call and what the filter answers it.
type rule struct {
	name string
	nr   uint32
	ret  uint32 // SECCOMP_RET_ALLOW, or SECCOMP_RET_ERRNO with an errno
	who  string // who makes it, for SECURITY.md
}

const (
	allow  = unix.SECCOMP_RET_ALLOW
	kill   = unix.SECCOMP_RET_KILL_PROCESS
	eperm  = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
	enosys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)

	// x32Bit marks the x32 ABI's system call numbers, which reach the
	// same kernel functions as amd64's under other numbers.
	x32Bit = 0x40000000
)

// syscalls is the list, in the order the filter tests them: the most
// frequent first. clone is not in it: the filter allows it only to create
// threads (cloneRule).
var syscalls = []rule{
	{"futex", unix.SYS_FUTEX, allow, "runtime: locks, sleeping threads"},
	{"epoll_pwait", unix.SYS_EPOLL_PWAIT, allow, "runtime: the network poller"},
	{"nanosleep", unix.SYS_NANOSLEEP, allow, "runtime: short sleeps"},
	{"read", unix.SYS_READ, allow, "net; library: the readiness socket, the state, the broker's answers"},
	{"write", unix.SYS_WRITE, allow, "net, logs; library: the readiness socket, the state"},
	{"epoll_ctl", unix.SYS_EPOLL_CTL, allow, "runtime: the network poller"},
	{"accept4", unix.SYS_ACCEPT4, allow, "net: HTTP; library: the control socket"},
	{"close", unix.SYS_CLOSE, allow, "net; library"},
	{"setsockopt", unix.SYS_SETSOCKOPT, allow, "net: accepted connections (TCP_NODELAY, keep-alive)"},
	{"getsockname", unix.SYS_GETSOCKNAME, allow, "net; library: the control socket"},
	{"getpeername", unix.SYS_GETPEERNAME, allow, "net"},
	{"getsockopt", unix.SYS_GETSOCKOPT, allow, "net: SO_ERROR; library: SO_PEERCRED, SO_ACCEPTCONN, SO_TYPE"},
	{"shutdown", unix.SYS_SHUTDOWN, allow, "net: HTTP (CloseWrite)"},
	{"sched_yield", unix.SYS_SCHED_YIELD, allow, "runtime"},
	{"getpid", unix.SYS_GETPID, allow, "runtime: signals; library: the PID 1 check"},
	{"gettid", unix.SYS_GETTID, allow, "runtime: signals"},
	{"tgkill", unix.SYS_TGKILL, allow, "runtime: preempting goroutines (SIGURG), dying of a signal"},
	{"rt_sigreturn", unix.SYS_RT_SIGRETURN, allow, "runtime: returning from a signal handler"},
	{"rt_sigprocmask", unix.SYS_RT_SIGPROCMASK, allow, "runtime: new threads, signals"},
	{"rt_sigaction", unix.SYS_RT_SIGACTION, allow, "runtime, os/signal: dying of a signal, signal.Stop"},
	{"sigaltstack", unix.SYS_SIGALTSTACK, allow, "runtime: new threads"},
	{"restart_syscall", unix.SYS_RESTART_SYSCALL, allow, "kernel: resuming a sleep that a signal interrupted"},
	{"clock_gettime", unix.SYS_CLOCK_GETTIME, allow, "runtime: time, where the vDSO falls back to the system call"},
	{"mmap", unix.SYS_MMAP, allow, "runtime: memory"},
	{"munmap", unix.SYS_MUNMAP, allow, "runtime: memory"},
	{"madvise", unix.SYS_MADVISE, allow, "runtime: returning memory to the kernel"},
	{"sched_getaffinity", unix.SYS_SCHED_GETAFFINITY, allow, "runtime: GOMAXPROCS, checked each second"},
	{"pread64", unix.SYS_PREAD64, allow, "runtime: the cgroup CPU limit, checked each second (files opened at start)"},
	{"exit", unix.SYS_EXIT, allow, "runtime: ending a thread"},
	{"exit_group", unix.SYS_EXIT_GROUP, allow, "runtime: exiting"},
	{"fcntl", unix.SYS_FCNTL, allow, "os, net; library: F_DUPFD_CLOEXEC, F_SETPIPE_SZ, O_NONBLOCK"},
	{"fstat", unix.SYS_FSTAT, allow, "os"},
	{"newfstatat", unix.SYS_NEWFSTATAT, allow, "library: the control socket's file (lstat)"},
	{"socketpair", unix.SYS_SOCKETPAIR, allow, "library, a restart: the readiness socket"},
	{"pipe2", unix.SYS_PIPE2, allow, "library, a restart: the state pipe; sd_notify's barrier"},
	{"sendmsg", unix.SYS_SENDMSG, allow, "library, a restart: fds to the broker (SCM_RIGHTS); sd_notify"},
	{"socket", unix.SYS_SOCKET, allow, "library: binding the control socket, the stale socket check, sd_notify"},
	{"connect", unix.SYS_CONNECT, allow, "library: the stale socket check, sd_notify"},
	{"fchmod", unix.SYS_FCHMOD, allow, "library: binding the control socket (mode 0600 before bind)"},
	{"bind", unix.SYS_BIND, allow, "library: binding the control socket (a fresh start)"},
	{"listen", unix.SYS_LISTEN, allow, "library: binding the control socket (a fresh start)"},
	{"fchmodat", unix.SYS_FCHMODAT, allow, "library: the control socket's mode, under a umask that narrowed it"},
	{"renameat", unix.SYS_RENAMEAT, allow, "library: taking a stale control socket aside"},
	{"renameat2", unix.SYS_RENAMEAT2, allow, "library: putting back what is not a stale socket"},
	{"linkat", unix.SYS_LINKAT, allow, "library: putting back, where renameat2 lacks RENAME_NOREPLACE"},
	{"unlinkat", unix.SYS_UNLINKAT, allow, "library: a stale control socket, an unclaimed unix listener's file"},
	{"close_range", unix.SYS_CLOSE_RANGE, allow, "library: closing inherited fds nobody claimed"},
	{"splice", unix.SYS_SPLICE, allow, "net: io.Copy from a socket (Go falls back only on EINVAL)"},
	{"prctl", unix.SYS_PRCTL, eperm, "runtime: naming memory (PR_SET_VMA), which it does without"},
	{"clone3", unix.SYS_CLONE3, enosys, "runtime, os: tried first; Go falls back to clone (golang/go#69065)"},
	{"pidfd_open", unix.SYS_PIDFD_OPEN, enosys, "os: probed (golang/go#69065)"},
	{"pidfd_send_signal", unix.SYS_PIDFD_SEND_SIGNAL, enosys, "os: probed (golang/go#69065)"},
}

// cloneRule is clone's entry: allowed with CLONE_THREAD (the runtime's new
// threads); a new process is answered EPERM, not killed, so that a restart
// without a broker fails and reports why, and the server keeps serving.
var cloneRule = rule{"clone", unix.SYS_CLONE, allow, "runtime: new threads; new processes get EPERM"}

// filter assembles the program. The checks come first: the architecture
// (a system call number means nothing under another), and no x32 numbers.
func filter() []unix.SockFilter {
	stmt := func(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }
	jeq := func(k uint32, jt, jf uint8) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: k, Jt: jt, Jf: jf}
	}
	const (
		ld     = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		ret    = unix.BPF_RET | unix.BPF_K
		offNr  = 0  // struct seccomp_data: nr
		offArc = 4  // arch
		offArg = 16 // args[0], its low 32 bits (little-endian)
	)
	p := []unix.SockFilter{
		stmt(ld, offArc),
		jeq(unix.AUDIT_ARCH_X86_64, 1, 0),
		stmt(ret, kill),
		stmt(ld, offNr),
		{Code: unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K, K: x32Bit, Jt: 0, Jf: 1},
		stmt(ret, kill),
	}
	for _, r := range syscalls {
		p = append(p, jeq(r.nr, 0, 1), stmt(ret, r.ret))
	}
	return append(p,
		jeq(cloneRule.nr, 0, 4),
		stmt(ld, offArg),
		unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, K: unix.CLONE_THREAD, Jt: 0, Jf: 1},
		stmt(ret, allow),
		stmt(ret, eperm),
		stmt(ret, kill),
	)
}

// lockDown sets no_new_privs and installs the filter on every thread.
// Both are for good: nothing undoes them, and the process's children
// inherit them.
func lockDown() error {
	if cgo {
		// The table lists what the Go runtime calls. A binary built with
		// cgo starts its threads with libc's pthread_create, whose calls
		// (mprotect first) it does not have: it would die of SIGSYS.
		return errors.New("built with cgo: the filter allows the Go runtime's system calls, not libc's; build locked with CGO_ENABLED=0")
	}
	p := filter()
	prog := unix.SockFprog{Len: uint16(len(p)), Filter: &p[0]}
	// no_new_privs is set on this thread (seccomp requires it of the
	// caller without CAP_SYS_ADMIN), and TSYNC gives it to every thread
	// along with the filter: both calls must come from the same thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return os.NewSyscallError("prctl(PR_SET_NO_NEW_PRIVS)", err)
	}
	tid, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(p)
	if errno != 0 {
		return os.NewSyscallError("seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)", errno)
	}
	if tid != 0 {
		// TSYNC names a thread that could not take the filter (it has
		// another filter of its own), and installs it on none.
		return fmt.Errorf("seccomp: thread %d cannot take the filter", tid)
	}
	return nil
}
