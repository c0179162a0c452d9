// Package agent runs egressd: it installs the ruleset, serves the DNS
// proxy, keeps pinned names open, persists learned addresses, and repairs
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
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/metrics"
	"github.com/egressd/egressd/rules"
)

// ErrPinnedPending is wrapped by Apply's error when the ruleset was
// installed (closed) but pinned names could not be opened yet, typically
// because no resolver is usable this early in boot.
var ErrPinnedPending = errors.New("ruleset installed (closed), pinned names pending")

// Apply installs the ruleset of cfg, keeping valid learned addresses (from
// the kernel and the state file), and opens the pinned names. It returns a
// summary for humans. The ruleset goes in first, whatever the network
// does: if no upstream is usable or a pinned name cannot be opened, it
// stays installed (closed) and Apply returns an error wrapping
// ErrPinnedPending.
func Apply(ctx context.Context, cfg *config.Config, log *slog.Logger) (string, error) {
	fw, err := firewall.New()
	if err != nil {
		return "", err
	}
	pl, err := start(ctx, cfg, fw, log)
	if err != nil {
		return "", err
	}
	sum := []string{"installed " + pl.rs.Summary()}
	if pl.upErr != nil {
		if len(cfg.Allow.Names) > 0 {
			return "", fmt.Errorf("%w: %v", ErrPinnedPending, pl.upErr)
		}
		sum = append(sum, "no usable upstream yet: "+pl.upErr.Error())
	}
	own, flows := openFlows(log)
	defer own.close()
	p := dnsresolve.NewProxy(proxyOptions(cfg, pl.ups, fw, flows, log, nil, nil, nil))
	var errs []error
	for _, name := range cfg.Allow.Names {
		n, _, err := openPinned(ctx, p, name)
		if err != nil {
			errs = append(errs, fmt.Errorf("pinned name %s: %w", name, err))
			continue
		}
		sum = append(sum, fmt.Sprintf("pinned %s: %d addresses", name, n))
	}
	learned, _ := fw.LearnedSeq()
	if _, err := saveState(cfg.StateDir, learned); err != nil {
		log.Warn("learned addresses not saved", "err", err)
	}
	if len(errs) > 0 {
		return "", fmt.Errorf("%w: %w", ErrPinnedPending, errors.Join(errs...))
	}
	return strings.Join(sum, "\n"), nil
}

// plan is the ruleset of a config on this host and what it was built
// from.
type plan struct {
	ups   []netip.AddrPort // the upstreams the ruleset lets egressd reach
	upErr error            // none is usable yet: the proxy answers SERVFAIL
	host  rules.Host
	rs    *rules.Ruleset
}

// planFor builds the ruleset of cfg for this host, with egressd's cgroup
// cg. A container pattern matching an uplink is an error.
func planFor(cfg *config.Config, cg *rules.Cgroup) (plan, error) {
	p := plan{}
	if err := checkRuleCgroups(cfg); err != nil {
		return p, err
	}
	p.ups, p.upErr = upstreams(cfg)
	host, err := hostFor(cfg, p.ups, cg)
	if err != nil {
		return p, err
	}
	p.host, p.rs = host, rules.BuildFor(cfg, host)
	return p, nil
}

// start is what Apply and Run share: it installs the ruleset of cfg into
// fw with the learned addresses cfg still allows. The ruleset goes in
// before anything that needs the network: without a usable upstream it
// is installed all the same (closed) and plan.upErr says why. A config
// that would leave the uplink open changes nothing.
func start(ctx context.Context, cfg *config.Config, fw *firewall.Firewall, log *slog.Logger) (plan, error) {
	p, err := planFor(cfg, ownCgroup(log))
	if err != nil {
		return p, err
	}
	fw.Limit(cfg.Firewall.MaxLearned)
	return p, install(ctx, cfg, fw, p.rs, log)
}

// install loads the state file and installs rs keeping the learned
// addresses, from the state file and from the kernel, that cfg still
// allows (see learnedAllowed). A corrupt state file is reported and
// ignored.
func install(ctx context.Context, cfg *config.Config, fw *firewall.Firewall, rs *rules.Ruleset, log *slog.Logger) error {
	now := time.Now()
	keep, err := loadState(cfg.StateDir, now)
	if err != nil {
		log.Warn("ignoring state file", "err", err)
	}
	// The proxy's local addresses come first, so that the DNAT never
	// points at an address that is not local (it would be routed out and
	// rejected there). Failing that, the ruleset still goes in (closed:
	// container DNS fails) and the error is returned.
	_, localErr := ensureLocal(cfg)
	if err := fw.Install(ctx, rs, keep, learnedAllowed(cfg, now)); err != nil {
		return err
	}
	forget(cfg, log)
	return localErr
}

