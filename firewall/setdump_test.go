package firewall

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/rules"
)

// dumpElem is one element of a set dump as the kernel sends it; zero
// timeout or expiration: the attribute is left out.
type dumpElem struct {
	key                 []byte
	timeout, expiration uint64
}

const dumpSeq = 7

// elemMsg is a NEWSETELEM dump message holding elems.
func elemMsg(t *testing.T, seq uint32, elems ...dumpElem) netlink.Message {
	t.Helper()
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, rules.TableName)
	ae.String(unix.NFTA_SET_ELEM_LIST_SET, rules.LearnedSet(config.RuleAllow, addr(1)))
	ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(list *netlink.AttributeEncoder) error {
		for _, e := range elems {
			list.Nested(unix.NFTA_LIST_ELEM, func(el *netlink.AttributeEncoder) error {
				el.ByteOrder = binary.BigEndian
				el.Nested(unix.NFTA_SET_ELEM_KEY, func(k *netlink.AttributeEncoder) error {
					k.Bytes(unix.NFTA_DATA_VALUE, e.key)
					return nil
				})
				if e.timeout > 0 {
					el.Uint64(unix.NFTA_SET_ELEM_TIMEOUT, e.timeout)
				}
				if e.expiration > 0 {
					el.Uint64(unix.NFTA_SET_ELEM_EXPIRATION, e.expiration)
				}
				el.Uint32(unix.NFTA_SET_ELEM_FLAGS, 0)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM), Flags: netlink.Multi, Sequence: seq},
		Data:   append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, b...),
	}
}

func errMsg(seq uint32, errno unix.Errno) netlink.Message {
	data := binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno)))
	return netlink.Message{Header: netlink.Header{Type: netlink.Error, Sequence: seq}, Data: data}
}

func doneMsg(seq uint32) netlink.Message {
	return netlink.Message{Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi, Sequence: seq}, Data: make([]byte, 4)}
}

// errMalformed stands for any error about a malformed dump.
var errMalformed = errors.New("malformed")

type gotElem struct {
	addr    netip.Addr
	expires int64
}

func TestDumpMessages(t *testing.T) {
	v4 := []byte{198, 18, 0, 1}
	v6 := netip.MustParseAddr("2001:db8::1").AsSlice()
	a4, a6 := netip.AddrFrom4([4]byte(v4)), netip.MustParseAddr("2001:db8::1")
	tests := []struct {
		name     string
		msgs     func(t *testing.T) []netlink.Message
		want     []gotElem
		wantDone bool
		wantErr  error
	}{
		{name: "elements, not done yet",
			msgs: func(t *testing.T) []netlink.Message {
				return []netlink.Message{elemMsg(t, dumpSeq,
					dumpElem{key: v4, timeout: 60_000, expiration: 59_000},
					dumpElem{key: v6, timeout: 60_000, expiration: 1})}
			},
			want: []gotElem{{a4, 59_000}, {a6, 1}}},
		{name: "no timeout never expires",
			msgs: func(t *testing.T) []netlink.Message {
				return []netlink.Message{elemMsg(t, dumpSeq, dumpElem{key: v4}), doneMsg(dumpSeq)}
			},
			want: []gotElem{{a4, 0}}, wantDone: true},
		{name: "a timeout and no expiration is due now",
			msgs: func(t *testing.T) []netlink.Message {
				return []netlink.Message{elemMsg(t, dumpSeq, dumpElem{key: v4, timeout: 1000}), doneMsg(dumpSeq)}
			},
			want: []gotElem{{a4, 1}}, wantDone: true},
		{name: "replies to another request are skipped",
			msgs: func(t *testing.T) []netlink.Message {
				return []netlink.Message{elemMsg(t, dumpSeq-1, dumpElem{key: v4}), doneMsg(dumpSeq - 1), elemMsg(t, dumpSeq, dumpElem{key: v6, timeout: 5, expiration: 5})}
			},
			want: []gotElem{{a6, 5}}},
		{name: "missing set",
			msgs:     func(*testing.T) []netlink.Message { return []netlink.Message{errMsg(dumpSeq, unix.ENOENT)} },
			wantDone: true, wantErr: unix.ENOENT},
		{name: "empty set",
			msgs:     func(*testing.T) []netlink.Message { return []netlink.Message{doneMsg(dumpSeq)} },
			wantDone: true},
		{name: "malformed attribute",
			msgs: func(t *testing.T) []netlink.Message {
				m := elemMsg(t, dumpSeq, dumpElem{key: v4, timeout: 10, expiration: 10})
				binary.NativeEndian.PutUint16(m.Data[4:], 0xffff) // first attribute longer than the message
				return []netlink.Message{m}
			},
			wantDone: true, wantErr: errMalformed},
		{name: "truncated element",
			msgs: func(t *testing.T) []netlink.Message {
				m := elemMsg(t, dumpSeq, dumpElem{key: v4, timeout: 10, expiration: 10}, dumpElem{key: v6, timeout: 10, expiration: 10})
				m.Data = m.Data[:len(m.Data)-10]
				return []netlink.Message{m}
			},
			wantDone: true, wantErr: errMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []gotElem
			done, err := dumpMessages(tt.msgs(t), dumpSeq, func(key []byte, expires int64) {
				a, ok := netip.AddrFromSlice(key)
				if !ok {
					t.Errorf("key %x", key)
				}
				got = append(got, gotElem{a, expires})
			})
			if done != tt.wantDone || (err == nil) != (tt.wantErr == nil) || (tt.wantErr != errMalformed && !errors.Is(err, tt.wantErr)) {
				t.Errorf("done %v, err %v; want %v, %v", done, err, tt.wantDone, tt.wantErr)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("elements %v, want %v", got, tt.want)
			}
		})
	}
}

