package test

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Podman user networks, added to the lab's host as netavark makes them,
// with aardvark-dns's part played by a small DNS server in the host's
// namespace on each network's gateway address:
//
//	host  podman1 10.89.0.1/24, fd00:89::1/64: engine answers
//	      web.dns.podman A 10.89.0.5, AAAA fd00:89::5
//	      podman2 10.89.1.1/24 (added while egressd runs): engine answers
//	      web.dns.podman A 10.89.1.5
//	  |
//	ctr-podman1 10.89.0.2, fd00:89::2; ctr-podman2 10.89.1.2

// addPodmanNetwork adds a bridge with the gateway addresses gw4 and gw6
// (prefixes; gw6 may be empty) and a container namespace behind it with
// ctr4 and ctr6 in the same subnets, default routes via the gateways; it
// returns the namespace.
func (l *Lab) addPodmanNetwork(bridge, gw4, gw6, ctr4, ctr6 string) string {
	l.t.Helper()
	ns := l.Ctr + "-" + bridge
	l.sh("ip netns add " + ns)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	l.in(ns, "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
	l.in(ns, "ip link set lo up")
	veth := "v" + bridge
	l.sh("ip link add eth0 netns " + ns + " type veth peer name " + veth + " netns " + l.Host)
	l.in(l.Host, "ip link add "+bridge+" type bridge")
	l.in(l.Host, "ip link set "+bridge+" up")
	l.in(l.Host, "ip link set "+veth+" master "+bridge+" up")
	l.in(l.Host, "ip addr add "+gw4+" dev "+bridge)
	l.in(ns, "ip link set eth0 up")
	bits4 := gw4[strings.Index(gw4, "/"):]
	l.in(ns, "ip addr add "+ctr4+bits4+" dev eth0")
	l.in(ns, "ip route add default via "+strings.TrimSuffix(gw4, bits4))
	if gw6 != "" {
		bits6 := gw6[strings.Index(gw6, "/"):]
		l.in(l.Host, "ip addr add "+gw6+" dev "+bridge+" nodad")
		l.in(ns, "ip addr add "+ctr6+bits6+" dev eth0 nodad")
		l.in(ns, "ip -6 route add default via "+strings.TrimSuffix(gw6, bits6))
	}
	return ns
}

// engineDNS is a container engine's DNS server (aardvark-dns's part): on
// the host, answering names of dns.podman from its records, NXDOMAIN for
// others, and remembering who asked.
type engineDNS struct {
	mu      sync.Mutex
	sources []netip.Addr
}

func (e *engineDNS) askedBy() []netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.sources)
}

// startEngine serves records ("name. TTL TYPE DATA") over UDP and TCP on
// each of addrs ("ip:port") in the host's namespace.
func (l *Lab) startEngine(addrs []string, records ...string) *engineDNS {
	l.t.Helper()
	e := &engineDNS{}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		from, _ := netip.ParseAddrPort(w.RemoteAddr().String())
		e.mu.Lock()
		e.sources = append(e.sources, from.Addr().Unmap())
		e.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(r)
		m.Authoritative = true
		q := r.Question[0]
		known := false
		for _, rec := range records {
			rr, err := dns.NewRR(rec)
			if err != nil {
				l.t.Error(err)
				continue
			}
			if strings.EqualFold(rr.Header().Name, q.Name) {
				known = true
				if rr.Header().Rrtype == q.Qtype {
					m.Answer = append(m.Answer, rr)
				}
			}
		}
		if !known {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})
	for _, a := range addrs {
		var pc net.PacketConn
		var ln net.Listener
		err := inNS(l.Host, func() (err error) {
			if pc, err = net.ListenPacket("udp", a); err != nil {
				return err
			}
			ln, err = net.Listen("tcp", a)
			return err
		})
		if err != nil {
			l.t.Fatalf("engine DNS on %s: %v", a, err)
		}
		for _, s := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
			go func() { _ = s.ActivateAndServe() }()
			l.t.Cleanup(func() { _ = s.Shutdown() })
		}
	}
	return e
}

// A container on a Podman user network resolves the names of its network
// (web.dns.podman, dns.engine_zones' default) through egressd from the
// engine on its own bridge, whatever resolver it asks, UDP and TCP, IPv4
// and IPv6; the engine's NXDOMAIN comes back; unlisted names stay refused.
// Each bridge's containers get their own engine's answer, a bridge added
// while egressd runs included; containers on a bridge without an engine
// get SERVFAIL, the host itself REFUSED. With and without firewall.host:
// egressd's own query to the gateway is never redirected back into it.
func TestEngineZone(t *testing.T) {
	for _, host := range []bool{true, false} {
		t.Run(fmt.Sprintf("host=%v", host), func(t *testing.T) { testEngineZone(t, host) })
	}
}

