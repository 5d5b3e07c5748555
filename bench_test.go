//go:build linux

package shellflip

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A restart against its physical floor, and the state handover.
//
// Every benchmark here starts the test binary itself as the new process: the
// re-executed binary sees $SHELLFLIP_TEST_ROLE in TestMain and runs one of
// the roles below instead of the tests. All of them pay the same exec of the
// same binary, the same runtime and package initialisation, the same
// environment and command line, so the differences between them are what
// the library adds.
//
// Each benchmark compares kinds of start in one run: every iteration of its
// b.N loop runs each kind once, in turn, and starts with another kind each
// time, so that whatever else loads the machine loads all kinds alike. On a
// noisy machine the times move from run to run; their ratio holds still.
//
//	BenchmarkRestartToReady  floor:  syscall.ForkExec, a one-byte pipe
//	                                 write, wait4: starting a Go binary and
//	                                 hearing from it, with no library code.
//	                         call:   Restarter.Restart: the spawn, the new
//	                                 process's Start (and so Ready), the
//	                                 handover, the pid, and the reaping of
//	                                 the new process, which exits as soon as
//	                                 the old one has taken it for its
//	                                 successor (see benchReadyChild).
//	                         socket: the same restart requested with
//	                                 RequestRestart on the control socket,
//	                                 answered with the new pid.
//	                         broker: call, with Config.Broker: a broker
//	                                 (made once, outside the timer) starts
//	                                 the new process and reaps it.
//	                         locked: broker, and the new process starts a
//	                                 broker of its own before Start, as
//	                                 every generation of a locked service
//	                                 does (examples/locked); no filter.
//	BenchmarkHandover        pipe:   64 MiB through a raw pipe to a new
//	                                 process;
//	                         shellflip: the same 64 MiB through
//	                                 Lifecycle.SendState and ReceiveState.
//
// The claim=all/fds=N and claim=none/fds=N sub-benchmarks pass N listening
// TCP sockets (on distinct loopback addresses, so that cloudflare/tableflip,
// which keys listeners by address, can be given the same set: see
// bench/compare). With claim=all the new process claims every one with
// Listen before it calls Start, as a server does with what it serves. With
// claim=none it claims none, and Ready closes them, as for a new version
// that no longer serves them. The floor passes the same fds to a child that
// ignores them.
//
// The broker kinds' new processes are the broker's children, which this
// process does not reap: their <kind>-newcpu is the broker's CPU time and
// its reaped children's (the new processes; not the new processes' own
// brokers, which init reaps). BenchmarkRestartToReady also reports the
// broker's resident memory after the run (broker-rss-B).
//
// Each kind reports its wall time (<kind>-sec/op: the median iteration's,
// which a stall in a few iterations does not move), the CPU time of this
// process in its timed region (<kind>-oldcpu-sec/op: every thread, the
// runtime's included) and of its new process from exec to exit
// (<kind>-newcpu-sec/op); each benchmark reports the ratios of the wall
// times (call/floor: 1.10 is 10% slower than the floor), the median of the
// iterations' own ratios (benchRatio). The built-in sec/op, which would be
// the sum of the kinds, is suppressed. On a machine shared with other work
// the wall time waits for CPUs that others hold; the CPU times suffer far
// less from that, and say where the work is.
//
// Run them with
//
//	go test -run '^$' -bench 'RestartToReady|Handover' -count 6 -benchtime 20x
//
// and compare with benchstat. They are fast enough for CI with -benchtime 3x.
// BenchmarkClaim, further down, times the new process's claim of one
// inherited listener alone; it wants more iterations (-benchtime 5000x).

const (
	// benchEnvSocket names the control socket for the new process's Start.
	benchEnvSocket = "SHELLFLIP_BENCH_SOCKET"
	// benchEnvClaim is how many listeners of benchAddrs the new process
	// claims.
	benchEnvClaim = "SHELLFLIP_BENCH_CLAIM"
	// benchEnvSize is the number of state bytes the new process must read.
	benchEnvSize = "SHELLFLIP_BENCH_SIZE"
	// benchEnvBroker makes the new process start a broker before Start.
	benchEnvBroker = "SHELLFLIP_BENCH_BROKER"

	// benchFloorFD is where the floor's child finds its pipe: the first fd
	// after stdio, with nothing in the environment naming it.
	benchFloorFD = 3

	// benchStateSize is what BenchmarkHandover moves per iteration.
	benchStateSize = 64 << 20
	// benchReadSize is the read buffer of both handover receivers, the
	// size of the pipe buffer the library asks for (newStatePipe).
	benchReadSize = 1 << 20

	// benchTimeout bounds every wait of a benchmark iteration.
	benchTimeout = time.Minute
)

