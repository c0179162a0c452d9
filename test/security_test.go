package test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

func TestApplyWithoutResolverInstallsClosed(t *testing.T) {
	l := newLab(t)
	cfg, _ := l.noResolverConfig()
	out, err := l.runEgressd("apply", "--config", cfg)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Fatalf("apply without a resolver: %v, want exit status 3 (pinned names pending)\n%s", err, out)
	}
	if !strings.Contains(out, "pinned names pending") {
		t.Errorf("apply's message does not say pinned names are pending: %s", out)
	}
	l.in(l.Host, "nft list table inet egressd")
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	l.mustNotReach(l.Host, "203.0.113.31:443")
	if r, err := query(l.Ctr, upstreamDNS+":53", "www.example.com", dns.TypeA, "udp"); err == nil {
		t.Errorf("DNS answered past the closed firewall: %v", r)
	}
}

func TestRunWithoutResolverWaitsClosed(t *testing.T) {
	l := newLab(t)
	cfg, resolved := l.noResolverConfig()
	l.startDaemon(cfg)
	l.mustNotReach(l.Ctr, "203.0.113.30:443") // pinned, but not resolvable yet
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	r, err := query(l.Ctr, upstreamDNS+":53", "westus.api.cognitive.microsoft.com", dns.TypeA, "udp")
	if err != nil || r.Rcode != dns.RcodeServerFailure {
		t.Errorf("without upstream: %v %v, want SERVFAIL", r, err)
	}
	out, _ := l.runEgressd("status", "--config", cfg)
	if !strings.Contains(out, "no usable upstream") {
		t.Errorf("status does not say why the proxy does not answer:\n%s", out)
	}

	// DHCP comes up: systemd-resolved writes its list.
	if err := os.WriteFile(resolved, []byte("nameserver "+upstreamDNS+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l.waitFor("the proxy to answer", 10*time.Second, func() error {
		r, err := query(l.Ctr, upstreamDNS+":53", "westus.api.cognitive.microsoft.com", dns.TypeA, "udp")
		if err == nil && len(addrs(r)) == 0 {
			err = fmt.Errorf("rcode %s", dns.RcodeToString[r.Rcode])
		}
		return err
	})
	l.mustReach(l.Ctr, "203.0.113.10:443")
	l.waitFor("the pinned name", 10*time.Second, func() error { return dial(l.Ctr, "203.0.113.30:443", time.Second) })
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	// The "dns:" line says why the proxy does not answer; "recent:" lines
	// may still hold the earlier warning.
	l.waitFor("status to stop saying why DNS is not answered", 5*time.Second, func() error {
		if out, _ := l.runEgressd("status", "--config", cfg); strings.Contains(out, "\ndns:") {
			return fmt.Errorf("status still says:\n%s", out)
		}
		return nil
	})
}

// dialMarked connects from ns to addr with SO_MARK set on the socket, as a
// privileged process that copies egressd's mark would.
func dialMarked(ns, network, addr string, mark int) (net.Conn, error) {
	d := net.Dialer{Timeout: shortWait, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
		}); err != nil {
			return err
		}
		return serr
	}}
	var c net.Conn
	err := inNS(ns, func() (err error) {
		c, err = d.Dial(network, addr)
		return err
	})
	return c, err
}

// queryMarked asks server a question from a socket with SO_MARK set.
func queryMarked(ns, server, name string, mark int) (*dns.Msg, error) {
	c, err := dialMarked(ns, "udp", server, mark)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	cl := &dns.Client{Timeout: shortWait}
	r, _, err := cl.ExchangeWithConn(m, &dns.Conn{Conn: c})
	return r, err
}

func TestCopiedMarkOpensNothing(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	const mark = 0x1e55
	if c, err := dialMarked(l.Host, "tcp", "203.0.113.31:443", mark); err == nil {
		c.Close()
		t.Errorf("a host process with egressd's mark reached an unlisted address")
	}
	if c, err := dialMarked(l.Host, "tcp", upstreamDNS+":443", mark); err == nil {
		c.Close()
		t.Errorf("a host process with egressd's mark reached the upstream on another port")
	}
	// egressd's own upstream queries still work.
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(l.Ctr, "203.0.113.10:443")
}

