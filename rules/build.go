package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/ifname"
)

// Chain priorities. Filter chains run at the standard filter priority, next
// to Docker's and firewalld's; a packet leaves only if every table accepts
// it, so egressd's verdicts add to theirs and never override a drop. The
// DNS redirect runs at dstnat priority in prerouting (container traffic)
// and output (the host's own traffic), before any filter chain sees the
// packet, so filters see the proxy's address, not the resolver's.
//
// The redirect runs at dstnat - 1 (-101), just before kube-proxy, which
// DNATs service addresses at dstnat (-100) in nat prerouting and output,
// as does any other dstnat chain (Docker's published ports): chains of one
// NAT hook run in priority order and the first that sets up a NAT binding
// for a connection ends the walk, while two chains at the same priority
// run in an undefined order. So pod DNS sent to the cluster DNS service
// address (10.96.0.10:53) ends at the proxy deterministically, never at a
// CoreDNS pod behind egressd's back; egressd forwards the cluster's own
// zones there itself (dns.forward).
//
// The anti-spoofing check runs in prerouting at raw priority (-300), not
// at mangle (-150) or filter: before conntrack (-200) so a forged packet
// never gets a connection entry (whose replies `ct state established`
// would let out), and before the DNS redirect (-101) so a forged query
// never reaches the proxy.
const (
	priorityFilter = 0
	priorityDstNAT = -100
	// priorityRedirect is one before kube-proxy's DNAT, see above.
	priorityRedirect = priorityDstNAT - 1
	priorityRaw      = -300
)

// ICMPv6 messages the host must send to keep IPv6 working.
var hostICMPv6 = []ICMPv6Type{
	{"nd-router-solicit", 133},
	{"nd-neighbor-solicit", 135},
	{"nd-neighbor-advert", 136},
	{"mld2-listener-report", 143},
}

// Host is what the ruleset needs to know about the host besides the
// config.
type Host struct {
	// Upstreams are the resolvers egressd itself asks; its own traffic is
	// exempt only towards them.
	Upstreams []netip.AddrPort
	// Cgroup is egressd's own cgroup, which proves that a socket is
	// egressd's; nil: the firewall mark does, weakly.
	Cgroup *Cgroup
	// OnLink are the prefixes of the host's own addresses outside
	// container networks: where DHCP servers and IPv6 neighbours can be
	// reached directly.
	OnLink []netip.Prefix
	// Engines are the cgroups of firewall.engine_cgroups that exist:
	// their DNS is redirected to the proxy even when the host is not
	// filtered.
	Engines []Cgroup
	// Cgroups are the host cgroups of the rules' from and of
	// config.DNSClasses that exist, by their path in the config
	// ("/system.slice/chrony.service").
	Cgroups map[string]Cgroup
	// Unknown are forwarding interfaces (bridges, veths) that match
	// neither firewall.containers nor firewall.unfiltered: treated like
	// container interfaces (DNS to the proxy, sources checked).
	Unknown []string
}

// Build returns the ruleset for cfg with the configured upstreams and the
// mark as egressd's proof of identity.
func Build(cfg *config.Config) *Ruleset {
	return BuildFor(cfg, Host{Upstreams: cfg.DNS.UpstreamAddrs})
}

// BuildFor returns the ruleset for cfg on host: one builder per chain.
func BuildFor(cfg *config.Config, host Host) *Ruleset {
	fw := cfg.Firewall
	proxy := uint16(cfg.DNS.ListenPort)
	rs := &Ruleset{Sets: learnedSets(cfg)}

	// Container interfaces, and forwarding interfaces (bridges, veths)
	// that match no pattern: their DNS goes to the proxy as well.
	ctrIfaces := slices.Clip(fw.Containers)
	for _, u := range host.Unknown {
		ctrIfaces = append(ctrIfaces, ifname.Pattern(u))
	}
	servers := ownServers(cfg, host)
	rs.Chains = []Chain{egressChain(cfg), forwardChain(cfg), proxyInChain(ctrIfaces), inputChain(fw, proxy, servers),
		dnsRedirectChain(cfg, proxy), dnsPreroutingChain(ctrIfaces)}
	rs.Chains = append(rs.Chains, antispoof(fw, ctrIfaces, ruleSources(cfg))...)
	switch {
	case fw.Host:
		rs.Chains = append(rs.Chains, hostOutputChains(cfg, host, servers, proxy)...)
	case len(host.Engines) > 0:
		rs.Chains = append(rs.Chains, engineDNSChain(cfg, host, proxy))
	}
	rs.Chains = append(rs.Chains, ruleChains(cfg)...)
	return rs
}