// What one read returns, several messages back to back, splits into the
// same messages.
func TestParseMessages(t *testing.T) {
	msgs := []netlink.Message{
		elemMsg(t, dumpSeq, dumpElem{key: []byte{198, 18, 0, 1}, timeout: 3}),
		elemMsg(t, dumpSeq, dumpElem{key: []byte{198, 18, 0, 2}, timeout: 3}, dumpElem{key: []byte{198, 18, 0, 3}}),
		doneMsg(dumpSeq),
	}
	var b []byte
	for _, m := range msgs {
		m.Header.Length = uint32(unix.NLMSG_HDRLEN + len(m.Data))
		mb, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, mb...)
	}
	got, err := parseMessages(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d messages, want %d", len(got), len(msgs))
	}
	for i := range msgs {
		if got[i].Header.Type != msgs[i].Header.Type || got[i].Header.Sequence != dumpSeq || !slices.Equal(got[i].Data, msgs[i].Data) {
			t.Errorf("message %d: %+v, want %+v", i, got[i], msgs[i])
		}
	}
	if _, err := parseMessages(b[:len(b)-2]); err == nil {
		t.Error("a cut message parsed")
	}
}

func TestKernelView(t *testing.T) {
	k := newKernelView(2, 0)
	ip := netip.MustParseAddr
	reads := [][]gotElem{
		{{ip("198.18.0.9"), 9}, {ip("2001:db8::2"), 2}, {ip("198.18.0.1"), 1}, {ip("::ffff:198.18.0.1"), 41}, {ip("198.18.0.5"), 0}},
		// A second read: what it reads again wins.
		{{ip("198.18.0.1"), 100}, {ip("2001:db8::1"), 1}, {ip("198.18.0.1"), 101}},
	}
	for _, r := range reads {
		for _, e := range r {
			k.add(e.addr, e.expires)
		}
		k.sort()
	}
	tests := []struct {
		addr    string
		expires int64
		ok      bool
	}{
		{"198.18.0.1", 101, true},
		{"198.18.0.5", 0, true},
		{"198.18.0.9", 9, true},
		{"::ffff:198.18.0.1", 41, true},
		{"2001:db8::1", 1, true},
		{"2001:db8::2", 2, true},
		{"198.18.0.2", 0, false},
		{"2001:db8::3", 0, false},
		{"0.0.0.0", 0, false},
		{"255.255.255.255", 0, false},
	}
	for _, tt := range tests {
		if e, ok := k.get(ip(tt.addr)); e != tt.expires || ok != tt.ok {
			t.Errorf("get(%s) = %d, %v; want %d, %v", tt.addr, e, ok, tt.expires, tt.ok)
		}
	}
	var all []gotElem
	for a, e := range k.all() {
		all = append(all, gotElem{a, e})
	}
	want := []gotElem{{ip("198.18.0.1"), 101}, {ip("198.18.0.5"), 0}, {ip("198.18.0.9"), 9},
		{ip("::ffff:198.18.0.1"), 41}, {ip("2001:db8::1"), 1}, {ip("2001:db8::2"), 2}}
	if !slices.Equal(all, want) {
		t.Errorf("all = %v\nwant %v", all, want)
	}
}
