package test

// The real container engines in the namespace lab: Docker (dockerd with
// its own containerd), Podman (netavark and aardvark-dns) and containerd
// with the CNI bridge plugin run in the lab's host network namespace and
// in a mount namespace of the lab's own (engines/mountns.sh), never in the
// machine's. Their containers are checked with the Go helpers from the
// containers' own network namespaces (attached under /run/netns) and with
// busybox inside the containers, on hosts with a plain resolv.conf and
// hosts with systemd-resolved's stub, with firewall.host true and false.
//
// Every scenario: an allowed name nobody asked before resolves and
// connects on 443; an unlisted name gets no address and its address stays
// closed; a query to another resolver gets egressd's answer; nothing gets
// past egressd to the host's stub resolver; container names resolve and
// containers reach each other on user networks; a published port is
// reachable from the internet. Also: the engine restarted while egressd
// runs, and container churn (veths, bridges coming and going) that makes
// egressd neither warn nor replace its table.
//
// What they rely on besides firewall.host and the redirects:
//   - dns.engine_zones (default [dns.podman]): egressd forwards a Podman
//     container's dns.podman names to aardvark-dns on the bridge it sits
//     behind;
//   - firewall.engine_cgroups: dockerd's cgroup, whose DNS from the host's
//     namespace (Docker's embedded DNS forwarding to a loopback host
//     resolver, every host resolver from Docker 28 on) is redirected to
//     egressd with firewall.host false. The lab runs dockerd in a cgroup v2
//     of its own, /egressd-lab-<lab>/docker.service.
//
// The engines are skipped when missing (failed under CI=true); each test
// starts its engine once. Everything the lab starts is ended by pid, and
// its cgroups and namespaces removed, when the test ends.

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The lab's engines, their networks and images.
const (
	engineImage     = "egressd-lab/busybox:latest"
	podmanImage     = "localhost/egressd-lab/busybox:latest"
	dockerNet       = "labnet" // a user-defined Docker network
	dockerNetSubnet = "10.210.0.0/24"
	podmanNet       = "plabnet" // a Podman network (DNS on)
	podmanNetSubnet = "10.89.0.0/24"
	podmanGateway   = "10.89.0.1" // where aardvark-dns listens
	cniSubnet       = "10.4.0.0/24"
	echoPort        = "8080" // busybox nc -ll -e cat in a container
	dockerPublished = "8443" // published on the host's uplink
	podmanPublished = "8444"
	unlistedName    = "www.example.com"
	unlistedAddr    = "203.0.113.50" // its address at the upstream
	engineCmdWait   = 90 * time.Second
)

// engineTools lists what each engine test needs, and engineDebs the
// Debian packages that have it.
var (
	engineTools = map[string][]string{
		"docker":     {"dockerd", "containerd", "containerd-shim-runc-v2", "runc", "iptables", "docker-proxy", "nsenter", "unshare", "ss"},
		"podman":     {"podman", "conmon", "runc", "iptables", "nsenter", "unshare", "ss"},
		"containerd": {"containerd", "ctr", "containerd-shim-runc-v2", "runc", "iptables", "nsenter", "unshare", "ss"},
	}
	engineDebs = map[string]string{
		"docker":     "docker.io containerd runc iptables busybox-static",
		"podman":     "podman netavark aardvark-dns conmon runc iptables busybox-static",
		"containerd": "containerd runc containernetworking-plugins iptables busybox-static",
	}
)

// needEngine skips (or, under CI, fails) t when a tool of engine is missing;
// extra are more tools, absolute paths or names looked up in enginePath.
func needEngine(t *testing.T, engine string, extra ...string) {
	t.Helper()
	for _, tool := range append(engineTools[engine], extra...) {
		found := lookTool(tool) != ""
		if strings.HasPrefix(tool, "/") {
			_, err := os.Stat(tool)
			found = err == nil
		}
		if !found {
			need(t, "%s engine test: %s is not installed (apt-get install %s)", engine, tool, engineDebs[engine])
		}
	}
	if _, err := staticBusybox(); err != nil {
		need(t, "%s engine test: %v (apt-get install busybox-static)", engine, err)
	}
}

// enginePath is the PATH of every engine command (Debian's daemons are in
// sbin, which a test's PATH may lack).
const enginePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookTool returns the path of tool in the engines' PATH, or "".
func lookTool(tool string) string {
	for _, d := range filepath.SplitList(enginePath) {
		if fi, err := os.Stat(filepath.Join(d, tool)); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return filepath.Join(d, tool)
		}
	}
	return ""
}

// staticBusybox returns the path of a statically linked busybox: the
// containers' whole root file system.
func staticBusybox() (string, error) {
	p := lookTool("busybox")
	if p == "" {
		return "", errors.New("busybox is not installed")
	}
	f, err := elf.Open(p)
	if err != nil {
		return "", fmt.Errorf("busybox %s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return "", fmt.Errorf("busybox %s is dynamically linked", p)
		}
	}
	return p, nil
}

// dockerClient is Debian's docker client, the one that goes with its
// dockerd (another docker may come first in PATH).
func dockerClient() string {
	if _, err := os.Stat("/usr/bin/docker"); err == nil {
		return "/usr/bin/docker"
	}
	if p := lookTool("docker"); p != "" {
		return p
	}
	return "/usr/bin/docker"
}

// cniPluginDir returns where the CNI plugins are (Debian: /usr/lib/cni).
func cniPluginDir() string {
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
			return d
		}
	}
	return ""
}

// resolvStyle is how the host names its resolvers.
type resolvStyle struct {
	name     string
	resolv   string // /etc/resolv.conf
	resolved string // /run/systemd/resolve/resolv.conf
}

var (
	plainResolv = resolvStyle{"plain resolv.conf", "nameserver " + upstreamDNS + "\n", ""}
	stubResolv  = resolvStyle{"systemd-resolved stub",
		"# systemd-resolved's stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n",
		"nameserver " + upstreamDNS + "\n"}
)

// engineLab runs container engines inside a Lab's host network namespace
// and a mount namespace of its own.
type engineLab struct {
	*Lab
	top        *testing.T // the test that owns the lab (cleanups)
	dir        string
	cg         string // the lab's cgroup, below the root of every hierarchy
	cg2        string // mount point of cgroup v2, "" if none
	holder     *exec.Cmd
	holderDone chan struct{}
	mntNS      string // readlink /proc/<holder>/ns/mnt
	stub       *stubResolver
	seq        int
	attached   map[string]bool
	env        []string // for every engine command
}

