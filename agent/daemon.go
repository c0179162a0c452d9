package agent

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsresolve"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/metrics"
	"github.com/egressd/egressd/rules"
)

// Intervals of the daemon's housekeeping.
const (
	saveInterval   = time.Second     // learned addresses to state_dir, if any were learned
	statusInterval = 5 * time.Second // systemd status line
	// engineScanInterval is how often running container engines are
	// checked for DNS that nothing filters.
	engineScanInterval = 30 * time.Second
	driftInterval      = 2 * time.Second // backstop for missed nftables events
	// The learned sets are read back and compared at least this often,
	// and at most 5% of the time (reading 100 000 elements takes seconds:
	// the kernel walks its hash for every dump message).
	auditInterval = 30 * time.Second
)

type daemon struct {
	path    string
	version string
	started time.Time
	log     *slog.Logger
	errors  *errorLog
	metrics *metrics.Metrics
	fw      *firewall.Firewall
	proxy   *dnsresolve.Proxy
	engines *engines // the engine zones' servers, from the container bridges' addresses
	clients *clients // what client addresses are, for rules that are not uniform
	// cfg is replaced by reload while the control socket and watchers
	// read it.
	cfg       atomic.Pointer[config.Config]
	repairs   atomic.Int64
	lastAudit atomic.Pointer[auditResult]
	audit     chan struct{} // asks for an audit now
	kernel    string        // what ProbeLifetimes found

	// Owned by the main loop.
	stopPinned context.CancelFunc // ends the goroutines of the pinned names
	repairLog  *rate.Limiter
	nextSave   time.Time // throttles saving a large state file to 5% of the time
	saved      uint64    // version of the learned addresses last saved
	host       rules.Host
	links      linkState // which forwarding interfaces are unknown, what was logged

	waiting atomic.Pointer[string] // why the proxy cannot answer, for status
	// saveFailing says since when and why the learned addresses cannot
	// be saved (nil: the last save worked), for status.
	saveFailing atomic.Pointer[saveFailure]
	// flows deletes the conntrack entries of egressd's own upstream
	// queries; nil if ctnetlink could not be opened.
	flows dnsresolve.Flows
	// enginesReported is the engine-cgroup problem last logged ("" none);
	// enginesSeen, the engine processes reported unfiltered (by name and
	// cgroup: a handful per host).
	enginesReported string
	enginesSeen     map[string]bool
}

type saveFailure struct {
	Since  time.Time
	Err    error
	logged time.Time // owned by the main loop
}

// saveLogInterval is how often a failing save is logged again.
const saveLogInterval = time.Minute

func (d *daemon) config() *config.Config { return d.cfg.Load() }

