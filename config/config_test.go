package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func load(t *testing.T, yaml string, env ...string) (*Config, error) {
	t.Helper()
	if yaml == "" {
		return Load("", env)
	}
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return Load(p, env)
}

func TestDefault(t *testing.T) {
	c, err := load(t, "")
	if err != nil {
		t.Fatalf("default config: %v", err)
	}
	if len(c.Allow.Domains) != 3 || c.Allow.Ports[0] != 443 || c.DNS.MinTTL != 120*time.Second {
		t.Errorf("unexpected default config: %+v", c)
	}
	if c.DNS.MaxTTL != 24*time.Hour || len(c.DNS.Exempt) != 0 {
		t.Errorf("dns.max_ttl = %v, dns.rebinding_exempt = %v; want 24h and none", c.DNS.MaxTTL, c.DNS.Exempt)
	}
	if c.Firewall.Mark != 0x1e55 {
		t.Errorf("mark = %#x", c.Firewall.Mark)
	}
}

func TestValid(t *testing.T) {
	c, err := load(t, `
allow:
  domains: ["*.example.com", "Exact.Example.Org."]
  ports: [443, 8443]
  names: ["exact.example.org"]
  cidrs: ["203.0.113.0/24", "2001:db8::1 80,22", "198.51.100.7"]
dns:
  upstreams: ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53"]
  min_ttl: 1s
  max_ttl: 1h
  grace: 2s
  rebinding_exempt: ["10.20.0.0/16", "fd00:1::/64"]
firewall:
  containers: ["docker0", "br-*"]
`, "EGRESSD_DNS_GRACE=5s", "EGRESSD_ALLOW_PORTS=443,9443", "EGRESSD_DNS_MAX_TTL=90m", "EGRESSD_DNS_REBINDING_EXEMPT=10.20.0.0/16, 192.168.7.9")
	if err != nil {
		t.Fatal(err)
	}
	if c.DNS.Grace != 5*time.Second {
		t.Errorf("env override of dns.grace: got %v", c.DNS.Grace)
	}
	if len(c.Allow.Ports) != 2 || c.Allow.Ports[1] != 9443 {
		t.Errorf("env override of allow.ports: got %v", c.Allow.Ports)
	}
	if c.DNS.MaxTTL != 90*time.Minute {
		t.Errorf("env override of dns.max_ttl: got %v", c.DNS.MaxTTL)
	}
	if len(c.DNS.Exempt) != 2 || c.DNS.Exempt[1].String() != "192.168.7.9/32" {
		t.Errorf("env override of dns.rebinding_exempt: got %v", c.DNS.Exempt)
	}
	if got := c.DNS.UpstreamAddrs[1].String(); got != "192.0.2.54:5353" {
		t.Errorf("upstream 1 = %s", got)
	}
	if got := c.DNS.UpstreamAddrs[0].Port(); got != 53 {
		t.Errorf("default upstream port = %d", got)
	}
	if s := c.Allow.Static[1]; s.Prefix.String() != "2001:db8::1/128" || len(s.Ports) != 2 || s.Ports[0] != (PortRange{22, 22}) || s.Proto != "tcp" {
		t.Errorf("static 1 = %+v", s)
	}
	if s := c.Allow.Static[2]; s.Prefix.Bits() != 32 || s.Ports != nil {
		t.Errorf("static 2 = %+v", s)
	}
}

