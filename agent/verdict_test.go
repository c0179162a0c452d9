package agent

import (
	"net/netip"
	"testing"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// learnedMap is the learned sets' state as verdict reads it: names by
// address, and which addresses are live.
type learnedMap struct {
	names map[netip.Addr]string
	live  map[netip.Addr]bool
}

func (m learnedMap) Names(a netip.Addr) (string, bool) { n, ok := m.names[a]; return n, ok }

func (m learnedMap) Lookup(a netip.Addr) []firewall.Element {
	if !m.live[a] {
		return nil
	}
	return []firewall.Element{{Addr: a, Rule: config.RuleAllow, Expires: time.Now().Add(time.Minute), Names: m.names[a]}}
}

func TestVerdict(t *testing.T) {
	cfg, err := config.Load("", []string{"EGRESSD_ALLOW_PORTS=443", "EGRESSD_ALLOW_CIDRS=9.9.9.0/24 udp 53"})
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr
	learned := learnedMap{
		names: map[netip.Addr]string{a("93.184.216.1"): "a.example.", a("93.184.216.2"): "b.example.", a("93.184.216.3"): "", a("10.0.0.1"): "c.example."},
		live:  map[netip.Addr]bool{a("93.184.216.1"): true},
	}
	tests := []struct {
		name      string
		addr      string
		port      uint16
		proto     string
		allowed   bool
		reason    Reason
		names     string
		static    bool
		nonPublic bool
	}{
		{"live, allowed port", "93.184.216.1", 443, "tcp", true, "", "a.example.", false, false},
		{"live, any port asked", "93.184.216.1", 0, "tcp", true, "", "a.example.", false, false},
		{"live, IPv4-mapped", "::ffff:93.184.216.1", 443, "tcp", true, "", "a.example.", false, false},
		{"live, other port", "93.184.216.1", 80, "tcp", false, Port, "a.example.", false, false},
		{"live, udp", "93.184.216.1", 443, "udp", false, Port, "a.example.", false, false},
		{"live, icmp", "93.184.216.1", 0, "icmp", false, Port, "a.example.", false, false},
		{"expired", "93.184.216.2", 443, "tcp", false, Expired, "b.example.", false, false},
		{"expired, names unknown", "93.184.216.3", 443, "tcp", false, Expired, "", false, false},
		{"never answered", "93.184.216.9", 443, "tcp", false, NotAnswered, "", false, false},
		{"private", "10.0.0.9", 443, "tcp", false, NotAnswered, "", false, true},
		{"private, answered once", "10.0.0.1", 443, "tcp", false, Expired, "c.example.", false, true},
		{"static", "9.9.9.7", 53, "udp", true, "", "", true, false},
		{"static, other port", "9.9.9.7", 54, "udp", false, NotAnswered, "", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := verdict(cfg, learned, a(tt.addr), tt.port, config.Proto(tt.proto))
			if v.Allowed != tt.allowed || v.Reason != tt.reason || v.Names != tt.names || (v.Static != nil) != tt.static || v.NonPublic != tt.nonPublic {
				t.Errorf("verdict = %+v; want allowed %v, reason %q, names %q, static %v, non-public %v", v, tt.allowed, tt.reason, tt.names, tt.static, tt.nonPublic)
			}
		})
	}
}

func TestLogReason(t *testing.T) {
	for prefix, want := range map[string]Reason{
		rules.LogBlocked:       NotAnswered,
		rules.LogDoT:           DNSOverTLS,
		rules.LogSpoofed:       SpoofedSource,
		rules.LogSpoofed + " ": SpoofedSource,
		"something else":       NotAnswered,
	} {
		if got := logReason(prefix); got != want {
			t.Errorf("logReason(%q) = %q, want %q", prefix, got, want)
		}
	}
}
