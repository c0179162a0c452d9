package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// The control socket answers `egressd status`, `explain` and `list` with
// JSON over HTTP on a unix socket that only root can open.

// Status is the answer to `egressd status`.
type Status struct {
	Version string `json:"version"`
	Healthy bool   `json:"healthy"`
	// Mode is firewall.mode; Enforced is false in audit mode, where
	// nothing is blocked.
	Mode        config.Mode `json:"mode"`
	Enforced    bool        `json:"enforced"`
	Ruleset     string      `json:"ruleset"` // "in place" or what drifted
	LearnedIPv4 int         `json:"learned_ipv4"`
	LearnedIPv6 int         `json:"learned_ipv6"`
	// Rules are the allow rules, each with whom it applies to and its
	// learned addresses.
	Rules        []RuleStatus              `json:"rules"`
	Upstreams    []dnsresolve.ServerHealth `json:"upstreams"`
	NotAnswering string                    `json:"not_answering,omitempty"` // why the proxy answers SERVFAIL
	StateSave    string                    `json:"state_save,omitempty"`    // why learned addresses are not being saved
	DriftRepairs int                       `json:"drift_repairs"`
	Audit        *AuditStatus              `json:"audit,omitempty"` // the last audit of the learned sets
	Kernel       string                    `json:"kernel"`          // how the kernel treats extended lifetimes
	Started      time.Time                 `json:"started"`
	LastErrors   []string                  `json:"last_errors"`
}

// RuleStatus is one allow rule in `egressd status`.
type RuleStatus struct {
	Name    string `json:"name"`
	Origin  string `json:"origin"` // "allow", "allow.rules[1]", "profile ntp"
	From    string `json:"from"`
	Learned int    `json:"learned"` // live learned addresses, both families
}

// AuditStatus is the last comparison of the kernel's learned sets with
// what egressd answered.
type AuditStatus struct {
	At       time.Time      `json:"at"`
	Took     string         `json:"took"`
	Elements int            `json:"elements"`
	Repaired map[string]int `json:"repaired,omitempty"`
	Error    string         `json:"error,omitempty"`
}

// Explanation is the answer to `egressd explain`.
type Explanation struct {
	Query   string `json:"query"`
	Allowed bool   `json:"allowed"`
	Reason  string `json:"reason"`
}

func (e Explanation) String() string {
	if e.Allowed {
		return "allowed: " + e.Reason
	}
	return "blocked: " + e.Reason
}

// Entry is one line of `egressd list`.
type Entry struct {
	Rule      string     `json:"rule"`
	Addr      netip.Addr `json:"addr"`
	Names     []string   `json:"names"`
	ExpiresIn string     `json:"expires_in"`
}

// listenControl opens the control socket and returns what answers on it
// until ctx ends.
func (d *daemon) listenControl(ctx context.Context, path string) (serve func() error, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	_ = os.Remove(path) // left by a killed egressd
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(w, d.status(r.Context())) })
	mux.HandleFunc("GET /v1/explain", func(w http.ResponseWriter, r *http.Request) { reply(w, d.explain(r.URL.Query().Get("q"))) })
	mux.HandleFunc("GET /v1/list", func(w http.ResponseWriter, r *http.Request) { reply(w, d.list()) })
	return func() error { return serveHTTP(ctx, ln, mux) }, nil
}

func (d *daemon) status(ctx context.Context) Status {
	cfg := d.config()
	counts := d.fw.Counts()
	v4, v6 := 0, 0
	var rs []RuleStatus
	for _, r := range cfg.Rules {
		n4, n6 := counts[r.Name+"4"], counts[r.Name+"6"]
		v4, v6 = v4+n4, v6+n6
		rs = append(rs, RuleStatus{Name: r.Name, Origin: r.Origin, From: r.From.String(), Learned: n4 + n6})
	}
	mode := cfg.Firewall.Mode
	s := Status{Version: d.version, Mode: mode, Enforced: mode != config.ModeAudit, Ruleset: "in place", LearnedIPv4: v4, LearnedIPv6: v6, Rules: rs,
		Upstreams: d.proxy.Upstream().Health(), DriftRepairs: int(d.repairs.Load()), Started: d.started,
		LastErrors: d.errors.recent(), Kernel: d.kernel}
	if why := d.waiting.Load(); why != nil {
		s.NotAnswering = *why
	}
	if f := d.saveFailing.Load(); f != nil {
		s.StateSave = fmt.Sprintf("failing since %s: %v", f.Since.Format(time.RFC3339), f.Err)
	}
	if drift, err := d.fw.Drift(ctx); err != nil {
		s.Ruleset = "unknown: " + err.Error()
	} else if drift != "" {
		s.Ruleset = "drifted: " + drift
	}
	if a := d.lastAudit.Load(); a != nil {
		s.Audit = &AuditStatus{At: a.At, Took: a.Took.Round(time.Millisecond).String(), Elements: a.Elements, Repaired: a.Repairs()}
		if a.Err != nil {
			s.Audit.Error = a.Err.Error()
		}
	}
	s.Healthy = s.Ruleset == "in place" && slices.ContainsFunc(s.Upstreams, dnsresolve.ServerHealth.Healthy) &&
		(s.Audit == nil || s.Audit.Error == "") && !strings.HasPrefix(s.Kernel, "probe failed") && s.StateSave == ""
	return s
}

