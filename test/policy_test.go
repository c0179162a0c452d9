package test

// End-to-end tests of policy rules (allow.rules): each rule applies to its
// own clients (a container bridge, a source prefix, a host service's
// cgroup), answers its names to them only, and opens the answered
// addresses, on its own ports, to them only.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The second container network of the policy tests: bridge br-b with
// container B behind it.
const (
	brB       = "br-b"
	brBIP     = "10.77.0.1"
	ctrBIP    = "10.77.0.2"
	ctrBNet   = "10.77.0.0/24"
	ntpZone   = "ntp.test"
	ntpName   = "time.ntp.test"
	ntpAddr   = "203.0.113.60"
	udpProbe  = "egressd-policy"
	helperEnv = "EGRESSD_POLICY_HELPER_STEPS"
)

// policyZones are the extra zones of the policy tests: an NTP server.
func policyZones() map[string]string {
	return map[string]string{ntpZone: "time A " + ntpAddr + "\n"}
}

// addBridgeContainer adds a bridge to the host with one container
// namespace behind it (address ip in cidr, gateway gw) and the internet's
// route back; it returns the namespace.
func (l *Lab) addBridgeContainer(bridge, gw, ip, cidr string) string {
	l.t.Helper()
	ns := l.Ctr + "-" + bridge
	l.sh("ip netns add " + ns)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	l.in(ns, "ip link set lo up")
	veth := "v" + bridge
	l.sh("ip link add eth0 netns " + ns + " type veth peer name " + veth + " netns " + l.Host)
	l.in(l.Host, "ip link add "+bridge+" type bridge")
	l.in(l.Host, "ip link set "+bridge+" up")
	l.in(l.Host, "ip link set "+veth+" master "+bridge+" up")
	bits := strings.SplitN(cidr, "/", 2)[1]
	l.in(l.Host, "ip addr add "+gw+"/"+bits+" dev "+bridge)
	l.in(ns, "ip link set eth0 up")
	l.in(ns, "ip addr add "+ip+"/"+bits+" dev eth0")
	l.in(ns, "ip route add default via "+gw)
	l.in(l.Inet, "ip route add "+cidr+" via "+hostUplink)
	return ns
}

