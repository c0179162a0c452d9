package rules

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"strings"
	"time"
)

// Element is a learned address, the moment it stops being allowed, and the
// names that resolved to it.
type Element struct {
	Addr    netip.Addr
	Expires time.Time
	// Names resolved to Addr, most recent first, comma-separated (at most
	// maxNames); empty if unknown.
	Names string
}

// maxNames bounds the names remembered per address (CDN addresses serve
// many).
const maxNames = 8

// learnedAddr is what the Firewall keeps per address: compact, because
// there may be hundreds of thousands.
type learnedAddr struct {
	until int64 // Unix ms
	names string
}

func (l learnedAddr) element(a netip.Addr) Element {
	return Element{Addr: a, Expires: time.UnixMilli(l.until), Names: l.names}
}

func untils(m map[netip.Addr]learnedAddr) iter.Seq2[netip.Addr, int64] {
	return func(yield func(netip.Addr, int64) bool) {
		for a, l := range m {
			if !yield(a, l.until) {
				return
			}
		}
	}
}

// withName puts name first in a names list.
func withName(names, name string) string {
	switch {
	case names == "" || names == name:
		return name
	case strings.HasPrefix(names, name+","):
		return names
	}
	list := []string{name}
	for n := range strings.SplitSeq(names, ",") {
		if n != name && len(list) < maxNames {
			list = append(list, n)
		}
	}
	return strings.Join(list, ",")
}

type request struct {
	name  string
	addrs []netip.Addr
	until time.Time
	done  chan error
}

// Allow makes addrs, the answer for name, reachable until at least until,
// and returns once the kernel acknowledged it. An address whose current life
// already ends later is left alone: lives are extended, never shortened.
// Concurrent calls are committed together in one batch.
//
// An extended life ends a little after until (by an eighth of the life
// asked for, see headroom), so that the repeated answers of a busy name do
// not each cost a kernel update.
func (f *Firewall) Allow(ctx context.Context, name string, addrs []netip.Addr, until time.Time) error {
	if f.Covered(name, addrs, until) {
		return nil
	}
	req := &request{name: name, addrs: addrs, until: until, done: make(chan error, 1)}
	f.mu.Lock()
	f.queue = append(f.queue, req)
	f.mu.Unlock()
	// Group commit: whoever gets the semaphore commits everything queued;
	// a caller whose request a previous leader committed returns at once,
	// so requests pile up while a batch is in the kernel and go together.
	for {
		select {
		case err := <-req.done:
			return err
		case f.sem <- struct{}{}:
			f.mu.Lock()
			batch := f.queue
			f.queue = nil
			f.mu.Unlock()
			if len(batch) > 0 {
				err := f.commit(batch)
				for _, r := range batch {
					r.done <- err
				}
			}
			f.release()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Covered reports, without waiting, whether every address already lives
// until until; if so, it records name for them.
func (f *Firewall) Covered(name string, addrs []netip.Addr, until time.Time) bool {
	u := until.UnixMilli()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range addrs {
		if f.learned[a].until < u {
			return false
		}
	}
	for _, a := range addrs {
		l := f.learned[a]
		if n := withName(l.names, name); n != l.names {
			l.names = n
			f.learned[a] = l
			f.version++
		}
	}
	return true
}

// fits reports whether the learned addresses stay within the limit with
// the addresses of want added.
func (f *Firewall) fits(want map[netip.Addr]int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.limit == 0 {
		return true
	}
	n := len(f.learned)
	for a := range want {
		if _, ok := f.learned[a]; !ok {
			n++
		}
	}
	return n <= f.limit
}

// headroom is how much longer than asked an extended life lasts.
func headroom(now, until time.Time) time.Duration {
	return until.Sub(now) / 8
}

// commit sends one batch; the caller holds sem.
func (f *Firewall) commit(batch []*request) error {
	now := f.now()
	f.mu.Lock()
	sets := f.sets
	want := map[netip.Addr]int64{}
	for _, r := range batch {
		u := r.until.UnixMilli()
		extended := r.until.Add(headroom(now, r.until)).UnixMilli()
		for _, a := range r.addrs {
			if f.learned[a].until < u && extended > want[a] {
				want[a] = extended
			}
		}
	}
	// Addresses the kernel may still hold are replaced, the others only
	// added (see setLives); the kernel's clock may run a jiffy behind.
	fresh, extend := map[netip.Addr]int64{}, map[netip.Addr]int64{}
	held := now.Add(-time.Second).UnixMilli()
	for a, u := range want {
		if f.learned[a].until > held {
			extend[a] = u
		} else {
			fresh[a] = u
		}
	}
	f.mu.Unlock()
	if !f.fits(want) {
		f.Learned() // prunes expired addresses, which may make room
		if !f.fits(want) {
			return ErrFull
		}
	}
	if len(want) > 0 {
		if sets == nil {
			return errors.New("add learned addresses: ruleset not installed")
		}
		if err := f.setLives(sets, fresh, false, now); err != nil {
			return err
		}
		if err := f.setLives(sets, extend, true, now); err != nil {
			return err
		}
		start := time.Now()
		if err := f.conn.Flush(); err != nil {
			return fmt.Errorf("add learned addresses: %w", err)
		}
		f.metrics.SetUpdate(time.Since(start), len(batch))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range batch {
		for _, a := range r.addrs {
			l := f.learned[a]
			l.until = max(l.until, want[a])
			l.names = withName(l.names, r.name)
			f.learned[a] = l
			if f.touched != nil {
				f.touched[a] = true
			}
		}
	}
	f.version++
	return nil
}

// Learned returns the addresses still allowed, in no particular order, and
// the version of the learned addresses they are (see Version).
func (f *Firewall) Learned() ([]Element, uint64) {
	now := f.now().UnixMilli()
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Element, 0, len(f.learned))
	for a, l := range f.learned {
		if l.until > now {
			out = append(out, l.element(a))
		} else {
			delete(f.learned, a)
		}
	}
	return out, f.version
}

// Version changes whenever a learned address or its names change.
func (f *Firewall) Version() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.version
}

// Names returns the names that last resolved to addr, also shortly after
// the address expired (until the next Learned prunes it).
func (f *Firewall) Names(addr netip.Addr) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.learned[addr]
	return l.names, ok
}

// Lookup returns the learned element of addr, if it is still allowed.
func (f *Firewall) Lookup(addr netip.Addr) (Element, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.learned[addr]
	return l.element(addr), ok && l.until > f.now().UnixMilli()
}
