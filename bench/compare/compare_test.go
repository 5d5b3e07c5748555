//go:build linux

package compare

// BenchmarkUpgradeToReady measures, for each number of passed listeners
// (fds=N), one "upgrade to ready" of each kind (lib=):
//
//	floor            syscall.ForkExec of this binary with a pipe at fd 3
//	                 and a release pipe at fd 4; the child writes a byte on
//	                 fd 3 as its first act; the parent reads it.
//	shellflip        shellflip.RequestRestart on the control socket of a
//	                 Restarter (shellflip.Start) in this process; it returns
//	                 when the new process, which calls shellflip.Start (and
//	                 so Ready), was taken for the successor.
//	shellflip-signal the same restart triggered by SIGUSR1 to this process
//	                 and awaited with Restarter.Wait, without the control
//	                 socket's client round trip.
//	shellflip-call   the same restart triggered by Restarter.Restart: a
//	                 call in this process that returns the new pid, as
//	                 tableflip's Upgrade is; the like-for-like comparison.
//	tableflip        Upgrader.Upgrade of a tableflip.Upgrader in this
//	                 process; it returns when the new process, which calls
//	                 tableflip.New and Upgrader.Ready, has reported ready.
//
// and then, in every case, the release of the new process and its exit:
// the parent closes the release pipe's write end, the new process reads EOF
// and exits, and the parent waits until it has exited (the floor reaps it
// with wait4; the libraries reap their own children, so for them the
// parent waits with waitid(P_ALL, WNOWAIT) for the exit, which is when the
// kernel has torn the process down).
//
// Why the release pipe: neither library may see its new process exit
// before it has taken that process for its successor. shellflip fails a
// restart whose new process exited, and tableflip fails an upgrade whose
// child's exit it sees before its readiness byte; a new process that exits
// right after Ready races both checks. The release pipe makes every
// iteration succeed and puts the same serial step (release, exit, wait) at
// the end of all three kinds, the floor included, so the kinds differ only
// in what each library does. The new processes of both libraries claim the
// release pipe by name (shellflip.File, Upgrader.Fds.File) before Ready, so
// both pass N+1 fds and do one more dup than the floor.
//
// The N listeners are TCP sockets on distinct loopback addresses,
// registered in the old process with shellflip.Listen and with
// Upgrader.Fds.Listen (tableflip keys listeners by network and address).
// The new processes do not claim them: both libraries close unclaimed
// inherited fds at Ready.
//
// Outside the timer, each iteration waits until the previous new process
// was reaped and prepares the next: shellflip.Start (binding the control
// socket) and the release pipe for shellflip; for tableflip, a new
// Upgrader, its listeners (Fds.Listen on the first iteration; the same
// listeners re-added with Fds.AddListener later, which is what Fds.Listen
// does after it has created one), the release pipe and Ready.
//
// tableflip allows one Upgrader per process (tableflip.New fails the second
// time) and an Upgrader ends after one successful upgrade. tableflipUpgrader
// below reaches tableflip's process-wide Upgrader so that each iteration can
// clear it and call tableflip.New again: the state New starts from is then
// the same as in a process that never upgraded. The environment tableflip
// passes on is os.Environ() plus its own variable, untouched by an upgrade.
//
// Besides the wall time, each reports the CPU time of the old process in
// the timed region (oldcpu-us/op, every thread) and of the new process from
// exec to exit (newcpu-us/op). Other work on a shared machine inflates them
// far less than the wall time, which waits for CPUs that others hold.
//
// The new process's roles run from TestMain, before the tests' flags are
// parsed; both libraries re-execute this binary with this process's
// command line.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
	_ "unsafe" // go:linkname

	"github.com/cloudflare/tableflip"
	"github.com/shellflip-go/shellflip"
	"golang.org/x/sys/unix"
)

const (
	envRole   = "COMPARE_BENCH_ROLE"
	envSocket = "COMPARE_BENCH_SOCKET"

	// releaseName is the name of the release pipe in both libraries'
	// registries.
	releaseName = "compare-release"

	// floorReadyFD and floorReleaseFD are the floor child's pipes.
	floorReadyFD, floorReleaseFD = 3, 4

	// benchTimeout bounds every wait of an iteration.
	benchTimeout = time.Minute
)

