//go:build linux || darwin || freebsd

package shellflip

import (
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
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// This file is the readiness socket between two generations, both ends of
// its messages: the new process's side (asking for the state, saying it is
// ready or why it gave up, learning that it is the main process) and the
// old process's (serving those messages until the new process is ready);
// and whether this process may talk to systemd (Notify).

// The readiness socket. The new process writes:
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

	// maxReason bounds the text of msgGiveUp, in bytes.
	maxReason = 512
)

// readyMsg reads one message: its kind, and the reason of a msgGiveUp or
// msgRejected, made printable. Any other byte is returned as is, for the
// caller to refuse.
func readyMsg(r io.Reader) (kind byte, reason string, err error) {
	var b [2]byte
	if _, err = io.ReadFull(r, b[:1]); err != nil || b[0] != msgGiveUp && b[0] != msgRejected {
		return b[0], "", err
	}
	kind, n := b[0], b[:]
	if _, err := io.ReadFull(r, n); err != nil {
		return 0, "", err
	}
	if l := binary.BigEndian.Uint16(n[:]); l > maxReason {
		return 0, "", fmt.Errorf("a reason of %d bytes, more than %d", l, maxReason)
	}
	text := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(r, text); err != nil {
		return 0, "", err
	}
	return kind, printable(string(text)), nil
}

// printable escapes, as strconv.Quote would, what is not printable in s:
// text from another process goes to terminals and logs.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := fmt.Sprintf("%+q", r)
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}

// The new process's side.

var (
	// stateMu guards state and inherited.stateFD.
	stateMu sync.Mutex
	// state is the stream ReceiveState handed out, if it did.
	state *stateReader

	// isMain is set when this process is the service's main process: a
	// fresh process always, a process started by a restart once the old
	// process made it so (or went away). mainCh is closed then.
	isMain atomic.Bool
	mainCh = make(chan struct{})
	// retired is set in an old process once it has told systemd the new
	// main pid: from then on it must not talk to systemd.
	retired atomic.Bool
)

func becomeMain() {
	if isMain.CompareAndSwap(false, true) {
		close(mainCh)
	}
}

// startedByRestart reports whether an old process started this one.
func startedByRestart() bool { return inherited.readyFD >= 0 }

