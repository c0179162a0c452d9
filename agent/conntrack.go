package agent

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// forgetDNSFlows deletes the conntrack entries of DNS flows (UDP and TCP to
// port 53) that are not redirected to the proxy. NAT is decided on a flow's
// first packet only: without this, a client that kept one UDP socket talking
// to its resolver since before egressd installed (or repaired) the ruleset
// would keep reaching that resolver directly for as long as it keeps the
// flow alive. A deleted flow's next packet starts a new one, redirected.
func forgetDNSFlows(proxyPort int) (uint, error) {
	var n uint
	var errs []error
	for _, family := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		c, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, family, staleDNS{uint16(proxyPort)})
		n += c
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return n, fmt.Errorf("delete DNS flows that bypass the proxy: %w", err)
	}
	return n, nil
}

type staleDNS struct{ proxyPort uint16 }

func (f staleDNS) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	p := fl.Forward.Protocol
	return (p == unix.IPPROTO_UDP || p == unix.IPPROTO_TCP) && fl.Forward.DstPort == 53 && fl.Reverse.SrcPort != f.proxyPort
}
