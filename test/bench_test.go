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
//	direct:          the container asks the upstream itself; no firewall, no proxy
//	dnsmasq:         dnsmasq --nftset --cache-size=10000 and a hand-written equivalent ruleset
//	dnsmasq-default: the same with dnsmasq's default cache (150 names)
//	egressd:         egressd
//
// in each lab condition (benchConditions): the lab as the end-to-end tests
// build it, a Docker-like host with br_netfilter, a caching upstream, and
// stub-like clients that make a new flow per query. Every system runs in
// every condition twice, interleaved (round 1 of all, then round 2), so
// that a slow minute of a shared machine does not land on one system.
//
// `make bench` runs it in full (EGRESSD_BENCH=full) and writes the tables
// to EGRESSD_BENCH_OUT; otherwise it runs as a short smoke test, so it
// cannot rot. EGRESSD_BENCH_SYSTEMS and EGRESSD_BENCH_CONDITIONS (comma
// lists of the names, default all) pick some, e.g. "direct,egressd" and
// "lab" for a profiling run (EGRESSD_BENCH_PROFILE). It reports numbers and
// asserts none of them.

var benchSystems = []string{"direct", "dnsmasq", "dnsmasq-default", "egressd"}

// pick returns the names of all that the comma list in the environment
// variable env selects, all if it is empty.
func pick(t *testing.T, env string, all []string) []string {
	list := os.Getenv(env)
	if list == "" {
		return all
	}
	var out []string
	for s := range strings.SplitSeq(list, ",") {
		if s = strings.TrimSpace(s); !slices.Contains(all, s) {
			t.Fatalf("%s: %q is none of %v", env, s, all)
		}
		out = append(out, s)
	}
	return out
}

type benchParams struct {
	warm, fresh, load int           // names: warm set, fresh per measurement, live-element load
	duration          time.Duration // of each warm run
	outstanding       int           // dnsperf -q
	connects          int           // resolve-to-connect samples
	rounds            int
}

func benchConfig() (benchParams, bool) {
	if os.Getenv("EGRESSD_BENCH") == "full" {
		return benchParams{warm: 2000, fresh: 10000, load: 100000, duration: 8 * time.Second, outstanding: 100, connects: 200, rounds: 2}, true
	}
	return benchParams{warm: 200, fresh: 300, load: 2000, duration: time.Second, outstanding: 20, connects: 10, rounds: 1}, false
}

const (
	benchZone = "bench.cognitive.microsoft.com"
	// cachingDNS is the caching resolver of the "caching" condition, in
	// the lab's internet next to NSD.
	cachingDNS = "198.51.100.55"
)

// benchName i resolves to benchAddr(i), an address of the benchmark range
// 198.18.0.0/15, which the lab's internet answers on. The range has 131 072
// addresses and a full run names more, so later names reuse addresses, all
// but the first 4096, which the warm names (benchParams.warm) keep. No one
// system's measurement (at most the load, a fresh run and its connects)
// takes as many, so each still learns only new addresses.
func benchName(i int) string { return fmt.Sprintf("n%d.%s", i, benchZone) }

func benchAddr(i int) string {
	const size, kept = 1 << 17, 1 << 12
	if i >= size {
		i = kept + (i-kept)%(size-kept)
	}
	return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16), byte(i >> 8), byte(i)}).String()
}

// benchCondition is a lab condition the systems are measured in.
type benchCondition struct {
	name, what string
	upstream   string // the resolver direct asks and the proxies forward to
	// setup changes the lab and returns the process answering as the
	// upstream (0: NSD) and what undoes the change.
	setup func(t *testing.T, l *Lab) (pid int, undo func())
	// stub: dnsperf's queries leave the container from a new source
	// port each (see stubRuleset), while it runs.
	stub bool
}

