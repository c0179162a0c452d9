// Package metrics holds egressd's Prometheus metrics. A nil *Metrics is
// valid and records nothing, so packages can be used without metrics.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Query results.
const (
	Allowed   = "allowed"   // an allowed name was answered (with or without addresses)
	Refused   = "refused"   // the name is not allowed
	Servfail  = "servfail"  // upstream or firewall failure
	Rebinding = "rebinding" // an answer lost addresses to the rebinding guard
	// Forwarded: a name of a dns.forward zone, answered by its servers.
	Forwarded = "forwarded"
	// WouldRefuse: a name that is not allowed, answered in audit mode.
	WouldRefuse = "would_refuse"
)

// Metrics are egressd's collectors.
type Metrics struct {
	reg          *prometheus.Registry
	queries      *prometheus.CounterVec
	queriesBy    map[string]prometheus.Counter // by result
	upstream     prometheus.Histogram
	setUpdate    prometheus.Histogram
	batchSize    prometheus.Histogram
	blocked      *prometheus.CounterVec
	wouldBlock   *prometheus.CounterVec
	enforcing    prometheus.Gauge
	driftRepairs prometheus.Counter
	installs     prometheus.Counter
	setRepairs   *prometheus.CounterVec
	audit        prometheus.Histogram
	saveErrors   prometheus.Counter
	limited      *prometheus.CounterVec
	limitedBy    map[string]prometheus.Counter // resolved once: counting a dropped flood packet must not allocate
	setErrors    prometheus.Counter
}

