package shellflip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// This file is the old process's side of a restart: the triggers, the
// restart loop, and the handle that reports how it ended.

var (
	// ErrNotSupported is returned by every entry point on platforms other
	// than Linux, darwin and FreeBSD.
	ErrNotSupported = errors.New("shellflip: not supported on this platform")

	// ErrRestartFailed matches (errors.Is) the error RequestRestart returns
	// when the service tried to restart and failed.
	ErrRestartFailed = errors.New("shellflip: restart failed")
)

// ErrOldProcessGone is returned by Ready when the old process exited or was
// killed before this process could tell it that it is ready.
var ErrOldProcessGone = errors.New("shellflip: the old process is gone")

// ErrNotMain is returned by the process-wide SdNotifier of a process started
// by a restart until systemd knows it as the service's main process.
var ErrNotMain = errors.New("shellflip: not yet the main process; systemd would drop this message")

// Environment variables that name the library's own fds in a process started
// by a restart. They follow the LISTEN_FDS block and are removed from the
// environment as soon as the package is initialised.
const (
	envReadyFD   = "SHELLFLIP_READY_FD"   // socketpair end: readiness byte out, "you are main" byte in
	envStateFD   = "SHELLFLIP_STATE_FD"   // pipe read end: state from the old process
	envControlFD = "SHELLFLIP_CONTROL_FD" // the control socket's listening socket
	envControlID = "SHELLFLIP_CONTROL_ID" // DEV:INO of the control socket's file, to tell whether the path still names it
	envSignal    = "SHELLFLIP_SIGNAL"     // the restart signal's number: caught from init on, so that it cannot kill the new process

	envListenPID     = "LISTEN_PID"
	envListenFDs     = "LISTEN_FDS"
	envListenFDNames = "LISTEN_FDNAMES"
	envWatchdogPID   = "WATCHDOG_PID"

	// listenPIDAuto stands in for the new process's pid in LISTEN_PID and
	// WATCHDOG_PID, which the old process cannot know before the fork; the
	// new process replaces it with its own pid at initialisation (see
	// FixupListenPID).
	listenPIDAuto = "auto"

	// listenFDsStart is SD_LISTEN_FDS_START from sd-daemon.h.
	listenFDsStart = 3

	// maxInheritedFDs bounds LISTEN_FDS before anything is allocated for it.
	maxInheritedFDs = 1 << 16
)

// Byte values on the readiness socket.
const (
	readyByte            = 'R' // new process to old: I am ready
	mainByte             = 'M' // old process to new: you are the main process now (systemd and the PID file know)
	mainWritePIDFileByte = 'P' // the same, but writing the PID file failed: write it yourself
	rejectedByte         = 'X' // old process to new: the restart failed; you are not wanted
)

// restartFailedError carries the service's explanation, with characters
// that are not printable escaped (as strconv.Quote escapes them): the text
// comes from another process, and is printed to terminals and logs.
type restartFailedError struct{ text string }

func (e *restartFailedError) Error() string {
	var b []byte
	for _, r := range e.text {
		if unicode.IsPrint(r) {
			b = utf8.AppendRune(b, r)
			continue
		}
		q := strconv.QuoteRuneToASCII(r)
		b = append(b, q[1:len(q)-1]...)
	}
	return string(b)
}

func (e *restartFailedError) Is(target error) bool { return target == ErrRestartFailed }

// DefaultReadyTimeout is how long a new process has to become ready when
// Config.ReadyTimeout is zero.
const DefaultReadyTimeout = time.Minute

