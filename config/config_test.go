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
  grace: 2s
firewall:
  containers: ["docker0", "br-*"]
`, "EGRESSD_DNS_GRACE=5s", "EGRESSD_ALLOW_PORTS=443,9443")
	if err != nil {
		t.Fatal(err)
	}
	if c.DNS.Grace != 5*time.Second {
		t.Errorf("env override of dns.grace: got %v", c.DNS.Grace)
	}
	if len(c.Allow.Ports) != 2 || c.Allow.Ports[1] != 9443 {
		t.Errorf("env override of allow.ports: got %v", c.Allow.Ports)
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
