//go:build linux || darwin || freebsd

package shellflip

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// requestTimeout bounds the time a client may take to send its request
	// and to read the response: a silent client ties up only its connection.
	requestTimeout  = 5 * time.Second
	maxControlConns = 64 // served at once; one more is refused straight away
)

// restartRequest waits for the outcome of a restart: a client on the control
// socket (conn), or Restarter.Restart in this process (reply, buffered).
type restartRequest struct {
	conn  *net.UnixConn
	reply chan reply
}

// reply is the outcome of a restart: the new process's pid, or an error.
type reply struct {
	pid int
	err error
}

// respond sends the outcome and closes the connection. If the client went
// away, the write error (EPIPE, not a signal, for Go sockets) is only logged.
func (q *restartRequest) respond(log *slog.Logger, pid int, err error) {
	if q.reply != nil {
		q.reply <- reply{pid, err}
		return
	}
	var buf [512]byte
	frame := buf[:0]
	if err != nil {
		frame = appendRestartFailed(frame, err.Error())
	} else {
		frame = appendRestartComplete(frame, uint32(pid))
	}
	q.conn.SetWriteDeadline(time.Now().Add(requestTimeout))
	if _, werr := q.conn.Write(frame); werr != nil {
		log.Warn("shellflip: could not answer a restart request", "err", werr)
	}
	q.conn.Close()
}

// controlServer accepts restart requests on the control socket, one per
// connection, from RequestRestart or the Rust crate's client.
type controlServer struct {
	ln   *net.UnixListener
	fd   int    // close-on-exec duplicate of the listening socket, for the new process
	id   fileID // the socket file's identity, for the new process to check
	path string
	log  *slog.Logger
	reqs chan *restartRequest // to the restart loop

	slots  chan struct{} // one per connection being served
	wg     sync.WaitGroup
	served chan struct{} // closed when serve returns, all it accepted handed to wg

	stop     sync.Once
	stopped  chan struct{} // closed by stopAccepting once the final outcome is set
	finalPID int           // the final outcome, which late requests get
	finalErr error
}

// fileID identifies a file: the socket file at the control socket's path.
type fileID struct{ dev, ino uint64 }

func (id fileID) String() string {
	return strconv.FormatUint(id.dev, 10) + ":" + strconv.FormatUint(id.ino, 10)
}

func lstatID(path string) (fileID, uint32, error) {
	var st unix.Stat_t
	if _, err := ignoringEINTR(func() (int, error) { return 0, unix.Lstat(path, &st) }); err != nil {
		return fileID{}, 0, err
	}
	return fileID{uint64(st.Dev), uint64(st.Ino)}, uint32(st.Mode), nil
}

// listenControl adopts the socket the old process passed (inheritedFD >= 0)
// if it is a listening unix stream socket bound to path and the file at path
// still has its identity (inheritedID); otherwise it closes inheritedFD and
// binds a new socket at path.
func listenControl(path string, inheritedFD int, inheritedID string, log *slog.Logger) (*controlServer, error) {
	fd := inheritedFD
	var id fileID
	var err error
	if fd >= 0 {
		if id, _, err = lstatID(path); err != nil || id.String() != inheritedID || !isControlSocket(fd, path) {
			log.Warn("shellflip: the control socket file was removed or replaced, or the inherited socket is not a listening unix stream socket bound to it; binding a new one", "path", path)
			closeFD(&fd)
		}
	}
	if fd < 0 {
		if fd, id, err = bindControl(path); err != nil {
			return nil, err
		}
	}
	f, err := dupFile(fd, path)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ln, err := net.FileListener(f)
	f.Close()
	ul, ok := ln.(*net.UnixListener)
	if err != nil || !ok {
		if ln != nil {
			ln.Close()
		}
		unix.Close(fd)
		return nil, fmt.Errorf("shellflip: control socket %s: not a listening unix socket: %v", path, err)
	}
	return &controlServer{
		ln: ul, fd: fd, id: id, path: path, log: log,
		reqs:    make(chan *restartRequest),
		slots:   make(chan struct{}, maxControlConns),
		stopped: make(chan struct{}),
		served:  make(chan struct{}),
	}, nil
}

// isControlSocket reports whether fd is a listening unix stream socket bound
// to path.
func isControlSocket(fd int, path string) bool {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	sa, _ := unix.Getsockname(fd)
	a, ok := sa.(*unix.SockaddrUnix)
	return err == nil && typ == unix.SOCK_STREAM && ok && a.Name == path && checkSocket(fd, "unix", true) == nil
}

