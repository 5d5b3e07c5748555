//go:build linux

package shellflip

// Tests of the library under a real systemd 252, and of the datagrams it
// sends to a notify socket owned by the test where systemd 252 cannot be
// the judge (Type=notify-reload came in 253).
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
// What systemd 252 did here that is worth knowing:
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
//   - Not systemd's, but it bit here: a race-enabled Go binary sleeps 1 s
//     on exit (GORACE atexit_sleep_ms defaults to 1000), so every reload
//     would wait 1 s for the reload client; the unit sets
//     atexit_sleep_ms=0.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

// Knobs of the systemd roles, in the environment of the service.
const (
	envSystemdListen       = "SHELLFLIP_TEST_SD_LISTEN"        // unix socket path to serve pid and generation on
	envSystemdAccept       = "SHELLFLIP_TEST_SD_ACCEPT"        // "inherited": accept only on a listener this process inherited
	envSystemdStore        = "SHELLFLIP_TEST_SD_STORE"         // non-empty: push the registry to systemd's fd store
	envSystemdNotifyReload = "SHELLFLIP_TEST_SD_NOTIFY_RELOAD" // non-empty: Config{NotifyReload: true, Signal: SIGHUP}
	envSystemdPIDFile      = "SHELLFLIP_TEST_SD_PIDFILE"       // Config.PIDFile
	envSystemdStray        = "SHELLFLIP_TEST_SD_STRAY"         // knob: the reload client sends a datagram of its own and exits
	envSystemdLog          = "SHELLFLIP_TEST_SD_LOG"           // non-empty: the library logs to stderr
)

const (
	systemdUnit   = "shellflip-test.service"
	systemdTarget = "shellflip-test.target"
	// systemdNotMainWarning is what systemd logs when it drops a datagram
	// from a pid other than the main one under NotifyAccess=main.
	systemdNotMainWarning = "but reception only permitted for main PID"
)

func init() {
	testRoles["systemd-service"] = systemdServiceRole
	testRoles["systemd-reload"] = systemdReloadRole
}

// systemdServiceRole is the service. Every generation reports, in order:
//
//	started pid= restarted= names=   (names: the registry before Listen)
//	early pid= err=                  (restarted only: a Send before Ready)
//	notmain pid= err=                (restarted only: a Send after Ready)
//	ready pid= gen= inherited= ino=  (Start returned)
//	main pid= err=                   (IsMain: STATUS=main pid=N, then a barrier)
//	replaced pid= new=               (a restart succeeded; it stops accepting and exits)
//
// A restarted process that removes $SHELLFLIP_TEST_FAIL_FILE exits with
// status 3 right after its early report, before Ready.
func systemdServiceRole() int {
	pid := os.Getpid()
	names := Names()
	n, err := SystemdNotifier()
	if err != nil {
		report("error pid=%d notifier: %v", pid, err)
		return 1
	}
	report("started pid=%d restarted=%t names=%s", pid, StartedByRestart(), strings.Join(names, ","))
	if StartedByRestart() {
		report("early pid=%d err=%v", pid, n.Send(SdStatus("early")))
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

	cfg := Config{
		Logger:     systemdLogger(),
		SocketPath: os.Getenv(envTestSocket),
		PIDFile:    os.Getenv(envSystemdPIDFile),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprintf(w, "%d\n", gen)
			return err
		}},
	}
	if os.Getenv(envSystemdNotifyReload) != "" {
		cfg.NotifyReload, cfg.Signal = true, syscall.SIGHUP
	}
	r, err := Start(context.Background(), cfg)
	if err != nil {
		report("error pid=%d start: %v", pid, err)
		return 1
	}
	if StartedByRestart() {
		report("notmain pid=%d err=%v", pid, n.Send(SdStatus("not main yet")))
	}
	go func() {
		<-MainChan()
		err := n.Send(SdStatus("main pid=" + strconv.Itoa(pid)))
		if err == nil {
			// Once the barrier returns, systemd has read the status: the
			// test can ask for it as soon as it has this report.
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			err = n.Barrier(ctx)
			cancel()
		}
		report("main pid=%d err=%v", pid, err)
	}()
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
	report("replaced pid=%d new=%d", pid, p.Pid)
	return 0
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
		n, err := NewSdNotifier(addr)
		if err == nil {
			err = n.Send(SdStatus("stray"))
			n.Close()
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
	dir     string // shared with the namespace: units, binaries, sockets, logs
	pid     int    // the namespaced systemd, as this process sees it
	console *systemdConsole
	reports *testReports
}

