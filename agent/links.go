package agent

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// watchLinks logs container interfaces as they appear and disappear. The
// ruleset matches interfaces by name in the kernel, so a new bridge is
// filtered the moment it exists and nothing needs to be reinstalled; this
// tells the operator that it happened. The subscription is renewed when
// netlink closes it.
func watchLinks(ctx context.Context, patterns func() []string, log *slog.Logger) {
	for ctx.Err() == nil {
		updates := make(chan netlink.LinkUpdate, 64)
		done := make(chan struct{})
		err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
			ErrorCallback: func(err error) { log.Debug("link subscription", "err", err) },
		})
		if err != nil {
			log.Warn("cannot watch network interfaces", "err", err)
		} else {
			follow(ctx, updates, patterns, log)
		}
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func follow(ctx context.Context, updates <-chan netlink.LinkUpdate, patterns func() []string, log *slog.Logger) {
	known := map[int32]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				return
			}
			name := u.Attrs().Name
			pattern, match := matchIface(name, patterns())
			if !match {
				continue
			}
			switch {
			case u.Header.Type == unix.RTM_DELLINK:
				if known[u.Index] {
					delete(known, u.Index)
					log.Info("container interface gone", "interface", name)
				}
			case !known[u.Index]:
				known[u.Index] = true
				log.Info("container interface appeared; filtered", "interface", name, "pattern", pattern)
			}
		}
	}
}

// matchIface reports the pattern that matches an interface name, with the
// same meaning as in the ruleset: exact, or a prefix before a trailing "*".
func matchIface(name string, patterns []string) (string, bool) {
	for _, p := range patterns {
		if prefix, ok := strings.CutSuffix(p, "*"); ok && strings.HasPrefix(name, prefix) || p == name {
			return p, true
		}
	}
	return "", false
}
