//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A real systemd, 252 and 254, in private namespaces: reloads, fd store,
// notify-reload, watchdog.

// Tests of the library under a real systemd, each under every version the
// suite has that can do what it tests (systemdEach): the machine's own, 252
// on Debian bookworm, and 254 from bookworm-backports, unpacked into a folder
// (testdata/systemd/fetch254.sh; never installed) and run with its own
// libsystemd-shared and its own systemctl. A test that finds neither skips
// and says what is missing; .ci/run fetches 254 and installs 252. And tests
// of the datagrams the library sends to a notify socket owned by the test,
// for the details that systemd does not show.
//
// systemd runs as PID 1 of private pid, mount, cgroup, net, uts and ipc
// namespaces (unshare(1), then testdata/systemd/boot.sh), in a cgroup2
// sub-cgroup of its own, with a pty as its console so that its log reaches
// the test, and is driven with systemctl through nsenter(1). The service is this test
// binary, copied where the namespaced systemd can exec it, running the
// "systemd-service" role; ExecReload= runs another copy in the
// "systemd-reload" role, which calls RequestRestart. Everything is torn
// down by the test: systemd is killed with SIGKILL (which takes the whole
// pid namespace with it), and the cgroup is removed depth first.
//
// What systemd 252 did here that is worth knowing (254 did the same):
//
//   - A regular file bind-mounted over /dev/console gets no log at all:
//     PID 1 opens the console with open_terminal(), which refuses a
//     non-tty, and its stdio are /dev/null. A pty slave works.
//   - The default NotifyAccess= of Type=notify is "main" (systemctl show
//     says so), so a datagram from any other pid is dropped with the
//     warning "Got notification message from PID X, but reception only
//     permitted for main PID Y". BARRIER=1 is exempt: the manager handles
//     it before it looks for the sending unit, so the old process can wait
//     on a barrier after it has handed MAINPID over.
//   - A MAINPID= naming a process that is not systemd's child (the new
//     process is the old one's) is accepted, with the warning "Supervising
//     process X which is not our child. We'll most likely not notice when
//     it exits." once per restart. It does notice: once the old process
//     has exited, PID 1 is the new one's parent, and when the new one is
//     killed the unit fails with "Main process exited, code=killed".
//   - READY=1 during a reload does not end the reload while ExecReload= is
//     still running (service_notify_message checks control_pid): the reload
//     job ends when the reload client exits, with its exit status, and
//     `systemctl reload` returns then. A failed ExecReload= leaves the unit
//     active with ReloadResult=exit-code.
//   - After a successful ExecReload=, systemd re-reads PIDFile= if the unit
//     has one (service_sigchld_event, SERVICE_RELOAD) and takes the pid in
//     it as the main pid. A pid file that still names the old process at
//     that moment undoes MAINPID=: seen here as "Reloaded" followed by
//     "Deactivated successfully" when the old process exited, with the new
//     one killed. That is also why the PIDFile= test boots a unit of its
//     own: with PIDFile= the re-read would hide a missing MAINPID=.
//   - ExecReload= runs without $NOTIFY_SOCKET (NotifyAccess=main gives it
//     only to the main process); a control process that wants to talk to
//     systemd must know the socket's path.
//   - The fd store survives `systemctl restart` in 252 without
//     FileDescriptorStorePreserve= (added in 254): systemd releases a
//     unit's resources only when it is inactive with no job queued, and a
//     restart job stays queued from the stop through the start.
//   - WATCHDOG_PID= is the pid systemd forked (exec_context's
//     EXEC_SET_WATCHDOG), and the watchdog keeps its timer across a
//     MAINPID= change: the new main process must ping within WatchdogSec=
//     of the old one's last ping, and WATCHDOG=1 from any other pid is
//     dropped with the warning above.
//   - Not systemd's, but it bit here: a race-enabled Go binary sleeps 1 s
//     on exit (GORACE atexit_sleep_ms defaults to 1000), so every reload
//     would wait 1 s for the reload client; the unit sets
//     atexit_sleep_ms=0.
//
// What systemd 254 does beyond that:
//
//   - Type=notify-reload: `systemctl reload` sends ReloadSignal= (SIGHUP)
//     to the main process and waits for RELOADING=1 with a MONOTONIC_USEC=
//     not before the signal, then READY=1; MAINPID= is accepted in the
//     reload states. If the unit also has ExecReload=, systemd runs it as
//     well as sending the signal (service_enter_reload).
//   - It counts a Type=notify-reload reload a success once READY=1 ends
//     it, whatever happened; only STATUS= can say that the restart failed.
//   - FileDescriptorStorePreserve=yes keeps the fd store of a stopped unit
//     ("dead-resources-pinned") only while the unit stays loaded: a unit
//     nothing references is collected when it stops, fd store and all.

// Knobs of the systemd roles, in the environment of the service.
const (
	envSystemdListen       = "SHELLFLIP_TEST_SD_LISTEN"        // unix socket path to serve pid and generation on
	envSystemdAccept       = "SHELLFLIP_TEST_SD_ACCEPT"        // "inherited": accept only on a listener this process inherited
	envSystemdStore        = "SHELLFLIP_TEST_SD_STORE"         // non-empty: push the registry to systemd's fd store
	envSystemdNotifyReload = "SHELLFLIP_TEST_SD_NOTIFY_RELOAD" // non-empty: Config{NotifyReload: true, Signal: SIGHUP}
	envSystemdPIDFile      = "SHELLFLIP_TEST_SD_PIDFILE"       // Config.PIDFile
	envSystemdStray        = "SHELLFLIP_TEST_SD_STRAY"         // knob: the reload client sends a datagram of its own and exits
	envSystemdLog          = "SHELLFLIP_TEST_SD_LOG"           // non-empty: the library logs to stderr
	envSystemdPreSpawn     = "SHELLFLIP_TEST_SD_PRESPAWN"      // a fifo: PreSpawn reports, waits for it (waitFIFO), and fails with 5000 bytes of reason
)

const (
	systemdUnit   = "shellflip-test.service"
	systemdTarget = "shellflip-test.target"
	// systemdNotMainWarning is what systemd logs when it drops a datagram
	// from a pid other than the main one under NotifyAccess=main.
	systemdNotMainWarning = "but reception only permitted for main PID"
)

// systemdServiceRole is the service. Every generation reports, in order:
//
//	started pid= restarted= names=   (names: the registry before Listen)
//	early pid= err=                  (restarted only: a Send before Start)
//	ready pid= gen= inherited= ino=  (Start returned: main)
//	main pid= err=                   (IsMain: STATUS=main pid=N, then a barrier)
//	watchdog pid= enabled= wdpid= err=  (IsMain, with WatchdogSec=: a first ping, then a barrier)
//	replaced pid= new=               (a restart succeeded; it stops accepting and exits)
//
// A restarted process that removes $SHELLFLIP_TEST_FAIL_FILE exits with
// status 3 right after its early report, before Ready.
func systemdServiceRole() int {
	pid := os.Getpid()
	names := registryNames()
	n, err := processNotifier()
	if err != nil {
		report("error pid=%d notifier: %v", pid, err)
		return 1
	}
	report("started pid=%d restarted=%t names=%s", pid, startedByRestart(), strings.Join(names, ","))
	if startedByRestart() {
		report("early pid=%d err=%v", pid, Notify("STATUS=early"))
		if takeKnob(envTestFailFile) {
			os.Exit(3)
		}
	}

	gen := 0
	st, err := ReceiveState()
	if err != nil {
		report("error pid=%d receive: %v", pid, err)
		return 1
	}
	if st != nil {
		line, err := bufio.NewReader(st).ReadString('\n')
		st.Close()
		if err == nil {
			gen, err = strconv.Atoi(strings.TrimSpace(line))
		}
		if err != nil {
			report("error pid=%d state %q: %v", pid, line, err)
			return 1
		}
		gen++
	}

	inherited, ino := false, uint64(0)
	var ln net.Listener
	if path := os.Getenv(envSystemdListen); path != "" {
		inherited = slices.Contains(names, ListenerName("unix", path))
		ln, err = Listen("unix", path)
		if err != nil {
			report("error pid=%d listen: %v", pid, err)
			return 1
		}
		if ino, err = systemdInode(ln.(syscall.Conn)); err != nil {
			report("error pid=%d fstat: %v", pid, err)
			return 1
		}
		if os.Getenv(envSystemdAccept) != "inherited" || inherited {
			go serveHello(ln, gen)
		}
	}
	if os.Getenv(envSystemdStore) != "" {
		if err := StoreFDs(); err != nil {
			report("error pid=%d store: %v", pid, err)
			return 1
		}
	}

	var wd systemdWatchdog
	cfg := Config{
		Logger:     systemdLogger(),
		SocketPath: os.Getenv(envTestSocket),
		PIDFile:    os.Getenv(envSystemdPIDFile),
		Lifecycle: &Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				_, err := fmt.Fprintf(w, "%d\n", gen)
				return err
			},
			// Before the old process sends MAINPID=: from then on a ping
			// from it would come from a pid that is not the main one.
			NewProcessReady: func(context.Context, int) { wd.stop() },
		},
	}
	if os.Getenv(envSystemdNotifyReload) != "" {
		cfg.NotifyReload, cfg.Signal = true, syscall.SIGHUP
	}
	if fifo := os.Getenv(envSystemdPreSpawn); fifo != "" {
		cfg.Lifecycle.PreSpawn = func(context.Context) error {
			report("prespawn pid=%d", pid)
			waitFIFO(fifo)
			return errors.New(strings.Repeat("x", 5000))
		}
	}
	r, err := Start(context.Background(), cfg)
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	go func() {
		err := Notify("STATUS=main pid=" + strconv.Itoa(pid))
		if err == nil {
			// Once the barrier returns, systemd has read the status: the
			// test can ask for it as soon as it has this report.
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			err = n.barrier(ctx)
			cancel()
		}
		report("main pid=%d err=%v", pid, err)
	}()
	go wd.run(n)
	report("ready pid=%d gen=%d inherited=%t ino=%d", pid, gen, inherited, ino)
	p, err := r.Wait()
	if err != nil {
		report("ended pid=%d err=%v", pid, err)
		return 1
	}
	if ln != nil {
		// As a real service would: stop accepting, so that the test's
		// next connection can only reach the new process.
		ln.Close()
	}
	report("replaced pid=%d new=%d", pid, p)
	return 0
}

// systemdWatchdog pings systemd's watchdog (WatchdogSec=) for the
// "systemd-service" role as a service should: from the moment the process is
// the main one (before that, systemd would drop its datagrams), at the
// interval SdWatchdogInterval gives, and not once the old process has begun
// to hand over to a new one (its pings would then come from a pid that is
// not the main one).
type systemdWatchdog struct {
	mu      sync.Mutex
	stopped bool
}

// run pings until stop; it does nothing without $WATCHDOG_USEC. Its first
// report says whether the process takes the watchdog as its own.
func (w *systemdWatchdog) run(n *notifier) {
	if _, ok := os.LookupEnv("WATCHDOG_USEC"); !ok {
		return
	}
	interval, enabled, err := WatchdogInterval()
	if enabled && err == nil {
		_, err = w.ping()
		if err == nil {
			// The test can look at systemd's last ping once it has the report.
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			err = n.barrier(ctx)
			cancel()
		}
	}
	report("watchdog pid=%d enabled=%t wdpid=%s err=%v", os.Getpid(), enabled, os.Getenv("WATCHDOG_PID"), err)
	if !enabled || err != nil {
		return
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for range tick.C {
		if ok, _ := w.ping(); !ok {
			return
		}
	}
}

// ping sends WATCHDOG=1 unless stop was called; ok is false if it was.
func (w *systemdWatchdog) ping() (ok bool, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return false, nil
	}
	return true, Notify("WATCHDOG=1")
}

// stop returns once no ping is being sent, and none will be.
func (w *systemdWatchdog) stop() {
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
}

// systemdLogger logs to stderr, which the unit appends to service.log,
// if the role was asked to.
func systemdLogger() *slog.Logger {
	if os.Getenv(envSystemdLog) == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
}

