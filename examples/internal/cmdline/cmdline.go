// Package cmdline is what the examples share: where the control socket
// goes by default, the restart command, and the generation as state.
package cmdline

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// ReceiveGeneration returns this process's generation: 0 after a fresh
// start, one more than the old process's after a restart. The state is the
// old process's generation in decimal and a newline (httpd's and locked's
// SendState write it so).
func ReceiveGeneration() (uint64, error) {
	state, err := shellflip.ReceiveState()
	if err != nil || state == nil {
		return 0, err
	}
	defer state.Close()
	b, err := io.ReadAll(io.LimitReader(state, 32))
	if err != nil {
		return 0, fmt.Errorf("reading the state: %w", err)
	}
	line, ok := strings.CutSuffix(string(b), "\n")
	prev, perr := strconv.ParseUint(line, 10, 64)
	if !ok || perr != nil {
		return 0, fmt.Errorf("the state %q is not a generation number and a newline", b)
	}
	if prev == math.MaxUint64 {
		return 0, fmt.Errorf("the old process is generation %d, the last there can be", prev)
	}
	return prev + 1, nil
}
