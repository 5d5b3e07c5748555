package main

import (
	"os"
	"strings"
	"testing"
)

// TestREADMEIsCounter: the README's example is this example's serve, to
// the letter, so that what the README teaches is what the tests run.
func TestREADMEIsCounter(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(readme), "```go\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 || !strings.Contains(block, "func serve(") {
		t.Fatal("README.md has no Go block with func serve")
	}
	src, err := os.ReadFile("counter.go")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(src), block) {
		t.Errorf("README.md's example is not counter.go's serve, to the letter:\n%s", block)
	}
}
