//go:build linux

package shellflip

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A restart against its physical floor, and the state handover.

// Benchmarks of a whole restart against its physical floor.
//
// Every benchmark here starts the test binary itself as the new process: the
// re-executed binary sees $SHELLFLIP_TEST_ROLE in TestMain and runs one of
// the roles below instead of the tests. All of them pay the same exec of the
// same binary, the same runtime and package initialisation, the same
// environment and command line, so the differences between them are what
// the library adds.
//
//	BenchmarkForkExecFloor   syscall.ForkExec, a one-byte pipe write, wait4:
//	                         starting a Go binary and hearing from it, with
//	                         no library code.
//	BenchmarkRestartToReady  RequestRestart on the control socket, the
//	                         spawn, the new process's Start (and so Ready),
//	                         the handover, the response with the pid, and
//	                         the reaping of the new process, which exits as
//	                         soon as the old one has taken it for its
//	                         successor (see benchReadyChild).
//	BenchmarkHandover        64 MiB through Lifecycle.SendState and
//	                         ReceiveState, against the same 64 MiB through a
//	                         raw pipe between the same two processes.
//
// The fds=N sub-benchmarks pass N listening TCP sockets (on distinct
// loopback addresses, so that cloudflare/tableflip, which keys listeners by
// address, can be given the same set: see bench/compare). The new process
// does not claim them: it closes them at Ready, as a new version that no
// longer serves them would. The floor passes the same number of fds to a
// child that ignores them, so fds=N against fds=N is the library's cost of
// passing them.
//
// Besides the wall time (sec/op), each reports the CPU time of the old
// process in the timed region (oldcpu-us/op: every thread, the runtime's
// included) and of the new process from exec to exit (newcpu-us/op). On a
// machine shared with other work the wall time waits for CPUs that others
// hold; the CPU times suffer far less from that, and say where the work is.
//
// Run them with
//
//	go test -run '^$' -bench . -count 6 -benchtime 20x
//
// and compare with benchstat. They are fast enough for CI with -benchtime 3x.

