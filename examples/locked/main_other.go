//go:build !linux

// Locked is Linux's: seccomp is a Linux facility. See main.go.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "locked: seccomp, and so this example, is Linux only")
	os.Exit(2)
}
