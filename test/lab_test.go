// Package test holds egressd's end-to-end tests. Each test builds its own
// small network out of namespaces, runs a real authoritative DNS server
// (NSD) and the real egressd binary, and proves what can and cannot be
// reached with real sockets.
//
//	inet  (the internet): NSD on 198.51.100.53, .54 and 2001:db8:53::53,
//	      TCP listeners on ports 80, 443 and 853 (IPv4 only) for every
//	      address of 203.0.113.0/24, 203.0.114.0/24, 203.0.115.0/24,
//	      198.18.0.0/15 and 2001:db8:100::/64
//	  |   192.0.2.0/24, 2001:db8:1::/64 (host 192.0.2.1, inet .2)
//	host  egressd; bridge docker0 172.30.0.1/24, fd00:30::1/64
//	  |
//	ctr   (a container) 172.30.0.2, fd00:30::2, default route via the bridge
package test

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/rules"
)

// Addresses of the lab.
const (
	upstreamDNS = "198.51.100.53"
	otherDNS    = "198.51.100.54" // "another resolver" a container might ask
	hostUplink  = "192.0.2.1"
	inetUplink  = "192.0.2.2"
	bridgeIP    = "172.30.0.1"
	ctrIP       = "172.30.0.2"
	ctrNet      = "172.30.0.0/24"
	proxyPort   = 10053
)

// underCI reports whether the tests run under CI (CI=true), where every
// test must run: what a test needs and lacks is a failure there, not a
// reason to skip.
func underCI() bool { return os.Getenv("CI") == "true" }

