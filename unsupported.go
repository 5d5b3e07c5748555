//go:build !linux && !darwin && !freebsd

package shellflip

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"syscall"
	"time"
)

// This file lets programs that vendor the package build on platforms without
// fork/exec or unix sockets (windows, plan9, js, wasip1, ...): every entry
// point returns ErrNotSupported, or reports that there is nothing to do.

func platformSupported() error { return ErrNotSupported }

var defaultSignal os.Signal = os.Interrupt

func inheritanceErr() error        { return ErrNotSupported }
func takeControlFD() (int, string) { return -1, "" }
func closeFDNum(int)               {}
func sealFDs() error               { return ErrNotSupported }
func notifyMainPID(int) error {
	return ErrNotSupported
}
func pollableFile(int, string) (*os.File, error) { return nil, ErrNotSupported }
func newReadyPair() (int, int, error)            { return -1, -1, ErrNotSupported }
func newStatePipe() (int, int, error)            { return -1, -1, ErrNotSupported }
func forkExec(string, []string, []string, string, []uintptr) (int, error) {
	return 0, ErrNotSupported
}
func passFDs(files []uintptr, names []string) ([]uintptr, []string, func()) {
	return files, names, func() {}
}

type childWatch struct{ done chan struct{} }

func watchChild(int) *childWatch {
	c := &childWatch{done: make(chan struct{})}
	close(c.done)
	return c
}
func (*childWatch) kill()          {}
func (*childWatch) status() string { return "" }
func fdnameValid(string) bool      { return false }
func closeUnclaimed()              {}

type restartRequest struct{ reply chan outcome }

func (q *restartRequest) respond(_ *slog.Logger, pid int, err error) {
	q.reply <- outcome{pid: pid, err: err}
}

type controlServer struct {
	fd   int
	id   noID
	reqs chan *restartRequest
}

type noID struct{}

func (noID) String() string { return "" }

func listenControl(string, int, string, *slog.Logger) (*controlServer, error) {
	return nil, ErrNotSupported
}
func (*controlServer) finish(int, error, bool)  {}
func (*controlServer) stopAccepting(int, error) {}
func (*controlServer) serve()                   {}

var (
	rejected         chan struct{}
	mainNeedsPIDFile bool
	errRejected      = ErrNotSupported
)

func stopEarlySignals() {}

// FixupListenPID does nothing on this platform.
func FixupListenPID() {}

// StartedByRestart reports false on this platform.
func StartedByRestart() bool { return false }

// ReceiveState returns ErrNotSupported on this platform.
func ReceiveState() (io.ReadCloser, error) { return nil, ErrNotSupported }

// Ready returns ErrNotSupported on this platform.
func Ready() error { return ErrNotSupported }

// IsMain reports true on this platform: there is no one else.
func IsMain() bool { return true }

// RequestRestart returns ErrNotSupported on this platform.
func RequestRestart(context.Context, string) (int, error) { return 0, ErrNotSupported }

// ListenerName is as on Linux; see fdpass.go.
func ListenerName(network, address string) string { return network + "/" + address }

// Listen returns ErrNotSupported on this platform.
func Listen(string, string) (net.Listener, error) { return nil, ErrNotSupported }

// ListenNamed returns ErrNotSupported on this platform.
func ListenNamed(string, *net.ListenConfig, string, string) (net.Listener, error) {
	return nil, ErrNotSupported
}

// ListenPacket returns ErrNotSupported on this platform.
func ListenPacket(string, string) (net.PacketConn, error) { return nil, ErrNotSupported }

// ListenPacketNamed returns ErrNotSupported on this platform.
func ListenPacketNamed(string, *net.ListenConfig, string, string) (net.PacketConn, error) {
	return nil, ErrNotSupported
}

// File returns ErrNotSupported on this platform.
func File(string) (*os.File, error) { return nil, ErrNotSupported }

// Conn returns ErrNotSupported on this platform.
func Conn(string) (net.Conn, error) { return nil, ErrNotSupported }

// Add returns ErrNotSupported on this platform.
func Add(string, syscall.Conn) error { return ErrNotSupported }

// Remove reports false on this platform.
func Remove(string) bool { return false }

// Names returns nothing on this platform.
func Names() []string { return nil }

// MainChan returns a closed channel on this platform.
func MainChan() <-chan struct{} { c := make(chan struct{}); close(c); return c }

// SdNotifier does nothing on this platform; see sdnotify.go.
type SdNotifier struct{}

// SdField is a field of an sd_notify message; see sdnotify.go.
type SdField struct{}

// NewSdNotifier returns ErrNotSupported on this platform.
func NewSdNotifier(string) (*SdNotifier, error) { return nil, ErrNotSupported }

// SystemdNotifier returns ErrNotSupported on this platform.
func SystemdNotifier() (*SdNotifier, error) { return nil, ErrNotSupported }

// Enabled reports false on this platform.
func (*SdNotifier) Enabled() bool { return false }

// Send returns ErrNotSupported on this platform.
func (*SdNotifier) Send(...SdField) error { return ErrNotSupported }

// SendFDs returns ErrNotSupported on this platform.
func (*SdNotifier) SendFDs([]int, ...SdField) error { return ErrNotSupported }

// Barrier returns ErrNotSupported on this platform.
func (*SdNotifier) Barrier(context.Context) error { return ErrNotSupported }

// Close does nothing on this platform.
func (*SdNotifier) Close() error { return nil }

func SdReady() SdField                      { return SdField{} }
func SdReloading() SdField                  { return SdField{} }
func SdStopping() SdField                   { return SdField{} }
func SdStatus(string) SdField               { return SdField{} }
func SdMainPID(int) SdField                 { return SdField{} }
func SdErrno(syscall.Errno) SdField         { return SdField{} }
func SdExtendTimeout(time.Duration) SdField { return SdField{} }
func SdWatchdog() SdField                   { return SdField{} }
func SdWatchdogTrigger() SdField            { return SdField{} }
func SdFDStore(string) SdField              { return SdField{} }
func SdFDStoreRemove(string) SdField        { return SdField{} }
func SdFDPollOff() SdField                  { return SdField{} }

// SdWatchdogInterval returns ErrNotSupported on this platform.
func SdWatchdogInterval() (time.Duration, bool, error) { return 0, false, ErrNotSupported }

// StoreFDs returns ErrNotSupported on this platform.
func StoreFDs(...string) error { return ErrNotSupported }

// UnstoreFDs returns ErrNotSupported on this platform.
func UnstoreFDs(...string) error { return ErrNotSupported }

func runningExecutable() (string, error) { return "", ErrNotSupported }

const mainPIDTimeout = 0

func (*SdNotifier) sendWithin(context.Context, ...SdField) error { return ErrNotSupported }
