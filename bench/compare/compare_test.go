//go:build linux

package compare

// BenchmarkUpgradeToReady measures, for passed listeners that the new
// process claims (claim=all) or does not (claim=none), and for each number
// of them (fds=N), one "upgrade to ready" of each kind:
//
//	floor            syscall.ForkExec of this binary with a pipe at fd 3
//	                 and a release pipe at fd 4; the child writes a byte on
//	                 fd 3 as its first act; the parent reads it.
//	net              (claim=all only) the floor, but the child first claims
//	                 every listener with the net package alone, as
//	                 coreos/go-systemd's activation.Listeners does:
//	                 net.FileListener(os.NewFile(fd)), then closes the
//	                 file. What a claim costs at the least.
//	shellflip        Restarter.Restart of a Restarter (shellflip.Start) in
//	                 this process: a call that returns the new pid once the
//	                 new process, which claims its listeners with
//	                 shellflip.Listen and calls shellflip.Start (and so
//	                 Ready), was taken for the successor. The like-for-like
//	                 counterpart of tableflip's Upgrade.
//	shellflip-socket the same restart requested with
//	                 shellflip.RequestRestart on the control socket.
//	tableflip        Upgrader.Upgrade of a tableflip.Upgrader in this
//	                 process; it returns when the new process, which claims
//	                 its listeners with Fds.Listener and calls tableflip.New
//	                 and Upgrader.Ready, has reported ready.
//
// and then, in every case, the release of the new process and its exit:
// the parent closes the release pipe's write end, the new process reads EOF
// and exits, and the parent waits until it has exited (the floor reaps it
// with wait4; the libraries reap their own children, so for them the
// parent waits with waitid(P_ALL, WNOWAIT) for the exit, which is when the
// kernel has torn the process down).
//
// Every iteration of the b.N loop runs each kind once, in turn, and starts
// with another kind each time, so that whatever else loads the machine
// loads all kinds alike: on a noisy machine the times move from run to
// run, their ratios hold still. Each kind reports its wall time
// (<kind>-sec/op: the median iteration's, which a stall in a few
// iterations does not move), the CPU time of this process in its timed
// region (<kind>-oldcpu-sec/op, every thread) and of its new process from
// exec to exit (<kind>-newcpu-sec/op); the ratios of wall times, the median
// of the iterations' own ratios, are tableflip/shellflip, shellflip/floor
// and (claim=all) shellflip/net. The built-in sec/op, which would be the
// sum of the kinds, is suppressed.
//
// Why the release pipe: neither library may see its new process exit
// before it has taken that process for its successor. shellflip fails a
// restart whose new process exited, and tableflip fails an upgrade whose
// child's exit it sees before its readiness byte; a new process that exits
// right after Ready races both checks. The release pipe makes every
// iteration succeed and puts the same serial step (release, exit, wait) at
// the end of every kind, the floor included, so the kinds differ only in
// what each library does. The new processes of both libraries claim the
// release pipe by name (shellflip.FD, Upgrader.Fds.File) before Ready, so
// both pass N+1 fds and do one more dup than the floor.
//
// The N listeners are TCP sockets on distinct loopback addresses, opened
// once with net.Listen and shared by all kinds: the floor passes them as
// they are; shellflip's registry holds them under shellflip.ListenerName
// (shellflip.Add), a tableflip.Upgrader under their network and address
// (Fds.AddListener; tableflip keys listeners by both). With claim=none the
// new processes of the libraries leave them to be closed at Ready, as a
// new version that no longer serves them would.
//
// Outside the timer, each iteration of a library's kind waits until the
// previous new process was reaped and prepares the next: shellflip.Start
// and the release pipe for shellflip; for tableflip, a new Upgrader, its
// listeners, the release pipe and Ready.
//
// tableflip allows one Upgrader per process (tableflip.New fails the second
// time) and an Upgrader ends after one successful upgrade. tableflipUpgrader
// below reaches tableflip's process-wide Upgrader so that each iteration can
// clear it and call tableflip.New again: the state New starts from is then
// the same as in a process that never upgraded. Both libraries pass on
// os.Environ() plus their own variables; the kinds' roles travel in it.
//
// The new process's roles run from TestMain, before the tests' flags are
// parsed; both libraries re-execute this binary with this process's
// command line.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
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
	envClaim  = "COMPARE_BENCH_CLAIM" // how many listeners the new process claims
	envSocket = "COMPARE_BENCH_SOCKET"

	// releaseName is the name of the release pipe in both libraries'
	// registries.
	releaseName = "compare-release"

	// floorReadyFD and floorReleaseFD are the floor child's pipes; its
	// listeners follow, from floorListenFD on.
	floorReadyFD, floorReleaseFD, floorListenFD = 3, 4, 5

	// benchTimeout bounds every wait of an iteration.
	benchTimeout = time.Minute
)

