package firewall

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// nftIn runs nft with script in ns, as another process would.
func nftIn(t *testing.T, ns netns.NsHandle, script string) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft")
	}
	cmd := exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/fd/%d", os.Getpid(), int(ns)), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s\n%s", err, out, script)
	}
}

const richConfig = `
allow:
  cidrs: ["203.0.113.0/24", "2001:db8::1 80,8443", "10.244.0.0/16 any", "10.96.0.0/12 udp", "fd00::/8 any 53,30000-32767"]
  ports: [443, 8443]
dns:
  listen_port: 5300
firewall:
  containers: [docker0, "br-*", cni0]
  action: drop
`

// What egressd installs reads back as itself: no drift, whatever the
// config (else a repair would follow every check).
func TestInstalledRulesetHasNoDrift(t *testing.T) {
	for _, yaml := range []string{"", richConfig, "firewall:\n  host: false\n  nflog_group: 0\n", "firewall:\n  mode: audit\n  antispoof: [\"*\"]\ndns:\n  upstreams: [192.0.2.53]\n  forward: [{zone: cluster.local, servers: [10.96.0.10]}]\n"} {
		fw := newTestFirewall(t)
		if err := fw.Install(context.Background(), rules.Build(configtest.Load(t, yaml)), nil, nil); err != nil {
			t.Fatal(err)
		}
		if d, err := fw.Drift(context.Background()); d != "" || err != nil {
			t.Errorf("config %q: drift %q, %v", yaml, d, err)
		}
	}
}

// Tampering that keeps every rule's shape is drift too.
func TestDriftComparesValues(t *testing.T) {
	tests := []struct{ name, from, to, want string }{
		{"container interface", `oifname "docker0" accept`, `oifname "nomatch0" accept`, "chain forward rule"},
		{"spoofing check", "fib saddr . iif oif missing", "fib saddr . iif oif exists", "chain spoofed rule"},
		{"anti-spoofing interface", `iifname "docker0" jump spoofed`, `iifname "nomatch0" jump spoofed`, "chain antispoof rule"},
		{"verdict", "ct state established,related accept", "ct state established,related drop", "rule"},
		{"inverted lookup", "ip daddr @allow4", "ip daddr != @allow4", "chain egress rule"},
		{"redirect port", "redirect to :10053", "redirect to :10054", "chain dns_output rule"},
		{"DNAT address", "dnat ip to 169.254.53.53:10053", "dnat ip to 169.254.53.54:10053", "chain dns_redirect rule"},
		{"DNAT port", "dnat ip6 to [fd65:6772:6573::53]:10053", "dnat ip6 to [fd65:6772:6573::53]:10054", "chain dns_redirect rule"},
		{"jump target", "jump dns_redirect", "jump dns_proxy_in", "rule"},
		{"set flags", "type ipv4_addr\n\t\tflags timeout\n", "type ipv4_addr\n", "set allow4"},
		{"constant set elements", "elements = { 443 }", "elements = { 22, 443 }", "set ports"},
		{"priority", "hook forward priority filter;", "hook forward priority 10;", "chain forward"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fw, ns := newTestFirewallNS(t)
			text := fw.rs.Text()
			if !strings.Contains(text, tt.from) {
				t.Fatalf("ruleset has no %q", tt.from)
			}
			nftIn(t, ns, strings.Replace(text, tt.from, tt.to, 1))
			d, err := fw.Drift(context.Background())
			if err != nil || !strings.Contains(d, tt.want) {
				t.Errorf("drift %q, %v; want it to name %q", d, err, tt.want)
			}
		})
	}
}
