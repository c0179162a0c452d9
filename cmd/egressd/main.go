// Command egressd is a host egress firewall: containers and the host may open
// TCP connections only to addresses its DNS proxy answered for allow-listed
// names.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRootCmd().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "egressd:", err)
		os.Exit(1)
	}
}
