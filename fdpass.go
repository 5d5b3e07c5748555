//go:build linux || darwin || freebsd

package shellflip

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// fdEntry is one named fd, passed on at a restart as systemd passes fds. The
// registry owns fd, a close-on-exec duplicate, and closes it only in Remove
// or, if it was inherited and not claimed, in Start; the program's listeners
// hold duplicates of their own.
type fdEntry struct {
	name      string
	fd        int
	file      *os.File // once the first claim of a socket set it, it owns fd
	inherited bool     // came from LISTEN_FDS
	claimed   bool     // the program asked for it by name
}

// fdreg is the process's registry.
var fdreg struct {
	mu      sync.Mutex
	adopted bool // the inherited fds are in entries
	entries []*fdEntry
	// byName maps each name in entries[:indexed] to its first entry, so that
	// a thousand claims do not compare half a million names. Deletions nil it.
	byName  map[string]*fdEntry
	indexed int
}

// lockRegistry locks the registry and, the first time, adds to it the
// inherited fds that the package's init took over.
func lockRegistry() {
	fdreg.mu.Lock()
	if !fdreg.adopted {
		fdreg.adopted = true
		for _, f := range inherited.listen {
			fdreg.entries = append(fdreg.entries, &fdEntry{name: f.name, fd: f.fd, inherited: true})
		}
	}
}

// lookupEntry returns the first entry named name, or nil.
func lookupEntry(name string) *fdEntry {
	if fdreg.byName == nil {
		fdreg.byName = make(map[string]*fdEntry, len(fdreg.entries))
		fdreg.indexed = 0
	}
	for _, e := range fdreg.entries[fdreg.indexed:] {
		if fdreg.byName[e.name] == nil {
			fdreg.byName[e.name] = e
		}
	}
	fdreg.indexed = len(fdreg.entries)
	return fdreg.byName[name]
}

// ListenerName returns the name under which Listen and ListenPacket register
// the socket for network and address: network, a slash, and the address as
// the caller wrote it (so "127.0.0.1:0" names the same socket in every
// generation, whichever port the first one got). Characters systemd does not
// allow in a name (':' and anything outside printable ASCII) and '%' are
// percent-encoded: "tcp/127.0.0.1%3A8080".
func ListenerName(network, address string) string {
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(network)+1+len(address)+8)
	b = append(b, network...)
	b = append(b, '/')
	for _, c := range []byte(address) {
		if c < 0x20 || c >= 0x7f || c == ':' || c == '%' {
			b = append(b, '%', hex[c>>4], hex[c&15])
			continue
		}
		b = append(b, c)
	}
	return string(b)
}

// Listen is ListenConfig.Listen with the zero ListenConfig: a listener on
// network and address registered under ListenerName(network, address).
func Listen(network, address string) (net.Listener, error) {
	return (&ListenConfig{}).Listen(context.Background(), network, address)
}

// ListenPacket is ListenConfig.ListenPacket with the zero ListenConfig.
func ListenPacket(network, address string) (net.PacketConn, error) {
	return (&ListenConfig{}).ListenPacket(context.Background(), network, address)
}

// ListenConfig makes listeners and packet sockets that are passed on at
// every restart, as net.ListenConfig makes them, whose options (Control for
// SO_REUSEPORT, KeepAlive, ...) apply when a socket is created here, not
// when it was inherited.
type ListenConfig struct {
	net.ListenConfig

	// Name is the socket's name in the registry, such as the
	// FileDescriptorName= of a systemd socket unit; "" means
	// ListenerName(network, address). If systemd passes several fds under
	// one name (a socket unit with several Listen lines and one
	// FileDescriptorName=), only the first can be claimed.
	Name string
}

