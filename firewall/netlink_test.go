package firewall

// Root-free tests of what the Firewall sends to the kernel, message by
// message, through a test netlink connection.

import (
	"context"
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/config/configtest"
	"github.com/egressd/egressd/rules"
)

// nlMsg is one nftables message of a transaction, decoded far enough to
// check it: its type and, for set elements, the set, keys and timeouts.
type nlMsg struct {
	typ      int // NFT_MSG_*
	set      string
	keys     []netip.Addr
	timeouts []time.Duration
}

// nlRecorder is a netlink peer that acknowledges every transaction and
// records it; it answers every read as if the table did not exist.
type nlRecorder struct {
	mu    sync.Mutex
	flush [][]nlMsg // one per transaction (sendmsg), batch begin/end left out
}

func (r *nlRecorder) dial(req []netlink.Message) ([]netlink.Message, error) {
	var replies []netlink.Message
	var tx []nlMsg
	batch := false
	for _, m := range req {
		switch m.Header.Type {
		case unix.NFNL_MSG_BATCH_BEGIN:
			batch = true
			continue
		case unix.NFNL_MSG_BATCH_END:
			continue
		}
		if !batch { // a read: nothing there
			errno := make([]byte, 4)
			enoent := -int32(unix.ENOENT)
			binary.NativeEndian.PutUint32(errno, uint32(enoent))
			replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence, PID: m.Header.PID}, Data: errno})
			continue
		}
		tx = append(tx, decodeMsg(m))
		if m.Header.Flags&netlink.Acknowledge != 0 {
			replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence, PID: m.Header.PID}, Data: make([]byte, 4)})
		}
	}
	if batch {
		r.mu.Lock()
		r.flush = append(r.flush, tx)
		r.mu.Unlock()
	}
	return replies, nil
}

func decodeMsg(m netlink.Message) nlMsg {
	out := nlMsg{typ: int(m.Header.Type & 0xff)}
	if out.typ != unix.NFT_MSG_NEWSETELEM && out.typ != unix.NFT_MSG_DELSETELEM {
		return out
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return out
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_SET_ELEM_LIST_SET:
			out.set = ad.String()
		case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					list.Nested(func(el *netlink.AttributeDecoder) error {
						el.ByteOrder = binary.BigEndian
						var timeout time.Duration
						for el.Next() {
							switch el.Type() {
							case unix.NFTA_SET_ELEM_KEY:
								el.Nested(func(k *netlink.AttributeDecoder) error {
									for k.Next() {
										a, _ := netip.AddrFromSlice(k.Bytes())
										out.keys = append(out.keys, a)
									}
									return nil
								})
							case unix.NFTA_SET_ELEM_TIMEOUT:
								timeout = time.Duration(el.Uint64()) * time.Millisecond
							}
						}
						out.timeouts = append(out.timeouts, timeout)
						return nil
					})
				}
				return nil
			})
		}
	}
	return out
}

func (r *nlRecorder) flushes() [][]nlMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.flush)
}

func types(tx []nlMsg) []int {
	var out []int
	for _, m := range tx {
		out = append(out, m.typ)
	}
	return out
}

// newRecordedFirewall returns a Firewall on a recording test connection,
// with the default ruleset installed.
func newRecordedFirewall(t *testing.T) (*Firewall, *nlRecorder) {
	t.Helper()
	r := &nlRecorder{}
	fw, err := newFirewall([]nftables.ConnOption{nftables.WithTestDial(r.dial)})
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Install(context.Background(), rules.Build(configtest.Load(t, "")), nil, nil); err != nil {
		t.Fatal(err)
	}
	return fw, r
}

func TestInstallIsOneTransaction(t *testing.T) {
	_, r := newRecordedFirewall(t)
	f := r.flushes()
	if len(f) != 1 {
		t.Fatalf("install sent %d transactions, want 1", len(f))
	}
	got := types(f[0])
	// The table is replaced in place: add, delete, add, then fill it.
	if !slices.Equal(got[:3], []int{unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWTABLE}) {
		t.Errorf("transaction starts with %v", got[:3])
	}
	for _, typ := range []int{unix.NFT_MSG_NEWSET, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_NEWRULE} {
		if !slices.Contains(got, typ) {
			t.Errorf("no message of type %d in %v", typ, got)
		}
	}
}

