package test

// The embedded profiles end to end, with the real tools: egressd runs with
//
//	allow: {include: [azure-ai-containers, ntp]}
//
// and firewall.host true, and
//   - TestProfileAzureAIContainers: a Docker container reaches its metering
//     endpoints; the host's dockerd, in the cgroup /system.slice/docker.service,
//     pulls an image from a real registry (Debian's docker-registry) served
//     as mcr.microsoft.com with TLS from a lab CA, its blobs redirected to
//     westus2.data.mcr.microsoft.com as MCR does; a container is refused
//     mcr.microsoft.com and cannot connect to the registry's address even
//     after dockerd resolved it, and neither can a host process outside
//     docker.service;
//   - TestProfileNTP: chronyd on the host syncs over UDP 123 with a chronyd
//     of the lab's internet named 0.pool.ntp.org or time.windows.com; an
//     unlisted name (ntp.example.com) is refused, and that server's address,
//     never answered, stays closed; containers get no NTP.
//
// Both run their daemons in the lab's namespaces (the engine lab's mount
// namespace for dockerd, whose /etc/docker is the lab's, and for the NTP
// client, whose /etc/resolv.conf is the lab's) and end them, with the
// cgroups they created, when the test ends.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/rules"
)

// The profile lab's names and addresses (in the internet's 203.0.113.0/24).
const (
	mcrName      = "mcr.microsoft.com"
	mcrAddr      = "203.0.113.80"
	mcrDataName  = "westus2.data.mcr.microsoft.com" // where MCR's blobs come from
	mcrDataAddr  = "203.0.113.81"
	mcrImage     = mcrName + "/azure-cognitive-services/egressd-lab:1.0"
	meteringName = "westus.api.cognitive.microsoft.com"
	meteringAddr = "203.0.113.10" // labZones
	// The registry and the blob server listen on these ports of their
	// addresses and are reached on 443 through a DNAT of the internet's:
	// the lab's echo listener holds 0.0.0.0:443 there.
	registryPort = 5443
	blobPort     = 5444

	ntpPoolName  = "0.pool.ntp.org"
	ntpPoolAddr  = "203.0.113.90"
	ntpWinName   = "time.windows.com"
	ntpWinAddr   = "203.0.113.92"
	ntpOtherName = "ntp.example.com" // not in the profile
	ntpOtherAddr = "203.0.113.91"    // the same chronyd, never answered
)

// profileZones are the upstream's zones of the profile lab, added to
// labZones.
func profileZones() map[string]string {
	return map[string]string{
		"mcr.microsoft.com": "@ A " + mcrAddr + "\nwestus2.data A " + mcrDataAddr + "\n",
		"pool.ntp.org":      "0 A " + ntpPoolAddr + "\n",
		"windows.com":       "time A " + ntpWinAddr + "\n",
		"example.com":       labZones()["example.com"] + "ntp A " + ntpOtherAddr + "\n",
	}
}

// profileConfig writes the lab's config with the profiles instead of the
// flat allow keys, and the host filtered.
func profileConfig(l *Lab) string {
	l.t.Helper()
	_, rest, ok := strings.Cut(l.baseConfig(), "\ndns:\n")
	if !ok {
		l.t.Fatal("baseConfig has no dns section")
	}
	cfg := "allow:\n  include: [azure-ai-containers, ntp]\ndns:\n" + rest
	cfg = strings.Replace(cfg, "firewall:\n", "firewall:\n  host: true\n", 1)
	return l.writeConfig("profiles.yaml", cfg)
}

// needTool skips (fails under CI) t when tool is not in the engines' PATH.
func needTool(t *testing.T, tool, deb string) {
	t.Helper()
	if lookTool(tool) == "" {
		need(t, "profile test: %s is not installed (apt-get install %s)", tool, deb)
	}
}

