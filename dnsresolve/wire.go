package dnsresolve

import (
	"encoding/binary"
	"time"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/dnsname"
	"github.com/egressd/egressd/metrics"
)

// The fast path answers the common query, an A or AAAA question for a name
// whose answer is cached, from the query's bytes and a pre-packed answer,
// without dns.Msg: no unpack, no pack, no goroutine. Whatever it does not
// recognise goes the slow path (ServeDNS), which gives the same answer, so
// the fast path is an optimisation only and can decline at any point.
// BenchmarkFastReply measures it (no allocation per answer).

// wireQuery is what the fast path needs of a query.
type wireQuery struct {
	nameEnd int    // offset after the question name
	qtype   uint16 // A or AAAA
	edns    bool   // the query has an OPT record
	size    int    // the largest UDP answer the client accepts
}

const (
	headerLen = 12
	optLen    = 11 // an OPT record without options
	// Header flag bits (RFC 1035 4.1.1): QR, opcode and RD in the first
	// flag byte, CD in the second (RA comes with the packed answer).
	flagQR, opcodeMask, flagRD = 0x80, 0x78, 0x01
	flagCD                     = 0x10
)

// parseQuery reads a standard query with one IN question whose labels hold
// only label characters (dnsname.LabelChar), and at most an OPT record
// carrying only cookie or padding options, and nothing after it. It
// appends the cache key of the question (see cacheKey) to key. ok is false
// for any other message.
func parseQuery(b, key []byte) (q wireQuery, _ []byte, ok bool) {
	if len(b) < headerLen || b[2]&(flagQR|opcodeMask) != 0 || // a response, or opcode other than QUERY
		binary.BigEndian.Uint16(b[4:]) != 1 || binary.BigEndian.Uint16(b[6:]) != 0 ||
		binary.BigEndian.Uint16(b[8:]) != 0 || binary.BigEndian.Uint16(b[10:]) > 1 {
		return q, key, false
	}
	off := headerLen
	for {
		if off >= len(b) {
			return q, key, false
		}
		n := int(b[off])
		off++
		if n == 0 {
			break
		}
		// Compression pointers (and the reserved 0x40, 0x80 forms) have
		// no place in a question.
		if n > 63 || off+n > len(b) || off+n-headerLen > 255 {
			return q, key, false
		}
		for _, c := range b[off : off+n] {
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if !dnsname.LabelChar(rune(c)) {
				return q, key, false // needs escaping: the slow path knows how
			}
			key = append(key, c)
		}
		key = append(key, '.')
		off += n
	}
	if off == headerLen+1 || off+4 > len(b) { // the root, or a short question
		return q, key, false
	}
	q.nameEnd = off
	q.qtype = binary.BigEndian.Uint16(b[off:])
	if (q.qtype != dns.TypeA && q.qtype != dns.TypeAAAA) || binary.BigEndian.Uint16(b[off+2:]) != dns.ClassINET {
		return q, key, false
	}
	key = binary.BigEndian.AppendUint16(key, q.qtype)
	off += 4
	q.size = dns.MinMsgSize
	if b[11] == 1 {
		if off+optLen > len(b) || b[off] != 0 || binary.BigEndian.Uint16(b[off+1:]) != dns.TypeOPT {
			return q, key, false
		}
		q.edns = true
		q.size = min(max(int(binary.BigEndian.Uint16(b[off+3:])), dns.MinMsgSize), maxUDPAnswer)
		rdlen := int(binary.BigEndian.Uint16(b[off+9:]))
		off += optLen
		if off+rdlen != len(b) {
			return q, key, false
		}
		for off < len(b) {
			if off+4 > len(b) {
				return q, key, false
			}
			code, n := binary.BigEndian.Uint16(b[off:]), int(binary.BigEndian.Uint16(b[off+2:]))
			if (code != dns.EDNS0COOKIE && code != dns.EDNS0PADDING) || off+4+n > len(b) {
				return q, key, false
			}
			off += 4 + n
		}
	}
	if off != len(b) {
		return q, key, false
	}
	return q, key, true
}