var benchConditions = []benchCondition{
	{name: "lab", upstream: upstreamDNS, setup: bridgeNF(false),
		what: "the end-to-end lab: a plain bridge, the authoritative upstream (NSD) one routed hop away, dnsperf's 4 client sockets"},
	{name: "br_netfilter", upstream: upstreamDNS, setup: bridgeNF(true),
		what: "a Docker-like host: br_netfilter with bridge-nf-call-iptables and -ip6tables on, so that bridged packets also pass the IP hooks (Docker and kubeadm turn it on)"},
	{name: "caching", upstream: cachingDNS, setup: startUnbound,
		what: "a caching upstream: unbound one routed hop away, NSD behind it (so direct measures unbound)"},
	{name: "stub", upstream: upstreamDNS, setup: stubSources, stub: true,
		what: "stub-like clients: a new flow per query, as glibc and systemd-resolved make with a new source port per query (see stubRuleset)"},
}

func conditionNames() []string {
	var out []string
	for _, c := range benchConditions {
		out = append(out, c.name)
	}
	return out
}

type benchRow struct {
	condition, system            string
	round                        int
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
	systems := pick(t, "EGRESSD_BENCH_SYSTEMS", benchSystems)
	var conditions []benchCondition
	for _, name := range pick(t, "EGRESSD_BENCH_CONDITIONS", conditionNames()) {
		conditions = append(conditions, benchConditions[slices.Index(conditionNames(), name)])
	}
	for _, tool := range []string{"dnsperf", "dnsmasq", "unbound", "modprobe"} {
		if _, err := exec.LookPath(tool); err != nil {
			need(t, "%s is not installed (apt-get install dnsperf dnsmasq-base unbound kmod)", tool)
		}
	}
	measurements := p.rounds * len(conditions) * len(systems)
	total := p.warm + measurements*(p.fresh+p.connects) + p.load
	var zone strings.Builder
	for i := range total {
		fmt.Fprintf(&zone, "n%d A %s\n", i, benchAddr(i))
	}
	start := time.Now()
	l := newLab(t, map[string]string{benchZone: zone.String()})
	t.Logf("lab with %d names in the zone: %v", total, time.Since(start).Round(time.Second))
	if slices.Contains(systems, "egressd") {
		// Measured without the race detector the other tests use.
		l.bin = filepath.Join(l.Dir, "egressd")
		if out, err := exec.Command("go", "build", "-o", l.bin, "../cmd/egressd").CombinedOutput(); err != nil {
			t.Fatalf("build egressd: %v\n%s", err, out)
		}
	}

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

	var rows []benchRow
	var tail string
	for round := 1; round <= p.rounds; round++ {
		for _, c := range conditions {
			upstreamPid, undo := c.setup(t, l)
			if upstreamPid == 0 {
				upstreamPid = nsdPid(t, l)
			}
			b := &benchRun{t: t, l: l, p: p, c: c, round: round, warm: warm, take: take}
			for _, s := range systems {
				var row benchRow
				switch s {
				case "direct":
					row = b.measure("direct", c.upstream, upstreamPid, nil)
				case "dnsmasq":
					row = b.dnsmasq("dnsmasq --cache-size=10000", "--cache-size=10000")
				case "dnsmasq-default":
					row = b.dnsmasq("dnsmasq, default cache (150)")
				case "egressd":
					// The first egressd of the lab condition also loads the
					// live elements and is the one profiled.
					var more string
					row, more = b.egressd(round == 1 && c.name == "lab")
					tail += more
				}
				rows = append(rows, row)
			}
			undo()
		}
	}

	report := formatBench(p, conditions, rows, tail)
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
				t.Errorf("%s, %s: no queries answered: %+v", r.condition, r.system, r)
			}
		}
	}
}

// benchRun measures the systems in one condition.
type benchRun struct {
	t     *testing.T
	l     *Lab
	p     benchParams
	c     benchCondition
	round int
	warm  []string
	take  func(int) []string
}

// dnsperf runs dnsperf in the container, with the condition's sources.
func (b *benchRun) dnsperf(server string, names []string, runs int, duration time.Duration) dnsperfResult {
	if b.c.stub {
		b.l.in(b.l.Ctr, "nft -f "+filepath.Join(b.l.Dir, "stub.nft"))
		defer b.l.in(b.l.Ctr, "nft delete table ip stub")
	}
	return b.l.dnsperf(server, names, runs, duration, b.p.outstanding)
}