// newEngineLab sets up the mount namespace and the host's stub resolver
// (127.0.0.53, systemd-resolved's address, forwarding to the upstream)
// with a plain resolv.conf; everything goes when the test ends.
func newEngineLab(l *Lab) *engineLab {
	t := l.t
	t.Helper()
	e := &engineLab{
		Lab:      l,
		top:      t,
		dir:      filepath.Join(l.Dir, "engines"),
		cg:       "egressd-lab-" + strings.TrimSuffix(l.Host, "-host"),
		attached: map[string]bool{},
		env:      append(os.Environ(), "PATH="+enginePath),
	}
	e.cg2 = cgroup2Mount()
	for _, d := range []string{e.dir, filepath.Join(e.dir, "tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	e.setResolv(plainResolv)
	script, err := filepath.Abs(filepath.Join("engines", "mountns.sh"))
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs last: after every engine's own cleanup.
	t.Cleanup(e.close)
	e.holder = exec.Command("nsenter", "--net=/run/netns/"+l.Host, "unshare", "--mount", "--propagation", "private", "sh", script, e.dir)
	var out syncBuffer
	e.holder.Stdout, e.holder.Stderr = &out, &out
	if err := e.holder.Start(); err != nil {
		t.Fatal(err)
	}
	e.holderDone = make(chan struct{})
	go func() { _ = e.holder.Wait(); close(e.holderDone) }()
	l.waitFor("the lab's mount namespace", 20*time.Second, func() error {
		select {
		case <-e.holderDone:
			t.Fatalf("mountns.sh exited: %s", out.String())
		default:
		}
		_, err := os.Stat(filepath.Join(e.dir, "mountns.ready"))
		return err
	})
	e.mntNS, err = os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", e.holder.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if own, _ := os.Readlink("/proc/self/ns/mnt"); own == e.mntNS {
		t.Fatal("the lab's mount namespace is the machine's")
	}
	e.stub = startStubResolver(l)
	return e
}

// cgroup2Mount returns the mount point of cgroup v2 ("" if none): on hybrid
// hosts /sys/fs/cgroup/unified.
func cgroup2Mount() string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		_, post, ok := strings.Cut(line, " - ")
		f, pre := strings.Fields(post), strings.Fields(line)
		if ok && len(f) > 0 && f[0] == "cgroup2" && len(pre) > 4 {
			return pre[4]
		}
	}
	return ""
}

// cgroupMounts returns the mount points of every cgroup hierarchy.
func cgroupMounts() []string {
	data, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		_, post, ok := strings.Cut(line, " - ")
		f, pre := strings.Fields(post), strings.Fields(line)
		if ok && len(f) > 0 && (f[0] == "cgroup" || f[0] == "cgroup2") && len(pre) > 4 {
			out = append(out, pre[4])
		}
	}
	return out
}

// setResolv writes the host's resolver files; the lab's mount namespace
// has them bound over /etc/resolv.conf and
// /run/systemd/resolve/resolv.conf, and egressd reads the same files
// (dns.resolv_conf). They are rewritten in place: the bind mounts follow.
func (e *engineLab) setResolv(s resolvStyle) {
	e.t.Helper()
	// systemd-resolved's list first: egressd, which watches both, never
	// sees the stub without the list.
	for _, f := range [][2]string{{"resolved.conf", s.resolved}, {"resolv.conf", s.resolv}} {
		if err := os.WriteFile(filepath.Join(e.dir, f[0]), []byte(f[1]), 0o644); err != nil {
			e.t.Fatal(err)
		}
	}
}

