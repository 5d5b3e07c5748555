//go:build linux || darwin || freebsd

package shellflip

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Config says how and when to restart. The zero value restarts on SIGUSR1
// into the same program, with no control socket.
type Config struct {
	// SocketPath is the control socket's path; "" means none. The socket
	// file is created with mode 0600 and passes to the new process, so it
	// stays bound across restarts.
	SocketPath string

	// Signal triggers a restart; nil means SIGUSR1.
	Signal os.Signal

	// Env holds KEY=value pairs for the new process, overriding this
	// process's variables of the same name. The variables the library sets
	// (LISTEN_*, WATCHDOG_PID, SHELLFLIP_*) are refused.
	Env []string

	// Lifecycle holds hooks into the restart; nil means none.
	Lifecycle *Lifecycle

	// ExitOnError ends the Restarter after a failed restart, as shellflip
	// does. By default the old process reports the failure and keeps
	// serving, restart requests included: a bad deploy should not take
	// down a service that works.
	ExitOnError bool

	// ReadyTimeout bounds the time from the spawn to the new process's
	// readiness; a new process that takes longer is killed and reaped.
	// Zero means a minute.
	ReadyTimeout time.Duration

	// Path is the program to run and Args its command line, Args[0]
	// included. By default they are this process's: the path it was
	// started from (as the shell or service manager resolved it) if that
	// named the running program at initialisation, so that a deploy that
	// renames a new binary into place is picked up, else the running
	// executable. A program file that is not executable fails the restart;
	// one that is gone is replaced by the running executable (on Linux
	// /proc/self/exe, even if deleted).
	Path string
	Args []string

	// NotifyReload is for units of Type=notify-reload (systemd 253 and
	// later), which send ReloadSignal= (SIGHUP by default: set Signal to
	// match) and wait for RELOADING=1, then READY=1. A restart by Signal
	// sends RELOADING=1; the new process's READY=1 ends the reload or, if
	// the restart fails, this process's, with a STATUS= that says why.
	NotifyReload bool

	// PIDFile, if set, names the service's main process for supervisors
	// that read PIDFile=. A fresh process writes it before it is ready
	// (Start fails if it cannot); after a restart the old process writes
	// the new pid before systemd or the requesters learn of it or, if it
	// cannot or dies first, the new process does. Writes are atomic (a
	// temporary file, renamed); no process removes the file.
	PIDFile string

	// Logger receives the library's logs; nil means none. The new
	// process's pid is logged as "new_pid".
	Logger *slog.Logger

	// Broker, if set, starts the new processes (see NewBroker). Path, Args
	// and Env must then be unset: the broker decides what runs.
	Broker *Broker
}

// Lifecycle holds hooks into the restart, each optional. They run one
// restart at a time, and must not call Stop or Restart, which wait for the
// restart to end.
//
// A restart that hands over state has a window in which the old process
// holds its state still: from the call of SendState until exactly one of
// NewProcessReady and NewProcessFailed runs, once, whatever happens
// (success, a new process that dies or gives up, the ready timeout, Stop).
type Lifecycle struct {
	// PreSpawn runs before the new process is started. An error cancels the
	// restart, and no other hook runs.
	PreSpawn func(ctx context.Context) error

	// SendState runs when the new process asks for the state (ReceiveState)
	// and writes it to w, which is closed when it returns; writes fail
	// rather than block past the ready timeout. An error fails the restart.
	SendState func(ctx context.Context, w io.Writer) error

	// NewProcessReady runs when the new process is ready and systemd (if
	// any) knows it as the main process, just before the requesters and
	// the new process learn of the success, which the hook cannot undo.
	// Stop accepting here (the new process has its own listeners), and
	// from now on pass requests that would change state to the new process.
	NewProcessReady func(ctx context.Context, newPid int)

	// NewProcessFailed runs when the new process was started but the
	// restart failed, after it was killed and reaped: undo here what was
	// done for the handover. Its ctx is the Restarter's, which may be done
	// (Stop): the hook runs all the same.
	NewProcessFailed func(ctx context.Context, err error)
}

