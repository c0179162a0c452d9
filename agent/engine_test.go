package agent

import (
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/egressd/egressd/config"
)

func engineAddrs(entries ...any) []engineAddr {
	var out []engineAddr
	for i := 0; i < len(entries); i += 2 {
		out = append(out, engineAddr{Prefix: netip.MustParsePrefix(entries[i].(string)), Link: entries[i+1].(int)})
	}
	return out
}

// The engine of a client is the host's address in the client's subnet,
// the longest one, port 53; an IPv6 client falls back to the IPv4
// address of the same interface. The host itself, loopback and clients
// in no container subnet have none.
func TestEngineServers(t *testing.T) {
	addrs := engineAddrs(
		"10.89.0.1/24", 5, // podman1
		"fd00:89::1/64", 5,
		"fe80::1/64", 5,
		"10.89.1.1/24", 6, // podman2, IPv4 only
		"fe80::2/64", 6,
		"10.88.0.1/16", 7, // a wide network...
		"10.88.5.1/24", 8, // ... and a narrower one inside it
		"fd00:99::1/64", 9, // IPv6 only
		"172.30.0.1/24", 10, // docker0, secondary address after
		"172.30.0.254/24", 10,
	)
	for _, tt := range []struct {
		client string
		want   []string
	}{
		{"10.89.0.5", []string{"10.89.0.1:53"}},
		{"::ffff:10.89.0.5", []string{"10.89.0.1:53"}},
		{"10.89.1.7", []string{"10.89.1.1:53"}},
		{"fd00:89::5", []string{"[fd00:89::1]:53", "10.89.0.1:53"}},
		{"fd00:99::5", []string{"[fd00:99::1]:53"}},
		{"10.88.5.9", []string{"10.88.5.1:53"}}, // the longest subnet
		{"10.88.7.9", []string{"10.88.0.1:53"}},
		{"172.30.0.2", []string{"172.30.0.1:53"}}, // the first address
		{"10.89.0.1", nil},                        // the host itself
		{"fd00:89::1", nil},
		{"127.0.0.1", nil},
		{"::1", nil},
		{"192.0.2.1", nil}, // the uplink: no container subnet
		{"2001:db8::5", nil},
		{"fe80::99", nil}, // link-local: the link is unknown
		{"169.254.53.53", nil},
		{"", nil},
	} {
		var client netip.Addr
		if tt.client != "" {
			client = netip.MustParseAddr(tt.client)
		}
		var got []string
		for _, s := range engineServers(addrs, client) {
			got = append(got, s.String())
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("engineServers(%s) = %v, want %v", tt.client, got, tt.want)
		}
	}
	if s := engineServers(nil, netip.MustParseAddr("10.89.0.5")); s != nil {
		t.Errorf("no container addresses: %v", s)
	}
}

// The addresses are read when an engine zone is first asked, again after
// an address or link event, when they are old, and when a client is in
// no known subnet (a new bridge), at most every engineMissAge; never for
// loopback clients beyond that.
func TestEnginesFollowTheHost(t *testing.T) {
	now := time.Unix(1000, 0)
	reads := 0
	host := engineAddrs("10.89.0.1/24", 5)
	var readErr error
	e := newEngines(func() *config.Config { return &config.Config{} }, slog.New(slog.DiscardHandler))
	e.now = func() time.Time { return now }
	e.read = func(*config.Config) ([]engineAddr, error) {
		reads++
		return slices.Clone(host), readErr
	}
	ask := func(client string) string {
		s := e.servers(netip.MustParseAddr(client))
		if len(s) == 0 {
			return ""
		}
		return s[0].String()
	}
	check := func(client, want string, wantReads int) {
		t.Helper()
		if got := ask(client); got != want || reads != wantReads {
			t.Errorf("%s: %q after %d reads, want %q after %d", client, got, reads, want, wantReads)
		}
	}
	check("10.89.0.5", "10.89.0.1:53", 1)
	check("10.89.0.6", "10.89.0.1:53", 1) // fresh: no read
	// A new bridge: its first client reads again, once engineMissAge passed.
	host = append(host, engineAddrs("10.89.1.1/24", 6)...)
	check("10.89.1.5", "", 1)
	now = now.Add(engineMissAge + time.Millisecond)
	check("10.89.1.5", "10.89.1.1:53", 2)
	// A host process asks, again and again: at most one read per engineMissAge.
	now = now.Add(engineMissAge + time.Millisecond)
	check("192.0.2.1", "", 3)
	check("192.0.2.1", "", 3)
	check("127.0.0.1", "", 3)
	now = now.Add(engineMissAge + time.Millisecond)
	check("127.0.0.1", "", 3) // loopback never reads on a miss
	// An event: the next query reads, even one that would match.
	host = engineAddrs("10.89.0.254/24", 7)
	e.invalidate()
	check("10.89.0.5", "10.89.0.254:53", 4)
	check("10.89.0.5", "10.89.0.254:53", 4)
	// Old: read again.
	host = engineAddrs("10.89.0.1/24", 5)
	now = now.Add(engineMaxAge + time.Millisecond)
	check("10.89.0.5", "10.89.0.1:53", 5)
	// A failed read keeps the last addresses.
	readErr, host = errors.New("netlink: no"), nil
	e.invalidate()
	check("10.89.0.5", "10.89.0.1:53", 6)
}
