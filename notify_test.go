//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// What passes from one generation to the next (notify.go): the
// environment that names the passed fds, written by the old process and
// taken over by the new one at init; the readiness socket; the state.
// The takeover is tested in this process with made-up environments, in
// re-executed processes given hostile fds and variables, and by fuzzing.

// TestTakeInheritanceHostile feeds the fd takeover environments that name
// fds that are closed, of the wrong type, out of range or malformed.
func TestTakeInheritanceHostile(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	// In each environment, P stands for a fresh pipe's read end, S for a
	// fresh socket, C for a closed fd.
	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"closed", map[string]string{envReadyFD: "C", envStateFD: "P"}, "bad file descriptor"},
		{"opened here", map[string]string{envReadyFD: "O", envStateFD: "P"}, "was not inherited"},
		{"wrong type", map[string]string{envReadyFD: "P", envStateFD: "P"}, "is a pipe, want a socket"},
		{"same fd twice", map[string]string{envReadyFD: "S", envStateFD: "S"}, "overlaps"},
		{"negative", map[string]string{envReadyFD: "-1", envStateFD: "P"}, "not an fd number"},
		{"garbage", map[string]string{envReadyFD: "4x", envStateFD: "P"}, "not an fd number"},
		{"leading zero", map[string]string{envReadyFD: "04", envStateFD: "P"}, "not an fd number"},
		{"huge", map[string]string{envReadyFD: "99999999999", envStateFD: "P"}, "not an fd number"},
		{"stdio", map[string]string{envReadyFD: "1", envStateFD: "P"}, "overlaps"},
		{"alone", map[string]string{envReadyFD: "S"}, "must be set together"},
		{"control not a socket", map[string]string{envReadyFD: "S", envStateFD: "P", envControlFD: "P"}, "overlaps"},
		{"listen count", map[string]string{envListenPID: pid, envListenFDs: "x"}, "not a count"},
		{"listen too many", map[string]string{envListenPID: pid, envListenFDs: "100000000"}, "not a count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := listFDs(t)
			// Without close-on-exec, as fds inherited across execve are.
			var p [2]int
			if err := unix.Pipe2(p[:], 0); err != nil {
				t.Fatal(err)
			}
			sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			// A socket of this process's own, close-on-exec as Go makes
			// every fd: never to be taken, whatever the variables say.
			own, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			env := map[string]string{}
			for k, v := range tc.env {
				v = strings.NewReplacer("P", strconv.Itoa(p[0]), "S", strconv.Itoa(sp[0]), "C", strconv.Itoa(p[1]+1000),
					"O", strconv.Itoa(own[0])).Replace(v)
				env[k] = v
			}
			var unset []string
			inh := takeInheritance(func(k string) (string, bool) { v, ok := env[k]; return v, ok },
				func(k string) error { unset = append(unset, k); return nil })
			if inh.err == nil || !strings.Contains(inh.err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", inh.err, tc.want)
			}
			if inh.readyFD >= 0 || inh.stateFD >= 0 {
				t.Errorf("took fds %d, %d despite the error", inh.readyFD, inh.stateFD)
			}
			for k := range tc.env {
				if !strings.HasPrefix(k, "LISTEN_") && !slices.Contains(unset, k) {
					t.Errorf("%s was not removed from the environment", k)
				}
			}
			// What was validated and then refused is closed, not leaked;
			// close what was not.
			unix.Close(p[0])
			unix.Close(sp[0])
			unix.Close(p[1])
			unix.Close(sp[1])
			unix.Close(own[0])
			unix.Close(own[1])
			checkFDs(t, before, true)
		})
	}
}

func TestChildEnv(t *testing.T) {
	h := handoff{names: []string{"a", "b"}, readyFD: 5, stateFD: 6, ctlFD: 7, ctlID: "1:2", signal: syscall.SIGHUP}
	env := h.environ(
		[]string{"PATH=/bin", "LISTEN_FDS=9", "LISTEN_PID=1", "LISTEN_FDNAMES=x", "SHELLFLIP_READY_FD=4", "KEEP=1", "OVER=old"},
		[]string{"OVER=new", "EXTRA=1"})
	want := []string{"PATH=/bin", "KEEP=1", "OVER=new", "EXTRA=1", "LISTEN_PID=auto", "LISTEN_FDS=2", "LISTEN_FDNAMES=a:b",
		"SHELLFLIP_READY_FD=5", "SHELLFLIP_STATE_FD=6", "SHELLFLIP_CONTROL_FD=7", "SHELLFLIP_CONTROL_ID=1:2", "SHELLFLIP_SIGNAL=1"}
	if !slices.Equal(env, want) {
		t.Errorf("childEnv:\n got %q\nwant %q", env, want)
	}
}

// TestNewProcessFDs: the new process starts with exactly stdio, the passed
// listeners at 3.., and the library's own fds, and once the package is
// initialised all of them are close-on-exec and the variables are gone.
func TestNewProcessFDs(t *testing.T) {
	c := newTestCluster(t)
	r0 := c.start("fds", envTestListen+"=tcp=127.0.0.1:0,unix="+filepath.Join(c.dir, "l.sock"))
	c.reports.next("fds") // generation 0 was started by exec.Cmd: not ours to judge
	r1 := c.restart(r0["pid"])
	rep := c.reports.nextFrom("fds", r1["pid"])
	open := strings.Split(rep["open"], ",")
	fdNum := func(s string) int { n, _, _ := strings.Cut(s, ":"); i, _ := strconv.Atoi(n); return i }
	sort.Slice(open, func(i, j int) bool { return fdNum(open[i]) < fdNum(open[j]) })
	// stdio; the two listeners at 3 and 4; readiness, state and control
	// socket; all but stdio close-on-exec once the package is initialised.
	want := []string{"0:stdio", "1:stdio", "2:stdio", "3:socket+cloexec", "4:socket+cloexec",
		"5:socket+cloexec", "6:pipe+cloexec", "7:socket+cloexec"}
	if !slices.Equal(open, want) {
		t.Errorf("new process started with fds\n%v, want\n%v", open, want)
	}
	if rep["env"] != "" {
		t.Errorf("variables left in the environment: %s", rep["env"])
	}
	// The listeners were inherited, not re-bound: same addresses.
	if r1["addrs"] != r0["addrs"] {
		t.Errorf("new process listens on %s, old on %s", r1["addrs"], r0["addrs"])
	}
}

