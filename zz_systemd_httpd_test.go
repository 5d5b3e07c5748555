//go:build linux

package shellflip

// examples/httpd under a real systemd 252 (see zz_systemd_test.go for how it
// is booted), installed with the example's own unit files. The units are
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
//     drops the two lines that tie the service to it.
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
// exits; and, without httpd.socket, an ExecStartPre= that waits for the
// test's go-ahead, so that the test can connect while no httpd process
// exists and the fd store alone holds the listening socket.
//
// HTTP requests go to 127.0.0.1:8080 of the namespace from sockets this
// process creates on a thread that has joined the namespace's net namespace
// (sdhttpdDial); a socket stays in the net namespace it was created in.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sdhttpdAddr is where the example listens, as httpd.socket's ListenStream=
// and as httpd's default -listen.
const sdhttpdAddr = "127.0.0.1:8080"

var sdhttpdRestartRE = regexp.MustCompile(`(?m)^Restart succeeded, child pid is ([1-9][0-9]*)$`)

// TestSystemdHTTPD: examples/httpd as a Type=notify service with the default
// NotifyAccess (main), under its own unit files.
func TestSystemdHTTPD(t *testing.T) {
	systemdSkip(t)
	bin := httpdBuild(t)
	t.Run("SocketUnit", func(t *testing.T) { sdhttpdTestSocketUnit(t, bin) })
	t.Run("FDStore", func(t *testing.T) { sdhttpdTestFDStore(t, bin) })
	t.Run("StopAfterReload", func(t *testing.T) { sdhttpdTestStopAfterReload(t, bin) })
	t.Run("StoreFDsAfterReload", func(t *testing.T) { sdhttpdTestStoreFDsAfterReload(t, bin) })
}

