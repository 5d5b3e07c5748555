//go:build linux

package shellflip

import (
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSealFDsFallbacks: without close_range and without a listing of the
// process's fds, sealing still marks every inherited fd close-on-exec.
func TestSealFDsFallbacks(t *testing.T) {
	noCloseRange := func() error { return unix.ENOSYS }
	for _, tc := range []struct{ name, dir string }{
		{"listing", "/proc/self/fd"},
		{"limit", filepath.Join(t.TempDir(), "no-such-dir")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p [2]int
			if err := unix.Pipe2(p[:], 0); err != nil { // not close-on-exec: as if inherited
				t.Fatal(err)
			}
			defer unix.Close(p[0])
			defer unix.Close(p[1])
			if err := sealFDsWith(noCloseRange, tc.dir); err != nil {
				t.Fatal(err)
			}
			for _, fd := range p {
				if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
					t.Errorf("fd %d: flags %#x, %v; want close-on-exec", fd, fl, err)
				}
			}
		})
	}
}

// TestLogLimiter: a failure that repeats (accept out of fds) is logged once
// per logEvery, with how often it happened since.
func TestLogLimiter(t *testing.T) {
	var l logLimiter
	t0 := time.Unix(1000, 0)
	if n := l.note(t0); n != 1 {
		t.Fatalf("first occurrence: %d, want it logged (1)", n)
	}
	for i := 1; i <= 199; i++ { // every 50 ms for 10 s, less one
		if n := l.note(t0.Add(time.Duration(i) * 50 * time.Millisecond)); n != 0 {
			t.Fatalf("occurrence %d, %v after the first: logged", i, time.Duration(i)*50*time.Millisecond)
		}
	}
	if n := l.note(t0.Add(logEvery)); n != 200 {
		t.Errorf("after %v: %d, want 200 occurrences reported", logEvery, n)
	}
}