// testReportFDs is role "fds": it reports the fds it was started with and
// the handoff variables, then runs as "server". It runs first thing,
// before the runtime opens any fd of its own.
func testReportFDs() int {
	self, _ := procFDs("self")
	var fds []string
	for _, fd := range slices.Sorted(maps.Keys(self)) {
		target := self[fd]
		kind := "other(" + target + ")"
		switch {
		case strings.HasPrefix(target, "socket:"):
			kind = "socket"
		case strings.HasPrefix(target, "pipe:"):
			kind = "pipe"
		case strings.HasPrefix(target, "anon_inode:"), strings.HasPrefix(target, "/sys/fs/cgroup/"):
			// The runtime's own (epoll, eventfd, pidfd, and the cgroup
			// CPU limit files it watches for GOMAXPROCS), opened
			// close-on-exec after the exec; not inherited.
			continue
		}
		if fd <= 2 {
			kind = "stdio"
		}
		if cloexec(fd) {
			kind += "+cloexec"
		}
		fds = append(fds, strconv.Itoa(fd)+":"+kind)
	}
	report("fds pid=%d open=%s env=%s", os.Getpid(), strings.Join(fds, ","), strings.Join(handoffEnv(), ";"))
	return testServer()
}

// testInherit is role "inherit", started by hand with fds at 3 and up and variables that
// name them, as a hostile or broken parent might. It calls Start and
// reports the error, then every fd it has open (the listing's own aside)
// with its target and whether it is close-on-exec, and the variables the
// package should have removed.
func testInherit() int {
	r, err := Start(context.Background(), Config{})
	if r != nil {
		r.Stop()
	}
	self, _ := procFDs("self")
	var fds []string
	for fd, target := range self {
		if cloexec(fd) {
			target += "+cloexec"
		}
		fds = append(fds, strconv.Itoa(fd)+">"+target)
	}
	report("inherit pid=%d fds=%s env=%s err=%v", os.Getpid(), strings.Join(fds, ","), strings.Join(handoffEnv(), ";"), err)
	return 0
}

// TestFaultHostileInheritance starts a real process with fds at 3 and up
// and hand-written variables naming them wrongly: closed, of the wrong
// type, out of range, overlapping, or a LISTEN_FDNAMES that does not match
// LISTEN_FDS. In each case Start must return an error that names the
// variable, the process must not panic, the variables must be gone, and
// every fd it was given must be closed: a refused fd left open would leak
// into every process it starts. The fds the Go runtime opened for itself
// before the package's init ran (it keeps its cgroup CPU limit files open,
// close-on-exec, at the lowest free fds: right after the ones given) must
// stay open: they are not the package's to close.
//
// What each case guards, in notify.go:
//   - "closed", "out of range", "garbage", "overlap", "alone": takeInheritance
//     closes what it validated when it refuses the inheritance (the
//     "if inh.err != nil" block, closeFD(&inh.readyFD) ...).
//   - "ready wrong type", "state wrong type", "control wrong type": own()
//     returns -1 without closing an fd whose checkFD failed; these fail
//     until a refused fd that was inherited is closed too.
//   - "names too few", "names too many", "listen overlaps ready": the
//     LISTEN_FDNAMES count check in takeListenFDs, its closing of the
//     validated block, and the low bound in own() ("fd < low").
//   - "listen beyond given": takeListenFDs takes fds 3..3+LISTEN_FDS-1
//     with checkFD(fd, 0), which accepts any open fd, including the
//     runtime's own; Ready's closeUnclaimed then closes it.
//   - "ready names runtime fd": own() must not close an fd of the wrong type
//     that was never inherited (close-on-exec: opened by this process).
func TestFaultHostileInheritance(t *testing.T) {
	t.Parallel()
	// The runtime's own fds, as this process has them: the re-executed
	// test binary opens the same ones.
	var runtimeFDs []string
	for _, target := range fdTargets(t, os.Getpid()) {
		if strings.HasPrefix(target, "/sys/fs/cgroup/") {
			runtimeFDs = append(runtimeFDs, target+"+cloexec")
		}
	}
	slices.Sort(runtimeFDs)
	for _, tc := range []struct {
		name  string
		files string // one letter per fd from 3 on: P pipe, S socket
		env   []string
		want  string // in Start's error, which must also name a variable
	}{
		{"closed", "P", []string{envReadyFD + "=100", envStateFD + "=3"}, "bad file descriptor"},
		{"ready wrong type", "PP", []string{envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_READY_FD="3": fd 3 is a pipe, want a socket`},
		{"state wrong type", "SS", []string{envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_STATE_FD="4": fd 4 is a socket, want a pipe`},
		{"control wrong type", "SPP", []string{envReadyFD + "=3", envStateFD + "=4", envControlFD + "=5"}, `$SHELLFLIP_CONTROL_FD="5": fd 5 is a pipe, want a socket`},
		{"out of range", "P", []string{envReadyFD + "=99999999999", envStateFD + "=3"}, `$SHELLFLIP_READY_FD="99999999999": not an fd number`},
		{"beyond any limit", "P", []string{envReadyFD + "=2147483647", envStateFD + "=3"}, "bad file descriptor"},
		{"garbage", "P", []string{envReadyFD + "=3 ", envStateFD + "=3"}, `$SHELLFLIP_READY_FD="3 ": not an fd number`},
		{"overlap", "S", []string{envReadyFD + "=3", envStateFD + "=3"}, `$SHELLFLIP_STATE_FD="3": fd 3 overlaps`},
		{"alone", "S", []string{envReadyFD + "=3"}, "must be set together"},
		{"names too few", "SSSP", []string{envListenPID + "=auto", envListenFDs + "=2", envListenFDNames + "=a", envReadyFD + "=5", envStateFD + "=6"},
			"$LISTEN_FDNAMES names 1 fds, $LISTEN_FDS says 2"},
		{"names too many", "S", []string{envListenPID + "=auto", envListenFDs + "=1", envListenFDNames + "=a:b"}, "$LISTEN_FDNAMES names 2 fds, $LISTEN_FDS says 1"},
		{"listen overlaps ready", "SP", []string{envListenPID + "=auto", envListenFDs + "=1", envReadyFD + "=3", envStateFD + "=4"}, `$SHELLFLIP_READY_FD="3": fd 3 overlaps`},
		{"listen beyond given", "S", []string{envListenPID + "=auto", envListenFDs + "=2"}, "$LISTEN_FDS=2: fd 4"},
		{"ready names runtime fd", "P", []string{envReadyFD + "=4", envStateFD + "=3"}, "fd 4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.name == "ready names runtime fd" && len(runtimeFDs) == 0 {
				t.Skip("the runtime keeps no fd of its own open here (no cgroup CPU limit files)")
			}
			c := newTestCluster(t)
			var files []*os.File
			var given []string // the targets of the fds the process is given
			for _, k := range tc.files {
				var f, other *os.File
				switch k {
				case 'P':
					var err error
					if f, other, err = os.Pipe(); err != nil {
						t.Fatal(err)
					}
				case 'S':
					sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
					if err != nil {
						t.Fatal(err)
					}
					f, other = os.NewFile(uintptr(sp[0]), "s0"), os.NewFile(uintptr(sp[1]), "s1")
				}
				defer other.Close()
				files = append(files, f)
				target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fileFD(t, f)))
				if err != nil {
					t.Fatal(err)
				}
				given = append(given, target)
			}
			cmd := c.command(os.Args[0], "inherit", tc.env...)
			cmd.ExtraFiles = files
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				f.Close()
			}
			rep := c.reports.next("inherit")
			if err := cmd.Wait(); err != nil || strings.Contains(stderr.String(), "panic") {
				t.Fatalf("process ended with %v; stderr:\n%s", err, stderr.String())
			}
			if !strings.Contains(rep["err"], tc.want) || !strings.Contains(rep["err"], "$SHELLFLIP_") && !strings.Contains(rep["err"], "$LISTEN_") {
				t.Errorf("Start returned %q, want an error naming the variable and containing %q", rep["err"], tc.want)
			}
			if rep["env"] != "" {
				t.Errorf("variables left in the environment: %s", rep["env"])
			}
			var stillOpen, runtime []string
			for _, fd := range strings.Split(rep["fds"], ",") {
				num, target, _ := strings.Cut(fd, ">")
				if slices.Contains(given, strings.TrimSuffix(target, "+cloexec")) {
					stillOpen = append(stillOpen, num+">"+target)
				}
				if strings.HasPrefix(target, "/sys/fs/cgroup/") {
					runtime = append(runtime, target)
				}
			}
			if len(stillOpen) > 0 {
				t.Errorf("fds given to the process are still open after Start refused them: %v (given: %v)", stillOpen, given)
			}
			slices.Sort(runtime)
			if !slices.Equal(runtime, runtimeFDs) {
				t.Errorf("the runtime's own fds are %v after Start, want %v: the package closed an fd it does not own (all fds: %s)", runtime, runtimeFDs, rep["fds"])
			}
		})
	}
}

