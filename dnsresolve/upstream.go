package dnsresolve

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
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
// pooled sockets. A datagram that is not an answer to the question asked
// (garbage, another ID, another question, not a response) is ignored and
// the socket keeps waiting for the real one until the try's deadline:
// nothing is opened from it, and a forger cannot make egressd give up on a
// server either.
//
// The work per query is bounded whatever the servers do: every try has a
// deadline (the server's retransmission timeout, at most the configured
// timeout), a query makes at most maxTries tries, and all of it ends with the caller's context (the proxy's query budget).
type Upstream struct {
	servers []string         // as addrs, for health and errors
	addrs   []netip.AddrPort // by index of servers
	mark    uint32
	timeout time.Duration // longest wait for one try
	tcp     *dns.Client
	flows   Flows // nil: entries are left to expire
	// preferred is the index of the server that answered last: it is
	// asked first for as long as it answers, so a single lost packet
	// elsewhere does not move the traffic around (no flapping).
	preferred atomic.Uint32

	mu     sync.Mutex
	health map[string]*ServerHealth
	state  []serverState // by index of servers
}

// serverState is what the Upstream learned about one server's timing.
type serverState struct {
	srtt      time.Duration // smoothed round-trip time; 0 until a first answer
	rto       time.Duration // deadline of the next try
	fails     int           // consecutive failed tries
	downUntil time.Time     // after 2 consecutive failures: asked only when all others fail
}

// Bounds of the retransmission timeout of one try. The floor is well above
// any LAN round trip and keeps a slow but working server from being
// abandoned for a jitter; the ceiling is dns.timeout.
const (
	minRTO = 200 * time.Millisecond
	// maxTries bounds the tries (and sockets) of one query: enough that
	// 30 % loss each way (half the tries lost) almost never fails a query
	// within the budget, few enough that a query is never a flood.
	maxTries = 16
	maxDown  = 30 * time.Second
)

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

// record notes the outcome of one try of server idx, with its round
// trip for an answer.
func (u *Upstream) record(idx int, err error, rtt time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	h, st, now := u.health[u.servers[idx]], &u.state[idx], time.Now()
	if err == nil {
		h.LastOK = now
		if st.srtt == 0 {
			st.srtt = rtt
		} else {
			st.srtt += (rtt - st.srtt) / 4
		}
		// Twice the last sample as well: a server that just became slow
		// is not cut off while the average catches up.
		st.rto = min(max(4*st.srtt, 2*rtt, minRTO), u.timeout)
		st.fails, st.downUntil = 0, time.Time{}
		return
	}
	// No exponential backoff of the retransmission timeout: losses are
	// not congestion here, and a query has a fixed budget. A server that
	// stopped answering is put last in the order instead.
	h.LastError, h.LastErrAt = err.Error(), now
	st.fails++
	if st.fails >= 2 {
		st.downUntil = now.Add(min(time.Second<<(st.fails-2), maxDown))
	}
}

// order returns the servers to try, best first: those not down, starting
// from the preferred one in configured order, then those down, the one
// back soonest first.
func (u *Upstream) order() []int {
	u.mu.Lock()
	defer u.mu.Unlock()
	now, start := time.Now(), int(u.preferred.Load())
	out := make([]int, 0, len(u.servers))
	for _, down := range []bool{false, true} {
		for i := range u.servers {
			if idx := (start + i) % len(u.servers); now.Before(u.state[idx].downUntil) == down {
				out = append(out, idx)
			}
		}
	}
	up := slices.IndexFunc(out, func(idx int) bool { return now.Before(u.state[idx].downUntil) })
	if up >= 0 {
		slices.SortStableFunc(out[up:], func(a, b int) int { return u.state[a].downUntil.Compare(u.state[b].downUntil) })
	}
	return out
}

func (u *Upstream) rto(idx int) time.Duration {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.state[idx].rto
}

