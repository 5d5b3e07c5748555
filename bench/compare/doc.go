// Package compare benchmarks a shellflip restart against a
// github.com/cloudflare/tableflip v1.2.3 upgrade, and both against the floor
// of starting a Go binary, in one test binary, so that all of them exec the
// same file with the same environment and command line.
//
// It is a module of its own so that the library's module never depends on
// tableflip. It has no API; run it with
//
//	go test -run '^$' -bench . -count 6 -benchtime 20x > compare.txt
//	benchstat -table /claim -row /fds compare.txt
//
// Each kind compared is a unit of its own (floor-sec/op, shellflip-sec/op,
// tableflip/shellflip, ...), timed in the same iterations. What is
// measured, and why it is a fair comparison, is written down in
// compare_test.go.
package compare