// Config says how and when to restart. The zero value restarts on SIGUSR1
// into the same command line, with no control socket.
type Config struct {
	// SocketPath is the control socket's path; "" means no control socket.
	// The socket file is created with mode 0600 and passed to the new
	// process, so it stays bound across restarts.
	SocketPath string

	// Signal triggers a restart; nil means SIGUSR1.
	Signal os.Signal

	// Env holds extra KEY=value pairs for the new process; they override
	// variables of the same name in this process's environment.
	Env []string

	// Lifecycle holds hooks into the restart; nil means none.
	Lifecycle *Lifecycle

	// ExitOnError ends the Restarter after a failed restart. By default a
	// failed restart is reported, the old process keeps serving, and later
	// restart requests are honoured: a bad deploy should not take down a
	// service that works. (shellflip's default is the opposite.)
	ExitOnError bool

	// ReadyTimeout bounds the time from the spawn to the new process's
	// Ready; a new process that takes longer is killed and reaped. Zero
	// means DefaultReadyTimeout.
	ReadyTimeout time.Duration

	// Path is the program to run and Args its full command line, Args[0]
	// included. By default they are the program and arguments this process
	// started with, with a relative program path resolved against the
	// directory it started in (or looked up in $PATH, as the shell did), so
	// a deploy that replaces the binary at that path is picked up. If no
	// executable is at that path any more (a binary built by "go run" and
	// since removed, say), the running executable is used (on Linux
	// /proc/self/exe, which works even when its file was deleted), and
	// that is logged.
	Path string
	Args []string

	// NotifyReload is for units of Type=notify-reload (systemd 253 and
	// later), which send the unit's ReloadSignal= (SIGHUP by default; set
	// Signal to match) and then wait for RELOADING=1 and READY=1: a restart
	// triggered by Signal first sends RELOADING=1 with MONOTONIC_USEC; the
	// new process's MAINPID and READY=1 end the reload, and so does READY=1
	// from this process if the restart fails.
	NotifyReload bool

	// PIDFile, if set, names the service's main process for supervisors
	// that read PIDFile=: a fresh process writes its pid there before it
	// is ready, and after a successful restart the old process writes the
	// new pid there before it tells systemd or the requester. It is
	// written atomically (a temporary file in the same directory, then
	// rename), so a reader never sees it empty or half written, and no
	// process removes it.
	PIDFile string

	// Logger receives the library's logs; nil means none.
	Logger *slog.Logger
}

// Lifecycle holds hooks into the restart, each optional. They run on the
// restart loop's goroutine, one restart at a time; ctx is done when the new
// process's ready timeout passes or the Restarter is stopped.
type Lifecycle struct {
	// PreSpawn runs before the new process is started. An error cancels the
	// restart (NewProcessFailed is not called).
	PreSpawn func(ctx context.Context) error

	// SendState writes state for the new process, which reads it with
	// ReceiveState. The stream is closed when SendState returns. If it
	// returns an error, the new process is killed and the restart fails.
	// Writes fail rather than block past ctx's deadline.
	SendState func(ctx context.Context, w io.Writer) error

	// NewProcessFailed runs when the new process was started but the
	// restart failed, so that changes made for the handover can be undone.
	NewProcessFailed func(ctx context.Context, err error)

	// NewProcessReady runs when the new process is ready, before systemd
	// and the requesters learn of it. Stop accepting here (close this
	// process's listeners: the new process has its own copies): both
	// processes accept on the same sockets, and a client that connects
	// after the requester was told the restart is done should reach the
	// new process. The restart has succeeded whatever the hook does.
	NewProcessReady func(ctx context.Context, pid int)
}

// Process is a new process that became ready.
type Process struct {
	// Pid is the new process's pid.
	Pid int

	ready *os.File // readiness socket: the "you are main" byte goes out here
	watch *childWatch
}

// Restarter serves restart requests until one succeeds or restarts become
// impossible. Create it with Start.
type Restarter struct {
	cfg     Config
	log     *slog.Logger
	ctl     *controlServer // nil without a control socket
	sig     chan os.Signal
	spawner *spawner
	calls   chan *restartRequest // from Restart
	// notReady is the ready timeout's cause, made once.
	notReady error
	ctx      context.Context // Start's, until Stop
	cancel   context.CancelFunc

	done chan struct{}
	proc *Process
	err  error
}

