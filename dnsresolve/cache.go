package dnsresolve

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Cache limits.
const (
	cacheSize      = 10000             // entries; beyond, random entries are evicted
	maxNegativeTTL = 300 * time.Second // RFC 2308's suggested cap is higher; be fresh
)

// cache keeps answers for their TTL. A hit is still an answer: the proxy
// opens its addresses again (for the remaining TTL), so a cached answer can
// never point at an address that has expired from the sets.
type cache struct {
	mu sync.RWMutex
	m  map[string]*cacheEntry // by cacheKey
}

type cacheEntry struct {
	name  string // lower case, fully qualified
	addrs []netip.Addr
	// rules are those that allow name to everyone, with uniform rules:
	// the fast path opens addrs for them; nil otherwise (the fast path
	// then asks which rules of the client allow name).
	rules   []string
	ttl     uint32 // smallest TTL of the answer when stored
	stored  time.Time
	expires time.Time
	// The answer as the fast path sends it (wire.go), and the offsets
	// of its TTLs. Packed, it takes a fraction of the memory of its
	// records; ans keeps them only for an answer that does not fit
	// (wire nil).
	wire []byte
	ttls []uint16
	ans  *Answer
}

func newCache() *cache { return &cache{m: make(map[string]*cacheEntry)} }

// cacheKey is the name in lower case and fully qualified, followed by the
// query type's two bytes. The fast path builds it in a buffer and looks it
// up without allocating.
func cacheKey(name string, qtype uint16) []byte {
	return binary.BigEndian.AppendUint16([]byte(name), qtype)
}

// get returns a live entry and how many whole seconds it has aged.
func (c *cache) get(k []byte, now time.Time) (*cacheEntry, uint32) {
	c.mu.RLock()
	e := c.m[string(k)]
	c.mu.RUnlock()
	if e == nil || !now.Before(e.expires) {
		return nil, 0
	}
	return e, uint32(now.Sub(e.stored) / time.Second)
}

// put stores ans if it may be cached: a positive answer for its smallest
// TTL, a negative one (NXDOMAIN, or NOERROR without addresses) for its SOA's
// negative TTL.
func (c *cache) put(name string, qtype uint16, ans *Answer, now time.Time, rules []string) {
	var ttl uint32
	addrs, attl := ans.Chain.Addresses()
	switch {
	case len(addrs) > 0:
		ttl = attl
		for _, rr := range ans.Chain.CNAMEs {
			ttl = min(ttl, rr.Header().Ttl)
		}
	case len(ans.SOA) > 0 && (ans.Rcode == dns.RcodeNameError || ans.Rcode == dns.RcodeSuccess):
		soa, ok := ans.SOA[0].(*dns.SOA)
		if !ok {
			return
		}
		ttl = min(soa.Hdr.Ttl, soa.Minttl, uint32(maxNegativeTTL/time.Second))
	default:
		return
	}
	if ttl == 0 {
		return
	}
	e := &cacheEntry{name: name, addrs: addrs, rules: rules, ttl: ttl, stored: now, expires: now.Add(time.Duration(ttl) * time.Second)}
	var ok bool
	if e.wire, e.ttls, ok = packAnswer(answerMsg(name, qtype, ans)); !ok {
		e.ans = ans
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= cacheSize {
		for old := range c.m { // random eviction: Go randomises map order
			delete(c.m, old)
			if len(c.m) < cacheSize*9/10 {
				break
			}
		}
	}
	c.m[string(cacheKey(name, qtype))] = e
}

// sections returns the entry's rcode, answer and authority sections, TTLs
// reduced by age.
func (e *cacheEntry) sections(age uint32) (rcode int, answer, ns []dns.RR, _ error) {
	if e.ans != nil {
		answer, ns = sections(e.ans, age)
		return e.ans.Rcode, answer, ns, nil
	}
	m := new(dns.Msg)
	if err := m.Unpack(e.wire); err != nil {
		return 0, nil, nil, fmt.Errorf("cached answer for %s: %w", e.name, err)
	}
	for _, rrs := range [][]dns.RR{m.Answer, m.Ns} {
		for _, rr := range rrs { // unpacked anew: changed in place
			h := rr.Header()
			h.Ttl -= min(h.Ttl, age)
		}
	}
	return m.Rcode, m.Answer, m.Ns, nil
}

// aged returns copies of rrs with their TTLs reduced by age.
func aged(rrs []dns.RR, age uint32) []dns.RR {
	out := make([]dns.RR, len(rrs))
	for i, rr := range rrs {
		if age == 0 {
			out[i] = rr // records are never modified in place
			continue
		}
		out[i] = dns.Copy(rr)
		h := out[i].Header()
		h.Ttl -= min(h.Ttl, age)
	}
	return out
}
