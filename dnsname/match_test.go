package dnsname

import (
	"strings"
	"testing"
)

var vendor = []string{"*.cognitive.microsoft.com", "*.cognitiveservices.azure.com", "translatoronprem.blob.core.windows.net"}

func TestMatcher(t *testing.T) {
	m := NewMatcher(vendor)
	tests := []struct {
		name    string
		want    bool
		pattern string
	}{
		{"westus.api.cognitive.microsoft.com", true, "*.cognitive.microsoft.com"},
		{"westus.api.cognitive.microsoft.com.", true, "*.cognitive.microsoft.com"},
		{"WestUS.API.Cognitive.Microsoft.COM.", true, "*.cognitive.microsoft.com"},
		{"deep.a.b.c.cognitive.microsoft.com", true, "*.cognitive.microsoft.com"},
		{"a.cognitive.microsoft.com", true, "*.cognitive.microsoft.com"},
		{"myres.cognitiveservices.azure.com", true, "*.cognitiveservices.azure.com"},
		{"cognitive.microsoft.com", false, ""},  // apex of a wildcard
		{"cognitive.microsoft.com.", false, ""}, // apex with dot
		{"xcognitive.microsoft.com", false, ""}, // not a label boundary
		{"cognitive.microsoft.com.evil.com", false, ""},
		{"microsoft.com", false, ""},
		{"translatoronprem.blob.core.windows.net", true, "translatoronprem.blob.core.windows.net"},
		{"TRANSLATORONPREM.blob.core.windows.net.", true, "translatoronprem.blob.core.windows.net"},
		{"other.blob.core.windows.net", false, ""}, // sibling of an exact entry
		{"x.translatoronprem.blob.core.windows.net", false, ""},
		{"", false, ""},
		{".", false, ""},
		{"a,b.cognitive.microsoft.com", false, ""},     // not a hostname
		{"a\\009b.cognitive.microsoft.com", false, ""}, // escaped tab
		{"a b.cognitive.microsoft.com", false, ""},
		{"_dmarc.x.cognitive.microsoft.com", true, "*.cognitive.microsoft.com"},
	}
	for _, tt := range tests {
		p, ok := m.Pattern(tt.name)
		if ok != tt.want || p != tt.pattern {
			t.Errorf("Pattern(%q) = %q, %v; want %q, %v", tt.name, p, ok, tt.pattern, tt.want)
		}
	}
}

// FuzzMatcher checks the matcher against a slow, obviously correct
// definition.
func FuzzMatcher(f *testing.F) {
	for _, s := range []string{"a.cognitive.microsoft.com", "cognitive.microsoft.com", "A.B.COGNITIVE.MICROSOFT.COM.", "", ".", "..", "translatoronprem.blob.core.windows.net"} {
		f.Add(s)
	}
	m := NewMatcher(vendor)
	f.Fuzz(func(t *testing.T, name string) {
		n := strings.TrimSuffix(strings.ToLower(name), ".")
		want := n == "translatoronprem.blob.core.windows.net"
		valid := strings.Trim(n, "abcdefghijklmnopqrstuvwxyz0123456789-_.") == ""
		for _, zone := range []string{"cognitive.microsoft.com", "cognitiveservices.azure.com"} {
			if strings.HasSuffix(n, "."+zone) && len(n) > len(zone)+1 {
				want = true
			}
		}
		// Names with non-ASCII letters lower-case differently; the matcher
		// only lower-cases ASCII, as DNS does.
		if strings.ToLower(name) != asciiLower(name) {
			return
		}
		if got := m.Match(name); got != (want && valid) {
			t.Errorf("Match(%q) = %v, want %v", name, got, want)
		}
	})
}

func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 32
		}
	}
	return string(b)
}

func BenchmarkMatcher(b *testing.B) {
	m := NewMatcher(vendor)
	names := []string{"westus.api.cognitive.microsoft.com.", "deep.a.b.c.d.e.f.cognitiveservices.azure.com.", "www.example.com."}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		m.Match(names[i%len(names)])
	}
}

func TestLongestZone(t *testing.T) {
	zones := []string{"local", "cluster.local", "svc.cluster.local", "cluster.local"}
	id := func(z string) string { return z }
	for n, want := range map[string]int{
		"a.svc.cluster.local": 2, "cluster.local": 1, "x.local": 0, "example.com": -1, "notlocal": -1,
	} {
		if got := LongestZone(n, zones, id); got != want {
			t.Errorf("LongestZone(%q) = %d, want %d", n, got, want)
		}
	}
}