// benchFDCounts are the numbers of fds passed by the sub-benchmarks.
var benchFDCounts = []int{0, 1, 16, 256, 1000}

// benchFloorChild writes one byte to fd 3 and exits: the least a new
// process can do to say it runs.
func benchFloorChild() int {
	b := [1]byte{msgReady}
	if _, err := unix.Write(benchFloorFD, b[:]); err != nil {
		return 1
	}
	return 0
}

// benchReadyChild is the new process of a restart: it claims the first
// $SHELLFLIP_BENCH_CLAIM listeners of benchAddrs with Listen, calls Start
// (which takes over the control socket and calls Ready), and exits as soon
// as the old process has taken it for its successor.
//
// It cannot exit at once: a new process that exits is no successor, and
// the old process, which watches for both its readiness byte and its exit,
// may see the exit first and fail the restart (restart in restart.go; with
// an immediate exit that happened about once in 20 to 60 restarts). So it
// waits for MainChan, closed when the old process's "you are main" byte
// arrives, which the old process sends once it has taken this process for
// its successor (handOver).
func benchReadyChild() int {
	n, _ := strconv.Atoi(os.Getenv(benchEnvClaim))
	if got := len(registryNames()); got < n {
		// Listen would bind new sockets and the benchmark would
		// measure that instead.
		fmt.Fprintf(os.Stderr, "bench-ready: %d fds inherited, %d to claim\n", got, n)
		return 1
	}
	lns := make([]net.Listener, 0, n)
	for _, addr := range benchAddrs(n) {
		ln, err := Listen("tcp", addr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-ready: %v\n", err)
			return 1
		}
		lns = append(lns, ln)
	}
	var b *Broker
	if os.Getenv(benchEnvBroker) != "" {
		var err error
		if b, err = NewBroker(); err != nil {
			fmt.Fprintf(os.Stderr, "bench-ready: %v\n", err)
			return 1
		}
	}
	if _, err := Start(context.Background(), Config{SocketPath: os.Getenv(benchEnvSocket), Broker: b}); err != nil {
		fmt.Fprintf(os.Stderr, "bench-ready: %v\n", err)
		return 1
	}
	runtime.KeepAlive(lns) // a server serves them until it exits
	return 0
}

// benchSinkChild is the raw side of BenchmarkHandover: it reads fd 3 to EOF,
// checks the byte count, answers one byte on fd 4 and exits.
func benchSinkChild() int {
	want, _ := strconv.Atoi(os.Getenv(benchEnvSize))
	buf := make([]byte, benchReadSize)
	n := 0
	for {
		m, err := ignoringEINTR(func() (int, error) { return unix.Read(benchFloorFD, buf) })
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-sink: read: %v\n", err)
			return 1
		}
		if m == 0 {
			break
		}
		n += m
	}
	if n != want {
		fmt.Fprintf(os.Stderr, "bench-sink: read %d bytes, want %d\n", n, want)
		return 1
	}
	b := [1]byte{msgReady}
	if _, err := unix.Write(benchFloorFD+1, b[:]); err != nil {
		return 1
	}
	return 0
}

// benchStateChild is the library side of BenchmarkHandover: it reads the
// state to EOF with ReceiveState, in reads of the same size as
// benchSinkChild's, checks the byte count, then does what benchReadyChild
// does.
func benchStateChild() int {
	want, _ := strconv.Atoi(os.Getenv(benchEnvSize))
	st, err := ReceiveState()
	if err != nil || st == nil {
		fmt.Fprintf(os.Stderr, "bench-state: ReceiveState: %v (started by restart: %v)\n", err, startedByRestart())
		return 1
	}
	buf := make([]byte, benchReadSize)
	n := 0
	for {
		m, err := st.Read(buf)
		n += m
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench-state: read: %v\n", err)
			return 1
		}
	}
	st.Close()
	if n != want {
		fmt.Fprintf(os.Stderr, "bench-state: read %d bytes, want %d\n", n, want)
		return 1
	}
	return benchReadyChild()
}