// packAnswer packs m, an answer with ID 0 and no OPT record, for
// appendReply, and returns the offsets of its records' TTLs. ok is false
// if m cannot be packed.
func packAnswer(m *dns.Msg) (wire []byte, ttls []uint16, ok bool) {
	wire, err := m.Pack()
	if err != nil || len(wire) > maxUDPAnswer {
		return nil, nil, false
	}
	off := headerLen
	if off, ok = skipName(wire, off); !ok {
		return nil, nil, false
	}
	off += 4
	for range len(m.Answer) + len(m.Ns) {
		if off, ok = skipName(wire, off); !ok || off+10 > len(wire) {
			return nil, nil, false
		}
		ttls = append(ttls, uint16(off+4))
		off += 10 + int(binary.BigEndian.Uint16(wire[off+8:]))
	}
	return wire, ttls, off == len(wire)
}

func skipName(b []byte, off int) (int, bool) {
	for off < len(b) {
		switch n := int(b[off]); {
		case n == 0:
			return off + 1, true
		case n&0xC0 == 0xC0:
			return off + 2, off+2 <= len(b)
		default:
			off += 1 + n
		}
	}
	return off, false
}

// appendReply appends the answer to query (parsed as q) to dst: the packed
// answer with the query's ID, RD and CD bits and spelling of the name
// (0x20 case randomisation survives), TTLs reduced by age, and an OPT
// record if the query had one. It is byte for byte what ServeDNS sends.
func appendReply(dst, wire []byte, ttls []uint16, query []byte, q wireQuery, age uint32) []byte {
	start := len(dst)
	dst = append(dst, wire...)
	r := dst[start:]
	copy(r[0:2], query[0:2])
	r[2] = flagQR | query[2]&flagRD
	r[3] = wire[3] | query[3]&flagCD
	copy(r[headerLen:q.nameEnd], query[headerLen:q.nameEnd])
	if age > 0 {
		for _, off := range ttls {
			ttl := binary.BigEndian.Uint32(r[off:])
			binary.BigEndian.PutUint32(r[off:], ttl-min(ttl, age))
		}
	}
	if q.edns {
		binary.BigEndian.PutUint16(r[10:], 1)
		// Root name, type OPT, the UDP size egressd accepts, no extended
		// rcode, version 0, no DO bit, no options (as dns.Msg.SetEdns0).
		dst = append(dst, 0, 0, byte(dns.TypeOPT), byte(maxUDPAnswer>>8), byte(maxUDPAnswer&0xff), 0, 0, 0, 0, 0, 0)
	}
	return dst
}

// fastReply appends to dst the answer to query from a if the cache holds
// it and its addresses are open for the rest of its TTL already, for the
// rules of a that allow it; key and rules are buffers for the cache key
// and those rules. ok is false if the query needs the slow path: not a
// plain A or AAAA query, not cached, too large for the client, not allowed
// to a, or addresses to open (which may wait for the kernel).
func (p *Proxy) fastReply(conf *proxyConf, query, dst []byte, a asker, key *[]byte, rules *[]string, now time.Time) (_ []byte, ok bool) {
	var q wireQuery
	if q, *key, ok = parseQuery(query, (*key)[:0]); !ok {
		return nil, false
	}
	e, age := conf.cache.get(*key, now)
	if e == nil || e.wire == nil {
		return nil, false
	}
	if size := len(e.wire); size > q.size || (q.edns && size+optLen > q.size) {
		return nil, false
	}
	allow := e.rules
	if !conf.policy.uniform {
		// Whether a may have it, and for which rules, depends on who a is.
		*rules = conf.policy.appendRules((*rules)[:0], a, e.name)
		if allow = *rules; len(allow) == 0 {
			return nil, false // refused, by the slow path
		}
	}
	if len(e.addrs) > 0 {
		if c, ok := conf.opts.Allower.(coverer); !ok || !c.Covered(e.name, allow, e.addrs, conf.until(e, age, now)) {
			return nil, false
		}
	}
	conf.opts.Metrics.Query(metrics.Allowed)
	return appendReply(dst, e.wire, e.ttls, query, q, age), true
}
