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
	"flag"
	"log"
	"os"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/cmdline"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "serve on TCP `address` ADDR")
	socket := flag.String("socket", cmdline.DefaultSocket("counter"), "control socket `path` (default: $XDG_RUNTIME_DIR/counter.sock, or /run/counter.sock as root)")
	flag.Parse()
	switch args := flag.Args(); {
	case len(args) == 0:
		os.Exit(serve(*listen, cmdline.NeedSocket(*socket)))
	case len(args) == 1 && args[0] == "restart":
		os.Exit(cmdline.Restart(cmdline.NeedSocket(*socket), restartTimeout))
	default:
		log.Printf("unexpected arguments %q", args)
		flag.Usage()
		os.Exit(2)
	}
}

// restartTimeout bounds "counter restart": the server gives a new process a
// minute (Config.ReadyTimeout's default) to become ready, and hands over in
// a few seconds more.
const restartTimeout = 70 * time.Second