// udpEchoed sends a datagram to addr from the process's own namespace
// and waits for its echo; nil means it came back.
func udpEchoed(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("udp4", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	return udpExchange(c, timeout)
}

func udpExchange(c net.Conn, timeout time.Duration) error {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := c.Write([]byte(udpProbe)); err != nil {
		return err
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != udpProbe {
		return fmt.Errorf("echo %q", buf[:n])
	}
	return nil
}

// policyConfig is the lab's config without the flat allow-list: only
// rules (YAML list items, indented by four), with the host filtered or
// not.
func (l *Lab) policyConfig(host bool, rules string) string {
	return fmt.Sprintf(`allow:
  rules:
%s
dns:
  upstreams: ["%s"]
  listen_port: %d
  min_ttl: 1s
  grace: 2s
firewall:
  host: %t
  containers: ["docker0", "br-*"]
state_dir: %s
control:
  socket: %s
log:
  level: debug
`, strings.TrimRight(rules, "\n"), upstreamDNS, proxyPort, host, filepath.Join(l.Dir, "state"), filepath.Join(l.Dir, "egressd.sock"))
}

// waitListing waits until egressd's table holds every one of wants.
// egressd adds the host services' cgroup matches and DNS redirects only
// when it first rechecks the links, a moment after its proxy answers, and
// an nft listing taken while it reinstalls its table may come out empty.
func (l *Lab) waitListing(wants ...string) {
	l.t.Helper()
	l.waitFor("egressd's table with "+strings.Join(wants, ", "), 5*time.Second, func() error {
		listing := l.listing()
		for _, want := range wants {
			if !strings.Contains(listing, want) {
				return fmt.Errorf("no %q in:\n%s", want, listing)
			}
		}
		return nil
	})
}

// setHas reports whether the nft set of egressd's table holds addr.
func (l *Lab) setHas(set, addr string) bool {
	l.t.Helper()
	out := l.in(l.Host, "nft list set inet egressd "+set)
	_, elems, _ := strings.Cut(out, "elements = {")
	elems, _, _ = strings.Cut(elems, "}")
	for _, e := range strings.Split(elems, ",") {
		if f := strings.Fields(e); len(f) > 0 && f[0] == addr {
			return true
		}
	}
	return false
}

// onlyIn fails unless addr is in set want and in none of others.
func (l *Lab) onlyIn(addr, want string, others ...string) {
	l.t.Helper()
	if !l.setHas(want, addr) {
		l.t.Errorf("%s is not in set %s:\n%s", addr, want, l.in(l.Host, "nft list set inet egressd "+want))
	}
	for _, o := range others {
		if l.setHas(o, addr) {
			l.t.Errorf("%s is in set %s, want only in %s", addr, o, want)
		}
	}
}

// wantAnswer fails unless ns gets NOERROR and exactly addr for name.
func (l *Lab) wantAnswer(ns, who, name, addr string) {
	l.t.Helper()
	r := l.resolve(ns, name, dns.TypeA)
	if got := addrs(r); r.Rcode != dns.RcodeSuccess || !slices.Equal(got, []string{addr}) {
		l.t.Errorf("%s: %s A: %s %v, want NOERROR [%s]", who, name, dns.RcodeToString[r.Rcode], got, addr)
	}
}

// wantRefused fails unless ns gets REFUSED and no records for name.
func (l *Lab) wantRefused(ns, who, name string) {
	l.t.Helper()
	r := l.resolve(ns, name, dns.TypeA)
	if r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
		l.t.Errorf("%s: %s A: %s with %v, want REFUSED and nothing", who, name, dns.RcodeToString[r.Rcode], addrs(r))
	}
}

func (l *Lab) reachFrom(ns, who, addr string) {
	l.t.Helper()
	if err := dial(ns, addr, shortWait); err != nil {
		l.t.Errorf("%s -> %s: want connected, got %v", who, addr, err)
	}
}

func (l *Lab) blockedFrom(ns, who, addr string) {
	l.t.Helper()
	if err := dial(ns, addr, shortWait); err == nil {
		l.t.Errorf("%s -> %s: connected, want blocked", who, addr)
	}
}

// Two container networks on two bridges, each with a rule of its own,
// and a rule for one container's source address: each client is answered,
// and reaches, only what its own rules allow, on their ports only.
func TestPolicyRulesPerBridge(t *testing.T) {
	l := newLab(t)
	a := l.Ctr // docker0, 172.30.0.2
	b := l.addBridgeContainer(brB, brBIP, ctrBIP, ctrBNet)
	c := l.addContainer("c", "172.30.0.3") // another source
	const (
		nameA, addrA = "westus.api.cognitive.microsoft.com", "203.0.113.10"
		nameB, addrB = "translatoronprem.blob.core.windows.net", "203.0.113.30"
		nameS, addrS = "www.example.com", "203.0.113.50"
	)
	cfg := l.writeConfig("egressd.yaml", l.policyConfig(true, `    - name: ra
      from: [docker0]
      names: [westus.api.cognitive.microsoft.com]
      ports: [443]
    - name: rb
      from: [br-b]
      names: ["*.blob.core.windows.net"]
      ports: [443]
    - name: rsrc
      from: ["172.30.0.2/32"]
      names: [www.example.com]
      ports: [443]
`))
	l.startDaemon(cfg)
	l.waitListing(`iifname "docker0" ct state new jump rule_ra`, `iifname "br-b" ct state new jump rule_rb`,
		"ip saddr 172.30.0.2 ct state new jump rule_rsrc", "set ra4 ", "set rb4 ", "set rsrc4 ")

	// Nothing is open before anyone asked.
	l.blockedFrom(a, "A", hostPort(addrA, 443))
	l.blockedFrom(b, "B", hostPort(addrB, 443))

	// A: its name, into ra's sets only, on 443 only.
	l.wantAnswer(a, "A", nameA, addrA)
	l.onlyIn(addrA, "ra4", "rb4", "rsrc4")
	l.reachFrom(a, "A", hostPort(addrA, 443))
	l.blockedFrom(a, "A (port 80, not in rule ra)", hostPort(addrA, 80))

	// B: A's name is refused, and A's answer opened nothing for B.
	l.wantRefused(b, "B", nameA)
	l.blockedFrom(b, "B", hostPort(addrA, 443))
	l.onlyIn(addrA, "ra4", "rb4")

	// B: its own names, into rb's sets only.
	l.wantAnswer(b, "B", nameB, addrB)
	l.onlyIn(addrB, "rb4", "ra4", "rsrc4")
	l.reachFrom(b, "B", hostPort(addrB, 443))
	l.blockedFrom(b, "B (port 80, not in rule rb)", hostPort(addrB, 80))
	l.wantRefused(a, "A", nameB)
	l.blockedFrom(a, "A", hostPort(addrB, 443))

	// The source-prefix rule: A (172.30.0.2) is answered and reaches;
	// C, on the same bridge, is refused and does not reach.
	l.wantRefused(c, "C", nameS)
	l.wantAnswer(a, "A", nameS, addrS)
	l.onlyIn(addrS, "rsrc4", "ra4", "rb4")
	l.reachFrom(a, "A", hostPort(addrS, 443))
	l.blockedFrom(c, "C", hostPort(addrS, 443))
	l.blockedFrom(b, "B", hostPort(addrS, 443))
	// C still has its bridge's rule.
	l.wantAnswer(c, "C", nameA, addrA)
	l.reachFrom(c, "C", hostPort(addrA, 443))

	// The host is filtered and no rule applies to it.
	l.wantRefused(l.Host, "host", nameA)
	l.blockedFrom(l.Host, "host", hostPort(addrA, 443))
}

// A packet that claims a rule's source address but comes in on another
// interface (here a second uplink of a multi-homed host) is forged: it is
// dropped before the forward chain gives it the rule, and reported. The
// container that really has the address still gets the rule.
func TestPolicyForgedRuleSourceIsDropped(t *testing.T) {
	l := newLab(t, policyZones())
	lan := l.Ctr + "-lan"
	l.sh("ip netns add " + lan)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", lan).Run() })
	l.in(lan, "ip link set lo up")
	l.sh("ip link add eth0 netns " + lan + " type veth peer name lan0 netns " + l.Host)
	l.in(l.Host, "ip link set lan0 up")
	l.in(l.Host, "ip addr add 192.168.77.1/24 dev lan0")
	// A backup default route makes lan0 an uplink, not a container
	// interface, whose sources would be checked anyway.
	l.in(l.Host, "ip route add default via 192.168.77.2 metric 500")
	l.in(lan, "ip link set eth0 up")
	l.in(lan, "ip addr add 192.168.77.2/24 dev eth0")
	l.in(lan, "ip route add default via 192.168.77.1")

	target := netip.AddrPortFrom(netip.MustParseAddr(ntpAddr), 5300)
	got := udpSink(t, l.Inet, target.String())
	arrives := func(payload string) bool {
		deadline := time.After(shortWait)
		for {
			select {
			case p := <-got:
				if p == payload {
					return true
				}
			case <-deadline:
				return false
			}
		}
	}

	l.startDaemon(l.writeConfig("egressd.yaml", l.policyConfig(false, fmt.Sprintf(`    - name: src
      from: ["%s/32"]
      names: [%s]
      ports: ["5300/udp"]
`, ctrIP, ntpName))))
	l.waitListing("ip saddr "+ctrIP+" jump spoofed", "ip saddr "+ctrIP+" ct state new jump rule_src")
	l.wantAnswer(l.Ctr, "container", ntpName, ntpAddr)

	// The container with the rule's address reaches the target...
	if err := inNS(l.Ctr, func() error {
		c, err := net.Dial("udp4", target.String())
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("genuine"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !arrives("genuine") {
		t.Fatalf("the container's datagram to %v did not arrive: the rule does not work", target)
	}
	// ...a packet from the LAN that claims its address does not.
	forged := netip.AddrPortFrom(netip.MustParseAddr(ctrIP), 40000)
	if err := sendForged(lan, forged, target, []byte("forged")); err != nil {
		t.Fatal(err)
	}
	if arrives("forged") {
		t.Errorf("a datagram from the LAN with the rule's source %v reached %v", forged, target)
	}
	l.waitFor("the spoofed packet to be reported", 5*time.Second, func() error {
		if !strings.Contains(l.egressdLog.String(), "spoofed-source") {
			return errors.New("not logged")
		}
		return nil
	})
}

// TestPolicyHelperProcess is not a test: the policy tests run it as a
// process of its own (in a cgroup, in a namespace); it does the steps of
// $EGRESSD_POLICY_HELPER_STEPS and prints one result line for each.
func TestPolicyHelperProcess(t *testing.T) {
	steps := os.Getenv(helperEnv)
	if steps == "" {
		t.Skip("helper process of the policy tests")
	}
	for i, step := range strings.Split(steps, ";") {
		kind, arg, _ := strings.Cut(strings.TrimSpace(step), " ")
		var res string
		switch kind {
		case "dns":
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(arg), dns.TypeA)
			r, _, err := (&dns.Client{Timeout: shortWait}).Exchange(m, otherDNS+":53")
			if err != nil {
				res = "error " + err.Error()
			} else {
				res = dns.RcodeToString[r.Rcode] + " " + strings.Join(addrs(r), ",")
			}
		case "tcp":
			c, err := net.DialTimeout("tcp", arg, shortWait)
			if err == nil {
				c.Close()
			}
			res = okOr(err)
		case "udp":
			res = okOr(udpEchoed(arg, shortWait))
		default:
			res = "error unknown step " + kind
		}
		fmt.Printf("policy-helper %d: %s\n", i, strings.TrimSpace(res))
	}
}

func okOr(err error) string {
	if err != nil {
		return "error " + err.Error()
	}
	return "ok"
}

// inCgroup runs the steps in a process of its own in cgroup directory cg
// (joined before it does anything) and in namespace ns; it returns one
// result per step ("ok", "error ...", "NOERROR addr,...", "REFUSED ").
func (l *Lab) inCgroup(cg, ns string, steps ...string) []string {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "-c", `echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" "$3" -test.run='^TestPolicyHelperProcess$'`,
		"sh", cg, ns, os.Args[0])
	// The prebuilt egressd: the helper's TestMain need not build it.
	cmd.Env = append(os.Environ(), "EGRESSD_TEST_BIN="+egressdBin, helperEnv+"="+strings.Join(steps, ";"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		l.t.Fatalf("helper in %s: %v\n%s", cg, err, out)
	}
	res := make([]string, len(steps))
	for i := range steps {
		prefix := fmt.Sprintf("policy-helper %d: ", i)
		j := strings.Index(string(out), prefix)
		if j < 0 {
			l.t.Fatalf("helper in %s: no result for step %q:\n%s", cg, steps[i], out)
		}
		line, _, _ := strings.Cut(string(out)[j+len(prefix):], "\n")
		res[i] = line
	}
	return res
}

// A host service's rule, from its cgroup: a process in that cgroup is
// answered the rule's names (its DNS goes to a proxy port of its own) and
// reaches them on the rule's ports; a host process outside it is refused
// and reaches nothing. Where the kernel cannot match cgroups, egressd
// refuses the config and changes nothing.
func TestPolicyHostServiceRule(t *testing.T) {
	mnt := cgroup2Dir(t)
	top := fmt.Sprintf("egressd-policy-%d-%d", os.Getpid(), labSeq.Load())
	cg := filepath.Join(mnt, top, "svc")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	// Registered before the lab's cleanup, so it runs after egressd and
	// the helpers are gone: a populated cgroup cannot be removed.
	t.Cleanup(func() { _ = os.Remove(cg); _ = os.Remove(filepath.Dir(cg)) })
	l := newLab(t, policyZones())
	udpEcho(t, l.Inet, hostPort(ntpAddr, 123))
	l.listen(l.Inet, hostPort(ntpAddr, 123)) // TCP 123: connects if let through
	l.withHostMounts()
	const name, addr = "westus.api.cognitive.microsoft.com", "203.0.113.10"
	from := "/" + top + "/svc"
	cfg := l.writeConfig("egressd.yaml", l.policyConfig(true, fmt.Sprintf(`    - name: svc
      from: [%q]
      names: [%s]
      ports: ["443"]
    - name: ntp
      from: [%q]
      names: [%s]
      ports: ["123/udp"]
`, from, name, from, ntpName)))

	if ok, why := cgroupMatch(t, l, mnt, cg); !ok {
		// egressd must refuse the config, naming the rule and the
		// kernel, and install nothing.
		t.Logf("kernel lacks socket cgroupv2: %s", why)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "ip", "netns", "exec", l.Host, l.binary(), "run", "--config", cfg)
		cmd.Env = append(append(os.Environ(), labEnv...), l.env...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || ctx.Err() != nil {
			t.Fatalf("egressd run: %v, want a non-zero exit\n%s", err, out)
		}
		for _, want := range []string{"allow.rules[0] (svc)", from, "5.13"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("egressd run's error does not name %q:\n%s", want, out)
			}
		}
		if out, err := exec.Command("ip", "netns", "exec", l.Host, "nft", "list", "table", "inet", "egressd").CombinedOutput(); err == nil {
			t.Errorf("egressd refused the config but left its table:\n%s", out)
		}
		l.mustReach(l.Host, hostPort(addr, 443))
		return
	}

	l.startDaemon(cfg)
	l.waitListing("socket cgroupv2 level 2 ", "jump rule_svc", "jump rule_ntp", fmt.Sprintf("redirect to :%d", proxyPort+1))

	// Before anyone asked, nothing is open, not even for the service.
	if res := l.inCgroup(cg, l.Host, "tcp "+hostPort(addr, 443)); res[0] == "ok" {
		t.Errorf("service -> %s:443 before it asked: connected, want blocked", addr)
	}

	// Outside the cgroup: refused, even for the service's names.
	l.wantRefused(l.Host, "host", name)
	l.wantRefused(l.Host, "host", ntpName)

	// The service: answered through its own proxy port, and connected.
	steps := []string{
		"dns " + name,
		"tcp " + hostPort(addr, 443),
		"tcp " + hostPort(addr, 80), // not a port of rule svc
		"dns " + ntpName,
		"udp " + hostPort(ntpAddr, 123),
		"tcp " + hostPort(ntpAddr, 123), // rule ntp is UDP only
		"dns www.example.com",           // no rule's
	}
	res := l.inCgroup(cg, l.Host, steps...)
	want := []string{"NOERROR " + addr, "ok", "error", "NOERROR " + ntpAddr, "ok", "error", "REFUSED"}
	for i := range steps {
		if !strings.HasPrefix(res[i], want[i]) {
			t.Errorf("service: %s: %s, want %s", steps[i], res[i], want[i])
		}
	}
	l.onlyIn(addr, "svc4", "ntp4")
	l.onlyIn(ntpAddr, "ntp4", "svc4")

	// Outside the cgroup, the service's answers opened nothing.
	l.blockedFrom(l.Host, "host", hostPort(addr, 443))
	if err := udpRoundTrip(l.Host, hostPort(ntpAddr, 123)); err == nil {
		t.Errorf("host -> %s udp 123: echoed, want blocked", ntpAddr)
	}
	// A container neither.
	l.wantRefused(l.Ctr, "container", name)
	l.blockedFrom(l.Ctr, "container", hostPort(addr, 443))
}

// A rule's "123/udp" opens UDP 123 to the addresses answered for its
// clients, and nothing else: not TCP 123, not another UDP port, not for
// clients it does not apply to.
func TestPolicyUDPRule(t *testing.T) {
	l := newLab(t, policyZones())
	b := l.addBridgeContainer(brB, brBIP, ctrBIP, ctrBNet)
	udpEcho(t, l.Inet, hostPort(ntpAddr, 123))
	udpEcho(t, l.Inet, hostPort(ntpAddr, 124))
	l.listen(l.Inet, hostPort(ntpAddr, 123))
	cfg := l.writeConfig("egressd.yaml", l.policyConfig(false, fmt.Sprintf(`    - name: ntp
      from: [docker0]
      names: [%s]
      ports: ["123/udp"]
`, ntpName)))
	l.startDaemon(cfg)

	ntp := hostPort(ntpAddr, 123)
	if err := udpRoundTrip(l.Ctr, ntp); err == nil {
		t.Errorf("container -> %s udp before it asked: echoed, want blocked", ntp)
	}
	l.wantAnswer(l.Ctr, "container", ntpName, ntpAddr)
	l.onlyIn(ntpAddr, "ntp4")
	if err := udpRoundTrip(l.Ctr, ntp); err != nil {
		t.Errorf("container -> %s udp: %v, want echoed", ntp, err)
	}
	l.blockedFrom(l.Ctr, "container (tcp 123)", ntp)
	if err := udpRoundTrip(l.Ctr, hostPort(ntpAddr, 124)); err == nil {
		t.Errorf("container -> %s:124 udp: echoed, want blocked", ntpAddr)
	}
	// B, behind another bridge: refused, and the address stays shut.
	l.wantRefused(b, "B", ntpName)
	if err := udpRoundTrip(b, ntp); err == nil {
		t.Errorf("B -> %s udp: echoed, want blocked", ntp)
	}
}
