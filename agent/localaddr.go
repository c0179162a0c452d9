package agent

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
)

// localAlias marks the dummy interface as egressd's: `egressd remove`
// finds it by this alias without reading the config, and egressd never
// takes over an interface of the same name that someone else made.
const localAlias = "egressd: local DNS proxy addresses"

// ensureLocal makes the dummy interface dns.local_interface exist, be up
// and hold exactly dns.local_ipv4 and dns.local_ipv6: the addresses
// container DNS is DNATed to (rules.DNAT), as NodeLocal DNSCache owns its
// address. Idempotent and cheap when all is in place: the daemon calls it
// again whenever links or addresses change, and periodically.
//
// The IPv4 address has host scope and the IPv6 one is deprecated
// (preferred lifetime 0): both are local, so packets to them are
// delivered whatever interface they came in on, but the kernel never
// picks them as the source of the host's own connections (Calico's routes
// to pods have link scope, for which any global address qualifies). An
// IPv6 address the kernel refuses because IPv6 is disabled is skipped:
// nothing would send IPv6 DNS then.
//
// It reports whether it had to change anything.
func ensureLocal(cfg *config.Config) (bool, error) {
	name := cfg.DNS.LocalInterface
	changed := false
	l, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		err := netlink.LinkAdd(&netlink.Dummy{LinkAttrs: attrs})
		if errors.Is(err, unix.EOPNOTSUPP) {
			// A kernel without the dummy driver (some minimal VM
			// kernels): an ifb device, unused by any qdisc, is just as
			// inert.
			err = netlink.LinkAdd(&netlink.Ifb{LinkAttrs: attrs})
		}
		if err != nil {
			return false, fmt.Errorf("dns.local_interface: create dummy interface %s: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return false, fmt.Errorf("dns.local_interface: %s: %w", name, err)
		}
		if err := netlink.LinkSetAlias(l, localAlias); err != nil {
			return false, fmt.Errorf("dns.local_interface: %s: set alias: %w", name, err)
		}
		changed = true
	case err != nil:
		return false, fmt.Errorf("dns.local_interface: %s: %w", name, err)
	case !inert(l) || l.Attrs().Alias != localAlias:
		return false, fmt.Errorf("dns.local_interface: %s exists and is not egressd's dummy interface (type %s); name another interface", name, l.Type())
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		// A down interface's addresses are not local: the DNAT target
		// would be routed out of the host instead.
		if err := netlink.LinkSetUp(l); err != nil {
			return changed, fmt.Errorf("dns.local_interface: set %s up: %w", name, err)
		}
		changed = true
	}
	have, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return changed, fmt.Errorf("dns.local_interface: %s: %w", name, err)
	}
	want := []*netlink.Addr{
		{IPNet: hostNet(cfg.DNS.Local4), Scope: unix.RT_SCOPE_HOST},
		{IPNet: hostNet(cfg.DNS.Local6), Flags: unix.IFA_F_NODAD, PreferedLft: 0, ValidLft: math.MaxUint32},
	}
	// New addresses first, then the stale ones: a reload that moves the
	// addresses never leaves the interface without one.
	var stale []netlink.Addr
	for _, a := range have {
		ip, _ := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() && ip.Is6() {
			continue // the kernel's own fe80:: address
		}
		switch {
		case ip == cfg.DNS.Local4 && a.Scope == unix.RT_SCOPE_HOST, ip == cfg.DNS.Local6 && a.PreferedLft == 0:
			want = slices.DeleteFunc(want, func(w *netlink.Addr) bool { return w.IP.Equal(a.IP) })
		case ip == cfg.DNS.Local4, ip == cfg.DNS.Local6:
			// Ours, changed (scope, lifetime): a replace would keep the
			// change, so it goes and comes back right below.
			if err := netlink.AddrDel(l, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return changed, fmt.Errorf("dns.local_interface: %s: delete %s: %w", name, a.IPNet, err)
			}
			changed = true
		default:
			stale = append(stale, a) // of an earlier config, or someone else's
		}
	}
	for _, a := range want {
		err := netlink.AddrReplace(l, a)
		if err != nil && a.IP.To4() == nil && errors.Is(err, unix.EACCES) {
			continue // IPv6 is disabled on the interface
		}
		if err != nil {
			return changed, fmt.Errorf("dns.local_interface: %s: add %s: %w", name, a.IPNet, err)
		}
		changed = true
	}
	for _, a := range stale {
		if err := netlink.AddrDel(l, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return changed, fmt.Errorf("dns.local_interface: %s: delete %s: %w", name, a.IPNet, err)
		}
		changed = true
	}
	return changed, nil
}

// removeLocal deletes egressd's dummy interfaces (found by alias), for
// `egressd remove`. It reports their names.
func removeLocal() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var gone []string
	var errs []error
	for _, l := range links {
		if !inert(l) || l.Attrs().Alias != localAlias {
			continue
		}
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete interface %s: %w", l.Attrs().Name, err))
			continue
		}
		gone = append(gone, l.Attrs().Name)
	}
	return gone, errors.Join(errs...)
}

// inert reports whether l is of a kind egressd creates for its local
// addresses: a dummy, or an ifb where the kernel has no dummy driver.
func inert(l netlink.Link) bool { return l.Type() == "dummy" || l.Type() == "ifb" }

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// ensureLocal restores the dummy interface and its addresses if someone
// deleted or changed them; the daemon calls it on link and address events
// and with each drift check.
func (d *daemon) ensureLocal() {
	changed, err := ensureLocal(d.config())
	switch {
	case err != nil:
		if d.repairLog.Allow() {
			d.log.Error("local DNS proxy addresses not restored; container DNS fails until they are", "err", err)
		}
	case changed:
		d.log.Warn("local DNS proxy addresses restored", "interface", d.config().DNS.LocalInterface,
			"ipv4", d.config().DNS.Local4, "ipv6", d.config().DNS.Local6)
	}
}
