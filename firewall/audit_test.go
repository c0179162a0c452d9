package firewall

import (
	"context"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/rules"
)

// kernelElement is an element of a learned set: its address and when it
// expires (Unix ms; 0: never).
type kernelElement struct {
	addr    netip.Addr
	expires int64
}

// readKernel reads the learned sets of fw's namespace.
func readKernel(t testing.TB, fw *Firewall) []kernelElement {
	t.Helper()
	kernel := newKernelView(0, 0)
	n, err := fw.readLearnedSets(config.RuleAllow, kernel)
	if err != nil {
		t.Fatal(err)
	}
	var out []kernelElement
	for a, e := range kernel.all() {
		out = append(out, kernelElement{a, e})
	}
	if n != len(out) {
		t.Fatalf("read %d elements, %d addresses", n, len(out))
	}
	return out
}

func TestAuditPlan(t *testing.T) {
	const now = int64(1_000_000)
	a := func(i uint32) netip.Addr { return addr(i) }
	rec := func(until int64) learnedAddr { return learnedAddr{until: until, names: "x."} }
	tests := []struct {
		name    string
		record  map[netip.Addr]learnedAddr
		kernel  []kernelElement
		skip    map[netip.Addr]bool
		wantSet map[netip.Addr]int64
		wantDel []netip.Addr
		found   map[RepairKind]int
	}{
		{name: "in step",
			record: map[netip.Addr]learnedAddr{a(1): rec(now + 60_000)},
			kernel: []kernelElement{{a(1), now + 60_300}}},
		{name: "missing",
			record:  map[netip.Addr]learnedAddr{a(1): rec(now + 60_000)},
			wantSet: map[netip.Addr]int64{a(1): now + 60_000},
			found:   map[RepairKind]int{RepairMissing: 1}},
		{name: "missing but about to expire anyway",
			record: map[netip.Addr]learnedAddr{a(1): rec(now + 500)}},
		{name: "early",
			record:  map[netip.Addr]learnedAddr{a(1): rec(now + 60_000)},
			kernel:  []kernelElement{{a(1), now + 9_000}},
			wantSet: map[netip.Addr]int64{a(1): now + 60_000},
			found:   map[RepairKind]int{RepairEarly: 1}},
		{name: "late",
			record:  map[netip.Addr]learnedAddr{a(1): rec(now + 60_000)},
			kernel:  []kernelElement{{a(1), now + 3_600_000}},
			wantSet: map[netip.Addr]int64{a(1): now + 60_000},
			found:   map[RepairKind]int{RepairLate: 1}},
		{name: "no timeout at all",
			record:  map[netip.Addr]learnedAddr{a(1): rec(now + 60_000)},
			kernel:  []kernelElement{{a(1), 0}},
			wantSet: map[netip.Addr]int64{a(1): now + 60_000},
			found:   map[RepairKind]int{RepairLate: 1}},
		{name: "foreign",
			kernel:  []kernelElement{{a(1), now + 3_600_000}, {a(2), 0}},
			wantDel: []netip.Addr{a(1), a(2)},
			found:   map[RepairKind]int{RepairForeign: 2}},
		{name: "foreign about to expire is left alone",
			kernel: []kernelElement{{a(1), now + 200}}},
		{name: "expired in the record, alive in the kernel",
			record:  map[netip.Addr]learnedAddr{a(1): rec(now - 5_000)},
			kernel:  []kernelElement{{a(1), now + 60_000}},
			wantDel: []netip.Addr{a(1)},
			found:   map[RepairKind]int{RepairExpired: 1}},
		{name: "expired in both, kernel a jiffy behind",
			record: map[netip.Addr]learnedAddr{a(1): rec(now - 5)},
			kernel: []kernelElement{{a(1), now + 5}}},
		{name: "changed while read",
			record: map[netip.Addr]learnedAddr{a(1): rec(now + 60_000), a(2): rec(now + 60_000)},
			kernel: []kernelElement{{a(3), now + 60_000}},
			skip:   map[netip.Addr]bool{a(1): true, a(2): true, a(3): true}},
		{name: "IPv6 and mixed",
			record: map[netip.Addr]learnedAddr{
				netip.MustParseAddr("2001:db8::1"): rec(now + 60_000),
				a(1):                               rec(now + 60_000),
			},
			kernel:  []kernelElement{{a(1), now + 1_000}, {netip.MustParseAddr("2001:db8::2"), now + 60_000}},
			wantSet: map[netip.Addr]int64{a(1): now + 60_000, netip.MustParseAddr("2001:db8::1"): now + 60_000},
			wantDel: []netip.Addr{netip.MustParseAddr("2001:db8::2")},
			found:   map[RepairKind]int{RepairEarly: 1, RepairMissing: 1, RepairForeign: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var record learnedMap
			for a, l := range tt.record {
				record.put(a, l)
			}
			kernel := newKernelView(0, 0)
			for _, k := range tt.kernel {
				kernel.add(k.addr, k.expires)
			}
			kernel.sort()
			set, del, found := auditPlan(now, &record, kernel, tt.skip, 0)
			if !maps.Equal(set, tt.wantSet) && len(set)+len(tt.wantSet) > 0 {
				t.Errorf("set = %v, want %v", set, tt.wantSet)
			}
			slices.SortFunc(del, netip.Addr.Compare)
			if !slices.Equal(del, tt.wantDel) {
				t.Errorf("delete = %v, want %v", del, tt.wantDel)
			}
			if !maps.Equal(found, tt.found) && len(found)+len(tt.found) > 0 {
				t.Errorf("found = %v, want %v", found, tt.found)
			}
		})
	}
}