// ReceiveState asks the old process for its state, and returns the stream
// on which it comes: what the old process's Lifecycle.SendState writes,
// until io.EOF. It returns (nil, nil) in a process that was not started by
// a restart.
//
// The old process runs SendState only when asked, so that the time it must
// hold its state still runs from this call to this process's readiness.
// The state must be read to its end (io.EOF) before Start: a state that
// this process asked for and did not read to its end, or did not ask for
// at all while the old process had one to send, fails the restart, and the
// old process keeps serving with its state. To throw the state away on
// purpose, read it to the end: io.Copy(io.Discard, r).
//
// The caller owns the stream and closes it. Only the first call returns it;
// later calls return an error.
func ReceiveState() (io.ReadCloser, error) {
	if err := inherited.err; err != nil {
		return nil, err
	}
	if !startedByRestart() {
		return nil, nil
	}
	stateMu.Lock()
	defer stateMu.Unlock()
	if state != nil || inherited.stateFD < 0 {
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

// stateReader is the state stream; it notes whether it was read to its end.
type stateReader struct {
	f   *os.File
	mu  sync.Mutex
	eof bool // the old process's end of file was read
}

func (r *stateReader) Read(p []byte) (int, error) {
	n, err := r.f.Read(p)
	if err == io.EOF {
		r.mu.Lock()
		r.eof = true
		r.mu.Unlock()
	}
	return n, err
}

func (r *stateReader) Close() error {
	r.complete()
	return r.f.Close()
}

// complete reports whether the stream was read to its end. A program that
// read exactly what the old process wrote has not seen end of file yet:
// one more read tells, waiting if need be for the old process to finish
// (it is bounded by the old process's ready timeout).
func (r *stateReader) complete() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.eof {
		var b [1]byte
		if n, err := r.f.Read(b[:]); n == 0 && err == io.EOF {
			r.eof = true
		}
	}
	return r.eof
}

// GiveUp tells the old process why this process, started by a restart,
// cannot go on: the restart fails with "new process PID gave up: " and
// reason (at most 512 bytes of it, made printable), the old process keeps
// serving, and it kills this process; the caller should exit. Call it
// instead of Start, for example when the state cannot be used. In a process
// that was not started by a restart, or once Start has declared it ready,
// GiveUp does nothing and returns nil.
func GiveUp(reason error) error {
	fd := inherited.readyFD
	if fd < 0 || readySent.Load() {
		return nil
	}
	return writeAll(fd, reasonMsg(msgGiveUp, reason.Error()))
}

// reasonMsg encodes a msgGiveUp or msgRejected with text, cut to maxReason
// bytes between characters.
func reasonMsg(kind byte, text string) []byte {
	for len(text) > maxReason {
		_, size := utf8.DecodeLastRuneInString(text)
		text = text[:len(text)-size]
	}
	msg := append([]byte{kind, 0, 0}, text...)
	binary.BigEndian.PutUint16(msg[1:], uint16(len(text)))
	return msg
}

// readySent is set once this process told the old one that it is ready.
var readySent atomic.Bool

// answer is what the old process answered a ready new process: msgMain,
// msgMainPID, msgRejected with its reason, or 0 for end of file (it is
// gone).
type answer struct {
	kind   byte
	reason string
}

// ready tells the old process that this process is ready, and returns a
// channel that receives its answer. Before that it checks the state: asked
// for and not read to its end, it is a reason to give up.
func ready() (<-chan answer, error) {
	fd := inherited.readyFD
	stateMu.Lock()
	if state != nil && !state.complete() {
		stateMu.Unlock()
		err := errors.New("the state it asked for was not read to its end")
		GiveUp(err)
		return nil, fmt.Errorf("shellflip: %w", err)
	}
	closeFD(&inherited.stateFD) // not asked for: the old process sends nothing
	stateMu.Unlock()

	ch := make(chan answer, 1)
	readySent.Store(true)
	werr := writeAll(fd, []byte{msgReady})
	go func() {
		// The old process answers once systemd knows this process as the
		// main pid; until then this process must not talk to systemd.
		// The answer is read even if the write failed: an old process
		// that rejected this one says so before it closes its end.
		f := os.NewFile(uintptr(fd), "shellflip-ready") // blocking: this goroutine waits in read(2)
		defer f.Close()
		kind, reason, err := readyMsg(f)
		if err != nil {
			kind = 0
		}
		ch <- answer{kind, reason}
	}()
	if werr != nil && werr != unix.EPIPE && werr != unix.ECONNRESET {
		return nil, os.NewSyscallError("write", werr)
	}
	return ch, nil
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
// sends itself (MAINPID, BARRIER, FDSTORE; see StoreFDs) are refused. A
// message that breaks a rule is not sent, and the error says which.
//
// A process started by a restart gets ErrNotMain until Start has returned
// (systemd would drop its messages), and so does a process that has handed
// the service over to a new process. READY=1 is sent by Start.
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
	return n.send(context.Background(), nil, fields...)
}

// notifyMu orders this process's notifications against the handover:
// Notify holds it for reading, the old process's handover for writing
// while it tells systemd the new main pid and sets retired, so that
// nothing this process sends reaches systemd after that.
var notifyMu sync.RWMutex

// mayNotify reports ErrNotMain when this process must not talk to systemd:
// it was started by a restart and is not the main process yet, or it has
// handed the service over to a new main process.
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
		becomeMain()
		notifySystemd(log, "READY=1")
		return nil
	}
	answer, err := ready()
	if err != nil {
		return err
	}
	for {
		select {
		case a := <-answer:
			switch a.kind {
			case msgRejected:
				return fmt.Errorf("shellflip: the old process rejected this process: %s", a.reason)
			case msgMain:
			default: // msgMainPID, or end of file: the old process is gone
				if a.kind != msgMainPID {
					log.Warn("shellflip: the old process went away during the handover; carrying on alone")
				}
				if pidFile != "" {
					if err := writePIDFile(pidFile, os.Getpid()); err != nil {
						log.Error("shellflip: writing the PID file", "path", pidFile, "err", err)
					}
				}
			}
			becomeMain()
			// The old process has stopped accepting: the restart is done,
			// and a reload of Type=notify-reload ends here.
			notifySystemd(log, "READY=1")
			return nil
		case <-sig:
			log.Warn("shellflip: restart signal ignored: this process is not the main process yet")
		}
	}
}

// handOverTimeout bounds how long the old process waits for systemd to
// process the new MAINPID.
const handOverTimeout = 5 * time.Second

// notifySystemd sends fields to systemd, if this process is managed by it,
// within handOverTimeout, and logs what went wrong.
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
// the state when asked (and reports whether it was), and fails on a
// process that gave up, exited, sent garbage, or ran out of time (ctx).
// Read here rather than on a goroutine of its own beside a select: the
// readiness is what the whole restart waits for, and each hop costs time.
func awaitReady(ctx context.Context, child *childWatch, ready *os.File, stateW *int, hook func(context.Context, io.Writer) error) (asked bool, err error) {
	stop := context.AfterFunc(ctx, func() { ready.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	for {
		kind, reason, err := readyMsg(ready)
		switch {
		case err == io.EOF:
			return asked, errReadyEOF
		case err != nil && ctx.Err() != nil:
			return asked, context.Cause(ctx)
		case err != nil:
			return asked, err
		case kind == msgState && !asked:
			asked = true
			if err := sendState(ctx, *stateW, hook); err != nil {
				*stateW = -1
				return asked, fmt.Errorf("sending state: %w", err)
			}
			*stateW = -1
		case kind == msgGiveUp:
			return asked, &gaveUpError{reason}
		case kind == msgReady:
			select {
			case <-child.done:
				// A process that exited is no successor, even if its
				// readiness came first.
				return asked, errExited
			default:
				return asked, nil
			}
		default:
			return asked, fmt.Errorf("unexpected byte %#x on the readiness socket", kind)
		}
	}
}

// sendState runs the SendState hook on the write end of the state pipe,
// fd, which it closes: the new process reads to end of file.
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