// systemdSkip skips the test unless this machine can boot a private systemd.
func systemdSkip(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("booting systemd in private namespaces needs root; CI runs as root")
	}
	for _, tool := range []string{"unshare", "nsenter", "systemctl", "ip", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
	if _, err := os.Stat("/lib/systemd/systemd"); err != nil {
		t.Skipf("systemd is not installed: %v", err)
	}
}

var systemdSeq atomic.Int64

// systemdTempDir returns a new directory with a short name, so that the
// sockets in it fit in sun_path, removed at cleanup.
func systemdTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdns")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// systemdBoot boots systemd with the test unit, whose [Service] section
// gets the extra lines ("{dir}" in them stands for the test's directory),
// and waits until systemd has finished starting up; the unit itself is not
// started. Everything it creates goes away at cleanup, on every path.
func systemdBoot(t *testing.T, extra ...string) *systemdNS {
	t.Helper()
	systemdSkip(t)
	script, err := filepath.Abs("testdata/systemd/boot.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := systemdTempDir(t)
	// Copies of the test binary: the service's can be replaced, as a
	// deploy would, without touching the reload client's.
	for _, bin := range []string{"svc", "client"} {
		if err := copyExecutable(os.Args[0], filepath.Join(dir, bin)); err != nil {
			t.Fatal(err)
		}
	}
	ns := &systemdNS{t: t, dir: dir, reports: newTestReports(t, dir)}
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
		"--mount-proc", "--kill-child", "--", "/bin/sh", script, dir, ns.console.slavePath, systemdTarget)
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
		"Environment=\"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0") + "\" " + envSystemdLog + "=1",
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
	timer := time.NewTimer(testDeadline)
	defer timer.Stop()
	for {
		c.mu.Lock()
		text, changed, ended := string(c.buf), c.changed, c.ended
		c.mu.Unlock()
		for _, line := range strings.Split(text, "\n") {
			if strings.Contains(line, s) {
				return line, nil
			}
		}
		if ended {
			return "", fmt.Errorf("console closed before %q", s)
		}
		select {
		case <-changed:
		case <-stop:
			return "", fmt.Errorf("stopped waiting for %q", s)
		case <-timer.C:
			return "", fmt.Errorf("no %q on the console within %v", s, testDeadline)
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

// systemctl runs systemctl in the namespaces and returns its output.
func (ns *systemdNS) systemctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	argv := append([]string{"-t", strconv.Itoa(ns.pid), "-m", "-p", "-u", "-i", "-n", "--",
		"systemctl", "--no-pager", "--no-ask-password"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
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

// show returns a property of the test unit.
func (ns *systemdNS) show(prop string) string {
	ns.t.Helper()
	return ns.mustSystemctl("show", "--property="+prop, "--value", systemdUnit)
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
	// Whether the Send after Ready was refused depends on how soon the old
	// process gets systemd's answer to its barrier; either way systemd must
	// not complain about it (checked on the console by the callers).
	r.next("notmain")
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
	if got := ns.show("MainPID"); got != pid {
		ns.t.Errorf("MainPID=%s, want %s", got, pid)
	}
	if got := ns.show("ActiveState") + "/" + ns.show("SubState"); got != "active/running" {
		ns.t.Errorf("unit is %s, want active/running", got)
	}
	if got, want := ns.show("StatusText"), "main pid="+pid; got != want {
		ns.t.Errorf("StatusText=%q, want %q: systemd did not take the main process's datagram", got, want)
	}
	h := systemdHello(ns.t, filepath.Join(ns.dir, "hello.sock"))
	if h["pid"] != pid || h["gen"] != gen {
		ns.t.Errorf("the unit's socket answered %v, want pid=%s gen=%s", h, pid, gen)
	}
}

// checkNoWarnings checks that systemd dropped no datagram from a pid other
// than the main one.
func (ns *systemdNS) checkNoWarnings() {
	ns.t.Helper()
	if w := ns.console.lines(systemdNotMainWarning); len(w) > 0 {
		ns.t.Errorf("systemd dropped notifications from non-main pids:\n%s", strings.Join(w, "\n"))
	}
}

// systemdHello connects to a "systemd-service" socket and returns what the
// process that accepted says about itself.
func systemdHello(t *testing.T, path string) map[string]string {
	t.Helper()
	c, err := net.DialTimeout("unix", path, testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return systemdReadHello(t, c)
}

func systemdReadHello(t *testing.T, c net.Conn) map[string]string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testDeadline))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the greeting: %v", err)
	}
	return parseReport("hello " + strings.TrimSpace(line))
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
	ns := systemdBoot(t)
	if got := ns.show("NotifyAccess"); got != "main" {
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
	if got := ns.show("MainPID"); got != pid {
		t.Errorf("MainPID=%s after the stray datagram, want %s", got, pid)
	}

	// systemd warned that it supervises a process that is not its child;
	// it does notice when that process dies.
	ns.mustSystemctl("kill", "--kill-who=main", "--signal=SIGKILL", systemdUnit)
	if _, err := ns.console.wait("Main process exited, code=killed", nil); err != nil {
		t.Fatalf("systemd did not notice that main process %s was killed: %v", pid, err)
	}
	if got := ns.show("Result"); got != "signal" {
		t.Errorf("Result=%s after the main process was killed, want signal", got)
	}
}

// TestSystemdReloadWithBrokenBinary: a reload after a bad deploy (the
// service's binary replaced by one that exits at once) fails, and says why;
// the old process stays the main process and keeps serving, and a reload
// after the good binary is back succeeds.
func TestSystemdReloadWithBrokenBinary(t *testing.T) {
	ns := systemdBoot(t)
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
	if got := ns.show("ReloadResult"); got != "exit-code" {
		t.Errorf("ReloadResult=%s, want exit-code", got)
	}
	if got := ns.show("MainPID"); got != old {
		t.Errorf("MainPID=%s after a failed reload, want the old process %s", got, old)
	}
	if got := ns.show("ActiveState") + "/" + ns.show("SubState"); got != "active/running" {
		t.Errorf("unit is %s after a failed reload, want active/running", got)
	}
	if h := systemdHello(t, filepath.Join(ns.dir, "hello.sock")); h["pid"] != old || h["gen"] != "0" {
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
	ns := systemdBoot(t,
		"FileDescriptorStoreMax=16",
		"Environment="+envSystemdStore+"=1 "+envSystemdAccept+"=inherited")
	name := ListenerName("unix", filepath.Join(ns.dir, "hello.sock"))

	wait := ns.systemctlAsync("start", systemdUnit)
	first := ns.reports.next("started")
	if first["names"] != "" {
		t.Errorf("a fresh start inherited %q", first["names"])
	}
	r0 := ns.reports.next("ready")
	ns.mustWait("start", wait)
	if r0["inherited"] != "false" {
		t.Fatalf("the first process reports %v, want a listener of its own", r0)
	}
	// StoreFDs sent FDSTORE=1 before READY=1, and systemd handles the
	// datagrams in order: by the time start returned, the fd was stored.
	if got := ns.show("NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	queued, err := net.DialTimeout("unix", filepath.Join(ns.dir, "hello.sock"), testDeadline)
	if err != nil {
		t.Fatal(err)
	}
	defer queued.Close()

	wait = ns.systemctlAsync("restart", systemdUnit)
	second := ns.reports.next("started")
	if second["restarted"] != "false" || second["names"] != name {
		t.Errorf("the process systemd started reports %v, want restarted=false names=%s", second, name)
	}
	r1 := ns.reports.next("ready")
	ns.mustWait("restart", wait)
	if r1["pid"] == r0["pid"] || r1["inherited"] != "true" || r1["ino"] != r0["ino"] {
		t.Errorf("after the restart: %v; before: %v; want a new pid serving the same socket (ino)", r1, r0)
	}
	if h := systemdReadHello(t, queued); h["pid"] != r1["pid"] {
		t.Errorf("the connection queued before the restart was answered by %v, want pid=%s", h, r1["pid"])
	}
	if got := ns.show("MainPID"); got != r1["pid"] {
		t.Errorf("MainPID=%s, want %s", got, r1["pid"])
	}
	// The second process stored the same socket again; systemd keeps one.
	if got := ns.show("NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the second StoreFDs, want 1", got)
	}
	ns.checkNoWarnings()
}

// TestSystemdPIDFileReload: with PIDFile= in the unit, systemd re-reads the
// file after every successful ExecReload= and takes the pid in it as the
// main pid; the file must name the new process by then, or systemd would go
// back to the old one, which is about to exit.
func TestSystemdPIDFileReload(t *testing.T) {
	ns := systemdBoot(t, "PIDFile={dir}/svc.pid", "Environment="+envSystemdPIDFile+"={dir}/svc.pid")
	pidFile := filepath.Join(ns.dir, "svc.pid")
	pid := ns.start()
	if got := systemdReadPIDFile(t, pidFile); got != pid {
		t.Errorf("pid file holds %s, want %s", got, pid)
	}
	for gen := 1; gen <= 3; gen++ {
		pid = ns.reload(pid, strconv.Itoa(gen))
		if got := systemdReadPIDFile(t, pidFile); got != pid {
			t.Errorf("after reload %d the pid file holds %s, want %s", gen, got, pid)
		}
	}
	ns.checkNoWarnings()
}

func systemdReadPIDFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 || b[len(b)-1] != '\n' {
		t.Errorf("pid file %q is not one line", b)
	}
	return strings.TrimSpace(string(b))
}

// systemdNotifyRecorder plays systemd's notify socket for tests that need
// no systemd: a datagram socket with SO_PASSCRED, so that every datagram
// comes with its sender's pid, as systemd receives them.
type systemdNotifyRecorder struct {
	path string
	conn *net.UnixConn
}

// systemdDatagram is one notification: who sent it, its text, and the fds
// that came with it (the receiver's to close).
type systemdDatagram struct {
	pid  int
	text string
	fds  []int
}

func systemdListenNotify(t *testing.T, dir string) *systemdNotifyRecorder {
	t.Helper()
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	return &systemdNotifyRecorder{path: path, conn: conn}
}

// recv returns the next datagram, waiting for it up to testDeadline if
// wait is set; without wait it only takes one already queued. A datagram
// is queued by the time its sender's sendmsg returns, so a recv without
// wait tells exactly what was sent so far.
func (r *systemdNotifyRecorder) recv(t *testing.T, wait bool) (systemdDatagram, bool) {
	t.Helper()
	if err := r.conn.SetReadDeadline(time.Now().Add(testDeadline)); err != nil {
		t.Fatal(err)
	}
	rc, err := r.conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, sdMaxDatagram+1)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*sdMaxFDs))
	var n, oobn, flags int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return !wait || rerr != unix.EAGAIN
			}
		}
	})
	if err != nil {
		t.Fatalf("waiting for a notification on %s: %v", r.path, err)
	}
	if rerr == unix.EAGAIN {
		return systemdDatagram{}, false
	}
	if rerr != nil {
		t.Fatal(os.NewSyscallError("recvmsg", rerr))
	}
	d := systemdDatagram{text: string(buf[:n])}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level != unix.SOL_SOCKET:
		case m.Header.Type == unix.SCM_CREDENTIALS:
			cred, err := unix.ParseUnixCredentials(&m)
			if err != nil {
				t.Fatal(err)
			}
			d.pid = int(cred.Pid)
		case m.Header.Type == unix.SCM_RIGHTS:
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				t.Fatal(err)
			}
			d.fds = append(d.fds, fds...)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		sdCloseFDs(d.fds)
		t.Fatalf("truncated datagram %q (flags %#x)", d.text, flags)
	}
	return d, true
}