// bindControl creates the listening socket at path and returns it with the
// socket file's identity. Only a stale socket is taken from path (clearStale);
// anything else, there or appearing before bind (EADDRINUSE), is an error.
//
// The file is made exactly 0600 before listen, whatever the umask (0277 would
// leave a socket its own user cannot connect to). On Linux it is never wider:
// bind(2) gives the file the mode that fchmod(2) gave the socket, less the
// umask (unix_bind_bsd in net/unix/af_unix.c); elsewhere it has the umask's
// mode until the chmod. checkPeer refuses other uids in any case.
func bindControl(path string) (int, fileID, error) {
	if path == "" || path[0] == '@' {
		return -1, fileID{}, fmt.Errorf("shellflip: control socket %q: want a filesystem path", path)
	}
	if err := clearStale(path); err != nil {
		return -1, fileID{}, fmt.Errorf("shellflip: control socket %s: %w", path, err)
	}
	fd, err := socketCloexec(unix.AF_UNIX, unix.SOCK_STREAM)
	if err != nil {
		return -1, fileID{}, err
	}
	fail := func(op string, err error) (int, fileID, error) {
		unix.Close(fd)
		return -1, fileID{}, fmt.Errorf("shellflip: control socket %s: %w", path, os.NewSyscallError(op, err))
	}
	if runtime.GOOS == "linux" {
		if err := unix.Fchmod(fd, 0o600); err != nil {
			return fail("fchmod", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err)
	}
	op := "lstat"
	id, mode, err := lstatID(path)
	if err == nil && mode&0o7777 != 0o600 {
		op, err = "chmod", unix.Chmod(path, 0o600)
	}
	if err == nil {
		op, err = "listen", unix.Listen(fd, unix.SOMAXCONN)
	}
	if err != nil {
		unix.Unlink(path)
		return fail(op, err)
	}
	return fd, id, nil
}

// clearStale takes a stale socket (one that refuses connections) away from
// path, and fails if anything else is there. Unlinking after the check would
// delete a file renamed onto path in between, so the socket is renamed aside
// and deleted only if it is the one checked; anything else is put back.
func clearStale(path string) error {
	id, mode, err := lstatID(path)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return os.NewSyscallError("lstat", err)
	}
	if mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("a %s is in the way; refusing to remove it", fileType(mode))
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return errors.New("another process is listening on it")
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		return err
	}
	testHookStaleChecked()
	aside := filepath.Join(filepath.Dir(path), ".shellflip-stale-"+strconv.FormatUint(rand.Uint64(), 36))
	if err := unix.Rename(path, aside); err != nil {
		if err == unix.ENOENT {
			return nil // gone already
		}
		return fmt.Errorf("taking the stale socket away: %w", os.NewSyscallError("rename", err))
	}
	if got, _, err := lstatID(aside); err == nil && got == id {
		unix.Unlink(aside)
		return nil
	}
	if err := putBack(aside, path); err != nil {
		return fmt.Errorf("the file there changed during the takeover and could not be put back; it is now at %s: %w", aside, err)
	}
	return errors.New("the file there changed during the takeover; left as it was")
}

// testHookStaleChecked runs between clearStale's check and its rename.
var testHookStaleChecked = func() {}

// serve accepts connections until stopAccepting closes the listener.
func (s *controlServer) serve() {
	defer close(s.served)
	var limit logLimiter
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off briefly rather than spin, as
			// net/http's Server.Serve does, and say so now and then.
			if n := limit.note(time.Now()); n > 0 {
				s.log.Warn("shellflip: control socket accept", "err", err, "times", n)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		testHookAccepted()
		s.handle(conn)
	}
}

// testHookAccepted runs between serve's accept and its handing over.
var testHookAccepted = func() {}

// logLimiter lets a repeated log line through once per logEvery: note
// counts an occurrence at now, and returns how many there were since the
// last line if one may be logged now, or 0.
type logLimiter struct {
	last  time.Time
	count int
}

const logEvery = 10 * time.Second

func (l *logLimiter) note(now time.Time) int {
	l.count++
	if !l.last.IsZero() && now.Sub(l.last) < logEvery {
		return 0
	}
	n := l.count
	l.last, l.count = now, 0
	return n
}

// handle serves conn on a goroutine of its own, so that accepting never
// waits on a client, or refuses it unread if too many are being served.
func (s *controlServer) handle(conn *net.UnixConn) {
	s.wg.Add(1)
	select {
	case s.slots <- struct{}{}:
		go func() {
			defer s.wg.Done()
			defer func() { <-s.slots }()
			s.request(conn)
		}()
	default:
		go func() {
			defer s.wg.Done()
			(&restartRequest{conn: conn}).respond(s.log, 0, errors.New("too many concurrent restart requests"))
		}()
	}
}