// Restarter serves restart requests until one succeeds or restarts become
// impossible. Create it with Start.
type Restarter struct {
	cfg      Config
	hooks    Lifecycle
	log      *slog.Logger
	ctl      *controlServer // nil without a control socket
	sig      chan os.Signal
	spawner  *spawner             // nil with a broker
	calls    chan *restartRequest // from Restart
	ctx      context.Context      // Start's, until Stop
	cancel   context.CancelFunc
	notReady error // the ready timeout's cause, made once

	done chan struct{}
	pid  int // the new process, after a successful restart
	err  error
}

// Start prepares this process for restarts and declares it ready. Call it
// once initialisation is complete: listeners claimed and, in a process
// started by a restart, the state received (ReceiveState). Cancelling ctx
// ends the Restarter, as Stop does.
//
// It binds the control socket (or takes it over from the old process) and
// catches the restart signal. A fresh process then writes the PID file and
// tells systemd READY=1. A process started by a restart tells the old
// process it is ready and returns once the old process has made it the
// main process: the commit point, after which the old process will not
// kill it, and it may change state that the old process also changes. If
// the old process rejects it instead, Start returns an error and the
// program should exit. A restart signal that arrives before then is
// dropped: sent to every process of the service, it is meant for the old
// one. Once ready, Start closes the inherited fds the program did not claim.
func Start(ctx context.Context, cfg Config) (*Restarter, error) {
	// fail tells the old process (if any) why, rather than let it see only
	// an exit status, and lets a restart signal take its default course.
	fail := func(err error) (*Restarter, error) {
		stopEarlySignals()
		GiveUp(err)
		return nil, err
	}
	if err := inherited.err; err != nil {
		return fail(err)
	}
	r := &Restarter{cfg: cfg, log: cmp.Or(cfg.Logger, slog.New(slog.DiscardHandler)), done: make(chan struct{}), calls: make(chan *restartRequest)}
	if cfg.Lifecycle != nil {
		r.hooks = *cfg.Lifecycle
	}
	if r.cfg.ReadyTimeout <= 0 {
		r.cfg.ReadyTimeout = time.Minute
	}
	r.notReady = fmt.Errorf("not ready within %v", r.cfg.ReadyTimeout)
	if r.cfg.Signal == nil {
		r.cfg.Signal = syscall.SIGUSR1
	}
	if n, ok := r.cfg.Signal.(syscall.Signal); !ok || !validSignal(int(n)) {
		return fail(fmt.Errorf("shellflip: Config.Signal %v cannot be caught", r.cfg.Signal))
	}
	if r.cfg.Args == nil {
		r.cfg.Args = os.Args
	}
	if len(r.cfg.Args) == 0 {
		return fail(errors.New("shellflip: Config.Args is empty"))
	}
	for _, kv := range r.cfg.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fail(fmt.Errorf("shellflip: Config.Env entry %q is not KEY=value", kv))
		}
		if reservedEnv(k) {
			return fail(fmt.Errorf("shellflip: Config.Env may not set %s: the library sets it for the new process", k))
		}
	}
	if cfg.Broker != nil {
		if cfg.Path != "" || cfg.Args != nil || cfg.Env != nil {
			return fail(errors.New("shellflip: Config.Path, Args and Env cannot be set with a Broker, which runs the program as this process was started"))
		}
		if err := cfg.Broker.check(); err != nil {
			return fail(err)
		}
	}

	r.sig = make(chan os.Signal, 1) // signal.Notify needs a buffer
	signal.Notify(r.sig, r.cfg.Signal)
	stopEarlySignals()
	ctlFD, ctlID := takeControlFD()
	var err error
	if r.cfg.SocketPath != "" {
		r.ctl, err = listenControl(r.cfg.SocketPath, ctlFD, ctlID, r.log)
	} else {
		closeFD(&ctlFD)
	}
	if err == nil {
		// Closed once ready, not before: with many fds that is work the
		// old process need not wait for; nor ever if this process failed,
		// when the old one serves on.
		if err = commit(r.log, r.sig, r.cfg.PIDFile); err == nil {
			closeUnclaimed(startedByRestart())
		}
	}
	if err != nil {
		signal.Stop(r.sig)
		if r.ctl != nil {
			r.ctl.abandon()
		}
		r.log.Error("shellflip: start", "err", err)
		return fail(err) // GiveUp sends nothing once ready, and the old process reads one reason
	}

	r.ctx, r.cancel = context.WithCancel(ctx)
	if r.ctl != nil {
		go r.ctl.serve()
	}
	if cfg.Broker == nil {
		r.spawner = newSpawner()
	}
	go r.run(r.ctx)
	return r, nil
}