// fileFD returns f's fd number without (*os.File).Fd, which would
// switch a socket to blocking mode.
func fileFD(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(s uintptr) { fd = int(s) })
	return fd
}

// TestRestartRejectedBehindWrapper: the program at the path is a wrapper
// that runs the real server as its child. When the restart fails (here: the
// ready timeout), the old process's SIGKILL reaches only the wrapper; the
// server, orphaned, must learn that it was rejected instead of taking the
// closed readiness socket for the old process's death and serving beside
// it.
func TestRestartRejectedBehindWrapper(t *testing.T) {
	if testing.Short() {
		t.Skip("testing.Short(): a restart that waits out a 3 s ready timeout")
	}
	c := newTestCluster(t, clusterHeld)
	wrapper := filepath.Join(c.dir, "wrapper.sh")
	script := "#!/bin/sh\n" + strconv.Quote(os.Args[0]) + " \"$@\"\n" // no exec: the server is the shell's child
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.start("server", envTestPath+"="+wrapper, envTestTimeout+"=3s")
	err := c.requestErr()
	if !strings.Contains(err.Error(), "not ready within 3s") {
		t.Fatalf("RequestRestart: %v, want the ready timeout", err)
	}
	orphan := c.nextNew("holding")["pid"]
	releaseFIFO(t, c.hold)
	if e := c.reports.nextFrom("error", orphan); !strings.Contains(e["err"], "rejected") {
		t.Errorf("the orphaned server reported %v, want that it was rejected", e)
	}
	pid, _ := strconv.Atoi(orphan)
	waitExited(t, pid) // reaped by whoever adopted it
	// The old process still serves: the next restart, through the wrapper
	// again, succeeds. (The new process is the wrapper; the server that
	// becomes ready is its child.)
	answer := c.ask()
	c.nextNew("holding")
	releaseFIFO(t, c.hold)
	if a := <-answer; a.err != nil {
		t.Fatalf("the restart after: %v", a.err)
	} else {
		c.track(a.pid)
	}
	c.nextNew("ready")
	c.reports.nextFrom("replaced", r0["pid"])
}