// inRuleSet reports whether addr is in the learned set of rule.
func (l *Lab) inRuleSet(rule, addr string) bool {
	l.t.Helper()
	out := l.in(l.Host, "nft list set inet egressd "+rules.LearnedSet(rule, netip.MustParseAddr(addr)))
	return strings.Contains(out, " "+addr+" ") || strings.Contains(out, "{ "+addr) || strings.Contains(out, ", "+addr)
}

// evidence logs egressd's ruleset: what a failed check saw.
func (l *Lab) evidence(t *testing.T) {
	if t.Failed() {
		out, _ := exec.Command("ip", "netns", "exec", l.Host, "nft", "list", "table", "inet", "egressd").CombinedOutput()
		t.Logf("nft list table inet egressd:\n%s", out)
	}
}

// bgProc is a daemon the profile lab runs in a network namespace; it is
// killed when the test ends.
type bgProc struct {
	name string
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan struct{}
}

// startIn starts args in namespace ns.
func (l *Lab) startIn(ns, name string, args ...string) *bgProc {
	l.t.Helper()
	p := &bgProc{name: name, log: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	p.cmd.Env = append(os.Environ(), "PATH="+enginePath)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		l.t.Fatalf("%s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t := l.t
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("%s log (last 8 KiB):\n%s", name, tail(p.log.String(), 8<<10))
		}
	})
	return p
}

// stop kills the daemon and waits for it; it may be called again.
func (p *bgProc) stop() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// exited returns an error if the daemon is no longer running.
func (p *bgProc) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: %v\n%s", p.name, p.cmd.ProcessState, tail(p.log.String(), 4<<10))
	default:
		return nil
	}
}

// ---- TLS ----

// labCA is the lab's certificate authority.
type labCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
	pool    *x509.CertPool
}

func newLabCA(t *testing.T) *labCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "egressd lab CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca := &labCA{cert: cert, key: key, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pool: x509.NewCertPool()}
	ca.pool.AddCert(cert)
	return ca
}

// issue writes a server certificate for names and its key into dir and
// returns their paths.
func (ca *labCA) issue(t *testing.T, dir, base string, names ...string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// httpsGet fetches https://host/path from namespace ns, connecting to
// addr and trusting only the lab's CA.
func httpsGet(ns, addr, host, path string, pool *x509.CertPool) (int, error) {
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: host},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var c net.Conn
			err := inNS(ns, func() (err error) {
				c, err = (&net.Dialer{Timeout: shortWait}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := c.Get("https://" + host + path)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// ---- the registry ----

// mcrLab is the registry served as mcr.microsoft.com and the blob server
// served as westus2.data.mcr.microsoft.com.
type mcrLab struct {
	reg *bgProc
	mu  sync.Mutex
	// blobGets are the paths the blob server was asked (GET).
	blobGets []string
}

// startMCR runs docker-registry in the internet namespace with TLS
// (certificate of the lab's CA), its blobs redirected (storage middleware
// redirect) to a blob server that serves the registry's storage, and
// waits until both answer on 443 from the host's namespace.
func startMCR(l *Lab, ca *labCA) *mcrLab {
	t := l.t
	t.Helper()
	dir := filepath.Join(l.Dir, "mcr")
	storage := filepath.Join(dir, "storage")
	if err := os.MkdirAll(storage, 0o755); err != nil {
		t.Fatal(err)
	}
	crt, key := ca.issue(t, dir, "mcr", mcrName, "*.data."+mcrName)
	conf := fmt.Sprintf(`version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
middleware:
  storage:
    - name: redirect
      options:
        baseurl: https://%s
http:
  addr: %s:%d
  secret: egressd-lab
  tls:
    certificate: %s
    key: %s
`, storage, mcrDataName, mcrAddr, registryPort, crt, key)
	cp := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cp, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// 443 of both addresses to the servers' ports.
	nat := filepath.Join(dir, "nat.nft")
	rs := fmt.Sprintf(`table ip egressd_lab_mcr {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %s tcp dport 443 dnat to %[1]s:%d
		ip daddr %s tcp dport 443 dnat to %[3]s:%d
	}
}
`, mcrAddr, registryPort, mcrDataAddr, blobPort)
	if err := os.WriteFile(nat, []byte(rs), 0o644); err != nil {
		t.Fatal(err)
	}
	l.in(l.Inet, "nft -f "+nat)

	m := &mcrLab{}
	// The blob server: the registry's storage, as a CDN would serve it.
	cert, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	files := http.FileServer(http.Dir(storage))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet {
				m.mu.Lock()
				m.blobGets = append(m.blobGets, r.URL.Path)
				m.mu.Unlock()
			}
			files.ServeHTTP(w, r)
		}),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		ReadHeaderTimeout: 10 * time.Second,
		// Plain TCP probes (dial) end without a handshake.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	var ln net.Listener
	if err := inNS(l.Inet, func() (err error) {
		ln, err = net.Listen("tcp4", fmt.Sprintf("%s:%d", mcrDataAddr, blobPort))
		return err
	}); err != nil {
		t.Fatalf("blob server: %v", err)
	}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })

	m.reg = l.startIn(l.Inet, "docker-registry", "docker-registry", "serve", cp)
	l.waitFor("the registry as https://"+mcrName+"/v2/", 30*time.Second, func() error {
		if err := m.reg.exited(); err != nil {
			t.Fatal(err)
		}
		code, err := httpsGet(l.Host, mcrAddr+":443", mcrName, "/v2/", ca.pool)
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("HTTP %d", code)
		}
		return err
	})
	l.waitFor("the blob server as https://"+mcrDataName+"/", 10*time.Second, func() error {
		_, err := httpsGet(l.Host, mcrDataAddr+":443", mcrDataName, "/", ca.pool)
		return err
	})
	return m
}

