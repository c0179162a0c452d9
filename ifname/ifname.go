// Package ifname owns network interface names and the patterns that
// select them (firewall.containers, firewall.unfiltered,
// firewall.antispoof): config validates them, the ruleset matches them in
// the kernel and the link watcher matches them in egressd, all with the
// meaning defined here.
package ifname

import (
	"errors"
	"strings"
)

// MaxLen is the longest interface name the kernel accepts (IFNAMSIZ less
// the terminating NUL).
const MaxLen = 15

// Pattern is an interface name, or a prefix glob ending in "*" ("br-*"):
// the patterns nftables matches iifname and oifname with.
type Pattern string

// Any is every interface (firewall.antispoof only).
const Any Pattern = "*"

// Prefix returns the prefix of a glob; ok is false for an exact name.
func (p Pattern) Prefix() (prefix string, ok bool) {
	return strings.CutSuffix(string(p), "*")
}

// Match reports whether name matches p, as the ruleset does: the same
// name, or a name that starts with a glob's prefix.
func (p Pattern) Match(name string) bool {
	if prefix, ok := p.Prefix(); ok {
		return strings.HasPrefix(name, prefix)
	}
	return string(p) == name
}

// Check accepts interface names and prefix globs; not Any, which only
// firewall.antispoof allows. The error reads after the quoted pattern.
func (p Pattern) Check() error {
	if p == "" || p == Any {
		return errors.New("must name an interface or a prefix glob such as \"br-*\"")
	}
	name, _ := p.Prefix()
	if strings.ContainsAny(name, "*?[]/ \t\"") {
		return errors.New("may only have \"*\" at its end")
	}
	if len(name) > MaxLen {
		return errors.New("is longer than an interface name (15 characters)")
	}
	return nil
}

// MatchAny returns the first of patterns that matches name.
func MatchAny(name string, patterns []Pattern) (Pattern, bool) {
	for _, p := range patterns {
		if p.Match(name) {
			return p, true
		}
	}
	return "", false
}

// CheckName accepts a name the kernel would give a new interface. The
// error reads after the quoted name.
func CheckName(n string) error {
	switch {
	case n == "":
		return errors.New("is empty")
	case len(n) > MaxLen:
		return errors.New("is longer than an interface name (15 characters)")
	case n == "lo" || n == "." || n == "..":
		return errors.New("cannot be created")
	case strings.ContainsAny(n, "*?[]/: \t\"'"):
		return errors.New("has a character an interface name cannot have")
	}
	return nil
}
