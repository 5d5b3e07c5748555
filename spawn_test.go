//go:build linux

package shellflip

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Starting the new process (spawn.go): what runs, where, and with which
// fds.

// TestSealFDsFallbacks: without close_range and without a listing of the
// process's fds (or with one that shows only stdio), sealing still marks
// every inherited fd close-on-exec.
func TestSealFDsFallbacks(t *testing.T) {
	noCloseRange := func() error { return unix.ENOSYS }
	stdioOnly := t.TempDir() // what FreeBSD's /dev/fd shows without fdescfs
	for _, name := range []string{"0", "1", "2"} {
		if err := os.WriteFile(filepath.Join(stdioOnly, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ name, dir string }{
		{"listing", "/proc/self/fd"},
		{"limit", filepath.Join(t.TempDir(), "no-such-dir")},
		{"stdio-only listing", stdioOnly},
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

// spawnStartCopy starts generation 0 of role "server" from a copy of the
// test binary at name in c's directory. It returns the copy's path and the
// ready report.
func spawnStartCopy(c *testCluster, name string) (string, map[string]string) {
	c.t.Helper()
	bin := filepath.Join(c.dir, name)
	if err := copyExecutable(os.Args[0], bin); err != nil {
		c.t.Fatal(err)
	}
	return bin, c.startCmd(bin, "server", nil)
}

// TestRestartDeletedBinary: when the program's file is gone (a binary that
// "go run" built and removed, say), the running executable is restarted.
func TestRestartDeletedBinary(t *testing.T) {
	c := newTestCluster(t)
	bin, r0 := spawnStartCopy(c, "gone.test")
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if r1 := c.restart(r0["pid"]); r1["gen"] != "1" {
		t.Errorf("new process reports generation %s, want 1", r1["gen"])
	}
}

// TestRestartProgramNotExecutable: a program file that exists but cannot be
// executed (a half-done deploy) fails the restart; it does not fall back to
// the running executable, which would restart the old code and report
// success.
func TestRestartProgramNotExecutable(t *testing.T) {
	c := newTestCluster(t)
	bin, r0 := spawnStartCopy(c, "prog.test")
	// A deploy renames a new file into place, but its mode is not set yet.
	deploy := bin + ".new"
	if err := copyExecutable(os.Args[0], deploy); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(deploy, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(deploy, bin); err != nil {
		t.Fatal(err)
	}
	err := c.requestErr()
	if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), "not executable") {
		t.Fatalf("restart with a non-executable program: %v, want a failure that says so", err)
	}
	os.Chmod(bin, 0o755)
	c.restart(r0["pid"])
}

// TestRestartProgramFromArgv0: a restart runs the program this process is,
// whatever its parent put in argv[0]. A bare argv[0] that $PATH does not
// resolve is never looked for in the working directory, where anyone who
// may write there could have put a program of that name.
func TestRestartProgramFromArgv0(t *testing.T) {
	c := newTestCluster(t)
	marker := filepath.Join(c.dir, "planted-ran")
	planted := filepath.Join(c.dir, "planted")
	if err := os.WriteFile(planted, []byte("#!/bin/sh\ntouch "+marker+"\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.startCmd(os.Args[0], "server", func(cmd *exec.Cmd) {
		cmd.Args[0] = "planted" // as exec -a, or systemd's ExecStart=@, would set it
		cmd.Dir = c.dir
		cmd.Env = append(cmd.Env, "PATH=/usr/bin:/bin")
	})
	c.restart(r0["pid"])
	if _, err := os.Stat(marker); err == nil {
		t.Errorf("the restart ran the program planted in the working directory")
	}
}

// TestRestartStartDirGone: the directory the service started in was
// removed (an old release directory, pruned); restarts still work, in the
// directory the process has.
func TestRestartStartDirGone(t *testing.T) {
	c := newTestCluster(t)
	dir := filepath.Join(c.dir, "release-1")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r0 := c.startCmd(os.Args[0], "server", func(cmd *exec.Cmd) { cmd.Dir = dir })
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	c.restart(r0["pid"])
}
