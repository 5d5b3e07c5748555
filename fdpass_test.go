//go:build linux

package shellflip

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The fd registry: listeners across restarts, socket activation (fdpass.go).

// Tests of the named-fd registry across real restarts: every kind of fd is
// passed on under its name and is the same socket or file in the new
// process; LISTEN_* look as systemd sets them; socket activation by the real
// systemd-socket-activate; unclaimed fds are closed at Ready; hostile
// LISTEN_* environments are refused or ignored without a panic or a leak.
//
// The roles report what they see with fdpassSay: "kind pid=N key=value...",
// each value query-escaped so that names, paths and errors survive the
// space-separated report format; the tests read them back with fdpassField.

const (
	// Role "fdpass": what each generation listens on, adds and claims, as
	// comma-separated kind|name|network|address[|g0] items (see
	// fdpassParseSpecs).
	envFDPassSpecs = "SHELLFLIP_TEST_FDPASS_SPECS"
	// Role "fdpass": every generation works in this directory (it matters to
	// a relative unlink, which is what TestFDPassUnclaimed guards against).
	envFDPassDir = "SHELLFLIP_TEST_FDPASS_DIR"
	// Role "fdpass-many": prefix of the abstract socket names.
	envFDPassTag = "SHELLFLIP_TEST_FDPASS_TAG"
	// Role "fdpass-hostile": comma-separated names to claim with ListenNamed.
	envFDPassClaim = "SHELLFLIP_TEST_FDPASS_CLAIM"
	// Role "fdpass-hostile": open a file before the package's init, as a
	// package that reads one in its own init does; the first os.Open starts
	// the runtime's poller, whose epoll and eventfd fds take the lowest
	// free numbers.
	envFDPassOpenEarly = "SHELLFLIP_TEST_FDPASS_OPEN_EARLY"
	// Restartable fdpass roles: the new process that removes this file
	// leaves the state unread, so that its Start fails. It takes itself
	// for generation 1.
	envFDPassUnread = "SHELLFLIP_TEST_FDPASS_UNREAD"
	// Role "fdpass": call StoreFDs() before Start and report its error.
	envFDPassStore = "SHELLFLIP_TEST_FDPASS_STORE"
)

// fdpassScanFDs bounds the fd numbers the snapshot looks at.
const fdpassScanFDs = 2048

// fdpassManyN is how many listeners role "fdpass-many" passes on.
const fdpassManyN = 1000

// fdpassAtInit is the process as it was before the package's init took the
// inherited fds. Package-level variables are initialised before any init
// function of the package runs (Go spec, "Package initialization"), so this
// sees what execve passed, plus whatever the runtime opened before package
// initialisation (on cgroup hosts, its CPU limit files: at the lowest free
// fd numbers). Only the fdpass roles take the snapshot, with raw syscalls:
// an os.Open here would start the runtime's poller and so change what it
// looks at.
var fdpassAtInit = fdpassSnapshot()

type fdpassSnap struct {
	env  url.Values // LISTEN_* as os.LookupEnv saw them
	exec url.Values // LISTEN_* in /proc/self/environ: what execve passed
	// The fds 3 and up. An fd that was close-on-exec at initialisation
	// cannot have come through execve: this process (the Go runtime)
	// opened it.
	fds map[int]fdID
}

func fdpassSnapshot() fdpassSnap {
	if !strings.HasPrefix(os.Getenv(envTestRole), "fdpass") {
		return fdpassSnap{}
	}
	if os.Getenv(envFDPassOpenEarly) != "" {
		os.ReadFile("/proc/self/stat")
	}
	s := fdpassSnap{env: fdpassListenEnv(os.LookupEnv), exec: url.Values{}, fds: map[int]fdID{}}
	for fd := 3; fd < fdpassScanFDs; fd++ {
		if id, err := statFD(fd); err == nil {
			s.fds[fd] = id
		}
	}
	// Read after the scan, so that its transient fd is not in it.
	for _, kv := range strings.Split(fdpassReadRaw("/proc/self/environ"), "\x00") {
		k, v, _ := strings.Cut(kv, "=")
		if k == envListenPID || k == envListenFDs || k == envListenFDNames {
			s.exec.Set(k, v)
		}
	}
	return s
}

// fdpassReadRaw reads a file with plain syscalls, past the runtime's poller.
func fdpassReadRaw(path string) string {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	var out []byte
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if n <= 0 || err != nil {
			return string(out)
		}
		out = append(out, buf[:n]...)
	}
}

// fdpassListenEnv returns the LISTEN_* variables that lookup finds.
func fdpassListenEnv(lookup func(string) (string, bool)) url.Values {
	v := url.Values{}
	for _, k := range []string{envListenPID, envListenFDs, envListenFDNames} {
		if s, ok := lookup(k); ok {
			v.Set(k, s)
		}
	}
	return v
}

// fdpassSay reports a line to the test: kind, this pid, then key=value
// pairs with the values query-escaped.
func fdpassSay(kind string, kv ...string) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s pid=%d", kind, os.Getpid())
	for i := 0; i+1 < len(kv); i += 2 {
		b.WriteString(" " + kv[i] + "=" + url.QueryEscape(kv[i+1]))
	}
	report("%s", b.String())
}

// fdpassFail reports an error, which fails the test at its next wait.
func fdpassFail(format string, args ...any) int {
	report("error pid=%d %s", os.Getpid(), fmt.Sprintf(format, args...))
	return 1
}

// fdpassField returns the unescaped value of key in a report.
func fdpassField(rep map[string]string, key string) string {
	v, err := url.QueryUnescape(rep[key])
	if err != nil {
		return "(bad escape: " + rep[key] + ")"
	}
	return v
}

// fdpassValues decodes a field that holds url.Values.
func fdpassValues(t *testing.T, rep map[string]string, key string) url.Values {
	t.Helper()
	v, err := url.ParseQuery(fdpassField(rep, key))
	if err != nil {
		t.Fatalf("report field %s: %v", key, err)
	}
	return v
}

// fdpassNames splits a ':'-joined list of names; "" is the empty list.
func fdpassNames(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ":")
}

// fdpassInspect returns the O_NONBLOCK flag of the open file description
// behind c and its inode, inside Control: no (*os.File).Fd, which would make
// the shared description blocking.
func fdpassInspect(c syscall.Conn) (nonblock bool, ino uint64, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return false, 0, err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if err != nil {
			ferr = os.NewSyscallError("fcntl F_GETFL", err)
			return
		}
		nonblock = fl&unix.O_NONBLOCK != 0
		var st unix.Stat_t
		if err := unix.Fstat(int(fd), &st); err != nil {
			ferr = os.NewSyscallError("fstat", err)
			return
		}
		ino = st.Ino
	}); err != nil {
		return false, 0, err
	}
	return nonblock, ino, ferr
}

// fdpassBoot begins every restartable fdpass role: it reports "started",
// moves to $SHELLFLIP_TEST_FDPASS_DIR, and returns this process's
// generation, one more than the old process's (its state is that number).
func fdpassBoot() (gen int, ok bool) {
	fdpassSay("started")
	if d := os.Getenv(envFDPassDir); d != "" {
		if err := os.Chdir(d); err != nil {
			fdpassFail("chdir: %v", err)
			return 0, false
		}
	}
	st, err := ReceiveState()
	if err != nil {
		fdpassFail("receive: %v", err)
		return 0, false
	}
	if st == nil {
		return 0, true
	}
	if takeKnob(envFDPassUnread) {
		return 1, true
	}
	defer st.Close()
	b, err := io.ReadAll(st)
	if err != nil {
		fdpassFail("state: %v", err)
		return 0, false
	}
	g, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		fdpassFail("state %q", b)
		return 0, false
	}
	return g + 1, true
}

// fdpassTail is what a role does around the end that fdpassServe runs;
// every hook is optional.
type fdpassTail struct {
	afterStart func()          // right after Start (and so Ready) returned
	ready      func() []string // extra fields of the ready report
	retire     func()          // after the restart, before "replaced"
	linger     func()          // after "replaced", before exiting
}

// fdpassServe is the end of every restartable fdpass role: Start (which
// calls Ready), a "ready" report with gen, then wait to be replaced and
// report "replaced" as testCluster.restart expects; the hooks run in
// between.
func fdpassServe(gen int, tail fdpassTail) int {
	r, err := Start(context.Background(), Config{
		SocketPath: os.Getenv(envTestSocket),
		Lifecycle: &Lifecycle{SendState: func(ctx context.Context, w io.Writer) error {
			_, err := fmt.Fprintf(w, "%d\n", gen)
			return err
		}},
	})
	if err != nil {
		return fdpassFail("start: %v", err)
	}
	if tail.afterStart != nil {
		tail.afterStart()
	}
	fields := []string{"gen", strconv.Itoa(gen)}
	if tail.ready != nil {
		fields = append(fields, tail.ready()...)
	}
	fdpassSay("ready", fields...)
	p, err := r.Wait()
	if err != nil {
		fdpassSay("ended", "err", err.Error())
		return 1
	}
	if tail.retire != nil {
		tail.retire()
	}
	fdpassSay("replaced", "new", strconv.Itoa(p))
	if tail.linger != nil {
		tail.linger()
	}
	return 0
}

// fdpassSpec is one thing role "fdpass" holds.
//
//	listen: ListenConfig.Listen, under name, or ListenerName's for "-";
//	        greets every connection
//	packet: ListenConfig.ListenPacket, named likewise; reports datagrams
//	conn:   generation 0 dials network/address and Adds the connection;
//	        later ones take it with Conn; reports lines, answers "pong"
//	file:   generation 0 opens address (a regular file or a fifo) and Adds
//	        it; later ones take it with File. A regular file gets "g<gen>;"
//	        appended at the shared offset; a fifo's lines are reported.
//
// firstOnly (a trailing "|g0"): only generation 0 takes it; later ones
// leave the inherited fd unclaimed.
type fdpassSpec struct {
	kind, name, network, address string
	firstOnly                    bool
}

func fdpassParseSpecs(s string) ([]fdpassSpec, error) {
	var specs []fdpassSpec
	for _, item := range strings.Split(s, ",") {
		if item == "" {
			continue
		}
		f := strings.Split(item, "|")
		if len(f) < 4 || len(f) > 5 || len(f) == 5 && f[4] != "g0" {
			return nil, fmt.Errorf("bad spec %q", item)
		}
		specs = append(specs, fdpassSpec{f[0], f[1], f[2], f[3], len(f) == 5})
	}
	return specs, nil
}

func (sp fdpassSpec) String() string {
	s := strings.Join([]string{sp.kind, sp.name, sp.network, sp.address}, "|")
	if sp.firstOnly {
		s += "|g0"
	}
	return s
}

// regName is the name the spec's fd is registered under.
func (sp fdpassSpec) regName() string {
	if sp.name == "-" {
		return ListenerName(sp.network, sp.address)
	}
	return sp.name
}

