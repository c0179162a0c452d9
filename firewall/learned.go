package firewall

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"iter"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/egressd/egressd/config"
)

// Element is a learned address of a rule, the moment it stops being
// allowed, and the names that resolved to it.
type Element struct {
	// Rule whose sets hold the address; "" is the rule "allow" (state
	// files of egressd before rules).
	Rule    string
	Addr    netip.Addr
	Expires time.Time
	// Names resolved to Addr, most recent first, comma-separated (at most
	// maxNames); empty if unknown.
	Names string
}

// maxNames bounds the names remembered per address (CDN addresses serve
// many).
const maxNames = 8

// learnedAddr is a learned address's record: when it stops being allowed
// and its names (comma-separated, most recent first).
type learnedAddr struct {
	until int64 // Unix ms
	names string
}

func (l learnedAddr) element(rule string, a netip.Addr) Element {
	return Element{Rule: rule, Addr: a, Expires: time.UnixMilli(l.until), Names: l.names}
}

// ruleOf is the rule of e.
func (e Element) ruleOf() string { return cmp.Or(e.Rule, config.RuleAllow) }

// learnedRules are the learned addresses of each rule: a learnedMap per
// rule, so that an address shared by several rules keeps one life per
// rule.
type learnedRules map[string]*learnedMap

func (r learnedRules) get(rule string, a netip.Addr) (learnedAddr, bool) {
	if m := r[rule]; m != nil {
		return m.get(a)
	}
	return learnedAddr{}, false
}

func (r learnedRules) put(rule string, a netip.Addr, l learnedAddr) {
	m := r[rule]
	if m == nil {
		m = &learnedMap{}
		r[rule] = m
	}
	m.put(a, l)
}

func (r learnedRules) len() int {
	n := 0
	for _, m := range r {
		n += m.len()
	}
	return n
}

// ruleAddr is a learned address of a rule.
type ruleAddr struct {
	rule string
	addr netip.Addr
}

func untils(m *learnedMap) iter.Seq2[netip.Addr, int64] {
	return func(yield func(netip.Addr, int64) bool) {
		for a, l := range m.all() {
			if !yield(a, l.until) {
				return
			}
		}
	}
}

// learnedMap is the Firewall's record of learned addresses: there may be
// hundreds of thousands, so it is kept compact. Each address maps to a
// packedAddr of 12 bytes that holds no pointer (an IPv4 slot of the map
// is 16 bytes, and the collector does not scan the map); the names lists
// are in a table of their own. At 132 000 addresses the map takes 36
// bytes per address and the table 16, where a map of netip.Addr to
// {int64, string} took 79 plus 16 for the netip.Addr key's width.
//
// The zero learnedMap is empty and ready to use. It keys by the address's
// bytes, so zones are not kept (DNS answers have none).
type learnedMap struct {
	v4    map[[4]byte]packedAddr
	v6    map[[16]byte]packedAddr
	names nameTable
}

// packedAddr is a learnedAddr in the map: until as two 32-bit halves, so
// that the struct's alignment is 4, and the names as an id in the table.
type packedAddr struct {
	lo, hi uint32
	names  nameID
}

func (p packedAddr) until() int64 { return int64(uint64(p.hi)<<32 | uint64(p.lo)) }

func (m *learnedMap) unpack(p packedAddr) learnedAddr {
	return learnedAddr{until: p.until(), names: m.names.get(p.names)}
}

// pack returns l as stored over old (the zero packedAddr if new): the
// names keep old's id, take a new one, or give it back.
func (m *learnedMap) pack(old packedAddr, l learnedAddr) packedAddr {
	p := packedAddr{lo: uint32(uint64(l.until)), hi: uint32(uint64(l.until) >> 32), names: old.names}
	switch {
	case l.names == "":
		m.names.release(p.names)
		p.names = 0
	case p.names == 0:
		p.names = m.names.add(l.names)
	default:
		m.names.set(p.names, l.names)
	}
	return p
}

func (m *learnedMap) get(a netip.Addr) (learnedAddr, bool) {
	var p packedAddr
	var ok bool
	if a.Is4() {
		p, ok = m.v4[a.As4()]
	} else {
		p, ok = m.v6[a.As16()]
	}
	return m.unpack(p), ok
}

func (m *learnedMap) put(a netip.Addr, l learnedAddr) {
	if a.Is4() {
		if m.v4 == nil {
			m.v4 = map[[4]byte]packedAddr{}
		}
		k := a.As4()
		m.v4[k] = m.pack(m.v4[k], l)
		return
	}
	if m.v6 == nil {
		m.v6 = map[[16]byte]packedAddr{}
	}
	k := a.As16()
	m.v6[k] = m.pack(m.v6[k], l)
}