// fdCounts are the numbers of listeners passed, as in the library's own
// BenchmarkRestartToReady.
var fdCounts = []int{0, 1, 16, 256, 1000}

// tableflipUpgrader is tableflip's unexported stdEnvUpgrader: while it is
// set, tableflip.New refuses to make another Upgrader. Only benchTableflip
// clears it, between iterations.
//
//go:linkname tableflipUpgrader github.com/cloudflare/tableflip.stdEnvUpgrader
var tableflipUpgrader *tableflip.Upgrader

func TestMain(m *testing.M) {
	switch role := os.Getenv(envRole); role {
	case "":
		os.Exit(m.Run())
	case "floor":
		os.Exit(floorChild())
	case "shellflip":
		os.Exit(shellflipChild())
	case "tableflip":
		os.Exit(tableflipChild())
	default:
		fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
		os.Exit(2)
	}
}

// floorChild writes one byte to fd 3 as its first act, then waits for EOF
// on fd 4.
func floorChild() int {
	b := [1]byte{'R'}
	if _, err := unix.Write(floorReadyFD, b[:]); err != nil {
		return 1
	}
	for {
		n, err := unix.Read(floorReleaseFD, b[:])
		if err == unix.EINTR {
			continue
		}
		if n <= 0 {
			return 0
		}
	}
}

// shellflipChild claims the release pipe, calls Start (which adopts the
// control socket and calls Ready), and exits when released.
func shellflipChild() int {
	rel, err := shellflip.File(releaseName)
	if err != nil || rel == nil {
		fmt.Fprintf(os.Stderr, "shellflip child: release pipe: %v\n", err)
		return 1
	}
	if _, err := shellflip.Start(context.Background(), shellflip.Config{SocketPath: os.Getenv(envSocket)}); err != nil {
		fmt.Fprintf(os.Stderr, "shellflip child: %v\n", err)
		return 1
	}
	io.Copy(io.Discard, rel)
	return 0
}

// tableflipChild claims the release pipe, calls New and Ready, and exits
// when released.
func tableflipChild() int {
	upg, err := tableflip.New(tableflip.Options{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "tableflip child: %v\n", err)
		return 1
	}
	rel, err := upg.Fds.File(releaseName)
	if err != nil || rel == nil {
		fmt.Fprintf(os.Stderr, "tableflip child: release pipe: %v\n", err)
		return 1
	}
	if err := upg.Ready(); err != nil {
		fmt.Fprintf(os.Stderr, "tableflip child: %v\n", err)
		return 1
	}
	io.Copy(io.Discard, rel)
	return 0
}

func BenchmarkUpgradeToReady(b *testing.B) {
	for _, n := range fdCounts {
		b.Run("fds="+strconv.Itoa(n), func(b *testing.B) {
			b.Run("lib=floor", func(b *testing.B) { benchFloor(b, n) })
			b.Run("lib=shellflip", func(b *testing.B) { benchShellflip(b, n, bySocket) })
			b.Run("lib=shellflip-signal", func(b *testing.B) { benchShellflip(b, n, bySignal) })
			b.Run("lib=shellflip-call", func(b *testing.B) { benchShellflip(b, n, byCall) })
			b.Run("lib=tableflip", func(b *testing.B) { benchTableflip(b, n) })
		})
	}
}

