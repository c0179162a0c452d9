package dnsresolve

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestUpstreamFailoverAndHealth(t *testing.T) {
	up := startUpstream(t, testZone)
	// A port nothing listens on: the query is refused at once.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := netip.MustParseAddrPort(pc.LocalAddr().String())
	pc.Close()

	u := NewUpstream([]netip.AddrPort{dead, up.addr}, 0, time.Second)
	ctx := context.Background()
	for range 3 {
		r, err := u.Exchange(ctx, "a.cognitive.microsoft.com", dns.TypeA)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("exchange with a dead first upstream: %v %v", r, err)
		}
	}
	h := u.Health()
	if h[0].Healthy() || h[0].LastError == "" || !h[1].Healthy() || h[1].LastOK.IsZero() {
		t.Errorf("health: %+v", h)
	}
	if n := up.queries.Load(); n != 3 {
		t.Errorf("live upstream asked %d times, want 3: the dead one is skipped once it failed", n)
	}
}

// Every query leaves from a socket of its own: a new source port each
// time, so an off-path forger cannot aim at a known long-lived port.
func TestUpstreamFreshSourcePort(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ports := map[int]bool{}
	var mu sync.Mutex
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		mu.Lock()
		ports[w.RemoteAddr().(*net.UDPAddr).Port] = true
		mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(r)
		_ = w.WriteMsg(m)
	})}
	go func() { _ = srv.ActivateAndServe() }()
	defer func() { _ = srv.Shutdown() }()
	u := NewUpstream([]netip.AddrPort{netip.MustParseAddrPort(pc.LocalAddr().String())}, 0, time.Second)
	for range 10 {
		if _, err := u.Exchange(context.Background(), "a.cognitive.microsoft.com", dns.TypeA); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ports) != 10 {
		t.Errorf("10 queries came from %d source ports, want 10", len(ports))
	}
}

// An answer from the server's address with the wrong ID is skipped, and
// one for another question is refused.
func TestUpstreamChecksIDAndQuestion(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			wrongID := new(dns.Msg)
			wrongID.SetReply(q)
			wrongID.Id++
			rr, _ := dns.NewRR(q.Question[0].Name + " 60 IN A 203.0.113.66")
			wrongID.Answer = append(wrongID.Answer, rr)
			out, _ := wrongID.Pack()
			_, _ = pc.WriteTo(out, from)
			other := new(dns.Msg)
			other.SetReply(q)
			other.Question[0].Name = "evil.example."
			out, _ = other.Pack()
			_, _ = pc.WriteTo(out, from)
		}
	}()
	u := NewUpstream([]netip.AddrPort{netip.MustParseAddrPort(pc.LocalAddr().String())}, 0, 500*time.Millisecond)
	r, err := u.Exchange(context.Background(), "a.cognitive.microsoft.com", dns.TypeA)
	if err == nil {
		t.Fatalf("accepted %v", r)
	}
	if !strings.Contains(err.Error(), "does not match the question") {
		t.Errorf("error %v, want the question mismatch (the wrong ID skipped)", err)
	}
}

// benchUpstream serves one A record on a loopback UDP port.
func benchUpstream(b *testing.B) netip.AddrPort {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		rr, _ := dns.NewRR(r.Question[0].Name + " 60 IN A 203.0.113.10")
		m.Answer = append(m.Answer, rr)
		_ = w.WriteMsg(m)
	})}
	go func() { _ = srv.ActivateAndServe() }()
	b.Cleanup(func() { _ = srv.Shutdown() })
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// BenchmarkUpstreamExchange measures one upstream query over loopback,
// from 8 concurrent callers per CPU: the cost of a fresh socket (and source
// port) per query.
func BenchmarkUpstreamExchange(b *testing.B) {
	u := NewUpstream([]netip.AddrPort{benchUpstream(b)}, 0, time.Second)
	defer u.Close()
	ctx := context.Background()
	b.SetParallelism(8)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := u.Exchange(ctx, "a.cognitive.microsoft.com", dns.TypeA); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
