//go:build darwin || freebsd

package shellflip

import "context"

// The restart broker is Linux's (broker.go): it needs SOCK_SEQPACKET and
// /proc/self/exe, and seccomp, which it is for, is Linux's.

// Broker: see broker.go.
type Broker struct{}

// NewBroker returns ErrNotSupported: see broker.go.
func NewBroker() (*Broker, error) { return nil, ErrNotSupported }

func (*Broker) check() error { return ErrNotSupported }

func (*Broker) spawn(context.Context, []uintptr, handoff) (*childWatch, error) {
	return nil, ErrNotSupported
}
