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
// From the moment the count is written for the new process (SendState),
// requests wait: until the new process is ready (NewProcessReady), then
// they are forwarded to it, or until the restart failed (NewProcessFailed),
// then they are served here.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip"
	"github.com/shellflip-go/shellflip/httpdrain"
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

func serve(listen, socket string) int {
	// Every generation writes to the first one's stdout and stderr: if
	// their reader goes away, a write must fail, not kill the server.
	signal.Ignore(syscall.SIGPIPE)

	// 1. Before Start: the state, if a restart started this process, and
	//    the listener, the old process's or a new one.
	gen, count, err := receiveState()
	if err != nil {
		log.Printf("cannot take over from the old process: %v", err) // TODO(lead): GiveUp
		return 1
	}
	ln, err := shellflip.Listen("tcp", listen)
	if err != nil {
		log.Print(err)
		return 1
	}
	var n atomic.Uint64
	n.Store(count)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /next", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", n.Add(1))
	})
	d := httpdrain.New(&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln)

	// 2. Start returns once this process is the one that serves.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := shellflip.Start(ctx, shellflip.Config{
		SocketPath: socket,
		Lifecycle: &shellflip.Lifecycle{
			SendState: func(ctx context.Context, w io.Writer) error {
				if err := d.Hold(ctx); err != nil { // the count stops here
					return err
				}
				_, err := fmt.Fprintf(w, "%d %d\n", gen, n.Load())
				return err
			},
			NewProcessReady:  func(context.Context, int) { d.PassThrough() },
			NewProcessFailed: func(context.Context, error) { d.Resume() },
		},
	})
	if err != nil {
		log.Print(err)
		return 1
	}
	go func() {
		if err := d.Serve(); err != nil {
			log.Print(err)
		}
	}()
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	// 3. Replaced, or stopped: finish what this process's connections carry.
	if _, err := r.Wait(); err != nil {
		log.Print(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Drain(ctx); err != nil {
		log.Print(err)
	}
	return 0
}

// receiveState returns this process's generation and the count: 0 and 0
// after a fresh start, or what SendState wrote, with the generation one up.
func receiveState() (gen, count uint64, err error) {
	state, err := shellflip.ReceiveState()
	if err != nil || state == nil {
		return 0, 0, err
	}
	defer state.Close()
	b, err := io.ReadAll(io.LimitReader(state, 64))
	if err != nil {
		return 0, 0, err
	}
	return parseState(string(b))
}

// parseState parses exactly what SendState writes, "GENERATION COUNT\n",
// and returns the next generation and the count.
func parseState(s string) (gen, count uint64, err error) {
	_, err = fmt.Sscanf(s, "%d %d\n", &gen, &count)
	if err != nil || fmt.Sprintf("%d %d\n", gen, count) != s || gen == math.MaxUint64 {
		return 0, 0, fmt.Errorf("the state %q is not what SendState writes", s)
	}
	return gen + 1, count, nil
}

// requestRestart asks the server on socket to restart, and says how it went.
func requestRestart(socket string) int {
	ctx, cancel := context.WithTimeout(context.Background(), shellflip.DefaultReadyTimeout+10*time.Second)
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
