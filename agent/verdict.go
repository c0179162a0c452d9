package agent

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// Reason says why a connection is blocked. Its value is the reason label
// of the blocked-connection metrics and log lines: do not rename one.
type Reason string

const (
	// NotAnswered: the address is in no allow.cidrs entry and no answer
	// of egressd opened it (or egressd does not remember one).
	NotAnswered Reason = "not-answered"
	// Expired: egressd answered the address for a name, but its time is up.
	Expired Reason = "expired"
	// Port: the address is open, but not for this port or protocol.
	Port Reason = "port"
	// DNSOverTLS: port 853, a resolver that would bypass the proxy (the
	// ruleset's own rule decides it, not the sets).
	DNSOverTLS Reason = "dns-over-tls"
	// SpoofedSource: a container sent from an address its interface does
	// not route back (anti-spoofing; the ruleset decides it).
	SpoofedSource Reason = "spoofed-source"
	// OtherSource: a rule allows the destination, but not to this source
	// (it applies to other containers, or to other host services).
	OtherSource Reason = "other-source"
)

// describe says the reason in words, for a log line.
func (r Reason) describe() string {
	switch r {
	case NotAnswered:
		return "address not answered by egressd"
	case Expired:
		return "address no longer allowed (its answer expired)"
	case Port:
		return "port not allowed"
	case DNSOverTLS:
		return "DNS over TLS bypasses the proxy"
	case SpoofedSource:
		return "source address not routed back through its interface (forged), dropped"
	case OtherSource:
		return "allowed by a rule that does not apply to this source"
	}
	return ""
}

// logReason is the reason the ruleset's log prefix gives a logged packet;
// NotAnswered for the catch-all reject rule, which verdict refines. The
// audit prefix has been taken off.
func logReason(prefix string) Reason {
	switch {
	case strings.HasPrefix(prefix, rules.LogDoT):
		return DNSOverTLS
	case strings.HasPrefix(prefix, rules.LogSpoofed):
		return SpoofedSource
	}
	return NotAnswered
}

// learnedState is what verdict reads of the learned sets (a
// *firewall.Firewall).
type learnedState interface {
	Lookup(netip.Addr) []firewall.Element
	Names(netip.Addr) (string, bool)
}

// Verdict is what the ruleset does with a new connection, and why.
type Verdict struct {
	Allowed bool
	Reason  Reason // why it is blocked; empty if allowed
	// Rule allows it (to the sources it applies to), or would but for
	// the port.
	Rule *config.Rule
	// Static is the allow.cidrs entry that allows it, if one does.
	Static *config.Static
	// Live is the learned element that opens the address, if any (Allowed
	// unless the port or protocol is not allowed).
	Live *firewall.Element
	// Names last answered for the address, if egressd knows them.
	Names string
	// NonPublic: the rebinding guard would refuse the address: no answer
	// ever opens it.
	NonPublic bool
}

// verdict decides a new connection to addr:port over proto (tcp, udp,
// icmp, a protocol number) from the configuration and the learned sets,
// as the ruleset's allow rules do: an allow.cidrs entry, or a live
// learned address on an allowed TCP port. Port 0 means any port (a
// question about an address alone). It serves `egressd explain`, the
// blocked-connection log and its metrics.
func verdict(cfg *config.Config, learned learnedState, addr netip.Addr, port uint16, proto config.Proto) Verdict {
	addr = addr.Unmap()
	rule := func(name string) *config.Rule {
		i := slices.IndexFunc(cfg.Rules, func(r config.Rule) bool { return r.Name == name })
		if i < 0 {
			return nil
		}
		return &cfg.Rules[i]
	}
	for i, st := range cfg.Allow.Static {
		if st.Allows(addr, proto, port, cfg.Allow.Ports) {
			return Verdict{Allowed: true, Static: &cfg.Allow.Static[i], Rule: rule(config.RuleAllow)}
		}
	}
	for i, r := range cfg.Rules {
		if r.AllowsPort(proto, port) && slices.ContainsFunc(r.CIDRs, func(p netip.Prefix) bool { return p.Contains(addr) }) {
			return Verdict{Allowed: true, Rule: &cfg.Rules[i]}
		}
	}
	v := Verdict{Reason: NotAnswered, NonPublic: !guard(cfg).Allows(addr)}
	var known bool
	v.Names, known = learned.Names(addr)
	live := learned.Lookup(addr)
	for i, el := range live {
		r := rule(el.Rule)
		if r == nil {
			continue // a rule the configuration no longer has
		}
		if i == 0 || r.AllowsPort(proto, port) && !v.Allowed {
			v.Live, v.Names, v.Rule = &live[i], el.Names, r
		}
		if r.AllowsPort(proto, port) {
			v.Allowed, v.Reason = true, ""
		} else if !v.Allowed {
			v.Reason = Port
		}
	}
	if v.Live == nil && known {
		v.Reason = Expired
	}
	return v
}
