package dnsresolve

import (
	"encoding/binary"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/egressd/egressd/config"
	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// udpServer answers DNS on one UDP socket. One goroutine reads the socket
// in batches (recvmmsg). Cache hits are answered there on the fast path
// (wire.go) and their answers sent in one batch (sendmmsg). Every other
// query goes to a worker, which answers it through ServeDNS; a worker
// waits for the next query a while before it ends, so that a busy socket
// neither starts a goroutine per query nor grows a fresh stack for each.
//
// Before a query is parsed, the client's bounds are checked (limits.go): a
// flood costs a read and a map lookup per datagram. A reader that drops
// floodDrops datagrams in a row pauses for floodPause: its socket's queue
// (which, steered by client address, the flooder fills) then overflows and
// the kernel drops the flood without any work here, while the CPU goes to
// the other clients' sockets.
type udpServer struct {
	p     *Proxy
	conn  *net.UDPConn
	v6    bool
	class *config.DNSClass // the host cgroup whose DNS comes here; nil: the main port
	// batch reads and writes conn with control messages: the address
	// each query was sent to comes with it, and its answer must leave
	// from there (the reverse NAT of the DNS redirect, and the client,
	// recognise only that).
	batch interface {
		ReadBatch([]ipv4.Message, int) (int, error)
		WriteBatch([]ipv4.Message, int) (int, error)
	}
	in, out []ipv4.Message
	key     []byte   // cache key of the query being answered
	rules   []string // rules of the client that allow it (non-uniform rules)
	dropped int      // datagrams dropped in a row

	work    chan slowQuery // to an idle worker
	workers sync.WaitGroup
	closing atomic.Bool
}

// slowQuery is a query for a worker.
type slowQuery struct {
	msg   []byte
	from  *net.UDPAddr
	local netip.Addr // the address it was sent to
}

const (
	// readBatch is the number of datagrams read at once; each needs a
	// buffer of maxQuerySize, for each of the UDP sockets.
	readBatch  = 8
	floodDrops = 256
	floodPause = 2 * time.Millisecond
	workerIdle = 10 * time.Second
)

func newUDPServer(p *Proxy, c *net.UDPConn, v6 bool) (*udpServer, error) {
	s := &udpServer{p: p, conn: c, v6: v6, in: make([]ipv4.Message, readBatch), out: make([]ipv4.Message, readBatch), work: make(chan slowQuery)}
	var err error
	var oobLen int
	if v6 {
		pc := ipv6.NewPacketConn(c)
		s.batch, err, oobLen = pc, pc.SetControlMessage(ipv6.FlagDst, true), len(ipv6.NewControlMessage(ipv6.FlagDst))
	} else {
		pc := ipv4.NewPacketConn(c)
		s.batch, err, oobLen = pc, pc.SetControlMessage(ipv4.FlagDst, true), len(ipv4.NewControlMessage(ipv4.FlagDst))
	}
	if err != nil {
		return nil, err
	}
	for i := range s.in {
		s.in[i] = ipv4.Message{Buffers: [][]byte{make([]byte, maxQuerySize)}, OOB: make([]byte, oobLen)}
		s.out[i] = ipv4.Message{Buffers: [][]byte{make([]byte, 0, maxUDPAnswer+optLen)}, OOB: make([]byte, 0, sourceLen)}
	}
	return s, nil
}

// serve answers queries until shutdown, then waits for its workers and
// closes the socket.
func (s *udpServer) serve() error {
	defer s.conn.Close()
	defer s.workers.Wait()
	defer close(s.work)
	for {
		if err := s.serveBatch(); err != nil {
			if s.closing.Load() {
				return nil
			}
			return err
		}
	}
}

// shutdown makes serve return once the queries being answered are.
func (s *udpServer) shutdown() {
	s.closing.Store(true)
	_ = s.conn.SetReadDeadline(time.Unix(1, 0))
}

// serveBatch reads the queries that are waiting (at least one), answers
// those it can on the fast path and hands the others to workers.
func (s *udpServer) serveBatch() error {
	n, err := s.batch.ReadBatch(s.in, 0)
	if err != nil {
		return err
	}
	conf, now := s.p.conf.Load(), s.p.now()
	out := s.out[:0]
	for i := range s.in[:n] {
		m := &s.in[i]
		from, _ := m.Addr.(*net.UDPAddr)
		if from == nil {
			continue
		}
		if !s.p.limits.admitPacket(addrOf(from)) {
			if s.dropped++; s.dropped >= floodDrops {
				s.dropped = 0
				time.Sleep(floodPause)
			}
			continue
		}
		s.dropped = 0
		if m.Flags&unix.MSG_TRUNC != 0 || m.N < headerLen {
			continue // larger than any query egressd answers, or no DNS message
		}
		query, local := m.Buffers[0][:m.N], s.local(m.OOB[:m.NN])
		o := &s.out[len(out)]
		var reply []byte
		ok := false
		reply, ok = s.p.fastReply(conf, query, o.Buffers[0][:0], asker{addrOf(from), s.class}, &s.key, &s.rules, now)
		if !ok {
			s.dispatch(slowQuery{msg: slices.Clone(query), from: from, local: local})
			continue
		}
		o.Buffers[0], o.OOB, o.Addr = reply, s.source(o.OOB[:0], local), from
		out = out[:len(out)+1]
	}
	for len(out) > 0 {
		n, err := s.batch.WriteBatch(out, 0)
		if err != nil {
			s.p.log.Debug("write answer", "client", out[0].Addr, "err", err)
			n = 1 // the first failed: go on with the others
		}
		out = out[max(n, 1):]
	}
	return nil
}

// dispatch hands q to an idle worker, or starts one: a query waiting for
// the upstream or the firewall never holds up another.
func (s *udpServer) dispatch(q slowQuery) {
	select {
	case s.work <- q:
	default:
		s.workers.Add(1)
		go s.worker(q)
	}
}

func (s *udpServer) worker(q slowQuery) {
	defer s.workers.Done()
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for ok := true; ok; {
		s.answer(q)
		idle.Reset(workerIdle)
		select {
		case q, ok = <-s.work:
		case <-idle.C:
			return
		}
	}
}

// answer answers q through ServeDNS, or, for a message that is not a query
// it can take, as miekg/dns's server does: nothing for a response, FORMERR
// or NOTIMP otherwise.
func (s *udpServer) answer(q slowQuery) {
	w := &udpResponse{s: s, to: q.from, local: q.local}
	r := new(dns.Msg)
	err := r.Unpack(q.msg) // leaves the header set if a section fails
	be := binary.BigEndian
	action := dns.DefaultMsgAcceptFunc(dns.Header{Id: be.Uint16(q.msg), Bits: be.Uint16(q.msg[2:]),
		Qdcount: be.Uint16(q.msg[4:]), Ancount: be.Uint16(q.msg[6:]), Nscount: be.Uint16(q.msg[8:]), Arcount: be.Uint16(q.msg[10:])})
	switch {
	case action == dns.MsgIgnore:
		return
	case action == dns.MsgAccept && err == nil:
		s.p.serveDNS(w, r, s.class)
		return
	}
	opcode := r.Opcode
	r.SetRcodeFormatError(r)
	r.Zero = false
	if action == dns.MsgRejectNotImplemented {
		r.Opcode, r.Rcode = opcode, dns.RcodeNotImplemented
	}
	r.Answer, r.Ns, r.Extra = nil, nil, nil
	_ = w.WriteMsg(r)
}

// local returns the address a query was sent to, from its packet info
// control message.
func (s *udpServer) local(oob []byte) netip.Addr {
	for len(oob) > 0 {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			break
		}
		switch {
		case !s.v6 && h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			return netip.AddrFrom4((*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0])).Addr)
		case s.v6 && h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			return netip.AddrFrom16((*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0])).Addr)
		}
		oob = rest
	}
	return netip.Addr{}
}

