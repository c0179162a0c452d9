package agent

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/egressd/egressd/firewall"
	"github.com/egressd/egressd/rules"
)

// cgroupRoot is where nft looks up `socket cgroupv2` paths.
const cgroupRoot = "/sys/fs/cgroup"

// ownCgroup returns egressd's cgroup if egressd is alone in it (as in
// egressd.service) and the kernel can match it; the ruleset then
// recognises egressd's own queries by it. Otherwise it says why and
// returns nil: the ruleset falls back to the firewall mark, which any
// process with CAP_NET_ADMIN (or CAP_NET_RAW on Linux >= 5.17) can copy.
func ownCgroup(log *slog.Logger) *rules.Cgroup {
	cg, err := findOwnCgroup()
	if err == nil {
		err = firewall.ProbeCgroup(*cg)
	}
	if err != nil {
		log.Warn("egressd's own DNS queries are recognised by the firewall mark, which other privileged processes can set too; run egressd as egressd.service (its own cgroup) on Linux >= 5.13 to close that",
			"reason", err)
		return nil
	}
	log.Info("egressd's own DNS queries are recognised by its cgroup", "cgroup", cg.Path)
	return cg
}

// findOwnCgroup reads egressd's cgroup v2 from /proc/self/cgroup and checks
// that no other process shares it: a user session or the root cgroup would
// exempt every process in it.
func findOwnCgroup() (*rules.Cgroup, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	var rel string
	for line := range strings.SplitSeq(string(data), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			rel = p
		}
	}
	if rel == "" {
		return nil, errors.New("no cgroup v2 in /proc/self/cgroup")
	}
	if rel == "/" {
		return nil, errors.New("egressd runs in the root cgroup, which every process shares")
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(mnt, rel)
	procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	self := strconv.Itoa(os.Getpid())
	for _, p := range strings.Fields(string(procs)) {
		if p != self {
			return nil, fmt.Errorf("cgroup %s is shared with process %s", rel, p)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return nil, err
	}
	return &rules.Cgroup{Path: nftCgroupPath(mnt, rel), Level: uint32(strings.Count(rel, "/")), ID: st.Ino}, nil
}

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted, from its
// root.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, fs := strings.Fields(pre), strings.Fields(post)
		if ok && len(fields) >= 5 && len(fs) > 0 && fs[0] == "cgroup2" && fields[3] == "/" {
			return fields[4], nil
		}
	}
	return "", errors.New("cgroup v2 is not mounted")
}
