//go:build linux

package shellflip

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The restart broker (broker.go): restarts through it, what the new
// process sees, what happens when the broker or its parent goes away, and
// what the broker makes of hostile messages.

// testBroker is the Broker of testServer's Config: none, unless a role of
// this file set it. It is called when testServer calls Start, after what
// the roles report at their start.
var testBroker = func() *Broker { return nil }

func init() {
	// A server that restarts through a broker of its own, and reports its
	// parent (the old process's broker) and its broker.
	testRoles["broker-server"] = func() int {
		report("parent pid=%d ppid=%d hupignored=%v", os.Getpid(), os.Getppid(), signal.Ignored(syscall.SIGHUP))
		testBroker = brokerOrExit
		return testServer()
	}
	// The same, reporting its fds first, as "fds" does.
	testRoles["broker-fds"] = func() int {
		testBroker = brokerOrExit
		return testReportFDs()
	}
	testRoles["broker-child"] = brokerChild
}

// envTestNofile sets RLIMIT_NOFILE (soft and hard) before NewBroker.
const envTestNofile = "SHELLFLIP_TEST_NOFILE"

func brokerOrExit() *Broker {
	if n, err := strconv.ParseUint(os.Getenv(envTestNofile), 10, 64); err == nil {
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n})
	}
	b, err := NewBroker()
	if err != nil {
		report("error pid=%d broker: %v", os.Getpid(), err)
		os.Exit(1)
	}
	report("broker pid=%d broker=%d", os.Getpid(), b.pid)
	return b
}

// TestBrokerRestart: restarts through the broker, each new process a child
// of the old process's broker, on the same sockets; the old process and
// its broker exit.
func TestBrokerRestart(t *testing.T) {
	c := newTestCluster(t)
	r := c.start("broker-server", envTestListen+"=tcp=127.0.0.1:0,udp=127.0.0.1:0")
	b := c.reports.nextFrom("broker", r["pid"])
	for gen := 1; gen <= 3; gen++ {
		old, oldBroker := r["pid"], b["broker"]
		n := c.restart(old)
		if n["gen"] != strconv.Itoa(gen) || n["addrs"] != r["addrs"] {
			t.Fatalf("generation %d reports %v, after %v", gen, n, r)
		}
		if p := c.reports.nextFrom("parent", n["pid"]); p["ppid"] != oldBroker {
			t.Errorf("generation %d (pid %s) was started by pid %s, want the old process's broker %s", gen, n["pid"], p["ppid"], oldBroker)
		}
		b = c.reports.nextFrom("broker", n["pid"])
		for _, p := range []string{old, oldBroker} {
			pid, _ := strconv.Atoi(p)
			waitExited(t, pid)
		}
		r = n
	}
}

// TestBrokerNohup: a signal ignored when the program started (nohup's
// SIGHUP) stays ignored in every generation, as without a broker: the
// broker must not catch it, or its children would get the default.
func TestBrokerNohup(t *testing.T) {
	nohup, err := exec.LookPath("nohup")
	if err != nil {
		t.Skip(err)
	}
	c := newTestCluster(t)
	r := c.startCmd(os.Args[0], "broker-server", func(cmd *exec.Cmd) {
		cmd.Path, cmd.Args = nohup, append([]string{"nohup"}, cmd.Args...)
	})
	for gen := 0; gen <= 2; gen++ {
		if p := c.reports.nextFrom("parent", r["pid"]); p["hupignored"] != "true" {
			t.Errorf("generation %d does not ignore SIGHUP", gen)
		}
		r = c.restart(r["pid"])
	}
}

// TestBrokerWatchdog: systemd's watchdog passes to each new process
// through the broker, as without one (TestRestartHandsOverWatchdog), with
// WATCHDOG_PID naming it, so that its own children do not take the
// watchdog for theirs.
func TestBrokerWatchdog(t *testing.T) {
	c := newTestCluster(t)
	r := c.start("broker-server", envTestWatchdog+"=1")
	for gen := 0; gen <= 2; gen++ {
		if r["watchdog"] != "1.5s/true/<nil>" || r["watchdogpid"] != "true" {
			t.Errorf("generation %d sees watchdog %s, WATCHDOG_PID its own: %s; want 1.5s/true/<nil>, true", gen, r["watchdog"], r["watchdogpid"])
		}
		r = c.restart(r["pid"])
	}
}

