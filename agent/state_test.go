package agent

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
)

func entry(addr string, exp time.Time, names ...string) firewall.Element {
	return firewall.Element{Addr: netip.MustParseAddr(addr), Expires: exp, Names: strings.Join(names, ",")}
}

func TestStateRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state") // created on save
	now := time.Now()
	in := []firewall.Element{
		entry("203.0.113.1", now.Add(time.Minute), "a.cognitive.microsoft.com"),
		entry("2001:db8::1", now.Add(time.Hour), "b.cognitive.microsoft.com", "c.cognitive.microsoft.com"),
		entry("203.0.113.2", now.Add(-time.Second)), // expired
	}
	if n, err := saveState(dir, slices.Values(in)); err != nil || n != len(in) {
		t.Fatalf("saved %d of %d: %v", n, len(in), err)
	}
	out, err := loadState(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 {
		t.Fatalf("loaded %d entries, want the 2 unexpired: %+v", len(out), out)
	}
	if out[1].Expires.UnixMilli() != in[1].Expires.UnixMilli() || out[1].Addr != in[1].Addr || out[1].Names != in[1].Names {
		t.Errorf("entry changed in the round trip: %+v", out[1])
	}
	files, _ := os.ReadDir(dir)
	if len(files) != 1 || files[0].Name() != stateFile {
		t.Errorf("state dir holds %v, want only %s (no temp files)", files, stateFile)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode %v", fi.Mode())
	}
}

func TestStateBadFiles(t *testing.T) {
	now := time.Now()
	good := t.TempDir()
	if _, err := saveState(good, slices.Values([]firewall.Element{entry("203.0.113.1", now.Add(time.Hour)), entry("203.0.113.2", now.Add(time.Hour))})); err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(filepath.Join(good, stateFile))
	tests := []struct {
		name    string
		content []byte
		want    string // "" means no error and nothing loaded
	}{
		{"truncated in a line", whole[:len(whole)/2], "corrupt"},
		{"truncated at a line end", whole[:bytes.LastIndexByte(whole[:len(whole)-1], '\n')+1], "truncated"},
		{"garbage", []byte("\x00\x01not a state file"), "corrupt"},
		{"empty", nil, "corrupt"},
		{"future version", []byte("egressd-learned 3\nend 0\n"), "unknown format"},
		{"no rule", []byte("egressd-learned 2\n\t203.0.113.1\t4102444800000\ta.\nend 1\n"), "corrupt"},
		{"invalid address", []byte("egressd-learned 1\n300.1.1.1\t4102444800000\t\nend 1\n"), "corrupt"},
		{"wrong count", []byte("egressd-learned 1\n203.0.113.1\t4102444800000\t\nend 2\n"), "corrupt"},
		{"no address", []byte("egressd-learned 1\n\t4102444800000\t\nend 1\n"), "corrupt"},
		{"two fields", []byte("egressd-learned 1\n203.0.113.1\t4102444800000\nend 1\n"), "corrupt"},
		{"four fields", []byte("egressd-learned 1\n203.0.113.1\t4102444800000\ta.\tb.\nend 1\n"), "corrupt"},
		{"bad expiry", []byte("egressd-learned 1\n203.0.113.1\tsoon\ta.\nend 1\n"), "corrupt"},
		{"line after the trailer", []byte("egressd-learned 1\nend 0\n203.0.113.1\t4102444800000\ta.\n"), "corrupt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, stateFile), tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := loadState(dir, now)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), dir) {
				t.Errorf("err = %v, want one naming the file and %q", err, tt.want)
			}
			if len(out) != 0 {
				t.Errorf("loaded %v from a bad file", out)
			}
		})
	}
	if out, err := loadState(filepath.Join(t.TempDir(), "missing"), now); err != nil || out != nil {
		t.Errorf("missing state: %v, %v", out, err)
	}
}

// A state file of format 1, written by egressd before rules, still loads,
// names, IPv6 and addresses without names included, as the allow rule's.
func TestStateFromEarlierVersion(t *testing.T) {
	dir := t.TempDir()
	const old = "egressd-learned 1\n" +
		"203.0.113.1\t4102444800000\ta.cognitive.microsoft.com.,b.cognitive.microsoft.com.\n" +
		"2001:db8::1\t4102444800123\tc.cognitive.microsoft.com.\n" +
		"203.0.113.2\t4102444800000\t\n" +
		"203.0.113.3\t1000\tgone.cognitive.microsoft.com.\n" +
		"end 4\n"
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := loadState(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	want := []firewall.Element{
		{Addr: netip.MustParseAddr("203.0.113.1"), Expires: time.UnixMilli(4102444800000), Names: "a.cognitive.microsoft.com.,b.cognitive.microsoft.com."},
		{Addr: netip.MustParseAddr("2001:db8::1"), Expires: time.UnixMilli(4102444800123), Names: "c.cognitive.microsoft.com."},
		{Addr: netip.MustParseAddr("203.0.113.2"), Expires: time.UnixMilli(4102444800000)},
	}
	if !slices.EqualFunc(out, want, func(a, b firewall.Element) bool {
		return a.Rule == config.RuleAllow && a.Addr == b.Addr && a.Expires.Equal(b.Expires) && a.Names == b.Names
	}) {
		t.Errorf("loaded %+v\nwant %+v", out, want)
	}
	// Saved again, it is format 2 with the same entries, but for the
	// expired one.
	if _, err := saveState(dir, slices.Values(out)); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, stateFile))
	const wantFile = "egressd-learned 2\n" +
		"allow\t203.0.113.1\t4102444800000\ta.cognitive.microsoft.com.,b.cognitive.microsoft.com.\n" +
		"allow\t2001:db8::1\t4102444800123\tc.cognitive.microsoft.com.\n" +
		"allow\t203.0.113.2\t4102444800000\t\n" +
		"end 3\n"
	if string(got) != wantFile {
		t.Errorf("saved\n%s\nwant\n%s", got, wantFile)
	}
}
