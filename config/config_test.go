package config

import (
	"os"
	"path/filepath"
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
	if s := c.Allow.Static[1]; s.Prefix.String() != "2001:db8::1/128" || len(s.Ports) != 2 || s.Ports[0] != 22 {
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
		{"bad upstream", "dns:\n  upstreams: [\"resolver.example\"]\n", nil, `dns.upstreams[0]: "resolver.example" is not "ip" or "ip:port"`},
		{"loopback upstream", "dns:\n  upstreams: [\"127.0.0.53\"]\n", nil, `dns.upstreams[0]: "127.0.0.53" is a loopback`},
		{"bad cidr", "allow:\n  cidrs: [\"300.1.1.0/24\"]\n", nil, `allow.cidrs[0]: "300.1.1.0/24" is not an address or prefix`},
		{"host bits", "allow:\n  cidrs: [\"203.0.113.1/24\"]\n", nil, "did you mean 203.0.113.0/24"},
		{"cidr bad port", "allow:\n  cidrs: [\"203.0.113.0/24 99999\"]\n", nil, `port "99999" is not a TCP port`},
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

func TestMissingFile(t *testing.T) {
	_, err := Load("/nonexistent/egressd.yaml", nil)
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/egressd.yaml") {
		t.Fatalf("err = %v", err)
	}
}
