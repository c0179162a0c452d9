package test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// repairDeadline is how long egressd may take to notice and repair drift.
const repairDeadline = 5 * time.Second

func TestKill9FailsClosed(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	// Pinned names open in the background after start.
	l.waitFor("the pinned name", 10*time.Second, func() error {
		if !l.inSet("203.0.113.30") {
			return os.ErrNotExist
		}
		return nil
	})
	if err := l.stopDaemon(syscall.SIGKILL); err == nil {
		t.Fatal("egressd survived SIGKILL")
	}
	l.mustReach(l.Ctr, "203.0.113.10:443")    // learned: still open
	l.mustReach(l.Ctr, "203.0.113.30:443")    // pinned: still open
	l.mustNotReach(l.Ctr, "203.0.113.31:443") // everything else: still closed
	l.mustNotReach(l.Host, "203.0.113.31:443")
	// DNS is still redirected to the dead proxy: no resolver answers.
	for _, name := range []string{"www.example.com", "westus.api.cognitive.microsoft.com"} {
		for _, network := range []string{"udp", "tcp"} {
			if r, err := query(l.Ctr, upstreamDNS+":53", name, dns.TypeA, network); err == nil {
				t.Errorf("%s over %s answered with the proxy dead: %v", name, network, r)
			}
		}
	}
}

func TestRestartKeepsLearnedAddresses(t *testing.T) {
	for _, flush := range []bool{false, true} {
		name := "kernel keeps them"
		if flush {
			name = "ruleset flushed: state file keeps them"
		}
		t.Run(name, func(t *testing.T) {
			l := newLab(t)
			cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1))
			l.startDaemon(cfg)
			l.mustResolve(l.Ctr, "myres.cognitiveservices.azure.com", dns.TypeA, "203.0.113.20")
			l.waitFor("state file", 5*time.Second, func() error { return l.stateHas("203.0.113.20") })
			l.stopDaemon(syscall.SIGKILL)
			if flush {
				l.in(l.Host, "nft flush ruleset")
			}
			// No upstream any more: whatever is reachable after the
			// restart was kept, not resolved again.
			l.stopNSD()
			l.startDaemon(cfg)
			l.mustReach(l.Ctr, "203.0.113.20:443") // CNAME-chain answer
			l.mustReach(l.Ctr, "203.0.113.30:443") // pinned name
			l.mustNotReach(l.Ctr, "203.0.113.31:443")
		})
	}
}

func TestDriftIsRepaired(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	want := l.listing()
	for _, tamper := range []string{
		"nft flush ruleset",
		"nft delete chain inet egressd dns_prerouting",
		"nft flush chain inet egressd egress",
		"nft flush set inet egressd allow4",
		"nft delete table inet egressd",
	} {
		l.in(l.Host, tamper)
		start := time.Now()
		l.waitFor("repair after "+tamper, repairDeadline, func() error {
			if got := l.listing(); got != want {
				return os.ErrNotExist
			}
			return nil
		})
		t.Logf("%s: repaired in %v", tamper, time.Since(start).Round(time.Millisecond))
		l.mustReach(l.Ctr, "203.0.113.10:443")
		l.mustNotReach(l.Ctr, "203.0.113.31:443")
	}
	if !strings.Contains(l.egressdLog.String(), "drift repaired") {
		t.Errorf("no drift repair was logged")
	}
}

func TestSIGTERMLeavesFirewall(t *testing.T) {
	l := newLab(t)
	l.startDaemon(l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	if err := l.stopDaemon(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: exit %v", err)
	}
	l.mustReach(l.Ctr, "203.0.113.10:443")
	l.mustNotReach(l.Ctr, "203.0.113.31:443")
	if err := l.stateHas("203.0.113.10"); err != nil {
		t.Errorf("state not saved on SIGTERM: %v", err)
	}
}

func TestSIGHUPReload(t *testing.T) {
	l := newLab(t)
	cfgPath := filepath.Join(l.Dir, "egressd.yaml")
	base := strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1)
	l.writeConfig("egressd.yaml", base)
	l.startDaemon(cfgPath)
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustResolve(l.Ctr, "myres.cognitiveservices.azure.com", dns.TypeA, "203.0.113.20")
	before := l.listing()

	// A bad config is refused; the old rules stay.
	l.writeConfig("egressd.yaml", base+"bogus: 1\n")
	l.egressd.Process.Signal(syscall.SIGHUP)
	l.waitFor("reload failure log", 5*time.Second, func() error {
		if !strings.Contains(l.egressdLog.String(), "reload failed") {
			return os.ErrNotExist
		}
		return nil
	})
	if got := l.listing(); got != before {
		t.Errorf("bad config changed the ruleset:\n%s", got)
	}
	l.mustReach(l.Ctr, "203.0.113.10:443")

	// A good one is applied: *.example.com on 80 and 443 instead of
	// *.cognitive.microsoft.com. Addresses of names the new config still
	// allows stay open; the others close.
	good := strings.Replace(base, `"*.cognitive.microsoft.com", `, `"*.example.com", `, 1)
	good = strings.Replace(good, "allow:\n", "allow:\n  ports: [80, 443]\n", 1)
	l.writeConfig("egressd.yaml", good)
	l.egressd.Process.Signal(syscall.SIGHUP)
	l.waitFor("new config in force", 5*time.Second, func() error {
		r, err := query(l.Ctr, otherDNS+":53", "www.example.com", dns.TypeA, "udp")
		if err != nil || len(addrs(r)) == 0 {
			return os.ErrNotExist
		}
		return nil
	})
	l.mustReach(l.Ctr, "203.0.113.50:80")
	l.mustReach(l.Ctr, "203.0.113.20:443")    // myres.cognitiveservices.azure.com: still allowed
	l.mustNotReach(l.Ctr, "203.0.113.10:443") // westus.api.cognitive.microsoft.com: no longer
	if r := l.resolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA); r.Rcode != dns.RcodeRefused {
		t.Errorf("name dropped by reload: %v", r)
	}
}

