package agent

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/egressd/egressd/rules"
)

// maxNamesPerAddr bounds how many names are remembered for one address
// (CDN addresses serve many names).
const maxNamesPerAddr = 8

// ledger remembers which names resolved to each learned address, so that a
// reload can drop the addresses of names that are no longer allowed, and
// operators can be told why an address is open.
type ledger struct {
	fw *rules.Firewall

	mu    sync.Mutex
	names map[netip.Addr][]string // most recent first
	dirty bool                    // learned something since the last snapshot
}

func newLedger(fw *rules.Firewall) *ledger {
	return &ledger{fw: fw, names: map[netip.Addr][]string{}}
}

// Allow implements dnsresolve.Allower: it opens addrs in the firewall and
// records name for them once they are open.
func (l *ledger) Allow(ctx context.Context, name string, addrs []netip.Addr, until time.Time) error {
	if err := l.fw.Allow(ctx, addrs, until); err != nil {
		return err
	}
	l.record(name, addrs)
	return nil
}

func (l *ledger) record(name string, addrs []netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dirty = true
	for _, a := range addrs {
		ns := l.names[a]
		if len(ns) > 0 && ns[0] == name {
			continue
		}
		ns = slices.DeleteFunc(ns, func(n string) bool { return n == name })
		ns = append([]string{name}, ns...)
		if len(ns) > maxNamesPerAddr {
			ns = ns[:maxNamesPerAddr]
		}
		l.names[a] = ns
	}
}

// lookup returns the names recorded for a.
func (l *ledger) lookup(a netip.Addr) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.names[a])
}

// snapshot returns the live learned addresses with their names, and forgets
// the names of addresses that expired.
func (l *ledger) snapshot() []learned {
	live := l.fw.Learned()
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]learned, 0, len(live))
	keep := make(map[netip.Addr][]string, len(live))
	for _, e := range live {
		out = append(out, learned{Element: e, Names: l.names[e.Addr]})
		if ns, ok := l.names[e.Addr]; ok {
			keep[e.Addr] = ns
		}
	}
	l.names = keep
	l.dirty = false
	return out
}

// changed reports whether anything was learned since the last snapshot.
func (l *ledger) changed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dirty
}
