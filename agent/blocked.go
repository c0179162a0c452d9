package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	nflog "github.com/florianl/go-nflog/v2"
	"github.com/vishvananda/netlink"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/ifname"
	"github.com/egressd/egressd/metrics"
	"github.com/egressd/egressd/rules"
)

// Blocked is one rejected or dropped outbound connection attempt.
type Blocked struct {
	Source    string         `json:"source"`              // "container" or "host"
	Interface string         `json:"interface,omitempty"` // container bridge
	From      netip.Addr     `json:"from"`
	To        netip.AddrPort `json:"to"`
	Proto     string         `json:"proto"`
	Reason    Reason         `json:"reason"`
	// Names that last resolved to To's address, if egressd knows them.
	Names string `json:"names,omitempty"`
	// Rule that allows To's address to other sources (other-source), or
	// would but for the port or the answer's expiry.
	Rule string `json:"rule,omitempty"`
	// WouldBlock: audit mode let the packet through; enforce would not.
	WouldBlock bool `json:"would_block,omitempty"`
}

func (b Blocked) String() string {
	src := "host"
	if b.Source == "container" {
		src = fmt.Sprintf("container %s on %s", b.From, b.Interface)
	}
	s := fmt.Sprintf("%s -> %s %s: %s", src, b.Proto, b.To, b.Reason.describe())
	if b.Names != "" {
		s += " (last answered for " + b.Names + ")"
	} else if b.Reason == NotAnswered {
		s += " (no name resolved to it through egressd)"
	}
	if b.Rule != "" {
		s += " [rule " + b.Rule + "]"
	}
	return s
}

// explained is b, caught by the catch-all reject, with what v (the
// verdict on its destination, which knows nothing of its source) says of
// it.
func (b Blocked) explained(v Verdict) Blocked {
	b.Names = v.Names
	if v.Rule != nil {
		b.Rule = v.Rule.Name
	}
	switch {
	case !v.Allowed:
		b.Reason = v.Reason
	case v.Rule != nil && !b.appliesTo(v.Rule.From):
		// The ruleset knows the source: a rule of other sources' is what
		// allows the destination.
		b.Reason = OtherSource
	default:
		// A rule of the source's own allows it now: it was answered (or
		// the configuration changed) after the packet was blocked.
		b.Rule = ""
	}
	return b
}

// appliesTo reports whether a rule from f may apply to b's source: for the
// host, whether to some of it (its services' cgroups are not in the log).
func (b Blocked) appliesTo(f config.From) bool {
	if b.Source != "container" {
		return f.HostSide()
	}
	return f.Containers ||
		slices.ContainsFunc(f.Sources, func(p netip.Prefix) bool { return p.Contains(b.From) }) ||
		slices.ContainsFunc(f.Interfaces, func(p ifname.Pattern) bool { return p.Match(b.Interface) })
}

// watchBlocked reads the NFLOG group of the ruleset's reject rules and
// reports each blocked connection: one log line (rate-limited, so a noisy
// container cannot flood the journal) and a metric, until ctx ends. It
// returns once the group is bound: what is blocked from then on is
// reported (the kernel drops what a group nobody bound logs).
func watchBlocked(ctx context.Context, group uint16, cfg func() *config.Config, fw *firewall.Firewall, m *metrics.Metrics, names *linkNames, log *slog.Logger) {
	nf, err := nflog.Open(&nflog.Config{Group: group, Copymode: nflog.CopyPacket, Bufsize: 128})
	if err != nil {
		log.Warn("blocked connections are not reported", "nflog_group", group, "err", err)
		return
	}
	limit := rate.NewLimiter(rate.Limit(10), 50)
	suppressed := 0
	hook := func(a nflog.Attribute) int {
		b, ok := parseBlocked(a)
		if !ok {
			return 0
		}
		if a.InDev != nil {
			// The interface may be gone by now (a container's veth, a
			// bridge deleted with its last container): names remembers.
			b.Interface = names.name(int32(*a.InDev))
		}
		if b.Reason == NotAnswered {
			// The catch-all reject: say which of the allow rules missed.
			b = b.explained(verdict(cfg(), fw, b.To.Addr(), b.To.Port(), config.Proto(b.Proto)))
		}
		msg := "blocked connection"
		if b.WouldBlock {
			msg = "would block connection (audit mode: let through)"
			m.WouldBlock(b.Source, string(b.Reason), b.Rule)
		} else {
			m.Blocked(b.Source, string(b.Reason), b.Rule)
		}
		if !limit.Allow() {
			suppressed++
			return 0
		}
		log.Info(msg, "source", b.Source, "interface", b.Interface, "from", b.From,
			"to", b.To, "proto", b.Proto, "reason", string(b.Reason), "names", b.Names, "rule", b.Rule, "would_block", b.WouldBlock, "suppressed_before", suppressed)
		suppressed = 0
		return 0
	}
	errFn := func(err error) int {
		if ctx.Err() == nil {
			log.Debug("nflog", "err", err)
		}
		return 0 // keep reading: an overrun loses reports, not enforcement
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, errFn); err != nil {
		nf.Close()
		log.Warn("blocked connections are not reported", "err", err)
		return
	}
	go func() {
		<-ctx.Done()
		nf.Close()
	}()
}

