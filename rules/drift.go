package rules

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/google/nftables/expr"
	"os"
	"reflect"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Drift compares the installed table with the ruleset this Firewall
// installed last, by value, and describes the first difference ("" if
// none): set definitions, chain hooks, priorities and policies, and every
// expression of every rule (a changed interface name, verdict, lookup or
// redirect port is drift, not only a changed shape). It never reads the
// learned sets' elements, which may number hundreds of thousands; Audit
// does.
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
			if !sameExprs(r.Exprs, want.Rules[i].exprs(declared)) {
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
		s, w := sets[i], nftSet(table(), want)
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
		sets[s.Name] = nftSet(table(), s)
	}
	return sets
}

// Watch calls changed with a reason whenever another process changes
// nftables in a way that may affect table inet egressd: any change of that
// table (`nft flush ruleset` deletes every table) or of its sets'
// elements. Changes egressd makes itself are ignored. Watch returns when
// ctx ends; if it loses events (ENOBUFS) or its socket fails, it says so
// through changed (ReasonEventsLost) and carries on: the caller must then
// check everything, rules and elements.
//
// It reads the nftables netlink group itself instead of using
// nftables.Monitor: the group carries a message for every element egressd
// adds, and decoding each of them more than doubled the cost of an answer.
// Here messages are read into one buffer and looked at in place; only the
// first of a transaction that may be about egressd's table is decoded.
func (f *Firewall) Watch(ctx context.Context, changed func(reason string)) {
	for ctx.Err() == nil {
		err := f.watch(ctx, changed)
		if ctx.Err() != nil {
			return
		}
		changed(ReasonEventsLost + ": " + err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (f *Firewall) watch(ctx context.Context, changed func(string)) error {
	// A raw socket read into one buffer: every element egressd adds
	// comes back as a notification, so receiving must cost next to
	// nothing (a netlink.Conn allocates every message).
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("netlink socket: %w", err)
	}
	sock := os.NewFile(uintptr(fd), "nftables events") // in Go's poller: fd is non-blocking
	defer sock.Close()
	stop := context.AfterFunc(ctx, func() { sock.Close() })
	defer stop()
	size := 8 << 20 // bursts of element notifications
	if n, ok := testEventBuffer(); ok {
		size = n // a test hook, testhooks.go
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1 << (unix.NFNLGRP_NFTABLES - 1)}); err != nil {
		return fmt.Errorf("join the nftables group: %w", err)
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	reason := "" // of the batch being received; a NEWGEN message ends it
	for {
		var n int
		var rerr error
		if err := rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), buf)
			return rerr != unix.EAGAIN
		}); err != nil {
			return err
		}
		if rerr != nil {
			return fmt.Errorf("receive nftables events: %w", rerr)
		}
		msgs, err := parseMessages(buf[:n])
		if err != nil {
			return fmt.Errorf("receive nftables events: %w", err)
		}
		for _, m := range msgs {
			typ, data := uint16(m.Header.Type), m.Data
			if typ>>8 != unix.NFNL_SUBSYS_NFTABLES {
				continue
			}
			switch t := int(typ & 0xff); t {
			case unix.NFT_MSG_NEWGEN:
				if reason != "" && !ours(genPID(data)) {
					changed(reason)
				}
				reason = ""
			case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
				unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET,
				unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
				if reason == "" && ourTable(data) {
					reason = fmt.Sprintf("another process changed table inet %s (message %d)", TableName, t)
					if t == unix.NFT_MSG_NEWSETELEM || t == unix.NFT_MSG_DELSETELEM {
						reason = ReasonElementsChanged
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

// ours reports whether the process that made a ruleset generation is
// this one. The kernel reports the committing thread's id, which for a Go
// program is any of its threads.
func ours(tid uint32) bool {
	if tid == uint32(os.Getpid()) {
		return true
	}
	_, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid))
	return err == nil
}

// Reasons Watch gives besides rule changes.
const (
	// ReasonElementsChanged: another process added or deleted elements of
	// egressd's sets. Drift cannot see it; Audit repairs it.
	ReasonElementsChanged = "set elements changed by another process"
	// ReasonEventsLost: the event socket overflowed or failed; anything may
	// have changed meanwhile.
	ReasonEventsLost = "nftables events lost"
)
