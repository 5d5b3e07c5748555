// Package extest is what the examples' tests share: they run an example as
// its users do, as a program built with go build.
package extest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
)

// Build builds the example in the current directory (a test's is its
// package's) into a temporary directory, with the race detector if this
// test binary has it, and returns the binary's path. Without a go tool on
// $PATH the test is skipped, and says so.
func Build(t *testing.T, name string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool on $PATH to build the example with: %v", err)
	}
	bin := filepath.Join(t.TempDir(), name)
	cmd := exec.Command(goTool, "build", "-o", bin)
	if info, ok := debug.ReadBuildInfo(); ok && slices.Contains(info.Settings, debug.BuildSetting{Key: "-race", Value: "true"}) {
		cmd.Args = append(cmd.Args, "-race")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return bin
}

// OpenFDs counts this process's open fds, once the runtime's poller (which
// opens fds of its own on first use) is up.
func OpenFDs(t *testing.T) int {
	t.Helper()
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