// parseBlocked reads the addresses and ports of a logged packet.
func parseBlocked(a nflog.Attribute) (Blocked, bool) {
	if a.Payload == nil || a.Prefix == nil {
		return Blocked{}, false
	}
	b := Blocked{Source: "host"}
	prefix := *a.Prefix
	if rest, ok := strings.CutPrefix(prefix, rules.LogAudit); ok {
		b.WouldBlock = true
		prefix = "egressd-" + rest
	}
	b.Reason = logReason(prefix)
	if a.InDev != nil {
		b.Source = "container" // b.Interface: the caller knows the names
	}
	p := *a.Payload
	if len(p) < 1 {
		return Blocked{}, false
	}
	var proto byte
	var l4 []byte
	var dst netip.Addr
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return Blocked{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		proto = p[9]
		b.From = netip.AddrFrom4([4]byte(p[12:16]))
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		if len(p) >= ihl {
			l4 = p[ihl:]
		}
	case 6:
		if len(p) < 40 {
			return Blocked{}, false
		}
		proto = p[6]
		b.From = netip.AddrFrom16([16]byte(p[8:24]))
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		l4 = p[40:]
	default:
		return Blocked{}, false
	}
	var port uint16
	switch proto {
	case 6:
		b.Proto = "tcp"
	case 17:
		b.Proto = "udp"
	case 1, 58:
		b.Proto = "icmp"
	default:
		b.Proto = fmt.Sprint(proto)
	}
	if (proto == 6 || proto == 17) && len(l4) >= 4 {
		port = binary.BigEndian.Uint16(l4[2:4])
	}
	b.To = netip.AddrPortFrom(dst, port)
	return b, true
}

// linkNames knows interface names by index, also for a while after an
// interface is gone: blocked connections are read after the fact, when a
// container's veth, or the bridge deleted with its last container, may be
// gone. The link watcher tells it of every interface that appears, changes
// or goes; an index it has not heard of is asked of the kernel once.
// Indexes are not reused while the kernel's counter has not wrapped, so a
// name remembered for an index is that interface's.
type linkNames struct {
	mu     sync.Mutex
	live   map[int32]string
	gone   map[int32]goneLink
	now    func() time.Time
	lookup func(index int32) (string, bool) // the kernel's current name
}

type goneLink struct {
	name  string
	since time.Time
}

// Bounds of linkNames.
const (
	liveNamesMax = 16384            // present interfaces (only missed deletions grow it beyond)
	goneNamesMax = 1024             // interfaces gone
	goneNamesFor = 10 * time.Minute // how long a gone interface's name is kept
)

func newLinkNames() *linkNames {
	return &linkNames{live: map[int32]string{}, gone: map[int32]goneLink{}, now: time.Now,
		lookup: func(index int32) (string, bool) {
			l, err := netlink.LinkByIndex(int(index))
			if err != nil {
				return "", false
			}
			return l.Attrs().Name, true
		}}
}

// seen records that interface index is now called name.
func (n *linkNames) seen(index int32, name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.live[index]; !ok && len(n.live) >= liveNamesMax {
		clear(n.live) // a cache: what it forgets is asked again
	}
	n.live[index] = name
	delete(n.gone, index)
}

// removed records that interface index, called name, is gone (deleted,
// or moved into another namespace).
func (n *linkNames) removed(index int32, name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.live, index)
	now := n.now()
	n.gone[index] = goneLink{name: name, since: now}
	var oldest int32
	var first time.Time
	for i, g := range n.gone {
		switch {
		case now.Sub(g.since) > goneNamesFor:
			delete(n.gone, i)
		case first.IsZero() || g.since.Before(first) || (g.since.Equal(first) && i < oldest):
			oldest, first = i, g.since
		}
	}
	if len(n.gone) > goneNamesMax {
		delete(n.gone, oldest)
	}
}

// name returns the name of interface index, present or recently gone; ""
// if unknown.
func (n *linkNames) name(index int32) string {
	n.mu.Lock()
	if name, ok := n.live[index]; ok {
		n.mu.Unlock()
		return name
	}
	if g, ok := n.gone[index]; ok {
		n.mu.Unlock()
		return g.name
	}
	n.mu.Unlock()
	name, ok := n.lookup(index)
	if !ok {
		return ""
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.gone[index]; !ok { // gone meanwhile: that record is newer
		if len(n.live) >= liveNamesMax {
			clear(n.live)
		}
		n.live[index] = name
	}
	return name
}