// NewUpstream returns an Upstream for servers; each try of one server may
// take up to timeout.
func NewUpstream(servers []netip.AddrPort, mark uint32, timeout time.Duration) *Upstream {
	dialer := &net.Dialer{Timeout: timeout, Control: markControl(mark)}
	u := &Upstream{
		addrs:   servers,
		mark:    mark,
		timeout: timeout,
		tcp:     &dns.Client{Net: "tcp", Dialer: dialer, Timeout: timeout},
	}
	u.health = make(map[string]*ServerHealth, len(servers))
	for _, s := range servers {
		u.servers = append(u.servers, s.String())
		u.health[s.String()] = &ServerHealth{Server: s.String()}
		u.state = append(u.state, serverState{rto: timeout})
	}
	return u
}

// Flows deletes the conntrack entry of a flow of egressd's own
// (conntrack.Conn): an exempt flow's entry left behind would let any host
// process that sends from the same port pass the redirect.
type Flows interface {
	Delete(proto uint8, src, dst netip.AddrPort) error
}

// ForgetFlows makes u delete each UDP try's conntrack entry before its
// socket is closed, while no other socket can use the port. TCP needs
// nothing: the port is held in TIME_WAIT and a new connection from it
// (a SYN) starts a new entry, redirected like any other.
func (u *Upstream) ForgetFlows(f Flows) { u.flows = f }

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
// servers in turn (see order) until one gives a usable answer (not
// SERVFAIL or REFUSED), at most maxTries tries and until ctx ends: ctx
// must have a deadline (the query budget). A truncated UDP answer is asked
// again over TCP.
//
// A try that is not answered within the server's retransmission timeout
// is not abandoned: its socket keeps listening while the next try goes
// out, so a slow answer (a recursive resolver's cache miss) still counts.
// At most maxTries sockets are open for one query.
func (u *Upstream) Exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	if len(u.servers) == 0 {
		return nil, errors.New("no upstream resolvers")
	}
	if _, ok := ctx.Deadline(); !ok {
		return nil, errors.New("upstream query without a deadline (query budget)")
	}
	x := &exchange{u: u, name: dns.Fqdn(name), qtype: qtype, order: u.order(), answered: make([]bool, len(u.servers))}
	var err error
	if x.query, err = packUpstreamQuery(x.name, qtype); err != nil {
		return nil, fmt.Errorf("upstream query %s %s: %w", name, dns.TypeToString[qtype], err)
	}
	// The first try is waited for right here, up to its server's
	// retransmission timeout: the usual query, answered in time, needs
	// no goroutine, channel or timer.
	var late *try
	if t, err := x.send(); t != nil || err != nil {
		var resp *dns.Msg
		if err == nil {
			resp, err = x.listen(ctx, t, time.Now().Add(u.rto(t.idx)))
		}
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && budgetLeft(ctx) {
			u.record(t.idx, errors.New("no answer within the retransmission timeout"), 0)
			late = t // keeps listening while the next try goes out
		} else {
			if t != nil {
				x.close(t)
				if err != nil {
					err = t.failed(err)
				}
			}
			if resp, ok := x.outcome(ctx, x.tried, resp, err, time.Since(x.sent)); ok {
				return resp, nil
			}
		}
	}
	resp, err := x.retry(ctx, late)
	if err != nil {
		return nil, fmt.Errorf("upstream query %s %s: %w", name, dns.TypeToString[qtype], err)
	}
	return resp, nil
}

// budgetLeft reports whether ctx has neither ended nor reached its
// deadline: a socket's deadline may pass a moment before the context's
// timer fires.
func budgetLeft(ctx context.Context) bool {
	deadline, ok := ctx.Deadline()
	return ctx.Err() == nil && (!ok || time.Now().Before(deadline))
}

// exchange is one query in flight: its packed question and what its tries
// learned.
type exchange struct {
	u        *Upstream
	name     string // fully qualified
	qtype    uint16
	query    []byte // packed; each try writes its own ID into the first two bytes
	order    []int  // servers to try, best first
	next     int    // next try: round*len(order)+i
	answered []bool // by server: answered SERVFAIL or REFUSED, not asked again
	tried    int    // server of the last try sent
	sent     time.Time
	errs     []error
}

