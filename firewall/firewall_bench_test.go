package firewall

import (
	"context"
	"github.com/egressd/egressd/config"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// newTestFirewall installs the default ruleset in a fresh network
// namespace (root only) and returns a Firewall bound to it.
func newTestFirewall(tb testing.TB) *Firewall {
	fw, _ := newTestFirewallNS(tb)
	return fw
}

// newTestFirewallNS is newTestFirewall that also returns the namespace.
func newTestFirewallNS(tb testing.TB) (*Firewall, netns.NsHandle) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root for a network namespace")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		tb.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		tb.Fatal(err)
	}
	if err := netns.Set(orig); err != nil {
		tb.Fatal(err)
	}
	runtime.UnlockOSThread()
	tb.Cleanup(func() { ns.Close(); orig.Close() })
	fw, err := New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		tb.Fatal(err)
	}
	if err := fw.Install(context.Background(), rules.Build(configtest.Load(tb, "")), nil, nil); err != nil {
		tb.Fatal(err)
	}
	return fw, ns
}

func addr(i uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16), byte(i >> 8), byte(i)})
}

// BenchmarkAllowFresh: one new address per call, as a fresh answer does,
// one caller at a time.
func BenchmarkAllowFresh(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	var i uint32
	for b.Loop() {
		i++
		if err := fw.Allow(ctx, "bench.", allowRule, []netip.Addr{addr(i)}, until); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAllowFreshParallel: many concurrent answers, committed in
// shared batches.
func BenchmarkAllowFreshParallel(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	var i atomic.Uint32
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := fw.Allow(ctx, "bench.", allowRule, []netip.Addr{addr(i.Add(1))}, until); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkAllowKnown: an address that is already open long enough (a
// cached answer): no kernel update.
func BenchmarkAllowKnown(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	a := []netip.Addr{addr(1)}
	if err := fw.Allow(ctx, "bench.", allowRule, a, time.Now().Add(time.Hour)); err != nil {
		b.Fatal(err)
	}
	until := time.Now().Add(time.Minute)
	b.ReportAllocs()
	for b.Loop() {
		if err := fw.Allow(ctx, "bench.", allowRule, a, until); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAllowBatch100: one call with 100 new addresses; ns/op per call.
func BenchmarkAllowBatch100(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	until := time.Now().Add(time.Hour)
	var i uint32
	for b.Loop() {
		batch := make([]netip.Addr, 100)
		for j := range batch {
			i++
			batch[j] = addr(i)
		}
		if err := fw.Allow(ctx, "bench.", allowRule, batch, until); err != nil {
			b.Fatal(err)
		}
	}
}

// learn100k opens 100 000 addresses for an hour, 1000 per transaction.
func learn100k(b *testing.B, fw *Firewall) {
	until := time.Now().Add(time.Hour)
	batch := make([]netip.Addr, 0, 1000)
	for i := uint32(1); i <= 100000; i++ {
		batch = append(batch, addr(i))
		if len(batch) == cap(batch) {
			if err := fw.Allow(context.Background(), "bench.", allowRule, batch, until); err != nil {
				b.Fatal(err)
			}
			batch = batch[:0]
		}
	}
}

// BenchmarkInstall100k: replacing the table while keeping 100 000 live
// learned addresses (a restart, a reload or a drift repair at that size).
func BenchmarkInstall100k(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	learn100k(b, fw)
	rs := rules.Build(configtest.Load(b, ""))
	for b.Loop() {
		if err := fw.Install(ctx, rs, nil, nil); err != nil {
			b.Fatal(err)
		}
	}
	if l, _ := fw.Learned(); len(l) != 100000 {
		b.Fatalf("%d learned after install", len(l))
	}
}

// BenchmarkAllow100kFresh: the time to open 100 000 new addresses through
// Allow, in batches of 100 as concurrent answers produce them.
func BenchmarkAllow100kFresh(b *testing.B) {
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		fw := newTestFirewall(b)
		until := time.Now().Add(time.Hour)
		b.StartTimer()
		for i := uint32(0); i < 100000; i += 100 {
			batch := make([]netip.Addr, 100)
			for j := range batch {
				batch[j] = addr(i + uint32(j) + 1)
			}
			if err := fw.Allow(ctx, "bench.", allowRule, batch, until); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkAudit100k: one audit (both sets read back and compared) with
// 100 000 live learned addresses and nothing to repair.
func BenchmarkAudit100k(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	learn100k(b, fw)
	time.Sleep(3 * time.Second)
	b.ReportAllocs()
	for b.Loop() {
		a, err := fw.Audit(ctx)
		if err != nil || len(a.Repaired) != 0 || a.Elements != 100000 {
			b.Fatalf("%+v %v", a, err)
		}
	}
}

// BenchmarkAllowExtend: an address whose life is extended on every call
// (a busy name answered again after its headroom ran out): the element is
// replaced in the kernel.
func BenchmarkAllowExtend(b *testing.B) {
	fw := newTestFirewall(b)
	ctx := context.Background()
	a := []netip.Addr{addr(1)}
	if err := fw.Allow(ctx, "bench.", allowRule, a, time.Now().Add(time.Minute)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		// The record says the life ends sooner than asked: extend.
		fw.mu.Lock()
		fw.learned.put(config.RuleAllow, a[0], learnedAddr{until: time.Now().Add(time.Minute).UnixMilli()})
		fw.mu.Unlock()
		if err := fw.Allow(ctx, "bench.", allowRule, a, time.Now().Add(time.Hour)); err != nil {
			b.Fatal(err)
		}
	}
}
