package dnsresolve

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/metrics"
)

// Reasons a client was limited (the reason label of
// egressd_dns_limited_total).
const (
	LimitRate         = "rate"
	LimitInFlight     = "in_flight"
	LimitTCPPerClient = "tcp_per_client"
	LimitTCPTotal     = "tcp_total"
	LimitClients      = "clients"
)

// limitLogInterval is how often each reason is logged at most.
const limitLogInterval = 10 * time.Second

// limiter keeps the per-client bookkeeping within config.Limits
// (dns.limits). Its map holds at most Limits.Clients entries: when full, idle entries (nothing in flight, no
// TCP connection) are swept, the least recently seen first; if none is
// idle the new client is refused, which only happens when that many
// clients are all busy at once.
type limiter struct {
	limits  atomic.Pointer[config.Limits]
	log     *slog.Logger
	metrics atomic.Pointer[metrics.Metrics]

	mu      sync.Mutex
	clients map[netip.Addr]*client
	tcp     int // open TCP connections in all

	logMu  sync.Mutex
	logged map[string]time.Time
	quiet  map[string]int // limited since the last log line, by reason
}

type client struct {
	inFlight int
	tcp      int
	seen     time.Time
	rate     *rate.Limiter // nil without a rate limit
}

func newLimiter(l config.Limits, log *slog.Logger, m *metrics.Metrics) *limiter {
	lm := &limiter{log: log, clients: map[netip.Addr]*client{}, logged: map[string]time.Time{}, quiet: map[string]int{}}
	lm.update(l, m)
	return lm
}

// update replaces the bounds (on reload); entries keep their counts, and
// rate limiters are made anew for the new rate.
func (lm *limiter) update(l config.Limits, m *metrics.Metrics) {
	old := lm.limits.Swap(&l)
	lm.metrics.Store(m)
	if old != nil && old.RatePerClient != l.RatePerClient {
		lm.mu.Lock()
		for _, c := range lm.clients {
			c.rate = lm.newRate(&l)
		}
		lm.mu.Unlock()
	}
}

// newRate returns a client's rate limiter; nil for RatePerClient 0 (no
// rate limit; config refuses negative rates).
func (lm *limiter) newRate(l *config.Limits) *rate.Limiter {
	if l.RatePerClient <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(l.RatePerClient), max(int(2*l.RatePerClient), 1))
}

// get returns the entry of addr, creating it; nil when the table is full
// of busy clients. lm.mu must be held.
func (lm *limiter) get(addr netip.Addr, now time.Time) *client {
	if c, ok := lm.clients[addr]; ok {
		c.seen = now
		return c
	}
	l := lm.limits.Load()
	if len(lm.clients) >= l.Clients {
		lm.sweep(l.Clients)
		if len(lm.clients) >= l.Clients {
			return nil
		}
	}
	c := &client{seen: now, rate: lm.newRate(l)}
	lm.clients[addr] = c
	return c
}

// sweep removes idle entries until the table is at most 3/4 of size, the
// least recently seen first, so that a stream of new clients costs one
// sweep per size/4 of them.
func (lm *limiter) sweep(size int) {
	var idle []netip.Addr
	for a, c := range lm.clients {
		if c.inFlight == 0 && c.tcp == 0 {
			idle = append(idle, a)
		}
	}
	excess := len(lm.clients) - size*3/4
	if excess <= 0 {
		return
	}
	if excess >= len(idle) {
		for _, a := range idle {
			delete(lm.clients, a)
		}
		return
	}
	slices.SortFunc(idle, func(a, b netip.Addr) int { return lm.clients[a].seen.Compare(lm.clients[b].seen) })
	for _, a := range idle[:excess] {
		delete(lm.clients, a)
	}
}

// admitPacket decides, before a UDP query is even parsed, whether the
// client may send it: within its rate, and not already at its bound of
// queries in flight (begin counts them exactly; this early look spares
// the parsing and the goroutine of queries that would be turned away).
func (lm *limiter) admitPacket(addr netip.Addr) bool {
	l := lm.limits.Load()
	lm.mu.Lock()
	c := lm.get(addr, time.Now())
	reason := ""
	switch {
	case c == nil:
		reason = LimitClients
	case c.inFlight >= l.InFlightPerClient:
		reason = LimitInFlight
	case c.rate != nil && !c.rate.Allow():
		reason = LimitRate
	}
	lm.mu.Unlock()
	if reason != "" {
		lm.limited(addr, reason)
		return false
	}
	return true
}

func reasonOf(full bool, reason string) string {
	if full {
		return LimitClients
	}
	return reason
}

