//go:build linux && !cgo

package main

const cgo = false
