// Package firewall is the kernel side of egressd's ruleset: it installs a
// rules.Ruleset over netlink and owns what changes after that. One file
// each:
//   - firewall.go: the Firewall, its netlink connection, Install, Remove
//     and Drift (the comparison itself is rules.Ruleset.Drift);
//   - learned.go: the learned-address store and Allow, its group commit;
//   - audit.go: the audit of the learned sets against that store;
//   - watch.go: the watcher of other processes' nftables changes;
//   - probe.go, cgroup_probe.go: what the running kernel supports;
//   - netlink.go: the netlink wire helpers (the set dump, message and
//     attribute parsing);
//   - testhooks.go: the environment hooks of the end-to-end tests.
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
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/metrics"
	"github.com/egressd/egressd/rules"
)

// Firewall installs a Ruleset over netlink and keeps the learned-address
// sets. It is safe for concurrent use.
//
// Every change is one netlink transaction: Install replaces the whole table
// (add, delete, add, fill: there is never a moment without the table), and
// Allow adds the elements of many concurrent callers in one batch (group
// commit), each caller released once the kernel acknowledged that batch.
//
// Firewall remembers when each learned address expires, so that an answer
// never shortens an address's life and an Install keeps every address that
// is still valid.
type Firewall struct {
	conn     *nftables.Conn
	opts     []nftables.ConnOption
	dumpOpts []nftables.ConnOption // a short-lived connection for reading
	now      func() time.Time
	metrics  *metrics.Metrics

	// sem serialises transactions; a channel so that waiting honours ctx.
	sem chan struct{}
	// limit bounds the learned addresses (0: no bound).
	limit int

	mu      sync.Mutex
	rs      *rules.Ruleset
	sets    map[string]*nftables.Set
	learned learnedRules
	version uint64 // counts changes of learned, for savers
	queue   []*request
	// touched collects the addresses committed while an audit reads the
	// kernel (nil otherwise); installs counts Installs.
	touched  map[netip.Addr]bool
	installs atomic.Uint64
}

// New returns a Firewall that talks to the kernel through a new
// nftables connection made with opts.
func New(opts ...nftables.ConnOption) (*Firewall, error) {
	// The send buffer must hold a whole transaction, which with every
	// learned address can be megabytes.
	return newFirewall(opts, nftables.WithSockOptions(bigSendBuffer))
}

// newFirewall is New with extra options for the transaction
// socket only (a test connection has no socket buffer to size).
func newFirewall(opts []nftables.ConnOption, txOpts ...nftables.ConnOption) (*Firewall, error) {
	// One lasting netlink socket: dialling one per transaction costs more
	// than a small batch itself.
	dumpOpts := opts
	opts = slices.Concat([]nftables.ConnOption{nftables.AsLasting()}, txOpts, opts)
	conn, err := nftables.New(opts...)
	if errors.Is(err, unix.EPERM) {
		return nil, fmt.Errorf("nftables: %w (changing the firewall needs root or CAP_NET_ADMIN)", err)
	}
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return &Firewall{
		conn:     conn,
		opts:     opts,
		dumpOpts: dumpOpts,
		now:      time.Now,
		sem:      make(chan struct{}, 1),
		learned:  learnedRules{},
	}, nil
}

// Observe makes the Firewall record set updates in m.
func (f *Firewall) Observe(m *metrics.Metrics) { f.metrics = m }

// Limit bounds the learned addresses: Allow refuses new ones beyond n.
func (f *Firewall) Limit(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limit = n
}

// ErrFull is returned by Allow when the learned addresses reached the limit.
var ErrFull = errors.New("learned-address limit reached (firewall.max_learned): not opening new addresses")

