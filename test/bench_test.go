package test

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The DNS load benchmark compares, in one lab and one run:
//
//	direct:  the container asks the upstream itself; no firewall, no proxy
//	dnsmasq: dnsmasq with --nftset and a hand-written equivalent ruleset
//	egressd: egressd
//
// `make bench` runs it in full (EGRESSD_BENCH=full) and writes the table to
// EGRESSD_BENCH_OUT; otherwise it runs as a short smoke test, so it cannot
// rot. It reports numbers and asserts none of them.

type benchParams struct {
	warm, fresh, load int           // names: warm set, fresh per system, live-element load
	duration          time.Duration // of each warm run
	outstanding       int           // dnsperf -q
	connects          int           // resolve-to-connect samples
}

func benchConfig() (benchParams, bool) {
	if os.Getenv("EGRESSD_BENCH") == "full" {
		return benchParams{warm: 2000, fresh: 30000, load: 100000, duration: 10 * time.Second, outstanding: 100, connects: 300}, true
	}
	return benchParams{warm: 200, fresh: 500, load: 2000, duration: time.Second, outstanding: 20, connects: 20}, false
}

const benchZone = "bench.cognitive.microsoft.com"

// benchName i resolves to benchAddr(i), a distinct address of the
// benchmark range 198.18.0.0/15.
func benchName(i int) string { return fmt.Sprintf("n%d.%s", i, benchZone) }

func benchAddr(i int) string {
	return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16), byte(i >> 8), byte(i)}).String()
}

type benchRow struct {
	system                       string
	warmQPS, warmAvg, warmP99    float64 // qps, ms, ms
	warmLost                     int
	freshQPS, freshAvg, freshP99 float64
	freshLost                    int
	connectP50, connectP99       float64 // ms
	connectFail                  int
}

// dnsperfResult is what one dnsperf run reports.
type dnsperfResult struct {
	qps, avgMs, p99Ms float64
	sent, lost        int
}

func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// dnsmasqRuleset is what an admin would write by hand for dnsmasq --nftset:
// the same egress policy for the container bridge, sets with a fixed
// timeout (dnsmasq cannot give elements a TTL-based one).
const dnsmasqRuleset = `table inet dnsmasqfw {
	set allow4 { type ipv4_addr; flags timeout; timeout 5m; }
	set allow6 { type ipv6_addr; flags timeout; timeout 5m; }
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "docker0" ct state established,related accept
		iifname "docker0" ip daddr @allow4 tcp dport 443 accept
		iifname "docker0" ip6 daddr @allow6 tcp dport 443 accept
		iifname "docker0" meta l4proto tcp reject with tcp reset
		iifname "docker0" reject with icmpx admin-prohibited
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "docker0" udp dport 53 redirect to :10054
		iifname "docker0" tcp dport 53 redirect to :10054
	}
}
`