// TestGiveUpOnBadState plays the old process of a restart by hand, on the
// readiness socket, for a new process that is handed state it can or
// cannot use: examples/restarter, whose state is its predecessor's
// generation as 4 bytes, big-endian. With good state it asks for the
// state, says it is ready, and serves as the next generation once it is
// told that it is the main process; with bad state it gives up with the
// reason (GiveUp), which is what the old process tells its requester, and
// exits 1 without serving.
func TestGiveUpOnBadState(t *testing.T) {
	bin := buildExample(t, "restarter")
	for _, tc := range []struct {
		name  string
		state []byte
		gen   int // -1: the state must be refused
	}{
		{"generation 7", binary.BigEndian.AppendUint32(nil, 7), 8},
		{"generation 256", binary.BigEndian.AppendUint32(nil, 256), 257},
		{"empty", nil, -1},
		{"short", []byte{0, 0, 7}, -1},
		{"long", append(binary.BigEndian.AppendUint32(nil, 7), 0), -1},
		{"last generation", binary.BigEndian.AppendUint32(nil, 1<<32-1), -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(os.NewSyscallError("socketpair", err))
			}
			// The old process's end pollable, so that deadlines work.
			unix.SetNonblock(sp[0], true)
			readyOld, readyNew := os.NewFile(uintptr(sp[0]), "ready-old"), os.NewFile(uintptr(sp[1]), "ready-new")
			defer readyOld.Close()
			stateR, stateW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			// A few bytes fit in the pipe: write them all and close, so
			// the new process reads them and then EOF.
			_, err = stateW.Write(tc.state)
			stateW.Close()
			if err != nil {
				t.Fatal(err)
			}

			cmd := exec.Command(bin, "-socket", filepath.Join(shortTempDir(t, "giveup"), "ctl.sock"))
			cmd.Env = childEnv(envReadyFD+"=3", envStateFD+"=4")
			cmd.ExtraFiles = []*os.File{readyNew, stateR}
			var stderr strings.Builder
			cmd.Stderr = &stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			err = cmd.Start()
			readyNew.Close()
			stateR.Close()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				cmd.Process.Kill()
				cmd.Wait()
				if t.Failed() {
					t.Logf("its stderr:\n%s", stderr.String())
				}
			})
			stdout.(*os.File).SetReadDeadline(time.Now().Add(testDeadline))

			// The new process asks for the state, which is in the pipe
			// already, then says it is ready, or gives up with the reason.
			readyOld.SetReadDeadline(time.Now().Add(testDeadline))
			if kind, _, err := readyMsg(readyOld); kind != msgState || err != nil {
				t.Fatalf("readiness socket: read %q, %v; want %q", kind, err, msgState)
			}
			kind, reason, err := readyMsg(readyOld)
			if tc.gen >= 0 {
				if kind != msgReady || err != nil {
					t.Fatalf("readiness socket: read %q, %v; want %q", kind, err, msgReady)
				}
				// As the old process would: confirm that it is main.
				readyOld.Write([]byte{msgMain})
				line, err := bufio.NewReader(stdout).ReadString('\n')
				want := regexp.MustCompile(fmt.Sprintf(`^Instance no\. %d listening on 127\.0\.0\.1:[0-9]+\n$`, tc.gen))
				if !want.MatchString(line) {
					t.Errorf("stdout: %q, %v; want it to match %s", line, err, want)
				}
				return
			}
			if kind != msgGiveUp || reason == "" {
				t.Errorf("readiness socket: read %q %q, %v; want %q and why the state was refused", kind, reason, err, msgGiveUp)
			}
			// It exits, which ends its stdout.
			if out, err := io.ReadAll(stdout); len(out) > 0 || err != nil {
				cmd.Process.Kill()
				t.Errorf("stdout after bad state: %q, %v; want nothing, then the end", out, err)
			}
			if err := cmd.Wait(); cmd.ProcessState.ExitCode() != 1 {
				t.Errorf("after bad state it ended with %v, want exit status 1", err)
			}
			if !strings.Contains(stderr.String(), "cannot take over from the old process") {
				t.Errorf("stderr does not say why the state was refused:\n%s", stderr.String())
			}
		})
	}
}

// refParseFD is what parseFD must accept: the decimal form strconv.Itoa
// writes for an fd (no sign, no leading zero, no space), up to MaxInt32.
func refParseFD(s string) (int, bool) {
	if s == "" || len(s) > 1 && s[0] == '0' {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		if n = n*10 + int(c-'0'); n > math.MaxInt32 {
			return 0, false
		}
	}
	return n, true
}

// FuzzParseFDEnv fuzzes parseFD, which reads the SHELLFLIP_*_FD values,
// against refParseFD, and checks that it reads back every fd number
// the old process writes (childEnv uses strconv.Itoa).
func FuzzParseFDEnv(f *testing.F) {
	for _, s := range []string{"0", "3", "10", "2147483647", "2147483648", "99999999999", "-1", "+3", "03", "00",
		"", " 3", "3 ", "3\x00", "0x10", "1e3", "3_0", "٣", "4294967299"} {
		f.Add(s, int32(0))
	}
	f.Add("", int32(math.MaxInt32))
	f.Add("", int32(-1))
	f.Fuzz(func(t *testing.T, s string, n int32) {
		fd, err := parseFD(s)
		want, ok := refParseFD(s)
		if (err == nil) != ok || ok && fd != want {
			t.Fatalf("parseFD(%q) = %d, %v; want %d, ok=%t", s, fd, err, want, ok)
		}
		if err != nil && fd != -1 {
			t.Fatalf("parseFD(%q) = %d with error %v; want -1", s, fd, err)
		}
		if err == nil && strconv.Itoa(fd) != s {
			t.Fatalf("parseFD(%q) = %d, which is written %q", s, fd, strconv.Itoa(fd))
		}
		fd, err = parseFD(strconv.Itoa(int(n)))
		if n >= 0 && (err != nil || fd != int(n)) || n < 0 && err == nil {
			t.Fatalf("parseFD(%q) = %d, %v", strconv.Itoa(int(n)), fd, err)
		}
	})
}

// refFDNameValid is sd_notify(3)'s rule for an FDNAME: at most 255
// printable ASCII characters, no ':'.
func refFDNameValid(s string) bool {
	if len(s) > 255 {
		return false
	}
	for _, c := range []byte(s) {
		if c < 0x20 || c > 0x7e || c == ':' {
			return false
		}
	}
	return true
}

