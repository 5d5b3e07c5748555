//go:build linux || darwin || freebsd

// TEMPORARY (issue 10): the old sd_notify API, rebuilt on sdnotify.go's
// notifier so that the callers not yet adapted build and the suite runs.
// Delete this file when the callers use processNotifier, send, barrier and
// Notify. Nothing here is new API except Notify, a stand-in for the one
// notify.go will have.

package shellflip

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type SdNotifier struct {
	n       *notifier
	gated   bool
	retired atomic.Bool
}

type SdField struct {
	kv        []string
	reloading bool // RELOADING=1 and MONOTONIC_USEC, read when sending
}

func NewSdNotifier(addr string) (*SdNotifier, error) {
	n, err := newNotifier(addr)
	if err != nil {
		return nil, err
	}
	return &SdNotifier{n: n}, nil
}

var compatProcess = sync.OnceValues(func() (*SdNotifier, error) {
	n, err := processNotifier()
	if err != nil {
		return nil, err
	}
	return &SdNotifier{n: n, gated: StartedByRestart()}, nil
})

func SystemdNotifier() (*SdNotifier, error) { return compatProcess() }

func (s *SdNotifier) notMain() error {
	if s.gated && !IsMain() || s.retired.Load() {
		return ErrNotMain
	}
	return nil
}

func (s *SdNotifier) Enabled() bool { return s != nil && s.n != nil }

func (s *SdNotifier) Send(fields ...SdField) error { return s.SendFDs(nil, fields...) }

func (s *SdNotifier) SendFDs(fds []int, fields ...SdField) error {
	return s.sendWithinFDs(context.Background(), fds, fields)
}

func (s *SdNotifier) sendWithin(ctx context.Context, fields ...SdField) error {
	return s.sendWithinFDs(ctx, nil, fields)
}

func (s *SdNotifier) sendWithinFDs(ctx context.Context, fds []int, fields []SdField) error {
	if !s.Enabled() {
		return nil
	}
	if err := s.notMain(); err != nil {
		return err
	}
	return s.n.sendFields(ctx, fds, fields)
}

func (s *SdNotifier) Barrier(ctx context.Context) error {
	if !s.Enabled() {
		return nil
	}
	if err := s.notMain(); err != nil {
		return err
	}
	return s.n.barrier(ctx)
}

func (s *SdNotifier) Close() error {
	if s.Enabled() {
		s.n.conn.Close()
	}
	return nil
}

func (s *SdNotifier) handOver(ctx context.Context, pid int) error {
	if !s.Enabled() {
		return nil
	}
	s.retired.Store(true)
	if err := s.n.sendFields(ctx, nil, []SdField{SdMainPID(pid), SdStatus("")}); err != nil {
		return err
	}
	return s.n.barrier(ctx)
}

// Send is for bench_test.go, which calls it on sdNewNotifier's result.
func (n *notifier) Send(fields ...SdField) error {
	return n.sendFields(context.Background(), nil, fields)
}

func (n *notifier) sendFields(ctx context.Context, fds []int, fields []SdField) error {
	var kv []string
	for _, f := range fields {
		if f.reloading {
			usec, err := monotonicUsec()
			if err != nil {
				return err
			}
			kv = append(kv, "RELOADING=1", "MONOTONIC_USEC="+strconv.FormatInt(usec, 10))
		}
		kv = append(kv, f.kv...)
	}
	return n.send(ctx, fds, kv...)
}

// Notify is a stand-in for the Notify notify.go will have.
func Notify(fields ...string) error {
	s, err := SystemdNotifier()
	if err != nil || !s.Enabled() {
		return err
	}
	if err := s.notMain(); err != nil {
		return err
	}
	for _, f := range fields {
		if err := checkUserField(f); err != nil {
			return err
		}
	}
	return s.n.send(context.Background(), nil, fields...)
}

func sdKV(kv ...string) SdField { return SdField{kv: kv} }

func SdReady() SdField           { return sdKV("READY=1") }
func SdReloading() SdField       { return SdField{reloading: true} }
func SdStopping() SdField        { return sdKV("STOPPING=1") }
func SdStatus(s string) SdField  { return sdKV("STATUS=" + s) }
func SdMainPID(pid int) SdField  { return sdKV("MAINPID=" + strconv.Itoa(pid)) }
func SdWatchdog() SdField        { return sdKV("WATCHDOG=1") }
func SdWatchdogTrigger() SdField { return sdKV("WATCHDOG=trigger") }
func SdFDPollOff() SdField       { return sdKV("FDPOLL=0") }
func SdFDStore(n string) SdField { return sdKV("FDSTORE=1", "FDNAME="+n) }
func SdFDStoreRemove(n string) SdField {
	return sdKV("FDSTOREREMOVE=1", "FDNAME="+n)
}
func SdErrno(e syscall.Errno) SdField {
	return sdKV("ERRNO=" + strconv.FormatUint(uint64(e), 10))
}
func SdExtendTimeout(d time.Duration) SdField {
	usec := (d + time.Microsecond - 1) / time.Microsecond
	if d < 0 {
		usec = -1 // send refuses it
	}
	return sdKV("EXTEND_TIMEOUT_USEC=" + strconv.FormatInt(int64(usec), 10))
}

func SdWatchdogInterval() (time.Duration, bool, error) { return WatchdogInterval() }
