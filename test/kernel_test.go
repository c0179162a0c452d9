package test

// What egressd believes is what the kernel enforces: lifetimes that really
// extend, tampering with rules and set elements undone. These tests also
// run in the kernel matrix (make test-kernels).

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
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
		{"antispoof", `iifname "docker0" jump spoofed`, `iifname "nomatch0" jump spoofed`},
		{"dns_prerouting", `iifname "docker0" jump dns_redirect`, `iifname "nomatch0" jump dns_redirect`},
		{"input", `udp dport 10053 jump dns_proxy_in`, `udp dport 10054 jump dns_proxy_in`},
		{"output", `oifname "lo" accept`, `oifname "eth9" accept`},
		{"dns_redirect", `udp dport 53 dnat ip to 169.254.53.53:10053`, `udp dport 53 dnat ip to 169.254.53.53:10054`},
		{"dns_output", `udp dport 53 redirect to :10053`, `udp dport 53 redirect to :10054`},
		{"egress", `ip daddr @allow4 tcp dport @ports accept`, `ip daddr != @allow4 tcp dport @ports accept`},
		{"egress", `ct state established,related accept`, `ct state established,related drop`},
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
