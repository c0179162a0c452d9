package agent

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/egressd/egressd/ifname"
)

var (
	testContainers = []ifname.Pattern{"docker0", "br-*", "cali*"}
	testUnfiltered = []ifname.Pattern{"virbr0"}
)

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		link linkInfo
		want linkClass
	}{
		{"docker0", linkInfo{Name: "docker0", Kind: "bridge", Up: true, Routed: true}, linkContainer},
		{"a new docker network", linkInfo{Name: "br-1a2b3c", Kind: "bridge"}, linkContainer},
		{"calico pod veth listed", linkInfo{Name: "cali1234", Kind: "veth", Up: true, Routed: true}, linkContainer},
		{"unfiltered bridge", linkInfo{Name: "virbr0", Kind: "bridge", Up: true, Routed: true}, linkUnfiltered},
		{"uplink nic", linkInfo{Name: "eth0", Kind: "device", Up: true, Routed: true, Uplink: true}, linkOther},
		{"dummy", linkInfo{Name: "egressd0", Kind: "dummy", Up: true, Routed: true}, linkOther},
		{"loopback", linkInfo{Name: "lo", Kind: "device", Up: true, Routed: true}, linkOther},
		{"uplink bridge", linkInfo{Name: "br0", Kind: "bridge", Up: true, Routed: true, Uplink: true}, linkUplink},
		// Docker: the host end enslaved to docker0, the container end
		// in the host's namespace (down) until it is moved.
		{"docker host veth", linkInfo{Name: "veth1a2b3c4", Kind: "veth", Up: true, Master: true}, linkPort},
		{"docker host veth, down", linkInfo{Name: "veth1a2b3c4", Kind: "veth", Master: true}, linkPort},
		{"docker container veth before its move", linkInfo{Name: "veth5d6e7f8", Kind: "veth"}, linkDown},
		// CNI's bridge plugin brings the host end up before it enslaves it.
		{"cni host veth before enslaving", linkInfo{Name: "vethabcdef01", Kind: "veth", Up: true}, linkBare},
		{"libvirt tap", linkInfo{Name: "vnet0", Kind: "tuntap", Up: true, Master: true}, linkPort},
		{"vpn tun", linkInfo{Name: "tun0", Kind: "tuntap", Up: true, Routed: true}, linkUnknown},
		{"unlisted calico veth", linkInfo{Name: "cali1234", Kind: "veth", Up: true, Routed: true}, linkUnknown},
		{"podman0 unlisted", linkInfo{Name: "podman0", Kind: "bridge", Up: true, Routed: true}, linkUnknown},
		{"bridge without address", linkInfo{Name: "lxdbr0", Kind: "bridge", Up: true}, linkUnknown},
		{"bridge being set up", linkInfo{Name: "podman0", Kind: "bridge", Routed: true}, linkDown},
		{"bridge in a vrf", linkInfo{Name: "lxdbr0", Kind: "bridge", Up: true, Master: true}, linkUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs := testContainers
			if tt.name == "unlisted calico veth" {
				cs = cs[:2]
			}
			if got := classify(tt.link, cs, testUnfiltered); got != tt.want {
				t.Errorf("classify(%+v) = %d, want %d", tt.link, got, tt.want)
			}
		})
	}
}

// links builds a snapshot's links from "name:kind:flags[:prefix]"
// (flags: u up, m enslaved, r routed, d default route).
func links(specs ...string) []linkInfo {
	var out []linkInfo
	for i, s := range specs {
		parts := append(strings.SplitN(s, ":", 4), "", "", "")
		name, kind, flags := parts[0], parts[1], parts[2]
		l := linkInfo{Index: 100 + i, Name: name, Kind: kind}
		if parts[3] != "" {
			l.Prefixes = []netip.Prefix{netip.MustParsePrefix(parts[3])}
		}
		for _, f := range flags {
			switch f {
			case 'u':
				l.Up = true
			case 'm':
				l.Master = true
			case 'r':
				l.Routed = true
			case 'd':
				l.Uplink = true
			}
		}
		out = append(out, l)
	}
	return out
}

// host is the lab host's steady links.
var host = []string{"lo:device:ur", "eth0:device:urd:192.0.2.0/24", "docker0:bridge:ur:172.30.0.0/24", "egressd0:dummy:ur"}

