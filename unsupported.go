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

// Stubs of the API (see the package doc and the other files) for the
// platforms the package does not support; .ci/run checks they match Linux's.

type (
	Config struct {
		SocketPath   string
		Signal       os.Signal
		Env          []string
		Lifecycle    *Lifecycle
		ExitOnError  bool
		ReadyTimeout time.Duration
		Path         string
		Args         []string
		NotifyReload bool
		PIDFile      string
		Logger       *slog.Logger
		Broker       *Broker
	}
	Lifecycle struct {
		PreSpawn         func(ctx context.Context) error
		SendState        func(ctx context.Context, w io.Writer) error
		NewProcessReady  func(ctx context.Context, newPid int)
		NewProcessFailed func(ctx context.Context, err error)
	}
	Restarter    struct{ done chan struct{} }
	Broker       struct{ done chan struct{} }
	ListenConfig struct {
		net.ListenConfig
		Name string
	}
)

func NewBroker() (*Broker, error) { return nil, ErrNotSupported }

func Start(ctx context.Context, cfg Config) (*Restarter, error) { return nil, ErrNotSupported }

func (r *Restarter) Done() <-chan struct{}                    { return nil }
func (r *Restarter) Wait() (newPid int, err error)            { return 0, ErrNotSupported }
func (r *Restarter) Stop()                                    {}
func (r *Restarter) Restart(ctx context.Context) (int, error) { return 0, ErrNotSupported }

func RequestRestart(ctx context.Context, socketPath string) (int, error) { return 0, ErrNotSupported }

func ReceiveState() (io.ReadCloser, error) { return nil, nil }
func GiveUp(reason error) error            { return nil }

func Listen(network, address string) (net.Listener, error)         { return nil, ErrNotSupported }
func ListenPacket(network, address string) (net.PacketConn, error) { return nil, ErrNotSupported }

func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	return nil, ErrNotSupported
}

func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return nil, ErrNotSupported
}

func ListenerName(network, address string) string { return network + "/" + address }
func FD(name string) (*os.File, error)            { return nil, ErrNotSupported }
func Add(name string, c syscall.Conn) error       { return ErrNotSupported }
func Remove(name string) bool                     { return false }
func StoreFDs(names ...string) error              { return nil }
func Notify(fields ...string) error               { return nil }

func WatchdogInterval() (interval time.Duration, enabled bool, err error) { return 0, false, nil }
