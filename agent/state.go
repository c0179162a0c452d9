package agent

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/egressd/egressd/config"
	"github.com/egressd/egressd/firewall"
)

// stateFile is the name of the learned-address file in state_dir.
//
// The format is line based so that 100 000 entries are written in a few
// milliseconds:
//
//	egressd-learned 2
//	RULE<TAB>ADDRESS<TAB>EXPIRY (Unix ms)<TAB>NAME,NAME...
//	end COUNT
//
// The trailer tells a complete file from a truncated one. Format 1, of
// egressd before rules, has no RULE column: its addresses are the rule
// "allow"'s.
const (
	stateFile     = "learned.tsv"
	stateHeader   = "egressd-learned 2"
	stateHeaderV1 = "egressd-learned 1"
)

// saveState writes the learned addresses in entries atomically: a temp
// file in the same directory, fsync, rename, fsync of the directory. A
// crash leaves either the old or the new file, never a torn one. The
// entries are written as they come (100 000 of them are megabytes); it
// returns how many there were.
func saveState(dir string, entries iter.Seq[firewall.Element]) (int, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, fmt.Errorf("save state: %w", err)
	}
	tmp, err := os.CreateTemp(dir, stateFile+".*")
	if err != nil {
		return 0, fmt.Errorf("save state: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	w := bufio.NewWriterSize(tmp, 64<<10)
	w.WriteString(stateHeader + "\n")
	var line []byte
	n := 0
	for e := range entries {
		line = append(line[:0], cmp.Or(e.Rule, config.RuleAllow)...)
		line = append(line, '\t')
		line = e.Addr.AppendTo(line)
		line = append(line, '\t')
		line = strconv.AppendInt(line, e.Expires.UnixMilli(), 10)
		line = append(line, '\t')
		line = append(line, e.Names...)
		line = append(line, '\n')
		w.Write(line)
		n++
	}
	fmt.Fprintf(w, "end %d\n", n)
	err = w.Flush() // bufio keeps the first write error
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("save state %s: %w", tmp.Name(), err)
	}
	path := filepath.Join(dir, stateFile)
	if err := os.Rename(tmp.Name(), path); err != nil {
		return 0, fmt.Errorf("save state %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return n, nil
}

// loadState reads the learned addresses that are still valid at now. A
// missing file is no error; a corrupt or truncated one is reported, and
// nothing of it is used, so that the caller can log it and start without.
func loadState(dir string, now time.Time) ([]firewall.Element, error) {
	path := filepath.Join(dir, stateFile)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	defer f.Close()
	out, err := parseState(f, now)
	if err != nil {
		return nil, fmt.Errorf("load state %s: %w", path, err)
	}
	return out, nil
}

// parseState reads a state file as it comes, without holding all of it.
func parseState(r io.Reader, now time.Time) ([]firewall.Element, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	if !sc.Scan() {
		if err := sc.Err(); err != nil {
			return nil, err
		}
		return nil, errors.New("corrupt: empty")
	}
	h := sc.Text()
	if h != stateHeader && h != stateHeaderV1 {
		return nil, fmt.Errorf("corrupt or unknown format: first line %.40q", h)
	}
	v1 := h == stateHeaderV1
	var out []firewall.Element
	lines := 0
	for sc.Scan() {
		line := sc.Bytes()
		if n, ok := bytes.CutPrefix(line, []byte("end ")); ok {
			if count, err := strconv.Atoi(string(n)); err != nil || count != lines || sc.Scan() {
				return nil, fmt.Errorf("corrupt: trailer %q after %d entries", line, lines)
			}
			return out, nil
		}
		lines++
		rule := []byte(config.RuleAllow)
		if !v1 {
			var ok bool
			if rule, line, ok = bytes.Cut(line, []byte("\t")); !ok || len(rule) == 0 {
				return nil, fmt.Errorf("corrupt: line %d", lines+1)
			}
		}
		addr, rest, ok1 := bytes.Cut(line, []byte("\t"))
		exp, names, ok2 := bytes.Cut(rest, []byte("\t"))
		if !ok1 || !ok2 || bytes.IndexByte(names, '\t') >= 0 {
			return nil, fmt.Errorf("corrupt: line %d", lines+1)
		}
		var a netip.Addr
		if err := a.UnmarshalText(addr); err != nil || !a.IsValid() {
			return nil, fmt.Errorf("corrupt: line %d: %w", lines+1, cmp.Or(err, errors.New("no address")))
		}
		ms, err := strconv.ParseInt(string(exp), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("corrupt: line %d: %w", lines+1, err)
		}
		e := time.UnixMilli(ms)
		if !e.After(now) {
			continue
		}
		out = append(out, firewall.Element{Rule: string(rule), Addr: a, Expires: e, Names: string(names)})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("corrupt: %w", err)
	}
	return nil, fmt.Errorf("truncated: no trailer after %d entries", lines)
}