// learnedSets declares the sets of the rules: the "allow" rule's allow4,
// allow6 and ports (allow.ports), and NAME4 and NAME6 of every other rule
// with names.
func learnedSets(cfg *config.Config) []Set {
	var sets []Set
	for _, r := range cfg.Rules {
		if r.Name != config.RuleAllow && len(r.Domains) == 0 {
			continue
		}
		what := "answered by the DNS proxy"
		if r.Name != config.RuleAllow {
			what += " for rule " + r.Name
		}
		sets = append(sets,
			Set{Name: r.Name + "4", Rule: r.Name, Type: IPv4Addr, Timeout: true, Comment: "IPv4 addresses " + what + ", each with its own timeout"},
			Set{Name: r.Name + "6", Rule: r.Name, Type: IPv6Addr, Timeout: true, Comment: "IPv6 addresses " + what + ", each with its own timeout"})
		if r.Name == config.RuleAllow {
			ports := make([]uint16, len(cfg.Allow.Ports))
			for i, p := range cfg.Allow.Ports {
				ports[i] = uint16(p)
			}
			sets = append(sets, Set{Name: SetPorts, Type: InetService, Ports: ports, Comment: "TCP ports allowed to those addresses (allow.ports)"})
		}
	}
	return sets
}

// RuleChain names the chain of a rule other than "allow".
func RuleChain(rule string) string { return "rule_" + rule }

// ruleChains are the chains of the rules other than "allow" (whose
// statements are egress's own): what each opens, entered from forward and
// output for the sources the rule applies to.
func ruleChains(cfg *config.Config) []Chain {
	var out []Chain
	for _, r := range cfg.Rules {
		if r.Name == config.RuleAllow {
			continue
		}
		ch := Chain{Name: RuleChain(r.Name), Comment: fmt.Sprintf("rule %s (%s), from %s", r.Name, r.Origin, r.From)}
		for _, p := range r.Ports {
			port := portStmt(p)
			if len(r.Domains) > 0 {
				ch.Rules = append(ch.Rules,
					Rule{Stmts: []Stmt{DaddrSet{Set: r.Name + "4"}, port, Accept}},
					Rule{Stmts: []Stmt{DaddrSet{V6: true, Set: r.Name + "6"}, port, Accept}})
			}
			for _, c := range r.CIDRs {
				ch.Rules = append(ch.Rules, Rule{Stmts: []Stmt{DaddrPrefix(c), port, Accept}})
			}
		}
		out = append(out, ch)
	}
	return out
}

// portStmt matches a rule's port or port range.
func portStmt(p config.RulePort) Stmt {
	proto := TCP
	if p.Proto == config.ProtoUDP {
		proto = UDP
	}
	if p.Lo == p.Hi {
		return Ports{Proto: proto, Dport: p.Lo}
	}
	return DportRange{Proto: proto, Lo: p.Lo, Hi: p.Hi}
}

// forwardedRuleJumps send new forwarded connections to the chains of the
// rules that apply to their source (the "allow" rule is egress's own).
func forwardedRuleJumps(cfg *config.Config) []Rule {
	var out []Rule
	for _, r := range cfg.Rules {
		if r.Name == config.RuleAllow || !r.From.Forwarded() {
			continue
		}
		jump := Jump(RuleChain(r.Name))
		if r.From.Containers {
			out = append(out, Rule{Stmts: []Stmt{New{}, jump}})
			continue
		}
		for _, i := range r.From.Interfaces {
			out = append(out, Rule{Stmts: []Stmt{IfName{Pattern: i}, New{}, jump}})
		}
		for _, s := range r.From.Sources {
			out = append(out, Rule{Stmts: []Stmt{SaddrPrefix(s), New{}, jump}})
		}
	}
	if len(out) > 0 {
		out[0].Comment = "the rules that apply to the source"
	}
	return out
}