func (m *learnedMap) del(a netip.Addr) {
	if a.Is4() {
		k := a.As4()
		if p, ok := m.v4[k]; ok {
			m.names.release(p.names)
			delete(m.v4, k)
		}
		if len(m.v4) == 0 {
			m.v4 = nil // a map never shrinks: drop an empty one
		}
		return
	}
	k := a.As16()
	if p, ok := m.v6[k]; ok {
		m.names.release(p.names)
		delete(m.v6, k)
	}
	if len(m.v6) == 0 {
		m.v6 = nil
	}
}

func (m *learnedMap) len() int { return len(m.v4) + len(m.v6) }

// all yields every address, IPv4 first; the loop body may delete entries.
func (m *learnedMap) all() iter.Seq2[netip.Addr, learnedAddr] {
	return func(yield func(netip.Addr, learnedAddr) bool) {
		for k, p := range m.v4 {
			if !yield(netip.AddrFrom4(k), m.unpack(p)) {
				return
			}
		}
		for k, p := range m.v6 {
			if !yield(netip.AddrFrom16(k), m.unpack(p)) {
				return
			}
		}
	}
}

func (m *learnedMap) clone() *learnedMap {
	return &learnedMap{v4: maps.Clone(m.v4), v6: maps.Clone(m.v6), names: m.names.clone()}
}

// nameID identifies a names list in a nameTable; 0 is the empty list.
type nameID = uint32

// namePage is how many names lists a page of a nameTable holds.
const namePage = 1024

// nameTable holds names lists by id: a string header each, in pages, so
// that it grows without copying and without the slack of a doubling
// slice. Ids given back are reused. The strings themselves are those the
// callers passed (a name's string is shared with the DNS answer it came
// from, and by every address of that answer).
type nameTable struct {
	pages [][]string
	free  []nameID
	used  nameID // ids ever handed out; the highest is used
}

func (t *nameTable) get(id nameID) string {
	if id == 0 {
		return ""
	}
	return t.pages[(id-1)/namePage][(id-1)%namePage]
}

func (t *nameTable) set(id nameID, names string) {
	t.pages[(id-1)/namePage][(id-1)%namePage] = names
}

func (t *nameTable) add(names string) nameID {
	var id nameID
	if n := len(t.free); n > 0 {
		id = t.free[n-1]
		t.free = t.free[:n-1]
	} else {
		t.used++
		id = t.used
		if int(id-1)/namePage == len(t.pages) {
			t.pages = append(t.pages, make([]string, namePage))
		}
	}
	t.set(id, names)
	return id
}

func (t *nameTable) release(id nameID) {
	if id == 0 {
		return
	}
	t.set(id, "")
	t.free = append(t.free, id)
	if len(t.free) == int(t.used) {
		*t = nameTable{} // all given back: drop the pages
	}
}

func (t *nameTable) clone() nameTable {
	c := nameTable{pages: make([][]string, len(t.pages)), free: slices.Clone(t.free), used: t.used}
	for i, p := range t.pages {
		c.pages[i] = slices.Clone(p)
	}
	return c
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
	rules []string
	addrs []netip.Addr
	until time.Time
	done  chan error
}

