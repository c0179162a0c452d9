package firewall

import (
	"testing"
	"time"
)

func TestTimeoutRoundsUp(t *testing.T) {
	base := time.Unix(1000, 0)
	tests := []struct {
		until time.Time
		now   time.Time
		want  time.Duration
	}{
		{base.Add(3 * time.Second), base, 3 * time.Second},
		{base.Add(1500 * time.Millisecond), base.Add(-1), 1501 * time.Millisecond},
		{base.Add(time.Millisecond), base.Add(time.Microsecond), time.Millisecond},
	}
	for _, tt := range tests {
		if got := timeout(tt.until.UnixMilli(), tt.now); got != tt.want {
			t.Errorf("timeout(%v, %v) = %v, want %v", tt.until, tt.now, got, tt.want)
		}
	}
}

func TestWithName(t *testing.T) {
	tests := []struct{ names, name, want string }{
		{"", "a.", "a."},
		{"a.", "a.", "a."},
		{"a.,b.", "a.", "a.,b."},
		{"b.,a.", "a.", "a.,b."},
		{"b.", "a.", "a.,b."},
		{"ab.", "a.", "a.,ab."},
		{"1.,2.,3.,4.,5.,6.,7.,8.", "9.", "9.,1.,2.,3.,4.,5.,6.,7."},
	}
	for _, tt := range tests {
		if got := withName(tt.names, tt.name); got != tt.want {
			t.Errorf("withName(%q, %q) = %q, want %q", tt.names, tt.name, got, tt.want)
		}
	}
}