// benchAddrs returns n distinct loopback addresses with port 0. Linux
// routes all of 127.0.0.0/8 to the loopback device.
func benchAddrs(n int) []string {
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("127.1.%d.%d:0", i/250, i%250+1)
	}
	return addrs
}

// benchNoFile raises the soft RLIMIT_NOFILE to at least need, or skips.
// (The runtime already raises it to the hard limit at start; this is for
// hard limits that are lower than the benchmark needs.)
func benchNoFile(b *testing.B, need uint64) {
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

// benchRegister registers n TCP listeners on benchAddrs with Listen, to be
// passed at each restart, and returns their fds for the floor to pass,
// valid until the benchmark ends, when they are closed and removed from the
// registry.
func benchRegister(b *testing.B, n int) []uintptr {
	benchNoFile(b, 2*uint64(n)+256) // the listener and the registry's duplicate
	if names := registryNames(); len(names) != 0 {
		b.Fatalf("the fd registry is not empty: %q", names)
	}
	fds := make([]uintptr, 0, n)
	for _, addr := range benchAddrs(n) {
		ln, err := Listen("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			ln.Close()
			Remove(ListenerName("tcp", addr))
		})
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			b.Fatal(err)
		}
		// The fd stays valid after Control returns because ln stays open
		// until Cleanup; it is never used after that.
		rc.Control(func(fd uintptr) { fds = append(fds, fd) })
	}
	return fds
}

// benchEnv returns this process's environment with kv added.
func benchEnv(kv ...string) []string {
	return append(os.Environ(), kv...)
}

