// Command coredns is CoreDNS built for the end-to-end tests: CoreDNS's own
// server (coremain) with the plugins that NodeLocal DNSCache's node-cache
// compiles in for its Corefile (bind, cache, errors, forward, health, loop,
// prometheus, reload, log, debug) and the file and hosts plugins a cluster
// DNS serves a zone with. node-cache itself is built the same way: coremain
// and a list of plugins, not CoreDNS's main with every plugin.
//
// The tests build it with `go build` from this module (test/nodelocal_test.go);
// its requirements come from the Go module proxy like any module's.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/debug"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/file"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() { coremain.Run() }
