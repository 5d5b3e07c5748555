//go:build !unix

package main

import (
	"errors"
	"os"
	"os/exec"
)

// On systems without process groups the demo cannot run (nor can shellflip
// restart anything); these let the example build there.

var stopSignals = []os.Signal{os.Interrupt}

type groupSignal int

const (
	sigTerm groupSignal = iota
	sigKill
)

func startOwnGroup(*exec.Cmd) {}

func signalGroup(int, groupSignal) error { return errors.ErrUnsupported }