func testEngineZone(t *testing.T, host bool) {
	l := newLab(t)
	ctr1 := l.addPodmanNetwork("podman1", "10.89.0.1/24", "fd00:89::1/64", "10.89.0.2", "fd00:89::2")
	eng1 := l.startEngine([]string{"10.89.0.1:53", "[fd00:89::1]:53"},
		"web.dns.podman. 60 A 10.89.0.5", "web.dns.podman. 60 AAAA fd00:89::5")
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "firewall:\n",
		fmt.Sprintf("firewall:\n  host: %v\n", host), 1))
	l.startDaemon(cfg)

	listing := l.listing()
	exempt := "fib daddr type local udp dport 53 return"
	if host && !strings.Contains(listing, exempt) {
		t.Errorf("firewall.host true: dns_output does not exempt egressd's own queries to the host's addresses:\n%s", listing)
	}
	if !host && strings.Contains(listing, "dns_output") {
		t.Errorf("firewall.host false: the host's DNS is redirected:\n%s", listing)
	}

	resolves := func(ns, server, name string, qtype uint16, network, want string) {
		t.Helper()
		r, err := query(ns, server, name, qtype, network)
		if err != nil {
			t.Errorf("%s asks %s for %s %s over %s: %v", ns, server, name, dns.TypeToString[qtype], network, err)
			return
		}
		if got := addrs(r); r.Rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != want {
			t.Errorf("%s asks %s for %s %s over %s: %v, want %s", ns, server, name, dns.TypeToString[qtype], network, r, want)
		}
	}
	rcode := func(ns, server, name string, want int) {
		t.Helper()
		r, err := query(ns, server, name, dns.TypeA, "udp")
		if err != nil {
			t.Errorf("%s asks %s for %s: %v", ns, server, name, err)
			return
		}
		if r.Rcode != want || len(r.Answer) != 0 {
			t.Errorf("%s asks %s for %s: %v, want %s", ns, server, name, r, dns.RcodeToString[want])
		}
	}

	// The gateway (where the container's resolv.conf points) and any
	// other resolver: both end at egressd, which asks the engine.
	for _, server := range []string{"10.89.0.1:53", upstreamDNS + ":53", otherDNS + ":53"} {
		for _, network := range []string{"udp", "tcp"} {
			resolves(ctr1, server, "web.dns.podman", dns.TypeA, network, "10.89.0.5")
		}
	}
	resolves(ctr1, "[fd00:89::1]:53", "WEB.dns.podman", dns.TypeAAAA, "udp", "fd00:89::5")
	resolves(ctr1, "[2001:db8:53::53]:53", "web.dns.podman", dns.TypeA, "tcp", "10.89.0.5")
	rcode(ctr1, "10.89.0.1:53", "nothere.dns.podman", dns.RcodeNameError)
	rcode(ctr1, "10.89.0.1:53", "www.example.org", dns.RcodeRefused)
	rcode(ctr1, upstreamDNS+":53", "web.dns.podman.example.org", dns.RcodeRefused)
	// Every query the engine got came from egressd, on the host: none
	// from the container directly, none through the internet.
	for _, src := range eng1.askedBy() {
		if src != netip.MustParseAddr("10.89.0.1") && src != netip.MustParseAddr("fd00:89::1") {
			t.Errorf("the engine was asked from %s, not by egressd from the host's address", src)
		}
	}
	if n := len(eng1.askedBy()); n != 9 {
		t.Errorf("the engine was asked %d times, want 9 (each engine zone query once)", n)
	}

	// A container behind a bridge without an engine (docker0 here):
	// SERVFAIL, never another bridge's answer.
	rcode(l.Ctr, upstreamDNS+":53", "web.dns.podman", dns.RcodeServerFailure)
	// The host itself has no bridge to ask.
	rcode(l.Host, fmt.Sprintf("127.0.0.1:%d", proxyPort), "web.dns.podman", dns.RcodeRefused)
	if host {
		rcode(l.Host, "10.89.0.1:53", "web.dns.podman", dns.RcodeRefused) // redirected to egressd
	}

	// A second network appears while egressd runs (netavark creates
	// bridges as networks are first used): its containers get their own
	// engine's answer as soon as its DNS is redirected.
	ctr2 := l.addPodmanNetwork("podman2", "10.89.1.1/24", "", "10.89.1.2", "")
	eng2 := l.startEngine([]string{"10.89.1.1:53"}, "web.dns.podman. 60 A 10.89.1.5")
	l.waitFor("podman2's container to resolve through egressd", 10*time.Second, func() error {
		r, err := query(ctr2, upstreamDNS+":53", "web.dns.podman", dns.TypeA, "udp")
		if err != nil {
			return err
		}
		if got := addrs(r); len(got) != 1 || got[0] != "10.89.1.5" {
			return fmt.Errorf("%v", r)
		}
		return nil
	})
	resolves(ctr2, "10.89.1.1:53", "web.dns.podman", dns.TypeA, "tcp", "10.89.1.5")
	resolves(ctr1, "10.89.0.1:53", "web.dns.podman", dns.TypeA, "udp", "10.89.0.5")
	for _, src := range eng2.askedBy() {
		if src != netip.MustParseAddr("10.89.1.1") {
			t.Errorf("podman2's engine was asked from %s, not by egressd from the host's address", src)
		}
	}
	if out, err := l.runEgressd("explain", "db.Web.dns.podman.", "--config", cfg); err != nil || !strings.Contains(out, "is in engine zone dns.podman") {
		t.Errorf("explain db.Web.dns.podman.: %v %s", err, out)
	}
	if !strings.Contains(l.egressdLog.String(), "refused name of an engine zone") {
		t.Errorf("the host's refused engine zone query is not logged")
	}
}
