package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Kernel and state faults: the state directory full or read-only, the
// nftables event socket overflowing, a learned set at its size limit.

// status runs `egressd status --json`, which exits 1 when unhealthy.
func (l *Lab) status(cfg string) map[string]any {
	l.t.Helper()
	out, _ := l.runEgressd("status", "--config", cfg, "--json")
	var s map[string]any
	if err := json.NewDecoder(strings.NewReader(out)).Decode(&s); err != nil {
		l.t.Fatalf("egressd status: %v\n%s", err, out)
	}
	return s
}

func TestStateDirFullOrReadOnly(t *testing.T) {
	l := newLab(t)
	state := filepath.Join(l.Dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	l.sh("mount -t tmpfs -o size=256k tmpfs " + state)
	t.Cleanup(func() { _ = exec.Command("umount", "-l", state).Run() })
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 60s", 1))
	l.startDaemon(cfg)
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	l.waitFor("the state file", 5*time.Second, func() error { return l.stateHas("203.0.113.10") })

	for _, fault := range []struct {
		name, addr, qname string
		make, undo        func()
		want              string
	}{
		{"full", "203.0.113.11", "deep.a.b.c.cognitive.microsoft.com",
			func() { fill(t, filepath.Join(state, "filler")) },
			func() { os.Remove(filepath.Join(state, "filler")) }, "no space left"},
		{"read-only", "203.0.113.12", "cognitive.microsoft.com",
			func() { l.sh("mount -o remount,ro " + state) },
			func() { l.sh("mount -o remount,rw " + state) }, "read-only file system"},
	} {
		fault.make()
		// egressd keeps serving: a fresh address resolves and connects.
		if fault.qname == "cognitive.microsoft.com" {
			fault.qname = "multi.cognitive.microsoft.com"
			fault.addr = "203.0.113.13"
		}
		r := l.resolve(l.Ctr, fault.qname, dns.TypeA)
		if got := addrs(r); len(got) == 0 || !strings.Contains(strings.Join(got, " "), fault.addr) {
			t.Fatalf("%s: %s answered %v, want %s", fault.name, fault.qname, got, fault.addr)
		}
		l.mustReach(l.Ctr, fault.addr+":443")
		l.waitFor("status to say the state is not saved", 5*time.Second, func() error {
			s := l.status(cfg)
			why, _ := s["state_save"].(string)
			if s["healthy"] != false || !strings.Contains(why, fault.want) {
				return fmt.Errorf("%s: healthy=%v state_save=%q", fault.name, s["healthy"], why)
			}
			return nil
		})
		if l.stateHas(fault.addr) == nil {
			t.Errorf("%s: %s saved although state_dir is %s", fault.name, fault.addr, fault.name)
		}
		fault.undo()
		l.waitFor("saving to resume", 5*time.Second, func() error { return l.stateHas(fault.addr) })
		l.waitFor("status healthy again", 5*time.Second, func() error {
			if s := l.status(cfg); s["healthy"] != true || s["state_save"] != nil {
				return fmt.Errorf("%s: status %v", fault.name, s)
			}
			return nil
		})
		l.waitLog("learned addresses saved again")
	}
	// Logged when it starts, not every second while it lasts.
	if n := strings.Count(l.egressdLog.String(), "learned addresses not saved"); n != 2 {
		t.Errorf("'not saved' logged %d times for two faults, want 2", n)
	}
}

// fill writes zeros to path until the file system is full.
func fill(t *testing.T, path string) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			return
		}
	}
}

