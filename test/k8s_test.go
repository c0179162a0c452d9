package test

// A Kubernetes-like node on top of the lab, run with the shipped
// ConfigMap's config (deploy/kubernetes/egressd.yaml):
//
//	host (node 1): egressd, firewall.host false; bridge cni0 10.244.0.1/24;
//	      kube-proxy-style iptables-nft DNAT (nat PREROUTING and OUTPUT,
//	      priority dstnat) of the service addresses:
//	        10.96.0.10:53 udp+tcp -> 10.244.0.3:53     (cluster DNS)
//	        10.96.0.1:443         -> 192.168.50.2:6443 (API server)
//	        10.96.0.20:8080 tcp, :9999 udp -> 10.244.1.5 (a service)
//	  |-- cni0: pod 10.244.0.2 (resolv.conf: nameserver 10.96.0.10,
//	  |         search apps.svc.cluster.local svc.cluster.local
//	  |         cluster.local, ndots:5);
//	  |         dns 10.244.0.3: NSD serving cluster.local
//	  |-- node0 192.168.50.1/24 -- node2 192.168.50.2: "API server" on
//	  |         6443; its pod range 10.244.1.0/24 (10.244.1.5: TCP 8080
//	  |         and UDP 9999 echo)
//	  `-- up0: the lab's internet (NSD upstream, listeners on 443)
//
// The ConfigMap's values (pod CIDR 10.244.0.0/16, service CIDR
// 10.96.0.0/12, node CIDR 192.168.0.0/16, cluster DNS 10.96.0.10) are the
// lab's as shipped; only the lab's upstream, state and socket paths and
// address lifetimes come from the environment.

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// k8sNode is the lab extended with a Kubernetes node.
type k8sNode struct {
	*Lab
	Pod, DNSPod, Node2 string // namespaces
	cfgDir             string // the ConfigMap volume, as the kubelet lays it out
	gen                int
}

// Addresses of the Kubernetes lab.
const (
	podIP        = "10.244.0.2"
	clusterDNSIP = "10.244.0.3"
	remotePodIP  = "10.244.1.5"
	apiServer    = "192.168.50.2:6443"
)

func newK8sNode(t *testing.T) *k8sNode {
	t.Helper()
	k := newK8sNodeNet(t)
	k.startClusterDNS()
	return k
}