// fdpassRole is a service that holds what $SHELLFLIP_TEST_FDPASS_SPECS
// says, exercises it for the test, and reports:
//
//	fdpass-env       LISTEN_* at exec, at variable initialisation and in
//	                 main, and whether FixupListenPID works
//	fdpass-socks     the inherited names, the names after claiming, and for
//	                 each spec s<i>=name|address|inode|nonblock
//	fdpass-inherited each inherited fd's state before and after Start
//	fdpass-paths     for unix specs bound to a path: the file before and
//	                 after Start
//	fdpass-recv      data that arrived (name, gen, data)
//
// Odd generations claim in reverse order, so that the registry's order
// must not follow the order of claims.
func fdpassRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	fdpassReportEnv(gen)
	specs, err := fdpassParseSpecs(os.Getenv(envFDPassSpecs))
	if err != nil {
		return fdpassFail("%v", err)
	}
	inheritedNames := registryNames()
	order := make([]int, len(specs))
	for i := range order {
		order[i] = i
	}
	if gen%2 == 1 {
		slices.Reverse(order)
	}
	var held []io.Closer
	descs := make([]string, len(specs))
	for _, i := range order {
		sp := specs[i]
		if sp.firstOnly && gen > 0 {
			continue
		}
		desc, c, err := fdpassClaim(sp, gen)
		if err != nil {
			return fdpassFail("%s: %v (registry %q)", sp, err, registryNames())
		}
		descs[i] = desc
		held = append(held, c)
	}
	socks := []string{"gen", strconv.Itoa(gen), "inherited", strings.Join(inheritedNames, ":"), "names", strings.Join(registryNames(), ":")}
	for i, d := range descs {
		socks = append(socks, "s"+strconv.Itoa(i), d)
	}
	fdpassSay("fdpass-socks", socks...)
	if os.Getenv(envFDPassStore) != "" {
		fdpassSay("fdpass-store", "err", fmt.Sprint(StoreFDs()))
	}

	// The inherited fds as the environment named them before the package's
	// init, and the socket files of unix specs, before Start...
	inh := fdpassInheritedFDs()
	before := url.Values{}
	for _, f := range inh {
		before.Add(f.name, f.id.state(f.fd))
	}
	paths := url.Values{}
	for i, sp := range specs {
		if strings.HasPrefix(sp.network, "unix") && sp.kind != "file" && !strings.HasPrefix(sp.address, "@") {
			paths.Set("s"+strconv.Itoa(i), fdpassPathKind(sp.address))
		}
	}
	// ...and after: Start calls Ready, which closes the unclaimed ones.
	// Checked before anything else can open an fd at a freed number.
	afterStart := func() {
		if len(inh) == 0 {
			return // a fresh start: nothing inherited, nothing to report
		}
		after := url.Values{}
		for _, f := range inh {
			after.Add(f.name, f.id.state(f.fd))
		}
		fdpassSay("fdpass-inherited", "gen", strconv.Itoa(gen), "before", before.Encode(), "after", after.Encode())
		for k := range paths {
			i, _ := strconv.Atoi(k[1:])
			paths.Set(k, paths.Get(k)+","+fdpassPathKind(specs[i].address))
		}
		fdpassSay("fdpass-paths", "gen", strconv.Itoa(gen), "paths", paths.Encode())
	}
	return fdpassServe(gen, fdpassTail{
		afterStart: afterStart,
		ready:      func() []string { return []string{"names", strings.Join(registryNames(), ":")} },
		retire: func() {
			// Close everything this process holds, listeners included:
			// closing them must neither unlink a socket file nor stop the
			// new process. Close waits for pending Accepts and Reads to
			// return, so from here on only the new process takes
			// connections and data.
			for _, c := range held {
				c.Close()
			}
		},
	})
}

// fdpassClaim takes what sp describes and starts exercising it. It returns
// name|address|inode|nonblock and what to close at retirement.
func fdpassClaim(sp fdpassSpec, gen int) (string, io.Closer, error) {
	name := sp.regName()
	var (
		c    io.Closer
		sc   syscall.Conn
		addr string
	)
	lc := ListenConfig{Name: name}
	switch sp.kind {
	case "listen":
		ln, err := lc.Listen(context.Background(), sp.network, sp.address)
		if err != nil {
			return "", nil, err
		}
		go fdpassGreet(ln, gen, name)
		c, sc, addr = ln, ln.(syscall.Conn), ln.Addr().String()
	case "packet":
		pc, err := lc.ListenPacket(context.Background(), sp.network, sp.address)
		if err != nil {
			return "", nil, err
		}
		go func() {
			var buf [512]byte
			for {
				n, _, err := pc.ReadFrom(buf[:])
				if err != nil {
					return
				}
				fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", string(buf[:n]))
			}
		}()
		c, sc, addr = pc, pc.(syscall.Conn), pc.LocalAddr().String()
	case "conn":
		var conn net.Conn
		var err error
		if gen == 0 {
			if conn, err = net.Dial(sp.network, sp.address); err != nil {
				return "", nil, err
			}
			if err := Add(name, conn.(syscall.Conn)); err != nil {
				return "", nil, err
			}
		} else if conn, err = fdConn(name); err != nil || conn == nil {
			return "", nil, fmt.Errorf("fdConn(%q) = %v, %v", name, conn, err)
		}
		go func() {
			sc := bufio.NewScanner(conn)
			for sc.Scan() {
				fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", sc.Text())
				fmt.Fprintf(conn, "pong pid=%d gen=%d\n", os.Getpid(), gen)
			}
		}()
		c, sc, addr = conn, conn.(syscall.Conn), conn.LocalAddr().String()+">"+conn.RemoteAddr().String()
	case "file":
		var f *os.File
		var err error
		if gen == 0 {
			if f, err = os.OpenFile(sp.address, os.O_RDWR|os.O_CREATE, 0o600); err != nil {
				return "", nil, err
			}
			if err := Add(name, f); err != nil {
				return "", nil, err
			}
		} else if f, err = FD(name); err != nil || f == nil {
			return "", nil, fmt.Errorf("File(%q) = %v, %v", name, f, err)
		}
		fi, err := f.Stat()
		if err != nil {
			return "", nil, err
		}
		if fi.Mode().IsRegular() {
			// Written at the offset of the shared open file description:
			// only the same description continues where the last
			// generation stopped.
			if _, err := fmt.Fprintf(f, "g%d;", gen); err != nil {
				return "", nil, err
			}
		} else {
			go func() {
				sc := bufio.NewScanner(f)
				for sc.Scan() {
					fdpassSay("fdpass-recv", "gen", strconv.Itoa(gen), "name", name, "data", sc.Text())
				}
			}()
		}
		c, sc, addr = f, f, "-"
	default:
		return "", nil, fmt.Errorf("unknown kind %q", sp.kind)
	}
	nonblock, ino, err := fdpassInspect(sc)
	if err != nil {
		c.Close()
		return "", nil, err
	}
	return strings.Join([]string{name, addr, strconv.FormatUint(ino, 10), strconv.FormatBool(nonblock)}, "|"), c, nil
}

// fdpassGreet greets every connection with pid, generation and name.
func fdpassGreet(ln net.Listener, gen int, name string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(c, "pid=%d gen=%d name=%s\n", os.Getpid(), gen, name)
		c.Close()
	}
}

// fdpassPathKind says what is at path: "sock", "gone" or something else.
func fdpassPathKind(path string) string {
	var st unix.Stat_t
	switch err := unix.Lstat(path, &st); {
	case err == unix.ENOENT:
		return "gone"
	case err != nil:
		return err.Error()
	case st.Mode&unix.S_IFMT == unix.S_IFSOCK:
		return "sock"
	}
	return fmt.Sprintf("mode%o", st.Mode)
}

type fdpassInherited struct {
	name string
	fd   int
	id   fdID
}

// fdpassInheritedFDs lists the fds that LISTEN_FDS and LISTEN_FDNAMES named
// before the package's init, with what was at each then.
func fdpassInheritedFDs() []fdpassInherited {
	n, err := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs))
	if err != nil {
		return nil
	}
	names := strings.Split(fdpassAtInit.env.Get(envListenFDNames), ":")
	var out []fdpassInherited
	for i := 0; i < n && i < len(names); i++ {
		out = append(out, fdpassInherited{names[i], listenFDsStart + i, fdpassAtInit.fds[listenFDsStart+i]})
	}
	return out
}

// fdpassReportEnv reports what the role can observe of LISTEN_*: the
// environment execve passed (/proc/self/environ, which no later setenv or
// unsetenv changes), what Go code saw before the package's init, what main
// sees with os.LookupEnv and in os.Environ (what a child would inherit),
// the inodes of the fds at 3.. at initialisation, and whether
// FixupListenPID turns "auto" into this pid and leaves other values alone.
func fdpassReportEnv(gen int) {
	var environ []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "LISTEN_") {
			environ = append(environ, kv)
		}
	}
	var inos []string
	n, _ := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs))
	for i := 0; i < n && i < 64; i++ {
		inos = append(inos, strconv.FormatUint(fdpassAtInit.fds[listenFDsStart+i].ino, 10))
	}
	fixup := "ok"
	if _, set := os.LookupEnv(envListenPID); set {
		fixup = "LISTEN_PID is still set in main"
	} else {
		os.Setenv(envListenPID, listenPIDAuto)
		fixupPIDs()
		if got := os.Getenv(envListenPID); got != strconv.Itoa(os.Getpid()) {
			fixup = "auto became " + got
		}
		os.Setenv(envListenPID, "1")
		fixupPIDs()
		if got := os.Getenv(envListenPID); got != "1" {
			fixup = "1 became " + got
		}
		os.Unsetenv(envListenPID)
	}
	fdpassSay("fdpass-env", "gen", strconv.Itoa(gen),
		"exec", fdpassAtInit.exec.Encode(),
		"init", fdpassAtInit.env.Encode(),
		"main", fdpassListenEnv(os.LookupEnv).Encode(),
		"environ", strings.Join(environ, "\n"),
		"initfds", strings.Join(inos, ","),
		"fixup", fixup)
}

// fdpassSock is one s<i> field of an fdpass-socks report.
type fdpassSock struct{ name, addr, ino, nonblock string }

func fdpassSocks(t *testing.T, rep map[string]string, n int) []fdpassSock {
	t.Helper()
	socks := make([]fdpassSock, n)
	for i := range socks {
		v := fdpassField(rep, "s"+strconv.Itoa(i))
		if v == "" {
			continue // not claimed by this generation
		}
		f := strings.Split(v, "|")
		if len(f) != 4 {
			t.Fatalf("bad socket description %q", v)
		}
		socks[i] = fdpassSock{f[0], f[1], f[2], f[3]}
	}
	return socks
}

