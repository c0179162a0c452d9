package dnsresolve

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func rrs(t testing.TB, lines ...string) []dns.RR {
	t.Helper()
	var out []dns.RR
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			t.Fatalf("%s: %v", l, err)
		}
		out = append(out, rr)
	}
	return out
}

func TestChainExtract(t *testing.T) {
	tests := []struct {
		name       string
		qname      string
		qtype      uint16
		answer     []string
		addrs      []string
		cnames     int
		blocked    int
		incomplete bool
		ttl        uint32
	}{
		{
			name: "plain A", qname: "a.example.", qtype: dns.TypeA,
			answer: []string{"a.example. 60 A 203.0.113.1", "a.example. 30 A 203.0.113.2"},
			addrs:  []string{"203.0.113.1", "203.0.113.2"}, ttl: 30,
		},
		{
			name: "CNAME chain, case-insensitive", qname: "myres.cognitiveservices.azure.com.", qtype: dns.TypeA,
			answer: []string{
				"myres.cognitiveservices.azure.com. 300 CNAME myres.TrafficManager.net.",
				"myres.trafficmanager.net. 60 CNAME edge.azurefd.net.",
				"edge.azurefd.net. 20 A 203.0.113.20",
			},
			addrs: []string{"203.0.113.20"}, cnames: 2, ttl: 20,
		},
		{
			name: "records for unrelated names are ignored", qname: "a.example.", qtype: dns.TypeA,
			answer: []string{"a.example. 60 CNAME b.example.", "evil.example. 60 A 203.0.113.66", "a.example. 60 A 203.0.113.67", "b.example. 60 A 203.0.113.2"},
			addrs:  []string{"203.0.113.2"}, cnames: 1, ttl: 60,
		},
		{
			name: "chain without final addresses", qname: "a.example.", qtype: dns.TypeA,
			answer: []string{"a.example. 60 CNAME b.example."},
			cnames: 1, incomplete: true,
		},
		{
			name: "AAAA only for AAAA question", qname: "a.example.", qtype: dns.TypeAAAA,
			answer: []string{"a.example. 60 A 203.0.113.1", "a.example. 60 AAAA 2001:db8::1"},
			addrs:  []string{"2001:db8::1"}, ttl: 60,
		},
		{
			name: "rebinding guard", qname: "a.example.", qtype: dns.TypeA,
			answer: []string{"a.example. 60 A 10.0.0.1", "a.example. 60 A 127.0.0.1", "a.example. 60 A 100.64.0.1",
				"a.example. 60 A 169.254.1.1", "a.example. 60 A 0.0.0.0", "a.example. 60 A 224.0.0.1", "a.example. 60 A 192.0.2.1"},
			addrs: []string{"192.0.2.1"}, blocked: 6, ttl: 60,
		},
		{
			name: "rebinding guard IPv6", qname: "a.example.", qtype: dns.TypeAAAA,
			answer: []string{"a.example. 60 AAAA ::1", "a.example. 60 AAAA fd00::1", "a.example. 60 AAAA fe80::1", "a.example. 60 AAAA ::ffff:10.0.0.1", "a.example. 60 AAAA ::",
				"a.example. 60 AAAA 64:ff9b::a00:5", "a.example. 60 AAAA 2002:a00:5::1", "a.example. 60 AAAA 64:ff9b::808:808"},
			addrs: []string{"64:ff9b::808:808"}, blocked: 7, ttl: 60,
		},
		{
			name: "CNAME loop ends", qname: "a.example.", qtype: dns.TypeA,
			answer: []string{"a.example. 60 CNAME b.example.", "b.example. 60 CNAME a.example."},
			cnames: maxChain, incomplete: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c Chain
			inc := c.extract(rrs(t, tt.answer...), tt.qname, tt.qtype, docGuard)
			got, ttl := c.Addresses()
			var gs []string
			for _, a := range got {
				gs = append(gs, a.String())
			}
			if !slices.Equal(gs, tt.addrs) {
				t.Errorf("addrs = %v, want %v", gs, tt.addrs)
			}
			if len(c.CNAMEs) != tt.cnames || len(c.Blocked) != tt.blocked || inc != tt.incomplete || ttl != tt.ttl {
				t.Errorf("cnames %d blocked %d incomplete %v ttl %d; want %d %d %v %d",
					len(c.CNAMEs), len(c.Blocked), inc, ttl, tt.cnames, tt.blocked, tt.incomplete, tt.ttl)
			}
		})
	}
}

