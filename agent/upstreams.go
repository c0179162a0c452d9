package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/rules"
)

// upstreams returns the configured upstreams, or the host's resolvers from
// dns.resolv_conf without loopback addresses (they would loop back into
// egressd: systemd-resolved's 127.0.0.53 stub is why its own list,
// /run/systemd/resolve/resolv.conf, is read too). Its error says why none
// can be used; it is not fatal: the firewall goes in closed either way.
func upstreams(cfg *config.Config) ([]netip.AddrPort, error) {
	if len(cfg.DNS.UpstreamAddrs) > 0 {
		return cfg.DNS.UpstreamAddrs, nil
	}
	var tried []string
	for _, path := range cfg.DNS.ResolvConf {
		cc, err := dns.ClientConfigFromFile(path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				tried = append(tried, path+": does not exist")
				continue
			}
			tried = append(tried, fmt.Sprintf("%s: %v", path, err))
			continue
		}
		var out []netip.AddrPort
		for _, s := range cc.Servers {
			if ap, err := config.ParseUpstream(s); err == nil {
				out = append(out, ap)
			}
		}
		if len(out) > 0 {
			return out, nil
		}
		tried = append(tried, path+": no usable (non-loopback) nameserver")
	}
	return nil, fmt.Errorf("dns.upstreams is empty and no usable resolver in dns.resolv_conf (%v)", tried)
}

// resolvPoll is how often the resolv.conf files are checked for changes.
const resolvPoll = time.Second

// watchResolvConf calls changed whenever one of paths appears, disappears
// or is modified (size or mtime), polling: the files are often replaced by
// rename (resolvconf, systemd-resolved), which a poll sees as well as an
// inotify watch would, without watching their directories.
func watchResolvConf(ctx context.Context, paths []string, changed func()) {
	stamp := func() []string {
		var s []string
		for _, p := range paths {
			fi, err := os.Stat(p)
			if err != nil {
				s = append(s, p+" missing")
				continue
			}
			s = append(s, fmt.Sprint(p, fi.Size(), fi.ModTime().UnixNano()))
		}
		return s
	}
	last := stamp()
	t := time.NewTicker(resolvPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if now := stamp(); !slices.Equal(now, last) {
				last = now
				changed()
			}
		}
	}
}

// setWaiting records why no upstream is usable (nil: one is), for status
// and the log.
func (d *daemon) setWaiting(err error) {
	if err == nil {
		d.waiting.Store(nil)
		return
	}
	why := "no usable upstream, answering SERVFAIL: " + err.Error()
	d.waiting.Store(&why)
	d.log.Warn("no usable upstream yet; the firewall is closed and the proxy answers SERVFAIL until dns.resolv_conf names one", "err", err)
}

// rediscover re-reads the host's resolvers after dns.resolv_conf changed.
// A new list is installed (egressd's own queries are exempt towards its
// upstreams only) and given to the proxy; a list that became unusable
// keeps the last usable one.
func (d *daemon) rediscover(ctx context.Context) {
	cfg := d.config()
	ups, err := upstreams(cfg)
	if err != nil {
		if len(d.host.Upstreams) == 0 {
			d.setWaiting(err)
		} else {
			d.log.Warn("resolvers changed but none is usable; keeping the previous ones", "err", err, "upstreams", d.host.Upstreams)
		}
		return
	}
	if slices.Equal(ups, d.host.Upstreams) {
		return
	}
	host := d.host
	host.Upstreams = ups
	if err := d.fw.Install(ctx, rules.BuildFor(cfg, host), nil, nil); err != nil {
		d.log.Error("new upstreams not installed; keeping the previous ones", "err", err)
		return
	}
	d.host = host
	d.setWaiting(nil)
	d.proxy.Update(proxyOptions(cfg, ups, d.fw, d.flows, d.log, d.metrics, d.engines, d.clients))
	d.startPinned(ctx)
	d.log.Info("upstreams changed", "upstreams", ups)
}
