package config

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/spf13/viper"

	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/ifname"
)

// Rule is one allow rule: whom it applies to (From), which destinations
// (names, whose answered addresses it opens, and prefixes) and on which
// ports. Rules add up: a connection is allowed when one rule that applies
// to its source allows it.
type Rule struct {
	// Name identifies the rule in the ruleset (chain rule_NAME, sets
	// NAME4 and NAME6), logs, metrics and the control socket.
	Name string
	// Origin says where the rule was written, for messages: "allow"
	// (the flat keys), "allow.rules[2]", "profile ntp".
	Origin  string
	From    From
	Domains []string // exact names and "*.zone" patterns
	// Pinned names are resolved by egressd itself and kept open (the
	// "allow" rule's allow.names).
	Pinned []string
	Ports  []RulePort
	// CIDRs are opened on Ports; Static are the "allow" rule's
	// allow.cidrs entries, which carry ports of their own.
	CIDRs  []netip.Prefix
	Static []Static
}

// RuleAllow is the name of the rule of the flat keys allow.domains,
// allow.ports, allow.names and allow.cidrs, which applies to everyone.
const RuleAllow = "allow"

// RulePort is a protocol and a port range of a rule.
type RulePort struct {
	Proto Proto // ProtoTCP or ProtoUDP
	PortRange
}

func (p RulePort) String() string { return p.PortRange.String() + "/" + string(p.Proto) }

// From says whom a rule applies to.
type From struct {
	// Containers: every container and forwarding interface.
	Containers bool
	// Host: every process of the host (firewall.host).
	Host       bool
	Interfaces []ifname.Pattern
	Sources    []netip.Prefix // forwarded traffic from these addresses
	// Cgroups are host services, as cgroup v2 paths below the cgroup2
	// mount ("/system.slice/chrony.service").
	Cgroups []string
}

// Everyone is whom the "allow" rule applies to.
var Everyone = From{Containers: true, Host: true}

// Everyone reports whether f applies to everyone: containers and host.
func (f From) Everyone() bool { return f.Containers && f.Host }

// String is the from list as written.
func (f From) String() string {
	var parts []string
	if f.Containers {
		parts = append(parts, "containers")
	}
	if f.Host {
		parts = append(parts, "host")
	}
	for _, i := range f.Interfaces {
		parts = append(parts, string(i))
	}
	for _, s := range f.Sources {
		parts = append(parts, s.String())
	}
	parts = append(parts, f.Cgroups...)
	return strings.Join(parts, ",")
}

// Forwarded reports whether the rule applies to some forwarded traffic
// (containers); HostSide whether to some of the host's own.
func (f From) Forwarded() bool {
	return f.Containers || len(f.Interfaces) > 0 || len(f.Sources) > 0
}

// HostSide reports whether the rule applies to some of the host's own
// traffic.
func (f From) HostSide() bool { return f.Host || len(f.Cgroups) > 0 }

// covers reports whether f applies to everyone g applies to.
func (f From) covers(g From) bool {
	if g.Containers && !f.Containers || g.Host && !f.Host {
		return false
	}
	if !f.Containers {
		for _, i := range g.Interfaces {
			if !slices.ContainsFunc(f.Interfaces, func(p ifname.Pattern) bool { return patternCovers(p, i) }) {
				return false
			}
		}
		for _, s := range g.Sources {
			if !slices.ContainsFunc(f.Sources, func(p netip.Prefix) bool { return p.Bits() <= s.Bits() && p.Contains(s.Addr()) }) {
				return false
			}
		}
	}
	if !f.Host {
		for _, c := range g.Cgroups {
			if !slices.ContainsFunc(f.Cgroups, func(p string) bool { return c == p || strings.HasPrefix(c, p+"/") }) {
				return false
			}
		}
	}
	return true
}

