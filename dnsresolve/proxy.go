// Package dnsresolve is egressd's DNS proxy: it answers allow-listed names
// only, and opens each address it answers in the firewall before the answer
// leaves.
package dnsresolve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/metrics"
)

// Allower opens addresses in the firewall, for the rules that allowed
// them to the client that asked. Allow returns only once the addresses
// are reachable (the kernel acknowledged the update), so the proxy can
// send the answer. name is the question the addresses answer.
type Allower interface {
	Allow(ctx context.Context, name string, rules []string, addrs []netip.Addr, until time.Time) error
}

// coverer is implemented by Allowers that can tell without waiting that
// addresses are open long enough already (firewall.Firewall).
type coverer interface {
	Covered(name string, rules []string, addrs []netip.Addr, until time.Time) bool
}

// Options configure a Proxy. Their values come from the configuration
// (agent.proxyOptions): every duration and every bound is required, none
// has a default here (config/default.yaml holds the defaults).
type Options struct {
	// Rules say which names are answered to whom (see policy); Clients
	// tells what a client address is, where rules name interfaces or the
	// host (nil: every client but loopback is a container).
	Rules    []config.Rule
	Clients  Clients
	Upstream *Upstream // where allowed names are resolved
	Allower  Allower
	// An answered address stays open for max(TTL, MinTTL) + Grace, where
	// TTL is at most MaxTTL. The capped TTL is also the one cached and
	// sent to the client, so that no client keeps an address longer than
	// the firewall keeps it open.
	MinTTL, MaxTTL, Grace time.Duration
	// Guard removes addresses that are not globally reachable; nil
	// exempts nothing.
	Guard *Guard
	// RefuseRcode answers names that are not allowed (dns.RcodeRefused or
	// dns.RcodeNameError).
	RefuseRcode int
	// Limits bound what one client can hold (see limits.go).
	Limits config.Limits
	// QueryBudget is the most one query may take, on every path
	// (upstream tries and firewall update, forwarded and engine zones,
	// audit mode), before it is answered SERVFAIL; Resolve's as well.
	QueryBudget time.Duration
	Logger      *slog.Logger
	Metrics     *metrics.Metrics // may be nil
	// Forward lists zones answered by other servers (see ForwardZone).
	// Audit answers names that are not allowed from AuditServers instead
	// of refusing them (firewall.mode audit). Both send from sockets with
	// Mark, each try taking up to ForwardTimeout (all of them within
	// QueryBudget), and delete their UDP flows' conntrack entries through
	// Flows, if not nil.
	Forward []ForwardZone
	// EngineZones are zones answered by the container engine's DNS on
	// the client's own bridge (Podman's aardvark-dns, dns.podman):
	// EngineServers finds that server for each client, and clients it
	// finds none for are refused (nil: all are). A Forward zone as long
	// or longer wins.
	EngineZones   []string
	EngineServers EngineServers
	// Classes are the host cgroups whose DNS comes to ports of their own
	// (config.DNSClasses); Serve listens on them, a reload does not
	// change them.
	Classes        []config.DNSClass
	Audit          bool
	AuditServers   []netip.AddrPort
	Mark           uint32
	ForwardTimeout time.Duration
	Flows          Flows
}

// Proxy is the DNS handler.
//
// Only A and AAAA questions for allowed names are resolved. Every other type
// for an allowed name gets an empty NOERROR answer without asking upstream:
// HTTPS and SVCB records carry address hints that would bypass the sets, and
// no other type is needed to connect. Names that are not allowed are refused
// for every type without asking upstream, so nothing can be tunnelled
// through DNS.
type Proxy struct {
	conf   atomic.Pointer[proxyConf] // replaced as a whole on reload
	log    *slog.Logger
	now    func() time.Time
	flight singleflight.Group // one upstream query per name and type at a time
	// refusals and failures limit log lines so that a noisy client cannot
	// flood the journal.
	refusals, failures *rate.Limiter
	limits             *limiter
}

