package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Static is a destination allowed without DNS (an allow.cidrs entry).
type Static struct {
	Prefix netip.Prefix
	// Proto is ProtoTCP, ProtoUDP or ProtoAny (every transport protocol,
	// ICMP included when AnyPort).
	Proto Proto
	// Ports are the allowed destination ports; empty with AnyPort false:
	// Allow.Ports (the old form "ADDRESS[/LEN]", TCP only).
	Ports   []PortRange
	AnyPort bool
}

// Proto is the protocol of an allow.cidrs entry, or of a connection.
type Proto string

const (
	ProtoTCP Proto = "tcp"
	ProtoUDP Proto = "udp"
	ProtoAny Proto = "any" // allow.cidrs only
)

// PortRange is an inclusive range of ports; Lo == Hi for one port.
type PortRange struct{ Lo, Hi uint16 }

func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// String is the entry in its canonical string form.
func (s Static) String() string {
	out := s.Prefix.String()
	switch {
	case s.AnyPort:
		return out + " " + string(s.Proto) + " any"
	case len(s.Ports) == 0:
		return out // TCP, allow.ports
	}
	ps := make([]string, len(s.Ports))
	for i, p := range s.Ports {
		ps[i] = p.String()
	}
	return out + " " + string(s.Proto) + " " + strings.Join(ps, ",")
}

// Allows reports whether the entry opens proto (ProtoTCP or ProtoUDP)
// port on addr; defaultPorts are allow.ports.
func (s Static) Allows(addr netip.Addr, proto Proto, port uint16, defaultPorts []int) bool {
	if !s.Prefix.Contains(addr) || (s.Proto != ProtoAny && s.Proto != proto) {
		return false
	}
	if s.AnyPort || port == 0 {
		return true
	}
	if len(s.Ports) == 0 {
		return proto == ProtoTCP && slices.Contains(defaultPorts, int(port))
	}
	return slices.ContainsFunc(s.Ports, func(r PortRange) bool { return r.Lo <= port && port <= r.Hi })
}

// cidrsHelp is the shape of an allow.cidrs entry, for error messages.
const cidrsHelp = `"ADDRESS[/LEN] [tcp|udp|any] [PORT,LOW-HIGH,...|any]" or {cidr: ..., protocol: ..., ports: ...}`

// parseStaticEntry parses one allow.cidrs entry: a string, or a map with
// the keys cidr, protocol and ports. The error names the sub-field when
// there is one ("ports: ...").
func parseStaticEntry(raw any) (Static, error) {
	switch v := raw.(type) {
	case string:
		return parseStatic(v)
	case map[string]any:
		return parseStaticMap(v)
	case map[any]any:
		m := map[string]any{}
		for k, val := range v {
			m[fmt.Sprint(k)] = val
		}
		return parseStaticMap(m)
	}
	return Static{}, fmt.Errorf("%v is not %s", raw, cidrsHelp)
}

// parseStatic parses the string form "ADDRESS[/LEN] [PROTO] [PORTS]".
// Without PROTO and PORTS it means TCP to allow.ports (the original
// form); "ADDRESS PORTS" means TCP to PORTS; with PROTO and without PORTS,
// every port of PROTO.
func parseStatic(s string) (Static, error) {
	fields := strings.Fields(s)
	if len(fields) == 0 || len(fields) > 3 {
		return Static{}, fmt.Errorf("%q must be %s", s, cidrsHelp)
	}
	proto, ports := "", ""
	switch len(fields) {
	case 2:
		if isProto(fields[1]) {
			proto = fields[1]
		} else {
			ports = fields[1]
		}
	case 3:
		proto, ports = fields[1], fields[2]
	}
	st, err := buildStatic(fields[0], proto, ports, true)
	if err != nil {
		return Static{}, fmt.Errorf("%q %w", s, err)
	}
	return st, nil
}

func isProto(s string) bool { return slices.Contains([]Proto{ProtoTCP, ProtoUDP, ProtoAny}, Proto(s)) }

