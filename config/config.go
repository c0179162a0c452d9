// Package config loads and validates egressd's configuration: an embedded
// default, an optional YAML file on top of it, and EGRESSD_* environment
// overrides on top of both.
package config

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/ifname"
	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
)

// Default is the embedded default configuration, the vendor's allow-list.
//
//go:embed default.yaml
var Default []byte

// Config is egressd's validated configuration.
type Config struct {
	Allow    Allow    `mapstructure:"allow"`
	DNS      DNS      `mapstructure:"dns"`
	Firewall Firewall `mapstructure:"firewall"`
	StateDir string   `mapstructure:"state_dir"`
	Log      Log      `mapstructure:"log"`
	Metrics  Metrics  `mapstructure:"metrics"`
	Control  Control  `mapstructure:"control"`
	// Rules are the allow rules in order: the flat allow keys' rule
	// "allow" (if they allow anything), the included profiles', then
	// allow.rules (see rules.go).
	Rules []Rule `mapstructure:"-"`
}

// Allow says which destinations may be reached.
type Allow struct {
	Domains []string `mapstructure:"domains"`
	Ports   []int    `mapstructure:"ports"`
	Names   []string `mapstructure:"names"`
	// CIDRs are raw entries, strings or maps (see Static); Static holds
	// them parsed.
	CIDRs  []any    `mapstructure:"cidrs"`
	Static []Static `mapstructure:"-"`
	// Include are profiles that ship with egressd (config/profiles).
	Include []string `mapstructure:"include"`
	// RulesRaw are the allow.rules entries (maps); Config.Rules holds
	// every rule parsed (see rules.go).
	RulesRaw []any `mapstructure:"rules"`
}

// DNS configures the proxy.
type DNS struct {
	ListenPort int           `mapstructure:"listen_port"`
	Upstreams  []string      `mapstructure:"upstreams"`
	Timeout    time.Duration `mapstructure:"timeout"`
	MinTTL     time.Duration `mapstructure:"min_ttl"`
	MaxTTL     time.Duration `mapstructure:"max_ttl"`
	Grace      time.Duration `mapstructure:"grace"`
	RefuseWith Refusal       `mapstructure:"refuse_with"`
	// RebindingExempt are raw prefixes that answers may point into although
	// they are not globally reachable; Exempt holds them parsed.
	RebindingExempt []string       `mapstructure:"rebinding_exempt"`
	Exempt          []netip.Prefix `mapstructure:"-"`
	ResolvConf      []string       `mapstructure:"resolv_conf"`
	// UpstreamAddrs holds Upstreams parsed, with port 53 where none was given.
	UpstreamAddrs []netip.AddrPort `mapstructure:"-"`
	// ForwardRaw are the dns.forward entries (maps or strings); Forward
	// holds them parsed.
	ForwardRaw []any     `mapstructure:"forward"`
	Forward    []Forward `mapstructure:"-"`
	// EngineZones are zones answered by the container engine's DNS server
	// on the client's own bridge (Podman's aardvark-dns for dns.podman),
	// canonical once validated (see engine.go).
	EngineZones []string `mapstructure:"engine_zones"`
	// LocalInterface is the dummy interface egressd creates to own the
	// proxy's local addresses, LocalIPv4 and LocalIPv6 (raw; Local4 and
	// Local6 parsed): container DNS is DNATed there (localaddr.go).
	LocalInterface string        `mapstructure:"local_interface"`
	LocalIPv4      string        `mapstructure:"local_ipv4"`
	LocalIPv6      string        `mapstructure:"local_ipv6"`
	Local4         netip.Addr    `mapstructure:"-"`
	Local6         netip.Addr    `mapstructure:"-"`
	QueryBudget    time.Duration `mapstructure:"query_budget"`
	Limits         Limits        `mapstructure:"limits"`
}

