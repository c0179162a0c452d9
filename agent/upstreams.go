package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/config"
)

// resolvConfs are read in order when dns.upstreams is empty. The second is
// systemd-resolved's list of real upstreams, used when /etc/resolv.conf
// only names its loopback stub.
var resolvConfs = []string{"/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"}

// upstreams returns the configured upstreams, or the host's resolvers
// without loopback addresses (they would loop back into egressd).
func upstreams(cfg *config.Config) ([]netip.AddrPort, error) {
	if len(cfg.DNS.UpstreamAddrs) > 0 {
		return cfg.DNS.UpstreamAddrs, nil
	}
	var tried []string
	for _, path := range resolvConfs {
		cc, err := dns.ClientConfigFromFile(path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			tried = append(tried, fmt.Sprintf("%s: %v", path, err))
			continue
		}
		var out []netip.AddrPort
		for _, s := range cc.Servers {
			if ap, err := config.ParseUpstream(s); err == nil {
				out = append(out, ap)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
		tried = append(tried, path+": no usable (non-loopback) nameserver")
	}
	return nil, fmt.Errorf("dns.upstreams is empty and the host's resolvers cannot be used (%v); set dns.upstreams", tried)
}
