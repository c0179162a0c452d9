package config

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/egressd/egressd/ifname"
)

// tcp and udp are a rule's port (range) of that protocol.
func tcp(lo, hi uint16) RulePort { return RulePort{ProtoTCP, PortRange{lo, hi}} }
func udp(lo, hi uint16) RulePort { return RulePort{ProtoUDP, PortRange{lo, hi}} }

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// ruleText shows a rule for failure messages.
func ruleText(r Rule) string {
	return fmt.Sprintf("{Name:%q Origin:%q From:%+v Domains:%q Pinned:%q Ports:%v CIDRs:%v Static:%v}",
		r.Name, r.Origin, r.From, r.Domains, r.Pinned, r.Ports, r.CIDRs, r.Static)
}

func rulesText(rs []Rule) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString("\n\t" + ruleText(r))
	}
	return b.String()
}

// normalized returns rules with empty lists as nil, so that DeepEqual
// compares what they hold.
func normalized(rs []Rule) []Rule {
	out := slices.Clone(rs)
	for i := range out {
		r := &out[i]
		r.From.Interfaces = nilIfEmpty(r.From.Interfaces)
		r.From.Sources = nilIfEmpty(r.From.Sources)
		r.From.Cgroups = nilIfEmpty(r.From.Cgroups)
		r.Domains, r.Pinned = nilIfEmpty(r.Domains), nilIfEmpty(r.Pinned)
		r.Ports, r.CIDRs, r.Static = nilIfEmpty(r.Ports), nilIfEmpty(r.CIDRs), nilIfEmpty(r.Static)
	}
	return out
}

func nilIfEmpty[T any](s []T) []T {
	if len(s) == 0 {
		return nil
	}
	return s
}

// The default's metering names, the "allow" rule of default.yaml.
var defaultDomains = []string{"*.cognitive.microsoft.com", "*.cognitiveservices.azure.com", "translatoronprem.blob.core.windows.net"}