// fdCounts are the numbers of listeners passed, as in the library's own
// BenchmarkRestartToReady.
var fdCounts = []int{0, 1, 16, 256, 1000}

// tableflipUpgrader is tableflip's unexported stdEnvUpgrader: while it is
// set, tableflip.New refuses to make another Upgrader. Only tableflipKind
// clears it, between iterations.
//
//go:linkname tableflipUpgrader github.com/cloudflare/tableflip.stdEnvUpgrader
var tableflipUpgrader *tableflip.Upgrader

func TestMain(m *testing.M) {
	role := os.Getenv(envRole)
	if role == "" {
		os.Exit(m.Run())
	}
	n, _ := strconv.Atoi(os.Getenv(envClaim))
	var err error
	switch role {
	case "floor":
		err = floorChild(0)
	case "net":
		err = floorChild(n)
	case "shellflip":
		err = shellflipChild(n)
	case "tableflip":
		err = tableflipChild(n)
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s child: %v\n", role, err)
		os.Exit(1)
	}
}

// The new processes. Each claims n listeners as a server does, keeps them
// until it exits, and exits when released.

// floorChild claims the n listeners at fds 5 and up with the net package
// alone, writes one byte to fd 3, and waits for EOF on fd 4.
func floorChild(n int) error {
	lns := make([]net.Listener, 0, n)
	for fd := floorListenFD; fd < floorListenFD+n; fd++ {
		f := os.NewFile(uintptr(fd), "listener")
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	b := [1]byte{'R'}
	if _, err := unix.Write(floorReadyFD, b[:]); err != nil {
		return err
	}
	for {
		n, err := unix.Read(floorReleaseFD, b[:])
		if err == unix.EINTR {
			continue
		}
		if n <= 0 {
			runtime.KeepAlive(lns)
			return nil
		}
	}
}

// shellflipChild claims n listeners with shellflip.Listen and the release
// pipe with shellflip.FD, calls Start (which adopts the control socket and
// calls Ready), and exits when released.
func shellflipChild(n int) error {
	lns := make([]net.Listener, 0, n)
	for _, addr := range addrs(n) {
		ln, err := shellflip.Listen("tcp", addr)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	rel, err := shellflip.FD(releaseName)
	if err != nil || rel == nil {
		return fmt.Errorf("release pipe: %v", err)
	}
	if _, err := shellflip.Start(context.Background(), shellflip.Config{SocketPath: os.Getenv(envSocket)}); err != nil {
		return err
	}
	io.Copy(io.Discard, rel)
	runtime.KeepAlive(lns)
	return nil
}

// tableflipChild calls New, claims n listeners with Fds.Listener (which
// Fds.Listen calls first, and which fails here rather than bind a new
// socket) and the release pipe with Fds.File, calls Ready, and exits when
// released.
func tableflipChild(n int) error {
	upg, err := tableflip.New(tableflip.Options{})
	if err != nil {
		return err
	}
	lns := make([]net.Listener, 0, n)
	for _, addr := range addrs(n) {
		ln, err := upg.Fds.Listener("tcp", addr)
		if err != nil || ln == nil {
			return fmt.Errorf("listener %s not inherited: %v", addr, err)
		}
		lns = append(lns, ln)
	}
	rel, err := upg.Fds.File(releaseName)
	if err != nil || rel == nil {
		return fmt.Errorf("release pipe: %v", err)
	}
	if err := upg.Ready(); err != nil {
		return err
	}
	io.Copy(io.Discard, rel)
	runtime.KeepAlive(lns)
	return nil
}

func BenchmarkUpgradeToReady(b *testing.B) {
	for _, claim := range []string{"all", "none"} {
		for _, n := range fdCounts {
			b.Run("claim="+claim+"/fds="+strconv.Itoa(n), func(b *testing.B) {
				claimed := n
				if claim == "none" {
					claimed = 0
				}
				lns := listeners(b, n)
				for i, addr := range addrs(n) {
					name := shellflip.ListenerName("tcp", addr)
					if err := shellflip.Add(name, lns[i].(*net.TCPListener)); err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { shellflip.Remove(name) })
				}
				floor := floorKind(b, "floor", lns)
				lib := shellflipKind("shellflip", "")
				socket := shellflipKind("shellflip-socket", filepath.Join(b.TempDir(), "ctl.sock"))
				tf := tableflipKind(lns)
				kinds := []*kind{floor, lib, socket, tf}
				var withNet *kind
				if claim == "all" {
					withNet = floorKind(b, "net", lns)
					kinds = append(kinds, withNet)
				}
				alternate(b, claimed, kinds...)
				ratio(b, tf, lib)
				ratio(b, lib, floor)
				if withNet != nil {
					ratio(b, lib, withNet)
				}
			})
		}
	}
}

// kind is one of the things BenchmarkUpgradeToReady compares. run does one
// iteration: it calls start and stop of its timer around the part that is
// timed, and returns once its new process was reaped, so that the process's
// CPU time is counted for this kind.
type kind struct {
	name           string
	run            func(*timer) error
	walls          []time.Duration // each iteration's wall time
	oldCPU, newCPU time.Duration   // totals over b.N iterations
}

// timer runs the benchmark's timer, which only decides b.N, and accounts
// the wall time and this process's CPU time to its kind.
type timer struct {
	b    *testing.B
	k    *kind
	t0   time.Time
	cpu0 time.Duration
}

func (t *timer) start() {
	t.b.StartTimer()
	t.cpu0 = rusage(unix.RUSAGE_SELF)
	t.t0 = time.Now()
}

func (t *timer) stop() {
	t.k.walls = append(t.k.walls, time.Since(t.t0))
	t.k.oldCPU += rusage(unix.RUSAGE_SELF) - t.cpu0
	t.b.StopTimer()
}

// alternate runs b.N iterations of every kind: one of each per iteration,
// iteration i starting with kind i mod len(kinds), so that no kind always
// follows the same one. Each new process runs the role of its kind's name
// and claims claimed listeners. It reports each kind's times per iteration,
// and suppresses ns/op, which would be their sum.
func alternate(b *testing.B, claimed int, kinds ...*kind) {
	setenv(b, envClaim, strconv.Itoa(claimed))
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		for j := range kinds {
			k := kinds[(i+j)%len(kinds)]
			if err := waitNoChildren(); err != nil {
				b.Fatal(err)
			}
			children := rusage(unix.RUSAGE_CHILDREN)
			if err := k.run(&timer{b: b, k: k}); err != nil {
				b.Fatalf("%s: %v", k.name, err)
			}
			if err := waitNoChildren(); err != nil {
				b.Fatal(err)
			}
			k.newCPU += rusage(unix.RUSAGE_CHILDREN) - children
		}
	}
	b.ReportMetric(0, "ns/op")
	n := float64(b.N)
	for _, k := range kinds {
		b.ReportMetric(float64(median(k.walls)), k.name+"-ns/op")
		b.ReportMetric(float64(k.oldCPU.Nanoseconds())/n, k.name+"-oldcpu-ns/op")
		b.ReportMetric(float64(k.newCPU.Nanoseconds())/n, k.name+"-newcpu-ns/op")
	}
}

