// Restarter is a TCP echo server that restarts into a new process without
// dropping a connection: the Go counterpart of shellflip's
// examples/restarter.rs.
//
// It greets each client with the pid of the process serving it, then echoes
// whatever the client sends. "restarter restart" asks the running server,
// over the control socket, to restart: the new process inherits the
// listening socket (same address; no connection is refused meanwhile) and
// learns its generation from the old one, which then stops accepting, keeps
// serving the clients it has, and exits once the last of them has left. A
// process whose generation is above -max-generation refuses to restart and
// keeps serving.
//
// To try it by hand, build it (go run deletes the binary when the first
// process exits, and the next restart would have nothing to run), then use
// three terminals:
//
//	go build -o /tmp/restarter ./examples/restarter
//	/tmp/restarter            # Instance no. 0 listening on 127.0.0.1:PORT
//	nc 127.0.0.1 PORT         # Hello, this is process PID; type to get echoes
//	/tmp/restarter restart    # Restart succeeded, child pid is PID
//
// A second nc is greeted by the new process, the first one still gets its
// echoes from the old process, and the old process exits when it quits.
//
// Usage:
//
//	restarter [-socket PATH] [-listen ADDR] [-max-generation N]
//	restarter [-socket PATH] restart
//
// Standard output carries only the "Instance no." line of each generation
// and the outcome of a successful restart; a failed restart prints
// "Restart failed: " and the reason on standard error and exits 1. Logs go
// to standard error.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/shellflip-go/shellflip"
	"github.com/shellflip-go/shellflip/examples/internal/cmdline"
)

func main() {
	socket := flag.String("socket", cmdline.DefaultSocket("restarter"), "restart coordination socket `path` (default: $XDG_RUNTIME_DIR/restarter.sock, or /run/restarter.sock as root)")
	listen := flag.String("listen", "127.0.0.1:0", "TCP `address` to serve on; the socket is kept across restarts")
	maxGen := flag.Uint("max-generation", 4, "a process of a generation above `N` refuses to restart")
	flag.Usage = func() {
		fmt.Fprint(flag.CommandLine.Output(), "Usage:\n"+
			"  restarter [-socket PATH] [-listen ADDR] [-max-generation N]\n"+
			"  restarter [-socket PATH] restart\n")
		flag.PrintDefaults()
	}
	flag.Parse()

	switch args := flag.Args(); {
	case len(args) == 0:
		os.Exit(serve(cmdline.NeedSocket(*socket), *listen, *maxGen))
	case len(args) == 1 && args[0] == "restart":
		os.Exit(cmdline.Restart(cmdline.NeedSocket(*socket), restartTimeout))
	default:
		fmt.Fprintf(os.Stderr, "restarter: unexpected arguments %q\n", args)
		flag.Usage()
		os.Exit(2)
	}
}

