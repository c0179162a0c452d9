package agent

import (
	"testing"
	"time"

	"github.com/egressd/egressd/config"
)

func TestLearnedAllowed(t *testing.T) {
	cfg, err := config.Load("", []string{"EGRESSD_DNS_MAX_TTL=1h", "EGRESSD_DNS_GRACE=10s", "EGRESSD_DNS_REBINDING_EXEMPT=10.20.0.0/16"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	soon := now.Add(time.Minute)
	tests := []struct {
		name  string
		addr  string
		exp   time.Time
		names []string
		want  bool
	}{
		{"allowed name", "8.8.8.8", soon, []string{"westus.api.cognitive.microsoft.com."}, true},
		{"one of its names allowed", "8.8.8.8", soon, []string{"www.example.com.", "translatoronprem.blob.core.windows.net."}, true},
		{"name no longer allowed", "8.8.8.8", soon, []string{"www.example.com."}, false},
		{"names unknown, public", "8.8.8.8", soon, nil, true},
		{"names unknown, private", "10.0.0.5", soon, nil, false},
		{"allowed name, private", "10.0.0.5", soon, []string{"westus.api.cognitive.microsoft.com."}, false},
		{"allowed name, NAT64 of a private address", "64:ff9b::a00:5", soon, []string{"westus.api.cognitive.microsoft.com."}, false},
		{"allowed name, 6to4 of a private address", "2002:a00:5::1", soon, []string{"westus.api.cognitive.microsoft.com."}, false},
		{"allowed name, reserved", "240.0.0.1", soon, []string{"westus.api.cognitive.microsoft.com."}, false},
		{"allowed name, exempted private", "10.20.1.1", soon, []string{"westus.api.cognitive.microsoft.com."}, true},
		{"expires within max_ttl + grace", "8.8.8.8", now.Add(time.Hour + 10*time.Second), nil, true},
		{"expires within max_ttl + grace + headroom", "8.8.8.8", now.Add(time.Hour + 30*time.Minute), nil, true},
		{"expires after twice max_ttl + grace", "8.8.8.8", now.Add(2*time.Hour + time.Minute), nil, false},
		{"opened without a cap", "8.8.8.8", now.Add(30 * 24 * time.Hour), []string{"westus.api.cognitive.microsoft.com."}, false},
	}
	allowed := learnedAllowed(cfg, now)
	for _, tt := range tests {
		if got := allowed(entry(tt.addr, tt.exp, tt.names...)); got != tt.want {
			t.Errorf("%s: %s %v: allowed = %v, want %v", tt.name, tt.addr, tt.names, got, tt.want)
		}
	}
}