const (
	// allowTimeout bounds the firewall update of one answer, within the
	// query budget.
	allowTimeout = 2 * time.Second
	// maxUDPAnswer is the largest UDP answer sent, whatever EDNS0 size the
	// client offers (the DNS flag day 2020 value, avoids fragmentation).
	maxUDPAnswer = 1232
	// maxQuerySize is the read buffer per UDP query; real queries are far
	// smaller, and every query in flight holds one.
	maxQuerySize = 4096
	// udpReceiveBuffer is the receive queue of each UDP listener.
	udpReceiveBuffer = 1 << 20
)

type proxyConf struct {
	opts   Options
	policy *policy
	cache  *cache // per configuration: a reload starts empty
	fwd    *forwarding
}

// NewProxy returns a Proxy.
func NewProxy(o Options) *Proxy {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{
		log:      o.Logger,
		now:      time.Now,
		refusals: rate.NewLimiter(rate.Limit(5), 20),
		failures: rate.NewLimiter(rate.Limit(5), 20),
		limits:   newLimiter(o.Limits, o.Logger, o.Metrics),
	}
	p.Update(o)
	return p
}

// Upstream returns the upstream in use.
func (p *Proxy) Upstream() *Upstream { return p.conf.Load().opts.Upstream }

// Allowed returns a rule that allows name to someone, and its pattern.
func (p *Proxy) Allowed(name string) (rule, pattern string, ok bool) {
	return p.conf.Load().policy.allowed(name)
}

// Update replaces the options; queries already being answered finish with
// the old ones (an Upstream keeps no sockets between queries: each query
// closes its own). The logger is not replaced.
func (p *Proxy) Update(o Options) {
	old := p.conf.Swap(&proxyConf{opts: o, policy: newPolicy(o.Rules, o.Clients), cache: newCache(), fwd: newForwarding(o)})
	p.limits.update(o.Limits, o.Metrics)
	if old != nil && old.opts.Upstream != o.Upstream {
		old.opts.Upstream.Close()
	}
}

// Answer is the result of resolving one allowed name.
type Answer struct {
	Rcode int
	Chain Chain
	SOA   []dns.RR // negative-caching records of NXDOMAIN and NODATA answers
	Until time.Time
}

// Resolve asks upstream for name/qtype, follows the CNAME chain (asking
// again where the upstream left it incomplete), removes non-routable
// addresses and opens the remaining ones in the firewall for every rule
// that allows name (the pinned names: open before anyone asks). It
// returns an error if the upstream failed or the firewall did not confirm
// in time, all of it within the query budget (or ctx's deadline, if
// sooner).
func (p *Proxy) Resolve(ctx context.Context, name string, qtype uint16) (*Answer, error) {
	conf := p.conf.Load()
	ctx, cancel := context.WithTimeout(ctx, conf.opts.QueryBudget)
	defer cancel()
	var rules []string
	for _, r := range conf.policy.rules {
		if r.matcher.Match(name) {
			rules = append(rules, r.name)
		}
	}
	return p.resolve(ctx, conf.opts, name, qtype, rules)
}

