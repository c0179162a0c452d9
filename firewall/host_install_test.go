package firewall

import (
	"context"
	"net/netip"
	"testing"

	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// Every statement the host facts add (cgroup owner, upstream-bound
// exemptions, anti-spoofing, unknown interfaces, on-link destinations)
// reads back from the kernel as itself: their exprs() are what the kernel
// returns, so the value drift check sees no drift.
func TestHostRulesetHasNoDrift(t *testing.T) {
	host := rules.Host{
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53"), netip.MustParseAddrPort("[2001:db8::53]:5353")},
		Cgroup:    &rules.Cgroup{Path: "/system.slice/egressd.service", Level: 2, ID: 12345},
		Unknown:   []string{"podman0"},
		OnLink:    []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:1::/64")},
	}
	for _, yaml := range []string{"", "firewall:\n  unfiltered: [virbr0]\n  antispoof: [\"*\"]\n"} {
		fw := newTestFirewall(t)
		if err := fw.Install(context.Background(), rules.BuildFor(configtest.Load(t, yaml), host), nil, nil); err != nil {
			t.Fatal(err)
		}
		if d, err := fw.Drift(context.Background()); d != "" || err != nil {
			t.Errorf("config %q: drift %q, %v", yaml, d, err)
		}
	}
}