// hostRuleJumps send the host's new connections to the chains of the
// rules that apply to it: all of it, or its services' cgroups (those that
// exist now; a cgroup that appears is added then).
func hostRuleJumps(cfg *config.Config, cgroups map[string]Cgroup) []Rule {
	var out []Rule
	for _, r := range cfg.Rules {
		if r.Name == config.RuleAllow || !r.From.HostSide() {
			continue
		}
		jump := Jump(RuleChain(r.Name))
		if r.From.Host {
			out = append(out, Rule{Stmts: []Stmt{New{}, jump}})
			continue
		}
		for _, path := range r.From.Cgroups {
			if cg, ok := cgroups[path]; ok {
				out = append(out, Rule{Stmts: []Stmt{cg, New{}, jump}})
			}
		}
	}
	if len(out) > 0 {
		out[0].Comment = "the rules that apply to the host and its services"
	}
	return out
}

// egressChain decides about a new outbound connection; containers and the
// host share it so they follow exactly the same rules.
func egressChain(cfg *config.Config) Chain {
	fw := cfg.Firewall
	// In audit mode every blocking verdict becomes "log as would-block,
	// accept": the same rules in the same places, so what the log reports
	// is exactly what enforce would block.
	audit := fw.Mode == config.ModeAudit
	egress := Chain{Name: "egress", Comment: "new outbound connections from containers and the host", Rules: []Rule{
		{Comment: "DNS over TLS would bypass the proxy", Stmts: blocking(audit, fw.NFLOGGroup, LogDoT, Ports{Proto: TCP, Dport: 853}, rejectTCP(fw.Action))},
	}}
	if slices.ContainsFunc(cfg.Rules, func(r config.Rule) bool { return r.Name == config.RuleAllow }) {
		set4, set6 := config.RuleAllow+"4", config.RuleAllow+"6"
		egress.Rules = append(egress.Rules,
			Rule{Comment: "addresses answered by the DNS proxy", Stmts: []Stmt{DaddrSet{Set: set4}, Ports{Proto: TCP, DportSet: SetPorts}, Accept}},
			Rule{Stmts: []Stmt{DaddrSet{V6: true, Set: set6}, Ports{Proto: TCP, DportSet: SetPorts}, Accept}})
	}
	for _, st := range cfg.Allow.Static {
		egress.Rules = append(egress.Rules, staticRules(st)...)
	}
	switch {
	case audit:
		egress.Rules = append(egress.Rules, Rule{Comment: "audit mode: everything else would be blocked; logged, let through",
			Stmts: blocking(audit, fw.NFLOGGroup, LogBlocked, Drop)})
	case fw.Action == config.ActionDrop:
		egress.Rules = append(egress.Rules, Rule{Comment: "everything else", Stmts: logged(fw.NFLOGGroup, LogBlocked, Drop)})
	default:
		egress.Rules = append(egress.Rules,
			Rule{Comment: "everything else: TCP reset, ICMP administratively prohibited, so clients fail fast",
				Stmts: logged(fw.NFLOGGroup, LogBlocked, L4Proto(TCP), RejectTCP{})},
			Rule{Stmts: logged(fw.NFLOGGroup, LogBlocked, RejectAdmin{})})
	}
	return egress
}

// established accepts the packets of flows already allowed. It is the
// first rule of the output and forward hooks, the only chains that jump
// to egress, so that egress sees new flows only and most packets
// (replies, the proxy's answers) are accepted after one match instead of
// after the fib lookups and interface matches that new flows need.
func established(comment string) Rule {
	return Rule{Comment: comment, Stmts: []Stmt{Established{}, Accept}}
}

