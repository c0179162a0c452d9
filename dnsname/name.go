// Package dnsname owns DNS names as egressd sees them: their normal form,
// what a valid name or allow-list pattern is, and the wildcard matcher.
// It is shared by the config package (validation) and the DNS proxy
// (matching), so that both agree and config needs none of the proxy.
package dnsname

import (
	"errors"
	"fmt"
	"strings"
)

// Canonical lower-cases an ASCII DNS name and drops one trailing dot: the
// form egressd compares and stores names in. (miekg's dns.CanonicalName
// adds the dot instead.) It avoids allocating when the name is already
// lower case.
func Canonical(n string) string {
	n = strings.TrimSuffix(n, ".")
	for i := 0; i < len(n); i++ {
		if c := n[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(n)
		}
	}
	return n
}

// Fqdn is the canonical name with its trailing dot, the form DNS answers
// carry names in.
func Fqdn(n string) string { return Canonical(n) + "." }

// InZone reports whether the canonical name n is zone or below it.
func InZone(n, zone string) bool {
	return n == zone || strings.HasSuffix(n, "."+zone)
}

// LongestZone returns the index of the longest zone in items (zone gives
// each item's zone, canonical) that holds the canonical name n; of zones
// as long, the first; -1 if none holds n.
func LongestZone[T any](n string, items []T, zone func(T) string) int {
	best := -1
	for i, it := range items {
		if z := zone(it); InZone(n, z) && (best < 0 || len(z) > len(zone(items[best]))) {
			best = i
		}
	}
	return best
}

// LabelChar reports whether c may stand in a label: letters, digits, "-"
// and "_" (service labels such as _dmarc). Upper case has been folded.
func LabelChar(c rune) bool {
	return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_'
}

// hostname reports whether the canonical name n has only label characters
// and dots.
func hostname(n string) bool {
	for i := 0; i < len(n); i++ {
		if c := n[i]; c != '.' && !LabelChar(rune(c)) {
			return false
		}
	}
	return true
}

// Check validates a configured name; with wildcardOK, an allow-list
// pattern ("*.zone", any depth below zone, at least two labels in zone).
// The error reads after the quoted name: `"a..com" has an empty label`.
func Check(d string, wildcardOK bool) error {
	n := Canonical(strings.ToLower(strings.TrimSpace(d)))
	if n == "" {
		return errors.New("is empty")
	}
	if len(n) > 253 {
		return errors.New("is longer than 253 characters")
	}
	labels := strings.Split(n, ".")
	for i, l := range labels {
		switch {
		case l == "*" && i == 0 && wildcardOK:
			if len(labels) < 3 {
				return errors.New("wildcard must have at least two labels after \"*.\" (too broad)")
			}
		case strings.Contains(l, "*"):
			if !wildcardOK {
				return errors.New("must be a name, not a wildcard")
			}
			return errors.New("has \"*\" where only a leftmost \"*.\" label is allowed")
		case l == "":
			return errors.New("has an empty label")
		case len(l) > 63:
			return fmt.Errorf("has label %q longer than 63 characters", l)
		default:
			for _, r := range l {
				if !LabelChar(r) {
					return fmt.Errorf("has invalid character %q", r)
				}
			}
		}
	}
	return nil
}