// try is one query sent to one server from a socket of its own.
type try struct {
	idx     int // server
	id      uint16
	f       *os.File
	local   netip.AddrPort // the socket's address
	start   time.Time
	ignored int // datagrams that did not answer the question
}

func (x *exchange) close(t *try) {
	if x.u.flows != nil && t.local.IsValid() {
		_ = x.u.flows.Delete(unix.IPPROTO_UDP, t.local, x.u.addrs[t.idx])
	}
	_ = t.f.Close()
}

// failed says why t failed, and what it ignored meanwhile.
func (t *try) failed(err error) error {
	if t.ignored > 0 {
		return fmt.Errorf("%w (ignored %d datagrams that did not answer the question)", err, t.ignored)
	}
	return err
}

// packUpstreamQuery packs the question name/qtype with recursion desired
// and an OPT record offering dns.DefaultMsgSize, ID 0: what dns.Msg would
// pack, without its allocations (BenchmarkPackUpstreamQuery compares the
// two).
func packUpstreamQuery(name string, qtype uint16) ([]byte, error) {
	b := make([]byte, 12+255+4+11) // header, longest name, type and class, OPT
	b[2] = 0x01                    // RD
	b[5], b[11] = 1, 1             // one question, one additional record
	off, err := dns.PackDomainName(name, b, 12, nil, false)
	if err == nil && off-12 > 255 {
		err = fmt.Errorf("name %.20q... is longer than 255 bytes", name)
	}
	if err != nil {
		return nil, err
	}
	b = binary.BigEndian.AppendUint16(b[:off], qtype)
	b = binary.BigEndian.AppendUint16(b, dns.ClassINET)
	b = append(b, 0) // OPT: root name
	b = binary.BigEndian.AppendUint16(b, dns.TypeOPT)
	b = binary.BigEndian.AppendUint16(b, dns.DefaultMsgSize) // class: UDP payload size
	return append(b, 0, 0, 0, 0, 0, 0), nil                  // TTL (extended rcode, version, flags), no data
}

// send makes the next try: nil and no error when all are made.
func (x *exchange) send() (*try, error) {
	for ; x.next < maxTries; x.next++ {
		idx := x.order[x.next%len(x.order)]
		if x.answered[idx] {
			continue
		}
		x.next++
		x.tried, x.sent = idx, time.Now()
		t := &try{idx: idx, id: dns.Id(), start: x.sent} // fresh ID per try: the client's ID never goes upstream
		f, local, err := x.u.dial(idx)
		if err != nil {
			return nil, err
		}
		t.f, t.local = f, local
		binary.BigEndian.PutUint16(x.query, t.id)
		if _, err := f.Write(x.query); err != nil {
			x.close(t)
			return nil, err
		}
		return t, nil
	}
	return nil, nil
}

// dial opens a UDP socket carrying egressd's mark, connected to server
// idx: the kernel picks a fresh random source port and delivers only that
// server's datagrams. It is made with raw system calls and handed to Go's
// poller once: net.Dial's address resolution, bookkeeping and extra system
// calls cost as much as the rest of an exchange.
func (u *Upstream) dial(idx int) (*os.File, netip.AddrPort, error) {
	ap := u.addrs[idx]
	family, sa := unix.AF_INET, unix.Sockaddr(&unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()})
	if ap.Addr().Is6() {
		sa6 := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
		if zone := ap.Addr().Zone(); zone != "" {
			ifi, err := net.InterfaceByName(zone)
			if err != nil {
				return nil, netip.AddrPort{}, fmt.Errorf("zone of %s: %w", ap, err)
			}
			sa6.ZoneId = uint32(ifi.Index)
		}
		family, sa = unix.AF_INET6, sa6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, netip.AddrPort{}, os.NewSyscallError("socket", err)
	}
	if u.mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(u.mark)); err != nil {
			_ = unix.Close(fd)
			return nil, netip.AddrPort{}, fmt.Errorf("set socket mark %#x: %w", u.mark, err)
		}
	}
	if err := unix.Connect(fd, sa); err != nil {
		_ = unix.Close(fd)
		return nil, netip.AddrPort{}, os.NewSyscallError("connect", err)
	}
	var local netip.AddrPort
	if u.flows != nil { // the flow's source, to delete its entry
		if la, err := unix.Getsockname(fd); err == nil {
			local = sockaddrAddrPort(la)
		}
	}
	return os.NewFile(uintptr(fd), "udp"), local, nil // non-blocking: into the poller
}

