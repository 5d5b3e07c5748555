package main

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/shellflip-go/shellflip"
)

// watchdog pings systemd's watchdog (WatchdogSec=) as sd_watchdog_enabled(3)
// advises, every half interval, while this process is the service's main
// process: from Start, which returns once it is, until it hands the service
// over to a new process, whereupon the library refuses to send (ErrNotMain:
// the ping would come from a pid that is no longer main), or until ctx is
// done. The first ping goes at once: the old process's last one may be
// almost an interval old.
func watchdog(ctx context.Context, log *slog.Logger) {
	interval, enabled, err := shellflip.WatchdogInterval()
	if err != nil {
		log.Warn("ignoring systemd's watchdog settings", "err", err)
		return
	}
	if !enabled {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		err := shellflip.Notify("WATCHDOG=1")
		if errors.Is(err, shellflip.ErrNotMain) {
			return
		}
		if err != nil {
			log.Warn("cannot ping systemd's watchdog", "err", err)
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}
