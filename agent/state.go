package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/egressd/egressd/rules"
)

// stateFile is the name of the learned-address file in state_dir.
const stateFile = "learned.json"

type stateDoc struct {
	Version int            `json:"version"`
	Saved   time.Time      `json:"saved"`
	Learned []stateElement `json:"learned"`
}

type stateElement struct {
	Addr    netip.Addr `json:"addr"`
	Expires time.Time  `json:"expires"`
	Names   []string   `json:"names,omitempty"`
}

// learned is an address the firewall allows and the names it answered.
type learned struct {
	rules.Element
	Names []string
}

// saveState writes the learned addresses atomically: a temp file in the
// same directory, fsync, rename, fsync of the directory. A crash leaves
// either the old or the new file, never a torn one.
func saveState(dir string, entries []learned, now time.Time) error {
	doc := stateDoc{Version: 1, Saved: now.UTC(), Learned: make([]stateElement, 0, len(entries))}
	for _, e := range entries {
		doc.Learned = append(doc.Learned, stateElement{Addr: e.Addr, Expires: e.Expires.UTC(), Names: e.Names})
	}
	data, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("save state %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("save state %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save state %s: %w", tmp.Name(), err)
	}
	path := filepath.Join(dir, stateFile)
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("save state %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// loadState reads the learned addresses that are still valid at now. A
// missing file is no error; a corrupt one is reported so that the caller can
// log it and start without it.
func loadState(dir string, now time.Time) ([]learned, error) {
	path := filepath.Join(dir, stateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("load state %s: corrupt: %w", path, err)
	}
	if doc.Version != 1 {
		return nil, fmt.Errorf("load state %s: unknown version %d", path, doc.Version)
	}
	var out []learned
	for _, e := range doc.Learned {
		if e.Addr.IsValid() && e.Expires.After(now) {
			out = append(out, learned{Element: rules.Element{Addr: e.Addr, Expires: e.Expires}, Names: e.Names})
		}
	}
	return out, nil
}