// Counts returns the number of live learned addresses of each learned
// set of the installed ruleset, by set.
func (f *Firewall) Counts() map[string]int {
	now := f.now().UnixMilli()
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int{}
	if f.rs == nil {
		return out
	}
	for _, s := range f.rs.LearnedSets() {
		n := 0
		if m := f.learned[s.Rule]; m != nil {
			if s.Type == rules.IPv6Addr {
				for _, l := range m.v6 {
					n += b2i(l.until() > now)
				}
			} else {
				for _, l := range m.v4 {
					n += b2i(l.until() > now)
				}
			}
		}
		out[s.Name] = n
	}
	return out
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Install replaces table inet egressd with rs in one transaction. The
// learned sets are refilled with every element that is still valid: those
// this Firewall learned, keep (addresses from a state file), and, on its
// first Install, those the kernel holds; if allowed is not nil, only
// elements it accepts.
func (f *Firewall) Install(ctx context.Context, rs *rules.Ruleset, keep []Element, allowed func(Element) bool) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()

	now := f.now()
	f.mu.Lock()
	merged := learnedRules{}
	for _, rule := range rs.LearnedRules() {
		if m := f.learned[rule]; m != nil {
			merged[rule] = m.clone()
		}
	}
	first := f.rs == nil
	f.mu.Unlock()
	merge := func(rule string, a netip.Addr, until int64, names string) {
		if !slices.Contains(rs.LearnedRules(), rule) {
			return // a rule that is gone, or has no names any more
		}
		old, _ := merged.get(rule, a)
		merged.put(rule, a, learnedAddr{until: max(old.until, until), names: cmp.Or(old.names, names)})
	}
	// Once this Firewall installed a table, its own record is the truth (and
	// reading 100 000 elements back from the kernel takes a second); before
	// that, the kernel's sets hold what an earlier egressd learned.
	if first {
		for _, rule := range rs.LearnedRules() {
			kernel := newKernelView(0, 0)
			if _, err := f.readLearnedSets(rule, kernel); err != nil {
				return err
			}
			for a, expires := range kernel.all() {
				if expires != 0 {
					merge(rule, a, expires, "")
				}
			}
		}
	}
	for _, e := range keep {
		merge(e.ruleOf(), e.Addr, e.Expires.UnixMilli(), e.Names)
	}
	soon := now.Add(time.Millisecond).UnixMilli()
	for rule, m := range merged {
		for a, l := range m.all() {
			if l.until <= soon || (allowed != nil && !allowed(l.element(rule, a))) {
				m.del(a)
			}
		}
	}

	c := f.conn
	size, _ := testSetSize() // a test hook, testhooks.go
	sets, err := rs.AddTo(c, rules.Learned{Size: size, Fill: func(s rules.Set, ns *nftables.Set) error {
		add := func(elems []nftables.SetElement) error { return c.SetAddElements(ns, elems) }
		m := merged[s.Rule]
		if m == nil {
			return nil
		}
		return queueLives(untils(m), s.Type == rules.IPv6Addr, now, add)
	}})
	if err != nil {
		return f.abort(err)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install table inet %s: %w", rules.TableName, err)
	}
	f.mu.Lock()
	f.rs, f.sets, f.learned = rs, sets, merged
	f.version++
	f.installs.Add(1)
	f.mu.Unlock()
	f.metrics.RulesetInstalled()
	return nil
}

// abort drops a transaction that failed before it was sent: the
// connection buffers messages until Flush, and the next Flush must not send
// half a table. The caller holds sem.
func (f *Firewall) abort(err error) error {
	_ = f.conn.CloseLasting()
	if conn, cerr := nftables.New(f.opts...); cerr == nil {
		f.conn = conn
	} else {
		err = errors.Join(err, fmt.Errorf("reconnect to nftables: %w", cerr))
	}
	return err
}

