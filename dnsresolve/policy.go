package dnsresolve

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/ifname"
)

// Client is what egressd knows of a client address: whether it is the
// host's own, and otherwise the interface it sits behind ("" if none is
// known).
type Client struct {
	Host      bool
	Interface string
}

// Clients tells what a client address is (the agent's route lookups).
type Clients func(netip.Addr) Client

// asker is who sent a query, as far as the proxy can tell: a client
// address and, for the DNS of a host cgroup (config.DNSClasses), which
// class port it came in on.
type asker struct {
	addr  netip.Addr
	class *config.DNSClass // nil: the main port
}

// policy decides which rules answer a name to an asker. The rules apply
// as config.Rule.From says; where egressd cannot tell who asked it decides
// as follows:
//   - a query on a class port is a host service's of that cgroup: the
//     rules of the host and of that cgroup (or one above it) apply, and
//     for a container engine's (firewall.engine_cgroups), asking for
//     containers it does not name, every rule that applies to some
//     container too (the firewall still lets each container reach only
//     its own rules' addresses);
//   - a query on the main port from one of the host's addresses is the
//     host's: the rules of the host;
//   - any other is a container's: the rules of containers, of its source
//     address, and of its interface (found by Clients).
type policy struct {
	rules   []policyRule
	uniform bool // every rule applies to everyone: who asks changes nothing
	clients Clients
}

type policyRule struct {
	name    string
	from    config.From
	matcher *dnsname.Matcher
}

func newPolicy(rules []config.Rule, clients Clients) *policy {
	p := &policy{uniform: true, clients: clients}
	for _, r := range rules {
		if len(r.Domains) == 0 {
			continue // opens no learned addresses
		}
		p.rules = append(p.rules, policyRule{name: r.Name, from: r.From, matcher: dnsname.NewMatcher(r.Domains)})
		p.uniform = p.uniform && r.From.Everyone()
	}
	return p
}

// allowed returns the pattern of a rule that allows name, for anyone.
func (p *policy) allowed(name string) (rule, pattern string, ok bool) {
	for _, r := range p.rules {
		if pat, ok := r.matcher.Pattern(name); ok {
			return r.name, pat, true
		}
	}
	return "", "", false
}

// rulesFor returns the rules that allow name to a; none: refuse it.
func (p *policy) rulesFor(a asker, name string) []string { return p.appendRules(nil, a, name) }

// appendRules appends the rules that allow name to a to out (the fast
// path's buffer).
func (p *policy) appendRules(out []string, a asker, name string) []string {
	var c lookedUp
	for _, r := range p.rules {
		if !r.matcher.Match(name) {
			continue
		}
		if !p.uniform && !p.applies(r.from, a, &c) {
			continue
		}
		out = append(out, r.name)
	}
	return out
}

// lookedUp is what the policy has found out about an asker's address, if
// it had to.
type lookedUp struct {
	Client
	known bool
}

// applies reports whether from applies to a; c keeps the client lookup.
func (p *policy) applies(from config.From, a asker, c *lookedUp) bool {
	if a.class != nil {
		if from.Host || a.class.Engine && from.Forwarded() {
			return true
		}
		return slices.ContainsFunc(from.Cgroups, func(cg string) bool {
			return a.class.Cgroup == cg || strings.HasPrefix(a.class.Cgroup, cg+"/")
		})
	}
	if !c.known {
		c.known, c.Host = true, a.addr.IsLoopback()
		if !c.Host && p.clients != nil {
			c.Client = p.clients(a.addr)
		}
	}
	if c.Host {
		return from.Host
	}
	if from.Containers || slices.ContainsFunc(from.Sources, func(s netip.Prefix) bool { return s.Contains(a.addr) }) {
		return true
	}
	return c.Interface != "" && slices.ContainsFunc(from.Interfaces, func(i ifname.Pattern) bool { return i.Match(c.Interface) })
}

// everyones returns the rules that allow name when the rules are uniform
// (what every asker gets: the fast path answers from the cache with
// them), nil otherwise.
func (p *policy) everyones(name string) []string {
	if !p.uniform {
		return nil
	}
	return p.rulesFor(asker{}, name)
}
