package rules

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressd/egressd/config/configtest"
)

func chainText(rs *Ruleset, name string) []string {
	for _, c := range rs.Chains {
		if c.Name == name {
			var out []string
			for _, r := range c.Rules {
				out = append(out, r.Text())
			}
			return out
		}
	}
	return nil
}

func TestBuild(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		chain string
		want  []string // rules that must be present, in this order
		never []string // substrings no rule of the chain may have
	}{
		{
			name:  "default egress rejects",
			chain: "egress",
			want: []string{
				`tcp dport 853 log prefix "egressd-dot" group 1055 reject with tcp reset`,
				"ip daddr @allow4 tcp dport @ports accept",
				"ip6 daddr @allow6 tcp dport @ports accept",
				`meta l4proto tcp log prefix "egressd-blocked" group 1055 reject with tcp reset`,
				`log prefix "egressd-blocked" group 1055 reject with icmpx admin-prohibited`,
			},
		},
		{
			name:  "drop action",
			yaml:  "firewall:\n  action: drop\n  nflog_group: 0\n",
			chain: "egress",
			want:  []string{"tcp dport 853 drop", "drop"},
			never: []string{"reject"},
		},
		{
			name:  "static cidrs with and without ports",
			yaml:  "allow:\n  cidrs: [\"203.0.113.0/24\", \"2001:db8::1 80,8443\"]\n",
			chain: "egress",
			want: []string{
				"ip daddr 203.0.113.0/24 tcp dport @ports accept",
				"ip6 daddr 2001:db8::1 tcp dport 80 accept",
				"ip6 daddr 2001:db8::1 tcp dport 8443 accept",
			},
		},
		{
			name:  "static cidrs with protocols, ranges and any port",
			yaml:  "allow:\n  cidrs: [\"10.244.0.0/16 any\", \"10.96.0.0/12 udp\", {cidr: 192.168.0.0/16, protocol: any, ports: [53, \"30000-32767\"]}, \"10.0.0.1 tcp 6443\"]\n",
			chain: "egress",
			want: []string{
				"ip daddr 10.244.0.0/16 accept",
				"ip daddr 10.96.0.0/12 meta l4proto udp accept",
				"ip daddr 192.168.0.0/16 tcp dport 53 accept",
				"ip daddr 192.168.0.0/16 tcp dport 30000-32767 accept",
				"ip daddr 192.168.0.0/16 udp dport 53 accept",
				"ip daddr 192.168.0.0/16 udp dport 30000-32767 accept",
				"ip daddr 10.0.0.1 tcp dport 6443 accept",
				`log prefix "egressd-blocked" group 1055 reject with icmpx admin-prohibited`,
			},
		},
		{
			name:  "forwarded traffic out of the host is filtered from any interface but the unfiltered",
			yaml:  "firewall:\n  containers: [docker0, \"br-*\", cni0]\n  unfiltered: [virbr0]\n",
			chain: "forward",
			want: []string{`iifname "virbr0" accept`, `oifname "virbr0" accept`,
				`oifname "docker0" accept`, `oifname "br-*" accept`, `oifname "cni0" accept`, "jump egress"},
			never: []string{"iifname \"docker0\""},
		},
		{
			name:  "container DNS is redirected",
			chain: "dns_prerouting",
			want:  []string{`iifname "docker0" jump dns_redirect`, `iifname "br-*" jump dns_redirect`},
		},
		{
			name:  "redirect to the proxy port, UDP and TCP",
			yaml:  "dns:\n  listen_port: 5300\n",
			chain: "dns_redirect",
			want: []string{"udp dport 53 dnat ip to 169.254.53.53:5300", "udp dport 53 dnat ip6 to [fd65:6772:6573::53]:5300",
				"tcp dport 53 dnat ip to 169.254.53.53:5300", "tcp dport 53 dnat ip6 to [fd65:6772:6573::53]:5300"},
		},
		{
			name:  "DNAT to the configured local addresses",
			yaml:  "dns:\n  local_ipv4: 169.254.99.1\n  local_ipv6: \"fd12:3456::1\"\n",
			chain: "dns_redirect",
			want: []string{"udp dport 53 dnat ip to 169.254.99.1:10053", "udp dport 53 dnat ip6 to [fd12:3456::1]:10053",
				"tcp dport 53 dnat ip to 169.254.99.1:10053", "tcp dport 53 dnat ip6 to [fd12:3456::1]:10053"},
		},
		{
			name:  "proxy is closed to the outside",
			chain: "dns_proxy_in",
			want:  []string{`iifname "lo" accept`, `iifname "docker0" accept`, `iifname "br-*" accept`, "drop"},
		},
		{
			name:  "host output: own queries, loopback, DHCP, ND, then egress",
			yaml:  "firewall:\n  mark: 0x42\ndns:\n  upstreams: [192.0.2.53, \"[2001:db8::53]:5353\"]\n",
			chain: "output",
			want: []string{"meta mark 0x00000042 ip daddr 192.0.2.53 udp dport 53 accept",
				"meta mark 0x00000042 ip daddr 192.0.2.53 tcp dport 53 accept",
				"meta mark 0x00000042 ip6 daddr 2001:db8::53 udp dport 5353 accept",
				"meta mark 0x00000042 ip6 daddr 2001:db8::53 tcp dport 5353 accept",
				`oifname "lo" accept`, "ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
				"ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
				"ip6 daddr fe80::/10 udp sport 546 udp dport 547 accept",
				"ip6 daddr ff00::/8 icmpv6 type nd-neighbor-solicit accept",
				"ip6 daddr fe80::/10 icmpv6 type nd-neighbor-solicit accept", "jump egress"},
		},
		{
			name:  "host DNS redirect exempts egressd's mark towards its upstreams only",
			yaml:  "dns:\n  upstreams: [192.0.2.53]\n",
			chain: "dns_output",
			want:  []string{"meta mark 0x00001e55 ip daddr 192.0.2.53 udp dport 53 return", "meta mark 0x00001e55 ip daddr 192.0.2.53 tcp dport 53 return", "udp dport 53 redirect to :10053", "tcp dport 53 redirect to :10053"},
		},
		{
			name:  "without upstreams nor engine zones nothing is exempt",
			yaml:  "dns:\n  engine_zones: []\n",
			chain: "output",
			want:  []string{`oifname "lo" accept`},
			never: []string{"mark"},
		},
		{
			name:  "without upstreams nor engine zones nothing escapes the host DNS redirect",
			yaml:  "dns:\n  engine_zones: []\n",
			chain: "dns_output",
			want:  []string{"udp dport 53 redirect to :10053", "tcp dport 53 redirect to :10053"},
			never: []string{"mark", "return"},
		},
		{
			name:  "engine zones: egressd's own DNS to the host's own addresses (the bridges' engines) is not redirected",
			yaml:  "dns:\n  upstreams: [192.0.2.53]\n  engine_zones: [dns.podman]\n",
			chain: "dns_output",
			want: []string{"meta mark 0x00001e55 ip daddr 192.0.2.53 udp dport 53 return", "meta mark 0x00001e55 ip daddr 192.0.2.53 tcp dport 53 return",
				"meta mark 0x00001e55 fib daddr type local udp dport 53 return", "meta mark 0x00001e55 fib daddr type local tcp dport 53 return",
				"udp dport 53 redirect to :10053", "tcp dport 53 redirect to :10053"},
		},
		{
			name:  "engine zones: egressd's own DNS to the host's own addresses is accepted, port 53 only",
			chain: "output",
			want: []string{"meta mark 0x00001e55 fib daddr type local udp dport 53 accept", "meta mark 0x00001e55 fib daddr type local tcp dport 53 accept",
				`oifname "lo" accept`, "fib daddr type local accept", "jump egress"},
		},
		{
			name:  "forged sources from container interfaces are dropped, logged",
			yaml:  "firewall:\n  antispoof: [\"vnet*\"]\n",
			chain: "antispoof",
			want: []string{"ip saddr 0.0.0.0 udp sport 68 udp dport 67 return", "ip6 saddr :: return",
				`iifname "docker0" jump spoofed`, `iifname "br-*" jump spoofed`, `iifname "vnet*" jump spoofed`},
		},
		{
			name:  "anti-spoofing on every interface",
			yaml:  "firewall:\n  antispoof: [\"*\"]\n",
			chain: "antispoof",
			want:  []string{`iifname "lo" return`, "jump spoofed"},
			never: []string{"docker0"},
		},
		{
			name: "the sources of rules are checked on every interface, each once",
			yaml: "allow:\n  rules:\n" +
				"    - {name: a, from: [\"10.1.0.0/24\", \"fd00:1::/64\"], names: [a.example.org], ports: [443]}\n" +
				"    - {name: b, from: [docker0, \"10.1.0.0/24\", \"192.0.2.7/32\"], names: [b.example.org], ports: [443]}\n",
			chain: "antispoof",
			want: []string{`iifname "docker0" jump spoofed`, `iifname "br-*" jump spoofed`, `iifname "lo" return`,
				"ip saddr 10.1.0.0/24 jump spoofed", "ip6 saddr fd00:1::/64 jump spoofed", "ip saddr 192.0.2.7 jump spoofed"},
		},
		{
			name:  "the spoofing check",
			chain: "spoofed",
			want:  []string{`fib saddr . iif oif missing log prefix "egressd-spoofed" group 1055 drop`},
		},
		{
			name:  "host not filtered",
			yaml:  "firewall:\n  host: false\n",
			chain: "output",
			want:  nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := Build(configtest.Load(t, tt.yaml))
			got := chainText(rs, tt.chain)
			if tt.want == nil && got != nil {
				t.Fatalf("chain %s exists: %v", tt.chain, got)
			}
			i := 0
			for _, r := range got {
				if i < len(tt.want) && r == tt.want[i] {
					i++
				}
				for _, n := range tt.never {
					if strings.Contains(r, n) {
						t.Errorf("rule %q contains %q", r, n)
					}
				}
			}
			if i < len(tt.want) {
				t.Errorf("chain %s lacks %q (in order); has:\n%s", tt.chain, tt.want[i], strings.Join(got, "\n"))
			}
		})
	}
}