// blobGetsSince returns the blob paths asked with GET from index n on.
func (m *mcrLab) blobGetsSince(n int) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.blobGets[n:])
}

func (m *mcrLab) blobGetCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.blobGets)
}

// dockerServiceCgroup returns the cgroup v2 directory
// /system.slice/docker.service, created if missing and then removed when
// the test ends; it skips t when a docker.service (systemd's) runs there.
// Call it before newEngineLab: its cleanup must come after the engine
// lab's, which ends the processes in it.
func dockerServiceCgroup(t *testing.T, cg2 string) string {
	t.Helper()
	dir := filepath.Join(cg2, "system.slice", "docker.service")
	if procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil && len(bytes.TrimSpace(procs)) > 0 {
		t.Skipf("the cgroup %s has processes (the machine's docker.service runs): the lab's dockerd must run there; "+
			"stop it (systemctl disable --now docker.service docker.socket) to run this test", dir)
	}
	var created []string
	for _, d := range []string{filepath.Dir(dir), dir} {
		switch err := os.Mkdir(d, 0o755); {
		case err == nil:
			created = append(created, d)
		case !errors.Is(err, fs.ErrExist):
			t.Fatalf("cgroup %s: %v", d, err)
		}
	}
	t.Cleanup(func() {
		// A cgroup goes once its processes have: a few tries.
		for i := len(created) - 1; i >= 0; i-- {
			var err error
			for try := 0; try < 50; try++ {
				if err = os.Remove(created[i]); err == nil || errors.Is(err, fs.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				t.Errorf("cgroup %s left: %v", created[i], err)
			}
		}
	})
	return dir
}

// trustLabCA mounts a /etc/docker of the lab's over the machine's in the
// lab's mount namespace, with certs.d/mcr.microsoft.com/ca.crt the lab's
// CA: dockerd trusts it for mcr.microsoft.com (and the hosts it redirects
// to). The machine's /etc is not written.
func (e *engineLab) trustLabCA(ca *labCA) {
	e.t.Helper()
	dir := filepath.Join(e.dir, "etc-docker")
	certs := filepath.Join(dir, "certs.d", mcrName)
	if err := os.MkdirAll(certs, 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certs, "ca.crt"), ca.certPEM, 0o644); err != nil {
		e.t.Fatal(err)
	}
	e.must("mount", "--bind", dir, "/etc/docker")
}

