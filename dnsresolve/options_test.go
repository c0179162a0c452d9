package dnsresolve

import (
	"context"
	"sync"
	"testing"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/config"
)

// defaultConfig is the embedded default configuration
// (config/default.yaml), without environment overrides.
var defaultConfig = sync.OnceValue(func() *config.Config {
	c, err := config.Load("", nil)
	if err != nil {
		panic(err)
	}
	return c
})

// testOptions are the proxy options of the default configuration, as
// agent.proxyOptions makes them, less what a test provides itself
// (domains, upstream, allower, guard, forwarding): the one source of the
// tests' durations and bounds, which the tests change where that is what
// they exercise.
func testOptions() Options {
	d := defaultConfig().DNS
	return Options{
		MinTTL:         d.MinTTL,
		MaxTTL:         d.MaxTTL,
		Grace:          d.Grace,
		RefuseRcode:    dns.RcodeRefused,
		Limits:         d.Limits,
		QueryBudget:    d.QueryBudget,
		ForwardTimeout: d.Timeout,
	}
}

// budget is a context with the default query budget, for Upstream.Exchange.
func budget(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testOptions().QueryBudget)
	t.Cleanup(cancel)
	return ctx
}

// everyone is one rule that allows domains to everyone, as the flat
// allow keys do.
func everyone(domains ...string) []config.Rule {
	return []config.Rule{{Name: config.RuleAllow, From: config.Everyone, Domains: domains}}
}
