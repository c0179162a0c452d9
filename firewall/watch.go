package firewall

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressd/egressd/rules"
)

// Watch calls changed with a reason whenever another process changes
// nftables in a way that may affect table inet egressd: any change of that
// table (`nft flush ruleset` deletes every table) or of its sets'
// elements. Changes egressd makes itself are ignored. Watch returns when
// ctx ends; if it loses events (ENOBUFS) or its socket fails, it says so
// through changed (ReasonEventsLost) and carries on: the caller must then
// check everything, rules and elements.
//
// It reads the nftables netlink group itself instead of using
// nftables.Monitor: the group carries a message for every element egressd
// adds, and decoding each of them more than doubled the cost of an answer.
// Here messages are read into one buffer and looked at in place; only the
// first of a transaction that may be about egressd's table is decoded.
func (f *Firewall) Watch(ctx context.Context, changed func(reason string)) {
	for ctx.Err() == nil {
		err := f.watch(ctx, changed)
		if ctx.Err() != nil {
			return
		}
		changed(ReasonEventsLost + ": " + err.Error())
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (f *Firewall) watch(ctx context.Context, changed func(string)) error {
	// A raw socket read into one buffer: every element egressd adds
	// comes back as a notification, so receiving must cost next to
	// nothing (a netlink.Conn allocates every message).
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("netlink socket: %w", err)
	}
	sock := os.NewFile(uintptr(fd), "nftables events") // in Go's poller: fd is non-blocking
	defer sock.Close()
	stop := context.AfterFunc(ctx, func() { sock.Close() })
	defer stop()
	size := 8 << 20 // bursts of element notifications
	if n, ok := testEventBuffer(); ok {
		size = n // a test hook, testhooks.go
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1 << (unix.NFNLGRP_NFTABLES - 1)}); err != nil {
		return fmt.Errorf("join the nftables group: %w", err)
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	reason := "" // of the batch being received; a NEWGEN message ends it
	for {
		var n int
		var rerr error
		if err := rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Read(int(fd), buf)
			return rerr != unix.EAGAIN
		}); err != nil {
			return err
		}
		if rerr != nil {
			return fmt.Errorf("receive nftables events: %w", rerr)
		}
		msgs, err := parseMessages(buf[:n])
		if err != nil {
			return fmt.Errorf("receive nftables events: %w", err)
		}
		for _, m := range msgs {
			typ, data := uint16(m.Header.Type), m.Data
			if typ>>8 != unix.NFNL_SUBSYS_NFTABLES {
				continue
			}
			switch t := int(typ & 0xff); t {
			case unix.NFT_MSG_NEWGEN:
				if reason != "" && !ours(genPID(data)) {
					changed(reason)
				}
				reason = ""
			case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
				unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET,
				unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
				if reason == "" && ourTable(data) {
					reason = fmt.Sprintf("another process changed table inet %s (message %d)", rules.TableName, t)
					if t == unix.NFT_MSG_NEWSETELEM || t == unix.NFT_MSG_DELSETELEM {
						reason = ReasonElementsChanged
					}
				}
			}
		}
	}
}

// ourTable reports whether an nftables message (nfgenmsg, then attributes)
// is about table inet egressd: in every message type watched, attribute 1
// names the table.
func ourTable(data []byte) bool {
	if len(data) < 4 || data[0] != unix.NFPROTO_INET {
		return false
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return false
	}
	for ad.Next() {
		if ad.Type() == 1 {
			return ad.String() == rules.TableName
		}
	}
	return false
}

// genPID returns the process that made a ruleset generation.
func genPID(data []byte) uint32 {
	if len(data) < 4 {
		return 0
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return 0
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_GEN_PROC_PID {
			return ad.Uint32()
		}
	}
	return 0
}

// ours reports whether the process that made a ruleset generation is
// this one. The kernel reports the committing thread's id, which for a Go
// program is any of its threads.
func ours(tid uint32) bool {
	if tid == uint32(os.Getpid()) {
		return true
	}
	_, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid))
	return err == nil
}

// Reasons Watch gives besides rule changes.
const (
	// ReasonElementsChanged: another process added or deleted elements of
	// egressd's sets. Drift cannot see it; Audit repairs it.
	ReasonElementsChanged = "set elements changed by another process"
	// ReasonEventsLost: the event socket overflowed or failed; anything may
	// have changed meanwhile.
	ReasonEventsLost = "nftables events lost"
)