func TestProfileAzureAIContainers(t *testing.T) {
	needEngine(t, "docker", dockerClient())
	needTool(t, "docker-registry", "docker-registry")
	cg2 := cgroup2Mount()
	if cg2 == "" {
		need(t, "profile test: no cgroup v2 hierarchy is mounted (rules from docker.service match cgroup v2 paths)")
	}
	if fi, err := os.Stat("/etc/docker"); err != nil || !fi.IsDir() {
		need(t, "profile test: /etc/docker does not exist: the lab mounts its own over it for dockerd (apt-get install docker.io)")
	}
	l := newLab(t, profileZones())
	svc := dockerServiceCgroup(t, cg2)
	ca := newLabCA(t)
	mcr := startMCR(l, ca)
	e := newEngineLab(l)
	e.trustLabCA(ca)
	dk := e.docker()
	// The host's dockerd, as systemd runs it: in docker.service.
	dk.d.cg, dk.cg = svc, "/system.slice/docker.service"
	dk.d.start()
	if own, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", dk.d.cmd.Process.Pid)); !slices.Contains(strings.Split(string(own), "\n"), "0::/system.slice/docker.service") {
		t.Fatalf("the lab's dockerd is not in /system.slice/docker.service:\n%s", own)
	}
	dk.must("import", e.busyboxTarball(), engineImage)

	// Infrastructure, before egressd: the image MCR serves, busybox and a
	// layer of its own (no local copy afterwards), pushed to the registry.
	marker := fmt.Sprintf("egressd-lab-%d", time.Now().UnixNano())
	dk.must("run", "--name", "mcr-build", "--network", "none", engineImage, "sh", "-c", "echo "+marker+" >/marker")
	dk.must("commit", "mcr-build", mcrImage)
	dk.must("rm", "mcr-build")
	dk.must("push", mcrImage)
	dk.must("rmi", mcrImage)
	if out, err := dk.run("", "image", "inspect", mcrImage); err == nil {
		t.Fatalf("%s is still present locally after docker rmi:\n%s", mcrImage, out)
	}

	// A container on docker0; without egressd it reaches the registry.
	dk.must("run", "-d", "--name", "c0", "--stop-timeout", "1", engineImage, "sleep", "1000000")
	c0, _ := dk.client("docker container (c0)", "c0", "c0", false)
	for _, a := range []string{mcrAddr, mcrDataAddr} {
		if err := dial(c0.ns, hostPort(a, 443), shortWait); err != nil {
			t.Fatalf("before egressd: c0 -> %s:443: %v (the lab is broken)", a, err)
		}
	}

	e.egressd(profileConfig(l))
	t.Cleanup(func() { l.evidence(t) })

	e.sub(t, "containers reach the metering endpoints", func(t *testing.T) {
		if err := dial(c0.ns, hostPort(meteringAddr, 443), shortWait); err == nil {
			t.Errorf("c0 -> %s:443 connected before anyone asked %s", meteringAddr, meteringName)
		}
		r, err := query(c0.ns, c0.resolver, meteringName, dns.TypeA, "udp")
		if err != nil || r.Rcode != dns.RcodeSuccess || !slices.Equal(addrs(r), []string{meteringAddr}) {
			t.Fatalf("c0: %s A via %s: %s, want NOERROR [%s]", meteringName, c0.resolver, brief(r, err), meteringAddr)
		}
		if err := dial(c0.ns, hostPort(meteringAddr, 443), shortWait); err != nil {
			t.Errorf("c0 -> %s:443 (%s, just answered): %v", meteringAddr, meteringName, err)
		}
		out := c0.inside("nslookup "+meteringName, "echo hi | nc -w 2 "+meteringName+" 443")
		if !strings.Contains(out[0], "Address: "+meteringAddr) {
			t.Errorf("c0: busybox nslookup %s: want %s\n%s", meteringName, meteringAddr, out[0])
		}
		if !strings.Contains(out[1], "hi") {
			t.Errorf("c0: busybox nc %s 443: no echo\n%s", meteringName, out[1])
		}
		if !l.inRuleSet("metering", meteringAddr) {
			t.Errorf("%s is not in the set of rule metering", meteringAddr)
		}
		if l.inRuleSet("mcr", meteringAddr) {
			t.Errorf("%s (a container's answer) is in the set of rule mcr", meteringAddr)
		}
	})

	e.sub(t, "dockerd in docker.service pulls from mcr.microsoft.com", func(t *testing.T) {
		from := mcr.blobGetCount()
		start := time.Now()
		out := dk.must("pull", mcrImage)
		t.Logf("docker pull %s (%v):\n%s", mcrImage, time.Since(start).Round(time.Millisecond), out)
		if got := dk.must("run", "--rm", "--network", "none", mcrImage, "cat", "/marker"); got != marker {
			t.Errorf("the pulled image's /marker: %q, want %q", got, marker)
		}
		// The blobs came from the redirect, as MCR's come from
		// *.data.mcr.microsoft.com.
		var blobs []string
		for _, p := range mcr.blobGetsSince(from) {
			if strings.Contains(p, "/docker/registry/v2/blobs/") {
				blobs = append(blobs, p)
			}
		}
		if len(blobs) == 0 {
			t.Errorf("docker pull fetched no blob from %s (the registry's redirect)", mcrDataName)
		}
		for _, a := range []string{mcrAddr, mcrDataAddr} {
			if !l.inRuleSet("mcr", a) {
				t.Errorf("%s is not in the set of rule mcr after the pull", a)
			}
			if l.inRuleSet("metering", a) {
				t.Errorf("%s (dockerd's answer) is in the set of rule metering", a)
			}
		}
	})

	e.sub(t, "containers cannot reach the registry", func(t *testing.T) {
		for _, name := range []string{mcrName, mcrDataName} {
			r, err := query(c0.ns, c0.resolver, name, dns.TypeA, "udp")
			if err != nil || r.Rcode != dns.RcodeRefused || len(r.Answer) > 0 {
				t.Errorf("c0: %s A via %s: %s, want REFUSED", name, c0.resolver, brief(r, err))
			}
		}
		out := c0.inside("nslookup "+mcrName, "echo hi | nc -w 2 "+mcrAddr+" 443")
		if strings.Contains(out[0], mcrAddr) {
			t.Errorf("c0: busybox nslookup %s answered:\n%s", mcrName, out[0])
		}
		if strings.Contains(out[1], "hi") {
			t.Errorf("c0: busybox nc %s 443 (the registry) connected", mcrAddr)
		}
		// dockerd resolved both: they are open for docker.service only.
		for _, a := range []string{mcrAddr, mcrDataAddr} {
			if !l.inRuleSet("mcr", a) {
				t.Errorf("%s is not in the set of rule mcr: the check below proves nothing", a)
			}
			for _, ns := range []string{c0.ns, l.Ctr} {
				if err := dial(ns, hostPort(a, 443), shortWait); err == nil {
					t.Errorf("%s -> %s:443 connected (dockerd's answer, rule mcr)", ns, a)
				}
			}
		}
	})

	e.sub(t, "host processes outside docker.service cannot reach the registry", func(t *testing.T) {
		own, _ := os.ReadFile("/proc/self/cgroup")
		if strings.Contains(string(own), "docker.service") {
			t.Fatalf("the test runs in docker.service:\n%s", own)
		}
		for _, name := range []string{mcrName, mcrDataName} {
			r := l.resolve(l.Host, name, dns.TypeA)
			if r.Rcode != dns.RcodeRefused || len(r.Answer) > 0 {
				t.Errorf("host: %s A: %s, want REFUSED", name, brief(r, nil))
			}
		}
		for _, a := range []string{mcrAddr, mcrDataAddr} {
			if err := dial(l.Host, hostPort(a, 443), shortWait); err == nil {
				t.Errorf("host (outside docker.service) -> %s:443 connected", a)
			}
		}
		if code, err := httpsGet(l.Host, mcrAddr+":443", mcrName, "/v2/", ca.pool); err == nil {
			t.Errorf("host (outside docker.service): https://%s/v2/: HTTP %d, want no connection", mcrName, code)
		}
	})
}