func benchFloor(b *testing.B, n int) {
	lns := listeners(b, n)
	files := []uintptr{0, 1, 2, 0, 0}
	for _, ln := range lns {
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			b.Fatal(err)
		}
		// Valid until the listener is closed, after the benchmark.
		rc.Control(func(fd uintptr) { files = append(files, fd) })
	}
	setenv(b, envRole, "floor")
	attr := &syscall.ProcAttr{Env: os.Environ(), Files: files}
	clk := newClock(b)
	clk.start()
	for range b.N {
		var ready, release [2]int
		if err := unix.Pipe2(ready[:], unix.O_CLOEXEC); err != nil {
			b.Fatal(err)
		}
		if err := unix.Pipe2(release[:], unix.O_CLOEXEC); err != nil {
			b.Fatal(err)
		}
		attr.Files[floorReadyFD], attr.Files[floorReleaseFD] = uintptr(ready[1]), uintptr(release[0])
		pid, err := syscall.ForkExec(os.Args[0], os.Args, attr)
		unix.Close(ready[1])
		unix.Close(release[0])
		if err != nil {
			b.Fatal(err)
		}
		var buf [1]byte
		for {
			var m int
			m, err = unix.Read(ready[0], buf[:])
			if err != unix.EINTR {
				if err == nil && m != 1 {
					err = io.ErrUnexpectedEOF
				}
				break
			}
		}
		unix.Close(ready[0])
		unix.Close(release[1])
		var ws unix.WaitStatus
		for {
			_, werr := unix.Wait4(pid, &ws, 0, nil)
			if werr != unix.EINTR {
				if err == nil {
					err = werr
				}
				break
			}
		}
		if err == nil && (!ws.Exited() || ws.ExitStatus() != 0) {
			err = fmt.Errorf("child %d: wait status %#x", pid, ws)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	clk.stop()
	clk.report()
}

// How a shellflip restart is triggered: a client on the control socket (as
// BenchmarkRestartToReady in the main module does), SIGUSR1, or a call of
// Restarter.Restart, which is what tableflip's Upgrade is.
type trigger int

const (
	bySocket trigger = iota
	bySignal
	byCall
)

func benchShellflip(b *testing.B, n int, how trigger) {
	noFile(b, 2*uint64(n)+256) // the listener and the registry's duplicate
	for _, addr := range addrs(n) {
		ln, err := shellflip.Listen("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			ln.Close()
			shellflip.Remove(shellflip.ListenerName("tcp", addr))
		})
	}
	var sock string
	if how == bySocket {
		sock = filepath.Join(b.TempDir(), "ctl.sock")
	}
	setenv(b, envRole, "shellflip")
	setenv(b, envSocket, sock)
	cfg := shellflip.Config{SocketPath: sock, ReadyTimeout: benchTimeout}
	ctx, cancel := context.WithTimeout(context.Background(), 10*benchTimeout)
	defer cancel()
	clk := newClock(b)
	for range b.N {
		if err := waitNoChildren(); err != nil {
			b.Fatal(err)
		}
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		err = shellflip.Add(releaseName, r)
		r.Close()
		if err != nil {
			b.Fatal(err)
		}
		rs, err := shellflip.Start(ctx, cfg)
		if err != nil {
			b.Fatal(err)
		}
		clk.start()

		var pid int
		switch how {
		case bySignal:
			err = unix.Kill(os.Getpid(), unix.SIGUSR1)
			if err == nil {
				var p *shellflip.Process
				if p, err = rs.Wait(); err == nil {
					pid = p.Pid
				}
			}
		case byCall:
			pid, err = rs.Restart(ctx)
		default:
			pid, err = shellflip.RequestRestart(ctx, sock)
		}
		w.Close()
		if err == nil {
			err = waitExited()
		}
		clk.stop()

		if err != nil {
			rs.Stop()
			b.Fatal(err)
		}
		p, err := rs.Wait()
		if err != nil || p.Pid != pid {
			b.Fatalf("restart answered pid %d; the Restarter reports %v, %v", pid, p, err)
		}
		shellflip.Remove(releaseName)
	}
	if err := waitNoChildren(); err != nil {
		b.Fatal(err)
	}
	clk.report()
}

func benchTableflip(b *testing.B, n int) {
	addrs := addrs(n)
	lns := make([]net.Listener, n)
	b.Cleanup(func() {
		for _, ln := range lns {
			if ln != nil {
				ln.Close()
			}
		}
	})
	noFile(b, 2*uint64(n)+256) // the listener and the Upgrader's duplicate
	setenv(b, envRole, "tableflip")
	clk := newClock(b)
	for range b.N {
		if err := waitNoChildren(); err != nil {
			b.Fatal(err)
		}
		tableflipUpgrader = nil
		upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: benchTimeout})
		if err != nil {
			b.Fatal(err)
		}
		for i, addr := range addrs {
			if lns[i] == nil {
				lns[i], err = upg.Fds.Listen("tcp", addr)
			} else {
				err = upg.Fds.AddListener("tcp", addr, lns[i].(tableflip.Listener))
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		r, w, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		err = upg.Fds.AddFile(releaseName, r)
		r.Close()
		if err != nil {
			b.Fatal(err)
		}
		if err := upg.Ready(); err != nil {
			b.Fatal(err)
		}
		clk.start()

		// Ready closes a channel that the Upgrader's loop selects on
		// together with upgrade requests; if a request comes first, it is
		// refused with "process is not ready yet". Ask again then.
		for {
			err = upg.Upgrade()
			if err == nil || err.Error() != "process is not ready yet" {
				break
			}
		}
		w.Close()
		if err == nil {
			err = waitExited()
		}
		clk.stop()

		upg.Stop()
		if err != nil {
			b.Fatal(err)
		}
	}
	if err := waitNoChildren(); err != nil {
		b.Fatal(err)
	}
	clk.report()
}

