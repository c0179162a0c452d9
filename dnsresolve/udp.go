package dnsresolve

import (
	"net"
	"net/netip"
	"slices"
	"time"
	"unsafe"

	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// UDP queries are read in batches (recvmmsg) by one goroutine per socket.
// Cache hits are answered there on the fast path (wire.go) and their
// answers sent in one batch (sendmmsg); the other queries are handed to
// miekg/dns one by one, which answers each in a goroutine of its own
// through ServeDNS.

// readBatch is the number of datagrams read at once; each needs a buffer
// of maxQuerySize, for each of the UDP sockets.
const readBatch = 8

// udpConn is a UDP listener. It is deliberately not a *net.UDPConn, so
// that miekg/dns reads it through batchReader.ReadPacketConn and answers
// through WriteTo, with the peer ReadPacketConn returned.
type udpConn struct {
	*net.UDPConn
	v6    bool
	batch interface {
		ReadBatch([]ipv4.Message, int) (int, error)
		WriteBatch([]ipv4.Message, int) (int, error)
	}
}

func newUDPConn(c *net.UDPConn, v6 bool) (*udpConn, error) {
	u := &udpConn{UDPConn: c, v6: v6}
	// The address each query was sent to comes with it: answers must be
	// sent from there.
	if v6 {
		pc := ipv6.NewPacketConn(c)
		u.batch = pc
		return u, pc.SetControlMessage(ipv6.FlagDst, true)
	}
	pc := ipv4.NewPacketConn(c)
	u.batch = pc
	return u, pc.SetControlMessage(ipv4.FlagDst, true)
}

// peer is a client's address and the address its query was sent to. The
// answer must come from the latter: the reverse NAT of the DNS redirect,
// and the client, recognise only that.
type peer struct {
	net.UDPAddr
	local netip.Addr
}

// WriteTo sends an answer of the slow path.
func (c *udpConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	p, ok := addr.(*peer)
	if !ok {
		return c.UDPConn.WriteTo(b, addr)
	}
	n, _, err := c.WriteMsgUDP(b, c.source(nil, p.local), &p.UDPAddr)
	return n, err
}

// local returns the address a query was sent to, from its packet info
// control message.
func (c *udpConn) local(oob []byte) netip.Addr {
	for len(oob) > 0 {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			break
		}
		switch {
		case !c.v6 && h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom4(info.Addr)
		case c.v6 && h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom16(info.Addr)
		}
		oob = rest
	}
	return netip.Addr{}
}

// sourceLen is the room a source control message takes.
var sourceLen = unix.CmsgSpace(max(unix.SizeofInet4Pktinfo, unix.SizeofInet6Pktinfo))

// source appends to dst the control message that sends from local, as
// miekg/dns does for its own sockets.
func (c *udpConn) source(dst []byte, local netip.Addr) []byte {
	if !local.IsValid() || local.IsUnspecified() || local.IsMulticast() {
		return dst
	}
	level, typ, size := unix.IPPROTO_IP, unix.IP_PKTINFO, unix.SizeofInet4Pktinfo
	if c.v6 {
		level, typ, size = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, unix.SizeofInet6Pktinfo
	}
	start := len(dst)
	dst = append(dst, make([]byte, unix.CmsgSpace(size))...)
	b := dst[start:]
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = int32(level), int32(typ)
	h.SetLen(unix.CmsgLen(size))
	data := unsafe.Pointer(&b[unix.CmsgLen(0)])
	if c.v6 {
		(*unix.Inet6Pktinfo)(data).Addr = local.As16()
	} else {
		(*unix.Inet4Pktinfo)(data).Spec_dst = local.As4()
	}
	return dst
}

// batchReader reads one udpConn for miekg/dns (dns.Server.DecorateReader).
//
// Before a query is parsed, the client's bounds are checked (limits.go):
// a flood costs a read and a map lookup per datagram. A reader that drops
// floodDrops datagrams in a row pauses for floodPause: its socket's queue
// (which, steered by client address, the flooder fills) then overflows
// and the kernel drops the flood without any work here, while the CPU
// goes to the other clients' sockets.
type batchReader struct {
	dns.Reader
	p       *Proxy
	conn    *udpConn
	in, out []ipv4.Message
	key     []byte     // cache key of the query being answered
	slow    []slowPath // read, not yet handed to miekg/dns
	next    int        // the next of slow to hand over
	dropped int        // datagrams dropped in a row
}

type slowPath struct {
	msg  []byte
	from *peer
}

const (
	floodDrops = 256
	floodPause = 2 * time.Millisecond
)

func newBatchReader(r dns.Reader, p *Proxy, c *udpConn) *batchReader {
	oobLen := len(ipv4.NewControlMessage(ipv4.FlagDst))
	if c.v6 {
		oobLen = len(ipv6.NewControlMessage(ipv6.FlagDst))
	}
	b := &batchReader{Reader: r, p: p, conn: c, in: make([]ipv4.Message, readBatch), out: make([]ipv4.Message, readBatch)}
	for i := range b.in {
		b.in[i] = ipv4.Message{Buffers: [][]byte{make([]byte, maxQuerySize)}, OOB: make([]byte, oobLen)}
		b.out[i] = ipv4.Message{Buffers: [][]byte{make([]byte, 0, maxUDPAnswer+optLen)}, OOB: make([]byte, 0, sourceLen)}
	}
	return b
}

// ReadPacketConn returns the next query for the slow path, answering the
// fast path's queries while it waits for one.
func (r *batchReader) ReadPacketConn(net.PacketConn, time.Duration) ([]byte, net.Addr, error) {
	for r.next == len(r.slow) {
		clear(r.slow)
		r.slow, r.next = r.slow[:0], 0
		if err := r.serveBatch(); err != nil {
			return nil, nil, err
		}
	}
	q := r.slow[r.next]
	r.next++
	return q.msg, q.from, nil
}

// serveBatch reads the queries that are waiting (at least one), answers
// those it can on the fast path and queues the others in r.slow.
func (r *batchReader) serveBatch() error {
	n, err := r.conn.batch.ReadBatch(r.in, 0)
	if err != nil {
		return err
	}
	conf, now := r.p.conf.Load(), r.p.now()
	out := r.out[:0]
	for i := range r.in[:n] {
		m := &r.in[i]
		from, _ := m.Addr.(*net.UDPAddr)
		if from == nil {
			continue
		}
		if !r.p.limits.admitPacket(addrOf(from)) {
			if r.dropped++; r.dropped >= floodDrops {
				r.dropped = 0
				time.Sleep(floodPause)
			}
			continue
		}
		r.dropped = 0
		if m.Flags&unix.MSG_TRUNC != 0 {
			continue // larger than any query egressd answers
		}
		query, local := m.Buffers[0][:m.N], r.conn.local(m.OOB[:m.NN])
		o := &r.out[len(out)]
		reply, ok := r.p.fastReply(conf, query, o.Buffers[0][:0], &r.key, now)
		if !ok {
			r.slow = append(r.slow, slowPath{msg: slices.Clone(query), from: &peer{UDPAddr: *from, local: local}})
			continue
		}
		o.Buffers[0], o.OOB, o.Addr = reply, r.conn.source(o.OOB[:0], local), from
		out = out[:len(out)+1]
	}
	for len(out) > 0 {
		n, err := r.conn.batch.WriteBatch(out, 0)
		if err != nil {
			r.p.log.Debug("write answer", "client", out[0].Addr, "err", err)
			n = 1 // the first failed: go on with the others
		}
		out = out[max(n, 1):]
	}
	return nil
}