// ratio reports the ratio of two kinds' wall times, as "a/c": the median
// over the iterations of each iteration's ratio, which a stall in a few
// iterations does not move, as it moves the times themselves.
func ratio(b *testing.B, a, c *kind) {
	r := make([]float64, len(a.walls))
	for i := range r {
		r[i] = a.walls[i].Seconds() / c.walls[i].Seconds()
	}
	b.ReportMetric(median(r), a.name+"/"+c.name)
}

// median returns the median of v (the upper one of an even count), leaving
// v as it was.
func median[T cmp.Ordered](v []T) T {
	s := slices.Sorted(slices.Values(v))
	return s[len(s)/2]
}

// floorKind is the floor, or with role "net" the floor whose child claims
// its listeners with the net package.
func floorKind(b *testing.B, role string, lns []net.Listener) *kind {
	files := []uintptr{0, 1, 2, 0, 0}
	for _, ln := range lns {
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			b.Fatal(err)
		}
		// Valid until the listener is closed, after the benchmark.
		rc.Control(func(fd uintptr) { files = append(files, fd) })
	}
	attr := &syscall.ProcAttr{Files: files}
	return &kind{name: role, run: func(t *timer) error {
		setRole(role, "")
		attr.Env = os.Environ()
		t.start()
		var ready, release [2]int
		if err := unix.Pipe2(ready[:], unix.O_CLOEXEC); err != nil {
			return err
		}
		if err := unix.Pipe2(release[:], unix.O_CLOEXEC); err != nil {
			return err
		}
		attr.Files[floorReadyFD], attr.Files[floorReleaseFD] = uintptr(ready[1]), uintptr(release[0])
		pid, err := syscall.ForkExec(os.Args[0], os.Args, attr)
		unix.Close(ready[1])
		unix.Close(release[0])
		if err != nil {
			return err
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
		t.stop()
		if err == nil && (!ws.Exited() || ws.ExitStatus() != 0) {
			err = fmt.Errorf("child %d: wait status %#x", pid, ws)
		}
		return err
	}}
}

