package dnsresolve

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/ifname"
)

// policyRules are rules for every kind of from, in this order.
func policyRules() []config.Rule {
	return []config.Rule{
		{Name: config.RuleAllow, From: config.Everyone, Domains: []string{"*.everyone.example"}},
		{Name: "ctr", From: config.From{Containers: true}, Domains: []string{"ctr.example"}},
		{Name: "lab", From: config.From{Interfaces: []ifname.Pattern{"br-lab*", "docker0"}}, Domains: []string{"lab.example", "shared.example"}},
		{Name: "src", From: config.From{Sources: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24"), netip.MustParsePrefix("fd00:1::/64")}},
			Domains: []string{"src.example", "shared.example"}},
		{Name: "host", From: config.From{Host: true}, Domains: []string{"host.example", "*.both.example"}},
		{Name: "chrony", From: config.From{Cgroups: []string{"/system.slice/chrony.service"}}, Domains: []string{"*.ntp.example"}},
		{Name: "slice", From: config.From{Cgroups: []string{"/system.slice"}}, Domains: []string{"slice.example"}},
		{Name: "mixed", From: config.From{Containers: true, Cgroups: []string{"/system.slice/chrony.service"}}, Domains: []string{"*.both.example"}},
		// No names: it opens no learned addresses, and does not make the
		// names of the others any less uniform.
		{Name: "cidrs", From: config.From{Host: true}, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}},
	}
}

// policyClients is what the route lookups say of the test's addresses.
var policyClients = map[netip.Addr]Client{
	netip.MustParseAddr("10.1.0.5"):   {Interface: "br-lab1"},  // in src's prefix, behind lab's bridge
	netip.MustParseAddr("10.1.0.6"):   {Interface: "br-other"}, // in src's prefix, another bridge
	netip.MustParseAddr("10.1.0.1"):   {Host: true},            // the host's own address on that bridge
	netip.MustParseAddr("10.2.0.5"):   {Interface: "br-other"},
	netip.MustParseAddr("10.3.0.5"):   {}, // behind no known interface
	netip.MustParseAddr("172.17.0.2"): {Interface: "docker0"},
	netip.MustParseAddr("192.0.2.1"):  {Host: true},
	netip.MustParseAddr("fd00:1::5"):  {Interface: "br-other"},
}