func TestTextPorts(t *testing.T) {
	txt := Build(configtest.Load(t, "allow:\n  ports: [443, 8443]\n")).Text()
	if !strings.Contains(txt, "elements = { 443, 8443 }") {
		t.Errorf("ports set missing:\n%s", txt)
	}
	// The script replaces only egressd's table.
	if !strings.Contains(txt, "table inet egressd\ndelete table inet egressd\n") || strings.Contains(txt, "flush ruleset") {
		t.Errorf("script does not replace exactly table inet egressd:\n%s", txt)
	}
}

// Every statement renders netlink expressions; a set lookup refers to a
// declared set.
func TestExprsReferToDeclaredSets(t *testing.T) {
	rs := Build(configtest.Load(t, "allow:\n  cidrs: [\"203.0.113.0/24 80\"]\n"))
	sets := declared(rs)
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			if len(r.Exprs(sets)) == 0 {
				t.Errorf("rule %q has no expressions", r.Text())
			}
		}
	}
}

func TestBuildCgroupOwner(t *testing.T) {
	cfg := configtest.Load(t, "")
	cg := &Cgroup{Path: "/system.slice/egressd.service", Level: 2, ID: 4242}
	ups := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")}
	rs := BuildFor(cfg, Host{Upstreams: ups, Cgroup: cg})
	for chain, want := range map[string]string{
		"output":     `socket cgroupv2 level 2 "/system.slice/egressd.service" ip daddr 192.0.2.53 udp dport 53 accept`,
		"dns_output": `socket cgroupv2 level 2 "/system.slice/egressd.service" ip daddr 192.0.2.53 tcp dport 53 return`,
	} {
		got := chainText(rs, chain)
		if !slices.Contains(got, want) {
			t.Errorf("chain %s lacks %q:\n%s", chain, want, strings.Join(got, "\n"))
		}
		for _, r := range got {
			if strings.Contains(r, "mark") {
				t.Errorf("chain %s still trusts the mark: %s", chain, r)
			}
		}
	}
}