// kernelExpiry returns when the kernel expires addr (zero if absent).
func kernelExpiry(t *testing.T, fw *Firewall, a netip.Addr) time.Time {
	t.Helper()
	for _, e := range readKernel(t, fw) {
		if e.addr == a {
			return time.UnixMilli(e.expires)
		}
	}
	return time.Time{}
}

// An extension with the same timeout as before (a name whose TTL does not
// change) moves the kernel's expiry, on every kernel.
func TestExtensionMovesKernelExpiry(t *testing.T) {
	fw := newTestFirewall(t)
	ctx := context.Background()
	a := []netip.Addr{addr(7), netip.MustParseAddr("2001:db8::7")}
	const life = 4 * time.Second
	if err := fw.Allow(ctx, "steady.example.", allowRule, a, time.Now().Add(life)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // past the headroom of an eighth
	if err := fw.Allow(ctx, "steady.example.", allowRule, a, time.Now().Add(life)); err != nil {
		t.Fatal(err)
	}
	for _, x := range a {
		e, ok := lookupOne(fw, x)
		if !ok {
			t.Fatalf("%v not learned", x)
		}
		if k := kernelExpiry(t, fw, x); k.Before(e.Expires.Add(-auditSlack / 2)) {
			t.Errorf("%v: kernel expires at %v, the record says %v", x, k.Format(time.StampMilli), e.Expires.Format(time.StampMilli))
		}
	}
}

// foreignConn is another process's view of the test firewall's namespace.
func foreignConn(t *testing.T, fw *Firewall) *nftables.Conn {
	t.Helper()
	c, err := nftables.New(fw.dumpOpts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAuditRepairsTheKernel(t *testing.T) {
	fw := newTestFirewall(t)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	missing, early, late, foreign := addr(1), addr(2), addr(3), addr(4)
	if err := fw.Allow(ctx, "a.example.", allowRule, []netip.Addr{missing, early, late}, until); err != nil {
		t.Fatal(err)
	}
	c := foreignConn(t, fw)
	s := &nftables.Set{Table: rules.Table(), Name: rules.LearnedSet(config.RuleAllow, addr(1)), KeyType: nftables.TypeIPAddr, HasTimeout: true}
	el := func(a netip.Addr, d time.Duration) []nftables.SetElement {
		return []nftables.SetElement{{Key: a.AsSlice(), Timeout: d}}
	}
	// What another process with CAP_NET_ADMIN can do to the sets.
	for _, err := range []error{
		c.SetDeleteElements(s, el(missing, 0)),
		c.SetDeleteElements(s, el(early, 0)),
		c.SetAddElements(s, el(early, 5*time.Second)),
		c.SetDeleteElements(s, el(late, 0)),
		c.SetAddElements(s, el(late, 100*time.Hour)),
		c.SetAddElements(s, el(foreign, time.Hour)),
		c.Flush(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	a, err := fw.Audit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[RepairKind]int{RepairMissing: 1, RepairEarly: 1, RepairLate: 1, RepairForeign: 1}
	if !maps.Equal(a.Repaired, want) {
		t.Errorf("audit found %v, want %v", a.Repaired, want)
	}
	for _, x := range []netip.Addr{missing, early, late} {
		e, _ := lookupOne(fw, x)
		if k := kernelExpiry(t, fw, x); k.Before(e.Expires.Add(-auditSlack)) || k.After(e.Expires.Add(auditSlack)) {
			t.Errorf("%v: kernel expires at %v after the audit, want %v", x, k, e.Expires)
		}
	}
	if k := kernelExpiry(t, fw, foreign); !k.IsZero() {
		t.Errorf("foreign %v still in the kernel, expiring %v", foreign, k)
	}
	// A second audit finds nothing.
	if a, err := fw.Audit(ctx); err != nil || len(a.Repaired) != 0 || a.Elements != 3 {
		t.Errorf("second audit: %+v, %v", a, err)
	}
}

// The kernel renews a replaced element, whatever its version; the probe
// leaves nothing behind.
func TestProbeLifetimes(t *testing.T) {
	fw := newTestFirewall(t)
	l, err := fw.ProbeLifetimes()
	if err != nil || !l.ReplaceResets {
		t.Fatalf("probe: %v, %v", l, err)
	}
	t.Logf("this kernel: %v", l)
	if _, err := fw.conn.ListTableOfFamily(probeTable, nftables.TableFamilyINet); err == nil {
		t.Errorf("table %s left behind", probeTable)
	}
}