func TestPolicyRulesFor(t *testing.T) {
	lookups := 0
	p := newPolicy(policyRules(), func(a netip.Addr) Client {
		lookups++
		return policyClients[a]
	})
	if p.uniform {
		t.Fatal("rules of different sources: uniform")
	}
	chrony := &config.DNSClass{Cgroup: "/system.slice/chrony.service", Port: 10054}
	foo := &config.DNSClass{Cgroup: "/system.slice/foo.service", Port: 10055}
	docker := &config.DNSClass{Cgroup: "/system.slice/docker.service", Port: 10056, Engine: true}
	kube := &config.DNSClass{Cgroup: "/kubepods.slice", Port: 10057, Engine: true}
	lookalike := &config.DNSClass{Cgroup: "/system.slicer/x.service", Port: 10058}
	addr := func(s string) asker { return asker{addr: netip.MustParseAddr(s)} }
	class := func(c *config.DNSClass) asker { return asker{addr: netip.MustParseAddr("127.0.0.1"), class: c} }
	tests := []struct {
		who  string
		a    asker
		name string
		want []string // nil: refused
	}{
		// The rule of the flat keys: everyone.
		{"container", addr("10.2.0.5"), "a.everyone.example", []string{"allow"}},
		{"host", addr("127.0.0.1"), "a.everyone.example", []string{"allow"}},
		{"service", class(chrony), "a.everyone.example", []string{"allow"}},
		{"engine", class(docker), "a.b.everyone.example", []string{"allow"}},
		{"unknown interface", addr("10.3.0.5"), "x.everyone.example", []string{"allow"}},

		// containers: every forwarded client, never the host.
		{"container", addr("10.2.0.5"), "ctr.example", []string{"ctr"}},
		{"unknown interface", addr("10.3.0.5"), "ctr.example", []string{"ctr"}},
		{"host loopback", addr("127.0.0.1"), "ctr.example", nil},
		{"host loopback v6", addr("::1"), "ctr.example", nil},
		{"host address", addr("192.0.2.1"), "ctr.example", nil},
		{"service", class(chrony), "ctr.example", nil},
		{"engine asking for containers", class(docker), "ctr.example", []string{"ctr"}},
		{"another engine", class(kube), "ctr.example", []string{"ctr"}},

		// Interface patterns.
		{"behind br-lab*", addr("10.1.0.5"), "lab.example", []string{"lab"}},
		{"behind docker0", addr("172.17.0.2"), "LAB.Example.", []string{"lab"}},
		{"behind another bridge", addr("10.2.0.5"), "lab.example", nil},
		{"behind no known interface", addr("10.3.0.5"), "lab.example", nil},
		{"host", addr("127.0.0.1"), "lab.example", nil},
		{"service", class(chrony), "lab.example", nil},
		{"engine", class(docker), "lab.example", []string{"lab"}},

		// Source prefixes, whatever the interface.
		{"in the prefix, behind lab", addr("10.1.0.5"), "src.example", []string{"src"}},
		{"in the prefix, another bridge", addr("10.1.0.6"), "src.example", []string{"src"}},
		{"in the v6 prefix", addr("fd00:1::5"), "src.example", []string{"src"}},
		{"outside the prefix", addr("10.2.0.5"), "src.example", nil},
		{"the host's own address in the prefix", addr("10.1.0.1"), "src.example", nil},
		{"engine", class(docker), "src.example", []string{"src"}},
		{"service", class(foo), "src.example", nil},

		// A name of two rules: the asker's among them.
		{"both rules apply", addr("10.1.0.5"), "shared.example", []string{"lab", "src"}},
		{"only the source's", addr("10.1.0.6"), "shared.example", []string{"src"}},
		{"only the interface's", addr("172.17.0.2"), "shared.example", []string{"lab"}},
		{"neither", addr("10.2.0.5"), "shared.example", nil},
		{"engine: both", class(docker), "shared.example", []string{"lab", "src"}},

		// host: the host's addresses and every host service.
		{"loopback", addr("127.0.0.1"), "host.example", []string{"host"}},
		{"loopback v6", addr("::1"), "host.example", []string{"host"}},
		{"host address", addr("192.0.2.1"), "host.example", []string{"host"}},
		{"host address on a bridge", addr("10.1.0.1"), "host.example", []string{"host"}},
		{"service", class(chrony), "host.example", []string{"host"}},
		{"engine", class(docker), "host.example", []string{"host"}},
		{"container", addr("10.1.0.5"), "host.example", nil},
		{"unknown interface", addr("10.3.0.5"), "host.example", nil},

		// Cgroups: that service's port, and the ports of cgroups below.
		{"the service", class(chrony), "a.ntp.example", []string{"chrony"}},
		{"another service", class(foo), "a.ntp.example", nil},
		{"engine", class(docker), "a.ntp.example", nil},
		{"host main port", addr("127.0.0.1"), "a.ntp.example", nil},
		{"container", addr("10.1.0.5"), "a.ntp.example", nil},
		{"below the slice", class(chrony), "slice.example", []string{"slice"}},
		{"another service below the slice", class(foo), "slice.example", []string{"slice"}},
		{"engine below the slice", class(docker), "slice.example", []string{"slice"}},
		{"outside the slice", class(kube), "slice.example", nil},
		{"a slice whose name starts alike", class(lookalike), "slice.example", nil},
		{"host main port", addr("127.0.0.1"), "slice.example", nil},

		// A rule of containers and a service, and the host's, on one zone.
		{"container", addr("10.2.0.5"), "x.both.example", []string{"mixed"}},
		{"the service", class(chrony), "x.both.example", []string{"host", "mixed"}},
		{"another service", class(foo), "x.both.example", []string{"host"}},
		{"host", addr("127.0.0.1"), "x.both.example", []string{"host"}},

		// Names no rule of the asker allows, or no rule at all.
		{"container", addr("10.1.0.5"), "evil.example", nil},
		{"host", addr("127.0.0.1"), "evil.example", nil},
		{"engine", class(docker), "everyone.example", nil}, // "*." is not the zone itself
		{"service", class(chrony), "ntp.example", nil},
		{"bad characters", addr("10.2.0.5"), "ctr.example\\000", nil},
	}
	for _, tt := range tests {
		lookups = 0
		got := p.rulesFor(tt.a, tt.name)
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s (%v, class %v) asking for %q: rules %q, want %q", tt.who, tt.a.addr, tt.a.class, tt.name, got, tt.want)
		}
		if lookups > 1 {
			t.Errorf("%s asking for %q: %d client lookups, want at most 1", tt.who, tt.name, lookups)
		}
		if tt.a.class != nil && lookups != 0 {
			t.Errorf("%s asking for %q on a class port: the client address was looked up", tt.who, tt.name)
		}
		// The fast path's form appends to a buffer.
		buf := append(make([]string, 0, 4), "stale")
		if got := p.appendRules(buf[:0], tt.a, tt.name); !slices.Equal(got, tt.want) {
			t.Errorf("%s asking for %q: appendRules %q, want %q", tt.who, tt.name, got, tt.want)
		}
	}
	if got := p.everyones("a.everyone.example"); got != nil {
		t.Errorf("everyones with rules per source = %q, want nil (no uniform fast path)", got)
	}
}

