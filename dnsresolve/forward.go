package dnsresolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/metrics"
)

// ForwardZone is a zone whose names other servers answer (a Kubernetes
// cluster's DNS for cluster.local): queries for the zone or any name below
// it, of any type, go to Servers, and their answers come back unchanged,
// NXDOMAIN included. They open nothing in the firewall: reaching those
// addresses is the static allow-list's job.
type ForwardZone struct {
	Zone    string // e.g. "cluster.local", any case, with or without the trailing dot
	Servers []netip.AddrPort
}

// EngineServers returns the servers of the container engine's DNS that
// answer client: the host's own address on the bridge the client sits
// behind, port 53, in order of preference; none for a client behind no
// container bridge (the host itself). Called for names of engine zones
// only.
type EngineServers func(client netip.Addr) []netip.AddrPort

// forwarder passes whole queries to a list of servers, from sockets that
// carry egressd's mark (so they are exempt from the redirect like the
// upstream queries), with a fresh ID and source port per try.
type forwarder struct {
	servers []string // none for the engine zones': they depend on the client
	udp     *dns.Client
	tcp     *dns.Client
	flows   Flows // nil: UDP flows' entries are left to expire
}

// newForwarder returns a forwarder whose every try takes up to timeout.
func newForwarder(servers []netip.AddrPort, mark uint32, timeout time.Duration, flows Flows) *forwarder {
	dialer := &net.Dialer{Timeout: timeout, Control: markControl(mark)}
	f := &forwarder{
		udp:   &dns.Client{Net: "udp", Dialer: dialer, Timeout: timeout, UDPSize: dns.DefaultMsgSize},
		tcp:   &dns.Client{Net: "tcp", Dialer: dialer, Timeout: timeout},
		flows: flows,
	}
	for _, s := range servers {
		f.servers = append(f.servers, s.String())
	}
	return f
}

