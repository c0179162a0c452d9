package firewall

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// learn100kNamed opens 100 000 addresses for an hour, each for a name of
// its own (as 100 000 fresh answers do), 1000 per transaction.
func learn100kNamed(tb testing.TB, fw *Firewall) { learnNamed(tb, fw, 100000) }

// learnNamed opens n addresses so.
func learnNamed(tb testing.TB, fw *Firewall, n uint32) {
	until, allow := time.Now().Add(time.Hour), []string{config.RuleAllow}
	for i := uint32(0); i < n; i += 1000 {
		batch := make([]*request, 0, 1000)
		for j := i + 1; j <= min(i+1000, n); j++ {
			batch = append(batch, &request{name: fmt.Sprintf("n%d.bench.example.", j), rules: allow, addrs: []netip.Addr{addr(j)}, until: until})
		}
		if err := fw.commit(batch); err != nil {
			tb.Fatal(err)
		}
	}
}

// liveHeap is the heap in use after a full collection.
func liveHeap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkLearnedHeap: the heap that 100 000 learned addresses, each
// with a name of its own, keep alive (B/addr), the names' bytes (24)
// included; and at the 132 300 of `make bench`, where Go's maps have just
// doubled.
func BenchmarkLearnedHeap(b *testing.B) {
	for _, n := range []uint32{100000, 132300} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				fw := newTestFirewall(b)
				before := liveHeap()
				b.StartTimer()
				learnNamed(b, fw, n)
				b.StopTimer()
				after := liveHeap()
				b.ReportMetric(float64(int64(after)-int64(before))/float64(n), "B/addr")
				runtime.KeepAlive(fw)
				b.StartTimer()
			}
		})
	}
}

// BenchmarkLearned100k: what a snapshot (state save, list) takes from the Firewall
// at 100 000 learned addresses.
func BenchmarkLearned100k(b *testing.B) {
	fw := newTestFirewall(b)
	learn100kNamed(b, fw)
	b.ReportAllocs()
	for b.Loop() {
		if l, _ := fw.Learned(); len(l) != 100000 {
			b.Fatal(len(l))
		}
	}
}

// BenchmarkRestart100k: a restart at 100 000 learned addresses: a new
// Firewall's first Install reads them back from the kernel and merges
// them with the state file's (keep).
func BenchmarkRestart100k(b *testing.B) {
	fw, ns := newTestFirewallNS(b)
	learn100kNamed(b, fw)
	keep, _ := fw.Learned()
	rs := rules.Build(configtest.Load(b, ""))
	b.ReportAllocs()
	for b.Loop() {
		again, err := New(nftables.WithNetNSFd(int(ns)))
		if err != nil {
			b.Fatal(err)
		}
		if err := again.Install(context.Background(), rs, keep, nil); err != nil {
			b.Fatal(err)
		}
		if again.learned.len() != 100000 {
			b.Fatalf("%d learned", again.learned.len())
		}
		_ = again.conn.CloseLasting()
	}
}