// Listen returns a listener for network ("tcp", "tcp4", "tcp6", "unix" or
// "unixpacket") and address. If this process inherited a socket of that
// name, from the old process or from systemd, Listen returns a listener on
// it and binds nothing; the socket must then be a listening socket of
// network's kind. Otherwise it creates one. Inherited sockets must be
// claimed before Start, which closes those that were not. Asking again for
// a name already claimed returns another listener on the same socket,
// whatever the address.
//
// The caller owns the returned listener; closing it does not close the
// registry's copy (see Remove). A unix listener never unlinks its socket
// file on Close: the next process is still serving on it.
func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	c, err := lc.listen(ctx, network, address, true)
	ln, _ := c.(net.Listener) // nil on error
	return ln, err
}

// ListenPacket is Listen for packet sockets: network "udp", "udp4", "udp6"
// or "unixgram".
func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	c, err := lc.listen(ctx, network, address, false)
	pc, _ := c.(net.PacketConn) // nil on error
	return pc, err
}

// listen is Listen if listener, else ListenPacket. A claim costs one syscall
// more than the net package needs (checkSocket). os.NewFile registers a
// non-blocking fd with the runtime's poller, so the first claim wraps the
// registry's copy in a file and keeps it: a duplicate wrapped and closed at
// each claim would cost a dup, an EPOLL_CTL_DEL and a close more.
func (lc *ListenConfig) listen(ctx context.Context, network, address string, listener bool) (any, error) {
	kind, networks := "packet conn", []string{"udp", "udp4", "udp6", "unixgram"}
	if listener {
		kind, networks = "listener", []string{"tcp", "tcp4", "tcp6", "unix", "unixpacket"}
	}
	if !slices.Contains(networks, network) {
		return nil, fmt.Errorf("shellflip: network %q is not supported for a %s", network, kind)
	}
	name := lc.Name
	if name == "" {
		name = ListenerName(network, address)
	}
	if !fdnameValid(name) {
		return nil, fmt.Errorf("shellflip: %q is not a valid fd name (printable ASCII but ':', at most 255 bytes)", name)
	}
	lockRegistry()
	defer fdreg.mu.Unlock()
	var c any
	var err error
	if e := lookupEntry(name); e != nil {
		if err := checkSocket(e.fd, network, listener); err != nil {
			return nil, fmt.Errorf("shellflip: fd %q: %w", name, err)
		}
		if e.file == nil {
			// Safe though the net package calls Fd on it: Fd makes blocking
			// only a file that os made non-blocking, and os.NewFile never does.
			e.file = os.NewFile(uintptr(e.fd), name)
		}
		if listener {
			c, err = net.FileListener(e.file)
		} else {
			c, err = net.FilePacketConn(e.file)
		}
		if err != nil {
			// An address family the net package does not know, or no fd left.
			return nil, fmt.Errorf("shellflip: fd %q: claiming it for network %q: %w", name, network, err)
		}
		if !socketFits(c, network) {
			c.(io.Closer).Close()
			return nil, fmt.Errorf("shellflip: fd %q: the inherited socket does not fit network %q", name, network)
		}
		e.claimed = true
		return c, nil
	}

	if listener {
		c, err = lc.ListenConfig.Listen(ctx, network, address)
	} else {
		c, err = lc.ListenConfig.ListenPacket(ctx, network, address)
	}
	if err != nil {
		return nil, err
	}
	if ul, ok := c.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false)
	}
	fd, err := dupConn(c.(syscall.Conn))
	if err != nil {
		c.(io.Closer).Close()
		return nil, err
	}
	fdreg.entries = append(fdreg.entries, &fdEntry{name: name, fd: fd, claimed: true})
	return c, nil
}

// FD returns a new *os.File for the fd registered under name, claiming it
// if it was inherited (so that Start does not close it), or an error
// wrapping os.ErrNotExist if there is none. Use it for fds that are not
// listeners: connections (net.FileConn), pipes, memfds, regular files. The
// caller owns the returned file.
func FD(name string) (*os.File, error) {
	lockRegistry()
	defer fdreg.mu.Unlock()
	e := lookupEntry(name)
	if e == nil {
		return nil, fmt.Errorf("shellflip: no fd named %q: %w", name, os.ErrNotExist)
	}
	f, err := dupFile(e.fd, name)
	if err != nil {
		return nil, err
	}
	e.claimed = true
	return f, nil
}

