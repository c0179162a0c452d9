// Package kubernetes validates the DaemonSet manifest: every document
// decodes strictly into its Kubernetes API type (an unknown or misspelt field
// fails), the settings egressd relies on are there, and the ConfigMap holds
// a config that egressd itself accepts.
package kubernetes

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/egressd/egressd/config"
)

func TestManifest(t *testing.T) {
	data, err := os.ReadFile("egressd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	for i, doc := range bytes.Split(data, []byte("\n---\n")) {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatalf("document %d: %v", i, err)
		}
		var obj any
		switch meta.Kind {
		case "Namespace":
			obj = &corev1.Namespace{}
		case "ConfigMap":
			cm = &corev1.ConfigMap{}
			obj = cm
		case "DaemonSet":
			ds = &appsv1.DaemonSet{}
			obj = ds
		default:
			t.Fatalf("document %d: unexpected kind %q", i, meta.Kind)
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			t.Errorf("%s: %v", meta.Kind, err)
		}
	}
	if ds == nil || cm == nil {
		t.Fatal("manifest lacks the DaemonSet or the ConfigMap")
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("egressd must run in the host network namespace")
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod labels", k, v)
		}
	}
	c := pod.Containers[0]
	caps := c.SecurityContext.Capabilities
	if !slices.Equal(caps.Drop, []corev1.Capability{"ALL"}) || !slices.Equal(caps.Add, []corev1.Capability{"NET_ADMIN", "NET_BIND_SERVICE"}) {
		t.Errorf("capabilities: %+v", caps)
	}
	if c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged {
		t.Error("egressd must not be privileged")
	}
	for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		if p == nil || p.Exec == nil || !slices.Contains(p.Exec.Command, "status") {
			t.Errorf("%s probe must run egressd status: %+v", name, p)
		}
	}
	// The ConfigMap's config is valid for egressd, and the socket the probes
	// use is the one it configures.
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(cm.Data["config.yaml"]), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path, nil)
	if err != nil {
		t.Fatalf("ConfigMap config: %v", err)
	}
	mounted := false
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(cfg.Control.Socket, m.MountPath+"/") {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("control socket %s is on no volume", cfg.Control.Socket)
	}
}
