// Package rules holds egressd's ruleset: a typed model built from the
// configuration (Build, BuildFor), rendered two ways from the same values:
// as nft text (Ruleset.Text, for `egressd print`) and as the netlink
// messages of one transaction (Ruleset.AddTo), and compared with what the
// kernel holds (Ruleset.Drift). Because both renderings walk the same
// statements, the dry run cannot disagree with what is installed. It also
// names the learned-address sets (LearnedSet). What talks to the kernel
// over time, the learned addresses, the audit and the event watcher, is
// package firewall.
package rules

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/ifname"
)

// TableName is the one nftables table egressd owns (family inet).
const TableName = "egressd"

// SetPorts is the set of allow.ports, the ports of the rule "allow".
const SetPorts = "ports"

// Ruleset is the whole content of table inet egressd.
type Ruleset struct {
	Sets   []Set
	Chains []Chain
}

// SetType is the key type of a set.
type SetType int

// Set key types.
const (
	IPv4Addr SetType = iota
	IPv6Addr
	InetService
)

// Set is a named set. Learned-address sets have Timeout; their elements
// are not part of the model but of the Firewall's state.
type Set struct {
	Name    string
	Comment string
	Type    SetType
	Timeout bool
	Rule    string   // of a learned-address set: the rule whose addresses it holds
	Ports   []uint16 // constant elements of an InetService set
}

// Hook makes a chain a base chain.
type Hook struct {
	Type     string // "filter" or "nat"
	Hook     string // "prerouting", "input", "forward", "output"
	Priority int
}

// Chain is a base chain (Hook set) or a regular chain.
type Chain struct {
	Name    string
	Comment string
	Hook    *Hook
	Rules   []Rule
}

// Rule is a list of statements; the last one is normally a verdict.
type Rule struct {
	Comment string
	Stmts   []Stmt
}

// Stmt is one statement of a rule: it renders itself as nft text and as
// the netlink expressions nft would generate for that text.
type Stmt interface {
	text() string
	exprs(sets map[string]*nftables.Set) []expr.Any
}

// Text renders the statements of r as nft prints them.
func (r Rule) Text() string {
	parts := make([]string, len(r.Stmts))
	for i, s := range r.Stmts {
		parts[i] = s.text()
	}
	return strings.Join(parts, " ")
}

// IfName matches the input (or output) interface name; a trailing "*"
// matches a prefix.
type IfName struct {
	Out     bool
	Pattern ifname.Pattern
}

func (s IfName) text() string {
	if s.Out {
		return fmt.Sprintf("oifname %q", s.Pattern)
	}
	return fmt.Sprintf("iifname %q", s.Pattern)
}

func (s IfName) exprs(map[string]*nftables.Set) []expr.Any {
	key := expr.MetaKeyIIFNAME
	if s.Out {
		key = expr.MetaKeyOIFNAME
	}
	var data []byte
	if prefix, ok := s.Pattern.Prefix(); ok {
		data = []byte(prefix)
	} else {
		// Exact names are compared NUL-padded to IFNAMSIZ, as nft does.
		data = make([]byte, unix.IFNAMSIZ)
		copy(data, s.Pattern)
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data},
	}
}

// Established matches packets of known connections.
type Established struct{}

func (Established) text() string { return "ct state established,related" }

func (Established) exprs(map[string]*nftables.Set) []expr.Any {
	return ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
}

// New matches the first packet of a connection.
type New struct{}

func (New) text() string { return "ct state new" }

func (New) exprs(map[string]*nftables.Set) []expr.Any { return ctState(expr.CtStateBitNEW) }

// ctState matches any of the conntrack states in bits, as nft compiles it.
func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// Mark matches the packet mark exactly.
type Mark uint32

func (s Mark) text() string { return fmt.Sprintf("meta mark 0x%08x", uint32(s)) }

func (s Mark) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(uint32(s))},
	}
}

// Cgroup matches packets of sockets created by processes in one cgroup v2
// (or below it). Unlike a mark, which any process with CAP_NET_ADMIN or
// CAP_NET_RAW may set on its sockets, moving into another service's cgroup
// takes write access to the cgroup tree. The kernel compares the cgroup's
// id, its inode number on cgroup2fs, which nft looks up from Path at load
// time; netlink carries the id.
type Cgroup struct {
	Path  string // relative to the cgroup2 mount, "/system.slice/egressd.service"
	Level uint32 // its depth: 2 for that path
	ID    uint64
}

func (s Cgroup) text() string { return fmt.Sprintf("socket cgroupv2 level %d %q", s.Level, s.Path) }

func (s Cgroup) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Socket{Key: expr.SocketKeyCgroupv2, Level: s.Level, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint64(s.ID)},
	}
}

// Proto is a transport protocol.
type Proto uint8

// Transport protocols.
const (
	TCP    Proto = unix.IPPROTO_TCP
	UDP    Proto = unix.IPPROTO_UDP
	ICMPv6 Proto = unix.IPPROTO_ICMPV6
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMPv6:
		return "icmpv6"
	}
	return fmt.Sprint(uint8(p))
}

func (p Proto) match() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(p)}},
	}
}

