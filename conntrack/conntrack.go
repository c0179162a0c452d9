// Package conntrack deletes single connection-tracking entries through
// ctnetlink, cheaply enough to do it once per DNS exchange.
//
// egressd's own upstream queries are exempt from the DNS redirect. Each
// leaves a conntrack entry (host:port → resolver:53, without NAT) that
// outlives the socket by 30 s or more; any other host process that sends
// from that port meanwhile matches the entry, skips the redirect (NAT is
// decided on a connection's first packet) and passes the firewall as
// established: straight to the resolver, any name. Deleting the entry
// while egressd's socket still holds the port leaves nothing to ride: no
// other socket can send from the port before the entry is gone.
package conntrack

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// ctnetlink message type and attributes (linux/netfilter/nfnetlink_conntrack.h).
const (
	msgDelete = 2 // IPCTNL_MSG_CT_DELETE

	attrTupleOrig  = 1 // CTA_TUPLE_ORIG
	attrTupleIP    = 1 // CTA_TUPLE_IP
	attrTupleProto = 2 // CTA_TUPLE_PROTO
	attrIPv4Src    = 1 // CTA_IP_V4_SRC
	attrIPv4Dst    = 2
	attrIPv6Src    = 3
	attrIPv6Dst    = 4
	attrProtoNum   = 1 // CTA_PROTO_NUM
	attrProtoSrc   = 2 // CTA_PROTO_SRC_PORT
	attrProtoDst   = 3
)

// Conn is a ctnetlink socket. It is safe for concurrent use: requests are
// serialised, each waits for the kernel's acknowledgement.
type Conn struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte // request, then the acknowledgement
}

// Open opens a ctnetlink socket in the current network namespace.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("open ctnetlink: %w", os.NewSyscallError("socket", err))
	}
	// Connected to the kernel: plain writes and reads, no address to
	// pass (or allocate) per request.
	if err := unix.Connect(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("open ctnetlink: %w", os.NewSyscallError("connect", err))
	}
	// An acknowledgement without the request echoed back: 36 bytes.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &Conn{fd: fd, buf: make([]byte, 0, 256)}, nil
}

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// Delete deletes the entry whose original direction is proto (unix.IPPROTO_UDP
// or unix.IPPROTO_TCP) from src to dst, in the default zone. An entry that
// does not exist is not an error: the kernel may not track the flow, or
// it expired.
func (c *Conn) Delete(proto uint8, src, dst netip.AddrPort) error {
	src, dst = unmap(src), unmap(dst)
	if src.Addr().Is4() != dst.Addr().Is4() {
		return fmt.Errorf("conntrack delete %s → %s: mixed address families", src, dst)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	b := c.request(proto, src, dst)
	if _, err := unix.Write(c.fd, b); err != nil {
		return fmt.Errorf("conntrack delete %s → %s: %w", src, dst, os.NewSyscallError("write", err))
	}
	for {
		n, err := unix.Read(c.fd, c.buf[:cap(c.buf)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("conntrack delete %s → %s: %w", src, dst, os.NewSyscallError("read", err))
		}
		errno, ok := ackErrno(c.buf[:n], c.seq)
		if !ok {
			continue // a late acknowledgement of an earlier request
		}
		if errno == 0 || errno == unix.ENOENT {
			return nil
		}
		return fmt.Errorf("conntrack delete %s → %s: %w", src, dst, errno)
	}
}

// request builds the delete message for the tuple into c.buf.
func (c *Conn) request(proto uint8, src, dst netip.AddrPort) []byte {
	family, srcAttr, dstAttr := byte(unix.AF_INET), uint16(attrIPv4Src), uint16(attrIPv4Dst)
	if src.Addr().Is6() {
		family, srcAttr, dstAttr = unix.AF_INET6, attrIPv6Src, attrIPv6Dst
	}
	b := c.buf[:0]
	b = binary.NativeEndian.AppendUint32(b, 0) // length, below
	b = binary.NativeEndian.AppendUint16(b, unix.NFNL_SUBSYS_CTNETLINK<<8|msgDelete)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	b = binary.NativeEndian.AppendUint32(b, c.seq)
	b = binary.NativeEndian.AppendUint32(b, 0)     // port id: the kernel's
	b = append(b, family, unix.NFNETLINK_V0, 0, 0) // nfgenmsg, resource id 0
	orig := len(b)
	b = appendAttrHeader(b, unix.NLA_F_NESTED|attrTupleOrig)
	ip := len(b)
	b = appendAttrHeader(b, unix.NLA_F_NESTED|attrTupleIP)
	b = appendAttr(b, srcAttr, src.Addr().AsSlice()...)
	b = appendAttr(b, dstAttr, dst.Addr().AsSlice()...)
	b = endAttr(b, ip)
	ports := len(b)
	b = appendAttrHeader(b, unix.NLA_F_NESTED|attrTupleProto)
	b = appendAttr(b, attrProtoNum, proto)
	b = appendAttr(b, attrProtoSrc, byte(src.Port()>>8), byte(src.Port()))
	b = appendAttr(b, attrProtoDst, byte(dst.Port()>>8), byte(dst.Port()))
	b = endAttr(b, ports)
	b = endAttr(b, orig)
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	c.buf = b
	return b
}

func appendAttrHeader(b []byte, typ uint16) []byte {
	b = binary.NativeEndian.AppendUint16(b, 0) // length: endAttr
	return binary.NativeEndian.AppendUint16(b, typ)
}

func appendAttr(b []byte, typ uint16, data ...byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.NLA_HDRLEN+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.NLA_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

// endAttr writes the length of the nested attribute that starts at off.
func endAttr(b []byte, off int) []byte {
	binary.NativeEndian.PutUint16(b[off:], uint16(len(b)-off))
	return b
}

// ackErrno reads the error code of an acknowledgement of request seq; ok
// is false for anything else.
func ackErrno(b []byte, seq uint32) (errno unix.Errno, ok bool) {
	if len(b) < unix.NLMSG_HDRLEN+4 || binary.NativeEndian.Uint16(b[4:]) != unix.NLMSG_ERROR ||
		binary.NativeEndian.Uint32(b[8:]) != seq {
		return 0, false
	}
	return unix.Errno(-int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:]))), true
}

// unmap turns an IPv4-mapped IPv6 address into IPv4: the kernel tracks
// such flows as IPv4.
func unmap(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) }
