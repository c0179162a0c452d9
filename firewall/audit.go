package firewall

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/rules"
)

// RepairKind says what an audit found wrong with one learned address.
type RepairKind string

// What an audit repairs. The kernel's sets are what is enforced; the
// Firewall's record is what egressd answered. Every difference is one of
// these, and each is undone towards the record.
const (
	// RepairMissing: answered and still valid, but not in the kernel
	// (deleted by another process, or an update that did not take).
	RepairMissing RepairKind = "missing"
	// RepairEarly: in the kernel, but expiring before its answered life
	// ends (an extension that did not take, or a shorter foreign re-add).
	RepairEarly RepairKind = "early"
	// RepairLate: in the kernel longer than any answer asked for (re-added
	// by another process with a longer timeout, or without one).
	RepairLate RepairKind = "late"
	// RepairForeign: in the kernel, but egressd never answered it.
	RepairForeign RepairKind = "foreign"
	// RepairExpired: in the kernel after its answered life ended.
	RepairExpired RepairKind = "expired"
)

// auditSlack absorbs what separates the record from the kernel without
// anyone changing anything: the kernel counts in jiffies, rounds timeouts
// up, and the dump is read a moment before it is compared.
const auditSlack = time.Second

// Audit is the outcome of one comparison of the learned sets in the kernel
// with the Firewall's record.
type Audit struct {
	At       time.Time
	Took     time.Duration
	Elements int                // in the kernel's two sets
	Repaired map[RepairKind]int // differences found and undone
}

// Repairs returns Repaired keyed by the kinds' names, for logs, metrics
// and status; nil if nothing was repaired.
func (a Audit) Repairs() map[string]int {
	var out map[string]int
	for k, n := range a.Repaired {
		if out == nil {
			out = map[string]int{}
		}
		out[string(k)] = n
	}
	return out
}

// auditPlan compares the kernel's elements (address → when it expires,
// Unix ms, 0: never) with the record at now (Unix ms) and returns the lives
// to set (address → until) and the addresses to delete, with what was
// found. Addresses in skip changed while the kernel was read and are left
// to the next audit. The kernel's expiries were read over read (the dump's
// duration), so they may seem that much earlier than they are.
func auditPlan(now int64, record *learnedMap, kernel *kernelView, skip map[netip.Addr]bool, read time.Duration) (set map[netip.Addr]int64, del []netip.Addr, found map[RepairKind]int) {
	slack := auditSlack.Milliseconds()
	early := slack + read.Milliseconds()
	set, found = map[netip.Addr]int64{}, map[RepairKind]int{}
	for a, expires := range kernel.all() {
		if skip[a] {
			continue
		}
		if expires == 0 {
			expires = 1<<63 - 1
		}
		l, ok := record.get(a)
		until := l.until
		switch {
		case !ok && expires <= now+slack:
			// Expiring anyway; most likely one the record just pruned.
		case !ok:
			found[RepairForeign]++
			del = append(del, a)
		case until <= now && expires > now+slack:
			found[RepairExpired]++
			del = append(del, a)
		case until <= now:
		case expires < until-early:
			found[RepairEarly]++
			set[a] = until
		case expires > until+slack:
			found[RepairLate]++
			set[a] = until
		}
	}
	for a, until := range untils(record) {
		if _, in := kernel.get(a); !in && !skip[a] && until > now+slack {
			found[RepairMissing]++
			set[a] = until
		}
	}
	return set, del, found
}