// nsCmd is a command in the lab's network and mount namespaces.
func (e *engineLab) nsCmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--target", strconv.Itoa(e.holder.Process.Pid), "--mount", "--net", "--"}, args...)...)
	cmd.Env = e.env
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs a command in the lab's namespaces and returns its combined
// output; stdin, if not empty, is its input.
func (e *engineLab) runIn(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), engineCmdWait)
	defer cancel()
	cmd := e.nsCmd(ctx, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// must runs a command in the lab's namespaces and fails the test if it
// fails; it returns the output, trimmed.
func (e *engineLab) must(args ...string) string {
	e.t.Helper()
	out, err := e.runIn("", args...)
	if err != nil {
		e.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// engineProc is an engine daemon of the lab.
type engineProc struct {
	e     *engineLab
	name  string
	args  []string
	cg    string // cgroup v2 directory to start it in, "" for none
	cmd   *exec.Cmd
	log   *syncBuffer
	done  chan struct{}
	ready func() error
}

// daemon declares an engine daemon; start runs it. cg, if not empty, is a
// cgroup v2 path below the lab's cgroup to run it in.
func (e *engineLab) daemon(name, cg string, ready func() error, args ...string) *engineProc {
	p := &engineProc{e: e, name: name, args: args, ready: ready, log: &syncBuffer{}}
	if cg != "" {
		if e.cg2 == "" {
			need(e.t, "%s: no cgroup v2 hierarchy is mounted", name)
		}
		p.cg = filepath.Join(e.cg2, e.cg, cg)
		if err := os.MkdirAll(p.cg, 0o755); err != nil {
			e.t.Fatal(err)
		}
	}
	e.top.Cleanup(func() {
		if p.running() {
			p.stop()
		}
		if e.top.Failed() {
			e.top.Logf("%s log (last 8 KiB):\n%s", name, tail(p.log.String(), 8<<10))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func (p *engineProc) running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// start starts the daemon (in its cgroup: a shell writes its own pid to
// cgroup.procs and execs the daemon) and waits until it is ready.
func (p *engineProc) start() {
	t := p.e.t
	t.Helper()
	args := p.args
	if p.cg != "" {
		args = append([]string{"sh", "-c", `echo $$ >"$0/cgroup.procs" && exec "$@"`, p.cg}, args...)
	}
	p.cmd = p.e.nsCmd(context.Background(), args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	p.e.waitFor(p.name+" to be ready", 60*time.Second, func() error {
		if !p.running() {
			t.Fatalf("%s exited: %v\n%s", p.name, p.cmd.ProcessState, tail(p.log.String(), 4<<10))
		}
		return p.ready()
	})
}

// stop sends SIGTERM and, after 20 s, SIGKILL.
func (p *engineProc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.e.t.Logf("%s ignored SIGTERM for 20s; killing it", p.name)
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// restart stops and starts the daemon.
func (p *engineProc) restart() {
	p.e.t.Helper()
	p.stop()
	p.start()
}

// close ends every process of the lab (those in its mount namespace and
// those in its cgroups: containers), the mount namespace, the attached
// network namespace names and the cgroups. Runs even when the test failed.
func (e *engineLab) close() {
	t := e.top
	if e.stub != nil {
		e.stub.close()
	}
	if e.holder != nil && e.holder.Process != nil {
		deadline := time.Now().Add(15 * time.Second)
		for {
			pids := e.labProcs()
			if len(pids) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("engine lab: processes left that would not die: %v", pids)
				break
			}
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = e.holder.Process.Kill()
		<-e.holderDone
	}
	for name := range e.attached {
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
	// Cgroups go once their processes have: a few tries.
	var left []string
	for try := 0; try < 50; try++ {
		left = left[:0]
		for _, m := range cgroupMounts() {
			root := filepath.Join(m, e.cg)
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
					left = append(left, dirs[i])
				}
			}
		}
		if len(left) == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("engine lab: cgroups left: %v", left)
	}
}

// labProcs returns the processes of the lab but its holder: those in its
// mount namespace (engines, shims, conmon, aardvark-dns) and those in its
// cgroups (containers, which have mount namespaces of their own).
func (e *engineLab) labProcs() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, d := range entries {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid == e.holder.Process.Pid || pid == os.Getpid() {
			continue
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && ns == e.mntNS {
			out = append(out, pid)
			continue
		}
		cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(cg), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && (parts[2] == "/"+e.cg || strings.HasPrefix(parts[2], "/"+e.cg+"/")) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// attach names the network namespace of process pid (a container's) under
// /run/netns, so that query, dial and listen can use it; an earlier
// namespace of that name is replaced.
func (e *engineLab) attach(short string, pid int) string {
	e.t.Helper()
	name := strings.TrimSuffix(e.Host, "-host") + "-" + short
	if e.attached[name] {
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
	e.sh(fmt.Sprintf("ip netns attach %s %d", name, pid))
	e.attached[name] = true
	return name
}

// fresh returns an allowed name that no client of the lab has asked
// before, and its address.
func (e *engineLab) fresh() (name, addr string) {
	if e.seq >= 250 {
		e.t.Fatal("the lab ran out of fresh names")
	}
	n := e.seq
	e.seq++
	return fmt.Sprintf("race%d.cognitive.microsoft.com", n), fmt.Sprintf("203.0.115.%d", n+1)
}

// egressdConfig writes the engine lab's config: the host's resolv.conf
// files as the engines see them, every engine's bridges as container
// interfaces, firewall.host, and extra lines for the firewall section.
func (e *engineLab) egressdConfig(name string, host bool, extraFirewall ...string) string {
	e.t.Helper()
	cfg := strings.Replace(e.baseConfig(), fmt.Sprintf("  upstreams: [\"%s\"]\n", upstreamDNS),
		fmt.Sprintf("  resolv_conf: [%q, %q]\n", filepath.Join(e.dir, "resolv.conf"), filepath.Join(e.dir, "resolved.conf")), 1)
	fw := fmt.Sprintf("containers: [\"docker0\", \"br-*\", \"podman*\", \"cni*\"]\n  host: %t\n", host)
	for _, x := range extraFirewall {
		fw += "  " + x + "\n"
	}
	cfg = strings.Replace(cfg, "containers: [\"docker0\"]\n", fw, 1)
	if !strings.Contains(cfg, "host: ") || !strings.Contains(cfg, "resolv_conf") {
		e.t.Fatalf("config not rewritten:\n%s", cfg)
	}
	return e.writeConfig(name, cfg)
}

// egressd (re)starts egressd with cfg; a config egressd rejects fails the
// test with egressd's own words.
func (e *engineLab) egressd(cfg string) {
	e.t.Helper()
	if out, err := e.runEgressd("print", "--config", cfg); err != nil {
		e.t.Fatalf("egressd rejects the config: %v\n%s", err, strings.TrimSpace(out))
	}
	if e.Lab.egressd != nil {
		select {
		case err := <-e.egressdDone:
			e.egressdDone <- err
		default:
			e.stopDaemon(syscall.SIGTERM)
		}
	}
	e.withHostMounts() // firewall.engine_cgroups
	e.startDaemon(cfg)
}

// tableHandle returns the handle of table inet egressd: a new one means
// the table was replaced.
func (e *engineLab) tableHandle() string {
	e.t.Helper()
	m := regexp.MustCompile(`table inet egressd \{ # handle (\d+)`).FindStringSubmatch(e.in(e.Host, "nft -a list table inet egressd"))
	if m == nil {
		e.t.Fatal("no handle for table inet egressd")
	}
	return m[1]
}

// unknownWarnings returns egressd's warnings about forwarding interfaces
// that match no firewall.containers pattern, from byte offset from of its
// log on.
func (e *engineLab) unknownWarnings(from int) []string {
	var out []string
	for _, line := range strings.Split(e.egressdLog.String()[from:], "\n") {
		if strings.Contains(line, "matches no firewall.containers pattern") {
			out = append(out, line)
		}
	}
	return out
}

// checkNoUnknownWarnings fails if egressd, over the whole test, warned
// about a forwarding interface that matches no firewall.containers pattern:
// every engine's bridges are listed, and its veths are not forwarders of
// their own.
func (e *engineLab) checkNoUnknownWarnings(t *testing.T) {
	e.sub(t, "no warnings about container interfaces", func(t *testing.T) {
		if w := e.unknownWarnings(0); len(w) > 0 {
			t.Errorf("egressd warned about forwarding interfaces matching no firewall.containers pattern:\n%s", strings.Join(w, "\n"))
		}
	})
}

// checkQuiet watches egressd for a while after container churn: it must
// neither warn about an interface nor replace its table. barrier names a
// container interface whose disappearance egressd logs after the churn's
// link events.
func (e *engineLab) checkQuiet(t *testing.T, from int, handle, barrier string) {
	t.Helper()
	e.waitLog("container interface gone", "interface="+barrier)
	// Unknown interfaces are looked at once links are quiet for 300 ms:
	// watch for a few times that.
	replaced := ""
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end) && replaced == ""; time.Sleep(100 * time.Millisecond) {
		if h := e.tableHandle(); h != handle {
			replaced = h
		}
	}
	if replaced != "" {
		t.Errorf("container churn: table inet egressd was replaced (handle %s, then %s)", handle, replaced)
	}
	if w := e.unknownWarnings(from); len(w) > 0 {
		t.Errorf("container churn: egressd warned about interfaces:\n%s", strings.Join(w, "\n"))
	}
}

// sub runs f as a subtest with the lab's helpers failing the subtest.
func (e *engineLab) sub(t *testing.T, name string, f func(t *testing.T)) bool {
	return t.Run(name, func(t *testing.T) {
		prev := e.Lab.t
		e.Lab.t = t
		defer func() { e.Lab.t = prev }()
		f(t)
	})
}

// stubResolver plays systemd-resolved: 127.0.0.53:53 in the host's
// namespace, forwarding to the upstream from there. It counts what it is
// asked: with egressd in place, nothing may get past it to here.
type stubResolver struct {
	mu      sync.Mutex
	asked   []string
	servers []*dns.Server
}

func startStubResolver(l *Lab) *stubResolver {
	l.t.Helper()
	s := &stubResolver{}
	var pc net.PacketConn
	var ln net.Listener
	err := inNS(l.Host, func() (err error) {
		if pc, err = net.ListenPacket("udp4", "127.0.0.53:53"); err != nil {
			return err
		}
		ln, err = net.Listen("tcp4", "127.0.0.53:53")
		return err
	})
	if err != nil {
		l.t.Fatalf("stub resolver: %v", err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		if len(r.Question) == 1 {
			s.mu.Lock()
			s.asked = append(s.asked, r.Question[0].Name)
			s.mu.Unlock()
		}
		c := &dns.Client{Net: "udp", Timeout: 2 * time.Second}
		var conn *dns.Conn
		err := inNS(l.Host, func() (err error) {
			conn, err = c.Dial(upstreamDNS + ":53")
			return err
		})
		var resp *dns.Msg
		if err == nil {
			resp, _, err = c.ExchangeWithConn(r, conn)
			conn.Close()
		}
		if err != nil {
			resp = new(dns.Msg)
			resp.SetRcode(r, dns.RcodeServerFailure)
		}
		_ = w.WriteMsg(resp)
	})
	// The sockets exist: queries wait in them until the servers read.
	s.servers = []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}}
	for _, srv := range s.servers {
		go func() { _ = srv.ActivateAndServe() }()
	}
	return s
}

func (s *stubResolver) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.asked)
}

func (s *stubResolver) since(n int) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.asked[n:])
}

func (s *stubResolver) close() {
	for _, srv := range s.servers {
		_ = srv.Shutdown()
	}
}

// client is a container as the checks see it.
type client struct {
	what     string // for messages
	ns       string // its network namespace, attached under /run/netns
	resolver string // the first nameserver of its resolv.conf, ip:53
	// embedded is true when resolver is the engine's own (Docker's
	// 127.0.0.11), which passes egressd's answers on: a refusal may reach
	// the client as another failure, never as an address.
	embedded bool
	exec     func(args ...string) (string, error)
}

// inside runs shell command lines in the container, all in one exec (an
// exec costs up to a second), and returns the output of each.
func (c client) inside(cmds ...string) []string {
	var b strings.Builder
	for i, cmd := range cmds {
		fmt.Fprintf(&b, "echo @@%d; %s 2>&1; ", i, cmd)
	}
	out, err := c.exec("sh", "-c", b.String())
	parts := make([]string, len(cmds))
	for i := range cmds {
		_, rest, ok := strings.Cut(out, fmt.Sprintf("@@%d\n", i))
		if !ok {
			parts[i] = fmt.Sprintf("(no output: %v)\n%s", err, out)
			continue
		}
		parts[i], _, _ = strings.Cut(rest, fmt.Sprintf("@@%d\n", i+1))
	}
	return parts
}

// nameserver returns the first nameserver of process pid's resolv.conf.
func nameserver(t *testing.T, pid int) string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/etc/resolv.conf", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "nameserver" {
			return f[1]
		}
	}
	t.Fatalf("container %d: no nameserver in its resolv.conf:\n%s", pid, data)
	return ""
}

// brief is an answer in a few words: its rcode and addresses.
func brief(r *dns.Msg, err error) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("%s %v", dns.RcodeToString[r.Rcode], addrs(r))
}

