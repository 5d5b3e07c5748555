// Package shellflip restarts a running service into a new process without
// dropping a connection or losing state, as Cloudflare's Rust crate
// shellflip does, with listener passing and systemd integration. The README
// maps shellflip's names to this package's.
//
// It is written to be vendored into security-sensitive binaries: no cgo, no
// dependency but golang.org/x/sys, fork/exec by syscall.ForkExec (not
// os/exec), sd_notify(3) and the control protocol written by hand, and
// everything that comes from another process validated.
//
// The package is built and tested for Linux. darwin and FreeBSD are built,
// not tested, and lack the Linux-only refinements (the control socket's mode
// is set after bind, the child is reaped without waitid(WNOWAIT)). Elsewhere
// it compiles, and every entry point returns ErrNotSupported or does nothing.
//
// # How a restart goes
//
// The running (old) process calls Start once it is initialised. A restart is
// requested by a signal (SIGUSR1 by default), on the control socket
// (RequestRestart, or shellflip's Rust client: the wire format is the same),
// or by Restarter.Restart. The old process starts the program again
// (Config.Path) and serves it the state (Lifecycle.SendState, ReceiveState)
// until it is ready (its Start), gives up (GiveUp), exits or times out
// (Config.ReadyTimeout). On success the PID file, systemd,
// Lifecycle.NewProcessReady, the requesters and then the new process learn
// of it, in that order: the new process's Start returns (the commit point),
// and the old process's Restarter ends, to drain (ShutdownCoordinator) and
// exit. On failure the new process is rejected, killed and reaped, and
// Lifecycle.NewProcessFailed runs: a new process that crashes, hangs or
// cannot use the state costs the old one nothing but a failed restart, whose
// error says why.
//
// Exactly these fds cross to the new process: 0, 1 and 2; the registry's
// fds (Listen, FD, Add) from 3, named by LISTEN_FDS, LISTEN_FDNAMES and
// LISTEN_PID as systemd names those of socket activation, so that both
// arrive alike; then the readiness socket, the state pipe and the control
// socket, named by SHELLFLIP_* variables. Fds that leaked into the old
// process from its own parent are marked close-on-exec before the fork.
// Before main runs, the new process's init checks each fd named in the
// environment (open, inherited, of the expected type), marks it
// close-on-exec and removes its variable; LISTEN_PID and WATCHDOG_PID
// arrive as "auto", and init sets them to its pid, as systemd would.
//
// # systemd
//
// Under Type=notify, Start sends READY=1. After a successful restart the old
// process, still the main process, sends MAINPID=<new> and waits on a
// BARRIER until systemd has processed it; the new process then sends READY=1,
// which ends a Type=notify-reload reload. No process sends anything while it
// is not the main process (Notify returns ErrNotMain), so the default
// NotifyAccess=main suffices. The watchdog passes to the new process with
// everything else (WatchdogInterval). StoreFDs keeps the registry's sockets
// in systemd's fd store across a crash or a "systemctl restart".
//
// # seccomp
//
// A seccomp filter survives execve: a confined process could restart only
// with fork and exec allowed, and under all its predecessors' filters.
// NewBroker, called before the lockdown, starts the program again as an
// unfiltered restart broker; Config.Broker sends restarts there, so that the
// confined process makes no fork, exec, wait or kill, and each generation
// runs under its own filter alone (examples/locked). The package uses no
// pidfds, whose probes SIGSYS-answering filters have killed Go programs for
// (golang/go#69065), nor Pdeathsig, which follows the forking thread
// (golang/go#27505). SECURITY.md lists the system calls of each step.
package shellflip

import "errors"

var (
	// ErrNotSupported is returned by every entry point on platforms other
	// than Linux, darwin and FreeBSD.
	ErrNotSupported = errors.New("shellflip: not supported on this platform")

	// ErrRestartFailed matches the error RequestRestart returns when the
	// service tried to restart and failed.
	ErrRestartFailed = errors.New("shellflip: restart failed")

	// ErrNotMain is returned by Notify and StoreFDs outside the service's
	// main process, whose messages alone systemd reads: in a process a
	// restart started until its Start returns, and once it has handed over.
	ErrNotMain = errors.New("shellflip: not the service's main process")
)
