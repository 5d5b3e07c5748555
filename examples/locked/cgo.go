//go:build linux && cgo

package main

// cgo is whether this binary was built with cgo; see lockDown.
const cgo = true