// forwardChain: forwarded traffic that leaves the host is filtered
// whichever interface it came from (an unknown bridge fails closed);
// traffic into container networks (published ports, between containers)
// stays on the host, and firewall.unfiltered is left alone.
func forwardChain(cfg *config.Config) Chain {
	fw := cfg.Firewall
	forward := Chain{Name: "forward", Hook: &Hook{"filter", "forward", priorityFilter},
		Comment: "forwarded traffic: filtered when it leaves the host, from any interface",
		Rules:   []Rule{established("replies and flows already allowed")}}
	for i, u := range fw.Unfiltered {
		for j, out := range []bool{false, true} {
			r := Rule{Stmts: []Stmt{IfName{Out: out, Pattern: u}, Accept}}
			if i == 0 && j == 0 {
				r.Comment = "firewall.unfiltered"
			}
			forward.Rules = append(forward.Rules, r)
		}
	}
	forward.Rules = append(forward.Rules, intoContainers(fw.Containers, "into container networks: inbound, published ports, between containers")...)
	forward.Rules = append(forward.Rules, forwardedRuleJumps(cfg)...)
	return forward.with(Rule{Comment: "out of the host", Stmts: []Stmt{Jump("egress")}})
}

// intoContainers accepts what goes out of a container interface; comment
// is the first rule's.
func intoContainers(containers []ifname.Pattern, comment string) []Rule {
	var out []Rule
	for i, c := range containers {
		r := Rule{Stmts: []Stmt{IfName{Out: true, Pattern: c}, Accept}}
		if i == 0 {
			r.Comment = comment
		}
		out = append(out, r)
	}
	return out
}

// with returns ch with rules appended.
func (ch Chain) with(rules ...Rule) Chain {
	ch.Rules = append(ch.Rules, rules...)
	return ch
}

// proxyInChain lets the host and the containers reach the proxy port.
func proxyInChain(ctrIfaces []ifname.Pattern) Chain {
	proxyIn := Chain{Name: "dns_proxy_in", Comment: "the proxy answers the host and containers only, never the outside",
		Rules: []Rule{{Stmts: []Stmt{IfName{Pattern: "lo"}, Accept}}}}
	for _, c := range ctrIfaces {
		proxyIn.Rules = append(proxyIn.Rules, Rule{Stmts: []Stmt{IfName{Pattern: c}, Accept}})
	}
	return proxyIn.with(Rule{Stmts: []Stmt{Drop}})
}

// inputChain filters the proxy port on input, and with the host filtered
// the late answers to egressd's own queries.
func inputChain(fw config.Firewall, proxy uint16, servers []netip.AddrPort) Chain {
	input := Chain{Name: "input", Hook: &Hook{"filter", "input", priorityFilter},
		Comment: "only the proxy port is filtered on input",
		Rules: []Rule{
			{Stmts: []Stmt{Ports{Proto: UDP, Dport: proxy}, Jump("dns_proxy_in")}},
			{Stmts: []Stmt{Ports{Proto: TCP, Dport: proxy}, Jump("dns_proxy_in")}},
		}}
	if !fw.Host {
		return input
	}
	// egressd deletes its upstream flows' entries as it closes their
	// sockets (so no other socket can use them). An answer arriving after
	// that would start an entry in reverse, whose other direction is the
	// port's query to the server: a host process sending from the port
	// would pass the redirect as "established".
	for i, s := range servers {
		r := Rule{Stmts: []Stmt{SaddrPrefix(netip.PrefixFrom(s.Addr().WithZone(""), s.Addr().BitLen())), Ports{Proto: UDP, Sport: s.Port()}, New{}, Drop}}
		if i == 0 {
			r.Comment = "late answers to egressd's own queries start no flow"
		}
		input.Rules = append(input.Rules, r)
	}
	return input
}