// checkClient runs the checks every scenario makes from a container: an
// allowed name nobody asked before resolves and connects on 443 (through
// the Go helpers and busybox); an unlisted name gets no address, and its
// address stays closed; another resolver gets egressd's answers.
func (e *engineLab) checkClient(t *testing.T, c client) {
	t.Helper()
	// An allowed name nobody asked before: closed, then answered, then open.
	name, addr := e.fresh()
	if e.inSet(addr) {
		t.Fatalf("%s is already in the allowed set before anyone asked %s", addr, name)
	}
	if err := dial(c.ns, hostPort(addr, 443), shortWait); err == nil {
		t.Errorf("%s: %s:443 connected before anyone asked for %s", c.what, addr, name)
	}
	r, err := query(c.ns, c.resolver, name, dns.TypeA, "udp")
	switch {
	case err != nil:
		t.Errorf("%s: %s A via %s: %v", c.what, name, c.resolver, err)
	case r.Rcode != dns.RcodeSuccess || !slices.Equal(addrs(r), []string{addr}):
		t.Errorf("%s: %s A via %s: %s %v, want NOERROR [%s]", c.what, name, c.resolver, dns.RcodeToString[r.Rcode], addrs(r), addr)
	default:
		if err := dial(c.ns, hostPort(addr, 443), shortWait); err != nil {
			t.Errorf("%s: %s:443 (%s, just answered): %v", c.what, addr, name, err)
		}
	}

	// The same with the container's own resolver library and tools.
	// The unlisted name's address, never answered, stays closed.
	name, addr = e.fresh()
	out := c.inside("nslookup "+name, "echo hi | nc -w 2 "+addr+" 443", "nslookup "+unlistedName,
		"echo hi | nc -w 2 "+unlistedAddr+" 443")
	if !strings.Contains(out[0], "Address: "+addr) {
		t.Errorf("%s: busybox nslookup %s: want address %s:\n%s", c.what, name, addr, out[0])
	} else if !strings.Contains(out[1], "hi") {
		t.Errorf("%s: busybox nc %s 443 (%s, just answered):\n%s", c.what, addr, name, out[1])
	}
	if strings.Contains(out[2], unlistedAddr) {
		t.Errorf("%s: busybox nslookup %s answered an unlisted name:\n%s", c.what, unlistedName, out[2])
	}
	if strings.Contains(out[3], "hi") {
		t.Errorf("%s: busybox nc %s 443 (unlisted, never answered) connected", c.what, unlistedAddr)
	}

	// An unlisted name: no address, and its address stays closed.
	r, err = query(c.ns, c.resolver, unlistedName, dns.TypeA, "udp")
	switch {
	case err != nil && !c.embedded:
		t.Errorf("%s: %s A via %s: %v, want REFUSED", c.what, unlistedName, c.resolver, err)
	case err != nil:
		t.Logf("%s: %s A via %s: %v (no address)", c.what, unlistedName, c.resolver, err)
	case len(addrs(r)) > 0:
		t.Errorf("%s: %s A via %s: %s %v: an unlisted name was answered", c.what, unlistedName, c.resolver, dns.RcodeToString[r.Rcode], addrs(r))
	case !c.embedded && r.Rcode != dns.RcodeRefused:
		t.Errorf("%s: %s A via %s: %s, want REFUSED", c.what, unlistedName, c.resolver, dns.RcodeToString[r.Rcode])
	}
	if err := dial(c.ns, hostPort(unlistedAddr, 443), shortWait); err == nil {
		t.Errorf("%s: %s:443 (unlisted, never answered) connected", c.what, unlistedAddr)
	}

	// Another resolver, asked directly: egressd answers.
	other := otherDNS + ":53"
	r, err = query(c.ns, other, unlistedName, dns.TypeA, "udp")
	if err != nil || r.Rcode != dns.RcodeRefused || len(r.Answer) != 0 {
		t.Errorf("%s: %s A via %s (another resolver): %s, want egressd's REFUSED", c.what, unlistedName, other, brief(r, err))
	}
	name, addr = e.fresh()
	r, err = query(c.ns, other, name, dns.TypeA, "udp")
	if err != nil || r.Rcode != dns.RcodeSuccess || !slices.Equal(addrs(r), []string{addr}) {
		t.Errorf("%s: %s A via %s (another resolver): %s, want [%s]", c.what, name, other, brief(r, err), addr)
	} else if err := dial(c.ns, hostPort(addr, 443), shortWait); err != nil {
		t.Errorf("%s: %s:443 (%s, answered via another resolver): %v", c.what, addr, name, err)
	}
}