func (p *Proxy) resolve(ctx context.Context, o Options, name string, qtype uint16, rules []string) (*Answer, error) {
	name = dnsname.Fqdn(name) // pinned names are recorded as answers' names are
	ans := &Answer{}
	target := name
	for hop := 0; ; hop++ {
		start := time.Now()
		resp, err := o.Upstream.Exchange(ctx, target, qtype)
		o.Metrics.Upstream(time.Since(start))
		if err != nil {
			return nil, err
		}
		ans.Rcode = resp.Rcode
		ans.SOA = soa(resp.Ns)
		if !ans.Chain.extract(resp.Answer, target, qtype, o.Guard) || hop == 3 {
			break
		}
		target = ans.Chain.Target
	}
	maxTTL := uint32(min(o.MaxTTL/time.Second, math.MaxUint32))
	ans.Chain.capTTL(maxTTL)
	ans.SOA = capTTL(ans.SOA, maxTTL)
	if len(ans.Chain.Blocked) > 0 {
		o.Metrics.Query(metrics.Rebinding)
		if p.failures.Allow() {
			p.log.Warn("rebinding guard removed answers", "name", name, "type", dns.TypeToString[qtype], "addresses", ans.Chain.Blocked)
		}
	}
	addrs, ttl := ans.Chain.Addresses()
	if len(addrs) == 0 {
		return ans, nil
	}
	ans.Until = p.now().Add(Lifetime(ttl, o.MinTTL, o.Grace))
	actx, cancel := context.WithTimeout(ctx, allowTimeout)
	defer cancel()
	if err := o.Allower.Allow(actx, name, rules, addrs, ans.Until); err != nil {
		o.Metrics.SetUpdateFailed()
		return nil, fmt.Errorf("open %v for %s: %w", addrs, name, err)
	}
	return ans, nil
}

// until is when the addresses of cached answer e, aged age seconds, must
// stay open until if it is answered at now: for the rest of its TTL.
func (c *proxyConf) until(e *cacheEntry, age uint32, now time.Time) time.Time {
	return now.Add(Lifetime(e.ttl-min(age, e.ttl), c.opts.MinTTL, c.opts.Grace))
}

// Lifetime is how long an answered address stays open:
// max(TTL, minTTL) + grace.
func Lifetime(ttl uint32, minTTL, grace time.Duration) time.Duration {
	return max(time.Duration(ttl)*time.Second, minTTL) + grace
}

func soa(ns []dns.RR) []dns.RR {
	var out []dns.RR
	for _, rr := range ns {
		if rr.Header().Rrtype == dns.TypeSOA {
			out = append(out, rr)
		}
	}
	return out
}

// ServeDNS answers one client query.
func (p *Proxy) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	p.serveDNS(w, r, nil)
}

// serveDNS answers one client query that came in on the port of class
// (nil: the main port).
func (p *Proxy) serveDNS(w dns.ResponseWriter, r *dns.Msg, class *config.DNSClass) {
	_, udp := w.RemoteAddr().(*net.UDPAddr)
	client := addrOf(w.RemoteAddr())
	if !p.limits.begin(client, !udp) {
		if udp {
			return // as if lost: the client retries later
		}
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeServerFailure)
		_ = w.WriteMsg(m)
		return
	}
	defer p.limits.end(client)
	m := p.reply(r, asker{addr: client, class: class})
	if udp {
		fitUDP(m, r)
	}
	if err := w.WriteMsg(m); err != nil {
		p.log.Debug("write answer", "client", w.RemoteAddr(), "err", err)
	}
}

// fitUDP truncates m, the answer to r, to the size r's client accepts
// over UDP.
func fitUDP(m, r *dns.Msg) {
	size := dns.MinMsgSize
	if opt := r.IsEdns0(); opt != nil {
		size = min(max(int(opt.UDPSize()), dns.MinMsgSize), maxUDPAnswer)
	}
	m.Truncate(size)
}

