package rules

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/egressd/egressd/config/configtest"
)

var update = flag.Bool("update", false, "rewrite the golden rulesets in testdata")

// The rendered ruleset of a default and of a rich config, on a fixed host,
// is exactly what testdata holds: a refactoring must not change what
// `egressd print` shows (go test ./rules -run Golden -update rewrites it
// after an intended change).
func TestGoldenRulesets(t *testing.T) {
	host := Host{
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53"), netip.MustParseAddrPort("[2001:db8::53]:53")},
		Cgroup:    &Cgroup{Path: "/system.slice/egressd.service", Level: 2, ID: 4242},
		OnLink:    []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/64")},
		Unknown:   []string{"podman0"},
	}
	for name, yaml := range map[string]string{
		"default": "",
		"rich": `
allow:
  ports: [443, 8443]
  cidrs:
    - "203.0.113.0/24"
    - "2001:db8::1 80,8443"
    - "10.96.0.0/12 any"
    - "10.244.0.0/16 udp 53,8000-8100"
    - {cidr: "2001:db8:5::/48", protocol: tcp, ports: [22]}
dns:
  listen_port: 5300
  forward:
    - {zone: cluster.local, servers: ["10.96.0.10"]}
firewall:
  containers: [docker0, "br-*", cni0, "cali*"]
  unfiltered: [virbr0]
  antispoof: ["eth1"]
  action: drop
  nflog_group: 77
`,
		"audit": "firewall:\n  mode: audit\n",
	} {
		t.Run(name, func(t *testing.T) {
			checkGolden(t, filepath.Join("testdata", name+".nft"), BuildFor(configtest.Load(t, yaml), host).Text())
		})
	}
}

// checkGolden compares a rendered ruleset with the golden file at path
// (-update rewrites it).
func checkGolden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("ruleset differs from %s (rerun with -update if intended):\n%s", path, got)
	}
}