// Start prepares this process for restarts and declares it ready: it binds
// (or takes over from the old process) the control socket, starts watching
// for the restart signal, starts the thread that will fork the new process,
// and calls Ready. Call it when initialisation is complete: after listeners
// were claimed and state was received. No restart request is acted on before
// Start returns; requests that arrive earlier wait.
//
// Programs that confine themselves with seccomp, capabilities or Landlock
// should call Start before doing so; see the package documentation for what
// that does and does not buy.
//
// The returned Restarter ends when a restart succeeded (Wait returns the new
// process: drain and exit), when restarts became impossible (Wait returns
// why), or when ctx is done.
func Start(ctx context.Context, cfg Config) (*Restarter, error) {
	if err := platformSupported(); err != nil {
		return nil, err
	}
	if err := inheritanceErr(); err != nil {
		return nil, err
	}
	r := &Restarter{cfg: cfg, log: cfg.Logger, done: make(chan struct{}), calls: make(chan *restartRequest)}
	r.ctx, r.cancel = context.WithCancel(ctx)
	started := false
	defer func() {
		if !started {
			r.cancel()
		}
	}()
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.cfg.ReadyTimeout <= 0 {
		r.cfg.ReadyTimeout = DefaultReadyTimeout
	}
	r.notReady = fmt.Errorf("not ready within %v", r.cfg.ReadyTimeout)
	if r.cfg.Signal == nil {
		r.cfg.Signal = defaultSignal
	}
	if r.cfg.Args == nil {
		r.cfg.Args = os.Args
	}
	if len(r.cfg.Args) == 0 {
		return nil, errors.New("shellflip: Config.Args is empty")
	}
	for _, kv := range r.cfg.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("shellflip: Config.Env entry %q is not KEY=value", kv)
		}
		if reservedEnv(k) {
			return nil, fmt.Errorf("shellflip: Config.Env may not set %s: the library sets it for the new process", k)
		}
	}

	ctlFD, ctlID := takeControlFD()
	if cfg.SocketPath != "" {
		var err error
		if r.ctl, err = listenControl(cfg.SocketPath, ctlFD, ctlID, r.log); err != nil {
			return nil, err
		}
	} else if ctlFD >= 0 {
		closeFDNum(ctlFD)
	}

	r.sig = make(chan os.Signal, 1) // signal.Notify needs a buffer
	signal.Notify(r.sig, r.cfg.Signal)
	stopEarlySignals()

	// A fresh process names itself in the PID file before it is ready; a
	// process started by a restart is named by the old one (handOver),
	// before systemd learns of it and before the requester does, or, if
	// the old one died or failed to, names itself once it is main.
	if cfg.PIDFile != "" && !StartedByRestart() {
		if err := writePIDFile(cfg.PIDFile, os.Getpid()); err != nil {
			signal.Stop(r.sig)
			if r.ctl != nil {
				r.ctl.finish(0, err, false)
			}
			return nil, fmt.Errorf("shellflip: writing the PID file: %w", err)
		}
	}
	if err := Ready(); err != nil {
		if !errors.Is(err, ErrOldProcessGone) {
			signal.Stop(r.sig)
			if r.ctl != nil {
				r.ctl.finish(0, err, false)
			}
			return nil, err
		}
		r.log.Warn("shellflip: the old process went away before this one was ready; carrying on alone", "err", err)
	}
	// Until the old process has made this one the main process, a restart
	// signal is meant for the old one (a signal sent to every process, as
	// pkill or systemctl kill send it): dropped, not acted on.
	for waiting := true; waiting; {
		select {
		case <-MainChan():
			waiting = false
		case <-rejected:
			signal.Stop(r.sig)
			if r.ctl != nil {
				r.ctl.finish(0, errRejected, false)
			}
			return nil, errRejected
		case <-r.sig:
			r.log.Warn("shellflip: restart signal ignored: this process is not the main process yet")
		}
	}
	if StartedByRestart() {
		if cfg.PIDFile != "" && mainNeedsPIDFile {
			if err := writePIDFile(cfg.PIDFile, os.Getpid()); err != nil {
				r.log.Error("shellflip: writing the PID file", "path", cfg.PIDFile, "err", err)
			}
		}
		// The old process has stopped accepting: the restart is done, and
		// a reload of Type=notify-reload ends here.
		r.notify(SdReady())
	}

	if r.ctl != nil {
		go r.ctl.serve()
	}
	r.spawner = newSpawner()
	started = true
	go r.run(r.ctx)
	return r, nil
}

// Done is closed when the Restarter has ended.
func (r *Restarter) Done() <-chan struct{} { return r.done }

// Wait blocks until the Restarter ends. It returns the new process after a
// successful restart; the caller should then drain and exit. Otherwise it
// returns why restarts are no longer possible: the context passed to Start
// was done, Stop was called, or a restart failed with ExitOnError set.
func (r *Restarter) Wait() (*Process, error) {
	<-r.done
	return r.proc, r.err
}

// Stop ends the Restarter without restarting, as cancelling Start's context
// does, and waits until it has ended. A restart in flight is abandoned and
// its new process killed. Safe to call more than once.
func (r *Restarter) Stop() {
	r.cancel()
	<-r.done
}

// outcome is how a restart ended: the new process, or why not. pid is
// proc's, or 0, for requesters.
type outcome struct {
	proc *Process
	pid  int
	err  error
}