// Run is the daemon: it installs the ruleset, serves the DNS proxy and keeps
// pinned names open until ctx ends. It reloads the config on SIGHUP,
// repairs the ruleset when another process changes it, reports blocked
// connections, and answers on the control socket and the metrics endpoint.
//
// Stopping, or dying, leaves the firewall in place (fail closed): learned
// addresses stay open until their timeouts, everything else stays blocked,
// and DNS stays redirected to the (then silent) proxy port. Only
// `egressd remove` opens egress again.
func Run(ctx context.Context, path, version string, cfg *config.Config, log *slog.Logger) error {
	fw, err := firewall.New()
	if err != nil {
		return err
	}
	errs := newErrorLog(log.Handler())
	log = slog.New(errs)
	d := &daemon{path: path, version: version, started: time.Now(), log: log, errors: errs, fw: fw,
		audit:     make(chan struct{}, 1),
		metrics:   metrics.New(version, fw.Counts),
		repairLog: rate.NewLimiter(rate.Every(time.Second), 10), enginesSeen: map[string]bool{}}
	d.cfg.Store(cfg)
	fw.Observe(d.metrics)
	// Without a usable upstream the proxy answers SERVFAIL and the daemon
	// waits for dns.resolv_conf to name one (rediscover).
	pl, err := start(ctx, cfg, fw, log)
	if err != nil {
		return err
	}
	d.host = pl.host
	log.Info("ruleset installed", "ruleset", pl.rs.Summary(), "kept", d.learned(), "upstreams", pl.ups, "mode", cfg.Firewall.Mode)
	d.announceMode(nil, cfg)
	if l, err := fw.ProbeLifetimes(); err != nil {
		log.Error("set element lifetimes", "err", err)
		d.kernel = "probe failed: " + err.Error()
	} else {
		log.Info("set element lifetimes", "kernel", l)
		d.kernel = l.String()
	}
	d.reportUnknown()
	d.setWaiting(pl.upErr)

	own, flows := openFlows(log)
	defer own.close()
	d.flows = flows
	d.engines = newEngines(d.config, log)
	d.clients = newClients()
	d.proxy = dnsresolve.NewProxy(proxyOptions(cfg, pl.ups, fw, d.flows, log, d.metrics, d.engines, d.clients))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Blocked connections are reported from before the proxy answers.
	names := newLinkNames()
	if cfg.Firewall.NFLOGGroup != 0 {
		watchBlocked(ctx, cfg.Firewall.NFLOGGroup, d.config, fw, d.metrics, names, log)
	}
	d.startPinned(ctx)
	// The control socket and the metrics endpoint listen before the proxy
	// answers: whoever sees DNS answered can ask them.
	d.background(d.listenControl(ctx, cfg.Control.Socket))
	if cfg.Metrics.Listen != "" {
		d.background(d.listenMetrics(ctx, cfg.Metrics.Listen))
	}

	ready := make(chan struct{})
	served := make(chan error, 1)
	go func() {
		served <- d.proxy.Serve(ctx, cfg.DNS.ListenPort, func() { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-served:
		return err
	}
	log.Info("DNS proxy listening", "port", cfg.DNS.ListenPort)

	relink := make(chan struct{}, 1)
	d.links.kick = func() { offer(relink, struct{}{}) }
	go watchLinks(ctx, d.config, d.links.kick, d.engines.invalidate, names, log)
	go watchEngines(ctx, cfg, d.links.kick, log)
	d.reportEngines()
	d.reportUnfilteredEngines()
	engineScan := time.NewTicker(engineScanInterval)
	defer engineScan.Stop()
	go d.auditSets(ctx)
	resolv := make(chan struct{}, 1)
	go watchResolvConf(ctx, cfg.DNS.ResolvConf, func() { offer(resolv, struct{}{}) })
	changed := make(chan string, 1)
	go fw.Watch(ctx, func(reason string) { offer(changed, reason) }) // else a repair is already due
	d.notify(sd.SdNotifyReady)

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if path != "" {
		// A changed file reloads exactly as SIGHUP does (configwatch.go).
		go watchConfig(ctx, path, func() {
			log.Info("config file changed; reloading", "path", path)
			offer[os.Signal](hup, syscall.SIGHUP) // else a reload is due already; it reads the newest file
		}, log)
	}
	save := time.NewTicker(saveInterval)
	defer save.Stop()
	status := time.NewTicker(statusInterval)
	defer status.Stop()
	check := time.NewTicker(driftInterval)
	defer check.Stop()
	var watchdog <-chan time.Time
	if iv, err := sd.SdWatchdogEnabled(false); err == nil && iv > 0 {
		t := time.NewTicker(iv / 2)
		defer t.Stop()
		watchdog = t.C
	}

	for {
		select {
		case <-ctx.Done():
			return d.stop()
		case err := <-served:
			if ctx.Err() != nil {
				return d.stop() // stopping, and the proxy ended first
			}
			d.save()
			return fmt.Errorf("DNS proxy stopped: %w", err)
		case <-hup:
			_, _ = sd.SdNotify(false, sd.SdNotifyReloading)
			d.reload(ctx)
			d.notify(sd.SdNotifyReady)
		case reason := <-changed:
			d.repair(ctx, reason)
		case <-resolv:
			d.rediscover(ctx)
		case <-relink:
			d.relink(ctx)
		case <-check.C:
			d.ensureLocal()
			d.repair(ctx, "")
			// An engine cgroup that came or went unnoticed (the kernel's
			// lack of cgroup matching is reported, not retried).
			if cgs, _ := presentEngines(d.config()); d.enginesReported == "" && !slices.Equal(cgs, d.host.Engines) ||
				!maps.Equal(ruleCgroups(d.config()), d.host.Cgroups) {
				d.relink(ctx)
			}
		case now := <-save.C:
			if d.fw.Version() != d.saved && !now.Before(d.nextSave) {
				d.save()
			}
		case <-status.C:
			d.notify("")
		case <-engineScan.C:
			d.reportUnfilteredEngines()
		case <-watchdog:
			// Pinging only from this loop means a wedged loop gets
			// restarted by systemd.
			_, _ = sd.SdNotify(false, sd.SdNotifyWatchdog)
		}
	}
}

func (d *daemon) stop() error {
	_, _ = sd.SdNotify(false, sd.SdNotifyStopping)
	d.save()
	d.log.Info("stopped; the firewall stays in place (egressd remove opens it)")
	return nil
}

// background runs serve, what a listener that opened (err nil) serves;
// a failure is logged, and egressd keeps enforcing without it.
func (d *daemon) background(serve func() error, err error) {
	if err != nil {
		d.log.Error("not served", "err", err)
		return
	}
	go func() {
		if err := serve(); err != nil {
			d.log.Error("no longer served", "err", err)
		}
	}()
}

func (d *daemon) learned() int {
	n := 0
	for _, c := range d.fw.Counts() {
		n += c
	}
	return n
}

// announceMode says plainly, at start and when a reload changes it,
// whether egress is enforced, and sets the metric.
func (d *daemon) announceMode(old, cfg *config.Config) {
	audit := cfg.Firewall.Mode == config.ModeAudit
	d.metrics.Enforcing(!audit)
	switch {
	case old != nil && old.Firewall.Mode == cfg.Firewall.Mode:
	case audit:
		d.log.Warn("AUDIT MODE: egress is NOT enforced; connections and names that enforce mode would block are let through, logged and counted as would_block and would_refuse (firewall.mode: audit)")
	case old != nil:
		d.log.Info("enforce mode: egress is enforced again (firewall.mode: enforce)")
	}
}

func (d *daemon) notify(state string) {
	mode := "enforcing"
	if d.config().Firewall.Mode == config.ModeAudit {
		mode = "AUDIT MODE, egress not enforced"
	}
	status := fmt.Sprintf("STATUS=%s; %d learned addresses; %d drift repairs", mode, d.learned(), d.repairs.Load())
	if state != "" {
		status = state + "\n" + status
	}
	_, _ = sd.SdNotify(false, status)
}

// save writes the learned addresses to state_dir. A failure (state_dir
// read-only, full, gone) changes nothing in what egressd serves: it is
// counted, logged when it starts and once a minute while it lasts, makes
// status unhealthy, and the main loop tries again every saveInterval
// (the version stays unsaved) until a save works.
func (d *daemon) save() {
	start := time.Now()
	learned, version := d.fw.LearnedSeq()
	entries, err := saveState(d.config().StateDir, learned)
	d.nextSave = start.Add(20 * time.Since(start))
	prev := d.saveFailing.Load()
	if err == nil {
		d.saved = version
		if prev != nil {
			d.saveFailing.Store(nil)
			d.log.Info("learned addresses saved again", "failing_since", prev.Since, "entries", entries)
		}
		return
	}
	d.metrics.SaveFailed()
	f := &saveFailure{Since: start, Err: err, logged: start}
	if prev != nil {
		f.Since, f.logged = prev.Since, prev.logged
	}
	if prev == nil || start.Sub(prev.logged) >= saveLogInterval {
		f.logged = start
		d.log.Error("learned addresses not saved; serving goes on, saving is retried every second", "err", err, "failing_since", f.Since)
	}
	d.saveFailing.Store(f)
}

// repair reinstalls the ruleset if it drifted. reason is the event that
// prompted the check ("" for the periodic one); changed elements are not
// visible to Drift, so an event also asks for an audit of the sets unless
// the reinstall rewrote them anyway.
func (d *daemon) repair(ctx context.Context, reason string) {
	drift, err := d.fw.Drift(ctx)
	if err != nil {
		d.log.Error("drift check failed", "err", err)
		return
	}
	if strings.HasPrefix(reason, firewall.ReasonEventsLost) && d.repairLog.Allow() {
		d.log.Warn("nftables events lost: checking the ruleset and auditing the learned sets", "event", reason)
	}
	if drift == "" {
		if reason != "" {
			d.auditNow()
		}
		return
	}
	cfg := d.config()
	err = d.fw.Install(ctx, rules.BuildFor(cfg, d.host), nil, nil)
	if err != nil {
		d.log.Error("drift not repaired", "event", reason, "found", drift, "err", err)
		return
	}
	forget(cfg, d.log)
	d.repairs.Add(1)
	d.metrics.DriftRepaired()
	if d.repairLog.Allow() {
		d.log.Warn("drift repaired", "event", reason, "found", drift, "learned", d.learned())
	}
}

// reload re-reads the config. An invalid config is logged and the old one
// stays in force; a valid one is installed atomically, keeping the learned
// addresses whose names the new config still allows.
func (d *daemon) reload(ctx context.Context) {
	old := d.config()
	cfg, err := config.Load(d.path, os.Environ())
	if err == nil {
		err = unchangeable(old, cfg)
	}
	if err != nil {
		d.log.Error("reload failed; the old config stays in force", "err", err)
		return
	}
	stillAllowed := learnedAllowed(cfg, time.Now())
	pl, err := planFor(cfg, d.host.Cgroup)
	if err != nil {
		d.log.Error("reload failed; the old config stays in force", "err", err)
		return
	}
	if _, err := ensureLocal(cfg); err != nil {
		d.log.Error("reload failed; the old config stays in force", "err", err)
		return
	}
	if err := d.fw.Install(ctx, pl.rs, nil, stillAllowed); err != nil {
		d.log.Error("reload failed; the old ruleset stays in force", "err", err)
		return
	}
	// The proxy follows the ruleset at once: until it does, it answers
	// with the old config's names and mode.
	d.proxy.Update(proxyOptions(cfg, pl.ups, d.fw, d.flows, d.log, d.metrics, d.engines, d.clients))
	d.host = pl.host
	d.setWaiting(pl.upErr)
	d.fw.Limit(cfg.Firewall.MaxLearned)
	d.cfg.Store(cfg)
	d.engines.invalidate() // firewall.containers and unfiltered may have changed
	forget(cfg, d.log)
	d.startPinned(ctx)
	d.log.Info("config reloaded", "ruleset", pl.rs.Summary(), "kept", d.learned(), "mode", cfg.Firewall.Mode)
	d.announceMode(old, cfg)
}

// unchangeable rejects a new config that changes what only a restart can.
func unchangeable(old, cfg *config.Config) error {
	switch {
	case cfg.DNS.ListenPort != old.DNS.ListenPort:
		return fmt.Errorf("dns.listen_port cannot change on reload (%d to %d); restart egressd", old.DNS.ListenPort, cfg.DNS.ListenPort)
	case cfg.DNS.LocalInterface != old.DNS.LocalInterface:
		return fmt.Errorf("dns.local_interface cannot change on reload (%s to %s); restart egressd", old.DNS.LocalInterface, cfg.DNS.LocalInterface)
	case cfg.Control.Socket != old.Control.Socket, cfg.Metrics.Listen != old.Metrics.Listen, cfg.Firewall.NFLOGGroup != old.Firewall.NFLOGGroup:
		return fmt.Errorf("control.socket, metrics.listen and firewall.nflog_group cannot change on reload; restart egressd")
	case !slices.Equal(cfg.DNSClasses(), old.DNSClasses()):
		return fmt.Errorf("the host services whose DNS the proxy tells apart (the cgroups of the rules' from and firewall.engine_cgroups, each on a port of its own: %v to %v) cannot change on reload; restart egressd", old.DNSClasses(), cfg.DNSClasses())
	}
	return nil
}

// startPinned (re)starts keeping the pinned names of the current config open.
func (d *daemon) startPinned(ctx context.Context) {
	if d.stopPinned != nil {
		d.stopPinned()
	}
	ctx, d.stopPinned = context.WithCancel(ctx)
	for _, name := range d.config().Allow.Names {
		go keepPinned(ctx, d.proxy, name, d.log)
	}
}

// keepPinned resolves name and refreshes it at half its remaining life, so
// its addresses never expire while the upstream answers.
func keepPinned(ctx context.Context, p *dnsresolve.Proxy, name string, log *slog.Logger) {
	for {
		n, until, err := openPinned(ctx, p, name)
		wait := 5 * time.Second
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("pinned name not refreshed", "name", name, "err", err)
		} else {
			wait = max(time.Until(until)/2, time.Second)
			log.Debug("pinned name refreshed", "name", name, "addresses", n, "next", wait)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// auditResult is the last audit of the learned sets, for status.
type auditResult struct {
	firewall.Audit
	Err error
}

func (d *daemon) auditNow() { offer(d.audit, struct{}{}) } // else one is due already

// offer sends v on ch unless ch is full: the main loop's work items are
// idempotent, one pending is enough.
func offer[T any](ch chan<- T, v T) {
	select {
	case ch <- v:
	default:
	}
}

// auditSets compares the kernel's learned sets with what egressd answered
// and repairs the differences (firewall.Firewall.Audit): when asked, and
// periodically as the backstop for lost events.
func (d *daemon) auditSets(ctx context.Context) {
	limit := rate.NewLimiter(rate.Every(time.Second), 5)
	wait := time.NewTimer(auditInterval)
	defer wait.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.audit:
		case <-wait.C:
		}
		a, err := d.fw.Audit(ctx)
		if ctx.Err() != nil {
			return
		}
		d.lastAudit.Store(&auditResult{Audit: a, Err: err})
		if err != nil {
			d.log.Error("audit of the learned sets failed", "err", err)
		} else {
			repairs := a.Repairs()
			d.metrics.Audited(a.Took, repairs)
			if len(repairs) > 0 && limit.Allow() {
				d.log.Warn("learned sets repaired: the kernel differed from what egressd answered", "repairs", repairs, "elements", a.Elements, "took", a.Took)
			}
		}
		wait.Reset(max(auditInterval, 20*a.Took))
	}
}