func TestDNSBenchmark(t *testing.T) {
	p, full := benchConfig()
	for _, tool := range []string{"dnsperf", "dnsmasq"} {
		if _, err := exec.LookPath(tool); err != nil {
			need(t, "%s is not installed (apt-get install dnsperf dnsmasq-base)", tool)
		}
	}
	total := p.warm + 3*(p.fresh+p.connects) + p.load
	var zone strings.Builder
	for i := range total {
		fmt.Fprintf(&zone, "n%d A %s\n", i, benchAddr(i))
	}
	l := newLab(t, map[string]string{benchZone: zone.String()})

	next := p.warm
	take := func(n int) []string {
		var out []string
		for i := next; i < next+n; i++ {
			out = append(out, benchName(i))
		}
		next += n
		return out
	}
	warm := make([]string, p.warm)
	for i := range warm {
		warm[i] = benchName(i)
	}

	measure := func(system, server string) benchRow {
		row := benchRow{system: system}
		l.dnsperf(server, warm, 1, 0, p.outstanding) // fill caches
		w := l.dnsperf(server, warm, 0, p.duration, p.outstanding)
		row.warmQPS, row.warmAvg, row.warmP99, row.warmLost = w.qps, w.avgMs, w.p99Ms, w.lost
		f := l.dnsperf(server, take(p.fresh), 1, 0, p.outstanding)
		row.freshQPS, row.freshAvg, row.freshP99, row.freshLost = f.qps, f.avgMs, f.p99Ms, f.lost
		row.connectP50, row.connectP99, row.connectFail = l.resolveToConnect(server+":53", take(p.connects))
		return row
	}

	var rows []benchRow
	rows = append(rows, measure("direct", upstreamDNS))

	// dnsmasq with its hand-written ruleset.
	rules := l.writeConfig("dnsmasq.nft", dnsmasqRuleset)
	l.in(l.Host, "nft -f "+rules)
	dm := exec.Command("ip", "netns", "exec", l.Host, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--port=10054", "--user=root", "--cache-size=10000", "--pid-file="+filepath.Join(l.Dir, "dnsmasq.pid"),
		"--server=/cognitive.microsoft.com/"+upstreamDNS,
		"--nftset=/cognitive.microsoft.com/4#inet#dnsmasqfw#allow4,6#inet#dnsmasqfw#allow6")
	var dmLog syncBuffer
	dm.Stdout, dm.Stderr = &dmLog, &dmLog
	if err := dm.Start(); err != nil {
		t.Fatal(err)
	}
	l.waitFor("dnsmasq", 5*time.Second, func() error {
		_, err := query(l.Ctr, otherDNS+":53", benchName(0), dns.TypeA, "udp")
		return err
	})
	rows = append(rows, measure("dnsmasq", otherDNS))
	_ = dm.Process.Kill()
	_ = dm.Wait()
	l.in(l.Host, "nft delete table inet dnsmasqfw")

	// Measured without the race detector the other tests use.
	l.bin = filepath.Join(l.Dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", l.bin, "../cmd/egressd").CombinedOutput(); err != nil {
		t.Fatalf("build egressd: %v\n%s", err, out)
	}
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "level: debug", "level: warn", 1))
	// One load generator is one client: the per-client bounds (dns.limits),
	// which keep one container from starving the others, would measure
	// themselves, not the proxy.
	env := []string{"EGRESSD_DNS_LIMITS_RATE_PER_CLIENT=0", "EGRESSD_DNS_LIMITS_IN_FLIGHT_PER_CLIENT=1024"}
	if lim := os.Getenv("EGRESSD_BENCH_GOMEMLIMIT"); lim != "" {
		env = append(env, "GOMEMLIMIT="+lim)
	}
	if prof := os.Getenv("EGRESSD_BENCH_PROFILE"); prof != "" {
		env = append(env, "EGRESSD_CPUPROFILE="+prof, "EGRESSD_MEMPROFILE="+prof+".heap")
	}
	l.startDaemon(cfg, env...)
	rows = append(rows, measure("egressd", otherDNS))

	// Load live elements, then measure again at that size.
	start := time.Now()
	ld := l.dnsperf(otherDNS, take(p.load), 1, 0, p.outstanding)
	loadTime := time.Since(start)
	count := len(regexp.MustCompile(`198\.\d+\.\d+\.\d+`).FindAllString(l.in(l.Host, "nft list set inet egressd allow4"), -1))
	big := l.dnsperf(otherDNS, warm, 0, p.duration, p.outstanding)
	rss := vmHWM(t, l.egressd.Process.Pid)
	l.stopDaemon(syscall.SIGTERM) // writes the profile, if any

	report := formatBench(p, rows, fmt.Sprintf(
		"live elements: %d fresh names answered in %v (%.0f/s, %d lost); %d benchmark addresses in the set afterwards\n"+
			"warm queries at that size: %.0f q/s, avg %.3f ms, p99 %.3f ms\n"+
			"egressd peak RSS: %.1f MB\n", p.load, loadTime.Round(time.Millisecond), ld.qps, ld.lost, count,
		big.qps, big.avgMs, big.p99Ms, float64(rss)/1024))
	t.Log("\n" + report)
	if out := os.Getenv("EGRESSD_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if !full {
		// The smoke run proves the benchmark works, not how fast it is.
		for _, r := range rows {
			if r.warmQPS == 0 || r.freshQPS == 0 {
				t.Errorf("%s: no queries answered: %+v", r.system, r)
			}
		}
	}
}

func vmHWM(t *testing.T, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(data)
	if m == nil {
		return 0
	}
	kb, _ := strconv.Atoi(string(m[1]))
	return kb
}

func formatBench(p benchParams, rows []benchRow, tail string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "DNS load benchmark: %d warm names for %v, %d fresh names, %d outstanding queries (dnsperf), %d resolve-to-connect samples\n\n",
		p.warm, p.duration, p.fresh, p.outstanding, p.connects)
	fmt.Fprintf(&b, "| system | warm q/s | vs direct | avg ms | p99 ms | lost | fresh q/s | vs direct | avg ms | p99 ms | lost | connect p50 ms | p99 ms | failed |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	d := rows[0]
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %.0f | %.0f%% | %.3f | %.3f | %d | %.0f | %.0f%% | %.3f | %.3f | %d | %.3f | %.3f | %d |\n",
			r.system, r.warmQPS, 100*r.warmQPS/d.warmQPS, r.warmAvg, r.warmP99, r.warmLost,
			r.freshQPS, 100*r.freshQPS/d.freshQPS, r.freshAvg, r.freshP99, r.freshLost,
			r.connectP50, r.connectP99, r.connectFail)
	}
	b.WriteString("\n" + tail)
	return b.String()
}