// benchWaitByte reads one byte from fd, blocking.
func benchWaitByte(fd int) error {
	var buf [1]byte
	n, err := ignoringEINTR(func() (int, error) { return unix.Read(fd, buf[:]) })
	if err != nil {
		return os.NewSyscallError("read", err)
	}
	if n != 1 {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// benchReap waits for pid and checks that it exited with status 0.
func benchReap(pid int) error {
	var ws unix.WaitStatus
	if _, err := ignoringEINTR(func() (int, error) { return unix.Wait4(pid, &ws, 0, nil) }); err != nil {
		return os.NewSyscallError("wait4", err)
	}
	if !ws.Exited() || ws.ExitStatus() != 0 {
		return fmt.Errorf("child %d: wait status %#x", pid, uint32(ws))
	}
	return nil
}

// benchKind is one of the things a benchmark compares. run does one
// iteration: it calls start and stop of its benchTimer around the part
// that is timed, and returns once its new process was reaped, so that the
// process's CPU time is counted for this kind.
type benchKind struct {
	name           string
	run            func(*benchTimer) error
	walls          []time.Duration // each iteration's wall time
	oldCPU, newCPU time.Duration   // totals over b.N iterations
}

// benchTimer runs the benchmark's timer, which only decides b.N, and
// accounts the wall time and this process's CPU time to its kind.
type benchTimer struct {
	b    *testing.B
	k    *benchKind
	t0   time.Time
	cpu0 time.Duration
}

func (t *benchTimer) start() {
	t.b.StartTimer()
	t.cpu0 = benchRusage(unix.RUSAGE_SELF)
	t.t0 = time.Now()
}

func (t *benchTimer) stop() {
	t.k.walls = append(t.k.walls, time.Since(t.t0))
	t.k.oldCPU += benchRusage(unix.RUSAGE_SELF) - t.cpu0
	t.b.StopTimer()
}

// benchAlternate runs b.N iterations of every kind: one of each per
// iteration, iteration i starting with kind i mod len(kinds), so that no
// kind always follows the same one. It reports each kind's times per
// iteration, and suppresses ns/op, which would be their sum.
func benchAlternate(b *testing.B, kinds ...*benchKind) {
	b.ResetTimer()
	b.StopTimer()
	for i := range b.N {
		for j := range kinds {
			k := kinds[(i+j)%len(kinds)]
			children := benchRusage(unix.RUSAGE_CHILDREN)
			if err := k.run(&benchTimer{b: b, k: k}); err != nil {
				b.Fatalf("%s: %v", k.name, err)
			}
			k.newCPU += benchRusage(unix.RUSAGE_CHILDREN) - children
		}
	}
	b.ReportMetric(0, "ns/op")
	n := float64(b.N)
	for _, k := range kinds {
		b.ReportMetric(float64(benchMedian(k.walls)), k.name+"-ns/op")
		b.ReportMetric(float64(k.oldCPU.Nanoseconds())/n, k.name+"-oldcpu-ns/op")
		b.ReportMetric(float64(k.newCPU.Nanoseconds())/n, k.name+"-newcpu-ns/op")
	}
}

// benchRatio reports the ratio of two kinds' wall times, as "a/c": the
// median over the iterations of each iteration's ratio, which a stall in a
// few iterations does not move, as it moves the times themselves.
func benchRatio(b *testing.B, a, c *benchKind) {
	r := make([]float64, len(a.walls))
	for i := range r {
		r[i] = a.walls[i].Seconds() / c.walls[i].Seconds()
	}
	b.ReportMetric(benchMedian(r), a.name+"/"+c.name)
}

// benchMedian returns the median of v (the upper one of an even count),
// leaving v as it was.
func benchMedian[T cmp.Ordered](v []T) T {
	s := slices.Sorted(slices.Values(v))
	return s[len(s)/2]
}

// benchRusage returns the user and system time of who (RUSAGE_SELF or
// RUSAGE_CHILDREN, the reaped ones).
func benchRusage(who int) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(who, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchFloor is one iteration of the floor: fork and exec the same binary
// with the same command line and environment as a restart, wait for the
// byte it writes as its first act, and reap it. The pipe is created inside
// the timed region; attr is built once, outside it.
func benchFloor(t *benchTimer, attr *syscall.ProcAttr) error {
	t.start()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return err
	}
	attr.Files[benchFloorFD] = uintptr(p[1])
	pid, err := syscall.ForkExec(os.Args[0], os.Args, attr)
	unix.Close(p[1])
	if err != nil {
		unix.Close(p[0])
		return err
	}
	err = benchWaitByte(p[0])
	unix.Close(p[0])
	if rerr := benchReap(pid); err == nil {
		err = rerr
	}
	t.stop()
	return err
}

// benchRestart is one restart of this process into a new one. It calls
// Start outside the timer (Start binds the control socket, replacing the
// stale one the previous new process left, and starts the spawner's
// thread), then, timed: the request (Restarter.Restart, or RequestRestart
// on the control socket if bySocket), Wait for the Restarter to end (it
// closes the control socket and stops its spawner thread after
// answering), and the wait until the new process was reaped. The timed
// region therefore also holds the control server's goroutines, the
// allocations of the client and the server, and whatever the runtime does
// concurrently (GC included).
func benchRestart(t *benchTimer, cfg Config, bySocket bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), benchTimeout)
	defer cancel()
	r, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	t.start()
	var pid int
	if bySocket {
		pid, err = RequestRestart(ctx, cfg.SocketPath)
	} else {
		pid, err = r.Restart(ctx)
	}
	if err != nil {
		r.Stop()
		return err
	}
	newPid, err := r.Wait()
	if err != nil {
		return err
	}
	if err := benchWaitExited(ctx, pid); err != nil {
		return fmt.Errorf("new process %d: %v", pid, err)
	}
	t.stop()
	if newPid != pid {
		return fmt.Errorf("the restart answered pid %d, the Restarter reports %d", pid, newPid)
	}
	return nil
}

