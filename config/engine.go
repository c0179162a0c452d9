package config

import (
	"fmt"

	"github.com/egressd/egressd/dnsname"
)

// validateEngineZones checks dns.engine_zones and puts each zone in its
// canonical form (lower case, no trailing dot), as dns.forward's zones.
// A zone equal to or below an allow.domains entry is fine: the proxy asks
// the engine before it looks at the allow-list.
func (c *Config) validateEngineZones() []error {
	var errs []error
	seen := map[string]int{}
	for i, z := range c.DNS.EngineZones {
		if err := dnsname.Check(z, false); err != nil {
			errs = append(errs, fmt.Errorf("dns.engine_zones[%d]: %q %w", i, z, err))
			continue
		}
		k := nameKey(z)
		if j, ok := seen[k]; ok {
			errs = append(errs, fmt.Errorf("dns.engine_zones[%d]: %q repeats dns.engine_zones[%d]", i, k, j))
			continue
		}
		seen[k] = i
		c.DNS.EngineZones[i] = k
	}
	return errs
}

// EngineZoneFor returns the dns.engine_zones zone that holds name, the
// longest such zone, unless a dns.forward zone at least as long holds it
// too: the longest zone wins, dns.forward on a tie.
func (c *Config) EngineZoneFor(name string) (string, bool) {
	n := nameKey(name)
	best := ""
	for _, z := range c.DNS.EngineZones {
		if dnsname.InZone(n, z) && len(z) > len(best) {
			best = z
		}
	}
	if best == "" {
		return "", false
	}
	if f, ok := c.ForwardFor(n); ok && len(f.Zone) >= len(best) {
		return "", false
	}
	return best, true
}
