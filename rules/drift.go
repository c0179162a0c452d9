package rules

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Drift compares the installed table with the ruleset this Firewall
// installed last and describes the first difference ("" if none). It reads
// table, set and chain metadata and the rules, never the set elements,
// which may number hundreds of thousands.
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
	c := f.conn
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
	if len(sets) != len(rs.Sets) {
		return fmt.Sprintf("table has %d sets, want %d", len(sets), len(rs.Sets)), nil
	}
	for _, want := range rs.Sets {
		found := false
		for _, s := range sets {
			if s.Name == want.Name {
				found = s.HasTimeout == want.Timeout
			}
		}
		if !found {
			return "set " + want.Name + " is missing or changed", nil
		}
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
	for _, want := range rs.Chains {
		ch, ok := have[want.Name]
		if !ok {
			return "chain " + want.Name + " is missing", nil
		}
		if h := want.Hook; h != nil && (ch.Hooknum == nil || *ch.Hooknum != *hookNum(h.Hook) ||
			ch.Priority == nil || int(*ch.Priority) != h.Priority || string(ch.Type) != h.Type ||
			ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept) {
			return "chain " + want.Name + " has another hook, priority or policy", nil
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return "", fmt.Errorf("check chain %s: %w", want.Name, err)
		}
		if len(rules) != len(want.Rules) {
			return fmt.Sprintf("chain %s has %d rules, want %d", want.Name, len(rules), len(want.Rules)), nil
		}
		for i, r := range rules {
			wantExprs := want.Rules[i].exprs(declared(rs))
			if len(r.Exprs) != len(wantExprs) {
				return fmt.Sprintf("chain %s rule %d changed", want.Name, i+1), nil
			}
			for j := range wantExprs {
				if reflect.TypeOf(r.Exprs[j]) != reflect.TypeOf(wantExprs[j]) {
					return fmt.Sprintf("chain %s rule %d changed", want.Name, i+1), nil
				}
			}
		}
	}
	return "", nil
}

// declared returns the sets of rs as lookups see them.
func declared(rs *Ruleset) map[string]*nftables.Set {
	sets := map[string]*nftables.Set{}
	for _, s := range rs.Sets {
		sets[s.Name] = nftSet(table(), s)
	}
	return sets
}

// Watch calls changed with a reason whenever another process changes
// nftables in a way that may affect table inet egressd: any change of that
// table, a deleted table (`nft flush ruleset` deletes them all) or deleted
// set elements. Changes egressd makes itself are ignored. Watch returns when
// ctx ends; if the monitor fails it reconnects, and the caller's periodic
// Drift check covers the gap.
func (f *Firewall) Watch(ctx context.Context, changed func(reason string)) {
	self := uint32(os.Getpid())
	for ctx.Err() == nil {
		mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(256))
		// Not f.conn: its lasting socket carries the transactions.
		conn, err := nftables.New(f.opts...)
		var events chan *nftables.MonitorEvents
		if err == nil {
			events, err = conn.AddGenerationalMonitor(mon)
		}
		if err != nil {
			changed("nftables monitor failed: " + err.Error())
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		stop := context.AfterFunc(ctx, func() { _ = mon.Close() })
		for batch := range events {
			if gen, ok := batch.GeneratedBy.Data.(*nftables.GenMsg); ok && gen.ProcPID == self {
				continue
			}
			if reason := affects(batch.Changes); reason != "" {
				changed(reason)
			}
		}
		stop()
	}
}

func affects(changes []*nftables.MonitorEvent) string {
	for _, ev := range changes {
		if ev.Error != nil {
			continue
		}
		var table *nftables.Table
		switch d := ev.Data.(type) {
		case *nftables.Table:
			table = d
		case *nftables.Chain:
			table = d.Table
		case *nftables.Rule:
			table = d.Table
		case *nftables.Set:
			table = d.Table
		case []nftables.SetElement:
			if ev.Type == nftables.MonitorEventTypeDelSetElem {
				return ReasonElementsDeleted
			}
		}
		if table != nil && table.Name == TableName {
			return fmt.Sprintf("another process changed table inet %s (event %d)", TableName, ev.Type)
		}
	}
	return ""
}

// ReasonElementsDeleted is the reason Watch gives when another process
// deleted set elements: Drift cannot see it, so the caller must reinstall.
const ReasonElementsDeleted = "set elements deleted by another process"
