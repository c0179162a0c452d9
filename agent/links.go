package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/ifname"
	"github.com/egressd/egressd/rules"
)

// watchLinks follows the host's interfaces. The ruleset matches
// interfaces by name in the kernel, so a new container bridge is filtered
// the moment it exists and nothing needs to be reinstalled; the first time
// a container bridge of a name appears it is logged, later comings and
// goings (netavark deletes podman0 with its last container) only at debug
// level. Every change is passed to forwarders, debounced, so that the
// unknown forwarding interfaces are looked at (see linkState); names keeps
// the interfaces' names for the blocked-connection report; touched is
// called at once on every link and address change (the engine zones'
// bridges, engine.go). The subscription is renewed when netlink closes it.
func watchLinks(ctx context.Context, cfg func() *config.Config, forwarders, touched func(), names *linkNames, log *slog.Logger) {
	forwarders() // those that appeared while the ruleset was being installed
	go watchAddrs(ctx, forwarders, touched, log)
	logged := map[string]bool{} // container bridges logged at info level
	for ctx.Err() == nil {
		updates := make(chan netlink.LinkUpdate, 64)
		done := make(chan struct{})
		err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
			ErrorCallback: func(err error) { log.Debug("link subscription", "err", err) },
		})
		if err != nil {
			log.Warn("cannot watch network interfaces", "err", err)
		} else {
			follow(ctx, updates, cfg, forwarders, touched, names, logged, log)
		}
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// Bounds of what the link watcher remembers.
const (
	knownLinksMax  = 4096 // container interfaces present (missed deletions only leak here)
	loggedNamesMax = 256  // container bridge names logged at info level
)

func follow(ctx context.Context, updates <-chan netlink.LinkUpdate, cfg func() *config.Config, forwarders, touched func(), names *linkNames, logged map[string]bool, log *slog.Logger) {
	known := map[int32]bool{}
	// Interfaces settle in bursts (a veth is created, enslaved, its end
	// moved): look at them once the burst is over.
	settle := newDebouncer(settleTime, settleMax, forwarders)
	defer settle.stop()
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
			gone := u.Header.Type == unix.RTM_DELLINK
			if gone {
				names.removed(u.Index, name)
			} else {
				names.seen(u.Index, name)
			}
			settle.poke()
			pattern, match := ifname.MatchAny(name, cfg().Firewall.Containers)
			if !match {
				continue
			}
			switch {
			case gone:
				if known[u.Index] {
					delete(known, u.Index)
					log.Debug("container interface gone", "interface", name)
				}
			case !known[u.Index]:
				if len(known) >= knownLinksMax {
					clear(known)
				}
				known[u.Index] = true
				// A bridge is worth a line the first time; veths
				// (cali*) and later comings of a bridge are churn.
				if u.Link.Type() == "bridge" && !logged[name] {
					if len(logged) >= loggedNamesMax {
						clear(logged)
					}
					logged[name] = true
					log.Info("container interface appeared; filtered", "interface", name, "pattern", pattern)
				} else {
					log.Debug("container interface appeared; filtered", "interface", name, "pattern", pattern)
				}
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
			settle := newDebouncer(settleTime, settleMax, changed)
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
					settle.poke()
				}
			}
			settle.stop()
		}
		close(done)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// settleTime is how long interfaces must be quiet before they are looked
// at; settleMax is the longest a look waits while they keep changing
// (containers starting back to back never stay quiet that long).
const (
	settleTime = 300 * time.Millisecond
	settleMax  = 2 * time.Second
)

// debouncer calls f once pokes stopped for quiet, and at the latest max
// after the first poke of a burst.
type debouncer struct {
	quiet, max time.Duration
	mu         sync.Mutex
	first      time.Time // of the burst; zero: none pending
	timer      *time.Timer
}

func newDebouncer(quiet, max time.Duration, f func()) *debouncer {
	d := &debouncer{quiet: quiet, max: max}
	d.timer = time.AfterFunc(time.Hour, func() {
		d.mu.Lock()
		d.first = time.Time{}
		d.mu.Unlock()
		f()
	})
	d.timer.Stop()
	return d
}