// dnsRedirectChain: container DNS is DNATed to the proxy's own addresses
// on egressd's dummy interface (dns.local_ipv4/6), not redirected: a
// redirect goes to the primary address of the interface the packet came
// in on, and the kernel drops the packet when that interface has none, as
// Calico's cali* and Cilium's lxc* veths have not (IPv6: none of the
// destination's scope). Replies go back through conntrack's reverse NAT,
// from the resolver's address the container asked.
func dnsRedirectChain(cfg *config.Config, proxy uint16) Chain {
	local4 := netip.AddrPortFrom(cfg.DNS.Local4, proxy)
	local6 := netip.AddrPortFrom(cfg.DNS.Local6, proxy)
	return Chain{Name: "dns_redirect", Comment: "container DNS goes to the proxy at its own addresses (dns.local_ipv4/6), whatever resolver it was sent to",
		Rules: []Rule{
			{Stmts: []Stmt{Ports{Proto: UDP, Dport: 53}, DNAT(local4)}},
			{Stmts: []Stmt{Ports{Proto: UDP, Dport: 53}, DNAT(local6)}},
			{Stmts: []Stmt{Ports{Proto: TCP, Dport: 53}, DNAT(local4)}},
			{Stmts: []Stmt{Ports{Proto: TCP, Dport: 53}, DNAT(local6)}},
		}}
}

// dnsPreroutingChain sends the containers' DNS to dns_redirect.
func dnsPreroutingChain(ctrIfaces []ifname.Pattern) Chain {
	ch := Chain{Name: "dns_prerouting", Hook: &Hook{"nat", "prerouting", priorityRedirect}}
	for _, c := range ctrIfaces {
		ch.Rules = append(ch.Rules, Rule{Stmts: []Stmt{IfName{Pattern: c}, Jump("dns_redirect")}})
	}
	return ch
}

// ownQueries matches egressd's own queries (and so the pinned names'
// lookups): to its upstreams and the servers of forwarded zones, and to
// the container engines' DNS servers for dns.engine_zones. A forward
// server behind a DNAT (a service address) is reached at the DNAT's
// target, which the filter sees: allow.cidrs must cover it.
func ownQueries(cfg *config.Config, host Host, servers []netip.AddrPort) []Rule {
	var owner Stmt = Mark(cfg.Firewall.Mark)
	if host.Cgroup != nil {
		owner = *host.Cgroup
	}
	var own []Rule
	for _, u := range servers {
		to := DaddrPrefix(netip.PrefixFrom(u.Addr().WithZone(""), u.Addr().BitLen()))
		for _, p := range []Proto{UDP, TCP} {
			own = append(own, Rule{Stmts: []Stmt{owner, to, Ports{Proto: p, Dport: u.Port()}}})
		}
	}
	// The container engines' DNS servers listen on the host's own
	// addresses (the bridges' gateways, which come and go), port 53.
	if len(cfg.DNS.EngineZones) > 0 {
		for _, p := range []Proto{UDP, TCP} {
			own = append(own, Rule{Stmts: []Stmt{owner, LocalDaddr{}, Ports{Proto: p, Dport: 53}}})
		}
	}
	return own
}

// withVerdict returns rules with v appended to each; comment is the
// first one's.
func withVerdict(rules []Rule, comment string, v Verdict) []Rule {
	out := make([]Rule, len(rules))
	for i, r := range rules {
		out[i] = Rule{Stmts: append(r.Stmts[:len(r.Stmts):len(r.Stmts)], v)}
	}
	if len(out) > 0 {
		out[0].Comment = comment
	}
	return out
}

