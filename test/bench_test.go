package test

import (
	"bytes"
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
//	direct:          the container asks the upstream (NSD) itself; no firewall, no proxy
//	dnsmasq:         dnsmasq --nftset --cache-size=10000 and a hand-written equivalent ruleset
//	dnsmasq-default: the same with dnsmasq's default cache (150 names)
//	egressd:         egressd
//
// `make bench` runs it in full (EGRESSD_BENCH=full) and writes the table to
// EGRESSD_BENCH_OUT; otherwise it runs as a short smoke test, so it cannot
// rot. EGRESSD_BENCH_SYSTEMS (a comma list of the names above, default all)
// picks systems, e.g. "direct,egressd" for a profiling run
// (EGRESSD_BENCH_PROFILE). It reports numbers and asserts none of them.

var benchSystems = []string{"direct", "dnsmasq", "dnsmasq-default", "egressd"}

func benchSelected(t *testing.T) []string {
	env := os.Getenv("EGRESSD_BENCH_SYSTEMS")
	if env == "" {
		return benchSystems
	}
	var out []string
	for s := range strings.SplitSeq(env, ",") {
		if s = strings.TrimSpace(s); !slices.Contains(benchSystems, s) {
			t.Fatalf("EGRESSD_BENCH_SYSTEMS: %q is none of %v", s, benchSystems)
		}
		out = append(out, s)
	}
	return out
}

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
	warmCPU                      float64 // ms of CPU per 1000 answers
	freshQPS, freshAvg, freshP99 float64
	freshLost                    int
	freshCPU                     float64
	connectP50, connectP99       float64 // ms
	connectFail                  int
	freshMetrics                 map[string]float64 // egressd's, the fresh run's share
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
	systems := benchSelected(t)
	for _, tool := range []string{"dnsperf", "dnsmasq"} {
		if _, err := exec.LookPath(tool); err != nil {
			need(t, "%s is not installed (apt-get install dnsperf dnsmasq-base)", tool)
		}
	}
	total := p.warm + len(systems)*(p.fresh+p.connects) + p.load
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

	// measure runs the load against server, answered by process pid;
	// probe, if not nil, reads the server's metrics around the fresh run.
	measure := func(system, server string, pid int, probe func() map[string]float64) benchRow {
		row := benchRow{system: system}
		l.dnsperf(server, warm, 1, 0, p.outstanding) // fill caches
		cpu := cpuTime(t, pid)
		w := l.dnsperf(server, warm, 0, p.duration, p.outstanding)
		cpu = cpuTime(t, pid) - cpu
		row.warmQPS, row.warmAvg, row.warmP99, row.warmLost = w.qps, w.avgMs, w.p99Ms, w.lost
		if answers := w.sent - w.lost; answers > 0 {
			row.warmCPU = float64(cpu.Microseconds()) / float64(answers) // µs per answer = ms per 1000
		}
		var before map[string]float64
		if probe != nil {
			before = probe()
		}
		cpu = cpuTime(t, pid)
		f := l.dnsperf(server, take(p.fresh), 1, 0, p.outstanding)
		cpu = cpuTime(t, pid) - cpu
		if answers := f.sent - f.lost; answers > 0 {
			row.freshCPU = float64(cpu.Microseconds()) / float64(answers)
		}
		if probe != nil {
			row.freshMetrics = probe()
			for k, v := range before {
				row.freshMetrics[k] -= v
			}
		}
		row.freshQPS, row.freshAvg, row.freshP99, row.freshLost = f.qps, f.avgMs, f.p99Ms, f.lost
		row.connectP50, row.connectP99, row.connectFail = l.resolveToConnect(server+":53", take(p.connects))
		return row
	}

	// dnsmasq with its hand-written ruleset, cacheArgs added.
	dnsmasq := func(system string, cacheArgs ...string) benchRow {
		rules := l.writeConfig("dnsmasq.nft", dnsmasqRuleset)
		l.in(l.Host, "nft -f "+rules)
		defer l.in(l.Host, "nft delete table inet dnsmasqfw")
		args := append([]string{"netns", "exec", l.Host, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
			"--port=10054", "--user=root", "--pid-file=" + filepath.Join(l.Dir, "dnsmasq.pid"),
			"--server=/cognitive.microsoft.com/" + upstreamDNS,
			"--nftset=/cognitive.microsoft.com/4#inet#dnsmasqfw#allow4,6#inet#dnsmasqfw#allow6"}, cacheArgs...)
		dm := exec.Command("ip", args...)
		var dmLog syncBuffer
		dm.Stdout, dm.Stderr = &dmLog, &dmLog
		if err := dm.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = dm.Process.Kill(); _ = dm.Wait() }()
		l.waitFor("dnsmasq", 5*time.Second, func() error {
			_, err := query(l.Ctr, otherDNS+":53", benchName(0), dns.TypeA, "udp")
			return err
		})
		return measure(system, otherDNS, dm.Process.Pid, nil)
	}

	var rows []benchRow
	var tail string
	for _, s := range systems {
		switch s {
		case "direct":
			rows = append(rows, measure("direct (NSD)", upstreamDNS, nsdPid(t, l), nil))
		case "dnsmasq":
			rows = append(rows, dnsmasq("dnsmasq --cache-size=10000", "--cache-size=10000"))
		case "dnsmasq-default":
			rows = append(rows, dnsmasq("dnsmasq, default cache (150)"))
		case "egressd":
			var row benchRow
			row, tail = benchEgressd(t, l, p, warm, take, measure)
			rows = append(rows, row)
		}
	}

	report := formatBench(p, rows, tail)
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