func (d *debouncer) poke() {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	if d.first.IsZero() {
		d.first = now
	}
	d.timer.Reset(max(0, min(d.quiet, d.max-now.Sub(d.first))))
}

func (d *debouncer) stop() { d.timer.Stop() }

// linkInfo is what decides how the ruleset treats one interface.
type linkInfo struct {
	Index  int
	Name   string
	Kind   string // netlink's type: "bridge", "veth", "tuntap", ...
	Up     bool   // administratively up
	Master bool   // enslaved: a bridge port (or a bond's, a VRF's)
	Uplink bool   // carries a default route
	// Routed: it holds an address or a route (other than IPv6
	// link-local), as a Calico pod's veth holds the pod's route.
	Routed bool
	// Prefixes are the subnets of its addresses, but link-local,
	// loopback and single addresses: where a DHCP server or IPv6
	// neighbours of the host may be (rules.Host.OnLink).
	Prefixes []netip.Prefix
}

// linkClass is what an interface is to the ruleset.
type linkClass int

const (
	linkOther      linkClass = iota // no forwarder: an uplink NIC, loopback, a dummy, a tunnel
	linkContainer                   // matches firewall.containers: filtered by the patterns
	linkUnfiltered                  // matches firewall.unfiltered: left alone
	linkUplink                      // a forwarder carrying the default route: never a container interface
	// linkPort is an enslaved veth or tap: what its peer sends enters
	// the IP stack with the bridge as iif, so the bridge's rules (or the
	// bridge's being unknown) cover it. Docker's host-side veths.
	linkPort
	// linkDown is administratively down: nothing passes. Docker's
	// container-side veth between its creation and its move into the
	// container (and back, on stop), a host-side veth before it is
	// enslaved, a bridge being set up.
	linkDown
	// linkBare is an up veth or tap, not enslaved, without address or
	// route: a runtime's veth about to be enslaved (the CNI bridge plugin
	// brings the host end up first), or a pod veth of a CNI that routes
	// without the kernel's routes (Cilium). Unknown once it stays so for
	// bareGrace.
	linkBare
	// linkUnknown forwards other namespaces' traffic and matches no
	// pattern: a bridge (Podman's podman0, LXD's lxdbr0), a routed veth
	// (Calico's cali* when unlisted), a VPN's tun. The ruleset treats it
	// as a container interface (Host.Unknown): its DNS goes to the proxy.
	linkUnknown
)

// classify tells what l is to the ruleset of a config with these
// container and unfiltered patterns.
func classify(l linkInfo, containers, unfiltered []ifname.Pattern) linkClass {
	if _, ok := ifname.MatchAny(l.Name, containers); ok {
		return linkContainer
	}
	if _, ok := ifname.MatchAny(l.Name, unfiltered); ok {
		return linkUnfiltered
	}
	switch l.Kind {
	case "bridge", "veth", "tuntap":
	default:
		return linkOther
	}
	switch {
	case l.Uplink:
		return linkUplink
	case l.Master && l.Kind != "bridge":
		return linkPort
	case !l.Up:
		return linkDown
	case !l.Routed && l.Kind != "bridge":
		return linkBare
	}
	return linkUnknown
}

// bareGrace is how long an up veth or tap may stay unenslaved without
// address or route before it counts as unknown: far longer than a
// runtime takes to enslave the veth it just brought up.
const bareGrace = 5 * time.Second

// Bounds of linkState.
const (
	// goneUnknownMax is how many names of unknown interfaces that are
	// gone stay in the ruleset (the longest gone leave first).
	goneUnknownMax = 32
)

