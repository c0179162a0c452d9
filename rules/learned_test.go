package rules

import (
	"context"
	"maps"
	"net/netip"
	"testing"
	"time"
)

func TestAddrMap(t *testing.T) {
	var m addrMap[int]
	if _, ok := m.get(addr(1)); ok || m.len() != 0 {
		t.Fatal("zero addrMap not empty")
	}
	keys := []string{"198.18.0.1", "::ffff:198.18.0.1", "2001:db8::1", "0.0.0.0", "::"}
	for i, k := range keys {
		m.put(netip.MustParseAddr(k), i)
	}
	tests := []struct {
		addr string
		want int
		ok   bool
	}{
		{"198.18.0.1", 0, true},
		{"::ffff:198.18.0.1", 1, true}, // not the IPv4 address
		{"2001:db8::1", 2, true},
		{"0.0.0.0", 3, true},
		{"::", 4, true},
		{"198.18.0.2", 0, false},
		{"2001:db8::2", 0, false},
	}
	for _, tt := range tests {
		if v, ok := m.get(netip.MustParseAddr(tt.addr)); v != tt.want || ok != tt.ok {
			t.Errorf("get(%s) = %d, %v; want %d, %v", tt.addr, v, ok, tt.want, tt.ok)
		}
	}
	all := maps.Collect(m.all())
	if len(all) != len(keys) || m.len() != len(keys) {
		t.Fatalf("all = %v, len %d", all, m.len())
	}
	for i, k := range keys {
		if all[netip.MustParseAddr(k)] != i {
			t.Errorf("all[%s] = %d, want %d", k, all[netip.MustParseAddr(k)], i)
		}
	}
	c := m.clone()
	m.del(netip.MustParseAddr("198.18.0.1"))
	m.del(netip.MustParseAddr("2001:db8::1"))
	if _, ok := m.get(netip.MustParseAddr("198.18.0.1")); ok || m.len() != 3 {
		t.Errorf("after delete: len %d", m.len())
	}
	if _, ok := c.get(netip.MustParseAddr("2001:db8::1")); !ok || c.len() != 5 {
		t.Errorf("the clone changed with the original: len %d", c.len())
	}
	// Deleting while ranging is allowed.
	for a := range m.all() {
		m.del(a)
	}
	if m.len() != 0 {
		t.Errorf("%d left after deleting all", m.len())
	}
}

// LearnedSeq yields every address that stays allowed exactly once, and
// none twice, while answers add addresses and the record prunes expired
// ones between its chunks.
func TestLearnedSeqWhileChanging(t *testing.T) {
	fw := newTestFirewall(t)
	ctx := context.Background()
	const n = 5 * learnedChunk
	var stay []netip.Addr
	for i := uint32(1); i <= n; i++ {
		stay = append(stay, addr(i))
	}
	stay = append(stay, netip.MustParseAddr("2001:db8::1"))
	if err := fw.Allow(ctx, "stay.example.", stay, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	var short []netip.Addr
	for i := uint32(n + 1); i <= n+100; i++ {
		short = append(short, addr(i))
	}
	if err := fw.Allow(ctx, "short.example.", short, time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1200 * time.Millisecond) // short expires
	all, version := fw.LearnedSeq()
	seen := map[netip.Addr]int{}
	next := uint32(n + 1000)
	for e := range all {
		seen[e.Addr]++
		if e.Names == "stay.example." && e.Expires.Before(time.Now().Add(50*time.Minute)) {
			t.Fatalf("%+v: wrong record", e)
		}
		if len(seen)%100 == 0 {
			// An answer while the sequence is consumed.
			next++
			if err := fw.Allow(ctx, "new.example.", []netip.Addr{addr(next)}, time.Now().Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, a := range stay {
		if seen[a] != 1 {
			t.Errorf("%v seen %d times", a, seen[a])
		}
	}
	for a, k := range seen {
		if k != 1 {
			t.Errorf("%v seen %d times", a, k)
		}
	}
	for _, a := range short {
		if seen[a] != 0 {
			t.Errorf("expired %v seen", a)
		}
		if _, ok := fw.Names(a); ok {
			t.Errorf("expired %v not pruned", a)
		}
	}
	if fw.Version() == version {
		t.Error("answers during the sequence did not change the version")
	}
	// Stopping early releases the Firewall.
	for range all {
		break
	}
	if _, ok := fw.Lookup(stay[0]); !ok {
		t.Error("lookup after an early stop")
	}
	if l, _ := fw.Learned(); len(l) != len(stay)+int(next-n-1000) {
		t.Errorf("Learned: %d, want %d", len(l), len(stay)+int(next-n-1000))
	}
}