// Restart restarts now, as the signal or a control-socket request would,
// and returns the new process's pid, or why the restart failed (or did not
// start: the Restarter has ended, or ctx is done first). A restart already
// in flight is joined, not repeated. After a successful restart the
// Restarter ends, as after any other: drain and exit.
func (r *Restarter) Restart(ctx context.Context) (int, error) {
	q := &restartRequest{reply: make(chan outcome, 1)}
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

func (r *Restarter) run(ctx context.Context) {
	var reqs chan *restartRequest // nil, so never ready, without a control socket
	if r.ctl != nil {
		reqs = r.ctl.reqs
	}
	for {
		var waiting []*restartRequest
		reloading := false
		select {
		case <-ctx.Done():
			r.end(nil, fmt.Errorf("shellflip: restarts stopped: %w", context.Cause(ctx)))
			return
		case <-r.sig:
			r.log.Info("shellflip: restart requested by signal")
			if r.cfg.NotifyReload {
				reloading = true
				r.notify(SdReloading())
			}
		case q := <-reqs:
			r.log.Info("shellflip: restart requested on the control socket")
			waiting = append(waiting, q)
		case q := <-r.calls:
			r.log.Info("shellflip: restart requested by the program")
			waiting = append(waiting, q)
		}

		result := make(chan outcome, 1)
		go func() {
			p, err := r.restart(ctx)
			result <- outcome{proc: p, err: err}
		}()
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
			}
		}

		if out.err == nil {
			r.handOver(out.proc, waiting)
			r.end(out.proc, nil)
			return
		}
		r.log.Error("shellflip: restart failed", "err", out.err)
		if reloading {
			// Leave the reloading state: this process carries on.
			r.notify(SdReady(), SdStatus("restart failed: "+oneLine(out.err.Error())))
		}
		for _, q := range waiting {
			q.respond(r.log, 0, out.err)
		}
		if r.cfg.ExitOnError {
			r.end(nil, out.err)
			return
		}
	}
}

// handOver makes the new process the service's main process. This process
// keeps serving until the last moment, so that nothing waits on the
// handover: the PID file and then systemd learn the new pid (with a
// barrier, to know systemd processed it); then this process stops
// accepting (NewProcessReady, and the control socket); the requesters
// learn the new pid; last, the new process learns that it is main, sends
// systemd READY=1 (which NotifyAccess=main now accepts from it), and its
// Start returns.
func (r *Restarter) handOver(p *Process, waiting []*restartRequest) {
	mainAck := [1]byte{mainByte}
	if r.cfg.PIDFile != "" {
		if err := writePIDFile(r.cfg.PIDFile, p.Pid); err != nil {
			r.log.Error("shellflip: writing the PID file; the new process will try", "path", r.cfg.PIDFile, "err", err)
			mainAck[0] = mainWritePIDFileByte
		}
	}
	if err := notifyMainPID(p.Pid); err != nil {
		r.log.Error("shellflip: telling systemd about the new main process", "new_pid", p.Pid, "err", err)
	}
	if h := r.cfg.Lifecycle; h != nil && h.NewProcessReady != nil {
		h.NewProcessReady(r.ctx, p.Pid)
	}
	if r.ctl != nil {
		// Stop accepting before anyone learns the outcome: a client that
		// asks again after its answer waits in the socket's backlog for
		// the new process, and gets a restart of its own.
		r.ctl.stopAccepting(p.Pid, nil)
	}
	for _, q := range waiting {
		q.respond(r.log, p.Pid, nil)
	}
	if _, err := p.ready.Write(mainAck[:]); err != nil {
		r.log.Warn("shellflip: telling the new process it is main", "new_pid", p.Pid, "err", err)
	}
	p.ready.Close()
	r.log.Info("shellflip: restart complete", "new_pid", p.Pid)
}

// notify sends fields to systemd, if this process is managed by it, and
// logs what went wrong.
func (r *Restarter) notify(fields ...SdField) {
	n, err := SystemdNotifier()
	if err == nil {
		ctx, cancel := context.WithTimeout(r.ctx, mainPIDTimeout)
		err = n.sendWithin(ctx, fields...)
		cancel()
	}
	if err != nil {
		r.log.Warn("shellflip: notifying systemd", "err", err)
	}
}

// oneLine makes s fit a STATUS= value.
func oneLine(s string) string {
	return strings.Map(func(c rune) rune {
		if c == '\n' || c == '\r' || c == 0 {
			return ' '
		}
		return c
	}, s)
}

