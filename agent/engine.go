package agent

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
)

// engineAddr is one of the host's addresses on an interface whose
// clients' DNS comes to the proxy (a container interface): where the
// container engine's DNS server of that bridge listens (Podman's
// aardvark-dns, on each network's gateway address).
type engineAddr struct {
	Prefix netip.Prefix // the host's address, with its subnet's length
	Link   int          // the interface's index
}

// enginePort is where container engines' DNS servers listen.
const enginePort = 53

// engineServers returns where the container engine's DNS answers client,
// from addrs: the host's address in the longest of their subnets that
// holds client, port 53; for an IPv6 client then the first IPv4 address
// of the same interface too (an engine that listens on IPv4 only). None
// for a client that is a loopback address or one of addrs (the host
// itself), or in none of their subnets (behind no container bridge).
// Link-local subnets say nothing: every interface has fe80::/64.
func engineServers(addrs []engineAddr, client netip.Addr) []netip.AddrPort {
	client = client.Unmap().WithZone("")
	if !client.IsValid() || client.IsLoopback() || client.IsUnspecified() || client.IsLinkLocalUnicast() {
		return nil
	}
	best := -1
	for i, a := range addrs {
		switch {
		case a.Prefix.Addr() == client:
			return nil
		case a.Prefix.Addr().IsLinkLocalUnicast() || !a.Prefix.Contains(client):
		case best < 0 || a.Prefix.Bits() > addrs[best].Prefix.Bits():
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	out := []netip.AddrPort{netip.AddrPortFrom(addrs[best].Prefix.Addr(), enginePort)}
	if client.Is6() {
		for _, a := range addrs {
			if a.Link == addrs[best].Link && a.Prefix.Addr().Is4() && !a.Prefix.Addr().IsLinkLocalUnicast() {
				out = append(out, netip.AddrPortFrom(a.Prefix.Addr(), enginePort))
				break
			}
		}
	}
	return out
}

// How fresh the engines' addresses are kept. Address and link events mark
// them stale at once (watchLinks); these bound what a lost event costs.
const (
	// engineMaxAge: they are read again when older.
	engineMaxAge = 10 * time.Second
	// engineMissAge: a client in no known subnet (a bridge that has just
	// appeared) reads them again when they are older, at most this often
	// whatever the host's own processes ask.
	engineMissAge = 250 * time.Millisecond
)

// engines finds the container engine's DNS for the proxy's clients
// (dnsresolve.Options.EngineServers), from the host's addresses on
// container interfaces as they are now: bridges come and go with their
// networks. It reads them from the kernel only when a name of an engine
// zone is asked and they may have changed, never for other names.
type engines struct {
	cfg   func() *config.Config
	read  func(*config.Config) ([]engineAddr, error) // containerAddrs; tests replace it
	now   func() time.Time
	log   *slog.Logger
	warn  *rate.Limiter
	stale atomic.Bool

	mu    sync.Mutex
	addrs []engineAddr
	at    time.Time // when addrs were read; zero: never
}

func newEngines(cfg func() *config.Config, log *slog.Logger) *engines {
	return &engines{cfg: cfg, read: containerAddrs, now: time.Now, log: log, warn: rate.NewLimiter(rate.Every(time.Minute), 1)}
}

// invalidate says that the host's addresses, interfaces or the config
// may have changed: the next engine query reads them again.
func (e *engines) invalidate() { e.stale.Store(true) }

// servers is the dnsresolve.EngineServers of the host.
func (e *engines) servers(client netip.Addr) []netip.AddrPort {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	if e.stale.Swap(false) || e.at.IsZero() || now.Sub(e.at) > engineMaxAge {
		e.refresh(now)
	}
	s := engineServers(e.addrs, client)
	if s == nil && !client.IsLoopback() && now.Sub(e.at) > engineMissAge {
		e.refresh(now)
		s = engineServers(e.addrs, client)
	}
	return s
}

func (e *engines) refresh(now time.Time) {
	addrs, err := e.read(e.cfg())
	e.at = now
	if err != nil {
		if e.warn.Allow() {
			e.log.Warn("container bridges' addresses not read; engine zones answered from the last known ones", "err", err)
		}
		return
	}
	e.addrs = addrs
}

// containerAddrs returns the host's addresses on the interfaces whose DNS
// the ruleset sends to the proxy: those firewall.containers matches and
// the unknown forwarding ones (see unknownForwarders). Tentative IPv6
// addresses are left out: nothing listens on them yet.
func containerAddrs(cfg *config.Config) ([]engineAddr, error) {
	snap, err := takeSnapshot()
	if err != nil {
		return nil, err
	}
	ctr := map[int]bool{}
	for _, l := range snap.links {
		switch classify(l, cfg.Firewall.Containers, cfg.Firewall.Unfiltered) {
		case linkContainer, linkUnknown, linkBare:
			ctr[l.Index] = true
		}
	}
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []engineAddr
	for _, a := range list {
		if !ctr[a.LinkIndex] || a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		out = append(out, engineAddr{Prefix: netip.PrefixFrom(ip.Unmap(), ones), Link: a.LinkIndex})
	}
	return out, nil
}
