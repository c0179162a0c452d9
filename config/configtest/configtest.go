// Package configtest loads configurations for the tests of other packages.
package configtest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/egressd/egressd/config"
)

// Load returns the configuration of yaml over the defaults ("" for the
// defaults alone), failing tb if it does not load.
func Load(tb testing.TB, yaml string) *config.Config {
	tb.Helper()
	path := ""
	if yaml != "" {
		path = filepath.Join(tb.TempDir(), "c.yaml")
		if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	c, err := config.Load(path, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}
