package dnsresolve

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// upstreamServer is a real UDP+TCP DNS server on loopback that answers
// from a fixed zone and counts the queries it got.
type upstreamServer struct {
	addr    netip.AddrPort
	queries atomic.Int32
}

func startUpstream(t testing.TB, zone map[string][]string) *upstreamServer {
	t.Helper()
	u := &upstreamServer{}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		u.queries.Add(1)
		m := new(dns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		lines, ok := zone[dns.CanonicalName(q.Name)]
		if !ok {
			m.Rcode = dns.RcodeNameError
		}
		for _, l := range lines {
			rr, err := dns.NewRR(l)
			if err != nil {
				t.Error(err)
				continue
			}
			if rr.Header().Rrtype == q.Qtype || rr.Header().Rrtype == dns.TypeCNAME {
				m.Answer = append(m.Answer, rr)
			}
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := 512
			if o := r.IsEdns0(); o != nil {
				size = int(o.UDPSize())
			}
			m.Truncate(size)
		}
		_ = w.WriteMsg(m)
	})
	u.addr = netip.MustParseAddrPort(serve(t, h))
	return u
}

// recorder is an Allower that records what it was asked to open.
type recorder struct {
	mu    sync.Mutex
	addrs []netip.Addr
	until time.Time
	err   error
}

func (r *recorder) Allow(_ context.Context, _ string, _ []string, addrs []netip.Addr, until time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return r.err
	}
	r.addrs = append(r.addrs, addrs...)
	r.until = until
	return nil
}

func (r *recorder) opened() []netip.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]netip.Addr(nil), r.addrs...)
}

var testZone = map[string][]string{
	"a.cognitive.microsoft.com.":         {"a.cognitive.microsoft.com. 0 A 203.0.113.1"},
	"myres.cognitiveservices.azure.com.": {"myres.cognitiveservices.azure.com. 60 CNAME edge.azurefd.test."},
	"edge.azurefd.test.":                 {"edge.azurefd.test. 60 A 203.0.113.20", "edge.azurefd.test. 60 AAAA 2001:db8::20"},
	"mixed.cognitive.microsoft.com.":     {"mixed.cognitive.microsoft.com. 60 A 10.0.0.1", "mixed.cognitive.microsoft.com. 60 A 203.0.113.2"},
	"big.cognitive.microsoft.com.":       bigRRset(),
	"long.cognitive.microsoft.com.":      {"long.cognitive.microsoft.com. 2147483647 CNAME far.azurefd.test.", "far.azurefd.test. 2147483647 A 203.0.113.3"},
}

func bigRRset() []string {
	var out []string
	for i := 1; i <= 60; i++ {
		out = append(out, "big.cognitive.microsoft.com. 60 A 203.0.114."+itoa(i))
	}
	return out
}

func itoa(i int) string { return netip.AddrFrom4([4]byte{0, 0, 0, byte(i)}).String()[6:] }

// serve answers DNS with p over UDP and TCP on one loopback port and
// returns its address.
func serve(t testing.TB, p dns.Handler) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*dns.Server{{PacketConn: pc, Handler: p}, {Listener: ln, Handler: p}} {
		go func() { _ = s.ActivateAndServe() }()
		t.Cleanup(func() { _ = s.Shutdown() })
	}
	return pc.LocalAddr().String()
}

func newTestProxy(t testing.TB, allow Allower) (*Proxy, *upstreamServer, string) {
	up := startUpstream(t, testZone)
	o := testOptions()
	o.Rules = everyone("*.cognitive.microsoft.com", "*.cognitiveservices.azure.com")
	o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
	o.Allower, o.Guard = allow, docGuard
	o.MinTTL, o.Grace = time.Second, 2*time.Second
	p := NewProxy(o)
	return p, up, net.JoinHostPort("127.0.0.1", strconv.Itoa(serveProxy(t, p)))
}

// serveProxy runs p.Serve on a free port of every address until the test
// ends, and returns the port.
func serveProxy(t testing.TB, p *Proxy) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- p.Serve(ctx, port, func() { close(ready) }) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	return port
}

func ask(t *testing.T, server, name string, qtype uint16, network string, edns bool) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 4242
	if edns {
		m.SetEdns0(4096, false)
	}
	r, _, err := (&dns.Client{Net: network}).Exchange(m, server)
	if err != nil {
		t.Fatalf("%s %s: %v", name, dns.TypeToString[qtype], err)
	}
	if r.Id != 4242 || r.Question[0].Name != name {
		t.Errorf("reply does not keep the client's ID and question: %v", r)
	}
	return r
}