// FuzzListenFDNames fuzzes the parsing of LISTEN_FDNAMES: splitNames as
// takeListenFDs calls it for LISTEN_FDS=n (at most n+1 fields, so that the
// count check sees one too many without allocating for all of them), and
// fdnameValid. Names that are valid round-trip through strings.Join.
func FuzzListenFDNames(f *testing.F) {
	f.Add("", uint16(0))
	f.Add("", uint16(1))
	f.Add(":", uint16(1))
	f.Add("a:b:c", uint16(3))
	f.Add("a:b:c", uint16(2))
	f.Add("a:b:c", uint16(65535))
	f.Add("tcp/127.0.0.1%3A8080:unix/%2Frun%2Fx.sock", uint16(2))
	f.Add("a\nb:c d:\x7f:é", uint16(4))
	f.Add(strings.Repeat("x", 256)+":"+strings.Repeat(":", 100), uint16(10))
	f.Add("::::::::", uint16(3))
	f.Fuzz(func(t *testing.T, s string, n uint16) {
		limit := int(n) + 1
		names := splitNames(s, limit)
		all := strings.Split(s, ":")
		// The first limit-1 fields, and the rest of s in the last one.
		if len(names) != min(len(all), limit) || !slices.Equal(names[:len(names)-1], all[:len(names)-1]) ||
			strings.Join(names, ":") != s {
			t.Fatalf("splitNames(%q, %d) = %q", s, limit, names)
		}
		// takeListenFDs's count check: the names match LISTEN_FDS=n
		// exactly when there are n of them.
		if (len(names) == int(n)) != (len(all) == int(n)) {
			t.Fatalf("splitNames(%q, %d) gives %d names of %d: the count check would be wrong", s, limit, len(names), len(all))
		}
		if got := splitNames(s, 0); len(got) != 0 {
			t.Fatalf("splitNames(%q, 0) = %q", s, got)
		}
		for _, name := range names {
			if fdnameValid(name) != refFDNameValid(name) {
				t.Fatalf("fdnameValid(%q) = %t", name, fdnameValid(name))
			}
		}
		// Round trip: make every name valid, join, split again.
		valid := make([]string, len(names))
		for i, name := range names {
			b := []byte(name)
			b = slices.DeleteFunc(b, func(c byte) bool { return c < 0x20 || c > 0x7e || c == ':' })
			valid[i] = string(b[:min(len(b), fdnameMax)])
			if !fdnameValid(valid[i]) {
				t.Fatalf("fdnameValid(%q) = false", valid[i])
			}
		}
		joined := strings.Join(valid, ":")
		if back := splitNames(joined, len(valid)+1); !slices.Equal(back, valid) {
			t.Fatalf("%q joined as %q splits into %q", valid, joined, back)
		}
		// One fd fewer or more than there are names is always noticed.
		if back := splitNames(joined, len(valid)); len(back) == len(valid)-1 {
			t.Fatalf("%q: LISTEN_FDS=%d would pass", joined, len(valid)-1)
		}
		if back := splitNames(joined, len(valid)+2); len(back) == len(valid)+1 {
			t.Fatalf("%q: LISTEN_FDS=%d would pass", joined, len(valid)+1)
		}
	})
}

// neverOpenFD returns an fd number that no process can have open:
// RLIMIT_NOFILE can be raised no higher than fs.nr_open.
func neverOpenFD() int {
	n := 1 << 20
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			n = max(n, v)
		}
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Max < math.MaxInt32 {
		n = max(n, int(rl.Max))
	}
	return n
}

// fdSafe reports whether every number written in v, read in any way a
// careless parser might (sign, leading zeros and junk around it ignored),
// names one of ours or an fd that cannot be open: only then may v be given
// to takeInheritance in the test process, which closes and marks the fds
// it is told are its own.
func fdSafe(v string, ours map[int]uint32, never int) bool {
	for i := 0; i < len(v); {
		if v[i] < '0' || v[i] > '9' {
			i++
			continue
		}
		j := i
		for j < len(v) && v[j] >= '0' && v[j] <= '9' {
			j++
		}
		run := strings.TrimLeft(v[i:j], "0")
		i = j
		if len(run) > 10 {
			continue
		}
		n, _ := strconv.Atoi(run)
		if _, ok := ours[n]; !ok && n < never {
			return false
		}
	}
	return true
}

// FuzzTakeInheritance feeds takeInheritance environments whose
// SHELLFLIP_*_FD values are arbitrary strings in which P, W, S and T stand
// for fresh fds made for each input (a pipe's read and write ends, the two
// ends of a socketpair; inheritable, as inherited fds are) and C for an fd
// that cannot be open, and checks the outcome against a model of the
// rules: each value a canonical fd number, above stdio, distinct, open, of
// the right type; ready and state together. LISTEN_* are fuzzed too, with
// LISTEN_PID naming another process or unset: they are then none of this
// process's business and must change nothing. Inputs that would name any
// other fd of the test process are skipped, so the fuzzer can never make
// the test process close or mark an fd of its own.
//
// On success the fds are the model's and close-on-exec; on failure none is
// returned and each fd that passed validation was closed. Fresh fds no
// variable names are never touched.
func FuzzTakeInheritance(f *testing.F) {
	for _, tt := range [][3]string{
		{"S", "P", ""}, {"S", "P", "T"}, {"T", "W", "S"}, {"S", "", ""}, {"", "P", ""}, {"", "", "S"},
		{"P", "P", ""}, {"S", "S", ""}, {"S", "P", "P"}, {"S", "P", "S"}, {"C", "P", ""}, {"S", "C", "T"},
		{"0S", "P", ""}, {"+S", "P", ""}, {"-S", "P", ""}, {" S", "P", ""}, {"S\x00", "P", ""},
		{"SP", "P", ""}, {"99999999999", "P", ""}, {"2147483648", "P", ""}, {"C0", "P", ""},
	} {
		f.Add(tt[0], tt[1], tt[2], "", "", uint8(0))
	}
	f.Add("S", "P", "", "0", "a", uint8(1|4))
	f.Add("S", "P", "T", "0", "", uint8(1))
	f.Add("S", "P", "", "x", "a:b", uint8(2|4))
	f.Add("S", "P", "", "", ":::", uint8(4))
	never := neverOpenFD()
	self := os.Getpid()
	f.Fuzz(func(t *testing.T, ready, state, control, listenFDs, listenNames string, pidMode uint8) {
		// Fresh fds, without close-on-exec, as inherited ones arrive.
		var p [2]int
		if err := unix.Pipe2(p[:], 0); err != nil {
			t.Fatal(err)
		}
		sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			unix.Close(p[0])
			unix.Close(p[1])
			t.Fatal(err)
		}
		ours := map[int]uint32{p[0]: unix.S_IFIFO, p[1]: unix.S_IFIFO, sp[0]: unix.S_IFSOCK, sp[1]: unix.S_IFSOCK}
		ids := map[int]fdID{}
		for fd := range ours {
			ids[fd], _ = statFD(fd)
		}
		defer func() {
			for fd, id := range ids {
				if id.state(fd) == "same" {
					unix.Close(fd)
				}
			}
		}()
		repl := strings.NewReplacer("P", strconv.Itoa(p[0]), "W", strconv.Itoa(p[1]),
			"S", strconv.Itoa(sp[0]), "T", strconv.Itoa(sp[1]), "C", strconv.Itoa(never+7))
		vals := []string{repl.Replace(ready), repl.Replace(state), repl.Replace(control)}
		for _, v := range append(vals, listenFDs) {
			if !fdSafe(v, ours, never) {
				t.Skip("names an fd of the test process")
			}
		}
		env := map[string]string{envReadyFD: vals[0], envStateFD: vals[1], envControlFD: vals[2]}
		switch pidMode % 3 {
		case 1:
			env[envListenPID] = strconv.Itoa(self + 1)
		case 2:
			env[envListenPID] = listenPIDAuto // only init replaces it
		}
		if listenFDs != "" {
			env[envListenFDs] = listenFDs
		}
		if pidMode&4 != 0 {
			env[envListenFDNames] = listenNames
		}
		var unset []string
		inh := takeInheritance(func(k string) (string, bool) { v, ok := env[k]; return v, ok },
			func(k string) error { unset = append(unset, k); return nil })

		// The model.
		taken := map[int]bool{}
		named := map[int]bool{}
		wantErr := ""
		own := func(name, v string, want uint32) int {
			if v == "" {
				return -1
			}
			fd, ok := refParseFD(v)
			if ok {
				named[fd] = true
			}
			if ok && fd >= listenFDsStart && !taken[fd] && ours[fd] == want {
				taken[fd] = true
				return fd
			}
			if wantErr == "" {
				wantErr = "$" + name + "="
			}
			return -1
		}
		rfd := own(envReadyFD, vals[0], unix.S_IFSOCK)
		sfd := own(envStateFD, vals[1], unix.S_IFIFO)
		cfd := own(envControlFD, vals[2], unix.S_IFSOCK)
		if (rfd < 0) != (sfd < 0) && wantErr == "" {
			wantErr = "must be set together"
		}

		if len(inh.listen) > 0 {
			t.Fatalf("took LISTEN fds %v meant for another process", inh.listen)
		}
		for i, k := range []string{envReadyFD, envStateFD, envControlFD} {
			if vals[i] != "" && !slices.Contains(unset, k) {
				t.Errorf("$%s was not removed", k)
			}
		}
		got := [3]int{inh.readyFD, inh.stateFD, inh.controlFD}
		if wantErr == "" {
			if inh.err != nil {
				t.Fatalf("env %q: error %v, want none", env, inh.err)
			}
			if got != [3]int{rfd, sfd, cfd} {
				t.Fatalf("env %q: took fds %v, want %v", env, got, [3]int{rfd, sfd, cfd})
			}
			for _, fd := range got {
				if fd < 0 {
					continue
				}
				if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
					t.Errorf("fd %d was taken but is not close-on-exec (%v)", fd, err)
				}
			}
		} else {
			if inh.err == nil || !strings.Contains(inh.err.Error(), wantErr) {
				t.Fatalf("env %q: error %v, want one about %s", env, inh.err, wantErr)
			}
			if got != [3]int{-1, -1, -1} {
				t.Fatalf("env %q: took fds %v despite the error", env, got)
			}
			for _, fd := range []int{rfd, sfd, cfd} {
				if fd < 0 {
					continue
				}
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
					t.Errorf("env %q: fd %d passed validation, the inheritance was refused, and it is still open", env, fd)
				}
			}
		}
		for fd, id := range ids {
			if named[fd] {
				continue
			}
			if id.state(fd) != "same" || cloexec(fd) {
				t.Errorf("env %q: fd %d, which no variable names, was touched", env, fd)
			}
		}
	})
}