func (d *daemon) explain(q string) Explanation {
	e := Explanation{Query: q}
	cfg := d.config()
	var addr netip.Addr
	var port uint16
	// "ADDR:PORT/udp" asks about UDP; TCP otherwise (the only protocol
	// DNS answers open).
	proto := config.ProtoTCP
	q, p, hasProto := strings.Cut(q, "/")
	if hasProto && (config.Proto(p) == config.ProtoUDP || config.Proto(p) == config.ProtoTCP) {
		proto = config.Proto(p)
	} else if hasProto {
		q = e.Query // a prefix, not an address: not a destination
	}
	if ap, err := netip.ParseAddrPort(q); err == nil {
		addr, port = ap.Addr(), ap.Port()
	} else if a, err := netip.ParseAddr(q); err == nil {
		addr = a
	}
	if !addr.IsValid() {
		// The proxy asks a forwarded zone's servers before it looks at
		// the allow-list: so does explain.
		if z, ok := cfg.EngineZoneFor(q); ok {
			e.Allowed = true
			e.Reason = fmt.Sprintf("%s is in engine zone %s: asked of the container engine's DNS on the client's own bridge (the host's address there, port 53), answered as it answers, opens nothing; refused to clients behind no container bridge", q, z)
		} else if z, ok := cfg.ForwardFor(q); ok {
			e.Allowed = true
			e.Reason = fmt.Sprintf("%s is in forwarded zone %s: asked of %v, answered as they answer, opens nothing (reach them through allow.cidrs)", q, z.Zone, z.Servers)
		} else if rule, p, ok := d.proxy.Allowed(q); ok {
			e.Allowed = true
			e.Reason = fmt.Sprintf("%s matched %s", q, p)
			if rule != config.RuleAllow { // the flat keys': for everyone
				e.Reason += " of rule " + ruleWho(cfg, rule)
			}
			if addrs := d.addrsOf(q); len(addrs) > 0 {
				e.Reason += "; open now: " + strings.Join(addrs, ", ")
			}
		} else {
			e.Reason = q + " matches no allowed domain"
		}
		if cfg.Firewall.Mode == config.ModeAudit && !e.Allowed {
			e.Reason += " (audit mode: answered anyway, logged as would-refuse)"
		}
		return e
	}
	addr = addr.Unmap()
	v := verdict(cfg, d.fw, addr, port, proto)
	if v.Static == nil && v.Rule != nil && v.Live == nil {
		e.Allowed = true
		e.Reason = fmt.Sprintf("%s is in the cidrs of rule %s", addr, ruleWho(cfg, v.Rule.Name))
		return e
	}
	if v.Static != nil {
		e.Allowed = true
		e.Reason = fmt.Sprintf("%s is in allow.cidrs %q", addr, v.Static.String())
		if len(v.Static.Ports) == 0 && !v.Static.AnyPort {
			e.Reason += fmt.Sprintf(" (tcp, allow.ports %v)", cfg.Allow.Ports)
		}
		return e
	}
	switch {
	case v.Live != nil:
		left := time.Until(v.Live.Expires).Round(time.Second)
		what := fmt.Sprintf("%s in %s for another %v (answered for %s), allowed by rule %s", addr, rules.LearnedSet(v.Rule.Name, addr), left, v.Live.Names, ruleWho(cfg, v.Rule.Name))
		if v.Reason == Port {
			e.Reason = fmt.Sprintf("port %d is not allowed for %s (rule %s: ports %v); %s", port, proto, v.Rule.Name, v.Rule.Ports, what)
			return auditNote(cfg, e)
		}
		e.Allowed = true
		e.Reason = what
		return e
	case v.NonPublic:
		e.Reason = fmt.Sprintf("%s is a private, loopback or otherwise non-public address: never opened from DNS", addr)
	case v.Reason == Expired:
		e.Reason = fmt.Sprintf("%s was answered for %s, but its time is up; a new answer opens it again", addr, v.Names)
	default:
		e.Reason = fmt.Sprintf("%s was not answered by egressd (no allowed name resolved to it) and is in no allow.cidrs", addr)
	}
	return auditNote(cfg, e)
}

// ruleWho is a rule's name, origin and whom it applies to: "metering
// (profile azure-ai-containers), from containers".
func ruleWho(cfg *config.Config, name string) string {
	for _, r := range cfg.Rules {
		if r.Name == name {
			return fmt.Sprintf("%s (%s), from %s", r.Name, r.Origin, r.From)
		}
	}
	return name
}

// auditNote adds to a blocked explanation that audit mode lets it pass.
func auditNote(cfg *config.Config, e Explanation) Explanation {
	if cfg.Firewall.Mode == config.ModeAudit && !e.Allowed {
		e.Reason += " (audit mode: not enforced, logged and counted as would_block)"
	}
	return e
}

// addrsOf returns the live addresses last answered for name.
func (d *daemon) addrsOf(name string) []string {
	fq := dnsname.Fqdn(name)
	learned, _ := d.fw.Learned()
	var out []string
	for _, el := range learned {
		for n := range strings.SplitSeq(el.Names, ",") {
			if strings.EqualFold(n, fq) {
				out = append(out, el.Addr.String())
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

func (d *daemon) list() []Entry {
	learned, _ := d.fw.Learned()
	slices.SortFunc(learned, func(a, b firewall.Element) int {
		return cmp.Or(strings.Compare(a.Rule, b.Rule), a.Addr.Compare(b.Addr))
	})
	out := make([]Entry, 0, len(learned))
	for _, el := range learned {
		var names []string
		if el.Names != "" {
			names = strings.Split(el.Names, ",")
		}
		out = append(out, Entry{Rule: el.Rule, Addr: el.Addr, Names: names, ExpiresIn: time.Until(el.Expires).Round(time.Second).String()})
	}
	return out
}