// request reads one request from conn and hands it to the restart loop or,
// once that has stopped accepting, answers it with the final outcome.
func (s *controlServer) request(conn *net.UnixConn) {
	q := &restartRequest{conn: conn}
	if err := checkPeer(conn); err != nil {
		q.respond(s.log, 0, fmt.Errorf("permission denied: %w", err))
		return
	}
	conn.SetReadDeadline(time.Now().Add(requestTimeout))
	var scratch [256]byte
	payload, err := readFrame(conn, scratch[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("no request within %v", requestTimeout)
	}
	if err == nil {
		var m message
		if m, err = decodeMessage(payload); err == nil && m.kind != msgTryRestart {
			err = errors.New("unexpected message: want a TryRestart request")
		}
	}
	if err != nil {
		// Connecting and leaving without a word is how another instance
		// probes the path (clearStale).
		level := slog.LevelWarn
		if errors.Is(err, io.EOF) {
			level = slog.LevelDebug
		}
		s.log.Log(context.Background(), level, "shellflip: bad restart request", "err", err)
		q.respond(s.log, 0, fmt.Errorf("bad request: %w", err))
		return
	}
	select {
	case s.reqs <- q:
	case <-s.stopped:
		q.respond(s.log, s.finalPID, s.finalErr)
	}
}

// checkPeer fails unless conn's peer runs as our uid or root. Both ends
// check: mode 0600 does not keep others out if the socket's directory lets
// them swap the file.
func checkPeer(conn *net.UnixConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	uid := -1
	if cerr := rc.Control(func(fd uintptr) { uid, err = peerUID(int(fd)) }); cerr != nil {
		return cerr
	}
	if err != nil {
		return err
	}
	if uid != 0 && uid != os.Geteuid() {
		return fmt.Errorf("uid %d is neither this process's nor root", uid)
	}
	return nil
}

// stopAccepting ends this process's service of the control socket with the
// outcome of a restart, pid and err, which clients accepted meanwhile are
// told. Connections still in the backlog are left to the new process, if any.
func (s *controlServer) stopAccepting(pid int, err error) {
	s.stop.Do(func() {
		s.finalPID, s.finalErr = pid, err
		close(s.stopped)
		// Close waits for a pending Accept, not for serve to hand over
		// what it accepted: finish waits for serve to return.
		s.ln.Close()
	})
}

// finish stops accepting if need be, waits until every client accepted is
// answered (each within requestTimeout), and closes this process's copy of
// the socket. Without a successor (succeeded is false), it serves the
// backlog itself, with the final outcome, and leaves the socket file stale.
// serve must have been started.
func (s *controlServer) finish(pid int, err error, succeeded bool) {
	s.stopAccepting(pid, err)
	<-s.served
	if !succeeded {
		// The net package made the socket non-blocking: accept4 reports
		// EAGAIN once the backlog is empty.
		for {
			nfd, err := ignoringEINTR(func() (int, error) { return acceptCloexec(s.fd) })
			if err != nil {
				break
			}
			f := os.NewFile(uintptr(nfd), s.path)
			c, err := net.FileConn(f)
			f.Close()
			if err == nil {
				s.handle(c.(*net.UnixConn))
			}
		}
	}
	s.wg.Wait()
	unix.Close(s.fd)
}

// abandon closes this process's copies of the socket, for a process that
// never served it (Start failed). It accepts no one and leaves the socket
// file alone: the old process, if any, still serves both.
func (s *controlServer) abandon() {
	s.ln.Close()
	unix.Close(s.fd)
}

// restartFailedError is the service's explanation, with what is not
// printable escaped: it comes from another process, and goes to terminals.
type restartFailedError struct{ text string }

func (e *restartFailedError) Error() string        { return printable(e.text) }
func (e *restartFailedError) Is(target error) bool { return target == ErrRestartFailed }

// RequestRestart asks the service listening on the control socket at
// socketPath to restart, and returns the new process's pid. If the service
// tried and failed, errors.Is(err, ErrRestartFailed) holds and the error's
// text is the service's explanation, with what is not printable escaped. A
// server whose uid is neither the caller's nor root's, or whose answer is
// not a possible pid, is not believed. ctx bounds the whole exchange, which
// lasts until the new process is ready.
func RequestRestart(ctx context.Context, socketPath string) (int, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	// In a shared directory, anyone may have taken the path.
	if err := checkPeer(c.(*net.UnixConn)); err != nil {
		return 0, fmt.Errorf("shellflip: the control socket %s is not the service's: %w", socketPath, err)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	var buf [64]byte
	_, werr := c.Write(appendTryRestart(buf[:0]))
	// Read even if the write failed: a service that refuses a client answers
	// without reading the request, and the answer is in our receive queue.
	var scratch [512]byte
	payload, err := readFrame(c, scratch[:])
	if err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		return 0, fmt.Errorf("shellflip: reading the response: %w", cmp.Or(werr, err))
	}
	m, err := decodeMessage(payload)
	if err != nil {
		return 0, fmt.Errorf("shellflip: bad response: %w", err)
	}
	switch {
	case m.kind == msgRestartFailed:
		return 0, &restartFailedError{m.text}
	case m.kind != msgRestartComplete:
		return 0, errors.New("shellflip: bad response: unexpected message")
	case m.pid <= 1 || m.pid > math.MaxInt32: // a pid fits an int on 32-bit platforms too
		return 0, fmt.Errorf("shellflip: bad response: pid %d is not a new process", m.pid)
	}
	return int(m.pid), nil
}
