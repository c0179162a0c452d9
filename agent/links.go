package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/ifname"
	"github.com/egressd/egressd/rules"
)

// watchLinks logs container interfaces as they appear and disappear. The
// ruleset matches interfaces by name in the kernel, so a new bridge is
// filtered the moment it exists and nothing needs to be reinstalled; this
// tells the operator that it happened. A bridge or veth that matches no
// pattern is filtered too (forwarded traffic leaving the host is filtered
// from any interface); it is logged once, and forwarders is called so
// that its DNS is redirected to the proxy as well. touched is called at
// once on every link and address change (the engine zones' bridges,
// engine.go). The subscription is renewed when netlink closes it.
func watchLinks(ctx context.Context, cfg func() *config.Config, forwarders, touched func(), log *slog.Logger) {
	forwarders() // those that appeared while the ruleset was being installed
	go watchAddrs(ctx, forwarders, touched, log)
	for ctx.Err() == nil {
		updates := make(chan netlink.LinkUpdate, 64)
		done := make(chan struct{})
		err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
			ErrorCallback: func(err error) { log.Debug("link subscription", "err", err) },
		})
		if err != nil {
			log.Warn("cannot watch network interfaces", "err", err)
		} else {
			follow(ctx, updates, cfg, forwarders, touched, log)
		}
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func follow(ctx context.Context, updates <-chan netlink.LinkUpdate, cfg func() *config.Config, forwarders, touched func(), log *slog.Logger) {
	known := map[int32]bool{}
	// Interfaces settle in bursts (a veth is created, then enslaved to a
	// bridge): look at them once the burst is over.
	settle := time.AfterFunc(time.Hour, forwarders)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				return
			}
			touched()
			name := u.Attrs().Name
			if isForwarder(u.Link) || u.Link.Type() == "veth" || name == cfg().DNS.LocalInterface {
				settle.Reset(settleTime)
			}
			pattern, match := ifname.MatchAny(name, cfg().Firewall.Containers)
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