func TestBuildUnknownInterfaces(t *testing.T) {
	rs := BuildFor(configtest.Load(t, ""), Host{Unknown: []string{"podman0"}})
	for chain, want := range map[string]string{
		"dns_prerouting": `iifname "podman0" jump dns_redirect`,
		"dns_proxy_in":   `iifname "podman0" accept`,
		"antispoof":      `iifname "podman0" jump spoofed`,
	} {
		if got := chainText(rs, chain); !slices.Contains(got, want) {
			t.Errorf("chain %s lacks %q:\n%s", chain, want, strings.Join(got, "\n"))
		}
	}
}

func TestBuildOnLink(t *testing.T) {
	rs := BuildFor(configtest.Load(t, ""), Host{OnLink: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:1::/64")}})
	got := chainText(rs, "output")
	for _, want := range []string{
		"ip daddr 192.0.2.0/24 udp sport 68 udp dport 67 accept",
		"ip6 daddr 2001:db8:1::/64 icmpv6 type nd-neighbor-solicit accept",
		"ip6 daddr 2001:db8:1::/64 icmpv6 type nd-neighbor-advert accept",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, strings.Join(got, "\n"))
		}
	}
	if slices.Contains(got, "ip6 daddr 2001:db8:1::/64 icmpv6 type nd-router-solicit accept") {
		t.Errorf("router solicitations go to on-link unicast addresses")
	}
	for _, r := range got {
		if strings.HasPrefix(r, "udp sport") || strings.HasPrefix(r, "icmpv6 type") {
			t.Errorf("exemption without a destination: %s", r)
		}
	}
}