// systemdReloadRole is the unit's ExecReload=: it asks the service for a
// restart, prints the outcome for the unit's log, reports it, and exits 0
// on success, 1 on failure. When it removes the $SHELLFLIP_TEST_SD_STRAY
// knob it instead sends a datagram to systemd itself (it is not the main
// process, so systemd must drop it with a warning) and exits 0.
func systemdReloadRole() int {
	pid := os.Getpid()
	if takeKnob(envSystemdStray) {
		// systemd 252 gives control processes no $NOTIFY_SOCKET unless
		// NotifyAccess=all; the manager's socket is at its usual place.
		addr := os.Getenv("NOTIFY_SOCKET")
		if addr == "" {
			addr = "/run/systemd/notify"
		}
		n, err := newNotifier(addr)
		if err == nil {
			err = n.send(context.Background(), nil, "STATUS=stray")
			n.conn.Close()
		}
		report("stray pid=%d err=%v", pid, err)
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	newPid, err := RequestRestart(ctx, os.Getenv(envTestSocket))
	if err != nil {
		fmt.Printf("reload failed: %v\n", err)
		report("reloaded pid=%d new=0 err=%v", pid, err)
		return 1
	}
	fmt.Printf("reloaded: new main pid %d\n", newPid)
	report("reloaded pid=%d new=%d err=<nil>", pid, newPid)
	return 0
}

// systemdInode returns the inode of c's socket: the same number in every
// process that holds the same socket, a different one for a re-bound socket.
func systemdInode(c syscall.Conn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var st unix.Stat_t
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil {
		return 0, err
	}
	return st.Ino, os.NewSyscallError("fstat", serr)
}

// systemdNS is a systemd booted as PID 1 of private namespaces, managing
// one test unit.
type systemdNS struct {
	t       *testing.T
	sd      *systemdVersion
	dir     string // shared with the namespace: units, binaries, sockets, logs
	pid     int    // the namespaced systemd, as this process sees it
	console *systemdConsole
	reports *testReports
}

// systemdSkip skips the test unless this machine can boot a private
// systemd: which systemds it has is systemdEach's question.
func systemdSkip(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("booting systemd in private namespaces needs root; CI runs as root")
	}
	for _, tool := range []string{"unshare", "nsenter", "ip", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
}

// Where testdata/systemd/fetch254.sh unpacks systemd 254 from Debian's
// bookworm-backports: $SHELLFLIP_TEST_SYSTEMD254, or the default. A test
// that finds it missing fetches it there itself, and skips if it cannot;
// but if the variable is set, as .ci/run sets it, a systemd 254 that cannot
// be had there fails the tests that need it.
const (
	envSystemd254     = "SHELLFLIP_TEST_SYSTEMD254"
	systemd254Default = "/var/cache/shellflip-systemd254"
)

// systemdVersion is a systemd the tests boot as PID 1 of their namespaces:
// the machine's own (252 on Debian bookworm), or 254 unpacked into a folder,
// never installed over the machine's, and run with its own libsystemd-shared
// and its own systemctl.
type systemdVersion struct {
	name      string // the subtests': the major version, or what was looked for
	major     int
	systemd   string // the manager
	systemctl string
	libDir    string // LD_LIBRARY_PATH for both; "" for the machine's own
	missing   string // why it cannot be booted here; "" if it can
	required  bool   // missing fails the tests rather than skip them
}

// systemdVersions returns the systemds the suite runs under, looked for (and
// systemd 254 fetched) once per test binary.
var systemdVersions = sync.OnceValue(func() []*systemdVersion {
	return []*systemdVersion{systemdFindHost(), systemdFind254()}
})

func systemdFindHost() *systemdVersion {
	v := &systemdVersion{name: "host", systemd: "/lib/systemd/systemd"}
	ctl, err := exec.LookPath("systemctl")
	if err != nil {
		v.missing = fmt.Sprintf("the machine's systemd: %v", err)
		return v
	}
	v.systemctl = ctl
	v.identify()
	return v
}

func systemdFind254() *systemdVersion {
	dir := os.Getenv(envSystemd254)
	required := dir != ""
	if dir == "" {
		dir = systemd254Default
	}
	v := &systemdVersion{name: "254", major: 254, required: required,
		systemd:   filepath.Join(dir, "lib/systemd/systemd"),
		systemctl: filepath.Join(dir, "bin/systemctl")}
	if _, err := os.Stat(v.systemd); err != nil {
		// The script takes a lock, so that test binaries running at once
		// fetch once, and renames the folder into place when it is whole.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "/bin/sh", "testdata/systemd/fetch254.sh", dir).CombinedOutput()
		if err != nil {
			v.missing = fmt.Sprintf("systemd 254 is not in %s ($%s), and testdata/systemd/fetch254.sh could not fetch it (%v):\n%s",
				dir, envSystemd254, err, out)
			return v
		}
	}
	libs, _ := filepath.Glob(filepath.Join(dir, "usr/lib/*/systemd/libsystemd-shared-*.so"))
	if len(libs) != 1 {
		v.missing = fmt.Sprintf("%s has %d libsystemd-shared-*.so under usr/lib/*/systemd, want one; remove the folder to fetch it again", dir, len(libs))
		return v
	}
	v.libDir = filepath.Dir(libs[0])
	v.identify()
	if v.missing == "" && v.major != 254 {
		v.missing = fmt.Sprintf("%s is systemd %d, not 254", dir, v.major)
	}
	return v
}

var systemdVersionRE = regexp.MustCompile(`^systemd ([0-9]+) `)

// identify runs the manager with --version and names v after its major
// version.
func (v *systemdVersion) identify() {
	cmd := exec.Command(v.systemd, "--version")
	if v.libDir != "" {
		cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+v.libDir)
	}
	out, err := cmd.Output()
	m := systemdVersionRE.FindSubmatch(out)
	if err != nil || m == nil {
		first, _, _ := strings.Cut(string(out), "\n")
		v.missing = fmt.Sprintf("%s --version: %v %q", v.systemd, err, first)
		return
	}
	v.major, _ = strconv.Atoi(string(m[1]))
	v.name = string(m[1])
}

// systemdFor returns the systemds of the suite whose major version is at
// least min, or skips t if this machine can boot none of them, saying why.
func systemdFor(t *testing.T, min int) []*systemdVersion {
	t.Helper()
	if testing.Short() {
		t.Skip("testing.Short(): booting systemd in private namespaces")
	}
	systemdSkip(t)
	var vs []*systemdVersion
	var missing []string
	for _, v := range systemdVersions() {
		if v.major != 0 && v.major < min {
			continue
		}
		vs = append(vs, v)
		if v.missing != "" {
			v.need(t)
			missing = append(missing, v.missing)
		}
	}
	if len(missing) == len(vs) {
		t.Skipf("no systemd %d or later to boot:\n%s", min, strings.Join(missing, "\n"))
	}
	return vs
}

// need fails t if v is missing and required.
func (v *systemdVersion) need(t *testing.T) {
	t.Helper()
	if v.missing != "" && v.required {
		t.Fatalf("$%s is set, but: %s", envSystemd254, v.missing)
	}
}

// systemdEach runs f as a subtest, named by the version, under each systemd
// that systemdFor returns. A version this machine lacks skips and says why.
func systemdEach(t *testing.T, min int, f func(t *testing.T, v *systemdVersion)) {
	t.Helper()
	for _, v := range systemdFor(t, min) {
		t.Run(v.name, func(t *testing.T) {
			if v.missing != "" {
				t.Skip(v.missing)
			}
			f(t, v)
		})
	}
}

var systemdSeq atomic.Int64

// systemdBoot boots systemd version v with the test unit, whose [Service]
// section gets the extra lines ("{dir}" in them stands for the test's
// directory), and waits until systemd has finished starting up; the unit
// itself is not started. Everything it creates goes away at cleanup, on
// every path.
func systemdBoot(t *testing.T, v *systemdVersion, extra ...string) *systemdNS {
	t.Helper()
	systemdSkip(t)
	script, err := filepath.Abs("testdata/systemd/boot.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t, "sdns")
	// Copies of the test binary: the service's can be replaced, as a
	// deploy would, without touching the reload client's.
	for _, bin := range []string{"svc", "client"} {
		if err := copyExecutable(os.Args[0], filepath.Join(dir, bin)); err != nil {
			t.Fatal(err)
		}
	}
	ns := &systemdNS{t: t, sd: v, dir: dir, reports: newTestReports(t, dir)}
	ns.writeUnits(extra)

	cg, cgfd := systemdCgroup(t)
	ns.console = systemdOpenConsole(t)
	log, err := os.Create(filepath.Join(dir, "unshare.log"))
	if err != nil {
		unix.Close(cgfd)
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command("unshare", "--cgroup", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
		"--mount-proc", "--kill-child", "--", "/bin/sh", script, dir, ns.console.slavePath, systemdTarget, v.systemd, v.libDir)
	cmd.Stdout, cmd.Stderr = log, log
	// clone3(CLONE_INTO_CGROUP): unshare starts in the sub-cgroup, which
	// its --cgroup namespace then makes the root of systemd's tree.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgfd}
	err = cmd.Start()
	unix.Close(cgfd)
	if err != nil {
		t.Fatalf("starting unshare in %s: %v", cg, err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		// SIGKILL to PID 1 of the namespace kills every process in it,
		// and unshare (--kill-child) exits with it. Before systemd is
		// found, killing unshare takes its child down the same way.
		if ns.pid > 0 {
			unix.Kill(ns.pid, unix.SIGKILL)
		} else {
			cmd.Process.Kill()
		}
		select {
		case <-exited:
		case <-time.After(testDeadline):
			cmd.Process.Kill()
			t.Errorf("unshare (pid %d) did not exit after systemd was killed", cmd.Process.Pid)
		}
	})

	if _, err := ns.console.wait("Startup finished", exited); err != nil {
		b, _ := os.ReadFile(log.Name())
		t.Fatalf("systemd did not start up: %v\nconsole:\n%s\nunshare:\n%s", err, ns.console.text(), b)
	}
	// By now unshare's only child has exec'd systemd.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(b)); len(f) == 1 {
		ns.pid, _ = strconv.Atoi(f[0])
	}
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", ns.pid)); ns.pid == 0 || strings.TrimSpace(string(comm)) != "systemd" {
		t.Fatalf("unshare's children are %q, want one systemd", b)
	}
	return ns
}

func (ns *systemdNS) writeUnits(extra []string) {
	ns.t.Helper()
	units := filepath.Join(ns.dir, "units")
	if err := os.Mkdir(units, 0o755); err != nil {
		ns.t.Fatal(err)
	}
	d := ns.dir
	for i, line := range extra {
		extra[i] = strings.ReplaceAll(line, "{dir}", d)
	}
	// "$$" is a literal "$" for systemd. Type=notify without NotifyAccess=:
	// the default (main) is what the library must live with.
	service := strings.Join(append([]string{
		"[Unit]",
		"DefaultDependencies=no",
		"",
		"[Service]",
		"Type=notify",
		"ExecStart=" + d + "/svc -test.run=^$$",
		"ExecReload=/usr/bin/env " + envTestRole + "=systemd-reload " + d + "/client -test.run=^$$",
		"Environment=" + envTestRole + "=systemd-service " + envTestReport + "=" + ns.reports.path +
			" " + envTestSocket + "=" + d + "/ctl.sock " + envSystemdListen + "=" + d + "/hello.sock" +
			" " + envSystemdStray + "=" + d + "/stray",
		// A race-enabled binary sleeps 1 s on exit (GORACE's
		// atexit_sleep_ms), which every reload would wait for.
		"Environment=\"" + goraceEnv() + "\" " + envSystemdLog + "=1",
		"StandardOutput=append:" + d + "/service.log",
		"StandardError=inherit",
		"TimeoutSec=20", // fail before systemctl's own deadline (testDeadline)
	}, extra...), "\n") + "\n"
	target := "[Unit]\nDefaultDependencies=no\n"
	for name, text := range map[string]string{systemdUnit: service, systemdTarget: target} {
		if err := os.WriteFile(filepath.Join(units, name), []byte(text), 0o644); err != nil {
			ns.t.Fatal(err)
		}
	}
}

// systemdCgroup creates a sub-cgroup of this machine's cgroup2 hierarchy
// (/sys/fs/cgroup on a pure cgroup2 host, /sys/fs/cgroup/unified on a
// hybrid one) and returns its path and an fd for CLONE_INTO_CGROUP. The
// cgroup and whatever systemd created below it are removed at cleanup.
func systemdCgroup(t *testing.T) (string, int) {
	t.Helper()
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
		root = "/sys/fs/cgroup/unified"
		if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err != nil {
			t.Skip("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
		}
	}
	path := filepath.Join(root, fmt.Sprintf("shellflip-test-%d-%d", os.Getpid(), systemdSeq.Add(1)))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { systemdRemoveCgroup(t, path) })
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return path, fd
}

