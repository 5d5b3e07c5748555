// Package cmdline is what the examples' command lines share: where the
// control socket goes by default, and the restart command.
package cmdline

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/shellflip-go/shellflip"
)

// DefaultSocket is where the control socket of the example name goes
// unless -socket says otherwise: a directory that other users cannot write
// to, so that none of them can take the path first and answer restart
// requests ($XDG_RUNTIME_DIR, or /run as root); "" if there is none.
func DefaultSocket(name string) string {
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, name+".sock")
	}
	if os.Geteuid() == 0 {
		return "/run/" + name + ".sock"
	}
	return ""
}

// NeedSocket returns socket, or exits with a usage error if it is empty.
func NeedSocket(socket string) string {
	if socket == "" {
		fmt.Fprintf(os.Stderr, "%s: nowhere to put the control socket that only this user can take: set -socket PATH, or XDG_RUNTIME_DIR\n", filepath.Base(os.Args[0]))
		os.Exit(2)
	}
	return socket
}

// Restart asks the server on socket to restart, waiting at most timeout
// (the server's ready timeout and a little more), prints "Restart
// succeeded, child pid is PID" or, on standard error, "Restart failed:
// TEXT", and returns the exit code: 0 or 1.
func Restart(socket string, timeout time.Duration) int {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	pid, err := shellflip.RequestRestart(ctx, socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "Restart failed: %v\n", err)
		return 1
	}
	fmt.Printf("Restart succeeded, child pid is %d\n", pid)
	return 0
}