// TestBrokerNewProcessFDs: a new process started by the broker has the
// fds and variables it would have without one.
func TestBrokerNewProcessFDs(t *testing.T) {
	seen := map[string]map[string]string{}
	for _, role := range []string{"fds", "broker-fds"} {
		c := newTestCluster(t)
		r0 := c.start(role, envTestListen+"=tcp=127.0.0.1:0,unix="+filepath.Join(c.dir, "l.sock"))
		c.reports.next("fds")
		r1 := c.restart(r0["pid"])
		seen[role] = c.reports.nextFrom("fds", r1["pid"])
	}
	a, b := seen["fds"], seen["broker-fds"]
	if a["open"] != b["open"] || a["env"] != b["env"] {
		t.Errorf("a new process started without a broker has fds %s, variables %q;\nwith one, %s, %q", a["open"], a["env"], b["open"], b["env"])
	}
}

// TestBrokerManyFDs: more fds than one message carries (253) cross in
// several.
func TestBrokerManyFDs(t *testing.T) {
	c := newTestCluster(t)
	var spec []string
	for i := range 300 {
		spec = append(spec, fmt.Sprintf("tcp=127.2.%d.%d:0", i/250, i%250+1))
	}
	r0 := c.start("broker-server", envTestListen+"="+strings.Join(spec, ","))
	if r1 := c.restart(r0["pid"]); r1["addrs"] != r0["addrs"] || strings.Count(r1["addrs"], ",") != 299 {
		t.Errorf("the new process listens on %s, the old on %s", r1["addrs"], r0["addrs"])
	}
}

// TestBrokerLowNofile: NewBroker puts the broker's socket at a high fd,
// for its children's fd tables, but below RLIMIT_NOFILE.
func TestBrokerLowNofile(t *testing.T) {
	c := newTestCluster(t)
	var spec []string
	for i := range 100 {
		spec = append(spec, fmt.Sprintf("tcp=127.3.0.%d:0", i+1))
	}
	r0 := c.start("broker-server", envTestNofile+"=260", envTestListen+"="+strings.Join(spec, ","))
	if r1 := c.restart(r0["pid"]); r1["addrs"] != r0["addrs"] {
		t.Errorf("the new process listens on %s, the old on %s", r1["addrs"], r0["addrs"])
	}
}

// TestBrokerStartFails: the broker cannot start the program (a deploy that
// is not done: the file is not executable). The restart fails and says
// why, the old process keeps its fds and serves, and the broker serves the
// next restart.
func TestBrokerStartFails(t *testing.T) {
	c := newTestCluster(t)
	bin := filepath.Join(c.dir, "prog.test")
	if err := copyExecutable(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	r0 := c.startCmd(bin, "broker-server", nil)
	pid, _ := strconv.Atoi(r0["pid"])
	before := brokerFDSet(t, pid)
	os.Chmod(bin, 0o644)
	if err := c.requestErr(); !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), "not executable") {
		t.Fatalf("restart with a non-executable program: %v, want a failure that says so", err)
	}
	requestToEOF(t, c.socket) // the server has closed its connections by its end
	// No fd is new. (One may be gone: the roles' reports open a socket
	// for each, and the one before may have been open still.)
	for _, fd := range brokerFDSet(t, pid) {
		if !slices.Contains(before, fd) {
			t.Errorf("the old process has fd %s after the failed restarts, not before: %q", fd, before)
		}
	}
	os.Chmod(bin, 0o755)
	c.restart(r0["pid"])
}