// Done is closed when the Restarter has ended.
func (r *Restarter) Done() <-chan struct{} { return r.done }

// Wait blocks until the Restarter ends, and returns the new process's pid
// after a successful restart (drain and exit), or why restarts are no
// longer possible: Start's ctx was done, Stop was called, or a restart
// failed with ExitOnError set.
func (r *Restarter) Wait() (newPid int, err error) {
	<-r.done
	return r.pid, r.err
}

// Stop ends the Restarter, as cancelling Start's context does, and waits
// until it has ended. A restart in flight is abandoned and its new process
// killed, unless the new process was ready already: then the handover
// completes, and Wait returns the new pid. Safe to call more than once.
func (r *Restarter) Stop() {
	r.cancel()
	<-r.done
}

// Restart restarts now, as the signal or a control-socket request would,
// joining a restart in flight, and returns the new process's pid or why
// the restart failed or did not start (the Restarter has ended, or ctx is
// done first). After a successful restart, drain and exit.
func (r *Restarter) Restart(ctx context.Context) (int, error) {
	q := &restartRequest{reply: make(chan reply, 1)}
	select {
	case r.calls <- q:
	case <-r.done:
		if r.err != nil {
			return 0, r.err
		}
		return 0, errors.New("shellflip: this process was replaced already")
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	select {
	case o := <-q.reply:
		return o.pid, o.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// outcome is how a restart ended: the new process, or why not.
type outcome struct {
	pid   int
	child *childWatch
	ready *os.File // the readiness socket, to tell the new process it is main
	err   error
}

func (r *Restarter) run(ctx context.Context) {
	var reqs chan *restartRequest // nil, so never ready, without a control socket
	if r.ctl != nil {
		reqs = r.ctl.reqs
	}
	for {
		var waiting []*restartRequest
		reloading := false
		// A unit of Type=notify-reload waits for RELOADING=1 after each
		// ReloadSignal=, even one that joins a restart in flight.
		signaled := func() {
			if r.cfg.NotifyReload && !reloading {
				reloading = true
				if usec, err := monotonicUsec(); err == nil {
					notifySystemd(r.log, "RELOADING=1", "MONOTONIC_USEC="+strconv.FormatInt(usec, 10))
				}
			}
		}
		select {
		case <-ctx.Done():
			r.end(0, fmt.Errorf("shellflip: restarts stopped: %w", context.Cause(ctx)))
			return
		case <-r.sig:
			r.log.Info("shellflip: restart requested by signal")
			signaled()
		case q := <-reqs:
			r.log.Info("shellflip: restart requested on the control socket")
			waiting = append(waiting, q)
		case q := <-r.calls:
			r.log.Info("shellflip: restart requested by the program")
			waiting = append(waiting, q)
		}

		result := make(chan outcome, 1)
		go func() { result <- r.restart(ctx) }()
		var out outcome
	inFlight:
		for {
			// Requests that arrive meanwhile share this restart's outcome.
			select {
			case out = <-result:
				break inFlight
			case q := <-reqs:
				waiting = append(waiting, q)
			case q := <-r.calls:
				waiting = append(waiting, q)
			case <-r.sig:
				signaled()
			}
		}

		if out.err == nil {
			r.handOver(out, waiting)
			r.end(out.pid, nil)
			return
		}
		r.log.Error("shellflip: restart failed", "err", out.err)
		if reloading {
			// Leave the reloading state: this process carries on. The
			// status is cut short enough for the datagram to go.
			status := oneLine(out.err.Error())
			notifySystemd(r.log, "READY=1", "STATUS=restart failed: "+strings.ToValidUTF8(status[:min(len(status), 1024)], ""))
		}
		for _, q := range waiting {
			q.respond(r.log, 0, out.err)
		}
		if r.cfg.ExitOnError {
			r.end(0, out.err)
			return
		}
	}
}

// handOver makes the new process the main process. This process serves
// until the last moment: the PID file and systemd (to its barrier) learn
// the new pid; this process stops accepting (NewProcessReady, the control
// socket); the requesters learn the new pid; last, the new process learns
// that it is main, and its Start sends READY=1 and returns.
func (r *Restarter) handOver(out outcome, waiting []*restartRequest) {
	answer := [1]byte{msgMain}
	if r.cfg.PIDFile != "" {
		if err := writePIDFile(r.cfg.PIDFile, out.pid); err != nil {
			r.log.Error("shellflip: writing the PID file; the new process will try", "path", r.cfg.PIDFile, "err", err)
			answer[0] = msgMainPID
		}
	}
	if n, err := processNotifier(); err == nil && n != nil {
		notifyMu.Lock() // a Notify or StoreFDs under way ends within handOverTimeout
		ctx, cancel := context.WithTimeout(context.Background(), handOverTimeout)
		retired.Store(true)
		err = n.send(ctx, nil, "MAINPID="+strconv.Itoa(out.pid), "STATUS=")
		notifyMu.Unlock()
		if err == nil {
			err = n.barrier(ctx)
		}
		cancel()
		if err != nil {
			r.log.Error("shellflip: telling systemd about the new main process", "new_pid", out.pid, "err", err)
		}
	}
	if r.hooks.NewProcessReady != nil {
		r.hooks.NewProcessReady(r.ctx, out.pid)
	}
	if r.ctl != nil {
		// Stop accepting before anyone learns the outcome: a client that
		// asks again after its answer waits in the socket's backlog for
		// the new process, and gets a restart of its own.
		r.ctl.stopAccepting(out.pid, nil)
	}
	for _, q := range waiting {
		q.respond(r.log, out.pid, nil)
	}
	if _, err := out.ready.Write(answer[:]); err != nil {
		r.log.Warn("shellflip: telling the new process it is main", "new_pid", out.pid, "err", err)
	}
	out.ready.Close()
	r.log.Info("shellflip: restart complete", "new_pid", out.pid)
}

// end records how the Restarter ended and releases its resources. The
// restart signal stays caught, and is dropped: a draining process must not
// die (Go's default for SIGHUP) of a signal sent to its successor too.
func (r *Restarter) end(pid int, err error) {
	if r.ctl != nil {
		r.ctl.finish(pid, err, pid != 0)
	}
	r.spawner.close()
	r.pid, r.err = pid, err
	close(r.done)
}

// restart starts the new process, serves its requests for the state, and
// waits until it is ready, has failed, or ran out of time.
func (r *Restarter) restart(ctx context.Context) (out outcome) {
	if ctx.Err() != nil { // Stop came with a request, and run's select took the request
		return outcome{err: fmt.Errorf("restarts stopped: %w", context.Cause(ctx))}
	}
	if os.Getpid() == 1 {
		return outcome{err: errors.New("this process is PID 1 of its pid namespace: when it exits after a restart, the kernel ends the namespace and the new process with it; run it under a supervisor that follows MAINPID or a PID file (systemd), or under a parent that sets PR_SET_CHILD_SUBREAPER and outlives it (an init that exits with its child, as tini and dumb-init do, ends the namespace all the same)")}
	}
	if r.hooks.PreSpawn != nil {
		if err := r.hooks.PreSpawn(ctx); err != nil {
			return outcome{err: fmt.Errorf("pre-spawn hook: %w", err)}
		}
	}
	parent := ctx
	ctx, cancel := context.WithTimeoutCause(ctx, r.cfg.ReadyTimeout, r.notReady)
	defer cancel()
	var path, dir string
	if r.cfg.Broker == nil { // the broker finds the program itself
		var err error
		if path, dir, err = program(r.cfg.Path); err != nil {
			return outcome{err: err}
		}
		if r.cfg.Path == "" && path != startedAs.program {
			r.log.Warn("shellflip: no executable at the program's path; restarting the running executable", "path", startedAs.program, "executable", path)
		}
	}
	child, ready, stateW, err := r.spawn(ctx, path, dir)
	if err != nil {
		return outcome{err: err}
	}
	defer closeFD(&stateW)
	r.log.Info("shellflip: new process started", "new_pid", child.pid, "path", child.path)

	asked, err := awaitReady(ctx, child, ready, &stateW, r.hooks.SendState)
	if err == nil && !asked && r.hooks.SendState != nil {
		err = errNoState
	}
	if err == nil {
		return outcome{pid: child.pid, child: child, ready: ready}
	}

	// Say so first: if what was started is a wrapper, the kill reaches
	// only the wrapper, and its child must not take the closed socket for
	// the old process's death. Kill and reap before closing the socket, so
	// that the new process never sees it close while it lives.
	ready.SetWriteDeadline(time.Now().Add(time.Second))
	ready.Write(reasonMsg(msgRejected, err.Error()))
	child.kill()
	<-child.done
	ready.Close()
	if !child.killed() && errors.Is(err, errReadyEOF) {
		err = errExited // not by our SIGKILL: the closed socket is how we noticed
	}
	var gaveUp *gaveUpError
	if errors.As(err, &gaveUp) {
		err = fmt.Errorf("new process %d gave up: %s", child.pid, gaveUp.reason)
	} else {
		err = fmt.Errorf("new process %d: %w (%s)", child.pid, err, child.status())
	}
	if r.hooks.NewProcessFailed != nil {
		// The Restarter's context, not the expired ready timeout's.
		r.hooks.NewProcessFailed(parent, err)
	}
	return outcome{err: err}
}

// spawn starts the new process with exactly its fds: stdio, the registry's
// from 3 on, then the library's own. With a broker, the broker starts it,
// and ctx bounds the wait for its answer.
func (r *Restarter) spawn(ctx context.Context, path, dir string) (child *childWatch, ready *os.File, stateW int, err error) {
	readyP, readyC, err := newReadyPair()
	if err != nil {
		return nil, nil, -1, err
	}
	defer closeFD(&readyC) // the new process has its own copy
	if ready, err = pollableFile(readyP, "shellflip-ready"); err != nil {
		return nil, nil, -1, err
	}
	stateR, stateW, err := newStatePipe()
	defer closeFD(&stateR)
	if err == nil && r.cfg.Broker == nil {
		err = sealFDs()
	}
	if err != nil {
		ready.Close()
		closeFD(&stateW)
		return nil, nil, -1, err
	}
	files, names, unlock := passFDs([]uintptr{0, 1, 2}, nil)
	h := handoff{names: names, readyFD: len(files), stateFD: len(files) + 1, ctlFD: -1, signal: r.cfg.Signal}
	files = append(files, uintptr(readyC), uintptr(stateR))
	if r.ctl != nil {
		h.ctlFD, h.ctlID = len(files), r.ctl.id.String()
		files = append(files, uintptr(r.ctl.fd))
	}
	if r.cfg.Broker != nil {
		child, err = r.cfg.Broker.spawn(ctx, files, h)
	} else {
		var pid int
		if pid, err = r.spawner.spawn(path, r.cfg.Args, h.environ(os.Environ(), r.cfg.Env), dir, files); err == nil {
			child = watchChild(pid, path)
		} else {
			err = fmt.Errorf("starting %s: %w", path, err)
		}
	}
	unlock()
	if err != nil {
		if r.cfg.Broker != nil {
			// A broker that did not answer in time may have started it
			// all the same: say it is not wanted, as restart does.
			ready.Write(reasonMsg(msgRejected, err.Error()))
		}
		ready.Close()
		closeFD(&stateW)
		return nil, nil, -1, err
	}
	return child, ready, stateW, nil
}