// writePIDFile writes pid to path atomically: a reader sees the old
// content or the new, never a partial file.
func writePIDFile(path string, pid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(pid) + "\n")
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// end records how the Restarter ended and releases its resources. The
// restart signal stays caught, and from now on is dropped: Go's default for
// SIGHUP is to exit, and a draining process must not die of a signal meant
// for its successor (which a signal sent to every process reaches too).
func (r *Restarter) end(p *Process, err error) {
	if r.ctl != nil {
		pid := 0
		if p != nil {
			pid = p.Pid
		}
		r.ctl.finish(pid, err, p != nil)
	}
	r.spawner.close()
	r.proc, r.err = p, err
	close(r.done)
}

// restart starts the new process, sends it the state and waits until it is
// ready, has failed, or ran out of time.
func (r *Restarter) restart(ctx context.Context) (_ *Process, err error) {
	hooks := r.cfg.Lifecycle
	if hooks == nil {
		hooks = &Lifecycle{}
	}
	if hooks.PreSpawn != nil {
		if err := hooks.PreSpawn(ctx); err != nil {
			return nil, fmt.Errorf("pre-spawn hook: %w", err)
		}
	}
	parent, started := ctx, false
	defer func() {
		// With the Restarter's context, not the expired ready timeout's:
		// undoing the handover deserves its own time.
		if err != nil && started && hooks.NewProcessFailed != nil {
			hooks.NewProcessFailed(parent, err)
		}
	}()
	ctx, cancel := context.WithTimeoutCause(ctx, r.cfg.ReadyTimeout, r.notReady)
	defer cancel()

	if os.Getpid() == 1 {
		return nil, errors.New("this process is PID 1 of its pid namespace: when it exits after a restart, the kernel kills every process in the namespace, the new one too; run it under an init (tini, dumb-init, docker run --init) or from a parent that sets PR_SET_CHILD_SUBREAPER")
	}
	path, dir, err := r.program()
	if err != nil {
		return nil, err
	}
	readyP, readyC, err := newReadyPair()
	if err != nil {
		return nil, err
	}
	stateR, stateW, err := newStatePipe()
	if err != nil {
		closeFDNum(readyP)
		closeFDNum(readyC)
		return nil, err
	}

	// The new process's fds: stdio, the registry's fds from 3 on (as
	// systemd would pass them), then the library's own; nothing else.
	if err := sealFDs(); err != nil {
		closeFDNum(readyP)
		closeFDNum(readyC)
		closeFDNum(stateR)
		closeFDNum(stateW)
		return nil, err
	}
	files, names, unlock := passFDs([]uintptr{0, 1, 2}, nil)
	nListen := len(files) - 3
	files = append(files, uintptr(readyC), uintptr(stateR))
	ctlFD, ctlID := -1, ""
	if r.ctl != nil {
		ctlFD, ctlID = len(files), r.ctl.id.String()
		files = append(files, uintptr(r.ctl.fd))
	}
	env := childEnv(os.Environ(), r.cfg.Env, names, 3+nListen, 4+nListen, ctlFD, ctlID, r.cfg.Signal)
	pid, err := r.spawner.spawn(path, r.cfg.Args, env, dir, files)
	unlock()
	closeFDNum(readyC)
	closeFDNum(stateR)
	if err != nil {
		closeFDNum(readyP)
		closeFDNum(stateW)
		return nil, fmt.Errorf("starting %s: %w", path, err)
	}
	child := watchChild(pid)
	started = true
	r.log.Info("shellflip: new process started", "pid", pid, "path", path)
	ready, err := pollableFile(readyP, "shellflip-ready")
	if err != nil {
		closeFDNum(stateW)
		child.kill()
		<-child.done
		return nil, err
	}
	failed := func(err error) (*Process, error) {
		// Say so first: if what was started is a wrapper that runs the
		// real program as its child, the kill reaches only the wrapper,
		// and the program must learn that it was rejected, not take the
		// closed socket for the old process's death. Then kill and reap
		// before closing the socket, so that the new process never sees
		// it close while it lives.
		ready.SetWriteDeadline(time.Now().Add(time.Second))
		ready.Write([]byte{rejectedByte})
		child.kill()
		<-child.done
		ready.Close()
		status := child.status()
		if status != "signal: killed" && (errors.Is(err, errReadyEOF) || errors.Is(err, syscall.EPIPE)) {
			// It was not our SIGKILL that ended it: it exited, and the
			// closed socket or pipe is only how we noticed.
			err = errExited
		}
		return nil, fmt.Errorf("new process %d: %w (%s)", pid, err, status)
	}

	if err := sendState(ctx, stateW, hooks.SendState); err != nil {
		return failed(fmt.Errorf("sending state: %w", err))
	}

	// The readiness byte, end of file (the new process exited or gave up),
	// or ctx: the ready timeout, or Stop. Read here rather than on a
	// goroutine of its own beside a select: the byte is what the whole
	// restart waits for, and each extra hop costs it time.
	stop := context.AfterFunc(ctx, func() { ready.SetReadDeadline(time.Unix(1, 0)) })
	var b [1]byte
	n, rerr := ready.Read(b[:])
	stop()
	switch {
	case n == 1 && b[0] == readyByte:
		select {
		case <-child.done:
			// A process that exited is no successor, even if its
			// readiness byte came first.
			err = errExited
		default:
		}
	case n == 1:
		err = fmt.Errorf("unexpected byte %#x on the readiness socket", b[0])
	case rerr == io.EOF:
		err = errReadyEOF
	case ctx.Err() != nil:
		err = context.Cause(ctx)
	default:
		err = rerr
	}
	if err != nil {
		return failed(err)
	}
	return &Process{Pid: pid, ready: ready, watch: child}, nil
}

