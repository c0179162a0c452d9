package ifname

import "testing"

func TestMatch(t *testing.T) {
	pats := []Pattern{"docker0", "br-*"}
	for name, want := range map[string]Pattern{"docker0": "docker0", "docker01": "", "br-1234": "br-*", "br-": "br-*", "br0": "", "eth0": ""} {
		if got, ok := MatchAny(name, pats); got != want || ok != (want != "") {
			t.Errorf("MatchAny(%q) = %q, %v; want %q", name, got, ok, want)
		}
	}
	if !Any.Match("eth0") {
		t.Error(`"*" does not match eth0`)
	}
}

func TestCheck(t *testing.T) {
	for p, ok := range map[Pattern]bool{"docker0": true, "br-*": true, "*": false, "": false, "b*r": false, "a b": false,
		"averyveryverylongname": false, "averyverylongna*": true, "averyverylongnam*": false} {
		if err := p.Check(); (err == nil) != ok {
			t.Errorf("Check(%q) = %v, want ok %v", p, err, ok)
		}
	}
	for n, ok := range map[string]bool{"egressd0": true, "": false, "lo": false, "a:b": false, "abcdefghijklmnop": false} {
		if err := CheckName(n); (err == nil) != ok {
			t.Errorf("CheckName(%q) = %v, want ok %v", n, err, ok)
		}
	}
}
