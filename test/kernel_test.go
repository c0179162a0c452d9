package test

// What egressd believes is what the kernel enforces: lifetimes that really
// extend, tampering with rules and set elements undone. These tests also
// run in the kernel matrix (make test-kernels).

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
)

// lifeZone holds a name with a fixed TTL of 6 s.
var lifeZone = map[string]string{"life.cognitive.microsoft.com": "steady 6 A 203.0.113.60\n"}

const steadyName, steadyAddr = "steady.life.cognitive.microsoft.com", "203.0.113.60"

// A name answered, answered again from upstream after its TTL while the
// address was still open, then from egressd's cache after the first life
// ended: the second answer must have moved the kernel's expiry.
func TestLifetimeExtendedByRepeatedAnswers(t *testing.T) {
	l := newLab(t, lifeZone)
	cfg := l.writeConfig("egressd.yaml", l.baseConfig())
	l.startDaemon(cfg)
	// TTL 6 s, min_ttl 1 s, grace 2 s: open 8 s, in the kernel 9 s with
	// the headroom.
	start := time.Now()
	at := func(d time.Duration) { time.Sleep(time.Until(start.Add(d))) }
	l.mustResolve(l.Ctr, steadyName, dns.TypeA, steadyAddr)
	l.mustReach(l.Ctr, steadyAddr+":443")
	at(6500 * time.Millisecond) // the cached answer expired: from upstream
	l.mustResolve(l.Ctr, steadyName, dns.TypeA, steadyAddr)
	l.checkKernelHolds(cfg, steadyAddr)
	at(9500 * time.Millisecond) // the first life is over: from the cache
	l.mustResolve(l.Ctr, steadyName, dns.TypeA, steadyAddr)
	l.mustReach(l.Ctr, steadyAddr+":443")
	l.checkKernelHolds(cfg, steadyAddr)
}

// A name queried every second for three times its life stays reachable
// after every answer.
func TestLifetimeBusyNameStaysReachable(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", l.baseConfig())
	l.startDaemon(cfg)
	// ttl2: TTL 2 s, min_ttl 1 s, grace 2 s: a life of 4 s.
	const name, addr = "ttl2.cognitive.microsoft.com", "203.0.113.19"
	for end := time.Now().Add(12 * time.Second); time.Now().Before(end); time.Sleep(time.Second) {
		l.mustResolve(l.Ctr, name, dns.TypeA, addr)
		if err := dial(l.Ctr, addr+":443", shortWait); err != nil {
			t.Fatalf("connect right after the answer: %v (the kernel holds it for %v more)", err, l.kernelExpires(addr))
		}
	}
	l.checkKernelHolds(cfg, addr)
}

// Tampering that keeps each rule's shape (so that counting expressions
// cannot see it) is repaired, in every hook chain and in the redirect.
func TestTamperSameShapeIsRepaired(t *testing.T) {
	l := newLab(t)
	cfg := strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)
	l.startDaemon(l.writeConfig("egressd.yaml", cfg))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	want := l.listing()
	for _, tt := range []struct{ chain, from, to string }{
		{"forward", `oifname "docker0" accept`, `oifname "nomatch0" accept`},
		{"forward", `jump egress`, `accept`}, // a verdict for a verdict: one expression each
		{"antispoof", `iifname "docker0" jump spoofed`, `iifname "nomatch0" jump spoofed`},
		{"dns_prerouting", `iifname "docker0" jump dns_redirect`, `iifname "nomatch0" jump dns_redirect`},
		{"input", `udp dport 10053 jump dns_proxy_in`, `udp dport 10054 jump dns_proxy_in`},
		{"output", `oifname "lo" accept`, `oifname "eth9" accept`},
		{"dns_redirect", `udp dport 53 dnat ip to 169.254.53.53:10053`, `udp dport 53 dnat ip to 169.254.53.53:10054`},
		{"dns_output", `udp dport 53 redirect to :10053`, `udp dport 53 redirect to :10054`},
		{"egress", `ip daddr @allow4 tcp dport @ports accept`, `ip daddr != @allow4 tcp dport @ports accept`},
		{"forward", `ct state established,related accept`, `ct state established,related drop`},
	} {
		l.replaceRule(tt.chain, tt.from, tt.to)
		start := time.Now()
		l.waitFor("repair of "+tt.chain+": "+tt.to, repairDeadline, func() error {
			if l.listing() != want {
				return os.ErrNotExist
			}
			return nil
		})
		t.Logf("%s: %s repaired in %v", tt.chain, tt.to, time.Since(start).Round(time.Millisecond))
	}
	l.mustReach(l.Ctr, "203.0.113.10:443")
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	if log := l.egressdLog.String(); !strings.Contains(log, "drift repaired") || !strings.Contains(log, "nomatch0") && !strings.Contains(log, "is not") {
		t.Errorf("the repairs were not logged with what differed")
	}
}

