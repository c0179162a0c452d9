// Command responder is the smallest DNS server that is still honest about
// the socket path: it answers A queries for a fixed list of names from
// pre-packed answers, reads and writes in batches (recvmmsg/sendmmsg), one
// goroutine per SO_REUSEPORT socket, and sends every answer from the
// address the query was sent to (IP_PKTINFO). With -transparent the
// sockets are IP_TRANSPARENT, so they receive what nft `tproxy` hands them
// and may answer from an address the host does not own (the resolver the
// client asked). It exists to measure the kernel's share of a DNS proxy's
// cost (bench/kernelpath), not to serve anyone.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/net/ipv4"
)

const batch = 64

func main() {
	addr := flag.String("addr", "0.0.0.0:53", "UDP address to listen on")
	sockets := flag.Int("sockets", 2, "SO_REUSEPORT sockets, one goroutine each")
	transparent := flag.Bool("transparent", false, "IP_TRANSPARENT sockets (nft tproxy)")
	names := flag.String("names", "", "file of names to answer (dnsperf query file: name type per line)")
	flag.Parse()
	answers, err := load(*names)
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
			if serr == nil && *transparent {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, syscall.IP_TRANSPARENT, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	for range *sockets {
		c, err := lc.ListenPacket(ctx, "udp4", *addr)
		if err != nil {
			log.Fatal(err)
		}
		go serve(ipv4.NewPacketConn(c), answers)
	}
	fmt.Println("ready") // run.sh waits for this line
	<-ctx.Done()
}

// load pre-packs one answer record per name: a pointer to the question's
// name, type A, class IN, TTL 60, and an address made from the line number.
func load(path string) (map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string][]byte{}
	s := bufio.NewScanner(f)
	for i := 0; s.Scan(); i++ {
		name, _, _ := strings.Cut(strings.TrimSpace(s.Text()), " ")
		if name == "" {
			continue
		}
		rr := []byte{0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, byte(113 + i>>8), byte(i)}
		m[wireName(name)] = rr
	}
	return m, s.Err()
}

// wireName is name in lower-case wire format without the root label, the
// key load and answer agree on.
func wireName(name string) string {
	var b []byte
	for _, l := range strings.Split(strings.Trim(strings.ToLower(name), "."), ".") {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	return string(b)
}

func serve(c *ipv4.PacketConn, answers map[string][]byte) {
	if err := c.SetControlMessage(ipv4.FlagDst, true); err != nil {
		log.Fatal(err)
	}
	in := make([]ipv4.Message, batch)
	out := make([]ipv4.Message, batch)
	for i := range in {
		in[i].Buffers = [][]byte{make([]byte, 1500)}
		in[i].OOB = ipv4.NewControlMessage(ipv4.FlagDst)
		out[i].Buffers = [][]byte{make([]byte, 1500)}
	}
	// The answer's IP_PKTINFO by destination: one per address queries
	// arrive at, marshalled once.
	pktinfo := map[netip.Addr][]byte{}
	var cm ipv4.ControlMessage
	key := make([]byte, 0, 256)
	for {
		n, err := c.ReadBatch(in, 0)
		if err != nil {
			log.Fatal(err)
		}
		k := 0
		for _, m := range in[:n] {
			q := m.Buffers[0][:m.N]
			if err := cm.Parse(m.OOB[:m.NN]); err != nil || cm.Dst == nil {
				continue
			}
			l := answer(out[k].Buffers[0][:cap(out[k].Buffers[0])], q, answers, key)
			if l == 0 {
				continue
			}
			dst, _ := netip.AddrFromSlice(cm.Dst.To4())
			oob, ok := pktinfo[dst]
			if !ok {
				oob = (&ipv4.ControlMessage{Src: cm.Dst}).Marshal()
				pktinfo[dst] = oob
			}
			out[k].Buffers[0] = out[k].Buffers[0][:l]
			out[k].OOB = oob
			out[k].Addr = m.Addr
			k++
		}
		for sent := 0; sent < k; {
			w, err := c.WriteBatch(out[sent:k], 0)
			if err != nil {
				log.Print(err)
				break
			}
			sent += w
		}
	}
}

// answer writes the answer to query q into buf and returns its length, 0
// for a query it drops (not a single question, or truncated). The question
// is parsed by hand: header, name labels, type and class.
func answer(buf, q []byte, answers map[string][]byte, key []byte) int {
	if len(q) < 12 || q[2]&0x80 != 0 || binary.BigEndian.Uint16(q[4:]) != 1 {
		return 0
	}
	key = key[:0]
	i := 12
	for i < len(q) && q[i] != 0 {
		l := int(q[i])
		if l > 63 || i+1+l >= len(q) {
			return 0
		}
		key = append(key, q[i])
		for _, c := range q[i+1 : i+1+l] {
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			key = append(key, c)
		}
		i += 1 + l
	}
	end := i + 5 // root label, type, class
	if end > len(q) {
		return 0
	}
	n := copy(buf, q[:end])   // header and question as asked (ID, case)
	buf[2] = 0x84 | q[2]&0x01 // QR, AA, RD as asked
	buf[3] = 0                // NOERROR
	binary.BigEndian.PutUint16(buf[6:], 0)
	binary.BigEndian.PutUint16(buf[8:], 0)
	binary.BigEndian.PutUint16(buf[10:], 0) // no EDNS echoed: answers stay small
	rr, ok := answers[string(key)]
	if !ok || binary.BigEndian.Uint16(q[i+1:]) != 1 {
		buf[3] = 3 // NXDOMAIN (or no data: the benchmark only asks A)
		return n
	}
	binary.BigEndian.PutUint16(buf[6:], 1)
	return n + copy(buf[n:], rr)
}