// systemdRemoveCgroup removes path and the cgroups below it, children first.
func systemdRemoveCgroup(t *testing.T, path string) {
	t.Helper()
	var dirs []string
	filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	// WalkDir visits a directory before what is below it.
	slices.Reverse(dirs)
	for _, d := range dirs {
		err := unix.Rmdir(d)
		if err == unix.EBUSY {
			// Still populated: the last processes are on their way out.
			systemdWaitUnpopulated(t, d)
			err = unix.Rmdir(d)
		}
		if err != nil {
			t.Errorf("removing cgroup %s: %v", d, err)
		}
	}
}

// systemdWaitUnpopulated waits until cgroup.events says "populated 0". The
// kernel signals a change of that file with POLLPRI.
func systemdWaitUnpopulated(t *testing.T, cg string) {
	f, err := os.Open(filepath.Join(cg, "cgroup.events"))
	if err != nil {
		return
	}
	defer f.Close()
	deadline := time.Now().Add(testDeadline)
	for {
		b := make([]byte, 512)
		n, _ := f.ReadAt(b, 0)
		if strings.Contains(string(b[:n]), "populated 0") {
			return
		}
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			t.Errorf("cgroup %s still populated: %s", cg, b[:n])
			return
		}
		rc, err := f.SyscallConn()
		if err != nil {
			return
		}
		rc.Control(func(fd uintptr) {
			unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}, ms)
		})
	}
}

// systemdConsole is the master side of the pty that the namespaced systemd
// has as /dev/console: everything it logs.
type systemdConsole struct {
	master    *os.File
	slave     int // held open, so that the master does not see a hang-up before systemd opens the slave
	slavePath string

	mu      sync.Mutex
	buf     []byte
	changed chan struct{} // closed and replaced whenever buf grows or the reader ends
	ended   bool
}

func systemdOpenConsole(t *testing.T) *systemdConsole {
	t.Helper()
	m, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pty for systemd's console: %v", err)
	}
	if err := unix.IoctlSetPointerInt(m, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(m)
		t.Fatal(os.NewSyscallError("ioctl TIOCSPTLCK", err))
	}
	n, err := unix.IoctlGetInt(m, unix.TIOCGPTN)
	if err != nil {
		unix.Close(m)
		t.Fatal(os.NewSyscallError("ioctl TIOCGPTN", err))
	}
	c := &systemdConsole{slavePath: "/dev/pts/" + strconv.Itoa(n), changed: make(chan struct{})}
	c.slave, err = unix.Open(c.slavePath, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(m)
		t.Fatal(err)
	}
	// Non-blocking, so that the poller serves the master and Close ends
	// a pending Read.
	unix.SetNonblock(m, true)
	c.master = os.NewFile(uintptr(m), "ptmx")
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 4096)
		for {
			n, err := c.master.Read(b)
			c.mu.Lock()
			c.buf = append(c.buf, strings.ReplaceAll(string(b[:n]), "\r", "")...)
			c.ended = err != nil
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		c.master.Close()
		<-done
		unix.Close(c.slave)
		if t.Failed() {
			t.Logf("systemd's console:\n%s", c.text())
		}
	})
	return c
}

func (c *systemdConsole) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}

// wait returns the first line that contains s, waiting for it until the
// deadline, or until stop is closed.
func (c *systemdConsole) wait(s string, stop <-chan struct{}) (string, error) {
	var found string
	err := c.await(s, stop, func(text string) bool {
		for _, line := range strings.Split(text, "\n") {
			if strings.Contains(line, s) {
				found = line
				return true
			}
		}
		return false
	})
	return found, err
}

// await waits until done says yes to all the console has shown, until the
// deadline, or until stop is closed; what names what it waits for, for
// errors.
func (c *systemdConsole) await(what string, stop <-chan struct{}, done func(text string) bool) error {
	timer := time.NewTimer(testDeadline)
	defer timer.Stop()
	for {
		c.mu.Lock()
		text, changed, ended := string(c.buf), c.changed, c.ended
		c.mu.Unlock()
		if done(text) {
			return nil
		}
		if ended {
			return fmt.Errorf("console closed before %q", what)
		}
		select {
		case <-changed:
		case <-stop:
			return fmt.Errorf("stopped waiting for %q", what)
		case <-timer.C:
			return fmt.Errorf("no %q on the console within %v", what, testDeadline)
		}
	}
}

// lines returns the console lines that contain s.
func (c *systemdConsole) lines(s string) []string {
	var out []string
	for _, line := range strings.Split(c.text(), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return out
}

// rootPath is the path of path in the namespace's mounts: under the
// namespaced systemd's root, /run is the namespace's private tmpfs and
// /proc the pid namespace's own.
func (ns *systemdNS) rootPath(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", ns.pid, path)
}

// addUnits installs units (and drop-ins: "name.d/file.conf"), by path
// under /run/systemd/system, and makes systemd read them. boot.sh copied
// the units that were there at boot into the namespace's private /run;
// these go there too, through systemd's root.
func (ns *systemdNS) addUnits(units map[string]string) {
	ns.t.Helper()
	run := ns.rootPath("/run/systemd/system")
	for name, text := range units {
		path := filepath.Join(run, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			ns.t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			ns.t.Fatal(err)
		}
	}
	ns.mustSystemctl("daemon-reload")
}

// systemctl runs systemctl in the namespaces and returns its output.
func (ns *systemdNS) systemctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	argv := []string{"-t", strconv.Itoa(ns.pid), "-m", "-p", "-u", "-i", "-n", "--"}
	if ns.sd.libDir != "" {
		argv = append(argv, "env", "LD_LIBRARY_PATH="+ns.sd.libDir)
	}
	argv = append(argv, ns.sd.systemctl, "--no-pager", "--no-ask-password")
	cmd := exec.CommandContext(ctx, "nsenter", append(argv, args...)...)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0")
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (ns *systemdNS) mustSystemctl(args ...string) string {
	ns.t.Helper()
	out, err := ns.systemctl(args...)
	if err != nil {
		ns.t.Fatalf("systemctl %s: %v\n%s%s", strings.Join(args, " "), err, out, ns.serviceLog())
	}
	return out
}

// props returns properties of unit, by name.
func (ns *systemdNS) props(unit string, names ...string) map[string]string {
	ns.t.Helper()
	out := ns.mustSystemctl("show", "--property="+strings.Join(names, ","), unit)
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m[k] = v
		}
	}
	return m
}

// systemdWatchdogTimeout is the WatchdogSec= of the watchdog tests, and
// systemdWatchdogHold how long they watch a unit after a reload: more than
// two watchdog timeouts, after the old process's last ping.
const (
	systemdWatchdogTimeout = 3 * time.Second
	systemdWatchdogHold    = 8 * time.Second
)

// waitWatchdogPing waits until systemd has had a watchdog ping for unit
// later than after (CLOCK_MONOTONIC, in µs), and fails the test if systemd
// logs a watchdog timeout first.
func (ns *systemdNS) waitWatchdogPing(unit string, after int64, who string) {
	ns.t.Helper()
	waitUntil(ns.t, func() string {
		if l := ns.console.lines(unit + ": Watchdog timeout"); len(l) > 0 {
			ns.t.Fatalf("%s sent no WATCHDOG=1 before the watchdog fired: %s", who, l[0])
		}
		if ts, _ := strconv.ParseInt(ns.show(unit, "WatchdogTimestampMonotonic"), 10, 64); ts <= after {
			return who + " sent no WATCHDOG=1"
		}
		return ""
	})
}

// holdWatchdog checks that unit, whose main process pid became the main
// process at since (CLOCK_MONOTONIC, in µs), stays alive for
// systemdWatchdogHold: systemd logs no watchdog timeout meanwhile, and then
// the unit is active, pid is still its main process, its Result is success
// without a restart, and its last watchdog ping is later than since, so from
// pid. The fixed wait is the point: the test is that nothing happens.
func (ns *systemdNS) holdWatchdog(unit, pid string, since int64) {
	ns.t.Helper()
	held := make(chan struct{})
	timer := time.AfterFunc(systemdWatchdogHold, func() { close(held) })
	defer timer.Stop()
	line, err := ns.console.wait(unit+": Watchdog timeout", held)
	if err == nil {
		ns.t.Fatalf("the watchdog fired with main process %s: %s", pid, line)
	}
	select {
	case <-held:
	default:
		ns.t.Fatalf("watching the console for a watchdog timeout: %v", err)
	}
	p := ns.props(unit, "ActiveState", "SubState", "MainPID", "Result", "NRestarts", "WatchdogTimestampMonotonic")
	if got := p["ActiveState"] + "/" + p["SubState"]; got != "active/running" {
		ns.t.Errorf("%s is %s %v after a reload, want active/running", unit, got, systemdWatchdogHold)
	}
	if p["MainPID"] != pid || p["Result"] != "success" || p["NRestarts"] != "0" {
		ns.t.Errorf("%s has MainPID=%s Result=%s NRestarts=%s %v after a reload, want MainPID=%s Result=success NRestarts=0",
			unit, p["MainPID"], p["Result"], p["NRestarts"], systemdWatchdogHold, pid)
	}
	if ts, _ := strconv.ParseInt(p["WatchdogTimestampMonotonic"], 10, 64); ts <= since {
		ns.t.Errorf("%s's last watchdog ping is from %d µs, not after the reload (%d µs): main process %s does not ping",
			unit, ts, since, pid)
	}
}

// show returns a property of unit.
func (ns *systemdNS) show(unit, prop string) string {
	ns.t.Helper()
	return ns.mustSystemctl("show", "--property="+prop, "--value", unit)
}

// state returns unit's ActiveState/SubState.
func (ns *systemdNS) state(unit string) string {
	ns.t.Helper()
	return ns.show(unit, "ActiveState") + "/" + ns.show(unit, "SubState")
}

// waitShow waits until a property of unit has the value want.
func (ns *systemdNS) waitShow(unit, prop, want string) {
	ns.t.Helper()
	waitUntil(ns.t, func() string {
		if got := ns.show(unit, prop); got != want {
			return fmt.Sprintf("%s of %s is %s, want %s", prop, unit, got, want)
		}
		return ""
	})
}

// serviceLog returns what the unit's processes printed, for failure
// messages.
func (ns *systemdNS) serviceLog() string {
	b, _ := os.ReadFile(filepath.Join(ns.dir, "service.log"))
	if len(b) == 0 {
		return ""
	}
	return "\nservice output:\n" + string(b)
}

// systemctlAsync runs systemctl in the background, so that the caller can
// read the reports meanwhile: a datagram socket queues only
// net.unix.max_dgram_qlen (10) unread datagrams, and a role blocked on a
// report would stall the very restart systemctl waits for. The returned
// function waits for systemctl (bounded by its own deadline).
func (ns *systemdNS) systemctlAsync(args ...string) (wait func() (string, error)) {
	type result struct {
		out string
		err error
	}
	ch := make(chan result, 1)
	go func() {
		out, err := ns.systemctl(args...)
		ch <- result{out, err}
	}()
	return func() (string, error) {
		r := <-ch
		return r.out, r.err
	}
}

// mustWait fails the test if the systemctl command behind wait failed.
func (ns *systemdNS) mustWait(what string, wait func() (string, error)) string {
	ns.t.Helper()
	out, err := wait()
	if err != nil {
		ns.t.Fatalf("systemctl %s: %v\n%s%s", what, err, out, ns.serviceLog())
	}
	return out
}

// start starts the unit and checks that its first process is running,
// main and serving. It returns that process's pid.
func (ns *systemdNS) start() string {
	ns.t.Helper()
	wait := ns.systemctlAsync("start", systemdUnit)
	st := ns.reports.next("started")
	if st["restarted"] != "false" {
		ns.t.Errorf("the first process says restarted=%s", st["restarted"])
	}
	pid := ns.reports.next("ready")["pid"]
	if pid != st["pid"] {
		ns.t.Fatalf("started %s, but %s became ready", st["pid"], pid)
	}
	ns.mustWait("start", wait)
	ns.checkMain(pid, "0")
	return pid
}