// L4Proto matches the transport protocol alone.
type L4Proto Proto

func (s L4Proto) text() string { return "meta l4proto " + Proto(s).String() }

func (s L4Proto) exprs(map[string]*nftables.Set) []expr.Any { return Proto(s).match() }

// Ports matches TCP or UDP ports: a source port, a destination port, or the
// destination port in a named set. Zero values are not matched.
type Ports struct {
	Proto    Proto
	Sport    uint16
	Dport    uint16
	DportSet string
}

func (s Ports) text() string {
	var parts []string
	if s.Sport != 0 {
		parts = append(parts, fmt.Sprintf("%s sport %d", s.Proto, s.Sport))
	}
	if s.Dport != 0 {
		parts = append(parts, fmt.Sprintf("%s dport %d", s.Proto, s.Dport))
	}
	if s.DportSet != "" {
		parts = append(parts, fmt.Sprintf("%s dport @%s", s.Proto, s.DportSet))
	}
	return strings.Join(parts, " ")
}

func (s Ports) exprs(sets map[string]*nftables.Set) []expr.Any {
	e := s.Proto.match()
	load := func(offset uint32) {
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2})
	}
	switch {
	case s.Sport != 0 && s.Dport != 0:
		// nft merges the two adjacent matches into one 4-byte comparison.
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint32(uint32(s.Sport)<<16 | uint32(s.Dport))})
	case s.Sport != 0:
		load(0)
		e = append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(s.Sport)})
	case s.Dport != 0:
		load(2)
		e = append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(s.Dport)})
	}
	if s.DportSet != "" {
		load(2)
		e = append(e, lookup(sets, s.DportSet))
	}
	return e
}

// DportRange matches a TCP or UDP destination port range, inclusive, the
// way nft compiles "tcp dport 1000-2000": two comparisons.
type DportRange struct {
	Proto  Proto
	Lo, Hi uint16
}

func (s DportRange) text() string { return fmt.Sprintf("%s dport %d-%d", s.Proto, s.Lo, s.Hi) }

func (s DportRange) exprs(map[string]*nftables.Set) []expr.Any {
	return append(s.Proto.match(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: binaryutil.BigEndian.PutUint16(s.Lo)},
		&expr.Cmp{Op: expr.CmpOpLte, Register: 1, Data: binaryutil.BigEndian.PutUint16(s.Hi)})
}

// ICMPv6Type matches one ICMPv6 message type.
type ICMPv6Type struct {
	Name string
	Type uint8
}

func (s ICMPv6Type) text() string { return "icmpv6 type " + s.Name }

func (s ICMPv6Type) exprs(map[string]*nftables.Set) []expr.Any {
	return append(ICMPv6.match(),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{s.Type}})
}

// DaddrSet matches the destination address against a named address set.
type DaddrSet struct {
	V6  bool
	Set string
}

func (s DaddrSet) text() string {
	if s.V6 {
		return "ip6 daddr @" + s.Set
	}
	return "ip daddr @" + s.Set
}

func (s DaddrSet) exprs(sets map[string]*nftables.Set) []expr.Any {
	return append(daddr(s.V6), lookup(sets, s.Set))
}

// DaddrPrefix matches the destination address against one prefix.
type DaddrPrefix netip.Prefix

func (s DaddrPrefix) text() string {
	p := netip.Prefix(s)
	family := "ip"
	if p.Addr().Is6() {
		family = "ip6"
	}
	if p.IsSingleIP() {
		return fmt.Sprintf("%s daddr %s", family, p.Addr())
	}
	return fmt.Sprintf("%s daddr %s", family, p)
}

func (s DaddrPrefix) exprs(map[string]*nftables.Set) []expr.Any {
	p := netip.Prefix(s)
	return prefixMatch(daddr(p.Addr().Is6()), p)
}

// prefixMatch completes e, which loads a whole address into register 1,
// with the comparison against p, as nft compiles it: a prefix on a byte
// boundary loads only its bytes, any other is masked.
func prefixMatch(e []expr.Any, p netip.Prefix) []expr.Any {
	addr := p.Addr().AsSlice()
	switch {
	case p.IsSingleIP():
	case p.Bits() > 0 && p.Bits()%8 == 0:
		load := *e[len(e)-1].(*expr.Payload)
		load.Len = uint32(p.Bits() / 8)
		e[len(e)-1] = &load
		addr = addr[:load.Len]
	default:
		e = append(e, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(addr)),
			Mask: netipMask(p), Xor: make([]byte, len(addr))})
	}
	return append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr})
}

func netipMask(p netip.Prefix) []byte {
	mask := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return mask
}

// SaddrPrefix matches the source address against one prefix.
type SaddrPrefix netip.Prefix

func (s SaddrPrefix) text() string {
	p := netip.Prefix(s)
	family := "ip"
	if p.Addr().Is6() {
		family = "ip6"
	}
	if p.IsSingleIP() {
		return fmt.Sprintf("%s saddr %s", family, p.Addr())
	}
	return fmt.Sprintf("%s saddr %s", family, p)
}

