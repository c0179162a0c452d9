package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	nflog "github.com/florianl/go-nflog/v2"
	"golang.org/x/time/rate"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/metrics"
	"github.com/egressd/egressd/rules"
)

// Blocked is one rejected or dropped outbound connection attempt.
type Blocked struct {
	Source    string         `json:"source"`              // "container" or "host"
	Interface string         `json:"interface,omitempty"` // container bridge
	From      netip.Addr     `json:"from"`
	To        netip.AddrPort `json:"to"`
	Proto     string         `json:"proto"`
	Reason    Reason         `json:"reason"`
	// Names that last resolved to To's address, if egressd knows them.
	Names string `json:"names,omitempty"`
	// WouldBlock: audit mode let the packet through; enforce would not.
	WouldBlock bool `json:"would_block,omitempty"`
}

func (b Blocked) String() string {
	src := "host"
	if b.Source == "container" {
		src = fmt.Sprintf("container %s on %s", b.From, b.Interface)
	}
	s := fmt.Sprintf("%s -> %s %s: %s", src, b.Proto, b.To, b.Reason.describe())
	if b.Names != "" {
		s += " (last answered for " + b.Names + ")"
	} else if b.Reason == NotAnswered {
		s += " (no name resolved to it through egressd)"
	}
	return s
}

// watchBlocked reads the NFLOG group of the ruleset's reject rules and
// reports each blocked connection: one log line (rate-limited, so a noisy
// container cannot flood the journal) and a metric. It returns when ctx
// ends.
func watchBlocked(ctx context.Context, group uint16, cfg func() *config.Config, fw *firewall.Firewall, m *metrics.Metrics, log *slog.Logger) {
	nf, err := nflog.Open(&nflog.Config{Group: group, Copymode: nflog.CopyPacket, Bufsize: 128})
	if err != nil {
		log.Warn("blocked connections are not reported", "nflog_group", group, "err", err)
		return
	}
	defer nf.Close()
	limit := rate.NewLimiter(rate.Limit(10), 50)
	suppressed := 0
	hook := func(a nflog.Attribute) int {
		b, ok := parseBlocked(a)
		if !ok {
			return 0
		}
		if b.Reason == NotAnswered {
			// The catch-all reject: say which of the allow rules missed.
			v := verdict(cfg(), fw, b.To.Addr(), b.To.Port(), config.Proto(b.Proto))
			b.Names = v.Names
			if !v.Allowed { // allowed: the configuration changed since
				b.Reason = v.Reason
			}
		}
		msg := "blocked connection"
		if b.WouldBlock {
			msg = "would block connection (audit mode: let through)"
			m.WouldBlock(b.Source, string(b.Reason))
		} else {
			m.Blocked(b.Source, string(b.Reason))
		}
		if !limit.Allow() {
			suppressed++
			return 0
		}
		log.Info(msg, "source", b.Source, "interface", b.Interface, "from", b.From,
			"to", b.To, "proto", b.Proto, "reason", string(b.Reason), "names", b.Names, "would_block", b.WouldBlock, "suppressed_before", suppressed)
		suppressed = 0
		return 0
	}
	errFn := func(err error) int {
		if ctx.Err() == nil {
			log.Debug("nflog", "err", err)
		}
		return 0 // keep reading: an overrun loses reports, not enforcement
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, errFn); err != nil {
		log.Warn("blocked connections are not reported", "err", err)
		return
	}
	<-ctx.Done()
}

// parseBlocked reads the addresses and ports of a logged packet.
func parseBlocked(a nflog.Attribute) (Blocked, bool) {
	if a.Payload == nil || a.Prefix == nil {
		return Blocked{}, false
	}
	b := Blocked{Source: "host"}
	prefix := *a.Prefix
	if rest, ok := strings.CutPrefix(prefix, rules.LogAudit); ok {
		b.WouldBlock = true
		prefix = "egressd-" + rest
	}
	b.Reason = logReason(prefix)
	if a.InDev != nil {
		b.Source = "container"
		if ifc, err := net.InterfaceByIndex(int(*a.InDev)); err == nil {
			b.Interface = ifc.Name
		}
	}
	p := *a.Payload
	if len(p) < 1 {
		return Blocked{}, false
	}
	var proto byte
	var l4 []byte
	var dst netip.Addr
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return Blocked{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		proto = p[9]
		b.From = netip.AddrFrom4([4]byte(p[12:16]))
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		if len(p) >= ihl {
			l4 = p[ihl:]
		}
	case 6:
		if len(p) < 40 {
			return Blocked{}, false
		}
		proto = p[6]
		b.From = netip.AddrFrom16([16]byte(p[8:24]))
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		l4 = p[40:]
	default:
		return Blocked{}, false
	}
	var port uint16
	switch proto {
	case 6:
		b.Proto = "tcp"
	case 17:
		b.Proto = "udp"
	case 1, 58:
		b.Proto = "icmp"
	default:
		b.Proto = fmt.Sprint(proto)
	}
	if (proto == 6 || proto == 17) && len(l4) >= 4 {
		port = binary.BigEndian.Uint16(l4[2:4])
	}
	b.To = netip.AddrPortFrom(dst, port)
	return b, true
}