// reload runs `systemctl reload`, expects it to succeed, and follows the
// handover from old to the new process in the reports. It returns the new
// process's pid after checking that systemd knows it as the main pid.
func (ns *systemdNS) reload(old, gen string) string {
	ns.t.Helper()
	wait := ns.systemctlAsync("reload", systemdUnit)
	rel := ns.reports.next("reloaded")
	pid := rel["new"]
	if rel["err"] != "<nil>" || pid == "0" {
		ns.t.Fatalf("the reload client reported %v%s", rel, ns.serviceLog())
	}
	ns.followRestart(old, pid)
	ns.mustWait("reload", wait)
	ns.checkMain(pid, gen)
	return pid
}

// followRestart checks the reports of a restart from old to pid that
// succeeded.
func (ns *systemdNS) followRestart(old, pid string) {
	ns.t.Helper()
	r := ns.reports
	if st := r.next("started"); st["pid"] != pid || st["restarted"] != "true" {
		ns.t.Fatalf("RequestRestart returned %s, but %v started", pid, st)
	}
	if early := r.next("early"); !strings.Contains(early["err"], ErrNotMain.Error()) {
		ns.t.Errorf("a new process's Send before Ready returned %q, want ErrNotMain", early["err"])
	}
	if ready := r.next("ready"); ready["pid"] != pid {
		ns.t.Fatalf("RequestRestart returned %s, but %s became ready", pid, ready["pid"])
	}
	if repl := r.next("replaced"); repl["pid"] != old || repl["new"] != pid {
		ns.t.Fatalf("old process reported %v, want pid=%s new=%s", repl, old, pid)
	}
}

// checkMain checks that systemd knows pid as the unit's main process, the
// unit is active, the process's own datagram was accepted, and the process
// answers on the unit's socket as generation gen.
func (ns *systemdNS) checkMain(pid, gen string) {
	ns.t.Helper()
	if m := ns.reports.next("main"); m["pid"] != pid || m["err"] != "<nil>" {
		ns.t.Fatalf("main report %v, want pid=%s err=<nil>", m, pid)
	}
	if got := ns.show(systemdUnit, "MainPID"); got != pid {
		ns.t.Errorf("MainPID=%s, want %s", got, pid)
	}
	if got := ns.state(systemdUnit); got != "active/running" {
		ns.t.Errorf("unit is %s, want active/running", got)
	}
	if got, want := ns.show(systemdUnit, "StatusText"), "main pid="+pid; got != want {
		ns.t.Errorf("StatusText=%q, want %q: systemd did not take the main process's datagram", got, want)
	}
	h := dialHello(ns.t, "unix", filepath.Join(ns.dir, "hello.sock"))
	if h["pid"] != pid || h["gen"] != gen {
		ns.t.Errorf("the unit's socket answered %v, want pid=%s gen=%s", h, pid, gen)
	}
}

// checkNoWarnings checks that systemd dropped no datagram from a pid other
// than the main one. It first sends a datagram of its own to systemd's
// notify socket, from outside the namespace, so with no pid systemd can
// see, and waits for systemd to log that it ignored it: systemd reads the
// socket in order, so by then it has logged whatever it had to say about
// every datagram sent before, by any process.
func (ns *systemdNS) checkNoWarnings() {
	ns.t.Helper()
	const ignored = "Received notify message without valid credentials"
	before := strings.Count(ns.console.text(), ignored)
	n, err := newNotifier(ns.rootPath("/run/systemd/notify"))
	if err != nil {
		ns.t.Fatal(err)
	}
	err = n.send(context.Background(), nil, "STATUS=flush")
	n.conn.Close()
	if err != nil {
		ns.t.Fatal(err)
	}
	if err := ns.console.await(ignored, nil, func(text string) bool { return strings.Count(text, ignored) > before }); err != nil {
		ns.t.Fatal(err)
	}
	if w := ns.console.lines(systemdNotMainWarning); len(w) > 0 {
		ns.t.Errorf("systemd dropped notifications from non-main pids:\n%s", strings.Join(w, "\n"))
	}
}

// systemdInstall puts a copy of src at dst as a deploy would: a new file
// renamed over the old one, which a running process may still be executing.
func systemdInstall(t *testing.T, src, dst string) {
	t.Helper()
	if err := copyExecutable(src, dst+".new"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dst+".new", dst); err != nil {
		t.Fatal(err)
	}
}

// TestSystemdReloadFollowsMainPID: a Type=notify unit with the default
// NotifyAccess (main) and ExecReload= calling RequestRestart. Every reload
// succeeds, MainPID follows the new process, the unit stays active, the new
// process's own datagrams are accepted, and systemd never drops a datagram
// from a non-main pid. A datagram that is from a non-main pid, sent on
// purpose at the end, is logged: the console does show such warnings. And
// systemd notices when the last new process, not its child, is killed.
func TestSystemdReloadFollowsMainPID(t *testing.T) {
	systemdEach(t, 0, systemdTestReloadFollowsMainPID)
}

func systemdTestReloadFollowsMainPID(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v)
	if got := ns.show(systemdUnit, "NotifyAccess"); got != "main" {
		t.Errorf("NotifyAccess=%s, want systemd's default for Type=notify, main", got)
	}
	pid := ns.start()
	for gen := 1; gen <= 3; gen++ {
		pid = ns.reload(pid, strconv.Itoa(gen))
	}
	ns.checkNoWarnings()

	// The positive control, which also flushes the log: systemd handles
	// datagrams in order, so once it has logged this one it has handled
	// every earlier one, including anything the old processes sent
	// before they exited.
	if err := os.WriteFile(filepath.Join(ns.dir, "stray"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ns.mustSystemctl("reload", systemdUnit)
	stray := ns.reports.next("stray")
	if stray["err"] != "<nil>" {
		t.Fatalf("the stray datagram was not sent: %v", stray)
	}
	want := "Got notification message from PID " + stray["pid"] + ", " + systemdNotMainWarning + " " + pid
	if _, err := ns.console.wait(want, nil); err != nil {
		t.Fatalf("the stray datagram was not reported: %v", err)
	}
	if w := ns.console.lines(systemdNotMainWarning); len(w) != 1 {
		t.Errorf("want only the stray datagram dropped, got:\n%s", strings.Join(w, "\n"))
	}
	if got := ns.show(systemdUnit, "MainPID"); got != pid {
		t.Errorf("MainPID=%s after the stray datagram, want %s", got, pid)
	}

	// systemd warned that it supervises a process that is not its child;
	// it does notice when that process dies.
	ns.mustSystemctl("kill", "--kill-who=main", "--signal=SIGKILL", systemdUnit)
	if _, err := ns.console.wait("Main process exited, code=killed", nil); err != nil {
		t.Fatalf("systemd did not notice that main process %s was killed: %v", pid, err)
	}
	if got := ns.show(systemdUnit, "Result"); got != "signal" {
		t.Errorf("Result=%s after the main process was killed, want signal", got)
	}
}

// TestSystemdReloadWithBrokenBinary: a reload after a bad deploy (the
// service's binary replaced by one that exits at once) fails, and says why;
// the old process stays the main process and keeps serving, and a reload
// after the good binary is back succeeds.
func TestSystemdReloadWithBrokenBinary(t *testing.T) {
	systemdEach(t, 0, systemdTestReloadWithBrokenBinary)
}

func systemdTestReloadWithBrokenBinary(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v)
	old := ns.start()
	svc := filepath.Join(ns.dir, "svc")
	systemdInstall(t, "/bin/false", svc)

	wait := ns.systemctlAsync("reload", systemdUnit)
	rel := ns.reports.next("reloaded")
	// Most often "exited before it was ready (exit status 1)"; "sending
	// state: ... broken pipe (exit status 1)" when false exits before the
	// old process has written the state.
	if !strings.HasPrefix(rel["err"], "new process ") || !strings.HasSuffix(rel["err"], "(exit status 1)") {
		t.Errorf("the reload client reported %v, want a new process that exited with status 1", rel)
	}
	if out, err := wait(); err == nil {
		t.Errorf("systemctl reload succeeded with a broken binary:\n%s", out)
	}
	if !strings.Contains(ns.serviceLog(), "reload failed: "+rel["err"]) {
		t.Errorf("the reload client's explanation is not in the unit's output:%s", ns.serviceLog())
	}
	if got := ns.show(systemdUnit, "ReloadResult"); got != "exit-code" {
		t.Errorf("ReloadResult=%s, want exit-code", got)
	}
	if got := ns.show(systemdUnit, "MainPID"); got != old {
		t.Errorf("MainPID=%s after a failed reload, want the old process %s", got, old)
	}
	if got := ns.state(systemdUnit); got != "active/running" {
		t.Errorf("unit is %s after a failed reload, want active/running", got)
	}
	if h := dialHello(t, "unix", filepath.Join(ns.dir, "hello.sock")); h["pid"] != old || h["gen"] != "0" {
		t.Errorf("after a failed reload the unit's socket answered %v, want pid=%s gen=0", h, old)
	}

	systemdInstall(t, os.Args[0], svc)
	ns.reload(old, "1")
	ns.checkNoWarnings()
}

// TestSystemdFDStoreSurvivesRestart: a listener pushed to systemd's fd store
// (FileDescriptorStoreMax=) reaches the process that `systemctl restart`
// starts, under its name, and it is the same socket, not a new bind: the
// first process never accepts, and a connection queued in the backlog
// before the restart is accepted by the second.
func TestSystemdFDStoreSurvivesRestart(t *testing.T) {
	systemdEach(t, 0, systemdTestFDStoreSurvivesRestart)
}

func systemdTestFDStoreSurvivesRestart(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v,
		"FileDescriptorStoreMax=16",
		"Environment="+envSystemdStore+"=1 "+envSystemdAccept+"=inherited")
	r0, queued := ns.startStoring()
	// StoreFDs sent FDSTORE=1 before READY=1, and systemd handles the
	// datagrams in order: by the time start returned, the fd was stored.
	if got := ns.show(systemdUnit, "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	ns.checkGetsStored("restart", r0, queued)
	// The second process stored the same socket again; systemd keeps one.
	if got := ns.show(systemdUnit, "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the second StoreFDs, want 1", got)
	}
	ns.checkNoWarnings()
}

// TestSystemdPIDFileReload: with PIDFile= in the unit, systemd re-reads the
// file after every successful ExecReload= and takes the pid in it as the
// main pid; the file must name the new process by then, or systemd would go
// back to the old one, which is about to exit.
func TestSystemdPIDFileReload(t *testing.T) { systemdEach(t, 0, systemdTestPIDFileReload) }

func systemdTestPIDFileReload(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v, "PIDFile={dir}/svc.pid", "Environment="+envSystemdPIDFile+"={dir}/svc.pid")
	pidFile := filepath.Join(ns.dir, "svc.pid")
	pid := ns.start()
	if got := readPIDFile(t, pidFile); got != pid {
		t.Errorf("pid file holds %s, want %s", got, pid)
	}
	for gen := 1; gen <= 3; gen++ {
		pid = ns.reload(pid, strconv.Itoa(gen))
		if got := readPIDFile(t, pidFile); got != pid {
			t.Errorf("after reload %d the pid file holds %s, want %s", gen, got, pid)
		}
	}
	ns.checkNoWarnings()
}

// TestSystemdWatchdogAcrossReload: with WatchdogSec=3, the process a reload
// made the main one keeps the unit alive, under each systemd: the test
// service, and examples/httpd under its shipped units. Each first process
// pings; after a reload the unit is still active with the new main process
// and Result=success 8 s later, with no watchdog timeout logged and a last
// ping from after the reload. systemd gives WATCHDOG_PID=<main pid> to the
// process it starts, and a new process that inherits it unchanged takes the
// watchdog as its old process's (sd_watchdog_enabled(3)): it has to be told
// its own pid, as with LISTEN_PID.
func TestSystemdWatchdogAcrossReload(t *testing.T) {
	systemdFor(t, 0)
	bin := buildExample(t, "httpd")
	systemdEach(t, 0, func(t *testing.T, v *systemdVersion) {
		// Most of each is the hold: side by side.
		t.Run("service", func(t *testing.T) {
			t.Parallel()
			systemdTestWatchdog(t, v)
		})
		t.Run("httpd", func(t *testing.T) {
			t.Parallel()
			sdhttpdTestWatchdog(t, v, bin)
		})
	})
}

