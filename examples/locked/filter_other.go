//go:build linux && !amd64

package main

import (
	"fmt"
	"runtime"
)

// lockDown refuses: the filter's table (filter.go) is amd64's.
func lockDown() error {
	return fmt.Errorf("no seccomp filter for %s: locked locks down on amd64 only", runtime.GOARCH)
}