// New returns the metrics of one egressd. learned reports the live
// elements of each learned set, by set, when scraped.
func New(version string, learned func() map[string]int) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressd_dns_queries_total",
			Help: "DNS queries answered by the proxy, by result: allowed, refused, servfail, forwarded (dns.forward zones), would_refuse (not allowed, answered in audit mode); rebinding counts allowed answers that lost addresses to the rebinding guard.",
		}, []string{"result"}),
		upstream: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressd_upstream_query_duration_seconds",
			Help:    "Time for one query to the upstream resolvers, failover included.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		setUpdate: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressd_set_update_duration_seconds",
			Help:    "Time for one netlink transaction that adds learned addresses, until the kernel acknowledged it.",
			Buckets: prometheus.ExponentialBuckets(0.00002, 2, 16),
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressd_set_update_batch_answers",
			Help:    "Answers committed together in one set update (group commit).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		blocked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressd_blocked_connections_total",
			Help: "Outbound connection attempts rejected or dropped, by source (container or host), reason, and the rule that allows the destination to other sources or on other ports (\"\" if none).",
		}, []string{"source", "reason", "rule"}),
		wouldBlock: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressd_would_block_connections_total",
			Help: "Audit mode (firewall.mode: audit): outbound connection attempts that enforce mode would have blocked and that were let through, by source, reason and rule (as egressd_blocked_connections_total).",
		}, []string{"source", "reason", "rule"}),
		enforcing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "egressd_enforcing",
			Help: "1 when egress is enforced (firewall.mode: enforce), 0 in audit mode, where nothing is blocked.",
		}),
		driftRepairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressd_drift_repairs_total",
			Help: "Times the ruleset was reinstalled because another process changed it.",
		}),
		installs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressd_ruleset_installs_total",
			Help: "Times the whole table was installed (start, reload, drift repair, a change of upstreams, of unknown forwarding interfaces or of on-link subnets); each rewrites every learned address.",
		}),
		setRepairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressd_set_repairs_total",
			Help: "Learned-set elements an audit found differing from what egressd answered, and repaired, by kind: missing, early, late, foreign, expired.",
		}, []string{"kind"}),
		audit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "egressd_set_audit_duration_seconds",
			Help:    "Time for one audit of the learned sets (read back from the kernel and compared).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		saveErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressd_state_save_errors_total",
			Help: "Failed saves of the learned addresses to state_dir.",
		}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "egressd_dns_limited_total",
			Help: "Client queries or TCP connections turned away because the client hit a bound of dns.limits, by reason: rate, in_flight, tcp_per_client, tcp_total, clients.",
		}, []string{"reason"}),
		setErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "egressd_set_update_errors_total",
			Help: "Answers not sent (SERVFAIL) because the firewall did not open their addresses: the kernel refused the set update, it timed out, or firewall.max_learned was reached.",
		}),
	}
	m.queriesBy = map[string]prometheus.Counter{}
	for _, r := range []string{Allowed, Refused, Servfail, Rebinding, Forwarded, WouldRefuse} {
		m.queriesBy[r] = m.queries.WithLabelValues(r)
	}
	m.limitedBy = map[string]prometheus.Counter{}
	for _, r := range []string{"rate", "in_flight", "tcp_per_client", "tcp_total", "clients"} {
		m.limitedBy[r] = m.limited.WithLabelValues(r)
	}
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "egressd_build_info",
		Help:        "Always 1; the version label tells the build.",
		ConstLabels: prometheus.Labels{"version": version},
	})
	info.Set(1)
	m.enforcing.Set(1)
	m.reg.MustRegister(m.queries, m.upstream, m.setUpdate, m.batchSize, m.blocked, m.wouldBlock, m.enforcing, m.driftRepairs, m.installs, m.setRepairs, m.audit, m.saveErrors, m.limited, m.setErrors, info,
		learnedCollector(learned),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Query counts one answered query.
func (m *Metrics) Query(result string) {
	if m != nil {
		m.queriesBy[result].Inc() // a lookup in a small map: once per query
	}
}

// Upstream records the duration of one upstream query.
func (m *Metrics) Upstream(d time.Duration) {
	if m != nil {
		m.upstream.Observe(d.Seconds())
	}
}

// SetUpdate records one committed set update of answers answers.
func (m *Metrics) SetUpdate(d time.Duration, answers int) {
	if m != nil {
		m.setUpdate.Observe(d.Seconds())
		m.batchSize.Observe(float64(answers))
	}
}

// Blocked counts one blocked connection attempt. rule is a rule of the
// configuration or "": the label stays bounded.
func (m *Metrics) Blocked(source, reason, rule string) {
	if m != nil {
		m.blocked.WithLabelValues(source, reason, rule).Inc()
	}
}

// WouldBlock counts one connection attempt that audit mode let through.
func (m *Metrics) WouldBlock(source, reason, rule string) {
	if m != nil {
		m.wouldBlock.WithLabelValues(source, reason, rule).Inc()
	}
}

// Enforcing records whether egress is enforced (false: audit mode).
func (m *Metrics) Enforcing(on bool) {
	if m != nil {
		v := 0.0
		if on {
			v = 1
		}
		m.enforcing.Set(v)
	}
}

// DriftRepaired counts one drift repair.
func (m *Metrics) DriftRepaired() {
	if m != nil {
		m.driftRepairs.Inc()
	}
}

// RulesetInstalled counts one installed table.
func (m *Metrics) RulesetInstalled() {
	if m != nil {
		m.installs.Inc()
	}
}

// Audited records one audit of the learned sets and the repairs it made,
// by kind.
func (m *Metrics) Audited(d time.Duration, repairs map[string]int) {
	if m != nil {
		m.audit.Observe(d.Seconds())
		for kind, n := range repairs {
			m.setRepairs.WithLabelValues(kind).Add(float64(n))
		}
	}
}

// SaveFailed counts one failed state save.
func (m *Metrics) SaveFailed() {
	if m != nil {
		m.saveErrors.Inc()
	}
}

// Limited counts one query or connection turned away by a client bound.
func (m *Metrics) Limited(reason string) {
	if m == nil {
		return
	}
	if c, ok := m.limitedBy[reason]; ok {
		c.Inc()
		return
	}
	m.limited.WithLabelValues(reason).Inc()
}

// SetUpdateFailed counts one answer whose addresses the firewall did not
// open.
func (m *Metrics) SetUpdateFailed() {
	if m != nil {
		m.setErrors.Inc()
	}
}

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// learnedDesc is egressd_learned_addresses: one series per learned set,
// two per rule with names (bounded by the configuration).
var learnedDesc = prometheus.NewDesc("egressd_learned_addresses",
	"Live elements of a learned-address set (NAME4 and NAME6 of each rule with names).", []string{"set"}, nil)

// learnedCollector reports learned's counts when scraped.
type learnedCollector func() map[string]int

func (c learnedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- learnedDesc }

func (c learnedCollector) Collect(ch chan<- prometheus.Metric) {
	for set, n := range c() {
		ch <- prometheus.MustNewConstMetric(learnedDesc, prometheus.GaugeValue, float64(n), set)
	}
}