// newK8sNodeNet is the node without a cluster DNS server: the caller
// starts one at clusterDNSIP.
func newK8sNodeNet(t *testing.T) *k8sNode {
	t.Helper()
	if _, err := exec.LookPath("iptables"); err != nil {
		need(t, "iptables is not installed (apt-get install iptables): no kube-proxy rules")
	}
	if _, err := exec.LookPath("getent"); err != nil {
		t.Skip("getent is not installed")
	}
	l := newLab(t)
	k := &k8sNode{Lab: l, Pod: l.Ctr + "-pod", DNSPod: l.Ctr + "-dns", Node2: l.Ctr + "-n2"}
	t.Cleanup(func() {
		for _, ns := range []string{k.Pod, k.DNSPod, k.Node2} {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
		_ = os.RemoveAll(filepath.Join("/etc/netns", k.Pod))
	})
	for _, ns := range []string{k.Pod, k.DNSPod, k.Node2} {
		l.sh("ip netns add " + ns)
		l.in(ns, "ip link set lo up")
	}
	host := l.Host
	l.in(host, "ip link add cni0 type bridge")
	l.in(host, "ip link set cni0 up")
	l.in(host, "ip addr add 10.244.0.1/24 dev cni0")
	for i, p := range []struct{ ns, ip string }{{k.Pod, podIP}, {k.DNSPod, clusterDNSIP}} {
		veth := fmt.Sprintf("veth%d", 10+i)
		l.sh("ip link add eth0 netns " + p.ns + " type veth peer name " + veth + " netns " + host)
		l.in(host, "ip link set "+veth+" master cni0 up")
		l.in(p.ns, "ip link set eth0 up")
		l.in(p.ns, "ip addr add "+p.ip+"/24 dev eth0")
		l.in(p.ns, "ip route add default via 10.244.0.1")
	}
	// Node 2 and its pod range.
	l.sh("ip link add node0 netns " + host + " type veth peer name eth0 netns " + k.Node2)
	l.in(host, "ip link set node0 up")
	l.in(host, "ip addr add 192.168.50.1/24 dev node0")
	l.in(host, "ip route add 10.244.1.0/24 via 192.168.50.2")
	l.in(k.Node2, "ip link set eth0 up")
	l.in(k.Node2, "ip addr add 192.168.50.2/24 dev eth0")
	l.in(k.Node2, "ip route add default via 192.168.50.1")
	l.in(k.Node2, "ip addr add "+remotePodIP+"/32 dev lo") // a pod of node 2, as far as routing goes
	l.in(k.Node2, "sysctl -qw net.ipv4.ip_forward=1")
	l.listen(k.Node2, apiServer)
	l.listen(k.Node2, remotePodIP+":8080")
	l.listen(k.Node2, remotePodIP+":5432")
	udpEcho(t, k.Node2, remotePodIP+":9999")
	// The internet routes the pod range back to node 1 (no SNAT here).
	l.in(l.Inet, "ip route add 10.244.0.0/16 via "+hostUplink)

	// kube-proxy (iptables mode, through iptables-nft): DNAT of the
	// service addresses in nat PREROUTING and OUTPUT at priority dstnat,
	// the priority egressd's redirect must win against.
	for _, r := range []string{
		"-t nat -N KUBE-SERVICES",
		"-t nat -A PREROUTING -j KUBE-SERVICES",
		"-t nat -A OUTPUT -j KUBE-SERVICES",
		"-t nat -A KUBE-SERVICES -d 10.96.0.10/32 -p udp --dport 53 -j DNAT --to-destination " + clusterDNSIP + ":53",
		"-t nat -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp --dport 53 -j DNAT --to-destination " + clusterDNSIP + ":53",
		"-t nat -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination " + apiServer,
		"-t nat -A KUBE-SERVICES -d 10.96.0.20/32 -p tcp --dport 8080 -j DNAT --to-destination " + remotePodIP + ":8080",
		"-t nat -A KUBE-SERVICES -d 10.96.0.20/32 -p udp --dport 9999 -j DNAT --to-destination " + remotePodIP + ":9999",
	} {
		l.in(host, "iptables "+r)
	}

	// The pod's resolv.conf, as the kubelet writes it for namespace
	// "apps"; `ip netns exec` bind-mounts it over /etc/resolv.conf.
	etc := filepath.Join("/etc/netns", k.Pod)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver 10.96.0.10\nsearch apps.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k.cfgDir = filepath.Join(l.Dir, "configmap")
	if err := os.MkdirAll(k.cfgDir, 0o755); err != nil {
		t.Fatal(err)
	}
	return k
}

// clusterZone is the cluster DNS's zone cluster.local.
const clusterZone = `$ORIGIN cluster.local.
$TTL 5
@ SOA ns.dns.kube-system.svc.cluster.local. hostmaster.cluster.local. 1 3600 600 86400 5
@ NS ns.dns.kube-system.svc.cluster.local.
ns.dns.kube-system.svc A 10.96.0.10
kubernetes.default.svc A 10.96.0.1
web.apps.svc A 10.96.0.20
_https._tcp.kubernetes.default.svc SRV 0 100 443 kubernetes.default.svc.cluster.local.
`

// startClusterDNS runs NSD in the cluster DNS pod, authoritative for
// cluster.local.
func (k *k8sNode) startClusterDNS() {
	k.t.Helper()
	k.runNSD(k.DNSPod, "clusterdns", []string{clusterDNSIP}, map[string]string{"cluster.local": clusterZone},
		"kubernetes.default.svc.cluster.local")
}

// udpEcho answers every datagram to addr in ns with the same bytes.
func udpEcho(t *testing.T, ns, addr string) {
	t.Helper()
	pc := udpListen(t, ns, addr)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
}

// udpSink listens on addr in ns for the rest of the test and passes on
// the payload of each datagram it receives.
func udpSink(t *testing.T, ns, addr string) <-chan string {
	t.Helper()
	pc := udpListen(t, ns, addr)
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- string(buf[:n])
		}
	}()
	return got
}

