package dnsresolve

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestLimiterBounds(t *testing.T) {
	a, b := netip.MustParseAddr("172.30.0.2"), netip.MustParseAddr("172.30.0.3")
	l := testOptions().Limits
	l.TCPConnectionsPerClient, l.TCPConnections, l.InFlightPerClient, l.Clients, l.RatePerClient = 2, 3, 2, 4, 0
	lm := newLimiter(l, slog.New(slog.DiscardHandler), nil)

	// TCP: per client, then in total; closing frees the slot.
	for i, want := range []bool{true, true, false} {
		if got := lm.openTCP(a); got != want {
			t.Errorf("tcp %d of a: %v, want %v", i, got, want)
		}
	}
	if first, second := lm.openTCP(b), lm.openTCP(b); !first || second {
		t.Errorf("b's first connection must pass (a's bound is a's), its second meets the total")
	}
	lm.closeTCP(a)
	if !lm.openTCP(b) {
		t.Errorf("b's second connection must pass once a closed one (total back to 2)")
	}
	if _, tcp := lm.stats(); tcp != 3 {
		t.Errorf("open TCP connections = %d, want 3", tcp)
	}

	// In flight: a's bound does not touch b.
	if first, second, third := lm.begin(a, false), lm.begin(a, false), lm.begin(a, false); !first || !second || third {
		t.Errorf("a: two in flight pass, the third must not")
	}
	if !lm.begin(b, false) {
		t.Errorf("b must not feel a's bound")
	}
	lm.end(a)
	if !lm.begin(a, false) {
		t.Errorf("a: a slot freed by end must be usable")
	}

	// The table holds at most Clients entries; busy ones are never
	// forgotten, idle ones are.
	for i := range 10 {
		c := netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})
		if lm.begin(c, false) {
			lm.end(c)
		}
	}
	if n, _ := lm.stats(); n > 4 {
		t.Errorf("tracked clients = %d, want at most 4", n)
	}
	if lm.begin(a, false) { // a still has 2 in flight: its entry survived
		t.Errorf("a's in-flight count was forgotten by a sweep")
	}
}

func TestLimiterRate(t *testing.T) {
	a, b := netip.MustParseAddr("172.30.0.2"), netip.MustParseAddr("172.30.0.3")
	l := testOptions().Limits
	l.RatePerClient = 10
	lm := newLimiter(l, slog.New(slog.DiscardHandler), nil)
	passed := 0
	for range 100 {
		if lm.admitPacket(a) {
			passed++
		}
	}
	if passed < 15 || passed > 25 { // burst of 2 s worth
		t.Errorf("a burst of 100 passed %d, want about 20", passed)
	}
	if !lm.admitPacket(b) {
		t.Errorf("b must not feel a's rate")
	}
	l.RatePerClient = 0
	off := newLimiter(l, slog.New(slog.DiscardHandler), nil)
	for range 1000 {
		if !off.admitPacket(a) {
			t.Fatal("rate 0 must not limit")
		}
	}
}

// TestProxyTCPLimits runs the real listeners: a client over its TCP bound
// is reset at once while another client is served, and a slow partial
// query is cut at the read timeout.
func TestProxyTCPLimits(t *testing.T) {
	p, _, _ := newTestProxy(t, &recorder{})
	l := testOptions().Limits
	l.TCPConnectionsPerClient, l.TCPReadTimeout, l.TCPIdleTimeout = 2, 300*time.Millisecond, 300*time.Millisecond
	p.limits.update(l, nil)
	server := net.JoinHostPort("127.0.0.1", strconv.Itoa(serveProxy(t, p)))
	dialFrom := func(src string) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", server)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dialFrom("127.0.0.1")
	dialFrom("127.0.0.1")
	// The third is reset as soon as it is accepted: on loopback the
	// reset may already fail the connect.
	if third, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.1")}}).Dial("tcp", server); err == nil {
		_ = third.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := third.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Errorf("third connection of one client: read %v, want it closed at once", err)
		}
		third.Close()
	}
	// Another client address is served meanwhile.
	other := dialFrom("127.0.0.2")
	m := new(dns.Msg)
	m.SetQuestion("a.cognitive.microsoft.com.", dns.TypeA)
	co := &dns.Conn{Conn: other}
	if err := co.WriteMsg(m); err != nil {
		t.Fatal(err)
	}
	_ = other.SetReadDeadline(time.Now().Add(2 * time.Second))
	if r, err := co.ReadMsg(); err != nil || len(r.Answer) != 1 {
		t.Errorf("other client over TCP: %v %v", r, err)
	}
	// A slow partial query: one byte of the length prefix, then nothing.
	slow := dialFrom("127.0.0.3")
	start := time.Now()
	_, _ = slow.Write([]byte{0})
	_ = slow.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := io.ReadAll(slow)
	if took := time.Since(start); isTimeout(err) || took > 1500*time.Millisecond {
		t.Errorf("slow partial query: closed after %v (%v), want about 300ms", took, err)
	}
	if n := testutilLimited(p); n == 0 {
		t.Errorf("no limited connection counted")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func testutilLimited(p *Proxy) int {
	p.limits.logMu.Lock()
	defer p.limits.logMu.Unlock()
	return len(p.limits.logged)
}