// shellflipKind is a restart by Restarter.Restart, or by RequestRestart on
// the control socket sock if there is one.
func shellflipKind(name, sock string) *kind {
	cfg := shellflip.Config{SocketPath: sock, ReadyTimeout: benchTimeout}
	return &kind{name: name, run: func(t *timer) error {
		setRole("shellflip", sock)
		ctx, cancel := context.WithTimeout(context.Background(), benchTimeout)
		defer cancel()
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		defer w.Close()
		err = shellflip.Add(releaseName, r)
		r.Close()
		if err != nil {
			return err
		}
		defer shellflip.Remove(releaseName)
		rs, err := shellflip.Start(ctx, cfg)
		if err != nil {
			return err
		}
		t.start()
		var pid int
		if sock != "" {
			pid, err = shellflip.RequestRestart(ctx, sock)
		} else {
			pid, err = rs.Restart(ctx)
		}
		w.Close()
		if err == nil {
			err = waitExited()
		}
		t.stop()
		if err != nil {
			rs.Stop()
			return err
		}
		if p, err := rs.Wait(); err != nil || p != pid {
			return fmt.Errorf("restart answered pid %d; the Restarter reports %v, %v", pid, p, err)
		}
		return nil
	}}
}

// tableflipKind is an upgrade by a new tableflip.Upgrader that holds lns.
func tableflipKind(lns []net.Listener) *kind {
	addrs := addrs(len(lns))
	return &kind{name: "tableflip", run: func(t *timer) error {
		setRole("tableflip", "")
		tableflipUpgrader = nil
		upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: benchTimeout})
		if err != nil {
			return err
		}
		defer upg.Stop()
		for i, addr := range addrs {
			if err := upg.Fds.AddListener("tcp", addr, lns[i].(tableflip.Listener)); err != nil {
				return err
			}
		}
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		defer w.Close()
		err = upg.Fds.AddFile(releaseName, r)
		r.Close()
		if err != nil {
			return err
		}
		if err := upg.Ready(); err != nil {
			return err
		}
		t.start()
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
		t.stop()
		return err
	}}
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

// listeners opens n TCP listeners on addrs(n) with the net package alone,
// closed when the benchmark ends.
func listeners(b *testing.B, n int) []net.Listener {
	// The listeners, shellflip's and tableflip's duplicates, and tableflip's
	// next duplicates while the last Upgrader closes its own.
	noFile(b, 4*uint64(n)+256)
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

// setRole sets the role and control socket of the next new process in this
// process's environment, which both libraries pass on (tableflip has no
// way to add to it): every kind's new process gets the same variables,
// with other values.
func setRole(role, sock string) {
	os.Setenv(envRole, role)
	os.Setenv(envSocket, sock)
}

// setenv sets a variable for the new processes of one benchmark.
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
// process, so that waitExited in the next iteration sees the next one, and
// the child's CPU time is counted for its kind.
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
