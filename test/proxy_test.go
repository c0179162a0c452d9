package test

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func hostPort(addr string, port int) string {
	return net.JoinHostPort(addr, fmt.Sprint(port))
}

func TestProxy(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))

	answers := func(ns, name string, qtype uint16, want ...string) []string {
		t.Helper()
		r := l.resolve(ns, name, qtype)
		got := addrs(r)
		if r.Rcode != dns.RcodeSuccess || !slices.Equal(got, want) {
			t.Errorf("%s %s: rcode %s, addresses %v; want NOERROR %v", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode], got, want)
		}
		return got
	}
	refused := func(ns, name string, qtype uint16) {
		t.Helper()
		r := l.resolve(ns, name, qtype)
		if r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
			t.Errorf("%s %s: %s with %d records, want REFUSED and nothing", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode], len(r.Answer))
		}
	}

	t.Run("wildcard opens its address on the allowed port only", func(t *testing.T) {
		answers(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
		l.mustReach(l.Ctr, "203.0.113.10:443")
		l.mustNotReach(l.Ctr, "203.0.113.10:80")
	})
	t.Run("deeper names", func(t *testing.T) {
		answers(l.Ctr, "deep.a.b.c.cognitive.microsoft.com", dns.TypeA, "203.0.113.11")
		l.mustReach(l.Ctr, "203.0.113.11:443")
	})
	t.Run("apex of a wildcard stays closed", func(t *testing.T) {
		refused(l.Ctr, "cognitive.microsoft.com", dns.TypeA)
		l.mustNotReach(l.Ctr, "203.0.113.12:443")
	})
	t.Run("exact name open, sibling closed", func(t *testing.T) {
		answers(l.Ctr, "translatoronprem.blob.core.windows.net", dns.TypeA, "203.0.113.30")
		l.mustReach(l.Ctr, "203.0.113.30:443")
		refused(l.Ctr, "otherblob.blob.core.windows.net", dns.TypeA)
		l.mustNotReach(l.Ctr, "203.0.113.31:443")
	})
	t.Run("CNAME chain, A and AAAA", func(t *testing.T) {
		r := l.resolve(l.Ctr, "myres.cognitiveservices.azure.com", dns.TypeA)
		if len(r.Answer) != 3 || r.Answer[0].Header().Rrtype != dns.TypeCNAME {
			t.Errorf("chain answer: %v", r.Answer)
		}
		if got := addrs(r); !slices.Equal(got, []string{"203.0.113.20"}) {
			t.Errorf("chain A: %v", got)
		}
		answers(l.Ctr, "myres.cognitiveservices.azure.com", dns.TypeAAAA, "2001:db8:100::20")
		l.mustReach(l.Ctr, "203.0.113.20:443")
		l.mustReach(l.Ctr, "[2001:db8:100::20]:443")
	})
	t.Run("chain the upstream left incomplete is resolved", func(t *testing.T) {
		answers(l.Ctr, "broken.cognitiveservices.azure.com", dns.TypeA, "203.0.113.21")
		l.mustReach(l.Ctr, "203.0.113.21:443")
	})
	t.Run("IPv6-only name", func(t *testing.T) {
		answers(l.Ctr, "v6only.cognitive.microsoft.com", dns.TypeA)
		answers(l.Ctr, "v6only.cognitive.microsoft.com", dns.TypeAAAA, "2001:db8:100::10")
		l.mustReach(l.Ctr, "[2001:db8:100::10]:443")
		l.mustNotReach(l.Ctr, "[2001:db8:100::10]:80")
	})
	t.Run("several A records open all of them", func(t *testing.T) {
		for _, a := range answers(l.Ctr, "multi.cognitive.microsoft.com", dns.TypeA, "203.0.113.13", "203.0.113.14", "203.0.113.15") {
			l.mustReach(l.Ctr, hostPort(a, 443))
		}
	})
	t.Run("unlisted names get no answer data", func(t *testing.T) {
		refused(l.Ctr, "www.example.com", dns.TypeA)
		refused(l.Ctr, "evil.example.com", dns.TypeTXT)
		refused(l.Ctr, "www.example.com", dns.TypeAAAA)
		l.mustNotReach(l.Ctr, "203.0.113.50:443")
	})
	t.Run("allowed name, other types: no data", func(t *testing.T) {
		for _, qt := range []uint16{dns.TypeTXT, dns.TypeHTTPS} {
			name := "txt.cognitive.microsoft.com"
			if qt == dns.TypeHTTPS {
				name = "https.cognitive.microsoft.com"
			}
			if r := l.resolve(l.Ctr, name, qt); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
				t.Errorf("%s %s: %v", name, dns.TypeToString[qt], r)
			}
		}
		l.mustNotReach(l.Ctr, "203.0.113.40:443") // the HTTPS record's ipv4hint
	})
	t.Run("other resolvers, DNS over TCP and DoT are closed", func(t *testing.T) {
		for _, network := range []string{"udp", "tcp"} {
			for _, server := range []string{upstreamDNS, otherDNS, "[2001:db8:53::53]"} {
				r, err := query(l.Ctr, server+":53", "www.example.com", dns.TypeA, network)
				if err != nil {
					t.Errorf("%s %s: %v (want egressd's REFUSED)", network, server, err)
					continue
				}
				if r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
					t.Errorf("%s to %s reached a resolver: %v", network, server, r)
				}
			}
		}
		l.mustNotReach(l.Ctr, upstreamDNS+":853")
		l.mustNotReach(l.Ctr, "203.0.113.10:853") // even to an allowed address
	})
	t.Run("private and loopback answers are removed and never opened", func(t *testing.T) {
		answers(l.Ctr, "private.cognitive.microsoft.com", dns.TypeA, "203.0.113.17")
		answers(l.Ctr, "loopback.cognitive.microsoft.com", dns.TypeA)
		answers(l.Ctr, "loopback6.cognitive.microsoft.com", dns.TypeAAAA)
		answers(l.Ctr, "cgnat.cognitive.microsoft.com", dns.TypeA)
		for _, a := range []string{"10.1.2.3", "127.0.0.1", "100.64.1.1", "::1"} {
			if l.inSet(a) {
				t.Errorf("%s is in a set", a)
			}
		}
		if !l.inSet("203.0.113.17") {
			t.Errorf("public address of the same answer not in the set")
		}
	})
	t.Run("TTL 0 gives a usable answer", func(t *testing.T) {
		answers(l.Ctr, "ttl0.cognitive.microsoft.com", dns.TypeA, "203.0.113.18")
		l.mustReach(l.Ctr, "203.0.113.18:443")
	})
	t.Run("the host follows the same rules", func(t *testing.T) {
		answers(l.Host, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
		l.mustReach(l.Host, "203.0.113.10:443")
		refused(l.Host, "www.example.com", dns.TypeA)
		l.mustNotReach(l.Host, "203.0.113.50:443")
		l.mustNotReach(l.Host, "203.0.113.10:80")
		for _, server := range []string{upstreamDNS + ":53", "[2001:db8:53::53]:53"} {
			for _, network := range []string{"udp", "tcp"} {
				r, err := query(l.Host, server, "www.example.com", dns.TypeA, network)
				if err != nil || r.Rcode != dns.RcodeRefused {
					t.Errorf("host DNS over %s to %s: %v %v", network, server, r, err)
				}
			}
		}
		r, err := query(l.Host, "[2001:db8:53::53]:53", "dual.cognitive.microsoft.com", dns.TypeAAAA, "udp")
		if err != nil || !slices.Equal(addrs(r), []string{"2001:db8:100::16"}) {
			t.Fatalf("host AAAA over IPv6: %v %v", r, err)
		}
		l.mustReach(l.Host, "[2001:db8:100::16]:443")
	})
	t.Run("the proxy is not an open resolver", func(t *testing.T) {
		for _, network := range []string{"udp", "tcp"} {
			if r, err := query(l.Inet, hostPort(hostUplink, proxyPort), "westus.api.cognitive.microsoft.com", dns.TypeA, network); err == nil {
				t.Errorf("outside %s query answered: %v", network, r)
			}
		}
	})
}