// The state handover: the window in which the old process holds its state
// still, state that the new process did not read, and a new process that
// gives up with its reason.

const envTestStateMode = "SHELLFLIP_TEST_STATE_MODE" // what the next new process does with the state; see stateRole

// stateRole is a service whose state is its generation. The old process
// reports each hook: "sendstate", then "closed how=ready" or "closed
// how=failed"; SIGTERM stops its Restarter. A new process that removes
// $SHELLFLIP_TEST_FAIL_FILE does what $SHELLFLIP_TEST_STATE_MODE says:
//
//	noread      never calls ReceiveState
//	partial     reads one byte of the state, closes it, and calls Start
//	giveup      reads the state and gives up with a reason
//	giveupnil   reads the state and gives up with a nil reason
//	giveuphold  reads one byte of the state, gives up with a reason, and lives on
//	giveupexit  reads one byte of the state, gives up with a reason, and exits
//	hold        reads the state, then waits for a line on $SHELLFLIP_TEST_HOLD_FIFO
//
// The state is the generation's line, then $SHELLFLIP_TEST_STATE_SIZE bytes.
func stateRole() int {
	pid := os.Getpid()
	report("started pid=%d", pid)
	mode := ""
	if startedByRestart() && takeKnob(envTestFailFile) {
		mode = os.Getenv(envTestStateMode)
	}
	gen := 0
	if mode != "noread" {
		st, err := ReceiveState()
		if err != nil {
			report("error pid=%d err=receive: %v", pid, err)
			return 1
		}
		if st != nil {
			if mode == "partial" || mode == "giveuphold" || mode == "giveupexit" {
				st.Read(make([]byte, 1))
			} else if b, err := io.ReadAll(st); err == nil {
				line, _, _ := strings.Cut(string(b), "\n")
				gen, _ = strconv.Atoi(line)
				gen++
			}
			if mode == "partial" { // the others leave the hook writing
				st.Close()
			}
		}
	}
	switch mode {
	case "giveup":
		GiveUp(errors.New("state version 2 not understood"))
		return 1
	case "giveupnil":
		GiveUp(nil)
		return 1
	case "giveuphold", "giveupexit":
		GiveUp(errors.New("state version 7 unknown"))
		if mode == "giveuphold" {
			select {} // until the old process kills it
		}
		return 1
	case "hold":
		waitFIFO(os.Getenv(envTestHoldFIFO))
	}
	size, _ := strconv.Atoi(os.Getenv(envTestStateSize))
	r, err := Start(context.Background(), Config{
		SocketPath:   os.Getenv(envTestSocket),
		ReadyTimeout: testDeadline,
		Logger:       slog.New(reportLogs{}),
		Lifecycle: &Lifecycle{
			SendState: func(_ context.Context, w io.Writer) error {
				report("sendstate pid=%d", pid)
				if _, err := fmt.Fprintln(w, gen); err != nil {
					return err
				}
				_, err := w.Write(make([]byte, size))
				return err
			},
			NewProcessReady:  func(context.Context, int) { report("closed pid=%d how=ready", pid) },
			NewProcessFailed: func(context.Context, error) { report("closed pid=%d how=failed", pid) },
		},
	})
	if err != nil {
		report("startfailed pid=%d err=%v", pid, err)
		return 1
	}
	report("ready pid=%d gen=%d", pid, gen)
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() {
		<-term
		r.Stop()
	}()
	newPid, err := r.Wait()
	report("replaced pid=%d new=%d err=%v", pid, newPid, err)
	return 0
}

