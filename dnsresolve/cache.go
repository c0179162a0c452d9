package dnsresolve

import (
	"net/netip"
	"strings"
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
	mu sync.Mutex
	m  map[cacheKey]*cacheEntry
}

type cacheKey struct {
	name  string // lower case, fully qualified
	qtype uint16
}

type cacheEntry struct {
	ans     *Answer
	addrs   []netip.Addr
	ttl     uint32 // smallest TTL of the answer when stored
	stored  time.Time
	expires time.Time
}

func newCache() *cache { return &cache{m: make(map[cacheKey]*cacheEntry)} }

func key(name string, qtype uint16) cacheKey {
	return cacheKey{name: strings.ToLower(dns.Fqdn(name)), qtype: qtype}
}

// get returns a live entry and how many whole seconds it has aged.
func (c *cache) get(k cacheKey, now time.Time) (*cacheEntry, uint32) {
	c.mu.Lock()
	e := c.m[k]
	c.mu.Unlock()
	if e == nil || !now.Before(e.expires) {
		return nil, 0
	}
	return e, uint32(now.Sub(e.stored) / time.Second)
}

// put stores ans if it may be cached: a positive answer for its smallest
// TTL, a negative one (NXDOMAIN, or NOERROR without addresses) for its SOA's
// negative TTL.
func (c *cache) put(k cacheKey, ans *Answer, now time.Time) {
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
	e := &cacheEntry{ans: ans, addrs: addrs, ttl: ttl, stored: now, expires: now.Add(time.Duration(ttl) * time.Second)}
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
	c.m[k] = e
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