var (
	errExited   = errors.New("exited before it was ready")
	errReadyEOF = errors.New("closed its readiness socket before it was ready")
)

// sendState runs the SendState hook on the write end of the handover pipe,
// then closes it: the new process reads to EOF.
func sendState(ctx context.Context, fd int, hook func(context.Context, io.Writer) error) error {
	w, err := pollableFile(fd, "shellflip-state")
	if err != nil {
		return err
	}
	defer w.Close()
	if hook == nil {
		return nil
	}
	stop := context.AfterFunc(ctx, func() { w.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := hook(ctx, w); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %w", context.Cause(ctx), err)
		}
		return err
	}
	return nil
}

// startedAs records, at initialisation, what a restart runs and where.
var startedAs struct {
	program string      // the running program's path; "" if it cannot be found
	dir     string      // the working directory
	dirInfo os.FileInfo // the working directory's, to tell a later chdir
}

func recordStart() {
	startedAs.dir, _ = os.Getwd()
	startedAs.dirInfo, _ = os.Stat(".")
	startedAs.program = findProgram(os.Args[0])
}

// findProgram returns the path that restarts run: the path this process
// was started from (argv0, resolved as the shell or service manager
// resolved it), so that a deploy that replaces the file there is picked up,
// but only if it names the running executable now, at initialisation. A
// parent may set argv0 to anything (exec -a, systemd's ExecStart=@), and a
// bare name is never looked for in the working directory; otherwise the
// path the running executable was started from.
func findProgram(argv0 string) string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	self, err := os.Stat(exe)
	if err != nil {
		return exe
	}
	path := argv0
	if !strings.Contains(path, "/") {
		path = lookPath(path)
	} else if !filepath.IsAbs(path) {
		path = filepath.Join(startedAs.dir, path)
	}
	if fi, err := os.Stat(path); err == nil && os.SameFile(fi, self) {
		return path
	}
	return exe
}

// lookPath finds file in $PATH as a shell (and os/exec, which the library
// does not use) would, or returns "".
func lookPath(file string) string {
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, file)
		if !filepath.IsAbs(p) {
			p = filepath.Join(startedAs.dir, p)
		}
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// program returns the path of the program to start and the directory to
// start it in ("": this process's, which it has not left).
func (r *Restarter) program() (path, dir string, err error) {
	if fi, err := os.Stat("."); err != nil || startedAs.dirInfo == nil || !os.SameFile(fi, startedAs.dirInfo) {
		// The program has changed directory since: go back, as a fresh
		// start would be, and say so if that is impossible.
		if _, err := os.Stat(startedAs.dir); err != nil {
			return "", "", fmt.Errorf("the directory this process started in: %w", err)
		}
		dir = startedAs.dir
	}
	if path = r.cfg.Path; path != "" {
		if !filepath.IsAbs(path) {
			path = filepath.Join(startedAs.dir, path)
		}
		return path, dir, nil
	}
	path = startedAs.program
	fi, err := os.Stat(path)
	switch {
	case err == nil && !fi.Mode().IsRegular():
		return "", "", fmt.Errorf("%s is a %v, not a program", path, fi.Mode().Type())
	case err == nil && fi.Mode().Perm()&0o111 == 0:
		// A deploy that is not finished: restarting the running
		// executable instead would report success and run the old code.
		return "", "", fmt.Errorf("%s is not executable (mode %v)", path, fi.Mode().Perm())
	case err == nil:
		return path, dir, nil
	case path != "" && !errors.Is(err, os.ErrNotExist):
		return "", "", err
	}
	exe, err := runningExecutable()
	if err != nil {
		return "", "", fmt.Errorf("no executable at %q, and the running one cannot be found: %w", path, err)
	}
	r.log.Warn("shellflip: no executable at the program's path; restarting the running executable", "path", path, "executable", exe)
	return exe, dir, nil
}