// TestBrokerGone: restarts fail, and say why, once the broker is gone:
// killed, or stopped past the ready timeout (then the old process gives it
// up, and it exits at end of file once it runs again). The old process
// keeps serving.
func TestBrokerGone(t *testing.T) {
	for _, how := range []string{"killed", "stopped"} {
		t.Run(how, func(t *testing.T) {
			c := newTestCluster(t)
			r0 := c.start("broker-server", envTestTimeout+"=1s")
			b, _ := strconv.Atoi(c.reports.nextFrom("broker", r0["pid"])["broker"])
			if how == "stopped" {
				unix.Kill(b, unix.SIGSTOP)
				if err := c.requestErr(); !strings.Contains(err.Error(), "the broker did not answer: not ready within 1s") {
					t.Fatalf("restart with the broker stopped: %v", err)
				}
				unix.Kill(b, unix.SIGCONT)
			} else {
				unix.Kill(b, unix.SIGKILL)
			}
			waitExited(t, b)
			if err := c.requestErr(); !strings.Contains(err.Error(), "the broker exited") {
				t.Fatalf("restart with the broker gone: %v", err)
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%s", r0["pid"])); err != nil {
				t.Fatalf("the old process: %v", err)
			}
		})
	}
}

// TestBrokerParentGone: the broker exits when its parent does, even by
// SIGKILL.
func TestBrokerParentGone(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("broker-server")
	b, _ := strconv.Atoi(c.reports.nextFrom("broker", r0["pid"])["broker"])
	pid, _ := strconv.Atoi(r0["pid"])
	unix.Kill(pid, unix.SIGKILL)
	waitExited(t, b)
}

// TestBrokerStartRefuses: a Broker leaves Path, Args and Env to itself,
// and only NewBroker makes one.
func TestBrokerStartRefuses(t *testing.T) {
	for _, cfg := range []Config{
		{Broker: &Broker{}},
		{Broker: &Broker{}, Path: "/bin/sh"},
		{Broker: &Broker{}, Args: []string{"sh"}},
		{Broker: &Broker{}, Env: []string{"A=1"}},
	} {
		if r, err := Start(context.Background(), cfg); err == nil {
			r.Stop()
			t.Errorf("Start with %+v succeeded", cfg)
		}
	}
}

// brokerFDSet lists pid's fds and what they are.
func brokerFDSet(t *testing.T, pid int) []string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		out = append(out, e.Name()+" "+target)
	}
	return out
}

// requestToEOF asks for a restart and reads to the end of the connection:
// once it returns, the server has closed its end of this connection, and
// of every one it answered before.
func requestToEOF(t *testing.T, socket string) {
	t.Helper()
	conn, err := net.DialTimeout("unix", socket, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testDeadline))
	conn.Write(appendTryRestart(nil))
	if _, err := io.ReadAll(conn); err != nil {
		t.Fatal(err)
	}
}

// The broker, alone: a test's socketpair and hostile messages.

// brokerChild is what the hostile test's broker starts: it reports what it
// was given and waits to be killed.
func brokerChild() int {
	report("child pid=%d args=%s names=%s restart=%v err=%v", os.Getpid(), strings.Join(os.Args, ","), strings.Join(registryNames(), ","), startedByRestart(), inherited.err)
	select {}
}

// rawBroker is a broker started by the test, not by NewBroker.
type rawBroker struct {
	t    *testing.T
	conn *net.UnixConn
	cmd  *exec.Cmd
}

func startRawBroker(t *testing.T, env ...string) *rawBroker {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "broker")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "GORACE=atexit_sleep_ms=0", envBrokerFD+"=3", envBrokerProgram+"="+os.Args[0]), env...)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	f := os.NewFile(uintptr(fds[0]), "ours")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	b := &rawBroker{t: t, conn: c.(*net.UnixConn), cmd: cmd}
	t.Cleanup(func() {
		b.conn.Close()
		cmd.Wait()
	})
	return b
}

// send sends msg with fds.
func (b *rawBroker) send(msg []byte, fds ...int) {
	b.t.Helper()
	if _, _, err := b.conn.WriteMsgUnix(msg, unix.UnixRights(fds...), nil); err != nil {
		b.t.Fatal(err)
	}
}

// answer reads the next message.
func (b *rawBroker) answer() []byte {
	b.t.Helper()
	buf := make([]byte, 8<<10)
	b.conn.SetReadDeadline(time.Now().Add(testDeadline))
	n, err := b.conn.Read(buf)
	if err != nil {
		b.t.Fatalf("reading the broker's answer: %v", err)
	}
	return buf[:n]
}

// startFDs returns what a start carries: stdio, a readiness socket and a
// state pipe, closed when the test ends.
func startFDs(t *testing.T) []int {
	t.Helper()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeFDs([]int{sp[0], sp[1], p[0], p[1]}) })
	return []int{0, 1, 2, sp[1], p[0]}
}

