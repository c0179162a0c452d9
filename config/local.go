package config

import (
	"github.com/egressd/egressd/ifname"

	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Addresses no local proxy address may take: the host would answer for
// them itself instead of the service that owns them.
var reservedLocal = map[netip.Addr]string{
	netip.MustParseAddr("169.254.169.254"): "the cloud metadata service's address",
	netip.MustParseAddr("169.254.169.253"): "the AWS VPC resolver's address",
	netip.MustParseAddr("169.254.169.123"): "the AWS time service's address",
	netip.MustParseAddr("169.254.170.2"):   "the AWS ECS task metadata address",
	netip.MustParseAddr("169.254.20.10"):   "NodeLocal DNSCache's address",
	netip.MustParseAddr("169.254.1.1"):     "Calico's pod gateway address",
	netip.MustParseAddr("fd00:ec2::254"):   "the AWS IPv6 metadata service's address",
	netip.MustParseAddr("fd00:ec2::253"):   "the AWS IPv6 VPC resolver's address",
}

// validateLocal checks dns.local_interface, dns.local_ipv4 and
// dns.local_ipv6 and fills Local4 and Local6.
func (c *Config) validateLocal() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	d := &c.DNS
	if err := ifname.CheckName(d.LocalInterface); err != nil {
		bad("dns.local_interface: %q %v", d.LocalInterface, err)
	} else {
		for _, list := range []struct {
			field    string
			patterns []ifname.Pattern
		}{{"firewall.containers", c.Firewall.Containers}, {"firewall.unfiltered", c.Firewall.Unfiltered}} {
			for i, p := range list.patterns {
				if p.Match(d.LocalInterface) {
					bad("dns.local_interface: %q matches %s[%d] (%q): name another interface", d.LocalInterface, list.field, i, p)
				}
			}
		}
	}
	var err error
	if d.Local4, err = parseLocal(d.LocalIPv4, true); err != nil {
		bad("dns.local_ipv4: %q %v", d.LocalIPv4, err)
	}
	if d.Local6, err = parseLocal(d.LocalIPv6, false); err != nil {
		bad("dns.local_ipv6: %q %v", d.LocalIPv6, err)
	}
	return errs
}

// parseLocal parses a local proxy address of one family: a unicast
// address that no other machine or service is expected to use.
func parseLocal(s string, v4 bool) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	switch {
	case err != nil || a.Zone() != "" || a.Is4In6():
		if v4 {
			return a, errors.New("is not an IPv4 address (such as 169.254.53.53)")
		}
		return a, errors.New("is not an IPv6 address (such as fd65:6772:6573::53)")
	case a.Is4() != v4:
		return a, errors.New("is of the other address family")
	case a.IsLoopback() || a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return a, errors.New("is a loopback, unspecified, multicast or broadcast address")
	case !v4 && a.IsLinkLocalUnicast():
		return a, errors.New("is link-local: a DNAT target needs an address without a zone (use a ULA such as fd65:6772:6573::53)")
	}
	if what, ok := reservedLocal[a]; ok {
		return a, fmt.Errorf("is %s", what)
	}
	return a, nil
}
