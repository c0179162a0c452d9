package test

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

const shortWait = 2 * time.Second

func nsRole(l *Lab, ns string) string {
	switch ns {
	case l.Ctr:
		return "container"
	case l.Host:
		return "host"
	}
	return "internet"
}

func withoutExpiry(s string) string {
	return regexp.MustCompile(` (timeout|expires) [0-9dhms]+`).ReplaceAllString(s, "")
}

func TestApplyOpensPinnedNameOnly(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", l.baseConfig())

	// Before egressd, everything is open.
	l.mustReach(l.Ctr, "203.0.113.31:443")

	out, err := l.runEgressd("apply", "--config", cfg)
	if err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	if !strings.Contains(out, "pinned translatoronprem.blob.core.windows.net: 1 addresses") {
		t.Errorf("apply summary does not report the pinned name:\n%s", out)
	}
	for _, ns := range []string{l.Ctr, l.Host} {
		l.mustReach(ns, "203.0.113.30:443")    // pinned
		l.mustNotReach(ns, "203.0.113.31:443") // another address
		l.mustNotReach(ns, "203.0.113.30:80")  // pinned address, other port
		l.mustNotReach(ns, "[2001:db8:100::10]:443")
	}

	// Applying twice changes nothing.
	first := l.listing()
	if out, err := l.runEgressd("apply", "--config", cfg); err != nil {
		t.Fatalf("second apply: %v\n%s", err, out)
	}
	if second := l.listing(); second != first {
		t.Errorf("second apply changed the ruleset:\n--- first\n%s\n--- second\n%s", first, second)
	}

	// remove opens egress again and leaves other tables alone.
	l.in(l.Host, "nft add table ip other")
	if out, err := l.runEgressd("remove"); err != nil {
		t.Fatalf("remove: %v\n%s", err, out)
	}
	l.mustReach(l.Ctr, "203.0.113.31:443")
	l.mustReach(l.Host, "203.0.113.31:443")
	if rs := l.in(l.Host, "nft list ruleset"); !strings.Contains(rs, "table ip other") || strings.Contains(rs, "egressd") {
		t.Errorf("after remove, ruleset is:\n%s", rs)
	}
}

func TestApplyKeepsInboundAndHidesProxy(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", l.baseConfig())
	// A container service published on the host's port 8080, the way
	// Docker publishes ports.
	l.listen(l.Ctr, "0.0.0.0:8080")
	l.in(l.Host, "nft add table ip publish")
	l.in(l.Host, "nft add chain ip publish pre { type nat hook prerouting priority dstnat ; }")
	l.in(l.Host, "nft add rule ip publish pre iifname up0 tcp dport 8080 dnat to "+ctrIP+":8080")
	if out, err := l.runEgressd("apply", "--config", cfg); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	l.mustReach(l.Inet, hostUplink+":8080")
	l.mustReach(l.Inet, ctrIP+":8080") // routed straight to the container

	// Even with a process listening on the proxy port, the outside cannot
	// reach it.
	l.listen(l.Host, fmt.Sprintf("0.0.0.0:%d", proxyPort))
	l.mustNotReach(l.Inet, fmt.Sprintf("%s:%d", hostUplink, proxyPort))
	l.mustReach(l.Host, fmt.Sprintf("127.0.0.1:%d", proxyPort))
}

// tableText returns the table block of a printed script without comments.
func tableText(script string) string {
	var kept []string
	inTable := false
	for _, line := range strings.Split(script, "\n") {
		inTable = inTable || strings.HasPrefix(line, "table inet egressd {")
		if inTable && !strings.HasPrefix(strings.TrimSpace(line), "#") {
			kept = append(kept, line)
		}
	}
	return strings.Join(kept, "\n")
}

