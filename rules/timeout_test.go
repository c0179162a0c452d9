package rules

import (
	"testing"
	"time"
)

func TestTimeoutRoundsUp(t *testing.T) {
	now := time.Unix(1000, 0)
	tests := []struct {
		in   time.Duration
		want time.Duration
	}{
		{3 * time.Second, 3 * time.Second},
		{1500*time.Millisecond + 1, 1501 * time.Millisecond},
		{1, time.Millisecond},
	}
	for _, tt := range tests {
		if got := timeout(now.Add(tt.in), now); got != tt.want {
			t.Errorf("timeout(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}
