//go:build unix

package main

import (
	"os"
	"os/exec"
	"syscall"
)

// stopSignals stop the server gracefully.
var stopSignals = []os.Signal{os.Interrupt, syscall.SIGTERM}

// startOwnGroup makes cmd the leader of a process group of its own. Every
// generation the server restarts into stays in that group (shellflip starts
// the new process where the old one stood), so the demo can reach them all,
// and a ^C at the terminal reaches the demo alone, which then stops them.
func startOwnGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}

// groupSignal is what signalGroup sends: sigTerm or sigKill.
type groupSignal = syscall.Signal

const (
	sigTerm groupSignal = syscall.SIGTERM
	sigKill groupSignal = syscall.SIGKILL
)

// signalGroup sends sig to every process of the group led by pgid.
func signalGroup(pgid int, sig groupSignal) error {
	return syscall.Kill(-pgid, sig)
}