func TestPrintEqualsInstalledRuleset(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("nopin.yaml", strings.Replace(l.baseConfig(),
		`names: ["translatoronprem.blob.core.windows.net"]`,
		`names: []
  cidrs: ["203.0.113.0/24", "2001:db8::/32 80,8443", "198.51.100.7", "10.244.0.0/16 any", "10.96.0.0/12 udp", "192.168.0.0/16 any 53,30000-32767", {cidr: "fd00::/8", protocol: tcp, ports: any}]`, 1))

	printed, err := l.runEgressd("print", "--config", cfg)
	if err != nil {
		t.Fatalf("print: %v\n%s", err, printed)
	}
	if out, err := l.runEgressd("apply", "--config", cfg); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	if want, got := tableText(printed), l.listing(); got != want {
		t.Errorf("print and nft list after apply differ:\n--- print\n%s\n--- nft list\n%s", want, got)
	}

	// The default config's script, loaded by nft itself, lists as printed
	// (and replaces the table that apply installed).
	printed, err = l.runEgressd("print")
	if err != nil {
		t.Fatalf("print: %v\n%s", err, printed)
	}
	script := l.writeConfig("default.nft", printed)
	l.in(l.Host, "nft -c -f "+script)
	l.in(l.Host, "nft -f "+script)
	if want, got := tableText(printed), l.listing(); got != want {
		t.Errorf("default print and nft list differ:\n--- print\n%s\n--- nft list\n%s", want, got)
	}
}

func TestBadConfigChangesNothing(t *testing.T) {
	l := newLab(t)
	good := l.writeConfig("good.yaml", l.baseConfig())
	if out, err := l.runEgressd("apply", "--config", good); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	before := l.ruleset()
	tests := []struct{ name, yaml, want string }{
		{"unknown key", l.baseConfig() + "colour: blue\n", "colour: unknown key"},
		{"port 70000", strings.Replace(l.baseConfig(), "allow:\n", "allow:\n  ports: [70000]\n", 1), "allow.ports[0]: 70000 is not a TCP port (1-65535)"},
		{"wildcard in the middle", strings.Replace(l.baseConfig(), `"*.cognitive.microsoft.com"`, `"api.*.microsoft.com"`, 1), `allow.domains[0]: "api.*.microsoft.com"`},
		{"bad duration", strings.Replace(l.baseConfig(), "grace: 2s", "grace: two", 1), `dns.grace: "two" is not a duration`},
	}
	for _, tt := range tests {
		for _, cmd := range []string{"apply", "run", "print"} {
			out, err := l.runEgressd(cmd, "--config", l.writeConfig("bad.yaml", tt.yaml))
			if err == nil {
				t.Errorf("%s with %s: exit 0, want failure", cmd, tt.name)
			}
			if !strings.Contains(out, tt.want) {
				t.Errorf("%s with %s: message %q does not name %q", cmd, tt.name, out, tt.want)
			}
		}
	}
	if after := l.ruleset(); after != before {
		t.Errorf("a bad config changed the ruleset:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

// A client that kept one UDP socket talking to its resolver since before
// egressd was applied must not keep that direct path: NAT is decided on a
// flow's first packet, so egressd clears such flows.
func TestApplyRedirectsExistingDNSFlows(t *testing.T) {
	l := newLab(t)
	// Docker's tables exist before egressd: conntrack tracks the flow and
	// gives it its NAT decision (none) on its first packet.
	l.in(l.Host, "nft add table ip docker")
	l.in(l.Host, "nft add chain ip docker prerouting { type nat hook prerouting priority dstnat ; }")
	l.in(l.Host, "nft add chain ip docker forward { type filter hook forward priority filter ; }")
	l.in(l.Host, "nft add rule ip docker forward ct state established,related accept")
	c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
	var conn *dns.Conn
	if err := inNS(l.Ctr, func() (err error) {
		conn, err = c.Dial(upstreamDNS + ":53")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ask := func() *dns.Msg {
		t.Helper()
		m := new(dns.Msg)
		m.SetQuestion("www.example.com.", dns.TypeA)
		r, _, err := c.ExchangeWithConn(m, conn)
		if err != nil {
			t.Fatalf("query on the long-lived socket: %v", err)
		}
		return r
	}
	if r := ask(); len(r.Answer) == 0 {
		t.Fatalf("before egressd the resolver answers: %v", r)
	}
	if out, err := l.runEgressd("apply", "--config", l.writeConfig("egressd.yaml", l.baseConfig())); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	// No proxy runs (apply only): the redirected query gets no answer at
	// all, and certainly not the resolver's.
	m := new(dns.Msg)
	m.SetQuestion("www.example.com.", dns.TypeA)
	if r, _, err := c.ExchangeWithConn(m, conn); err == nil && len(r.Answer) > 0 {
		t.Errorf("the old flow still reaches the resolver after apply: %v", r.Answer)
	}
}
