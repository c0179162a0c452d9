package test

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestBlockedConnectionsAreReported(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")

	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	l.waitLog("blocked connection", "source=container", "interface=docker0", "from="+ctrIP, "to=203.0.113.31:443", "reason=not-answered")
	l.mustNotReach(l.Ctr, "203.0.113.10:80")
	l.waitLog("blocked connection", "to=203.0.113.10:80", "reason=port", "names=westus.api.cognitive.microsoft.com.")
	l.mustNotReach(l.Ctr, "203.0.113.10:853")
	l.waitLog("blocked connection", "to=203.0.113.10:853", "reason=dns-over-tls")
	l.mustNotReach(l.Host, "[2001:db8:100::99]:443")
	l.waitLog("blocked connection", "source=host", "to=[2001:db8:100::99]:443", "reason=not-answered")
}

func TestStatusExplainList(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", l.baseConfig())
	l.startDaemon(cfg)
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")

	out, err := l.runEgressd("status", "--config", cfg)
	if err != nil || !strings.Contains(out, "healthy") || !strings.Contains(out, "ruleset:   in place") || !strings.Contains(out, "upstream:  "+upstreamDNS+":53 ok") {
		t.Errorf("status: %v\n%s", err, out)
	}
	var st struct {
		Healthy     bool
		LearnedIPv4 int `json:"learned_ipv4"`
	}
	l.egressdJSON(&st, "status", "--config", cfg)
	if !st.Healthy || st.LearnedIPv4 < 2 { // the pinned name and westus
		t.Errorf("status --json: %+v", st)
	}

	explain := []struct{ q, want string }{
		{"westus.api.cognitive.microsoft.com", "allowed: westus.api.cognitive.microsoft.com matched *.cognitive.microsoft.com; open now: 203.0.113.10"},
		{"203.0.113.10:443", "allowed: 203.0.113.10 in allow4 for another "},
		{"203.0.113.10:80", "blocked: port 80 is not allowed"},
		{"evil.example.com", "blocked: evil.example.com matches no allowed domain"},
		{"cognitive.microsoft.com", "blocked: cognitive.microsoft.com matches no allowed domain"},
		{"203.0.113.31", "blocked: 203.0.113.31 was not answered by egressd"},
		{"10.1.2.3:443", "blocked: 10.1.2.3 is a private"},
	}
	for _, e := range explain {
		out, err := l.runEgressd("explain", "--config", cfg, e.q)
		if err != nil || !strings.HasPrefix(out, e.want) {
			t.Errorf("explain %s: %v\n%s\nwant prefix %q", e.q, err, out, e.want)
		}
	}
	var ex struct{ Allowed bool }
	l.egressdJSON(&ex, "explain", "--config", cfg, "translatoronprem.blob.core.windows.net")
	if !ex.Allowed {
		t.Errorf("explain --json of the pinned name: %+v", ex)
	}

	out, err = l.runEgressd("list", "--config", cfg)
	if err != nil || !regexp.MustCompile(`203\.0\.113\.10\s+\d+m?\d*s\s+westus\.api\.cognitive\.microsoft\.com\.`).MatchString(out) {
		t.Errorf("list: %v\n%s", err, out)
	}
	// Without a daemon, the commands say so.
	l.stopDaemon(os.Interrupt)
	if out, err := l.runEgressd("status", "--config", cfg); err == nil || !strings.Contains(out, "is `egressd run` running?") {
		t.Errorf("status without daemon: %v\n%s", err, out)
	}
}

func scrape(t *testing.T, l *Lab, addr string) map[string]float64 {
	t.Helper()
	// The endpoint listens in the host namespace: dial there.
	tr := &http.Transport{DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
		var c net.Conn
		err := inNS(l.Host, func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, network, a)
			return err
		})
		return c, err
	}}
	// egressd answers DNS before its metrics endpoint listens: wait for it.
	var resp *http.Response
	l.waitFor("the metrics endpoint", 10*time.Second, func() (err error) {
		resp, err = (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("http://" + addr + "/metrics")
		return err
	})
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

func TestMetrics(t *testing.T) {
	l := newLab(t)
	const addr = "127.0.0.1:9253"
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()+"metrics:\n  listen: "+addr+"\n"))
	l.waitMetrics(addr) // it listens a moment after the proxy answers
	before := scrape(t, l, addr)
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.resolve(l.Ctr, "www.example.com", dns.TypeA)
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	l.waitLog("blocked connection", "to=203.0.113.31:443")
	after := scrape(t, l, addr)
	for _, m := range []string{
		`egressd_dns_queries_total{result="allowed"}`,
		`egressd_dns_queries_total{result="refused"}`,
		`egressd_upstream_query_duration_seconds_count`,
		`egressd_set_update_duration_seconds_count`,
		`egressd_blocked_connections_total{reason="not-answered",rule="",source="container"}`,
	} {
		if after[m] <= before[m] {
			t.Errorf("%s: %v before, %v after; want it to grow", m, before[m], after[m])
		}
	}
	if after[`egressd_learned_addresses{set="allow4"}`] < 2 {
		t.Errorf("learned allow4 = %v", after[`egressd_learned_addresses{set="allow4"}`])
	}
	if after[`egressd_build_info{version="dev"}`] != 1 {
		t.Errorf("build info missing: %v", after)
	}
}
