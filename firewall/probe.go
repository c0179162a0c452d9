package firewall

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"

	"github.com/egressd/egressd/rules"
)

// Lifetimes is what the running kernel does when egressd extends the life
// of a set element, as ProbeLifetimes measured it.
type Lifetimes struct {
	// ReAddUpdates: re-adding an element with another timeout changes its
	// life (Linux 6.12 and later). egressd does not rely on it.
	ReAddUpdates bool
	// ReplaceResets: adding, deleting and adding an element in one
	// transaction gives it a new life. Extensions rely on it.
	ReplaceResets bool
}

func (l Lifetimes) String() string {
	return fmt.Sprintf("re-add updates timeout: %t, replace resets expiry: %t", l.ReAddUpdates, l.ReplaceResets)
}

// probeTable is a scratch table, removed again before ProbeLifetimes
// returns.
const probeTable = rules.TableName + "_probe"

// ProbeLifetimes measures, in a scratch table, how the running kernel
// treats extended set element lifetimes, rather than trusting its version.
// It returns an error if the kernel does not give a replaced element a new
// life: then only the audit would keep extended addresses open.
func (f *Firewall) ProbeLifetimes() (Lifetimes, error) {
	if err := f.acquire(context.Background()); err != nil {
		return Lifetimes{}, err
	}
	defer f.release()
	c := f.conn
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: probeTable}
	s := &nftables.Set{Table: t, Name: "s", KeyType: nftables.TypeIPAddr, HasTimeout: true}
	readd, replace := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	el := func(a netip.Addr, d time.Duration) []nftables.SetElement {
		return []nftables.SetElement{{Key: a.AsSlice(), Timeout: d}}
	}
	const short, long = 5 * time.Second, time.Hour
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	err := errors.Join(c.AddSet(s, nil), c.SetAddElements(s, el(readd, short)), c.SetAddElements(s, el(replace, short)))
	if err != nil {
		return Lifetimes{}, f.abort(fmt.Errorf("probe set lifetimes: %w", err))
	}
	if err := c.Flush(); err != nil {
		return Lifetimes{}, fmt.Errorf("probe set lifetimes: %w", err)
	}
	defer func() {
		c.DelTable(t)
		_ = c.Flush()
	}()
	err = errors.Join(c.SetAddElements(s, el(readd, long)),
		c.SetAddElements(s, el(replace, long)), c.SetDeleteElements(s, el(replace, 0)), c.SetAddElements(s, el(replace, long)))
	if err != nil {
		return Lifetimes{}, f.abort(fmt.Errorf("probe set lifetimes: %w", err))
	}
	if err := c.Flush(); err != nil {
		return Lifetimes{}, fmt.Errorf("probe set lifetimes: %w", err)
	}
	elems, err := c.GetSetElements(s)
	if err != nil {
		return Lifetimes{}, fmt.Errorf("probe set lifetimes: %w", err)
	}
	var l Lifetimes
	for _, e := range elems {
		a, _ := netip.AddrFromSlice(e.Key)
		switch {
		case a == readd:
			l.ReAddUpdates = e.Expires > short
		case a == replace:
			l.ReplaceResets = e.Expires > short
		}
	}
	if !l.ReplaceResets {
		return l, fmt.Errorf("this kernel does not renew a replaced set element (%s): extended addresses may close early until an audit repairs them", l)
	}
	return l, nil
}