// Audit reads the learned sets from the kernel and repairs every
// difference from the Firewall's record (see RepairKind) in one
// transaction. Answers are not held up while the kernel is read, which
// takes a while at 100 000 elements; addresses they change meanwhile are
// left to the next audit.
func (f *Firewall) Audit(ctx context.Context) (Audit, error) {
	start := f.now()
	f.mu.Lock()
	if f.rs == nil {
		f.mu.Unlock()
		return Audit{}, nil
	}
	ruleNames := f.rs.LearnedRules()
	f.touched = map[netip.Addr]bool{}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.touched = nil
		f.mu.Unlock()
	}()

	installs := f.installs.Load()
	kernels := map[string]*kernelView{}
	elements := 0
	read := func() error {
		elements = 0
		for _, rule := range ruleNames {
			k := kernels[rule]
			if k == nil {
				f.mu.Lock()
				m := f.learned[rule]
				if m == nil {
					m = &learnedMap{}
				}
				k = newKernelView(len(m.v4), len(m.v6))
				f.mu.Unlock()
				kernels[rule] = k
			}
			n, err := f.readLearnedSets(rule, k)
			if err != nil {
				return err
			}
			elements += n
		}
		return nil
	}
	if err := read(); err != nil {
		return Audit{}, err
	}
	took := f.now().Sub(start)
	if err := f.acquire(ctx); err != nil {
		return Audit{}, err
	}
	defer f.release()
	if f.installs.Load() != installs {
		return Audit{}, nil // the table was replaced while it was read
	}
	plan := func(now time.Time, took time.Duration) (set map[ruleAddr]int64, del []ruleAddr, found map[RepairKind]int) {
		f.mu.Lock()
		defer f.mu.Unlock()
		set, found = map[ruleAddr]int64{}, map[RepairKind]int{}
		for _, rule := range ruleNames {
			m := f.learned[rule]
			if m == nil {
				m = &learnedMap{}
			}
			s, d, fd := auditPlan(now.UnixMilli(), m, kernels[rule], f.touched, took)
			for a, u := range s {
				set[ruleAddr{rule, a}] = u
			}
			for _, a := range d {
				del = append(del, ruleAddr{rule, a})
			}
			for k, n := range fd {
				found[k] += n
			}
		}
		return set, del, found
	}
	now := f.now()
	set, del, found := plan(now, took)
	if found[RepairMissing] > 0 {
		// A dump of a hash set that the kernel is resizing may skip
		// elements: only what two dumps miss is missing (the second
		// read of an address wins).
		if err := read(); err != nil {
			return Audit{}, err
		}
		now = f.now()
		set, del, found = plan(now, now.Sub(start))
	}
	f.mu.Lock()
	sets := f.sets
	f.mu.Unlock()
	a := Audit{At: start, Elements: elements, Repaired: found}
	if len(set)+len(del) > 0 {
		if sets == nil {
			return a, errors.New("audit learned addresses: ruleset not installed")
		}
		if err := f.setLives(sets, set, true, now); err != nil {
			return a, err
		}
		if err := f.delLives(sets, del); err != nil {
			return a, err
		}
		if err := f.conn.Flush(); err != nil {
			return a, fmt.Errorf("repair learned addresses: %w", err)
		}
	}
	a.Took = f.now().Sub(start)
	return a, nil
}

// delLives queues the deletion of addrs from their sets; an address that
// is no longer there (expired a moment ago) is first added, so that its
// delete cannot fail the transaction. The caller holds sem.
func (f *Firewall) delLives(sets map[string]*nftables.Set, addrs []ruleAddr) error {
	bySet := map[string][]nftables.SetElement{}
	for _, ra := range addrs {
		name := rules.LearnedSet(ra.rule, ra.addr)
		bySet[name] = append(bySet[name], nftables.SetElement{Key: ra.addr.AsSlice(), Timeout: time.Second})
	}
	for _, name := range slices.Sorted(maps.Keys(bySet)) {
		elems := bySet[name]
		s := sets[name]
		if s == nil {
			return f.abort(fmt.Errorf("delete learned addresses: no set %s in the installed ruleset", name))
		}
		add := func(elems []nftables.SetElement) error { return f.conn.SetAddElements(s, elems) }
		del := func(elems []nftables.SetElement) error { return f.conn.SetDeleteElements(s, elems) }
		if err := errors.Join(rules.QueueElements(slices.Values(elems), add), rules.QueueElements(slices.Values(elems), del)); err != nil {
			return f.abort(fmt.Errorf("delete from set %s: %w", name, err))
		}
	}
	return nil
}