func TestDecideChurn(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	type step struct {
		what   string
		at     time.Duration
		links  []string // besides host
		want   []string
		wait   time.Duration
		onLink string // "": the host's own
	}
	tests := []struct {
		name  string
		prev  []string
		steps []step
	}{
		{"docker run and stop", nil, []step{
			{"veth pair created", 0, []string{"veth0000001:veth:", "veth8000001:veth:"}, nil, 0, ""},
			{"host end enslaved and up", 10 * time.Millisecond, []string{"veth0000001:veth:um", "veth8000001:veth:"}, nil, 0, ""},
			{"container end moved", time.Second, []string{"veth0000001:veth:um"}, nil, 0, ""},
			{"container end moved back, down", time.Minute, []string{"veth0000001:veth:um", "veth8000001:veth:"}, nil, 0, ""},
			{"deleted", time.Minute + time.Millisecond, nil, nil, 0, ""},
		}},
		{"cni: host end up before it is enslaved", nil, []step{
			{"moved into the host, down", 0, []string{"veth9a8b7c6d:veth:"}, nil, 0, ""},
			{"up", 5 * time.Millisecond, []string{"veth9a8b7c6d:veth:u"}, nil, bareGrace, ""},
			{"enslaved", 20 * time.Millisecond, []string{"veth9a8b7c6d:veth:um"}, nil, 0, ""},
		}},
		{"a pod veth without routes becomes unknown after the grace", nil, []step{
			{"up", 0, []string{"lxc12ab:veth:u"}, nil, bareGrace, ""},
			{"still bare", 2 * time.Second, []string{"lxc12ab:veth:u"}, nil, bareGrace - 2*time.Second, ""},
			{"grace over", bareGrace, []string{"lxc12ab:veth:u"}, []string{"lxc12ab"}, 0, ""},
			{"gone", bareGrace + time.Second, nil, []string{"lxc12ab"}, 0, ""},
		}},
		{"a routed veth is unknown at once", nil, []step{
			{"up with a route", 0, []string{"veth99:veth:ur"}, []string{"veth99"}, 0, ""},
		}},
		{"unknown podman0 goes and comes back with its containers", nil, []step{
			{"created, down", 0, []string{"podman0:bridge:"}, nil, 0, ""},
			{"addressed", 0, []string{"podman0:bridge:r:10.88.0.0/24"}, nil, 0, "[10.88.0.0/24 192.0.2.0/24]"},
			{"up", 10 * time.Millisecond, []string{"podman0:bridge:ur:10.88.0.0/24", "veth1:veth:um"}, []string{"podman0"}, 0, "[10.88.0.0/24 192.0.2.0/24]"},
			{"deleted with the last container", time.Minute, nil, []string{"podman0"}, 0, "[10.88.0.0/24 192.0.2.0/24]"},
			{"created again", 2 * time.Minute, []string{"podman0:bridge:"}, []string{"podman0"}, 0, "[10.88.0.0/24 192.0.2.0/24]"},
			{"up again", 2 * time.Minute, []string{"podman0:bridge:ur:10.88.0.0/24"}, []string{"podman0"}, 0, "[10.88.0.0/24 192.0.2.0/24]"},
			{"another subnet", 3 * time.Minute, []string{"podman0:bridge:ur:10.89.0.0/24"}, []string{"podman0"}, 0, "[10.89.0.0/24 192.0.2.0/24]"},
		}},
		{"a container bridge's subnet is no on-link subnet", nil, []step{
			{"up", 0, []string{"br-1a2b:bridge:ur:172.31.0.0/24"}, nil, 0, ""},
		}},
		{"a gone name taken by an uplink leaves", []string{"podman0"}, []step{
			{"gone", 0, nil, []string{"podman0"}, 0, ""},
			{"now an uplink bridge", time.Second, []string{"podman0:bridge:urd"}, nil, 0, ""},
		}},
		{"a gone name taken by a port leaves", []string{"tap0"}, []step{
			{"enslaved", 0, []string{"tap0:tuntap:um"}, nil, 0, ""},
		}},
		{"a name in force at start that is bare stays", []string{"lxc12ab"}, []step{
			{"bare", 0, []string{"lxc12ab:veth:u"}, []string{"lxc12ab"}, bareGrace, ""},
			{"grace over", bareGrace, []string{"lxc12ab:veth:u"}, []string{"lxc12ab"}, 0, ""},
		}},
		{"a gone name the patterns now cover leaves", []string{"br-old", "cali7"}, []step{
			{"gone", 0, nil, nil, 0, ""},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var s linkState
			prev := tt.prev
			for _, st := range tt.steps {
				d := s.decide(t0.Add(st.at), links(append(slices.Clone(host), st.links...)...), testContainers, testUnfiltered, prev)
				if !slices.Equal(d.Unknown, st.want) || d.Wait != st.wait {
					t.Fatalf("%s: %q, wait %v; want %q, wait %v", st.what, d.Unknown, d.Wait, st.want, st.wait)
				}
				onLink := fmt.Sprint(d.OnLink)
				if want := cmp.Or(st.onLink, "[192.0.2.0/24]"); onLink != want {
					t.Fatalf("%s: on-link %s, want %s", st.what, onLink, want)
				}
				prev = d.Unknown
			}
			if len(s.bare) > 1 || len(s.gone) > 1 {
				t.Errorf("state not pruned: bare %v, gone %v", s.bare, s.gone)
			}
		})
	}
}