func fdpassHaveIPv6() (bool, error) {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false, err
	}
	ln.Close()
	return true, nil
}

// TestFDPassEveryKind passes every kind of fd through two real restarts:
// listeners (tcp, tcp4, tcp6, unix, unixpacket), packet conns (udp,
// unixgram), a connected TCP socket (Add/Conn), a fifo and a regular file
// (Add/File). Each generation must hold the same socket or open file (same
// inode, same address), under the same name, with registryNames() in the order of
// generation 0 although generation 1 claims in reverse order; sockets stay
// non-blocking; and what the test sends after a restart reaches the new
// process: a greeting from each listener, each datagram, data on the
// connection (and its answer back), a line in the fifo. Each generation
// appends to the regular file at the offset the last one left.
func TestFDPassEveryKind(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	peer, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	fifo := filepath.Join(c.dir, "pipe")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(c.dir, "file")
	specs := []fdpassSpec{
		{kind: "listen", name: "-", network: "tcp", address: "127.0.0.1:0"},
		{kind: "listen", name: "-", network: "tcp4", address: "127.0.0.1:0"},
		{kind: "listen", name: "-", network: "unix", address: filepath.Join(c.dir, "stream.sock")},
		{kind: "listen", name: "-", network: "unixpacket", address: filepath.Join(c.dir, "seqpacket.sock")},
		{kind: "packet", name: "-", network: "udp", address: "127.0.0.1:0"},
		{kind: "packet", name: "-", network: "unixgram", address: filepath.Join(c.dir, "dgram.sock")},
		{kind: "conn", name: "conn", network: "tcp", address: peer.Addr().String()},
		{kind: "file", name: "pipe", network: "fifo", address: fifo},
		{kind: "file", name: "file", network: "file", address: file},
	}
	ipv6, v6err := fdpassHaveIPv6()
	if ipv6 {
		specs = append(specs, fdpassSpec{kind: "listen", name: "-", network: "tcp6", address: "[::1]:0"})
	}
	var items []string
	for _, sp := range specs {
		items = append(items, sp.String())
	}
	r0 := c.start("fdpass", envFDPassSpecs+"="+strings.Join(items, ","))
	s0 := c.reports.next("fdpass-socks")
	names0 := fdpassNames(fdpassField(s0, "names"))
	var want []string
	for _, sp := range specs {
		want = append(want, sp.regName())
	}
	if !slices.Equal(names0, want) {
		t.Fatalf("generation 0 registered %q, want %q", names0, want)
	}
	if inh := fdpassField(s0, "inherited"); inh != "" {
		t.Errorf("generation 0 inherited %q from nowhere", inh)
	}
	socks0 := fdpassSocks(t, s0, len(specs))
	for i, sp := range specs {
		if sp.kind != "file" && socks0[i].nonblock != "true" {
			// A blocking shared socket would also hang the old process's
			// retirement: stop here.
			t.Fatalf("generation 0 %s: the socket is in blocking mode once registered", sp)
		}
	}
	peer.(*net.TCPListener).SetDeadline(time.Now().Add(testDeadline))
	peerConn, err := peer.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peerConn.Close()
	peerConn.SetDeadline(time.Now().Add(testDeadline))
	peerLines := bufio.NewReader(peerConn)

	pid := r0["pid"]
	for gen := 1; gen <= 2; gen++ {
		ready := c.restart(pid)
		pid = ready["pid"]
		s := c.reports.next("fdpass-socks")
		if s["pid"] != pid {
			t.Fatalf("generation %d's sockets reported by pid %s, want %s", gen, s["pid"], pid)
		}
		if got := fdpassNames(fdpassField(s, "inherited")); !slices.Equal(got, names0) {
			t.Errorf("generation %d inherited names %q, want generation 0's %q in that order", gen, got, names0)
		}
		if got := fdpassNames(fdpassField(s, "names")); !slices.Equal(got, names0) {
			t.Errorf("generation %d's registry after claiming: %q, want %q", gen, got, names0)
		}
		socks := fdpassSocks(t, s, len(specs))
		for i, sp := range specs {
			got, was := socks[i], socks0[i]
			if got != (fdpassSock{was.name, was.addr, was.ino, got.nonblock}) {
				t.Errorf("generation %d %s: got %+v, generation 0 had %+v: not the same socket or file", gen, sp, got, was)
			}
			if sp.kind != "file" && got.nonblock != "true" {
				t.Errorf("generation %d %s: the shared socket is in blocking mode", gen, sp)
			}
		}
		// Generation gen-1 closed all it held before it reported that it was
		// replaced: from here on only generation gen can answer.
		for i, sp := range specs {
			addr := socks[i].addr
			switch sp.kind {
			case "listen":
				fdpassGreets(t, sp.network, addr, pid, gen, sp.regName())
			case "packet":
				pc, err := net.Dial(sp.network, addr)
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(pc, "ping%d", gen)
				pc.Close()
				fdpassWantRecv(t, c, pid, gen, sp.regName(), fmt.Sprintf("ping%d", gen))
			case "conn":
				fmt.Fprintf(peerConn, "ping%d\n", gen)
				fdpassWantRecv(t, c, pid, gen, sp.name, fmt.Sprintf("ping%d", gen))
				line, err := peerLines.ReadString('\n')
				if wantLine := fmt.Sprintf("pong pid=%s gen=%d\n", pid, gen); line != wantLine || err != nil {
					t.Errorf("answer on the passed connection: %q, %v; want %q", line, err, wantLine)
				}
			case "file":
				if sp.network != "fifo" {
					continue
				}
				// Readers hold the fifo open, so this open does not block.
				w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(w, "ping%d\n", gen)
				w.Close()
				fdpassWantRecv(t, c, pid, gen, sp.name, fmt.Sprintf("ping%d", gen))
			}
		}
	}
	if b, err := os.ReadFile(file); string(b) != "g0;g1;g2;" {
		t.Errorf("regular file holds %q, %v; want %q: every generation writes at the shared offset", b, err, "g0;g1;g2;")
	}
	if !ipv6 {
		t.Run("tcp6", func(t *testing.T) { t.Skipf("no IPv6 loopback on this machine (%v): tcp6 not tested", v6err) })
	}
}

// fdpassWantRecv waits for the report of data that reached pid.
func fdpassWantRecv(t *testing.T, c *testCluster, pid string, gen int, name, data string) {
	t.Helper()
	r := c.reports.next("fdpass-recv")
	if r["pid"] != pid || fdpassField(r, "gen") != strconv.Itoa(gen) || fdpassField(r, "name") != name || fdpassField(r, "data") != data {
		t.Errorf("received %v; want %q on %q by pid %s (generation %d)", r, data, name, pid, gen)
	}
}

// fdpassGreets checks that the listener at addr is served by pid, as
// generation gen, under name ("" for a listener of role "server").
func fdpassGreets(t *testing.T, network, addr, pid string, gen int, name string) {
	t.Helper()
	if h := dialHello(t, network, addr); h["pid"] != pid || h["gen"] != strconv.Itoa(gen) || h["name"] != name {
		t.Errorf("%s %s greeted with %v, want pid=%s gen=%d name=%s", network, addr, h, pid, gen, name)
	}
}

// TestFDPassListenEnv checks LISTEN_* as a process started by a restart
// observes them:
//   - as execve passed them (/proc/self/environ): LISTEN_FDS the number of
//     fds, LISTEN_FDNAMES their names in the old process's registryNames() order,
//     joined by ':' (sd_listen_fds_with_names(3)), and LISTEN_PID either
//     this pid or "auto", the placeholder the library documents (the old
//     process cannot know the pid before the fork); never the old pid;
//   - the same in Go code that runs before the package's init;
//   - the fds at 3.. are the passed sockets and files, in that order;
//   - the package's init made LISTEN_PID this pid: the fds were adopted,
//     which takeListenFDs does only for LISTEN_PID == getpid(), and
//     FixupListenPID turns "auto" into this pid and leaves other pids alone;
//   - in main all three are unset (os.LookupEnv) and absent from
//     os.Environ(), so no child inherits them.
func TestFDPassListenEnv(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	specs := []string{
		"listen|-|tcp|127.0.0.1:0",
		"listen|-|unix|" + filepath.Join(c.dir, "l.sock"),
		"packet|-|udp|127.0.0.1:0",
		"file|state-file|file|" + filepath.Join(c.dir, "file"),
	}
	r0 := c.start("fdpass", envFDPassSpecs+"="+strings.Join(specs, ","))
	e0 := c.reports.next("fdpass-env")
	for _, k := range []string{"exec", "init", "main", "environ"} {
		if v := fdpassField(e0, k); v != "" {
			t.Errorf("generation 0 (a fresh start) sees LISTEN_* %s: %q", k, v)
		}
	}
	names0 := fdpassNames(fdpassField(c.reports.next("fdpass-socks"), "names"))
	r1 := c.restart(r0["pid"])
	e1 := c.reports.next("fdpass-env")
	s1 := c.reports.next("fdpass-socks")
	if e1["pid"] != r1["pid"] || s1["pid"] != r1["pid"] {
		t.Fatalf("reports from pids %s and %s, want %s", e1["pid"], s1["pid"], r1["pid"])
	}
	atExec := fdpassValues(t, e1, "exec")
	if got := atExec.Get(envListenFDs); got != strconv.Itoa(len(names0)) {
		t.Errorf("LISTEN_FDS=%q at exec, want %d", got, len(names0))
	}
	if got := atExec.Get(envListenFDNames); got != strings.Join(names0, ":") {
		t.Errorf("LISTEN_FDNAMES=%q at exec, want %q", got, strings.Join(names0, ":"))
	}
	switch got := atExec.Get(envListenPID); got {
	case r1["pid"]:
	case listenPIDAuto:
		t.Logf("LISTEN_PID=%s at exec (systemd would put the pid there); the package's init replaces it", got)
	default:
		t.Errorf("LISTEN_PID=%q at exec, want %s or %q (old process: %s)", got, r1["pid"], listenPIDAuto, r0["pid"])
	}
	if init := fdpassValues(t, e1, "init"); init.Encode() != atExec.Encode() {
		t.Errorf("before the package's init Go code saw %q, execve passed %q", init.Encode(), atExec.Encode())
	}
	if got := fdpassNames(fdpassField(s1, "inherited")); !slices.Equal(got, names0) {
		t.Errorf("inherited %q: LISTEN_PID was not taken as this process's pid?", got)
	}
	socks := fdpassSocks(t, s1, len(specs))
	var wantInos []string
	for _, name := range names0 {
		for _, s := range socks {
			if s.name == name {
				wantInos = append(wantInos, s.ino)
			}
		}
	}
	if got := fdpassField(e1, "initfds"); got != strings.Join(wantInos, ",") {
		t.Errorf("inodes at fds 3.. at exec: %s, want the named fds' %s in LISTEN_FDNAMES order", got, strings.Join(wantInos, ","))
	}
	if got := fdpassField(e1, "main"); got != "" {
		t.Errorf("main sees LISTEN_* %q after the package's init", got)
	}
	if got := fdpassField(e1, "environ"); got != "" {
		t.Errorf("os.Environ() in main still has %q", got)
	}
	if got := fdpassField(e1, "fixup"); got != "ok" {
		t.Errorf("FixupListenPID: %s", got)
	}
}

