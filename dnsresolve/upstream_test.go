package dnsresolve

import (
	"context"
	"net"
	"net/netip"
	"slices"
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
	ctx := budget(t)
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
		if _, err := u.Exchange(budget(t), "a.cognitive.microsoft.com", dns.TypeA); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ports) != 10 {
		t.Errorf("10 queries came from %d source ports, want 10", len(ports))
	}
}

// Answers from the server's address with the wrong ID or for another
// question are ignored: the try waits for the real answer, and without one
// the query fails within its budget, having opened nothing.
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
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	r, err := u.Exchange(ctx, "a.cognitive.microsoft.com", dns.TypeA)
	if err == nil {
		t.Fatalf("accepted %v", r)
	}
	if took := time.Since(start); took > 1700*time.Millisecond {
		t.Errorf("took %v, beyond the 1.5 s budget", took)
	}
	if !strings.Contains(err.Error(), "ignored 2 datagrams") {
		t.Errorf("error %v, want the wrong ID and the wrong question ignored", err)
	}
}

// benchUpstream answers every query on a loopback UDP port with one A
// record, made by hand from the query: the benchmark measures the client,
// not a server.
func benchUpstream(b *testing.B) netip.AddrPort {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pc.Close() })
	serve := func() {
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf[:512])
			if err != nil {
				return
			}
			end := 12 // after the question's name
			for end < n && buf[end] != 0 {
				end += int(buf[end]) + 1
			}
			end += 5 // root label, type, class
			if n < 12 || end > n {
				continue
			}
			buf[2] |= 0x80                                                                     // QR
			buf[7], buf[9], buf[11] = 1, 0, 0                                                  // one answer, nothing else
			out := append(buf[:end], 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 10) // name pointer, A, IN, TTL, address
			_, _ = pc.WriteToUDPAddrPort(out, from)
		}
	}
	go serve()
	go serve()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// BenchmarkUpstreamExchange measures one upstream query over loopback,
// from 8 concurrent callers per CPU: the cost of a fresh socket (and source
// port) per query.
func BenchmarkUpstreamExchange(b *testing.B) {
	u := NewUpstream([]netip.AddrPort{benchUpstream(b)}, 0, time.Second)
	defer u.Close()
	// Exchange needs a deadline; one for the whole run keeps a timer per
	// query out of the measurement.
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
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

// faultyServer is a loopback UDP DNS server whose behaviour per query is
// chosen by mode: "ok", "servfail", "blackhole", "garbage" (garbage first,
// then the answer), "slow" (answer after delay).
type faultyServer struct {
	addr    netip.AddrPort
	mu      sync.Mutex
	mode    string
	delay   time.Duration
	queries int
}

func startFaulty(t *testing.T, mode string) *faultyServer {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	f := &faultyServer{addr: netip.MustParseAddrPort(pc.LocalAddr().String()), mode: mode}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			f.mu.Lock()
			f.queries++
			mode, delay := f.mode, f.delay
			f.mu.Unlock()
			m := new(dns.Msg)
			m.SetReply(q)
			rr, _ := dns.NewRR(q.Question[0].Name + " 60 IN A 203.0.113.1")
			m.Answer = append(m.Answer, rr)
			switch mode {
			case "blackhole":
				continue
			case "servfail":
				m.Answer, m.Rcode = nil, dns.RcodeServerFailure
			case "garbage":
				_, _ = pc.WriteTo([]byte("\x00\x01garbage that is no DNS message"), from)
			}
			out, _ := m.Pack()
			go func() {
				time.Sleep(delay)
				_, _ = pc.WriteTo(out, from)
			}()
		}
	}()
	return f
}

func (f *faultyServer) set(mode string, delay time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mode, f.delay = mode, delay
}

func (f *faultyServer) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queries
}

