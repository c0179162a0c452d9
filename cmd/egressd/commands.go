package main

import (
	"fmt"
	"os"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/egressd/egressd/agent"
	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/rules"
)

// daemonMemoryLimit is the default soft memory limit of `egressd run`.
const daemonMemoryLimit = 48 << 20

func newRootCmd() *cobra.Command {
	var configPath string
	root := &cobra.Command{
		Use:   "egressd",
		Short: "Host egress firewall: containers reach allow-listed names on allowed ports, nothing else",
		Long: `egressd answers DNS for allow-listed names only and lets containers and the
host open TCP connections only to the addresses it answered, on the allowed
ports. It owns one nftables table, inet egressd, and touches nothing else.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVarP(&configPath, "config", "c", "", "YAML config file (default: the embedded default config)")
	load := func() (*config.Config, error) { return config.Load(configPath, os.Environ()) }

	root.AddCommand(
		&cobra.Command{
			Use:   "print",
			Short: "Print the nft ruleset for the config (dry run; changes nothing, needs no root)",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				cfg, err := load()
				if err != nil {
					return err
				}
				_, err = fmt.Fprint(cmd.OutOrStdout(), agent.Planned(cfg).Text())
				return err
			},
		},
		&cobra.Command{
			Use:   "apply",
			Short: "Install the ruleset and open the pinned names (allow.names), then exit",
			Long: `apply replaces table inet egressd in one transaction, keeping learned
addresses that are still valid, then resolves allow.names through the
upstreams and opens their addresses. Applying twice gives the same ruleset.`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				cfg, err := load()
				if err != nil {
					return err
				}
				sum, err := agent.Apply(cmd.Context(), cfg, newLogger(cfg, cmd.ErrOrStderr()))
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), sum)
				return nil
			},
		},
		&cobra.Command{
			Use:   "remove",
			Short: "Delete table inet egressd, opening egress again; other tables are left alone",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				existed, err := agent.Remove(cmd.Context())
				if err != nil {
					return err
				}
				if existed {
					fmt.Fprintf(cmd.OutOrStdout(), "removed table inet %s\n", rules.TableName)
				} else {
					fmt.Fprintf(cmd.OutOrStdout(), "table inet %s was not installed\n", rules.TableName)
				}
				return nil
			},
		},
		&cobra.Command{
			Use:   "run",
			Short: "Run the daemon: install the ruleset and serve the DNS proxy",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				cfg, err := load()
				if err != nil {
					return err
				}
				if os.Getenv("GOMEMLIMIT") == "" {
					// A soft limit keeps the footprint near the live data
					// (about 20 MB with 130 000 learned addresses) instead
					// of twice that; lower limits cost latency in garbage
					// collection (see README, Performance). GOMEMLIMIT
					// overrides it.
					debug.SetMemoryLimit(daemonMemoryLimit)
				}
				return agent.Run(cmd.Context(), configPath, version, cfg, newLogger(cfg, cmd.ErrOrStderr()))
			},
		},
		newManCmd(),
		newStatusCmd(load),
		newExplainCmd(load),
		newListCmd(load),
		&cobra.Command{
			Use:   "version",
			Short: "Print the version",
			Args:  cobra.NoArgs,
			Run: func(cmd *cobra.Command, _ []string) {
				fmt.Fprintln(cmd.OutOrStdout(), "egressd", version)
			},
		},
	)
	return root
}