// BenchmarkRestartToReady is a whole restart, from the request to the new
// pid and the reaping of the new process, against the floor; see the top
// of this file for the kinds, and benchRestart for what is inside the
// timer.
func BenchmarkRestartToReady(b *testing.B) {
	for _, claim := range []string{"all", "none"} {
		for _, n := range benchFDCounts {
			b.Run("claim="+claim+"/fds="+strconv.Itoa(n), func(b *testing.B) {
				fds := benchRegister(b, n)
				claimed := n
				if claim == "none" {
					claimed = 0
				}
				floor := &syscall.ProcAttr{
					Env:   benchEnv(envTestRole + "=bench-floor"),
					Files: append([]uintptr{0, 1, 2, 0}, fds...),
				}
				config := func(sock string) Config {
					return Config{
						SocketPath:   sock,
						Env:          []string{envTestRole + "=bench-ready", benchEnvSocket + "=" + sock, benchEnvClaim + "=" + strconv.Itoa(claimed)},
						ReadyTimeout: benchTimeout,
					}
				}
				call, socket := config(""), config(filepath.Join(b.TempDir(), "ctl.sock"))
				broker := benchBroker(b, call.Env)
				locked := benchBroker(b, append(call.Env, benchEnvBroker+"=1"))
				kFloor := &benchKind{name: "floor", run: func(t *benchTimer) error { return benchFloor(t, floor) }}
				kCall := &benchKind{name: "call", run: func(t *benchTimer) error { return benchRestart(t, call, false) }}
				kSocket := &benchKind{name: "socket", run: func(t *benchTimer) error { return benchRestart(t, socket, true) }}
				kBroker := &benchKind{name: "broker", run: broker.run}
				kLocked := &benchKind{name: "locked", run: locked.run}
				benchAlternate(b, kFloor, kCall, kSocket, kBroker, kLocked)
				benchRatio(b, kCall, kFloor)
				benchRatio(b, kSocket, kFloor)
				benchRatio(b, kBroker, kCall)
				benchRatio(b, kLocked, kCall)
				b.ReportMetric(float64(benchRSS(b, broker.b.pid)), "broker-rss-B")
			})
		}
	}
}

// benchBrokerKind restarts through b, whose new processes run with env.
type benchBrokerKind struct {
	b   *Broker
	cfg Config
}

// benchBroker makes a broker whose new processes get env (added to this
// process's environment while NewBroker takes it), closed and reaped when
// the benchmark ends.
func benchBroker(b *testing.B, env []string) *benchBrokerKind {
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	br, err := NewBroker()
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		os.Unsetenv(k)
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		br.close()
		var ws unix.WaitStatus
		unix.Wait4(br.pid, &ws, 0, nil)
	})
	return &benchBrokerKind{b: br, cfg: Config{Broker: br, ReadyTimeout: benchTimeout}}
}

// run is benchRestart through the broker, with the CPU time of the broker
// and its reaped children (see the top of the file) added to newCPU, which
// benchAlternate cannot see.
func (k *benchBrokerKind) run(t *benchTimer) error {
	cpu0 := benchProcCPU(k.b.pid)
	err := benchRestart(t, k.cfg, false)
	t.k.newCPU += benchProcCPU(k.b.pid) - cpu0
	return err
}

// benchProcCPU returns the CPU time of pid and of the children it reaped
// (utime, stime, cutime and cstime in /proc/pid/stat).
func benchProcCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command, which is in parentheses and may hold
	// anything: utime is the 12th of them.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	var ticks int64
	for _, s := range f[11:15] {
		n, _ := strconv.ParseInt(s, 10, 64)
		ticks += n
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

// benchRSS returns pid's resident memory in bytes (VmRSS).
func benchRSS(b *testing.B, pid int) int {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb << 10
		}
	}
	b.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// BenchmarkHandover moves 64 MiB from the old process to the new one.