// ---- NTP ----

// ntpQuery sends one NTP client request from ns to addr and returns the
// server's stratum; an unsynchronised server is an error.
func ntpQuery(ns, addr string) (int, error) {
	var c net.Conn
	if err := inNS(ns, func() (err error) {
		c, err = net.Dial("udp4", addr)
		return err
	}); err != nil {
		return 0, err
	}
	defer c.Close()
	req := make([]byte, 48)
	req[0] = 4<<3 | 3 // version 4, client
	_ = c.SetDeadline(time.Now().Add(shortWait))
	if _, err := c.Write(req); err != nil {
		return 0, err
	}
	resp := make([]byte, 128)
	n, err := c.Read(resp)
	if err != nil {
		return 0, err
	}
	if n < 48 || resp[0]&7 != 4 {
		return 0, fmt.Errorf("not an NTP server reply (%d bytes, mode %d)", n, resp[0]&7)
	}
	if leap, stratum := resp[0]>>6, int(resp[1]); leap == 3 || stratum == 0 {
		return stratum, fmt.Errorf("server unsynchronised (leap %d, stratum %d)", leap, stratum)
	}
	return int(resp[1]), nil
}

// chronyClient runs chronyd as an NTP client in the lab's host namespaces
// (network, and the engine lab's mount namespace for the lab's
// resolv.conf). Its files are in /run/chrony, a directory of the lab's
// there: the paths Debian's AppArmor profile of chronyd allows.
type chronyClient struct {
	e   *engineLab
	dir string // mounted on /run/chrony
}

