//go:build linux || darwin || freebsd

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// This file is the control socket: a unix stream socket on which a client
// (RequestRestart, or shellflip's own Rust client) asks for a restart and
// learns the new pid or why it failed. One request and one response per
// connection, in the frames of wire.go.

const (
	// requestTimeout bounds how long a client may take to send its request
	// and to read its response, so that a silent client ties up nothing but
	// its own connection.
	requestTimeout = 5 * time.Second
	// maxControlConns bounds the connections served at once; one more is
	// answered with an error straight away.
	maxControlConns = 64
)

// restartRequest is a client waiting for the outcome of a restart: on the
// control socket (conn), or in this process (Restarter.Restart: reply).
type restartRequest struct {
	conn  *net.UnixConn
	reply chan outcome // buffered, one
}

// respond sends the outcome and closes the connection. A client that went
// away gets nothing; the write error (EPIPE, which Go reports as an error
// rather than a signal for sockets) is logged and otherwise ignored.
func (q *restartRequest) respond(log *slog.Logger, pid int, err error) {
	if q.reply != nil {
		q.reply <- outcome{pid: pid, err: err}
		return
	}
	var buf [512]byte
	frame := appendOutcome(buf[:0], pid, err)
	q.conn.SetWriteDeadline(time.Now().Add(requestTimeout))
	if _, werr := q.conn.Write(frame); werr != nil {
		log.Warn("shellflip: could not answer a restart request", "err", werr)
	}
	q.conn.Close()
}

// appendOutcome appends the response frame for a restart that ended in pid
// or err.
func appendOutcome(dst []byte, pid int, err error) []byte {
	if err != nil {
		return appendRestartFailed(dst, err.Error())
	}
	return appendRestartComplete(dst, uint32(pid))
}

// controlServer accepts restart requests on the control socket.
type controlServer struct {
	ln   *net.UnixListener
	fd   int // close-on-exec duplicate of the listening socket, for the new process
	path string
	log  *slog.Logger
	reqs chan *restartRequest // to the restart loop

	slots chan struct{} // one per connection being served

	stopped chan struct{} // closed by finish

	mu       sync.Mutex
	finished bool // the restart loop is gone; answer with final
	finalPID int
	finalErr error
	reading  map[*net.UnixConn]struct{} // connections whose request is not read yet
	wg       sync.WaitGroup             // connection handlers
}