//
// pipe: fork/exec the new process with a pipe at fd 3 (its buffer set to
// 1 MiB, as the library sets the state pipe's) and an answer pipe at fd 4;
// write the state with blocking writes, close, wait for the new process's
// byte, which it writes once it has read everything, and reap it.
//
// shellflip: a restart by Restarter.Restart, as in BenchmarkRestartToReady,
// whose SendState writes the state in one Write, and whose new process
// reads it with ReceiveState before it calls Start.
//
// Both readers read 1 MiB at a time. Both include the process start, so
// the difference between the two is the library's whole cost (the
// restart's overhead, as in BenchmarkRestartToReady, plus its
// poller-driven pipe I/O) on top of the same copy. Besides the times, each
// kind reports its throughput (<kind>-B/s).
func BenchmarkHandover(b *testing.B) {
	state := make([]byte, benchStateSize)
	for i := range state {
		state[i] = byte(i)
	}
	attr := &syscall.ProcAttr{
		Env:   benchEnv(envTestRole+"=bench-sink", benchEnvSize+"="+strconv.Itoa(benchStateSize)),
		Files: []uintptr{0, 1, 2, 0, 0},
	}
	cfg := Config{
		Env:          []string{envTestRole + "=bench-state", benchEnvSize + "=" + strconv.Itoa(benchStateSize)},
		ReadyTimeout: benchTimeout,
		Lifecycle: &Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				_, err := w.Write(state)
				return err
			},
		},
	}
	kPipe := &benchKind{name: "pipe", run: func(t *benchTimer) error {
		t.start()
		err := benchRawHandover(attr, state)
		t.stop()
		return err
	}}
	kLib := &benchKind{name: "shellflip", run: func(t *benchTimer) error { return benchRestart(t, cfg, false) }}
	benchAlternate(b, kPipe, kLib)
	benchRatio(b, kLib, kPipe)
	for _, k := range []*benchKind{kPipe, kLib} {
		b.ReportMetric(float64(benchStateSize)/benchMedian(k.walls).Seconds()/1e6, k.name+"-MB/s")
	}
}

// benchRawHandover is one iteration of BenchmarkHandover's pipe.
func benchRawHandover(attr *syscall.ProcAttr, state []byte) error {
	var data, ack [2]int
	if err := unix.Pipe2(data[:], unix.O_CLOEXEC); err != nil {
		return err
	}
	if err := unix.Pipe2(ack[:], unix.O_CLOEXEC); err != nil {
		unix.Close(data[0])
		unix.Close(data[1])
		return err
	}
	unix.FcntlInt(uintptr(data[1]), unix.F_SETPIPE_SZ, benchReadSize)
	attr.Files[benchFloorFD], attr.Files[benchFloorFD+1] = uintptr(data[0]), uintptr(ack[1])
	pid, err := syscall.ForkExec(os.Args[0], os.Args, attr)
	unix.Close(data[0])
	unix.Close(ack[1])
	if err != nil {
		unix.Close(data[1])
		unix.Close(ack[0])
		return err
	}
	for rest := state; len(rest) > 0 && err == nil; {
		var n int
		if n, err = ignoringEINTR(func() (int, error) { return unix.Write(data[1], rest) }); n > 0 {
			rest = rest[n:]
		}
	}
	unix.Close(data[1])
	if err == nil {
		err = benchWaitByte(ack[0])
	}
	unix.Close(ack[0])
	if rerr := benchReap(pid); err == nil {
		err = rerr
	}
	return err
}

// The new process's claims (fdpass.go).

// BenchmarkClaim is a new process claiming what it inherited: one op is one
// Listen of a name that the registry holds as inherited, with N such names
// in the registry (fds=N). Duplicates of listeners of this process stand in
// for the inherited fds: the same kind of socket, non-blocking as the old
// process's are. Every claimed listener is kept until all N are claimed,
// as a server keeps them; then they are closed and the registry emptied,
// outside the timer, for the next round.
func BenchmarkClaim(b *testing.B) {
	for _, n := range []int{1, 1000} {
		b.Run("fds="+strconv.Itoa(n), func(b *testing.B) {
			benchNoFile(b, 3*uint64(n)+256)
			if names := registryNames(); len(names) != 0 {
				b.Fatalf("the fd registry is not empty: %q", names)
			}
			addrs := benchAddrs(n)
			socks := make([]net.Listener, n)
			for i, addr := range addrs {
				ln, err := net.Listen("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { ln.Close() })
				socks[i] = ln
			}
			inh := make([]inheritedFD, n)
			lns := make([]net.Listener, 0, n)
			b.ReportAllocs()
			b.ResetTimer()
			b.StopTimer()
			for done := 0; done < b.N; {
				for i, ln := range socks {
					fd, err := dupConn(ln.(syscall.Conn))
					if err != nil {
						b.Fatal(err)
					}
					inh[i] = inheritedFD{name: ListenerName("tcp", addrs[i]), fd: fd}
				}
				adoptInherited(inh)
				m := min(n, b.N-done)
				b.StartTimer()
				for _, addr := range addrs[:m] {
					ln, err := Listen("tcp", addr)
					if err != nil {
						b.Fatal(err)
					}
					lns = append(lns, ln)
				}
				b.StopTimer()
				done += m
				for _, ln := range lns {
					ln.Close()
				}
				lns = lns[:0]
				for _, f := range inh {
					Remove(f.name)
				}
			}
		})
	}
}

// The control-socket protocol (wire.go).

// wireBenchText is a 200-byte RestartFailed text without escapes.
var wireBenchText = strings.Repeat("restart failed: ", 12) + "12345678"

func BenchmarkWireEncode(b *testing.B) {
	buf := make([]byte, 0, maxFrameLen+4)
	b.Run("TryRestart", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = appendTryRestart(buf[:0])
		}
	})
	b.Run("RestartComplete", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = appendRestartComplete(buf[:0], 4294967295)
		}
	})
	b.Run("RestartFailed/200B", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(wireBenchText)))
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], wireBenchText)
		}
	})
	b.Run("RestartFailed/escapes", func(b *testing.B) {
		text := strings.Repeat("a\"\\\n\x01é\xff", 25) // 200 bytes
		b.ReportAllocs()
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], text)
		}
	})
	b.Run("RestartFailed/truncated", func(b *testing.B) {
		text := strings.Repeat("x", 2*maxFrameLen)
		b.ReportAllocs()
		b.SetBytes(maxFrameLen)
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], text)
		}
	})
}

