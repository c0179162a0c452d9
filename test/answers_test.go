package test

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// answersZone holds answers that lead into private networks, each next to
// an address that is fine.
var answersZone = map[string]string{"answers.test": `nat64 AAAA 64:ff9b::a00:5
nat64 AAAA 2001:db8:100::41
nat64ok AAAA 64:ff9b::808:808
sixtofour AAAA 2002:a00:5::1
sixtofour AAAA 2001:db8:100::42
sixtofourok AAAA 2002:808:808::1
mapped AAAA ::ffff:10.0.0.5
mapped AAAA 2001:db8:100::43
reserved A 240.0.0.1
reserved A 203.0.113.44
forever 2147483647 A 203.0.113.45
`}

// Addresses that lead into private networks, directly or through an
// embedded IPv4 address, are removed from answers and never opened.
func TestAnswersRebindingGuard(t *testing.T) {
	l := newLab(t, answersZone)
	l.startDaemon(l.writeConfig("egressd.yaml", l.answersConfig("24h")))
	for _, tt := range []struct {
		name      string
		qtype     uint16
		bad, good string
	}{
		{"nat64.answers.test", dns.TypeAAAA, "64:ff9b::a00:5", "2001:db8:100::41"},
		{"sixtofour.answers.test", dns.TypeAAAA, "2002:a00:5::1", "2001:db8:100::42"},
		{"mapped.answers.test", dns.TypeAAAA, "::ffff:10.0.0.5", "2001:db8:100::43"},
		{"reserved.answers.test", dns.TypeA, "240.0.0.1", "203.0.113.44"},
		{"nat64ok.answers.test", dns.TypeAAAA, "", "64:ff9b::808:808"},
		{"sixtofourok.answers.test", dns.TypeAAAA, "", "2002:808:808::1"},
	} {
		for _, ns := range []string{l.Ctr, l.Host} {
			r := l.resolve(ns, tt.name, tt.qtype)
			got := addrs(r)
			if len(got) != 1 || got[0] != tt.good {
				t.Errorf("%s from %s: answer %v, want only %s", tt.name, nsRole(l, ns), got, tt.good)
			}
		}
		if !l.inSet(tt.good) {
			t.Errorf("%s: %s not opened", tt.name, tt.good)
		}
		for _, bad := range []string{tt.bad, strings.TrimPrefix(tt.bad, "::ffff:")} {
			if bad != "" && l.inSet(bad) {
				t.Errorf("%s: %s opened", tt.name, bad)
			}
		}
	}
	if !strings.Contains(l.egressdLog.String(), "rebinding guard removed answers") {
		t.Errorf("the guard's removals were not logged")
	}
}

// A TTL of 2^31-1 is capped: the client is told the cap, and the address
// is open for no longer than cap + grace.
func TestAnswersTTLCapped(t *testing.T) {
	l := newLab(t, answersZone)
	l.startDaemon(l.writeConfig("egressd.yaml", l.answersConfig("60s")))
	// The upstream really answers 2^31-1.
	r, err := query(l.Inet, upstreamDNS+":53", "forever.answers.test", dns.TypeA, "udp")
	if err != nil || len(r.Answer) != 1 || r.Answer[0].Header().Ttl != 1<<31-1 {
		t.Fatalf("upstream answer: %v %v", r, err)
	}
	for _, ns := range []string{l.Ctr, l.Host} {
		r := l.resolve(ns, "forever.answers.test", dns.TypeA)
		if len(r.Answer) != 1 {
			t.Fatalf("%s: answer %v", nsRole(l, ns), r)
		}
		if ttl := r.Answer[0].Header().Ttl; ttl > 60 || ttl < 55 {
			t.Errorf("%s: TTL %d, want the cap (60)", nsRole(l, ns), ttl)
		}
	}
	timeout, err := elementTimeout(l.in(l.Host, "nft list set inet egressd allow4"), "203.0.113.45")
	if err != nil {
		t.Fatal(err)
	}
	// cap 60s + grace 2s, and the firewall's headroom (an eighth, so that
	// repeated answers need no kernel update) and rounding.
	if timeout > 71*time.Second || timeout < 55*time.Second {
		t.Errorf("203.0.113.45 open for %v, want at most 62s (max_ttl + grace) + 8s (headroom)", timeout)
	}
	l.mustReach(l.Ctr, "203.0.113.45:443")
}