// cgroup2Dir returns where cgroup v2 is mounted, or skips.
func cgroup2Dir(t *testing.T) string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, fs := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(fs) > 0 && fs[0] == "cgroup2" && f[3] == "/" {
			return f[4]
		}
	}
	t.Skip("cgroup v2 is not mounted")
	return ""
}

// needCgroupMatch skips t where the kernel cannot match a socket's cgroup
// v2 (cgroupMatch).
func needCgroupMatch(t *testing.T, l *Lab, mnt, cg string) {
	t.Helper()
	if ok, why := cgroupMatch(t, l, mnt, cg); !ok {
		t.Skipf("kernel lacks socket cgroupv2 (5.13): nft: %s", strings.Split(why, "\n")[0])
	}
}

// cgroupMatch reports whether the kernel can match a socket's cgroup v2
// (nftables `socket cgroupv2`, Linux 5.13), and nft's words if not: it
// loads such a rule for cg, a directory below the cgroup v2 mount mnt,
// into a scratch table in the lab's host namespace, in one transaction
// that deletes it again, as egressd's own probe (firewall.ProbeCgroup)
// does. The probe is of the kernel, not its version; any other failure
// fails t.
func cgroupMatch(t *testing.T, l *Lab, mnt, cg string) (bool, string) {
	t.Helper()
	rel := strings.TrimPrefix(cg, mnt)
	// nft looks the path up below /sys/fs/cgroup (cgroup2 may be mounted
	// at /sys/fs/cgroup/unified).
	path := strings.TrimPrefix(cg, "/sys/fs/cgroup")
	const table = "egressd_test_cgroup"
	script := fmt.Sprintf("table inet %s { chain c { socket cgroupv2 level %d %q accept; }; }\ndelete table inet %s\n",
		table, strings.Count(rel, "/"), path, table)
	// In the test's mount namespace: `ip netns exec` mounts a fresh /sys
	// without the cgroup tree.
	cmd := exec.Command("ip", "netns", "exec", l.Host, "nsenter", fmt.Sprintf("--mount=/proc/%d/ns/mnt", os.Getpid()), "--", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.CombinedOutput()
	switch {
	case err == nil:
		return true, ""
	case strings.Contains(string(out), "Operation not supported"):
		return false, strings.TrimSpace(string(out))
	}
	t.Fatalf("probe of socket cgroupv2: %v\n%s", err, out)
	return false, ""
}

// In a cgroup of its own, as under systemd, egressd is recognised by it:
// the mark alone, even towards the upstream on port 53, is not enough.
func TestOwnCgroupIsTheProof(t *testing.T) {
	cg := filepath.Join(cgroup2Dir(t), fmt.Sprintf("egressd-test-%d-%d", os.Getpid(), labSeq.Load()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	// Registered before the lab's cleanup, so it runs after egressd is
	// gone: a populated cgroup cannot be removed.
	t.Cleanup(func() { _ = os.Remove(cg) })
	l := newLab(t)
	needCgroupMatch(t, l, filepath.Dir(cg), cg)
	wrapper := filepath.Join(l.Dir, "in-cgroup")
	// `ip netns exec` mounts a fresh /sys without the cgroup tree: go
	// back to the test's mount namespace (the network namespace stays),
	// join the cgroup, then become egressd.
	script := fmt.Sprintf("#!/bin/sh\nexec nsenter --mount=/proc/%d/ns/mnt -- sh -c 'echo $$ > %s/cgroup.procs && exec %s \"$@\"' egressd \"$@\"\n",
		os.Getpid(), cg, egressdBin)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	l.bin = wrapper
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	if !strings.Contains(l.listing(), "socket cgroupv2 level ") {
		t.Fatalf("egressd in its own cgroup still trusts the mark:\n%s", l.listing())
	}
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(l.Ctr, "203.0.113.10:443")
	// A marked query to the upstream is redirected to the proxy, which
	// refuses the name, instead of reaching the upstream.
	r, err := queryMarked(l.Host, upstreamDNS+":53", "www.example.com", 0x1e55)
	if err == nil && len(r.Answer) > 0 {
		t.Errorf("a marked host process reached the upstream directly: %v", r.Answer)
	}
	if c, err := dialMarked(l.Host, "tcp", "203.0.113.31:443", 0x1e55); err == nil {
		c.Close()
		t.Errorf("a marked host process reached an unlisted address")
	}
	// The installed cgroup match reads back as what was built: no
	// endless drift repairs (the check runs every 2 s).
	time.Sleep(3 * time.Second)
	if strings.Contains(l.egressdLog.String(), "drift repaired") {
		t.Errorf("egressd keeps repairing its own ruleset")
	}
	if err := l.stopDaemon(syscall.SIGTERM); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}

// sendForged sends one UDP datagram from ns with any source address, as a
// container with CAP_NET_RAW (Docker's default) can: a raw IPv4 socket
// that writes its own header.
func sendForged(ns string, src, dst netip.AddrPort, payload []byte) error {
	pkt := make([]byte, 28+len(payload))
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	pkt[8] = 64 // TTL
	pkt[9] = unix.IPPROTO_UDP
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	copy(pkt[12:], s4[:])
	copy(pkt[16:], d4[:])
	binary.BigEndian.PutUint16(pkt[20:], src.Port())
	binary.BigEndian.PutUint16(pkt[22:], dst.Port())
	binary.BigEndian.PutUint16(pkt[24:], uint16(8+len(payload)))
	// UDP checksum 0: none, valid over IPv4; the kernel fills in the IP
	// header checksum.
	copy(pkt[28:], payload)
	return inNS(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: d4})
	})
}