// expect checks that the next datagram is text from pid, without fds.
func (r *systemdNotifyRecorder) expect(t *testing.T, pid int, text string) {
	t.Helper()
	d, _ := r.recv(t, true)
	sdCloseFDs(d.fds)
	if d.pid != pid || d.text != text || len(d.fds) != 0 {
		t.Fatalf("got %q from pid %d with %d fds, want %q from pid %d", d.text, d.pid, len(d.fds), text, pid)
	}
}

// barrier checks that the next datagram is BARRIER=1 from pid with one fd,
// the write end of a pipe, and returns that fd: the sender's Barrier waits
// until it is closed.
func (r *systemdNotifyRecorder) barrier(t *testing.T, pid int) int {
	t.Helper()
	d, _ := r.recv(t, true)
	if d.pid != pid || d.text != "BARRIER=1" || len(d.fds) != 1 {
		sdCloseFDs(d.fds)
		t.Fatalf("got %q from pid %d with %d fds, want BARRIER=1 from pid %d with one fd", d.text, d.pid, len(d.fds), pid)
	}
	var st unix.Stat_t
	if err := unix.Fstat(d.fds[0], &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Errorf("the barrier fd is not a pipe (mode %#o, %v)", st.Mode, err)
	}
	return d.fds[0]
}