// exchange sends r's question (with its flags and EDNS0 options) to
// servers in turn until one answers anything but SERVFAIL or REFUSED, and
// returns that answer as a reply to r.
func (f *forwarder) exchange(ctx context.Context, r *dns.Msg, servers []string) (*dns.Msg, error) {
	q := r.Copy()
	clientEDNS := q.IsEdns0() != nil
	if !clientEDNS {
		q.SetEdns0(dns.DefaultMsgSize, false) // ServeDNS truncates for the client
	}
	var errs []error
	for _, s := range servers {
		resp, err := f.exchangeOne(ctx, q, s)
		if err == nil {
			err = unusable(resp)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		resp.Id = r.Id
		if !clientEDNS {
			extra := resp.Extra[:0]
			for _, rr := range resp.Extra {
				if rr.Header().Rrtype != dns.TypeOPT {
					extra = append(extra, rr)
				}
			}
			resp.Extra = extra
		}
		return resp, nil
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no servers"))
	}
	return nil, errors.Join(errs...)
}

func (f *forwarder) exchangeOne(ctx context.Context, q *dns.Msg, server string) (*dns.Msg, error) {
	q.Id = dns.Id()
	conn, err := f.udp.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	resp, _, err := f.udp.ExchangeWithConnContext(ctx, q, conn)
	if f.flows != nil { // before the port is free: see Upstream.ForgetFlows
		local, remote := conn.LocalAddr().(*net.UDPAddr), conn.RemoteAddr().(*net.UDPAddr)
		_ = f.flows.Delete(unix.IPPROTO_UDP, local.AddrPort(), remote.AddrPort())
	}
	conn.Close()
	if err == nil && !answers(resp, q.Id, q.Question[0].Name, q.Question[0].Qtype) {
		err = errMismatch
	}
	if err != nil {
		return nil, err
	}
	if resp.Truncated {
		q.Id = dns.Id()
		resp, _, err = f.tcp.ExchangeContext(ctx, q, server)
		if err == nil && !answers(resp, q.Id, q.Question[0].Name, q.Question[0].Qtype) {
			err = errMismatch
		}
		if err != nil {
			return nil, fmt.Errorf("over TCP after truncation: %w", err)
		}
	}
	return resp, nil
}

// zoneForwarder is a forwarder for one zone.
type zoneForwarder struct {
	zone string // canonical (dnsname.Canonical)
	// nil for an engine zone: forwarding.engine asks the client's engine.
	*forwarder
}

// forwarding is what a configuration forwards: its zones (dns.forward and
// dns.engine_zones) and, in audit mode, the names that are not allowed
// (to the upstreams).
type forwarding struct {
	zones  []zoneForwarder
	engine *forwarder // the engine zones', without servers of its own; nil: none
	audit  *forwarder // nil: enforce
}

func newForwarding(o Options) *forwarding {
	f := &forwarding{}
	for _, z := range o.Forward {
		f.zones = append(f.zones, zoneForwarder{zone: dnsname.Canonical(z.Zone), forwarder: newForwarder(z.Servers, o.Mark, o.ForwardTimeout, o.Flows)})
	}
	// After the forwarded zones: zone keeps the first of two zones as
	// long, so a dns.forward zone wins over the same engine zone.
	for _, z := range o.EngineZones {
		f.zones = append(f.zones, zoneForwarder{zone: dnsname.Canonical(z)})
		if f.engine == nil {
			f.engine = newForwarder(nil, o.Mark, o.ForwardTimeout, o.Flows)
		}
	}
	if o.Audit {
		f.audit = newForwarder(o.AuditServers, o.Mark, o.ForwardTimeout, o.Flows)
	}
	return f
}

// zone returns the forwarder of the longest zone that holds name.
func (f *forwarding) zone(name string) *zoneForwarder {
	i := dnsname.LongestZone(dnsname.Canonical(name), f.zones, func(z zoneForwarder) string { return z.zone })
	if i < 0 {
		return nil
	}
	return &f.zones[i]
}

// forwarded answers r, from client, if its name is in a forwarded zone or
// an engine zone; nil otherwise. refuse says that the name is an engine
// zone's but client sits behind no container bridge (the host itself):
// there is no engine to ask.
func (p *Proxy) forwarded(conf *proxyConf, r *dns.Msg, client netip.Addr) (m *dns.Msg, refuse bool) {
	q := r.Question[0]
	z := conf.fwd.zone(q.Name)
	if z == nil || q.Qclass != dns.ClassINET {
		return nil, false
	}
	if z.forwarder != nil {
		return p.pass(conf, r, z.forwarder, z.servers, metrics.Forwarded), false
	}
	// An engine zone: the engine on the client's own bridge answers it.
	var servers []string
	if conf.opts.EngineServers != nil {
		for _, s := range conf.opts.EngineServers(client) {
			servers = append(servers, s.String())
		}
	}
	if len(servers) == 0 {
		return nil, true
	}
	return p.pass(conf, r, conf.fwd.engine, servers, metrics.Forwarded), false
}

// wouldRefuse answers a name that is not allowed in audit mode: as the
// upstream answers it, without opening anything, logged and counted. nil:
// enforce mode, refuse it.
func (p *Proxy) wouldRefuse(conf *proxyConf, r *dns.Msg) *dns.Msg {
	if conf.fwd.audit == nil {
		return nil
	}
	q := r.Question[0]
	if p.refusals.Allow() {
		p.log.Info("would refuse name (audit mode: answered, nothing opened)", "name", q.Name, "type", dns.TypeToString[q.Qtype], "would_refuse", true)
	}
	return p.pass(conf, r, conf.fwd.audit, conf.fwd.audit.servers, metrics.WouldRefuse)
}

// pass answers r as servers answer it, through f, within the query
// budget.
func (p *Proxy) pass(conf *proxyConf, r *dns.Msg, f *forwarder, servers []string, result string) *dns.Msg {
	ctx, cancel := context.WithTimeout(context.Background(), conf.opts.QueryBudget)
	defer cancel()
	resp, err := f.exchange(ctx, r, servers)
	if err != nil {
		if p.failures.Allow() {
			p.log.Warn("servfail", "name", r.Question[0].Name, "type", dns.TypeToString[r.Question[0].Qtype], "forwarded_to", servers, "err", err)
		}
		conf.opts.Metrics.Query(metrics.Servfail)
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeServerFailure)
		m.RecursionAvailable = true
		return m
	}
	conf.opts.Metrics.Query(result)
	return resp
}