// Limits bound what one client address can hold of the proxy
// (dns.limits; dnsresolve takes them as they are). default.yaml documents
// each key and holds its default. Every field is required: validate wants
// each one positive, except RatePerClient, whose 0 means no rate limit.
type Limits struct {
	TCPConnectionsPerClient int           `mapstructure:"tcp_connections_per_client"`
	TCPConnections          int           `mapstructure:"tcp_connections"`
	TCPIdleTimeout          time.Duration `mapstructure:"tcp_idle_timeout"`
	TCPReadTimeout          time.Duration `mapstructure:"tcp_read_timeout"`
	InFlightPerClient       int           `mapstructure:"in_flight_per_client"`
	RatePerClient           float64       `mapstructure:"rate_per_client"`
	Clients                 int           `mapstructure:"clients"`
}

// Firewall configures the ruleset.
type Firewall struct {
	Mode       Mode             `mapstructure:"mode"`
	Containers []ifname.Pattern `mapstructure:"containers"`
	Unfiltered []ifname.Pattern `mapstructure:"unfiltered"`
	Antispoof  []ifname.Pattern `mapstructure:"antispoof"`
	Host       bool             `mapstructure:"host"`
	Action     Action           `mapstructure:"action"`
	Mark       uint32           `mapstructure:"mark"`
	NFLOGGroup uint16           `mapstructure:"nflog_group"`
	MaxLearned int              `mapstructure:"max_learned"`
	// EngineCgroups are the cgroups of host processes that resolve names
	// for containers (see EngineCgroupPath).
	EngineCgroups []string `mapstructure:"engine_cgroups"`
}

// EngineCgroupPath returns the cgroup v2 path, relative to the cgroup2
// mount, of a firewall.engine_cgroups entry: a path as is, a systemd
// service ("docker.service") in system.slice.
func EngineCgroupPath(entry string) (string, error) {
	switch {
	case strings.HasPrefix(entry, "/") && path.Clean(entry) == entry && entry != "/":
		return entry, nil
	case strings.HasSuffix(entry, ".service") && !strings.Contains(entry, "/") && len(entry) > len(".service"):
		return "/system.slice/" + entry, nil
	}
	return "", fmt.Errorf("%q is neither a cgroup path below the cgroup2 mount (\"/kubepods.slice\") nor a systemd service (\"docker.service\")", entry)
}

// Mode is firewall.mode.
type Mode string

// Firewall modes.
const (
	// ModeEnforce blocks what the allow-list does not allow.
	ModeEnforce Mode = "enforce"
	// ModeAudit installs the same ruleset, but blocking verdicts only log
	// and count (would_block) and names that are not allowed are answered
	// (logged as would-refuse): for rolling egressd out onto running
	// systems.
	ModeAudit Mode = "audit"
)

// Action is firewall.action: what enforce mode does with a connection it
// blocks.
type Action string

const (
	// ActionReject answers with a TCP reset or an ICMP error, so that
	// clients fail fast.
	ActionReject Action = "reject"
	// ActionDrop drops silently.
	ActionDrop Action = "drop"
)

// Refusal is dns.refuse_with: the answer to a name that is not allowed.
type Refusal string

const (
	RefuseRefused  Refusal = "refused"  // REFUSED
	RefuseNXDomain Refusal = "nxdomain" // NXDOMAIN: the name does not exist
)

// LogLevel is log.level.
type LogLevel string

const (
	LevelDebug LogLevel = "debug"
	LevelInfo  LogLevel = "info"
	LevelWarn  LogLevel = "warn"
	LevelError LogLevel = "error"
)

// Slog returns the level as slog's.
func (l LogLevel) Slog() slog.Level {
	switch l {
	case LevelDebug:
		return slog.LevelDebug
	case LevelWarn:
		return slog.LevelWarn
	case LevelError:
		return slog.LevelError
	}
	return slog.LevelInfo
}

// LogFormat is log.format.
type LogFormat string

const (
	FormatText LogFormat = "text"
	FormatJSON LogFormat = "json"
)

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `mapstructure:"listen"`
}

// Control configures the control socket of `egressd run`.
type Control struct {
	Socket string `mapstructure:"socket"`
}

// Log configures logging.
type Log struct {
	Level  LogLevel  `mapstructure:"level"`
	Format LogFormat `mapstructure:"format"`
}