// expectNone checks that nothing was sent that was not received yet.
func (r *systemdNotifyRecorder) expectNone(t *testing.T, why string) {
	t.Helper()
	if d, ok := r.recv(t, false); ok {
		sdCloseFDs(d.fds)
		t.Errorf("%s, pid %d sent %q with %d fds", why, d.pid, d.text, len(d.fds))
	}
}

// announced follows a "systemd-service" process's datagrams once it is the
// main process: STATUS=main pid=N and a barrier, which the test releases.
func (r *systemdNotifyRecorder) announced(t *testing.T, reports *testReports, pid int) {
	t.Helper()
	r.expect(t, pid, "STATUS=main pid="+strconv.Itoa(pid))
	unix.Close(r.barrier(t, pid))
	if m := reports.next("main"); m["pid"] != strconv.Itoa(pid) || m["err"] != "<nil>" {
		t.Fatalf("main report %v, want pid=%d err=<nil>", m, pid)
	}
}

// systemdMonotonicUsec reads CLOCK_MONOTONIC in microseconds, the clock of
// MONOTONIC_USEC.
func systemdMonotonicUsec(t *testing.T) int64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return ts.Nano() / 1e3
}

var systemdReloadingRE = regexp.MustCompile(`^RELOADING=1\nMONOTONIC_USEC=([0-9]+)$`)