// reply answers r from a.
func (p *Proxy) reply(r *dns.Msg, a asker) *dns.Msg {
	client := a.addr
	m := new(dns.Msg)
	m.SetReply(r)
	m.RecursionAvailable = true
	if r.IsEdns0() != nil {
		m.SetEdns0(maxUDPAnswer, false)
	}
	if r.Opcode != dns.OpcodeQuery {
		m.Rcode = dns.RcodeNotImplemented
		return m
	}
	if len(r.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return m
	}
	q := r.Question[0]
	conf := p.conf.Load()
	fm, engineless := p.forwarded(conf, r, client) // forward.go
	if fm != nil {
		return fm
	}
	if engineless {
		if p.refusals.Allow() {
			p.log.Info("refused name of an engine zone: the client is behind no container bridge", "name", q.Name, "type", dns.TypeToString[q.Qtype], "client", client)
		}
		conf.opts.Metrics.Query(metrics.Refused)
		m.Rcode = conf.opts.RefuseRcode
		return m
	}
	rules := conf.policy.rulesFor(a, q.Name)
	if len(rules) == 0 || q.Qclass != dns.ClassINET {
		if am := p.wouldRefuse(conf, r); am != nil {
			return am // audit mode, forward.go
		}
		if p.refusals.Allow() {
			p.log.Info("refused name", "name", q.Name, "type", dns.TypeToString[q.Qtype], "client", client)
		}
		conf.opts.Metrics.Query(metrics.Refused)
		m.Rcode = conf.opts.RefuseRcode
		return m
	}
	if q.Qtype != dns.TypeA && q.Qtype != dns.TypeAAAA {
		conf.opts.Metrics.Query(metrics.Allowed)
		return m // NODATA, see Proxy
	}
	rcode, answer, ns, err := p.answer(conf, q.Name, q.Qtype, rules)
	if err != nil {
		if p.failures.Allow() {
			p.log.Warn("servfail", "name", q.Name, "type", dns.TypeToString[q.Qtype], "err", err)
		}
		conf.opts.Metrics.Query(metrics.Servfail)
		m.Rcode = dns.RcodeServerFailure
		return m
	}
	conf.opts.Metrics.Query(metrics.Allowed)
	m.Rcode, m.Answer, m.Ns = rcode, answer, ns
	return m
}

// sections are the answer and authority sections of the answer to a
// query, aged by age seconds: the SOA of a negative answer only.
func sections(ans *Answer, age uint32) (answer, ns []dns.RR) {
	if len(ans.Chain.Addrs) == 0 {
		ns = aged(ans.SOA, age)
	}
	return aged(ans.Chain.Records(), age), ns
}

// answerMsg is the answer to name/qtype as reply makes it, less what
// depends on the query: ID, RD and CD bits, OPT record.
func answerMsg(name string, qtype uint16, ans *Answer) *dns.Msg {
	m := &dns.Msg{Question: []dns.Question{{Name: name, Qtype: qtype, Qclass: dns.ClassINET}}}
	m.Response, m.RecursionAvailable, m.Rcode = true, true, ans.Rcode
	m.Answer, m.Ns = sections(ans, 0)
	return m
}

// answer returns the answer for an allowed name from the cache or the
// upstream, with its addresses open in the firewall: its rcode and its
// answer and authority sections, TTLs aged. Deadlines are made only where
// waiting may happen: most cache hits find their addresses open long
// enough and need none.
func (p *Proxy) answer(conf *proxyConf, name string, qtype uint16, rules []string) (rcode int, answer, ns []dns.RR, _ error) {
	name = dnsname.Fqdn(name)
	if e, age := conf.cache.get(cacheKey(name, qtype), p.now()); e != nil {
		if len(e.addrs) > 0 {
			if err := p.open(conf, name, rules, e.addrs, conf.until(e, age, p.now())); err != nil {
				return 0, nil, nil, err
			}
		}
		return e.sections(age)
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.opts.QueryBudget)
	defer cancel()
	v, err, shared := p.flight.Do(name+dns.TypeToString[qtype], func() (any, error) {
		ans, err := p.resolve(ctx, conf.opts, name, qtype, rules)
		if err == nil {
			conf.cache.put(name, qtype, ans, p.now(), conf.policy.everyones(name))
		}
		return ans, err
	})
	if err != nil {
		return 0, nil, nil, err
	}
	ans := v.(*Answer)
	// Another client's query resolved it, for its own rules.
	if addrs, _ := ans.Chain.Addresses(); shared && len(addrs) > 0 && !ans.Until.IsZero() {
		if err := p.open(conf, name, rules, addrs, ans.Until); err != nil {
			return 0, nil, nil, err
		}
	}
	answer, ns = sections(ans, 0)
	return ans.Rcode, answer, ns, nil
}

