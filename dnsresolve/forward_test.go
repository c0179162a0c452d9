package dnsresolve

import (
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Names of forwarded zones go to the zone's servers, any type, and come
// back as they answered (NXDOMAIN included) without opening anything;
// other names follow the allow-list.
func TestForwardZones(t *testing.T) {
	cluster := startUpstream(t, map[string][]string{
		"kubernetes.default.svc.cluster.local.": {"kubernetes.default.svc.cluster.local. 5 A 10.96.0.1"},
		"_https._tcp.kubernetes.default.svc.cluster.local.": {
			"_https._tcp.kubernetes.default.svc.cluster.local. 5 SRV 0 100 443 kubernetes.default.svc.cluster.local."},
	})
	up := startUpstream(t, testZone)
	rec := &recorder{}
	p := NewProxy(Options{
		Domains:     []string{"*.cognitive.microsoft.com"},
		Upstream:    NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second),
		Allower:     rec,
		Guard:       docGuard,
		MinTTL:      time.Second,
		RefuseRcode: dns.RcodeRefused,
		Forward:     []ForwardZone{{Zone: "Cluster.Local.", Servers: []netip.AddrPort{cluster.addr}}},
	})
	addr := serve(t, p)

	r := ask(t, addr, "kubernetes.default.svc.cluster.local.", dns.TypeA, "udp", false)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "10.96.0.1" {
		t.Errorf("forwarded A (a private address the rebinding guard would remove): %v", r)
	}
	if r.IsEdns0() != nil {
		t.Errorf("a client without EDNS0 got an OPT record")
	}
	r = ask(t, addr, "_https._tcp.kubernetes.default.svc.cluster.local.", dns.TypeSRV, "tcp", true)
	if len(r.Answer) != 1 {
		t.Errorf("forwarded SRV over TCP: %v", r)
	}
	// A search-path expansion of an external name: NXDOMAIN, as the
	// cluster DNS says.
	r = ask(t, addr, "api.example.com.default.svc.cluster.local.", dns.TypeAAAA, "udp", false)
	if r.Rcode != dns.RcodeNameError {
		t.Errorf("search-path expansion: %v, want NXDOMAIN", r)
	}
	if got := rec.opened(); len(got) != 0 {
		t.Errorf("forwarded answers opened %v", got)
	}
	if up.queries.Load() != 0 || cluster.queries.Load() != 3 {
		t.Errorf("upstream asked %d times, cluster DNS %d times; want 0 and 3", up.queries.Load(), cluster.queries.Load())
	}
	// Outside the zone: the allow-list.
	if r := ask(t, addr, "notcluster.local.", dns.TypeA, "udp", false); r.Rcode != dns.RcodeRefused {
		t.Errorf("name outside the zone: %v", r)
	}
	// A zone whose servers fail: SERVFAIL.
	p.Update(Options{Domains: []string{"*.cognitive.microsoft.com"}, Upstream: NewUpstream(nil, 0, time.Second), Allower: rec,
		RefuseRcode: dns.RcodeRefused, ForwardTimeout: 200 * time.Millisecond,
		Forward: []ForwardZone{{Zone: "cluster.local", Servers: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}}})
	if r := ask(t, addr, "kubernetes.default.svc.cluster.local.", dns.TypeA, "udp", false); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("dead forward server: %v", r)
	}
}

// In audit mode a name that is not allowed is answered by the upstream,
// and nothing is opened for it; allowed names are opened as before.
func TestAuditAnswersUnlisted(t *testing.T) {
	up := startUpstream(t, map[string][]string{
		"www.example.com.":           {"www.example.com. 60 A 203.0.113.50"},
		"a.cognitive.microsoft.com.": {"a.cognitive.microsoft.com. 60 A 203.0.113.1"},
	})
	rec := &recorder{}
	p := NewProxy(Options{
		Domains:      []string{"*.cognitive.microsoft.com"},
		Upstream:     NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second),
		Allower:      rec,
		Guard:        docGuard,
		MinTTL:       time.Second,
		RefuseRcode:  dns.RcodeRefused,
		Audit:        true,
		AuditServers: []netip.AddrPort{up.addr},
	})
	addr := serve(t, p)
	r := ask(t, addr, "www.example.com.", dns.TypeA, "udp", false)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("unlisted name in audit mode: %v", r)
	}
	if got := rec.opened(); len(got) != 0 {
		t.Errorf("an unlisted name opened %v", got)
	}
	ask(t, addr, "a.cognitive.microsoft.com.", dns.TypeA, "udp", false)
	if got := rec.opened(); len(got) != 1 {
		t.Errorf("allowed name opened %v", got)
	}
}
