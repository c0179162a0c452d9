package dnsresolve

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/egressd/egressd/config"
)

// coveringRecorder is an Allower whose addresses are always open long
// enough, as firewall.Firewall reports for an address it holds.
type coveringRecorder struct{ recorder }

func (*coveringRecorder) Covered(string, []string, []netip.Addr, time.Time) bool { return true }

func packQuery(t testing.TB, name string, qtype uint16, edit func(*dns.Msg)) []byte {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.Id = 0xbeef
	if edit != nil {
		edit(m)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func withEDNS(size uint16, opts ...dns.EDNS0) func(*dns.Msg) {
	return func(m *dns.Msg) {
		m.SetEdns0(size, false)
		m.IsEdns0().Option = opts
	}
}

func TestParseQuery(t *testing.T) {
	cookie := &dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "0123456789abcdef"}
	for _, tt := range []struct {
		name  string
		query []byte
		key   string // "" when the fast path must decline
		size  int
	}{
		{"plain A", packQuery(t, "a.example.", dns.TypeA, nil), "a.example.\x00\x01", 512},
		{"AAAA, mixed case", packQuery(t, "A.Ex-Am_ple.", dns.TypeAAAA, nil), "a.ex-am_ple.\x00\x1c", 512},
		{"EDNS 4096", packQuery(t, "a.example.", dns.TypeA, withEDNS(4096)), "a.example.\x00\x01", maxUDPAnswer},
		{"EDNS 100", packQuery(t, "a.example.", dns.TypeA, withEDNS(100)), "a.example.\x00\x01", 512},
		{"EDNS cookie", packQuery(t, "a.example.", dns.TypeA, withEDNS(1232, cookie)), "a.example.\x00\x01", 1232},
		{"EDNS subnet", packQuery(t, "a.example.", dns.TypeA, withEDNS(1232, &dns.EDNS0_SUBNET{Code: dns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(192, 0, 2, 0)})), "", 0},
		{"TXT", packQuery(t, "a.example.", dns.TypeTXT, nil), "", 0},
		{"class CH", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) { m.Question[0].Qclass = dns.ClassCHAOS }), "", 0},
		{"response", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) { m.Response = true }), "", 0},
		{"NOTIFY", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) { m.Opcode = dns.OpcodeNotify }), "", 0},
		{"escaped dot", packQuery(t, `a\.b.example.`, dns.TypeA, nil), "", 0},
		{"space", packQuery(t, `a\032b.example.`, dns.TypeA, nil), "", 0},
		{"root", packQuery(t, ".", dns.TypeA, nil), "", 0},
		{"answer section", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) { m.Answer = rrs(t, "a.example. 60 A 192.0.2.1") }), "", 0},
		{"two additional", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) {
			m.SetEdns0(512, false)
			m.Extra = append(m.Extra, rrs(t, "a.example. 60 A 192.0.2.1")...)
		}), "", 0},
		{"additional not OPT", packQuery(t, "a.example.", dns.TypeA, func(m *dns.Msg) { m.Extra = rrs(t, "a.example. 60 A 192.0.2.1") }), "", 0},
		{"trailing byte", append(packQuery(t, "a.example.", dns.TypeA, nil), 0), "", 0},
		{"short question", packQuery(t, "a.example.", dns.TypeA, nil)[:20], "", 0},
		{"header only", packQuery(t, "a.example.", dns.TypeA, nil)[:12], "", 0},
		{"compression pointer", append(packQuery(t, "a.example.", dns.TypeA, nil)[:12], 0xc0, 12, 0, 1, 0, 1), "", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			q, key, ok := parseQuery(tt.query, nil)
			if ok != (tt.key != "") {
				t.Fatalf("ok %v, want %v", ok, !ok)
			}
			if ok && (string(key) != tt.key || q.size != tt.size) {
				t.Errorf("key %q size %d, want %q %d", key, q.size, tt.key, tt.size)
			}
		})
	}
}