// Load reads the embedded default, then the YAML file at path (if path is
// not empty), then environment overrides from env (os.Environ() form), and
// validates the result.
func Load(path string, env []string) (*Config, error) {
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(Default)); err != nil {
		return nil, fmt.Errorf("embedded default config: %w", err)
	}
	known := v.AllKeys()
	name := "default config"
	var set func(key string) bool // whether the file sets key
	if path != "" {
		name = path
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("load config: %w", err)
		}
		if err := v.MergeConfig(bytes.NewReader(data)); err != nil {
			return nil, fmt.Errorf("load config %s: %w", path, err)
		}
		own := viper.New()
		own.SetConfigType("yaml")
		_ = own.ReadConfig(bytes.NewReader(data)) // parsed by MergeConfig already
		set = own.IsSet
		// viper's own message for unknown keys ("'' has invalid keys")
		// does not say which file or where, so check before decoding.
		for _, k := range v.AllKeys() {
			if !slices.Contains(known, k) {
				return nil, fmt.Errorf("load config %s: %s: unknown key", path, k)
			}
		}
	}
	for _, k := range known {
		envName := "EGRESSD_" + strings.ToUpper(strings.ReplaceAll(k, ".", "_"))
		val, ok := lookup(env, envName)
		if !ok {
			continue
		}
		if _, isList := v.Get(k).([]any); isList {
			// Lists come from the environment comma-separated.
			var items []string
			for _, it := range strings.Split(val, ",") {
				if it = strings.TrimSpace(it); it != "" {
					items = append(items, it)
				}
			}
			v.Set(k, items)
			continue
		}
		v.Set(k, val)
	}
	dropDefaultNames(v, set, env)
	var c Config
	err := v.UnmarshalExact(&c, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		durationHook,
	)))
	if err != nil {
		return nil, fmt.Errorf("load config %s: %s", name, decodeMessage(err))
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("invalid config %s: %w", name, err)
	}
	return &c, nil
}

// dropDefaultNames empties the default's allow.domains and allow.names
// (the Azure metering names, allowed to everyone) when the configuration
// writes rules of its own (allow.rules or allow.include) and not those
// keys: its rules say whom those names are for.
func dropDefaultNames(v *viper.Viper, fileSets func(string) bool, env []string) {
	sets := func(key string) bool {
		_, inEnv := lookup(env, "EGRESSD_"+strings.ToUpper(strings.ReplaceAll(key, ".", "_")))
		return inEnv || fileSets != nil && fileSets(key)
	}
	if !sets("allow.rules") && !sets("allow.include") {
		return
	}
	for _, k := range []string{"allow.domains", "allow.names"} {
		if !sets(k) {
			v.Set(k, []string{})
		}
	}
}

// durationHook parses durations with a message that shows the bad value.
func durationHook(f, t reflect.Type, data any) (any, error) {
	if t != reflect.TypeOf(time.Duration(0)) || f.Kind() != reflect.String {
		return data, nil
	}
	d, err := time.ParseDuration(data.(string))
	if err != nil {
		return nil, fmt.Errorf("%q is not a duration (such as 500ms, 30s, 2m)", data)
	}
	return d, nil
}

func lookup(env []string, key string) (string, bool) {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v, true
		}
	}
	return "", false
}

