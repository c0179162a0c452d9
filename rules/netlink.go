package rules

import (
	"fmt"
	"iter"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
)

// The netlink rendering of a Ruleset: what AddTo queues on an
// nftables.Conn is what Text prints.

// Table is table inet egressd.
func Table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
}

// LearnedSet names the set of rule that holds its learned address addr:
// the rule's name and the address family, "allow4", "metering6".
func LearnedSet(rule string, addr netip.Addr) string {
	if addr.Is6() {
		return rule + "6"
	}
	return rule + "4"
}

// LearnedSets returns the learned-address sets of rs, in order.
func (rs *Ruleset) LearnedSets() []Set {
	var out []Set
	for _, s := range rs.Sets {
		if s.Timeout {
			out = append(out, s)
		}
	}
	return out
}

// LearnedRules returns the rules of rs that have learned-address sets.
func (rs *Ruleset) LearnedRules() []string {
	var out []string
	for _, s := range rs.LearnedSets() {
		if !slices.Contains(out, s.Rule) {
			out = append(out, s.Rule)
		}
	}
	return out
}

// Learned is what AddTo leaves to the kernel side: the learned sets'
// elements, which are not part of the model.
type Learned struct {
	// Size, if not 0, limits each learned set to Size elements in the
	// kernel.
	Size uint32
	// Fill queues the elements of the learned set s, declared as ns.
	Fill func(s Set, ns *nftables.Set) error
}

// AddTo queues on c, for its next Flush, the replacement of table inet
// egressd by rs: the table is added, deleted and added again (there is
// never a moment without it), then its sets with their elements, chains
// and rules. It returns the sets by name, as rules refer to them.
func (rs *Ruleset) AddTo(c *nftables.Conn, learned Learned) (map[string]*nftables.Set, error) {
	t := c.AddTable(Table())
	c.DelTable(t)
	t = c.AddTable(Table())
	sets := map[string]*nftables.Set{}
	for _, s := range rs.Sets {
		ns := nftSet(t, s)
		if s.Timeout && learned.Size != 0 {
			ns.Size = learned.Size
		}
		if err := c.AddSet(ns, nil); err != nil {
			return nil, fmt.Errorf("install set %s: %w", s.Name, err)
		}
		var err error
		switch s.Type {
		case IPv4Addr, IPv6Addr:
			err = learned.Fill(s, ns)
		case InetService:
			var elems []nftables.SetElement
			for _, p := range s.Ports {
				elems = append(elems, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p)})
			}
			err = QueueElements(slices.Values(elems), func(elems []nftables.SetElement) error { return c.SetAddElements(ns, elems) })
		}
		if err != nil {
			return nil, fmt.Errorf("install set %s: %w", s.Name, err)
		}
		sets[s.Name] = ns
	}
	chains := map[string]*nftables.Chain{}
	for _, ch := range rs.Chains {
		nc := &nftables.Chain{Table: t, Name: ch.Name}
		if h := ch.Hook; h != nil {
			nc.Type = nftables.ChainType(h.Type)
			nc.Hooknum = hookNum(h.Hook)
			nc.Priority = nftables.ChainPriorityRef(nftables.ChainPriority(h.Priority))
			accept := nftables.ChainPolicyAccept
			nc.Policy = &accept
		}
		chains[ch.Name] = c.AddChain(nc)
	}
	for _, ch := range rs.Chains {
		for _, r := range ch.Rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: chains[ch.Name], Exprs: r.Exprs(sets)})
		}
	}
	return sets, nil
}

// Exprs renders r as netlink expressions; sets are the sets its lookups
// refer to, by name.
func (r Rule) Exprs(sets map[string]*nftables.Set) []expr.Any {
	var e []expr.Any
	for _, s := range r.Stmts {
		e = append(e, s.exprs(sets)...)
	}
	return e
}

// maxElementsPerMessage keeps one message's element list below the 64 KiB
// that a netlink attribute can hold.
const maxElementsPerMessage = 1000

// QueueElements passes elems to each of ops in turn, in slices of at most
// maxElementsPerMessage elements: each op queues one message, and they
// all still commit in the one transaction of the next Flush. The elements
// are gathered a message at a time (a SetElement is 136 bytes; the
// messages keep only what the kernel needs).
func QueueElements(elems iter.Seq[nftables.SetElement], ops ...func([]nftables.SetElement) error) error {
	var chunk []nftables.SetElement
	flush := func() error {
		for _, op := range ops {
			if err := op(chunk); err != nil {
				return err
			}
		}
		chunk = chunk[:0]
		return nil
	}
	for e := range elems {
		chunk = append(chunk, e)
		if len(chunk) == maxElementsPerMessage {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if len(chunk) == 0 {
		return nil
	}
	return flush()
}

// nftSet declares s in table t.
func nftSet(t *nftables.Table, s Set) *nftables.Set {
	ns := &nftables.Set{Table: t, Name: s.Name, HasTimeout: s.Timeout, Comment: s.Comment}
	switch s.Type {
	case IPv4Addr:
		ns.KeyType = nftables.TypeIPAddr
	case IPv6Addr:
		ns.KeyType = nftables.TypeIP6Addr
	case InetService:
		ns.KeyType = nftables.TypeInetService
		ns.Constant = true
	}
	return ns
}

func hookNum(name string) *nftables.ChainHook {
	switch name {
	case "prerouting":
		return nftables.ChainHookPrerouting
	case "input":
		return nftables.ChainHookInput
	case "forward":
		return nftables.ChainHookForward
	case "output":
		return nftables.ChainHookOutput
	}
	panic("rules: unknown hook " + name)
}