// Config files parse into exactly these rules, in order: the flat keys'
// "allow", the included profiles', then allow.rules.
func TestRules(t *testing.T) {
	metering := Rule{Name: "metering", Origin: "profile azure-ai-containers", From: From{Containers: true},
		Domains: defaultDomains, Ports: []RulePort{tcp(443, 443)}}
	mcr := Rule{Name: "mcr", Origin: "profile azure-ai-containers",
		From:    From{Cgroups: []string{"/system.slice/docker.service", "/system.slice/containerd.service"}},
		Domains: []string{"mcr.microsoft.com", "*.data.mcr.microsoft.com"}, Ports: []RulePort{tcp(443, 443)}}
	ntp := Rule{Name: "ntp", Origin: "profile ntp", From: From{Host: true},
		Domains: []string{"time.windows.com", "*.pool.ntp.org"}, Ports: []RulePort{udp(123, 123)}}
	debian := Rule{Name: "debian_updates", Origin: "profile debian-updates", From: From{Host: true},
		Domains: []string{"deb.debian.org", "security.debian.org"}, Ports: []RulePort{tcp(80, 80), tcp(443, 443)}}
	tests := []struct {
		name, yaml string
		env        []string
		want       []Rule
	}{
		{
			name: "default: the flat keys are the rule allow, for everyone, on TCP",
			want: []Rule{{Name: RuleAllow, Origin: "allow", From: Everyone, Domains: defaultDomains,
				Pinned: []string{"translatoronprem.blob.core.windows.net"}, Ports: []RulePort{tcp(443, 443)}}},
		},
		{
			name: "flat keys with ports and cidrs: still one rule allow",
			yaml: `
allow:
  domains: ["*.example.com"]
  names: []
  ports: [443, 8443]
  cidrs: ["203.0.113.0/24 udp 53"]
`,
			want: []Rule{{Name: RuleAllow, Origin: "allow", From: Everyone, Domains: []string{"*.example.com"},
				Ports:  []RulePort{tcp(443, 443), tcp(8443, 8443)},
				Static: []Static{{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Proto: ProtoUDP, Ports: []PortRange{{53, 53}}}}}},
		},
		{
			name: "flat cidrs alone make the rule allow",
			yaml: "allow:\n  domains: []\n  names: []\n  cidrs: [\"198.51.100.0/24\"]\n",
			want: []Rule{{Name: RuleAllow, Origin: "allow", From: Everyone, Ports: []RulePort{tcp(443, 443)},
				Static: []Static{{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Proto: ProtoTCP}}}},
		},
		{
			name: "rules: every kind of from, ports with protocols and ranges, cidrs; the default names are dropped",
			yaml: `
allow:
  rules:
    - name: translator
      from: [br-translator, docker0, br-lab.100, "10.1.0.0/24", "fd00:1::/64", "192.0.2.7"]
      names: ["translatoronprem.blob.core.windows.net", "*.example.com"]
      cidrs: ["203.0.113.0/24", "2001:db8::1"]
      ports: [443, "123/udp", "8000-8100/tcp", "9000-9010/udp", "8443/tcp"]
    - name: chrony
      from: [host, chrony.service, /system.slice/foo.service, containers]
      names: ["*.pool.ntp.org"]
      ports: ["123/udp"]
    - name: lab_2
      cidrs: ["10.20.0.0/16"]
      ports: [22]
`,
			want: []Rule{
				{Name: "translator", Origin: "allow.rules[0]",
					From: From{Interfaces: []ifname.Pattern{"br-translator", "docker0", "br-lab.100"},
						Sources: prefixes("10.1.0.0/24", "fd00:1::/64", "192.0.2.7/32")},
					Domains: []string{"translatoronprem.blob.core.windows.net", "*.example.com"},
					Ports:   []RulePort{tcp(443, 443), udp(123, 123), tcp(8000, 8100), udp(9000, 9010), tcp(8443, 8443)},
					CIDRs:   prefixes("203.0.113.0/24", "2001:db8::1/128")},
				{Name: "chrony", Origin: "allow.rules[1]",
					From:    From{Host: true, Containers: true, Cgroups: []string{"/system.slice/chrony.service", "/system.slice/foo.service"}},
					Domains: []string{"*.pool.ntp.org"}, Ports: []RulePort{udp(123, 123)}},
				{Name: "lab_2", Origin: "allow.rules[2]", From: Everyone, Ports: []RulePort{tcp(22, 22)},
					CIDRs: prefixes("10.20.0.0/16")},
			},
		},
		{
			name: "include azure-ai-containers: services become cgroups in system.slice",
			yaml: "allow:\n  include: [azure-ai-containers]\n",
			want: []Rule{metering, mcr},
		},
		{
			name: "include ntp",
			yaml: "allow:\n  include: [ntp]\n",
			want: []Rule{ntp},
		},
		{
			name: "include debian-updates",
			yaml: "allow:\n  include: [debian-updates]\n",
			want: []Rule{debian},
		},
		{
			name: "include from the environment drops the default names too",
			env:  []string{"EGRESSD_ALLOW_INCLUDE=ntp, debian-updates"},
			want: []Rule{ntp, debian},
		},
		{
			name: "domains kept when set along with include and rules: allow, profiles, rules in that order",
			yaml: `
allow:
  domains: ["*.example.com"]
  names: []
  include: [ntp]
  rules:
    - name: web
      from: [br-web]
      names: ["example.org"]
      ports: [80]
`,
			want: []Rule{
				{Name: RuleAllow, Origin: "allow", From: Everyone, Domains: []string{"*.example.com"}, Ports: []RulePort{tcp(443, 443)}},
				ntp,
				{Name: "web", Origin: "allow.rules[0]", From: From{Interfaces: []ifname.Pattern{"br-web"}},
					Domains: []string{"example.org"}, Ports: []RulePort{tcp(80, 80)}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.yaml, tt.env...)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(normalized(c.Rules), normalized(tt.want)) {
				t.Errorf("rules:%s\nwant:%s", rulesText(c.Rules), rulesText(tt.want))
			}
		})
	}
}

