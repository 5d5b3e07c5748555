//go:build linux || darwin || freebsd

package shellflip

// TEMPORARY: the internal notifier API on top of the old SdNotifier, until
// the rewritten sdnotify.go lands. Deleted at that merge.

import (
	"context"
	"errors"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

type notifier = SdNotifier

func processNotifier() (*notifier, error) {
	sdProcess.once.Do(func() {
		sdProcess.n, sdProcess.err = NewSdNotifier(os.Getenv("NOTIFY_SOCKET"))
	})
	return sdProcess.n, sdProcess.err
}

func (n *SdNotifier) enabled() bool { return n.Enabled() }

func (n *SdNotifier) send(ctx context.Context, fds []int, fields ...string) error {
	if !n.Enabled() {
		return nil
	}
	if len(fields) == 0 {
		return errors.New("no fields")
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	d, _ := ctx.Deadline()
	n.mu.Lock()
	defer n.mu.Unlock()
	n.buf = append(n.buf[:0], strings.Join(fields, "\n")...)
	return n.write(oob, d)
}

func monotonicUsec() (int64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, err
	}
	return ts.Nano() / 1e3, nil
}

func userField(f string) error {
	k, _, ok := strings.Cut(f, "=")
	if !ok || strings.ContainsAny(f, "\n\r\x00") {
		return errors.New("bad field")
	}
	switch k {
	case "MAINPID", "BARRIER", "FDSTORE", "MONOTONIC_USEC":
		return errors.New("library-owned field " + k)
	}
	return nil
}
