// Httpd is an HTTP server that restarts into a new process without refusing
// a connection or failing a request, however busy it is: the shellflip
// package's answer to "how do I deploy a new binary of a web server".
//
// Usage:
//
//	httpd [-listen ADDR] [-socket PATH] [-drain D] [-notify-reload] [-store-fds]   serve HTTP
//	httpd [-socket PATH] restart                     make the running server restart
//	httpd demo [-restarts N] [-interval D] [-clients N]
//
// Serving, it answers
//
//	GET /           200, "pid=PID generation=G\n"
//	GET /slow?ms=N  the same after N milliseconds (0 to 10000; anything else is a 400)
//
// on ADDR (default 127.0.0.1:8080), or, when systemd started it by socket
// activation (httpd.socket), on the socket systemd passed it under the name
// "http", and then it binds nothing itself. Its standard output carries one
// line, "Instance no. G listening on ADDR", once it serves: G is its
// generation (0 after a fresh start, one more than the old process's after a
// restart) and ADDR the address the socket is really bound to. Logs go to
// standard error.
//
// "httpd restart" asks the server on the control socket at PATH (default
// $XDG_RUNTIME_DIR/httpd.sock, or /run/httpd.sock as root: a directory other
// users cannot write to, so that none of them can take the path first;
// /run/httpd/control.sock under systemd, see httpd.service)
// to restart, and prints "Restart succeeded, child pid is PID" once the new
// process serves, or "Restart failed: TEXT" on standard error and exits 1.
// SIGUSR1 also restarts the server. SIGINT and SIGTERM stop it gracefully.
//
// A restart runs the program at the path the server was started from, so a
// deploy replaces the binary there and restarts. The new process takes over
// the listening socket and the control socket; the old one stops accepting,
// finishes the requests it has, and exits. Connections are never refused:
// the kernel queues those that arrive while neither process accepts.
//
// "httpd demo" shows it happen: it starts the server (this same binary) in a
// temporary directory, loads it from several kinds of clients, restarts it
// again and again, prints what each restart cost, and exits 1 if a single
// request failed. Try it:
//
//	go run ./examples/httpd demo
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/shellflip-go/shellflip/examples/internal/cmdline"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "serve on TCP `address` ADDR, unless systemd passed a socket named \"http\"")
	socket := flag.String("socket", cmdline.DefaultSocket("httpd"), "control socket `path` (default: $XDG_RUNTIME_DIR/httpd.sock, or /run/httpd.sock as root)")
	drain := flag.Duration("drain", 30*time.Second, "after a restart or a stop, wait at most `D` for requests in flight")
	notifyReload := flag.Bool("notify-reload", false, "run as a systemd Type=notify-reload service: SIGHUP restarts, announced with RELOADING=1")
	storeFDs := flag.Bool("store-fds", false, "keep the listening socket in systemd's fd store (FileDescriptorStoreMax=), so it survives a crash or \"systemctl restart\"")
	flag.Usage = usage
	flag.Parse()

	args := flag.Args()
	switch {
	case len(args) == 0:
		if *drain <= 0 {
			fmt.Fprintf(os.Stderr, "httpd: -drain %v: want a positive duration\n", *drain)
			os.Exit(2)
		}
		os.Exit(serve(*listen, cmdline.NeedSocket(*socket), *drain, *notifyReload, *storeFDs))
	case len(args) == 1 && args[0] == "restart":
		os.Exit(cmdline.Restart(cmdline.NeedSocket(*socket), restartTimeout))
	case args[0] == "demo":
		os.Exit(demo(args[1:]))
	default:
		fmt.Fprintf(os.Stderr, "httpd: unexpected arguments %q\n", args)
		usage()
		os.Exit(2)
	}
}

func usage() {
	out := flag.CommandLine.Output()
	fmt.Fprint(out, "Usage:\n"+
		"  httpd [-listen ADDR] [-socket PATH] [-drain D] [-notify-reload] [-store-fds]\n"+
		"                                                   serve HTTP\n"+
		"  httpd [-socket PATH] restart                     make the running server restart\n"+
		"  httpd demo [-restarts N] [-interval D] [-clients N]\n"+
		"                                                   restart a server under load, and tell\n")
	flag.PrintDefaults()
}

// restartTimeout bounds "httpd restart": the new process has readyTimeout to
// become ready, and the old one a few seconds more to hand over to it.
const restartTimeout = readyTimeout + 20*time.Second