// clock runs the benchmark timer and accounts CPU time: this process's
// while the timer runs, and that of the children reaped since newClock. The
// timer is stopped when newClock returns.
type clock struct {
	b              *testing.B
	old, oldMark   time.Duration
	childrenAtZero time.Duration
}

func newClock(b *testing.B) *clock {
	b.ReportAllocs()
	b.ResetTimer()
	b.StopTimer()
	return &clock{b: b, childrenAtZero: rusage(unix.RUSAGE_CHILDREN)}
}

func (c *clock) start() {
	c.b.StartTimer()
	c.oldMark = rusage(unix.RUSAGE_SELF)
}

func (c *clock) stop() {
	c.old += rusage(unix.RUSAGE_SELF) - c.oldMark
	c.b.StopTimer()
}

// report adds the CPU times per iteration; call it once every new process
// was reaped.
func (c *clock) report() {
	n := float64(c.b.N)
	c.b.ReportMetric(float64(c.old.Microseconds())/n, "oldcpu-us/op")
	c.b.ReportMetric(float64((rusage(unix.RUSAGE_CHILDREN)-c.childrenAtZero).Microseconds())/n, "newcpu-us/op")
}

// rusage returns the user and system time of who (RUSAGE_SELF or
// RUSAGE_CHILDREN, the reaped ones).
func rusage(who int) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(who, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// addrs returns n distinct loopback addresses with port 0. Linux routes all
// of 127.0.0.0/8 to the loopback device.
func addrs(n int) []string {
	a := make([]string, n)
	for i := range a {
		a[i] = fmt.Sprintf("127.1.%d.%d:0", i/250, i%250+1)
	}
	return a
}

// listeners opens n TCP listeners with the net package alone.
func listeners(b *testing.B, n int) []net.Listener {
	noFile(b, uint64(n)+256)
	lns := make([]net.Listener, 0, n)
	for _, addr := range addrs(n) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		lns = append(lns, ln)
	}
	return lns
}

// noFile raises the soft RLIMIT_NOFILE to at least need, or skips.
func noFile(b *testing.B, need uint64) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	if lim.Cur >= need {
		return
	}
	if lim.Max < need {
		b.Skipf("RLIMIT_NOFILE hard limit %d < %d fds needed", lim.Max, need)
	}
	lim.Cur = need
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		b.Skipf("raising RLIMIT_NOFILE to %d: %v", need, err)
	}
}

// setenv sets a variable for the new processes of one benchmark: tableflip
// has no way to add to the environment it passes on, so all kinds get their
// role this way.
func setenv(b *testing.B, key, value string) {
	if err := os.Setenv(key, value); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.Unsetenv(key) })
}

// waitExited waits until a child of this process has exited (it is a
// zombie that its library has yet to reap) or there is no child left (its
// library reaped it already). It reaps nothing.
func waitExited() error {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOWAIT, nil)
		switch err {
		case nil, unix.ECHILD:
			return nil
		case unix.EINTR:
			continue
		}
		return os.NewSyscallError("waitid", err)
	}
}

// waitNoChildren waits until the libraries have reaped every child of this
// process, so that waitExited in the next iteration sees the next one.
func waitNoChildren() error {
	deadline := time.Now().Add(benchTimeout)
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOWAIT|unix.WNOHANG, nil)
		if err == unix.ECHILD {
			return nil
		}
		if err != nil && err != unix.EINTR {
			return os.NewSyscallError("waitid", err)
		}
		if time.Now().After(deadline) {
			return errors.New("a child process is still there")
		}
		time.Sleep(50 * time.Microsecond)
	}
}