// decodeMessage turns mapstructure's multi-line report into one line per
// problem, each starting with the field.
func decodeMessage(err error) string {
	var lines []string
	for _, l := range strings.Split(err.Error(), "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "*"))
		if l == "" || strings.Contains(l, "error(s) decoding") || strings.HasPrefix(l, "decoding failed") {
			continue
		}
		// "'dns.grace' msg" -> "dns.grace: msg"
		if m := fieldQuote.FindStringSubmatch(l); m != nil {
			l = m[1] + ": " + m[2]
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "; ")
}

var fieldQuote = regexp.MustCompile(`^'([^']+)' (.*)$`)

// validate checks c and fills in what its fields parse to, section by
// section; the errors are joined in the order of the sections.
func (c *Config) validate() error {
	var errs []error
	for _, section := range []func() []error{
		c.validateAllow, c.validateDNS, c.validateLimits, c.validateTTLs,
		c.validateForward, c.validateEngineZones, c.validateLocal, c.validateResolving,
		c.validateFirewall, c.validateService, c.validateRules,
	} {
		errs = append(errs, section()...)
	}
	return errors.Join(errs...)
}

// validateAllow checks allow.* and parses allow.cidrs.
func (c *Config) validateAllow() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	for i, d := range c.Allow.Domains {
		if err := dnsname.Check(d, true); err != nil {
			bad("allow.domains[%d]: %q %v", i, d, err)
		}
	}
	dupes(&errs, "allow.domains", c.Allow.Domains, nameKey)
	if len(c.Allow.Ports) == 0 {
		bad("allow.ports: empty: no port could be opened")
	}
	for i, p := range c.Allow.Ports {
		if p < 1 || p > 65535 {
			bad("allow.ports[%d]: %d is not a TCP port (1-65535)", i, p)
		}
	}
	dupes(&errs, "allow.ports", c.Allow.Ports, strconv.Itoa)
	allowed := dnsname.NewMatcher(c.Allow.Domains)
	for i, n := range c.Allow.Names {
		if err := dnsname.Check(n, false); err != nil {
			bad("allow.names[%d]: %q %v", i, n, err)
		} else if !allowed.Match(n) {
			bad("allow.names[%d]: %q is not allowed by allow.domains", i, n)
		}
	}
	dupes(&errs, "allow.names", c.Allow.Names, nameKey)
	c.Allow.Static = nil
	for i, s := range c.Allow.CIDRs {
		st, err := parseStaticEntry(s)
		if err != nil {
			sep := "."
			if _, isString := s.(string); isString {
				sep = ": "
			}
			bad("allow.cidrs[%d]%s%v", i, sep, err)
			continue
		}
		c.Allow.Static = append(c.Allow.Static, st)
	}
	dupes(&errs, "allow.cidrs", c.Allow.Static, Static.String)
	return errs
}

// validateDNS checks the proxy port, the upstreams and the query budget.
func (c *Config) validateDNS() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.DNS.ListenPort < 1 || c.DNS.ListenPort > 65535 {
		bad("dns.listen_port: %d is not a port (1-65535)", c.DNS.ListenPort)
	} else if c.DNS.ListenPort == 53 {
		bad("dns.listen_port: 53 would be redirected to itself; choose another port")
	}
	c.DNS.UpstreamAddrs = nil
	for i, u := range c.DNS.Upstreams {
		ap, err := ParseUpstream(u)
		if err != nil {
			bad("dns.upstreams[%d]: %q %v", i, u, err)
			continue
		}
		c.DNS.UpstreamAddrs = append(c.DNS.UpstreamAddrs, ap)
	}
	dupes(&errs, "dns.upstreams", c.DNS.Upstreams, strings.TrimSpace)
	if c.DNS.Timeout <= 0 {
		bad("dns.timeout: %v must be positive", c.DNS.Timeout)
	}
	if c.DNS.QueryBudget < 100*time.Millisecond {
		bad("dns.query_budget: %v must be at least 100ms", c.DNS.QueryBudget)
	}
	return errs
}

// validateLimits checks dns.limits.
func (c *Config) validateLimits() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	lim := c.DNS.Limits
	for _, n := range []struct {
		field string
		v     int
	}{{"tcp_connections_per_client", lim.TCPConnectionsPerClient}, {"tcp_connections", lim.TCPConnections},
		{"in_flight_per_client", lim.InFlightPerClient}, {"clients", lim.Clients}} {
		if n.v < 1 {
			bad("dns.limits.%s: %d must be at least 1", n.field, n.v)
		}
	}
	if lim.TCPConnectionsPerClient > lim.TCPConnections && lim.TCPConnections >= 1 {
		bad("dns.limits.tcp_connections_per_client: %d is more than dns.limits.tcp_connections (%d)", lim.TCPConnectionsPerClient, lim.TCPConnections)
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{{"tcp_idle_timeout", lim.TCPIdleTimeout}, {"tcp_read_timeout", lim.TCPReadTimeout}} {
		if d.v < 100*time.Millisecond {
			bad("dns.limits.%s: %v must be at least 100ms", d.field, d.v)
		}
	}
	if lim.RatePerClient < 0 {
		bad("dns.limits.rate_per_client: %v must not be negative (0: no rate limit)", lim.RatePerClient)
	}
	return errs
}