// What parseQuery accepts, miekg/dns reads as the same question.
func FuzzParseQuery(f *testing.F) {
	f.Add(packQuery(f, "a.example.", dns.TypeA, nil))
	f.Add(packQuery(f, "A.b-C.example.", dns.TypeAAAA, withEDNS(1232, &dns.EDNS0_PADDING{Padding: make([]byte, 8)})))
	f.Fuzz(func(t *testing.T, b []byte) {
		q, key, ok := parseQuery(b, nil)
		if !ok {
			return
		}
		m := new(dns.Msg)
		if err := m.Unpack(b); err != nil {
			t.Fatalf("fast path accepts what miekg/dns does not: %v", err)
		}
		want := string(cacheKey(dns.CanonicalName(m.Question[0].Name), m.Question[0].Qtype))
		if string(key) != want || q.edns != (m.IsEdns0() != nil) {
			t.Fatalf("key %q edns %v, miekg/dns reads %q %v", key, q.edns, want, m.IsEdns0() != nil)
		}
	})
}

// The fast path's answer is byte for byte the slow path's, whatever the
// query's spelling, flags and EDNS, and as the answer ages.
func TestFastReplyIsServeDNSReply(t *testing.T) {
	p, _, _ := newTestProxy(t, &coveringRecorder{})
	now := time.Now()
	p.now = func() time.Time { return now }
	conf := p.conf.Load()
	// A negative answer with its SOA, cached for the SOA's minimum.
	soa := rrs(t, "cognitive.microsoft.com. 300 SOA ns. host. 1 2 3 4 60")
	conf.cache.put("none.cognitive.microsoft.com.", dns.TypeA, &Answer{Rcode: dns.RcodeNameError, SOA: soa}, now, nil)

	queries := map[string][]byte{
		"CNAME chain":       packQuery(t, "myres.cognitiveservices.azure.com.", dns.TypeA, nil),
		"AAAA, 0x20":        packQuery(t, "MyRes.CognitiveServices.Azure.com.", dns.TypeAAAA, nil),
		"RD off, CD on":     packQuery(t, "myres.cognitiveservices.azure.com.", dns.TypeA, func(m *dns.Msg) { m.RecursionDesired, m.CheckingDisabled = false, true }),
		"EDNS":              packQuery(t, "myres.cognitiveservices.azure.com.", dns.TypeA, withEDNS(4096)),
		"EDNS cookie":       packQuery(t, "myres.cognitiveservices.azure.com.", dns.TypeAAAA, withEDNS(1232, &dns.EDNS0_COOKIE{Code: dns.EDNS0COOKIE, Cookie: "0123456789abcdef"})),
		"NXDOMAIN with SOA": packQuery(t, "none.cognitive.microsoft.com.", dns.TypeA, withEDNS(1232)),
	}
	for name, query := range queries {
		slow := func() []byte {
			r := new(dns.Msg)
			if err := r.Unpack(query); err != nil {
				t.Fatal(err)
			}
			m := p.reply(r, asker{})
			fitUDP(m, r)
			b, err := m.Pack()
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		slow() // resolves and caches
		for _, age := range []time.Duration{0, 1500 * time.Millisecond, 59 * time.Second} {
			p.now = func() time.Time { return now.Add(age) }
			var key []byte
			fast, ok := p.fastReply(conf, query, nil, asker{}, &key, new([]string), p.now())
			if !ok {
				t.Fatalf("%s aged %v: not answered on the fast path", name, age)
			}
			if want := slow(); !bytes.Equal(fast, want) {
				m := new(dns.Msg)
				_ = m.Unpack(fast)
				t.Errorf("%s aged %v:\nfast %x\n%v\nslow %x", name, age, fast, m, want)
			}
		}
		p.now = func() time.Time { return now }
	}

	// Declined: an answer that would be truncated, one whose addresses
	// must be opened again, and an expired one.
	big := packQuery(t, "big.cognitive.microsoft.com.", dns.TypeA, nil)
	var key []byte
	if _, ok := p.fastReply(conf, big, nil, asker{}, &key, new([]string), now); ok {
		t.Error("an answer larger than 512 bytes for a client without EDNS: answered on the fast path")
	}
	if _, ok := p.fastReply(conf, queries["CNAME chain"], nil, asker{}, &key, new([]string), now.Add(61*time.Second)); ok {
		t.Error("expired answer: answered on the fast path")
	}
	o := testOptions()
	o.Rules, o.Upstream, o.Allower, o.Guard = conf.opts.Rules, conf.opts.Upstream, &recorder{}, docGuard
	p.Update(o)
	plain := p.conf.Load()
	plain.cache = conf.cache
	if _, ok := p.fastReply(plain, queries["CNAME chain"], nil, asker{}, &key, new([]string), now); ok {
		t.Error("addresses not known to be open: answered on the fast path")
	}
}

// Answers leave from the address the query was sent to, on the fast path
// and the slow path: the DNS redirect's reverse NAT and a connected client
// socket accept nothing else.
func TestServeAnswersFromQueriedAddress(t *testing.T) {
	rec := &coveringRecorder{}
	p, up, _ := newTestProxy(t, rec)
	port := strconv.Itoa(serveProxy(t, p))
	servers := []string{net.JoinHostPort("127.0.0.2", port), net.JoinHostPort("127.0.0.1", port)}
	if c, err := net.ListenPacket("udp6", "[::1]:0"); err == nil {
		c.Close()
		servers = append(servers, net.JoinHostPort("::1", port))
	}
	for _, server := range servers {
		for i := range 3 { // slow path (resolve), then fast path (cached)
			r := ask(t, server, "myres.cognitiveservices.azure.com.", dns.TypeA, "udp", i == 2)
			if len(r.Answer) != 2 {
				t.Fatalf("%s, query %d: %v", server, i, r)
			}
		}
	}
	if n := up.queries.Load(); n != 2 {
		t.Errorf("upstream asked %d times, want 2 (one chain, cached after)", n)
	}
}

func BenchmarkFastReply(b *testing.B) {
	p, _, _ := newTestProxy(b, &coveringRecorder{})
	benchFastReply(b, p, asker{})
}

// benchFastReply measures the fast path's answer to a, once the slow path
// has cached it.
func benchFastReply(b *testing.B, p *Proxy, a asker) {
	query := packQuery(b, "myres.cognitiveservices.azure.com.", dns.TypeA, nil)
	r := new(dns.Msg)
	_ = r.Unpack(query)
	p.reply(r, a)
	conf, now := p.conf.Load(), time.Now()
	var key []byte
	var rules []string
	dst := make([]byte, 0, maxUDPAnswer)
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := p.fastReply(conf, query, dst, a, &key, &rules, now); !ok {
			b.Fatal("not answered")
		}
	}
}