// Allow makes addrs, the answer for name, reachable through each of rules
// until at least until, and returns once the kernel acknowledged it. An address whose current life
// already ends later is left alone: lives are extended, never shortened.
// Concurrent calls are committed together in one batch.
//
// An extended life ends a little after until (by an eighth of the life
// asked for, see headroom), so that the repeated answers of a busy name do
// not each cost a kernel update.
func (f *Firewall) Allow(ctx context.Context, name string, rules []string, addrs []netip.Addr, until time.Time) error {
	if f.Covered(name, rules, addrs, until) {
		return nil
	}
	req := &request{name: name, rules: rules, addrs: addrs, until: until, done: make(chan error, 1)}
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
// in each of rules until until; if so, it records name for them.
func (f *Firewall) Covered(name string, rules []string, addrs []netip.Addr, until time.Time) bool {
	u := until.UnixMilli()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range rules {
		m := f.learned[r]
		if m == nil {
			return false
		}
		for _, a := range addrs {
			if l, _ := m.get(a); l.until < u {
				return false
			}
		}
	}
	for _, r := range rules {
		m := f.learned[r]
		for _, a := range addrs {
			l, _ := m.get(a)
			if n := withName(l.names, name); n != l.names {
				l.names = n
				m.put(a, l)
				f.version++
			}
		}
	}
	return true
}

// fits reports whether the learned addresses stay within the limit with
// the addresses of want added.
func (f *Firewall) fits(want map[ruleAddr]int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.limit == 0 {
		return true
	}
	n := f.learned.len()
	for ra := range want {
		if _, ok := f.learned.get(ra.rule, ra.addr); !ok {
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
	want := map[ruleAddr]int64{}
	for _, r := range batch {
		u := r.until.UnixMilli()
		extended := r.until.Add(headroom(now, r.until)).UnixMilli()
		for _, rule := range r.rules {
			for _, a := range r.addrs {
				ra := ruleAddr{rule, a}
				if l, _ := f.learned.get(rule, a); l.until < u && extended > want[ra] {
					want[ra] = extended
				}
			}
		}
	}
	// Addresses the kernel may still hold are replaced, the others only
	// added (see setLives); the kernel's clock may run a jiffy behind.
	fresh, extend := map[ruleAddr]int64{}, map[ruleAddr]int64{}
	held := now.Add(-time.Second).UnixMilli()
	for ra, u := range want {
		if l, _ := f.learned.get(ra.rule, ra.addr); l.until > held {
			extend[ra] = u
		} else {
			fresh[ra] = u
		}
	}
	f.mu.Unlock()
	if !f.fits(want) {
		f.prune() // may make room
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
		for _, rule := range r.rules {
			for _, a := range r.addrs {
				l, _ := f.learned.get(rule, a)
				l.until = max(l.until, want[ruleAddr{rule, a}])
				l.names = withName(l.names, r.name)
				f.learned.put(rule, a, l)
				if f.touched != nil {
					f.touched[a] = true
				}
			}
		}
	}
	f.version++
	return nil
}

// Learned returns the addresses still allowed, in no particular order, and
// the version of the learned addresses they are (see Version).
func (f *Firewall) Learned() ([]Element, uint64) {
	all, version := f.LearnedSeq()
	f.mu.Lock()
	out := make([]Element, 0, f.learned.len())
	f.mu.Unlock()
	return slices.AppendSeq(out, all), version
}

// learnedChunk is how many addresses LearnedSeq copies while it holds the
// Firewall.
const learnedChunk = 1024

// LearnedSeq returns the addresses still allowed, as a sequence that does
// not copy them all at once (100 000 of them are megabytes), and the
// version of the learned addresses at the call (see Version). The sequence
// holds the Firewall only while it copies a chunk of addresses, so answers
// are not held up while it is consumed; addresses that change meanwhile
// may or may not be seen as changed (they also change the version), and
// each address that stays allowed is seen once.
func (f *Firewall) LearnedSeq() (iter.Seq[Element], uint64) {
	f.mu.Lock()
	version := f.version
	f.mu.Unlock()
	return func(yield func(Element) bool) {
		now := f.now().UnixMilli()
		chunk := make([]Element, 0, learnedChunk)
		f.mu.Lock()
		locked := true
		defer func() {
			if locked {
				f.mu.Unlock()
			}
		}()
		// A map may change between the steps of a range over it (it is
		// held whenever it is read): entries not reached yet that are
		// deleted are not produced, new ones may or may not be.
		// Install replaces the record rather than change it: m stays
		// whole, if out of date.
		for _, rule := range slices.Sorted(maps.Keys(f.learned)) {
			m := f.learned[rule]
			if m == nil {
				continue
			}
			for a, l := range m.all() {
				if l.until <= now {
					m.del(a)
					continue
				}
				chunk = append(chunk, l.element(rule, a))
				if len(chunk) < learnedChunk {
					continue
				}
				f.mu.Unlock()
				locked = false
				for _, e := range chunk {
					if !yield(e) {
						return
					}
				}
				chunk = chunk[:0]
				f.mu.Lock()
				locked = true
			}
		}
		f.mu.Unlock()
		locked = false
		for _, e := range chunk {
			if !yield(e) {
				return
			}
		}
	}, version
}

// prune forgets the addresses no longer allowed.
func (f *Firewall) prune() {
	now := f.now().UnixMilli()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.learned {
		for a, l := range m.all() {
			if l.until <= now {
				m.del(a)
			}
		}
	}
}

// Version changes whenever a learned address or its names change.
func (f *Firewall) Version() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.version
}

// Names returns the names that last resolved to addr, in any rule, also
// shortly after the address expired (until the next Learned prunes it).
func (f *Firewall) Names(addr netip.Addr) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, rule := range slices.Sorted(maps.Keys(f.learned)) {
		if l, ok := f.learned.get(rule, addr); ok {
			return l.names, true
		}
	}
	return "", false
}

// Lookup returns the learned elements of addr that are still allowed,
// one per rule, in the order of the rules' names.
func (f *Firewall) Lookup(addr netip.Addr) []Element {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now().UnixMilli()
	var out []Element
	for _, rule := range slices.Sorted(maps.Keys(f.learned)) {
		if l, ok := f.learned.get(rule, addr); ok && l.until > now {
			out = append(out, l.element(rule, addr))
		}
	}
	return out
}
