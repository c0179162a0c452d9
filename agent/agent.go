// Package agent runs egressd: it installs the ruleset, serves the DNS
// proxy, keeps pinned names open, persists learned addresses and repairs
// the ruleset when someone else changes it.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/rules"
)

// Apply installs the ruleset of cfg, keeping valid learned addresses (from
// the kernel and the state file), and opens the pinned names. It returns a
// summary for humans.
func Apply(ctx context.Context, cfg *config.Config, log *slog.Logger) (string, error) {
	rs := rules.Build(cfg)
	ups, err := upstreams(cfg)
	if err != nil && len(cfg.Allow.Names) > 0 {
		return "", err // before touching the host
	}
	fw, err := rules.NewFirewall()
	if err != nil {
		return "", err
	}
	keep, err := loadState(cfg.StateDir, time.Now())
	if err != nil {
		log.Warn("ignoring state file", "err", err)
	}
	if err := fw.Install(ctx, rs, keep); err != nil {
		return "", err
	}
	sum := []string{"installed " + rs.Summary()}
	if len(cfg.Allow.Names) > 0 {
		p := newProxy(cfg, ups, fw, log)
		for _, name := range cfg.Allow.Names {
			n, err := resolvePinned(ctx, p, name)
			if err != nil {
				return "", fmt.Errorf("ruleset installed, but pinned name %s could not be opened: %w", name, err)
			}
			sum = append(sum, fmt.Sprintf("pinned %s: %d addresses", name, n))
		}
	}
	if err := saveState(cfg.StateDir, fw.Learned(), time.Now()); err != nil {
		log.Warn("state not saved", "err", err)
	}
	return strings.Join(sum, "\n"), nil
}

// Remove deletes the table; it reports whether it was installed.
func Remove(ctx context.Context) (bool, error) {
	fw, err := rules.NewFirewall()
	if err != nil {
		return false, err
	}
	return fw.Remove(ctx)
}

func newProxy(cfg *config.Config, ups []netip.AddrPort, fw dnsresolve.Allower, log *slog.Logger) *dnsresolve.Proxy {
	refuse := dns.RcodeRefused
	if cfg.DNS.RefuseWith == "nxdomain" {
		refuse = dns.RcodeNameError
	}
	return dnsresolve.NewProxy(dnsresolve.Options{
		Domains:     cfg.Allow.Domains,
		Upstream:    dnsresolve.NewUpstream(ups, cfg.Firewall.Mark, cfg.DNS.Timeout),
		Allower:     fw,
		MinTTL:      cfg.DNS.MinTTL,
		Grace:       cfg.DNS.Grace,
		RefuseRcode: refuse,
		Logger:      log,
	})
}

// resolvePinned opens the A and AAAA addresses of name and returns how many
// there are, and when the first of them needs a refresh.
func resolvePinned(ctx context.Context, p *dnsresolve.Proxy, name string) (int, error) {
	n, _, err := resolvePinnedUntil(ctx, p, name)
	return n, err
}

func resolvePinnedUntil(ctx context.Context, p *dnsresolve.Proxy, name string) (int, time.Time, error) {
	var errs []error
	n := 0
	var until time.Time
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		ans, err := p.Resolve(ctx, name, qtype)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		n += len(ans.Chain.Addrs)
		if len(ans.Chain.Addrs) > 0 && (until.IsZero() || ans.Until.Before(until)) {
			until = ans.Until
		}
	}
	if n == 0 {
		if len(errs) == 0 {
			errs = append(errs, errors.New("no public A or AAAA records"))
		}
		return 0, until, errors.Join(errs...)
	}
	return n, until, nil
}