var nftDuration = regexp.MustCompile(`^(?:(\d+)d)?(.*)$`)

// elementTimeout returns the timeout of addr's element in an `nft list
// set` listing.
func elementTimeout(listing, addr string) (time.Duration, error) {
	m := regexp.MustCompile(`(?:^|[\s{,])` + regexp.QuoteMeta(addr) + ` timeout (\S+)`).FindStringSubmatch(listing)
	if m == nil {
		return 0, fmt.Errorf("%s has no timeout in:\n%s", addr, listing)
	}
	parts := nftDuration.FindStringSubmatch(strings.TrimRight(m[1], ","))
	var d time.Duration
	if parts[1] != "" {
		days, _ := strconv.Atoi(parts[1])
		d = time.Duration(days) * 24 * time.Hour
	}
	if parts[2] != "" {
		rest, err := time.ParseDuration(parts[2])
		if err != nil {
			return 0, fmt.Errorf("timeout %q of %s: %v", m[1], addr, err)
		}
		d += rest
	}
	return d, nil
}

// At start (run and apply), learned addresses from the state file are
// restored only if the current config could have opened them.
func TestAnswersStateRechecked(t *testing.T) {
	for _, cmd := range []string{"run", "apply"} {
		t.Run(cmd, func(t *testing.T) {
			l := newLab(t)
			in := func(d time.Duration) string { return strconv.FormatInt(time.Now().Add(d).UnixMilli(), 10) }
			l.writeState([][3]string{
				{"203.0.113.10", in(time.Hour), "westus.api.cognitive.microsoft.com."},           // allowed: restored
				{"203.0.113.51", in(time.Hour), ""},                                              // names unknown, public: restored
				{"203.0.113.50", in(time.Hour), "www.example.com."},                              // name no longer allowed
				{"10.0.0.5", in(time.Hour), "westus.api.cognitive.microsoft.com."},               // private
				{"2002:a00:5::1", in(time.Hour), "westus.api.cognitive.microsoft.com."},          // 6to4 of a private address
				{"203.0.113.52", in(30 * 24 * time.Hour), "westus.api.cognitive.microsoft.com."}, // beyond max_ttl + grace
			})
			cfg := l.writeConfig("egressd.yaml", l.answersConfig("24h"))
			if cmd == "run" {
				l.startDaemon(cfg)
			} else if out, err := l.runEgressd("apply", "--config", cfg); err != nil {
				t.Fatalf("apply: %v\n%s", err, out)
			}
			for addr, want := range map[string]bool{
				"203.0.113.10": true, "203.0.113.51": true,
				"203.0.113.50": false, "10.0.0.5": false, "2002:a00:5::1": false, "203.0.113.52": false,
			} {
				if got := l.inSet(addr); got != want {
					t.Errorf("%s restored: %v, want %v", addr, got, want)
				}
			}
			l.mustReach(l.Ctr, "203.0.113.10:443")
			l.mustNotReach(l.Ctr, "203.0.113.50:443")
		})
	}
}

// An address learned for a name that a new config no longer allows is not
// kept across a restart, from the kernel's sets or the state file.
func TestAnswersRestartWithNarrowerConfig(t *testing.T) {
	l := newLab(t)
	wide := strings.Replace(l.baseConfig(), "domains: [", `domains: ["www.example.com", `, 1)
	l.startDaemon(l.writeConfig("wide.yaml", strings.Replace(wide, "min_ttl: 1s", "min_ttl: 60s", 1)))
	l.mustResolve(l.Ctr, "www.example.com", dns.TypeA, "203.0.113.50")
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.waitFor("state file", 5*time.Second, func() error { return l.stateHas("203.0.113.50") })
	l.stopDaemon(syscall.SIGKILL)
	if !l.inSet("203.0.113.50") {
		t.Fatal("203.0.113.50 not in the kernel's set after the kill")
	}
	l.stopNSD() // whatever is open after the restart was kept, not resolved again
	l.startDaemon(l.writeConfig("narrow.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)))
	l.mustNotReach(l.Ctr, "203.0.113.50:443")
	l.mustReach(l.Ctr, "203.0.113.10:443")
	if l.inSet("203.0.113.50") {
		t.Error("203.0.113.50 (www.example.com, no longer allowed) kept across the restart")
	}
}