// systemdStartNotified starts generation 0 of a "systemd-service"
// cluster whose notify socket is rec, and follows its first datagrams.
func systemdStartNotified(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, env ...string) int {
	t.Helper()
	r0 := c.start("systemd-service", append([]string{"NOTIFY_SOCKET=" + rec.path}, env...)...)
	pid, _ := strconv.Atoi(r0["pid"])
	rec.expect(t, pid, "READY=1") // a fresh start announces itself
	rec.announced(t, c.reports, pid)
	return pid
}

// systemdSighup sends the reload signal to old and checks the datagram that
// opens a Type=notify-reload reload: RELOADING=1 with MONOTONIC_USEC read
// between the signal and its arrival. It returns the pid of the new process
// the restart started, once that process reported its refused Send.
func systemdSighup(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, old int) int {
	t.Helper()
	before := systemdMonotonicUsec(t)
	if err := unix.Kill(old, unix.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d, _ := rec.recv(t, true)
	after := systemdMonotonicUsec(t)
	sdCloseFDs(d.fds)
	m := systemdReloadingRE.FindStringSubmatch(d.text)
	if d.pid != old || m == nil || len(d.fds) != 0 {
		t.Fatalf("got %q from pid %d with %d fds, want RELOADING=1 and MONOTONIC_USEC from pid %d", d.text, d.pid, len(d.fds), old)
	}
	if usec, _ := strconv.ParseInt(m[1], 10, 64); usec < before || usec > after {
		t.Errorf("MONOTONIC_USEC=%d, want it between %d and %d, around the signal", usec, before, after)
	}
	st := c.reports.next("started")
	pid, _ := strconv.Atoi(st["pid"])
	c.track(pid)
	if early := c.reports.next("early"); early["pid"] != st["pid"] || !strings.Contains(early["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send before Ready: %v, want ErrNotMain", early)
	}
	return pid
}

// systemdHandOver follows the datagrams of a successful handover from old
// to pid while the test holds the barrier: MAINPID and READY=1 from old in
// one datagram, a barrier from old, and nothing from pid until the barrier
// is released. release runs while the barrier is held.
func systemdHandOver(t *testing.T, c *testCluster, rec *systemdNotifyRecorder, old, pid int, release func()) {
	t.Helper()
	rec.expect(t, old, fmt.Sprintf("MAINPID=%d\nREADY=1", pid))
	fd := rec.barrier(t, old)
	closed := false
	defer func() {
		if !closed {
			unix.Close(fd)
		}
	}()
	// The new process is ready, and not main: its Send is refused.
	if nm := c.reports.next("notmain"); nm["pid"] != strconv.Itoa(pid) || !strings.Contains(nm["err"], ErrNotMain.Error()) {
		t.Errorf("the new process's Send after Ready, before the barrier was released: %v, want ErrNotMain", nm)
	}
	if ready := c.reports.next("ready"); ready["pid"] != strconv.Itoa(pid) {
		t.Fatalf("ready report %v, want pid=%d", ready, pid)
	}
	rec.expectNone(t, "while the barrier was held")
	if release != nil {
		release()
	}
	unix.Close(fd)
	closed = true
	if repl := c.reports.next("replaced"); repl["pid"] != strconv.Itoa(old) || repl["new"] != strconv.Itoa(pid) {
		t.Fatalf("old process reported %v, want pid=%d new=%d", repl, old, pid)
	}
	rec.announced(t, c.reports, pid)
}

// TestSystemdNotifyReloadDatagrams: systemd 252 has no Type=notify-reload,
// so the datagrams a Type=notify-reload unit would see are checked against
// a notify socket of the test's. On the reload signal: RELOADING=1 with
// MONOTONIC_USEC, then from the old process MAINPID=new and READY=1 in one
// datagram, then a barrier, and nothing from the new process before the
// barrier is released. A restart that fails ends the reload with READY=1
// and a STATUS that says why, and the old process keeps serving.
func TestSystemdNotifyReloadDatagrams(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t, c.dir)
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
	rec.expectNone(t, "after the failed restart")
	if h := systemdHello(t, hello); h["pid"] != strconv.Itoa(p1) {
		t.Errorf("after a failed restart the socket answered %v, want pid=%d", h, p1)
	}

	p2 := systemdSighup(t, c, rec, p1)
	systemdHandOver(t, c, rec, p1, p2, nil)
	if h := systemdHello(t, hello); h["pid"] != strconv.Itoa(p2) || h["gen"] != "2" {
		t.Errorf("the socket answered %v, want pid=%d gen=2", h, p2)
	}
}

