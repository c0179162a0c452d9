// Command image builds egressd's container image offline: one layer with
// the static binary at /usr/bin/egressd and the directories the DaemonSet
// mounts, on no base image (nothing is downloaded, no Docker daemon), with
// egressd as the entrypoint. It writes one tar file that is both an OCI
// image layout (index.json, blobs/: `ctr images import`, `podman load`,
// `skopeo copy oci-archive:`, `crane push`) and a `docker save` archive
// (manifest.json: `docker load`, `kind load image-archive`), sharing the
// same blobs.
//
//	go run . -binary ../../build/egressd -o ../../build/egressd-image.tar -tag egressd:dev
//
// The build is reproducible: file times are SOURCE_DATE_EPOCH (or 0).
package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func main() {
	binary := flag.String("binary", "", "static egressd binary to put at /usr/bin/egressd")
	out := flag.String("o", "egressd-image.tar", "image tarball to write")
	tag := flag.String("tag", "egressd:dev", "image name and tag (repository:tag)")
	arch := flag.String("arch", runtime.GOARCH, "architecture of the binary (GOARCH)")
	version := flag.String("version", "dev", "egressd version, for the image's labels")
	flag.Parse()
	if *binary == "" {
		fmt.Fprintln(os.Stderr, "image: -binary is required")
		os.Exit(2)
	}
	if err := build(*binary, *out, *tag, *arch, *version, epoch()); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func epoch() time.Time {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return time.Unix(n, 0).UTC()
		}
	}
	return time.Unix(0, 0).UTC()
}

// build writes the image of binary to out.
func build(binary, out, tag, arch, version string, at time.Time) error {
	if !strings.Contains(tag, ":") {
		return fmt.Errorf("tag %q must be repository:tag", tag)
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return err
	}
	layerTar, err := rootfs(bin, at)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: at}, CreatedBy: "egressd deploy/image: /usr/bin/egressd", Comment: "static egressd binary"}})
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", arch, v1.Time{Time: at}
	// Root: egressd needs CAP_NET_ADMIN in the host's network namespace
	// (nftables, socket marks); the DaemonSet drops every other
	// capability and mounts the root file system read-only. The files
	// are root's and read-only to everyone else.
	cf.Config = v1.Config{
		Entrypoint: []string{"/usr/bin/egressd"},
		Cmd:        []string{"run", "--config", "/etc/egressd/config.yaml"},
		Env:        []string{"PATH=/usr/bin:/bin"},
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":   "egressd",
			"org.opencontainers.image.version": version,
			"org.opencontainers.image.source":  "https://github.com/egressd/egressd",
		},
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return err
	}
	return writeArchive(img, out, tag)
}

// rootfs is the image's one layer: the binary and the directories the
// DaemonSet mounts over, owned by root.
func rootfs(bin []byte, at time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []string{"etc/", "etc/egressd/", "run/", "run/egressd/", "tmp/", "usr/", "usr/bin/", "var/", "var/lib/", "var/lib/egressd/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: at, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "usr/bin/egressd", Mode: 0o755, Size: int64(len(bin)), ModTime: at, Format: tar.FormatPAX}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeArchive writes img as an OCI layout plus a docker manifest.json,
// tarred into out.
func writeArchive(img v1.Image, out, tag string) error {
	dir, err := os.MkdirTemp("", "egressd-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	repo, version, _ := strings.Cut(tag, ":")
	full := tag
	if !strings.Contains(repo, "/") {
		full = "docker.io/library/" + tag // how containerd names an unqualified image
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": version,
		"io.containerd.image.name":          full,
	})); err != nil {
		return err
	}
	// docker load reads manifest.json; it points into the same blobs.
	m, err := img.Manifest()
	if err != nil {
		return err
	}
	docker := []map[string]any{{
		"Config":   "blobs/sha256/" + m.Config.Digest.Hex,
		"RepoTags": []string{tag},
		"Layers":   []string{},
	}}
	for _, l := range m.Layers {
		docker[0]["Layers"] = append(docker[0]["Layers"].([]string), "blobs/sha256/"+l.Digest.Hex)
	}
	dj, err := json.Marshal(docker)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), dj, 0o644); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarDir(dir, tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// tarDir writes the files under dir into a tar file, in lexical order.
func tarDir(dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		hdr.ModTime, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = time.Unix(0, 0), 0, 0, "", ""
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		src, err := os.Open(path)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	return errors.Join(err, tw.Close(), f.Close())
}