// sourceLen is the room a source control message takes.
var sourceLen = unix.CmsgSpace(max(unix.SizeofInet4Pktinfo, unix.SizeofInet6Pktinfo))

// source appends to dst the control message that sends from local, as
// miekg/dns does for its own sockets.
func (s *udpServer) source(dst []byte, local netip.Addr) []byte {
	if !local.IsValid() || local.IsUnspecified() || local.IsMulticast() {
		return dst
	}
	level, typ, size := unix.IPPROTO_IP, unix.IP_PKTINFO, unix.SizeofInet4Pktinfo
	if s.v6 {
		level, typ, size = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, unix.SizeofInet6Pktinfo
	}
	start := len(dst)
	dst = append(dst, make([]byte, unix.CmsgSpace(size))...)
	b := dst[start:]
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = int32(level), int32(typ)
	h.SetLen(unix.CmsgLen(size))
	data := unsafe.Pointer(&b[unix.CmsgLen(0)])
	if s.v6 {
		(*unix.Inet6Pktinfo)(data).Addr = local.As16()
	} else {
		(*unix.Inet4Pktinfo)(data).Spec_dst = local.As4()
	}
	return dst
}

// udpResponse is the dns.ResponseWriter of a query a worker answers.
type udpResponse struct {
	s     *udpServer
	to    *net.UDPAddr
	local netip.Addr
}

func (w *udpResponse) LocalAddr() net.Addr  { return w.s.conn.LocalAddr() }
func (w *udpResponse) RemoteAddr() net.Addr { return w.to }

func (w *udpResponse) WriteMsg(m *dns.Msg) error {
	b, err := m.Pack()
	if err == nil {
		_, err = w.Write(b)
	}
	return err
}

func (w *udpResponse) Write(b []byte) (int, error) {
	n, _, err := w.s.conn.WriteMsgUDP(b, w.s.source(nil, w.local), w.to)
	return n, err
}

func (w *udpResponse) Close() error        { return nil }
func (w *udpResponse) TsigStatus() error   { return nil }
func (w *udpResponse) TsigTimersOnly(bool) {}
func (w *udpResponse) Hijack()             {}