// hostOutputChains filter the host's own traffic (output) and redirect
// its DNS to the proxy (dns_output); egressd's own queries go to their
// servers, and only there, unredirected and unfiltered.
func hostOutputChains(cfg *config.Config, host Host, servers []netip.AddrPort, proxy uint16) []Chain {
	own := ownQueries(cfg, host, servers)
	output := Chain{Name: "output", Hook: &Hook{"filter", "output", priorityFilter},
		Comment: "the host's own traffic",
		Rules:   []Rule{established("replies and flows already allowed (the proxy's answers among them)")}}
	output.Rules = append(output.Rules, withVerdict(own, "egressd's own upstream queries", Accept)...)
	output.Rules = append(output.Rules,
		Rule{Comment: "loopback", Stmts: []Stmt{IfName{Out: true, Pattern: "lo"}, Accept}},
		Rule{Comment: "the host's own addresses, and DNS redirected to the proxy", Stmts: []Stmt{LocalDaddr{}, Accept}})
	output.Rules = append(output.Rules, intoContainers(cfg.Firewall.Containers, "the host talking to its containers")...)
	output.Rules = append(output.Rules, linkLocal(host.OnLink)...)
	output.Rules = append(output.Rules, hostRuleJumps(cfg, host.Cgroups)...)
	output.Rules = append(output.Rules, Rule{Stmts: []Stmt{Jump("egress")}})
	// The host's own DNS is redirected: in the output hook a redirect
	// goes to 127.0.0.1 or ::1, whatever the interfaces, so it keeps
	// working even while the dummy interface is missing.
	dnsOutput := Chain{Name: "dns_output", Hook: &Hook{"nat", "output", priorityRedirect},
		Rules: withVerdict(own, "egressd's own upstream queries are not redirected", Return)}
	dnsOutput.Rules = append(dnsOutput.Rules, classRedirects(cfg, host.Cgroups, false)...)
	dnsOutput.Rules = append(dnsOutput.Rules,
		Rule{Comment: "the host's own DNS, to the proxy on loopback", Stmts: []Stmt{Ports{Proto: UDP, Dport: 53}, Redirect(proxy)}},
		Rule{Stmts: []Stmt{Ports{Proto: TCP, Dport: 53}, Redirect(proxy)}})
	return []Chain{output, dnsOutput}
}

// engineDNSChain: with the host not filtered, container engines' DNS
// servers still forward containers' queries from the host's namespace:
// they go through the allow-list like the containers' own. (With the host
// filtered, all host DNS does.)
func engineDNSChain(cfg *config.Config, host Host, proxy uint16) Chain {
	dnsOutput := Chain{Name: "dns_output", Hook: &Hook{"nat", "output", priorityRedirect}}
	if len(cfg.DNSClasses()) > 0 {
		dnsOutput.Rules = classRedirects(cfg, host.Cgroups, true)
		return dnsOutput
	}
	for i, cg := range host.Engines {
		for _, p := range []Proto{UDP, TCP} {
			r := Rule{Stmts: []Stmt{cg, Ports{Proto: p, Dport: 53}, Redirect(proxy)}}
			if i == 0 && p == UDP {
				r.Comment = "DNS that container engines send for containers (firewall.engine_cgroups), to the proxy on loopback"
			}
			dnsOutput.Rules = append(dnsOutput.Rules, r)
		}
	}
	return dnsOutput
}

// classRedirects send the DNS of each host cgroup of config.DNSClasses
// that exists now to the proxy port of its own, so that the proxy knows
// which rules apply; enginesOnly: only firewall.engine_cgroups' (the host
// is not filtered).
func classRedirects(cfg *config.Config, cgroups map[string]Cgroup, enginesOnly bool) []Rule {
	var out []Rule
	for _, c := range cfg.DNSClasses() {
		cg, ok := cgroups[c.Cgroup]
		if !ok || enginesOnly && !c.Engine {
			continue
		}
		for _, p := range []Proto{UDP, TCP} {
			out = append(out, Rule{Stmts: []Stmt{cg, Ports{Proto: p, Dport: 53}, Redirect(c.Port)}})
		}
	}
	if len(out) > 0 {
		out[0].Comment = "host services' DNS, each to a proxy port of its own: the proxy answers by their rules"
	}
	return out
}

// ownServers are the servers egressd itself asks: its upstreams and the
// servers of forwarded zones.
func ownServers(cfg *config.Config, host Host) []netip.AddrPort {
	servers := slices.Clone(host.Upstreams)
	for _, f := range cfg.DNS.Forward {
		for _, s := range f.Servers {
			if !slices.Contains(servers, s) {
				servers = append(servers, s)
			}
		}
	}
	return servers
}