func TestInvalid(t *testing.T) {
	tests := []struct {
		name, yaml string
		env        []string
		want       string
	}{
		{"unknown top key", "bogus: 1\n", nil, "bogus: unknown key"},
		{"unknown nested key", "dns:\n  upstream: [192.0.2.1]\n", nil, "dns.upstream: unknown key"},
		{"port too big", "allow:\n  ports: [70000]\n", nil, "allow.ports[0]: 70000 is not a TCP port (1-65535)"},
		{"port zero", "allow:\n  ports: [443, 0]\n", nil, "allow.ports[1]: 0 is not a TCP port"},
		{"port not a number", "allow:\n  ports: [https]\n", nil, "allow.ports"},
		{"duplicate port", "allow:\n  ports: [443, 443]\n", nil, `allow.ports[1]: "443" repeats allow.ports[0]`},
		{"wildcard in middle", "allow:\n  domains: [\"a.*.example.com\"]\n  names: []\n", nil, `allow.domains[0]: "a.*.example.com" has "*" where only a leftmost "*." label is allowed`},
		{"partial wildcard", "allow:\n  domains: [\"*foo.example.com\"]\n  names: []\n", nil, `allow.domains[0]`},
		{"wildcard too broad", "allow:\n  domains: [\"*.com\"]\n  names: []\n", nil, "too broad"},
		{"duplicate domain", "allow:\n  domains: [\"*.a.com\", \"*.A.com.\"]\n  names: []\n", nil, `allow.domains[1]: "*.a.com" repeats allow.domains[0]`},
		{"empty label", "allow:\n  domains: [\"a..com\"]\n  names: []\n", nil, "empty label"},
		{"pinned not allowed", "allow:\n  names: [\"evil.example.com\"]\n", nil, `allow.names[0]: "evil.example.com" is not allowed by allow.domains`},
		{"pinned wildcard", "allow:\n  names: [\"*.cognitive.microsoft.com\"]\n", nil, "must be a name, not a wildcard"},
		{"bad duration", "dns:\n  min_ttl: soon\n", nil, "dns.min_ttl"},
		{"negative grace", "dns:\n  grace: -1s\n", nil, "dns.grace: -1s must not be negative"},
		{"max_ttl zero", "dns:\n  max_ttl: 0s\n", nil, "dns.max_ttl: 0s must be at least 1s"},
		{"max_ttl negative", "dns:\n  max_ttl: -1h\n", nil, "dns.max_ttl: -1h0m0s must be at least 1s"},
		{"max_ttl below min_ttl", "dns:\n  min_ttl: 120s\n  max_ttl: 60s\n", nil, "dns.max_ttl: 1m0s is less than dns.min_ttl (2m0s)"},
		{"max_ttl not a duration", "dns:\n  max_ttl: forever\n", nil, `dns.max_ttl: "forever" is not a duration`},
		{"env max_ttl", "", []string{"EGRESSD_DNS_MAX_TTL=500ms"}, "dns.max_ttl: 500ms must be at least 1s"},
		{"exempt loopback", "dns:\n  rebinding_exempt: [\"127.0.0.0/16\"]\n", nil, `dns.rebinding_exempt[0]: "127.0.0.0/16" overlaps 127.0.0.0/8`},
		{"exempt everything", "dns:\n  rebinding_exempt: [\"0.0.0.0/0\"]\n", nil, `dns.rebinding_exempt[0]: "0.0.0.0/0" overlaps`},
		{"exempt metadata", "dns:\n  rebinding_exempt: [\"169.254.169.254\"]\n", nil, "overlaps 169.254.0.0/16"},
		{"exempt v6 link-local", "dns:\n  rebinding_exempt: [\"fe80::/64\"]\n", nil, "overlaps fe80::/10"},
		{"exempt host bits", "dns:\n  rebinding_exempt: [\"10.1.2.3/8\"]\n", nil, "did you mean 10.0.0.0/8"},
		{"exempt not a prefix", "dns:\n  rebinding_exempt: [\"corp\"]\n", nil, `dns.rebinding_exempt[0]: "corp" is not a plain IPv4 or IPv6 address or prefix`},
		{"exempt duplicate", "dns:\n  rebinding_exempt: [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n", nil, `dns.rebinding_exempt[1]: "10.0.0.0/8" repeats`},
		{"limits zero conns", "dns:\n  limits:\n    tcp_connections_per_client: 0\n", nil, "dns.limits.tcp_connections_per_client: 0 must be at least 1"},
		{"limits per client over total", "dns:\n  limits:\n    tcp_connections: 8\n", nil, "dns.limits.tcp_connections_per_client: 16 is more than dns.limits.tcp_connections (8)"},
		{"limits bad timeout", "dns:\n  limits:\n    tcp_idle_timeout: 1ms\n", nil, "dns.limits.tcp_idle_timeout: 1ms must be at least 100ms"},
		{"limits negative rate", "", []string{"EGRESSD_DNS_LIMITS_RATE_PER_CLIENT=-5"}, "dns.limits.rate_per_client: -5 must not be negative"},
		{"limits unknown", "dns:\n  limits:\n    tcp: 3\n", nil, "dns.limits.tcp: unknown key"},
		{"limits in flight env", "", []string{"EGRESSD_DNS_LIMITS_IN_FLIGHT_PER_CLIENT=0"}, "dns.limits.in_flight_per_client: 0 must be at least 1"},
		{"query budget", "dns:\n  query_budget: 10ms\n", nil, "dns.query_budget: 10ms must be at least 100ms"},
		{"bad upstream", "dns:\n  upstreams: [\"resolver.example\"]\n", nil, `dns.upstreams[0]: "resolver.example" is not "ip" or "ip:port"`},
		{"loopback upstream", "dns:\n  upstreams: [\"127.0.0.53\"]\n", nil, `dns.upstreams[0]: "127.0.0.53" is a loopback`},
		{"bad cidr", "allow:\n  cidrs: [\"300.1.1.0/24\"]\n", nil, `allow.cidrs[0]: "300.1.1.0/24" is not an address or prefix`},
		{"host bits", "allow:\n  cidrs: [\"203.0.113.1/24\"]\n", nil, "did you mean 203.0.113.0/24"},
		{"cidr bad port", "allow:\n  cidrs: [\"203.0.113.0/24 99999\"]\n", nil, `allow.cidrs[0]: "203.0.113.0/24 99999" port "99999" is not a TCP or UDP port`},
		{"cidr bad protocol", "allow:\n  cidrs: [\"10.0.0.0/8 icmp 1\"]\n", nil, `allow.cidrs[0]: "10.0.0.0/8 icmp 1" protocol "icmp" must be tcp, udp or any`},
		{"cidr backwards range", "allow:\n  cidrs: [\"10.0.0.0/8 udp 200-100\"]\n", nil, `port range "200-100" must go from low to high`},
		{"cidr too many fields", "allow:\n  cidrs: [\"10.0.0.0/8 tcp 80 443\"]\n", nil, `allow.cidrs[0]: "10.0.0.0/8 tcp 80 443" must be`},
		{"cidr map bad protocol", "allow:\n  cidrs: [{cidr: 10.0.0.0/8, protocol: sctp}]\n", nil, `allow.cidrs[0].protocol: "sctp" must be tcp, udp or any`},
		{"cidr map bad port", "allow:\n  cidrs: [{cidr: 10.0.0.0/8, ports: [80, 70000]}]\n", nil, `allow.cidrs[0].ports: port "70000" is not a TCP or UDP port`},
		{"cidr map unknown key", "allow:\n  cidrs: [{cidr: 10.0.0.0/8, port: 80}]\n", nil, `allow.cidrs[0].port: unknown key (cidr, protocol, ports)`},
		{"cidr map no cidr", "allow:\n  cidrs: [{protocol: udp}]\n", nil, `allow.cidrs[0].cidr: <nil> must be an address or prefix`},
		{"cidr map host bits", "allow:\n  cidrs: [{cidr: 10.1.0.0/8}]\n", nil, `allow.cidrs[0].cidr: "10.1.0.0/8" has host bits set (did you mean 10.0.0.0/8?)`},
		{"cidr duplicate across forms", "allow:\n  cidrs: [\"10.0.0.0/8 any\", {cidr: 10.0.0.0/8, protocol: any, ports: any}]\n", nil, `allow.cidrs[1]: "10.0.0.0/8 any any" repeats allow.cidrs[0]`},
		{"listen port 53", "dns:\n  listen_port: 53\n", nil, "dns.listen_port: 53"},
		{"bad action", "firewall:\n  action: allow\n", nil, `firewall.action: "allow"`},
		{"bad iface glob", "firewall:\n  containers: [\"b*r\"]\n", nil, `firewall.containers[0]: "b*r" may only have "*" at its end`},
		{"long iface", "firewall:\n  containers: [\"averyveryverylongname\"]\n", nil, "longer than an interface name"},
		{"relative state dir", "state_dir: state\n", nil, `state_dir: "state" must be an absolute path`},
		{"relative resolv.conf", "dns:\n  resolv_conf: [resolv.conf]\n", nil, `dns.resolv_conf[0]: "resolv.conf" must be an absolute path`},
		{"unfiltered container", "firewall:\n  unfiltered: [docker0]\n", nil, `firewall.unfiltered[0]: "docker0" is also in firewall.containers`},
		{"bad unfiltered glob", "firewall:\n  unfiltered: [\"*\"]\n", nil, `firewall.unfiltered[0]: "*" must name an interface`},
		{"bad antispoof glob", "firewall:\n  antispoof: [\"a*b\"]\n", nil, `firewall.antispoof[0]: "a*b" may only have "*" at its end`},
		{"env bad port", "", []string{"EGRESSD_ALLOW_PORTS=70000"}, "allow.ports[0]: 70000 is not a TCP port"},
		{"env bad duration", "", []string{"EGRESSD_DNS_GRACE=xyz"}, "dns.grace"},
		{"bad yaml", "allow: [\n", nil, "load config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := load(t, tt.yaml, tt.env...)
			if err == nil {
				t.Fatalf("no error, want %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestStaticForms(t *testing.T) {
	tests := []struct {
		entry string // YAML of one allow.cidrs entry
		want  string // canonical form
	}{
		{`"203.0.113.0/24"`, "203.0.113.0/24"},
		{`"203.0.113.0/24 80,8443"`, "203.0.113.0/24 tcp 80,8443"},
		{`"10.244.0.0/16 any"`, "10.244.0.0/16 any any"},
		{`"10.96.0.0/12 udp"`, "10.96.0.0/12 udp any"},
		{`"10.96.0.10 udp 53"`, "10.96.0.10/32 udp 53"},
		{`"192.0.2.0/24 tcp 30000-32767,22"`, "192.0.2.0/24 tcp 22,30000-32767"},
		{`"fd00::/8 any 80"`, "fd00::/8 any 80"},
		{`{cidr: 10.244.0.0/16, protocol: any, ports: any}`, "10.244.0.0/16 any any"},
		{`{cidr: 10.244.0.0/16, protocol: any}`, "10.244.0.0/16 any any"},
		{`{cidr: 10.0.0.1, ports: [6443]}`, "10.0.0.1/32 tcp 6443"},
		{`{cidr: 10.0.0.0/8, protocol: udp, ports: ["53", "1000-2000"]}`, "10.0.0.0/8 udp 53,1000-2000"},
		{`{cidr: 10.0.0.0/8}`, "10.0.0.0/8"},
	}
	for _, tt := range tests {
		c, err := load(t, "allow:\n  cidrs: ["+tt.entry+"]\n")
		if err != nil {
			t.Errorf("%s: %v", tt.entry, err)
			continue
		}
		if got := c.Allow.Static[0].String(); got != tt.want {
			t.Errorf("%s: parsed as %q, want %q", tt.entry, got, tt.want)
		}
	}
	// From the environment, comma-separated: ports in the string form are
	// then separated by "," too, so only single ports or ranges fit.
	c, err := load(t, "", "EGRESSD_ALLOW_CIDRS=10.244.0.0/16 any,10.96.0.10 udp 53")
	if err != nil || len(c.Allow.Static) != 2 || c.Allow.Static[1].String() != "10.96.0.10/32 udp 53" {
		t.Fatalf("env cidrs: %v, %v", err, c)
	}
}

func TestStaticAllows(t *testing.T) {
	parse := func(s string) Static {
		st, err := parseStatic(s)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	a := netip.MustParseAddr("10.244.1.5")
	tests := []struct {
		entry, proto string
		port         uint16
		want         bool
	}{
		{"10.244.0.0/16 any", "udp", 8125, true},
		{"10.244.0.0/16 any", "tcp", 1, true},
		{"10.244.0.0/16 udp", "tcp", 80, false},
		{"10.244.0.0/16 tcp 1000-2000", "tcp", 2000, true},
		{"10.244.0.0/16 tcp 1000-2000", "tcp", 2001, false},
		{"10.244.0.0/16", "tcp", 443, true}, // allow.ports
		{"10.244.0.0/16", "tcp", 80, false},
		{"10.244.0.0/16", "udp", 443, false},
		{"10.245.0.0/16 any", "tcp", 443, false},
	}
	for _, tt := range tests {
		if got := parse(tt.entry).Allows(a, Proto(tt.proto), tt.port, []int{443}); got != tt.want {
			t.Errorf("%q allows %s/%d: %v, want %v", tt.entry, tt.proto, tt.port, got, tt.want)
		}
	}
}

func TestMissingFile(t *testing.T) {
	_, err := Load("/nonexistent/egressd.yaml", nil)
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/egressd.yaml") {
		t.Fatalf("err = %v", err)
	}
}

func TestForwardAndMode(t *testing.T) {
	c, err := load(t, "dns:\n  forward: [{zone: Cluster.Local., servers: [10.96.0.10, \"10.96.0.11:5353\"]}, \"corp.example 192.0.2.53\"]\nfirewall:\n  mode: audit\n")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.DNS.Forward) != 2 || c.DNS.Forward[0].Zone != "cluster.local" || c.DNS.Forward[0].Servers[1].String() != "10.96.0.11:5353" ||
		c.DNS.Forward[1].Servers[0].String() != "192.0.2.53:53" || c.Firewall.Mode != ModeAudit {
		t.Fatalf("parsed %+v, mode %q", c.DNS.Forward, c.Firewall.Mode)
	}
	for name, want := range map[string]bool{
		"kubernetes.default.svc.cluster.local.": true, "cluster.local": true, "api.example.com.default.svc.cluster.local": true,
		"notcluster.local": false, "local": false, "a.corp.example": true,
	} {
		if _, ok := c.ForwardFor(name); ok != want {
			t.Errorf("ForwardFor(%q) = %v, want %v", name, ok, want)
		}
	}
	for _, tt := range []struct{ yaml, want string }{
		{"dns:\n  forward: [{zone: cluster.local}]\n", "dns.forward[0].servers: <nil> must list at least one"},
		{"dns:\n  forward: [{zone: \"*.cluster.local\", servers: [10.96.0.10]}]\n", `dns.forward[0].zone: "*.cluster.local" must be a name, not a wildcard`},
		{"dns:\n  forward: [{zone: cluster.local, servers: [kube-dns]}]\n", `dns.forward[0].servers[0]: "kube-dns" is not "ip" or "ip:port"`},
		{"dns:\n  forward: [{zone: cluster.local, servers: [127.0.0.1]}]\n", `dns.forward[0].servers[0]: "127.0.0.1" is a loopback`},
		{"dns:\n  forward: [{zone: cluster.local, server: 10.96.0.10}]\n", `dns.forward[0].server: unknown key (zone, servers)`},
		{"dns:\n  forward: [\"cluster.local\"]\n", `dns.forward[0]: "cluster.local" must be`},
		{"dns:\n  forward: [\"a.b 10.0.0.1\", \"A.B. 10.0.0.2\"]\n", `dns.forward[1].zone: "a.b" repeats dns.forward[0]`},
		{"firewall:\n  mode: permissive\n", `firewall.mode: "permissive" must be "enforce" or "audit"`},
	} {
		if _, err := load(t, tt.yaml); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want %q", tt.yaml, err, tt.want)
		}
	}
	if c, err := load(t, "", "EGRESSD_DNS_FORWARD=cluster.local 10.96.0.10"); err != nil || len(c.DNS.Forward) != 1 {
		t.Errorf("env forward: %v", err)
	}
}

func TestEngineZones(t *testing.T) {
	c, err := load(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.DNS.EngineZones) != 1 || c.DNS.EngineZones[0] != "dns.podman" {
		t.Fatalf("default dns.engine_zones = %q, want [dns.podman]", c.DNS.EngineZones)
	}
	c, err = load(t, `
allow:
  domains: ["*.cognitive.microsoft.com", "*.example.com", "example.org"]
  names: []
dns:
  engine_zones: ["DNS.Podman.", "containers.example.com", "example.org"]
  forward: [{zone: corp.dns.podman, servers: [192.0.2.53]}, "example.org 192.0.2.54", "com 192.0.2.55"]
`)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"dns.podman", "containers.example.com", "example.org"}; !slices.Equal(c.DNS.EngineZones, want) {
		t.Errorf("dns.engine_zones = %q, want %q", c.DNS.EngineZones, want)
	}
	for _, tt := range []struct{ name, want string }{
		{"web.dns.podman.", "dns.podman"},
		{"DNS.PODMAN", "dns.podman"},
		{"a.b.WEB.dns.podman", "dns.podman"},
		{"corp.dns.podman", ""},                                 // the longer dns.forward zone wins
		{"x.corp.dns.podman", ""},                               // ... below it too
		{"example.org", ""},                                     // a dns.forward zone as long wins
		{"db.containers.example.com", "containers.example.com"}, // longer than the forwarded "com"
		{"podman", ""},
		{"notdns.podman", ""},
		{"web.dns.podman.example.com", ""},
	} {
		got, ok := c.EngineZoneFor(tt.name)
		if got != tt.want || ok != (tt.want != "") {
			t.Errorf("EngineZoneFor(%q) = %q, %v; want %q", tt.name, got, ok, tt.want)
		}
	}
	if c, err := load(t, "dns:\n  engine_zones: []\n"); err != nil || len(c.DNS.EngineZones) != 0 {
		t.Errorf("empty dns.engine_zones: %v, %q", err, c.DNS.EngineZones)
	}
	if c, err := load(t, "", "EGRESSD_DNS_ENGINE_ZONES="); err != nil || len(c.DNS.EngineZones) != 0 {
		t.Errorf("empty dns.engine_zones from the environment: %v, %q", err, c.DNS.EngineZones)
	}
	if c, err := load(t, "", "EGRESSD_DNS_ENGINE_ZONES=dns.podman, cluster.test"); err != nil || len(c.DNS.EngineZones) != 2 {
		t.Errorf("dns.engine_zones from the environment: %v, %q", err, c.DNS.EngineZones)
	}
	for _, tt := range []struct{ yaml, want string }{
		{"dns:\n  engine_zones: [\"*.dns.podman\"]\n", `dns.engine_zones[0]: "*.dns.podman" must be a name, not a wildcard`},
		{"dns:\n  engine_zones: [dns.podman, \"a..b\"]\n", `dns.engine_zones[1]: "a..b" has an empty label`},
		{"dns:\n  engine_zones: [\".\"]\n", `dns.engine_zones[0]: "." is empty`},
		{"dns:\n  engine_zones: [\"\"]\n", `dns.engine_zones[0]: "" is empty`},
		{"dns:\n  engine_zones: [\"dns podman\"]\n", `dns.engine_zones[0]: "dns podman" has invalid character ' '`},
		{"dns:\n  engine_zones: [dns.podman, DNS.podman.]\n", `dns.engine_zones[1]: "dns.podman" repeats dns.engine_zones[0]`},
	} {
		if _, err := load(t, tt.yaml); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want %q", tt.yaml, err, tt.want)
		}
	}
}
