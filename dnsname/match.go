package dnsname

import "strings"

// Matcher decides whether a DNS name is allow-listed.
//
// A pattern "*.zone" matches every name below zone at any depth
// ("a.zone", "x.y.a.zone") but not "zone" itself; any other pattern
// matches exactly one name. Matching ignores case and a trailing dot.
// Patterns are validated by Check.
type Matcher struct {
	exact    map[string]string // canonical name -> pattern
	wildcard map[string]string // canonical zone -> pattern
}

// NewMatcher builds a Matcher from validated patterns.
func NewMatcher(patterns []string) *Matcher {
	m := &Matcher{exact: map[string]string{}, wildcard: map[string]string{}}
	for _, p := range patterns {
		c := Canonical(p)
		if zone, ok := strings.CutPrefix(c, "*."); ok {
			m.wildcard[zone] = p
		} else {
			m.exact[c] = p
		}
	}
	return m
}

// Match reports whether name is allowed.
func (m *Matcher) Match(name string) bool {
	_, ok := m.Pattern(name)
	return ok
}

// Pattern returns the pattern that allows name. Names with characters
// other than letters, digits, "-", "_" and "." are never allowed: no real
// endpoint has them, and they could not be logged or stored unambiguously.
func (m *Matcher) Pattern(name string) (string, bool) {
	n := Canonical(name)
	if n == "" || !hostname(n) {
		return "", false
	}
	if p, ok := m.exact[n]; ok {
		return p, true
	}
	// Walk the proper suffixes: "a.b.c" -> "b.c" -> "c".
	for i := strings.IndexByte(n, '.'); i >= 0; {
		suffix := n[i+1:]
		if p, ok := m.wildcard[suffix]; ok {
			return p, true
		}
		j := strings.IndexByte(suffix, '.')
		if j < 0 {
			break
		}
		i += j + 1
	}
	return "", false
}
