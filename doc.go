// Package shellflip restarts a running service into a new process without
// dropping a connection: a graceful restart, as Cloudflare's Rust crate
// shellflip does it, with listener passing and systemd integration on top.
//
// It is written for services that vendor it into security-sensitive
// binaries: no cgo, no dependency but golang.org/x/sys, the fork/exec done
// directly with syscall.ForkExec (no os/exec), sd_notify(3) and the control
// protocol written by hand.
//
// # How a restart goes
//
// The running (old) process calls Start once it is initialised. A restart is
// requested by a signal (SIGUSR1 by default) or by a client on the control
// socket (RequestRestart, or shellflip's own Rust client: the wire format is
// the same). The old process then
//
//  1. runs Lifecycle.PreSpawn;
//  2. starts the new process, the same program with the same arguments, on
//     a thread reserved for that since Start;
//  3. writes its state into a pipe with Lifecycle.SendState;
//  4. waits until the new process calls Ready (directly or through Start),
//     exits, or runs out of Config.ReadyTimeout;
//  5. on success runs Lifecycle.NewProcessReady (stop accepting there),
//     tells systemd the new main pid, answers the requesters with the new
//     pid (and every client still queued on the control socket: one
//     process serves it at a time), tells the new process it is now the
//     main process, and
//     ends its Restarter: the program drains (see ShutdownCoordinator) and
//     exits. On failure it kills and reaps the new process, runs
//     Lifecycle.NewProcessFailed, answers with the reason, and keeps serving.
//
// The new process, started with the same program, calls ReceiveState to read
// the state, claims its listeners with Listen (or ListenNamed, File, Conn),
// and calls Start, which tells the old process it is ready. A new process
// that crashes or hangs during initialisation costs the old one nothing but
// a failed restart.
//
// # What crosses from the old process to the new one
//
// Exactly these fds, and nothing else (fds leaked into the old process by
// its own parent are marked close-on-exec before the fork):
//
//   - 0, 1 and 2, as the old process has them;
//   - the registry's fds (see Listen) at 3 and up, with LISTEN_FDS,
//     LISTEN_FDNAMES and LISTEN_PID set as systemd sets them for socket
//     activation, so that fds passed by a restart and fds passed by systemd
//     arrive the same way and join the registry under their names;
//   - after those, the readiness socket (SHELLFLIP_READY_FD), the state pipe
//     (SHELLFLIP_STATE_FD) and the control socket (SHELLFLIP_CONTROL_FD).
//
// The package takes all of these over in its init function, before main
// runs: every fd named in the environment is checked (the number parses, the
// fd is open and of the expected type), marked close-on-exec, and its
// variable removed, so that nothing leaks into a process the program starts
// later. LISTEN_PID is "auto" in the environment the old process passes,
// since it cannot know the new pid before the fork; init replaces it with
// the real pid (FixupListenPID) first, so that other code reading it sees
// what systemd would have set.
//
// # systemd
//
// Under Type=notify, a fresh process sends READY=1 when it is ready. After a
// successful restart the old process sends MAINPID=<new> and READY=1 in one
// datagram and waits on a BARRIER until systemd has processed it, before it
// answers the requester or may exit; the new process sends nothing until
// then (SystemdNotifier returns ErrNotMain meanwhile). The default
// NotifyAccess=main is therefore enough. ExecReload= runs the restart client;
// Type=notify-reload is served by Config.NotifyReload. StoreFDs keeps the
// registry's listeners in systemd's fd store across a crash or a
// "systemctl restart".
//
// # Names, for readers of shellflip
//
//	shellflip (Rust)                         this package
//	RestartConfig                            Config
//	RestartConfig::try_into_restart_task     Start (returns a *Restarter)
//	the restart task's future                Restarter.Wait, Restarter.Done
//	RestartConfig::request_restart           RequestRestart
//	startup_complete                         Ready
//	receive_from_old_process                 ReceiveState
//	fixup_systemd_env                        FixupListenPID (run by init)
//	LifecycleHandler::pre_new_process        Lifecycle.PreSpawn
//	LifecycleHandler::send_to_new_process    Lifecycle.SendState
//	LifecycleHandler::new_process_failed     Lifecycle.NewProcessFailed
//	RestartConfig::exit_on_error             Config.ExitOnError (default false)
//	shutdown::ShutdownCoordinator            ShutdownCoordinator
//	shutdown::ShutdownHandle                 ShutdownHandle
//	shutdown::ShutdownSignal                 ShutdownHandle.Done
//
// # The restart thread and seccomp
//
// Like shellflip, Start reserves one OS thread for forking: a goroutine
// locked to its thread, which never runs anything else. What that buys in Go
// is narrower than in Rust, and a program that confines itself should know
// exactly what:
//
//   - State that Linux keeps per thread and that the program changes on
//     other threads after Start stays as it was on the restart thread, and
//     the new process inherits the restart thread's: a seccomp filter
//     installed without SECCOMP_FILTER_FLAG_TSYNC, capabilities dropped with
//     capset(2) (not syscall.AllThreadsSyscall), a Landlock ruleset. But in
//     Go such per-thread confinement protects little: the runtime moves
//     goroutines between threads, and creates new threads by cloning
//     whichever thread it is on, confined or not.
//   - A filter installed with TSYNC, as Go programs must to confine all
//     their goroutines (and as syscall.AllThreadsSyscall does for setuid and
//     friends), applies to the restart thread too. Such a filter must allow
//     the restart path's syscalls; SECURITY.md lists them. A filter that
//     answers a disallowed syscall with SIGSYS kills the process; one that
//     answers with an errno turns into a failed restart, reported to the
//     requester, with the old process still serving.
//   - The package does not use pidfds, which the runtime probes in ways that
//     SIGSYS-answering filters have killed (golang/go#69065), nor Pdeathsig,
//     which follows the forking thread rather than the process
//     (golang/go#27505) and which a new process meant to outlive the old
//     one must not have anyway.
//
// # Platforms
//
// Linux is the platform the package is built and tested for. darwin and
// FreeBSD get the same behaviour without the Linux-only parts (the control
// socket's mode is set right after bind instead of before it, and the child
// is reaped without waitid(WNOWAIT)). On other platforms the package
// compiles and every entry point returns ErrNotSupported.
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
