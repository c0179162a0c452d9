package test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestDemo is `make demo`: egressd on its embedded default config in a
// throw-away sandbox, with a transcript. With EGRESSD_DEMO=1 it prints the
// transcript; either way it checks every step, so CI runs the demo too.
// Ctrl-C ends it early and still removes the sandbox.
func TestDemo(t *testing.T) {
	out := io.Discard
	if os.Getenv("EGRESSD_DEMO") == "1" {
		out = os.Stdout
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	say := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	step := func(prompt, action, result string, ok bool) {
		if ctx.Err() != nil {
			return // interrupted: egressd got the Ctrl-C too
		}
		mark := "ok  "
		if !ok {
			mark = "FAIL"
			t.Errorf("%s %s: %s", prompt, action, result)
		}
		say("  [%s] %-10s %-58s %s", mark, prompt, action, result)
	}
	interrupted := func() bool {
		if ctx.Err() != nil {
			say("\ninterrupted: removing the sandbox")
			return true
		}
		return false
	}

	l := newLab(t)
	// The host namespace's resolver is the sandbox's upstream: egressd's
	// default config uses the host's resolvers.
	etc := filepath.Join("/etc/netns", l.Host)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver "+upstreamDNS+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	say("egressd demo: a throw-away sandbox of network namespaces")
	say("  internet   upstream DNS %s, HTTPS and HTTP servers on 203.0.113.0/24", upstreamDNS)
	say("  host       egressd run, embedded default config (the Azure AI container allow-list)")
	say("  container  " + ctrIP + " behind the host's docker0 bridge")
	say("")
	// Only where it keeps state and its socket moves into the sandbox.
	l.env = []string{"EGRESSD_STATE_DIR=" + filepath.Join(l.Dir, "state"), "EGRESSD_CONTROL_SOCKET=" + filepath.Join(l.Dir, "egressd.sock")}
	l.startDaemon("")
	say("egressd is running. From the container:")
	if d, err := time.ParseDuration(os.Getenv("EGRESSD_DEMO_PAUSE")); err == nil {
		select { // lets a test interrupt the demo here
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	if interrupted() {
		return
	}

	dig := func(server, name string, qtype uint16) (string, []string) {
		r, err := query(l.Ctr, server+":53", name, qtype, "udp")
		if err != nil {
			return "no answer (" + err.Error() + ")", nil
		}
		a := addrs(r)
		if len(a) > 0 {
			return strings.Join(a, " "), a
		}
		return dns.RcodeToString[r.Rcode], nil
	}
	connect := func(ns, addr string) (string, bool) {
		start := time.Now()
		if err := dial(ns, addr, 2*time.Second); err != nil {
			msg := err.Error()
			if i := strings.LastIndex(msg, ": "); i >= 0 {
				msg = msg[i+2:]
			}
			return "blocked (" + msg + ")", false
		}
		return fmt.Sprintf("connected in %v", time.Since(start).Round(100*time.Microsecond)), true
	}

	for _, name := range []string{"westus.api.cognitive.microsoft.com", "myres.cognitiveservices.azure.com"} {
		res, a := dig(otherDNS, name, dns.TypeA)
		step("container", "dig "+name, res, len(a) > 0)
		if len(a) > 0 {
			res, ok := connect(l.Ctr, hostPort(a[len(a)-1], 443))
			step("container", "connect "+a[len(a)-1]+" port 443", res, ok)
		}
	}
	if interrupted() {
		return
	}
	res, ok := connect(l.Ctr, "203.0.113.10:80")
	step("container", "connect 203.0.113.10 port 80 (same address)", res, !ok)
	res, _ = dig(otherDNS, "www.example.com", dns.TypeA)
	step("container", "dig www.example.com (not allow-listed)", res, res == "REFUSED")
	res, ok = connect(l.Ctr, "203.0.113.50:443")
	step("container", "connect 203.0.113.50 port 443 (its address)", res, !ok)
	r, err := query(l.Ctr, upstreamDNS+":53", "www.example.com", dns.TypeA, "tcp")
	res = "answered by egressd: " + fmt.Sprint(err)
	if err == nil {
		res = "answered by egressd: " + dns.RcodeToString[r.Rcode]
	}
	step("container", "dig @"+upstreamDNS+" +tcp www.example.com", res, err == nil && r.Rcode == dns.RcodeRefused)
	res, ok = connect(l.Ctr, upstreamDNS+":853")
	step("container", "DNS over TLS to "+upstreamDNS+" port 853", res, !ok)
	if interrupted() {
		return
	}
	say("")
	say("And on the host, asking egressd why:")
	for _, q := range []string{"westus.api.cognitive.microsoft.com", "203.0.113.50:443", "www.example.com"} {
		o, err := l.runEgressd("explain", q)
		step("host", "egressd explain "+q, strings.TrimSpace(o), err == nil)
	}
	if interrupted() {
		return
	}
	o := l.waitLog("blocked connection", "to=203.0.113.50:443")
	say("")
	say("egressd's log of the blocked connection:")
	say("  %s", o[strings.Index(o, "level="):])
	say("")
	say("The sandbox is removed now; nothing on this machine was changed.")
}