// readLearnedSets dumps the two learned sets of rule into kernel (a read of an
// address that kernel holds already wins) through a netlink socket of its
// own: the lasting one may be in the middle of a transaction. It returns
// how many elements it read; a missing table or set reads as empty.
//
// The dump is parsed here, a batch of messages at a time, rather than by
// google/nftables' GetSetElements, which at 100 000 elements holds the
// whole dump and a 136-byte SetElement per element (180 MB allocated per
// audit); its receive buffer is also large enough that the kernel packs
// ~700 elements into a message rather than ~90, and each message costs
// the kernel a walk of the set up to where the dump stands.
func (f *Firewall) readLearnedSets(rule string, kernel *kernelView) (int, error) {
	// The options are only read: which namespace, or a test peer.
	var opts nftables.Conn
	for _, o := range f.dumpOpts {
		o(&opts)
	}
	var c *netlink.Conn
	if opts.TestDial != nil {
		c = nltest.Dial(opts.TestDial)
	} else {
		var err error
		if c, err = netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: opts.NetNS}); err != nil {
			return 0, fmt.Errorf("nftables: %w", err)
		}
	}
	defer c.Close()
	// A kernel that stops answering must not stall audits for ever.
	_ = c.SetReadDeadline(time.Now().Add(dumpTimeout))
	now := f.now().UnixMilli()
	n := 0
	for _, name := range []string{rule + "4", rule + "6"} {
		err := dumpSet(c, name, func(key []byte, expires int64) {
			a, ok := netip.AddrFromSlice(key)
			if !ok {
				return
			}
			if expires > 0 {
				expires += now
			}
			kernel.add(a, expires)
			n++
		})
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read set %s: %w", name, err)
		}
	}
	kernel.sort()
	return n, nil
}

// kernelView is the learned sets as read from the kernel: each element's
// address and when it expires (Unix ms; 0: never), in arrays sorted by
// address. An audit holds it while it compares: at 132 000 elements
// arrays take 2.1 MB where a map took 4.6.
type kernelView struct {
	v4 []kernelElem[[4]byte]
	v6 []kernelElem[[16]byte]
}

type kernelElem[K [4]byte | [16]byte] struct {
	key     K
	expires int64
}

// newKernelView returns an empty kernelView with room for about n4 and
// n6 elements (what the record holds).
func newKernelView(n4, n6 int) *kernelView {
	return &kernelView{v4: make([]kernelElem[[4]byte], 0, n4+n4/16), v6: make([]kernelElem[[16]byte], 0, n6+n6/16)}
}

// add appends an element; get and all see it after the next sort.
func (k *kernelView) add(a netip.Addr, expires int64) {
	if a.Is4() {
		k.v4 = append(k.v4, kernelElem[[4]byte]{a.As4(), expires})
	} else {
		k.v6 = append(k.v6, kernelElem[[16]byte]{a.As16(), expires})
	}
}

// sort orders the elements by address; of an address added more than
// once, the last one added stays.
func (k *kernelView) sort() {
	k.v4 = sortKernel(k.v4, func(a, b [4]byte) int { return bytes.Compare(a[:], b[:]) })
	k.v6 = sortKernel(k.v6, func(a, b [16]byte) int { return bytes.Compare(a[:], b[:]) })
}

func sortKernel[K [4]byte | [16]byte](elems []kernelElem[K], cmp func(a, b K) int) []kernelElem[K] {
	slices.SortStableFunc(elems, func(a, b kernelElem[K]) int { return cmp(a.key, b.key) })
	out := elems[:0]
	for i, e := range elems {
		if i+1 < len(elems) && elems[i+1].key == e.key {
			continue // a later read follows
		}
		out = append(out, e)
	}
	return out
}

func (k *kernelView) get(a netip.Addr) (int64, bool) {
	if a.Is4() {
		return findKernel(k.v4, a.As4(), func(a, b [4]byte) int { return bytes.Compare(a[:], b[:]) })
	}
	return findKernel(k.v6, a.As16(), func(a, b [16]byte) int { return bytes.Compare(a[:], b[:]) })
}

func findKernel[K [4]byte | [16]byte](elems []kernelElem[K], key K, cmp func(a, b K) int) (int64, bool) {
	i, ok := slices.BinarySearchFunc(elems, key, func(e kernelElem[K], k K) int { return cmp(e.key, k) })
	if !ok {
		return 0, false
	}
	return elems[i].expires, true
}

// all yields every element, IPv4 first.
func (k *kernelView) all() iter.Seq2[netip.Addr, int64] {
	return func(yield func(netip.Addr, int64) bool) {
		for _, e := range k.v4 {
			if !yield(netip.AddrFrom4(e.key), e.expires) {
				return
			}
		}
		for _, e := range k.v6 {
			if !yield(netip.AddrFrom16(e.key), e.expires) {
				return
			}
		}
	}
}
