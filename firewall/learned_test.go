package firewall

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"testing"
	"time"
)

func TestLearnedMap(t *testing.T) {
	var m learnedMap
	if _, ok := m.get(addr(1)); ok || m.len() != 0 {
		t.Fatal("zero learnedMap not empty")
	}
	rec := func(i int) learnedAddr {
		if i == 3 {
			return learnedAddr{until: -1} // no names; before 1970
		}
		return learnedAddr{until: int64(i) << 33, names: fmt.Sprintf("n%d.example.", i)}
	}
	keys := []string{"198.18.0.1", "::ffff:198.18.0.1", "2001:db8::1", "0.0.0.0", "::"}
	for i, k := range keys {
		m.put(netip.MustParseAddr(k), rec(i))
	}
	tests := []struct {
		addr string
		want learnedAddr
		ok   bool
	}{
		{"198.18.0.1", rec(0), true},
		{"::ffff:198.18.0.1", rec(1), true}, // not the IPv4 address
		{"2001:db8::1", rec(2), true},
		{"0.0.0.0", rec(3), true},
		{"::", rec(4), true},
		{"198.18.0.2", learnedAddr{}, false},
		{"2001:db8::2", learnedAddr{}, false},
	}
	for _, tt := range tests {
		if l, ok := m.get(netip.MustParseAddr(tt.addr)); l != tt.want || ok != tt.ok {
			t.Errorf("get(%s) = %+v, %v; want %+v, %v", tt.addr, l, ok, tt.want, tt.ok)
		}
	}
	all := maps.Collect(m.all())
	if len(all) != len(keys) || m.len() != len(keys) {
		t.Fatalf("all = %v, len %d", all, m.len())
	}
	for i, k := range keys {
		if all[netip.MustParseAddr(k)] != rec(i) {
			t.Errorf("all[%s] = %+v, want %+v", k, all[netip.MustParseAddr(k)], rec(i))
		}
	}
	if u := maps.Collect(untils(&m)); u[netip.MustParseAddr("2001:db8::1")] != rec(2).until || len(u) != len(keys) {
		t.Errorf("untils = %v", u)
	}
	c := m.clone()
	// Changed names, names dropped, deleted: the clone keeps its own.
	m.put(netip.MustParseAddr("198.18.0.1"), learnedAddr{until: 5, names: "other.example."})
	m.put(netip.MustParseAddr("::"), learnedAddr{until: 5})
	m.del(netip.MustParseAddr("2001:db8::1"))
	m.del(netip.MustParseAddr("2001:db8::2")) // absent
	if l, _ := m.get(netip.MustParseAddr("198.18.0.1")); l != (learnedAddr{5, "other.example."}) {
		t.Errorf("after a change: %+v", l)
	}
	if l, _ := m.get(netip.MustParseAddr("::")); l != (learnedAddr{until: 5}) {
		t.Errorf("after dropping the names: %+v", l)
	}
	if _, ok := m.get(netip.MustParseAddr("2001:db8::1")); ok || m.len() != 4 {
		t.Errorf("after delete: len %d", m.len())
	}
	for i, k := range keys {
		if l, ok := c.get(netip.MustParseAddr(k)); !ok || l != rec(i) {
			t.Errorf("the clone changed with the original: %s: %+v", k, l)
		}
	}
	// Ids given back are reused: the table does not grow.
	used := m.names.used
	for i := range 3 {
		a := netip.MustParseAddr("2001:db8::1")
		m.put(a, learnedAddr{until: 1, names: fmt.Sprint("again", i)})
		m.del(a)
	}
	if m.names.used != used {
		t.Errorf("%d ids handed out, want %d", m.names.used, used)
	}
	// Deleting while ranging is allowed; an empty map drops its tables.
	for a := range m.all() {
		m.del(a)
	}
	if m.len() != 0 || m.v4 != nil || m.v6 != nil || m.names.pages != nil {
		t.Errorf("after deleting all: %+v", m)
	}
}

// Many addresses: ids across pages, each address its names.
func TestLearnedMapMany(t *testing.T) {
	var m learnedMap
	const n = 3*namePage + 10
	for i := range uint32(n) {
		m.put(addr(i), learnedAddr{until: int64(i), names: fmt.Sprint(i)})
	}
	for i := uint32(0); i < n; i += 2 {
		m.del(addr(i))
	}
	for i := uint32(0); i < n; i += 2 {
		m.put(addr(i), learnedAddr{until: int64(i), names: fmt.Sprint("x", i)})
	}
	for i := range uint32(n) {
		want := fmt.Sprint(i)
		if i%2 == 0 {
			want = "x" + want
		}
		if l, ok := m.get(addr(i)); !ok || l.names != want || l.until != int64(i) {
			t.Fatalf("%v: %+v, want %s", addr(i), l, want)
		}
	}
	if m.names.used != n || len(m.names.pages) != 4 {
		t.Errorf("%d ids in %d pages", m.names.used, len(m.names.pages))
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
	if err := fw.Allow(ctx, "stay.example.", allowRule, stay, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	var short []netip.Addr
	for i := uint32(n + 1); i <= n+100; i++ {
		short = append(short, addr(i))
	}
	if err := fw.Allow(ctx, "short.example.", allowRule, short, time.Now().Add(time.Second)); err != nil {
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
			if err := fw.Allow(ctx, "new.example.", allowRule, []netip.Addr{addr(next)}, time.Now().Add(time.Hour)); err != nil {
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
	if _, ok := lookupOne(fw, stay[0]); !ok {
		t.Error("lookup after an early stop")
	}
	if l, _ := fw.Learned(); len(l) != len(stay)+int(next-n-1000) {
		t.Errorf("Learned: %d, want %d", len(l), len(stay)+int(next-n-1000))
	}
}