func systemdTestWatchdog(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v, fmt.Sprintf("WatchdogSec=%d", systemdWatchdogTimeout/time.Second))
	pid := ns.start()
	// The unit's WatchdogUSec is infinity until a start sets it.
	if got, want := ns.show(systemdUnit, "WatchdogUSec"), systemdWatchdogTimeout.String(); got != want {
		t.Fatalf("WatchdogUSec=%s, want %s", got, want)
	}
	ns.checkWatchdogReport(pid)
	// READY=1 and the first ping are behind; the next ping is the ticker's.
	ns.waitWatchdogPing(systemdUnit, sdMonotonicUsec(t), "the first process, "+pid+",")

	pid = ns.reload(pid, "1")
	since := sdMonotonicUsec(t)
	ns.checkWatchdogReport(pid)
	ns.holdWatchdog(systemdUnit, pid, since)
	if h := dialHello(t, "unix", filepath.Join(ns.dir, "hello.sock")); h["pid"] != pid {
		t.Errorf("the unit's socket answered %v, want pid=%s", h, pid)
	}
	ns.checkNoWarnings()
}

// checkWatchdogReport checks that process pid, once main, took systemd's
// watchdog as its own and pinged it.
func (ns *systemdNS) checkWatchdogReport(pid string) {
	ns.t.Helper()
	w := ns.reports.next("watchdog")
	if w["pid"] != pid || w["enabled"] != "true" || w["err"] != "<nil>" {
		ns.t.Errorf("watchdog report %v, want pid=%s enabled=true err=<nil> (WATCHDOG_PID must be the process's own pid)", w, pid)
	}
}

// TestSystemdFDStorePreserve: with FileDescriptorStorePreserve=yes (systemd
// 254 and later), the fd store outlives the service's processes: after
// `systemctl stop` the unit is inactive with its resources pinned and the
// listener in the store, and the process that `systemctl start` starts
// gets the same socket (its inode), with the connection queued in its
// backlog before the stop.
//
// "Until the unit is removed from memory" (systemd.service(5)): a unit that
// nothing references is collected once it is stopped, fd store and all
// (seen here: "Changed stop-sigterm -> dead-resources-pinned", then
// "Collecting."). An installed service is wanted by an active target, which
// holds it; here the test's target is given a Wants= once it is active, so
// that the service is referenced without being started with the target.
func TestSystemdFDStorePreserve(t *testing.T) { systemdEach(t, 254, systemdTestFDStorePreserve) }

func systemdTestFDStorePreserve(t *testing.T, v *systemdVersion) {
	ns := systemdBoot(t, v,
		"FileDescriptorStoreMax=16",
		"FileDescriptorStorePreserve=yes",
		"Environment="+envSystemdStore+"=1 "+envSystemdAccept+"=inherited")
	ns.addUnits(map[string]string{systemdTarget + ".d/wants.conf": "[Unit]\nWants=" + systemdUnit + "\n"})
	if got := ns.show(systemdUnit, "ActiveState"); got != "inactive" {
		t.Fatalf("the unit is %s once the target wants it, want inactive until the test starts it", got)
	}
	r0, queued := ns.startStoring()
	ns.mustSystemctl("stop", systemdUnit)
	if got := ns.state(systemdUnit); got != "inactive/dead-resources-pinned" {
		t.Errorf("after the stop the unit is %s, want inactive/dead-resources-pinned", got)
	}
	if got := ns.show(systemdUnit, "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the stop, want 1", got)
	}

	ns.checkGetsStored("start", r0, queued)
	ns.checkNoWarnings()
}

// startStoring starts the test unit, whose processes keep their listener
// in systemd's fd store (envSystemdStore) and accept only on one they
// inherited (envSystemdAccept). It returns the first process's ready
// report, and a connection that waits in the backlog of its listener.
func (ns *systemdNS) startStoring() (r0 map[string]string, queued net.Conn) {
	ns.t.Helper()
	wait := ns.systemctlAsync("start", systemdUnit)
	if first := ns.reports.next("started"); first["names"] != "" {
		ns.t.Errorf("a fresh start inherited %q", first["names"])
	}
	r0 = ns.reports.next("ready")
	ns.mustWait("start", wait)
	if r0["inherited"] != "false" {
		ns.t.Fatalf("the first process reports %v, want a listener of its own", r0)
	}
	queued, err := net.DialTimeout("unix", filepath.Join(ns.dir, "hello.sock"), testDeadline)
	if err != nil {
		ns.t.Fatal(err)
	}
	ns.t.Cleanup(func() { queued.Close() })
	return r0, queued
}

// checkGetsStored runs `systemctl verb` (restart, or start after a stop)
// and checks that the process systemd starts is given the stored socket of
// the first one, r0: under its name, the same socket (inode), and with the
// connection queued in its backlog, which it answers as the main process.
func (ns *systemdNS) checkGetsStored(verb string, r0 map[string]string, queued net.Conn) {
	ns.t.Helper()
	name := ListenerName("unix", filepath.Join(ns.dir, "hello.sock"))
	wait := ns.systemctlAsync(verb, systemdUnit)
	if st := ns.reports.next("started"); st["restarted"] != "false" || st["names"] != name {
		ns.t.Errorf("the process systemd started reports %v, want restarted=false names=%s", st, name)
	}
	r1 := ns.reports.next("ready")
	ns.mustWait(verb, wait)
	if r1["pid"] == r0["pid"] || r1["inherited"] != "true" || r1["ino"] != r0["ino"] {
		ns.t.Errorf("after systemctl %s: %v; before: %v; want a new pid serving the same socket (ino)", verb, r1, r0)
	}
	if h := readHello(ns.t, queued); h["pid"] != r1["pid"] {
		ns.t.Errorf("the connection queued before systemctl %s was answered by %v, want pid=%s", verb, h, r1["pid"])
	}
	if got := ns.show(systemdUnit, "MainPID"); got != r1["pid"] {
		ns.t.Errorf("MainPID=%s, want %s", got, r1["pid"])
	}
}

// systemdListenNotify plays systemd's notify socket for tests that need no
// systemd: a listener with SO_PASSCRED, so that every datagram comes with
// its sender's pid, as systemd receives them.
func systemdListenNotify(t *testing.T) *sdListener {
	t.Helper()
	l := sdListen(t, false)
	l.passCred(t)
	return l
}

// systemdAnnounced follows a "systemd-service" process's datagrams once it
// is the main process: STATUS=main pid=N and a barrier, which the test
// releases.
func systemdAnnounced(t *testing.T, rec *sdListener, reports *testReports, pid int) {
	t.Helper()
	rec.expect(t, pid, "STATUS=main pid="+strconv.Itoa(pid))
	unix.Close(rec.recvBarrier(t, pid))
	if m := reports.next("main"); m["pid"] != strconv.Itoa(pid) || m["err"] != "<nil>" {
		t.Fatalf("main report %v, want pid=%d err=<nil>", m, pid)
	}
}

var systemdReloadingRE = regexp.MustCompile(`^RELOADING=1\nMONOTONIC_USEC=([0-9]+)$`)

// systemdStartNotified starts generation 0 of a "systemd-service"
// cluster whose notify socket is rec, and follows its first datagrams.
func systemdStartNotified(t *testing.T, c *testCluster, rec *sdListener, env ...string) int {
	t.Helper()
	r0 := c.start("systemd-service", append([]string{"NOTIFY_SOCKET=" + rec.addr}, env...)...)
	pid, _ := strconv.Atoi(r0["pid"])
	rec.expect(t, pid, "READY=1") // a fresh start announces itself
	systemdAnnounced(t, rec, c.reports, pid)
	return pid
}

// systemdSighup sends the reload signal to old and checks the datagram that
// opens a Type=notify-reload reload: RELOADING=1 with MONOTONIC_USEC read
// between the signal and its arrival. It returns the pid of the new process
// the restart started, once that process reported its refused Send.
func systemdSighup(t *testing.T, c *testCluster, rec *sdListener, old int) int {
	t.Helper()
	before := sdMonotonicUsec(t)
	if err := unix.Kill(old, unix.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d, _ := rec.recvMsg(t, true)
	after := sdMonotonicUsec(t)
	sdCloseFDs(d.fds)
	m := systemdReloadingRE.FindStringSubmatch(d.text)
	if d.pid != old || m == nil || len(d.fds) != 0 {
		t.Fatalf("got %q from pid %d with %d fds, want RELOADING=1 and MONOTONIC_USEC from pid %d", d.text, d.pid, len(d.fds), old)
	}
	if usec, _ := strconv.ParseInt(m[1], 10, 64); usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC=%d, want it between %d and %d, around the signal", usec, before, after)
	}
	st := c.nextNew("started")
	pid, _ := strconv.Atoi(st["pid"])
	if early := c.reports.next("early"); early["pid"] != st["pid"] || !strings.Contains(early["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send before Ready: %v, want ErrNotMain", early)
	}
	return pid
}

// systemdHandOver follows the datagrams of a successful handover from old
// to pid while the test holds the barrier: MAINPID and READY=1 from old in
// one datagram, a barrier from old, and nothing from pid until the barrier
// is released. release runs while the barrier is held.
func systemdHandOver(t *testing.T, c *testCluster, rec *sdListener, old, pid int, release func()) {
	t.Helper()
	rec.expect(t, old, fmt.Sprintf("MAINPID=%d\nSTATUS=", pid))
	fd := rec.recvBarrier(t, old)
	closed := false
	defer func() {
		if !closed {
			unix.Close(fd)
		}
	}()
	rec.expectNone(t) // while the barrier is held
	if release != nil {
		release()
	}
	unix.Close(fd)
	closed = true
	// Once the old process made it main, the new one ends the restart (or
	// reload) with READY=1, and its Start returns.
	rec.expect(t, pid, "READY=1")
	if ready := c.reports.next("ready"); ready["pid"] != strconv.Itoa(pid) {
		t.Fatalf("ready report %v, want pid=%d", ready, pid)
	}
	if repl := c.reports.next("replaced"); repl["pid"] != strconv.Itoa(old) || repl["new"] != strconv.Itoa(pid) {
		t.Fatalf("old process reported %v, want pid=%d new=%d", repl, old, pid)
	}
	systemdAnnounced(t, rec, c.reports, pid)
}

// TestSystemdNotifyReloadDatagrams: the datagrams a Type=notify-reload unit
// sees, checked against a notify socket of the test's, which shows their
// exact text and order where systemd (254, in TestSystemdHTTPD) only shows
// the outcome; and it needs no systemd at all. On the reload signal: RELOADING=1 with
// MONOTONIC_USEC, then from the old process MAINPID=new and READY=1 in one
// datagram, then a barrier, and nothing from the new process before the
// barrier is released. A restart that fails ends the reload with READY=1
// and a STATUS that says why, and the old process keeps serving.
func TestSystemdNotifyReloadDatagrams(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t)
	knob := filepath.Join(c.dir, "fail")
	hello := filepath.Join(c.dir, "hello.sock")
	p0 := systemdStartNotified(t, c, rec, envSystemdNotifyReload+"=1", envTestFailFile+"="+knob, envSystemdListen+"="+hello)

	p1 := systemdSighup(t, c, rec, p0)
	systemdHandOver(t, c, rec, p0, p1, nil)

	// A bad deploy: the next new process exits before Ready.
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	bad := systemdSighup(t, c, rec, p1)
	want := fmt.Sprintf("READY=1\nSTATUS=restart failed: new process %d: exited before it was ready (exit status 3)", bad)
	rec.expect(t, p1, want)
	waitGone(t, bad)
	rec.expectNone(t)
	if h := dialHello(t, "unix", hello); h["pid"] != strconv.Itoa(p1) {
		t.Errorf("after a failed restart the socket answered %v, want pid=%d", h, p1)
	}

	p2 := systemdSighup(t, c, rec, p1)
	systemdHandOver(t, c, rec, p1, p2, nil)
	if h := dialHello(t, "unix", hello); h["pid"] != strconv.Itoa(p2) || h["gen"] != "2" {
		t.Errorf("the socket answered %v, want pid=%d gen=2", h, p2)
	}
}

