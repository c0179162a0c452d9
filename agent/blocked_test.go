package agent

import (
	"net/netip"
	"testing"

	nflog "github.com/florianl/go-nflog/v2"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/ifname"
	"github.com/egressd/egressd/rules"
)

// ipPacket builds a packet as the kernel logs it: the IPv4 or IPv6
// header (by the family of src), then the transport header l4 (its ports
// first).
func ipPacket(src, dst string, proto byte, l4 ...byte) []byte {
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	h := make([]byte, 40)
	if s.Is4() {
		h = h[:20]
		h[0], h[9] = 0x45, proto
		copy(h[12:], s.AsSlice())
		copy(h[16:], d.AsSlice())
	} else {
		h[0], h[6] = 0x60, proto
		copy(h[8:], s.AsSlice())
		copy(h[24:], d.AsSlice())
	}
	return append(h, l4...)
}

var (
	tcp4  = ipPacket("172.30.0.2", "203.0.113.31", 6, 0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 0) // :40000 -> :443
	udp6  = ipPacket("2001:db8::2", "2001:db8:100::99", 17, 0x14, 0xe9, 0x00, 0x35)       // :5353 -> :53
	icmp4 = ipPacket("10.0.0.1", "10.0.0.2", 1, 8, 0, 0xf7, 0xff)                         // echo
	// An IHL larger than the packet: no transport header.
	longIHL = append([]byte{0x4f}, tcp4[1:]...)
)

func TestParseBlocked(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		name    string
		prefix  string
		payload []byte
		ok      bool
		want    Blocked
	}{
		{"tcp4", rules.LogBlocked, tcp4, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:443"), Proto: "tcp", Reason: NotAnswered}},
		{"udp6", rules.LogBlocked, udp6, true, Blocked{Source: "host", From: netip.MustParseAddr("2001:db8::2"), To: ap("[2001:db8:100::99]:53"), Proto: "udp", Reason: NotAnswered}},
		{"icmp has no port", rules.LogBlocked, icmp4, true, Blocked{Source: "host", From: netip.MustParseAddr("10.0.0.1"), To: ap("10.0.0.2:0"), Proto: "icmp", Reason: NotAnswered}},
		{"dns over tls", rules.LogDoT, tcp4, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:443"), Proto: "tcp", Reason: DNSOverTLS}},
		{"spoofed", rules.LogSpoofed, tcp4, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:443"), Proto: "tcp", Reason: SpoofedSource}},
		{"audit", rules.LogAudit + "blocked", tcp4, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:443"), Proto: "tcp", Reason: NotAnswered, WouldBlock: true}},
		{"audit dns over tls", rules.LogAudit + "dot", tcp4, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:443"), Proto: "tcp", Reason: DNSOverTLS, WouldBlock: true}},
		{"tcp4 without its ports", rules.LogBlocked, tcp4[:20], true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:0"), Proto: "tcp", Reason: NotAnswered}},
		{"short ipv4 header", rules.LogBlocked, tcp4[:19], false, Blocked{}},
		{"short ipv6 header", rules.LogBlocked, udp6[:39], false, Blocked{}},
		{"empty", rules.LogBlocked, []byte{}, false, Blocked{}},
		{"not ip", rules.LogBlocked, append([]byte{0x50}, tcp4[1:]...), false, Blocked{}},
		{"ihl beyond the packet", rules.LogBlocked, longIHL, true, Blocked{Source: "host", From: netip.MustParseAddr("172.30.0.2"), To: ap("203.0.113.31:0"), Proto: "tcp", Reason: NotAnswered}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, prefix := tt.payload, tt.prefix
			got, ok := parseBlocked(nflog.Attribute{Payload: &p, Prefix: &prefix})
			if ok != tt.ok || got != tt.want {
				t.Errorf("parseBlocked = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
	if _, ok := parseBlocked(nflog.Attribute{}); ok {
		t.Error("parseBlocked of an attribute without payload or prefix: ok")
	}
}

// FuzzParseBlocked feeds parseBlocked what a kernel (or anyone who can
// write to the NFLOG group) might send: it must not panic, and what it
// accepts must be a packet of one address family.
func FuzzParseBlocked(f *testing.F) {
	for _, p := range [][]byte{tcp4, udp6, icmp4, tcp4[:20], longIHL, {}, {0x45}, {0x60}} {
		f.Add(p, rules.LogBlocked)
	}
	f.Add(tcp4, rules.LogAudit+"dot")
	f.Fuzz(func(t *testing.T, payload []byte, prefix string) {
		b, ok := parseBlocked(nflog.Attribute{Payload: &payload, Prefix: &prefix})
		if !ok {
			return
		}
		if !b.From.IsValid() || !b.To.Addr().IsValid() || b.From.Is4() != b.To.Addr().Is4() {
			t.Errorf("parseBlocked(%x) = from %v to %v", payload, b.From, b.To)
		}
		if b.Proto == "" || b.Reason.describe() == "" {
			t.Errorf("parseBlocked(%x, %q) = proto %q, reason %q", payload, prefix, b.Proto, b.Reason)
		}
		if b.To.Port() != 0 && b.Proto != "tcp" && b.Proto != "udp" {
			t.Errorf("parseBlocked(%x) = port %d for %s", payload, b.To.Port(), b.Proto)
		}
	})
}

func TestBlockedExplained(t *testing.T) {
	caught := Blocked{Source: "container", Interface: "br-b", From: netip.MustParseAddr("10.2.0.5"), To: netip.MustParseAddrPort("203.0.113.10:443"), Proto: "tcp", Reason: NotAnswered}
	ownBridge := &config.Rule{Name: "rb", From: config.From{Interfaces: []ifname.Pattern{"br-b"}}}
	ownSource := &config.Rule{Name: "rs", From: config.From{Sources: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}}}
	allow := &config.Rule{Name: config.RuleAllow, From: config.Everyone}
	bridgeA := &config.Rule{Name: "ra", From: config.From{Interfaces: []ifname.Pattern{"br-a"}}}
	tests := []struct {
		name   string
		v      Verdict
		reason Reason
		rule   string
	}{
		{"never answered", Verdict{Reason: NotAnswered}, NotAnswered, ""},
		{"expired", Verdict{Reason: Expired, Rule: bridgeA, Names: "a."}, Expired, "ra"},
		{"other port", Verdict{Reason: Port, Rule: bridgeA}, Port, "ra"},
		{"another source's rule", Verdict{Allowed: true, Rule: bridgeA}, OtherSource, "ra"},
		{"everyone's rule: the configuration changed", Verdict{Allowed: true, Rule: allow}, NotAnswered, ""},
		{"its bridge's rule: answered since", Verdict{Allowed: true, Rule: ownBridge, Names: "b."}, NotAnswered, ""},
		{"its source's rule: answered since", Verdict{Allowed: true, Rule: ownSource}, NotAnswered, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := caught.explained(tt.v)
			if got.Reason != tt.reason || got.Rule != tt.rule || got.Names != tt.v.Names {
				t.Errorf("explained = %+v; want reason %q, rule %q, names %q", got, tt.reason, tt.rule, tt.v.Names)
			}
		})
	}
}
