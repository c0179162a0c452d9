package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/egressd/egressd/agent"
	"github.com/egressd/egressd/config"
)

// Commands that ask the running daemon over its control socket.

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func client(load func() (*config.Config, error)) (*agent.Client, error) {
	cfg, err := load()
	if err != nil {
		return nil, err
	}
	return agent.NewClient(cfg.Control.Socket), nil
}

func newStatusCmd(load func() (*config.Config, error)) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running daemon's health: ruleset, learned addresses, upstreams, recent errors",
		Long:  "status exits 0 when the daemon is healthy (ruleset in place, an upstream answering), 1 otherwise.",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client(load)
			if err != nil {
				return err
			}
			s, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				err = printJSON(w, s)
			} else {
				health := "healthy"
				if !s.Healthy {
					health = "UNHEALTHY"
				}
				fmt.Fprintf(w, "egressd %s: %s, running since %s\n", s.Version, health, s.Started.Format(time.RFC3339))
				if !s.Enforced {
					fmt.Fprintf(w, "mode:      AUDIT: egress is NOT enforced; what would be blocked is logged and counted (would_block)\n")
				} else {
					fmt.Fprintf(w, "mode:      enforce\n")
				}
				fmt.Fprintf(w, "ruleset:   %s (%d drift repairs)\n", s.Ruleset, s.DriftRepairs)
				fmt.Fprintf(w, "learned:   %d IPv4, %d IPv6 addresses\n", s.LearnedIPv4, s.LearnedIPv6)
				for _, r := range s.Rules {
					fmt.Fprintf(w, "rule:      %s (%s), from %s: %d learned\n", r.Name, r.Origin, r.From, r.Learned)
				}
				if s.NotAnswering != "" {
					fmt.Fprintf(w, "dns:       %s\n", s.NotAnswering)
				}
				if s.StateSave != "" {
					fmt.Fprintf(w, "state:     not saved, %s\n", s.StateSave)
				}
				if a := s.Audit; a != nil {
					result := fmt.Sprintf("%d elements match", a.Elements)
					if a.Error != "" {
						result = "failed: " + a.Error
					} else if len(a.Repaired) > 0 {
						result = fmt.Sprintf("%d elements, repaired %v", a.Elements, a.Repaired)
					}
					fmt.Fprintf(w, "audit:     %s, %s (took %s)\n", a.At.Format(time.TimeOnly), result, a.Took)
				}
				fmt.Fprintf(w, "kernel:    %s\n", s.Kernel)
				for _, u := range s.Upstreams {
					state := "ok"
					if !u.Healthy() {
						state = "failing: " + u.LastError
					}
					fmt.Fprintf(w, "upstream:  %s %s\n", u.Server, state)
				}
				for _, e := range s.LastErrors {
					fmt.Fprintf(w, "recent:    %s\n", e)
				}
			}
			if err == nil && !s.Healthy {
				cmd.SilenceErrors = true
				return fmt.Errorf("unhealthy")
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newExplainCmd(load func() (*config.Config, error)) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "explain NAME|ADDRESS[:PORT]",
		Short: "Say whether a name or destination is allowed, and why",
		Example: `  egressd explain westus.api.cognitive.microsoft.com
  egressd explain 203.0.113.10:443
  egressd explain '[2001:db8::1]:443'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client(load)
			if err != nil {
				return err
			}
			e, err := c.Explain(cmd.Context(), strings.TrimSpace(args[0]))
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), e)
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), e)
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newListCmd(load func() (*config.Config, error)) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the learned addresses, the names that resolved to them, and their remaining lifetime",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client(load)
			if err != nil {
				return err
			}
			l, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				return printJSON(w, l)
			}
			for _, e := range l {
				fmt.Fprintf(w, "%-16s %-40s %8s  %s\n", e.Rule, e.Addr, e.ExpiresIn, strings.Join(e.Names, ", "))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
