package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Timing of the config watch.
const (
	// configSettle is how long the directory must stay quiet after a
	// change before the file is read: an editor's write-rename-chmod or
	// the kubelet's symlink swap is several events, and one reload
	// should follow, of the finished file.
	configSettle = 300 * time.Millisecond
	// configPoll reads the file in any case this often: a backstop for
	// changes inotify cannot see (a bind mount replaced underneath, a
	// network file system).
	configPoll = 10 * time.Second
)

// watchConfig calls changed whenever the content of the config file at
// path changes, the way SIGHUP would, so that a changed Kubernetes
// ConfigMap takes effect without a restart.
//
// It watches the file's directory, not the file: the kubelet updates a
// ConfigMap volume by writing a new timestamped directory and renaming
// the "..data" symlink onto it, so the path (config.yaml -> ..data/
// config.yaml) never sees a write of its own, and editors replace files
// by rename. Events are debounced (configSettle) and only a change of the
// content counts: a touch, or a swap to identical content, reloads
// nothing. A file that cannot be read is left to the reload that follows
// its next change (the old config stays in force meanwhile).
func watchConfig(ctx context.Context, path string, changed func(), log *slog.Logger) {
	last := configDigest(path)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		log.Warn("config changes are noticed only every 10s (no inotify)", "err", err)
	} else {
		defer w.Close()
		dirs := map[string]bool{filepath.Dir(path): true}
		// A config that is a symlink into another directory (not the
		// kubelet's, whose ..data lives beside it) changes there.
		if real, err := filepath.EvalSymlinks(path); err == nil {
			dirs[filepath.Dir(real)] = true
		}
		for d := range dirs {
			if err := w.Add(d); err != nil {
				log.Warn("config directory not watched; changes are noticed only every 10s", "dir", d, "err", err)
			}
		}
	}
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w != nil {
		events, errs = w.Events, w.Errors
	}
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	poll := time.NewTicker(configPoll)
	defer poll.Stop()
	check := func() {
		if now := configDigest(path); !bytes.Equal(now, last) {
			last = now
			changed()
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle.Reset(configSettle)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			log.Debug("config watch", "err", err)
			settle.Reset(configSettle)
		case <-settle.C:
			check()
		case <-poll.C:
			check()
		}
	}
}

// configDigest is a hash of the file's content; nil if it cannot be read.
func configDigest(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	sum := sha256.Sum256(data)
	return sum[:]
}
