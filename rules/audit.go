package rules

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
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

// kernelElement is an element as an audit reads it: its address and when
// it expires (Unix ms; 0: never).
type kernelElement struct {
	addr    netip.Addr
	expires int64
}

// auditPlan compares the kernel's elements with the record at now (Unix
// ms) and returns the lives to set (address → until) and the addresses to
// delete, with what was found. Addresses in skip changed while the kernel
// was read and are left to the next audit. The kernel's expiries were read
// over read (the dump's duration), so they may seem that much earlier than
// they are.
func auditPlan(now int64, record map[netip.Addr]learnedAddr, kernel []kernelElement, skip map[netip.Addr]bool, read time.Duration) (set map[netip.Addr]int64, del []netip.Addr, found map[RepairKind]int) {
	slack := auditSlack.Milliseconds()
	early := slack + read.Milliseconds()
	set, found = map[netip.Addr]int64{}, map[RepairKind]int{}
	inKernel := make(map[netip.Addr]int64, len(kernel))
	for _, k := range kernel {
		inKernel[k.addr] = k.expires // a later read of an address wins
	}
	for a, expires := range inKernel {
		if skip[a] {
			continue
		}
		if expires == 0 {
			expires = 1<<63 - 1
		}
		l, ok := record[a]
		switch {
		case !ok && expires <= now+slack:
			// Expiring anyway; most likely one the record just pruned.
		case !ok:
			found[RepairForeign]++
			del = append(del, a)
		case l.until <= now && expires > now+slack:
			found[RepairExpired]++
			del = append(del, a)
		case l.until <= now:
		case expires < l.until-early:
			found[RepairEarly]++
			set[a] = l.until
		case expires > l.until+slack:
			found[RepairLate]++
			set[a] = l.until
		}
	}
	for a, l := range record {
		if _, in := inKernel[a]; !in && !skip[a] && l.until > now+slack {
			found[RepairMissing]++
			set[a] = l.until
		}
	}
	return set, del, found
}

// Audit reads both learned sets from the kernel and repairs every
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
	f.touched = map[netip.Addr]bool{}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.touched = nil
		f.mu.Unlock()
	}()

	installs := f.installs.Load()
	kernel, err := f.readLearnedSets()
	if err != nil {
		return Audit{}, err
	}
	read := f.now().Sub(start)
	if err := f.acquire(ctx); err != nil {
		return Audit{}, err
	}
	defer f.release()
	if f.installs.Load() != installs {
		return Audit{}, nil // the table was replaced while it was read
	}
	now := f.now()
	f.mu.Lock()
	set, del, found := auditPlan(now.UnixMilli(), f.learned, kernel, f.touched, read)
	f.mu.Unlock()
	if found[RepairMissing] > 0 {
		// A dump of a hash set that the kernel is resizing may skip
		// elements: only what two dumps miss is missing.
		again, err := f.readLearnedSets()
		if err != nil {
			return Audit{}, err
		}
		now = f.now()
		f.mu.Lock()
		set, del, found = auditPlan(now.UnixMilli(), f.learned, slices.Concat(kernel, again), f.touched, now.Sub(start))
		f.mu.Unlock()
	}
	f.mu.Lock()
	sets := f.sets
	f.mu.Unlock()
	a := Audit{At: start, Elements: len(kernel), Repaired: found}
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
func (f *Firewall) delLives(sets map[string]*nftables.Set, addrs []netip.Addr) error {
	for _, v6 := range []bool{false, true} {
		name := SetAllow4
		if v6 {
			name = SetAllow6
		}
		var elems []nftables.SetElement
		for _, a := range addrs {
			if a.Is6() == v6 {
				elems = append(elems, nftables.SetElement{Key: a.AsSlice(), Timeout: time.Second})
			}
		}
		if len(elems) == 0 {
			continue
		}
		if err := errors.Join(addElements(f.conn, sets[name], elems), delElements(f.conn, sets[name], elems)); err != nil {
			return f.abort(fmt.Errorf("delete from set %s: %w", name, err))
		}
	}
	return nil
}

// readLearnedSets dumps both learned sets through a connection of its
// own: the lasting one may be in the middle of a transaction. A missing
// table or set reads as empty.
func (f *Firewall) readLearnedSets() ([]kernelElement, error) {
	c, err := nftables.New(f.dumpOpts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	now := f.now().UnixMilli()
	var out []kernelElement
	for _, name := range []string{SetAllow4, SetAllow6} {
		s, err := c.GetSetByName(table(), name)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read set %s: %w", name, err)
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("read set %s: %w", name, err)
		}
		for _, e := range elems {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok {
				continue
			}
			k := kernelElement{addr: a}
			if e.Timeout > 0 || e.Expires > 0 {
				k.expires = now + e.Expires.Milliseconds()
			}
			out = append(out, k)
		}
	}
	return out, nil
}