// Without a route lookup, an address that is not loopback is a container
// behind no known interface: its source and the containers' rules apply.
func TestPolicyWithoutClients(t *testing.T) {
	p := newPolicy(policyRules(), nil)
	for _, tt := range []struct {
		addr, name string
		want       []string
	}{
		{"10.1.0.5", "shared.example", []string{"src"}},
		{"10.1.0.5", "ctr.example", []string{"ctr"}},
		{"172.17.0.2", "lab.example", nil},
		{"192.0.2.1", "host.example", nil},
		{"127.0.0.1", "host.example", []string{"host"}},
	} {
		if got := p.rulesFor(asker{addr: netip.MustParseAddr(tt.addr)}, tt.name); !slices.Equal(got, tt.want) {
			t.Errorf("%s asking for %q: rules %q, want %q", tt.addr, tt.name, got, tt.want)
		}
	}
}

// When every rule with names applies to everyone, who asks changes
// nothing: no client is looked up, and the cache's fast path answers
// everyone with everyones.
func TestPolicyUniform(t *testing.T) {
	rules := []config.Rule{
		{Name: config.RuleAllow, From: config.Everyone, Domains: []string{"*.cognitive.microsoft.com"}},
		{Name: "more", From: config.Everyone, Domains: []string{"a.example", "*.cognitive.microsoft.com"}},
		{Name: "cidrs", From: config.From{Host: true}, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}},
	}
	p := newPolicy(rules, func(a netip.Addr) Client {
		t.Errorf("uniform rules: client %v looked up", a)
		return Client{}
	})
	if !p.uniform {
		t.Fatal("rules for everyone: not uniform")
	}
	for _, tt := range []struct {
		name string
		want []string
	}{
		{"x.cognitive.microsoft.com", []string{"allow", "more"}},
		{"A.Example.", []string{"more"}},
		{"b.example", nil},
		{"cognitive.microsoft.com", nil},
	} {
		if got := p.everyones(tt.name); !slices.Equal(got, tt.want) {
			t.Errorf("everyones(%q) = %q, want %q", tt.name, got, tt.want)
		}
		for _, a := range []asker{
			{addr: netip.MustParseAddr("10.2.0.5")},
			{addr: netip.MustParseAddr("127.0.0.1")},
			{addr: netip.MustParseAddr("10.2.0.5"), class: &config.DNSClass{Cgroup: "/system.slice/chrony.service", Port: 10054}},
		} {
			if got := p.rulesFor(a, tt.name); !slices.Equal(got, tt.want) {
				t.Errorf("%v asking for %q: rules %q, want %q", a.addr, tt.name, got, tt.want)
			}
		}
	}
	// One rule of some sources only ends the fast path.
	q := newPolicy(append(rules, config.Rule{Name: "lab", From: config.From{Sources: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}}, Domains: []string{"lab.example"}}), nil)
	if q.uniform || q.everyones("x.cognitive.microsoft.com") != nil {
		t.Errorf("a rule of 10.1.0.0/24: uniform %v, everyones %q; want false, nil", q.uniform, q.everyones("x.cognitive.microsoft.com"))
	}
}

// allowed tells whether some rule allows a name, whoever asks, and by
// which pattern: the first such rule's.
func TestPolicyAllowed(t *testing.T) {
	p := newPolicy(policyRules(), nil)
	for _, tt := range []struct{ name, rule, pattern string }{
		{"a.ntp.example", "chrony", "*.ntp.example"},
		{"Shared.Example.", "lab", "shared.example"},
		{"x.both.example", "host", "*.both.example"},
		{"a.b.everyone.example", "allow", "*.everyone.example"},
		{"evil.example", "", ""},
		{"ntp.example", "", ""},
	} {
		rule, pattern, ok := p.allowed(tt.name)
		if rule != tt.rule || pattern != tt.pattern || ok != (tt.rule != "") {
			t.Errorf("allowed(%q) = %q, %q, %v; want %q, %q, %v", tt.name, rule, pattern, ok, tt.rule, tt.pattern, tt.rule != "")
		}
	}
}