// serve runs one generation of the echo server until a restart replaced it
// and its last client has left.
func serve(socket, listen string, maxGen uint) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	// Every generation shares the first one's stdout and stderr. If their
	// reader goes away, a write there must fail, not kill the server with
	// SIGPIPE (Go's default for fds 1 and 2) in the middle of a restart.
	signal.Ignore(syscall.SIGPIPE)

	// Everything inherited from the old process must be taken before Start,
	// which declares this process ready and discards what was not taken.
	gen, err := receiveGeneration()
	if err != nil {
		// The old process fails the restart with this reason, and keeps
		// serving.
		shellflip.GiveUp(err)
		log.Error("cannot take over from the old process", "err", err)
		return 1
	}
	ln, err := shellflip.Listen("tcp", listen)
	if err != nil {
		log.Error("cannot listen", "addr", listen, "err", err)
		return 1
	}

	r, err := shellflip.Start(context.Background(), shellflip.Config{
		SocketPath: socket,
		Logger:     log,
		Lifecycle: &shellflip.Lifecycle{
			PreSpawn: func(context.Context) error {
				// Refuse before anything is started: the requester gets
				// this text, and this process carries on.
				if uint64(gen) > uint64(maxGen) {
					log.Info("refusing to restart", "generation", gen, "max_generation", maxGen)
					return fmt.Errorf("instance no. %d refuses to restart: %d restarts is more than anybody needs, surely? (-max-generation %d)", gen, gen, maxGen)
				}
				return nil
			},
			SendState: func(_ context.Context, w io.Writer) error {
				// 4 bytes, big-endian, as restarter.rs's write_u32.
				var b [4]byte
				binary.BigEndian.PutUint32(b[:], gen)
				_, err := w.Write(b[:])
				return err
			},
			NewProcessReady: func(context.Context, int) {
				// Stop accepting before the requester learns that the
				// restart is done, so that every client that connects
				// after that reaches the new process. Close waits for a
				// pending Accept; the new process has its own copy of the
				// listening socket.
				ln.Close()
			},
		},
	})
	if err != nil {
		log.Error("cannot start the restarter", "err", err)
		return 1
	}
	coord := shellflip.NewShutdownCoordinator()
	go coord.Serve(ln, func(c net.Conn, h *shellflip.ShutdownHandle) { echo(c, h, log) })
	fmt.Printf("Instance no. %d listening on %s\n", gen, ln.Addr())

	p, err := r.Wait()
	ln.Close()
	code := 0
	if err != nil {
		log.Error("restarts are no longer possible", "err", err)
		code = 1
	} else {
		log.Info("restart successful, waiting for clients to leave", "new_pid", p, "clients", coord.Active())
	}
	coord.Shutdown(context.Background())
	log.Info("exiting")
	return code
}

// receiveGeneration returns this process's generation: 0 after a fresh
// start, one more than the old process's after a restart.
func receiveGeneration() (uint32, error) {
	state, err := shellflip.ReceiveState()
	if err != nil {
		return 0, err
	}
	if state == nil {
		return 0, nil
	}
	defer state.Close()
	// Read one byte past the 4 expected, to tell a longer stream from a
	// good one.
	b, err := io.ReadAll(io.LimitReader(state, 5))
	if err != nil {
		return 0, fmt.Errorf("reading the state: %w", err)
	}
	switch {
	case len(b) > 4:
		return 0, errors.New("the state is longer than a 4-byte generation number")
	case len(b) < 4:
		return 0, fmt.Errorf("the state is %d bytes long, want a 4-byte generation number", len(b))
	}
	prev := binary.BigEndian.Uint32(b)
	if prev == math.MaxUint32 {
		return 0, fmt.Errorf("the old process is generation %d, the last there can be", prev)
	}
	return prev + 1, nil
}

// echo greets the client with this process's pid, then sends back whatever
// it receives until the client leaves. Its connection holds h, so that the
// old process waits for it after a restart; shutdown, which begins then
// (h.Done is closed), is only logged.
func echo(c net.Conn, h *shellflip.ShutdownHandle, log *slog.Logger) {
	defer c.Close()
	peer := c.RemoteAddr().String()
	log.Info("received connection", "client", peer)
	left := make(chan struct{})
	defer close(left)
	go func() {
		select {
		case <-h.Done():
			log.Info("shutdown requested but client is still active", "client", peer)
		case <-left:
		}
	}()

	if _, err := fmt.Fprintf(c, "Hello, this is process %d\n", os.Getpid()); err != nil {
		log.Error("write failed", "client", peer, "err", err)
		return
	}
	buf := make([]byte, 1024)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				log.Error("write failed", "client", peer, "err", werr)
				return
			}
		}
		if err == io.EOF {
			log.Info("client left", "client", peer)
			return
		}
		if err != nil {
			log.Error("read failed", "client", peer, "err", err)
			return
		}
	}
}

// restartTimeout bounds "restarter restart": the server gives a new process a
// minute (Config.ReadyTimeout's default) to become ready, and hands over in
// a few seconds more.
const restartTimeout = 70 * time.Second