// forgedQueriesGoNowhere sends, from ns, a query for name to each of dsts
// with an internet address as its forged source, and checks that no answer
// reaches that address and that egressd reports the spoofed packets.
func (l *Lab) forgedQueriesGoNowhere(ns, name string, dsts ...string) {
	l.t.Helper()
	victim := netip.MustParseAddrPort("203.0.113.99:5300")
	pc := udpListen(l.t, l.Inet, victim.String())
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	q, _ := m.Pack()
	for _, dst := range dsts {
		if err := sendForged(ns, victim, netip.MustParseAddrPort(dst), q); err != nil {
			l.t.Fatal(err)
		}
	}
	buf := make([]byte, 512)
	_ = pc.SetReadDeadline(time.Now().Add(shortWait))
	if n, from, err := pc.ReadFrom(buf); err == nil {
		l.t.Errorf("a forged query's answer reached the internet: %d bytes from %v", n, from)
	}
	l.waitFor("the spoofed packets to be reported", 5*time.Second, func() error {
		if !strings.Contains(l.egressdLog.String(), "spoofed-source") {
			return errors.New("not logged")
		}
		return nil
	})
}

func TestForgedSourcesAreDropped(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))

	// A host socket talking to the upstream, as egressd's own are.
	var conn *net.UDPConn
	if err := inNS(l.Host, func() (err error) {
		conn, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(hostUplink)}, &net.UDPAddr{IP: net.ParseIP(upstreamDNS), Port: 53})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local := netip.MustParseAddrPort(conn.LocalAddr().String())
	buf := make([]byte, 512)
	// The container sends it a datagram with the upstream's address as
	// source (a forged answer).
	if err := sendForged(l.Ctr, netip.MustParseAddrPort(upstreamDNS+":53"), local, []byte("forged answer")); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(shortWait))
	if n, err := conn.Read(buf); err == nil {
		t.Errorf("the host socket connected to the upstream received %q from the container", buf[:n])
	}

	// A query to the proxy with an internet address as source: the answer
	// must not be sent there (reflection, one-way exfiltration).
	l.forgedQueriesGoNowhere(l.Ctr, "exfiltrated-data.westus.api.cognitive.microsoft.com.",
		hostPort(upstreamDNS, 53), hostPort(bridgeIP, proxyPort))
	// The container itself still works.
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
}