// Elements of egressd's sets changed by another process are put back to
// what egressd answered within seconds: a foreign element is removed, a
// deleted answered element is restored, a re-add with a longer life is
// cut back.
func TestForeignElementChangesAreUndone(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1))
	l.startDaemon(cfg)
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")

	l.in(l.Host, "nft add element inet egressd allow4 { 203.0.113.66 timeout 1h }")
	l.waitFor("foreign element removed", repairDeadline, func() error {
		if l.inSet("203.0.113.66") {
			return os.ErrExist
		}
		return nil
	})
	l.mustNotReach(l.Ctr, "203.0.113.66:443")

	l.in(l.Host, "nft delete element inet egressd allow4 { 203.0.113.10 }")
	l.waitFor("deleted element restored", repairDeadline, func() error {
		if !l.inSet("203.0.113.10") {
			return os.ErrNotExist
		}
		return nil
	})
	l.mustReach(l.Ctr, "203.0.113.10:443")
	l.checkKernelHolds(cfg, "203.0.113.10")

	// From Linux 6.12 a re-add with another timeout changes the element's
	// life; before, it changes nothing. Either way the life ends where
	// egressd said.
	l.in(l.Host, "nft add element inet egressd allow4 { 203.0.113.10 timeout 100h }")
	l.waitFor("extended element cut back", repairDeadline, func() error {
		if k, listed := l.kernelExpires("203.0.113.10"), l.listedExpires(cfg, "203.0.113.10"); k > listed+3*time.Second {
			return fmt.Errorf("kernel expires in %v, egressd list %v", k, listed)
		}
		return nil
	})
	if !strings.Contains(l.egressdLog.String(), "learned sets repaired") {
		t.Errorf("the repairs were not logged")
	}
}

// glibc's getaddrinfo for AF_UNSPEC (getent ahosts, most programs) sends
// the A and the AAAA question back to back from ONE UDP socket (sendmmsg)
// and waits for both answers. Both datagrams have the same addresses and
// ports: under the DNS redirect they are one conntrack flow, and a kernel
// that let one of them clash with the other's NAT would lose an answer;
// glibc then waits out its timeout (5 s) and asks again. Every pair of
// questions must be answered within a second, over IPv4 and IPv6, from a
// container (DNAT) and from the host (redirect), for fresh names (asked
// upstream), an A-only, an AAAA-only and a dual-stack name; then every
// address answered is connected to, the AAAA-only one over IPv6.
func TestParallelAAndAAAAFromOneSocket(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	const fresh = 8 // per client and server: race0 ... race31, A only
	n := 0
	var slowest time.Duration
	for _, c := range []struct {
		ns, server string
	}{
		{l.Ctr, otherDNS + ":53"},
		{l.Ctr, "[2001:db8:53::53]:53"},
		{l.Host, upstreamDNS + ":53"},
		{l.Host, "[2001:db8:53::53]:53"},
	} {
		// The path answers at all first. On the 6.18 host kernel (egressd's
		// local addresses on an ifb), twice in about 350 runs under load,
		// the container's first IPv6 queries, a second after egressd
		// started, were forwarded (and rejected by the egress chain)
		// instead of delivered to the proxy's address they were DNATed
		// to; not seen in the VMs, nor when querying from the start. Not
		// what this test measures; a waited-for start is logged.
		start := time.Now()
		l.waitFor(nsRole(l, c.ns)+" DNS via "+c.server, 10*time.Second, func() error {
			_, err := queryTimeout(c.ns, c.server, "westus.api.cognitive.microsoft.com", dns.TypeA, "udp", time.Second)
			return err
		})
		if d := time.Since(start); d > time.Second {
			t.Logf("%s DNS via %s answered only after %v", nsRole(l, c.ns), c.server, d.Round(time.Millisecond))
		}
		names := []string{"v6only.cognitive.microsoft.com", "dual.cognitive.microsoft.com", "westus.api.cognitive.microsoft.com"}
		for range fresh {
			names = append(names, fmt.Sprintf("race%d.cognitive.microsoft.com", n))
			n++
		}
		for _, name := range names {
			start := time.Now()
			a, aaaa, err := queryPair(c.ns, c.server, name, time.Second)
			took := time.Since(start)
			slowest = max(slowest, took)
			if err != nil {
				t.Errorf("%s via %s: %s A and AAAA from one socket: %v (after %v)", nsRole(l, c.ns), c.server, name, err, took.Round(time.Millisecond))
				continue
			}
			got := append(addrs(a), addrs(aaaa)...)
			if len(got) == 0 {
				t.Errorf("%s via %s: %s: no address (A %v, AAAA %v)", nsRole(l, c.ns), c.server, name, a, aaaa)
			}
			for _, addr := range got {
				if err := dial(c.ns, hostPort(addr, 443), shortWait); err != nil {
					t.Errorf("%s: %s answered %s, connect: %v", nsRole(l, c.ns), name, addr, err)
				}
			}
		}
	}
	t.Logf("slowest pair of answers %v", slowest.Round(time.Millisecond))
}