// TestEventsLostForceAudit overflows egressd's nftables event socket
// (ENOBUFS; its buffer made small) with the element notifications of another table, and deletes a
// learned address in the same transaction: its event is lost with the
// others, so only the forced resync can bring it back before the periodic
// audit (30 s).
func TestEventsLostForceAudit(t *testing.T) {
	l := newLab(t)
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), "min_ttl: 1s", "min_ttl: 120s", 1))
	// A small event buffer (a test hook, firewall/testhooks.go): the kernel coalesces element
	// notifications, which 8 MiB would absorb.
	l.startDaemon(cfg, "EGRESSD_TEST_EVENT_BUFFER=4096")
	l.mustResolve(l.Ctr, "westus.api.cognitive.microsoft.com", dns.TypeA, "203.0.113.10")
	var b strings.Builder
	b.WriteString("table ip flood {\n\tset s {\n\t\ttype ipv4_addr\n\t\tsize 200000\n\t}\n}\n")
	for i := 0; i < 100000; i += 1000 {
		var el []string
		for j := i; j < i+1000; j++ {
			el = append(el, fmt.Sprintf("10.%d.%d.%d", j>>16, (j>>8)&255, j&255))
		}
		fmt.Fprintf(&b, "add element ip flood s { %s }\n", strings.Join(el, ", "))
	}
	b.WriteString("delete element inet egressd allow4 { 203.0.113.10 }\n")
	script := filepath.Join(l.Dir, "flood.nft")
	if err := os.WriteFile(script, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	l.in(l.Host, "nft -f "+script)
	l.waitLog("nftables events lost")
	l.waitFor("the deleted element to be repaired", 10*time.Second, func() error {
		if !l.inSet("203.0.113.10") {
			return os.ErrNotExist
		}
		return nil
	})
	t.Logf("repaired %v after the flood", time.Since(start).Round(time.Millisecond))
	l.waitLog("learned sets repaired", "missing")
	l.mustReach(l.Ctr, "203.0.113.10:443")
}

// TestSetAtSizeLimit runs egressd with learned sets of 4 elements at most
// (a test hook, firewall/testhooks.go), so the kernel refuses new elements once the pinned
// name and 3 answers fill allow4: such answers are SERVFAIL, logged and
// counted, and answers work again once elements expire and make room.
func TestSetAtSizeLimit(t *testing.T) {
	zone := map[string]string{"sizelimit.test": func() string {
		var z strings.Builder
		for i := range 8 {
			fmt.Fprintf(&z, "a%d 1 A 203.0.113.%d\n", i, 100+i)
		}
		return z.String()
	}()}
	l := newLab(t, zone)
	const metricsAddr = "127.0.0.1:9253"
	cfg := l.writeConfig("egressd.yaml", strings.Replace(l.baseConfig(), `"translatoronprem.blob.core.windows.net"]`,
		`"translatoronprem.blob.core.windows.net", "*.sizelimit.test"]`, 1)+"metrics:\n  listen: "+metricsAddr+"\n")
	l.startDaemon(cfg, "EGRESSD_TEST_SET_SIZE=4")

	if !strings.Contains(l.in(l.Host, "nft list set inet egressd allow4"), "size 4") {
		t.Fatal("allow4 has no size limit")
	}
	before := scrape(t, l, metricsAddr)

	servfails := 0
	var answered []string
	for i := range 8 {
		r := l.resolve(l.Ctr, fmt.Sprintf("a%d.sizelimit.test", i), dns.TypeA)
		switch r.Rcode {
		case dns.RcodeServerFailure:
			servfails++
		case dns.RcodeSuccess:
			answered = append(answered, addrs(r)...)
		}
	}
	if servfails == 0 {
		t.Fatalf("8 fresh addresses into a set of 4 (one pinned): no SERVFAIL (answered %v)\n%s", answered, l.in(l.Host, "nft list set inet egressd allow4"))
	}
	for _, a := range answered {
		l.mustReach(l.Ctr, a+":443") // every address answered is open
	}
	for i := 100 + len(answered); i < 108; i++ {
		l.mustNotReach(l.Ctr, fmt.Sprintf("203.0.113.%d:443", i))
	}
	l.waitLog("servfail", "sizelimit.test")
	after := scrape(t, l, metricsAddr)
	if d := after["egressd_set_update_errors_total"] - before["egressd_set_update_errors_total"]; d < float64(servfails) {
		t.Errorf("egressd_set_update_errors_total grew by %v, want %d", d, servfails)
	}
	t.Logf("%d answered, %d SERVFAIL", len(answered), servfails)

	// Room is made as the answered elements expire (TTL 1 s: 3 s).
	l.waitFor("a refused name to resolve once room is made", 15*time.Second, func() error {
		r, err := query(l.Ctr, otherDNS+":53", "a7.sizelimit.test", dns.TypeA, "udp")
		if err != nil || r.Rcode != dns.RcodeSuccess {
			return fmt.Errorf("%v %v", r, err)
		}
		return nil
	})
	l.mustReach(l.Ctr, "203.0.113.107:443")
}