// checkStubUnused fails if anything reached the host's stub resolver since
// mark: with egressd in place (firewall.host, or firewall.engine_cgroups
// for the engine's own forwarding), every query of the scenario ends at
// egressd.
func (e *engineLab) checkStubUnused(t *testing.T, mark int) {
	t.Helper()
	if asked := e.stub.since(mark); len(asked) > 0 {
		t.Errorf("the host's stub resolver (127.0.0.53) was asked %v: those queries bypassed egressd", asked)
	}
}

// busyboxRootfs writes the containers' root file system into dir: a
// static busybox and its applets.
func busyboxRootfs(t *testing.T, dir string) {
	t.Helper()
	bb, err := staticBusybox()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "root", "var", "run"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":  "root:x:0:\n",
	}
	for p, body := range files {
		if err := os.WriteFile(filepath.Join(dir, p), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "nc", "nslookup", "cat", "sleep", "echo", "ls", "ip", "true", "hostname"} {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
}

// busyboxTarball returns a tarball of busyboxRootfs for docker import and
// podman import.
func (e *engineLab) busyboxTarball() string {
	e.t.Helper()
	root := filepath.Join(e.dir, "rootfs")
	busyboxRootfs(e.t, root)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		h.Name = rel
		if d.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			_, err = tw.Write(data)
			return err
		}
		return nil
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		e.t.Fatal(err)
	}
	p := filepath.Join(e.dir, "busybox.tar")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// ---- Docker ----

// docker is the lab's dockerd and its client.
type docker struct {
	e  *engineLab
	d  *engineProc
	cg string // dockerd's cgroup v2, relative to the cgroup2 mount
}