// TestUpstreamFaults: whatever the servers do, a query ends within its
// budget, a healthy server is preferred from then on, and a late answer
// still counts.
func TestUpstreamFaults(t *testing.T) {
	ask := func(u *Upstream, budget time.Duration) (*dns.Msg, time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), budget)
		defer cancel()
		start := time.Now()
		r, err := u.Exchange(ctx, "a.cognitive.microsoft.com", dns.TypeA)
		return r, time.Since(start), err
	}
	t.Run("black hole then healthy", func(t *testing.T) {
		hole, good := startFaulty(t, "blackhole"), startFaulty(t, "ok")
		u := NewUpstream([]netip.AddrPort{hole.addr, good.addr}, 0, 300*time.Millisecond)
		if _, took, err := ask(u, 2*time.Second); err != nil || took > 400*time.Millisecond {
			t.Fatalf("first query: %v after %v, want an answer after one timeout", err, took)
		}
		for range 10 {
			if _, took, err := ask(u, 2*time.Second); err != nil || took > 50*time.Millisecond {
				t.Fatalf("later query: %v after %v, want the healthy server at once", err, took)
			}
		}
		if n := hole.count(); n != 1 {
			t.Errorf("black hole asked %d times, want 1: the healthy server stays preferred", n)
		}
	})
	t.Run("all black holes", func(t *testing.T) {
		a, b := startFaulty(t, "blackhole"), startFaulty(t, "blackhole")
		u := NewUpstream([]netip.AddrPort{a.addr, b.addr}, 0, 300*time.Millisecond)
		if _, took, err := ask(u, time.Second); err == nil || took > 1100*time.Millisecond {
			t.Errorf("%v after %v, want an error within the 1 s budget", err, took)
		}
		if n := a.count() + b.count(); n > maxTries {
			t.Errorf("%d tries, want at most %d", n, maxTries)
		}
	})
	t.Run("servfail", func(t *testing.T) {
		bad, good := startFaulty(t, "servfail"), startFaulty(t, "ok")
		u := NewUpstream([]netip.AddrPort{bad.addr}, 0, time.Second)
		if _, took, err := ask(u, 2*time.Second); err == nil || took > 100*time.Millisecond || bad.count() != 1 {
			t.Errorf("only SERVFAIL: %v after %v and %d tries, want an error at once after one", err, took, bad.count())
		}
		u = NewUpstream([]netip.AddrPort{bad.addr, good.addr}, 0, time.Second)
		for range 3 {
			if r, _, err := ask(u, 2*time.Second); err != nil || len(r.Answer) != 1 {
				t.Fatalf("SERVFAIL then healthy: %v %v", r, err)
			}
		}
		if n := bad.count(); n != 2 {
			t.Errorf("SERVFAIL server asked %d times in all, want 2 (once per Upstream)", n)
		}
	})
	t.Run("garbage", func(t *testing.T) {
		g := startFaulty(t, "garbage")
		u := NewUpstream([]netip.AddrPort{g.addr}, 0, time.Second)
		if r, _, err := ask(u, 2*time.Second); err != nil || len(r.Answer) != 1 {
			t.Errorf("garbage before the answer: %v %v, want the answer", r, err)
		}
	})
	t.Run("late answer", func(t *testing.T) {
		s := startFaulty(t, "ok")
		u := NewUpstream([]netip.AddrPort{s.addr}, 0, 2*time.Second)
		for range 5 { // learn a short round trip: the next try waits minRTO
			if _, _, err := ask(u, time.Second); err != nil {
				t.Fatal(err)
			}
		}
		s.set("slow", 300*time.Millisecond)
		r, took, err := ask(u, 2*time.Second)
		if err != nil || len(r.Answer) != 1 || took > 390*time.Millisecond {
			t.Errorf("slow answer: %v after %v, want it accepted after about 300ms", err, took)
		}
		if n := s.count(); n != 7 {
			t.Errorf("%d queries, want 7: one retransmission at the timeout, the first try still listening", n)
		}
	})
}

// packUpstreamQuery packs exactly what dns.Msg packs for the same query.
func TestPackQuery(t *testing.T) {
	for _, tc := range []struct {
		name  string
		qtype uint16
	}{{"a.cognitive.microsoft.com.", dns.TypeA}, {"x.", dns.TypeAAAA}, {strings.Repeat("a.", 127), dns.TypeHTTPS}} {
		got, err := packUpstreamQuery(tc.name, tc.qtype)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		q := new(dns.Msg)
		q.SetQuestion(tc.name, tc.qtype)
		q.SetEdns0(dns.DefaultMsgSize, false)
		q.Id = 0
		want, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Errorf("%s:\n got %x\nwant %x", tc.name, got, want)
		}
	}
	if _, err := packUpstreamQuery(strings.Repeat("a.", 128), dns.TypeA); err == nil {
		t.Error("a name longer than 255 bytes was packed")
	}
}

// order: servers up first, from the preferred one on in configured order,
// then those down, the one back soonest first.
func TestUpstreamOrder(t *testing.T) {
	ap := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	u := NewUpstream([]netip.AddrPort{ap("192.0.2.1:53"), ap("192.0.2.2:53"), ap("192.0.2.3:53"), ap("192.0.2.4:53")}, 0, time.Second)
	now := time.Now()
	for _, tc := range []struct {
		preferred uint32
		down      map[int]time.Duration
		want      []int
	}{
		{0, nil, []int{0, 1, 2, 3}},
		{2, nil, []int{2, 3, 0, 1}},
		{1, map[int]time.Duration{0: 2 * time.Second, 2: time.Second}, []int{1, 3, 2, 0}},
		{3, map[int]time.Duration{3: time.Second, 1: time.Minute, 0: time.Minute}, []int{2, 3, 0, 1}},
	} {
		for i := range u.state {
			u.state[i].downUntil = time.Time{}
			if d, ok := tc.down[i]; ok {
				u.state[i].downUntil = now.Add(d)
			}
		}
		u.preferred.Store(tc.preferred)
		if got := u.order(); !slices.Equal(got, tc.want) {
			t.Errorf("preferred %d, down %v: order %v, want %v", tc.preferred, tc.down, got, tc.want)
		}
	}
}

// BenchmarkPackUpstreamQuery compares packUpstreamQuery with packing the
// same query as a dns.Msg.
func BenchmarkPackUpstreamQuery(b *testing.B) {
	const name = "a.cognitive.microsoft.com."
	b.Run("wire", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := packUpstreamQuery(name, dns.TypeA); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("dns.Msg", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			q := new(dns.Msg)
			q.SetQuestion(name, dns.TypeA)
			q.SetEdns0(dns.DefaultMsgSize, false)
			q.Id = 0
			if _, err := q.Pack(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