func TestProxyAddressExpires(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	r := l.resolve(l.Ctr, "ttl2.cognitive.microsoft.com", dns.TypeA)
	if got := addrs(r); !slices.Equal(got, []string{"203.0.113.19"}) {
		t.Fatalf("answer %v", got)
	}
	// An established connection outlives the address.
	var conn net.Conn
	if err := inNS(l.Ctr, func() (err error) {
		conn, err = net.DialTimeout("tcp", "203.0.113.19:443", shortWait)
		return err
	}); err != nil {
		t.Fatalf("connect right after the answer: %v", err)
	}
	defer conn.Close()
	// TTL 2s, min_ttl 1s, grace 2s: open for 4s, plus at most an eighth
	// of headroom.
	time.Sleep(5 * time.Second)
	l.mustNotReach(l.Ctr, "203.0.113.19:443")
	if l.inSet("203.0.113.19") {
		t.Errorf("expired address still in the set")
	}
	_ = conn.SetDeadline(time.Now().Add(shortWait))
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatalf("established connection broken after expiry: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := conn.Read(buf); err != nil || string(buf) != "ping" {
		t.Errorf("established connection after expiry: %q %v", buf, err)
	}
}

// TestProxyRace resolves hundreds of fresh names and connects the instant
// each answer arrives: the firewall must always be ahead of the client.
func TestProxyRace(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	const names, workers = 250, 25
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	work := make(chan int)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				name := fmt.Sprintf("race%d.cognitive.microsoft.com", i)
				r, err := query(l.Ctr, otherDNS+":53", name, dns.TypeA, "udp")
				var fail string
				switch {
				case err != nil:
					fail = fmt.Sprintf("%s: %v", name, err)
				case len(addrs(r)) != 1:
					fail = fmt.Sprintf("%s: %v", name, r)
				default:
					if err := dial(l.Ctr, hostPort(addrs(r)[0], 443), shortWait); err != nil {
						fail = fmt.Sprintf("%s -> %s: %v", name, addrs(r)[0], err)
					}
				}
				if fail != "" {
					mu.Lock()
					failures = append(failures, fail)
					mu.Unlock()
				}
			}
		}()
	}
	for i := range names {
		work <- i
	}
	close(work)
	wg.Wait()
	if len(failures) > 0 {
		t.Errorf("%d of %d fresh names could not be connected at once:\n%s", len(failures), names, strings.Join(failures, "\n"))
	}
}