// linkState decides which interfaces are Host.Unknown, and what has been
// said about them. It is owned by the daemon's main loop.
//
// A name stays in Host.Unknown while its interface is down, bare or gone
// (up to goneUnknownMax gone names): the rules match names in the
// kernel, where a name without a working interface costs nothing, and
// taking it out and putting it back would reinstall the whole table,
// rewriting every learned address, each time netavark deletes podman0
// with its last container and creates it with the next first one. It
// leaves when an interface of that name turns out to be something else
// (enslaved, an uplink, a NIC) or a reload recomputes the list.
type linkState struct {
	bare map[int]time.Time    // ifindex of bare links -> first seen bare
	gone map[string]time.Time // unknown names whose interface is gone -> since
	// subnets of the unknown interfaces when they last had any: kept in
	// Host.OnLink while the name stays, for the same reason.
	subnets   map[string][]netip.Prefix
	warned    map[string]bool // unknown names logged; only names of Host.Unknown
	uplinkErr string          // the uplink problem last logged
	kick      func()          // asks the main loop to relink
	recheck   *time.Timer     // relinks when a bare link's grace is over
}

// decision is what the ruleset needs of the host's interfaces.
type decision struct {
	Unknown []string       // rules.Host.Unknown, sorted
	OnLink  []netip.Prefix // rules.Host.OnLink, sorted
	// Wait is how long until a bare link's grace is over (0: none
	// pending): then decide again.
	Wait time.Duration
}

// decide returns the unknown forwarding interfaces and the on-link
// subnets for the links now present, given prev, the unknown interfaces
// in force.
func (s *linkState) decide(now time.Time, links []linkInfo, containers, unfiltered []ifname.Pattern, prev []string) decision {
	if s.bare == nil {
		s.bare, s.gone, s.subnets = map[int]time.Time{}, map[string]time.Time{}, map[string][]netip.Prefix{}
	}
	present := make(map[string]linkInfo, len(links))
	classes := make(map[string]linkClass, len(links))
	bare := map[int]bool{}
	var d decision
	for _, l := range links {
		c := classify(l, containers, unfiltered)
		present[l.Name], classes[l.Name] = l, c
		switch c {
		case linkUnknown:
			d.Unknown = append(d.Unknown, l.Name)
		case linkBare:
			bare[l.Index] = true
			since, ok := s.bare[l.Index]
			if !ok {
				since = now
				s.bare[l.Index] = now
			}
			if left := bareGrace - now.Sub(since); left <= 0 {
				d.Unknown = append(d.Unknown, l.Name)
			} else if d.Wait == 0 || left < d.Wait {
				d.Wait = left
			}
		}
	}
	for i := range s.bare {
		if !bare[i] {
			delete(s.bare, i)
		}
	}
	var gone []string
	for _, name := range prev {
		if slices.Contains(d.Unknown, name) {
			continue
		}
		c, ok := classes[name]
		switch {
		case !ok:
			// A config reload may since cover the name.
			_, ctr := ifname.MatchAny(name, containers)
			_, exempt := ifname.MatchAny(name, unfiltered)
			if ctr || exempt {
				continue
			}
			if _, ok := s.gone[name]; !ok {
				s.gone[name] = now
			}
			gone = append(gone, name)
		case c == linkDown || c == linkBare:
			d.Unknown = append(d.Unknown, name)
		}
	}
	// The longest gone leave beyond the bound.
	slices.SortFunc(gone, func(a, b string) int { return s.gone[b].Compare(s.gone[a]) })
	if len(gone) > goneUnknownMax {
		gone = gone[:goneUnknownMax]
	}
	for name := range s.gone {
		if !slices.Contains(gone, name) {
			delete(s.gone, name)
		}
	}
	d.Unknown = append(d.Unknown, gone...)
	sort.Strings(d.Unknown)

	for _, l := range links {
		if _, ctr := ifname.MatchAny(l.Name, containers); !ctr && l.Name != "lo" {
			d.OnLink = append(d.OnLink, l.Prefixes...)
		}
	}
	for name := range s.subnets {
		if !slices.Contains(d.Unknown, name) {
			delete(s.subnets, name)
		}
	}
	for _, name := range d.Unknown {
		if l, ok := present[name]; ok && len(l.Prefixes) > 0 {
			s.subnets[name] = l.Prefixes
		} else {
			d.OnLink = append(d.OnLink, s.subnets[name]...)
		}
	}
	d.OnLink = sortPrefixes(d.OnLink)
	return d
}

