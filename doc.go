// Package shellflip restarts a running service into a new process without
// dropping a connection or losing state: a graceful restart, as Cloudflare's
// Rust crate shellflip does it, with listener passing and systemd
// integration on top.
//
// It is written for services that vendor it into security-sensitive
// binaries: no cgo, no dependency but golang.org/x/sys, the fork/exec done
// with syscall.ForkExec (no os/exec), sd_notify(3) and the control protocol
// written by hand, everything that comes from another process validated.
//
// # How a restart goes
//
// The running (old) process calls Start once it is initialised. A restart is
// requested by a signal (SIGUSR1 by default), by a client on the control
// socket (RequestRestart, or shellflip's own Rust client: the wire format is
// the same), or by the program (Restarter.Restart). The old process then
//
//  1. runs Lifecycle.PreSpawn, and starts the new process: the same program
//     (see Config.Path), with exactly the fds listed below;
//  2. when the new process asks for the state (ReceiveState), runs
//     Lifecycle.SendState, which writes it; from then on the old process
//     holds its state still;
//  3. waits until the new process is ready (it calls Start), gives up
//     (GiveUp), exits, or runs out of Config.ReadyTimeout;
//  4. on success writes the PID file, tells systemd the new main pid, runs
//     Lifecycle.NewProcessReady (stop accepting there, and pass requests
//     through to the new process), answers the requesters with the new
//     pid, tells the new process it is the main process (its Start returns:
//     the commit point), and ends its Restarter: the program drains (see
//     ShutdownCoordinator) and exits;
//  5. on failure tells the new process it is rejected, kills and reaps it,
//     runs Lifecycle.NewProcessFailed (release what was held), answers with
//     the reason, and keeps serving.
//
// A new process that crashes, hangs or cannot use the state during its
// initialisation costs the old one nothing but a failed restart, whose
// error says why.
//
// # What crosses from the old process to the new one
//
// Exactly these fds, and nothing else (fds that leaked into the old process
// from its own parent are marked close-on-exec before the fork):
//
//   - 0, 1 and 2, as the old process has them;
//   - the registry's fds (see Listen, FD, Add) at 3 and up, with LISTEN_FDS,
//     LISTEN_FDNAMES and LISTEN_PID set as systemd sets them for socket
//     activation, so that fds passed by a restart and fds passed by systemd
//     arrive the same way and join the registry under their names;
//   - after those, the readiness socket, the state pipe and the control
//     socket, named by SHELLFLIP_READY_FD, SHELLFLIP_STATE_FD and
//     SHELLFLIP_CONTROL_FD.
//
// The package takes all of them over in its init function, before main
// runs: every fd named in the environment is checked (the number parses,
// the fd is open, was inherited, and is of the expected type), marked
// close-on-exec, and its variable removed, so that nothing leaks into a
// process the program starts later. LISTEN_PID and WATCHDOG_PID arrive as
// "auto" (the old process cannot know the new pid before the fork); init
// sets them to the real pid, as systemd would have.
//
// # systemd
//
// Under Type=notify, Start sends READY=1. After a successful restart the old
// process, still the main process, sends MAINPID=<new> and waits on a
// BARRIER until systemd has processed it; the new process sends READY=1
// once it is main, which ends a Type=notify-reload reload. No process ever
// sends anything while it is not the main process (Notify returns
// ErrNotMain), so the default NotifyAccess=main is enough. The watchdog
// (WATCHDOG_USEC, WatchdogInterval) passes to the new process with
// everything else. StoreFDs keeps the registry's sockets in systemd's fd
// store across a crash or a "systemctl restart".
//
// # Names, for readers of shellflip
//
//	shellflip (Rust)                         this package
//	RestartConfig                            Config
//	RestartConfig::try_into_restart_task     Start (returns a *Restarter)
//	the restart task's future                Restarter.Wait, Restarter.Done
//	RestartConfig::request_restart           RequestRestart
//	startup_complete                         Start
//	receive_from_old_process                 ReceiveState
//	fixup_systemd_env                        done by the package's init
//	LifecycleHandler::pre_new_process        Lifecycle.PreSpawn
//	LifecycleHandler::send_to_new_process    Lifecycle.SendState
//	LifecycleHandler::new_process_failed     Lifecycle.NewProcessFailed
//	RestartConfig::exit_on_error             Config.ExitOnError (default false)
//	shutdown::ShutdownCoordinator            ShutdownCoordinator
//	shutdown::ShutdownHandle                 ShutdownHandle
//	shutdown::ShutdownSignal                 ShutdownHandle.Done
//
// # seccomp
//
// A Go program confines itself with a seccomp filter installed on all its
// threads (SECCOMP_FILTER_FLAG_TSYNC), and filters survive execve: a
// restart would need fork and exec in the filter, and every generation
// would run under all its predecessors' filters. The Go answer is a
// process: NewBroker, called before the lockdown, starts the program again
// as a restart broker, unfiltered, and Config.Broker sends restarts there.
// The locked process then makes no fork, exec, wait or kill, and each
// generation runs under exactly its own filter (examples/locked).
//
// The package uses no pidfds, which SIGSYS-answering filters have killed Go
// programs for probing (golang/go#69065), and no Pdeathsig, which follows
// the forking thread rather than the process (golang/go#27505). SECURITY.md
// lists the system calls of each step, and those of examples/locked's
// filter.
//
// # Platforms
//
// Linux is the platform the package is built and tested for. darwin and
// FreeBSD get the same behaviour without the Linux-only parts (the control
// socket's mode is set after bind rather than before, and the child is
// reaped without waitid(WNOWAIT)); they are built, not tested. On other
// platforms the package compiles, and every entry point returns
// ErrNotSupported or does nothing.
package shellflip

import "errors"

// The errors a caller may branch on (errors.Is).
var (
	// ErrNotSupported is returned by every entry point on platforms other
	// than Linux, darwin and FreeBSD.
	ErrNotSupported = errors.New("shellflip: not supported on this platform")

	// ErrRestartFailed matches the error RequestRestart returns when the
	// service tried to restart and failed.
	ErrRestartFailed = errors.New("shellflip: restart failed")

	// ErrNotMain is returned by Notify and StoreFDs when this process is
	// not the service's main process: it was started by a restart and
	// Start has not returned yet, or it has handed the service over to a
	// new process. systemd would drop what it sent (NotifyAccess=main).
	ErrNotMain = errors.New("shellflip: not the service's main process")
)