// TestSystemdNotifyReloadDuringRestart: a reload signal that arrives while
// a restart requested on the control socket is in flight opens a reload
// all the same (systemd waits for RELOADING=1 after each signal), and the
// restart's failure ends it with READY=1 even when its reason would not
// fit in a datagram: the STATUS is cut to 1024 bytes.
func TestSystemdNotifyReloadDuringRestart(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t)
	fifo := makeFIFO(t, c.dir, "prespawn")
	p0 := systemdStartNotified(t, c, rec, envSystemdNotifyReload+"=1", envSystemdPreSpawn+"="+fifo)
	answer := c.ask()
	if p := c.reports.next("prespawn"); p["pid"] != strconv.Itoa(p0) {
		t.Fatalf("prespawn report %v, want pid=%d", p, p0)
	}
	if err := unix.Kill(p0, unix.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if d, _ := rec.recvMsg(t, true); d.pid != p0 || !systemdReloadingRE.MatchString(d.text) {
		t.Fatalf("got %q from pid %d, want RELOADING=1 from pid %d", d.text, d.pid, p0)
	}
	releaseFIFO(t, fifo) // PreSpawn fails
	status := ("pre-spawn hook: " + strings.Repeat("x", 5000))[:1024]
	rec.expect(t, p0, "READY=1\nSTATUS=restart failed: "+status)
	if a := <-answer; !errors.Is(a.err, ErrRestartFailed) {
		t.Errorf("RequestRestart: %v, want the restart's failure", a.err)
	}
	rec.expectNone(t)
}

// TestSystemdHandOverWaitsForBarrier: the old process sends MAINPID and
// READY=1, then a barrier, and answers the requester only once systemd has
// released the barrier, that is, has processed MAINPID; until then the new
// process, ready but not main, sends nothing.
func TestSystemdHandOverWaitsForBarrier(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t)
	p0 := systemdStartNotified(t, c, rec)

	type result struct {
		pid      int
		err      error
		released bool // the barrier had been released when RequestRestart returned
	}
	var released atomic.Bool
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
		defer cancel()
		pid, err := RequestRestart(ctx, c.socket)
		done <- result{pid, err, released.Load()}
	}()
	p1, _ := strconv.Atoi(c.nextNew("started")["pid"])
	if early := c.reports.next("early"); !strings.Contains(early["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send before Ready: %v, want ErrNotMain", early)
	}
	systemdHandOver(t, c, rec, p0, p1, func() {
		// The old process sent its barrier and the new process is ready:
		// an old process that did not wait for the barrier would have
		// answered by now.
		select {
		case r := <-done:
			t.Fatalf("RequestRestart returned (%d, %v) before the barrier was released", r.pid, r.err)
		default:
		}
		released.Store(true)
	})
	var r result
	select {
	case r = <-done:
	case <-time.After(testDeadline):
		t.Fatal("RequestRestart did not return after the barrier was released")
	}
	if r.err != nil || r.pid != p1 || !r.released {
		t.Errorf("RequestRestart returned (%d, %v) with the barrier released=%t, want (%d, nil) after the release", r.pid, r.err, r.released, p1)
	}
}

// TestSystemdPIDFile: Config.PIDFile is written atomically (only ever
// renamed into place, so a reader never sees it empty or partial), holds
// the process's pid once it is ready, and holds the new pid once a restart
// is complete, which is when a supervisor reads it.
func TestSystemdPIDFile(t *testing.T) {
	c := newTestCluster(t)
	run := filepath.Join(c.dir, "run")
	if err := os.Mkdir(run, 0o755); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(run, "svc.pid")
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(os.NewSyscallError("inotify_init1", err))
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, run, unix.IN_CREATE|unix.IN_MODIFY|unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_DELETE); err != nil {
		t.Fatal(os.NewSyscallError("inotify_add_watch", err))
	}

	r0 := c.start("systemd-service", envSystemdPIDFile+"="+pidFile)
	if got := readPIDFile(t, pidFile); got != r0["pid"] {
		t.Errorf("pid file holds %s once the process is ready, want %s", got, r0["pid"])
	}
	a := <-c.ask()
	if a.err != nil {
		t.Fatal(a.err)
	}
	pid := a.pid
	c.track(pid)
	if got := readPIDFile(t, pidFile); got != strconv.Itoa(pid) {
		t.Errorf("pid file holds %s when RequestRestart returned, want the new pid %d", got, pid)
	}
	c.reports.next("ready")
	c.reports.next("replaced")
	if got := readPIDFile(t, pidFile); got != strconv.Itoa(pid) {
		t.Errorf("pid file holds %s, want the new pid %d", got, pid)
	}

	// Every event on the pid file's own name is a rename into place.
	var renames int
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(in, buf)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			t.Fatal(os.NewSyscallError("read inotify", err))
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if name != filepath.Base(pidFile) {
				continue
			}
			if ev.Mask != unix.IN_MOVED_TO {
				t.Errorf("event %#x on %s: the pid file was written in place", ev.Mask, name)
			}
			renames++
		}
	}
	if renames != 2 {
		t.Errorf("the pid file was renamed into place %d times, want 2 (one per process)", renames)
	}
	if left, _ := filepath.Glob(filepath.Join(run, ".*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %q", left)
	}
}

// examples/httpd and its shipped units under a real systemd.

// examples/httpd under each real systemd (see the top of this file for how
// it is booted), installed with the example's own unit files. The units are
// read from examples/httpd and changed only where this machine differs from
// a real install, each change an explicit substitution that fails the test
// if its text is no longer in the shipped file:
//
//   - httpd.service: the binary's path in ExecStart= and ExecReload=, and
//     -store-fds added to ExecStart= (the fd store is opt-in, and the flag
//     is the one the unit's users would add). ExecReload= runs a separate
//     copy of the same binary, so that a broken deploy of the server's
//     binary leaves the reload client intact and it is the library that
//     finds the new process failing. Without httpd.socket, the test also
//     drops the two lines that tie the service to it. As Type=notify-reload
//     (systemd 253 and later): Type=notify-reload, -notify-reload added to
//     ExecStart=, and no ExecReload=, as the README's unit has it.
//   - httpd.socket: nothing. Its ListenStream=127.0.0.1:8080 is free in
//     the private net namespace, and the test connects there.
//
// A drop-in per unit adds what the test needs and the shipped units do not
// say: DefaultDependencies=no, because the default ones pull in
// sysinit.target and with it every unit of this machine's
// /lib/systemd/system; FileDescriptorStoreMax= for the fd store; the
// output of the service's processes (the reload client's verdict included)
// appended to a file the test reads; GORACE=atexit_sleep_ms=0, because the
// example is built with the race detector when this test binary is, and a
// race-enabled reload client would otherwise sleep a second before it
// exits; without httpd.socket, an ExecStartPre= that waits for the test's
// go-ahead, so that the test can connect while no httpd process exists and
// the fd store alone holds the listening socket; and what a test adds, such
// as WatchdogSec=.
//
// HTTP requests go to 127.0.0.1:8080 of the namespace from sockets this
// process creates on a thread that has joined the namespace's net namespace
// (sdhttpdDial); a socket stays in the net namespace it was created in.

// sdhttpdAddr is where the example listens, as httpd.socket's ListenStream=
// and as httpd's default -listen.
const sdhttpdAddr = "127.0.0.1:8080"

// sdhttpdUnit is the example's service unit.
const sdhttpdUnit = "httpd.service"

var (
	sdhttpdRestartRE = regexp.MustCompile(`(?m)^Restart succeeded, child pid is ([1-9][0-9]*)$`)
	sdhttpdBodyRE    = regexp.MustCompile(`^pid=([1-9][0-9]*) generation=([0-9]+)\n$`)
)

// TestSystemdHTTPD: examples/httpd as a Type=notify service with the default
// NotifyAccess (main), under its own unit files, and under systemd 253 and
// later also as a Type=notify-reload service.
func TestSystemdHTTPD(t *testing.T) {
	systemdFor(t, 0)
	bin := buildExample(t, "httpd")
	systemdEach(t, 0, func(t *testing.T, v *systemdVersion) {
		t.Run("SocketUnit", func(t *testing.T) { sdhttpdTestSocketUnit(t, v, bin) })
		t.Run("FDStore", func(t *testing.T) { sdhttpdTestFDStore(t, v, bin) })
		t.Run("StopAfterReload", func(t *testing.T) { sdhttpdTestStopAfterReload(t, v, bin) })
		t.Run("StoreFDsAfterReload", func(t *testing.T) { sdhttpdTestStoreFDsAfterReload(t, v, bin) })
		t.Run("NotifyReload", func(t *testing.T) { sdhttpdTestNotifyReload(t, v, bin) })
	})
}

// sdhttpdTestSocketUnit: with httpd.socket, a connection starts the
// service, whose main process is the one that answers; every `systemctl
// reload` makes a new process the main one without a word from systemd
// about a datagram from another pid; a reload into a binary that fails is
// reported as failed and changes nothing; the next good one succeeds; and
// `systemctl restart` starts a process that serves on the same socket.
func sdhttpdTestSocketUnit(t *testing.T, v *systemdVersion, bin string) {
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{socket: true})
	h.ns.mustSystemctl("start", "httpd.socket")
	if got := h.ns.state(sdhttpdUnit); got != "inactive/dead" {
		t.Fatalf("httpd.service is %s before the first connection, want inactive/dead", got)
	}
	if got := h.ns.show(sdhttpdUnit, "NotifyAccess") + " " + h.ns.show(sdhttpdUnit, "Type"); got != "main notify" {
		t.Errorf("NotifyAccess and Type are %q, want the defaults of the shipped unit, \"main notify\"", got)
	}
	ino, _ := h.listener()

	// The first request starts the service.
	pid := h.checkMain(0)
	h.checkHolds(pid, ino)

	restarts := 0
	for gen := 1; gen <= 3; gen++ {
		pid = h.reload(pid, gen, &restarts)
	}

	// A bad deploy: the server's binary now exits at once. The reload
	// client, a binary of its own, asks as usual; the old process sees its
	// new process exit before it was ready, and serves on.
	h.install([]byte("#!/bin/sh\nexit 3\n"))
	if out, err := h.ns.systemctl("reload", sdhttpdUnit); err == nil {
		t.Errorf("systemctl reload succeeded with a broken binary:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^Restart failed: new process [0-9]+: .*\(exit status 3\)$`).MatchString(h.log()) {
		t.Errorf("the reload client did not say that the new process exited with status 3:\n%s", h.log())
	}
	if got := h.ns.show(sdhttpdUnit, "ReloadResult"); got != "exit-code" {
		t.Errorf("ReloadResult=%s after the failed reload, want exit-code", got)
	}
	if got := h.checkMain(3); got != pid {
		t.Errorf("after the failed reload pid %s is the main process, want the old one, %s", got, pid)
	}
	if n := len(sdhttpdRestartRE.FindAllString(h.log(), -1)); n != restarts {
		t.Errorf("the reload client reported %d successful restarts, want %d", n, restarts)
	}

	h.install(nil)
	pid = h.reload(pid, 4, &restarts)
	h.checkHolds(pid, ino)
	// Checked before the restart: after a reload, a stop does not wait for
	// the main process (see sdhttpdTestStopAfterReload), and the STOPPING=1
	// it sends on SIGTERM can then reach systemd after the new process is
	// the main one, which systemd reports as a datagram from a non-main pid.
	h.ns.checkNoWarnings()

	// Every generation ran with -store-fds. The first one stored the
	// socket; systemd keeps one copy of a socket however often it is
	// stored.
	if got := h.ns.show(sdhttpdUnit, "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	h.ns.mustSystemctl("restart", sdhttpdUnit)
	fresh := h.checkMain(0)
	if fresh == pid {
		t.Fatalf("systemctl restart left pid %s the main process", pid)
	}
	h.checkHolds(fresh, ino)
	// systemd passes the socket unit's fd and the stored one, both named
	// "http": the same socket, which httpd takes once.
	if got := h.environ(fresh)["LISTEN_FDNAMES"]; got != "http:http" {
		t.Errorf("after the restart LISTEN_FDNAMES=%q, want the socket unit's and the stored fd, \"http:http\"", got)
	}
}

// sdhttpdTestFDStore: without httpd.socket, httpd binds 127.0.0.1:8080
// itself and keeps the socket in systemd's fd store. `systemctl restart`
// stops the process and starts another, and the socket lives on in the
// store in between: a connection made while no httpd process exists is
// queued, and the new process, given the socket back under "http", answers
// it without binding anything.
func sdhttpdTestFDStore(t *testing.T, v *systemdVersion, bin string) {
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{})
	h.release()
	h.ns.mustSystemctl("start", sdhttpdUnit)
	// httpd stores its socket after READY=1, so start may return first.
	h.ns.waitShow(sdhttpdUnit, "NFileDescriptorStore", "1")
	pid := h.checkMain(0)
	ino, _ := h.listener()
	h.checkHolds(pid, ino)
	if got := h.environ(pid)["LISTEN_FDNAMES"]; got != "" {
		t.Errorf("the first process was passed fds named %q, want none", got)
	}

	wait := h.ns.systemctlAsync("restart", sdhttpdUnit)
	h.ns.waitShow(sdhttpdUnit, "SubState", "start-pre")
	// The old process is gone (the stop waited for it), and the new one
	// waits for the test's go-ahead before it starts: the listening socket
	// is open in systemd's fd store alone.
	if got := h.ns.show(sdhttpdUnit, "MainPID"); got != "0" {
		t.Errorf("MainPID=%s while the new process has not started, want 0", got)
	}
	if _, err := os.Stat(h.procPath(pid, "")); err == nil {
		t.Errorf("the old process %s still exists", pid)
	}
	if got, _ := h.listener(); got != ino {
		t.Fatalf("while no httpd process runs the listening socket is inode %d, want %d", got, ino)
	}
	queued := h.dial()
	defer queued.Close()
	if _, err := io.WriteString(queued, "GET / HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if _, n := h.listener(); n != 1 {
		t.Errorf("%d connections in the listening socket's accept queue, want the test's one", n)
	}
	h.release()
	h.ns.mustWait("restart", wait)

	fresh := h.ns.show(sdhttpdUnit, "MainPID")
	if p, gen := sdhttpdResponse(t, queued); p != fresh || gen != "0" {
		t.Errorf("the connection queued across the restart was answered by pid %s generation %s, want the new main process %s, generation 0", p, gen, fresh)
	}
	if got := h.checkMain(0); got != fresh || fresh == pid {
		t.Errorf("after the restart pid %s answers and %s is the main process, want a new process, not %s", got, fresh, pid)
	}
	h.checkHolds(fresh, ino)
	if got := h.environ(fresh)["LISTEN_FDNAMES"]; got != "http" {
		t.Errorf("after the restart LISTEN_FDNAMES=%q, want the stored socket, \"http\"", got)
	}
	if got := h.ns.show(sdhttpdUnit, "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the restart, want 1", got)
	}
	h.ns.checkNoWarnings()
}