// validateTTLs checks the TTL bounds, dns.grace and dns.rebinding_exempt.
func (c *Config) validateTTLs() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.DNS.MinTTL < 0 {
		bad("dns.min_ttl: %v must not be negative", c.DNS.MinTTL)
	}
	if c.DNS.MaxTTL < time.Second {
		bad("dns.max_ttl: %v must be at least 1s (TTLs are whole seconds)", c.DNS.MaxTTL)
	} else if c.DNS.MaxTTL < c.DNS.MinTTL {
		bad("dns.max_ttl: %v is less than dns.min_ttl (%v)", c.DNS.MaxTTL, c.DNS.MinTTL)
	}
	c.DNS.Exempt = nil
	for i, s := range c.DNS.RebindingExempt {
		p, err := parseExempt(s)
		if err != nil {
			bad("dns.rebinding_exempt[%d]: %q %v", i, s, err)
			continue
		}
		c.DNS.Exempt = append(c.DNS.Exempt, p)
	}
	dupes(&errs, "dns.rebinding_exempt", c.DNS.RebindingExempt, strings.TrimSpace)
	if c.DNS.Grace < 0 {
		bad("dns.grace: %v must not be negative", c.DNS.Grace)
	}
	if c.DNS.MinTTL+c.DNS.Grace < time.Second {
		bad("dns.min_ttl + dns.grace: %v is less than 1s: answers would be unusable", c.DNS.MinTTL+c.DNS.Grace)
	}
	return errs
}

// validateResolving checks how names are refused and which resolver files are kept.
func (c *Config) validateResolving() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if !slices.Contains([]Refusal{RefuseRefused, RefuseNXDomain}, c.DNS.RefuseWith) {
		bad("dns.refuse_with: %q must be \"refused\" or \"nxdomain\"", c.DNS.RefuseWith)
	}

	for i, f := range c.DNS.ResolvConf {
		if !path.IsAbs(f) {
			bad("dns.resolv_conf[%d]: %q must be an absolute path", i, f)
		}
	}
	return errs
}

// validateFirewall checks firewall.*.
func (c *Config) validateFirewall() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	for i, e := range c.Firewall.EngineCgroups {
		if _, err := EngineCgroupPath(e); err != nil {
			bad("firewall.engine_cgroups[%d]: %v", i, err)
		}
	}
	for _, list := range []struct {
		field    string
		patterns []ifname.Pattern
	}{{"firewall.containers", c.Firewall.Containers}, {"firewall.unfiltered", c.Firewall.Unfiltered}, {"firewall.antispoof", c.Firewall.Antispoof}} {
		for i, p := range list.patterns {
			if list.field == "firewall.antispoof" && p == ifname.Any {
				continue // every interface
			}
			if err := p.Check(); err != nil {
				bad("%s[%d]: %q %v", list.field, i, p, err)
			}
		}
		dupes(&errs, list.field, list.patterns, func(p ifname.Pattern) string { return strings.TrimSpace(string(p)) })
	}
	for i, p := range c.Firewall.Unfiltered {
		if slices.Contains(c.Firewall.Containers, p) {
			bad("firewall.unfiltered[%d]: %q is also in firewall.containers: filter it or not", i, p)
		}
	}
	if !slices.Contains([]Mode{ModeEnforce, ModeAudit}, c.Firewall.Mode) {
		bad("firewall.mode: %q must be \"enforce\" or \"audit\"", c.Firewall.Mode)
	} else if c.Firewall.Mode == ModeAudit && c.Firewall.NFLOGGroup == 0 {
		bad("firewall.mode: audit reports what it would block through firewall.nflog_group, which is 0; set a group")
	}
	if !slices.Contains([]Action{ActionReject, ActionDrop}, c.Firewall.Action) {
		bad("firewall.action: %q must be \"reject\" or \"drop\"", c.Firewall.Action)
	}
	if c.Firewall.MaxLearned < 1 {
		bad("firewall.max_learned: %d must be at least 1", c.Firewall.MaxLearned)
	}
	if c.Firewall.Mark == 0 {
		bad("firewall.mark: 0 cannot mark egressd's sockets; choose a non-zero mark")
	}
	return errs
}

