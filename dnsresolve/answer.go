package dnsresolve

import (
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

// maxChain bounds the CNAME chain egressd follows.
const maxChain = 12

// Chain is the part of an answer that belongs to one question: the CNAME
// records from the queried name to its final target, and the address
// records of that target.
type Chain struct {
	CNAMEs []dns.RR
	Addrs  []dns.RR // A or AAAA records of Target that passed the guard
	Target string   // last name of the chain (the queried name if none)
	// Blocked holds the addresses removed by the rebinding guard.
	Blocked []netip.Addr
}

// extract follows the CNAME chain from name through answer and collects
// the records of type qtype at its end. Records for other names are
// ignored. It reports whether the chain ended in a CNAME whose target has
// no records in this answer (so the rest must be resolved).
func (c *Chain) extract(answer []dns.RR, name string, qtype uint16) (incomplete bool) {
	if c.Target == "" {
		c.Target = name
	}
	for range maxChain {
		next := ""
		for _, rr := range answer {
			if cn, ok := rr.(*dns.CNAME); ok && strings.EqualFold(cn.Hdr.Name, c.Target) {
				next = cn.Target
				c.CNAMEs = append(c.CNAMEs, rr)
				break
			}
		}
		if next == "" {
			break
		}
		c.Target = next
	}
	found := false
	for _, rr := range answer {
		if rr.Header().Rrtype != qtype || !strings.EqualFold(rr.Header().Name, c.Target) {
			continue
		}
		found = true
		a := rrAddr(rr)
		if !Routable(a) {
			c.Blocked = append(c.Blocked, a)
			continue
		}
		c.Addrs = append(c.Addrs, rr)
	}
	return !found && len(c.CNAMEs) > 0 && !strings.EqualFold(c.Target, name)
}

func rrAddr(rr dns.RR) netip.Addr {
	var a netip.Addr
	switch r := rr.(type) {
	case *dns.A:
		a, _ = netip.AddrFromSlice(r.A.To4())
	case *dns.AAAA:
		a, _ = netip.AddrFromSlice(r.AAAA.To16())
	}
	return a
}

// Addresses returns the addresses of the chain and the smallest TTL of
// the records that lead to them.
func (c *Chain) Addresses() ([]netip.Addr, uint32) {
	addrs := make([]netip.Addr, 0, len(c.Addrs))
	ttl := ^uint32(0)
	for _, rr := range c.Addrs {
		addrs = append(addrs, rrAddr(rr))
		ttl = min(ttl, rr.Header().Ttl)
	}
	if len(addrs) == 0 {
		ttl = 0
	}
	return addrs, ttl
}

// Records returns the chain as answer records: the CNAMEs, then the
// addresses.
func (c *Chain) Records() []dns.RR {
	return append(append(make([]dns.RR, 0, len(c.CNAMEs)+len(c.Addrs)), c.CNAMEs...), c.Addrs...)
}

var cgnat = netip.MustParsePrefix("100.64.0.0/10")
var thisNetwork = netip.MustParsePrefix("0.0.0.0/8")

// Routable reports whether a is an address a public name may resolve to.
// Loopback, private (RFC 1918, fc00::/7), link-local, CGNAT, unspecified,
// multicast and broadcast answers would let a public name open a path into
// the host or its networks (DNS rebinding), so they are never allowed.
func Routable(a netip.Addr) bool {
	a = a.Unmap()
	switch {
	case !a.IsValid(),
		a.IsLoopback(), a.IsPrivate(), a.IsUnspecified(),
		a.IsLinkLocalUnicast(), a.IsLinkLocalMulticast(), a.IsInterfaceLocalMulticast(), a.IsMulticast(),
		a.Is4() && (cgnat.Contains(a) || thisNetwork.Contains(a) || a == netip.AddrFrom4([4]byte{255, 255, 255, 255})):
		return false
	}
	return true
}
