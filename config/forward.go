package config

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/egressd/egressd/dnsname"
)

// Forward is a zone whose names are answered by other servers (a
// dns.forward entry): queries for the zone and every name below it go to
// Servers and come back as they answer, NXDOMAIN included. Forwarded
// answers open nothing in the firewall: reaching those addresses is what
// allow.cidrs is for.
type Forward struct {
	Zone    string           // canonical: lower case, no trailing dot
	Servers []netip.AddrPort // in order of preference
}

// forwardHelp is the shape of a dns.forward entry, for error messages.
const forwardHelp = `{zone: cluster.local, servers: [10.96.0.10]} or "ZONE SERVER [SERVER...]"`

// parseForward parses one dns.forward entry: a map with zone and servers,
// or the string form "ZONE SERVER [SERVER...]" (for the environment).
func parseForward(raw any) (Forward, error) {
	var zone string
	var servers []string
	switch v := raw.(type) {
	case string:
		f := strings.Fields(v)
		if len(f) < 2 {
			return Forward{}, fmt.Errorf(": %q must be %s", v, forwardHelp)
		}
		zone, servers = f[0], f[1:]
	case map[string]any:
		for k := range v {
			if k != "zone" && k != "servers" {
				return Forward{}, fmt.Errorf(".%s: unknown key (zone, servers)", k)
			}
		}
		z, ok := v["zone"].(string)
		if !ok {
			return Forward{}, fmt.Errorf(".zone: %v must be a DNS zone such as cluster.local", v["zone"])
		}
		zone = z
		switch s := v["servers"].(type) {
		case string:
			servers = []string{s}
		case []any:
			for _, x := range s {
				servers = append(servers, fmt.Sprint(x))
			}
		}
		if len(servers) == 0 {
			return Forward{}, fmt.Errorf(".servers: %v must list at least one \"ip\" or \"ip:port\"", v["servers"])
		}
	default:
		return Forward{}, fmt.Errorf(": %v must be %s", raw, forwardHelp)
	}
	if err := dnsname.Check(zone, false); err != nil {
		return Forward{}, fmt.Errorf(".zone: %q %w", zone, err)
	}
	fw := Forward{Zone: nameKey(zone)}
	for j, s := range servers {
		ap, err := ParseUpstream(s)
		if err != nil {
			return Forward{}, fmt.Errorf(".servers[%d]: %q %w", j, s, err)
		}
		fw.Servers = append(fw.Servers, ap)
	}
	return fw, nil
}

// validateForward parses dns.forward into DNS.Forward.
func (c *Config) validateForward() []error {
	var errs []error
	c.DNS.Forward = nil
	seen := map[string]int{}
	for i, raw := range c.DNS.ForwardRaw {
		f, err := parseForward(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("dns.forward[%d]%w", i, err))
			continue
		}
		if j, ok := seen[f.Zone]; ok {
			errs = append(errs, fmt.Errorf("dns.forward[%d].zone: %q repeats dns.forward[%d]", i, f.Zone, j))
			continue
		}
		seen[f.Zone] = i
		c.DNS.Forward = append(c.DNS.Forward, f)
	}
	return errs
}

// ForwardFor returns the dns.forward entry whose zone holds name, the
// longest such zone.
func (c *Config) ForwardFor(name string) (Forward, bool) {
	i := dnsname.LongestZone(nameKey(name), c.DNS.Forward, func(f Forward) string { return f.Zone })
	if i < 0 {
		return Forward{}, false
	}
	return c.DNS.Forward[i], true
}
