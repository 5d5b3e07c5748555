//go:build linux || darwin || freebsd

package shellflip

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// The readiness socket between two generations. The new process writes:
//
//	'S'                       send me the state (ReceiveState)
//	'R'                       I am ready (and read the state, if I asked for it)
//	'F' len:uint16 text       I give up, because text (GiveUp)
//
// The old process writes, once the new one is ready or has failed:
//
//	'M'                       you are the main process now
//	'P'                       the same, but I could not name you in the PID file: do it
//	'X' len:uint16 text       the restart failed, because text: you are not wanted
//
// End of file on the socket means that the other process is gone.
const (
	msgState    = 'S'
	msgReady    = 'R'
	msgGiveUp   = 'F'
	msgMain     = 'M'
	msgMainPID  = 'P'
	msgRejected = 'X'
	maxReason   = 512 // bytes of text in a msgGiveUp or msgRejected
)

// readyMsg reads one message: its kind (0 on error) and the reason of a
// msgGiveUp or msgRejected, made printable. The caller refuses other kinds.
func readyMsg(r io.Reader) (kind byte, reason string, err error) {
	var b [3]byte // kind, length
	if _, err = io.ReadFull(r, b[:1]); err != nil || b[0] != msgGiveUp && b[0] != msgRejected {
		return b[0], "", err
	}
	if _, err := io.ReadFull(r, b[1:]); err != nil {
		return 0, "", err
	}
	n := binary.BigEndian.Uint16(b[1:])
	if n > maxReason {
		return 0, "", fmt.Errorf("a reason of %d bytes, more than %d", n, maxReason)
	}
	text := make([]byte, n)
	if _, err := io.ReadFull(r, text); err != nil {
		return 0, "", err
	}
	return b[0], printable(string(text)), nil
}

// printable escapes, as strconv.Quote would, what is not printable in s:
// text from another process goes to terminals and logs.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
		} else {
			b.WriteString(strings.Trim(strconv.QuoteRuneToASCII(r), "'"))
		}
	}
	return b.String()
}

// The new process's side.

var (
	stateMu sync.Mutex   // guards state, its eof and inherited.stateFD
	state   *stateReader // the stream ReceiveState handed out, if it did

	isMain    atomic.Bool // this process is the service's main process (commit)
	readySent atomic.Bool // this process told the old one that it is ready
	retired   atomic.Bool // this old process named the new main pid to systemd: it must not talk to it
)

// startedByRestart reports whether an old process started this one.
func startedByRestart() bool { return inherited.readyFD >= 0 }

// ReceiveState asks the old process for its state and returns the stream
// on which it comes: what the old process's Lifecycle.SendState writes,
// until io.EOF. It returns (nil, err) in a process that refused its
// inherited fds, systemd's (LISTEN_FDS) or an old process's, with Start's
// error saying why, and (nil, nil) in any other process not started by a
// restart.
//
// The old process runs SendState only when asked, so that it holds its
// state only from this call to this process's readiness. The state must be
// read to its end (io.EOF) before Start: a state asked for and not read to
// its end, or not asked for while the old process had one to send, fails
// the restart, and the old process keeps serving with its state. To throw
// the state away on purpose, read it to the end: io.Copy(io.Discard, r).
//
// The caller owns the stream and closes it. Only the first call returns it;
// later calls return an error.
func ReceiveState() (io.ReadCloser, error) {
	if !startedByRestart() {
		return nil, inherited.err
	}
	stateMu.Lock()
	defer stateMu.Unlock()
	if inherited.stateFD < 0 {
		return nil, errors.New("shellflip: the state was asked for already")
	}
	if err := writeAll(inherited.readyFD, []byte{msgState}); err != nil {
		return nil, fmt.Errorf("shellflip: asking the old process for the state: %w", err)
	}
	f, err := pollableFile(inherited.stateFD, "shellflip-state")
	inherited.stateFD = -1
	if err != nil {
		return nil, err
	}
	state = &stateReader{f: f}
	return state, nil
}

// stateReader is the state stream, which knows whether it was read to its end.
type stateReader struct {
	f   *os.File
	eof bool // complete saw end of file
}

func (r *stateReader) Read(p []byte) (int, error) { return r.f.Read(p) }

// Close records complete's answer before it closes the pipe.
func (r *stateReader) Close() error {
	stateMu.Lock()
	defer stateMu.Unlock()
	r.complete()
	return r.f.Close()
}

// complete reports whether the stream was read to its end. A program that
// read exactly what was sent has not seen end of file yet, so it reads once
// more (a pipe at end of file says so again), waiting if need be for the old
// process to finish, within its ready timeout. The caller holds stateMu.
func (r *stateReader) complete() bool {
	if !r.eof {
		var b [1]byte
		n, err := r.f.Read(b[:])
		r.eof = n == 0 && err == io.EOF
	}
	return r.eof
}