func TestUnknownBridgeFailsClosed(t *testing.T) {
	l := newLab(t)
	cfgPath := l.writeConfig("egressd.yaml", l.baseConfig())
	l.startDaemon(cfgPath)
	pod := l.addPodman() // appears while egressd runs
	l.mustNotReach(pod, "203.0.113.31:443")
	// Its DNS ends at egressd: the proxy refuses a name it does not allow,
	// whichever resolver was asked, and answers one it does.
	l.waitFor("podman0's DNS to reach the proxy", 10*time.Second, func() error {
		r, err := query(pod, upstreamDNS+":53", "www.example.com", dns.TypeA, "udp")
		if err != nil {
			return err
		}
		if r.Rcode != dns.RcodeRefused {
			return fmt.Errorf("answered %s %v: not the proxy", dns.RcodeToString[r.Rcode], r.Answer)
		}
		return nil
	})
	l.mustResolve(pod, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(pod, "203.0.113.10:443")
	l.mustNotReach(pod, "203.0.113.31:443")
	// Reported once. Its veth may be reported too, once, if egressd
	// looked while it was not yet the bridge's port (a standalone veth is
	// a forwarder of its own): under emulation the window between the
	// two `ip` commands is long.
	reports := map[string]int{}
	for _, line := range strings.Split(l.egressdLog.String(), "\n") {
		if _, name, ok := strings.Cut(line, "matches no firewall.containers pattern"); ok {
			_, name, _ = strings.Cut(name, " interface=")
			reports[name]++
		}
	}
	for name, n := range reports {
		if n != 1 || name != "podman0" && name != "vethp0" {
			t.Errorf("%s was reported %d times, want podman0 once (reports: %v)", name, n, reports)
		}
	}
	if reports["podman0"] != 1 {
		t.Errorf("the unknown bridge was reported %d times, want once", reports["podman0"])
	}

	// Exempting it opens it.
	l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), `containers: ["docker0"]`, `containers: ["docker0"]
  unfiltered: ["podman0"]`, 1))
	if err := l.egressd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	l.waitFor("podman0 to be unfiltered", 10*time.Second, func() error { return dial(pod, "203.0.113.31:443", time.Second) })
	if r, err := query(pod, upstreamDNS+":53", "www.example.com", dns.TypeA, "udp"); err != nil || len(r.Answer) == 0 {
		t.Errorf("an unfiltered interface's DNS still goes to the proxy: %v %v", r, err)
	}
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
}

func TestContainerPatternOnUplinkIsRefused(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), `containers: ["docker0"]`, `containers: ["docker0", "up*"]`, 1))
	for _, cmd := range []string{"apply", "run"} {
		out, err := l.runEgressd(cmd, "--config", cfg)
		if err == nil || !strings.Contains(out, `firewall.containers[1]: "up*" matches up0, which carries the default route`) {
			t.Errorf("%s with a container pattern matching the uplink: %v\n%s", cmd, err, out)
		}
	}
	if out := l.in(l.Host, "nft list tables"); strings.Contains(out, "egressd") {
		t.Errorf("a refused config installed the ruleset:\n%s", out)
	}
}

func TestDHCPExemptionOnlyOnTheLink(t *testing.T) {
	l := newLab(t)
	if out, err := l.runEgressd("apply", "--config", l.writeConfig("egressd.yaml", l.baseConfig())); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	got := udpSink(t, l.Inet, "0.0.0.0:67")
	// A "DHCP client" on the host: port 68, broadcast allowed, on the
	// uplink.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		_ = c.Control(func(fd uintptr) {
			serr = errors.Join(unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1),
				unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, "up0"))
		})
		return serr
	}}
	var client net.PacketConn
	if err := inNS(l.Host, func() (err error) {
		client, err = lc.ListenPacket(context.Background(), "udp4", "0.0.0.0:68")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	send := func(to, what string) {
		t.Helper()
		if _, err := client.WriteTo([]byte(what), &net.UDPAddr{IP: net.ParseIP(to), Port: 67}); err != nil && what != "internet" {
			t.Errorf("send %s: %v", what, err)
		}
	}
	send("203.0.113.67", "internet")
	send("255.255.255.255", "broadcast")
	send("192.0.2.2", "on-link")
	want := map[string]bool{"broadcast": true, "on-link": true}
	deadline := time.After(shortWait)
	for {
		select {
		case m := <-got:
			if !want[m] {
				t.Errorf("a datagram from port 68 to port 67 reached %s", m)
			}
			delete(want, m)
			continue
		case <-deadline:
		}
		break
	}
	if len(want) > 0 {
		t.Errorf("DHCP did not pass to %v", want)
	}
}

// sendForged6 is sendForged over IPv6 (the UDP checksum is mandatory
// there).
func sendForged6(ns string, src, dst netip.AddrPort, payload []byte) error {
	udp := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload)
	s16, d16 := src.Addr().As16(), dst.Addr().As16()
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(s16[:])
	add(d16[:])
	sum += uint32(len(udp)) + unix.IPPROTO_UDP
	add(udp)
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	ck := ^uint16(sum)
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], ck)
	pkt := make([]byte, 40, 40+len(udp))
	pkt[0] = 0x60
	binary.BigEndian.PutUint16(pkt[4:], uint16(len(udp)))
	pkt[6] = unix.IPPROTO_UDP
	pkt[7] = 64
	copy(pkt[8:], s16[:])
	copy(pkt[24:], d16[:])
	pkt = append(pkt, udp...)
	return inNS(ns, func() error {
		// IPPROTO_RAW implies that the packet carries its own header.
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet6{Addr: d16})
	})
}