// need skips t for the reason format says, or fails it under CI.
func need(t testing.TB, format string, args ...any) {
	t.Helper()
	if underCI() {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

var egressdBin string

// labEnv is in the environment of every egressd the lab runs: the lab's
// "internet" uses documentation and benchmarking addresses, which the
// rebinding guard removes from answers unless they are exempted.
var labEnv = []string{"EGRESSD_DNS_REBINDING_EXEMPT=192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,198.18.0.0/15,2001:db8::/32"}

func TestMain(m *testing.M) {
	code := func() int {
		if reason := labUnavailable(); reason != "" {
			if underCI() {
				fmt.Fprintln(os.Stderr, "end-to-end tests cannot run under CI=true:", reason)
				return 1
			}
			fmt.Fprintln(os.Stderr, "skipping end-to-end tests:", reason)
			return 0
		}
		// A prebuilt binary (the kernel matrix's guests have no Go
		// toolchain cache to build with).
		if egressdBin = os.Getenv("EGRESSD_TEST_BIN"); egressdBin != "" {
			return m.Run()
		}
		dir, err := os.MkdirTemp("", "egressd-e2e-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		egressdBin = filepath.Join(dir, "egressd")
		// With the race detector, so every end-to-end test also checks
		// egressd's own concurrency.
		out, err := exec.Command("go", "build", "-race", "-o", egressdBin, "../cmd/egressd").CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build egressd: %v\n%s", err, out)
			return 1
		}
		return m.Run()
	}()
	removeCoreDNS()
	os.Exit(code)
}

func labUnavailable() string {
	if os.Geteuid() != 0 {
		return "they need root (network namespaces and nftables)"
	}
	for _, tool := range []string{"ip", "nft", "nsd", "sysctl"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " is not installed (apt-get install iproute2 nftables nsd procps)"
		}
	}
	return ""
}

var labSeq atomic.Int32

// Lab is one test network.
type Lab struct {
	t               *testing.T
	Inet, Host, Ctr string // namespace names
	Dir             string
	egressd         *exec.Cmd
	egressdLog      *syncBuffer
	egressdDone     chan error
	stopNSD         func()
	bin             string   // egressd binary to run; default egressdBin
	env             []string // for every egressd started
}

// newLab builds the network and starts NSD; it is torn down when the test
// ends, whatever happened.
func newLab(t *testing.T, extraZones ...map[string]string) *Lab {
	t.Helper()
	id := fmt.Sprintf("eg%d-%d", os.Getpid()%100000, labSeq.Add(1))
	l := &Lab{t: t, Inet: id + "-inet", Host: id + "-host", Ctr: id + "-ctr", Dir: t.TempDir()}
	t.Cleanup(l.close)
	for _, ns := range []string{l.Inet, l.Host, l.Ctr} {
		l.sh("ip netns add " + ns)
		// No duplicate address detection: it keeps link-local addresses
		// tentative for a second or two, stalling the first IPv6 packets.
		l.in(ns, "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
		l.in(ns, "ip link set lo up")
	}
	inet, host, ctr := l.Inet, l.Host, l.Ctr
	l.sh("ip link add up0 netns " + host + " type veth peer name up0 netns " + inet)
	l.sh("ip link add eth0 netns " + ctr + " type veth peer name veth0 netns " + host)
	// internet side
	l.in(inet, "ip link set up0 up")
	l.in(inet, "ip addr add "+inetUplink+"/24 dev up0")
	l.in(inet, "ip addr add 2001:db8:1::2/64 dev up0 nodad")
	l.in(inet, "ip addr add "+upstreamDNS+"/32 dev lo")
	l.in(inet, "ip addr add "+otherDNS+"/32 dev lo")
	l.in(inet, "ip addr add 2001:db8:53::53/128 dev lo")
	for _, p := range []string{"203.0.113.0/24", "203.0.114.0/24", "203.0.115.0/24"} {
		l.in(inet, "ip route add local "+p+" dev lo")
	}
	l.in(inet, "ip route add local 198.18.0.0/15 dev lo")
	l.in(inet, "ip -6 route add local 2001:db8:100::/64 dev lo")
	l.in(inet, "ip route add "+ctrNet+" via "+hostUplink)
	l.in(inet, "ip -6 route add fd00:30::/64 via 2001:db8:1::1")
	// host
	l.in(host, "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
	l.in(host, "ip link set up0 up")
	l.in(host, "ip addr add "+hostUplink+"/24 dev up0")
	l.in(host, "ip addr add 2001:db8:1::1/64 dev up0 nodad")
	l.in(host, "ip route add default via "+inetUplink)
	l.in(host, "ip -6 route add default via 2001:db8:1::2")
	l.in(host, "ip link add docker0 type bridge")
	l.in(host, "ip link set docker0 up")
	l.in(host, "ip link set veth0 master docker0 up")
	l.in(host, "ip addr add "+bridgeIP+"/24 dev docker0")
	l.in(host, "ip addr add fd00:30::1/64 dev docker0 nodad")
	// container
	l.in(ctr, "ip link set eth0 up")
	l.in(ctr, "ip addr add "+ctrIP+"/24 dev eth0")
	l.in(ctr, "ip addr add fd00:30::2/64 dev eth0 nodad")
	l.in(ctr, "ip route add default via "+bridgeIP)
	l.in(ctr, "ip -6 route add default via fd00:30::1")

	for _, a := range []string{"0.0.0.0:443", "0.0.0.0:80", "0.0.0.0:853", "[::]:443", "[::]:80"} {
		l.listen(inet, a)
	}
	zones := labZones()
	for _, z := range extraZones {
		for name, body := range z {
			zones[name] = body
		}
	}
	l.startNSD(zones)
	return l
}

func (l *Lab) close() {
	if l.egressd != nil && l.egressd.ProcessState == nil {
		_ = l.egressd.Process.Kill()
		<-l.egressdDone
	}
	// egressd is built with the race detector; a race is a failure.
	if l.egressdLog != nil && strings.Contains(l.egressdLog.String(), "DATA RACE") {
		l.t.Errorf("egressd reported a data race")
	}
	if l.t.Failed() && l.egressdLog != nil {
		l.t.Logf("egressd log:\n%s", l.egressdLog)
	}
	for _, ns := range []string{l.Ctr, l.Host, l.Inet} {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

// addContainer adds a second container namespace on the lab's bridge.
func (l *Lab) addContainer(name, ip string) string {
	l.t.Helper()
	ns := l.Ctr + "-" + name
	l.sh("ip netns add " + ns)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	l.in(ns, "ip link set lo up")
	l.sh("ip link add eth0 netns " + ns + " type veth peer name veth" + name + " netns " + l.Host)
	l.in(l.Host, "ip link set veth"+name+" master docker0 up")
	l.in(ns, "ip link set eth0 up")
	l.in(ns, "ip addr add "+ip+"/24 dev eth0")
	l.in(ns, "ip route add default via "+bridgeIP)
	return ns
}

// sh runs a command line (split on spaces) and fails the test on error.
func (l *Lab) sh(cmdline string) string {
	l.t.Helper()
	f := strings.Fields(cmdline)
	out, err := exec.Command(f[0], f[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s: %v\n%s", cmdline, err, out)
	}
	return string(out)
}

// in runs a command line inside namespace ns.
func (l *Lab) in(ns, cmdline string) string {
	l.t.Helper()
	return l.sh("ip netns exec " + ns + " " + cmdline)
}

// inNS runs f on a thread switched to namespace ns; sockets f creates
// belong to ns for their whole life.
func inNS(ns string, f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	h, err := netns.GetFromName(ns)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime discards it.
		return fmt.Errorf("restore namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// listen accepts TCP connections on addr in ns and echoes what it reads.
func (l *Lab) listen(ns, addr string) {
	l.t.Helper()
	var ln net.Listener
	err := inNS(ns, func() (err error) {
		network := "tcp4"
		if strings.HasPrefix(addr, "[") {
			network = "tcp6"
		}
		ln, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		l.t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	l.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// dial connects from ns to addr; nil means the connection was established.
func dial(ns, addr string, timeout time.Duration) error {
	var c net.Conn
	err := inNS(ns, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	if err == nil {
		c.Close()
	}
	return err
}

// query sends one DNS question from ns to server ("ip:port").
func query(ns, server, name string, qtype uint16, network string) (*dns.Msg, error) {
	return queryTimeout(ns, server, name, qtype, network, 3*time.Second)
}

// queryTimeout is query with a timeout of its own.
func queryTimeout(ns, server, name string, qtype uint16, network string, timeout time.Duration) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Net: network, Timeout: timeout}
	var conn *dns.Conn
	err := inNS(ns, func() (err error) {
		conn, err = c.Dial(server)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	r, _, err := c.ExchangeWithConn(m, conn)
	return r, err
}

// addrs returns the A/AAAA addresses of an answer.
func addrs(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch r := rr.(type) {
		case *dns.A:
			out = append(out, r.A.String())
		case *dns.AAAA:
			out = append(out, r.AAAA.String())
		}
	}
	return out
}

// writeConfig writes body as the file name in the lab's directory and
// returns its path.
func (l *Lab) writeConfig(name, body string) string {
	l.t.Helper()
	p := filepath.Join(l.Dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		l.t.Fatal(err)
	}
	return p
}

// baseConfig is the lab's config: the vendor allow-list, the lab's
// upstream, short lifetimes.
func (l *Lab) baseConfig() string {
	return fmt.Sprintf(`allow:
  domains: ["*.cognitive.microsoft.com", "*.cognitiveservices.azure.com", "translatoronprem.blob.core.windows.net"]
  names: ["translatoronprem.blob.core.windows.net"]
dns:
  upstreams: ["%s"]
  listen_port: %d
  min_ttl: 1s
  grace: 2s
firewall:
  containers: ["docker0"]
state_dir: %s
control:
  socket: %s
log:
  level: debug
`, upstreamDNS, proxyPort, filepath.Join(l.Dir, "state"), filepath.Join(l.Dir, "egressd.sock"))
}

// withHostMounts makes the lab run egressd in the test's mount namespace,
// as on a host: `ip netns exec` mounts a fresh /sys without the cgroup
// tree, where egressd finds firewall.engine_cgroups.
func (l *Lab) withHostMounts() {
	l.t.Helper()
	wrapper := filepath.Join(l.Dir, "in-host-mounts")
	if l.bin == wrapper {
		return
	}
	script := fmt.Sprintf("#!/bin/sh\nexec nsenter --mount=/proc/%d/ns/mnt -- %s \"$@\"\n", os.Getpid(), l.binary())
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		l.t.Fatal(err)
	}
	l.bin = wrapper
}

// binary is the egressd binary the lab runs: l.bin, or the one built for
// the tests.
func (l *Lab) binary() string {
	if l.bin != "" {
		return l.bin
	}
	return egressdBin
}

// runEgressd runs the binary with args in the host namespace and returns
// its combined output and error.
func (l *Lab) runEgressd(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.Host, l.binary()}, args...)...)
	cmd.Env = append(append(os.Environ(), labEnv...), l.env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// startDaemon starts `egressd run` in the host namespace and waits until
// its proxy answers. An empty cfg runs the embedded default config.
func (l *Lab) startDaemon(cfg string, env ...string) {
	l.t.Helper()
	if l.egressdLog == nil {
		l.egressdLog = &syncBuffer{}
	}
	args := []string{"netns", "exec", l.Host, l.binary(), "run"}
	if cfg != "" {
		args = append(args, "--config", cfg)
	}
	l.egressd = exec.Command("ip", args...)
	l.egressd.Env = append(append(append(os.Environ(), labEnv...), l.env...), env...)
	l.egressd.Stdout = l.egressdLog
	l.egressd.Stderr = l.egressdLog
	if err := l.egressd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.egressdDone = make(chan error, 1)
	go func() { l.egressdDone <- l.egressd.Wait() }()
	l.waitFor("egressd's proxy to answer", 10*time.Second, func() error {
		select {
		case err := <-l.egressdDone:
			l.egressdDone <- err
			return fmt.Errorf("egressd exited: %v", err)
		default:
		}
		_, err := query(l.Host, fmt.Sprintf("127.0.0.1:%d", proxyPort), "probe.cognitive.microsoft.com", dns.TypeTXT, "udp")
		return err
	})
}

// syncBuffer is a bytes.Buffer safe for a writing process and a reading
// test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// stopDaemon sends sig, a terminating signal, to egressd and returns how
// it exited; it fails the test if egressd does not stop within 10s.
func (l *Lab) stopDaemon(sig os.Signal) error {
	l.t.Helper()
	if err := l.egressd.Process.Signal(sig); err != nil {
		l.t.Fatal(err)
	}
	select {
	case err := <-l.egressdDone:
		return err
	case <-time.After(10 * time.Second):
		l.t.Fatal("egressd did not stop")
	}
	return nil
}

// waitFor calls f until it returns nil; it fails the test, naming what,
// if f still fails after timeout.
func (l *Lab) waitFor(what string, timeout time.Duration, f func() error) {
	l.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("waiting for %s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startNSD runs NSD in the inet namespace, authoritative for zones (see
// labZones), and waits until it answers.
func (l *Lab) startNSD(zones map[string]string) {
	l.t.Helper()
	files := map[string]string{}
	for zone, body := range zones {
		head := fmt.Sprintf("$ORIGIN %s.\n$TTL 300\n@ SOA ns.%[1]s. admin.%[1]s. 1 3600 600 86400 60\n@ NS ns.%[1]s.\nns A %[2]s\n", zone, upstreamDNS)
		files[zone] = head + body
	}
	l.stopNSD = l.runNSD(l.Inet, "nsd", []string{upstreamDNS, otherDNS, "2001:db8:53::53"}, files,
		"westus.api.cognitive.microsoft.com")
}

// runNSD runs NSD in ns on addrs, with its files in the lab directory's
// subdirectory dir, authoritative for zones (name -> zone file), and waits
// until it answers probe (an A record) on addrs[0]. It returns what stops
// it, which the test's cleanup also does.
func (l *Lab) runNSD(ns, dir string, addrs []string, zones map[string]string, probe string) (stop func()) {
	l.t.Helper()
	dir = filepath.Join(l.Dir, dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		l.t.Fatal(err)
	}
	var conf strings.Builder
	conf.WriteString("server:\n")
	for _, a := range addrs {
		fmt.Fprintf(&conf, "\tip-address: %s\n", a)
	}
	fmt.Fprintf(&conf, `	port: 53
	username: ""
	chroot: ""
	zonesdir: "%[1]s"
	database: ""
	zonelistfile: "%[1]s/zone.list"
	xfrdfile: "%[1]s/xfrd.state"
	pidfile: "%[1]s/nsd.pid"
	logfile: "%[1]s/nsd.log"
	server-count: 1
	verbosity: 1
	round-robin: no
remote-control:
	control-enable: no
`, dir)
	for zone, body := range zones {
		file := zone + ".zone"
		if err := os.WriteFile(filepath.Join(dir, file), []byte(body), 0o644); err != nil {
			l.t.Fatal(err)
		}
		fmt.Fprintf(&conf, "zone:\n\tname: %s\n\tzonefile: %s\n", zone, file)
	}
	cp := filepath.Join(dir, "nsd.conf")
	if err := os.WriteFile(cp, []byte(conf.String()), 0o644); err != nil {
		l.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "nsd", "-d", "-c", cp)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			<-done
		})
	}
	l.t.Cleanup(stop)
	l.waitFor("NSD in "+ns, 60*time.Second, func() error {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "nsd.log"))
			l.t.Fatalf("nsd exited: %s\n%s", out.String(), log)
		default:
		}
		r, err := query(ns, hostPort(addrs[0], 53), probe, dns.TypeA, "udp")
		if err == nil && len(r.Answer) == 0 {
			err = fmt.Errorf("no answer: %v", r)
		}
		return err
	})
	return stop
}

// labZones returns the upstream's zones: zone name -> records.
func labZones() map[string]string {
	var big, race strings.Builder
	for i := 1; i <= 60; i++ {
		fmt.Fprintf(&big, "big A 203.0.114.%d\n", i)
	}
	for i := 0; i < 250; i++ {
		fmt.Fprintf(&race, "race%d 300 A 203.0.115.%d\n", i, i+1)
	}
	return map[string]string{
		"cognitive.microsoft.com": `@ A 203.0.113.12
westus.api A 203.0.113.10
deep.a.b.c A 203.0.113.11
multi A 203.0.113.13
multi A 203.0.113.14
multi A 203.0.113.15
v6only AAAA 2001:db8:100::10
dual A 203.0.113.16
dual AAAA 2001:db8:100::16
private A 10.1.2.3
private A 203.0.113.17
loopback A 127.0.0.1
loopback6 AAAA ::1
cgnat A 100.64.1.1
ttl0 0 A 203.0.113.18
ttl2 2 A 203.0.113.19
txt TXT "hello"
https 300 HTTPS 1 . ipv4hint=203.0.113.40
` + big.String() + race.String(),
		"cognitiveservices.azure.com": "myres CNAME myres.trafficmanager.test.\nbroken CNAME gone.trafficmanager.test.\n",
		"trafficmanager.test":         "myres CNAME edge.azurefd.test.\ngone CNAME edge2.azurefd.test.\n",
		"azurefd.test":                "edge A 203.0.113.20\nedge AAAA 2001:db8:100::20\nedge2 A 203.0.113.21\n",
		"blob.core.windows.net":       "translatoronprem A 203.0.113.30\notherblob A 203.0.113.31\n",
		"example.com":                 "www A 203.0.113.50\nevil TXT \"exfiltrate\"\n",
	}
}

// answersConfig is the lab's config with *.answers.test allowed and a TTL
// cap of maxTTL.
func (l *Lab) answersConfig(maxTTL string) string {
	cfg := strings.Replace(l.baseConfig(), "domains: [", `domains: ["*.answers.test", `, 1)
	return strings.Replace(cfg, "min_ttl: 1s", "min_ttl: 1s\n  max_ttl: "+maxTTL, 1)
}

// writeState writes a state file of learned addresses: address -> names
// (comma-separated, "" for unknown) and expiry.
func (l *Lab) writeState(entries [][3]string) {
	l.t.Helper()
	var b strings.Builder
	b.WriteString("egressd-learned 1\n")
	for _, e := range entries {
		fmt.Fprintf(&b, "%s\t%s\t%s\n", e[0], e[1], e[2])
	}
	fmt.Fprintf(&b, "end %d\n", len(entries))
	dir := filepath.Join(l.Dir, "state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		l.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "learned.tsv"), []byte(b.String()), 0o600); err != nil {
		l.t.Fatal(err)
	}
}

func (l *Lab) mustReach(ns, addr string) {
	l.t.Helper()
	if err := dial(ns, addr, shortWait); err != nil {
		l.t.Errorf("%s -> %s: want connected, got %v", nsRole(l, ns), addr, err)
	}
}

func (l *Lab) mustNotReach(ns, addr string) {
	l.t.Helper()
	if err := dial(ns, addr, shortWait); err == nil {
		l.t.Errorf("%s -> %s: connected, want blocked", nsRole(l, ns), addr)
	}
}

// listing returns `nft list table inet egressd` without the volatile
// "timeout" and "expires" of learned elements: they count down. A table
// that is missing (a test removed it; egressd puts it back) is no
// failure: the listing then says so, and differs from any ruleset.
func (l *Lab) listing() string {
	l.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", l.Host, "nft", "list", "table", "inet", "egressd").CombinedOutput()
	if err != nil {
		return fmt.Sprintf("nft list table inet egressd: %v: %s", err, out)
	}
	return withoutExpiry(string(out))
}

// ruleset returns `nft list ruleset` of the host without element timeouts.
func (l *Lab) ruleset() string {
	l.t.Helper()
	return withoutExpiry(l.in(l.Host, "nft list ruleset"))
}

func (l *Lab) dnsperf(server string, names []string, runs int, duration time.Duration, outstanding int) dnsperfResult {
	l.t.Helper()
	data := filepath.Join(l.Dir, "queries.txt")
	var b strings.Builder
	for _, n := range names {
		b.WriteString(n + " A\n")
	}
	if err := os.WriteFile(data, []byte(b.String()), 0o644); err != nil {
		l.t.Fatal(err)
	}
	args := []string{"netns", "exec", l.Ctr, "dnsperf", "-s", server, "-d", data, "-q", strconv.Itoa(outstanding), "-c", "4", "-T", "2", "-t", "2", "-v"}
	if runs > 0 {
		args = append(args, "-n", strconv.Itoa(runs))
	}
	if duration > 0 {
		args = append(args, "-l", fmt.Sprintf("%.0f", duration.Seconds()))
	}
	out, err := exec.Command("ip", args...).Output()
	if err != nil {
		l.t.Fatalf("dnsperf: %v\n%s", err, out)
	}
	var r dnsperfResult
	var lat []float64
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 5 && f[0] == ">":
			if v, err := strconv.ParseFloat(f[4], 64); err == nil {
				lat = append(lat, v*1000)
			}
		case strings.HasPrefix(sc.Text(), "  Queries sent:"):
			r.sent, _ = strconv.Atoi(f[2])
		case strings.HasPrefix(sc.Text(), "  Queries lost:"):
			r.lost, _ = strconv.Atoi(f[2])
		case strings.HasPrefix(sc.Text(), "  Queries per second:"):
			r.qps, _ = strconv.ParseFloat(f[3], 64)
		case strings.HasPrefix(sc.Text(), "  Average Latency (s):"):
			v, _ := strconv.ParseFloat(f[3], 64)
			r.avgMs = v * 1000
		}
	}
	r.p99Ms = percentile(lat, 0.99)
	return r
}

// resolveToConnect measures, for fresh names, the time from sending the
// query to an established TCP connection on 443.
func (l *Lab) resolveToConnect(server string, names []string) (p50, p99 float64, fails int) {
	var ms []float64
	for _, n := range names {
		start := time.Now()
		r, err := query(l.Ctr, server, n, dns.TypeA, "udp")
		if err == nil && len(addrs(r)) == 0 {
			err = fmt.Errorf("no address: %v", r)
		}
		if err == nil {
			err = dial(l.Ctr, hostPort(addrs(r)[0], 443), time.Second)
		}
		if err != nil {
			l.t.Logf("resolve-to-connect %s: %v", n, err)
			fails++
			continue
		}
		ms = append(ms, float64(time.Since(start).Microseconds())/1000)
	}
	return percentile(ms, 0.5), percentile(ms, 0.99), fails
}

// addCalicoPod adds the pod's namespace and returns its name.
func (l *Lab) addCalicoPod() string {
	l.t.Helper()
	pod := strings.TrimSuffix(l.Ctr, "-ctr") + "-pod"
	l.sh("ip netns add " + pod)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", pod).Run() })
	l.in(pod, "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
	l.in(pod, "ip link set lo up")
	l.sh("ip link add eth0 netns " + pod + " type veth peer name cali1234 netns " + l.Host)
	// host end: Calico's fixed MAC, no address but the kernel's link-local
	l.in(l.Host, "ip link set cali1234 address ee:ee:ee:ee:ee:ee")
	l.in(l.Host, "sysctl -qw net.ipv4.conf.cali1234.proxy_arp=1 net.ipv6.conf.cali1234.accept_dad=0")
	l.in(l.Host, "ip link set cali1234 up")
	l.in(l.Host, "ip route add "+calicoPodIP+"/32 dev cali1234")
	l.in(l.Host, "ip -6 route add "+calicoPodIP6+"/128 dev cali1234")
	// pod
	l.in(pod, "ip link set eth0 up")
	l.in(pod, "ip addr add "+calicoPodIP+"/32 dev eth0")
	l.in(pod, "ip addr add "+calicoPodIP6+"/128 dev eth0 nodad")
	l.in(pod, "ip route add 169.254.1.1 dev eth0 scope link")
	l.in(pod, "ip route add default via 169.254.1.1 dev eth0 onlink")
	l.in(pod, "ip -6 route add default via fe80::ecee:eeff:feee:eeee dev eth0")
	// the internet routes the pod range back to the host
	l.in(l.Inet, "ip route add 10.244.0.0/16 via "+hostUplink)
	l.in(l.Inet, "ip -6 route add fd00:244::/64 via 2001:db8:1::1")
	if out := l.in(l.Host, "ip -4 addr show dev cali1234"); strings.Contains(out, "inet ") {
		l.t.Fatalf("cali1234 has an IPv4 address:\n%s", out)
	}
	return pod
}

// calicoConfig is the lab's config filtering cali* as well.
func (l *Lab) calicoConfig() string {
	return l.writeConfig("calico.yaml", strings.Replace(l.baseConfig(),
		`containers: ["docker0"]`, `containers: ["docker0", "cali*"]`, 1))
}

func (l *Lab) mustResolve(ns, name string, qtype uint16, want string) {
	l.t.Helper()
	r := l.resolve(ns, name, qtype)
	if got := addrs(r); len(got) == 0 || got[len(got)-1] != want {
		l.t.Fatalf("%s %s: %v, want %s", name, dns.TypeToString[qtype], got, want)
	}
}

func (l *Lab) stateHas(addr string) error {
	data, err := os.ReadFile(filepath.Join(l.Dir, "state", "learned.tsv"))
	if err != nil {
		return err
	}
	if !strings.Contains(string(data), "\t"+addr+"\t") { // RULE<TAB>ADDRESS<TAB>...
		return os.ErrNotExist
	}
	return nil
}

// kernelExpires returns how long the kernel still holds addr in its set
// (zero if not at all).
func (l *Lab) kernelExpires(addr string) time.Duration {
	l.t.Helper()
	out := l.in(l.Host, "nft list set inet egressd "+rules.LearnedSet(config.RuleAllow, netip.MustParseAddr(addr)))
	m := regexp.MustCompile(regexp.QuoteMeta(addr) + ` timeout \S+ expires ([0-9dhms]+)`).FindStringSubmatch(out)
	if m == nil {
		return 0
	}
	// nft counts days too, which Go's durations do not.
	var days time.Duration
	if ds, rest, ok := strings.Cut(m[1], "d"); ok {
		n, err := strconv.Atoi(ds)
		if err != nil {
			l.t.Fatalf("nft expires %q: %v", m[1], err)
		}
		days, m[1] = time.Duration(n)*24*time.Hour, cmp.Or(rest, "0s")
	}
	d, err := time.ParseDuration(m[1])
	d += days
	if err != nil {
		l.t.Fatalf("nft expires %q: %v", m[1], err)
	}
	return d
}

// listedExpires returns how long `egressd list` says addr stays open.
func (l *Lab) listedExpires(cfg, addr string) time.Duration {
	l.t.Helper()
	var entries []struct {
		Addr      string `json:"addr"`
		ExpiresIn string `json:"expires_in"`
	}
	l.egressdJSON(&entries, "list", "--config", cfg)
	for _, e := range entries {
		if e.Addr == addr {
			d, err := time.ParseDuration(e.ExpiresIn)
			if err != nil {
				l.t.Fatalf("expires_in %q: %v", e.ExpiresIn, err)
			}
			return d
		}
	}
	return 0
}

// checkKernelHolds fails if the kernel lets addr expire before egressd
// says it does.
func (l *Lab) checkKernelHolds(cfg, addr string) {
	l.t.Helper()
	// The kernel first: egressd list takes a moment, which can only make
	// its answer smaller.
	kernel := l.kernelExpires(addr)
	listed := l.listedExpires(cfg, addr)
	if kernel < listed-time.Second {
		l.t.Errorf("%s: the kernel expires it in %v, egressd list says %v", addr, kernel, listed)
	}
}

// replaceRule replaces, in place (same handle), the rule of chain that
// reads from with to, as another process with CAP_NET_ADMIN could.
func (l *Lab) replaceRule(chain, from, to string) {
	l.t.Helper()
	out := l.in(l.Host, "nft -a list chain inet egressd "+chain)
	m := regexp.MustCompile(regexp.QuoteMeta(from) + ` # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		l.t.Fatalf("chain %s has no rule %q:\n%s", chain, from, out)
	}
	l.in(l.Host, fmt.Sprintf("nft replace rule inet egressd %s handle %s %s", chain, m[1], to))
}

// waitLog waits until egressd logged a line containing every one of parts.
func (l *Lab) waitLog(parts ...string) string {
	l.t.Helper()
	var found string
	l.waitFor(fmt.Sprintf("a log line with %q", parts), 5*time.Second, func() error {
	lines:
		for _, line := range strings.Split(l.egressdLog.String(), "\n") {
			for _, p := range parts {
				if !strings.Contains(line, p) {
					continue lines
				}
			}
			found = line
			return nil
		}
		return os.ErrNotExist
	})
	return found
}

func (l *Lab) egressdJSON(v any, args ...string) {
	l.t.Helper()
	out, err := l.runEgressd(append(args, "--json")...)
	if err != nil {
		l.t.Fatalf("egressd %v: %v\n%s", args, err, out)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		l.t.Fatalf("egressd %v: %v\n%s", args, err, out)
	}
}

// resolve asks name from ns through "another resolver" (any port-53
// traffic is redirected to egressd) and returns the answer.
func (l *Lab) resolve(ns, name string, qtype uint16) *dns.Msg {
	l.t.Helper()
	r, err := query(ns, otherDNS+":53", name, qtype, "udp")
	if err != nil {
		l.t.Fatalf("%s: query %s %s: %v", nsRole(l, ns), name, dns.TypeToString[qtype], err)
	}
	return r
}

func (l *Lab) inSet(addr string) bool {
	l.t.Helper()
	out := l.in(l.Host, "nft list set inet egressd "+rules.LearnedSet(config.RuleAllow, netip.MustParseAddr(addr)))
	return strings.Contains(out, " "+addr+" ") || strings.Contains(out, "{ "+addr) || strings.Contains(out, ", "+addr)
}

// noResolverConfig is the lab's config on a host whose resolv.conf names
// only systemd-resolved's stub and whose resolved list does not exist yet:
// early boot, before DHCP.
func (l *Lab) noResolverConfig() (cfg, resolvedList string) {
	stub := filepath.Join(l.Dir, "resolv.conf")
	resolvedList = filepath.Join(l.Dir, "resolved.conf")
	if err := os.WriteFile(stub, []byte("nameserver 127.0.0.53\noptions edns0\n"), 0o644); err != nil {
		l.t.Fatal(err)
	}
	body := strings.Replace(l.baseConfig(), fmt.Sprintf("  upstreams: [\"%s\"]\n", upstreamDNS),
		fmt.Sprintf("  resolv_conf: [%q, %q]\n", stub, resolvedList), 1)
	return l.writeConfig("noresolver.yaml", body), resolvedList
}

// addPodman adds a bridge podman0 (10.88.0.1/24) to the host with a second
// container namespace behind it, as Podman does; it returns that
// namespace.
func (l *Lab) addPodman() string {
	l.t.Helper()
	ns := l.Ctr + "p"
	l.sh("ip netns add " + ns)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	l.in(ns, "ip link set lo up")
	l.sh("ip link add eth0 netns " + ns + " type veth peer name vethp0 netns " + l.Host)
	l.in(l.Host, "ip link add podman0 type bridge")
	l.in(l.Host, "ip link set podman0 up")
	l.in(l.Host, "ip link set vethp0 master podman0 up")
	l.in(l.Host, "ip addr add 10.88.0.1/24 dev podman0")
	l.in(ns, "ip link set eth0 up")
	l.in(ns, "ip addr add 10.88.0.2/24 dev eth0")
	l.in(ns, "ip route add default via 10.88.0.1")
	l.in(l.Inet, "ip route add 10.88.0.0/24 via "+hostUplink)
	return ns
}