// sdhttpdTestNotifyReload: under systemd 253 and later, httpd.service as
// Type=notify-reload, with httpd -notify-reload and the default
// NotifyAccess (main). `systemctl reload` sends SIGHUP to the main process,
// and the reload is over once systemd has had RELOADING=1 and then READY=1
// from the main process. Three reloads each make a new process the main one,
// with the unit active, no datagram dropped as from a non-main pid, and no
// reload timed out. A reload into a binary that fails leaves the old process
// the main one, serving, and StatusText says why; systemd counts that
// reload a success, as READY=1 ended it. With the good binary back, the next
// reload makes a new process the main one.
func sdhttpdTestNotifyReload(t *testing.T, v *systemdVersion, bin string) {
	if v.major < 253 {
		t.Skipf("systemd %d has no Type=notify-reload (253 and later)", v.major)
	}
	// A reload that never gets READY=1 times out after TimeoutStartSec=
	// (service_enter_reload): 90 s by default, longer than the test waits
	// for systemctl. At 10 s, systemd says so first.
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{socket: true, notifyReload: true, service: []string{"TimeoutStartSec=10"}})
	h.ns.mustSystemctl("start", "httpd.socket")
	if got := h.ns.show(sdhttpdUnit, "NotifyAccess") + " " + h.ns.show(sdhttpdUnit, "Type"); got != "main notify-reload" {
		t.Errorf("NotifyAccess and Type are %q, want \"main notify-reload\"", got)
	}
	ino, _ := h.listener()
	pid := h.checkMain(0)
	h.checkHolds(pid, ino)
	// systemd runs its services with an environment of its own, without
	// the LD_LIBRARY_PATH that a systemd unpacked into a folder runs with.
	if lib := h.environ(pid)["LD_LIBRARY_PATH"]; lib != "" {
		t.Errorf("httpd runs with LD_LIBRARY_PATH=%s, systemd's own", lib)
	}
	for gen := 1; gen <= 3; gen++ {
		pid = h.signalReload(pid, gen)
	}

	h.install([]byte("#!/bin/sh\nexit 3\n"))
	h.ns.mustSystemctl("reload", sdhttpdUnit)
	status := h.ns.show(sdhttpdUnit, "StatusText")
	if !regexp.MustCompile(`^restart failed: new process [0-9]+: .*\(exit status 3\)$`).MatchString(status) {
		t.Errorf("after a reload into a broken binary StatusText=%q, want the restart's failure, a new process with exit status 3", status)
	}
	if got := h.ns.show(sdhttpdUnit, "ReloadResult"); got != "success" {
		t.Errorf("ReloadResult=%s after READY=1 ended the failed reload, want success", got)
	}
	if got := h.checkMain(3); got != pid {
		t.Errorf("after the failed reload pid %s is the main process, want the old one, %s", got, pid)
	}

	h.install(nil)
	pid = h.signalReload(pid, 4)
	h.checkHolds(pid, ino)
	h.ns.checkNoWarnings()
	if l := h.ns.console.lines("Reload operation timed out"); len(l) > 0 {
		t.Errorf("a reload timed out:\n%s", strings.Join(l, "\n"))
	}
}

// sdhttpdTestWatchdog: examples/httpd under its shipped units with
// WatchdogSec= added: the first process pings systemd's watchdog, and after
// a reload the new one does (see TestSystemdWatchdogAcrossReload).
func sdhttpdTestWatchdog(t *testing.T, v *systemdVersion, bin string) {
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{socket: true,
		service: []string{fmt.Sprintf("WatchdogSec=%d", systemdWatchdogTimeout/time.Second)}})
	h.ns.mustSystemctl("start", "httpd.socket")
	pid := h.checkMain(0)
	if got, want := h.ns.show(sdhttpdUnit, "WatchdogUSec"), systemdWatchdogTimeout.String(); got != want {
		t.Fatalf("WatchdogUSec=%s, want %s", got, want)
	}
	h.ns.waitWatchdogPing(sdhttpdUnit, sdMonotonicUsec(t), "httpd, the first process, "+pid+",")

	restarts := 0
	pid = h.reload(pid, 1, &restarts)
	h.ns.holdWatchdog(sdhttpdUnit, pid, sdMonotonicUsec(t))
	if got := h.checkMain(1); got != pid {
		t.Errorf("pid %s answered, want %s", got, pid)
	}
	h.ns.checkNoWarnings()
}

// sdhttpdTestStopAfterReload: `systemctl stop` lets a request in flight
// complete, as httpd.service promises ("SIGKILL only after
// TimeoutStopSec"), before a reload and after one.
//
// After a reload it does not, under systemd 252: the main process is then
// one that systemd did not fork (MAINPID= named the old process's child),
// which systemd marks "alien" (service_set_main_pid: main_pid_alien) and
// does not wait for (unit_kill_context: "if (!main_pid_alien) wait_for_exit
// = true"). With no other process left in the cgroup, nothing is waited
// for, and service_enter_signal goes from SIGTERM straight to SIGKILL: the
// console shows "Killing process N (httpd) with signal SIGKILL" right
// after the stop began, the request in flight gets an EOF, and the unit
// ends "Failed with result 'signal'". The old process having exited makes
// no difference: systemd does not recompute main_pid_alien. In a `systemctl
// restart`, the STOPPING=1 that httpd sends on SIGTERM can then be read
// after the next process is the main one: "Got notification message from
// PID N, but reception only permitted for main PID M" (seen under load).
func sdhttpdTestStopAfterReload(t *testing.T, v *systemdVersion, bin string) {
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{socket: true})
	h.ns.mustSystemctl("start", "httpd.socket")
	pid := h.checkMain(0)
	h.stopWithRequestInFlight(pid, "before any reload")

	pid = h.checkMain(0) // the socket starts the service again
	restarts := 0
	pid = h.reload(pid, 1, &restarts)
	h.stopWithRequestInFlight(pid, "after a reload")
}

// stopWithRequestInFlight stops httpd.service while main process pid
// serves a slow request, and checks that the request completes and the
// unit stops cleanly.
func (h *sdhttpd) stopWithRequestInFlight(pid, when string) {
	h.t.Helper()
	c := h.dial()
	defer c.Close()
	// A first request on the connection shows that pid has accepted it;
	// the slow one then reaches pid alone, whether it reads it before the
	// stop or, draining, after.
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\n\r\n"); err != nil {
		h.t.Fatal(err)
	}
	br := bufio.NewReader(c)
	if got, _ := sdhttpdReadResponse(h.t, c, br); got != pid {
		h.t.Fatalf("pid %s answered, want the main process %s", got, pid)
	}
	if _, err := io.WriteString(c, "GET /slow?ms=300 HTTP/1.1\r\nHost: "+sdhttpdAddr+"\r\n\r\n"); err != nil {
		h.t.Fatal(err)
	}
	if out, err := h.ns.systemctl("stop", sdhttpdUnit); err != nil {
		h.t.Errorf("systemctl stop %s: %v\n%s", when, err, out)
	}
	c.SetReadDeadline(time.Now().Add(testDeadline))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		h.t.Errorf("%s, the request in flight at `systemctl stop` failed: %v", when, err)
	} else {
		resp.Body.Close()
	}
	if got := h.ns.show(sdhttpdUnit, "Result"); got != "success" {
		h.t.Errorf("%s, `systemctl stop` ended with Result=%s, want success", when, got)
	}
	if k := h.ns.console.lines("with signal SIGKILL"); len(k) > 0 {
		h.t.Errorf("%s, systemd killed httpd at once, not after TimeoutStopSec:\n%s", when, strings.Join(k, "\n"))
	}
}

// sdhttpdTestStoreFDsAfterReload: with -store-fds, every generation stores
// the listening socket, as server.go's comment says ("every generation may
// do it"). A generation started by a reload calls StoreFDs as soon as
// Start returns, which is most often before the old process has made it
// the main process; StoreFDs then refuses with ErrNotMain, and the reload
// leaves "cannot keep the listening socket in systemd's fd store" in the
// log. (systemd still has the first generation's copy, the same socket,
// so a restart still finds it.) Three reloads, because a new process that
// loses the race to the handover stores its socket without a word.
func sdhttpdTestStoreFDsAfterReload(t *testing.T, v *systemdVersion, bin string) {
	h := sdhttpdBoot(t, v, bin, sdhttpdUnits{socket: true})
	h.ns.mustSystemctl("start", "httpd.socket")
	pid := h.checkMain(0)
	restarts := 0
	for gen := 1; gen <= 3; gen++ {
		pid = h.reload(pid, gen, &restarts)
		// After StoreFDs, httpd prints its "Instance no." line; the
		// reload may have returned before.
		h.waitLog(fmt.Sprintf("Instance no. %d listening on ", gen))
	}
	const warning = "cannot keep the listening socket in systemd's fd store"
	for _, line := range strings.Split(h.log(), "\n") {
		if strings.Contains(line, warning) {
			t.Errorf("a generation started by a reload could not store its socket:\n%s", line)
		}
	}
}

// sdhttpd is examples/httpd installed in a namespaced systemd.
type sdhttpd struct {
	t      *testing.T
	ns     *systemdNS
	bin    string   // the example, as built
	svc    string   // the server's binary, ExecStart='s
	gate   *os.File // the ExecStartPre= fifo, read and write; nil with httpd.socket
	client *http.Client
}

// sdhttpdUnits says how the test installs the example's units.
type sdhttpdUnits struct {
	socket bool // with httpd.socket
	// notifyReload makes httpd.service Type=notify-reload, with httpd
	// -notify-reload and without ExecReload=: systemd 254 runs an
	// ExecReload= as well as sending the signal (service_enter_reload), and
	// the unit would restart twice per reload.
	notifyReload bool
	service      []string // more lines for the [Service] drop-in
}