// TestDecideGoneBound: beyond goneUnknownMax gone names, the longest gone
// leave.
func TestDecideGoneBound(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	var s linkState
	var prev []string
	for i := range goneUnknownMax + 5 {
		name := fmt.Sprintf("lxdbr%d", i)
		at := t0.Add(time.Duration(i) * time.Minute)
		got := s.decide(at, links(append(slices.Clone(host), name+":bridge:ur")...), testContainers, testUnfiltered, prev).Unknown
		if !slices.Contains(got, name) {
			t.Fatalf("%s missing: %q", name, got)
		}
		prev = s.decide(at.Add(time.Second), links(host...), testContainers, testUnfiltered, got).Unknown
	}
	if len(prev) != goneUnknownMax || len(s.gone) != goneUnknownMax {
		t.Fatalf("%d gone names kept (%d recorded), want %d", len(prev), len(s.gone), goneUnknownMax)
	}
	for i := range 5 {
		if slices.Contains(prev, fmt.Sprintf("lxdbr%d", i)) {
			t.Errorf("lxdbr%d, among the longest gone, kept", i)
		}
	}
}

func TestDebouncer(t *testing.T) {
	var calls atomic.Int32
	d := newDebouncer(50*time.Millisecond, 300*time.Millisecond, func() { calls.Add(1) })
	defer d.stop()
	// A burst: one call after it.
	for range 5 {
		d.poke()
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d calls after a burst, want 1", n)
	}
	// Pokes that never stop: called anyway, about every max.
	start := time.Now()
	for time.Since(start) < time.Second {
		d.poke()
		time.Sleep(10 * time.Millisecond)
	}
	if n := calls.Load() - 1; n < 2 || n > 5 {
		t.Errorf("%d calls during a second of pokes, want about 3", n)
	}
}

func TestLinkNames(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	asked := 0
	n := newLinkNames()
	n.now = func() time.Time { return now }
	n.lookup = func(i int32) (string, bool) {
		asked++
		if i == 7 {
			return "eth0", true
		}
		return "", false
	}
	n.seen(10, "docker0")
	n.seen(11, "podman0")
	n.removed(11, "podman0")
	for i, want := range map[int32]string{10: "docker0", 11: "podman0", 7: "eth0", 8: ""} {
		if got := n.name(i); got != want {
			t.Errorf("name(%d) = %q, want %q", i, got, want)
		}
	}
	if n.name(7); asked != 2 {
		t.Errorf("the kernel was asked %d times, want 2 (eth0 once, then remembered; 8)", asked)
	}
	// A rename.
	n.seen(10, "docker1")
	if got := n.name(10); got != "docker1" {
		t.Errorf("renamed: %q", got)
	}
	// Gone names are kept goneNamesFor, and at most goneNamesMax.
	now = now.Add(goneNamesFor + time.Second)
	for i := range int32(goneNamesMax + 10) {
		n.seen(1000+i, fmt.Sprintf("veth%d", i))
		n.removed(1000+i, fmt.Sprintf("veth%d", i))
		now = now.Add(time.Millisecond)
	}
	if len(n.gone) != goneNamesMax {
		t.Errorf("%d gone names kept, want %d", len(n.gone), goneNamesMax)
	}
	if _, ok := n.gone[11]; ok {
		t.Error("podman0 kept beyond goneNamesFor")
	}
	if got := n.name(1000 + goneNamesMax + 9); got != fmt.Sprintf("veth%d", goneNamesMax+9) {
		t.Errorf("the newest gone name: %q", got)
	}
	if _, ok := n.gone[1000]; ok {
		t.Error("the oldest gone name kept beyond goneNamesMax")
	}
	if len(n.live) != 2 {
		t.Errorf("live names: %v", n.live)
	}
}
