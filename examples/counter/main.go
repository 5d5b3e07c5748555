// Counter is an HTTP counter that restarts into a new process without
// losing a count or giving one out twice: the example in shellflip's README.
//
//	counter [-listen ADDR] [-socket PATH]   serve the counter
//	counter [-socket PATH] restart          make the running server restart
//
// POST /next answers the next value, "N\n": 1, then 2, and so on (POST:
// no client or proxy repeats it on its own). Standard output carries
// "Instance no. G listening on ADDR" once generation G serves. "counter
// restart" prints "Restart succeeded, child pid is PID", or "Restart
// failed: TEXT" on standard error and exits 1. SIGUSR1 restarts too;
// SIGINT and SIGTERM stop.
//
// The service is counter.go; this file is its command line.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/shellflip-go/shellflip"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "serve on TCP `address` ADDR")
	socket := flag.String("socket", defaultSocket("counter"), "control socket `path` (default: $XDG_RUNTIME_DIR/counter.sock, or /run/counter.sock as root)")
	flag.Parse()
	switch args := flag.Args(); {
	case len(args) == 0:
		os.Exit(serve(*listen, needSocket(*socket)))
	case len(args) == 1 && args[0] == "restart":
		os.Exit(requestRestart(needSocket(*socket)))
	default:
		log.Printf("unexpected arguments %q", args)
		flag.Usage()
		os.Exit(2)
	}
}

// requestRestart asks the server on socket to restart, and says how it went.
func requestRestart(socket string) int {
	// The answer comes once the new process is ready, which the server
	// allows a minute (Config.ReadyTimeout's default); wait a little more.
	ctx, cancel := context.WithTimeout(context.Background(), 70*time.Second)
	defer cancel()
	pid, err := shellflip.RequestRestart(ctx, socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "Restart failed: %v\n", err)
		return 1
	}
	fmt.Printf("Restart succeeded, child pid is %d\n", pid)
	return 0
}

// defaultSocket is where the control socket goes unless -socket says
// otherwise: a directory that other users cannot write to, so that none of
// them can take the path first and answer restart requests
// ($XDG_RUNTIME_DIR, or /run as root); "" if there is none.
func defaultSocket(name string) string {
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, name+".sock")
	}
	if os.Geteuid() == 0 {
		return "/run/" + name + ".sock"
	}
	return ""
}

// needSocket returns socket, or exits with a usage error if it is empty.
func needSocket(socket string) string {
	if socket == "" {
		fmt.Fprintf(os.Stderr, "%s: nowhere to put the control socket that only this user can take: set -socket PATH, or XDG_RUNTIME_DIR\n", filepath.Base(os.Args[0]))
		os.Exit(2)
	}
	return socket
}
