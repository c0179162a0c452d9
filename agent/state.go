package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/egressd/egressd/rules"
)

// stateFile is the name of the learned-address file in state_dir.
//
// The format is line based so that 100 000 entries are written in a few
// milliseconds:
//
//	egressd-learned 1
//	ADDRESS<TAB>EXPIRY (Unix ms)<TAB>NAME,NAME...
//	end COUNT
//
// The trailer tells a complete file from a truncated one.
const (
	stateFile   = "learned.tsv"
	stateHeader = "egressd-learned 1"
)

// saveState writes the learned addresses atomically: a temp file in the
// same directory, fsync, rename, fsync of the directory. A crash leaves
// either the old or the new file, never a torn one.
func saveState(dir string, entries []rules.Element) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	w := bufio.NewWriterSize(tmp, 64<<10)
	w.WriteString(stateHeader + "\n")
	var num []byte
	for _, e := range entries {
		w.WriteString(e.Addr.String())
		w.WriteByte('\t')
		num = strconv.AppendInt(num[:0], e.Expires.UnixMilli(), 10)
		w.Write(num)
		w.WriteByte('\t')
		w.WriteString(e.Names)
		w.WriteByte('\n')
	}
	fmt.Fprintf(w, "end %d\n", len(entries))
	err = w.Flush() // bufio keeps the first write error
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
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
// missing file is no error; a corrupt or truncated one is reported, and
// nothing of it is used, so that the caller can log it and start without.
func loadState(dir string, now time.Time) ([]rules.Element, error) {
	path := filepath.Join(dir, stateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	out, err := parseState(data, now)
	if err != nil {
		return nil, fmt.Errorf("load state %s: %w", path, err)
	}
	return out, nil
}

func parseState(data []byte, now time.Time) ([]rules.Element, error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	if !sc.Scan() {
		return nil, errors.New("corrupt: empty")
	}
	if h := sc.Text(); h != stateHeader {
		return nil, fmt.Errorf("corrupt or unknown format: first line %.40q", h)
	}
	var out []rules.Element
	lines := 0
	for sc.Scan() {
		line := sc.Text()
		if n, ok := strings.CutPrefix(line, "end "); ok {
			if count, err := strconv.Atoi(n); err != nil || count != lines || sc.Scan() {
				return nil, fmt.Errorf("corrupt: trailer %q after %d entries", line, lines)
			}
			return out, nil
		}
		lines++
		f := strings.Split(line, "\t")
		if len(f) != 3 {
			return nil, fmt.Errorf("corrupt: line %d", lines+1)
		}
		a, err := netip.ParseAddr(f[0])
		if err != nil {
			return nil, fmt.Errorf("corrupt: line %d: %w", lines+1, err)
		}
		ms, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("corrupt: line %d: %w", lines+1, err)
		}
		exp := time.UnixMilli(ms)
		if !exp.After(now) {
			continue
		}
		out = append(out, rules.Element{Addr: a, Expires: exp, Names: f[2]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("corrupt: %w", err)
	}
	return nil, fmt.Errorf("truncated: no trailer after %d entries", lines)
}