// TestBrokerHostile: a broker refuses each malformed message with an
// error, starts nothing, and holds no fd of it; then serves a good
// request, whose new process gets only what the broker was started with
// and what the message named, and kills it on request.
func TestBrokerHostile(t *testing.T) {
	c := newTestCluster(t) // for the child's reports
	b := startRawBroker(t, envTestRole+"=broker-child", envTestReport+"="+c.reports.path)
	bpid := b.cmd.Process.Pid
	start := startFDs(t)
	pipeFD, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pipeFD)
	stranger := exec.Command("sleep", "60")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stranger.Process.Kill(); stranger.Wait() }()

	refused := func(want string, msg []byte, fds ...int) {
		t.Helper()
		b.send(msg, fds...)
		if a := string(b.answer()); !strings.HasPrefix(a, "E") || !strings.Contains(a, want) {
			t.Errorf("message %.40q: the broker answered %q, want an error with %q", msg, a, want)
		}
	}
	refused("unknown kind 'Z'", []byte("Zhello")) // and the broker's runtime settles
	baseline := brokerFDSet(t, bpid)

	refused("unknown kind '/'", []byte("/bin/sh -c id"), pipeFD)
	refused("0 fds", []byte("Fname"))
	refused("1 names for 2 fds", []byte("Fname"), pipeFD, pipeFD)
	refused(`"a\nb" is not a valid fd name`, []byte("Fa\nb"), pipeFD)
	refused("longer than 65536 bytes", append([]byte("F"), strings.Repeat("x", 70000)...), pipeFD)
	refused("a start without a signal", []byte("S"), start...)
	refused("0 fds with a start, want 5", []byte("S\x00"))
	refused("4 fds with a start, want 5", []byte("S\x00"), start[:4]...)
	refused(`"/bin/sh" is not a file's DEV:INO`, []byte("S\x00/bin/sh"), append(start, start[3])...)
	refused("signal 9", []byte("S\x09"), start...)
	refused("fd 3 of the start is not a socket", []byte("S\x00"), append(start[:3:3], pipeFD, start[4])...)
	refused("fd 4 of the start is not a pipe", []byte("S\x00"), append(start[:4:4], start[3])...)
	refused("a kill is a pid and no fds", binary.BigEndian.AppendUint32([]byte("K"), uint32(bpid)), pipeFD)
	refused("a kill is a pid and no fds", []byte("K1"))
	// Fds taken, then an error: they are dropped, not kept for the next
	// start.
	b.send([]byte("Fgood"), pipeFD)
	if a := string(b.answer()); a != "A" {
		t.Fatalf("fds with a name: answered %q, want A", a)
	}
	refused("unknown kind", []byte("?"))
	// A kill for a process that is not the broker's child: no answer,
	// and nothing killed (the next answer is the next message's).
	b.send(binary.BigEndian.AppendUint32([]byte("K"), uint32(stranger.Process.Pid)))
	refused("unknown kind", []byte("!"))
	if err := stranger.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("a kill for a stranger reached it: %v", err)
	}

	if kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", bpid, bpid)); len(kids) != 0 {
		t.Errorf("the broker started %s", kids)
	}
	if after := brokerFDSet(t, bpid); !slices.Equal(after, baseline) {
		t.Errorf("the broker's fds after hostile messages:\n%q\nbefore:\n%q", after, baseline)
	}

	// A good request: one fd named "x", the restart signal SIGUSR2.
	b.send([]byte("Fx"), pipeFD)
	if a := string(b.answer()); a != "A" {
		t.Fatalf("fds: answered %q, want A", a)
	}
	b.send([]byte{'S', byte(unix.SIGUSR2)}, start...)
	a := b.answer()
	if len(a) < 5 || a[0] != 'P' || string(a[5:]) != os.Args[0] {
		t.Fatalf("start: answered %q, want P, a pid, and %s", a, os.Args[0])
	}
	child := binary.BigEndian.Uint32(a[1:])
	rep := c.reports.nextFrom("child", strconv.Itoa(int(child)))
	if rep["args"] != os.Args[0]+",-test.run=^$" || rep["names"] != "x" || rep["restart"] != "true" || rep["err"] != "<nil>" {
		t.Errorf("the new process reports %v", rep)
	}
	b.send(binary.BigEndian.AppendUint32([]byte("K"), child))
	x := b.answer()
	if len(x) != 9 || x[0] != 'X' || binary.BigEndian.Uint32(x[1:]) != child {
		t.Fatalf("after the kill: %q, want X and the pid", x)
	}
	if ws := unix.WaitStatus(binary.BigEndian.Uint32(x[5:])); !ws.Signaled() || ws.Signal() != unix.SIGKILL {
		t.Errorf("the new process ended with wait status %#x, want SIGKILL", uint32(ws))
	}
	if after := brokerFDSet(t, bpid); !slices.Equal(after, baseline) {
		t.Errorf("the broker's fds after a start:\n%q\nbefore:\n%q", after, baseline)
	}

	// End of file: the broker exits, with status 0.
	b.conn.Close()
	if err := b.cmd.Wait(); err != nil {
		t.Errorf("the broker, at end of file: %v", err)
	}
}