// benchEgressd measures egressd, then loads p.load live elements and
// measures warm queries again at that size (the report's tail).
func benchEgressd(t *testing.T, l *Lab, p benchParams, warm []string, take func(int) []string,
	measure func(system, server string, pid int, probe func() map[string]float64) benchRow) (benchRow, string) {
	// Measured without the race detector the other tests use.
	l.bin = filepath.Join(l.Dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", l.bin, "../cmd/egressd").CombinedOutput(); err != nil {
		t.Fatalf("build egressd: %v\n%s", err, out)
	}
	const metricsAddr = "127.0.0.1:9253"
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "level: debug", "level: warn", 1)+
		"metrics:\n  listen: "+metricsAddr+"\n")
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
	row := measure("egressd", otherDNS, l.egressd.Process.Pid, func() map[string]float64 { return scrape(t, l, metricsAddr) })
	m := row.freshMetrics
	mean := func(h string) float64 { return m[h+"_sum"] / max(m[h+"_count"], 1) }
	fresh := fmt.Sprintf("egressd during the fresh run: %.0f upstream queries, mean %.3f ms; %.0f set updates (netlink flush), mean %.3f ms, %.1f answers each\n",
		m["egressd_upstream_query_duration_seconds_count"], 1000*mean("egressd_upstream_query_duration_seconds"),
		m["egressd_set_update_duration_seconds_count"], 1000*mean("egressd_set_update_duration_seconds"),
		mean("egressd_set_update_batch_answers"))

	start := time.Now()
	ld := l.dnsperf(otherDNS, take(p.load), 1, 0, p.outstanding)
	loadTime := time.Since(start)
	count := len(regexp.MustCompile(`198\.\d+\.\d+\.\d+`).FindAllString(l.in(l.Host, "nft list set inet egressd allow4"), -1))
	big := l.dnsperf(otherDNS, warm, 0, p.duration, p.outstanding)
	rss := vmHWM(t, l.egressd.Process.Pid)
	l.stopDaemon(syscall.SIGTERM) // writes the profile, if any
	return row, fresh + fmt.Sprintf(
		"live elements: %d fresh names answered in %v (%.0f/s, %d lost); %d benchmark addresses in the set afterwards\n"+
			"warm queries at that size: %.0f q/s, avg %.3f ms, p99 %.3f ms\n"+
			"egressd peak RSS: %.1f MB\n", p.load, loadTime.Round(time.Millisecond), ld.qps, ld.lost, count,
		big.qps, big.avgMs, big.p99Ms, float64(rss)/1024)
}

// nsdPid returns the process id of the lab's NSD, the upstream that
// "direct" measures (it forks its server process from that one).
func nsdPid(t *testing.T, l *Lab) int {
	data, err := os.ReadFile(filepath.Join(l.Dir, "nsd", "nsd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("nsd.pid: %v", err)
	}
	return pid
}

// cpuTime returns the CPU time (utime+stime of all threads, from
// /proc/PID/stat) used so far by pid and its descendants: NSD answers from
// a forked child, and `ip netns exec` may sit between the test and the
// server.
func cpuTime(t *testing.T, pid int) time.Duration {
	const userHZ = 100 // the kernel's fixed unit for /proc times (USER_HZ)
	type proc struct{ ppid, ticks int }
	procs := map[int]proc{}
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		id, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + d.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ... utime stime: fields 4, 14 and 15; comm may hold spaces.
		f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
		ppid, _ := strconv.Atoi(f[1])
		utime, _ := strconv.Atoi(f[11])
		stime, _ := strconv.Atoi(f[12])
		procs[id] = proc{ppid, utime + stime}
	}
	var ticks int
	for id, p := range procs {
		for a := id; a > 1; a = procs[a].ppid {
			if a == pid {
				ticks += p.ticks
				break
			}
		}
	}
	return time.Duration(ticks) * time.Second / userHZ
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
	fmt.Fprintf(&b, "| system | warm q/s | vs direct | avg ms | p99 ms | lost | CPU ms per 1000 | fresh q/s | vs direct | avg ms | p99 ms | lost | CPU ms per 1000 | connect p50 ms | p99 ms | failed |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	var direct *benchRow
	for i := range rows {
		if strings.HasPrefix(rows[i].system, "direct") {
			direct = &rows[i]
		}
	}
	vs := func(v func(benchRow) float64, r benchRow) string {
		if direct == nil {
			return "–"
		}
		return fmt.Sprintf("%.0f%%", 100*v(r)/v(*direct))
	}
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %.0f | %s | %.3f | %.3f | %d | %.1f | %.0f | %s | %.3f | %.3f | %d | %.1f | %.3f | %.3f | %d |\n",
			r.system, r.warmQPS, vs(func(r benchRow) float64 { return r.warmQPS }, r), r.warmAvg, r.warmP99, r.warmLost, r.warmCPU,
			r.freshQPS, vs(func(r benchRow) float64 { return r.freshQPS }, r), r.freshAvg, r.freshP99, r.freshLost, r.freshCPU,
			r.connectP50, r.connectP99, r.connectFail)
	}
	b.WriteString("\n*CPU ms per 1000*: CPU time (utime+stime, all threads, from /proc/PID/stat) of the answering " +
		"process and its children over the warm (fresh) run, per 1000 answers: for direct the upstream NSD (main, xfrd and " +
		"server processes), for dnsmasq and egressd the proxy. Not counted: dnsperf, and kernel work that softirqs " +
		"charge to whichever process runs (packets forwarded, NAT, the firewall).\n")
	if tail != "" {
		b.WriteString("\n" + tail)
	}
	return b.String()
}