// TestFDPassSocketActivation runs the role under the real
// systemd-socket-activate, which binds 127.0.0.1:PORT, waits for the first
// connection and execs the role with LISTEN_FDS=1, LISTEN_FDNAMES=web and
// LISTEN_PID set. The role claims "web" with ListenNamed and an address of
// "127.0.0.1:0", so a bind of its own would show as another port: its
// listener must be the socket at fd 3 (same inode) on PORT, and the first
// connection, queued before the role existed, gets its greeting. After a
// restart the new process has the same socket under the same name and
// serves it.
func TestFDPassSocketActivation(t *testing.T) {
	t.Parallel()
	ssa, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skipf("systemd-socket-activate not found (%v); install systemd to run this test (CI does)", err)
	}
	c := newTestCluster(t)
	cmd, port := fdpassStartActivator(t, c, ssa)
	addr := "127.0.0.1:" + strconv.Itoa(port)

	// The first connection activates the service. A failure here is only
	// reported: the role's reports below say more about what went wrong.
	if h, err := tryHello("tcp", addr); err != nil || h["pid"] != strconv.Itoa(cmd.Process.Pid) || h["gen"] != "0" || h["name"] != "web" {
		t.Errorf("first connection greeted with %v, %v; want pid=%d gen=0 name=web", h, err, cmd.Process.Pid)
	}
	c.reports.next("started")
	e0 := c.reports.next("fdpass-env")
	s0 := c.reports.next("fdpass-socks")
	r0 := c.reports.next("ready")
	if r0["pid"] != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("ready report from pid %s, systemd-socket-activate's pid is %d", r0["pid"], cmd.Process.Pid)
	}
	atExec := fdpassValues(t, e0, "exec")
	want := url.Values{envListenFDs: {"1"}, envListenFDNames: {"web"}, envListenPID: {r0["pid"]}}
	if atExec.Encode() != want.Encode() {
		t.Errorf("systemd-socket-activate passed %q, want %q", atExec.Encode(), want.Encode())
	}
	if got := fdpassField(e0, "main"); got != "" {
		t.Errorf("main sees LISTEN_* %q after the package's init", got)
	}
	if got := fdpassField(s0, "inherited"); got != "web" {
		t.Errorf("registry at start: %q, want \"web\"", got)
	}
	sock0 := fdpassSocks(t, s0, 1)[0]
	if sock0.addr != addr {
		t.Errorf("the role listens on %s, systemd-socket-activate bound %s", sock0.addr, addr)
	}
	if initIno := fdpassField(e0, "initfds"); sock0.ino != initIno {
		t.Errorf("the role's listener is inode %s, fd 3 from systemd-socket-activate was %s", sock0.ino, initIno)
	}

	r1 := c.restart(r0["pid"])
	s1 := c.reports.next("fdpass-socks")
	if got := fdpassField(s1, "inherited"); got != "web" {
		t.Errorf("new process inherited %q, want \"web\"", got)
	}
	if sock1 := fdpassSocks(t, s1, 1)[0]; sock1 != sock0 {
		t.Errorf("new process holds %+v, the activated one held %+v", sock1, sock0)
	}
	fdpassGreets(t, "tcp", addr, r1["pid"], 1, "web")
}

// fdpassStartActivator starts systemd-socket-activate on a free port with
// role "fdpass" claiming "web", and waits until it listens (it says so on
// stderr). A port taken between choosing and binding is retried.
func fdpassStartActivator(t *testing.T, c *testCluster, ssa string) (*exec.Cmd, int) {
	t.Helper()
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		listen := "127.0.0.1:" + strconv.Itoa(port)
		cmd := exec.Command(ssa, "-l", listen, "--fdname=web",
			// systemd-socket-activate passes only TERM, PATH, USER, HOME
			// and these to the program.
			"-E", envTestRole+"=fdpass",
			"-E", envTestReport+"="+c.reports.path,
			"-E", envTestSocket+"="+c.socket,
			"-E", envFDPassSpecs+"=listen|web|tcp|127.0.0.1:0",
			"-E", goraceEnv(),
			os.Args[0], "-test.run=^$")
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = os.Stderr, w
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		c.track(cmd.Process.Pid)
		// Lines go to the loop below until it found what it waits for, and
		// on to our stderr after that: the role inherits this pipe as its
		// stderr and must never block on it.
		lines, found := make(chan string), make(chan struct{})
		go func() {
			defer r.Close()
			br := bufio.NewReader(r)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					close(lines)
					return
				}
				select {
				case lines <- line:
				case <-found:
					os.Stderr.WriteString(line)
				}
			}
		}()
		var said []string
		timeout := time.After(testDeadline)
	wait:
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					break wait
				}
				said = append(said, line)
				if strings.HasPrefix(line, "Listening on "+listen) {
					close(found)
					c.adopt(cmd)
					return cmd, port
				}
			case <-timeout:
				t.Fatalf("systemd-socket-activate did not say it listens: %q", said)
			}
		}
		cmd.Wait()
		if attempt == 2 {
			t.Fatalf("systemd-socket-activate failed: %q", said)
		}
	}
}

// TestFDPassUnclaimed: a process started by a restart inherits five
// listeners and claims two (a tcp and a unix one). Before Ready every
// inherited fd is still open, so a program may claim late; after Ready the
// unclaimed fd numbers are closed and the claimed ones stay, the unclaimed
// unix listener's socket file is unlinked and the claimed one's is kept.
// The abstract listener has no file: nothing is unlinked for it, not even
// a file named like it in the working directory. Once the old process has
// exited too, the unclaimed tcp port and the abstract name refuse
// connections; the claimed listeners serve.
func TestFDPassUnclaimed(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	abstract := fmt.Sprintf("@shellflip-fdpass-%d-%d", os.Getpid(), time.Now().UnixNano())
	// A socket file named like the abstract socket, in the role's working
	// directory: what a relative unlink of the abstract name would hit.
	decoyPath := filepath.Join(c.dir, abstract)
	decoy, err := net.Listen("unix", decoyPath)
	if err != nil {
		t.Fatal(err)
	}
	defer decoy.Close()
	specs := []fdpassSpec{
		{kind: "listen", name: "keep", network: "tcp", address: "127.0.0.1:0"},
		{kind: "listen", name: "drop", network: "tcp", address: "127.0.0.1:0", firstOnly: true},
		{kind: "listen", name: "keepunix", network: "unix", address: filepath.Join(c.dir, "keep.sock")},
		{kind: "listen", name: "dropunix", network: "unix", address: filepath.Join(c.dir, "drop.sock"), firstOnly: true},
		{kind: "listen", name: "dropabstract", network: "unix", address: abstract, firstOnly: true},
	}
	var items []string
	for _, sp := range specs {
		items = append(items, sp.String())
	}
	r0 := c.start("fdpass", envFDPassSpecs+"="+strings.Join(items, ","), envFDPassDir+"="+c.dir)
	socks0 := fdpassSocks(t, c.reports.next("fdpass-socks"), len(specs))
	r1 := c.restart(r0["pid"])
	inh := c.reports.next("fdpass-inherited")
	if inh["pid"] != r1["pid"] {
		t.Fatalf("inherited fds reported by %s, want %s", inh["pid"], r1["pid"])
	}
	before, after := fdpassValues(t, inh, "before"), fdpassValues(t, inh, "after")
	for _, sp := range specs {
		if got := before.Get(sp.name); got != "same" {
			t.Errorf("%s: before Ready the inherited fd is %q, want it open (same socket)", sp.name, got)
		}
		want := "same"
		if sp.firstOnly {
			want = "closed"
		}
		if got := after.Get(sp.name); got != want {
			t.Errorf("%s: after Ready the inherited fd is %q, want %q", sp.name, got, want)
		}
	}
	paths := fdpassValues(t, c.reports.next("fdpass-paths"), "paths")
	if got := paths.Get("s2"); got != "sock,sock" {
		t.Errorf("claimed unix listener's file before,after Ready: %s, want sock,sock", got)
	}
	if got := paths.Get("s3"); got != "sock,gone" {
		t.Errorf("unclaimed unix listener's file before,after Ready: %s, want sock,gone", got)
	}
	if names := fdpassNames(fdpassField(r1, "names")); !slices.Equal(names, []string{"keep", "keepunix"}) {
		t.Errorf("registry after Ready: %q, want only the claimed names", names)
	}
	if got := fdpassPathKind(decoyPath); got != "sock" {
		t.Errorf("the file named like the abstract socket is %s after Ready: unlinked for an abstract listener", got)
	}

	c.waitExit()
	for _, i := range []int{1, 4} {
		conn, err := net.DialTimeout(specs[i].network, socks0[i].addr, testDeadline)
		if err == nil {
			conn.Close()
			t.Errorf("%s (%s) still accepts connections after both processes let go of it", specs[i].name, socks0[i].addr)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %v, want connection refused", specs[i].name, err)
		}
	}
	for _, i := range []int{0, 2} {
		fdpassGreets(t, specs[i].network, socks0[i].addr, r1["pid"], 1, specs[i].name)
	}
}

// fdpassActivate starts role "fdpass" as a service manager would: files at
// fds 3.., LISTEN_FDS and LISTEN_PID set ("auto", which the package's init
// makes this pid, as systemd would have set it), and env. It returns the
// ready report.
func fdpassActivate(c *testCluster, files []*os.File, env ...string) map[string]string {
	c.t.Helper()
	env = append([]string{envListenPID + "=" + listenPIDAuto, envListenFDs + "=" + strconv.Itoa(len(files))}, env...)
	return c.startCmd(os.Args[0], "fdpass", func(cmd *exec.Cmd) { cmd.ExtraFiles = files }, env...)
}

