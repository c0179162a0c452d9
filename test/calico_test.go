package test

import (
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// A Calico-style pod, added to the lab's host:
//
//	pod   10.244.1.5, fd00:244::5: eth0, default routes via 169.254.1.1
//	  |   (onlink) and fe80::ecee:eeff:feee:eeee, as Calico sets them up
//	host  cali1234: no IPv4 address, only its link-local IPv6 one (MAC
//	      ee:ee:ee:ee:ee:ee); /32 and /128 routes to the pod through it;
//	      proxy ARP answers the pod's ARP for its gateway
const (
	calicoPodIP  = "10.244.1.5"
	calicoPodIP6 = "fd00:244::5"
	localIPv4    = "169.254.53.53" // the defaults of dns.local_ipv4/6
	localIPv6    = "fd65:6772:6573::53"
)

// A pod on an address-less Calico veth resolves allowed names through
// any resolver, over UDP and TCP, IPv4 and IPv6, and connects to them; an
// unlisted name is refused and stays closed; its DNS never leaves the
// host; the outside cannot reach the proxy's local addresses; the dummy
// interface comes back when deleted and goes with `egressd remove`.
func TestCalicoPod(t *testing.T) {
	l := newLab(t)
	pod := l.addCalicoPod()
	cfg := l.calicoConfig()
	l.startDaemon(cfg)

	for _, tc := range []struct{ server, name, net string }{
		{otherDNS + ":53", "westus.api.cognitive.microsoft.com", "udp"},
		{otherDNS + ":53", "westus.api.cognitive.microsoft.com", "tcp"},
		// the cluster DNS service address: nothing answers there but egressd
		{"10.96.0.10:53", "westus.api.cognitive.microsoft.com", "udp"},
		{"10.96.0.10:53", "westus.api.cognitive.microsoft.com", "tcp"},
		{"[2001:db8:53::53]:53", "westus.api.cognitive.microsoft.com", "udp"},
		{"[2001:db8:53::53]:53", "westus.api.cognitive.microsoft.com", "tcp"},
	} {
		r, err := query(pod, tc.server, tc.name, dns.TypeA, tc.net)
		if err != nil {
			t.Fatalf("pod: %s %s via %s: %v", tc.name, tc.net, tc.server, err)
		}
		if got := addrs(r); len(got) != 1 || got[0] != "203.0.113.10" {
			t.Fatalf("pod: %s %s via %s: %v, want 203.0.113.10", tc.name, tc.net, tc.server, r)
		}
	}
	l.mustReach(pod, "203.0.113.10:443")
	r, err := query(pod, "[2001:db8:53::53]:53", "dual.cognitive.microsoft.com", dns.TypeAAAA, "udp")
	if err != nil || len(addrs(r)) != 1 || addrs(r)[0] != "2001:db8:100::16" {
		t.Fatalf("pod: dual AAAA over IPv6: %v, %v", r, err)
	}
	l.mustReach(pod, "[2001:db8:100::16]:443")

	// An unlisted name (NSD would answer it): refused by egressd, closed.
	for _, server := range []string{otherDNS + ":53", "[2001:db8:53::53]:53"} {
		r, err = query(pod, server, "www.example.com", dns.TypeA, "udp")
		if err != nil || r.Rcode != dns.RcodeRefused {
			t.Errorf("pod: unlisted name via %s: %v, %v; want REFUSED from egressd", server, r, err)
		}
	}
	l.mustNotReach(pod, "203.0.113.50:443")
	if !strings.Contains(l.egressdLog.String(), "www.example.com") {
		t.Errorf("the refusal was not logged")
	}

	// The veth is still checked for forged sources: a query with an
	// internet address as source gets no answer there (nor would the
	// address be routed back through cali1234).
	l.forgedQueriesGoNowhere(pod, "forged.westus.api.cognitive.microsoft.com.", otherDNS+":53")

	// The outside cannot use the proxy through its local addresses.
	l.in(l.Inet, "ip route add "+localIPv4+"/32 via "+hostUplink)
	l.in(l.Inet, "ip -6 route add "+localIPv6+"/128 via 2001:db8:1::1")
	for _, server := range []string{
		hostPort(localIPv4, proxyPort), hostPort(localIPv6, proxyPort),
		hostPort(localIPv4, 53), hostPort(localIPv6, 53),
	} {
		for _, network := range []string{"udp", "tcp"} {
			if r, err := queryTimeout(l.Inet, server, "westus.api.cognitive.microsoft.com", dns.TypeA, network, 500*time.Millisecond); err == nil {
				t.Errorf("internet: %s %s answered: %v", network, server, r)
			}
		}
	}

	// The host's own DNS still goes to the proxy (redirected to loopback).
	l.mustResolve(l.Host, "multi.cognitive.microsoft.com", dns.TypeA, "203.0.113.15")

	// Deleted, set down or stripped of an address, the dummy interface
	// comes back as it was, and pod DNS with it.
	for _, tamper := range []string{"ip link del egressd0", "ip link set egressd0 down", "ip addr del " + localIPv4 + "/32 dev egressd0", "ip addr del " + localIPv6 + "/128 dev egressd0"} {
		l.in(l.Host, tamper)
		start := time.Now()
		l.waitFor("egressd0 to come back after "+tamper, 5*time.Second, func() error {
			out, err := exec.Command("ip", "netns", "exec", l.Host, "ip", "addr", "show", "dev", "egressd0").CombinedOutput()
			if err != nil || !strings.Contains(string(out), ",UP") || !strings.Contains(string(out), "inet "+localIPv4+"/32 scope host") ||
				!strings.Contains(string(out), "inet6 "+localIPv6+"/128 scope global nodad deprecated") {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		for _, server := range []string{otherDNS + ":53", "[2001:db8:53::53]:53"} {
			l.waitFor("pod DNS via "+server+" after "+tamper, 5*time.Second, func() error {
				_, err := query(pod, server, "deep.a.b.c.cognitive.microsoft.com", dns.TypeA, "udp")
				return err
			})
		}
		t.Logf("%s: restored, pod DNS back in %v", tamper, time.Since(start).Round(time.Millisecond))
	}
	if !strings.Contains(l.egressdLog.String(), "local DNS proxy addresses restored") {
		t.Errorf("the restores were not logged")
	}
	if out, err := l.runEgressd("status", "--config", cfg); err != nil {
		t.Errorf("status after the restore: %v\n%s", err, out)
	}

	// A reload moves the IPv4 address: the rule and the interface follow.
	moved := strings.Replace(l.baseConfig(), `containers: ["docker0"]`, `containers: ["docker0", "cali*"]`, 1)
	moved = strings.Replace(moved, "  min_ttl: 1s\n", "  min_ttl: 1s\n  local_ipv4: 169.254.53.54\n", 1)
	l.writeConfig("calico.yaml", moved)
	if err := l.egressd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	l.waitFor("the reload to move the address", 5*time.Second, func() error {
		out := l.in(l.Host, "ip addr show dev egressd0")
		if !strings.Contains(out, "inet 169.254.53.54/32 scope host") || strings.Contains(out, localIPv4) ||
			!strings.Contains(l.listing(), "dnat ip to 169.254.53.54:10053") {
			return fmt.Errorf("not yet:\n%s", out)
		}
		return nil
	})
	l.mustResolve(pod, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")

	if err := l.stopDaemon(syscall.SIGTERM); err != nil {
		t.Logf("egressd exit: %v", err)
	}
	if out, err := l.runEgressd("remove"); err != nil {
		t.Fatalf("remove: %v\n%s", err, out)
	}
	if out, err := exec.Command("ip", "netns", "exec", l.Host, "ip", "link", "show", "egressd0").CombinedOutput(); err == nil {
		t.Errorf("egressd0 survived egressd remove:\n%s", out)
	}
}

// On a host with IPv6 disabled, the IPv6 local address cannot be added:
// egressd runs all the same and IPv4 DNS works.
func TestLocalAddressWithoutIPv6(t *testing.T) {
	l := newLab(t)
	pod := l.addCalicoPod()
	l.in(l.Host, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
	l.startDaemon(l.calicoConfig())
	l.mustResolve(pod, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(pod, "203.0.113.10:443")
	if out := l.in(l.Host, "ip addr show dev egressd0"); !strings.Contains(out, "inet "+localIPv4+"/32") || strings.Contains(out, "inet6") {
		t.Errorf("egressd0:\n%s", out)
	}
	if strings.Contains(l.egressdLog.String(), "not restored") {
		t.Errorf("the missing IPv6 address was reported as an error")
	}
}