func TestForgedIPv6SourcesAreDropped(t *testing.T) {
	l := newLab(t)
	if out, err := l.runEgressd("apply", "--config", l.writeConfig("egressd.yaml", l.baseConfig())); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	listen := func(addr string) net.PacketConn {
		var pc net.PacketConn
		if err := inNS(l.Host, func() (err error) {
			pc, err = net.ListenPacket("udp6", addr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc
	}
	// An unconnected host socket, so the control datagram shows that the
	// path works; only the forged one must not arrive.
	pc := listen("[2001:db8:1::1]:5353")
	to := netip.MustParseAddrPort("[2001:db8:1::1]:5353")
	if err := sendForged6(l.Ctr, netip.MustParseAddrPort("[fd00:30::2]:5353"), to, []byte("control")); err != nil {
		t.Fatal(err)
	}
	if err := sendForged6(l.Ctr, netip.MustParseAddrPort("[2001:db8:53::53]:53"), to, []byte("forged")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	var got []string
	for {
		_ = pc.SetReadDeadline(time.Now().Add(shortWait))
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			break
		}
		got = append(got, string(buf[:n]))
	}
	if !slices.Contains(got, "control") {
		t.Errorf("the container's own datagram did not arrive (%q): the test proves nothing", got)
	}
	if slices.Contains(got, "forged") {
		t.Errorf("a datagram with the upstream's IPv6 address as source reached the host from the container")
	}
}

// egressd's own upstream queries (and those to the servers of forwarded
// zones) leave unredirected, each from a fresh source port. A host
// process that sends from one of those ports must not ride the
// connection entry they left behind past the redirect: it gets egressd's
// answer (REFUSED for an unlisted name), never the server's. The ports
// are recorded where the queries arrive, in the internet's namespace, so
// the test finds them whatever egressd does with its conntrack entries.
func TestHostCannotRideUpstreamFlows(t *testing.T) {
	var huge strings.Builder
	for i := 0; i < 300; i++ {
		fmt.Fprintf(&huge, "huge A 198.18.%d.%d\n", i/250, i%250+1)
	}
	l := newLab(t, map[string]string{"ride.cognitive.microsoft.com": huge.String()})
	l.in(l.Inet, "nft -f "+l.writeConfig("watch.nft", fmt.Sprintf(`table inet watch {
	set udp_ports { type ipv4_addr . inet_service; size 65535; flags dynamic; }
	set tcp_ports { type ipv4_addr . inet_service; size 65535; flags dynamic; }
	chain seen {
		type filter hook prerouting priority 0;
		ip saddr %s udp dport 53 add @udp_ports { ip daddr . udp sport }
		ip saddr %s tcp dport 53 add @tcp_ports { ip daddr . tcp sport }
	}
}
`, hostUplink, hostUplink)))
	cfg := strings.Replace(l.baseConfig(), "dns:\n", "dns:\n  forward: [{zone: trafficmanager.test, servers: [\""+otherDNS+"\"]}]\n", 1)
	l.startDaemon(l.writeConfig("egressd.yaml", cfg))

	// Fresh names from the host (UDP upstream queries), names of the
	// forwarded zone, and one answer too large for UDP (a TCP upstream
	// exchange).
	for i := 0; i < 40; i++ {
		l.mustResolve(l.Host, fmt.Sprintf("race%d.cognitive.microsoft.com", i), dns.TypeA, fmt.Sprintf("203.0.115.%d", i+1))
		if r, err := query(l.Host, upstreamDNS+":53", "myres.trafficmanager.test", dns.TypeA, "udp"); err != nil || r.Rcode != dns.RcodeSuccess {
			t.Fatalf("forwarded zone: %v %v", r, err)
		}
	}
	if r, err := query(l.Host, upstreamDNS+":53", "huge.ride.cognitive.microsoft.com", dns.TypeA, "tcp"); err != nil || len(addrs(r)) != 300 {
		t.Fatalf("huge answer: %v, %d addresses", err, len(addrs(r)))
	}

	for _, proto := range []string{"udp", "tcp"} {
		flows := setFlows(t, l.in(l.Inet, "nft -j list set inet watch "+proto+"_ports"))
		servers := map[string]int{}
		for _, f := range flows {
			servers[f.Addr().String()]++
		}
		if servers[upstreamDNS] == 0 || proto == "udp" && servers[otherDNS] == 0 {
			t.Fatalf("egressd's %s queries that reached the servers: %v, want both the upstream and the forward server", proto, servers)
		}
		rode, held := 0, 0
		for _, f := range flows {
			from := netip.AddrPortFrom(netip.MustParseAddr(hostUplink), f.Port())
			r, err := queryFrom(l.Host, proto, from, netip.AddrPortFrom(f.Addr(), 53).String(), "www.example.com")
			switch {
			case errors.Is(err, syscall.EADDRINUSE):
				held++ // egressd's socket (or its TIME_WAIT) still holds the port
			case err != nil:
				t.Errorf("%s query from egressd's port %d to %s: %v, want egressd's REFUSED", proto, f.Port(), f.Addr(), err)
			case r.Rcode != dns.RcodeRefused:
				rode++
				t.Errorf("%s query from egressd's port %d reached %s: %s %v", proto, f.Port(), f.Addr(), dns.RcodeToString[r.Rcode], addrs(r))
			}
		}
		t.Logf("%s: %d flows of egressd's to %v tried, %d ports still held, %d rode past the proxy", proto, len(flows), servers, held, rode)
	}

	// The flake this explained: a host's ordinary query that happened to
	// leave from such a port was answered by the upstream itself, egressd
	// never learned the address, and the connection that followed was
	// blocked ("not-answered").
	flows := setFlows(t, l.in(l.Inet, "nft -j list set inet watch udp_ports"))
	for i, f := range flows[:min(len(flows), 5)] {
		name, addr := fmt.Sprintf("race%d.cognitive.microsoft.com", 100+i), fmt.Sprintf("203.0.115.%d", 101+i)
		from := netip.AddrPortFrom(netip.MustParseAddr(hostUplink), f.Port())
		r, err := queryFrom(l.Host, "udp", from, upstreamDNS+":53", name)
		if err != nil || len(addrs(r)) != 1 || addrs(r)[0] != addr {
			t.Fatalf("%s from port %d: %v %v", name, f.Port(), r, err)
		}
		if err := dial(l.Host, addr+":443", 2*time.Second); err != nil {
			t.Errorf("connect after %s was answered to port %d: %v", name, f.Port(), err)
		}
	}
}

// setFlows returns the elements of an `ipv4_addr . inet_service` set
// from `nft -j list set`.
func setFlows(t *testing.T, js string) []netip.AddrPort {
	t.Helper()
	var out struct {
		Nftables []struct {
			Set *struct {
				Elem []json.RawMessage `json:"elem"`
			} `json:"set"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(js), &out); err != nil {
		t.Fatalf("nft -j: %v\n%s", err, js)
	}
	var flows []netip.AddrPort
	for _, o := range out.Nftables {
		if o.Set == nil {
			continue
		}
		for _, e := range o.Set.Elem {
			var elem struct {
				Concat []json.RawMessage `json:"concat"`
				Elem   *struct {
					Val struct {
						Concat []json.RawMessage `json:"concat"`
					} `json:"val"`
				} `json:"elem"`
			}
			if err := json.Unmarshal(e, &elem); err != nil {
				t.Fatalf("set element %s: %v", e, err)
			}
			c := elem.Concat
			if elem.Elem != nil {
				c = elem.Elem.Val.Concat
			}
			var addr string
			var port uint16
			if len(c) != 2 || json.Unmarshal(c[0], &addr) != nil || json.Unmarshal(c[1], &port) != nil {
				t.Fatalf("set element %s is not address . port", e)
			}
			flows = append(flows, netip.AddrPortFrom(netip.MustParseAddr(addr), port))
		}
	}
	return flows
}

// queryFrom asks server for name's A records from ns, over proto, from
// the source address and port from, like any unprivileged host process
// may: no mark, SO_REUSEADDR only.
func queryFrom(ns, proto string, from netip.AddrPort, server, name string) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	var conn net.Conn
	err := inNS(ns, func() (err error) {
		d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: net.UDPAddrFromAddrPort(from),
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				return errors.Join(err, serr)
			}}
		if proto == "tcp" {
			d.LocalAddr = net.TCPAddrFromAddrPort(from)
		}
		conn, err = d.Dial(proto, server)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	c := &dns.Client{Net: proto, Timeout: 2 * time.Second}
	r, _, err := c.ExchangeWithConn(m, &dns.Conn{Conn: conn})
	return r, err
}

// With firewall.host false the host resolves freely, but the DNS that a
// container engine sends for its containers from the host's namespace
// (Docker's embedded DNS) goes through the allow-list: the engine is
// known by its cgroup, followed when it is removed and made again (the
// engine restarted).
func TestEngineCgroupDNSIsFiltered(t *testing.T) {
	mnt := cgroup2Dir(t)
	top := fmt.Sprintf("egressd-test-%d-%d", os.Getpid(), labSeq.Load())
	cg := filepath.Join(mnt, top, "docker.service")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(cg); _ = os.Remove(filepath.Dir(cg)) })
	l := newLab(t)
	needCgroupMatch(t, l, mnt, cg)
	l.withHostMounts()
	// An engine outside the configured cgroups, and a rootless network
	// helper, are not left unfiltered in silence.
	for _, name := range []string{"dockerd", "slirp4netns"} {
		fake := filepath.Join(l.Dir, name)
		if err := os.Symlink("/bin/sleep", fake); err != nil {
			t.Fatal(err)
		}
		p := exec.Command(fake, "60")
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Process.Kill(); _ = p.Wait() })
	}
	cfg := strings.Replace(l.baseConfig(), "firewall:\n", "firewall:\n  host: false\n  engine_cgroups: [\"/"+top+"/docker.service\"]\n", 1)
	l.startDaemon(l.writeConfig("egressd.yaml", cfg))
	l.waitLog("a container engine's DNS server runs outside firewall.engine_cgroups", "process=dockerd")
	l.waitLog("a rootless network helper runs", "process=slirp4netns")
	// The engine, likewise, joins its cgroup there.
	engineLookup := func(name string) string {
		out, _ := exec.Command("ip", "netns", "exec", l.Host, "nsenter", fmt.Sprintf("--mount=/proc/%d/ns/mnt", os.Getpid()), "--",
			"sh", "-c", fmt.Sprintf("echo $$ > %s/cgroup.procs && exec busybox nslookup %s %s", cg, name, upstreamDNS)).CombinedOutput()
		return string(out)
	}
	check := func() {
		t.Helper()
		if out := engineLookup("www.example.com"); strings.Contains(out, "203.0.113.50") {
			t.Errorf("the engine resolved an unlisted name:\n%s", out)
		}
		if out := engineLookup("westus.api.cognitive.microsoft.com"); !strings.Contains(out, "203.0.113.10") {
			t.Errorf("the engine did not resolve an allowed name:\n%s", out)
		}
		if !l.inSet("203.0.113.10") {
			t.Errorf("the engine's answer opened nothing")
		}
	}
	check()
	// The host itself is not filtered.
	l.mustResolve(l.Host, "www.example.com", dns.TypeA, "203.0.113.50")

	// The engine restarts: systemd removes its cgroup and makes it anew.
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	l.waitFor("the new engine cgroup's rule", 10*time.Second, func() error {
		if out := engineLookup("www.example.com"); strings.Contains(out, "203.0.113.50") {
			return fmt.Errorf("resolved an unlisted name:\n%s", out)
		}
		return nil
	})
	check()
}
