// Package test holds egressd's end-to-end tests. Each test builds its own
// small network out of namespaces, runs a real authoritative DNS server
// (NSD) and the real egressd binary, and proves what can and cannot be
// reached with real sockets.
//
//	inet  (the internet): NSD on 198.51.100.53 and .54, TCP listeners on
//	      ports 80 and 443 for every address of 203.0.113.0/24,
//	      203.0.114.0/24, 203.0.115.0/24 and 2001:db8:100::/64
//	  |   192.0.2.0/24, 2001:db8:1::/64
//	host  egressd; bridge docker0 172.30.0.1/24, fd00:30::1/64
//	  |
//	ctr   (a container) 172.30.0.2, fd00:30::2, default route via the bridge
package test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// Addresses of the lab.
const (
	upstreamDNS = "198.51.100.53"
	otherDNS    = "198.51.100.54" // "another resolver" a container might ask
	hostUplink  = "192.0.2.1"
	bridgeIP    = "172.30.0.1"
	ctrIP       = "172.30.0.2"
	proxyPort   = 10053
)

var egressdBin string

// labEnv is in the environment of every egressd the lab runs: the lab's
// "internet" uses documentation and benchmarking addresses, which the
// rebinding guard removes from answers unless they are exempted.
var labEnv = []string{"EGRESSD_DNS_REBINDING_EXEMPT=192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,198.18.0.0/15,2001:db8::/32"}

func TestMain(m *testing.M) {
	code := func() int {
		if reason := labUnavailable(); reason != "" {
			if os.Getenv("CI") == "true" {
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
	l.in(inet, "ip addr add 192.0.2.2/24 dev up0")
	l.in(inet, "ip addr add 2001:db8:1::2/64 dev up0 nodad")
	l.in(inet, "ip addr add 198.51.100.53/32 dev lo")
	l.in(inet, "ip addr add 198.51.100.54/32 dev lo")
	l.in(inet, "ip addr add 2001:db8:53::53/128 dev lo")
	for _, p := range []string{"203.0.113.0/24", "203.0.114.0/24", "203.0.115.0/24"} {
		l.in(inet, "ip route add local "+p+" dev lo")
	}
	l.in(inet, "ip route add local 198.18.0.0/15 dev lo")
	l.in(inet, "ip -6 route add local 2001:db8:100::/64 dev lo")
	l.in(inet, "ip route add 172.30.0.0/24 via 192.0.2.1")
	l.in(inet, "ip -6 route add fd00:30::/64 via 2001:db8:1::1")
	// host
	l.in(host, "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
	l.in(host, "ip link set up0 up")
	l.in(host, "ip addr add 192.0.2.1/24 dev up0")
	l.in(host, "ip addr add 2001:db8:1::1/64 dev up0 nodad")
	l.in(host, "ip route add default via 192.0.2.2")
	l.in(host, "ip -6 route add default via 2001:db8:1::2")
	l.in(host, "ip link add docker0 type bridge")
	l.in(host, "ip link set docker0 up")
	l.in(host, "ip link set veth0 master docker0 up")
	l.in(host, "ip addr add 172.30.0.1/24 dev docker0")
	l.in(host, "ip addr add fd00:30::1/64 dev docker0 nodad")
	// container
	l.in(ctr, "ip link set eth0 up")
	l.in(ctr, "ip addr add 172.30.0.2/24 dev eth0")
	l.in(ctr, "ip addr add fd00:30::2/64 dev eth0 nodad")
	l.in(ctr, "ip route add default via 172.30.0.1")
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
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Net: network, Timeout: 3 * time.Second}
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

// writeConfig writes an egressd config for the lab, with extra YAML
// appended (its top-level keys must not repeat the ones below).
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

// egressd runs the binary in the host namespace and returns its combined
// output and error.
func (l *Lab) runEgressd(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.Host, egressdBin}, args...)...)
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
	bin := egressdBin
	if l.bin != "" {
		bin = l.bin
	}
	args := []string{"netns", "exec", l.Host, bin, "run"}
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

// signalDaemon sends sig to egressd and, for terminating signals, waits
// for it to exit.
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

func (l *Lab) startNSD(zones map[string]string) {
	l.t.Helper()
	dir := filepath.Join(l.Dir, "nsd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		l.t.Fatal(err)
	}
	var conf strings.Builder
	fmt.Fprintf(&conf, `server:
	ip-address: 198.51.100.53
	ip-address: 198.51.100.54
	ip-address: 2001:db8:53::53
	port: 53
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
		head := fmt.Sprintf("$ORIGIN %s.\n$TTL 300\n@ SOA ns.%[1]s. admin.%[1]s. 1 3600 600 86400 60\n@ NS ns.%[1]s.\nns A 198.51.100.53\n", zone)
		if err := os.WriteFile(filepath.Join(dir, file), []byte(head+body), 0o644); err != nil {
			l.t.Fatal(err)
		}
		fmt.Fprintf(&conf, "zone:\n\tname: %s\n\tzonefile: %s\n", zone, file)
	}
	cp := filepath.Join(dir, "nsd.conf")
	if err := os.WriteFile(cp, []byte(conf.String()), 0o644); err != nil {
		l.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", l.Inet, "nsd", "-d", "-c", cp)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	var once sync.Once
	l.stopNSD = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			<-done
		})
	}
	l.t.Cleanup(l.stopNSD)
	l.waitFor("NSD", 60*time.Second, func() error {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "nsd.log"))
			l.t.Fatalf("nsd exited: %s\n%s", out.String(), log)
		default:
		}
		r, err := query(l.Inet, upstreamDNS+":53", "westus.api.cognitive.microsoft.com", dns.TypeA, "udp")
		if err == nil && len(r.Answer) == 0 {
			err = fmt.Errorf("no answer: %v", r)
		}
		return err
	})
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