// sockaddrAddrPort converts an IP socket address.
func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// listen waits for t's answer until the deadline, or the context's if
// until is zero, or until ctx ends. Datagrams that do not answer the
// question (garbage, another ID, another question, not a response) are
// ignored. A truncated answer is asked again over TCP.
func (x *exchange) listen(ctx context.Context, t *try, until time.Time) (*dns.Msg, error) {
	if deadline, _ := ctx.Deadline(); until.IsZero() || deadline.Before(until) {
		until = deadline
	}
	_ = t.f.SetReadDeadline(until)
	stop := context.AfterFunc(ctx, func() { _ = t.f.SetReadDeadline(time.Now()) })
	defer stop()
	// The query offers dns.DefaultMsgSize (EDNS0): a longer datagram is
	// cut, fails to parse and is ignored like any other junk.
	bp := answerBuffers.Get().(*[]byte)
	defer answerBuffers.Put(bp)
	for {
		n, err := t.f.Read(*bp)
		if err == io.EOF { // an empty datagram
			t.ignored++
			continue
		}
		if err != nil {
			return nil, err
		}
		resp := x.parse(t.id, (*bp)[:n])
		if resp == nil {
			t.ignored++
			continue
		}
		if !resp.Truncated {
			return resp, nil
		}
		return x.overTCP(ctx, t.idx)
	}
}

// parse returns b as a message if it answers the question asked with id,
// else nil. The header is checked before anything is unpacked: junk costs
// no allocation.
func (x *exchange) parse(id uint16, b []byte) *dns.Msg {
	if len(b) < headerLen || binary.BigEndian.Uint16(b) != id || b[2]&flagQR == 0 || b[2]&opcodeMask != 0 ||
		binary.BigEndian.Uint16(b[4:]) != 1 {
		return nil
	}
	resp := new(dns.Msg)
	if resp.Unpack(b) != nil || !answers(resp, id, x.name, x.qtype) {
		return nil
	}
	return resp
}

// overTCP asks server idx again over TCP, after a truncated answer.
func (x *exchange) overTCP(ctx context.Context, idx int) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(x.name, x.qtype)
	q.SetEdns0(dns.DefaultMsgSize, false)
	q.Id = dns.Id()
	tctx, cancel := context.WithTimeout(ctx, x.u.timeout)
	defer cancel()
	resp, _, err := x.u.tcp.ExchangeContext(tctx, q, x.u.servers[idx])
	if err == nil && !answers(resp, q.Id, x.name, x.qtype) {
		err = errMismatch
	}
	if err != nil {
		return nil, fmt.Errorf("over TCP after truncation: %w", err)
	}
	return resp, nil
}

// outcome takes the end of a try of server idx: the answer if it is
// usable, else it notes why not.
func (x *exchange) outcome(ctx context.Context, idx int, resp *dns.Msg, err error, rtt time.Duration) (*dns.Msg, bool) {
	if err == nil {
		if err = unusable(resp); err != nil {
			x.answered[idx] = true
		}
	}
	if err == nil {
		x.u.record(idx, nil, rtt)
		x.u.preferred.Store(uint32(idx))
		return resp, true
	}
	if budgetLeft(ctx) {
		// Not the server's failure if the query's budget ran out.
		x.u.record(idx, err, rtt)
	}
	x.errs = append(x.errs, fmt.Errorf("%s: %w", x.u.servers[idx], err))
	return nil, false
}