// GiveUp tells the old process why this process, started by a restart,
// cannot go on: the restart fails with "new process PID gave up: " and
// reason (at most 512 bytes of it, made printable; "no reason given" for a
// nil reason), the old process keeps serving and kills this process; the
// caller should exit. Call it instead of Start, for example when the state
// cannot be used. In a process not started by a restart, or once Start has
// declared it ready, GiveUp does nothing and returns nil.
func GiveUp(reason error) error {
	if !startedByRestart() || readySent.Load() {
		return nil
	}
	text := "no reason given"
	if reason != nil {
		text = reason.Error()
	}
	return writeAll(inherited.readyFD, reasonMsg(msgGiveUp, text))
}

// reasonMsg encodes a msgGiveUp or msgRejected, text cut between runes.
func reasonMsg(kind byte, text string) []byte {
	for len(text) > maxReason {
		_, size := utf8.DecodeLastRuneInString(text)
		text = text[:len(text)-size]
	}
	msg := append([]byte{kind, 0, 0}, text...)
	binary.BigEndian.PutUint16(msg[1:], uint16(len(text)))
	return msg
}

// writeAll writes b to the blocking fd, as one message would go.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := ignoringEINTR(func() (int, error) { return unix.Write(fd, b) })
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// Notify sends fields (each "KEY=VALUE", such as "STATUS=serving" or
// "WATCHDOG=1") to systemd in one datagram, as sd_notify(3) does, if the
// service runs under it ($NOTIFY_SOCKET); otherwise it does nothing. Each
// field is checked as systemd would read it: no newline or NUL (which
// would smuggle in another field), no variable twice, values of the
// variables systemd knows of their form; and the variables the library
// sends itself (MAINPID, MONOTONIC_USEC, BARRIER, FDSTORE; see StoreFDs)
// are refused. A message that breaks a rule is not sent, and the error
// says which.
//
// A process started by a restart gets ErrNotMain until Start has returned
// (systemd would drop its messages), and so does a process that has handed
// the service over to a new process. READY=1 is sent by Start. While
// systemd's queue is full, Notify waits for it at most 5 seconds, then
// fails: a restart's handover waits for Notify.
func Notify(fields ...string) error {
	notifyMu.RLock()
	defer notifyMu.RUnlock()
	if err := mayNotify(); err != nil {
		return err
	}
	for _, f := range fields {
		if err := checkUserField(f); err != nil {
			return err
		}
	}
	n, err := processNotifier()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), handOverTimeout)
	defer cancel()
	return n.send(ctx, nil, fields...)
}

// notifyMu orders notifications against the handover: Notify holds it for
// reading, the old process for writing while it tells systemd the new main
// pid and sets retired, after which nothing it sends reaches systemd.
var notifyMu sync.RWMutex

// mayNotify reports ErrNotMain when this process must not talk to systemd
// (see Notify); StoreFDs asks it too.
func mayNotify() error {
	if !isMain.Load() && startedByRestart() || retired.Load() {
		return ErrNotMain
	}
	return nil
}

// commit declares this process ready and, in a process started by a
// restart, waits until it is the main process, dropping the restart
// signals that arrive meanwhile (on sig); see Start.
func commit(log *slog.Logger, sig <-chan os.Signal, pidFile string) error {
	if !startedByRestart() {
		if pidFile != "" {
			if err := writePIDFile(pidFile, os.Getpid()); err != nil {
				return fmt.Errorf("shellflip: writing the PID file: %w", err)
			}
		}
		isMain.Store(true)
		notifySystemd(log, "READY=1")
		return nil
	}

	stateMu.Lock()
	if state != nil && !state.complete() {
		stateMu.Unlock()
		err := errors.New("the state it asked for was not read to its end")
		GiveUp(err)
		return fmt.Errorf("shellflip: %w", err)
	}
	closeFD(&inherited.stateFD) // not asked for: the old process sends nothing
	stateMu.Unlock()

	// The old process's answer is read even if the write failed: an old
	// process that rejected this one says so before it closes its end.
	var kind byte     // 0 at end of file: the old process is gone
	var reason string // of a msgRejected
	answered := make(chan struct{})
	fd := inherited.readyFD
	readySent.Store(true)
	werr := writeAll(fd, []byte{msgReady})
	go func() {
		f := os.NewFile(uintptr(fd), "shellflip-ready") // blocking: this goroutine waits in read(2)
		defer f.Close()
		kind, reason, _ = readyMsg(f)
		close(answered)
	}()
	if werr != nil && werr != unix.EPIPE && werr != unix.ECONNRESET {
		return os.NewSyscallError("write", werr)
	}
	for {
		select {
		case <-answered:
			if kind == msgRejected {
				return fmt.Errorf("shellflip: the old process rejected this process: %s", reason)
			}
			if kind != msgMain && kind != msgMainPID {
				log.Warn("shellflip: the old process went away during the handover; carrying on alone")
			}
			if kind != msgMain && pidFile != "" {
				if err := writePIDFile(pidFile, os.Getpid()); err != nil {
					log.Error("shellflip: writing the PID file", "path", pidFile, "err", err)
				}
			}
			isMain.Store(true)
			// The old process has stopped accepting: the restart is done,
			// and a reload of Type=notify-reload ends here.
			notifySystemd(log, "READY=1")
			return nil
		case <-sig:
			log.Warn("shellflip: restart signal ignored: this process is not the main process yet")
		}
	}
}

