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
			answer:  []string{"a.example. 60 AAAA ::1", "a.example. 60 AAAA fd00::1", "a.example. 60 AAAA fe80::1", "a.example. 60 AAAA ::ffff:10.0.0.1", "a.example. 60 AAAA ::"},
			blocked: 5,
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
			inc := c.extract(rrs(t, tt.answer...), tt.qname, tt.qtype)
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
		c.extract(m.Answer, m.Question[0].Name, dns.TypeA)
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

func TestRoutable(t *testing.T) {
	for a, want := range map[string]bool{
		"203.0.113.1": true, "198.51.100.1": true, "192.0.2.1": true, "8.8.8.8": true, "2001:db8::1": true, "2606:4700::1": true,
		"10.1.1.1": false, "172.16.0.1": false, "192.168.0.1": false, "127.0.0.1": false, "100.64.0.1": false, "100.127.255.255": false,
		"169.254.0.1": false, "0.0.0.0": false, "0.1.2.3": false, "255.255.255.255": false, "239.1.1.1": false,
		"::1": false, "::": false, "fc00::1": false, "fd12::1": false, "fe80::1": false, "ff02::1": false, "::ffff:192.168.1.1": false,
	} {
		if got := Routable(netip.MustParseAddr(a)); got != want {
			t.Errorf("Routable(%s) = %v, want %v", a, got, want)
		}
	}
}

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
		c.extract(answer, "myres.cognitiveservices.azure.com.", dns.TypeA)
		c.Addresses()
	}
}