// stateCluster starts the state role with mode for its first new process.
func stateCluster(t *testing.T, mode string, env ...string) (*testCluster, map[string]string) {
	c := newTestCluster(t)
	knob := filepath.Join(c.dir, "knob")
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	env = append(env, envTestFailFile+"="+knob, envTestStateMode+"="+mode)
	return c, c.start("state", env...)
}

// TestStateRefusedUnread: state that the new process did not ask for, or
// asked for and did not read to its end, fails the restart with a reason
// that says so; the old process keeps its state and serves, and the next
// restart hands it over.
func TestStateRefusedUnread(t *testing.T) {
	for mode, want := range map[string]string{
		"noread":  "did not ask for the state (it never called ReceiveState)",
		"partial": "the state it asked for was not read to its end",
	} {
		t.Run(mode, func(t *testing.T) {
			c, r0 := stateCluster(t, mode)
			err := c.requestErr()
			if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), want) {
				t.Fatalf("restart: %v, want a failure saying %q", err, want)
			}
			if r1 := c.restart(r0["pid"]); r1["gen"] != "1" {
				t.Errorf("the next new process has generation %s, want 1: the state was not kept", r1["gen"])
			}
		})
	}
}

// TestStateGiveUp: a new process that cannot use the state says why, and the
// requester's error carries it; GiveUp(nil) gives up without a reason.
func TestStateGiveUp(t *testing.T) {
	for mode, reason := range map[string]string{
		"giveup":    "state version 2 not understood",
		"giveupnil": "no reason given",
	} {
		t.Run(mode, func(t *testing.T) {
			c, r0 := stateCluster(t, mode)
			expectGaveUp(t, c.requestErr(), reason)
			c.restart(r0["pid"])
		})
	}
}

// TestStateGiveUpMidState: a new process that gives up before it read a
// state larger than the pipe holds, and lives on or exits, or that calls
// Start without reading it to its end, is heard while SendState still
// writes: the restart fails with its reason, well before the ready timeout,
// and the old process keeps its state.
func TestStateGiveUpMidState(t *testing.T) {
	for mode, reason := range map[string]string{
		"giveuphold": "state version 7 unknown",
		"giveupexit": "state version 7 unknown",
		"partial":    "the state it asked for was not read to its end",
	} {
		t.Run(mode, func(t *testing.T) {
			c, r0 := stateCluster(t, mode, envTestStateSize+"="+strconv.Itoa(8<<20))
			t0 := time.Now()
			expectGaveUp(t, c.requestErr(), reason)
			if d := time.Since(t0); d > testDeadline/3 {
				t.Errorf("the restart failed after %v; the ready timeout is %v", d, testDeadline)
			}
			if r1 := c.restart(r0["pid"]); r1["gen"] != "1" {
				t.Errorf("the next new process has generation %s, want 1: the state was not kept", r1["gen"])
			}
		})
	}
}

// expectGaveUp fails t unless err is "new process PID gave up: " and reason.
func expectGaveUp(t *testing.T, err error, reason string) {
	t.Helper()
	var pid int
	if _, serr := fmt.Sscanf(err.Error(), "new process %d gave up: ", &pid); serr != nil ||
		err.Error() != fmt.Sprintf("new process %d gave up: %s", pid, reason) {
		t.Fatalf("restart: %q, want \"new process PID gave up: %s\"", err, reason)
	}
}

// TestStateWindowClosesOnce: whatever the outcome, after SendState ran
// exactly one of NewProcessReady and NewProcessFailed runs, once.
func TestStateWindowClosesOnce(t *testing.T) {
	t.Run("success", func(t *testing.T) {
		c, r0 := stateCluster(t, "")
		c.restart(r0["pid"]) // which waits for the old process's "replaced"
		stateExpectWindow(t, c, r0["pid"], "ready", true)
	})
	t.Run("failure", func(t *testing.T) {
		c, r0 := stateCluster(t, "partial")
		c.requestErr()
		stateExpectWindow(t, c, r0["pid"], "failed", false)
	})
	t.Run("stop", func(t *testing.T) {
		hold := filepath.Join(t.TempDir(), "hold")
		c, r0 := stateCluster(t, "hold", envTestHoldFIFO+"="+makeFIFO(t, filepath.Dir(hold), "hold"))
		answer := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			_, err := RequestRestart(ctx, c.socket)
			answer <- err
		}()
		c.reports.next("sendstate")
		// The new process holds after reading the state: Stop the old
		// process's Restarter mid-restart.
		pid, _ := strconv.Atoi(r0["pid"])
		syscall.Kill(pid, syscall.SIGTERM)
		if err := <-answer; err == nil {
			t.Fatal("the restart succeeded after Stop")
		}
		if closed := c.reports.nextFrom("closed", r0["pid"]); closed["how"] != "failed" {
			t.Fatalf("window closed with %v, want how=failed", closed)
		}
		stateExpectNoMore(t, c, r0["pid"], false)
	})
}

// stateExpectWindow checks that the window opened once and closed once, how.
func stateExpectWindow(t *testing.T, c *testCluster, pid, how string, replaced bool) {
	t.Helper()
	c.reports.nextFrom("sendstate", pid)
	if closed := c.reports.nextFrom("closed", pid); closed["how"] != how {
		t.Fatalf("window closed with %v, want how=%s", closed, how)
	}
	stateExpectNoMore(t, c, pid, replaced)
}

// stateExpectNoMore checks that pid's Restarter ends (or, if replaced, has
// ended: its "replaced" report was taken) without closing the window again.
func stateExpectNoMore(t *testing.T, c *testCluster, pid string, replaced bool) {
	t.Helper()
	if !replaced {
		p, _ := strconv.Atoi(pid)
		syscall.Kill(p, syscall.SIGTERM) // ends a Restarter that serves on
		c.reports.nextFrom("replaced", pid)
	}
	// Every report pid sent came before its last one, "replaced".
	for _, l := range c.reports.seen {
		if strings.HasPrefix(l, "closed pid="+pid+" ") {
			t.Errorf("the window closed again: %s", l)
		}
	}
}

