package firewall

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// allowRule names the rule of the flat allow keys, the one every test
// firewall's configuration has.
var allowRule = []string{config.RuleAllow}

// lookupOne is the element that opens addr for the allow rule.
func lookupOne(fw *Firewall, addr netip.Addr) (Element, bool) {
	for _, e := range fw.Lookup(addr) {
		if e.Rule == config.RuleAllow {
			return e, true
		}
	}
	return Element{}, false
}

// A reinstall keeps every learned address, also when they are too many for
// one netlink message, and never shortens a life.
func TestInstallKeepsManyElements(t *testing.T) {
	fw := newTestFirewall(t)
	ctx := context.Background()
	const n = 5000
	until := time.Now().Add(time.Hour)
	var addrs []netip.Addr
	for i := uint32(1); i <= n; i++ {
		addrs = append(addrs, addr(i))
	}
	addrs = append(addrs, netip.MustParseAddr("2001:db8::1"))
	if err := fw.Allow(ctx, "many.example.", allowRule, addrs, until); err != nil {
		t.Fatal(err)
	}
	if err := fw.Install(ctx, rules.Build(configtest.Load(t, "")), nil, nil); err != nil {
		t.Fatal(err)
	}
	kernel := readKernel(t, fw)
	if len(kernel) != n+1 {
		t.Fatalf("kernel holds %d elements after reinstall, want %d", len(kernel), n+1)
	}
	for _, e := range kernel {
		if time.UnixMilli(e.expires).Before(until.Add(-time.Second)) {
			t.Fatalf("%v expires at %v, before %v", e.addr, time.UnixMilli(e.expires), until)
		}
	}
	// A shorter answer later does not shorten it.
	if err := fw.Allow(ctx, "many.example.", allowRule, addrs[:1], time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if e, ok := lookupOne(fw, addrs[0]); !ok || e.Expires.Before(until.Add(-time.Second)) || e.Names != "many.example." {
		t.Errorf("after a shorter answer: %+v %v", e, ok)
	}
}

func TestLimit(t *testing.T) {
	fw := newTestFirewall(t)
	fw.Limit(3)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	if err := fw.Allow(ctx, "a.", allowRule, []netip.Addr{addr(1), addr(2), addr(3)}, until); err != nil {
		t.Fatal(err)
	}
	if err := fw.Allow(ctx, "b.", allowRule, []netip.Addr{addr(4)}, until); err != ErrFull {
		t.Errorf("a fourth address: %v, want ErrFull", err)
	}
	if _, ok := lookupOne(fw, addr(4)); ok {
		t.Error("the refused address was learned")
	}
	// Known addresses may still be extended.
	if err := fw.Allow(ctx, "a.", allowRule, []netip.Addr{addr(2)}, until.Add(time.Hour)); err != nil {
		t.Errorf("extending a known address: %v", err)
	}
}
