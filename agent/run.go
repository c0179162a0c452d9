package agent

import (
	"context"
	"log/slog"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/rules"
)

// saveInterval is how often learned addresses are persisted.
const saveInterval = 5 * time.Second

// Run is the daemon: it installs the ruleset, serves the DNS proxy and keeps
// pinned names open until ctx ends. Stopping leaves the firewall in place:
// only `egressd remove` opens it.
func Run(ctx context.Context, configPath string, cfg *config.Config, log *slog.Logger) error {
	ups, err := upstreams(cfg)
	if err != nil {
		return err
	}
	fw, err := rules.NewFirewall()
	if err != nil {
		return err
	}
	keep, err := loadState(cfg.StateDir, time.Now())
	if err != nil {
		log.Warn("ignoring state file", "err", err)
	}
	rs := rules.Build(cfg)
	if err := fw.Install(ctx, rs, keep); err != nil {
		return err
	}
	log.Info("ruleset installed", "summary", rs.Summary(), "kept", len(fw.Learned()), "upstreams", ups)

	proxy := newProxy(cfg, ups, fw, log)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, name := range cfg.Allow.Names {
		go keepPinned(ctx, proxy, name, log)
	}
	go saveLoop(ctx, cfg.StateDir, fw, log)

	err = proxy.Serve(ctx, cfg.DNS.ListenPort, func() {
		log.Info("DNS proxy listening", "port", cfg.DNS.ListenPort)
	})
	if serr := saveState(cfg.StateDir, fw.Learned(), time.Now()); serr != nil {
		log.Error("state not saved", "err", serr)
	}
	log.Info("stopped; the firewall stays in place")
	return err
}

// keepPinned resolves name and refreshes it at half its remaining life, so
// its addresses never expire while upstream answers.
func keepPinned(ctx context.Context, p *dnsresolve.Proxy, name string, log *slog.Logger) {
	for {
		n, until, err := resolvePinnedUntil(ctx, p, name)
		wait := 5 * time.Second
		if err != nil {
			log.Warn("pinned name not refreshed", "name", name, "err", err)
		} else {
			wait = max(time.Until(until)/2, time.Second)
			log.Debug("pinned name refreshed", "name", name, "addresses", n, "next", wait)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

func saveLoop(ctx context.Context, dir string, fw *rules.Firewall, log *slog.Logger) {
	t := time.NewTicker(saveInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := saveState(dir, fw.Learned(), time.Now()); err != nil {
				log.Error("state not saved", "err", err)
			}
		}
	}
}