// listenControl binds the control socket at path, or adopts the one the old
// process passed (inheritedFD >= 0) if it is bound to the same path.
func listenControl(path string, inheritedFD int, log *slog.Logger) (*controlServer, error) {
	fd := -1
	if inheritedFD >= 0 {
		if listeningUnixPath(inheritedFD) == filepath.Clean(path) {
			fd = inheritedFD
		} else {
			log.Warn("shellflip: the inherited control socket is bound elsewhere; binding a new one", "path", path)
			unix.Close(inheritedFD)
		}
	}
	if fd < 0 {
		var err error
		if fd, err = bindControl(path); err != nil {
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
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("shellflip: control socket %s: %w", path, err)
	}
	s := &controlServer{
		ln: ln.(*net.UnixListener), fd: fd, path: path, log: log,
		reqs:    make(chan *restartRequest),
		slots:   make(chan struct{}, maxControlConns),
		stopped: make(chan struct{}),
		reading: map[*net.UnixConn]struct{}{},
	}
	return s, nil
}

// serveFrom starts accepting once gate is closed: when this process is the
// service's main process. Until then the old process (if any) still serves
// the socket: it answers everything that queued up during its restart with
// that restart's outcome (see finish), so one request never causes two
// restarts, and the two processes never both accept.
func (s *controlServer) serveFrom(gate <-chan struct{}) {
	go func() {
		select {
		case <-gate:
			s.accept()
		case <-s.stopped:
		}
	}()
}

// listeningUnixPath returns the cleaned path a listening unix stream socket
// is bound to, or "" if fd is anything else.
func listeningUnixPath(fd int) string {
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v == 0 {
		return ""
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || v != unix.SOCK_STREAM {
		return ""
	}
	sa, err := unix.Getsockname(fd)
	ua, ok := sa.(*unix.SockaddrUnix)
	if err != nil || !ok || ua.Name == "" {
		return ""
	}
	return filepath.Clean(ua.Name)
}

// bindControl creates the listening socket at path with mode 0600.
//
// Only a socket that nobody listens on any more (connect is refused) is
// removed from path first; a live socket, a regular file, a directory or a
// symlink there is an error and is left alone. If anything appears at path
// between that check and bind, bind fails with EADDRINUSE: nothing is ever
// replaced.
//
// On Linux the socket file is 0600 from birth: bind(2) gives it the mode of
// the socket's inode, which fchmod(2) sets beforehand, less the umask
// (unix_bind_bsd in net/unix/af_unix.c). Elsewhere it is chmod'ed right
// after bind, and until then has the umask's mode; SO_PEERCRED-style checks
// (checkPeer) still refuse other uids in that window.
func bindControl(path string) (int, error) {
	if path == "" || path[0] == '@' {
		return -1, fmt.Errorf("shellflip: control socket %q: want a filesystem path", path)
	}
	if err := removeStaleSocket(path); err != nil {
		return -1, err
	}
	fd, err := socketCloexec(unix.AF_UNIX, unix.SOCK_STREAM)
	if err != nil {
		return -1, err
	}
	fail := func(op string, err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("shellflip: control socket %s: %w", path, os.NewSyscallError(op, err))
	}
	if runtime.GOOS == "linux" {
		if err := unix.Fchmod(fd, 0o600); err != nil {
			return fail("fchmod", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err)
	}
	if runtime.GOOS != "linux" {
		if err := unix.Chmod(path, 0o600); err != nil {
			unix.Unlink(path)
			return fail("chmod", err)
		}
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		unix.Unlink(path)
		return fail("listen", err)
	}
	return fd, nil
}

// removeStaleSocket removes path if it is a unix socket that refuses
// connections, and fails if anything else is there.
func removeStaleSocket(path string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return fmt.Errorf("shellflip: control socket %s: %w", path, os.NewSyscallError("lstat", err))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("shellflip: control socket %s: a %s is in the way; refusing to remove it", path, fileType(uint32(st.Mode)))
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("shellflip: control socket %s: another process is listening on it", path)
	}
	if !errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("shellflip: control socket %s: %w", path, err)
	}
	if err := unix.Unlink(path); err != nil && err != unix.ENOENT {
		return fmt.Errorf("shellflip: control socket %s: %w", path, os.NewSyscallError("unlink", err))
	}
	return nil
}

func (s *controlServer) accept() {
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off briefly rather than spin, as
			// net/http's Server.Serve does.
			s.log.Warn("shellflip: control socket accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		select {
		case s.slots <- struct{}{}:
		default:
			// Too many clients at once; answer without reading, from a
			// goroutine of its own so that accepting never waits on a client.
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				(&restartRequest{conn: conn}).respond(s.log, 0, errors.New("too many concurrent restart requests"))
			}()
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-s.slots }()
			s.serve(conn)
		}()
	}
}

// serve reads one request from conn and hands it to the restart loop.
func (s *controlServer) serve(conn *net.UnixConn) {
	q := &restartRequest{conn: conn}
	if err := checkPeer(conn); err != nil {
		q.respond(s.log, 0, err)
		return
	}
	if !s.startReading(conn) {
		s.respondFinal(q)
		return
	}
	conn.SetReadDeadline(time.Now().Add(requestTimeout))
	var scratch [256]byte
	payload, err := readFrame(conn, scratch[:])
	if err == nil {
		var m message
		if m, err = decodeMessage(payload); err == nil && m.kind != msgTryRestart {
			err = errors.New("unexpected message: want a TryRestart request")
		}
	}
	if !s.stopReading(conn) {
		// finish cut the read short: the restart loop is gone.
		if err != nil {
			pid, ferr := s.final()
			err = fmt.Errorf("no request received before this process stopped serving restarts (%s)", describeOutcome(pid, ferr))
			q.respond(s.log, 0, fmt.Errorf("bad request: %w", err))
			return
		}
		s.respondFinal(q)
		return
	}
	if err != nil {
		s.log.Warn("shellflip: bad restart request", "err", err)
		q.respond(s.log, 0, fmt.Errorf("bad request: %w", err))
		return
	}
	conn.SetReadDeadline(time.Time{})
	select {
	case s.reqs <- q:
	case <-s.stopped:
		s.respondFinal(q)
	}
}

