// Package shellflip restarts a running service into a new process without
// dropping a connection or losing state: a graceful restart, as Cloudflare's
// Rust crate shellflip does it, with listener passing and systemd
// integration. The README maps shellflip's names to this package's.
//
// It is written to be vendored into security-sensitive binaries: no cgo, no
// dependency but golang.org/x/sys, fork/exec by syscall.ForkExec (not
// os/exec), sd_notify(3) and the control protocol written by hand, and
// everything that comes from another process validated.
//
// # How a restart goes
//
// The running (old) process calls Start once it is initialised. A restart is
// requested by a signal (SIGUSR1 by default), on the control socket
// (RequestRestart, or shellflip's Rust client: the wire format is the same),
// or by the program (Restarter.Restart). The old process starts the same
// program (see Config.Path) and serves its request for the state
// (ReceiveState, Lifecycle.SendState) until it is ready (its Start), gives
// up (GiveUp), exits, or runs out of Config.ReadyTimeout. On success the
// PID file, systemd, Lifecycle.NewProcessReady, the requesters and then the
// new process learn of it, in that order; the new process's Start returns
// (the commit point) and the old process's Restarter ends: it drains (see
// ShutdownCoordinator) and exits. On failure the new process is rejected,
// killed and reaped, Lifecycle.NewProcessFailed runs, and the old process
// keeps serving. A new process that crashes, hangs or cannot use the state
// costs the old one nothing but a failed restart, whose error says why.
//
// # What crosses from the old process to the new one
//
// Exactly these fds: 0, 1 and 2; the registry's fds (Listen, FD, Add) at 3
// and up, named by LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID as systemd
// names them for socket activation, so that both arrive the same way; and
// after those the readiness socket, the state pipe and the control socket,
// named by SHELLFLIP_* variables. Fds that leaked into the old process from
// its own parent are marked close-on-exec before the fork.
//
// The package's init takes them over before main runs: each fd named in the
// environment is checked (open, inherited, of the expected type), marked
// close-on-exec, and its variable removed. LISTEN_PID and WATCHDOG_PID
// arrive as "auto", which init replaces with the new pid, as systemd would
// have set them.
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
// A seccomp filter survives execve, so a confined process could restart
// only with fork and exec allowed, and each generation would run under all
// its predecessors' filters. NewBroker, called before the lockdown, starts
// the program again as an unfiltered restart broker, and Config.Broker sends
// restarts there: the confined process makes no fork, exec, wait or kill,
// and each generation runs under exactly its own filter (examples/locked).
// The package uses no pidfds, whose probes SIGSYS-answering filters have
// killed Go programs for (golang/go#69065), and no Pdeathsig, which follows
// the forking thread rather than the process (golang/go#27505). SECURITY.md
// lists the system calls of each step.
//
// # Platforms
//
// Linux is the platform the package is built and tested for. darwin and
// FreeBSD are built, not tested, and lack the Linux-only refinements (the
// control socket's mode is set after bind, and the child is reaped without
// waitid(WNOWAIT)). Elsewhere the package compiles, and every entry point
// returns ErrNotSupported or does nothing.
package shellflip

import "errors"

var (
	// ErrNotSupported is returned by every entry point on platforms other
	// than Linux, darwin and FreeBSD.
	ErrNotSupported = errors.New("shellflip: not supported on this platform")

	// ErrRestartFailed matches the error RequestRestart returns when the
	// service tried to restart and failed.
	ErrRestartFailed = errors.New("shellflip: restart failed")

	// ErrNotMain is returned by Notify and StoreFDs when this process is
	// not the service's main process (systemd would drop what it sent):
	// it was started by a restart and Start has not returned yet, or it
	// has handed the service over to a new process.
	ErrNotMain = errors.New("shellflip: not the service's main process")
)