// TestFDPassUnclaimedActivated: a fresh process that a launcher (here the
// test, as systemd would) passed a unix listener, and that does not claim
// it, closes its copy at Ready but leaves the socket file: the launcher
// owns it and still accepts on it.
func TestFDPassUnclaimedActivated(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	path := filepath.Join(c.dir, "admin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fdpassActivate(c, []*os.File{f}, envListenFDNames+"=admin")
	if got := fdpassValues(t, c.reports.next("fdpass-inherited"), "after").Get("admin"); got != "closed" {
		t.Errorf("the unclaimed inherited fd after Ready: %q, want it closed", got)
	}
	if got := fdpassPathKind(path); got != "sock" {
		t.Errorf("the launcher's socket file after the service's Ready: %s, want sock", got)
	}
	fdpassAcceptOne(t, ln, "unix", path)
}

// TestFDPassUnclaimedFailedRestart: a new process that does not claim an
// inherited unix listener and whose Start fails (it left the state unread)
// leaves the socket file alone: the old process serves on.
func TestFDPassUnclaimedFailedRestart(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	path := filepath.Join(c.dir, "old.sock")
	knob := filepath.Join(c.dir, "unread")
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sp := fdpassSpec{kind: "listen", name: "old", network: "unix", address: path, firstOnly: true}
	r0 := c.start("fdpass", envFDPassSpecs+"="+sp.String(), envFDPassUnread+"="+knob)
	if err := c.requestErr(); !strings.Contains(err.Error(), "not read to its end") {
		t.Errorf("RequestRestart: %v, want the new process's failure to read the state", err)
	}
	// The old process answered after it reaped the new one.
	if got := fdpassPathKind(path); got != "sock" {
		t.Errorf("the old process's socket file after the failed restart: %s, want sock", got)
	}
	fdpassGreets(t, "unix", path, r0["pid"], 0, "old")
}

// TestFDPassStoreSameName: a service passed two listeners with LISTEN_FDS=2
// and no LISTEN_FDNAMES, so both named "unknown", stores them with
// StoreFDs(): the (fake) manager receives both, each in its own FDSTORE=1
// datagram under that name, not the first one twice.
func TestFDPassStoreSameName(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	mgr := sdListen(t, false)
	var files []*os.File
	want := map[uint64]bool{}
	for range 2 {
		f, ino := fdpassTCPFile(t)
		want[ino] = true
		files = append(files, f)
	}
	fdpassActivate(c, files, envFDPassStore+"=1", "NOTIFY_SOCKET="+mgr.addr)
	if err := fdpassField(c.reports.next("fdpass-store"), "err"); err != "<nil>" {
		t.Fatalf("StoreFDs: %s", err)
	}
	got := map[uint64]bool{}
	for range 2 {
		msg, fds := mgr.recv(t)
		var st unix.Stat_t
		if msg != "FDSTORE=1\nFDNAME=unknown" || len(fds) != 1 || unix.Fstat(fds[0], &st) != nil {
			t.Errorf("the manager received %q with %d fds, want FDSTORE=1 of one fd named unknown", msg, len(fds))
		}
		got[st.Ino] = true
		sdCloseFDs(fds)
	}
	if !maps.Equal(got, want) {
		t.Errorf("stored sockets (inodes) %v, want the two passed: %v", got, want)
	}
}

// TestFDPassStoreQueueFull: while the manager's queue is full, StoreFDs
// gives up after handOverTimeout, rather than holding the locks that a
// handover needs for ever.
func TestFDPassStoreQueueFull(t *testing.T) {
	if testing.Short() {
		t.Skip("waits out StoreFDs' 5 s bound; skipped under -short")
	}
	t.Parallel()
	c := newTestCluster(t)
	mgr := sdListen(t, false)
	fill, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: mgr.addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer fill.Close()
	for i := 0; err == nil; i++ {
		if i == 100000 {
			t.Fatal("the queue never filled")
		}
		fill.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		_, err = fill.Write([]byte("WATCHDOG=1"))
	}
	f, _ := fdpassTCPFile(t)
	// Not fdpassActivate: Start's READY=1 would wait for the full queue too.
	cmd := c.command(os.Args[0], "fdpass", envListenPID+"="+listenPIDAuto, envListenFDs+"=1",
		envFDPassStore+"=1", "NOTIFY_SOCKET="+mgr.addr)
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c.adopt(cmd)
	start := time.Now()
	err0 := fdpassField(c.reports.next("fdpass-store"), "err")
	if took := time.Since(start); !strings.Contains(err0, "i/o timeout") || took < handOverTimeout {
		t.Errorf("StoreFDs on a full queue: %q after %v, want a timeout after %v", err0, took, handOverTimeout)
	}
}

// TestFDPassOldKeepsSocketFile: the old process closes its unix listeners
// (stream, seqpacket, datagram) on its way out and exits; the socket files
// stay, and the new process still serves on them.
func TestFDPassOldKeepsSocketFile(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	stream, seq, dgram := filepath.Join(c.dir, "s.sock"), filepath.Join(c.dir, "q.sock"), filepath.Join(c.dir, "d.sock")
	r0 := c.start("fdpass", envFDPassSpecs+"=listen|-|unix|"+stream+",listen|-|unixpacket|"+seq+",packet|-|unixgram|"+dgram)
	r1 := c.restart(r0["pid"])
	// The old process closed its listeners before it reported "replaced".
	c.waitExit()
	for _, p := range []string{stream, seq, dgram} {
		if got := fdpassPathKind(p); got != "sock" {
			t.Errorf("%s is %s after the old process closed its listener and exited", p, got)
		}
	}
	fdpassGreets(t, "unix", stream, r1["pid"], 1, ListenerName("unix", stream))
	fdpassGreets(t, "unixpacket", seq, r1["pid"], 1, ListenerName("unixpacket", seq))
	pc, err := net.Dial("unixgram", dgram)
	if err != nil {
		t.Fatal(err)
	}
	pc.Write([]byte("ping"))
	pc.Close()
	fdpassWantRecv(t, c, r1["pid"], 1, ListenerName("unixgram", dgram), "ping")
}

// TestFDPassDynamicPorts: generation 0 of the "server" role binds
// 127.0.0.1:0 for tcp and udp; generations 1 and 2 inherit the same ports
// (the name is the address as written, not the port the kernel chose), and
// generation 2 serves on it.
func TestFDPassDynamicPorts(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	r0 := c.start("server", envTestListen+"=tcp=127.0.0.1:0,udp=127.0.0.1:0")
	addrs := r0["addrs"]
	for _, a := range strings.Split(addrs, ",") {
		if strings.HasSuffix(a, ":0") || !strings.Contains(a, "127.0.0.1:") {
			t.Fatalf("generation 0 listens on %q", addrs)
		}
	}
	r1 := c.restart(r0["pid"])
	r2 := c.restart(r1["pid"])
	if r1["addrs"] != addrs || r2["addrs"] != addrs {
		t.Errorf("addresses by generation: %s, %s, %s; want the same ports in all", addrs, r1["addrs"], r2["addrs"])
	}
	// The server role keeps accepting until it exits: wait for both old
	// generations, so that only generation 2 can answer.
	c.waitExit()
	p1, _ := strconv.Atoi(r1["pid"])
	waitExited(t, p1)
	tcp := strings.TrimPrefix(strings.Split(addrs, ",")[0], "tcp=")
	fdpassGreets(t, "tcp", tcp, r2["pid"], 2, "")
}

// fdpassOverlapRole holds a tcp listener and a udp socket. Generation 0
// serves the listener before, during and after the restart, until a client
// says "bye"; every greeting carries O_NONBLOCK of both shared sockets at
// that moment. Later generations claim both, report their flags, wait for
// a line on the hold fifo, become ready, and never accept: whatever is
// accepted is accepted by generation 0.
func fdpassOverlapRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	ln, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen: %v", err)
	}
	pc, err := ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen packet: %v", err)
	}
	flags := func() string {
		a, _, err1 := fdpassInspect(ln.(syscall.Conn))
		b, _, err2 := fdpassInspect(pc.(syscall.Conn))
		if err := errors.Join(err1, err2); err != nil {
			return err.Error()
		}
		return fmt.Sprintf("%t,%t", a, b)
	}
	bye := make(chan struct{})
	if gen == 0 {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "pid=%d nonblock=%s\n", os.Getpid(), flags())
				c.SetReadDeadline(time.Now().Add(testDeadline))
				line, _ := bufio.NewReader(c).ReadString('\n')
				c.Close()
				if line == "bye\n" {
					close(bye)
					return
				}
			}
		}()
	} else {
		fdpassSay("fdpass-claimed", "gen", strconv.Itoa(gen), "nonblock", flags(), "addr", ln.Addr().String())
		waitFIFO(os.Getenv(envTestHoldFIFO))
	}
	return fdpassServe(gen, fdpassTail{
		ready: func() []string { return []string{"nonblock", flags(), "tcp", ln.Addr().String()} },
		linger: func() {
			if gen > 0 {
				return
			}
			select {
			case <-bye:
			case <-time.After(testDeadline):
			}
		},
	})
}

// TestFDPassNonblockOverlap: the inherited sockets keep O_NONBLOCK, checked
// with fcntl(F_GETFL) on the shared open file description from both sides,
// and the old process's listener keeps working while the new process holds
// it before Ready and after the handover, until the old process stops.
func TestFDPassNonblockOverlap(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t, clusterHeld)
	r0 := c.start("fdpass-overlap")
	oldPid, addr := r0["pid"], fdpassField(r0, "tcp")
	talk := func(when, say string) {
		t.Helper()
		conn, err := net.DialTimeout("tcp", addr, testDeadline)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(testDeadline))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if want := fmt.Sprintf("pid=%s nonblock=true,true\n", oldPid); line != want || err != nil {
			t.Errorf("%s: old process said %q, %v; want %q", when, line, err, want)
		}
		fmt.Fprintf(conn, "%s\n", say)
	}
	talk("before the restart", "next")

	answer := c.ask()
	claimed := c.nextNew("fdpass-claimed")
	if got := fdpassField(claimed, "nonblock"); got != "true,true" {
		t.Errorf("new process, after claiming: O_NONBLOCK of listener,udp = %s", got)
	}
	talk("while the new process holds the listener", "next")

	releaseFIFO(t, c.hold)
	r := <-answer
	if r.err != nil {
		t.Fatalf("RequestRestart: %v", r.err)
	}
	ready := c.reports.next("ready")
	if ready["pid"] != strconv.Itoa(r.pid) || ready["pid"] != claimed["pid"] || fdpassField(ready, "tcp") != addr {
		t.Fatalf("ready report %v, restart says pid %d", ready, r.pid)
	}
	if got := fdpassField(ready, "nonblock"); got != "true,true" {
		t.Errorf("new process, after Ready: O_NONBLOCK of listener,udp = %s", got)
	}
	if repl := c.reports.next("replaced"); repl["pid"] != oldPid {
		t.Fatalf("replaced report %v", repl)
	}
	talk("after the handover", "bye")
	c.waitExit()
}