// handOverTimeout bounds the wait for systemd to process the new MAINPID.
const handOverTimeout = 5 * time.Second

// notifySystemd sends fields to systemd, if it manages this process, and
// logs what went wrong.
func notifySystemd(log *slog.Logger, fields ...string) {
	n, err := processNotifier()
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), handOverTimeout)
		err = n.send(ctx, nil, fields...)
		cancel()
	}
	if err != nil {
		log.Warn("shellflip: notifying systemd", "err", err)
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

// writePIDFile writes pid to path atomically: never a partial file.
func writePIDFile(path string, pid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(pid) + "\n")
	err = cmp.Or(err, f.Chmod(0o644), f.Close()) // closed whatever the error
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// The old process's side.

var (
	errExited   = errors.New("exited before it was ready")
	errReadyEOF = errors.New("closed its readiness socket before it was ready")
	errNoState  = errors.New("did not ask for the state (it never called ReceiveState), which it would lose")
)

// gaveUpError is the reason a new process gave up with (GiveUp).
type gaveUpError struct{ reason string }

func (e *gaveUpError) Error() string { return "gave up: " + e.reason }

// awaitReady serves the new process's messages until it is ready: it sends
// the state when asked (and reports whether it was), and fails on a process
// that gave up, exited, sent garbage, or ran out of time (ctx). Without
// state it reads on the caller's goroutine: a hop to another would slow
// the restart.
func awaitReady(ctx context.Context, child *childWatch, ready *os.File, stateW *int, hook func(context.Context, io.Writer) error) (asked bool, err error) {
	stop := context.AfterFunc(ctx, func() { ready.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	kind, reason, err := readyMsg(ready)
	if kind == msgState && err == nil {
		asked = true
		w, werr := pollableFile(*stateW, "shellflip-state")
		*stateW = -1
		if werr != nil {
			return asked, werr
		}
		// The next message is read while the hook writes: a new process
		// that gives up before reading to the end (its 'F') or goes away
		// ends the hook, and what it said decides, not the write error.
		next := make(chan struct{})
		go func() {
			kind, reason, err = readyMsg(ready)
			close(next) // before the deadline: a hook it ends finds next closed
			w.SetWriteDeadline(time.Unix(1, 0))
		}()
		werr = sendState(ctx, w, hook) // closes w: a reading new process sees end of file
		spoke := true
		select {
		case <-next:
		default:
			spoke = false
			if werr != nil { // what a new process that exited said is moments away
				ready.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			}
			<-next
		}
		// A write error that the new process caused (it gave up, went away
		// or broke the protocol) yields to what it said; an error of the
		// hook's own does not, even if the new process took the cut state
		// for a whole one.
		caused := spoke && kind != msgReady || errors.Is(werr, syscall.EPIPE) && (kind == msgGiveUp || err == io.EOF)
		if werr != nil && !caused {
			return asked, fmt.Errorf("sending state: %w", werr)
		}
	}
	switch {
	case err == io.EOF:
		return asked, errReadyEOF
	case err != nil && ctx.Err() != nil:
		return asked, context.Cause(ctx)
	case err != nil:
		return asked, err
	case kind == msgGiveUp:
		return asked, &gaveUpError{reason}
	case kind == msgReady:
		select {
		case <-child.done: // an exited process is no successor, even if ready first
			return asked, errExited
		default:
			return asked, nil
		}
	default:
		return asked, fmt.Errorf("unexpected byte %#x on the readiness socket", kind)
	}
}

// sendState runs the SendState hook on w, the write end of the state pipe,
// which it closes: the new process reads to end of file.
func sendState(ctx context.Context, w *os.File, hook func(context.Context, io.Writer) error) error {
	defer w.Close()
	if hook == nil {
		return nil
	}
	stop := context.AfterFunc(ctx, func() { w.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	err := hook(ctx, w)
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", context.Cause(ctx), err)
	}
	return err
}