// queryPair sends an A and an AAAA question for name from one connected
// UDP socket in ns, in one sendmmsg as glibc does, and waits up to timeout
// for both answers.
func queryPair(ns, server, name string, timeout time.Duration) (a, aaaa *dns.Msg, err error) {
	var conn *net.UDPConn
	err = inNS(ns, func() error {
		ra, err := net.ResolveUDPAddr("udp", server)
		if err == nil {
			conn, err = net.DialUDP("udp", nil, ra)
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	qs := map[uint16]uint16{} // ID -> type
	var msgs []ipv4.Message
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qt)
		m.SetEdns0(1232, false)
		for qs[m.Id] != 0 {
			m.Id = dns.Id()
		}
		qs[m.Id] = qt
		b, err := m.Pack()
		if err != nil {
			return nil, nil, err
		}
		msgs = append(msgs, ipv4.Message{Buffers: [][]byte{b}})
	}
	// ipv4.PacketConn's batch calls are sendmmsg and recvmmsg for either
	// family; Addr nil: the connected peer.
	pc := ipv4.NewPacketConn(conn)
	if sent, err := pc.WriteBatch(msgs, 0); err != nil || sent != len(msgs) {
		return nil, nil, fmt.Errorf("sendmmsg: %d of %d sent: %v", sent, len(msgs), err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65535)
	for a == nil || aaaa == nil {
		n, err := conn.Read(buf)
		if err != nil {
			return a, aaaa, fmt.Errorf("answers: A %t, AAAA %t: %w", a != nil, aaaa != nil, err)
		}
		r := new(dns.Msg)
		if r.Unpack(buf[:n]) != nil || !r.Response || len(r.Question) != 1 || r.Question[0].Qtype != qs[r.Id] {
			continue
		}
		if r.Rcode != dns.RcodeSuccess {
			return nil, nil, fmt.Errorf("%s: %s", dns.TypeToString[r.Question[0].Qtype], dns.RcodeToString[r.Rcode])
		}
		if qs[r.Id] == dns.TypeA {
			a = r
		} else {
			aaaa = r
		}
	}
	return a, aaaa, nil
}

// Fresh names resolved and connected to one after the other, as a client
// that asks, connects and moves on: every connection right after its
// answer must get through. Half the names have addresses of their own
// (the element is added); the other half share one address, which each
// answer's longer life replaces in the kernel (add, delete, add of the
// element: the path of every extension, Linux < 6.12 included).
func TestResolveThenConnectSequential(t *testing.T) {
	l := newLab(t, map[string]string{"wild.cognitive.microsoft.com": "* 300 A 203.0.113.70\n"})
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	const names = 100
	var failures []string
	var slowest time.Duration
	for i := range names {
		name, want := fmt.Sprintf("race%d.cognitive.microsoft.com", i), fmt.Sprintf("203.0.115.%d", i+1)
		if i%2 == 1 {
			name, want = fmt.Sprintf("n%d.wild.cognitive.microsoft.com", i), "203.0.113.70"
		}
		start := time.Now()
		r, err := query(l.Ctr, otherDNS+":53", name, dns.TypeA, "udp")
		slowest = max(slowest, time.Since(start))
		switch {
		case err != nil:
			failures = append(failures, fmt.Sprintf("%s: %v", name, err))
		case len(addrs(r)) != 1 || addrs(r)[0] != want:
			failures = append(failures, fmt.Sprintf("%s: %s %v, want %s", name, dns.RcodeToString[r.Rcode], addrs(r), want))
		default:
			if err := dial(l.Ctr, hostPort(want, 443), shortWait); err != nil {
				failures = append(failures, fmt.Sprintf("%s -> %s: %v", name, want, err))
			}
		}
	}
	t.Logf("slowest answer %v", slowest.Round(time.Millisecond))
	if len(failures) > 0 {
		t.Errorf("%d of %d resolve-then-connect pairs failed:\n%s", len(failures), names, strings.Join(failures, "\n"))
	}
}
