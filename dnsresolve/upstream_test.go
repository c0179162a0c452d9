package dnsresolve

import (
	"context"
	"net"
	"net/netip"
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
	// Closing drops idle sockets; queries still work with new ones.
	u.Close()
	if _, err := u.Exchange(ctx, "a.cognitive.microsoft.com", dns.TypeA); err != nil {
		t.Errorf("after Close: %v", err)
	}
	for s, idle := range u.idle {
		if len(idle) != 0 {
			t.Errorf("%s keeps %d idle sockets after Close", s, len(idle))
		}
	}
}
