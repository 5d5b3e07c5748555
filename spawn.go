//go:build linux || darwin || freebsd

package shellflip

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Starting and watching the new process; spawn_linux.go and spawn_other.go
// hold what differs between platforms.

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

// findProgram returns the path restarts run (see Config.Path): argv0 as the
// shell or service manager resolved it, if that names the running
// executable, since a parent may set argv0 to anything (exec -a, systemd's
// ExecStart=@); otherwise the running executable.
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
	if !strings.Contains(argv0, "/") {
		// Looked for in $PATH as a shell would: never in the working
		// directory unless $PATH names it.
		path = ""
		for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
			p := filepath.Join(dir, argv0)
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
				path = p
				break
			}
		}
	}
	if path != "" && !filepath.IsAbs(path) {
		path = filepath.Join(startedAs.dir, path)
	}
	if fi, err := os.Stat(path); err == nil && os.SameFile(fi, self) {
		return path
	}
	return exe
}

// startDir returns the directory to start a new process in: "" (this
// process's) if it has not left the one it started in; otherwise that one,
// or an error if it is gone.
func startDir() (string, error) {
	if fi, err := os.Stat("."); err == nil && startedAs.dirInfo != nil && os.SameFile(fi, startedAs.dirInfo) {
		return "", nil
	}
	if _, err := os.Stat(startedAs.dir); err != nil {
		return "", fmt.Errorf("the directory this process started in: %w", err)
	}
	return startedAs.dir, nil
}

// program returns the path of the program to start, given Config.Path, and
// the directory to start it in (see startDir).
func program(configured string) (path, dir string, err error) {
	if dir, err = startDir(); err != nil {
		return "", "", err
	}
	if configured != "" {
		if !filepath.IsAbs(configured) {
			configured = filepath.Join(startedAs.dir, configured)
		}
		return configured, dir, nil
	}
	path = startedAs.program
	fi, err := os.Stat(path)
	switch {
	case err == nil && !fi.Mode().IsRegular():
		return "", "", fmt.Errorf("%s is a %v, not a program", path, fi.Mode().Type())
	case err == nil && fi.Mode().Perm()&0o111 == 0:
		// A deploy that is not finished: running the old code instead
		// would report a success.
		return "", "", fmt.Errorf("%s is not executable (mode %v)", path, fi.Mode().Perm())
	case err == nil:
		return path, dir, nil
	case path != "" && !errors.Is(err, os.ErrNotExist):
		return "", "", err
	}
	// Gone (a binary that "go run" built and removed): on Linux
	// /proc/self/exe reaches the running executable even so.
	if runtime.GOOS == "linux" && unix.Access("/proc/self/exe", unix.X_OK) == nil {
		return "/proc/self/exe", dir, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", "", fmt.Errorf("no executable at %q, and the running one cannot be found: %w", path, err)
	}
	return exe, dir, nil
}

// spawner forks from a goroutine locked to its own OS thread, whose state
// no other goroutine changed, as shellflip forks from a dedicated thread.
type spawner struct {
	reqs  chan spawnRequest
	reply chan spawnRequest
}

type spawnRequest struct {
	path, dir string
	argv, env []string
	files     []uintptr
	pid       int // the result
	err       error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnRequest), reply: make(chan spawnRequest)}
	go func() {
		// Never unlocked: when the goroutine returns, the runtime ends the
		// thread instead of reusing it.
		runtime.LockOSThread()
		for q := range s.reqs {
			q.pid, q.err = forkExec(q.path, q.argv, q.env, q.dir, q.files)
			s.reply <- q
		}
	}()
	return s
}

func (s *spawner) spawn(path string, argv, env []string, dir string, files []uintptr) (int, error) {
	s.reqs <- spawnRequest{path: path, dir: dir, argv: argv, env: env, files: files}
	q := <-s.reply
	return q.pid, q.err
}

// close ends the spawner's thread. Nil-safe: a Restarter with a broker has none.
func (s *spawner) close() {
	if s != nil {
		close(s.reqs)
	}
}

// forkExec starts path with exactly files as its fds (child fd i is parent
// fd files[i]). syscall.ForkExec, which x/sys/unix lacks, holds
// syscall.ForkLock, so that no fd created meanwhile without close-on-exec
// slips into the child. No Setsid, Setpgid or Pdeathsig (golang/go#27505):
// the new process stands where the old one stood, and outlives it.
func forkExec(path string, argv, env []string, dir string, files []uintptr) (int, error) {
	return syscall.ForkExec(path, argv, &syscall.ProcAttr{Dir: dir, Env: env, Files: files})
}

// sealFDsWith marks every fd above stderr close-on-exec: by closeRange, else
// each fd listed in dir (/proc/self/fd), else every fd below RLIMIT_NOFILE.
// If all three fail, so does the restart: no stray fd reaches the new process.
// A listing with no fd above 2 is none: reading it takes one (FreeBSD's
// /dev/fd, without fdescfs mounted, shows 0 to 2 whatever is open).
func sealFDsWith(closeRange func() error, dir string) error {
	if closeRange() == nil {
		return nil
	}
	if ents, err := os.ReadDir(dir); err == nil {
		listed := false
		for _, e := range ents {
			if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
				unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
				listed = true
			}
		}
		if listed {
			return nil
		}
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("cannot mark this process's fds close-on-exec: no close_range, no %s, and %w", dir, os.NewSyscallError("getrlimit", err))
	}
	for fd := 3; fd < int(min(lim.Cur, math.MaxInt32)); fd++ {
		unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC) // EBADF for most
	}
	return nil
}

// childWatch is the new process, seen from the process that started it,
// which reaps it in watchChild's goroutine. A broker's child is the
// broker's to wait for and kill (broker.go): killer asks it to.
type childWatch struct {
	pid    int
	path   string        // the program it runs, for logs
	done   chan struct{} // closed once the child was reaped
	mu     sync.Mutex    // orders kill against the reaping wait4
	gone   bool          // reaped: the pid may be someone else's now
	ws     unix.WaitStatus
	killer func() // nil: this process's own child
	lost   bool   // the broker exited first: how the child ended is unknown
}

// kill sends SIGKILL unless the child was already reaped.
func (c *childWatch) kill() {
	if c.killer != nil {
		c.killer()
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.gone {
		unix.Kill(c.pid, unix.SIGKILL)
	}
}

// killed reports whether the child died of SIGKILL; valid after done.
func (c *childWatch) killed() bool { return c.ws.Signaled() && c.ws.Signal() == unix.SIGKILL }

// status says how the child ended, as os.ProcessState does; valid after done.
func (c *childWatch) status() string {
	switch ws := c.ws; {
	case c.lost:
		return "status unknown: the broker exited"
	case ws.Exited():
		return "exit status " + strconv.Itoa(ws.ExitStatus())
	case ws.CoreDump(): // implies Signaled
		return "signal: " + ws.Signal().String() + " (core dumped)"
	case ws.Signaled():
		return "signal: " + ws.Signal().String()
	}
	return fmt.Sprintf("wait status %#x", uint32(c.ws))
}

// ignoringEINTR calls fn until it fails with something other than EINTR,
// which some system calls return despite SA_RESTART (see os/file_posix.go).
func ignoringEINTR[T any](fn func() (T, error)) (T, error) {
	for {
		v, err := fn()
		if err != unix.EINTR {
			return v, err
		}
	}
}

// closeFD closes *fd if it is open and marks it closed (-1).
func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

// pollableFile wraps fd, which it takes over, in an *os.File that the
// runtime poller serves: deadlines work, and Close unblocks Read and Write.
func pollableFile(fd int, name string) (*os.File, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("setnonblock", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}