// open opens addrs, answered for name, for rules until until, unless they
// are open long enough already.
func (p *Proxy) open(conf *proxyConf, name string, rules []string, addrs []netip.Addr, until time.Time) error {
	if c, ok := conf.opts.Allower.(coverer); ok && c.Covered(name, rules, addrs, until) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), allowTimeout)
	defer cancel()
	if err := conf.opts.Allower.Allow(ctx, name, rules, addrs, until); err != nil {
		conf.opts.Metrics.SetUpdateFailed()
		return fmt.Errorf("open %v for %s: %w", addrs, name, err)
	}
	return nil
}

// Serve answers DNS on port over UDP and TCP, IPv4 and IPv6, until ctx
// ends. ready is called once every socket listens. Each UDP family gets
// udpSockets SO_REUSEPORT sockets (at least one per CPU), each served by a
// udpServer, with queries steered to them by client address.
func (p *Proxy) Serve(ctx context.Context, port int, ready func()) error {
	udp, tcp, err := p.listen(ctx, port)
	if err != nil {
		return err
	}
	return p.serve(ctx, udp, tcp, ready)
}

// reusePortListener makes the UDP sockets of a family: SO_REUSEPORT, and
// a large receive queue.
var reusePortListener = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		// A receive queue that absorbs a flood while the readers are off
		// the CPU for a few ms, so that other clients' queries are not
		// dropped with it (limits.go drops the flood's excess cheaply
		// once read). Best effort: FORCE needs CAP_NET_ADMIN.
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, udpReceiveBuffer) != nil {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, udpReceiveBuffer)
		}
	})
	return errors.Join(err, serr)
}}

// classHandler answers the TCP queries of a class port.
type classHandler struct {
	p     *Proxy
	class *config.DNSClass
}

func (h classHandler) ServeDNS(w dns.ResponseWriter, r *dns.Msg) { h.p.serveDNS(w, r, h.class) }

// listenClasses opens the loopback servers of the class ports
// (Options.Classes): the nat output chain redirects each host cgroup's
// DNS to its own, on 127.0.0.1 or ::1.
func (p *Proxy) listenClasses(ctx context.Context) (udp []*udpServer, tcp []*dns.Server, _ error) {
	for i := range p.conf.Load().opts.Classes {
		class := &p.conf.Load().opts.Classes[i]
		for _, host := range []string{"127.0.0.1", "::1"} {
			family := "4"
			if host == "::1" {
				family = "6"
			}
			addr := net.JoinHostPort(host, strconv.Itoa(int(class.Port)))
			pc, err := reusePortListener.ListenPacket(ctx, "udp"+family, addr)
			if err != nil {
				if family == "6" {
					continue // no IPv6 on loopback
				}
				shutdownServers(udp, tcp)
				return nil, nil, fmt.Errorf("listen %s (DNS of %s): %w", addr, class.Cgroup, err)
			}
			s, err := newUDPServer(p, pc.(*net.UDPConn), family == "6")
			if err != nil {
				pc.Close()
				shutdownServers(udp, tcp)
				return nil, nil, err
			}
			s.class = class
			udp = append(udp, s)
			ln, err := net.Listen("tcp"+family, addr)
			if err != nil {
				shutdownServers(udp, tcp)
				return nil, nil, fmt.Errorf("listen %s (DNS of %s): %w", addr, class.Cgroup, err)
			}
			tcp = append(tcp, &dns.Server{Net: "tcp" + family, Addr: addr, Listener: limitedListener{ln, p.limits}, Handler: classHandler{p, class},
				ReadTimeout: p.limits.limits.Load().TCPReadTimeout,
				IdleTimeout: func() time.Duration { return p.limits.limits.Load().TCPIdleTimeout }})
		}
	}
	return udp, tcp, nil
}