func TestNewBridgeIsFiltered(t *testing.T) {
	l := newLab(t)
	cfg := strings.Replace(l.baseConfig(), `containers: ["docker0"]`, `containers: ["docker0", "br-*"]`, 1)
	l.startDaemon(l.writeConfig("egressd.yaml", cfg))
	// A network created after egressd started, as `docker network create`
	// does: a bridge named br-<id> and a container behind it.
	ctr2 := l.Ctr + "2"
	l.sh("ip netns add " + ctr2)
	t.Cleanup(func() { l.sh("ip netns del " + ctr2) })
	l.in(l.Host, "ip link add br-1a2b3c type bridge")
	l.in(l.Host, "ip link set br-1a2b3c up")
	l.in(l.Host, "ip addr add 172.31.0.1/24 dev br-1a2b3c")
	l.sh("ip link add eth0 netns " + ctr2 + " type veth peer name veth2 netns " + l.Host)
	l.in(l.Host, "ip link set veth2 master br-1a2b3c up")
	l.in(ctr2, "ip link set lo up")
	l.in(ctr2, "ip link set eth0 up")
	l.in(ctr2, "ip addr add 172.31.0.2/24 dev eth0")
	l.in(ctr2, "ip route add default via 172.31.0.1")
	l.in(l.Inet, "ip route add 172.31.0.0/24 via "+hostUplink)

	l.mustNotReach(ctr2, "203.0.113.31:443")
	l.mustNotReach(ctr2, "203.0.113.10:443")
	l.mustResolve(ctr2, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(ctr2, "203.0.113.10:443")
	if r := l.resolve(ctr2, "www.example.com", dns.TypeA); r.Rcode != dns.RcodeRefused {
		t.Errorf("unlisted name from the new bridge: %v", r)
	}
	l.waitFor("log of the new bridge", 5*time.Second, func() error {
		if !strings.Contains(l.egressdLog.String(), "br-1a2b3c") {
			return os.ErrNotExist
		}
		return nil
	})
}

func TestCorruptStateFileDoesNotStopStart(t *testing.T) {
	l := newLab(t)
	dir := filepath.Join(l.Dir, "state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "learned.tsv"), []byte("egressd-learned 1\n203.0.1"), 0o600); err != nil {
		t.Fatal(err)
	}
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()))
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.mustReach(l.Ctr, "203.0.113.10:443")
	if !strings.Contains(l.egressdLog.String(), "ignoring state file") {
		t.Errorf("corrupt state file not reported:\n%s", l.egressdLog)
	}
}

// TestSystemdNotify plays systemd's side of Type=notify: READY=1 only once
// the proxy answers, status text, watchdog pings, STOPPING=1 on SIGTERM.
func TestSystemdNotify(t *testing.T) {
	l := newLab(t)
	sock := filepath.Join(l.Dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	l.startDaemon(l.writeConfig("egressd.yaml", l.baseConfig()), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=400000")
	var got []string
	expect := func(what string) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case m := <-msgs:
				got = append(got, m)
				if strings.Contains(m, what) {
					return
				}
			case <-deadline:
				t.Fatalf("no %q from egressd; got %q", what, got)
			}
		}
	}
	expect("READY=1")
	if !strings.Contains(strings.Join(got, "\n"), "STATUS=enforcing") {
		t.Errorf("no status text with READY: %q", got)
	}
	expect("WATCHDOG=1")
	l.stopDaemon(syscall.SIGTERM)
	expect("STOPPING=1")
}
