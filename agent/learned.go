package agent

import (
	"cmp"
	"strings"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/firewall"
)

// expirySlack absorbs the rounding of expiries read back from the kernel
// (jiffies) and the time between an answer and the check.
const expirySlack = 5 * time.Second

// guard returns the rebinding guard of cfg.
func guard(cfg *config.Config) *dnsresolve.Guard { return dnsresolve.NewGuard(cfg.DNS.Exempt) }

// learnedAllowed returns the test a learned address must pass to stay
// open under cfg: at start (addresses from the state file and from the
// kernel) and on reload. Under cfg, a DNS answer could have opened it:
//
//   - the rebinding guard accepts it (an earlier egressd may have had a
//     laxer guard, or the state file may have been edited);
//   - it expires within twice dns.max_ttl + dns.grace from now. An answer
//     opens an address for at most max_ttl + grace, and the firewall
//     extends lives by a fraction of that (firewall.Firewall.Allow batches
//     updates so); a longer life comes from an egressd without a cap or
//     with a larger one. Such an address is dropped, and opened again with
//     a capped life when its name is asked again;
//   - one of its names is allowed by its rule's names (a rule the config
//     no longer has keeps nothing; Firewall.Install drops those).
//
// An address whose names are unknown (Names == "": read from the kernel
// without a state file entry, e.g. answered in the second before a crash,
// or saved so by an earlier egressd) is kept if it passes the first two
// tests. Only egressd writes into its sets (whoever else can has
// CAP_NET_ADMIN and could rewrite the whole ruleset), so the address was
// answered for a name that an earlier config allowed; keeping it costs at
// most one capped lifetime of an address that the new config may no longer
// want, while dropping it would cut clients that resolved it moments
// before the restart and cache the answer.
func learnedAllowed(cfg *config.Config, now time.Time) func(firewall.Element) bool {
	matchers := map[string]*dnsname.Matcher{}
	for _, r := range cfg.Rules {
		matchers[r.Name] = dnsname.NewMatcher(r.Domains)
	}
	g := guard(cfg)
	latest := now.Add(2*(cfg.DNS.MaxTTL+cfg.DNS.Grace) + expirySlack)
	return func(e firewall.Element) bool {
		if !g.Allows(e.Addr) || e.Expires.After(latest) {
			return false
		}
		m := matchers[cmp.Or(e.Rule, config.RuleAllow)]
		if m == nil {
			return false
		}
		if e.Names == "" {
			return true
		}
		for n := range strings.SplitSeq(e.Names, ",") {
			if m.Match(n) {
				return true
			}
		}
		return false
	}
}