// Messages that are not queries the proxy can take get what miekg/dns's
// own server sends: nothing for a response, NOTIMP or FORMERR otherwise.
func TestServeRejects(t *testing.T) {
	_, _, addr := newTestProxy(t, &recorder{})
	for _, tt := range []struct {
		name  string
		msg   []byte
		rcode int // -1: no answer
	}{
		{"response", packQuery(t, "a.cognitive.microsoft.com.", dns.TypeA, func(m *dns.Msg) { m.Response = true }), -1},
		{"UPDATE", packQuery(t, "a.cognitive.microsoft.com.", dns.TypeA, func(m *dns.Msg) { m.Opcode = dns.OpcodeUpdate }), dns.RcodeNotImplemented},
		{"NOTIFY", packQuery(t, "a.cognitive.microsoft.com.", dns.TypeA, func(m *dns.Msg) { m.Opcode = dns.OpcodeNotify }), dns.RcodeNotImplemented},
		{"two questions", packQuery(t, "a.cognitive.microsoft.com.", dns.TypeA, func(m *dns.Msg) { m.Question = append(m.Question, m.Question[0]) }), dns.RcodeFormatError},
		{"cut short", packQuery(t, "a.cognitive.microsoft.com.", dns.TypeA, nil)[:20], dns.RcodeFormatError},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("udp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tt.msg); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			buf := make([]byte, 512)
			n, err := c.Read(buf)
			if tt.rcode < 0 {
				if err == nil {
					t.Errorf("answered %x, want no answer", buf[:n])
				}
				return
			}
			r := new(dns.Msg)
			if err != nil || r.Unpack(buf[:n]) != nil {
				t.Fatalf("no answer: %v", err)
			}
			if r.Rcode != tt.rcode || r.Id != 0xbeef || !r.Response {
				t.Errorf("answer %v, want rcode %s", r, dns.RcodeToString[tt.rcode])
			}
		})
	}
}