// measure runs the load against server, answered by process pid; probe,
// if not nil, reads the server's metrics around the fresh run.
func (b *benchRun) measure(system, server string, pid int, probe func() map[string]float64) benchRow {
	t, p := b.t, b.p
	row := benchRow{condition: b.c.name, system: system, round: b.round}
	start := time.Now()
	defer func() { // progress, with -v
		t.Logf("%s, %s, round %d: measured in %v", b.c.name, system, b.round, time.Since(start).Round(time.Second))
	}()
	b.dnsperf(server, b.warm, 1, 0) // fill caches
	cpu := cpuTime(t, pid)
	w := b.dnsperf(server, b.warm, 0, p.duration)
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
	f := b.dnsperf(server, b.take(p.fresh), 1, 0)
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
	// One query at a time from a socket of its own: a new flow per
	// query in every condition.
	row.connectP50, row.connectP99, row.connectFail = b.l.resolveToConnect(server+":53", b.take(p.connects))
	return row
}

// dnsmasq measures dnsmasq with its hand-written ruleset, cacheArgs added.
func (b *benchRun) dnsmasq(system string, cacheArgs ...string) benchRow {
	t, l := b.t, b.l
	rules := l.writeConfig("dnsmasq.nft", dnsmasqRuleset)
	l.in(l.Host, "nft -f "+rules)
	defer l.in(l.Host, "nft delete table inet dnsmasqfw")
	args := append([]string{"netns", "exec", l.Host, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--port=10054", "--user=root", "--pid-file=" + filepath.Join(l.Dir, "dnsmasq.pid"),
		"--server=/cognitive.microsoft.com/" + b.c.upstream,
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
	return b.measure(system, otherDNS, dm.Process.Pid, nil)
}

// egressd measures egressd, started afresh (no state) and removed
// afterwards. With load it then loads p.load live elements and measures
// warm queries again at that size (the report's tail), profiled if
// EGRESSD_BENCH_PROFILE asks.
func (b *benchRun) egressd(load bool) (benchRow, string) {
	t, l, p := b.t, b.l, b.p
	const metricsAddr = "127.0.0.1:9253"
	cfg := strings.Replace(l.baseConfig(), "level: debug", "level: warn", 1) + "metrics:\n  listen: " + metricsAddr + "\n"
	cfg = l.writeConfig("egressd.yaml", strings.Replace(cfg, `["`+upstreamDNS+`"]`, `["`+b.c.upstream+`"]`, 1))
	if err := os.RemoveAll(filepath.Join(l.Dir, "state")); err != nil {
		t.Fatal(err)
	}
	// One load generator is one client: the per-client bounds (dns.limits),
	// which keep one container from starving the others, would measure
	// themselves, not the proxy.
	env := []string{"EGRESSD_DNS_LIMITS_RATE_PER_CLIENT=0", "EGRESSD_DNS_LIMITS_IN_FLIGHT_PER_CLIENT=1024"}
	if lim := os.Getenv("EGRESSD_BENCH_GOMEMLIMIT"); lim != "" {
		env = append(env, "GOMEMLIMIT="+lim)
	}
	if prof := os.Getenv("EGRESSD_BENCH_PROFILE"); prof != "" && load {
		env = append(env, "EGRESSD_CPUPROFILE="+prof, "EGRESSD_MEMPROFILE="+prof+".heap")
	}
	l.startDaemon(cfg, env...)
	defer func() {
		if out, err := l.runEgressd("remove", "--config", cfg); err != nil {
			t.Fatalf("egressd remove: %v\n%s", err, out)
		}
	}()
	row := b.measure("egressd", otherDNS, l.egressd.Process.Pid, func() map[string]float64 { return scrape(t, l, metricsAddr) })
	m := row.freshMetrics
	mean := func(h string) float64 { return m[h+"_sum"] / max(m[h+"_count"], 1) }
	tail := fmt.Sprintf("- %s, round %d: %.0f upstream queries, mean %.3f ms; %.0f set updates (netlink flush), mean %.3f ms, %.1f answers each\n",
		b.c.name, b.round, m["egressd_upstream_query_duration_seconds_count"], 1000*mean("egressd_upstream_query_duration_seconds"),
		m["egressd_set_update_duration_seconds_count"], 1000*mean("egressd_set_update_duration_seconds"),
		mean("egressd_set_update_batch_answers"))
	if !load {
		_ = l.stopDaemon(syscall.SIGTERM)
		return row, tail
	}
	start := time.Now()
	ld := b.dnsperf(otherDNS, b.take(p.load), 1, 0)
	loadTime := time.Since(start)
	count := len(regexp.MustCompile(`198\.\d+\.\d+\.\d+`).FindAllString(l.in(l.Host, "nft list set inet egressd allow4"), -1))
	big := b.dnsperf(otherDNS, b.warm, 0, p.duration)
	pid := l.egressd.Process.Pid
	rss, anon, file := procStatusKB(t, pid, "VmHWM"), procStatusKB(t, pid, "RssAnon"), procStatusKB(t, pid, "RssFile")
	_ = l.stopDaemon(syscall.SIGTERM) // writes the profile, if any
	return row, tail + fmt.Sprintf(
		"- live elements (%s): %d fresh names answered in %v (%.0f/s, %d lost); %d benchmark addresses in the set afterwards; "+
			"warm queries at that size: %.0f q/s, avg %.3f ms, p99 %.3f ms; egressd peak RSS: %.1f MB "+
			"(at the end %.1f MB anonymous, %.1f MB file pages: the binary)\n",
		b.c.name, p.load, loadTime.Round(time.Millisecond), ld.qps, ld.lost, count,
		big.qps, big.avgMs, big.p99Ms, float64(rss)/1024, float64(anon)/1024, float64(file)/1024)
}

// bridgeNF turns br_netfilter's bridge-nf-call-iptables and -ip6tables on
// or off in the lab's host. Once loaded (Docker loads it) or built in,
// br_netfilter turns them on in every new namespace: the plain lab must
// turn them off.
func bridgeNF(on bool) func(t *testing.T, l *Lab) (int, func()) {
	return func(t *testing.T, l *Lab) (int, func()) {
		if on {
			loadModule(t, "br_netfilter", "/proc/sys/net/bridge")
		}
		if _, err := os.Stat("/proc/sys/net/bridge"); err == nil {
			v := 0
			if on {
				v = 1
			}
			l.in(l.Host, fmt.Sprintf("sysctl -qw net.bridge.bridge-nf-call-iptables=%d net.bridge.bridge-nf-call-ip6tables=%[1]d", v))
		}
		return 0, func() {}
	}
}

// loadModule loads module unless path, which it makes, is there (the
// module is loaded or built in).
func loadModule(t *testing.T, module, path string) {
	if _, err := os.Stat(path); err == nil {
		return
	}
	if out, err := exec.Command("modprobe", module).CombinedOutput(); err != nil {
		need(t, "modprobe %s: %v\n%s", module, err, out)
	}
}

// startUnbound runs unbound in the lab's internet on cachingDNS, as a
// caching resolver that forwards to NSD.
func startUnbound(t *testing.T, l *Lab) (int, func()) {
	bridgeNF(false)(t, l)
	dir := filepath.Join(l.Dir, "unbound")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The iterator alone (no validation), forwarding everything to NSD,
	// caches larger than the benchmark's names.
	conf := l.writeConfig("unbound/unbound.conf", fmt.Sprintf(`server:
	interface: %s
	port: 53
	do-ip6: no
	access-control: 0.0.0.0/0 allow
	username: ""
	chroot: ""
	directory: "%[2]s"
	pidfile: ""
	use-syslog: no
	logfile: ""
	verbosity: 0
	num-threads: 1
	module-config: "iterator"
	msg-cache-size: 64m
	rrset-cache-size: 128m
remote-control:
	control-enable: no
forward-zone:
	name: "."
	forward-addr: %[3]s
`, cachingDNS, dir, upstreamDNS))
	if !strings.Contains(l.in(l.Inet, "ip -4 addr show dev lo"), cachingDNS+"/") {
		l.in(l.Inet, "ip addr add "+cachingDNS+"/32 dev lo")
	}
	p := l.startIn(l.Inet, "unbound", "unbound", "-d", "-c", conf)
	l.waitFor("unbound", 10*time.Second, func() error {
		if err := p.exited(); err != nil {
			t.Fatal(err)
		}
		r, err := query(l.Inet, cachingDNS+":53", "probe."+benchZone, dns.TypeA, "udp")
		if err == nil && r.Rcode != dns.RcodeNameError {
			err = fmt.Errorf("unexpected answer: %v", r)
		}
		return err
	})
	return p.cmd.Process.Pid, p.stop
}

// stubRuleset makes each of dnsperf's queries a new flow from one client
// address with a new source port, as real stubs (glibc, systemd-resolved)
// send them. nft cannot write a counter into a port, so it takes two steps
// in the container: before conntrack, the query's source address becomes
// the next of 60 000 (10.0.0.0/16, local in the container), which makes it
// a new flow of the container's conntrack; that flow is then masqueraded
// to the container's address with a random port (fully-random). The
// answer finds its way back to dnsperf's socket through the same entry.
// The host sees the container's address and a new port per query; with
// the UDP conntrack timeouts at 1 s nearly every query is a new flow there
// too (a new conntrack entry and, through a proxy, a new NAT binding).
const stubRuleset = `table ip stub {
	chain out {
		type filter hook output priority raw;
		udp dport 53 ip saddr set numgen inc mod 60000 offset 167772160
	}
	chain post {
		type nat hook postrouting priority srcnat;
		ip saddr 10.0.0.0/16 udp dport 53 snat to ` + ctrIP + ` fully-random
	}
}
`

// stubSources prepares the lab for the stub condition; dnsperf switches
// stubRuleset on while it runs (benchRun.dnsperf).
func stubSources(t *testing.T, l *Lab) (int, func()) {
	bridgeNF(false)(t, l)
	loadModule(t, "nf_conntrack", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout")
	l.writeConfig("stub.nft", stubRuleset)
	l.in(l.Ctr, "ip route add local 10.0.0.0/16 dev lo")
	const sysctl = "net.netfilter.nf_conntrack_udp_timeout"
	var undo []func()
	for _, ns := range []string{l.Ctr, l.Host} {
		timeout := strings.TrimSpace(l.in(ns, "sysctl -n "+sysctl))
		l.in(ns, "sysctl -qw "+sysctl+"=1")
		undo = append(undo, func() { l.in(ns, "sysctl -qw "+sysctl+"="+timeout) })
	}
	return 0, func() {
		for _, u := range undo {
			u()
		}
		l.in(l.Ctr, "ip route del local 10.0.0.0/16 dev lo")
	}
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

// procStatusKB returns a kB field of /proc/PID/status, such as VmHWM (peak
// RSS) or RssAnon.
func procStatusKB(t *testing.T, pid int, field string) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(field + `:\s+(\d+) kB`).FindSubmatch(data)
	if m == nil {
		return 0
	}
	kb, _ := strconv.Atoi(string(m[1]))
	return kb
}

func formatBench(p benchParams, conditions []benchCondition, rows []benchRow, tail string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "DNS load benchmark: %d warm names for %v, %d fresh names, %d outstanding queries from 4 client sockets "+
		"(dnsperf -c 4 -T 2), %d resolve-to-connect samples; every system in every condition, %d round(s), interleaved\n\n",
		p.warm, p.duration, p.fresh, p.outstanding, p.connects, p.rounds)
	for _, c := range conditions {
		fmt.Fprintf(&b, "- **%s**: %s\n", c.name, c.what)
	}
	// direct's row of the same condition and round.
	direct := func(r benchRow) *benchRow {
		for i := range rows {
			if d := &rows[i]; d.system == "direct" && d.condition == r.condition && d.round == r.round {
				return d
			}
		}
		return nil
	}
	vs := func(v func(benchRow) float64, r benchRow) string {
		d := direct(r)
		if d == nil || v(*d) == 0 {
			return "–"
		}
		return fmt.Sprintf("%.0f%%", 100*v(r)/v(*d))
	}
	b.WriteString("\n| condition | system | round | warm q/s | vs direct | avg ms | p99 ms | lost | CPU ms per 1000 | fresh q/s | vs direct | avg ms | p99 ms | lost | CPU ms per 1000 | connect p50 ms | p99 ms | failed |\n")
	b.WriteString("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	sorted := slices.Clone(rows)
	slices.SortStableFunc(sorted, func(a, b benchRow) int {
		return slices.Index(conditionNames(), a.condition) - slices.Index(conditionNames(), b.condition)
	})
	for _, r := range sorted {
		fmt.Fprintf(&b, "| %s | %s | %d | %.0f | %s | %.3f | %.3f | %d | %.1f | %.0f | %s | %.3f | %.3f | %d | %.1f | %.3f | %.3f | %d |\n",
			r.condition, r.system, r.round, r.warmQPS, vs(func(r benchRow) float64 { return r.warmQPS }, r), r.warmAvg, r.warmP99, r.warmLost, r.warmCPU,
			r.freshQPS, vs(func(r benchRow) float64 { return r.freshQPS }, r), r.freshAvg, r.freshP99, r.freshLost, r.freshCPU,
			r.connectP50, r.connectP99, r.connectFail)
	}
	b.WriteString("\n*CPU ms per 1000*: CPU time (utime+stime, all threads, from /proc/PID/stat) of the answering " +
		"process and its children over the warm (fresh) run, per 1000 answers: for direct the upstream (NSD's main, xfrd and " +
		"server processes; unbound), for dnsmasq and egressd the proxy. Not counted: dnsperf, and kernel work that softirqs " +
		"charge to whichever process runs (packets forwarded, NAT, the firewall).\n")

	// The targets, per condition, over the rounds: egressd's warm q/s
	// against direct's and tuned dnsmasq's, its warm p99 against direct's,
	// its fresh q/s against direct's.
	sum := func(c, system string, v func(benchRow) float64) (total float64, n int) {
		for _, r := range rows {
			if r.condition == c && r.system == system {
				total, n = total+v(r), n+1
			}
		}
		return total, n
	}
	ratio := func(c, a, over string, v func(benchRow) float64) string {
		x, n := sum(c, a, v)
		y, m := sum(c, over, v)
		if n == 0 || m == 0 || y == 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f", (x/float64(n))/(y/float64(m)))
	}
	warmQPS := func(r benchRow) float64 { return r.warmQPS }
	b.WriteString("\negressd against the others, means over the rounds (targets: warm ≥ 0.9× direct and ≥ 1× tuned dnsmasq, " +
		"warm p99 ≤ 2× direct's, fresh ≥ 0.5× direct):\n\n")
	b.WriteString("| condition | warm vs direct | warm vs dnsmasq --cache-size=10000 | warm p99 vs direct's | fresh vs direct |\n|---|---:|---:|---:|---:|\n")
	for _, c := range conditions {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", c.name,
			ratio(c.name, "egressd", "direct", warmQPS),
			ratio(c.name, "egressd", "dnsmasq --cache-size=10000", warmQPS),
			ratio(c.name, "egressd", "direct", func(r benchRow) float64 { return r.warmP99 }),
			ratio(c.name, "egressd", "direct", func(r benchRow) float64 { return r.freshQPS }))
	}
	if tail != "" {
		b.WriteString("\negressd during its fresh runs, and with live elements:\n\n" + tail)
	}
	return b.String()
}
