package test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Rootless engines (rootless Podman and Docker) connect containers through
// a user-mode network helper, slirp4netns or pasta: the container's
// packets become the helper's own sockets in the host's namespace, never
// crossing a bridge. egressd filters them as host processes
// (firewall.host: true): the helper's DNS forwarder is redirected to the
// proxy and its connections meet the same rules. This runs the real
// slirp4netns for a "container" namespace.
func TestRootlessHelperIsFilteredAsHost(t *testing.T) {
	if _, err := exec.LookPath("slirp4netns"); err != nil {
		need(t, "slirp4netns is not installed (apt-get install slirp4netns)")
	}
	l := newLab(t)
	// slirp4netns forwards DNS to the nameservers of the resolv.conf it
	// sees; `ip netns exec` shows it /etc/netns/NS/resolv.conf.
	etc := filepath.Join("/etc/netns", l.Host)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver "+upstreamDNS+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))

	ctr := l.Host + "-rootless"
	l.sh("ip netns add " + ctr)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ctr).Run() })
	helper := exec.Command("ip", "netns", "exec", l.Host, "slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
		"--netns-type=path", "/run/netns/"+ctr, "tap0")
	var out syncBuffer
	helper.Stdout, helper.Stderr = &out, &out
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = helper.Process.Kill(); _ = helper.Wait() })
	// slirp's DNS forwarder at 10.0.2.3, its gateway at 10.0.2.2.
	l.waitFor("slirp4netns to configure the namespace", 10*time.Second, func() error {
		if !strings.Contains(l.in(ctr, "ip -4 route"), "default via 10.0.2.2") {
			return errors.New("no default route yet:\n" + out.String())
		}
		return nil
	})

	l.mustResolve(ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	if r, err := query(ctr, "10.0.2.3:53", "deep.a.b.c.cognitive.microsoft.com", dns.TypeA, "udp"); err != nil || len(addrs(r)) != 1 {
		t.Fatalf("an allowed name through slirp's DNS forwarder: %v %v", r, err)
	}
	for _, server := range []string{"10.0.2.3:53", otherDNS + ":53"} {
		if r, err := query(ctr, server, "www.example.com", dns.TypeA, "udp"); err == nil && len(addrs(r)) > 0 {
			t.Errorf("an unlisted name resolved through %s: %v", server, addrs(r))
		}
	}
	l.mustReach(ctr, "203.0.113.10:443")
	l.mustNotReach(ctr, "203.0.113.31:443")
	l.mustNotReach(ctr, "203.0.113.10:80")
}