// Add registers a duplicate of c's fd under name, to be passed on at the
// next restart. c is anything with a SyscallConn method: *os.File,
// *net.TCPConn, *net.UnixListener and so on; the caller keeps ownership of
// c. If the name is in use, Add fails with an error wrapping os.ErrExist.
func Add(name string, c syscall.Conn) error {
	if !fdnameValid(name) {
		return fmt.Errorf("shellflip: %q is not a valid fd name (printable ASCII but ':', at most 255 bytes)", name)
	}
	lockRegistry()
	defer fdreg.mu.Unlock()
	if lookupEntry(name) != nil {
		return fmt.Errorf("shellflip: fd name %q: %w", name, os.ErrExist)
	}
	fd, err := dupConn(c)
	if err != nil {
		return err
	}
	fdreg.entries = append(fdreg.entries, &fdEntry{name: name, fd: fd, claimed: true})
	return nil
}

// Remove closes the registry's copy of the fd registered under name, so that
// it is not passed on, and reports whether there was one. Files, listeners
// and connections already handed out are not affected.
func Remove(name string) bool {
	lockRegistry()
	defer fdreg.mu.Unlock()
	i := slices.IndexFunc(fdreg.entries, func(e *fdEntry) bool { return e.name == name })
	if i < 0 {
		return false
	}
	if e := fdreg.entries[i]; e.file != nil {
		e.file.Close()
	} else {
		unix.Close(e.fd)
	}
	fdreg.entries = slices.Delete(fdreg.entries, i, i+1)
	fdreg.byName = nil
	return true
}

// closeUnclaimed, called by Start once this process is the main one, closes
// the inherited fds nobody claimed. With unlink, in a process to which an
// old one has handed over, it also unlinks the socket file of such a unix
// listener: the old process is leaving, so no one serves on it. A launcher
// such as systemd owns the sockets it passed, files included, and may
// still listen on them.
func closeUnclaimed(unlink bool) {
	lockRegistry()
	defer fdreg.mu.Unlock()
	var unclaimed []int
	fdreg.entries = slices.DeleteFunc(fdreg.entries, func(e *fdEntry) bool {
		if !e.inherited || e.claimed {
			return false
		}
		if unlink {
			unlinkListenerPath(e.fd)
		}
		if e.file != nil {
			e.file.Close() // a claim of it was refused
		} else {
			unclaimed = append(unclaimed, e.fd)
		}
		return true
	})
	fdreg.byName = nil
	closeFDs(unclaimed)
}