// FuzzChain feeds arbitrary wire messages to the chain extraction: it must
// not panic and must never return an address that is not routable or not
// owned by the end of the chain.
func FuzzChain(f *testing.F) {
	m := new(dns.Msg)
	m.SetQuestion("a.example.", dns.TypeA)
	m.Answer = rrs(f, "a.example. 60 CNAME b.example.", "b.example. 60 A 203.0.113.1", "b.example. 60 A 10.0.0.1")
	wire, _ := m.Pack()
	f.Add(wire)
	f.Fuzz(func(t *testing.T, wire []byte) {
		m := new(dns.Msg)
		if m.Unpack(wire) != nil || len(m.Question) != 1 {
			return
		}
		var c Chain
		c.extract(m.Answer, m.Question[0].Name, dns.TypeA, nil)
		addrs, _ := c.Addresses()
		for i, a := range addrs {
			if !Routable(a) {
				t.Errorf("non-routable %v returned", a)
			}
			if !dns.IsFqdn(c.Addrs[i].Header().Name) || !equalName(c.Addrs[i].Header().Name, c.Target) {
				t.Errorf("address of %s, chain ends at %s", c.Addrs[i].Header().Name, c.Target)
			}
		}
	})
}

func equalName(a, b string) bool { return dns.CanonicalName(a) == dns.CanonicalName(b) }

func TestLifetime(t *testing.T) {
	s := func(n int) time.Duration { return time.Duration(n) * time.Second }
	tests := []struct {
		ttl        uint32
		min, grace time.Duration
		want       time.Duration
	}{
		{0, s(1), s(2), s(3)},
		{300, s(120), s(10), s(310)},
		{30, s(120), s(10), s(130)},
	}
	for _, tt := range tests {
		if got := Lifetime(tt.ttl, tt.min, tt.grace); got != tt.want {
			t.Errorf("Lifetime(%d, %v, %v) = %v, want %v", tt.ttl, tt.min, tt.grace, got, tt.want)
		}
	}
}

func BenchmarkChainExtract(b *testing.B) {
	answer := rrs(b,
		"myres.cognitiveservices.azure.com. 300 CNAME myres.trafficmanager.net.",
		"myres.trafficmanager.net. 60 CNAME edge.azurefd.net.",
		"edge.azurefd.net. 20 A 203.0.113.20",
		"edge.azurefd.net. 20 A 203.0.113.21",
		"edge.azurefd.net. 20 A 10.0.0.1",
	)
	b.ReportAllocs()
	for b.Loop() {
		var c Chain
		c.extract(answer, "myres.cognitiveservices.azure.com.", dns.TypeA, docGuard)
		c.Addresses()
	}
}