// udpListen opens a UDP socket on addr in ns, closed when the test ends.
func udpListen(t *testing.T, ns, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	if err := inNS(ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", addr)
		return err
	}); err != nil {
		t.Fatalf("udp socket %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// udpRoundTrip sends a datagram from ns to addr and waits for its echo.
func udpRoundTrip(ns, addr string) error {
	var c net.Conn
	if err := inNS(ns, func() (err error) {
		c, err = net.Dial("udp4", addr)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(shortWait))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if err == nil && string(buf[:n]) != "ping" {
		err = fmt.Errorf("echo %q", buf[:n])
	}
	return err
}

// getent resolves name in the pod through glibc (its resolv.conf with
// search list and ndots:5) and returns the addresses.
func (k *k8sNode) getent(name string) ([]string, error) {
	out, err := exec.Command("ip", "netns", "exec", k.Pod, "getent", "ahostsv4", name).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("getent ahostsv4 %s: %v %s", name, err, out)
	}
	var addrs []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == "STREAM" {
			addrs = append(addrs, f[0])
		}
	}
	return addrs, nil
}

func (k *k8sNode) mustGetent(name, want string) {
	k.t.Helper()
	addrs, err := k.getent(name)
	if err != nil || len(addrs) != 1 || addrs[0] != want {
		k.t.Errorf("pod resolves %s: %v, %v; want %s", name, addrs, err, want)
	}
}

// shippedConfig returns the config of the ConfigMap in the shipped
// manifest, with replacements (old, new, old, new...).
func shippedConfig(t *testing.T, replace ...string) string {
	t.Helper()
	data, err := os.ReadFile("../deploy/kubernetes/egressd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg []string
	in := false
	for _, line := range strings.Split(string(data), "\n") {
		switch {
		case strings.TrimSpace(line) == "config.yaml: |":
			in = true
		case in && line != "" && !strings.HasPrefix(line, "    "):
			in = false
		case in:
			cfg = append(cfg, strings.TrimPrefix(line, "    "))
		}
	}
	if len(cfg) == 0 {
		t.Fatal("no config.yaml in the manifest's ConfigMap")
	}
	out := strings.Join(cfg, "\n") + "\n"
	for i := 0; i+1 < len(replace); i += 2 {
		if !strings.Contains(out, replace[i]) {
			t.Fatalf("the shipped config has no %q", replace[i])
		}
		out = strings.Replace(out, replace[i], replace[i+1], 1)
	}
	return out
}

// setConfigMap writes body as the kubelet updates a ConfigMap volume: a
// new timestamped directory, a "..data_tmp" symlink to it renamed over
// "..data", the old directory removed; config.yaml -> ..data/config.yaml
// never changes. It returns the path egressd reads.
func (k *k8sNode) setConfigMap(body string) string {
	k.t.Helper()
	k.gen++
	gen := fmt.Sprintf("..2026_11_27_10_00_%02d.%d", k.gen, 100000+k.gen)
	if err := os.Mkdir(filepath.Join(k.cfgDir, gen), 0o755); err != nil {
		k.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(k.cfgDir, gen, "config.yaml"), []byte(body), 0o644); err != nil {
		k.t.Fatal(err)
	}
	old, _ := os.Readlink(filepath.Join(k.cfgDir, "..data"))
	tmp := filepath.Join(k.cfgDir, "..data_tmp")
	if err := os.Symlink(gen, tmp); err != nil {
		k.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(k.cfgDir, "..data")); err != nil {
		k.t.Fatal(err)
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(k.cfgDir, old)); err != nil {
			k.t.Fatal(err)
		}
	}
	path := filepath.Join(k.cfgDir, "config.yaml")
	if _, err := os.Lstat(path); err != nil {
		if err := os.Symlink("..data/config.yaml", path); err != nil {
			k.t.Fatal(err)
		}
	}
	return path
}

// k8sEnv adapts the shipped config to the lab: its upstream, paths in the
// lab's directory, and metrics.
func (k *k8sNode) k8sEnv() []string {
	return []string{
		"EGRESSD_DNS_UPSTREAMS=" + upstreamDNS,
		"EGRESSD_STATE_DIR=" + filepath.Join(k.Dir, "state"),
		"EGRESSD_CONTROL_SOCKET=" + filepath.Join(k.Dir, "egressd.sock"),
		"EGRESSD_METRICS_LISTEN=127.0.0.1:9253",
		"EGRESSD_LOG_LEVEL=debug",
	}
}

// The shipped ConfigMap on a node: cluster DNS through glibc's search
// path, services, pods on another node over TCP and UDP, the API server
// through its service address; external names allowed or refused; DNS to
// any server, the cluster DNS service address included, ends at egressd.
func TestKubernetesNode(t *testing.T) {
	k := newK8sNode(t)
	k.env = k.k8sEnv()
	cfg := k.setConfigMap(shippedConfig(t, "mode: audit", "mode: enforce"))
	k.startDaemon(cfg)

	// Cluster names through glibc: search-path expansions go to the
	// cluster DNS (NXDOMAIN) and come back as it answers.
	k.mustGetent("kubernetes.default.svc.cluster.local", "10.96.0.1")
	k.mustGetent("kubernetes.default", "10.96.0.1")
	k.mustGetent("web", "10.96.0.20")
	if r, err := query(k.Pod, "10.96.0.10:53", "_https._tcp.kubernetes.default.svc.cluster.local", dns.TypeSRV, "tcp"); err != nil || len(r.Answer) != 1 {
		t.Errorf("SRV of the API server over TCP: %v, %v", r, err)
	}
	if r, err := query(k.Pod, "10.96.0.10:53", "nosuch.apps.svc.cluster.local", dns.TypeA, "udp"); err != nil || r.Rcode != dns.RcodeNameError {
		t.Errorf("unknown cluster name: %v, %v; want the cluster DNS's NXDOMAIN", r, err)
	}
	// The API server through its service address, a service, and a pod
	// on the other node on ports that are not 443, TCP and UDP.
	k.mustReach(k.Pod, "10.96.0.1:443")
	k.mustReach(k.Pod, "10.96.0.20:8080")
	k.mustReach(k.Pod, remotePodIP+":5432")
	for _, addr := range []string{remotePodIP + ":9999", "10.96.0.20:9999"} {
		if err := udpRoundTrip(k.Pod, addr); err != nil {
			t.Errorf("pod -> udp %s: %v", addr, err)
		}
	}
	// External names: allowed ones resolve and connect on 443 only.
	k.mustGetent("westus.api.cognitive.microsoft.com", "203.0.113.10")
	k.mustReach(k.Pod, "203.0.113.10:443")
	k.mustNotReach(k.Pod, "203.0.113.10:80")
	if addrs, err := k.getent("www.example.com"); err == nil {
		t.Errorf("unlisted name resolved in the pod: %v", addrs)
	}
	k.mustNotReach(k.Pod, "203.0.113.50:443")
	k.waitLog("blocked connection", "from=10.244.0.2", "to=203.0.113.50:443", "interface=cni0")
	// DNS to another resolver, and to the cluster DNS service address,
	// ends at egressd: the cluster DNS serves only cluster.local and
	// would refuse the vendor's name, the other resolver would answer
	// www.example.com.
	if r, err := query(k.Pod, otherDNS+":53", "www.example.com", dns.TypeA, "udp"); err != nil || r.Rcode != dns.RcodeRefused {
		t.Errorf("direct query to another resolver: %v, %v; want egressd's REFUSED", r, err)
	}
	for _, network := range []string{"udp", "tcp"} {
		if r, err := query(k.Pod, "10.96.0.10:53", "westus.api.cognitive.microsoft.com", dns.TypeA, network); err != nil || len(addrs(r)) != 1 {
			t.Errorf("external name from the cluster DNS address over %s: %v, %v; want egressd's answer", network, r, err)
		}
	}
	// explain answers for the cluster ranges.
	for q, want := range map[string]string{
		remotePodIP + ":9999/udp":    `allowed: 10.244.1.5 is in allow.cidrs "10.244.0.0/16 any any"`,
		"web.apps.svc.cluster.local": "is in forwarded zone cluster.local",
		"203.0.113.50:443":           "blocked:",
	} {
		if out, err := k.runEgressd("explain", q, "--config", cfg); err != nil || !strings.Contains(out, want) {
			t.Errorf("explain %s: %v %s, want %q", q, err, out, want)
		}
	}
}

// The ConfigMap drives egressd: audit mode lets an unlisted destination
// through, logged and counted as would_block; a switch to enforce (a
// kubelet symlink swap) blocks it and keeps the learned addresses; a
// swap that adds a name opens it within seconds; a bad file keeps the old
// config.
func TestKubernetesConfigMapAuditThenEnforce(t *testing.T) {
	k := newK8sNode(t)
	k.env = k.k8sEnv()
	audit := shippedConfig(t) // the manifest ships in audit mode
	if !strings.Contains(audit, "mode: audit") {
		t.Fatal("the shipped ConfigMap does not start in audit mode")
	}
	cfg := k.setConfigMap(audit)
	k.startDaemon(cfg)
	k.waitLog("AUDIT MODE: egress is NOT enforced")
	if out, _ := k.runEgressd("status", "--config", cfg); !strings.Contains(out, "AUDIT: egress is NOT enforced") {
		t.Errorf("status does not say egress is not enforced:\n%s", out)
	}

	// Audit: the unlisted name is answered (would-refuse), its address
	// reachable, the connection logged and counted as would_block.
	k.mustGetent("www.example.com", "203.0.113.50")
	k.waitLog("would refuse name", "www.example.com")
	k.mustReach(k.Pod, "203.0.113.50:443")
	k.waitLog("would block connection", "to=203.0.113.50:443", "would_block=true", "reason=not-answered")
	m := scrape(t, k.Lab, "127.0.0.1:9253")
	if m[`egressd_would_block_connections_total{reason="not-answered",rule="",source="container"}`] < 1 || m["egressd_enforcing"] != 0 ||
		m[`egressd_dns_queries_total{result="would_refuse"}`] < 1 {
		t.Errorf("audit metrics: would_block %v, enforcing %v, would_refuse %v",
			m[`egressd_would_block_connections_total{reason="not-answered",rule="",source="container"}`], m["egressd_enforcing"],
			m[`egressd_dns_queries_total{result="would_refuse"}`])
	}
	if m[`egressd_blocked_connections_total{reason="not-answered",rule="",source="container"}`] != 0 {
		t.Errorf("audit mode counted a blocked connection")
	}
	k.mustGetent("westus.api.cognitive.microsoft.com", "203.0.113.10") // learned

	// Enforce, by a ConfigMap update.
	start := time.Now()
	k.setConfigMap(strings.Replace(audit, "mode: audit", "mode: enforce", 1))
	k.waitFor("enforce mode after the ConfigMap swap", 10*time.Second, func() error {
		if dial(k.Pod, "203.0.113.50:443", 500*time.Millisecond) == nil {
			return fmt.Errorf("still reachable")
		}
		return nil
	})
	t.Logf("enforced %v after the swap", time.Since(start).Round(10*time.Millisecond))
	k.waitLog("config reloaded", "mode=enforce")
	k.mustReach(k.Pod, "203.0.113.10:443") // learned in audit mode, kept, no new query
	if addrs, err := k.getent("www.example.com"); err == nil {
		t.Errorf("unlisted name still answered in enforce mode: %v", addrs)
	}
	if m := scrape(t, k.Lab, "127.0.0.1:9253"); m["egressd_enforcing"] != 1 {
		t.Errorf("egressd_enforcing = %v after the switch", m["egressd_enforcing"])
	}

	// A name added to the ConfigMap opens within seconds.
	enforce := strings.Replace(audit, "mode: audit", "mode: enforce", 1)
	withName := strings.Replace(enforce, `"translatoronprem.blob.core.windows.net"]`, `"translatoronprem.blob.core.windows.net", "www.example.com"]`, 1)
	if withName == enforce {
		t.Fatal("could not add a name to the shipped config")
	}
	start = time.Now()
	k.setConfigMap(withName)
	k.waitFor("the added name to resolve", 10*time.Second, func() error {
		_, err := k.getent("www.example.com")
		return err
	})
	t.Logf("added name resolved %v after the swap", time.Since(start).Round(10*time.Millisecond))
	k.mustReach(k.Pod, "203.0.113.50:443")

	// A bad file: logged, the old config stays in force.
	k.setConfigMap(strings.Replace(withName, "mode: enforce", "mode: enforcing", 1))
	k.waitLog("reload failed; the old config stays in force", `firewall.mode: \"enforcing\"`)
	k.mustGetent("www.example.com", "203.0.113.50")
	k.mustNotReach(k.Pod, "203.0.113.31:443")
}
