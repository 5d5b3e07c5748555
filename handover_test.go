//go:build linux

package shellflip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The state handover: the window in which the old process holds its state
// still, state that the new process did not read, and a new process that
// gives up with its reason.

const envTestStateMode = "SHELLFLIP_TEST_STATE_MODE" // what the next new process does with the state; see stateRole

func init() { testRoles["state"] = stateRole }

// stateRole is a service whose state is its generation. The old process
// reports each hook: "sendstate", then "closed how=ready" or "closed
// how=failed"; SIGTERM stops its Restarter. A new process that removes
// $SHELLFLIP_TEST_FAIL_FILE does what $SHELLFLIP_TEST_STATE_MODE says:
//
//	noread   never calls ReceiveState
//	partial  reads one byte of the state, closes it, and calls Start
//	giveup   reads the state and gives up with a reason
//	hold     reads the state, then waits for a line on $SHELLFLIP_TEST_HOLD_FIFO
func stateRole() int {
	pid := os.Getpid()
	report("started pid=%d", pid)
	mode := ""
	if startedByRestart() && takeKnob(envTestFailFile) {
		mode = os.Getenv(envTestStateMode)
	}
	gen := 0
	if mode != "noread" {
		st, err := ReceiveState()
		if err != nil {
			report("error pid=%d err=receive: %v", pid, err)
			return 1
		}
		if st != nil {
			if mode == "partial" {
				var b [1]byte
				st.Read(b[:])
			} else if b, err := io.ReadAll(st); err == nil {
				gen, _ = strconv.Atoi(strings.TrimSpace(string(b)))
				gen++
			}
			st.Close()
		}
	}
	switch mode {
	case "giveup":
		GiveUp(errors.New("state version 2 not understood"))
		return 1
	case "hold":
		waitFIFO(os.Getenv(envTestHoldFIFO))
	}
	r, err := Start(context.Background(), Config{
		SocketPath:   os.Getenv(envTestSocket),
		ReadyTimeout: testDeadline,
		Logger:       slog.New(reportLogs{}),
		Lifecycle: &Lifecycle{
			SendState: func(_ context.Context, w io.Writer) error {
				report("sendstate pid=%d", pid)
				_, err := fmt.Fprintln(w, gen)
				return err
			},
			NewProcessReady:  func(context.Context, int) { report("closed pid=%d how=ready", pid) },
			NewProcessFailed: func(context.Context, error) { report("closed pid=%d how=failed", pid) },
		},
	})
	if err != nil {
		report("startfailed pid=%d err=%v", pid, err)
		return 1
	}
	report("ready pid=%d gen=%d", pid, gen)
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() {
		<-term
		r.Stop()
	}()
	newPid, err := r.Wait()
	report("replaced pid=%d new=%d err=%v", pid, newPid, err)
	return 0
}