// fdpassHookRole creates a tcp listener and a udp socket with a
// ListenConfig whose Control hook sets SO_REUSEPORT in generation 0 and
// fails in later ones, and reports how often the hook ran, SO_REUSEPORT on
// each socket and the addresses and inodes.
func fdpassHookRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	var calls atomic.Int32
	lc := &net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		calls.Add(1)
		if gen > 0 {
			return errors.New("Control hook called for an inherited socket")
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := listenNamed("hook-tcp", lc, "tcp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen: %v", err)
	}
	pc, err := listenPacketNamed("hook-udp", lc, "udp", "127.0.0.1:0")
	if err != nil {
		return fdpassFail("listen packet: %v", err)
	}
	reuse := func(c syscall.Conn) string {
		rc, _ := c.SyscallConn()
		v, gerr := -1, error(nil)
		rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT) })
		if gerr != nil {
			return gerr.Error()
		}
		return strconv.Itoa(v)
	}
	_, tino, _ := fdpassInspect(ln.(syscall.Conn))
	_, uino, _ := fdpassInspect(pc.(syscall.Conn))
	return fdpassServe(gen, fdpassTail{
		ready: func() []string {
			return []string{
				"calls", strconv.Itoa(int(calls.Load())),
				"tcp", ln.Addr().String(), "udp", pc.LocalAddr().String(),
				"tcpreuse", reuse(ln.(syscall.Conn)), "udpreuse", reuse(pc.(syscall.Conn)),
				"tcpino", strconv.FormatUint(tino, 10), "udpino", strconv.FormatUint(uino, 10),
			}
		},
		retire: func() { ln.Close(); pc.Close() },
	})
}

// TestFDPassControlHook: a ListenConfig's Control hook runs once per socket
// created (SO_REUSEPORT set, as getsockopt and the kernel see it: another
// socket with SO_REUSEPORT binds the same port, one without does not), and
// is not run for an inherited socket, which keeps the option.
func TestFDPassControlHook(t *testing.T) {
	t.Parallel()
	c := newTestCluster(t)
	r0 := c.start("fdpass-hook")
	if got := fdpassField(r0, "calls"); got != "2" {
		t.Errorf("generation 0 ran the Control hook %s times, want 2 (one per socket)", got)
	}
	r1 := c.restart(r0["pid"])
	if got := fdpassField(r1, "calls"); got != "0" {
		t.Errorf("generation 1 ran the Control hook %s times for inherited sockets, want 0", got)
	}
	for _, k := range []string{"tcp", "udp", "tcpino", "udpino"} {
		if fdpassField(r1, k) != fdpassField(r0, k) {
			t.Errorf("%s: generation 0 had %s, generation 1 has %s", k, fdpassField(r0, k), fdpassField(r1, k))
		}
	}
	for _, r := range []map[string]string{r0, r1} {
		if fdpassField(r, "tcpreuse") != "1" || fdpassField(r, "udpreuse") != "1" {
			t.Errorf("pid %s: SO_REUSEPORT tcp=%s udp=%s, want 1", r["pid"], fdpassField(r, "tcpreuse"), fdpassField(r, "udpreuse"))
		}
	}
	reusePort := &net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return serr
	}}
	ctx := context.Background()
	if l, err := reusePort.Listen(ctx, "tcp", fdpassField(r1, "tcp")); err != nil {
		t.Errorf("binding the inherited tcp port with SO_REUSEPORT: %v", err)
	} else {
		l.Close()
	}
	if l, err := reusePort.ListenPacket(ctx, "udp", fdpassField(r1, "udp")); err != nil {
		t.Errorf("binding the inherited udp port with SO_REUSEPORT: %v", err)
	} else {
		l.Close()
	}
	if l, err := net.Listen("tcp", fdpassField(r1, "tcp")); err == nil {
		l.Close()
		t.Errorf("bound the inherited tcp port without SO_REUSEPORT: it is not held")
	}
}

// fdpassManyRole: generation 0 registers fdpassManyN abstract unix
// listeners under names many0000...; later generations check that they
// inherited all of them, in order, each name on the socket that was bound
// under it and at fd 3+i, and report the count and the first mismatch.
func fdpassManyRole() int {
	gen, ok := fdpassBoot()
	if !ok {
		return 1
	}
	// Generation 0 holds fdpassManyN registry fds; a later one as many
	// inherited ones plus a transient duplicate per claim. Go raises the
	// soft limit to the hard one at startup; do it here in any case, as a
	// program that passes this many fds must.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fdpassFail("getrlimit: %v", err)
	}
	if need := uint64(2*fdpassManyN + 100); lim.Cur < need {
		lim.Cur = min(need, lim.Max)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fdpassFail("setrlimit: %v", err)
		}
	}
	tag := os.Getenv(envFDPassTag)
	name := func(i int) string { return fmt.Sprintf("many%04d", i) }
	addr := func(i int) string { return fmt.Sprintf("@%s-%04d", tag, i) }
	bad := ""
	names := registryNames()
	if gen > 0 && len(names) != fdpassManyN {
		bad = fmt.Sprintf("inherited %d names", len(names))
	}
	for i := 0; i < fdpassManyN && bad == ""; i++ {
		if gen > 0 && names[i] != name(i) {
			bad = fmt.Sprintf("name %d is %q", i, names[i])
			break
		}
		ln, err := listenNamed(name(i), nil, "unix", addr(i))
		if err != nil {
			bad = fmt.Sprintf("%s: %v", name(i), err)
			break
		}
		if got := ln.Addr().String(); got != addr(i) {
			bad = fmt.Sprintf("%s is bound to %s, want %s", name(i), got, addr(i))
		}
		_, ino, err := fdpassInspect(ln.(syscall.Conn))
		if gen > 0 && (err != nil || ino != fdpassAtInit.fds[listenFDsStart+i].ino) {
			bad = fmt.Sprintf("%s is inode %d, fd %d was %d (%v)", name(i), ino, listenFDsStart+i, fdpassAtInit.fds[listenFDsStart+i].ino, err)
		}
		// The registry keeps its own copy listening; the program's may go.
		ln.Close()
	}
	return fdpassServe(gen, fdpassTail{
		ready: func() []string { return []string{"n", strconv.Itoa(len(registryNames())), "bad", bad} },
	})
}

// TestFDPassThousand: 1000 listeners pass through a restart, each under its
// name, in order, at fd 3+i, and still listening once the old process is
// gone.
func TestFDPassThousand(t *testing.T) {
	t.Parallel()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if need := uint64(2*fdpassManyN + 100); lim.Max < need {
		t.Skipf("RLIMIT_NOFILE hard limit %d is below the %d fds this test needs", lim.Max, need)
	}
	c := newTestCluster(t)
	tag := fmt.Sprintf("shellflip-fdpass-many-%d-%d", os.Getpid(), time.Now().UnixNano())
	r0 := c.start("fdpass-many", envFDPassTag+"="+tag)
	if fdpassField(r0, "n") != strconv.Itoa(fdpassManyN) || fdpassField(r0, "bad") != "" {
		t.Fatalf("generation 0: %d names, problem %q", fdpassManyN, fdpassField(r0, "bad"))
	}
	r1 := c.restart(r0["pid"])
	if n, bad := fdpassField(r1, "n"), fdpassField(r1, "bad"); n != strconv.Itoa(fdpassManyN) || bad != "" {
		t.Fatalf("generation 1: %s names, problem %q", n, bad)
	}
	c.waitExit()
	for _, i := range []int{0, fdpassManyN / 2, fdpassManyN - 1} {
		conn, err := net.DialTimeout("unix", fmt.Sprintf("@%s-%04d", tag, i), testDeadline)
		if err != nil {
			t.Errorf("listener %d after the old process exited: %v", i, err)
			continue
		}
		conn.Close()
	}
}

// fdpassHostileRole runs in a process whose LISTEN_* the test made up. It
// reports what the package's init made of them: the registry, the
// variables in main, each fd's state (fds open at initialisation and those
// LISTEN_FDS names), claims by name, Start's error, each fd's state after
// Ready, and whether a fresh Listen works.
func fdpassHostileRole() int {
	v := url.Values{}
	v.Set("names", strings.Join(registryNames(), ":"))
	v.Set("main", fdpassListenEnv(os.LookupEnv).Encode())
	fds := map[int]fdID{}
	for fd, id := range fdpassAtInit.fds {
		fds[fd] = id
	}
	if n, err := strconv.Atoi(fdpassAtInit.env.Get(envListenFDs)); err == nil {
		for i := 0; i < n && i < 64; i++ {
			if _, ok := fds[listenFDsStart+i]; !ok {
				fds[listenFDsStart+i] = fdID{target: "closed"}
			}
		}
	}
	state := map[int]string{}
	for fd, id := range fds {
		closeOnExec := "-"
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			closeOnExec = strconv.FormatBool(fl&unix.FD_CLOEXEC != 0)
		}
		state[fd] = id.target + "|" + strconv.FormatBool(id.cloexec) + "|" + id.state(fd) + "|" + closeOnExec
	}
	for i, name := range strings.Split(os.Getenv(envFDPassClaim), ",") {
		if name == "" {
			continue
		}
		ln, err := listenNamed(name, nil, "tcp", "127.0.0.1:0")
		if err != nil {
			v.Set("claim"+strconv.Itoa(i), "error: "+err.Error())
			continue
		}
		_, ino, _ := fdpassInspect(ln.(syscall.Conn))
		v.Set("claim"+strconv.Itoa(i), fmt.Sprintf("socket:[%d]", ino))
		ln.Close()
	}
	r, err := Start(context.Background(), Config{})
	for fd, id := range fds {
		v.Set("fd"+strconv.Itoa(fd), state[fd]+"|"+id.state(fd))
	}
	if err != nil {
		v.Set("start", err.Error())
	} else {
		r.Stop()
	}
	ln, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		v.Set("listen", err.Error())
	} else {
		ln.Close()
		v.Set("listen", "ok")
	}
	fdpassSay("fdpass-hostile", "v", v.Encode())
	return 0
}

