package dnsresolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// Upstream sends queries to the configured resolvers from sockets that
// carry egressd's firewall mark, so they are neither redirected back into
// the proxy nor blocked by the egress rules.
//
// Each query gets a socket of its own, connected to the server it asks: a
// fresh random source port (the kernel's ephemeral range) besides the
// random ID, and the kernel delivers only datagrams from that server's
// address and port. An off-path attacker must guess both port and ID
// within one query's lifetime, instead of aiming at a few long-lived
// pooled sockets. The answer must also carry the question asked.
type Upstream struct {
	servers []string
	udp     *dns.Client
	tcp     *dns.Client
	// preferred is the index of the server that answered last; a failing
	// server is skipped until the next one fails.
	preferred atomic.Uint32

	mu     sync.Mutex
	health map[string]*ServerHealth
}

// Close releases the Upstream. It keeps no sockets between queries, so
// there is nothing to close; queries under way finish.
func (u *Upstream) Close() {}

// ServerHealth is what an Upstream knows about one server.
type ServerHealth struct {
	Server    string    `json:"server"`
	LastOK    time.Time `json:"last_ok,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	LastErrAt time.Time `json:"last_error_at,omitzero"`
}

// Healthy reports whether the server answered since its last failure.
func (h ServerHealth) Healthy() bool { return !h.LastOK.Before(h.LastErrAt) }

// Health returns the state of each server, in configured order.
func (u *Upstream) Health() []ServerHealth {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]ServerHealth, len(u.servers))
	for i, s := range u.servers {
		out[i] = *u.health[s]
	}
	return out
}

func (u *Upstream) record(server string, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	h := u.health[server]
	if err == nil {
		h.LastOK = time.Now()
		return
	}
	h.LastError, h.LastErrAt = err.Error(), time.Now()
}

// NewUpstream returns an Upstream for servers; each try of one server may
// take up to timeout.
func NewUpstream(servers []netip.AddrPort, mark uint32, timeout time.Duration) *Upstream {
	dialer := &net.Dialer{Timeout: timeout, Control: markControl(mark)}
	u := &Upstream{
		udp: &dns.Client{Net: "udp", Dialer: dialer, Timeout: timeout, UDPSize: dns.DefaultMsgSize},
		tcp: &dns.Client{Net: "tcp", Dialer: dialer, Timeout: timeout},
	}
	u.health = make(map[string]*ServerHealth, len(servers))
	for _, s := range servers {
		u.servers = append(u.servers, s.String())
		u.health[s.String()] = &ServerHealth{Server: s.String()}
	}
	return u
}

func markControl(mark uint32) func(network, address string, c syscall.RawConn) error {
	if mark == 0 {
		return nil // tests without CAP_NET_ADMIN
	}
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("set socket mark %#x: %w", mark, serr)
		}
		return nil
	}
}

// Exchange asks the upstreams name/qtype with recursion desired, trying
// each server in turn until one gives a usable answer (not SERVFAIL or
// REFUSED). A truncated UDP answer is asked again over TCP.
func (u *Upstream) Exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	if len(u.servers) == 0 {
		return nil, errors.New("no upstream resolvers")
	}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	q.SetEdns0(dns.DefaultMsgSize, false)

	start := int(u.preferred.Load())
	var errs []error
	for i := range u.servers {
		idx := (start + i) % len(u.servers)
		server := u.servers[idx]
		resp, err := u.exchangeOne(ctx, q, server)
		if err == nil && (resp.Rcode == dns.RcodeServerFailure || resp.Rcode == dns.RcodeRefused) {
			err = fmt.Errorf("answered %s", dns.RcodeToString[resp.Rcode])
		}
		if err != nil && ctx.Err() == nil {
			u.record(server, err) // not a failure of the server if the client gave up
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", server, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		u.record(server, nil)
		u.preferred.Store(uint32(idx))
		return resp, nil
	}
	return nil, fmt.Errorf("upstream query %s %s: %w", name, dns.TypeToString[qtype], errors.Join(errs...))
}

func (u *Upstream) exchangeOne(ctx context.Context, q *dns.Msg, server string) (*dns.Msg, error) {
	q.Id = dns.Id() // fresh ID per try: the client's ID never goes upstream
	conn, err := u.udp.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	// miekg/dns skips datagrams with another ID; the connected socket
	// only receives from server.
	resp, _, err := u.udp.ExchangeWithConnContext(ctx, q, conn)
	conn.Close()
	if err == nil && !sameQuestion(q, resp) {
		err = errors.New("answer does not match the question")
	}
	if err != nil {
		return nil, err
	}
	if resp.Truncated {
		q.Id = dns.Id()
		resp, _, err = u.tcp.ExchangeContext(ctx, q, server)
		if err == nil && !sameQuestion(q, resp) {
			err = errors.New("answer does not match the question")
		}
		if err != nil {
			return nil, fmt.Errorf("over TCP after truncation: %w", err)
		}
	}
	return resp, nil
}

func sameQuestion(q, r *dns.Msg) bool {
	return len(r.Question) == 1 && r.Question[0].Qtype == q.Question[0].Qtype &&
		strings.EqualFold(r.Question[0].Name, q.Question[0].Name)
}
