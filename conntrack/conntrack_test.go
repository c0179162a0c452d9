package conntrack

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The request is the message `conntrack -D -p udp -s 192.0.2.1 -d
// 198.51.100.53 --sport 40000 --dport 53` sends, attribute for attribute.
func TestRequest(t *testing.T) {
	c := &Conn{seq: 7}
	b := c.request(unix.IPPROTO_UDP, netip.MustParseAddrPort("192.0.2.1:40000"), netip.MustParseAddrPort("198.51.100.53:53"))
	want := []byte{
		72, 0, 0, 0, 2, 1, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0, // header: DELETE, REQUEST|ACK, seq 7
		2, 0, 0, 0, // nfgenmsg: AF_INET, v0
		52, 0, 1, 0x80, // CTA_TUPLE_ORIG
		20, 0, 1, 0x80, 8, 0, 1, 0, 192, 0, 2, 1, 8, 0, 2, 0, 198, 51, 100, 53,
		28, 0, 2, 0x80, 5, 0, 1, 0, 17, 0, 0, 0, 6, 0, 2, 0, 0x9c, 0x40, 0, 0, 6, 0, 3, 0, 0, 53, 0, 0,
	}
	if string(b) != string(want) {
		t.Errorf("request\n got %v\nwant %v", b, want)
	}
}

// inTrackedNS moves the calling goroutine, locked to its thread, into a
// new network namespace with connection tracking on; the returned
// function moves it back.
func inTrackedNS(tb testing.TB) func() {
	if os.Geteuid() != 0 {
		tb.Skip("needs root (a network namespace and conntrack)")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		tb.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		tb.Fatal(err)
	}
	back := func() {
		_ = netns.Set(orig)
		ns.Close()
		orig.Close()
		runtime.UnlockOSThread()
	}
	// Connection tracking starts in a namespace once a rule uses it.
	for _, cmd := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"nft", "add table ip t; add chain ip t o { type filter hook output priority 0; ct state new accept; }"},
	} {
		if out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			back()
			tb.Skipf("%v: %v %s", cmd, err, out)
		}
	}
	return back
}

// Delete removes exactly the entry of one flow, in a network namespace of
// the test's own.
func TestDelete(t *testing.T) {
	defer inTrackedNS(t)()
	send := func(port int) netip.AddrPort {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 53})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("q")); err != nil {
			t.Fatal(err)
		}
		return c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	a, b := send(40001), send(40002)
	c, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := netip.MustParseAddrPort("127.0.0.2:53")
	if err := c.Delete(unix.IPPROTO_UDP, a, dst); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(unix.IPPROTO_UDP, a, dst); err != nil {
		t.Errorf("deleting an absent entry: %v, want nil", err)
	}
	flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	var ports []uint16
	for _, f := range flows {
		if f.Forward.DstPort == 53 {
			ports = append(ports, f.Forward.SrcPort)
		}
	}
	if len(ports) != 1 || ports[0] != b.Port() {
		t.Errorf("flows left from ports %v, want only %d", ports, b.Port())
	}
}

// The cost egressd adds to each upstream exchange: deleting its entry.
func BenchmarkDelete(b *testing.B) {
	defer inTrackedNS(b)()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c, err := Open()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	src := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), uint16(1024+i%60000))
		b.StopTimer()
		if _, err := conn.WriteToUDPAddrPort([]byte("q"), dst); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := c.Delete(unix.IPPROTO_UDP, src, dst); err != nil {
			b.Fatal(err)
		}
	}
}
