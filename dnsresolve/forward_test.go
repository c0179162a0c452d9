package dnsresolve

import (
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
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
	o := testOptions()
	o.Rules = everyone("*.cognitive.microsoft.com")
	o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
	o.Allower, o.Guard, o.MinTTL = rec, docGuard, time.Second
	o.Forward = []ForwardZone{{Zone: "Cluster.Local.", Servers: []netip.AddrPort{cluster.addr}}}
	p := NewProxy(o)
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
	o = testOptions()
	o.Rules, o.Upstream, o.Allower = everyone("*.cognitive.microsoft.com"), NewUpstream(nil, 0, time.Second), rec
	o.ForwardTimeout = 200 * time.Millisecond
	o.Forward = []ForwardZone{{Zone: "cluster.local", Servers: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}}}
	p.Update(o)
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
	o := testOptions()
	o.Rules = everyone("*.cognitive.microsoft.com")
	o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
	o.Allower, o.Guard, o.MinTTL = rec, docGuard, time.Second
	o.Audit, o.AuditServers = true, []netip.AddrPort{up.addr}
	p := NewProxy(o)
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

// askFrom is ask from a socket bound to the address from.
func askFrom(t *testing.T, from, server, name string, qtype uint16, network string) *dns.Msg {
	t.Helper()
	var local net.Addr = &net.UDPAddr{IP: net.ParseIP(from)}
	if network == "tcp" {
		local = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	c := &dns.Client{Net: network, Dialer: &net.Dialer{LocalAddr: local, Timeout: 2 * time.Second}}
	r, _, err := c.Exchange(m, server)
	if err != nil {
		t.Fatalf("%s from %s: %v", name, from, err)
	}
	return r
}

// Names of engine zones go to the engine on the client's own bridge, which
// EngineServers finds per client: each client gets its own engine's
// answer, unchanged (NXDOMAIN included), and nothing is opened. Clients
// behind no bridge are refused; a dns.forward zone as long or longer
// wins; other names never ask EngineServers.
func TestEngineZones(t *testing.T) {
	engineA := startUpstream(t, map[string][]string{
		"web.dns.podman.": {"web.dns.podman. 60 A 10.89.0.5", "web.dns.podman. 60 AAAA fd00:89::5"},
		"dns.podman.":     {"dns.podman. 60 TXT \"engine A\""},
	})
	engineB := startUpstream(t, map[string][]string{"web.dns.podman.": {"web.dns.podman. 60 A 10.89.1.5"}})
	corp := startUpstream(t, map[string][]string{"db.corp.dns.podman.": {"db.corp.dns.podman. 60 A 10.0.0.9"}})
	up := startUpstream(t, testZone)
	rec := &recorder{}
	var asked atomic.Int32
	behind := map[netip.Addr][]netip.AddrPort{
		netip.MustParseAddr("127.0.0.2"): {engineA.addr},
		netip.MustParseAddr("127.0.0.3"): {engineB.addr},
		// a dead engine first: the next one answers
		netip.MustParseAddr("127.0.0.4"): {netip.MustParseAddrPort("127.0.0.1:9"), engineB.addr},
	}
	o := testOptions()
	o.Rules = everyone("*.cognitive.microsoft.com", "*.dns.podman")
	o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
	o.Allower, o.Guard, o.MinTTL = rec, docGuard, time.Second
	o.ForwardTimeout = 300 * time.Millisecond
	o.Forward = []ForwardZone{{Zone: "corp.dns.podman", Servers: []netip.AddrPort{corp.addr}}}
	o.EngineZones = []string{"DNS.Podman."}
	o.EngineServers = func(client netip.Addr) []netip.AddrPort {
		asked.Add(1)
		return behind[client]
	}
	p := NewProxy(o)
	addr := serve(t, p)

	for _, network := range []string{"udp", "tcp"} {
		r := askFrom(t, "127.0.0.2", addr, "web.dns.podman.", dns.TypeA, network)
		if got := answerAddrs(r); r.Rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != "10.89.0.5" {
			t.Errorf("%s, client behind bridge A: %v, want engine A's 10.89.0.5 (a private address the rebinding guard would remove)", network, r)
		}
		r = askFrom(t, "127.0.0.3", addr, "WEB.dns.podman.", dns.TypeA, network)
		if got := answerAddrs(r); len(got) != 1 || got[0] != "10.89.1.5" {
			t.Errorf("%s, client behind bridge B: %v, want engine B's 10.89.1.5", network, r)
		}
	}
	if r := askFrom(t, "127.0.0.2", addr, "web.dns.podman.", dns.TypeAAAA, "udp"); len(answerAddrs(r)) != 1 {
		t.Errorf("AAAA: %v", r)
	}
	if r := askFrom(t, "127.0.0.2", addr, "dns.podman.", dns.TypeTXT, "udp"); len(r.Answer) != 1 {
		t.Errorf("the zone itself, TXT: %v", r)
	}
	if r := askFrom(t, "127.0.0.2", addr, "nothere.dns.podman.", dns.TypeA, "udp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("a name the engine does not know: %v, want its NXDOMAIN", r)
	}
	if r := askFrom(t, "127.0.0.4", addr, "web.dns.podman.", dns.TypeA, "udp"); len(answerAddrs(r)) != 1 {
		t.Errorf("first engine server dead: %v, want the next one's answer", r)
	}
	// The host itself (and any client behind no bridge): no engine to
	// ask, refused as refuse_with says, although allow.domains has the
	// zone.
	if r := askFrom(t, "127.0.0.1", addr, "web.dns.podman.", dns.TypeA, "udp"); r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
		t.Errorf("client behind no bridge: %v, want REFUSED", r)
	}
	// A longer dns.forward zone wins.
	if r := askFrom(t, "127.0.0.2", addr, "db.corp.dns.podman.", dns.TypeA, "udp"); len(answerAddrs(r)) != 1 || corp.queries.Load() != 1 {
		t.Errorf("name of a longer dns.forward zone: %v (corp asked %d times)", r, corp.queries.Load())
	}
	calls := asked.Load()
	// Other names never ask for an engine.
	if r := askFrom(t, "127.0.0.2", addr, "a.cognitive.microsoft.com.", dns.TypeA, "udp"); len(r.Answer) != 1 {
		t.Errorf("allowed name: %v", r)
	}
	if r := askFrom(t, "127.0.0.2", addr, "www.example.com.", dns.TypeA, "udp"); r.Rcode != dns.RcodeRefused {
		t.Errorf("unlisted name: %v", r)
	}
	if n := asked.Load(); n != calls {
		t.Errorf("names outside engine zones asked for an engine %d times", n-calls)
	}
	if got := rec.opened(); len(got) != 1 {
		t.Errorf("opened %v, want only a.cognitive.microsoft.com's address", got)
	}
	if up.queries.Load() != 1 {
		t.Errorf("upstream asked %d times, want 1 (engine zone names never go there)", up.queries.Load())
	}

	// The same zone in dns.forward wins; refuse_with nxdomain refuses
	// with NXDOMAIN; no EngineServers refuses every client.
	o.Forward = append(o.Forward, ForwardZone{Zone: "dns.podman", Servers: []netip.AddrPort{engineB.addr}})
	p.Update(o)
	if r := askFrom(t, "127.0.0.2", addr, "web.dns.podman.", dns.TypeA, "udp"); len(answerAddrs(r)) != 1 || answerAddrs(r)[0] != "10.89.1.5" {
		t.Errorf("dns.forward of the same zone: %v, want its server's 10.89.1.5", r)
	}
	o.Forward, o.RefuseRcode, o.EngineServers = nil, dns.RcodeNameError, nil
	p.Update(o)
	if r := askFrom(t, "127.0.0.2", addr, "web.dns.podman.", dns.TypeA, "udp"); r.Rcode != dns.RcodeNameError {
		t.Errorf("without EngineServers: %v, want refused (NXDOMAIN)", r)
	}
}

