package agent

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"
)

// errorLog is a slog.Handler that passes records on and keeps the last
// warnings and errors for `egressd status`.
type errorLog struct {
	slog.Handler
	mu   *sync.Mutex
	last *[]string
}

const keepErrors = 10

func newErrorLog(h slog.Handler) *errorLog {
	return &errorLog{Handler: h, mu: &sync.Mutex{}, last: &[]string{}}
}

func (h *errorLog) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s %s", r.Time.Format(time.RFC3339), r.Level, r.Message)
		r.Attrs(func(a slog.Attr) bool {
			fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
			return true
		})
		h.mu.Lock()
		*h.last = append(*h.last, b.String())
		if len(*h.last) > keepErrors {
			*h.last = (*h.last)[len(*h.last)-keepErrors:]
		}
		h.mu.Unlock()
	}
	return h.Handler.Handle(ctx, r)
}

func (h *errorLog) WithAttrs(as []slog.Attr) slog.Handler {
	return &errorLog{Handler: h.Handler.WithAttrs(as), mu: h.mu, last: h.last}
}

func (h *errorLog) WithGroup(name string) slog.Handler {
	return &errorLog{Handler: h.Handler.WithGroup(name), mu: h.mu, last: h.last}
}

func (h *errorLog) recent() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(*h.last)
}
