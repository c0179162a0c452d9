// Package systemd holds egressd's unit files; this test checks them with
// systemd's own tools.
package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var units = []string{"egressd.service", "egressd-apply.service"}

func analyze(t *testing.T) string {
	path, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("systemd-analyze is not installed (apt-get install systemd)")
		}
		t.Skip("systemd-analyze is not installed")
	}
	return path
}

// installed writes the units with ExecStart pointing at a freshly built
// binary, since verify checks that the command exists.
func installed(t *testing.T) string {
	dir := t.TempDir()
	bin := filepath.Join(dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/egressd").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, u := range units {
		data, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		data = []byte(strings.ReplaceAll(string(data), "/usr/local/bin/egressd", bin))
		if err := os.WriteFile(filepath.Join(dir, u), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestUnitsVerify(t *testing.T) {
	sa := analyze(t)
	dir := installed(t)
	for _, u := range units {
		out, err := exec.Command(sa, "verify", filepath.Join(dir, u)).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", u, err, out)
		}
	}
}

func TestUnitExposure(t *testing.T) {
	sa := analyze(t)
	dir := installed(t)
	out, err := exec.Command(sa, "security", "--offline=yes", filepath.Join(dir, "egressd.service")).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for egressd.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	// systemd rates up to 3.9 "OK"; egressd needs CAP_NET_ADMIN and
	// netlink, which keep it above the fully sandboxed scores.
	if level, _ := strconv.ParseFloat(string(m[1]), 64); level > 3.0 {
		t.Errorf("exposure %.1f, want at most 3.0:\n%s", level, out)
	}
}

// The apply unit must fail when the ruleset cannot be installed (no "-"
// prefix), accept apply's "pinned names pending" status, and, once
// enabled, be required by the container runtimes.
func TestApplyUnitFailsClosed(t *testing.T) {
	data, err := os.ReadFile("egressd-apply.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	for _, want := range []string{
		"\nExecStart=/usr/local/bin/egressd apply ",
		"\nSuccessExitStatus=3\n",
		"\nRequiredBy=docker.service containerd.service podman.service\n",
		"\nBefore=network-pre.target docker.service containerd.service podman.service egressd.service\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("egressd-apply.service lacks %q", strings.TrimSpace(want))
		}
	}
	if strings.Contains(unit, "ExecStart=-") {
		t.Error("egressd-apply.service ignores apply's failure (ExecStart=-)")
	}
	// Enabling it really makes a runtime require it.
	sa := analyze(t)
	dir := installed(t)
	rt := filepath.Join(dir, "docker.service")
	if err := os.WriteFile(rt, []byte("[Service]\nExecStart=/bin/true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	sys := filepath.Join(root, "etc/systemd/system")
	if err := os.MkdirAll(sys, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"egressd-apply.service", "docker.service"} {
		b, _ := os.ReadFile(filepath.Join(dir, u))
		if err := os.WriteFile(filepath.Join(sys, u), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("systemctl", "--root", root, "enable", "egressd-apply.service").CombinedOutput(); err != nil {
		t.Fatalf("systemctl enable: %v\n%s", err, out)
	}
	if _, err := os.Lstat(filepath.Join(sys, "docker.service.requires", "egressd-apply.service")); err != nil {
		t.Errorf("enabling egressd-apply does not make docker.service require it: %v", err)
	}
	if out, err := exec.Command(sa, "verify", filepath.Join(dir, "egressd-apply.service")).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("verify: %v\n%s", err, out)
	}
}
