package firewall

import (
	"fmt"

	"github.com/google/nftables"

	"github.com/egressd/egressd/rules"
)

// ProbeCgroup reports whether the kernel accepts a `socket cgroupv2` match
// for cg (Linux >= 5.13), by loading it into a scratch table that the same
// transaction deletes again: nothing is left behind either way.
func ProbeCgroup(cg rules.Cgroup) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: rules.TableName + "_probe_cgroup"}
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{Name: "probe", Table: t})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: rules.Rule{Stmts: []rules.Stmt{cg, rules.Accept}}.Exprs(nil)})
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("kernel does not accept socket cgroupv2 (needs Linux 5.13): %w", err)
	}
	return nil
}