// sdhttpdTestSocketUnit: with httpd.socket, a connection starts the
// service, whose main process is the one that answers; every `systemctl
// reload` makes a new process the main one without a word from systemd
// about a datagram from another pid; a reload into a binary that fails is
// reported as failed and changes nothing; the next good one succeeds; and
// `systemctl restart` starts a process that serves on the same socket.
func sdhttpdTestSocketUnit(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
	h.ns.mustSystemctl("start", "httpd.socket")
	if got := h.state("httpd.service"); got != "inactive/dead" {
		t.Fatalf("httpd.service is %s before the first connection, want inactive/dead", got)
	}
	if got := h.show("httpd.service", "NotifyAccess") + " " + h.show("httpd.service", "Type"); got != "main notify" {
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
	if out, err := h.ns.systemctl("reload", "httpd.service"); err == nil {
		t.Errorf("systemctl reload succeeded with a broken binary:\n%s", out)
	}
	if !regexp.MustCompile(`(?m)^Restart failed: new process [0-9]+: .*\(exit status 3\)$`).MatchString(h.log()) {
		t.Errorf("the reload client did not say that the new process exited with status 3:\n%s", h.log())
	}
	if got := h.show("httpd.service", "ReloadResult"); got != "exit-code" {
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
	h.checkNoWarnings()

	// Every generation ran with -store-fds. The first one stored the
	// socket; systemd keeps one copy of a socket however often it is
	// stored.
	if got := h.show("httpd.service", "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s, want 1", got)
	}
	h.ns.mustSystemctl("restart", "httpd.service")
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
func sdhttpdTestFDStore(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, false)
	h.release()
	h.ns.mustSystemctl("start", "httpd.service")
	// httpd stores its socket after READY=1, so start may return first.
	h.waitShow("httpd.service", "NFileDescriptorStore", "1")
	pid := h.checkMain(0)
	ino, _ := h.listener()
	h.checkHolds(pid, ino)
	if got := h.environ(pid)["LISTEN_FDNAMES"]; got != "" {
		t.Errorf("the first process was passed fds named %q, want none", got)
	}

	wait := h.ns.systemctlAsync("restart", "httpd.service")
	h.waitShow("httpd.service", "SubState", "start-pre")
	// The old process is gone (the stop waited for it), and the new one
	// waits for the test's go-ahead before it starts: the listening socket
	// is open in systemd's fd store alone.
	if got := h.show("httpd.service", "MainPID"); got != "0" {
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

	fresh := h.show("httpd.service", "MainPID")
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
	if got := h.show("httpd.service", "NFileDescriptorStore"); got != "1" {
		t.Errorf("NFileDescriptorStore=%s after the restart, want 1", got)
	}
	h.checkNoWarnings()
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
func sdhttpdTestStopAfterReload(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
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
	if out, err := h.ns.systemctl("stop", "httpd.service"); err != nil {
		h.t.Errorf("systemctl stop %s: %v\n%s", when, err, out)
	}
	c.SetReadDeadline(time.Now().Add(testDeadline))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		h.t.Errorf("%s, the request in flight at `systemctl stop` failed: %v", when, err)
	} else {
		resp.Body.Close()
	}
	if got := h.show("httpd.service", "Result"); got != "success" {
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
func sdhttpdTestStoreFDsAfterReload(t *testing.T, bin string) {
	h := sdhttpdBoot(t, bin, true)
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

// sdhttpdBoot boots systemd and installs httpd.service, with httpd.socket
// if socket is set, from the files in examples/httpd. Neither is started.
func sdhttpdBoot(t *testing.T, bin string, socket bool) *sdhttpd {
	t.Helper()
	ns := systemdBoot(t)
	h := &sdhttpd{t: t, ns: ns, bin: bin, svc: filepath.Join(ns.dir, "httpd")}
	reloader := filepath.Join(ns.dir, "httpd-reload")
	for _, dst := range []string{h.svc, reloader} {
		if err := copyExecutable(bin, dst); err != nil {
			t.Fatal(err)
		}
	}

	service := sdhttpdReadUnit(t, "httpd.service")
	service = sdhttpdReplace(t, service, "\nExecStart=/usr/local/bin/httpd ", "\nExecStart="+h.svc+" -store-fds ")
	service = sdhttpdReplace(t, service, "\nExecReload=/usr/local/bin/httpd ", "\nExecReload="+reloader+" ")
	dropIn := []string{
		"[Unit]",
		"DefaultDependencies=no",
		"[Service]",
		"FileDescriptorStoreMax=4",
		"StandardOutput=append:" + filepath.Join(ns.dir, "httpd.log"),
		"StandardError=inherit",
		"Environment=\"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0") + "\"",
	}
	units := map[string]string{"httpd.service": service}
	if socket {
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

	// boot.sh copied the units that were there at boot into the
	// namespace's private /run; these go there too, through systemd's
	// root, and a daemon-reload makes systemd read them.
	run := h.rootPath("/run/systemd/system")
	for name, text := range units {
		path := filepath.Join(run, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ns.mustSystemctl("daemon-reload")

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
// itself to its thread, moves the thread into the namespace, and never
// unlocks it, so that the runtime ends the thread with the goroutine rather
// than let other goroutines run in the namespace.
func sdhttpdDial(ctx context.Context, pid int, network, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
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
	m := httpdBodyRE.FindStringSubmatch(string(b))
	if resp.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("GET / answered %s %q, want 200 and pid=PID generation=G", resp.Status, b)
	}
	return m[1], m[2]
}

// show returns a property of unit.
func (h *sdhttpd) show(unit, prop string) string {
	h.t.Helper()
	return h.ns.mustSystemctl("show", "--property="+prop, "--value", unit)
}

func (h *sdhttpd) state(unit string) string {
	h.t.Helper()
	return h.show(unit, "ActiveState") + "/" + h.show(unit, "SubState")
}

// waitShow waits until a property of unit has the value want.
func (h *sdhttpd) waitShow(unit, prop, want string) {
	h.t.Helper()
	deadline := time.Now().Add(testDeadline)
	for {
		got := h.show(unit, prop)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s of %s is %s after %v, want %s", prop, unit, got, testDeadline, want)
		}
	}
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
	if got := h.show("httpd.service", "MainPID"); got != pid {
		h.t.Errorf("MainPID=%s, but pid %s answered", got, pid)
	}
	if got := h.state("httpd.service"); got != "active/running" {
		h.t.Errorf("httpd.service is %s, want active/running", got)
	}
	return pid
}

// reload runs `systemctl reload httpd`, which must succeed, and checks that
// the new process the reload client names is the main process and answers
// as generation gen. It returns the new pid.
func (h *sdhttpd) reload(old string, gen int, restarts *int) string {
	h.t.Helper()
	h.ns.mustSystemctl("reload", "httpd.service")
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

// rootPath is the path of path in the namespace's mounts: under the
// namespaced systemd's root, /run is the namespace's private tmpfs and
// /proc the pid namespace's own.
func (h *sdhttpd) rootPath(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", h.ns.pid, path)
}

// procPath is the path of /proc/PID/NAME in the namespace, pid as the
// namespace knows it (MainPID=, the pid in httpd's answer).
func (h *sdhttpd) procPath(pid, name string) string {
	return h.rootPath("/proc/" + pid + "/" + name)
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

// checkNoWarnings checks that systemd dropped no datagram from a pid other
// than the main one. It first sends a datagram of its own to systemd's
// notify socket, from outside the namespace, so with no pid systemd can
// see, and waits for systemd to log that it ignored it: systemd reads the
// socket in order, so by then it has logged whatever it had to say about
// every datagram sent before, by any process.
func (h *sdhttpd) checkNoWarnings() {
	h.t.Helper()
	const ignored = "Received notify message without valid credentials"
	c := h.ns.console
	before := strings.Count(c.text(), ignored)
	n, err := NewSdNotifier(h.rootPath("/run/systemd/notify"))
	if err != nil {
		h.t.Fatal(err)
	}
	err = n.Send(SdStatus("flush"))
	n.Close()
	if err != nil {
		h.t.Fatal(err)
	}
	timer := time.NewTimer(testDeadline)
	defer timer.Stop()
	for {
		c.mu.Lock()
		text, changed, ended := string(c.buf), c.changed, c.ended
		c.mu.Unlock()
		if strings.Count(text, ignored) > before {
			break
		}
		if ended {
			h.t.Fatalf("the console closed before systemd logged %q", ignored)
		}
		select {
		case <-changed:
		case <-timer.C:
			h.t.Fatalf("systemd did not log %q within %v", ignored, testDeadline)
		}
	}
	h.ns.checkNoWarnings()
}