// TestBrokerParentGaveUp: a start that the parent sent, and then gave up
// on (it closed its end: the broker was stopped past the ready timeout),
// starts nothing. The new process would have the write end of a pipe as
// its stdout; the test's read end sees end of file once the broker is
// gone only if nobody else holds it.
func TestBrokerParentGaveUp(t *testing.T) {
	c := newTestCluster(t)
	b := startRawBroker(t, envTestRole+"=broker-child", envTestReport+"="+c.reports.path)
	var out [2]int
	if err := unix.Pipe2(out[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	start := startFDs(t)
	start[1] = out[1]
	b.cmd.Process.Signal(unix.SIGSTOP)
	b.send([]byte("S\x00"), start...)
	unix.Close(out[1])
	b.conn.Close()
	b.cmd.Process.Signal(unix.SIGCONT)
	if err := b.cmd.Wait(); err != nil {
		t.Errorf("the broker, at end of file: %v", err)
	}
	r, err := pollableFile(out[0], "out") // for the deadline
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.SetReadDeadline(time.Now().Add(testDeadline))
	if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("the stdout of a new process that should not exist: %d bytes, %v; want end of file", n, err)
		pid, _ := strconv.Atoi(c.reports.next("child")["pid"])
		unix.Kill(pid, unix.SIGKILL)
	}
}

// TestBrokerSealsFDs: an fd without close-on-exec that leaked into this
// process (from its own parent, say) does not reach the broker.
func TestBrokerSealsFDs(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	const leaked = 900
	if err := unix.Dup3(p[0], leaked, 0); err != nil { // not close-on-exec: as if inherited
		t.Fatal(err)
	}
	defer unix.Close(leaked)
	b, err := NewBroker()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		b.close()
		unix.Wait4(b.pid, nil, 0, nil)
	}()
	// An answer shows the broker's exec is over: ForkExec returns when the
	// exec closed its pipe, which may come before fd 900 is closed.
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	if _, err := b.request(ctx, []byte{brokerFDs, 'x'}, []uintptr{uintptr(p[1])}); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", b.pid, leaked)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the broker has fd %d (%s), which leaked into its parent: %v", leaked, l, err)
	}
}

// TestBrokerAnswerWithoutPID: a broker that answers a start with 'A' (as
// for fds) has started nothing this process can watch: the restart fails,
// rather than go on with no child.
func TestBrokerAnswerWithoutPID(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "broker parent")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	b := &Broker{conn: c.(*net.UnixConn), children: map[int]*childWatch{}}
	go b.read()
	defer b.close()
	fake := os.NewFile(uintptr(fds[1]), "fake broker")
	defer fake.Close()
	go func() {
		var buf [64]byte
		fake.Read(buf[:]) // the start, its fds discarded
		fake.Write([]byte{brokerOK})
	}()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	child, err := b.spawn(ctx, []uintptr{0, 1, 2, uintptr(p[0]), uintptr(p[1])}, handoff{signal: syscall.SIGUSR1})
	if err == nil || child != nil {
		t.Errorf("a start answered with 'A': child %v, error %v; want an error", child, err)
	}
}