// unlinkListenerPath removes the file of a listening unix socket bound to a
// path, if that path still holds a socket.
func unlinkListenerPath(fd int) {
	// The address first: it rules out TCP listeners at once.
	sa, err := unix.Getsockname(fd)
	ua, ok := sa.(*unix.SockaddrUnix)
	if err != nil || !ok || ua.Name == "" || ua.Name[0] == '@' || ua.Name[0] == 0 {
		return
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v == 0 {
		return
	}
	var st unix.Stat_t
	if unix.Lstat(ua.Name, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		unix.Unlink(ua.Name)
	}
}

// passFDs appends the registry's fds and names to files and names. The
// registry stays locked, so that no fd in files is closed before the fork,
// until the new process is started and the returned function called.
func passFDs(files []uintptr, names []string) ([]uintptr, []string, func()) {
	lockRegistry()
	for _, e := range fdreg.entries {
		files = append(files, uintptr(e.fd))
		names = append(names, e.name)
	}
	return files, names, fdreg.mu.Unlock
}

// dupConn duplicates c's fd, close-on-exec, inside Control, where the fd is
// valid; (*os.File).Fd would make the shared file description blocking for
// every process that shares it (golang/go#29277).
func dupConn(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	err = rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
	if err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	return fd, nil
}

// dupFile returns an *os.File owning a close-on-exec duplicate of fd.
func dupFile(fd int, name string) (*os.File, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// checkSocket checks, with one syscall, what the net package does not: that
// fd is a listening socket if listener, and a datagram socket otherwise. It
// runs before the net package's dup would set a pipe, say, non-blocking.
func checkSocket(fd int, network string, listener bool) error {
	opt, name, what := unix.SO_TYPE, "getsockopt SO_TYPE", "a datagram socket"
	if listener {
		opt, name, what = unix.SO_ACCEPTCONN, "getsockopt SO_ACCEPTCONN", "listening"
	}
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt)
	if err != nil {
		return fmt.Errorf("the inherited fd does not fit network %q: %w", network, os.NewSyscallError(name, err))
	}
	// Non-zero, not 1: 4.4BSD's descendants answer SO_ACCEPTCONN with its bit.
	if listener && v == 0 || !listener && v != unix.SOCK_DGRAM {
		return fmt.Errorf("the inherited socket does not fit network %q: it is not %s", network, what)
	}
	return nil
}

// socketFits reports whether c, made by the net package of a socket that
// passed checkSocket, serves network. An IP address is 4 bytes long for
// AF_INET and 16 for AF_INET6, even when IPv4-mapped (sockaddrToTCP in
// net/tcpsock_posix.go).
func socketFits(c any, network string) bool {
	var a net.Addr
	switch c := c.(type) {
	case net.Listener:
		a = c.Addr()
	case net.PacketConn:
		a = c.LocalAddr()
	}
	var ip net.IP
	switch a := a.(type) {
	case *net.UnixAddr:
		return a.Net == network
	case *net.TCPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	default:
		return false
	}
	switch network {
	case a.Network():
		return len(ip) == net.IPv4len || len(ip) == net.IPv6len
	case a.Network() + "4":
		return len(ip) == net.IPv4len
	case a.Network() + "6":
		return len(ip) == net.IPv6len
	}
	return false
}

// StoreFDs pushes the registry's fds to systemd's fd store (every fd if no
// names are given, else the first fd of each name, the one a claim takes),
// one FDSTORE=1 datagram per fd under its name, so that a process systemd
// starts later (after a crash, or "systemctl restart", which graceful
// restarts do not survive) finds them in its registry under the same names.
// The unit needs a large enough FileDescriptorStoreMax=. Storing again after
// a restart is harmless: systemd ignores an fd it already stores. Without
// $NOTIFY_SOCKET StoreFDs does nothing; it returns ErrNotMain where Notify
// does. While systemd's queue is full it waits, at most 5 seconds per fd (a
// handover waits for it), then fails. Notify("FDSTOREREMOVE=1",
// "FDNAME="+name) takes an fd out of the store.
func StoreFDs(names ...string) error {
	notifyMu.RLock()
	defer notifyMu.RUnlock()
	if err := mayNotify(); err != nil {
		return err
	}
	n, err := processNotifier()
	if err != nil || n == nil {
		return err
	}
	lockRegistry()
	defer fdreg.mu.Unlock()
	entries := fdreg.entries // every fd, though several may share a name
	if len(names) > 0 {
		entries = make([]*fdEntry, len(names))
		for i, name := range names {
			if entries[i] = lookupEntry(name); entries[i] == nil {
				return fmt.Errorf("shellflip: no fd named %q: %w", name, os.ErrNotExist)
			}
		}
	}
	for _, e := range entries {
		ctx, cancel := context.WithTimeout(context.Background(), handOverTimeout)
		err := n.send(ctx, []int{e.fd}, "FDSTORE=1", "FDNAME="+e.name)
		cancel()
		if err != nil {
			return fmt.Errorf("shellflip: storing fd %q: %w", e.name, err)
		}
	}
	return nil
}