func newChronyClient(e *engineLab) *chronyClient {
	e.t.Helper()
	c := &chronyClient{e: e, dir: filepath.Join(e.dir, "chrony")}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	e.must("mkdir", "-p", "/run/chrony")
	e.must("mount", "--bind", c.dir, "/run/chrony")
	return c
}

// sync runs `chronyd -Q` (measure the offset once, set nothing) with one
// server line, for at most timeout seconds, and returns its output and
// error.
func (c *chronyClient) sync(server string, timeout int) (string, error) {
	c.e.t.Helper()
	body := fmt.Sprintf("server %s iburst\npidfile /run/chrony/client.pid\n", server)
	if err := os.WriteFile(filepath.Join(c.dir, "client.conf"), []byte(body), 0o644); err != nil {
		c.e.t.Fatal(err)
	}
	return c.e.runIn("", "chronyd", "-d", "-u", "root", "-Q", "-t", fmt.Sprint(timeout), "-f", "/run/chrony/client.conf")
}

func TestProfileNTP(t *testing.T) {
	needTool(t, "chronyd", "chrony")
	for _, tool := range []string{"nsenter", "unshare"} {
		needTool(t, tool, "util-linux")
	}
	l := newLab(t, profileZones())
	dir := filepath.Join(l.Dir, "chrony-server")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "server.conf")
	body := "local stratum 1\nallow all\nport 123\ncmdport 0\npidfile /run/chrony/server.pid\n"
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	// A time server of the internet on every address (0.pool.ntp.org,
	// time.windows.com and ntp.example.com are all its); it sets no clock.
	// In a mount namespace of its own, its files in /run/chrony (as
	// AppArmor's profile of chronyd wants them), not the machine's.
	srv := l.startIn(l.Inet, "chronyd (server)", "unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs lab-run /run && mkdir /run/chrony && mount --bind "$0" /run/chrony && exec chronyd -x -d -u root -f /run/chrony/server.conf`, dir)
	for _, a := range []string{ntpPoolAddr, ntpWinAddr, ntpOtherAddr} {
		l.waitFor("the lab's NTP server on "+a, 30*time.Second, func() error {
			if err := srv.exited(); err != nil {
				t.Fatal(err)
			}
			_, err := ntpQuery(l.Host, a+":123")
			return err
		})
	}
	e := newEngineLab(l) // the lab's resolv.conf for the client
	client := newChronyClient(e)
	e.egressd(profileConfig(l))
	t.Cleanup(func() { l.evidence(t) })

	for _, name := range []string{ntpPoolName, ntpWinName} {
		e.sub(t, "chronyd syncs with "+name, func(t *testing.T) {
			start := time.Now()
			out, err := client.sync(name, 20)
			if err != nil || !strings.Contains(out, "System clock wrong by") {
				t.Fatalf("chronyd -Q with server %s: %v, want an offset:\n%s", name, err, out)
			}
			t.Logf("chronyd -Q with server %s (%v): %s", name, time.Since(start).Round(time.Millisecond),
				strings.TrimSpace(grepLine(out, "System clock wrong by")))
		})
	}
	e.sub(t, "the allowed servers' addresses are open to the host only", func(t *testing.T) {
		for _, a := range []string{ntpPoolAddr, ntpWinAddr} {
			if !l.inRuleSet("ntp", a) {
				t.Errorf("%s is not in the set of rule ntp", a)
			}
			if _, err := ntpQuery(l.Host, a+":123"); err != nil {
				t.Errorf("host -> %s:123/udp (answered): %v", a, err)
			}
			if _, err := ntpQuery(l.Ctr, a+":123"); err == nil {
				t.Errorf("container -> %s:123/udp: answered, want blocked (rule ntp is the host's)", a)
			}
		}
		r := l.resolve(l.Ctr, ntpPoolName, dns.TypeA)
		if r.Rcode != dns.RcodeRefused || len(r.Answer) > 0 {
			t.Errorf("container: %s A: %s, want REFUSED (rule ntp is the host's)", ntpPoolName, brief(r, nil))
		}
	})
	e.sub(t, "an unlisted name is refused", func(t *testing.T) {
		r := l.resolve(l.Host, ntpOtherName, dns.TypeA)
		if r.Rcode != dns.RcodeRefused || len(r.Answer) > 0 {
			t.Errorf("host: %s A: %s, want REFUSED", ntpOtherName, brief(r, nil))
		}
		out, err := client.sync(ntpOtherName, 6)
		if err == nil || strings.Contains(out, "System clock wrong by") {
			t.Errorf("chronyd -Q with server %s (unlisted): %v, want no sync:\n%s", ntpOtherName, err, out)
		}
	})
	e.sub(t, "a server's address never answered stays closed", func(t *testing.T) {
		if l.inRuleSet("ntp", ntpOtherAddr) {
			t.Fatalf("%s is in the set of rule ntp, never answered", ntpOtherAddr)
		}
		// It serves time (see above), but not to the host through egressd.
		if _, err := ntpQuery(l.Host, ntpOtherAddr+":123"); err == nil {
			t.Errorf("host -> %s:123/udp (never answered): answered", ntpOtherAddr)
		}
		out, err := client.sync(ntpOtherAddr, 6)
		if err == nil || strings.Contains(out, "System clock wrong by") {
			t.Errorf("chronyd -Q with server %s (never answered): %v, want no sync:\n%s", ntpOtherAddr, err, out)
		}
	})
}

// grepLine returns the first line of s containing sub.
func grepLine(s, sub string) string {
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			return line
		}
	}
	return ""
}