// patternCovers reports whether every interface q matches, p matches.
func patternCovers(p, q ifname.Pattern) bool {
	pp, glob := p.Prefix()
	if !glob {
		return p == q
	}
	qp, _ := q.Prefix()
	return strings.HasPrefix(qp, pp)
}

// Allows reports whether the rule opens proto port on addr when addr is
// an address its names resolved to (learned) or not; port 0 means any.
func (r Rule) AllowsPort(proto Proto, port uint16) bool {
	return slices.ContainsFunc(r.Ports, func(p RulePort) bool {
		return p.Proto == proto && (port == 0 || p.Lo <= port && port <= p.Hi)
	})
}

// ruleName is what a rule's name may be: it names nft chains and sets.
var ruleName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,23}$`)

// udpNative are ports whose services are UDP by nature: a bare number is
// ambiguous for them.
var udpNative = map[uint16]string{53: "DNS", 67: "DHCP", 68: "DHCP", 69: "TFTP", 123: "NTP", 161: "SNMP",
	500: "IKE", 514: "syslog", 1194: "OpenVPN", 4500: "IPsec NAT-T", 51820: "WireGuard"}

// profileFiles are the profiles that ship with egressd.
//
//go:embed profiles/*.yaml
var profileFiles embed.FS

// Profiles returns the names of the profiles that ship with egressd.
func Profiles() []string {
	entries, _ := profileFiles.ReadDir("profiles")
	var out []string
	for _, e := range entries {
		out = append(out, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	return out
}

// Profile returns the YAML text of a profile.
func Profile(name string) ([]byte, bool) {
	if !ruleName.MatchString(strings.ReplaceAll(name, "-", "_")) {
		return nil, false
	}
	data, err := profileFiles.ReadFile("profiles/" + name + ".yaml")
	return data, err == nil
}

// profileRules parses the rules of a profile.
func profileRules(name string) ([]any, error) {
	data, ok := Profile(name)
	if !ok {
		return nil, fmt.Errorf("%q is not a profile egressd ships (%s)", name, strings.Join(Profiles(), ", "))
	}
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
		return nil, fmt.Errorf("profile %s: %w", name, err)
	}
	rules, ok := v.Get("rules").([]any)
	if !ok {
		return nil, fmt.Errorf("profile %s: no rules", name)
	}
	return rules, nil
}

// validateRules builds c.Rules: the "allow" rule of the flat keys (when
// they allow anything), the included profiles' rules, then allow.rules.
func (c *Config) validateRules() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	c.Rules = nil
	if len(c.Allow.Domains) > 0 || len(c.Allow.Static) > 0 {
		r := Rule{Name: RuleAllow, Origin: "allow", From: Everyone, Domains: c.Allow.Domains, Pinned: c.Allow.Names, Static: c.Allow.Static}
		for _, p := range c.Allow.Ports {
			if p >= 1 && p <= 65535 {
				r.Ports = append(r.Ports, RulePort{ProtoTCP, PortRange{uint16(p), uint16(p)}})
			}
		}
		c.Rules = append(c.Rules, r)
	}
	dupes(&errs, "allow.include", c.Allow.Include, strings.TrimSpace)
	for i, name := range c.Allow.Include {
		raw, err := profileRules(strings.TrimSpace(name))
		if err != nil {
			bad("allow.include[%d]: %v", i, err)
			continue
		}
		for j, r := range raw {
			rule, err := c.parseRule(r, fmt.Sprintf("profile %s: rules[%d]", name, j))
			if err != nil {
				bad("allow.include[%d]: %w", i, err)
				continue
			}
			rule.Origin = "profile " + name
			c.Rules = append(c.Rules, rule)
		}
	}
	for i, r := range c.Allow.RulesRaw {
		field := fmt.Sprintf("allow.rules[%d]", i)
		rule, err := c.parseRule(r, field)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		rule.Origin = field
		c.Rules = append(c.Rules, rule)
	}
	if len(c.Rules) == 0 && len(errs) == 0 {
		bad("allow: no rule allows anything (allow.domains, allow.cidrs, allow.include and allow.rules are all empty)")
	}
	seen := map[string]Rule{}
	for _, r := range c.Rules {
		if o, ok := seen[r.Name]; ok {
			bad("%s: name %q is taken by %s", r.Origin, r.Name, o.Origin)
		}
		seen[r.Name] = r
	}
	for j, r := range c.Rules {
		for i, o := range c.Rules {
			if i != j && o.shadows(r) && (i < j || !r.shadows(o)) {
				bad("%s (%s): shadowed by %s (%s): everything it allows, that rule allows already", r.Origin, r.Name, o.Origin, o.Name)
				break
			}
		}
	}
	if n := len(c.DNSClasses()); n > 0 && c.DNS.ListenPort+n > 65535 {
		bad("dns.listen_port: %d leaves no room for the %d ports above it that host services' DNS goes to", c.DNS.ListenPort, n)
	}
	return errs
}

// shadows reports whether r allows everything s allows, to everyone s
// applies to: s adds nothing.
func (r Rule) shadows(s Rule) bool {
	if len(r.Static) > 0 || len(s.Static) > 0 || len(s.Pinned) > 0 || !r.From.covers(s.From) {
		return false
	}
	for _, p := range s.Ports {
		if !slices.ContainsFunc(r.Ports, func(q RulePort) bool { return q.Proto == p.Proto && q.Lo <= p.Lo && p.Hi <= q.Hi }) {
			return false
		}
	}
	m := dnsname.NewMatcher(r.Domains)
	for _, d := range s.Domains {
		// "*.zone" is covered by a pattern that matches a name below zone
		// at every depth: "*.zone" itself or "*.parent".
		probe := d
		if zone, ok := strings.CutPrefix(nameKey(d), "*."); ok {
			probe = "x." + zone
			if !slices.ContainsFunc(r.Domains, func(p string) bool {
				pz, glob := strings.CutPrefix(nameKey(p), "*.")
				return glob && dnsname.InZone(zone, pz)
			}) {
				return false
			}
		}
		if !m.Match(probe) {
			return false
		}
	}
	for _, p := range s.CIDRs {
		if !slices.ContainsFunc(r.CIDRs, func(q netip.Prefix) bool { return q.Bits() <= p.Bits() && q.Contains(p.Addr()) }) {
			return false
		}
	}
	return true
}

// ruleKeys are the keys of an allow.rules entry.
var ruleKeys = []string{"name", "from", "names", "cidrs", "ports"}

// parseRule parses one rule (a map) written at field.
func (c *Config) parseRule(raw any, field string) (Rule, error) {
	m, ok := stringMap(raw)
	if !ok {
		return Rule{}, fmt.Errorf("%s: %v must be a map with the keys %s", field, raw, strings.Join(ruleKeys, ", "))
	}
	for k := range m {
		if !slices.Contains(ruleKeys, k) {
			return Rule{}, fmt.Errorf("%s.%s: unknown key (%s)", field, k, strings.Join(ruleKeys, ", "))
		}
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	var r Rule
	name, _ := m["name"].(string)
	switch {
	case name == RuleAllow:
		bad("%s.name: %q is the rule of allow.domains and allow.ports; choose another", field, name)
	case !ruleName.MatchString(name):
		bad("%s.name: %q must be lower-case letters, digits and \"_\", starting with a letter, at most 24 characters", field, fmt.Sprint(m["name"]))
	}
	r.Name = name
	lists := map[string][]string{}
	for _, k := range []string{"from", "names", "cidrs", "ports"} {
		l, err := stringList(m[k])
		if err != nil {
			bad("%s.%s: %v", field, k, err)
		}
		lists[k] = l
	}
	for i, d := range lists["names"] {
		if err := dnsname.Check(d, true); err != nil {
			bad("%s.names[%d]: %q %v", field, i, d, err)
		}
		r.Domains = append(r.Domains, strings.TrimSpace(d))
	}
	dupes(&errs, field+".names", r.Domains, nameKey)
	for i, s := range lists["cidrs"] {
		st, err := buildStatic(strings.TrimSpace(s), "", "", true)
		if err != nil {
			bad("%s.cidrs[%d]: %q %v", field, i, s, err)
			continue
		}
		r.CIDRs = append(r.CIDRs, st.Prefix)
	}
	for i, s := range lists["ports"] {
		p, err := parseRulePort(s)
		if err != nil {
			bad("%s.ports[%d]: %v", field, i, err)
			continue
		}
		r.Ports = append(r.Ports, p)
	}
	dupes(&errs, field+".ports", r.Ports, RulePort.String)
	if len(r.Domains) == 0 && len(r.CIDRs) == 0 {
		bad("%s: allows nothing: give it names or cidrs", field)
	} else if len(lists["ports"]) == 0 {
		bad("%s.ports: empty: the rule's names and cidrs need ports (such as 443 or \"123/udp\")", field)
	}
	if _, present := m["from"]; !present {
		r.From = Everyone
	} else if len(lists["from"]) == 0 {
		bad("%s.from: empty: the rule would apply to no one", field)
	}
	for i, f := range lists["from"] {
		if err := c.addFrom(&r.From, strings.TrimSpace(f)); err != nil {
			bad("%s.from[%d]: %q %v", field, i, f, err)
		}
	}
	return r, errors.Join(errs...)
}

// addFrom parses one from entry into f.
func (c *Config) addFrom(f *From, s string) error {
	switch {
	case s == "containers":
		f.Containers = true
	case s == "host":
		if !c.Firewall.Host {
			return errors.New("is not filtered: firewall.host is false")
		}
		f.Host = true
	case strings.HasSuffix(s, ".service") || strings.HasPrefix(s, "/"):
		p, err := EngineCgroupPath(s)
		if err != nil {
			return errors.New("is neither a systemd service (\"chrony.service\") nor a cgroup path below the cgroup2 mount (\"/system.slice/chrony.service\")")
		}
		if !c.Firewall.Host {
			return errors.New("is a host service, and the host is not filtered: firewall.host is false")
		}
		f.Cgroups = append(f.Cgroups, p)
	case looksLikeAddress(s):
		st, err := buildStatic(s, "", "", true)
		if err != nil {
			return fmt.Errorf("is not a source prefix: %w", err)
		}
		f.Sources = append(f.Sources, st.Prefix)
	default:
		p := ifname.Pattern(s)
		if err := p.Check(); err != nil {
			return errors.New("is not containers, host, a container interface (pattern), a source prefix, a systemd service or a cgroup path")
		}
		if !slices.ContainsFunc(c.Firewall.Containers, func(q ifname.Pattern) bool { return patternCovers(q, p) }) {
			return fmt.Errorf("matches no container interface: firewall.containers is %v", c.Firewall.Containers)
		}
		f.Interfaces = append(f.Interfaces, p)
	}
	return nil
}

// looksLikeAddress tells a source prefix ("10.1.0.0/24", "fd00::5") from an
// interface name, which may have dots (a VLAN's "eth0.100") but never a
// slash or a colon (the kernel's dev_valid_name).
func looksLikeAddress(s string) bool {
	return strings.ContainsAny(s, "/:") || s != "" && strings.Trim(s, "0123456789.") == ""
}

// parseRulePort parses "443", "443/tcp", "123/udp", "8000-8100/tcp".
func parseRulePort(s string) (RulePort, error) {
	s = strings.TrimSpace(s)
	ports, proto, withProto := strings.Cut(s, "/")
	r, err := parsePortRange(ports)
	if err != nil {
		return RulePort{}, fmt.Errorf("%q: %w", s, err)
	}
	switch {
	case !withProto:
		if svc, ok := udpNative[r.Lo]; ok && r.Lo == r.Hi {
			return RulePort{}, fmt.Errorf("%q is ambiguous: %s is UDP; write \"%d/udp\" (or \"%d/tcp\")", s, svc, r.Lo, r.Lo)
		}
		proto = string(ProtoTCP)
	case proto != string(ProtoTCP) && proto != string(ProtoUDP):
		return RulePort{}, fmt.Errorf("%q: protocol %q must be tcp or udp", s, proto)
	}
	return RulePort{Proto(proto), r}, nil
}

// stringMap returns raw as a map with string keys.
func stringMap(raw any) (map[string]any, bool) {
	switch v := raw.(type) {
	case map[string]any:
		return v, true
	case map[any]any:
		m := map[string]any{}
		for k, val := range v {
			m[fmt.Sprint(k)] = val
		}
		return m, true
	}
	return nil, false
}

// stringList returns a YAML list of scalars (or one scalar) as strings.
func stringList(raw any) ([]string, error) {
	switch v := raw.(type) {
	case nil:
		return nil, nil
	case string:
		return []string{v}, nil
	case int, int64, uint64, float64:
		return []string{fmt.Sprint(v)}, nil
	case []any:
		out := make([]string, len(v))
		for i, x := range v {
			switch x.(type) {
			case string, int, int64, uint64, float64:
				out[i] = fmt.Sprint(x)
			default:
				return nil, fmt.Errorf("[%d]: %v is not a string or number", i, x)
			}
		}
		return out, nil
	case []string:
		return v, nil
	}
	return nil, fmt.Errorf("%v is not a list", raw)
}

// RuleNames returns the names of rules, sorted.
func RuleNames(rules []Rule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		out[i] = r.Name
	}
	sort.Strings(out)
	return out
}

// DNSClass is a host cgroup whose DNS goes to a proxy port of its own, so
// that the proxy knows whose query it answers: a cgroup of a rule's from,
// or of firewall.engine_cgroups (a container engine asking for its
// containers, whichever they are).
type DNSClass struct {
	Cgroup string // below the cgroup2 mount
	Port   uint16
	Engine bool
}

// Uniform reports whether every rule applies to everyone: then who asks
// changes nothing, and the proxy need not tell clients apart.
func (c *Config) Uniform() bool {
	for _, r := range c.Rules {
		if !r.From.Everyone() {
			return false
		}
	}
	return true
}

// DNSClasses returns the host cgroups whose DNS goes to a port of its own:
// dns.listen_port + 1, + 2, ... in the order of the rules, then of
// firewall.engine_cgroups; none when the rules are uniform. They are
// returned deepest first, so that a cgroup comes before the cgroups above
// it: the ruleset redirects in this order, and a cgroup's redirect matches
// every cgroup below it too (a rule from "/system.slice" must not take the
// DNS of chrony.service's rule, or of docker.service's engine).
func (c *Config) DNSClasses() []DNSClass {
	if c.Uniform() {
		return nil
	}
	var out []DNSClass
	add := func(cg string, engine bool) {
		for i := range out {
			if out[i].Cgroup == cg {
				out[i].Engine = out[i].Engine || engine
				return
			}
		}
		out = append(out, DNSClass{Cgroup: cg, Port: uint16(c.DNS.ListenPort + 1 + len(out)), Engine: engine})
	}
	for _, r := range c.Rules {
		for _, cg := range r.From.Cgroups {
			add(cg, false)
		}
	}
	for _, e := range c.Firewall.EngineCgroups {
		if p, err := EngineCgroupPath(e); err == nil {
			add(p, true)
		}
	}
	slices.SortStableFunc(out, func(a, b DNSClass) int {
		return strings.Count(b.Cgroup, "/") - strings.Count(a.Cgroup, "/")
	})
	return out
}