func (e *engineLab) docker() *docker {
	e.t.Helper()
	cfg := fmt.Sprintf(`{"storage-driver": "vfs", "exec-opts": ["native.cgroupdriver=cgroupfs"],
 "cgroup-parent": "/%s/docker", "shutdown-timeout": 1,
 "bip": "%s/24", "fixed-cidr": "172.30.0.128/25", "log-level": "warn"}`, e.cg, bridgeIP)
	p := filepath.Join(e.dir, "daemon.json")
	if err := os.WriteFile(p, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	dk := &docker{e: e, cg: "/" + e.cg + "/docker.service"}
	dk.d = e.daemon("dockerd", "docker.service", func() error {
		_, err := dk.run("", "version", "--format", "{{.Server.Version}}")
		return err
	}, "dockerd", "--config-file", p, "--data-root", "/var/lib/docker", "--exec-root", "/run/docker",
		"--pidfile", "/run/docker.pid", "-H", "unix:///run/docker.sock")
	e.top.Cleanup(func() {
		if dk.d.running() {
			if ids, err := dk.run("", "ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
				_, _ = dk.run("", append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
	})
	return dk
}

func (dk *docker) run(stdin string, args ...string) (string, error) {
	return dk.e.runIn(stdin, append([]string{dockerClient(), "-H", "unix:///run/docker.sock"}, args...)...)
}

func (dk *docker) must(args ...string) string {
	dk.e.t.Helper()
	return dk.e.must(append([]string{dockerClient(), "-H", "unix:///run/docker.sock"}, args...)...)
}

// container is a running container: its pid and addresses.
type container struct {
	name string
	pid  int
	ips  []string
}

// inspect waits until the container runs and returns it.
func (e *engineLab) inspect(tool func(args ...string) (string, error), name string) container {
	e.t.Helper()
	var c container
	e.waitFor(name+" to run", 30*time.Second, func() error {
		out, err := tool("inspect", "-f", "{{.State.Running}} {{.State.Pid}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		f := strings.Fields(out)
		if len(f) < 3 || f[0] != "true" || f[1] == "0" {
			return fmt.Errorf("not running: %s", out)
		}
		c = container{name: name, ips: f[2:]}
		c.pid, err = strconv.Atoi(f[1])
		return err
	})
	return c
}

func (dk *docker) inspect(name string) container {
	dk.e.t.Helper()
	return dk.e.inspect(func(args ...string) (string, error) { return dk.run("", args...) }, name)
}

func (dk *docker) client(what, name, short string, embedded bool) (client, container) {
	t := dk.e.t
	t.Helper()
	c := dk.inspect(name)
	cl := client{
		what:     what,
		ns:       dk.e.attach(short, c.pid),
		resolver: nameserver(t, c.pid) + ":53",
		embedded: embedded,
		exec: func(args ...string) (string, error) {
			return dk.run("", append([]string{"exec", name}, args...)...)
		},
	}
	return cl, c
}

// dockerContainers starts the scenario's containers: d0 on the default
// bridge, u1 and u2 on the user-defined network, u2 an echo server
// published on the host. They restart with dockerd.
func (dk *docker) containers() {
	dk.e.t.Helper()
	if ids := dk.must("ps", "-aq"); ids != "" {
		dk.must(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
	}
	// sleep and nc, process 1 of their containers, ignore SIGTERM: dockerd
	// stops them with SIGKILL after --stop-timeout.
	run := []string{"run", "-d", "--restart", "always", "--stop-timeout", "1"}
	dk.must(append(run, "--name", "d0", engineImage, "sleep", "1000000")...)
	dk.must(append(run, "--name", "u1", "--network", dockerNet, engineImage, "sleep", "1000000")...)
	dk.must(append(run, "--name", "u2", "--network", dockerNet, "-p", dockerPublished+":"+echoPort,
		engineImage, "nc", "-ll", "-p", echoPort, "-e", "/bin/cat")...)
	dk.e.waitPublished(dockerPublished)
}

// waitPublished waits until an echo server answers on port, published on
// the host's uplink, from the internet.
func (e *engineLab) waitPublished(port string) {
	e.t.Helper()
	e.waitFor("the port published on "+hostUplink+":"+port, 30*time.Second, func() error {
		return dial(e.Inet, hostUplink+":"+port, shortWait)
	})
}

// checkDocker runs every check against the Docker containers.
func (dk *docker) checkDocker(t *testing.T) {
	e := dk.e
	d0, _ := dk.client("docker default bridge (d0)", "d0", "d0", false)
	if d0.resolver != upstreamDNS+":53" {
		t.Errorf("d0's resolv.conf names %s, want the host's upstream %s (Docker copies the host's, or systemd-resolved's list)", d0.resolver, upstreamDNS)
	}
	u1, _ := dk.client("docker user network (u1)", "u1", "u1", true)
	if u1.resolver != "127.0.0.11:53" {
		t.Errorf("u1's resolv.conf names %s, want Docker's embedded DNS 127.0.0.11", u1.resolver)
	}
	_, u2 := dk.client("docker user network (u2)", "u2", "u2", true)
	mark := e.stub.count()
	e.checkClient(t, d0)
	e.checkClient(t, u1)

	// Container names on the user network, and traffic between containers.
	r, err := query(u1.ns, u1.resolver, "u2", dns.TypeA, "udp")
	if err != nil || r.Rcode != dns.RcodeSuccess || !slices.Equal(addrs(r), u2.ips) {
		t.Errorf("u1: u2 A via Docker's embedded DNS: %s, want %v", brief(r, err), u2.ips)
	}
	if out := u1.inside("echo hi | nc -w 2 u2 " + echoPort); !strings.Contains(out[0], "hi") {
		t.Errorf("u1: busybox nc u2 %s (by name):\n%s", echoPort, out[0])
	}
	if err := dial(u1.ns, hostPort(u2.ips[0], 8080), shortWait); err != nil {
		t.Errorf("u1 -> u2 %s:%s: %v", u2.ips[0], echoPort, err)
	}
	// u2's port published on the host's uplink, from the internet.
	if err := dial(e.Inet, hostUplink+":"+dockerPublished, shortWait); err != nil {
		t.Errorf("internet -> published port %s:%s (u2): %v", hostUplink, dockerPublished, err)
	}
	e.checkStubUnused(t, mark)
}

func TestEngineDocker(t *testing.T) {
	needEngine(t, "docker", dockerClient())
	if cgroup2Mount() == "" {
		need(t, "docker engine test: no cgroup v2 hierarchy is mounted (firewall.engine_cgroups matches cgroup v2 paths)")
	}
	l := newLab(t)
	e := newEngineLab(l)
	dk := e.docker()
	img := e.busyboxTarball()
	dk.d.start()
	dk.must("import", img, engineImage)
	dk.must("network", "create", "--subnet", dockerNetSubnet, dockerNet)
	dk.containers()

	hostOn := e.egressdConfig("docker-host.yaml", true)
	hostOff := e.egressdConfig("docker-nohost.yaml", false)
	// Docker's embedded DNS forwards from the host's namespace (Docker 28
	// and later always; 20.10-27.x for loopback host nameservers, the
	// stub host here): engine_cgroups sends that through egressd too.
	hostOffCg := e.egressdConfig("docker-nohost-cgroups.yaml", false, fmt.Sprintf("engine_cgroups: [%q]", dk.cg))

	e.sub(t, plainResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		dk.checkDocker(t)
	})
	e.sub(t, plainResolv.name+"/host true/container churn", func(t *testing.T) {
		from, handle := len(e.egressdLog.String()), e.tableHandle()
		for i := 0; i < 2; i++ {
			dk.must("run", "--rm", engineImage, "true")
		}
		dk.must("run", "--rm", "--network", dockerNet, engineImage, "true")
		id := dk.must("network", "create", "--subnet", "10.211.0.0/24", "churnnet")
		dk.must("run", "--rm", "--network", "churnnet", engineImage, "true")
		dk.must("network", "rm", "churnnet")
		e.checkQuiet(t, from, handle, "br-"+id[:12])
	})
	e.sub(t, plainResolv.name+"/host true/dockerd restarted", func(t *testing.T) {
		dk.d.restart()
		// The containers come back with dockerd (restart always).
		for _, n := range []string{"d0", "u1", "u2"} {
			dk.inspect(n)
		}
		e.waitPublished(dockerPublished)
		dk.checkDocker(t)
	})
	e.sub(t, plainResolv.name+"/host false", func(t *testing.T) {
		e.egressd(hostOff)
		dk.checkDocker(t)
	})

	// systemd-resolved's stub: dockerd reads the resolver files once, at
	// start; containers get theirs when they start.
	e.setResolv(stubResolv)
	dk.d.restart()
	dk.containers()
	e.sub(t, stubResolv.name+"/host false/engine_cgroups", func(t *testing.T) {
		e.egressd(hostOffCg)
		dk.checkDocker(t)
	})
	e.sub(t, stubResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		dk.checkDocker(t)
	})
	e.checkNoUnknownWarnings(t)
}

// ---- Podman ----

type podman struct {
	e   *engineLab
	env []string
}

func (e *engineLab) podman() *podman {
	e.t.Helper()
	netDir := filepath.Join(e.dir, "podman-networks")
	tmp := filepath.Join(e.dir, "tmp")
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
image_copy_tmp_dir = %q
[network]
network_backend = "netavark"
network_config_dir = %q
`, tmp, netDir)
	storage := `[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
`
	for p, body := range map[string]string{"containers.conf": conf, "storage.conf": storage} {
		if err := os.WriteFile(filepath.Join(e.dir, p), []byte(body), 0o644); err != nil {
			e.t.Fatal(err)
		}
	}
	pm := &podman{e: e, env: []string{
		"CONTAINERS_CONF=" + filepath.Join(e.dir, "containers.conf"),
		"CONTAINERS_STORAGE_CONF=" + filepath.Join(e.dir, "storage.conf"),
		"TMPDIR=" + tmp,
	}}
	e.top.Cleanup(func() {
		_, _ = pm.run("", "rm", "-af", "-t", "0")
		_, _ = pm.run("", "network", "rm", "-f", podmanNet)
	})
	return pm
}

func (pm *podman) run(stdin string, args ...string) (string, error) {
	return pm.e.runIn(stdin, append(append([]string{"env"}, pm.env...), append([]string{"podman"}, args...)...)...)
}

func (pm *podman) must(args ...string) string {
	pm.e.t.Helper()
	out, err := pm.run("", args...)
	if err != nil {
		pm.e.t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// runCtr starts a container below the lab's cgroup.
func (pm *podman) runCtr(args ...string) {
	pm.e.t.Helper()
	pm.must(append([]string{"run", "-d", "--cgroup-parent", "/" + pm.e.cg + "/podman"}, args...)...)
}

func (pm *podman) client(what, name string) (client, container) {
	t := pm.e.t
	t.Helper()
	c := pm.e.inspect(func(args ...string) (string, error) { return pm.run("", args...) }, name)
	cl := client{
		what:     what,
		ns:       pm.e.attach(name, c.pid),
		resolver: nameserver(t, c.pid) + ":53",
		exec: func(args ...string) (string, error) {
			return pm.run("", append([]string{"exec", name}, args...)...)
		},
	}
	return cl, c
}

// containers starts p0 on the default network (podman0, DNS off), pa and
// pb on the Podman network (DNS on), pb an echo server published on the
// host.
func (pm *podman) containers() {
	pm.e.t.Helper()
	pm.must("rm", "-af", "-t", "0")
	pm.runCtr("--name", "p0", podmanImage, "sleep", "1000000")
	pm.runCtr("--name", "pa", "--network", podmanNet, podmanImage, "sleep", "1000000")
	pm.runCtr("--name", "pb", "--network", podmanNet, "-p", podmanPublished+":"+echoPort, podmanImage, "nc", "-ll", "-p", echoPort, "-e", "/bin/cat")
	pm.waitAardvark()
	pm.e.waitPublished(podmanPublished)
}

// waitAardvark waits until aardvark-dns listens on the Podman network's
// gateway (netavark may return before it does).
func (pm *podman) waitAardvark() {
	e := pm.e
	e.t.Helper()
	e.waitFor("aardvark-dns on "+podmanGateway+":53", 30*time.Second, func() error {
		out, err := exec.Command("ip", "netns", "exec", e.Host, "ss", "-Hlun", "src", podmanGateway+":53").CombinedOutput()
		if err != nil || !strings.Contains(string(out), podmanGateway+":53") {
			return fmt.Errorf("not listening: %v %s", err, out)
		}
		return nil
	})
}

func (pm *podman) checkPodman(t *testing.T) {
	e := pm.e
	p0, _ := pm.client("podman default network (p0)", "p0")
	if p0.resolver != upstreamDNS+":53" {
		t.Errorf("p0's resolv.conf names %s, want the host's upstream %s", p0.resolver, upstreamDNS)
	}
	pa, _ := pm.client("podman network (pa)", "pa")
	if pa.resolver != podmanGateway+":53" {
		t.Errorf("pa's resolv.conf names %s first, want aardvark-dns on the gateway %s", pa.resolver, podmanGateway)
	}
	_, pb := pm.client("podman network (pb)", "pb")
	mark := e.stub.count()
	e.checkClient(t, p0)
	e.checkClient(t, pa)

	// Container names: egressd forwards dns.podman to aardvark-dns on the
	// bridge the client sits behind (dns.engine_zones).
	r, err := query(pa.ns, pa.resolver, "pb.dns.podman", dns.TypeA, "udp")
	if err != nil || r.Rcode != dns.RcodeSuccess || !slices.Equal(addrs(r), pb.ips) {
		t.Errorf("pa: pb.dns.podman A via %s: %s, want %v (aardvark-dns's answer through egressd)", pa.resolver, brief(r, err), pb.ips)
	}
	out := pa.inside("nslookup pb", "echo hi | nc -w 2 pb "+echoPort)
	if !strings.Contains(out[0], "Address: "+pb.ips[0]) {
		t.Errorf("pa: busybox nslookup pb (search dns.podman): want %s\n%s", pb.ips[0], out[0])
	}
	if !strings.Contains(out[1], "hi") {
		t.Errorf("pa: busybox nc pb %s (by name):\n%s", echoPort, out[1])
	}
	if err := dial(pa.ns, hostPort(pb.ips[0], 8080), shortWait); err != nil {
		t.Errorf("pa -> pb %s:%s: %v", pb.ips[0], echoPort, err)
	}
	if err := dial(e.Inet, hostUplink+":"+podmanPublished, shortWait); err != nil {
		t.Errorf("internet -> published port %s:%s (pb): %v", hostUplink, podmanPublished, err)
	}
	e.checkStubUnused(t, mark)
}

func TestEnginePodman(t *testing.T) {
	needEngine(t, "podman", "/usr/lib/podman/netavark", "/usr/lib/podman/aardvark-dns")
	l := newLab(t)
	e := newEngineLab(l)
	pm := e.podman()
	pm.must("import", e.busyboxTarball(), podmanImage)
	pm.must("network", "create", "--subnet", podmanNetSubnet, podmanNet)
	pm.containers()

	hostOn := e.egressdConfig("podman-host.yaml", true)
	hostOff := e.egressdConfig("podman-nohost.yaml", false)
	e.sub(t, plainResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		pm.checkPodman(t)
	})
	e.sub(t, plainResolv.name+"/host true/container churn", func(t *testing.T) {
		from, handle := len(e.egressdLog.String()), e.tableHandle()
		pm.must("run", "--rm", "--cgroup-parent", "/"+e.cg+"/podman", podmanImage, "true")
		pm.must("run", "--rm", "--cgroup-parent", "/"+e.cg+"/podman", "--network", podmanNet, podmanImage, "true")
		pm.must("network", "create", "--subnet", "10.90.0.0/24", "churnnet")
		bridge := pm.must("network", "inspect", "-f", "{{.NetworkInterface}}", "churnnet")
		pm.must("run", "--rm", "--cgroup-parent", "/"+e.cg+"/podman", "--network", "churnnet", podmanImage, "true")
		pm.must("network", "rm", "churnnet")
		e.checkQuiet(t, from, handle, bridge)
	})
	e.sub(t, plainResolv.name+"/host true/networks restarted", func(t *testing.T) {
		// Every container stopped: netavark deletes the bridges and
		// aardvark-dns exits; started again, they come back.
		pm.must("stop", "-a", "-t", "0")
		pm.must("start", "p0", "pa", "pb")
		pm.waitAardvark()
		e.waitPublished(podmanPublished)
		pm.checkPodman(t)
	})
	e.sub(t, plainResolv.name+"/host false", func(t *testing.T) {
		e.egressd(hostOff)
		pm.checkPodman(t)
	})

	e.setResolv(stubResolv)
	pm.containers()
	e.sub(t, stubResolv.name+"/host false", func(t *testing.T) {
		pm.checkPodman(t)
	})
	e.sub(t, stubResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		pm.checkPodman(t)
	})
	e.checkNoUnknownWarnings(t)
}

// ---- containerd with the CNI bridge plugin ----

// ctrd is the lab's containerd; pods are set up as the kubelet's CRI does
// it: a network namespace, the CNI bridge plugin called on it, then the
// container run in it with the pod's resolv.conf (the host's, or
// systemd-resolved's list on a stub host).
type ctrd struct {
	e       *engineLab
	d       *engineProc
	cniConf string
	resolv  string // the pods' resolv.conf
}

func (e *engineLab) containerd() *ctrd {
	e.t.Helper()
	conf := filepath.Join(e.dir, "containerd.toml")
	body := `version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/containerd/containerd.sock"
`
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		e.t.Fatal(err)
	}
	c := &ctrd{e: e, cniConf: filepath.Join(e.dir, "cni.conf"), resolv: filepath.Join(e.dir, "pod-resolv.conf")}
	cni := fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "labcni", "type": "bridge", "bridge": "cni0",
 "isGateway": true, "ipMasq": true,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}],
          "dataDir": %q}}`, cniSubnet, filepath.Join(e.dir, "cni-ipam"))
	if err := os.WriteFile(c.cniConf, []byte(cni), 0o644); err != nil {
		e.t.Fatal(err)
	}
	c.d = e.daemon("containerd", "", func() error {
		_, err := c.ctr("version")
		return err
	}, "containerd", "--config", conf)
	return c
}

func (c *ctrd) ctr(args ...string) (string, error) {
	return c.e.runIn("", append([]string{"ctr", "--namespace", "egressd-lab"}, args...)...)
}

func (c *ctrd) must(args ...string) string {
	c.e.t.Helper()
	return c.e.must(append([]string{"ctr", "--namespace", "egressd-lab"}, args...)...)
}

// cni calls the bridge plugin for a pod.
func (c *ctrd) cni(command, pod string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), engineCmdWait)
	defer cancel()
	cmd := c.e.nsCmd(ctx, cniPluginDir()+"/bridge")
	cmd.Env = append(cmd.Env, "CNI_COMMAND="+command, "CNI_CONTAINERID="+pod, "CNI_NETNS=/run/netns/"+pod,
		"CNI_IFNAME=eth0", "CNI_PATH="+cniPluginDir())
	conf, err := os.ReadFile(c.cniConf)
	if err != nil {
		return "", err
	}
	cmd.Stdin = bytes.NewReader(conf)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// pod sets up a pod's network and runs its container.
func (c *ctrd) pod(name string, args ...string) {
	e := c.e
	e.t.Helper()
	e.must("ip", "netns", "add", name)
	e.top.Cleanup(func() { _, _ = c.cni("DEL", name) })
	if out, err := c.cni("ADD", name); err != nil {
		e.t.Fatalf("CNI ADD %s: %v\n%s", name, err, out)
	}
	rootfs := filepath.Join(e.dir, "rootfs-"+name)
	busyboxRootfs(e.t, rootfs)
	e.top.Cleanup(func() {
		_, _ = c.ctr("task", "kill", "-s", "KILL", name)
		_, _ = c.ctr("task", "delete", "-f", name)
		_, _ = c.ctr("container", "delete", name)
	})
	c.must(append([]string{"run", "-d", "--rootfs", "--env", "PATH=/bin",
		"--with-ns", "network:/run/netns/" + name,
		"--mount", "type=bind,src=" + c.resolv + ",dst=/etc/resolv.conf,options=rbind:ro",
		"--cgroup", "/" + e.cg + "/containerd/" + name,
		rootfs, name}, args...)...)
}

func (c *ctrd) client(name string) (client, container) {
	e := c.e
	e.t.Helper()
	var ct container
	e.waitFor(name+"'s task", 30*time.Second, func() error {
		out, err := c.ctr("task", "ls")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) == 3 && f[0] == name && f[2] == "RUNNING" {
				ct.pid, err = strconv.Atoi(f[1])
				return err
			}
		}
		return fmt.Errorf("not running:\n%s", out)
	})
	ct.name = name
	ns := e.attach(name, ct.pid)
	out := e.in(ns, "ip -4 -o addr show dev eth0")
	m := regexp.MustCompile(`inet (\S+)/`).FindStringSubmatch(out)
	if m == nil {
		e.t.Fatalf("%s: no IPv4 address on eth0:\n%s", name, out)
	}
	ct.ips = []string{m[1]}
	execs := 0
	cl := client{
		what:     "containerd CNI bridge (" + name + ")",
		ns:       ns,
		resolver: nameserver(e.t, ct.pid) + ":53",
		exec: func(args ...string) (string, error) {
			execs++
			flags := []string{"ctr", "--namespace", "egressd-lab", "task", "exec", "--exec-id", fmt.Sprintf("check%d", execs)}
			return e.runIn("", append(append(flags, name), args...)...)
		},
	}
	return cl, ct
}

func (c *ctrd) checkContainerd(t *testing.T) {
	e := c.e
	c1, _ := c.client("c1")
	if c1.resolver != upstreamDNS+":53" {
		t.Errorf("c1's resolv.conf names %s, want %s", c1.resolver, upstreamDNS)
	}
	_, c2 := c.client("c2")
	mark := e.stub.count()
	e.checkClient(t, c1)
	if out := c1.inside("echo hi | nc -w 2 " + c2.ips[0] + " " + echoPort); !strings.Contains(out[0], "hi") {
		t.Errorf("c1: busybox nc c2 %s:%s:\n%s", c2.ips[0], echoPort, out[0])
	}
	if err := dial(c1.ns, hostPort(c2.ips[0], 8080), shortWait); err != nil {
		t.Errorf("c1 -> c2 %s:%s: %v", c2.ips[0], echoPort, err)
	}
	e.checkStubUnused(t, mark)
}

// setPodResolv writes the pods' resolv.conf as the kubelet does: the
// host's, or systemd-resolved's upstream list on a stub host.
func (c *ctrd) setPodResolv(s resolvStyle) {
	body := s.resolv
	if s.resolved != "" {
		body = s.resolved
	}
	if err := os.WriteFile(c.resolv, []byte(body), 0o644); err != nil {
		c.e.t.Fatal(err)
	}
}

func TestEngineContainerd(t *testing.T) {
	needEngine(t, "containerd")
	if cniPluginDir() == "" {
		need(t, "containerd engine test: the CNI bridge plugin is not installed (apt-get install %s)", engineDebs["containerd"])
	}
	l := newLab(t)
	e := newEngineLab(l)
	c := e.containerd()
	c.setPodResolv(plainResolv)
	c.d.start()
	c.pod("c1", "sleep", "1000000")
	c.pod("c2", "nc", "-ll", "-p", echoPort, "-e", "/bin/cat")
	_, c2 := c.client("c2")
	e.waitFor("c2's echo server", 30*time.Second, func() error {
		return dial(e.Host, hostPort(c2.ips[0], 8080), shortWait)
	})

	hostOn := e.egressdConfig("containerd-host.yaml", true)
	hostOff := e.egressdConfig("containerd-nohost.yaml", false)
	e.sub(t, plainResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		c.checkContainerd(t)
	})
	e.sub(t, plainResolv.name+"/host true/containerd restarted", func(t *testing.T) {
		c.d.restart()
		c.checkContainerd(t)
	})
	e.sub(t, plainResolv.name+"/host false", func(t *testing.T) {
		e.egressd(hostOff)
		c.checkContainerd(t)
	})
	e.setResolv(stubResolv)
	c.setPodResolv(stubResolv)
	e.sub(t, stubResolv.name+"/host false", func(t *testing.T) {
		c.checkContainerd(t)
	})
	e.sub(t, stubResolv.name+"/host true", func(t *testing.T) {
		e.egressd(hostOn)
		c.checkContainerd(t)
	})
	e.checkNoUnknownWarnings(t)
}