// The redirect runs just before kube-proxy's DNAT (dstnat, -100), so DNS
// to a service address ends at the proxy whatever order the kernel would
// give two chains at one priority; egressd's own queries to forwarded
// zones' servers are exempt like those to its upstreams.
func TestBuildRedirectBeforeKubeProxy(t *testing.T) {
	rs := BuildFor(configtest.Load(t, "dns:\n  upstreams: [192.0.2.53]\n  forward: [{zone: cluster.local, servers: [10.96.0.10, 192.0.2.53]}]\n"),
		Host{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")}})
	for _, c := range rs.Chains {
		if (c.Name == "dns_prerouting" || c.Name == "dns_output") && c.Hook.Priority != -101 {
			t.Errorf("chain %s at priority %d, want -101", c.Name, c.Hook.Priority)
		}
	}
	if !strings.Contains(rs.Text(), "type nat hook prerouting priority dstnat - 1;") {
		t.Errorf("print does not spell the priority as nft lists it")
	}
	got := chainText(rs, "dns_output")
	for _, want := range []string{"meta mark 0x00001e55 ip daddr 10.96.0.10 udp dport 53 return", "meta mark 0x00001e55 ip daddr 10.96.0.10 tcp dport 53 return"} {
		if !slices.Contains(got, want) {
			t.Errorf("dns_output lacks %q:\n%s", want, strings.Join(got, "\n"))
		}
	}
	if n := strings.Count(strings.Join(got, "\n"), "192.0.2.53 udp dport 53"); n != 1 {
		t.Errorf("a server that is both upstream and forward server is exempted %d times", n)
	}
}

// Audit mode: the same rules, every blocking verdict logged as would-block
// and let through; the proxy port stays closed to the outside.
func TestBuildAudit(t *testing.T) {
	enforce := Build(configtest.Load(t, ""))
	audit := Build(configtest.Load(t, "firewall:\n  mode: audit\n"))
	if len(enforce.Chains) != len(audit.Chains) {
		t.Fatalf("audit has %d chains, enforce %d", len(audit.Chains), len(enforce.Chains))
	}
	for _, want := range []struct{ chain, rule string }{
		{"egress", `tcp dport 853 log prefix "egressd-audit-dot" group 1055 accept`},
		{"egress", `log prefix "egressd-audit-blocked" group 1055 accept`},
		{"spoofed", `fib saddr . iif oif missing log prefix "egressd-audit-spoofed" group 1055 accept`},
		{"dns_proxy_in", "drop"},
	} {
		if got := chainText(audit, want.chain); !slices.Contains(got, want.rule) {
			t.Errorf("audit chain %s lacks %q:\n%s", want.chain, want.rule, strings.Join(got, "\n"))
		}
	}
	for _, c := range []string{"egress", "spoofed", "forward", "output"} {
		for _, r := range chainText(audit, c) {
			if strings.Contains(r, "reject") || strings.HasSuffix(r, "drop") {
				t.Errorf("audit chain %s still blocks: %s", c, r)
			}
		}
	}
}

// DNS of container engines' cgroups is redirected when the host is not
// filtered; with the host filtered, all host DNS is anyway.
func TestEngineCgroups(t *testing.T) {
	docker := Cgroup{Path: "/system.slice/docker.service", Level: 2, ID: 42}
	tests := []struct {
		yaml    string
		engines []Cgroup
		want    []string // chain dns_output; nil: no such chain
	}{
		{"firewall:\n  host: false\n", []Cgroup{docker}, []string{
			`socket cgroupv2 level 2 "/system.slice/docker.service" udp dport 53 redirect to :10053`,
			`socket cgroupv2 level 2 "/system.slice/docker.service" tcp dport 53 redirect to :10053`}},
		{"firewall:\n  host: false\n", nil, nil},
		{"", []Cgroup{docker}, []string{"udp dport 53 redirect to :10053", "tcp dport 53 redirect to :10053"}},
	}
	for _, tt := range tests {
		cfg := configtest.Load(t, tt.yaml)
		got := chainText(BuildFor(cfg, Host{Upstreams: cfg.DNS.UpstreamAddrs, Engines: tt.engines}), "dns_output")
		if tt.want == nil {
			if got != nil {
				t.Errorf("%q with %v: chain dns_output exists: %v", tt.yaml, tt.engines, got)
			}
			continue
		}
		if len(got) < len(tt.want) || !slices.Equal(got[len(got)-len(tt.want):], tt.want) {
			t.Errorf("%q with %v: dns_output ends\n%s\nwant\n%s", tt.yaml, tt.engines, strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
		}
	}
}
