//go:build linux

// Locked is an HTTP server that locks itself down with seccomp and still
// restarts into new versions of itself: the shellflip package's reference
// for services whose policy denies starting programs.
//
// Usage:
//
//	locked [-listen ADDR] [-socket PATH] [-broker=false]   serve HTTP
//	locked [-socket PATH] restart                          make the running server restart
//	locked demo [-restarts N] [-interval D] [-clients N]   restart a server under load, and tell
//
// It answers GET / with 200 and "pid=PID generation=G\n" on ADDR (default
// 127.0.0.1:8080), prints "Instance no. G listening on ADDR" once it
// serves, and restarts on SIGUSR1 or when "locked restart" asks on the
// control socket at PATH (default $XDG_RUNTIME_DIR/locked.sock, or
// /run/locked.sock as root). "locked restart" prints "Restart succeeded,
// child pid is PID", or "Restart failed: TEXT" on standard error and exits
// 1. SIGINT and SIGTERM stop the server once its requests are done.
//
// Each generation, in order:
//
//  1. starts a restart broker (shellflip.NewBroker): a copy of this program,
//     not filtered, that will start the next generation;
//  2. takes over from the old process: its listening socket and its state
//     (the generation number);
//  3. locks itself down (filter.go): no_new_privs, then a deny-by-default
//     seccomp filter on every thread; a process that cannot lock down
//     gives up, and the restart that started it fails;
//  4. declares itself ready (shellflip.Start), inside the filter, and
//     serves.
//
// The filter kills the process on any system call it does not list, and
// lists neither execve nor process-creating clone: a process that was taken
// over cannot start a program. A restart needs both; the broker makes them,
// for this process and with the fds it sends, and starts nothing but this
// program. It matters in two more ways. Filters pass through execve, so a
// new process started by the locked one would run under the old filter as
// well as its own, one more each generation, and the kernel refuses a
// chain of filters longer than 32768 instructions in all: each generation
// here runs under its own filter only. And a filter that refuses clone with
// KILL_PROCESS, as the default does, would kill the old process at its
// restart (SIGSYS, and the restart client sees the connection close);
// this one answers a process clone with EPERM, so that "locked
// -broker=false" (no broker) fails its restarts with a clear error and
// keeps serving.
//
// "locked demo" starts a server, loads it, restarts it, and prints each
// generation's seccomp filter count (Seccomp_filters in /proc/PID/status),
// which stays 1.
//
// Build it with CGO_ENABLED=0 (the filter lists the Go runtime's system
// calls, not libc's), on amd64:
//
//	CGO_ENABLED=0 go run ./examples/locked demo
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/cmdline"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "serve on TCP `address` ADDR")
	socket := flag.String("socket", cmdline.DefaultSocket("locked"), "control socket `path` (default: $XDG_RUNTIME_DIR/locked.sock, or /run/locked.sock as root)")
	broker := flag.Bool("broker", true, "restart through a broker; without one, restarts fail inside the filter")
	flag.Usage = usage
	flag.Parse()

	args := flag.Args()
	switch {
	case len(args) == 0:
		os.Exit(serve(*listen, cmdline.NeedSocket(*socket), *broker))
	case len(args) == 1 && args[0] == "restart":
		os.Exit(cmdline.Restart(cmdline.NeedSocket(*socket), restartTimeout))
	case args[0] == "demo":
		os.Exit(demo(args[1:]))
	default:
		fmt.Fprintf(os.Stderr, "locked: unexpected arguments %q\n", args)
		usage()
		os.Exit(2)
	}
}

func usage() {
	fmt.Fprint(flag.CommandLine.Output(), "Usage:\n"+
		"  locked [-listen ADDR] [-socket PATH] [-broker=false]   serve HTTP\n"+
		"  locked [-socket PATH] restart                          make the running server restart\n"+
		"  locked demo [-restarts N] [-interval D] [-clients N]   restart a server under load, and tell\n")
	flag.PrintDefaults()
}

// restartTimeout bounds "locked restart": the new process has readyTimeout
// to become ready, and the old one a few seconds more to hand over.
const restartTimeout = readyTimeout + 20*time.Second
