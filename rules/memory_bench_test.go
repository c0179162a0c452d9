package rules

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"
)

// learn100kNamed opens 100 000 addresses for an hour, each for a name of
// its own (as 100 000 fresh answers do), 1000 per transaction.
func learn100kNamed(tb testing.TB, fw *Firewall) {
	until := time.Now().Add(time.Hour)
	for i := uint32(0); i < 100000; i += 1000 {
		batch := make([]*request, 0, 1000)
		for j := i + 1; j <= i+1000; j++ {
			batch = append(batch, &request{name: fmt.Sprintf("n%d.bench.example.", j), addrs: []netip.Addr{addr(j)}, until: until})
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

// BenchmarkLearnedHeap100k: the heap that 100 000 learned addresses, each
// with a name of its own, keep alive (B/addr), the names' bytes included.
func BenchmarkLearnedHeap100k(b *testing.B) {
	for b.Loop() {
		b.StopTimer()
		fw := newTestFirewall(b)
		before := liveHeap()
		b.StartTimer()
		learn100kNamed(b, fw)
		b.StopTimer()
		after := liveHeap()
		b.ReportMetric(float64(int64(after)-int64(before))/100000, "B/addr")
		runtime.KeepAlive(fw)
		b.StartTimer()
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