// watchAddrs calls changed whenever the host's addresses change, once
// they settle: the on-link subnets of the DHCP and neighbour-discovery
// exemptions follow them; touched at once.
func watchAddrs(ctx context.Context, changed, touched func(), log *slog.Logger) {
	for ctx.Err() == nil {
		updates := make(chan netlink.AddrUpdate, 64)
		done := make(chan struct{})
		err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{
			ErrorCallback: func(err error) { log.Debug("address subscription", "err", err) },
		})
		if err != nil {
			log.Warn("cannot watch addresses", "err", err)
		} else {
			settle := time.AfterFunc(time.Hour, changed)
			settle.Stop()
		read:
			for {
				select {
				case <-ctx.Done():
					break read
				case _, ok := <-updates:
					if !ok {
						break read
					}
					touched()
					settle.Reset(settleTime)
				}
			}
			settle.Stop()
		}
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// settleTime is how long interfaces must be quiet before the unknown
// forwarding ones are looked at.
const settleTime = 300 * time.Millisecond

// isForwarder reports whether a link is one through which other network
// namespaces or machines send traffic for the host to forward: a bridge,
// or a veth or tap not enslaved to one (then the bridge is the
// interface the host sees).
func isForwarder(l netlink.Link) bool {
	switch l.Type() {
	case "bridge":
		return true
	case "veth", "tuntap":
		return l.Attrs().MasterIndex == 0
	}
	return false
}

// defaultRouteLinks returns the names of the interfaces that carry a
// default route (IPv4 or IPv6, main table): the uplinks.
func defaultRouteLinks() (map[string]bool, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := map[string]bool{}
	add := func(idx int) {
		if l, err := netlink.LinkByIndex(idx); err == nil {
			out[l.Attrs().Name] = true
		}
	}
	for _, r := range routes {
		if r.Dst != nil && !(r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) {
			continue
		}
		if r.LinkIndex > 0 {
			add(r.LinkIndex)
		}
		for _, nh := range r.MultiPath {
			add(nh.LinkIndex)
		}
	}
	return out, nil
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// checkUplinks refuses a config whose container patterns match an
// interface that carries the default route: its egress would count as
// "into a container network" (unfiltered) and the proxy would answer the
// outside.
func checkUplinks(cfg *config.Config) error {
	uplinks, err := defaultRouteLinks()
	if err != nil {
		return err
	}
	names := make([]string, 0, len(uplinks))
	for n := range uplinks {
		names = append(names, n)
	}
	sort.Strings(names)
	for i, p := range cfg.Firewall.Containers {
		for _, n := range names {
			if p.Match(n) {
				return fmt.Errorf("firewall.containers[%d]: %q matches %s, which carries the default route: its traffic would not be filtered and the proxy would answer the outside; narrow the pattern", i, p, n)
			}
		}
	}
	return nil
}

// unknownForwarders returns the forwarding interfaces (see isForwarder)
// that match neither firewall.containers nor firewall.unfiltered and carry
// no default route, sorted: the ruleset treats them as container
// interfaces.
func unknownForwarders(cfg *config.Config) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	uplinks, err := defaultRouteLinks()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range links {
		name := l.Attrs().Name
		_, ctr := ifname.MatchAny(name, cfg.Firewall.Containers)
		_, exempt := ifname.MatchAny(name, cfg.Firewall.Unfiltered)
		if isForwarder(l) && !ctr && !exempt && !uplinks[name] {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// hostFor gathers what the ruleset needs about this host for cfg, with
// egressd's cgroup cg. A container pattern matching an uplink is an error.
func hostFor(cfg *config.Config, ups []netip.AddrPort, cg *rules.Cgroup) (rules.Host, error) {
	if err := checkUplinks(cfg); err != nil {
		return rules.Host{}, err
	}
	unknown, err := unknownForwarders(cfg)
	if err != nil {
		return rules.Host{}, err
	}
	onLink, err := onLinkPrefixes(cfg)
	if err != nil {
		return rules.Host{}, err
	}
	return rules.Host{Upstreams: ups, Cgroup: cg, Unknown: unknown, OnLink: onLink, Engines: engineCgroups(cfg)}, nil
}

// onLinkPrefixes returns the subnets of the host's addresses outside
// loopback and container networks, without link-local ones (the ruleset
// allows fe80::/10 anyway): where the DHCP server and IPv6 neighbours are.
func onLinkPrefixes(cfg *config.Config) ([]netip.Prefix, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		l, err := netlink.LinkByIndex(a.LinkIndex)
		if err != nil {
			continue
		}
		if _, ctr := ifname.MatchAny(l.Attrs().Name, cfg.Firewall.Containers); ctr || l.Attrs().Name == "lo" {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if !ok || ip.IsLinkLocalUnicast() || ip.IsLoopback() || ones == ip.Unmap().BitLen() {
			continue
		}
		p := netip.PrefixFrom(ip.Unmap(), ones).Masked()
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return out, nil
}

// relink reinstalls the ruleset when the unknown forwarding interfaces
// (their DNS goes to the proxy), the on-link subnets or the engine
// cgroups present changed.
func (d *daemon) relink(ctx context.Context) {
	d.ensureLocal()
	cfg := d.config()
	// At boot the uplink may get its default route only after egressd
	// started: say so loudly, since a running firewall is not refused.
	if err := checkUplinks(cfg); err != nil && !d.reported[err.Error()] {
		d.reported[err.Error()] = true
		d.log.Error("config leaves the uplink unfiltered; fix firewall.containers and reload", "err", err)
	}
	unknown, err := unknownForwarders(cfg)
	var onLink []netip.Prefix
	if err == nil {
		onLink, err = onLinkPrefixes(cfg)
	}
	if err != nil {
		d.log.Error("interfaces not checked", "err", err)
		return
	}
	engines := engineCgroups(cfg)
	if slices.Equal(unknown, d.host.Unknown) && slices.Equal(onLink, d.host.OnLink) && slices.Equal(engines, d.host.Engines) {
		return
	}
	host := d.host
	host.Unknown, host.OnLink, host.Engines = unknown, onLink, engines
	if err := d.fw.Install(ctx, rules.BuildFor(cfg, host), nil, nil); err != nil {
		d.log.Error("ruleset not updated for new interfaces", "err", err)
		return
	}
	d.host = host
	d.reportUnknown()
	d.reportEngines()
}

// reportUnknown logs each unknown forwarding interface once.
func (d *daemon) reportUnknown() {
	for _, name := range d.host.Unknown {
		if !d.reported[name] {
			d.reported[name] = true
			d.log.Warn("forwarding interface matches no firewall.containers pattern; its forwarded traffic is filtered and its DNS sent to the proxy (list it in firewall.containers, or in firewall.unfiltered to exempt it)",
				"interface", name)
		}
	}
}