func BenchmarkWireDecode(b *testing.B) {
	for _, bb := range []struct {
		name, in string
	}{
		{"TryRestart/string", `{"Request":"TryRestart"}`},
		{"TryRestart/object", `{"Request":{"TryRestart":null}}`},
		{"RestartComplete", `{"Response":{"RestartComplete":4294967295}}`},
		{"RestartFailed/200B", `{"Response":{"RestartFailed":"` + wireBenchText + `"}}`},
		{"RestartFailed/escapes", `{"Response":{"RestartFailed":"` + strings.Repeat(`a\"\\\n\u0001`, 20) + `"}}`},
	} {
		p := []byte(bb.in)
		b.Run(bb.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				if _, err := decodeMessage(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkWireReadFrame(b *testing.B) {
	for _, bb := range []struct {
		name  string
		frame []byte
	}{
		{"TryRestart", appendTryRestart(nil)},
		{"RestartFailed/200B", appendRestartFailed(nil, wireBenchText)},
		{"RestartFailed/64KiB", appendRestartFailed(nil, strings.Repeat("x", maxFrameLen))},
	} {
		b.Run(bb.name, func(b *testing.B) {
			r := bytes.NewReader(bb.frame)
			scratch := make([]byte, 0, maxFrameLen)
			b.ReportAllocs()
			b.SetBytes(int64(len(bb.frame)))
			for b.Loop() {
				r.Reset(bb.frame)
				if _, err := readFrame(r, scratch); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// sd_notify (sdnotify.go).

// BenchmarkSdNotifySend measures one datagram to a local listener that reads
// and discards it: the encoding, the sendmsg and the wake-up of the reader.
func BenchmarkSdNotifySend(b *testing.B) {
	status := strings.Repeat("s", 64)
	cases := []struct {
		name   string
		fields []string
	}{
		{"READY", []string{"READY=1"}},
		{"MAINPID+READY", []string{"MAINPID=12345", "READY=1"}},
		{"STATUS64", []string{"STATUS=" + status}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			l := sdListen(b, false)
			n := sdNewNotifier(b, l.addr)
			_, stop := l.drain(b, -1)
			defer stop()
			b.ReportAllocs()
			for b.Loop() {
				if err := n.send(context.Background(), nil, c.fields...); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchWaitExited waits until pid, a child that the library reaps, has
// exited.
func benchWaitExited(ctx context.Context, pid int) error {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err == unix.ESRCH {
		return nil
	}
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pfd)
	d, _ := ctx.Deadline()
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	if n, err := ignoringEINTR(func() (int, error) { return unix.Poll(fds, int(time.Until(d)/time.Millisecond)) }); err != nil || n == 0 {
		return fmt.Errorf("not gone: %v", err)
	}
	return nil
}
