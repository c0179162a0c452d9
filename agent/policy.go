package agent

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// clientTTL is how long what a client address is stays known: containers
// come and go, and an address may move to another bridge.
const clientTTL = 5 * time.Second

// maxClients bounds the cache of client lookups.
const maxClients = 10000

// clients tells the proxy what a client address is (dnsresolve.Clients),
// from the kernel's routing table: a local route is the host's own
// address, any other the interface the container sits behind. Only rules
// that are not uniform ask.
type clients struct {
	mu sync.Mutex
	m  map[netip.Addr]clientEntry
}

type clientEntry struct {
	c  dnsresolve.Client
	at time.Time
}

func newClients() *clients { return &clients{m: map[netip.Addr]clientEntry{}} }

func (cs *clients) lookup(a netip.Addr) dnsresolve.Client {
	now := time.Now()
	cs.mu.Lock()
	e, ok := cs.m[a]
	cs.mu.Unlock()
	if ok && now.Sub(e.at) < clientTTL {
		return e.c
	}
	c := routeClient(a)
	cs.mu.Lock()
	if len(cs.m) >= maxClients {
		clear(cs.m)
	}
	cs.m[a] = clientEntry{c, now}
	cs.mu.Unlock()
	return c
}

// routeClient asks the kernel how the host reaches a.
func routeClient(a netip.Addr) dnsresolve.Client {
	routes, err := netlink.RouteGet(a.AsSlice())
	if err != nil || len(routes) == 0 {
		return dnsresolve.Client{} // a container behind an interface not known
	}
	r := routes[0]
	if r.Type == unix.RTN_LOCAL {
		return dnsresolve.Client{Host: true}
	}
	if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
		return dnsresolve.Client{Interface: l.Attrs().Name}
	}
	return dnsresolve.Client{}
}

// ruleCgroupPaths are the cgroups the ruleset matches for the rules' from
// and the DNS classes.
func ruleCgroupPaths(cfg *config.Config) []string {
	var paths []string
	for _, r := range cfg.Rules {
		paths = append(paths, r.From.Cgroups...)
	}
	for _, c := range cfg.DNSClasses() {
		paths = append(paths, c.Cgroup)
	}
	return paths
}

// ruleCgroups resolves ruleCgroupPaths that exist now, by path; none when
// the kernel cannot match cgroups (checkRuleCgroups refuses a config that
// needs it).
func ruleCgroups(cfg *config.Config) map[string]rules.Cgroup {
	paths := ruleCgroupPaths(cfg)
	if len(paths) == 0 {
		return nil
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return nil
	}
	out := map[string]rules.Cgroup{}
	var probe rules.Cgroup
	for _, p := range paths {
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(mnt, p), &st) != nil {
			continue // not running: its rules are added when it appears
		}
		probe = rules.Cgroup{Path: nftCgroupPath(mnt, p), Level: uint32(strings.Count(p, "/")), ID: st.Ino}
		out[p] = probe
	}
	if len(out) > 0 && firewall.ProbeCgroup(probe) != nil {
		return nil
	}
	return out
}

// checkRuleCgroups refuses rules whose from names host services when the
// kernel cannot match cgroups (socket cgroupv2, Linux >= 5.13): the rule
// would not apply, or, judged by the host's rules, apply too widely.
func checkRuleCgroups(cfg *config.Config) error {
	var fields []string
	for _, r := range cfg.Rules {
		if len(r.From.Cgroups) > 0 {
			fields = append(fields, fmt.Sprintf("%s (%s) from %v", r.Origin, r.Name, r.From.Cgroups))
		}
	}
	if len(fields) == 0 {
		return nil
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return fmt.Errorf("%s: host services are matched by cgroup v2, and %w", strings.Join(fields, "; "), err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(mnt, &st); err != nil {
		return fmt.Errorf("%s: host services are matched by cgroup v2: %w", strings.Join(fields, "; "), err)
	}
	if err := firewall.ProbeCgroup(rules.Cgroup{Path: nftCgroupPath(mnt, "/"), Level: 0, ID: st.Ino}); err != nil {
		return fmt.Errorf("%s: this kernel cannot match host services by cgroup (socket cgroupv2 needs Linux 5.13 or later): %w", strings.Join(fields, "; "), err)
	}
	return nil
}
