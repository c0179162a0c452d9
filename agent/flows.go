package agent

import (
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/egressd/egressd/conntrack"
	"github.com/egressd/egressd/dnsresolve"
)

// ownFlows deletes the conntrack entries of egressd's own upstream UDP
// flows before their sockets close (see package conntrack for why). A
// failure is logged, at most once a minute: the query was answered, but
// its port could be ridden until the entry expires.
type ownFlows struct {
	conn     *conntrack.Conn
	log      *slog.Logger
	lastWarn atomic.Int64 // unix nanoseconds
}

// openFlows returns egressd's flow deleter, or nil, loudly, if ctnetlink
// cannot be opened.
func openFlows(log *slog.Logger) (*ownFlows, dnsresolve.Flows) {
	c, err := conntrack.Open()
	if err != nil {
		log.Warn("cannot delete the conntrack entries of egressd's own upstream queries: until each expires, a host process sending DNS from the same port passes the redirect", "err", err)
		return nil, nil
	}
	f := &ownFlows{conn: c, log: log}
	return f, f
}

func (f *ownFlows) Delete(proto uint8, src, dst netip.AddrPort) error {
	err := f.conn.Delete(proto, src, dst)
	if err != nil {
		now := time.Now().UnixNano()
		if last := f.lastWarn.Load(); now-last > int64(time.Minute) && f.lastWarn.CompareAndSwap(last, now) {
			f.log.Warn("conntrack entry of an upstream query not deleted; a host process sending DNS from its port passes the redirect until it expires", "err", err)
		}
	}
	return err
}

// close closes f's socket; f may be nil.
func (f *ownFlows) close() {
	if f != nil {
		_ = f.conn.Close()
	}
}