// stateCluster starts the state role with mode for its first new process.
func stateCluster(t *testing.T, mode string, env ...string) (*testCluster, map[string]string) {
	c := newTestCluster(t)
	knob := filepath.Join(c.dir, "knob")
	if err := os.WriteFile(knob, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	env = append(env, envTestFailFile+"="+knob, envTestStateMode+"="+mode)
	return c, c.start("state", env...)
}

// TestStateRefusedUnread: state that the new process did not ask for, or
// asked for and did not read to its end, fails the restart with a reason
// that says so; the old process keeps its state and serves, and the next
// restart hands it over.
func TestStateRefusedUnread(t *testing.T) {
	for mode, want := range map[string]string{
		"noread":  "did not ask for the state (it never called ReceiveState)",
		"partial": "the state it asked for was not read to its end",
	} {
		t.Run(mode, func(t *testing.T) {
			c, r0 := stateCluster(t, mode)
			err := c.requestErr()
			if !errors.Is(err, ErrRestartFailed) || !strings.Contains(err.Error(), want) {
				t.Fatalf("restart: %v, want a failure saying %q", err, want)
			}
			if r1 := c.restart(r0["pid"]); r1["gen"] != "1" {
				t.Errorf("the next new process has generation %s, want 1: the state was not kept", r1["gen"])
			}
		})
	}
}

// TestStateGiveUp: a new process that cannot use the state says why, and the
// requester's error carries it.
func TestStateGiveUp(t *testing.T) {
	c, r0 := stateCluster(t, "giveup")
	err := c.requestErr()
	var pid int
	if _, serr := fmt.Sscanf(err.Error(), "new process %d gave up: ", &pid); serr != nil ||
		err.Error() != fmt.Sprintf("new process %d gave up: state version 2 not understood", pid) {
		t.Fatalf("restart: %q, want \"new process PID gave up: state version 2 not understood\"", err)
	}
	c.restart(r0["pid"])
}

// TestStateWindowClosesOnce: whatever the outcome, after SendState ran
// exactly one of NewProcessReady and NewProcessFailed runs, once.
func TestStateWindowClosesOnce(t *testing.T) {
	t.Run("success", func(t *testing.T) {
		c, r0 := stateCluster(t, "")
		c.restart(r0["pid"]) // which waits for the old process's "replaced"
		stateExpectWindow(t, c, r0["pid"], "ready", true)
	})
	t.Run("failure", func(t *testing.T) {
		c, r0 := stateCluster(t, "partial")
		c.requestErr()
		stateExpectWindow(t, c, r0["pid"], "failed", false)
	})
	t.Run("stop", func(t *testing.T) {
		hold := filepath.Join(t.TempDir(), "hold")
		c, r0 := stateCluster(t, "hold", envTestHoldFIFO+"="+makeFIFO(t, filepath.Dir(hold), "hold"))
		answer := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), testDeadline)
			defer cancel()
			_, err := RequestRestart(ctx, c.socket)
			answer <- err
		}()
		c.reports.next("sendstate")
		// The new process holds after reading the state: Stop the old
		// process's Restarter mid-restart.
		pid, _ := strconv.Atoi(r0["pid"])
		syscall.Kill(pid, syscall.SIGTERM)
		if err := <-answer; err == nil {
			t.Fatal("the restart succeeded after Stop")
		}
		if closed := c.reports.nextFrom("closed", r0["pid"]); closed["how"] != "failed" {
			t.Fatalf("window closed with %v, want how=failed", closed)
		}
		stateExpectNoMore(t, c, r0["pid"], false)
	})
}

// stateExpectWindow checks that the window opened once and closed once, how.
func stateExpectWindow(t *testing.T, c *testCluster, pid, how string, replaced bool) {
	t.Helper()
	c.reports.nextFrom("sendstate", pid)
	if closed := c.reports.nextFrom("closed", pid); closed["how"] != how {
		t.Fatalf("window closed with %v, want how=%s", closed, how)
	}
	stateExpectNoMore(t, c, pid, replaced)
}

// stateExpectNoMore checks that pid's Restarter ends (or, if replaced, has
// ended: its "replaced" report was taken) without closing the window again.
func stateExpectNoMore(t *testing.T, c *testCluster, pid string, replaced bool) {
	t.Helper()
	if !replaced {
		p, _ := strconv.Atoi(pid)
		syscall.Kill(p, syscall.SIGTERM) // ends a Restarter that serves on
		c.reports.nextFrom("replaced", pid)
	}
	// Every report pid sent came before its last one, "replaced".
	for _, l := range c.reports.seen {
		if strings.HasPrefix(l, "closed pid="+pid+" ") {
			t.Errorf("the window closed again: %s", l)
		}
	}
}

// levelRecorder is a slog.Handler that keeps the level of each message.
type levelRecorder struct{ levels chan slog.Level }

func (h levelRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h levelRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h levelRecorder) WithGroup(string) slog.Handler            { return h }
func (h levelRecorder) Handle(_ context.Context, r slog.Record) error {
	h.levels <- r.Level
	return nil
}

// TestControlSocketProbeIsDebug: a client that connects and goes away
// without a word (another instance probing the path) is logged at debug
// level, not as a warning; a garbage request is still a warning.
func TestControlSocketProbeIsDebug(t *testing.T) {
	rec := levelRecorder{make(chan slog.Level, 8)}
	path := filepath.Join(t.TempDir(), "ctl.sock")
	s, err := listenControl(path, -1, "", slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.finish(0, errors.New("done"), false)
	go s.serve()
	for _, tc := range []struct {
		send string
		want slog.Level
	}{{"", slog.LevelDebug}, {"\x00\x00\x00\x01x", slog.LevelWarn}} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(tc.send))
		c.(*net.UnixConn).CloseWrite()
		io.Copy(io.Discard, c) // the answer, then end of file
		c.Close()
		select {
		case l := <-rec.levels:
			if l != tc.want {
				t.Errorf("sending %q: logged at %v, want %v", tc.send, l, tc.want)
			}
		case <-time.After(testDeadline):
			t.Fatalf("sending %q: nothing logged", tc.send)
		}
	}
}
