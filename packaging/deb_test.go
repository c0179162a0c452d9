// Package packaging builds egressd's Debian package; this test builds it
// with `make deb` and checks what it installs.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func TestDeb(t *testing.T) {
	if testing.Short() {
		t.Skip("builds nfpm")
	}
	for _, tool := range []string{"dpkg-deb", "make"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed", tool)
			}
			t.Skipf("%s is not installed", tool)
		}
	}
	run(t, "..", "make", "deb", "DEB_VERSION=1.2.3")
	debs, _ := filepath.Glob("../build/egressd_1.2.3_*.deb")
	if len(debs) != 1 {
		t.Fatalf("make deb built %v", debs)
	}
	deb := debs[0]
	root := t.TempDir()
	run(t, ".", "dpkg-deb", "-x", deb, root)
	for _, f := range []string{
		"usr/bin/egressd", "lib/systemd/system/egressd.service", "lib/systemd/system/egressd-apply.service",
		"etc/egressd/config.yaml", "usr/share/man/man1/egressd-explain.1",
		"usr/share/bash-completion/completions/egressd", "usr/share/zsh/vendor-completions/_egressd",
	} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("package lacks /%s", f)
		}
	}
	if out := run(t, ".", filepath.Join(root, "usr/bin/egressd"), "version"); !strings.Contains(out, "egressd") {
		t.Errorf("packaged binary: %q", out)
	}
	unit, _ := os.ReadFile(filepath.Join(root, "lib/systemd/system/egressd.service"))
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/egressd run") {
		t.Errorf("packaged unit does not run /usr/bin/egressd:\n%s", unit)
	}
	ctl := t.TempDir()
	run(t, ".", "dpkg-deb", "-e", deb, ctl)
	if conf, _ := os.ReadFile(filepath.Join(ctl, "conffiles")); strings.TrimSpace(string(conf)) != "/etc/egressd/config.yaml" {
		t.Errorf("conffiles: %q", conf)
	}
	// A fresh install only reloads systemd and explains; it does not start
	// filtering.
	post, _ := os.ReadFile(filepath.Join(ctl, "postinst"))
	for _, line := range strings.Split(string(post), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "echo") || strings.HasPrefix(line, "#") {
			continue
		}
		for _, bad := range []string{"systemctl enable", "systemctl start", "egressd apply", "egressd run"} {
			if strings.Contains(line, bad) {
				t.Errorf("postinst runs %q: %s", bad, line)
			}
		}
	}
	if out := run(t, ".", "sh", filepath.Join(ctl, "postinst"), "configure"); !strings.Contains(out, "not running") {
		t.Errorf("postinst on a fresh install says %q", out)
	}
	fields := run(t, ".", "dpkg-deb", "-f", deb, "Package", "Version", "Architecture")
	if !strings.Contains(fields, "Version: 1.2.3") {
		t.Errorf("control fields:\n%s", fields)
	}
}
