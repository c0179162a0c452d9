package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/fsnotify/fsnotify"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// engineCgroups returns the cgroups of firewall.engine_cgroups that exist
// now, when the ruleset uses them (the host not filtered) and the kernel
// can match them; see enginesProblem for why it returns none.
func engineCgroups(cfg *config.Config) []rules.Cgroup {
	cgs, err := presentEngines(cfg)
	if err != nil || len(cgs) == 0 || firewall.ProbeCgroup(cgs[0]) != nil {
		return nil
	}
	return cgs
}

// presentEngines resolves the firewall.engine_cgroups that exist, when
// the host is not filtered.
func presentEngines(cfg *config.Config) ([]rules.Cgroup, error) {
	if cfg.Firewall.Host || len(cfg.Firewall.EngineCgroups) == 0 {
		return nil, nil
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	var out []rules.Cgroup
	for _, e := range cfg.Firewall.EngineCgroups {
		rel, err := config.EngineCgroupPath(e)
		if err != nil {
			return nil, err // validated already
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(mnt, rel), &st) != nil {
			continue // not running: its rule is added when it appears
		}
		out = append(out, rules.Cgroup{Path: nftCgroupPath(mnt, rel), Level: uint32(strings.Count(rel, "/")), ID: st.Ino})
	}
	return out, nil
}

// nftCgroupPath is rel as nft names it: below /sys/fs/cgroup, where a
// hybrid hierarchy mounts cgroup2 at /sys/fs/cgroup/unified.
func nftCgroupPath(mnt, rel string) string {
	if sub, ok := strings.CutPrefix(mnt, cgroupRoot); ok && (sub == "" || strings.HasPrefix(sub, "/")) {
		return sub + rel
	}
	return rel
}

// enginesProblem says why the DNS of firewall.engine_cgroups is not
// redirected although the host is not filtered, or "".
func enginesProblem(cfg *config.Config) string {
	cgs, err := presentEngines(cfg)
	switch {
	case err != nil:
		return fmt.Sprintf("firewall.engine_cgroups cannot be matched (%v)", err)
	case len(cgs) == 0:
		return ""
	}
	if err := firewall.ProbeCgroup(cgs[0]); err != nil {
		return fmt.Sprintf("firewall.engine_cgroups cannot be matched: %v", err)
	}
	return ""
}

// reportEngines logs, when it changed, whether container engines' DNS
// from the host's namespace goes through the proxy.
func (d *daemon) reportEngines() {
	cfg := d.config()
	problem := enginesProblem(cfg)
	if problem == d.enginesReported {
		return
	}
	d.enginesReported = problem
	if problem != "" {
		d.log.Error(problem+"; with firewall.host false, container engines' DNS servers resolve any name for containers: set firewall.host true, or have the engine dial its resolvers from the containers' namespace (Docker: \"dns\" in daemon.json)",
			"engine_cgroups", cfg.Firewall.EngineCgroups)
		return
	}
	if !cfg.Firewall.Host && len(cfg.Firewall.EngineCgroups) > 0 {
		d.log.Info("container engines' DNS goes to the proxy", "engine_cgroups", cfg.Firewall.EngineCgroups, "present", len(d.host.Engines))
	}
}

// watchEngines calls changed when a cgroup the ruleset matches is created
// or removed (an engine or a service of a rule started or stopped): its
// rules follow at once, not at the next periodic check.
func watchEngines(ctx context.Context, cfg *config.Config, changed func(), log *slog.Logger) {
	var rels []string
	if !cfg.Firewall.Host {
		for _, e := range cfg.Firewall.EngineCgroups {
			rel, _ := config.EngineCgroupPath(e)
			rels = append(rels, rel)
		}
	}
	rels = append(rels, ruleCgroupPaths(cfg)...)
	if len(rels) == 0 {
		return
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		log.Warn("cannot watch engine cgroups; checked periodically", "err", err)
		return
	}
	defer w.Close()
	var names []string
	for _, rel := range rels {
		dir := filepath.Join(mnt, rel)
		names = append(names, dir)
		if err := w.Add(filepath.Dir(dir)); err != nil && !os.IsNotExist(err) {
			log.Debug("engine cgroup's parent not watched", "dir", filepath.Dir(dir), "err", err)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if slices.Contains(names, ev.Name) {
				changed()
			}
		case <-w.Errors:
		}
	}
}

// Processes that send DNS for containers from the host's namespace: the
// container engines' DNS servers, and rootless engines' network helpers,
// whose containers' traffic is entirely their own sockets.
var (
	engineForwarders = []string{"dockerd", "node-cache"}
	rootlessHelpers  = []string{"slirp4netns", "pasta", "rootlesskit"}
)

// reportUnfilteredEngines logs, once per process, container engines that
// resolve names for containers from the host's namespace while nothing
// filters that: with firewall.host false, a forwarder outside
// firewall.engine_cgroups, and any rootless network helper.
func (d *daemon) reportUnfilteredEngines() {
	cfg := d.config()
	if cfg.Firewall.Host {
		return
	}
	mnt, _ := cgroup2Mount()
	var covered []string
	for _, e := range cfg.Firewall.EngineCgroups {
		if rel, err := config.EngineCgroupPath(e); err == nil {
			covered = append(covered, rel)
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		comm, err := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
		if err != nil {
			continue
		}
		name := strings.TrimSpace(string(comm))
		forwarder, helper := slices.Contains(engineForwarders, name), slices.Contains(rootlessHelpers, name)
		if !forwarder && !helper {
			continue
		}
		cg := procCgroup(p.Name())
		key := "engine " + name + " " + cg
		if d.enginesSeen[key] {
			continue
		}
		switch {
		case helper:
			d.enginesSeen[key] = true
			d.log.Warn("a rootless network helper runs: its containers' traffic leaves as the host's own, which firewall.host false leaves unfiltered; set firewall.host true to filter it",
				"process", name, "pid", p.Name())
		case mnt != "" && !slices.ContainsFunc(covered, func(c string) bool { return cg == c || strings.HasPrefix(cg, c+"/") }):
			d.enginesSeen[key] = true
			d.log.Warn("a container engine's DNS server runs outside firewall.engine_cgroups: the names it resolves for containers from the host's namespace pass unfiltered; add its cgroup to firewall.engine_cgroups",
				"process", name, "pid", p.Name(), "cgroup", cg)
		}
	}
}

// procCgroup returns the cgroup v2 path of process pid, or "".
func procCgroup(pid string) string {
	data, err := os.ReadFile(filepath.Join("/proc", pid, "cgroup"))
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	return ""
}