// forget deletes DNS flows that would bypass the new redirect; a failure is
// logged: the ruleset is in place and new flows are redirected.
func forget(cfg *config.Config, log *slog.Logger) {
	n, err := forgetDNSFlows(cfg.DNS.ListenPort)
	if err != nil {
		log.Warn("old DNS flows not all cleared", "err", err)
	} else if n > 0 {
		log.Info("cleared DNS flows that predate the redirect", "flows", n)
	}
}

// Remove deletes the table and egressd's dummy interface; it reports
// whether the table was installed.
func Remove(ctx context.Context) (bool, error) {
	fw, err := firewall.New()
	if err != nil {
		return false, err
	}
	existed, err := fw.Remove(ctx)
	if err != nil {
		return existed, err
	}
	// Then the dummy interface of the proxy's local addresses, whatever
	// the config names it now.
	if _, err := removeLocal(); err != nil {
		return existed, err
	}
	return existed, nil
}

// proxyOptions are the proxy's options for cfg; flows deletes the
// conntrack entries of egressd's own queries, eng finds the engine zones'
// servers (nil: engine zones are refused, as Apply's proxy, which answers
// no client, can).
func proxyOptions(cfg *config.Config, ups []netip.AddrPort, allower dnsresolve.Allower, flows dnsresolve.Flows, log *slog.Logger, m *metrics.Metrics, eng *engines, cl *clients) dnsresolve.Options {
	refuse := dns.RcodeRefused
	if cfg.DNS.RefuseWith == config.RefuseNXDomain {
		refuse = dns.RcodeNameError
	}
	var fwd []dnsresolve.ForwardZone
	for _, f := range cfg.DNS.Forward {
		fwd = append(fwd, dnsresolve.ForwardZone{Zone: f.Zone, Servers: f.Servers})
	}
	upstream := dnsresolve.NewUpstream(ups, cfg.Firewall.Mark, cfg.DNS.Timeout)
	upstream.ForgetFlows(flows)
	var engineServers dnsresolve.EngineServers
	if eng != nil {
		engineServers = eng.servers
	}
	var who dnsresolve.Clients
	if cl != nil {
		who = cl.lookup
	}
	return dnsresolve.Options{
		Forward:        fwd,
		Flows:          flows,
		EngineZones:    cfg.DNS.EngineZones,
		EngineServers:  engineServers,
		Audit:          cfg.Firewall.Mode == config.ModeAudit,
		AuditServers:   ups,
		Mark:           cfg.Firewall.Mark,
		ForwardTimeout: cfg.DNS.Timeout,
		Rules:          cfg.Rules,
		Clients:        who,
		Classes:        cfg.DNSClasses(),
		Upstream:       upstream,
		Allower:        allower,
		MinTTL:         cfg.DNS.MinTTL,
		MaxTTL:         cfg.DNS.MaxTTL,
		Grace:          cfg.DNS.Grace,
		Guard:          guard(cfg),
		RefuseRcode:    refuse,
		QueryBudget:    cfg.DNS.QueryBudget,
		Limits:         cfg.DNS.Limits,
		Logger:         log,
		Metrics:        m,
	}
}

// openPinned opens the A and AAAA addresses of name. It returns how many
// there are and when the first of them expires.
func openPinned(ctx context.Context, p *dnsresolve.Proxy, name string) (int, time.Time, error) {
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

// Planned is the ruleset Apply would install from here, for `egressd
// print`: the host's resolvers when dns.upstreams is empty, and egressd's
// cgroup when it has its own (whether the kernel can match it is not
// probed: that needs privilege), and the rules' host services that exist.
func Planned(cfg *config.Config) *rules.Ruleset {
	ups, _ := upstreams(cfg)
	cg, _ := findOwnCgroup()
	unknown, _ := unknownForwarders(cfg)
	onLink, _ := onLinkPrefixes(cfg)
	return rules.BuildFor(cfg, rules.Host{Upstreams: ups, Cgroup: cg, Unknown: unknown, OnLink: onLink, Cgroups: ruleCgroups(cfg)})
}
