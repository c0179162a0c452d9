package rules

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Drift compares the installed table, read through c, with rs, by value,
// and describes the first difference ("" if none): set definitions, chain
// hooks, priorities and policies, and every expression of every rule (a
// changed interface name, verdict, lookup or redirect port is drift, not
// only a changed shape). It never reads the learned sets' elements, which
// may number hundreds of thousands; the kernel side's audit does.
func (rs *Ruleset) Drift(c *nftables.Conn) (string, error) {
	t, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if errors.Is(err, unix.ENOENT) {
		return "table inet " + TableName + " is missing", nil
	}
	if err != nil {
		return "", fmt.Errorf("check table: %w", err)
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return "", fmt.Errorf("check sets: %w", err)
	}
	if d, err := setsDrift(c, rs, sets); d != "" || err != nil {
		return d, err
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return "", fmt.Errorf("check chains: %w", err)
	}
	have := map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			have[ch.Name] = ch
		}
	}
	if len(have) != len(rs.Chains) {
		return fmt.Sprintf("table has %d chains, want %d", len(have), len(rs.Chains)), nil
	}
	declared := declared(rs)
	for _, want := range rs.Chains {
		ch, ok := have[want.Name]
		if !ok {
			return "chain " + want.Name + " is missing", nil
		}
		if d := hookDrift(want, ch); d != "" {
			return "chain " + want.Name + ": " + d, nil
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return "", fmt.Errorf("check chain %s: %w", want.Name, err)
		}
		if len(rules) != len(want.Rules) {
			return fmt.Sprintf("chain %s has %d rules, want %d", want.Name, len(rules), len(want.Rules)), nil
		}
		for i, r := range rules {
			if !sameExprs(r.Exprs, want.Rules[i].Exprs(declared)) {
				return fmt.Sprintf("chain %s rule %d is not %q", want.Name, i+1, want.Rules[i].Text()), nil
			}
		}
	}
	return "", nil
}

// setsDrift compares the table's set definitions with rs, and the
// elements of its constant sets.
func setsDrift(c *nftables.Conn, rs *Ruleset, sets []*nftables.Set) (string, error) {
	if len(sets) != len(rs.Sets) {
		return fmt.Sprintf("table has %d sets, want %d", len(sets), len(rs.Sets)), nil
	}
	for _, want := range rs.Sets {
		i := slices.IndexFunc(sets, func(s *nftables.Set) bool { return s.Name == want.Name })
		if i < 0 {
			return "set " + want.Name + " is missing", nil
		}
		s, w := sets[i], nftSet(Table(), want)
		if s.KeyType.Name != w.KeyType.Name || s.HasTimeout != w.HasTimeout || s.Constant != w.Constant ||
			s.Interval != w.Interval || s.IsMap != w.IsMap || s.Concatenation != w.Concatenation || s.Timeout != 0 {
			return fmt.Sprintf("set %s has another key type or flags", want.Name), nil
		}
		if want.Type != InetService {
			continue
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return "", fmt.Errorf("check set %s: %w", want.Name, err)
		}
		var ports []uint16
		for _, e := range elems {
			if len(e.Key) == 2 {
				ports = append(ports, binary.BigEndian.Uint16(e.Key))
			}
		}
		slices.Sort(ports)
		if !slices.Equal(ports, slices.Sorted(slices.Values(want.Ports))) {
			return fmt.Sprintf("set %s holds %v, want %v", want.Name, ports, want.Ports), nil
		}
	}
	return "", nil
}

// hookDrift compares a chain's type, hook, priority and policy.
func hookDrift(want Chain, ch *nftables.Chain) string {
	h := want.Hook
	if h == nil {
		if ch.Hooknum != nil {
			return "a regular chain became a base chain"
		}
		return ""
	}
	if ch.Hooknum == nil || *ch.Hooknum != *hookNum(h.Hook) || ch.Priority == nil || int(*ch.Priority) != h.Priority ||
		string(ch.Type) != h.Type || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept {
		return fmt.Sprintf("not type %s hook %s priority %d policy accept", h.Type, h.Hook, h.Priority)
	}
	return ""
}

// sameExprs compares a rule read from the kernel with the expressions
// egressd installs, after normalising what the kernel fills in or
// renumbers.
func sameExprs(have, want []expr.Any) bool {
	return reflect.DeepEqual(normalised(have), normalised(want))
}

func normalised(exprs []expr.Any) []expr.Any {
	// google/nftables v0.3.0 drops "socket" expressions when it reads
	// rules back (its parser does not know them): compare without them.
	// The cmp that follows, with the cgroup id, is still compared.
	out := slices.DeleteFunc(slices.Clone(exprs), func(e expr.Any) bool {
		_, ok := e.(*expr.Socket)
		return ok
	})
	for i, e := range out {
		switch e := e.(type) {
		case *expr.Lookup:
			n := *e
			n.SetID = 0 // a transaction-local number; the name identifies the set
			out[i] = &n
		case *expr.Redir:
			// The kernel reports the upper port bound and the "range given"
			// flag that a single port implies.
			n := *e
			if n.RegisterProtoMin != 0 {
				n.RegisterProtoMax = cmp.Or(n.RegisterProtoMax, n.RegisterProtoMin)
				n.Flags |= unix.NF_NAT_RANGE_PROTO_SPECIFIED
			}
			out[i] = &n
		case *expr.NAT:
			// The kernel reports the upper bounds, equal to the lower ones.
			n := *e
			n.RegAddrMax = cmp.Or(n.RegAddrMax, n.RegAddrMin)
			n.RegProtoMax = cmp.Or(n.RegProtoMax, n.RegProtoMin)
			out[i] = &n
		}
	}
	return out
}

// declared returns the sets of rs as lookups see them.
func declared(rs *Ruleset) map[string]*nftables.Set {
	sets := map[string]*nftables.Set{}
	for _, s := range rs.Sets {
		sets[s.Name] = nftSet(Table(), s)
	}
	return sets
}