const (
	// benchEnvSocket names the control socket for the new process's Start.
	benchEnvSocket = "SHELLFLIP_BENCH_SOCKET"
	// benchEnvSize is the number of state bytes the new process must read.
	benchEnvSize = "SHELLFLIP_BENCH_SIZE"

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

func init() {
	testRoles["bench-floor"] = benchFloorChild
	testRoles["bench-ready"] = benchReadyChild
	testRoles["bench-sink"] = benchSinkChild
	testRoles["bench-state"] = benchStateChild
}

// benchFloorChild writes one byte to fd 3 and exits: the least a new
// process can do to say it runs.
func benchFloorChild() int {
	b := [1]byte{msgReady}
	if _, err := unix.Write(benchFloorFD, b[:]); err != nil {
		return 1
	}
	return 0
}

// benchReadyChild is the new process of BenchmarkRestartToReady: Start (which
// takes over the control socket and calls Ready), then exit as soon as the
// old process has taken it for its successor.
//
// It cannot exit at once: a new process that exits is no successor, and
// the old process, which watches for both its readiness byte and its exit,
// may see the exit first and fail the restart (restart in restart.go; with
// an immediate exit that happened about once in 20 to 60 restarts). So it
// waits for MainChan, closed when the old process's "you are main" byte
// arrives, which the old process sends once it has taken this process for
// its successor (handOver).
func benchReadyChild() int {
	if _, err := Start(context.Background(), Config{SocketPath: os.Getenv(benchEnvSocket)}); err != nil {
		fmt.Fprintf(os.Stderr, "bench-ready: %v\n", err)
		return 1
	}
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

// benchRawListeners opens n TCP listeners with the net package alone and
// returns their fds, valid until the benchmark ends.
func benchRawListeners(b *testing.B, n int) []uintptr {
	benchNoFile(b, uint64(n)+256)
	fds := make([]uintptr, 0, n)
	for _, addr := range benchAddrs(n) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
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

// benchRegister registers n TCP listeners with Listen, to be passed at each
// restart, and removes them from the registry when the benchmark ends.
func benchRegister(b *testing.B, n int) {
	benchNoFile(b, 2*uint64(n)+256) // the listener and the registry's duplicate
	if names := Names(); len(names) != 0 {
		b.Fatalf("the fd registry is not empty: %q", names)
	}
	for _, addr := range benchAddrs(n) {
		ln, err := Listen("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			ln.Close()
			Remove(ListenerName("tcp", addr))
		})
	}
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

// benchClock runs the benchmark timer and accounts CPU time: this
// process's while the timer runs, and that of the children reaped since
// newBenchClock. The timer is stopped when newBenchClock returns.
type benchClock struct {
	b              *testing.B
	old, oldMark   time.Duration
	childrenAtZero time.Duration
}

func newBenchClock(b *testing.B) *benchClock {
	b.ReportAllocs()
	b.ResetTimer()
	b.StopTimer()
	return &benchClock{b: b, childrenAtZero: benchRusage(unix.RUSAGE_CHILDREN)}
}

func (c *benchClock) start() {
	c.b.StartTimer()
	c.oldMark = benchRusage(unix.RUSAGE_SELF)
}

func (c *benchClock) stop() {
	c.old += benchRusage(unix.RUSAGE_SELF) - c.oldMark
	c.b.StopTimer()
}

// report adds the CPU times per iteration; call it once every new process
// was reaped.
func (c *benchClock) report() {
	n := float64(c.b.N)
	c.b.ReportMetric(float64(c.old.Microseconds())/n, "oldcpu-us/op")
	c.b.ReportMetric(float64((benchRusage(unix.RUSAGE_CHILDREN)-c.childrenAtZero).Microseconds())/n, "newcpu-us/op")
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

// BenchmarkForkExecFloor is the floor of a restart: fork and exec the same
// binary with the same command line and environment, wait for a byte it
// writes as its first act, and reap it. The pipe is created inside the
// timed region; the environment is built once, outside it.
func BenchmarkForkExecFloor(b *testing.B) {
	for _, n := range benchFDCounts {
		b.Run("fds="+strconv.Itoa(n), func(b *testing.B) {
			extra := benchRawListeners(b, n)
			attr := &syscall.ProcAttr{
				Env:   benchEnv(envTestRole + "=bench-floor"),
				Files: append([]uintptr{0, 1, 2, 0}, extra...),
			}
			clk := newBenchClock(b)
			clk.start()
			for range b.N {
				var p [2]int
				if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
					b.Fatal(err)
				}
				attr.Files[benchFloorFD] = uintptr(p[1])
				pid, err := syscall.ForkExec(os.Args[0], os.Args, attr)
				unix.Close(p[1])
				if err != nil {
					unix.Close(p[0])
					b.Fatal(err)
				}
				err = benchWaitByte(p[0])
				unix.Close(p[0])
				if rerr := benchReap(pid); err == nil {
					err = rerr
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			clk.stop()
			clk.report()
		})
	}
}

// benchRestarts runs b.N restarts of this process into a new process that
// runs role. Each iteration calls Start (outside the timer: it binds the
// control socket, replacing the stale one the previous new process left,
// and starts the spawner's thread), then, timed: RequestRestart, Wait for
// the Restarter to end (it closes the control socket and stops its
// spawner thread after answering), and wait until the new process was
// reaped. The timed region therefore also holds the control server's
// goroutines, the allocations of the client and the server, and whatever
// the runtime does concurrently (GC included).
func benchRestarts(b *testing.B, role string, lc *Lifecycle) {
	dir := b.TempDir()
	sock := filepath.Join(dir, "ctl.sock")
	cfg := Config{
		SocketPath:   sock,
		Env:          []string{envTestRole + "=" + role, benchEnvSocket + "=" + sock, benchEnvSize + "=" + strconv.Itoa(benchStateSize)},
		ReadyTimeout: benchTimeout,
		Lifecycle:    lc,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*benchTimeout)
	defer cancel()
	clk := newBenchClock(b)
	for range b.N {
		r, err := Start(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		clk.start()

		pid, err := RequestRestart(ctx, sock)
		if err != nil {
			r.Stop()
			b.Fatal(err)
		}
		newPid, err := r.Wait()
		if err != nil {
			b.Fatal(err)
		}
		if err := benchWaitExited(ctx, pid); err != nil {
			b.Fatalf("new process %d: %v", pid, err)
		}
		clk.stop()

		if newPid != pid {
			b.Fatalf("RequestRestart answered pid %d, the Restarter reports %d", pid, newPid)
		}
	}
	clk.report()
}

// BenchmarkRestartToReady is a whole restart, from the request on the
// control socket to the response with the new pid and the reaping of the
// new process, which calls Start and exits once it is the main process
// (benchReadyChild). See benchRestarts for what is inside the timer.
func BenchmarkRestartToReady(b *testing.B) {
	for _, n := range benchFDCounts {
		b.Run("fds="+strconv.Itoa(n), func(b *testing.B) {
			benchRegister(b, n)
			benchRestarts(b, "bench-ready", nil)
		})
	}
}

// BenchmarkHandover moves 64 MiB from the old process to the new one.
//
// via=raw-pipe: fork/exec the new process with a pipe at fd 3 (its buffer
// set to 1 MiB, as the library sets the state pipe's) and an answer pipe at
// fd 4; write the state with blocking writes, close, wait for the new
// process's byte, which it writes once it has read everything, and reap it.
//
// via=shellflip: a restart as in BenchmarkRestartToReady whose SendState
// writes the state in one Write, and whose new process reads it with
// ReceiveState before it calls Start.
//
// Both readers read 1 MiB at a time. Both include the process start, so the
// difference between the two is the library's whole cost (the restart's
// overhead, as in BenchmarkRestartToReady against BenchmarkForkExecFloor,
// plus its poller-driven pipe I/O) on top of the same copy.
func BenchmarkHandover(b *testing.B) {
	state := make([]byte, benchStateSize)
	for i := range state {
		state[i] = byte(i)
	}
	b.Run("via=raw-pipe", func(b *testing.B) {
		attr := &syscall.ProcAttr{
			Env:   benchEnv(envTestRole+"=bench-sink", benchEnvSize+"="+strconv.Itoa(benchStateSize)),
			Files: []uintptr{0, 1, 2, 0, 0},
		}
		b.SetBytes(benchStateSize)
		clk := newBenchClock(b)
		clk.start()
		for range b.N {
			if err := benchRawHandover(attr, state); err != nil {
				b.Fatal(err)
			}
		}
		clk.stop()
		clk.report()
	})
	b.Run("via=shellflip", func(b *testing.B) {
		b.SetBytes(benchStateSize)
		benchRestarts(b, "bench-state", &Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				_, err := w.Write(state)
				return err
			},
		})
	})
}

// benchRawHandover is one iteration of BenchmarkHandover/via=raw-pipe.
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
		fields []SdField
	}{
		{"READY", []SdField{SdReady()}},
		{"MAINPID+READY", []SdField{SdMainPID(12345), SdReady()}},
		{"STATUS64", []SdField{SdStatus(status)}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			l := sdListen(b, false)
			n := sdNewNotifier(b, l.addr)
			_, stop := l.drain(b, -1)
			defer stop()
			b.ReportAllocs()
			for b.Loop() {
				if err := n.Send(c.fields...); err != nil {
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
	if n, err := unix.Poll(fds, int(time.Until(d)/time.Millisecond)); err != nil || n == 0 {
		return fmt.Errorf("not gone: %v", err)
	}
	return nil
}
