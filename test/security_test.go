package test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

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
	if out, _ := l.runEgressd("status", "--config", cfg); strings.Contains(out, "no usable upstream") {
		t.Errorf("status still says no upstream:\n%s", out)
	}
}
