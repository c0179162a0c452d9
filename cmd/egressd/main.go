// Command egressd is a host egress firewall: containers and the host may open
// TCP connections only to addresses its DNS proxy answered for allow-listed
// names.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/egressd/egressd/agent"
)

// exitPinnedPending is apply's exit status when the ruleset is installed
// (closed) but pinned names could not be opened yet (README, Exit status).
const exitPinnedPending = 3

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// EGRESSD_CPUPROFILE=FILE writes a CPU profile (go tool pprof) of the
	// whole run: how the performance work is guided.
	if path := os.Getenv("EGRESSD_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "egressd: cpu profile:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	err := newRootCmd().ExecuteContext(ctx)
	// EGRESSD_MEMPROFILE=FILE writes a heap profile at exit.
	if path := os.Getenv("EGRESSD_MEMPROFILE"); path != "" {
		if f, ferr := os.Create(path); ferr == nil {
			_ = pprof.WriteHeapProfile(f)
			f.Close()
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "egressd:", err)
		pprof.StopCPUProfile()
		if errors.Is(err, agent.ErrPinnedPending) {
			os.Exit(exitPinnedPending)
		}
		os.Exit(1)
	}
}