// staticRules are the rules of one allow.cidrs entry: one per protocol and
// port (range), all of them accepting.
func staticRules(st config.Static) []Rule {
	to := DaddrPrefix(st.Prefix)
	var rs []Rule
	add := func(stmts ...Stmt) {
		rs = append(rs, Rule{Stmts: append([]Stmt{to}, append(stmts, Accept)...)})
	}
	protos := []Proto{TCP, UDP}
	switch st.Proto {
	case config.ProtoTCP:
		protos = []Proto{TCP}
	case config.ProtoUDP:
		protos = []Proto{UDP}
	}
	switch {
	case st.AnyPort && st.Proto == config.ProtoAny:
		add() // every protocol, ICMP included
	case st.AnyPort:
		add(L4Proto(protos[0]))
	case len(st.Ports) == 0:
		add(Ports{Proto: TCP, DportSet: SetPorts}) // the original form: allow.ports
	default:
		for _, p := range protos {
			for _, r := range st.Ports {
				if r.Lo == r.Hi {
					add(Ports{Proto: p, Dport: r.Lo})
				} else {
					add(DportRange{Proto: p, Lo: r.Lo, Hi: r.Hi})
				}
			}
		}
	}
	rs[0].Comment = "allow.cidrs " + st.String()
	return rs
}

// antispoof drops packets from container interfaces (and those of
// firewall.antispoof) whose source address is not routed back through the
// interface they came in on. Without it a container with CAP_NET_RAW can
// send datagrams with the upstream resolver's address to the host's
// sockets (answers to egressd's own queries), or queries to the proxy with
// an internet address as source, whose answers the host then sends there.
//
// Packets from the source prefixes of rules (sources) are checked on every
// interface: a rule grants egress by source address, so a packet that
// claims one must have come in where that address lives, not on an uplink
// or another LAN.
func antispoof(fw config.Firewall, ctrIfaces []ifname.Pattern, sources []netip.Prefix) []Chain {
	check := Chain{Name: "spoofed", Comment: "sources not routed back through their interface are forged",
		Rules: []Rule{{Stmts: blocking(fw.Mode == config.ModeAudit, fw.NFLOGGroup, LogSpoofed, SourceNotRouted{}, Drop)}}}
	pre := Chain{Name: "antispoof", Hook: &Hook{"filter", "prerouting", priorityRaw},
		Comment: "forged source addresses, before conntrack and the DNS redirect see them",
		Rules: []Rule{
			{Comment: "DHCP clients without an address yet", Stmts: []Stmt{SaddrPrefix(netip.MustParsePrefix("0.0.0.0/32")), Ports{Proto: UDP, Sport: 68, Dport: 67}, Return}},
			{Comment: "IPv6 duplicate address detection", Stmts: []Stmt{SaddrPrefix(netip.MustParsePrefix("::/128")), Return}},
		}}
	if slices.Contains(fw.Antispoof, ifname.Any) {
		pre.Rules = append(pre.Rules,
			Rule{Comment: "every interface but loopback", Stmts: []Stmt{IfName{Pattern: "lo"}, Return}},
			Rule{Stmts: []Stmt{Jump("spoofed")}})
		return []Chain{check, pre}
	}
	for _, p := range append(slices.Clip(ctrIfaces), fw.Antispoof...) {
		pre.Rules = append(pre.Rules, Rule{Stmts: []Stmt{IfName{Pattern: p}, Jump("spoofed")}})
	}
	if len(sources) > 0 {
		pre.Rules = append(pre.Rules, Rule{Comment: "the sources of rules, on every interface but loopback", Stmts: []Stmt{IfName{Pattern: "lo"}, Return}})
		for _, s := range sources {
			pre.Rules = append(pre.Rules, Rule{Stmts: []Stmt{SaddrPrefix(s), Jump("spoofed")}})
		}
	}
	return []Chain{check, pre}
}

