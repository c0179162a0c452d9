//go:build chaos

package test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Tools of the chaos suite (chaos_test.go): a second container, a stub
// resolver client, load generators, fake upstreams, a delaying relay, a
// raw-socket spoofer and samplers of egressd's resources.

// chaosRow is one line of the results table.
type chaosRow struct {
	Scenario, Load, Measured string
	Pass                     bool
}

var (
	plainOnce sync.Once
	plainBin  string
	plainErr  error
)

// plainEgressd builds egressd without the race detector: the figures
// (latency, RSS) are those of the binary users run.
func plainEgressd(t *testing.T) string {
	plainOnce.Do(func() {
		dir, err := os.MkdirTemp("", "egressd-chaos-")
		if err != nil {
			plainErr = err
			return
		}
		plainBin = filepath.Join(dir, "egressd")
		out, err := exec.Command("go", "build", "-o", plainBin, "../cmd/egressd").CombinedOutput()
		if err != nil {
			plainErr = fmt.Errorf("build egressd: %v\n%s", err, out)
		}
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return plainBin
}

// Names of the chaos zones, each with distinct addresses (198.18.0.0/16
// is routed to the internet namespace's listeners).
const (
	freshZone = "fresh.cognitive.microsoft.com"
	freshMax  = 40000
)

func freshName(i int) string { return fmt.Sprintf("n%d.%s", i, freshZone) }
func freshAddr(i int) string { return fmt.Sprintf("198.18.%d.%d", i/250, i%250+1) }

func chaosZones() map[string]string {
	var z strings.Builder
	for i := range freshMax {
		fmt.Fprintf(&z, "n%d 300 A %s\n", i, freshAddr(i))
	}
	// The soak's names: any name below s0..s9 answers one of 10
	// addresses with a 5 s TTL, so that elements come and go.
	var soak strings.Builder
	for i := range 10 {
		fmt.Fprintf(&soak, "*.s%d 5 A 198.19.0.%d\n", i, i+1)
	}
	return map[string]string{freshZone: z.String(), "soak.cognitive.microsoft.com": soak.String()}
}

// stub asks like a stub resolver: tries of timeout each, up to attempts.
// It returns the answer, how long it took in all, and how many tries were
// needed.
func stub(ns, name string, network string, timeout time.Duration, attempts int) (*dns.Msg, time.Duration, int, error) {
	start := time.Now()
	var err error
	for a := 1; a <= attempts; a++ {
		var r *dns.Msg
		r, err = queryTimeout(ns, upstreamDNS+":53", name, dns.TypeA, network, timeout)
		if err == nil {
			return r, time.Since(start), a, nil
		}
	}
	return nil, time.Since(start), attempts, err
}

// latencies summarises durations.
type latencies []time.Duration

func (ls latencies) pct(p float64) time.Duration {
	if len(ls) == 0 {
		return 0
	}
	s := slices.Clone(ls)
	slices.Sort(s)
	return s[min(int(float64(len(s))*p), len(s)-1)]
}

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) + " ms" }

// loadResult is what a client load measured.
type loadResult struct {
	Queries, Answered, Servfail, Lost, Retried int
	ConnectOK, ConnectFail                     int
	Lat                                        latencies
	Bad                                        []string // answers that must not be
}

func (r *loadResult) String() string {
	return fmt.Sprintf("%d queries: %d answered, %d SERVFAIL, %d lost, %d retried; p50 %s, p99 %s, max %s; connects %d ok, %d failed",
		r.Queries, r.Answered, r.Servfail, r.Lost, r.Retried, ms(r.Lat.pct(0.5)), ms(r.Lat.pct(0.99)), ms(r.Lat.pct(1)), r.ConnectOK, r.ConnectFail)
}

// resolveLoad asks names[i] from ns at rate per second (workers in
// parallel), each like a stub (attempts tries of timeout), and connects to
// port 443 of every answered address when connect is set. forbidden
// addresses must never be answered.
func resolveLoad(ns string, names []string, rate int, timeout time.Duration, attempts int, connect bool, forbidden ...string) *loadResult {
	res := &loadResult{}
	var mu sync.Mutex
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, name := range names {
		<-tick.C
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, took, tries, err := stub(ns, name, "udp", timeout, attempts)
			mu.Lock()
			res.Queries++
			if tries > 1 {
				res.Retried++
			}
			if err != nil {
				res.Lost++
				mu.Unlock()
				return
			}
			res.Lat = append(res.Lat, took)
			if r.Rcode == dns.RcodeServerFailure {
				res.Servfail++
				mu.Unlock()
				return
			}
			got := addrs(r)
			for _, a := range got {
				if slices.Contains(forbidden, a) {
					res.Bad = append(res.Bad, name+" -> "+a)
				}
			}
			if len(got) > 0 {
				res.Answered++
			}
			mu.Unlock()
			if connect && len(got) > 0 {
				err := dial(ns, net.JoinHostPort(got[0], "443"), 2*time.Second)
				mu.Lock()
				if err == nil {
					res.ConnectOK++
				} else {
					res.ConnectFail++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return res
}

// egressdPID is the pid of the running egressd (ip netns exec execs it).
func (l *Lab) egressdPID() int { return l.egressd.Process.Pid }

// sample is one reading of egressd's resources.
type sample struct {
	At         time.Duration
	RSSKiB     int
	Goroutines int
	FDs        int
}

func (l *Lab) sampleResources(metricsAddr string, at time.Duration) sample {
	s := sample{At: at}
	pid := l.egressdPID()
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				s.RSSKiB, _ = strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			}
		}
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(ents)
	}
	if metricsAddr != "" {
		s.Goroutines = int(scrape(l.t, l, metricsAddr)["go_goroutines"])
	}
	return s
}