// docGuard lets through the documentation ranges that the tests use as
// "public" addresses.
var docGuard = NewGuard(prefixes("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))

// TestGuard checks every block of the IANA special-purpose registries
// that is not globally reachable (its first and last address), the
// globally reachable exceptions inside them, their neighbours, and every
// way an IPv6 address can embed an IPv4 one.
func TestGuard(t *testing.T) {
	tests := []struct {
		addr string
		want bool
	}{
		// Public addresses.
		{"8.8.8.8", true}, {"1.1.1.1", true}, {"9.255.255.255", true}, {"11.0.0.0", true},
		{"2606:4700::1", true}, {"2a00:1450::1", true}, {"2620:4f:8000::1", true}, // AS112 direct delegation: reachable
		// IPv4 registry, not globally reachable.
		{"0.0.0.0", false}, {"0.255.255.255", false},
		{"10.0.0.0", false}, {"10.255.255.255", false},
		{"100.64.0.0", false}, {"100.127.255.255", false}, {"100.63.255.255", true}, {"100.128.0.0", true},
		{"127.0.0.1", false}, {"127.255.255.255", false},
		{"169.254.0.0", false}, {"169.254.169.254", false}, {"169.255.0.0", true},
		{"172.16.0.0", false}, {"172.31.255.255", false}, {"172.15.255.255", true}, {"172.32.0.0", true},
		{"192.0.0.0", false}, {"192.0.0.8", false}, {"192.0.0.170", false}, {"192.0.0.255", false},
		{"192.0.0.9", true}, {"192.0.0.10", true}, // PCP and TURN anycast: globally reachable
		{"192.0.2.0", false}, {"192.0.2.255", false},
		{"192.31.196.1", true}, {"192.52.193.1", true}, {"192.175.48.1", true}, // AS112-v4, AMT, AS112 delegation
		{"192.88.99.0", false}, {"192.88.99.1", false}, {"192.88.99.2", false}, {"192.88.99.255", false},
		{"192.168.0.0", false}, {"192.168.255.255", false}, {"192.169.0.0", true},
		{"198.18.0.0", false}, {"198.19.255.255", false}, {"198.17.255.255", true}, {"198.20.0.0", true},
		{"198.51.100.0", false}, {"198.51.100.255", false},
		{"203.0.113.0", false}, {"203.0.113.255", false}, {"203.0.114.1", true},
		{"224.0.0.1", false}, {"239.255.255.255", false}, {"223.255.255.255", true},
		{"240.0.0.0", false}, {"240.0.0.1", false}, {"255.255.255.254", false}, {"255.255.255.255", false},
		// IPv6 registry, not globally reachable.
		{"::", false}, {"::1", false},
		{"::ffff:0:0", false}, {"::ffff:10.0.0.5", false}, {"::ffff:192.168.1.1", false}, {"::ffff:8.8.8.8", true},
		{"::10.0.0.5", false}, {"::8.8.8.8", false}, // IPv4-compatible: deprecated, never global
		{"100::", false}, {"100::ffff:ffff:ffff:ffff", false}, {"100:0:0:1::1", false},
		{"2001::", false}, {"2001:0:4136:e378:8000:63bf:3fff:fdd2", false}, // Teredo
		{"2001:1::", false}, {"2001:1::1", true}, {"2001:1::2", true}, {"2001:1::3", true}, {"2001:1::4", false},
		{"2001:2::1", false}, {"2001:3::1", true}, {"2001:4:112::1", true}, {"2001:4:113::1", false},
		{"2001:10::1", false}, {"2001:20::1", true}, {"2001:2f:ffff::1", true}, {"2001:30::1", true}, {"2001:3f:ffff::1", true},
		{"2001:40::1", false}, {"2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", false}, {"2001:200::1", true},
		{"2001:db8::", false}, {"2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", false}, {"2001:db9::1", true},
		{"3fff::", false}, {"3fff:fff:ffff::1", false}, {"3fff:1000::1", true},
		{"5f00::1", false}, {"fc00::1", false}, {"fd12::1", false}, {"fe80::1", false}, {"febf::1", false},
		{"fec0::1", false}, {"feff::1", false}, {"ff02::1", false}, {"ff0e::1", false},
		{"4000::1", false}, {"1::1", false}, {"e000::1", false}, // reserved by the IETF, outside 2000::/3
		// NAT64, well-known prefix (RFC 6052 /96): judged by the IPv4 address.
		{"64:ff9b::808:808", true}, {"64:ff9b::8.8.8.8", true},
		{"64:ff9b::a00:5", false}, {"64:ff9b::7f00:1", false}, {"64:ff9b::a9fe:a9fe", false}, {"64:ff9b::f000:1", false},
		{"64:ff9b::", false}, {"64:ff9b::1:0:808:808", false}, // outside the /96: reserved space
		// NAT64, local-use prefix (RFC 8215): every RFC 6052 position must be public.
		{"64:ff9b:1:808:8:808:808:808", true}, // 8.8.8.8 at every position
		{localNAT64(0, "192.168.1.1"), false}, {localNAT64(1, "172.16.0.5"), false},
		{localNAT64(2, "10.0.0.5"), false}, {localNAT64(3, "10.0.0.5"), false},
		{localNAT64(3, "9.9.9.9"), true},
		{"64:ff9b:1:808:ff08:808:808:808", false}, // u octet not zero
		// 6to4 (RFC 3056): the IPv4 address in bits 16-47.
		{"2002:808:808::1", true}, {"2002:a00:5::1", false}, {"2002:c0a8:101::1", false}, {"2002:7f00:1::1", false},
		{"2002::1", false}, {"2002:f000:1::1", false},
		// Zoned addresses never come out of DNS.
		{"fe80::1%eth0", false},
	}
	for _, tt := range tests {
		if got := Routable(netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("Routable(%s) = %v, want %v", tt.addr, got, tt.want)
		}
	}
}

// localNAT64 returns an address in 64:ff9b:1::/48 with v4 at the RFC 6052
// position for a /48, /56, /64 or /96 prefix (pos 0-3) and 8s elsewhere,
// so that the other positions hold public addresses.
func localNAT64(pos int, v4 string) string {
	b := [16]byte{0, 0x64, 0xff, 0x9b, 0, 1, 8, 8, 0, 8, 8, 8, 8, 8, 8, 8}
	at := [][4]int{{6, 7, 9, 10}, {7, 9, 10, 11}, {9, 10, 11, 12}, {12, 13, 14, 15}}[pos]
	for i, x := range netip.MustParseAddr(v4).As4() {
		b[at[i]] = x
	}
	return netip.AddrFrom16(b).String()
}