func (s SaddrPrefix) exprs(map[string]*nftables.Set) []expr.Any {
	p := netip.Prefix(s)
	proto, offset := byte(unix.NFPROTO_IPV4), uint32(12)
	if p.Addr().Is6() {
		proto, offset = unix.NFPROTO_IPV6, 8
	}
	return prefixMatch([]expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(len(p.Addr().AsSlice()))},
	}, p)
}

// SourceNotRouted matches packets whose source address is not routed back
// through the interface they came in on (strict reverse-path check): a
// forged source. Valid in prerouting and input only.
type SourceNotRouted struct{}

func (SourceNotRouted) text() string { return "fib saddr . iif oif missing" }

func (SourceNotRouted) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagSADDR: true, FlagIIF: true, ResultOIF: true, FlagPRESENT: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// daddr loads the destination address of the given family into register 1.
func daddr(v6 bool) []expr.Any {
	proto, offset, length := byte(unix.NFPROTO_IPV4), uint32(16), uint32(4)
	if v6 {
		proto, offset, length = unix.NFPROTO_IPV6, 24, 16
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: length},
	}
}

func lookup(sets map[string]*nftables.Set, name string) expr.Any {
	s, ok := sets[name]
	if !ok {
		// The ruleset is built by Build, which always declares its sets.
		panic("rules: lookup of undeclared set " + name)
	}
	return &expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID}
}

// Verdict ends rule evaluation.
type Verdict struct {
	Kind  expr.VerdictKind
	Chain string // for jumps
}

// Verdicts.
var (
	Accept = Verdict{Kind: expr.VerdictAccept}
	Drop   = Verdict{Kind: expr.VerdictDrop}
	Return = Verdict{Kind: expr.VerdictReturn}
)

// Jump returns a jump to chain.
func Jump(chain string) Verdict { return Verdict{Kind: expr.VerdictJump, Chain: chain} }

func (v Verdict) text() string {
	switch v.Kind {
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictJump:
		return "jump " + v.Chain
	}
	return fmt.Sprintf("verdict %d", v.Kind)
}

func (v Verdict) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: v.Kind, Chain: v.Chain}}
}

// RejectTCP answers with a TCP reset; the rule must match TCP.
type RejectTCP struct{}

func (RejectTCP) text() string { return "reject with tcp reset" }

func (RejectTCP) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}}
}

// RejectAdmin answers with ICMP / ICMPv6 "administratively prohibited".
type RejectAdmin struct{}

func (RejectAdmin) text() string { return "reject with icmpx admin-prohibited" }

func (RejectAdmin) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}}
}

// Redirect sends the packet to a local port.
type Redirect uint16

func (s Redirect) text() string { return fmt.Sprintf("redirect to :%d", uint16(s)) }

func (s Redirect) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(uint16(s))},
		&expr.Redir{RegisterProtoMin: 1},
	}
}

// DNAT sends IPv4 (or IPv6) packets to one address and port; in an inet
// table it leaves packets of the other family alone, so a rule per family
// follows the other. Unlike Redirect, whose address is the primary one of
// the interface the packet came in on (and which drops the packet when
// that interface has none, as Calico's and Cilium's pod veths have not),
// it works whatever addresses the incoming interface has.
type DNAT netip.AddrPort

func (s DNAT) text() string {
	ap := netip.AddrPort(s)
	if ap.Addr().Is4() {
		return fmt.Sprintf("dnat ip to %s", ap)
	}
	return fmt.Sprintf("dnat ip6 to %s", ap)
}

func (s DNAT) exprs(map[string]*nftables.Set) []expr.Any {
	ap := netip.AddrPort(s)
	family := uint32(unix.NFPROTO_IPV4)
	if ap.Addr().Is6() {
		family = unix.NFPROTO_IPV6
	}
	// As nft compiles it: address in register 1, port in register 2, and
	// the "port given" flag.
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: ap.Addr().AsSlice()},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(ap.Port())},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: family, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}
}

// LocalDaddr matches packets to an address of the host itself. In the
// output hook it also matches DNS that the nat output chain redirected to
// the proxy: the hook still reports the original output interface then, so
// `oifname "lo"` would not.
type LocalDaddr struct{}

func (LocalDaddr) text() string { return "fib daddr type local" }

func (LocalDaddr) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	}
}

// Log sends the packet to userspace through NFLOG group Group, with
// Prefix; egressd reads the group to report blocked connections.
type Log struct {
	Prefix string
	Group  uint16
}

func (s Log) text() string { return fmt.Sprintf("log prefix %q group %d", s.Prefix, s.Group) }

func (s Log) exprs(map[string]*nftables.Set) []expr.Any {
	return []expr.Any{&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: s.Group, Data: []byte(s.Prefix)}}
}

// NFLOG prefixes of blocked packets.
const (
	LogBlocked = "egressd-blocked"
	LogDoT     = "egressd-dot"
	LogSpoofed = "egressd-spoofed"
	// LogAudit starts the prefix of a packet that enforce mode would have
	// blocked and audit mode let through: "egressd-audit-blocked",
	// "egressd-audit-dot", "egressd-audit-spoofed".
	LogAudit = "egressd-audit-"
)