// ruleSources returns the source prefixes of the rules, each once, in the
// order of the rules.
func ruleSources(cfg *config.Config) []netip.Prefix {
	var out []netip.Prefix
	for _, r := range cfg.Rules {
		for _, s := range r.From.Sources {
			if !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// Destinations of the host's link-level protocols.
var (
	broadcast4   = netip.MustParsePrefix("255.255.255.255/32")
	dhcp6Servers = netip.MustParsePrefix("ff02::1:2/128")
	linkLocal6   = netip.MustParsePrefix("fe80::/10")
	multicast6   = netip.MustParsePrefix("ff00::/8")
)

// linkLocal returns the exemptions for DHCP, DHCPv6 and neighbour
// discovery, each bound to destinations on the link: unbound, a process
// bound to port 68 (or sending ICMPv6 type 135) could reach any address.
// DHCPv4: broadcast, or unicast (renewals) into an on-link subnet; a
// server behind a relay is then reached by the broadcast rebind. DHCPv6:
// the All_DHCP_Relay_Agents_and_Servers group and link-local addresses.
// ND and MLD: multicast and link-local, and neighbour solicitations and
// advertisements to on-link addresses (unreachability detection, and
// answers to neighbours that ask from a global address).
func linkLocal(onLink []netip.Prefix) []Rule {
	dhcp := Ports{Proto: UDP, Sport: 68, Dport: 67}
	dhcp6 := Ports{Proto: UDP, Sport: 546, Dport: 547}
	rs := []Rule{{Comment: "DHCP and DHCPv6 clients, to servers on the link", Stmts: []Stmt{DaddrPrefix(broadcast4), dhcp, Accept}}}
	var onLink6 []netip.Prefix
	for _, p := range onLink {
		if p.Addr().Is4() {
			rs = append(rs, Rule{Stmts: []Stmt{DaddrPrefix(p), dhcp, Accept}})
		} else {
			onLink6 = append(onLink6, p)
		}
	}
	rs = append(rs,
		Rule{Stmts: []Stmt{DaddrPrefix(dhcp6Servers), dhcp6, Accept}},
		Rule{Stmts: []Stmt{DaddrPrefix(linkLocal6), dhcp6, Accept}})
	for i, t := range hostICMPv6 {
		dsts := []netip.Prefix{multicast6, linkLocal6}
		if t.Type == 135 || t.Type == 136 {
			dsts = append(dsts, onLink6...)
		}
		for j, d := range dsts {
			r := Rule{Stmts: []Stmt{DaddrPrefix(d), t, Accept}}
			if i == 0 && j == 0 {
				r.Comment = "IPv6 neighbour discovery and MLD, on the link"
			}
			rs = append(rs, r)
		}
	}
	return rs
}

// logged returns stmts with an NFLOG statement before the last one, the
// verdict, unless group is 0.
func logged(group uint16, prefix string, stmts ...Stmt) []Stmt {
	if group == 0 {
		return stmts
	}
	last := len(stmts) - 1
	return append(append(stmts[:last:last], Log{Prefix: prefix, Group: group}), stmts[last])
}

// blocking is logged for a blocking verdict, the last of stmts; in audit
// mode the verdict becomes accept and the log prefix says "would block"
// (LogAudit + the prefix without "egressd-").
func blocking(audit bool, group uint16, prefix string, stmts ...Stmt) []Stmt {
	if !audit {
		return logged(group, prefix, stmts...)
	}
	last := len(stmts) - 1
	return logged(group, LogAudit+strings.TrimPrefix(prefix, "egressd-"), append(stmts[:last:last], Accept)...)
}

// rejectTCP is how action blocks a TCP connection.
func rejectTCP(action config.Action) Stmt {
	if action == config.ActionDrop {
		return Drop
	}
	return RejectTCP{}
}

// Summary is a one-line description for humans.
func (rs *Ruleset) Summary() string {
	rules := 0
	for _, c := range rs.Chains {
		rules += len(c.Rules)
	}
	return fmt.Sprintf("table inet %s: %d sets, %d chains, %d rules", TableName, len(rs.Sets), len(rs.Chains), rules)
}
