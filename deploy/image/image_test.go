package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// buildImage builds a static egressd and its image, as `make image` does.
func buildImage(t *testing.T) (string, []byte) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "egressd")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=image-test", "-o", bin, "./cmd/egressd")
	cmd.Dir = "../.." // egressd's own module
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build egressd: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "egressd-image.tar")
	if err := build(bin, out, "egressd:dev", runtime.GOARCH, "image-test", time.Unix(0, 0).UTC()); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	return out, data
}

// untar extracts the archive into a directory.
func untar(t *testing.T, archive string) string {
	t.Helper()
	dir := t.TempDir()
	if out, err := exec.Command("tar", "-xf", archive, "-C", dir).CombinedOutput(); err != nil {
		t.Fatalf("untar: %v\n%s", err, out)
	}
	return dir
}

// The tarball is an OCI layout and a docker archive of one image: linux on
// this architecture, one layer with the static binary at /usr/bin/egressd,
// egressd as the entrypoint.
func TestImageTarball(t *testing.T) {
	archive, bin := buildImage(t)
	dir := untar(t, archive)

	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatalf("not an OCI layout: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations["io.containerd.image.name"] != "docker.io/library/egressd:dev" ||
		im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "dev" {
		t.Fatalf("index: %+v", im.Manifests)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/usr/bin/egressd"}) || !slices.Contains(cf.Config.Env, "PATH=/usr/bin:/bin") {
		t.Errorf("config: %+v", cf.Config)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	files := map[string]*tar.Header{}
	var content []byte
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h
		if h.Name == "usr/bin/egressd" {
			content, _ = io.ReadAll(tr)
		}
	}
	h := files["usr/bin/egressd"]
	if h == nil || h.Mode != 0o755 || h.Uid != 0 || !bytes.Equal(content, bin) {
		t.Fatalf("usr/bin/egressd: %+v (%d bytes)", h, len(content))
	}
	for _, d := range []string{"etc/egressd/", "var/lib/egressd/", "run/egressd/", "tmp/"} {
		if files[d] == nil {
			t.Errorf("directory %s missing", d)
		}
	}
	// Static: no program interpreter, so it runs on an image with no libc.
	f, err := elf.NewFile(bytes.NewReader(content))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("egressd in the image is dynamically linked; build it with CGO_ENABLED=0")
		}
	}
	// The layer blob is gzip, as its media type says.
	raw, _ := layers[0].Compressed()
	if _, err := gzip.NewReader(raw); err != nil {
		t.Errorf("layer is not gzip: %v", err)
	}
	raw.Close()

	// docker load's view: manifest.json, the same image.
	tag, _ := name.NewTag("egressd:dev")
	dimg, err := tarball.ImageFromPath(archive, &tag)
	if err != nil {
		t.Fatalf("not a docker archive: %v", err)
	}
	// (docker's manifest has other media types, so compare the config
	// and the layer.)
	want, _ := img.ConfigName()
	if got, _ := dimg.ConfigName(); got != want {
		t.Errorf("docker archive holds config %s, OCI layout %s", got, want)
	}
	dl, _ := dimg.Layers()
	wantL, _ := layers[0].Digest()
	if len(dl) != 1 {
		t.Fatalf("docker archive has %d layers", len(dl))
	}
	if got, _ := dl[0].Digest(); got != wantL {
		t.Errorf("docker archive layer %s, OCI layout %s", got, wantL)
	}

	// Reproducible: the same binary gives the same image.
	again := filepath.Join(t.TempDir(), "again.tar")
	if err := build(filepath.Join(filepath.Dir(archive), "egressd"), again, "egressd:dev", runtime.GOARCH, "image-test", time.Unix(0, 0).UTC()); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(archive)
	b, _ := os.ReadFile(again)
	if !bytes.Equal(a, b) {
		t.Error("two builds of the same binary differ")
	}
}

// Where containerd and runc are installed (Debian: containerd, runc), the
// image imports into a containerd of the test's own and runs `egressd
// version`. Skipped otherwise, except under CI=true.
func TestImageRunsInContainerd(t *testing.T) {
	for _, tool := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is not installed (apt-get install containerd runc)", tool)
			}
			t.Skipf("%s is not installed (apt-get install containerd runc)", tool)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	archive, _ := buildImage(t)
	dir, err := os.MkdirTemp("", "egressd-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "containerd.sock")
	conf := fmt.Sprintf("version = 2\nroot = %q\nstate = %q\n[grpc]\n  address = %q\n[ttrpc]\n  address = %q\n",
		filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	ctrd := exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	ctrd.Stdout, ctrd.Stderr = &log, &log
	if err := ctrd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = ctrd.Process.Kill()
		_ = ctrd.Wait()
		if t.Failed() {
			t.Logf("containerd log:\n%s", log.String())
		}
	}()
	ctr := func(args ...string) (string, error) {
		out, err := exec.Command("ctr", append([]string{"--address", sock, "--namespace", "egressd-test"}, args...)...).CombinedOutput()
		return string(out), err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := ctr("version"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("containerd did not start")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// overlayfs does not work everywhere (an overlay root file system
	// underneath): the native snapshotter does.
	var out string
	for _, snap := range []string{"overlayfs", "native"} {
		if out, err = ctr("images", "import", "--snapshotter", snap, archive); err != nil {
			t.Fatalf("ctr images import: %v\n%s", err, out)
		}
		out, err = ctr("run", "--rm", "--snapshotter", snap, "docker.io/library/egressd:dev", "egressd-version", "egressd", "version")
		if err == nil {
			t.Logf("snapshotter %s: %s", snap, strings.TrimSpace(out))
			break
		}
		t.Logf("snapshotter %s: %v\n%s", snap, err, out)
	}
	if err != nil || !strings.Contains(out, "image-test") {
		t.Fatalf("egressd version in the container: %v\n%s", err, out)
	}
	out, err = ctr("images", "ls", "-q")
	if err != nil || !strings.Contains(out, "docker.io/library/egressd:dev") {
		t.Errorf("imported images: %v %s", err, out)
	}
}