// TestFDPassHostileEnv starts fresh processes with made-up LISTEN_*
// environments, never the test process itself: the package's init there
// closes fds 3.. that it refuses. LISTEN_PID is the real pid (set by a
// shell that then execs the test binary, as systemd sets it before exec)
// unless the case says otherwise. Each case must give its error from Start
// (or none, if it is acceptable or ignored), no panic, and no leak: a
// refused fd is closed, an adopted one is close-on-exec and, unclaimed,
// closed at Ready; an ignored one is left alone, as are the variables.
// Fds that the test did not pass (the Go runtime's own, opened
// close-on-exec at the lowest free numbers before package initialisation)
// must be untouched whatever LISTEN_FDS says.
//
// Also observed, and kept as the cases' expectations: an empty name is a
// name (systemd allows it); duplicate names are kept, as a socket unit with
// two Listen lines and one FileDescriptorName gives them, but ListenNamed
// returns the first fd every time and the second, unreachable, is closed
// at Ready; a LISTEN_FDS that is not a count is an error whose fds are left
// open, not close-on-exec, as sd_listen_fds(3) leaves them; a LISTEN_PID
// that is not a number is taken as another process's.
func TestFDPassHostileEnv(t *testing.T) {
	t.Parallel()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skipf("no sh to set LISTEN_PID to the pid before exec: %v", err)
	}
	long := strings.Repeat("x", 256)
	for _, tc := range []struct {
		name   string
		pass   int               // sockets passed at fds 3..
		env    map[string]string // LISTEN_PID: "self" unless set
		claim  string
		err    string   // "" for no error
		names  []string // the registry at main
		fdMain string   // the passed fds in main: refused, adopted, ignored
		fdEnd  []string // the passed fds after Ready: same or closed
		kept   bool     // the variables are left in the environment
	}{
		{name: "names fewer than fds", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "a"},
			err: "names 1 fds, $LISTEN_FDS says 2", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "names more than fds", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "a:b"},
			err: "names 2 fds, $LISTEN_FDS says 1", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "trailing colon", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "a:b:"},
			err: "names 3 fds, $LISTEN_FDS says 2", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "control character", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "a\tb"},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "not ASCII", pass: 1, env: map[string]string{envListenFDs: "1", envListenFDNames: "caf\u00e9"},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "name too long", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "ok:" + long},
			err: "is not a valid fd name", fdMain: "refused", fdEnd: []string{"closed", "closed"}},
		{name: "empty names", pass: 3, env: map[string]string{envListenFDs: "3", envListenFDNames: "a::b"}, claim: "a",
			names: []string{"a", "", "b"}, fdMain: "adopted", fdEnd: []string{"same", "closed", "closed"}},
		{name: "no names", pass: 1, env: map[string]string{envListenFDs: "1"}, claim: "unknown",
			names: []string{"unknown"}, fdMain: "adopted", fdEnd: []string{"same"}},
		{name: "duplicate names", pass: 2, env: map[string]string{envListenFDs: "2", envListenFDNames: "dup:dup"}, claim: "dup,dup",
			names: []string{"dup", "dup"}, fdMain: "adopted", fdEnd: []string{"same", "closed"}},
		{name: "closed fd", pass: 1, env: map[string]string{envListenFDs: "2", envListenFDNames: "a:b"},
			err: "fd 4", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "closed fds", pass: 1, env: map[string]string{envListenFDs: "12"},
			err: "LISTEN_FDS=12", fdMain: "refused", fdEnd: []string{"closed"}},
		// The same where a package opened a file in its init, before this
		// package's: the runtime's poller fds are in the range too.
		{name: "closed fds after an early open", pass: 1, env: map[string]string{envListenFDs: "12", envFDPassOpenEarly: "1"},
			err: "LISTEN_FDS=12", fdMain: "refused", fdEnd: []string{"closed"}},
		{name: "count not a number", pass: 1, env: map[string]string{envListenFDs: "1x", envListenFDNames: "a"},
			err: "is not a count of fds", fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "count too large", pass: 1, env: map[string]string{envListenFDs: "70000"},
			err: "is not a count of fds", fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "zero fds", env: map[string]string{envListenFDs: "0"}},
		{name: "names without fds", pass: 1, env: map[string]string{envListenFDNames: "a"},
			fdMain: "ignored", fdEnd: []string{"same"}},
		{name: "other pid", pass: 1, env: map[string]string{envListenPID: strconv.Itoa(os.Getpid()), envListenFDs: "1", envListenFDNames: "x"}, claim: "x",
			fdMain: "ignored", fdEnd: []string{"same"}, kept: true},
		{name: "pid not a number", pass: 1, env: map[string]string{envListenPID: "1x", envListenFDs: "1", envListenFDNames: "x"},
			fdMain: "ignored", fdEnd: []string{"same"}, kept: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fdpassHostileCase(t, sh, tc.pass, tc.env, tc.claim, tc.err, tc.names, tc.fdMain, tc.fdEnd, tc.kept)
		})
	}
}