func TestProxy(t *testing.T) {
	rec := &recorder{}
	_, up, addr := newTestProxy(t, rec)

	// An allowed name: answered, and its address opened first.
	r := ask(t, addr, "A.Cognitive.Microsoft.com.", dns.TypeA, "udp", false)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || !r.RecursionAvailable {
		t.Fatalf("allowed name: %v", r)
	}
	if got := rec.opened(); len(got) != 1 || got[0].String() != "203.0.113.1" {
		t.Errorf("opened %v", got)
	}
	if life := time.Until(rec.until); life < 2*time.Second || life > 3*time.Second {
		t.Errorf("TTL 0 opened for %v, want max(0, 1s) + 2s", life)
	}

	// A CNAME chain: the chain and the final address.
	r = ask(t, addr, "myres.cognitiveservices.azure.com.", dns.TypeAAAA, "udp", true)
	if len(r.Answer) != 2 || r.IsEdns0() == nil {
		t.Errorf("CNAME chain answer: %v", r)
	}
	if got := rec.opened(); got[len(got)-1].String() != "2001:db8::20" {
		t.Errorf("opened %v", got)
	}

	// Rebinding: the private address is removed from the answer.
	r = ask(t, addr, "mixed.cognitive.microsoft.com.", dns.TypeA, "udp", false)
	if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "203.0.113.2" {
		t.Errorf("rebinding guard: %v", r.Answer)
	}

	// Not allowed: refused for every type, upstream never asked.
	before := up.queries.Load()
	for _, qt := range []uint16{dns.TypeA, dns.TypeTXT, dns.TypeAAAA, dns.TypeMX} {
		for _, name := range []string{"www.example.com.", "cognitive.microsoft.com."} {
			if r := ask(t, addr, name, qt, "udp", false); r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
				t.Errorf("%s %s: %v", name, dns.TypeToString[qt], r)
			}
		}
	}
	// Allowed name, other type: empty answer, upstream never asked.
	for _, qt := range []uint16{dns.TypeTXT, dns.TypeHTTPS, dns.TypeSVCB} {
		if r := ask(t, addr, "a.cognitive.microsoft.com.", qt, "udp", false); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
			t.Errorf("%s: %v", dns.TypeToString[qt], r)
		}
	}
	if n := up.queries.Load() - before; n != 0 {
		t.Errorf("upstream asked %d times for names or types that are not resolved", n)
	}
}

func TestProxyTruncation(t *testing.T) {
	rec := &recorder{}
	_, _, addr := newTestProxy(t, rec)
	r := ask(t, addr, "big.cognitive.microsoft.com.", dns.TypeA, "udp", false)
	if !r.Truncated {
		t.Errorf("60 A records over UDP without EDNS0: not truncated (%d records)", len(r.Answer))
	}
	if len(rec.opened()) != 60 {
		t.Errorf("opened %d addresses, want all 60 even when the UDP answer is truncated", len(rec.opened()))
	}
	r = ask(t, addr, "big.cognitive.microsoft.com.", dns.TypeA, "tcp", false)
	if r.Truncated || len(r.Answer) != 60 {
		t.Errorf("over TCP: truncated %v, %d records", r.Truncated, len(r.Answer))
	}
}

func TestProxyServfailWhenFirewallFails(t *testing.T) {
	rec := &recorder{err: errors.New("netlink: no buffer space")}
	_, _, addr := newTestProxy(t, rec)
	r := ask(t, addr, "a.cognitive.microsoft.com.", dns.TypeA, "udp", false)
	if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
		t.Errorf("firewall failure answered %v, want SERVFAIL without addresses", r)
	}
}

func TestProxyMalformed(t *testing.T) {
	_, _, addr := newTestProxy(t, &recorder{})
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, junk := range [][]byte{{}, {1, 2, 3}, make([]byte, 12), {0, 1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0xff}} {
		_, _ = conn.Write(junk)
	}
	// Still serving.
	if r := ask(t, addr, "a.cognitive.microsoft.com.", dns.TypeA, "udp", false); r.Rcode != dns.RcodeSuccess {
		t.Errorf("after junk: %v", r)
	}
}

// A cached answer is served without asking upstream, and still reopens its
// addresses: the firewall must never expire an address a client was just
// given.
func TestProxyCacheHitReopens(t *testing.T) {
	rec := &recorder{}
	_, up, addr := newTestProxy(t, rec)
	for range 3 {
		r := ask(t, addr, "myres.cognitiveservices.azure.com.", dns.TypeA, "udp", false)
		if len(r.Answer) != 2 {
			t.Fatalf("answer: %v", r)
		}
	}
	// One question upstream for the chain, one for its incomplete end.
	if n := up.queries.Load(); n != 2 {
		t.Errorf("upstream asked %d times for three identical questions, want 2", n)
	}
	if got := rec.opened(); len(got) != 3 {
		t.Errorf("addresses opened %d times, want once per answer (3)", len(got))
	}
}

// TTLs are capped: in the answer, in the cache and in the firewall, so no
// client keeps an address longer than the firewall keeps it open.
func TestProxyCapsTTL(t *testing.T) {
	for _, tt := range []struct {
		maxTTL time.Duration
		want   uint32
	}{{100 * time.Second, 100}, {testOptions().MaxTTL, uint32(testOptions().MaxTTL / time.Second)}} {
		rec := &recorder{}
		up := startUpstream(t, testZone)
		o := testOptions()
		o.Rules = everyone("*.cognitive.microsoft.com")
		o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
		o.Allower, o.Guard = rec, docGuard
		o.MinTTL, o.MaxTTL, o.Grace = time.Second, tt.maxTTL, 2*time.Second
		p := NewProxy(o)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(serveProxy(t, p)))
		for i := range 2 { // the second answer comes from the cache
			r := ask(t, addr, "long.cognitive.microsoft.com.", dns.TypeA, "udp", false)
			if len(r.Answer) != 2 {
				t.Fatalf("answer: %v", r)
			}
			for _, rr := range r.Answer {
				if ttl := rr.Header().Ttl; ttl > tt.want || ttl < tt.want-2 {
					t.Errorf("max %v, answer %d: %s has TTL %d, want %d", tt.maxTTL, i, rr.Header().Name, ttl, tt.want)
				}
			}
			rec.mu.Lock()
			life := time.Until(rec.until)
			rec.mu.Unlock()
			if max := time.Duration(tt.want)*time.Second + 2*time.Second; life > max || life < max-3*time.Second {
				t.Errorf("max %v, answer %d: opened for %v, want %v", tt.maxTTL, i, life, max)
			}
		}
		if n := up.queries.Load(); n != 1 {
			t.Errorf("upstream asked %d times, want 1 (cached)", n)
		}
	}
}