// A configuration that writes rules of its own and not allow.domains has
// no rule "allow": the default's metering names are not open to everyone.
func TestRulesDropDefaultNames(t *testing.T) {
	for _, tt := range []struct {
		name, yaml string
		env        []string
	}{
		{"rules", "allow:\n  rules: [{name: web, from: [containers], names: [example.org], ports: [443]}]\n", nil},
		{"include", "allow:\n  include: [debian-updates]\n", nil},
		{"rules from the environment", "", []string{"EGRESSD_ALLOW_INCLUDE=ntp"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.yaml, tt.env...)
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Allow.Domains) != 0 || len(c.Allow.Names) != 0 {
				t.Errorf("allow.domains = %q, allow.names = %q; want both empty", c.Allow.Domains, c.Allow.Names)
			}
			if slices.Contains(RuleNames(c.Rules), RuleAllow) {
				t.Errorf("rule %q still there:%s", RuleAllow, rulesText(c.Rules))
			}
		})
	}
}

func TestRulesInvalid(t *testing.T) {
	rule := func(body string) string { return "allow:\n  rules:\n    - " + body + "\n" }
	tests := []struct {
		name, yaml string
		env        []string
		want       string
	}{
		{"not a map", "allow:\n  rules: [web]\n", nil,
			"allow.rules[0]: web must be a map with the keys name, from, names, cidrs, ports"},
		{"bad name", rule(`{name: Web-1, names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].name: "Web-1" must be lower-case letters, digits and "_", starting with a letter, at most 24 characters`},
		{"name starting with a digit", rule(`{name: 1web, names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].name: "1web" must be lower-case letters`},
		{"name too long", rule(`{name: abcdefghijklmnopqrstuvwxy, names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].name: "abcdefghijklmnopqrstuvwxy" must be lower-case letters`},
		{"no name", rule(`{names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].name: "<nil>" must be lower-case letters`},
		{"reserved name", rule(`{name: allow, names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].name: "allow" is the rule of allow.domains and allow.ports; choose another`},
		{"duplicate names", "allow:\n  rules:\n    - {name: web, from: [br-a], names: [a.example], ports: [443]}\n    - {name: web, from: [br-b], names: [b.example], ports: [443]}\n", nil,
			`allow.rules[1]: name "web" is taken by allow.rules[0]`},
		{"name of a profile's rule", "allow:\n  include: [ntp]\n  rules:\n    - {name: ntp, from: [containers], names: [example.org], ports: [443]}\n", nil,
			`allow.rules[0]: name "ntp" is taken by profile ntp`},
		{"unknown key", rule(`{name: web, names: [example.org], port: 443}`), nil,
			"allow.rules[0].port: unknown key (name, from, names, cidrs, ports)"},
		{"names without ports", rule(`{name: web, names: [example.org]}`), nil,
			`allow.rules[0].ports: empty: the rule's names and cidrs need ports (such as 443 or "123/udp")`},
		{"cidrs without ports", rule(`{name: web, cidrs: [10.0.0.0/8], ports: []}`), nil,
			`allow.rules[0].ports: empty: the rule's names and cidrs need ports`},
		{"neither names nor cidrs", rule(`{name: web, ports: [443]}`), nil,
			"allow.rules[0]: allows nothing: give it names or cidrs"},
		{"empty from", rule(`{name: web, from: [], names: [example.org], ports: [443]}`), nil,
			"allow.rules[0].from: empty: the rule would apply to no one"},
		{"bare 123 is ambiguous", rule(`{name: web, names: [example.org], ports: [443, 123]}`), nil,
			`allow.rules[0].ports[1]: "123" is ambiguous: NTP is UDP; write "123/udp" (or "123/tcp")`},
		{"bare 53 is ambiguous", rule(`{name: web, names: [example.org], ports: ["53"]}`), nil,
			`allow.rules[0].ports[0]: "53" is ambiguous: DNS is UDP; write "53/udp" (or "53/tcp")`},
		{"bad protocol", rule(`{name: web, names: [example.org], ports: ["443/sctp"]}`), nil,
			`allow.rules[0].ports[0]: "443/sctp": protocol "sctp" must be tcp or udp`},
		{"port out of range", rule(`{name: web, names: [example.org], ports: [70000]}`), nil,
			`allow.rules[0].ports[0]: "70000": port "70000" is not a TCP or UDP port (1-65535)`},
		{"backwards range", rule(`{name: web, names: [example.org], ports: ["9000-8000/tcp"]}`), nil,
			`allow.rules[0].ports[0]: "9000-8000/tcp": port range "9000-8000" must go from low to high`},
		{"duplicate port", rule(`{name: web, names: [example.org], ports: [443, "443/tcp"]}`), nil,
			`allow.rules[0].ports[1]: "443/tcp" repeats allow.rules[0].ports[0]`},
		{"bad name in names", rule(`{name: web, names: [example.org, "a..example"], ports: [443]}`), nil,
			`allow.rules[0].names[1]: "a..example" has an empty label`},
		{"duplicate names in names", rule(`{name: web, names: [example.org, Example.Org.], ports: [443]}`), nil,
			`allow.rules[0].names[1]: "example.org" repeats allow.rules[0].names[0]`},
		{"bad cidr", rule(`{name: web, cidrs: ["10.0.0.1/8"], ports: [443]}`), nil,
			`allow.rules[0].cidrs[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)`},
		{"host not filtered", "firewall:\n  host: false\n" + rule(`{name: web, from: [host], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "host" is not filtered: firewall.host is false`},
		{"service with the host not filtered", "firewall:\n  host: false\n" + rule(`{name: web, from: [containers, chrony.service], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[1]: "chrony.service" is a host service, and the host is not filtered: firewall.host is false`},
		{"cgroup path with the host not filtered", "firewall:\n  host: false\n" + rule(`{name: web, from: [/system.slice/x.service], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "/system.slice/x.service" is a host service, and the host is not filtered`},
		{"profile with the host not filtered", "firewall:\n  host: false\nallow:\n  include: [ntp]\n", nil,
			`allow.include[0]: profile ntp: rules[0].from[0]: "host" is not filtered: firewall.host is false`},
		{"bad cgroup path", rule(`{name: web, from: [/system.slice/../x], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "/system.slice/../x" is neither a systemd service ("chrony.service") nor a cgroup path`},
		{"interface not a container interface", rule(`{name: web, from: [eth0], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "eth0" matches no container interface: firewall.containers is [docker0 br-*]`},
		{"glob wider than the container pattern", rule(`{name: web, from: ["br*"], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "br*" matches no container interface`},
		{"bad interface pattern", rule(`{name: web, from: ["b*r"], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "b*r" is not containers, host, a container interface (pattern), a source prefix, a systemd service or a cgroup path`},
		{"bad IPv4 source", rule(`{name: web, from: [10.1.0.300], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "10.1.0.300" is not a source prefix`},
		{"VLAN interface outside the container patterns", rule(`{name: web, from: [eth0.100], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "eth0.100" matches no container interface`},
		{"source with host bits", rule(`{name: web, from: [10.1.0.1/24], names: [example.org], ports: [443]}`), nil,
			`allow.rules[0].from[0]: "10.1.0.1/24" is not a source prefix: has host bits set (did you mean 10.1.0.0/24?)`},
		{"unknown profile", "allow:\n  include: [ntp, nope]\n", nil,
			`allow.include[1]: "nope" is not a profile egressd ships (azure-ai-containers, debian-updates, ntp)`},
		{"profile name with a path", "allow:\n  include: [\"../config\"]\n", nil,
			`allow.include[0]: "../config" is not a profile egressd ships (azure-ai-containers, debian-updates, ntp)`},
		{"profile twice", "allow:\n  include: [ntp, ntp]\n", nil,
			`allow.include[1]: "ntp" repeats allow.include[0]`},
		{"unknown profile from the environment", "", []string{"EGRESSD_ALLOW_INCLUDE=ntpd"},
			`allow.include[0]: "ntpd" is not a profile egressd ships`},
		{"shadowed by an earlier rule", "allow:\n  rules:\n    - {name: all, from: [containers], names: [\"*.example.com\"], ports: [443, 80]}\n    - {name: api, from: [br-api], names: [api.example.com], ports: [443]}\n", nil,
			"allow.rules[1] (api): shadowed by allow.rules[0] (all): everything it allows, that rule allows already"},
		{"shadowed by a later rule", "allow:\n  rules:\n    - {name: api, from: [10.1.2.0/24], names: [a.b.example.com], ports: [\"8000-8010/tcp\"]}\n    - {name: all, from: [containers, host], names: [\"*.example.com\"], ports: [\"1-9000/tcp\"]}\n", nil,
			"allow.rules[0] (api): shadowed by allow.rules[1] (all)"},
		{"shadowed by the flat keys", "allow:\n  domains: [\"*.example.com\"]\n  names: []\n  rules:\n    - {name: api, names: [\"*.api.example.com\"], ports: [443]}\n", nil,
			"allow.rules[0] (api): shadowed by allow (allow)"},
		{"shadowed cidrs", "allow:\n  rules:\n    - {name: wide, cidrs: [10.0.0.0/8], ports: [\"1-65535/udp\"]}\n    - {name: narrow, from: [host], cidrs: [10.1.0.0/16], ports: [\"123/udp\"]}\n", nil,
			"allow.rules[1] (narrow): shadowed by allow.rules[0] (wide)"},
		{"shadowed, whatever the case of the zones", "allow:\n  rules:\n    - {name: a, names: [\"*.Example.COM\"], ports: [443]}\n    - {name: b, names: [\"*.Api.Example.com.\"], ports: [443]}\n", nil,
			"allow.rules[1] (b): shadowed by allow.rules[0] (a)"},
		{"the same rule twice", "allow:\n  rules:\n    - {name: one, names: [example.org], ports: [443]}\n    - {name: two, names: [example.org], ports: [443]}\n", nil,
			"allow.rules[1] (two): shadowed by allow.rules[0] (one)"},
		{"shadowed profile rule", "allow:\n  include: [ntp]\n  rules:\n    - {name: time, names: [time.windows.com, \"*.ntp.org\"], ports: [\"123/udp\"]}\n", nil,
			"profile ntp (ntp): shadowed by allow.rules[0] (time)"},
		{"no rule at all", "allow:\n  domains: []\n  names: []\n", nil,
			"allow: no rule allows anything (allow.domains, allow.cidrs, allow.include and allow.rules are all empty)"},
		{"listen port leaves no room for the classes", "dns:\n  listen_port: 65534\n" + rule(`{name: chrony, from: [chrony.service], names: [example.org], ports: ["123/udp"]}`), nil,
			"dns.listen_port: 65534 leaves no room for the 2 ports above it that host services' DNS goes to"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.yaml, tt.env...)
			if err == nil {
				t.Fatalf("no error, want %q; rules:%s", tt.want, rulesText(c.Rules))
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

// Rules that only partly overlap are not shadowed: each adds something
// (the first rule adds a port where the second would cover it otherwise).
func TestRulesNotShadowed(t *testing.T) {
	for _, tt := range []struct{ name, rules string }{
		{"narrower from", "    - {name: a, from: [br-a], names: [\"*.example.com\"], ports: [443]}\n    - {name: b, from: [containers], names: [api.example.com], ports: [443]}\n"},
		{"other protocol", "    - {name: a, names: [\"*.example.com\"], ports: [\"1-65535/tcp\"]}\n    - {name: b, names: [api.example.com], ports: [\"443/udp\"]}\n"},
		{"wider port range", "    - {name: a, names: [\"*.example.com\"], ports: [\"8000-8010\"]}\n    - {name: b, names: [api.example.com], ports: [\"8000-8011/tcp\"]}\n"},
		{"the zone itself", "    - {name: a, names: [\"*.example.com\"], ports: [443]}\n    - {name: b, names: [example.com], ports: [443]}\n"},
		{"a wildcard is not covered by an exact name", "    - {name: a, names: [x.example.com], ports: [443, 80]}\n    - {name: b, names: [\"*.example.com\"], ports: [443]}\n"},
		{"wider cidr", "    - {name: a, cidrs: [10.1.0.0/16], ports: [443, 80]}\n    - {name: b, cidrs: [10.0.0.0/8], ports: [443]}\n"},
		{"another interface", "    - {name: a, from: [\"br-a*\"], names: [example.org], ports: [443]}\n    - {name: b, from: [br-b], names: [example.org], ports: [443]}\n"},
		{"a service is not the host", "    - {name: a, from: [chrony.service], names: [example.org], ports: [443, 80]}\n    - {name: b, from: [host], names: [example.org], ports: [443]}\n"},
		{"a source is not an interface", "    - {name: a, from: [\"br-*\"], names: [example.org], ports: [443]}\n    - {name: b, from: [10.1.0.0/24], names: [example.org], ports: [443]}\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, "allow:\n  rules:\n"+tt.rules)
			if err != nil {
				t.Fatal(err)
			}
			if got := RuleNames(c.Rules); !slices.Equal(got, []string{"a", "b"}) {
				t.Errorf("rules %q, want [a b]", got)
			}
		})
	}
}

func TestUniformAndDNSClasses(t *testing.T) {
	tests := []struct {
		name, yaml string
		uniform    bool
		want       []DNSClass
	}{
		{name: "default", uniform: true},
		{name: "rules without from apply to everyone", uniform: true,
			yaml: "allow:\n  rules: [{name: a, names: [example.org], ports: [443]}, {name: b, from: [containers, host], names: [example.com], ports: [443]}]\n"},
		{name: "rules of containers and the host: the engines only",
			yaml: "allow:\n  rules: [{name: a, from: [containers], names: [example.org], ports: [443]}, {name: b, from: [host], names: [example.com], ports: [443]}]\n",
			want: []DNSClass{{Cgroup: "/system.slice/docker.service", Port: 10054, Engine: true}}},
		{name: "azure-ai-containers: docker is both a rule's and an engine",
			yaml: "allow:\n  include: [azure-ai-containers]\n",
			want: []DNSClass{{Cgroup: "/system.slice/docker.service", Port: 10054, Engine: true}, {Cgroup: "/system.slice/containerd.service", Port: 10055}}},
		{name: "ports: rules' cgroups in order, then engines, each once; deepest first",
			yaml: `
dns:
  listen_port: 5300
firewall:
  engine_cgroups: [/kubepods.slice, docker.service]
allow:
  rules:
    - {name: a, from: [chrony.service, /system.slice/foo.service], names: [example.org], ports: [443]}
    - {name: b, from: [containers, chrony.service, /user.slice], names: [example.com], ports: [443]}
`,
			want: []DNSClass{{Cgroup: "/system.slice/chrony.service", Port: 5301}, {Cgroup: "/system.slice/foo.service", Port: 5302},
				{Cgroup: "/system.slice/docker.service", Port: 5305, Engine: true}, {Cgroup: "/user.slice", Port: 5303}, {Cgroup: "/kubepods.slice", Port: 5304, Engine: true}}},
		// The ruleset redirects in this order, and a cgroup's redirect
		// matches the cgroups below it: a slice's must come after its
		// services', or it takes their DNS (and the engine's).
		{name: "a slice after the services in it",
			yaml: `
allow:
  rules:
    - {name: a, from: [/system.slice], names: [example.org], ports: [443]}
    - {name: b, from: [/system.slice/chrony.service], names: [example.com], ports: [443]}
`,
			want: []DNSClass{{Cgroup: "/system.slice/chrony.service", Port: 10055}, {Cgroup: "/system.slice/docker.service", Port: 10056, Engine: true},
				{Cgroup: "/system.slice", Port: 10054}}},
		{name: "the highest listen port that leaves room",
			yaml: "dns:\n  listen_port: 65533\nallow:\n  rules: [{name: a, from: [chrony.service], names: [example.org], ports: [\"123/udp\"]}]\n",
			want: []DNSClass{{Cgroup: "/system.slice/chrony.service", Port: 65534}, {Cgroup: "/system.slice/docker.service", Port: 65535, Engine: true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.yaml)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Uniform(); got != tt.uniform {
				t.Errorf("Uniform() = %v, want %v", got, tt.uniform)
			}
			if got := c.DNSClasses(); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("DNSClasses() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestRuleAllowsPort(t *testing.T) {
	r := Rule{Ports: []RulePort{tcp(443, 443), tcp(8000, 8100), udp(123, 123)}}
	for _, tt := range []struct {
		proto Proto
		port  uint16
		want  bool
	}{
		{ProtoTCP, 443, true},
		{ProtoTCP, 8000, true},
		{ProtoTCP, 8050, true},
		{ProtoTCP, 8100, true},
		{ProtoTCP, 7999, false},
		{ProtoTCP, 8101, false},
		{ProtoUDP, 123, true},
		{ProtoTCP, 123, false},
		{ProtoUDP, 443, false},
		{ProtoUDP, 8050, false},
		{ProtoTCP, 0, true}, // any port
		{ProtoUDP, 0, true},
	} {
		if got := r.AllowsPort(tt.proto, tt.port); got != tt.want {
			t.Errorf("AllowsPort(%s, %d) = %v, want %v", tt.proto, tt.port, got, tt.want)
		}
	}
	if tcpOnly := (Rule{Ports: []RulePort{tcp(443, 443)}}); tcpOnly.AllowsPort(ProtoUDP, 0) {
		t.Error("a TCP-only rule allows some UDP port")
	}
}

func TestFromString(t *testing.T) {
	for _, tt := range []struct {
		from From
		want string
	}{
		{Everyone, "containers,host"},
		{From{Containers: true}, "containers"},
		{From{Host: true}, "host"},
		{From{Containers: true, Host: true, Interfaces: []ifname.Pattern{"br-lab", "docker0"}, Sources: prefixes("10.1.0.0/24", "fd00::/64"),
			Cgroups: []string{"/system.slice/chrony.service", "/user.slice"}},
			"containers,host,br-lab,docker0,10.1.0.0/24,fd00::/64,/system.slice/chrony.service,/user.slice"},
		{From{}, ""},
	} {
		if got := tt.from.String(); got != tt.want {
			t.Errorf("%+v.String() = %q, want %q", tt.from, got, tt.want)
		}
	}
	// As parsed: services become their cgroups.
	c, err := load(t, "allow:\n  rules: [{name: a, from: [br-x, 10.9.0.0/16, chrony.service], names: [example.org], ports: [443]}]\n")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Rules[0].From.String(), "br-x,10.9.0.0/16,/system.slice/chrony.service"; got != want {
		t.Errorf("parsed from = %q, want %q", got, want)
	}
	if f := c.Rules[0].From; !f.Forwarded() || !f.HostSide() || f.Everyone() {
		t.Errorf("%v: Forwarded %v, HostSide %v, Everyone %v; want true, true, false", f, f.Forwarded(), f.HostSide(), f.Everyone())
	}
}

func TestProfiles(t *testing.T) {
	if got, want := Profiles(), []string{"azure-ai-containers", "debian-updates", "ntp"}; !slices.Equal(got, want) {
		t.Errorf("Profiles() = %q, want %q", got, want)
	}
	for _, name := range []string{"", "nope", "../default", "profiles/ntp", "NTP"} {
		if _, ok := Profile(name); ok {
			t.Errorf("Profile(%q) found", name)
		}
	}
}
