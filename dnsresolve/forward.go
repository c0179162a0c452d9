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

// forwarder passes whole queries to a list of servers, from sockets that
// carry egressd's mark (so they are exempt from the redirect like the
// upstream queries), with a fresh ID and source port per try.
type forwarder struct {
	servers []string
	udp     *dns.Client
	tcp     *dns.Client
	flows   Flows // nil: UDP flows' entries are left to expire
}

func newForwarder(servers []netip.AddrPort, mark uint32, timeout time.Duration, flows Flows) *forwarder {
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
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

// exchange sends r's question (with its flags and EDNS0 options) to the
// servers in turn until one answers anything but SERVFAIL or REFUSED, and
// returns that answer as a reply to r.
func (f *forwarder) exchange(ctx context.Context, r *dns.Msg) (*dns.Msg, error) {
	q := r.Copy()
	clientEDNS := q.IsEdns0() != nil
	if !clientEDNS {
		q.SetEdns0(dns.DefaultMsgSize, false) // ServeDNS truncates for the client
	}
	var errs []error
	for _, s := range f.servers {
		resp, err := f.exchangeOne(ctx, q, s)
		if err == nil && (resp.Rcode == dns.RcodeServerFailure || resp.Rcode == dns.RcodeRefused) {
			err = fmt.Errorf("answered %s", dns.RcodeToString[resp.Rcode])
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
	if err == nil && !sameQuestion(q, resp) {
		err = errors.New("answer does not match the question")
	}
	if err != nil {
		return nil, err
	}
	if resp.Truncated {
		q.Id = dns.Id()
		resp, _, err = f.tcp.ExchangeContext(ctx, q, server)
		if err == nil && !sameQuestion(q, resp) {
			err = errors.New("answer does not match the question")
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
	*forwarder
}

// forwarding is what a configuration forwards: its zones and, in audit
// mode, the names that are not allowed (to the upstreams).
type forwarding struct {
	zones []zoneForwarder
	audit *forwarder // nil: enforce
}

func newForwarding(o Options) *forwarding {
	f := &forwarding{}
	for _, z := range o.Forward {
		f.zones = append(f.zones, zoneForwarder{zone: dnsname.Canonical(z.Zone), forwarder: newForwarder(z.Servers, o.Mark, o.ForwardTimeout, o.Flows)})
	}
	if o.Audit {
		f.audit = newForwarder(o.AuditServers, o.Mark, o.ForwardTimeout, o.Flows)
	}
	return f
}

// zone returns the forwarder of the longest zone that holds name.
func (f *forwarding) zone(name string) *zoneForwarder {
	name = dnsname.Canonical(name)
	var best *zoneForwarder
	for i, z := range f.zones {
		if dnsname.InZone(name, z.zone) && (best == nil || len(z.zone) > len(best.zone)) {
			best = &f.zones[i]
		}
	}
	return best
}

// forwarded answers r if its name is in a forwarded zone; nil otherwise.
func (p *Proxy) forwarded(conf *proxyConf, r *dns.Msg) *dns.Msg {
	q := r.Question[0]
	z := conf.fwd.zone(q.Name)
	if z == nil || q.Qclass != dns.ClassINET {
		return nil
	}
	return p.pass(conf, r, z.forwarder, metrics.Forwarded)
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
	return p.pass(conf, r, conf.fwd.audit, metrics.WouldRefuse)
}

func (p *Proxy) pass(conf *proxyConf, r *dns.Msg, f *forwarder, result string) *dns.Msg {
	ctx, cancel := context.WithTimeout(context.Background(), queryTimeout)
	defer cancel()
	resp, err := f.exchange(ctx, r)
	if err != nil {
		if p.failures.Allow() {
			p.log.Warn("servfail", "name", r.Question[0].Name, "type", dns.TypeToString[r.Question[0].Qtype], "forwarded_to", f.servers, "err", err)
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
