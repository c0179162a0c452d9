package firewall

import (
	"cmp"
	"encoding/binary"
	"errors"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/rules"
)

// The netlink wire helpers: a set element dump read and parsed in place,
// and the message and attribute walkers the dump and the watcher share.

// dumpTimeout bounds one read of the learned sets.
const dumpTimeout = time.Minute

// dumpBuffer is the receive buffer of a dump: the kernel sizes its dump
// messages after the largest read (up to 32 KiB).
const dumpBuffer = 64 << 10

// dumpSet dumps set of table inet egressd and calls fn with each element's
// key and how long it has left (ms; 0 if it has no timeout). A missing
// table or set is unix.ENOENT.
func dumpSet(c *netlink.Conn, set string, fn func(key []byte, expires int64)) error {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_SET_ELEM_LIST_TABLE, Data: []byte(rules.TableName + "\x00")},
		{Type: unix.NFTA_SET_ELEM_LIST_SET, Data: []byte(set + "\x00")},
	})
	if err != nil {
		return err
	}
	req, err := c.Send(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSETELEM),
			Flags: netlink.Request | netlink.Dump,
		},
		// nfgenmsg: family, version, resource id.
		Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		return err
	}
	rc, err := c.SyscallConn()
	if err != nil {
		// A test peer: no socket, the whole dump at once.
		msgs, err := c.Receive()
		if err != nil {
			return err
		}
		_, err = dumpMessages(msgs, req.Header.Sequence, fn)
		return err
	}
	buf := make([]byte, dumpBuffer)
	for {
		var n, flags int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, _, flags, _, rerr = unix.Recvmsg(int(fd), buf, nil, 0)
			return rerr != unix.EAGAIN
		})
		if err = cmp.Or(err, rerr); err != nil {
			return err
		}
		if flags&unix.MSG_TRUNC != 0 {
			return errors.New("dump message larger than the receive buffer")
		}
		msgs, err := parseMessages(buf[:n])
		if err != nil {
			return err
		}
		done, err := dumpMessages(msgs, req.Header.Sequence, fn)
		if done || err != nil {
			return err
		}
	}
}

// parseMessages splits what one read of a netlink socket returned into
// its messages, whose data stays in b.
func parseMessages(b []byte) ([]netlink.Message, error) {
	var msgs []netlink.Message
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, errors.New("malformed netlink message")
		}
		msgs = append(msgs, netlink.Message{
			Header: netlink.Header{
				Length:   uint32(l),
				Type:     netlink.HeaderType(binary.NativeEndian.Uint16(b[4:])),
				Flags:    netlink.HeaderFlags(binary.NativeEndian.Uint16(b[6:])),
				Sequence: binary.NativeEndian.Uint32(b[8:]),
				PID:      binary.NativeEndian.Uint32(b[12:]),
			},
			Data: b[unix.NLMSG_HDRLEN:l],
		})
		b = b[min(nlAlign(l), len(b)):]
	}
	return msgs, nil
}

func nlAlign(n int) int { return (n + 3) &^ 3 }

// dumpMessages passes the elements of the dump messages in msgs (the
// replies to request seq) to fn and reports whether the dump is done.
func dumpMessages(msgs []netlink.Message, seq uint32, fn func(key []byte, expires int64)) (done bool, err error) {
	for _, m := range msgs {
		if m.Header.Sequence != seq {
			continue // a late reply to an earlier request
		}
		switch m.Header.Type {
		case netlink.Done:
			return true, nil
		case netlink.Error:
			if len(m.Data) < 4 {
				return true, errors.New("short netlink error message")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				return true, unix.Errno(-code)
			}
			return true, nil
		}
		if len(m.Data) < 4 {
			continue
		}
		if !dumpElements(m.Data[4:], fn) {
			return true, errors.New("malformed set element dump")
		}
	}
	return false, nil
}

// dumpElements passes the elements of a NEWSETELEM message's attributes to
// fn; false if they are malformed.
func dumpElements(b []byte, fn func(key []byte, expires int64)) bool {
	// NFTA_SET_ELEM_LIST_*; the elements' list holds NFTA_LIST_ELEMs.
	lists := attrs{rest: b}
	for lists.next() {
		if lists.typ != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		elems := attrs{rest: lists.data}
		for elems.next() {
			if elems.typ != unix.NFTA_LIST_ELEM {
				continue
			}
			var key []byte
			var timeout, expires uint64
			el := attrs{rest: elems.data}
			for el.next() {
				switch {
				case el.typ == unix.NFTA_SET_ELEM_KEY:
					k := attrs{rest: el.data}
					for k.next() {
						if k.typ == unix.NFTA_DATA_VALUE {
							key = k.data
						}
					}
					if k.bad {
						return false
					}
				case el.typ == unix.NFTA_SET_ELEM_TIMEOUT && len(el.data) == 8:
					timeout = binary.BigEndian.Uint64(el.data)
				case el.typ == unix.NFTA_SET_ELEM_EXPIRATION && len(el.data) == 8:
					expires = binary.BigEndian.Uint64(el.data)
				}
			}
			if el.bad {
				return false
			}
			if key == nil {
				continue
			}
			// Like nft: an element with a timeout expires; the
			// others (timeout and expiry 0) never do.
			if timeout > 0 && expires == 0 {
				expires = 1 // due now
			}
			fn(key, int64(expires))
		}
		if elems.bad {
			return false
		}
	}
	return !lists.bad
}

// attrs walks the netlink attributes in rest: after each next that
// reports true, typ (without the nested and byte-order flags) and data
// are one attribute. It stops at a malformed one, and says so in bad. A
// plain loop: the iterator functions of a range allocated per element.
type attrs struct {
	rest []byte
	typ  uint16
	data []byte
	bad  bool // stopped at a malformed attribute
}

func (a *attrs) next() bool {
	if len(a.rest) == 0 {
		return false
	}
	l := 0
	if len(a.rest) >= unix.NLA_HDRLEN {
		l = int(binary.NativeEndian.Uint16(a.rest))
	}
	if l < unix.NLA_HDRLEN || l > len(a.rest) {
		a.bad = true
		return false
	}
	a.typ = binary.NativeEndian.Uint16(a.rest[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
	a.data = a.rest[unix.NLA_HDRLEN:l]
	a.rest = a.rest[min(nlAlign(l), len(a.rest)):]
	return true
}