func answerAddrs(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch r := rr.(type) {
		case *dns.A:
			out = append(out, r.A.String())
		case *dns.AAAA:
			out = append(out, r.AAAA.String())
		}
	}
	return out
}

// Every query path ends within dns.query_budget: a client query resolved
// upstream, a forwarded zone's, an engine zone's and, in audit mode, a
// name that is not allowed. Each server answers after 1.5 s, within one
// try's timeout (dns.timeout, 2 s): with a budget of 1 s the client gets
// SERVFAIL after about 1 s, with 3 s the answer.
func TestQueryBudgetEveryPath(t *testing.T) {
	const delay = 1500 * time.Millisecond
	slow := startSlowServer(t, delay, map[string][]string{
		"slow.cognitive.microsoft.com.": {"slow.cognitive.microsoft.com. 60 A 203.0.113.7"},
		"kubernetes.cluster.local.":     {"kubernetes.cluster.local. 60 A 10.96.0.1"},
		"web.dns.podman.":               {"web.dns.podman. 60 A 10.89.0.5"},
		"www.example.com.":              {"www.example.com. 60 A 203.0.113.50"},
	})
	paths := []struct {
		path, name string
		options    func(*Options)
	}{
		{"upstream", "slow.cognitive.microsoft.com.", func(*Options) {}},
		{"dns.forward", "kubernetes.cluster.local.", func(o *Options) {
			o.Forward = []ForwardZone{{Zone: "cluster.local", Servers: []netip.AddrPort{slow.addr}}}
		}},
		{"dns.engine_zones", "web.dns.podman.", func(o *Options) {
			o.EngineZones = []string{"dns.podman"}
			o.EngineServers = func(netip.Addr) []netip.AddrPort { return []netip.AddrPort{slow.addr} }
		}},
		{"audit", "www.example.com.", func(o *Options) {
			o.Audit, o.AuditServers = true, []netip.AddrPort{slow.addr}
		}},
	}
	for _, budget := range []time.Duration{time.Second, 3 * time.Second} {
		for _, tt := range paths {
			t.Run(fmt.Sprintf("%s/%v", tt.path, budget), func(t *testing.T) {
				t.Parallel()
				o := testOptions()
				if o.ForwardTimeout <= delay {
					t.Fatalf("dns.timeout %v: a try must outlast the server's %v", o.ForwardTimeout, delay)
				}
				o.Rules = everyone("*.cognitive.microsoft.com")
				o.Upstream = NewUpstream([]netip.AddrPort{slow.addr}, 0, o.ForwardTimeout)
				o.Allower, o.Guard = &recorder{}, docGuard
				o.QueryBudget = budget
				tt.options(&o)
				addr := serve(t, NewProxy(o))
				m := new(dns.Msg)
				m.SetQuestion(tt.name, dns.TypeA)
				start := time.Now()
				r, _, err := (&dns.Client{Timeout: 5 * time.Second}).Exchange(m, addr)
				took := time.Since(start)
				if err != nil {
					t.Fatal(err)
				}
				if budget < delay {
					if r.Rcode != dns.RcodeServerFailure || took > budget+400*time.Millisecond {
						t.Errorf("budget %v, server answering after %v: %s after %v, want SERVFAIL after about %v",
							budget, delay, dns.RcodeToString[r.Rcode], took.Round(time.Millisecond), budget)
					}
				} else if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
					t.Errorf("budget %v, server answering after %v: %v after %v, want the answer", budget, delay, r, took.Round(time.Millisecond))
				}
			})
		}
	}
}

// startSlowServer is startUpstream answering every query after delay.
func startSlowServer(t *testing.T, delay time.Duration, zone map[string][]string) *upstreamServer {
	t.Helper()
	inner := startUpstream(t, zone)
	s := &upstreamServer{}
	s.addr = netip.MustParseAddrPort(serve(t, dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		s.queries.Add(1)
		time.Sleep(delay)
		resp, _, err := (&dns.Client{Net: "tcp"}).Exchange(r, inner.addr.String())
		if err != nil {
			t.Error(err)
			return
		}
		_ = w.WriteMsg(resp)
	})))
	return s
}