// retry goes on after the first try failed or, if late is not nil, was not
// answered within its retransmission timeout: each further try listens in
// a goroutine of its own, and the next goes out whenever the newest is
// late.
func (x *exchange) retry(ctx context.Context, late *try) (*dns.Msg, error) {
	ctx, cancel := context.WithCancel(ctx) // ends the tries still listening
	defer cancel()
	type result struct {
		idx  int
		resp *dns.Msg
		err  error
		rtt  time.Duration
	}
	results := make(chan result, maxTries)
	pending := 0 // tries listening
	listen := func(t *try) {
		pending++
		go func() {
			defer x.close(t)
			resp, err := x.listen(ctx, t, time.Time{})
			if err != nil {
				err = t.failed(err)
			}
			results <- result{idx: t.idx, resp: resp, err: err, rtt: time.Since(t.start)}
		}()
	}
	// launch sends the next try and returns the channel that says when it
	// is late (nil if there is none).
	launch := func() <-chan time.Time {
		t, err := x.send()
		if err != nil {
			pending++
			results <- result{idx: x.tried, err: err}
		} else if t != nil {
			listen(t)
		}
		if t == nil && err == nil {
			return nil
		}
		return time.After(x.u.rto(x.tried))
	}
	if late != nil {
		listen(late)
	}
	var timeout <-chan time.Time
	if budgetLeft(ctx) {
		timeout = launch()
	}
	for pending > 0 {
		select {
		case r := <-results:
			pending--
			if resp, ok := x.outcome(ctx, r.idx, r.resp, r.err, r.rtt); ok {
				return resp, nil
			}
		case <-timeout:
			// The newest try is late: count it against its server and
			// send the next one, the late one still listening.
			x.u.record(x.tried, errors.New("no answer within the retransmission timeout"), 0)
		case <-ctx.Done():
			// The tries still listening end at once (their deadline is
			// the context's): collect why, for the log.
			for ; pending > 0; pending-- {
				if r := <-results; r.err != nil {
					x.errs = append(x.errs, fmt.Errorf("%s: %w", x.u.servers[r.idx], r.err))
				}
			}
			x.errs = append(x.errs, fmt.Errorf("query budget spent: %w", context.Cause(ctx)))
			return nil, errors.Join(x.errs...)
		}
		if budgetLeft(ctx) {
			timeout = launch()
		}
	}
	if !budgetLeft(ctx) {
		x.errs = append(x.errs, fmt.Errorf("query budget spent: %w", cmp.Or(context.Cause(ctx), context.DeadlineExceeded)))
	}
	return nil, errors.Join(x.errs...)
}

// answerBuffers hold upstream answers while they are read: a buffer per
// try would make the garbage collector work for every cache miss.
var answerBuffers = sync.Pool{New: func() any { b := make([]byte, dns.DefaultMsgSize); return &b }}

// answers reports whether r answers the query with id for name and qtype
// (class IN): a response, opcode QUERY, with the single question asked (the
// name in any case). Every answer from a server is checked with it.
func answers(r *dns.Msg, id uint16, name string, qtype uint16) bool {
	return r.Id == id && r.Response && r.Opcode == dns.OpcodeQuery && len(r.Question) == 1 &&
		r.Question[0].Qtype == qtype && r.Question[0].Qclass == dns.ClassINET &&
		strings.EqualFold(r.Question[0].Name, name)
}

// errMismatch is the error of an answer to another question.
var errMismatch = errors.New("answer does not match the question")

// unusable says why resp is no answer to pass on (SERVFAIL or REFUSED: the
// next server may know better); nil if it is usable.
func unusable(resp *dns.Msg) error {
	if resp.Rcode == dns.RcodeServerFailure || resp.Rcode == dns.RcodeRefused {
		return fmt.Errorf("answered %s", dns.RcodeToString[resp.Rcode])
	}
	return nil
}