// Concurrent answers go to the kernel together, in one transaction.
func TestAllowGroupCommit(t *testing.T) {
	fw, r := newRecordedFirewall(t)
	const n = 20
	fw.sem <- struct{}{} // a transaction is in the kernel
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if err := fw.Allow(context.Background(), "a.", allowRule, []netip.Addr{addr(uint32(i + 1))}, time.Now().Add(time.Minute)); err != nil {
				t.Error(err)
			}
		})
	}
	for queued := 0; queued < n; {
		time.Sleep(time.Millisecond)
		fw.mu.Lock()
		queued = len(fw.queue)
		fw.mu.Unlock()
	}
	fw.release()
	wg.Wait()
	f := r.flushes()[1:]
	if len(f) != 1 {
		t.Fatalf("%d answers sent %d transactions, want 1", n, len(f))
	}
	if len(f[0]) != 1 || f[0][0].typ != unix.NFT_MSG_NEWSETELEM || len(f[0][0].keys) != n {
		t.Errorf("transaction %v, want one NEWSETELEM of %d elements", types(f[0]), n)
	}
}

// A fresh address is added; a known one whose life is extended is
// replaced (add, delete, add) with the new timeout, so that the kernel's
// expiry moves whatever its version.
func TestAllowExtensionReplaces(t *testing.T) {
	fw, r := newRecordedFirewall(t)
	now := time.Unix(1_000_000, 0)
	fw.now = func() time.Time { return now }
	a4, a6 := addr(1), netip.MustParseAddr("2001:db8::1")
	ctx := context.Background()
	if err := fw.Allow(ctx, "a.", allowRule, []netip.Addr{a4, a6}, now.Add(8*time.Second)); err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Second)
	if err := fw.Allow(ctx, "a.", allowRule, []netip.Addr{a4, a6}, now.Add(8*time.Second)); err != nil {
		t.Fatal(err)
	}
	f := r.flushes()[1:]
	if len(f) != 2 {
		t.Fatalf("%d transactions, want 2", len(f))
	}
	add, ext := f[0], f[1]
	if got := types(add); !slices.Equal(got, []int{unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_NEWSETELEM}) {
		t.Errorf("fresh answer sent %v, want one add per set", got)
	}
	want := []int{unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM, unix.NFT_MSG_NEWSETELEM}
	if got := types(ext); !slices.Equal(got, slices.Concat(want, want)) {
		t.Fatalf("extension sent %v, want add, delete, add per set", got)
	}
	for _, m := range ext {
		if len(m.keys) != 1 || (m.set == rules.LearnedSet(config.RuleAllow, addr(1))) != (m.keys[0] == a4) {
			t.Errorf("%+v: wrong set or keys", m)
		}
		// 8 s asked plus an eighth of headroom.
		if m.typ == unix.NFT_MSG_NEWSETELEM && m.timeouts[0] != 9*time.Second {
			t.Errorf("%+v: timeout %v, want 9s", m, m.timeouts[0])
		}
	}
}

// Many elements are split into messages that each fit a netlink
// attribute, in one transaction.
func TestLargeElementListsAreSplit(t *testing.T) {
	fw, r := newRecordedFirewall(t)
	var addrs []netip.Addr
	for i := range uint32(2500) {
		addrs = append(addrs, addr(i+1))
	}
	if err := fw.Allow(context.Background(), "many.", allowRule, addrs, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	f := r.flushes()[1:]
	if len(f) != 1 {
		t.Fatalf("%d transactions, want 1", len(f))
	}
	var sizes []int
	for _, m := range f[0] {
		sizes = append(sizes, len(m.keys))
	}
	if !slices.Equal(sizes, []int{1000, 1000, 500}) {
		t.Errorf("messages of %v elements, want 1000, 1000, 500", sizes)
	}
}
