package rules

import (
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/egressd/egressd/config/configtest"
)

// rulesYAML has the flat "allow" rule and rules of every kind of from: a
// container interface pattern and a source prefix, the host, a service
// and the slice above it, and all containers.
const rulesYAML = `
allow:
  domains: ["*.cognitive.microsoft.com"]
  names: []
  rules:
    - name: lab
      from: ["br-lab*", "10.1.0.0/24"]
      names: ["time.example.org", "*.lab.example.org"]
      cidrs: ["203.0.113.0/24", "2001:db8:7::/48"]
      ports: ["123/udp", 443]
    - name: updates
      from: [host]
      names: [deb.debian.org]
      ports: [80, "8000-8100/tcp"]
    - name: slice
      from: [/system.slice]
      names: [slice.example.org]
      ports: [443]
    - name: chrony
      from: [chrony.service]
      names: ["*.pool.ntp.org"]
      ports: ["123/udp"]
    - name: kube
      from: [containers]
      cidrs: ["10.96.0.0/12"]
      ports: ["53/udp", "53/tcp"]
`

var (
	chronyCgroup = Cgroup{Path: "/system.slice/chrony.service", Level: 2, ID: 77}
	sliceCgroup  = Cgroup{Path: "/system.slice", Level: 1, ID: 7}
	dockerCgroup = Cgroup{Path: "/system.slice/docker.service", Level: 2, ID: 42}
)

// rulesHost is a host on which every cgroup of rulesYAML exists.
func rulesHost() Host {
	return Host{
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")},
		Cgroup:    &Cgroup{Path: "/system.slice/egressd.service", Level: 2, ID: 4242},
		Engines:   []Cgroup{dockerCgroup},
		Cgroups:   map[string]Cgroup{chronyCgroup.Path: chronyCgroup, sliceCgroup.Path: sliceCgroup, dockerCgroup.Path: dockerCgroup},
	}
}

// The rendered ruleset of rulesYAML is what testdata/rules.nft holds (go
// test ./rules -run Golden -update rewrites it, as TestGoldenRulesets).
func TestGoldenRulesetRules(t *testing.T) {
	checkGolden(t, filepath.Join("testdata", "rules.nft"), BuildFor(configtest.Load(t, rulesYAML), rulesHost()).Text())
}

// Each rule with names has sets of its own, with timeouts; a rule of
// cidrs alone has none.
func TestRuleSets(t *testing.T) {
	rs := BuildFor(configtest.Load(t, rulesYAML), rulesHost())
	var got []string
	for _, s := range rs.Sets {
		got = append(got, s.Name)
		if strings.HasSuffix(s.Name, "4") || strings.HasSuffix(s.Name, "6") {
			want := IPv4Addr
			if strings.HasSuffix(s.Name, "6") {
				want = IPv6Addr
			}
			if !s.Timeout || s.Type != want || s.Rule != strings.TrimRight(s.Name, "46") {
				t.Errorf("set %s: timeout %v, type %v, rule %q; want a timeout, type %v, rule %q", s.Name, s.Timeout, s.Type, s.Rule, want, strings.TrimRight(s.Name, "46"))
			}
		}
	}
	want := []string{"allow4", "allow6", SetPorts, "lab4", "lab6", "updates4", "updates6", "slice4", "slice6", "chrony4", "chrony6"}
	if !slices.Equal(got, want) {
		t.Errorf("sets %q, want %q", got, want)
	}
}