// A manager that does not read its notify socket: Notify waits for it a
// bounded time, and so does the handover, which waits for Notify.

// notifyStuckRole is a service under a manager that never reads
// $NOTIFY_SOCKET. Generation 0 fills the socket's queue, calls Notify on a
// goroutine, reports "blocked" once that call holds notifyMu, and reports
// how long the call took: "notified pid=N took=DURATION err=...". Every
// generation reports "ready".
func notifyStuckRole() int {
	pid := os.Getpid()
	report("started pid=%d", pid)
	r, err := Start(context.Background(), Config{
		SocketPath:   os.Getenv(envTestSocket),
		ReadyTimeout: testDeadline,
		Logger:       slog.New(reportLogs{}),
	})
	if err != nil {
		report("error pid=%d err=start: %v", pid, err)
		return 1
	}
	report("ready pid=%d", pid)
	if !startedByRestart() {
		n, _ := processNotifier()
		n.raw.Control(func(fd uintptr) {
			for err == nil { // until EAGAIN: the next send waits for a reader
				_, err = unix.SendmsgN(int(fd), []byte("STATUS=x"), nil, nil, unix.MSG_DONTWAIT)
			}
		})
		if err != unix.EAGAIN {
			report("error pid=%d err=filling the queue: %v", pid, err)
			return 1
		}
		go func() {
			t0 := time.Now()
			err := Notify("STATUS=x")
			report("notified pid=%d took=%v err=%v", pid, time.Since(t0), err)
		}()
		for notifyMu.TryLock() { // until the call holds it
			notifyMu.Unlock()
			runtime.Gosched()
		}
		report("blocked pid=%d", pid)
	}
	r.Wait()
	return 0
}

// TestNotifyQueueFull: a Notify that finds the manager's queue full fails
// after handOverTimeout instead of holding notifyMu for ever, and a restart
// requested meanwhile, whose handover waits for notifyMu, completes.
func TestNotifyQueueFull(t *testing.T) {
	if testing.Short() {
		t.Skip("waits out handOverTimeout: about 5 s")
	}
	c := newTestCluster(t)
	sock := filepath.Join(c.dir, "notify.sock")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close() // never read
	r0 := c.start("notify-stuck", "NOTIFY_SOCKET="+sock)
	c.reports.nextFrom("blocked", r0["pid"])
	answer := c.ask()
	n := c.reports.nextFrom("notified", r0["pid"])
	if took, _ := time.ParseDuration(n["took"]); n["err"] == "<nil>" || took < handOverTimeout || took > handOverTimeout+3*time.Second {
		t.Errorf("the blocked Notify returned %s after %s, want an error after %v", n["err"], n["took"], handOverTimeout)
	}
	a := <-answer
	if a.err != nil {
		t.Fatalf("restart: %v", a.err)
	}
	c.track(a.pid)
}

// TestAwaitReadyStateOrderings: the outcome of a state handover whatever
// comes first, the hook's own failure or what the new process says, played
// here by the test on the other end of a readiness socket and state pipe.
func TestAwaitReadyStateOrderings(t *testing.T) {
	whole := func(_ context.Context, w io.Writer) error { _, err := w.Write(make([]byte, 8<<20)); return err }
	broken := func(_ context.Context, w io.Writer) error {
		w.Write([]byte("half"))
		return errors.New("database locked")
	}
	for _, tc := range []struct {
		name string
		hook func(context.Context, io.Writer) error
		peer func(ready, state *os.File) // the new process, after it asked for the state
		want string
	}{
		// The hook fails on its own and the new process says nothing more:
		// the restart fails at once, not at the ready timeout.
		{"hook fails, silent peer", broken, func(_, state *os.File) { io.Copy(io.Discard, state) }, "sending state: database locked"},
		// The new process takes the cut state for a whole one, or gives
		// up on it: the hook's error is the reason.
		{"hook fails, peer ready", broken, func(ready, state *os.File) {
			io.Copy(io.Discard, state)
			ready.Write([]byte{msgReady})
		}, "sending state: database locked"},
		{"hook fails, peer gives up", broken, func(ready, state *os.File) {
			io.Copy(io.Discard, state)
			ready.Write(reasonMsg(msgGiveUp, "state truncated"))
		}, "sending state: database locked"},
		// The new process ends the hook: what it did decides.
		{"peer gives up mid-state", whole, func(ready, state *os.File) {
			state.Read(make([]byte, 10))
			ready.Write(reasonMsg(msgGiveUp, "state version 7 unknown"))
		}, "gave up: state version 7 unknown"},
		{"peer gives up and exits", whole, func(ready, state *os.File) {
			state.Read(make([]byte, 10))
			ready.Write(reasonMsg(msgGiveUp, "state version 7 unknown"))
			state.Close()
			ready.Close()
		}, "gave up: state version 7 unknown"},
		{"peer goes away mid-state", whole, func(ready, state *os.File) {
			state.Read(make([]byte, 10))
			ready.Close()
		}, errReadyEOF.Error()},
		{"peer asks twice", whole, func(ready, _ *os.File) { ready.Write([]byte{msgState}) }, "unexpected byte 0x53"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent, child, err := newReadyPair()
			if err != nil {
				t.Fatal(err)
			}
			ready, err := pollableFile(parent, "ready")
			if err != nil {
				t.Fatal(err)
			}
			defer ready.Close()
			stateR, stateW, err := newStatePipe()
			if err != nil {
				t.Fatal(err)
			}
			defer closeFD(&stateW)
			peerReady, peerState := os.NewFile(uintptr(child), "peer ready"), os.NewFile(uintptr(stateR), "peer state")
			defer peerReady.Close()
			defer peerState.Close()
			go func() {
				peerReady.Write([]byte{msgState})
				tc.peer(peerReady, peerState)
			}()
			// Shorter than the test's deadline: an outcome that waits for
			// the ready timeout is a failure.
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline/3)
			defer cancel()
			_, err = awaitReady(ctx, &childWatch{done: make(chan struct{})}, ready, &stateW, tc.hook)
			if err == nil || !strings.Contains(err.Error(), tc.want) || ctx.Err() != nil {
				t.Errorf("awaitReady: %v (ready timeout reached: %v), want %q", err, ctx.Err() != nil, tc.want)
			}
		})
	}
}