// pending makes the main loop relink after wait (0: no need).
func (s *linkState) pending(wait time.Duration) {
	switch {
	case wait > 0 && s.recheck == nil && s.kick != nil:
		s.recheck = time.AfterFunc(wait, s.kick)
	case wait > 0 && s.recheck != nil:
		s.recheck.Reset(wait)
	case s.recheck != nil:
		s.recheck.Stop()
	}
}

// linkSnapshot is the host's interfaces, routes and addresses at one
// moment: three netlink dumps, whatever the number of containers.
type linkSnapshot struct {
	links []linkInfo
}

func takeSnapshot() (*linkSnapshot, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	uplink, routed := map[int]bool{}, map[int]bool{}
	for _, r := range routes {
		def := r.Dst == nil || (r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask))
		// Every up interface has the kernel's fe80::/64 route.
		local := r.Dst != nil && r.Dst.IP.IsLinkLocalUnicast()
		mark := func(idx int) {
			if def {
				uplink[idx] = true
			}
			if !local {
				routed[idx] = true
			}
		}
		if r.LinkIndex > 0 {
			mark(r.LinkIndex)
		}
		for _, nh := range r.MultiPath {
			mark(nh.LinkIndex)
		}
	}
	prefixes := map[int][]netip.Prefix{}
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			routed[a.LinkIndex] = true
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if !ok || ip.IsLinkLocalUnicast() || ip.IsLoopback() || ones == ip.Unmap().BitLen() {
			continue
		}
		prefixes[a.LinkIndex] = append(prefixes[a.LinkIndex], netip.PrefixFrom(ip.Unmap(), ones).Masked())
	}
	s := &linkSnapshot{}
	for _, l := range links {
		a := l.Attrs()
		s.links = append(s.links, linkInfo{Index: a.Index, Name: a.Name, Kind: l.Type(), Up: a.Flags&net.FlagUp != 0,
			Master: a.MasterIndex != 0, Uplink: uplink[a.Index], Routed: routed[a.Index], Prefixes: sortPrefixes(prefixes[a.Index])})
	}
	return s, nil
}

// sortPrefixes sorts ps by address and length, without duplicates.
func sortPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// uplinks returns the names of the interfaces that carry a default route
// (IPv4 or IPv6, main table), sorted.
func (s *linkSnapshot) uplinks() []string {
	var out []string
	for _, l := range s.links {
		if l.Uplink {
			out = append(out, l.Name)
		}
	}
	sort.Strings(out)
	return out
}

// checkUplinks refuses a config whose container patterns match an
// interface that carries the default route: its egress would count as
// "into a container network" (unfiltered) and the proxy would answer the
// outside.
func (s *linkSnapshot) checkUplinks(cfg *config.Config) error {
	names := s.uplinks()
	for i, p := range cfg.Firewall.Containers {
		for _, n := range names {
			if p.Match(n) {
				return fmt.Errorf("firewall.containers[%d]: %q matches %s, which carries the default route: its traffic would not be filtered and the proxy would answer the outside; narrow the pattern", i, p, n)
			}
		}
	}
	return nil
}

// unknownForwarders returns the forwarding interfaces that match neither
// firewall.containers nor firewall.unfiltered and carry no default route,
// sorted: the ruleset treats them as container interfaces. Without a
// history (start, reload, apply) a bare veth counts: it may be a pod's.
func unknownForwarders(cfg *config.Config) ([]string, error) {
	s, err := takeSnapshot()
	if err != nil {
		return nil, err
	}
	return s.unknown(cfg), nil
}

func (s *linkSnapshot) unknown(cfg *config.Config) []string {
	var out []string
	for _, l := range s.links {
		if c := classify(l, cfg.Firewall.Containers, cfg.Firewall.Unfiltered); c == linkUnknown || c == linkBare {
			out = append(out, l.Name)
		}
	}
	sort.Strings(out)
	return out
}

