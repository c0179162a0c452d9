package dnsresolve

import (
	"net/netip"
	"slices"
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
// ignored; addresses the guard refuses go to Blocked. It reports whether
// the chain ended in a CNAME whose target has no records in this answer (so
// the rest must be resolved).
func (c *Chain) extract(answer []dns.RR, name string, qtype uint16, guard *Guard) (incomplete bool) {
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
		if !guard.Allows(a) {
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

// capTTL lowers every TTL of the chain above max to max.
func (c *Chain) capTTL(max uint32) {
	c.CNAMEs = capTTL(c.CNAMEs, max)
	c.Addrs = capTTL(c.Addrs, max)
}

// capTTL returns rrs with every TTL above max lowered to max; records are
// copied before they change, never modified in place.
func capTTL(rrs []dns.RR, max uint32) []dns.RR {
	for i, rr := range rrs {
		if rr.Header().Ttl > max {
			rr = dns.Copy(rr)
			rr.Header().Ttl = max
			rrs[i] = rr
		}
	}
	return rrs
}

// Records returns the chain as answer records: the CNAMEs, then the
// addresses.
func (c *Chain) Records() []dns.RR {
	return append(append(make([]dns.RR, 0, len(c.CNAMEs)+len(c.Addrs)), c.CNAMEs...), c.Addrs...)
}

// Guard is the rebinding guard: it decides whether an address in a DNS
// answer may be opened. A public name that resolves into the host or its
// networks (DNS rebinding) would let a container reach what egressd is
// there to keep it from, so only globally reachable addresses pass, plus
// the prefixes the operator exempted (split-horizon names, labs). The zero
// and nil Guards exempt nothing.
type Guard struct {
	exempt []netip.Prefix
}

// NewGuard returns a Guard that also lets through addresses in exempt.
func NewGuard(exempt []netip.Prefix) *Guard {
	return &Guard{exempt: slices.Clone(exempt)}
}

// Routable reports whether a passes the guard without exemptions.
func Routable(a netip.Addr) bool { return (*Guard)(nil).Allows(a) }

// Allows reports whether an answer may open a: a is globally reachable
// according to the IANA special-purpose address registries, or exempted.
// IPv6 addresses that lead to an IPv4 address (IPv4-mapped, NAT64, 6to4)
// are judged by that IPv4 address too.
func (g *Guard) Allows(a netip.Addr) bool {
	if !a.IsValid() || a.Zone() != "" {
		return false
	}
	// ::ffff:a.b.c.d is a.b.c.d to a dual-stack socket.
	a = a.Unmap()
	if g != nil {
		for _, p := range g.exempt {
			if p.Contains(a) {
				return true
			}
		}
	}
	if a.Is4() {
		return !inAny(a, nonGlobal4) || inAny(a, global4)
	}
	switch {
	case nat64.Contains(a):
		// RFC 6052 with the well-known /96 prefix: the last 32 bits.
		b := a.As16()
		return g.Allows(netip.AddrFrom4([4]byte(b[12:16])))
	case nat64Local.Contains(a):
		return g.allowsLocalNAT64(a)
	case sixToFour.Contains(a):
		// RFC 3056: 2002:V4ADDR::/48, the IPv4 address in bits 16-47.
		b := a.As16()
		return g.Allows(netip.AddrFrom4([4]byte(b[2:6])))
	case !globalUnicast6.Contains(a):
		// Only 2000::/3 is global unicast (IANA IPv6 Address Space
		// registry). Outside it: ::/128, ::1, deprecated IPv4-compatible
		// ::/96, 100::/64, 5f00::/16, fc00::/7, fe80::/10, fec0::/10,
		// ff00::/8 and space reserved by the IETF.
		return false
	}
	return !inAny(a, nonGlobal6) || inAny(a, global6)
}

// allowsLocalNAT64 judges 64:ff9b:1::/48 (RFC 8215, local-use
// IPv4/IPv6 translation). The registry marks the block not globally
// reachable, but like the well-known prefix it only leads to the IPv4
// address its translator extracts. The translator's prefix can be /48,
// /56, /64 or /96 inside the block, which egressd cannot know, so the
// address passes only if the IPv4 address at every RFC 6052 position is
// allowed, and bits 64-71 (the "u" octet) are zero as RFC 6052 requires.
func (g *Guard) allowsLocalNAT64(a netip.Addr) bool {
	b := a.As16()
	if b[8] != 0 {
		return false
	}
	for _, pos := range [][4]int{
		{6, 7, 9, 10},    // /48
		{7, 9, 10, 11},   // /56
		{9, 10, 11, 12},  // /64
		{12, 13, 14, 15}, // /96
	} {
		if !g.Allows(netip.AddrFrom4([4]byte{b[pos[0]], b[pos[1]], b[pos[2]], b[pos[3]]})) {
			return false
		}
	}
	return true
}

func inAny(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// The blocks of the IANA IPv4 and IPv6 Special-Purpose Address Registries
// (https://www.iana.org/assignments/iana-ipv4-special-registry/ and
// https://www.iana.org/assignments/iana-ipv6-special-registry/, as of
// their 2025-10-09 updates, RFC 6890 and its updates) whose "Globally
// Reachable" column is False or N/A, and the more specific entries inside
// them that are globally reachable. N/A entries (deprecated 6to4 relay
// anycast, 6to4, Teredo) are blocked or judged by the address they embed.
var (
	nonGlobal4 = prefixes(
		"0.0.0.0/8",       // "This network", RFC 791
		"10.0.0.0/8",      // Private-Use, RFC 1918
		"100.64.0.0/10",   // Shared Address Space (CGNAT), RFC 6598
		"127.0.0.0/8",     // Loopback, RFC 1122
		"169.254.0.0/16",  // Link Local, RFC 3927 (cloud metadata lives here)
		"172.16.0.0/12",   // Private-Use, RFC 1918
		"192.0.0.0/24",    // IETF Protocol Assignments, RFC 6890 (DS-Lite, NAT64 discovery...)
		"192.0.2.0/24",    // Documentation (TEST-NET-1), RFC 5737
		"192.88.99.0/24",  // Deprecated 6to4 Relay Anycast, RFC 7526 (and 6a44 relay, RFC 6751)
		"192.168.0.0/16",  // Private-Use, RFC 1918
		"198.18.0.0/15",   // Benchmarking, RFC 2544
		"198.51.100.0/24", // Documentation (TEST-NET-2), RFC 5737
		"203.0.113.0/24",  // Documentation (TEST-NET-3), RFC 5737
		"224.0.0.0/4",     // Multicast, RFC 5771 (not in the registry, never a server)
		"240.0.0.0/4",     // Reserved, RFC 1112; includes 255.255.255.255/32 Limited Broadcast
	)
	global4 = prefixes(
		"192.0.0.9/32",  // Port Control Protocol Anycast, RFC 7723
		"192.0.0.10/32", // Traversal Using Relays around NAT Anycast, RFC 8155
	)
	nonGlobal6 = prefixes(
		"2001::/23",     // IETF Protocol Assignments, RFC 2928 (Teredo, benchmarking, ORCHID...)
		"2001:db8::/32", // Documentation, RFC 3849
		"3fff::/20",     // Documentation, RFC 9637
	)
	global6 = prefixes(
		"2001:1::1/128",   // Port Control Protocol Anycast, RFC 7723
		"2001:1::2/128",   // Traversal Using Relays around NAT Anycast, RFC 8155
		"2001:1::3/128",   // DNS-SD Service Registration Protocol Anycast, RFC 9665
		"2001:3::/32",     // AMT, RFC 7450
		"2001:4:112::/48", // AS112-v6, RFC 7535
		"2001:20::/28",    // ORCHIDv2, RFC 7343
		"2001:30::/28",    // Drone Remote ID Protocol Entity Tags, RFC 9374
	)
	nat64          = netip.MustParsePrefix("64:ff9b::/96")   // IPv4-IPv6 Translation, RFC 6052 (globally reachable)
	nat64Local     = netip.MustParsePrefix("64:ff9b:1::/48") // Local-Use IPv4/IPv6 Translation, RFC 8215
	sixToFour      = netip.MustParsePrefix("2002::/16")      // 6to4, RFC 3056
	globalUnicast6 = netip.MustParsePrefix("2000::/3")
)
