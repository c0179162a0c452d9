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

	// What a cluster needs: the node is not filtered, the cluster domain
	// goes to the cluster DNS, and the pod, service and node ranges are
	// open on every protocol; egressd's upstreams are the node's.
	if cfg.Firewall.Host {
		t.Error("firewall.host must be false: the node must keep reaching the API server")
	}
	if len(cfg.DNS.Forward) != 1 || cfg.DNS.Forward[0].Zone != "cluster.local" {
		t.Errorf("dns.forward: %+v, want cluster.local", cfg.DNS.Forward)
	}
	anyRanges := 0
	for _, st := range cfg.Allow.Static {
		if st.Proto == "any" && st.AnyPort {
			anyRanges++
		}
	}
	if anyRanges < 3 {
		t.Errorf("allow.cidrs: %d any-protocol ranges, want pod, service and node ranges", anyRanges)
	}
	if n := strings.Count(cm.Data["config.yaml"], "# SET:"); n != 4 {
		t.Errorf("%d values marked \"# SET:\", want 4 (pod, service, node CIDR, cluster DNS)", n)
	}
	if pod.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy %s: egressd's upstreams must be the node's resolvers, not the cluster DNS it forwards to", pod.DNSPolicy)
	}

	// The kustomization deploys this manifest and sets its image.
	var k struct {
		Resources []string `json:"resources"`
		Images    []struct {
			Name    string `json:"name"`
			NewName string `json:"newName"`
			NewTag  string `json:"newTag"`
		} `json:"images"`
	}
	kdata, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(kdata, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if !slices.Contains(k.Resources, "egressd.yaml") || len(k.Images) != 1 || k.Images[0].Name != strings.Split(c.Image, ":")[0] {
		t.Errorf("kustomization.yaml does not set the image %s of egressd.yaml: %+v", c.Image, k)
	}
}