// listen opens the servers of both families, and of the class ports;
// without IPv6 it warns and serves IPv4 only.
func (p *Proxy) listen(ctx context.Context, port int) (udp []*udpServer, tcp []*dns.Server, _ error) {
	cu, ct, err := p.listenClasses(ctx)
	if err != nil {
		return nil, nil, err
	}
	udp, tcp = cu, ct
	for _, family := range []string{"4", "6"} {
		host := "0.0.0.0"
		if family == "6" {
			host = "::"
		}
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		fam, ftcp, err := p.listenFamily(ctx, family, addr)
		if err != nil {
			if family == "6" {
				p.log.Warn("no IPv6 listener", "addr", addr, "err", err)
				continue
			}
			shutdownServers(udp, tcp)
			return nil, nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		udp, tcp = append(udp, fam...), append(tcp, ftcp)
	}
	return udp, tcp, nil
}

// listenFamily opens the UDP sockets and the TCP listener of one family
// ("4" or "6") on addr; on error it leaves none open.
func (p *Proxy) listenFamily(ctx context.Context, family, addr string) ([]*udpServer, *dns.Server, error) {
	n := max(runtime.GOMAXPROCS(0), udpSockets)
	var fam []*udpServer
	closeAll := func() {
		for _, s := range fam {
			s.conn.Close()
		}
	}
	for i := range n {
		pc, err := reusePortListener.ListenPacket(ctx, "udp"+family, addr)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		if i == 0 {
			// The group's program: set on one socket, it steers for all
			// of them.
			if serr := steerBySource(pc, family == "6", n); serr != nil {
				p.log.Warn("UDP queries not steered by client address", "err", serr)
			}
		}
		s, err := newUDPServer(p, pc.(*net.UDPConn), family == "6")
		if err != nil {
			pc.Close()
			closeAll()
			return nil, nil, err
		}
		fam = append(fam, s)
	}
	ln, err := net.Listen("tcp"+family, addr)
	if err != nil {
		closeAll()
		return nil, nil, err
	}
	return fam, &dns.Server{Net: "tcp" + family, Addr: addr, Listener: limitedListener{ln, p.limits}, Handler: p,
		ReadTimeout: p.limits.limits.Load().TCPReadTimeout,
		IdleTimeout: func() time.Duration { return p.limits.limits.Load().TCPIdleTimeout }}, nil
}

// shutdownServers stops the servers Serve started.
func shutdownServers(udp []*udpServer, tcp []*dns.Server) {
	for _, s := range udp {
		s.shutdown()
	}
	for _, s := range tcp {
		_ = s.Shutdown()
	}
}

// serve runs the servers until ctx ends or one fails, calling ready once
// all of them run, and shuts them all down.
func (p *Proxy) serve(ctx context.Context, udp []*udpServer, tcp []*dns.Server, ready func()) error {
	// Ready once every server runs: a TCP server that has not started yet
	// ignores Shutdown, and would serve on after Serve returned.
	var wg, started sync.WaitGroup
	errc := make(chan error, len(udp)+len(tcp))
	for _, s := range udp {
		wg.Go(func() {
			if err := s.serve(); err != nil {
				errc <- fmt.Errorf("serve UDP %s: %w", s.conn.LocalAddr(), err)
			}
		})
	}
	for _, s := range tcp {
		started.Add(1)
		s.NotifyStartedFunc = started.Done
		wg.Go(func() {
			if err := s.ActivateAndServe(); err != nil {
				errc <- fmt.Errorf("serve %s %s: %w", s.Net, s.Addr, err)
			}
		})
	}
	allStarted := make(chan struct{})
	go func() { started.Wait(); close(allStarted) }()
	var err error
	select {
	case <-allStarted:
		if ready != nil {
			ready()
		}
		select {
		case <-ctx.Done():
		case err = <-errc:
		}
	case err = <-errc:
	}
	shutdownServers(udp, tcp)
	wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}