func TestProxyTruncationFailoverAndPinnedRefresh(t *testing.T) {
	l := newLab(t)
	cfg := strings.Replace(l.baseConfig(), `upstreams: ["`+upstreamDNS+`"]`, `upstreams: ["198.51.100.99", "`+upstreamDNS+`"]`, 1)
	cfg = strings.Replace(cfg, `names: ["translatoronprem.blob.core.windows.net"]`, `names: ["ttl2.cognitive.microsoft.com"]`, 1)
	l.startDaemon(l.writeConfig("egressd.yaml", cfg))

	// The first upstream does not answer: egressd fails over.
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")

	// 60 A records do not fit a UDP answer without EDNS0: truncated, and
	// complete over TCP; every address is open either way.
	r, err := query(l.Ctr, otherDNS+":53", "big.cognitive.microsoft.com", dns.TypeA, "udp")
	if err != nil || !r.Truncated {
		t.Fatalf("big answer over UDP: truncated=%v err=%v", r != nil && r.Truncated, err)
	}
	r, err = query(l.Ctr, otherDNS+":53", "big.cognitive.microsoft.com", dns.TypeA, "tcp")
	if err != nil || r.Truncated || len(addrs(r)) != 60 {
		t.Fatalf("big answer over TCP: %d addresses, err=%v", len(addrs(r)), err)
	}
	l.mustReach(l.Ctr, "203.0.114.60:443")

	// A pinned name with a 2 s TTL (open 4 s) stays open with no client
	// asking: egressd refreshes it.
	l.mustReach(l.Ctr, "203.0.113.19:443")
	time.Sleep(7 * time.Second)
	l.mustReach(l.Ctr, "203.0.113.19:443")
}