// hostFor gathers what the ruleset needs about this host for cfg, with
// egressd's cgroup cg. A container pattern matching an uplink is an error.
func hostFor(cfg *config.Config, ups []netip.AddrPort, cg *rules.Cgroup) (rules.Host, error) {
	s, err := takeSnapshot()
	if err != nil {
		return rules.Host{}, err
	}
	if err := s.checkUplinks(cfg); err != nil {
		return rules.Host{}, err
	}
	return rules.Host{Upstreams: ups, Cgroup: cg, Unknown: s.unknown(cfg), OnLink: s.onLink(cfg), Engines: engineCgroups(cfg), Cgroups: ruleCgroups(cfg)}, nil
}

// onLinkPrefixes returns the subnets of the host's addresses outside
// loopback and container networks, without link-local ones (the ruleset
// allows fe80::/10 anyway): where the DHCP server and IPv6 neighbours are.
func onLinkPrefixes(cfg *config.Config) ([]netip.Prefix, error) {
	s, err := takeSnapshot()
	if err != nil {
		return nil, err
	}
	return s.onLink(cfg), nil
}

func (s *linkSnapshot) onLink(cfg *config.Config) []netip.Prefix {
	var out []netip.Prefix
	for _, l := range s.links {
		if _, ctr := ifname.MatchAny(l.Name, cfg.Firewall.Containers); !ctr && l.Name != "lo" {
			out = append(out, l.Prefixes...)
		}
	}
	return sortPrefixes(out)
}

// relink reinstalls the ruleset when the unknown forwarding interfaces
// (their DNS goes to the proxy), the on-link subnets or the engine
// cgroups present changed; container churn changes none of them (see
// linkState).
func (d *daemon) relink(ctx context.Context) {
	d.ensureLocal()
	cfg := d.config()
	s, err := takeSnapshot()
	if err != nil {
		d.log.Error("interfaces not checked", "err", err)
		return
	}
	// At boot the uplink may get its default route only after egressd
	// started: say so loudly, since a running firewall is not refused.
	switch err := s.checkUplinks(cfg); {
	case err == nil:
		d.links.uplinkErr = ""
	case err.Error() != d.links.uplinkErr:
		d.links.uplinkErr = err.Error()
		d.log.Error("config leaves the uplink unfiltered; fix firewall.containers and reload", "err", err)
	}
	dec := d.links.decide(time.Now(), s.links, cfg.Firewall.Containers, cfg.Firewall.Unfiltered, d.host.Unknown)
	d.links.pending(dec.Wait)
	unknown, onLink := dec.Unknown, dec.OnLink
	engines, cgroups := engineCgroups(cfg), ruleCgroups(cfg)
	if slices.Equal(unknown, d.host.Unknown) && slices.Equal(onLink, d.host.OnLink) && slices.Equal(engines, d.host.Engines) && maps.Equal(cgroups, d.host.Cgroups) {
		return
	}
	host := d.host
	host.Unknown, host.OnLink, host.Engines, host.Cgroups = unknown, onLink, engines, cgroups
	if err := d.fw.Install(ctx, rules.BuildFor(cfg, host), nil, nil); err != nil {
		d.log.Error("ruleset not updated for new interfaces", "err", err)
		return
	}
	d.log.Info("ruleset reinstalled: the unknown forwarding interfaces, the on-link subnets or the host services present changed",
		"unknown", unknown, "on_link", onLink, "learned", d.learned())
	d.host = host
	d.reportUnknown()
	d.reportEngines()
}

// reportUnknown logs each unknown forwarding interface once while it is
// in the ruleset.
func (d *daemon) reportUnknown() {
	if d.links.warned == nil {
		d.links.warned = map[string]bool{}
	}
	for name := range d.links.warned {
		if !slices.Contains(d.host.Unknown, name) {
			delete(d.links.warned, name)
		}
	}
	for _, name := range d.host.Unknown {
		if !d.links.warned[name] {
			d.links.warned[name] = true
			d.log.Warn("forwarding interface matches no firewall.containers pattern; its forwarded traffic is filtered and its DNS sent to the proxy (list it in firewall.containers, or in firewall.unfiltered to exempt it)",
				"interface", name)
		}
	}
}