// parseStaticMap parses the structured form.
func parseStaticMap(m map[string]any) (Static, error) {
	for k := range m {
		if k != "cidr" && k != "protocol" && k != "ports" {
			return Static{}, fmt.Errorf("%s: unknown key (cidr, protocol, ports)", k)
		}
	}
	cidr, ok := m["cidr"].(string)
	if !ok {
		return Static{}, fmt.Errorf("cidr: %v must be an address or prefix such as 10.244.0.0/16", m["cidr"])
	}
	proto := ""
	if p, present := m["protocol"]; present {
		if proto, ok = p.(string); !ok || !isProto(proto) {
			return Static{}, fmt.Errorf("protocol: %q must be tcp, udp or any", fmt.Sprint(p))
		}
	}
	ports := ""
	switch p := m["ports"].(type) {
	case nil:
	case string:
		ports = p
		if ports == "" {
			return Static{}, errors.New(`ports: "" must list ports or be "any"`)
		}
	case int, int64, uint64, float64:
		ports = fmt.Sprint(p)
	case []any:
		if len(p) == 0 {
			return Static{}, errors.New(`ports: [] must list ports or be "any"`)
		}
		parts := make([]string, len(p))
		for i, x := range p {
			parts[i] = fmt.Sprint(x)
		}
		ports = strings.Join(parts, ",")
	default:
		return Static{}, fmt.Errorf("ports: %v must be a list of ports and ranges or \"any\"", p)
	}
	st, err := buildStatic(cidr, proto, ports, false)
	if err != nil {
		return Static{}, err
	}
	return st, nil
}

// buildStatic checks the parts of an entry. inString: errors describe the
// string form (no sub-field names).
func buildStatic(cidr, proto, ports string, inString bool) (Static, error) {
	field := func(name string) string {
		if inString {
			return ""
		}
		return name + ": "
	}
	// In the string form the caller quotes the whole entry first.
	what := func() string {
		if inString {
			return ""
		}
		return fmt.Sprintf("cidr: %q ", cidr)
	}
	var st Static
	if strings.Contains(cidr, "/") {
		p, err := netip.ParsePrefix(cidr)
		if err != nil {
			return Static{}, fmt.Errorf("%sis not an address or prefix", what())
		}
		if p != p.Masked() {
			return Static{}, fmt.Errorf("%shas host bits set (did you mean %s?)", what(), p.Masked())
		}
		st.Prefix = p
	} else {
		a, err := netip.ParseAddr(cidr)
		if err != nil {
			return Static{}, fmt.Errorf("%sis not an address or prefix", what())
		}
		st.Prefix = netip.PrefixFrom(a, a.BitLen())
	}
	if st.Prefix.Addr().Zone() != "" || st.Prefix.Addr().Is4In6() {
		return Static{}, fmt.Errorf("%smust be a plain IPv4 or IPv6 prefix", what())
	}
	if proto != "" && !isProto(proto) {
		return Static{}, fmt.Errorf("%sprotocol %q must be tcp, udp or any", field("protocol"), proto)
	}
	st.Proto = Proto(proto)
	if st.Proto == "" {
		st.Proto = ProtoTCP
	}
	switch {
	case ports == "any":
		st.AnyPort = true
	case ports == "" && proto != "":
		st.AnyPort = true // a protocol without ports: all of them
	case ports == "":
		// The original form: TCP to allow.ports.
	default:
		for _, ps := range strings.Split(ports, ",") {
			r, err := parsePortRange(strings.TrimSpace(ps))
			if err != nil {
				return Static{}, fmt.Errorf("%s%w", field("ports"), err)
			}
			st.Ports = append(st.Ports, r)
		}
		sort.Slice(st.Ports, func(i, j int) bool { return st.Ports[i].Lo < st.Ports[j].Lo })
		st.Ports = slices.Compact(st.Ports)
	}
	return st, nil
}

func parsePortRange(s string) (PortRange, error) {
	port := func(p string) (uint16, error) {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return 0, fmt.Errorf("port %q is not a TCP or UDP port (1-65535)", p)
		}
		return uint16(n), nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	l, err := port(lo)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{l, l}, nil
	}
	h, err := port(hi)
	if err != nil {
		return PortRange{}, err
	}
	if h <= l {
		return PortRange{}, fmt.Errorf("port range %q must go from low to high", s)
	}
	return PortRange{l, h}, nil
}