// sdhttpdBoot boots systemd version v and installs httpd.service, with
// httpd.socket if u.socket is set, from the files in examples/httpd. Neither
// is started.
func sdhttpdBoot(t *testing.T, v *systemdVersion, bin string, u sdhttpdUnits) *sdhttpd {
	t.Helper()
	ns := systemdBoot(t, v)
	h := &sdhttpd{t: t, ns: ns, bin: bin, svc: filepath.Join(ns.dir, "httpd")}
	reloader := filepath.Join(ns.dir, "httpd-reload")
	for _, dst := range []string{h.svc, reloader} {
		if err := copyExecutable(bin, dst); err != nil {
			t.Fatal(err)
		}
	}

	service := sdhttpdReadUnit(t, "httpd.service")
	if u.notifyReload {
		service = sdhttpdReplace(t, service, "\nType=notify\n", "\nType=notify-reload\n")
		service = sdhttpdReplace(t, service, "\nExecStart=/usr/local/bin/httpd ", "\nExecStart="+h.svc+" -store-fds -notify-reload ")
		service = sdhttpdReplace(t, service, "\nExecReload=/usr/local/bin/httpd -socket /run/httpd/control.sock restart\n", "\n")
	} else {
		service = sdhttpdReplace(t, service, "\nExecStart=/usr/local/bin/httpd ", "\nExecStart="+h.svc+" -store-fds ")
		service = sdhttpdReplace(t, service, "\nExecReload=/usr/local/bin/httpd ", "\nExecReload="+reloader+" ")
	}
	dropIn := append([]string{
		"[Unit]",
		"DefaultDependencies=no",
		"[Service]",
		"FileDescriptorStoreMax=4",
		"StandardOutput=append:" + filepath.Join(ns.dir, "httpd.log"),
		"StandardError=inherit",
		"Environment=\"" + goraceEnv() + "\"",
	}, u.service...)
	units := map[string]string{"httpd.service": service}
	if u.socket {
		sock := sdhttpdReadUnit(t, "httpd.socket")
		if !strings.Contains(sock, "\nListenStream="+sdhttpdAddr+"\n") {
			t.Fatalf("httpd.socket does not listen on %s, where the test connects:\n%s", sdhttpdAddr, sock)
		}
		units["httpd.socket"] = sock
		units["httpd.socket.d/test.conf"] = "[Unit]\nDefaultDependencies=no\n"
	} else {
		service = sdhttpdReplace(t, service, "\nRequires=httpd.socket\n", "\n")
		units["httpd.service"] = sdhttpdReplace(t, service, "\nAfter=httpd.socket\n", "\n")
		gate := filepath.Join(ns.dir, "gate")
		if err := unix.Mkfifo(gate, 0o600); err != nil {
			t.Fatal(os.NewSyscallError("mkfifo", err))
		}
		// Read and write: the test never blocks on opening or writing it,
		// and the shell never sees its end.
		f, err := os.OpenFile(gate, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		h.gate = f
		dropIn = append(dropIn, "ExecStartPre=/bin/sh -c 'read -r go < "+gate+"'")
	}
	units["httpd.service.d/test.conf"] = strings.Join(dropIn, "\n") + "\n"
	for _, line := range strings.Split(units["httpd.service"], "\n") {
		if !strings.HasPrefix(line, "#") && strings.Contains(line, "/usr/local/bin/") {
			t.Fatalf("httpd.service names /usr/local/bin in a line the test does not rewrite: %q", line)
		}
	}

	ns.addUnits(units)

	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return sdhttpdDial(ctx, ns.pid, network, addr)
		},
		// A connection per request: no idle connection keeps an old
		// process draining, or answers from a process that is not the
		// main one any more.
		DisableKeepAlives: true,
	}
	h.client = &http.Client{Transport: tr, Timeout: testDeadline}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		if b := h.log(); strings.Contains(b, "WARNING: DATA RACE") {
			t.Errorf("the race detector found a race in an httpd process:\n%s", b)
		} else if t.Failed() {
			t.Logf("httpd's output:\n%s", b)
		}
	})
	return h
}

// sdhttpdReadUnit returns the text of a unit file shipped with the example.
func sdhttpdReadUnit(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("examples", "httpd", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// sdhttpdReplace replaces old in text with repl, and fails the test unless
// old is there exactly once: a changed unit file must not go untested
// because a substitution silently did nothing.
func sdhttpdReplace(t *testing.T, text, old, repl string) string {
	t.Helper()
	if n := strings.Count(text, old); n != 1 {
		t.Fatalf("the unit file has %q %d times, want once; update the test's substitution:\n%s", old, n, text)
	}
	return strings.Replace(text, old, repl, 1)
}

// sdhttpdDial connects to addr from inside the net namespace of process
// pid. Only the socket's creation needs the namespace: the goroutine locks
// itself to its thread, moves the thread into the namespace, dials, and
// moves the thread back before it ends. It never unlocks, so that the
// runtime ends the thread with the goroutine rather than let other
// goroutines run on it; but if the thread is the main one, the runtime
// keeps it, and /proc/self/net (the main thread's namespace) would
// otherwise show the systemd namespace's sockets to every later test.
func sdhttpdDial(ctx context.Context, pid int, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("open", err)}
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("open", err)}
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			ch <- result{nil, os.NewSyscallError("setns", err)}
			return
		}
		defer func() {
			if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
				panic("sdhttpdDial: cannot return to the test's net namespace: " + err.Error())
			}
		}()
		// An IP literal: no resolver, and a single address, which the
		// dialer tries in this goroutine.
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// dial connects to the example's address in the namespace.
func (h *sdhttpd) dial() net.Conn {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	c, err := sdhttpdDial(ctx, h.ns.pid, "tcp", sdhttpdAddr)
	if err != nil {
		h.t.Fatal(err)
	}
	return c
}

// get sends GET / and returns the pid and generation the answer names.
func (h *sdhttpd) get() (pid, gen string) {
	h.t.Helper()
	resp, err := h.client.Get("http://" + sdhttpdAddr + "/")
	if err != nil {
		h.t.Fatalf("GET /: %v", err)
	}
	defer resp.Body.Close()
	return sdhttpdBody(h.t, resp)
}

// sdhttpdResponse reads the response to a GET / written on c.
func sdhttpdResponse(t *testing.T, c net.Conn) (pid, gen string) {
	t.Helper()
	return sdhttpdReadResponse(t, c, bufio.NewReader(c))
}

// sdhttpdReadResponse reads the response to a GET / written on c, through
// br, a reader of c.
func sdhttpdReadResponse(t *testing.T, c net.Conn, br *bufio.Reader) (pid, gen string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testDeadline))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	defer resp.Body.Close()
	return sdhttpdBody(t, resp)
}

func sdhttpdBody(t *testing.T, resp *http.Response) (pid, gen string) {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	m := sdhttpdBodyRE.FindStringSubmatch(string(b))
	if resp.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("GET / answered %s %q, want 200 and pid=PID generation=G", resp.Status, b)
	}
	return m[1], m[2]
}

// checkMain sends GET / (which starts the service, with httpd.socket) and
// checks that the process that answered, as generation gen, is the main
// process of the service, which is active. It returns that pid.
func (h *sdhttpd) checkMain(gen int) string {
	h.t.Helper()
	pid, g := h.get()
	if g != strconv.Itoa(gen) {
		h.t.Errorf("pid %s answered as generation %s, want %d", pid, g, gen)
	}
	if got := h.ns.show(sdhttpdUnit, "MainPID"); got != pid {
		h.t.Errorf("MainPID=%s, but pid %s answered", got, pid)
	}
	if got := h.ns.state(sdhttpdUnit); got != "active/running" {
		h.t.Errorf("httpd.service is %s, want active/running", got)
	}
	return pid
}

// reload runs `systemctl reload httpd`, which must succeed, and checks that
// the new process the reload client names is the main process and answers
// as generation gen. It returns the new pid.
func (h *sdhttpd) reload(old string, gen int, restarts *int) string {
	h.t.Helper()
	h.ns.mustSystemctl("reload", sdhttpdUnit)
	*restarts++
	m := sdhttpdRestartRE.FindAllStringSubmatch(h.log(), -1)
	if len(m) != *restarts {
		h.t.Fatalf("the reload client reported %d successful restarts, want %d:\n%s", len(m), *restarts, h.log())
	}
	pid := m[len(m)-1][1]
	if pid == old {
		h.t.Fatalf("the reload client reported the old pid %s", pid)
	}
	if got := h.checkMain(gen); got != pid {
		h.t.Errorf("pid %s answered after the reload, the reload client said %s", got, pid)
	}
	return pid
}

// signalReload runs `systemctl reload httpd` on a Type=notify-reload unit,
// which must succeed, and checks that a new process is the main process and
// answers as generation gen. It returns the new pid.
func (h *sdhttpd) signalReload(old string, gen int) string {
	h.t.Helper()
	h.ns.mustSystemctl("reload", sdhttpdUnit)
	pid := h.checkMain(gen)
	if pid == old {
		h.t.Fatalf("after the reload the old process %s answers and is the main process", old)
	}
	if got := h.ns.show(sdhttpdUnit, "ReloadResult"); got != "success" {
		h.t.Errorf("ReloadResult=%s, want success", got)
	}
	return pid
}

// install replaces the server's binary as a deploy would: a new file renamed
// over the old one. nil installs the example.
func (h *sdhttpd) install(text []byte) {
	h.t.Helper()
	if text == nil {
		systemdInstall(h.t, h.bin, h.svc)
		return
	}
	if err := os.WriteFile(h.svc+".new", text, 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(h.svc+".new", h.svc); err != nil {
		h.t.Fatal(err)
	}
}

// release lets the next start of the service past its ExecStartPre=.
func (h *sdhttpd) release() {
	h.t.Helper()
	if _, err := h.gate.WriteString("go\n"); err != nil {
		h.t.Fatal(err)
	}
}

// waitLog waits until the service's processes have written a line that
// contains s. The file grows by appends, which inotify reports.
func (h *sdhttpd) waitLog(s string) {
	h.t.Helper()
	in, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		h.t.Fatal(os.NewSyscallError("inotify_init1", err))
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, filepath.Join(h.ns.dir, "httpd.log"), unix.IN_MODIFY); err != nil {
		h.t.Fatal(os.NewSyscallError("inotify_add_watch", err))
	}
	deadline := time.Now().Add(testDeadline)
	buf := make([]byte, 4096)
	for !strings.Contains(h.log(), s) {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 {
			h.t.Fatalf("no %q in httpd's output within %v", s, testDeadline)
		}
		if _, err := unix.Poll([]unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}}, ms); err != nil && err != unix.EINTR {
			h.t.Fatal(os.NewSyscallError("poll", err))
		}
		// Drain the events; the file is read again either way.
		for {
			if _, err := unix.Read(in, buf); err != nil {
				break
			}
		}
	}
}

// log returns what the service's processes wrote.
func (h *sdhttpd) log() string {
	b, _ := os.ReadFile(filepath.Join(h.ns.dir, "httpd.log"))
	return string(b)
}

// procPath is the path of /proc/PID/NAME in the namespace, pid as the
// namespace knows it (MainPID=, the pid in httpd's answer).
func (h *sdhttpd) procPath(pid, name string) string {
	return h.ns.rootPath("/proc/" + pid + "/" + name)
}

// listener returns the inode of the socket listening on sdhttpdAddr in the
// namespace, and how many connections its accept queue holds. For a
// listening socket, /proc/net/tcp's rx_queue is the accept queue's length.
func (h *sdhttpd) listener() (ino uint64, queued int) {
	h.t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", h.ns.pid))
	if err != nil {
		h.t.Fatal(err)
	}
	const local, listen = "0100007F:1F90", "0A" // 127.0.0.1:8080, TCP_LISTEN
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[1] != local || f[3] != listen {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		q, err1 := strconv.ParseUint(rx, 16, 32)
		ino, err2 := strconv.ParseUint(f[9], 10, 64)
		if err1 != nil || err2 != nil {
			h.t.Fatalf("cannot parse %q", line)
		}
		return ino, int(q)
	}
	h.t.Fatalf("nothing listens on %s in the namespace:\n%s", sdhttpdAddr, b)
	return 0, 0
}

// checkHolds checks that process pid has the socket ino open.
func (h *sdhttpd) checkHolds(pid string, ino uint64) {
	h.t.Helper()
	dir := h.procPath(pid, "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		h.t.Fatal(err)
	}
	want := fmt.Sprintf("socket:[%d]", ino)
	for _, e := range ents {
		if l, _ := os.Readlink(filepath.Join(dir, e.Name())); l == want {
			return
		}
	}
	h.t.Errorf("pid %s does not hold the listening socket %s", pid, want)
}

// environ returns the environment process pid was started with (what
// execve got, not what the process made of it since).
func (h *sdhttpd) environ(pid string) map[string]string {
	h.t.Helper()
	b, err := os.ReadFile(h.procPath(pid, "environ"))
	if err != nil {
		h.t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}