// begin counts a query of addr in flight; false means the client has
// too many already. end must follow a true begin.
func (lm *limiter) begin(addr netip.Addr, tcp bool) bool {
	l := lm.limits.Load()
	lm.mu.Lock()
	c := lm.get(addr, time.Now())
	ok := c != nil && c.inFlight < l.InFlightPerClient
	// TCP queries are not rate-limited before parsing: do it here.
	rateOK := !ok || !tcp || c.rate == nil || c.rate.Allow()
	if ok && rateOK {
		c.inFlight++
	}
	lm.mu.Unlock()
	switch {
	case !ok:
		lm.limited(addr, reasonOf(c == nil, LimitInFlight))
	case !rateOK:
		lm.limited(addr, LimitRate)
	}
	return ok && rateOK
}

func (lm *limiter) end(addr netip.Addr) {
	lm.mu.Lock()
	if c := lm.clients[addr]; c != nil && c.inFlight > 0 {
		c.inFlight--
	}
	lm.mu.Unlock()
}

// openTCP counts a new connection of addr; false means it must be closed
// at once.
func (lm *limiter) openTCP(addr netip.Addr) bool {
	l := lm.limits.Load()
	lm.mu.Lock()
	reason := ""
	if lm.tcp >= l.TCPConnections {
		reason = LimitTCPTotal
	} else if c := lm.get(addr, time.Now()); c == nil {
		reason = LimitClients
	} else if c.tcp >= l.TCPConnectionsPerClient {
		reason = LimitTCPPerClient
	} else {
		c.tcp++
		lm.tcp++
	}
	lm.mu.Unlock()
	if reason != "" {
		lm.limited(addr, reason)
		return false
	}
	return true
}

func (lm *limiter) closeTCP(addr netip.Addr) {
	lm.mu.Lock()
	lm.tcp--
	if c := lm.clients[addr]; c != nil && c.tcp > 0 {
		c.tcp--
	}
	lm.mu.Unlock()
}

// limited counts one limited query or connection and logs it at most once
// per limitLogInterval and reason, with how many went unlogged since.
func (lm *limiter) limited(addr netip.Addr, reason string) {
	lm.metrics.Load().Limited(reason)
	now := time.Now()
	lm.logMu.Lock()
	if now.Sub(lm.logged[reason]) < limitLogInterval {
		lm.quiet[reason]++
		lm.logMu.Unlock()
		return
	}
	lm.logged[reason] = now
	n := lm.quiet[reason]
	lm.quiet[reason] = 0
	lm.logMu.Unlock()
	lm.log.Warn("client limited", "client", addr, "reason", reason, "more_since_last_line", n)
}

// stats returns the tracked clients and open TCP connections.
func (lm *limiter) stats() (clients, tcp int) {
	lm.mu.Lock()
	defer lm.mu.Unlock()
	return len(lm.clients), lm.tcp
}

func addrOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.UDPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	case *net.TCPAddr:
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	}
	return netip.Addr{}
}

// limitedListener closes connections over the bounds as soon as they are
// accepted, before any byte is read.
type limitedListener struct {
	net.Listener
	lm *limiter
}

func (ll limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		a := addrOf(c.RemoteAddr())
		if !ll.lm.openTCP(a) {
			// RST rather than FIN: the client learns at once, and no
			// TIME_WAIT is kept here for it.
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, lm: ll.lm, addr: a}, nil
	}
}

type limitedConn struct {
	net.Conn
	lm   *limiter
	addr netip.Addr
	once sync.Once
}

func (c *limitedConn) Close() error {
	c.once.Do(func() { c.lm.closeTCP(c.addr) })
	return c.Conn.Close()
}

// udpSockets is the number of UDP listeners per address family. Queries
// are steered to them by client address (steerBySource), so a client
// flooding the proxy fills its own receive queue only: another client
// shares it with a chance of 1 in udpSockets.
const udpSockets = 16

// skfNetOff is SKF_NET_OFF: a classic BPF load from this offset on reads
// the network (IP) header.
const skfNetOff = -0x100000

// steerBySource makes the kernel pick the SO_REUSEPORT socket of a UDP
// group by the client's address (its last 32 bits modulo the group size),
// instead of by the 4-tuple, which a flooder spreads over every socket
// by varying its source port.
func steerBySource(pc net.PacketConn, v6 bool, n int) error {
	sc, ok := pc.(syscall.Conn)
	if !ok {
		return errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	off := 12 // IPv4 source address
	if v6 {
		off = 8 + 12 // last 4 bytes of the IPv6 source address
	}
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: uint32(int32(skfNetOff + off))},
		{Code: unix.BPF_ALU | unix.BPF_MOD | unix.BPF_K, K: uint32(n)},
		{Code: unix.BPF_RET | unix.BPF_A},
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF,
			&unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]})
	})
	return errors.Join(err, serr)
}
