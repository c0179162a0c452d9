package dnsresolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
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
	servers []string
	timeout time.Duration // longest wait for one try
	dialer  *net.Dialer
	tcp     *dns.Client
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
	var up, down []int
	for i := range u.servers {
		idx := (start + i) % len(u.servers)
		if now.Before(u.state[idx].downUntil) {
			down = append(down, idx)
		} else {
			up = append(up, idx)
		}
	}
	slices.SortStableFunc(down, func(a, b int) int { return u.state[a].downUntil.Compare(u.state[b].downUntil) })
	return append(up, down...)
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
		timeout: timeout,
		dialer:  dialer,
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
// SERVFAIL or REFUSED), at most maxTries tries and until ctx ends
// (DefaultQueryBudget if ctx has no deadline). A truncated UDP answer is
// asked again over TCP.
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
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultQueryBudget)
		defer cancel()
	}
	ctx, cancel := context.WithCancel(ctx) // ends the tries still listening
	defer cancel()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	q.SetEdns0(dns.DefaultMsgSize, false)

	type result struct {
		idx  int
		resp *dns.Msg
		err  error
		rtt  time.Duration
	}
	order := u.order()
	results := make(chan result, maxTries)
	answered := make([]bool, len(u.servers)) // SERVFAIL or REFUSED: not asked again
	next, pending := 0, 0                    // next try (round*len+i), tries listening
	var errs []error
	launch := func() (time.Duration, bool) {
		for ; next < maxTries; next++ {
			idx := order[next%len(order)]
			if answered[idx] {
				continue
			}
			next++
			pending++
			go func() {
				start := time.Now()
				resp, err := u.exchangeOne(ctx, q.Copy(), u.servers[idx])
				results <- result{idx: idx, resp: resp, err: err, rtt: time.Since(start)}
			}()
			return u.rto(idx), true
		}
		return 0, false
	}
	wait, more := launch()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	tries := []int{next - 1}
	for pending > 0 {
		select {
		case r := <-results:
			pending--
			err := r.err
			if err == nil && (r.resp.Rcode == dns.RcodeServerFailure || r.resp.Rcode == dns.RcodeRefused) {
				err = fmt.Errorf("answered %s", dns.RcodeToString[r.resp.Rcode])
				answered[r.idx] = true
			}
			if err == nil {
				u.record(r.idx, nil, r.rtt)
				u.preferred.Store(uint32(r.idx))
				return r.resp, nil
			}
			if ctx.Err() == nil {
				// Not the server's failure if the query's budget ran out.
				u.record(r.idx, err, r.rtt)
			}
			errs = append(errs, fmt.Errorf("%s: %w", u.servers[r.idx], err))
		case <-timer.C:
			// The newest try is late: count it against its server and
			// send the next one, the late one still listening.
			last := tries[len(tries)-1]
			idx := order[last%len(order)]
			u.record(idx, errors.New("no answer within the retransmission timeout"), 0)
			if !more {
				continue
			}
		case <-ctx.Done():
			// The tries still listening end at once (their deadline is
			// the context's): collect why, for the log.
			for ; pending > 0; pending-- {
				if r := <-results; r.err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", u.servers[r.idx], r.err))
				}
			}
			errs = append(errs, fmt.Errorf("query budget spent: %w", context.Cause(ctx)))
			return nil, fmt.Errorf("upstream query %s %s: %w", name, dns.TypeToString[qtype], errors.Join(errs...))
		}
		if more && ctx.Err() == nil {
			var w time.Duration
			if w, more = launch(); more {
				tries = append(tries, next-1)
				timer.Reset(w)
			}
		}
	}
	return nil, fmt.Errorf("upstream query %s %s: %w", name, dns.TypeToString[qtype], errors.Join(errs...))
}

// answerBuffers hold upstream answers while they are read: a buffer per
// try would make the garbage collector work for every cache miss.
var answerBuffers = sync.Pool{New: func() any { b := make([]byte, dns.DefaultMsgSize); return &b }}

// exchangeOne makes one try of server, listening until ctx ends.
func (u *Upstream) exchangeOne(ctx context.Context, q *dns.Msg, server string) (*dns.Msg, error) {
	q.Id = dns.Id() // fresh ID per try: the client's ID never goes upstream
	out, err := q.Pack()
	if err != nil {
		return nil, err
	}
	conn, err := u.dialer.DialContext(ctx, "udp", server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write(out); err != nil {
		return nil, err
	}
	// The query offers dns.DefaultMsgSize (EDNS0): a longer datagram is
	// cut, fails to parse and is ignored like any other junk.
	bp := answerBuffers.Get().(*[]byte)
	defer answerBuffers.Put(bp)
	buf := *bp
	ignored := 0
	for {
		n, err := conn.Read(buf)
		if err != nil {
			if ignored > 0 {
				err = fmt.Errorf("%w (ignored %d datagrams that did not answer the question)", err, ignored)
			}
			return nil, err
		}
		resp := new(dns.Msg)
		if resp.Unpack(buf[:n]) != nil || !answers(q, resp) {
			ignored++
			continue
		}
		if !resp.Truncated {
			return resp, nil
		}
		break
	}
	q.Id = dns.Id()
	tctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	resp, _, err := u.tcp.ExchangeContext(tctx, q, server)
	if err == nil && !answers(q, resp) {
		err = errors.New("answer does not match the question")
	}
	if err != nil {
		return nil, fmt.Errorf("over TCP after truncation: %w", err)
	}
	return resp, nil
}

// answers reports whether r is a response to q: same ID, a response, the
// same single question.
func answers(q, r *dns.Msg) bool {
	return r.Id == q.Id && r.Response && r.Opcode == dns.OpcodeQuery && len(r.Question) == 1 &&
		r.Question[0].Qtype == q.Question[0].Qtype && r.Question[0].Qclass == q.Question[0].Qclass &&
		strings.EqualFold(r.Question[0].Name, q.Question[0].Name)
}

// sameQuestion reports whether r carries q's single question (forward.go).
func sameQuestion(q, r *dns.Msg) bool {
	return len(r.Question) == 1 && r.Question[0].Qtype == q.Question[0].Qtype &&
		strings.EqualFold(r.Question[0].Name, q.Question[0].Name)
}