// setLives queues, for the next Flush, that each address of lives lives
// in its set until its until (Unix ms). The caller holds sem.
//
// Addresses the kernel may hold already are replaced (replace), not
// re-added: re-adding an existing element changes neither its timeout nor
// its expiry before Linux 6.12, and from 6.12 only if the new timeout
// differs from the old one. Add, delete, add of the same key in one
// transaction resets the expiry on every kernel; the first add makes the
// delete safe when the element is absent (expired a moment ago), which
// would otherwise fail the whole transaction with ENOENT.
func (f *Firewall) setLives(sets map[string]*nftables.Set, lives map[ruleAddr]int64, replace bool, now time.Time) error {
	bySet := map[string]map[netip.Addr]int64{}
	for ra, until := range lives {
		name := rules.LearnedSet(ra.rule, ra.addr)
		if bySet[name] == nil {
			bySet[name] = map[netip.Addr]int64{}
		}
		bySet[name][ra.addr] = until
	}
	for _, name := range slices.Sorted(maps.Keys(bySet)) {
		s := sets[name]
		if s == nil {
			return f.abort(fmt.Errorf("set lifetimes: no set %s in the installed ruleset", name))
		}
		add := func(elems []nftables.SetElement) error { return f.conn.SetAddElements(s, elems) }
		ops := []func([]nftables.SetElement) error{add}
		if replace {
			del := func(elems []nftables.SetElement) error { return f.conn.SetDeleteElements(s, elems) }
			ops = append(ops, del, add)
		}
		if err := queueLives(maps.All(bySet[name]), s.KeyType == nftables.TypeIP6Addr, now, ops...); err != nil {
			return f.abort(fmt.Errorf("set lifetimes in set %s: %w", name, err))
		}
	}
	return nil
}

// sendBuffer is the netlink send buffer: a transaction is one sendmsg, and
// 100 000 learned addresses take about 6 MB.
const sendBuffer = 64 << 20

func bigSendBuffer(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		// SO_SNDBUFFORCE (CAP_NET_ADMIN) may exceed net.core.wmem_max.
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sendBuffer)
	})
	return errors.Join(err, serr)
}

// queueLives queues each address of lives of one family (v6), with the
// timeout that ends at its until (Unix ms): ops, in order, for each
// message's elements (see rules.QueueElements).
func queueLives(lives iter.Seq2[netip.Addr, int64], v6 bool, now time.Time, ops ...func([]nftables.SetElement) error) error {
	return rules.QueueElements(func(yield func(nftables.SetElement) bool) {
		for a, until := range lives {
			if a.Is6() == v6 && !yield(nftables.SetElement{Key: a.AsSlice(), Timeout: timeout(until, now)}) {
				return
			}
		}
	}, ops...)
}

// timeout is the kernel timeout from now to until (Unix ms), rounded up to
// the millisecond the kernel counts in.
func timeout(until int64, now time.Time) time.Duration {
	d := time.UnixMilli(until).Sub(now)
	return (d + time.Millisecond - 1).Truncate(time.Millisecond)
}

// Remove deletes table inet egressd. It reports whether the table existed.
func (f *Firewall) Remove(ctx context.Context) (bool, error) {
	if err := f.acquire(ctx); err != nil {
		return false, err
	}
	defer f.release()
	if _, err := f.conn.ListTableOfFamily(rules.TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("look up table inet %s: %w", rules.TableName, err)
	}
	f.conn.DelTable(rules.Table())
	if err := f.conn.Flush(); err != nil {
		return false, fmt.Errorf("delete table inet %s: %w", rules.TableName, err)
	}
	f.mu.Lock()
	f.rs, f.sets = nil, nil
	f.mu.Unlock()
	return true, nil
}

// Drift compares the installed table with the ruleset this Firewall
// installed last (see rules.Ruleset.Drift); "" if none was installed.
func (f *Firewall) Drift(ctx context.Context) (string, error) {
	if err := f.acquire(ctx); err != nil {
		return "", err
	}
	defer f.release()
	f.mu.Lock()
	rs := f.rs
	f.mu.Unlock()
	if rs == nil {
		return "", nil
	}
	return rs.Drift(f.conn)
}

func (f *Firewall) acquire(ctx context.Context) error {
	select {
	case f.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *Firewall) release() { <-f.sem }