// rulesCoverer says every address is open, and records for which rules it
// was asked.
type rulesCoverer struct {
	recorder
	mu    sync.Mutex
	asked [][]string
}

func (c *rulesCoverer) Covered(_ string, rules []string, _ []netip.Addr, _ time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.asked = append(c.asked, slices.Clone(rules))
	return true
}

// perSourceProxy is a test proxy whose rules apply to sources: ra to
// 10.1.0.0/24 (*.cognitiveservices.azure.com), rb to 10.2.0.0/24
// (*.cognitive.microsoft.com).
func perSourceProxy(t testing.TB, allow Allower) *Proxy {
	p, up, _ := newTestProxy(t, allow)
	o := testOptions()
	o.Rules = []config.Rule{
		{Name: "ra", From: config.From{Sources: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}}, Domains: []string{"*.cognitiveservices.azure.com"}},
		{Name: "rb", From: config.From{Sources: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}}, Domains: []string{"*.cognitive.microsoft.com"}},
	}
	o.Clients = func(netip.Addr) Client { return Client{Interface: "br-lab"} }
	o.Upstream = NewUpstream([]netip.AddrPort{up.addr}, 0, time.Second)
	o.Allower, o.Guard = allow, docGuard
	o.MinTTL, o.Grace = time.Second, 2*time.Second
	p.Update(o)
	return p
}

// With rules per source, a cached answer is still sent on the fast path,
// opened for the asking client's rules, and never to a client none of
// whose rules allow the name.
func TestFastReplyFollowsClientRules(t *testing.T) {
	rec := &rulesCoverer{}
	p := perSourceProxy(t, rec)
	a := asker{addr: netip.MustParseAddr("10.1.0.5")}
	b := asker{addr: netip.MustParseAddr("10.2.0.5")}
	query := packQuery(t, "myres.cognitiveservices.azure.com.", dns.TypeA, nil)
	r := new(dns.Msg)
	if err := r.Unpack(query); err != nil {
		t.Fatal(err)
	}
	if m := p.reply(r, a); m.Rcode != dns.RcodeSuccess || len(m.Answer) == 0 {
		t.Fatalf("slow path to the rule's client: %v", m)
	}
	conf, now := p.conf.Load(), time.Now()
	var key []byte
	rec.asked = nil
	if _, ok := p.fastReply(conf, query, nil, a, &key, new([]string), now); !ok {
		t.Fatal("the rule's client: not answered on the fast path")
	}
	if want := [][]string{{"ra"}}; !slices.EqualFunc(rec.asked, want, slices.Equal) {
		t.Errorf("fast path checked rules %v, want %v", rec.asked, want)
	}
	if _, ok := p.fastReply(conf, query, nil, b, &key, new([]string), now); ok {
		t.Error("a client of another rule: answered on the fast path")
	}
	if m := p.reply(r, b); m.Rcode != dns.RcodeRefused {
		t.Errorf("a client of another rule: %s, want REFUSED", dns.RcodeToString[m.Rcode])
	}
}

// The fast path with rules per source: the price of asking who the client
// is (BenchmarkFastReply is the uniform case).
func BenchmarkFastReplyRules(b *testing.B) {
	benchFastReply(b, perSourceProxy(b, &coveringRecorder{}), asker{addr: netip.MustParseAddr("10.1.0.5")})
}