// childEnv returns the new process's environment: this process's, less the
// variables that describe this process's own fds, plus extra (which wins
// over variables of the same name), plus the variables naming the new
// process's fds. LISTEN_PID is "auto": the new process's init sets its own
// pid there (FixupListenPID). So is WATCHDOG_PID if systemd set it to this
// process: the watchdog passes to the new main process with everything else.
func childEnv(environ, extra, names []string, readyFD, stateFD, ctlFD int, ctlID string, sig os.Signal) []string {
	ownWatchdog := envWatchdogPID + "=" + strconv.Itoa(os.Getpid())
	drop := func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case envListenPID, envListenFDs, envListenFDNames, envReadyFD, envStateFD, envControlFD, envControlID, envSignal:
			return true
		}
		for _, e := range extra {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				return true
			}
		}
		return false
	}
	env := make([]string, 0, len(environ)+len(extra)+6)
	for _, kv := range environ {
		switch {
		case kv == ownWatchdog:
			env = append(env, envWatchdogPID+"="+listenPIDAuto)
		case !drop(kv):
			env = append(env, kv)
		}
	}
	env = append(env, extra...)
	if len(names) > 0 {
		env = append(env,
			envListenPID+"="+listenPIDAuto,
			envListenFDs+"="+strconv.Itoa(len(names)),
			envListenFDNames+"="+strings.Join(names, ":"))
	}
	env = append(env, envReadyFD+"="+strconv.Itoa(readyFD), envStateFD+"="+strconv.Itoa(stateFD))
	if ctlFD >= 0 {
		env = append(env, envControlFD+"="+strconv.Itoa(ctlFD), envControlID+"="+ctlID)
	}
	if n, ok := sig.(syscall.Signal); ok {
		env = append(env, envSignal+"="+strconv.Itoa(int(n)))
	}
	return env
}

// reservedEnv reports whether the library sets the variable k for the new
// process, so that Config.Env may not.
func reservedEnv(k string) bool {
	switch k {
	case envListenPID, envListenFDs, envListenFDNames, envWatchdogPID,
		envReadyFD, envStateFD, envControlFD, envControlID, envSignal:
		return true
	}
	return false
}

// spawner forks from one goroutine locked to its own OS thread, the
// counterpart of shellflip's dedicated restart thread. See the package
// documentation for what that buys under seccomp.
type spawner struct {
	reqs  chan spawnRequest
	reply chan spawnResult
}

type spawnRequest struct {
	path      string
	argv, env []string
	dir       string
	files     []uintptr
}

type spawnResult struct {
	pid int
	err error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnRequest), reply: make(chan spawnResult)}
	go func() {
		// Never unlocked: when the goroutine returns, the runtime ends the
		// thread instead of reusing it for other goroutines.
		runtime.LockOSThread()
		for q := range s.reqs {
			pid, err := forkExec(q.path, q.argv, q.env, q.dir, q.files)
			s.reply <- spawnResult{pid, err}
		}
	}()
	return s
}

func (s *spawner) spawn(path string, argv, env []string, dir string, files []uintptr) (int, error) {
	s.reqs <- spawnRequest{path, argv, env, dir, files}
	res := <-s.reply
	return res.pid, res.err
}

func (s *spawner) close() { close(s.reqs) }

// waitStatusString describes how a process ended, as os.ProcessState does.
func waitStatusString(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exit status " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		s := "signal: " + ws.Signal().String()
		if ws.CoreDump() {
			s += " (core dumped)"
		}
		return s
	}
	return fmt.Sprintf("wait status %v", ws)
}