// validateService checks metrics, the control socket, the state directory and logging.
func (c *Config) validateService() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.Metrics.Listen != "" {
		if _, err := netip.ParseAddrPort(c.Metrics.Listen); err != nil {
			bad("metrics.listen: %q must be \"ip:port\" (such as 127.0.0.1:9253) or empty", c.Metrics.Listen)
		}
	}
	if !path.IsAbs(c.Control.Socket) {
		bad("control.socket: %q must be an absolute path", c.Control.Socket)
	}
	if !path.IsAbs(c.StateDir) {
		bad("state_dir: %q must be an absolute path", c.StateDir)
	}
	if !slices.Contains([]LogLevel{LevelDebug, LevelInfo, LevelWarn, LevelError}, c.Log.Level) {
		bad("log.level: %q must be debug, info, warn or error", c.Log.Level)
	}
	if !slices.Contains([]LogFormat{FormatText, FormatJSON}, c.Log.Format) {
		bad("log.format: %q must be \"text\" or \"json\"", c.Log.Format)
	}
	return errs
}

func dupes[T any](errs *[]error, field string, items []T, key func(T) string) {
	seen := map[string]int{}
	for i, it := range items {
		k := key(it)
		if j, ok := seen[k]; ok {
			*errs = append(*errs, fmt.Errorf("%s[%d]: %q repeats %s[%d]", field, i, k, field, j))
			continue
		}
		seen[k] = i
	}
}

// nameKey is the form in which two configured names are the same.
func nameKey(n string) string { return dnsname.Canonical(strings.TrimSpace(n)) }

// neverExempt are destinations no DNS answer may open, whatever the
// operator exempts: the host itself and link-local neighbours (cloud
// metadata at 169.254.169.254), multicast and broadcast.
var neverExempt = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("::/127"), // unspecified and loopback
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// parseExempt parses a rebinding_exempt entry: an address or a prefix.
func parseExempt(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	p, err := netip.ParsePrefix(s)
	if !strings.Contains(s, "/") {
		var a netip.Addr
		if a, err = netip.ParseAddr(s); err == nil {
			p = netip.PrefixFrom(a, a.BitLen())
		}
	}
	if err != nil || p.Addr().Zone() != "" || p.Addr().Is4In6() {
		return p, errors.New("is not a plain IPv4 or IPv6 address or prefix")
	}
	if p != p.Masked() {
		return p, fmt.Errorf("has host bits set (did you mean %s?)", p.Masked())
	}
	for _, n := range neverExempt {
		if p.Overlaps(n) {
			return p, fmt.Errorf("overlaps %s, which no answer may open", n)
		}
	}
	return p, nil
}

// ParseUpstream parses "ip" or "ip:port" ("[v6]:port" for IPv6 with a port).
func ParseUpstream(s string) (netip.AddrPort, error) {
	s = strings.TrimSpace(s)
	var ap netip.AddrPort
	if a, err := netip.ParseAddr(s); err == nil {
		ap = netip.AddrPortFrom(a, 53)
	} else if ap, err = netip.ParseAddrPort(s); err != nil {
		return ap, errors.New("is not \"ip\" or \"ip:port\"")
	}
	if ap.Port() == 0 {
		return ap, errors.New("has port 0")
	}
	a := ap.Addr().Unmap()
	if a.IsLoopback() || a.IsUnspecified() || a.IsMulticast() {
		return ap, errors.New("is a loopback, unspecified or multicast address: its queries would be redirected back into egressd")
	}
	return netip.AddrPortFrom(a.WithZone(ap.Addr().Zone()), ap.Port()), nil
}