// TestSystemdHandOverWaitsForBarrier: the old process sends MAINPID and
// READY=1, then a barrier, and answers the requester only once systemd has
// released the barrier, that is, has processed MAINPID; until then the new
// process, ready but not main, has its own Send refused with ErrNotMain.
func TestSystemdHandOverWaitsForBarrier(t *testing.T) {
	c := newTestCluster(t)
	rec := systemdListenNotify(t, c.dir)
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
	st := c.reports.next("started")
	p1, _ := strconv.Atoi(st["pid"])
	c.track(p1)
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

	r0 := c.start("systemd-service", "NOTIFY_SOCKET=", envSystemdPIDFile+"="+pidFile)
	if got := systemdReadPIDFile(t, pidFile); got != r0["pid"] {
		t.Errorf("pid file holds %s once the process is ready, want %s", got, r0["pid"])
	}
	ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
	defer cancel()
	pid, err := RequestRestart(ctx, c.socket)
	if err != nil {
		t.Fatal(err)
	}
	c.track(pid)
	if got := systemdReadPIDFile(t, pidFile); got != strconv.Itoa(pid) {
		t.Errorf("pid file holds %s when RequestRestart returned, want the new pid %d", got, pid)
	}
	c.reports.next("ready")
	c.reports.next("replaced")
	if got := systemdReadPIDFile(t, pidFile); got != strconv.Itoa(pid) {
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