// peakRSS samples egressd's RSS every 200 ms until stop is closed and
// returns the highest, in MiB.
func (l *Lab) peakRSS(stop <-chan struct{}) <-chan float64 {
	out := make(chan float64, 1)
	go func() {
		peak := 0
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			s := l.sampleResources("", 0)
			peak = max(peak, s.RSSKiB)
			select {
			case <-stop:
				out <- float64(peak) / 1024
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// fakeUpstream is a DNS server in the internet namespace at addr:53 (UDP
// and TCP) that asks the lab's NSD and misbehaves by mode:
//
//	servfail: answers SERVFAIL.
//	junk:     before the real answer, sends garbage, a wrong-ID answer, a
//	          wrong-question answer and a non-response, each carrying the
//	          forged address 203.0.113.67.
//	truncate: over UDP, an empty answer with TC set; over TCP, the answer.
//	delay:    the answer after 500 ms.
func (l *Lab) fakeUpstream(addr, mode string) {
	l.t.Helper()
	l.in(l.Inet, "ip addr add "+addr+"/32 dev lo")
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		_, udp := w.RemoteAddr().(*net.UDPAddr)
		if mode == "servfail" {
			m := new(dns.Msg)
			m.SetRcode(q, dns.RcodeServerFailure)
			_ = w.WriteMsg(m)
			return
		}
		if mode == "truncate" && udp {
			m := new(dns.Msg)
			m.SetReply(q)
			m.Truncated = true
			_ = w.WriteMsg(m)
			return
		}
		if mode == "delay" {
			time.Sleep(500 * time.Millisecond)
		}
		// Asked from the internet namespace (the handler runs on any
		// thread).
		r, err := queryTimeout(l.Inet, upstreamDNS+":53", q.Question[0].Name, q.Question[0].Qtype, "udp", 2*time.Second)
		if err != nil {
			return
		}
		if mode == "junk" && udp {
			forged := func(edit func(m *dns.Msg)) {
				m := new(dns.Msg)
				m.SetReply(q)
				rr, _ := dns.NewRR(q.Question[0].Name + " 300 IN A 203.0.113.67")
				m.Answer = []dns.RR{rr}
				edit(m)
				out, _ := m.Pack()
				_, _ = w.Write(out)
			}
			_, _ = w.Write([]byte("\x12\x34garbage, not a DNS message"))
			forged(func(m *dns.Msg) { m.Id++ })
			forged(func(m *dns.Msg) { m.Question[0].Name = "other." + m.Question[0].Name })
			forged(func(m *dns.Msg) { m.Response = false })
		}
		r.Id = q.Id
		_ = w.WriteMsg(r)
	})
	for _, network := range []string{"udp", "tcp"} {
		var srv *dns.Server
		err := inNS(l.Inet, func() error {
			if network == "udp" {
				pc, err := net.ListenPacket("udp4", addr+":53")
				if err != nil {
					return err
				}
				srv = &dns.Server{PacketConn: pc, Handler: h}
				return nil
			}
			ln, err := net.Listen("tcp4", addr+":53")
			if err != nil {
				return err
			}
			srv = &dns.Server{Listener: ln, Handler: h}
			return nil
		})
		if err != nil {
			l.t.Fatalf("fake upstream %s %s: %v", addr, network, err)
		}
		go func() { _ = srv.ActivateAndServe() }()
		l.t.Cleanup(func() { _ = srv.Shutdown() })
	}
}

// spoof sends, from a raw socket in the internet namespace, forged DNS
// answers from src:53 to dst at random ports and IDs, for names, carrying
// forged, until ctx ends. It returns how many it sent.
func spoof(ctx context.Context, ns, src, dst string, names []string, forged string) (int, error) {
	var fd int
	err := inNS(ns, func() (err error) {
		fd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		return err
	})
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	s4, d4 := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	to := &syscall.SockaddrInet4{Addr: d4}
	sent := 0
	pkt := make([]byte, 0, 512)
	for ctx.Err() == nil {
		name := names[rand.IntN(len(names))]
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), dns.TypeA)
		m.Response, m.RecursionAvailable = true, true
		m.Id = uint16(rand.Uint32())
		rr, _ := dns.NewRR(dns.Fqdn(name) + " 300 IN A " + forged)
		m.Answer = []dns.RR{rr}
		payload, _ := m.Pack()
		port := 32768 + rand.IntN(61000-32768) // Linux's default ephemeral range
		pkt = pkt[:0]
		// IPv4 header (the kernel fills the checksum and ID with
		// IPPROTO_RAW), then UDP without checksum.
		total := 20 + 8 + len(payload)
		pkt = append(pkt, 0x45, 0, byte(total>>8), byte(total), 0, 0, 0, 0, 64, syscall.IPPROTO_UDP, 0, 0)
		pkt = append(pkt, s4[:]...)
		pkt = append(pkt, d4[:]...)
		pkt = binary.BigEndian.AppendUint16(pkt, 53)
		pkt = binary.BigEndian.AppendUint16(pkt, uint16(port))
		pkt = binary.BigEndian.AppendUint16(pkt, uint16(8+len(payload)))
		pkt = append(pkt, 0, 0)
		pkt = append(pkt, payload...)
		if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
			if err == syscall.ENOBUFS {
				continue
			}
			return sent, err
		}
		sent++
	}
	return sent, nil
}

// nftScript loads an nft script in ns.
func (l *Lab) nftScript(ns, name, script string) {
	l.t.Helper()
	p := filepath.Join(l.Dir, name)
	if err := os.WriteFile(p, []byte(script), 0o600); err != nil {
		l.t.Fatal(err)
	}
	l.in(ns, "nft -f "+p)
}
