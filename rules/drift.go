package rules

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
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
// table (`nft flush ruleset` deletes every table) or deleted elements of its
// sets. Changes egressd makes itself are ignored. Watch returns when ctx
// ends; if it loses events or its socket fails, it says so through changed
// and carries on, and the caller's periodic Drift check covers the gap.
//
// It reads the nftables netlink group itself instead of using
// nftables.Monitor: the group carries a message for every element egressd
// adds, and decoding each of them more than doubled the cost of an answer.
// Here a message is dropped on its type alone unless it can matter.
func (f *Firewall) Watch(ctx context.Context, changed func(reason string)) {
	self := uint32(os.Getpid())
	for ctx.Err() == nil {
		err := f.watch(ctx, self, changed)
		if ctx.Err() != nil {
			return
		}
		changed("nftables events lost: " + err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (f *Firewall) watch(ctx context.Context, self uint32, changed func(string)) error {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetReadBuffer(8 << 20) // bursts of element notifications
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		return err
	}
	reason := "" // of the batch being received; a NEWGEN message ends it
	for {
		msgs, err := c.Receive()
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES {
				continue
			}
			switch t := int(m.Header.Type & 0xff); t {
			case unix.NFT_MSG_NEWGEN:
				if reason != "" && genPID(m.Data) != self {
					changed(reason)
				}
				reason = ""
			case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
				unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET, unix.NFT_MSG_DELSETELEM:
				if reason == "" && ourTable(m.Data) {
					reason = fmt.Sprintf("another process changed table inet %s (message %d)", TableName, t)
					if t == unix.NFT_MSG_DELSETELEM {
						reason = ReasonElementsDeleted
					}
				}
			}
		}
	}
}

// ourTable reports whether an nftables message (nfgenmsg, then attributes)
// is about table inet egressd: in every message type watched, attribute 1
// names the table.
func ourTable(data []byte) bool {
	if len(data) < 4 || data[0] != unix.NFPROTO_INET {
		return false
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return false
	}
	for ad.Next() {
		if ad.Type() == 1 {
			return ad.String() == TableName
		}
	}
	return false
}

// genPID returns the process that made a ruleset generation.
func genPID(data []byte) uint32 {
	if len(data) < 4 {
		return 0
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return 0
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_GEN_PROC_PID {
			return ad.Uint32()
		}
	}
	return 0
}

// ReasonElementsDeleted is the reason Watch gives when another process
// deleted set elements: Drift cannot see it, so the caller must reinstall.
const ReasonElementsDeleted = "set elements deleted by another process"