func fdpassHostileCase(t *testing.T, sh string, pass int, env map[string]string, claim, wantErr string,
	wantNames []string, fdMain string, fdEnd []string, kept bool) {
	c := newTestCluster(t)
	var files []*os.File
	inos := map[string]int{} // "socket:[ino]" -> fd in the child
	for i := 0; i < pass; i++ {
		f, ino := fdpassTCPFile(t)
		inos[fmt.Sprintf("socket:[%d]", ino)] = listenFDsStart + i
		files = append(files, f)
	}
	extra := []string{envFDPassClaim + "=" + claim}
	for k, v := range env {
		extra = append(extra, k+"="+v)
	}
	cmd := c.command(os.Args[0], "fdpass-hostile", extra...)
	if _, ok := env[envListenPID]; !ok {
		// The shell's pid is the test binary's after exec.
		cmd.Path, cmd.Args = sh, []string{sh, "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" -test.run=^$`, os.Args[0]}
	}
	cmd.ExtraFiles = files
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	out := strings.SplitAfterN(stderr.String(), "\n", 12)
	errOut := strings.Join(out[:min(len(out), 11)], "")
	if err != nil || strings.Contains(stderr.String(), "panic") || strings.Contains(stderr.String(), "fatal error") {
		t.Fatalf("the process with this environment crashed: %v\n%s", err, errOut)
	}
	// The process has exited: its report, if it sent one, is queued
	// already, so a short deadline only bounds the failure case.
	var line string
	select {
	case line = <-c.reports.lines:
	case <-time.After(time.Second):
	}
	if line == "" {
		t.Fatalf("the process with this environment exited without a report; its stderr:\n%s", errOut)
	}
	v := fdpassValues(t, parseReport(line), "v")
	t.Logf("report: %v", v)

	if got := v.Get("start"); wantErr == "" && got != "" || wantErr != "" && !strings.Contains(got, wantErr) {
		t.Errorf("Start error %q, want one containing %q", got, wantErr)
	}
	if got := fdpassNames(v.Get("names")); !slices.Equal(got, wantNames) {
		t.Errorf("registry %q, want %q", got, wantNames)
	}
	main, err := url.ParseQuery(v.Get("main"))
	if err != nil {
		t.Fatal(err)
	}
	for k, val := range env {
		if kept && strings.HasPrefix(k, "LISTEN_") && main.Get(k) != val {
			t.Errorf("%s in main is %q, want it left alone (%q)", k, main.Get(k), val)
		}
	}
	if !kept && len(main) != 0 {
		t.Errorf("LISTEN_* in main: %q, want them removed", main.Encode())
	}
	if v.Get("listen") != "ok" {
		t.Errorf("Listen after Start: %s", v.Get("listen"))
	}
	// Every fd of the child: fd<N> = target at init|close-on-exec at
	// init|state in main|close-on-exec in main|state after Ready.
	for key := range v {
		if !strings.HasPrefix(key, "fd") {
			continue
		}
		fd, _ := strconv.Atoi(key[2:])
		f := strings.Split(v.Get(key), "|")
		if len(f) != 5 {
			t.Fatalf("%s=%q", key, v.Get(key))
		}
		target, initCloexec, inMain, cloexec, end := f[0], f[1], f[2], f[3], f[4]
		passed := fd >= listenFDsStart && fd < listenFDsStart+pass
		switch {
		case target == "closed":
			// Named by LISTEN_FDS but not open at initialisation.
		case !passed && initCloexec == "false":
			// Inherited from whatever started the test: not ours to
			// judge (LISTEN_FDS may name it).
		case !passed:
			if inMain != "same" || end != "same" {
				t.Errorf("fd %d (%s) was not passed, but was %s after the package's init and %s after Ready: the library closed an fd it does not own",
					fd, target, inMain, end)
			}
		default:
			if inos[target] != fd {
				t.Fatalf("fd %d at init is %s, not the socket passed there", fd, target)
			}
			want := map[string]string{"refused": "closed|-", "adopted": "same|true", "ignored": "same|false"}[fdMain]
			if got := inMain + "|" + cloexec; got != want {
				t.Errorf("fd %d in main: %s (state|close-on-exec), want %s (%s)", fd, got, want, fdMain)
			}
			if w := fdEnd[fd-listenFDsStart]; end != w {
				t.Errorf("fd %d after Ready: %s, want %s", fd, end, w)
			}
			if fdMain == "ignored" && cloexec == "false" && wantErr != "" {
				t.Logf("fd %d stays open without close-on-exec: LISTEN_FDS is not a count, so nothing says which fds were meant (sd_listen_fds(3) leaves them too)", fd)
			}
		}
	}
	for key, val := range v {
		if strings.HasPrefix(key, "claim") {
			t.Logf("ListenNamed claim %s: %s (passed sockets: %v)", key, val[0], inos)
		}
	}
}

// TestFDPassListenTwice: in one process, a second Listen (or ListenNamed)
// of a name already registered does not bind again: it returns another
// listener on the same socket (same address and inode, whatever address the
// second call names), and the name is registered once. Both listeners work
// and closing one leaves the other working. The registry's own copy keeps
// the socket listening after the program closed both, until Remove. A
// second call for another kind of socket under that name is refused.
// Observed and documented here, since the package does not say.
func TestFDPassListenTwice(t *testing.T) {
	before := listFDs(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "twice.sock")
	name := ListenerName("unix", path)
	l1, err := Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := Listen("unix", path)
	if err != nil {
		t.Fatalf("second Listen under %q: %v", name, err)
	}
	_, ino1, _ := fdpassInspect(l1.(syscall.Conn))
	_, ino2, _ := fdpassInspect(l2.(syscall.Conn))
	if l1.Addr().String() != l2.Addr().String() || ino1 != ino2 {
		t.Errorf("second Listen: %s inode %d, first %s inode %d; want the same socket", l2.Addr(), ino2, l1.Addr(), ino1)
	}
	if n := fdpassCount(registryNames(), name); n != 1 {
		t.Errorf("%q registered %d times", name, n)
	}
	fdpassAcceptOne(t, l2, "unix", path)
	l1.Close()
	fdpassAcceptOne(t, l2, "unix", path)
	l2.Close()
	// Only the registry holds the socket now: it still listens.
	conn, err := net.DialTimeout("unix", path, testDeadline)
	if err != nil {
		t.Errorf("after closing both listeners: %v; the registry's copy should still listen", err)
	} else {
		conn.Close()
	}
	if _, err := listenPacketNamed(name, nil, "unixgram", path); err == nil {
		t.Errorf("ListenPacketNamed under a stream listener's name succeeded")
	}
	if _, err := listenNamed(name, nil, "tcp", "127.0.0.1:0"); err == nil {
		t.Errorf("ListenNamed tcp under a unix listener's name succeeded")
	}
	if !Remove(name) || Remove(name) {
		t.Errorf("Remove(%q): want true once, then false", name)
	}
	if _, err := net.DialTimeout("unix", path, testDeadline); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("after Remove: %v, want connection refused", err)
	}

	// ListenNamed twice with different addresses: the second address is
	// not looked at.
	tname := fmt.Sprintf("fdpass-twice-%d", time.Now().UnixNano())
	t1, err := listenNamed(tname, nil, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t2, err := listenNamed(tname, nil, "tcp", "127.0.0.1:1")
	if err != nil {
		t.Fatalf("second ListenNamed with another address: %v", err)
	}
	if t1.Addr().String() != t2.Addr().String() {
		t.Errorf("second ListenNamed listens on %s, first on %s", t2.Addr(), t1.Addr())
	}
	fdpassAcceptOne(t, t1, "tcp", t1.Addr().String())
	fdpassAcceptOne(t, t2, "tcp", t1.Addr().String())
	t1.Close()
	t2.Close()
	Remove(tname)
	checkFDs(t, before, true)
}

// fdpassAcceptOne dials addr and checks that ln accepts the connection.
func fdpassAcceptOne(t *testing.T, ln net.Listener, network, addr string) {
	t.Helper()
	conn, err := net.DialTimeout(network, addr, testDeadline)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	switch l := ln.(type) {
	case *net.TCPListener:
		l.SetDeadline(time.Now().Add(testDeadline))
	case *net.UnixListener:
		l.SetDeadline(time.Now().Add(testDeadline))
	}
	a, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
	a.Close()
}

func fdpassCount(names []string, name string) int {
	n := 0
	for _, s := range names {
		if s == name {
			n++
		}
	}
	return n
}

// TestFDPassNameRules: names systemd would refuse (':', control
// characters, non-ASCII, over 255 bytes) are refused by ListenNamed,
// ListenPacketNamed and Add without creating anything; ListenerName encodes
// an address so that it is always a valid name; Add refuses a name in use
// with os.ErrExist without leaking its duplicate; unknown names give
// (nil, nil) from File and Conn; networks of the wrong kind are refused.
func TestFDPassNameRules(t *testing.T) {
	dir := t.TempDir()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	before := listFDs(t)
	for _, bad := range []string{"a:b", ":", "tab\there", "new\nline", "del\x7f", "caf\u00e9", strings.Repeat("x", 256)} {
		if ln, err := listenNamed(bad, nil, "tcp", "127.0.0.1:0"); err == nil {
			ln.Close()
			t.Errorf("listenNamed(%q) succeeded", bad)
		}
		if pc, err := listenPacketNamed(bad, nil, "udp", "127.0.0.1:0"); err == nil {
			pc.Close()
			t.Errorf("listenPacketNamed(%q) succeeded", bad)
		}
		if err := Add(bad, devnull); err == nil || errors.Is(err, os.ErrExist) {
			t.Errorf("Add(%q) = %v, want an invalid-name error", bad, err)
		}
		if slices.Contains(registryNames(), bad) {
			t.Errorf("%q registered", bad)
			Remove(bad)
		}
	}
	longest := "fdpass-" + strings.Repeat("m", 255-len("fdpass-"))
	if err := Add(longest, devnull); err != nil {
		t.Errorf("Add of a 255-byte name: %v", err)
	}
	if err := Add(longest, devnull); !errors.Is(err, os.ErrExist) {
		t.Errorf("second Add(%q) = %v, want os.ErrExist", longest, err)
	}
	f, err := FD(longest)
	if err != nil || f == nil {
		t.Errorf("File(%q) = %v, %v", longest, f, err)
	} else {
		f.Close()
	}
	Remove(longest)

	// A path with ':' and '%' in it: ListenerName encodes them.
	path := filepath.Join(dir, "a:b%c.sock")
	ln, err := Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	name := ListenerName("unix", path)
	if want := "unix/" + strings.NewReplacer(":", "%3A", "%", "%25").Replace(path); name != want {
		t.Errorf("ListenerName = %q, want %q", name, want)
	}
	if !slices.Contains(registryNames(), name) {
		t.Errorf("%q not in the registry %q", name, registryNames())
	}
	if err := Add(name, devnull); !errors.Is(err, os.ErrExist) {
		t.Errorf("Add under a listener's name = %v, want os.ErrExist", err)
	}
	ln.Close()
	Remove(name)

	unknown := fmt.Sprintf("fdpass-unknown-%d", time.Now().UnixNano())
	if f, err := FD(unknown); f != nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("FD(unknown) = %v, %v; want an error wrapping os.ErrNotExist", f, err)
	}
	closed, _ := os.Open(os.DevNull)
	closed.Close()
	if err := Add(unknown, closed); err == nil {
		t.Errorf("Add of a closed file succeeded")
		Remove(unknown)
	}
	for _, network := range []string{"udp", "unixgram", "ip4:icmp", ""} {
		if l, err := Listen(network, "127.0.0.1:0"); err == nil {
			l.Close()
			t.Errorf("Listen(%q) succeeded", network)
		}
	}
	for _, network := range []string{"tcp", "unix", "unixpacket", "ip4:icmp"} {
		if c, err := ListenPacket(network, "127.0.0.1:0"); err == nil {
			c.Close()
			t.Errorf("ListenPacket(%q) succeeded", network)
		}
	}
	checkFDs(t, before, true)
}

// TestFDPassClaimKinds: a claim takes the kind of an fd from the net
// package's report and one getsockopt of its own, and must still refuse
// every fd that does not serve the network asked for, with an error that
// names the network: a pipe (left in blocking mode: refused before the net
// package's dup would set it non-blocking), a socket of another type or
// family, a stream socket that is not listening. What fits is claimed, and
// claimed again. No fd leaks from a refusal. The fds are registered with
// Add in this process; a claim of an inherited fd takes the same path, and
// one that was refused is closed by Ready.
func TestFDPassClaimKinds(t *testing.T) {
	before := listFDs(t)
	dir := t.TempDir()
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	keep := func(c io.Closer, err error) syscall.Conn {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		closers = append(closers, c)
		return c.(syscall.Conn)
	}
	// Not os.Pipe, which sets the pipe non-blocking.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	keep(os.NewFile(uintptr(p[1]), "w"), nil)
	pipe := keep(os.NewFile(uintptr(p[0]), "r"), nil)
	tcp4 := keep(net.Listen("tcp4", "127.0.0.1:0"))
	peer := keep(net.Dial("tcp", tcp4.(net.Listener).Addr().String()))
	udp4 := keep(net.ListenPacket("udp4", "127.0.0.1:0"))
	unixStream := keep(net.Listen("unix", filepath.Join(dir, "s.sock")))
	unixPacket := keep(net.Listen("unixpacket", filepath.Join(dir, "p.sock")))
	unixgram := keep(net.ListenPacket("unixgram", filepath.Join(dir, "g.sock")))
	type sock struct {
		name string
		c    syscall.Conn
		fits []string // the networks it serves; every other is refused
	}
	socks := []sock{
		{"pipe", pipe, nil},
		{"tcp4", tcp4, []string{"tcp", "tcp4"}},
		{"connected tcp", peer, nil},
		{"udp4", udp4, []string{"udp", "udp4"}},
		{"unix", unixStream, []string{"unix"}},
		{"unixpacket", unixPacket, []string{"unixpacket"}},
		{"unixgram", unixgram, []string{"unixgram"}},
	}
	if ok, _ := fdpassHaveIPv6(); ok {
		tcp6 := keep(net.Listen("tcp6", "[::1]:0"))
		udp6 := keep(net.ListenPacket("udp6", "[::1]:0"))
		socks = append(socks, sock{"tcp6", tcp6, []string{"tcp", "tcp6"}}, sock{"udp6", udp6, []string{"udp", "udp6"}})
	}
	for _, s := range socks {
		name := fmt.Sprintf("fdpass-kinds-%s-%d", s.name, time.Now().UnixNano())
		if err := Add(name, s.c); err != nil {
			t.Fatal(err)
		}
		for _, network := range []string{"tcp", "tcp4", "tcp6", "unix", "unixpacket", "udp", "udp4", "udp6", "unixgram"} {
			// Twice: the first claim of a name wraps the registry's
			// copy, the second reuses it.
			for range 2 {
				var c io.Closer
				var err error
				switch network {
				case "udp", "udp4", "udp6", "unixgram":
					c, err = listenPacketNamed(name, nil, network, "")
				default:
					c, err = listenNamed(name, nil, network, "")
				}
				if slices.Contains(s.fits, network) {
					if err != nil {
						t.Errorf("%s claimed as %s: %v", s.name, network, err)
						continue
					}
					if _, ino, _ := fdpassInspect(c.(syscall.Conn)); ino == 0 {
						t.Errorf("%s claimed as %s: no inode", s.name, network)
					}
					c.Close()
					continue
				}
				if err == nil {
					c.Close()
					t.Errorf("%s claimed as %s: want it refused", s.name, network)
				} else if !strings.Contains(err.Error(), strconv.Quote(network)) {
					t.Errorf("%s claimed as %s: %v; want an error naming the network", s.name, network, err)
				}
			}
		}
		Remove(name)
		fdpassNoStaleFile(t, "Remove")
	}
	if fl, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("the pipe's flags after refused claims: %#x, %v; want it left blocking", fl, err)
	}

	// An inherited listener whose claim was refused stays unclaimed, and
	// Ready closes it (closeUnclaimed), through the file its claim
	// wrapped it in.
	fd, err := dupConn(tcp4)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("fdpass-kinds-refused-%d", time.Now().UnixNano())
	adoptInherited([]inheritedFD{{name: name, fd: fd}})
	if l, err := listenNamed(name, nil, "unix", ""); err == nil {
		l.Close()
		t.Errorf("a tcp4 listener claimed as unix")
	}
	closeUnclaimed(true)
	if slices.Contains(registryNames(), name) {
		t.Errorf("%q still registered after closeUnclaimed", name)
		Remove(name)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		t.Errorf("fd %d after closeUnclaimed: %v, want it closed", fd, err)
	}
	fdpassNoStaleFile(t, "closeUnclaimed")

	for _, c := range closers {
		c.Close()
	}
	closers = nil
	checkFDs(t, before, true)
}

// fdpassNoStaleFile checks that what the registry closed, after what, it
// closed through the *os.File that wrapped it, if any: otherwise that
// file's finalizer closes the fd again once the file is garbage, whatever
// holds the number by then, here a file opened at once, which takes the
// lowest free number.
func fdpassNoStaleFile(t *testing.T, after string) {
	t.Helper()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	runtime.GC()
	runtime.GC()
	if _, err := f.Stat(); err != nil {
		t.Errorf("a file opened after %s: %v; a finalizer closed its fd", after, err)
	}
}

// fdpassTCPFile returns a listening TCP socket on loopback, as a file that
// the test closes when it ends, and its inode.
func fdpassTCPFile(t *testing.T) (*os.File, uint64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.(*net.TCPListener).File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return f, fi.Sys().(*syscall.Stat_t).Ino
}