// startReading records that conn's request is being read, unless the
// server has finished.
func (s *controlServer) startReading(conn *net.UnixConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.finished {
		return false
	}
	s.reading[conn] = struct{}{}
	return true
}

// stopReading reports whether the read finished before the server did.
func (s *controlServer) stopReading(conn *net.UnixConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.reading, conn)
	return !s.finished
}

// respondFinal answers q with the outcome of the last restart.
func (s *controlServer) respondFinal(q *restartRequest) {
	pid, err := s.final()
	q.respond(s.log, pid, err)
}

// final returns the outcome that late clients get.
func (s *controlServer) final() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.finalPID, s.finalErr
}

func describeOutcome(pid int, err error) string {
	if err != nil {
		return err.Error()
	}
	return "replaced by pid " + strconv.Itoa(pid)
}

// checkPeer refuses clients whose uid is neither ours nor root's: the
// socket's 0600 mode already keeps them out, unless the caller chose a path
// whose directory lets them swap it, or changed the mode.
func checkPeer(conn *net.UnixConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	uid, perr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { uid, perr = peerUID(int(fd)) }); err != nil {
		return err
	}
	if perr != nil {
		return perr
	}
	if uid != 0 && uid != os.Geteuid() {
		return fmt.Errorf("permission denied: uid %d may not restart this service", uid)
	}
	return nil
}

// finish stops accepting, answers every client still to be answered with
// pid and err, and waits until they were (each write is bounded by
// requestTimeout). The listening socket stays open in the new process, if
// any, so its path stays bound; nothing is unlinked.
func (s *controlServer) finish(pid int, err error) {
	s.mu.Lock()
	if s.finished {
		s.mu.Unlock()
		return
	}
	s.finished, s.finalPID, s.finalErr = true, pid, err
	close(s.stopped)
	for c := range s.reading {
		// Wake the read without losing what the client already sent (a
		// read deadline would): the read returns the buffered request,
		// then end of file, and serve answers.
		c.CloseRead()
	}
	s.mu.Unlock()
	// Close waits for a pending Accept; what it accepted is served above.
	s.ln.Close()
	s.drainBacklog()
	s.wg.Wait()
	unix.Close(s.fd)
}

// drainBacklog answers the connections still queued on the listening
// socket with the final outcome, without reading their requests: they
// arrived while this process served the socket, so this process answers
// them, and the next process does not take them for requests of its own.
func (s *controlServer) drainBacklog() {
	// The listening socket's file description is non-blocking (the net
	// package made it so), so accept4 reports EAGAIN once it is empty.
	pid, ferr := s.final()
	var buf [512]byte
	frame := appendOutcome(buf[:0], pid, ferr)
	for {
		var nfd int
		err := ignoringEINTR(func() (err error) {
			nfd, err = acceptCloexec(s.fd)
			return err
		})
		if err != nil {
			return // EAGAIN: empty; anything else: nothing more to drain
		}
		// A new socket's send buffer holds a frame: the write does not
		// block, and a client that went away costs an EPIPE, not a signal
		// (the runtime ignores SIGPIPE for fds other than stdout/stderr).
		unix.Write(nfd, frame)
		unix.Close(nfd)
	}
}

// RequestRestart asks the service listening on the control socket at
// socketPath to restart, and returns the new process's pid. If the service
// tried and failed, the error's text is the service's explanation, verbatim,
// and errors.Is(err, ErrRestartFailed) holds. ctx bounds the whole exchange,
// which lasts as long as the new process takes to become ready.
func RequestRestart(ctx context.Context, socketPath string) (int, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	var buf [64]byte
	_, werr := c.Write(appendTryRestart(buf[:0]))
	// Read even if the write failed: a service that refuses a client
	// answers without reading its request and closes, and its answer is
	// waiting in our receive queue.
	var scratch [512]byte
	payload, err := readFrame(c, scratch[:])
	if err != nil {
		if werr != nil {
			err = werr
		}
		return 0, ctxErr(ctx, fmt.Errorf("shellflip: reading the response: %w", err))
	}
	m, err := decodeMessage(payload)
	if err != nil {
		return 0, fmt.Errorf("shellflip: bad response: %w", err)
	}
	switch m.kind {
	case msgRestartComplete:
		return int(m.pid), nil
	case msgRestartFailed:
		return 0, &restartFailedError{m.text}
	}
	return 0, errors.New("shellflip: bad response: unexpected message")
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}