// Each rule's chain opens its names' sets and its cidrs on its ports and
// protocols, and nothing else; it is entered only for the sources the
// rule applies to.
func TestRuleChains(t *testing.T) {
	rs := BuildFor(configtest.Load(t, rulesYAML), rulesHost())
	for chain, want := range map[string][]string{
		"rule_lab": {
			"ip daddr @lab4 udp dport 123 accept",
			"ip6 daddr @lab6 udp dport 123 accept",
			"ip daddr 203.0.113.0/24 udp dport 123 accept",
			"ip6 daddr 2001:db8:7::/48 udp dport 123 accept",
			"ip daddr @lab4 tcp dport 443 accept",
			"ip6 daddr @lab6 tcp dport 443 accept",
			"ip daddr 203.0.113.0/24 tcp dport 443 accept",
			"ip6 daddr 2001:db8:7::/48 tcp dport 443 accept",
		},
		"rule_updates": {
			"ip daddr @updates4 tcp dport 80 accept",
			"ip6 daddr @updates6 tcp dport 80 accept",
			"ip daddr @updates4 tcp dport 8000-8100 accept",
			"ip6 daddr @updates6 tcp dport 8000-8100 accept",
		},
		"rule_slice": {
			"ip daddr @slice4 tcp dport 443 accept",
			"ip6 daddr @slice6 tcp dport 443 accept",
		},
		"rule_chrony": {
			"ip daddr @chrony4 udp dport 123 accept",
			"ip6 daddr @chrony6 udp dport 123 accept",
		},
		"rule_kube": {
			"ip daddr 10.96.0.0/12 udp dport 53 accept",
			"ip daddr 10.96.0.0/12 tcp dport 53 accept",
		},
		// Forwarded traffic: the rules of interfaces, sources and all
		// containers, never those of the host or its services.
		"forward": {
			"ct state established,related accept",
			`oifname "docker0" accept`,
			`oifname "br-*" accept`,
			`iifname "br-lab*" ct state new jump rule_lab`,
			"ip saddr 10.1.0.0/24 ct state new jump rule_lab",
			"ct state new jump rule_kube",
			"jump egress",
		},
		// The flat "allow" rule stays egress's own, for everyone.
		"egress": {
			`tcp dport 853 log prefix "egressd-dot" group 1055 reject with tcp reset`,
			"ip daddr @allow4 tcp dport @ports accept",
			"ip6 daddr @allow6 tcp dport @ports accept",
			`meta l4proto tcp log prefix "egressd-blocked" group 1055 reject with tcp reset`,
			`log prefix "egressd-blocked" group 1055 reject with icmpx admin-prohibited`,
		},
	} {
		if got := chainText(rs, chain); !slices.Equal(got, want) {
			t.Errorf("chain %s:\n%s\nwant\n%s", chain, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	// The host: its rules for all of it, its services' by cgroup, just
	// before egress; never the containers' rules.
	out := chainText(rs, "output")
	wantTail := []string{
		"ct state new jump rule_updates",
		`socket cgroupv2 level 1 "/system.slice" ct state new jump rule_slice`,
		`socket cgroupv2 level 2 "/system.slice/chrony.service" ct state new jump rule_chrony`,
		"jump egress",
	}
	if len(out) < len(wantTail) || !slices.Equal(out[len(out)-len(wantTail):], wantTail) {
		t.Errorf("output ends\n%s\nwant\n%s", strings.Join(out, "\n"), strings.Join(wantTail, "\n"))
	}
	for _, r := range out {
		if strings.Contains(r, "rule_lab") || strings.Contains(r, "rule_kube") {
			t.Errorf("output enters a containers' rule: %s", r)
		}
	}
	// Every rule chain is entered from somewhere, and only by new
	// connections.
	for _, name := range []string{"rule_lab", "rule_updates", "rule_slice", "rule_chrony", "rule_kube"} {
		entered := false
		for _, c := range rs.Chains {
			for _, r := range c.Rules {
				if txt := r.Text(); strings.HasSuffix(txt, "jump "+name) {
					entered = true
					if !strings.Contains(txt, "ct state new") {
						t.Errorf("chain %s enters %s without ct state new: %s", c.Name, name, txt)
					}
				}
			}
		}
		if !entered {
			t.Errorf("no rule jumps to %s", name)
		}
	}
}

// The DNS of each host service goes to its own proxy port, a service's
// before the slice above it (whose redirect would match the service's
// sockets too), the engine's among them; the rest of the host's to the
// main port.
func TestRuleDNSClasses(t *testing.T) {
	rs := BuildFor(configtest.Load(t, rulesYAML), rulesHost())
	want := []string{
		`socket cgroupv2 level 2 "/system.slice/chrony.service" udp dport 53 redirect to :10055`,
		`socket cgroupv2 level 2 "/system.slice/chrony.service" tcp dport 53 redirect to :10055`,
		`socket cgroupv2 level 2 "/system.slice/docker.service" udp dport 53 redirect to :10056`,
		`socket cgroupv2 level 2 "/system.slice/docker.service" tcp dport 53 redirect to :10056`,
		`socket cgroupv2 level 1 "/system.slice" udp dport 53 redirect to :10054`,
		`socket cgroupv2 level 1 "/system.slice" tcp dport 53 redirect to :10054`,
		"udp dport 53 redirect to :10053",
		"tcp dport 53 redirect to :10053",
	}
	got := chainText(rs, "dns_output")
	if len(got) < len(want) || !slices.Equal(got[len(got)-len(want):], want) {
		t.Errorf("dns_output ends\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// A service that is not running has neither a jump nor a DNS redirect
// (they are added when its cgroup appears); the others keep theirs.
func TestRuleCgroupMissing(t *testing.T) {
	host := rulesHost()
	delete(host.Cgroups, chronyCgroup.Path)
	rs := BuildFor(configtest.Load(t, rulesYAML), host)
	for _, chain := range []string{"output", "dns_output"} {
		got := strings.Join(chainText(rs, chain), "\n")
		if strings.Contains(got, "chrony.service") {
			t.Errorf("chain %s matches a cgroup that does not exist:\n%s", chain, got)
		}
		if !strings.Contains(got, `socket cgroupv2 level 1 "/system.slice"`) {
			t.Errorf("chain %s lost the slice:\n%s", chain, got)
		}
	}
	if got := chainText(rs, "rule_chrony"); len(got) != 2 {
		t.Errorf("rule_chrony: %q, want its two rules", got)
	}
}

// With the host not filtered, rules apply to forwarded traffic only, and
// the engines' DNS goes to their class port so that the proxy answers
// them by the containers' rules.
func TestRulesHostNotFiltered(t *testing.T) {
	cfg := configtest.Load(t, `
firewall:
  host: false
allow:
  rules:
    - {name: lab, from: [br-lab], names: [a.example.org], ports: [443]}
    - {name: net, from: ["fd00:1::/64"], names: [b.example.org], ports: ["8443/tcp"]}
`)
	rs := BuildFor(cfg, Host{Engines: []Cgroup{dockerCgroup}, Cgroups: map[string]Cgroup{dockerCgroup.Path: dockerCgroup}})
	if got := chainText(rs, "output"); got != nil {
		t.Errorf("chain output exists: %q", got)
	}
	for chain, want := range map[string][]string{
		"dns_output": {
			`socket cgroupv2 level 2 "/system.slice/docker.service" udp dport 53 redirect to :10054`,
			`socket cgroupv2 level 2 "/system.slice/docker.service" tcp dport 53 redirect to :10054`,
		},
		"forward": {
			"ct state established,related accept",
			`oifname "docker0" accept`,
			`oifname "br-*" accept`,
			`iifname "br-lab" ct state new jump rule_lab`,
			"ip6 saddr fd00:1::/64 ct state new jump rule_net",
			"jump egress",
		},
		"rule_net": {
			"ip daddr @net4 tcp dport 8443 accept",
			"ip6 daddr @net6 tcp dport 8443 accept",
		},
	} {
		if got := chainText(rs, chain); !slices.Equal(got, want) {
			t.Errorf("chain %s:\n%s\nwant\n%s", chain, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	// No flat rule: no allow sets and no egress rule for them.
	for _, s := range rs.Sets {
		if s.Rule == "allow" || s.Name == SetPorts {
			t.Errorf("set %s without the rule allow", s.Name)
		}
	}
	for _, r := range chainText(rs, "egress") {
		if strings.Contains(r, "@allow") {
			t.Errorf("egress without the rule allow: %s", r)
		}
	}
}

// The output and forward hooks accept the packets of established flows
// first, and egress, which decides about new flows, has no such rule.
// That is the same verdict as accepting them in egress only because
// output and forward are the only chains that jump to egress, and every
// other rule of theirs accepts, jumps for new flows only, or is the final
// jump to egress: a rule that could drop or reject an established packet,
// or another way into egress, must fail this test.
func TestEstablishedFirstChangesNoVerdict(t *testing.T) {
	for name, rs := range map[string]*Ruleset{
		"default": Build(configtest.Load(t, "")),
		"audit":   Build(configtest.Load(t, "firewall:\n  mode: audit\n")),
		"drop":    Build(configtest.Load(t, "firewall:\n  action: drop\n  unfiltered: [wg0]\n")),
		"rules":   BuildFor(configtest.Load(t, rulesYAML), rulesHost()),
	} {
		for _, c := range rs.Chains {
			if c.Name == "output" || c.Name == "forward" {
				continue
			}
			for _, r := range c.Rules {
				if txt := r.Text(); strings.HasSuffix(txt, "jump egress") || strings.HasSuffix(txt, "goto egress") {
					t.Errorf("%s: chain %s enters egress: %q", name, c.Name, txt)
				}
			}
		}
		for _, chain := range []string{"output", "forward"} {
			got := chainText(rs, chain)
			if len(got) == 0 || got[0] != "ct state established,related accept" {
				t.Errorf("%s: chain %s does not accept established flows first:\n%s", name, chain, strings.Join(got, "\n"))
				continue
			}
			for i, r := range got[1:] {
				switch {
				case strings.HasSuffix(r, " accept"), strings.Contains(r, "ct state new jump "):
				case r == "jump egress" && i == len(got)-2:
				default:
					t.Errorf("%s: chain %s: %q could decide about an established packet before egress", name, chain, r)
				}
			}
		}
	}
}
