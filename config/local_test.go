package config

import (
	"net/netip"
	"strings"
	"testing"
)

func TestLocalAddresses(t *testing.T) {
	c, err := load(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if c.DNS.LocalInterface != "egressd0" || c.DNS.Local4 != netip.MustParseAddr("169.254.53.53") || c.DNS.Local6 != netip.MustParseAddr("fd65:6772:6573::53") {
		t.Errorf("defaults: %q %v %v", c.DNS.LocalInterface, c.DNS.Local4, c.DNS.Local6)
	}
	c, err = load(t, "dns:\n  local_ipv4: 169.254.99.1\n", "EGRESSD_DNS_LOCAL_IPV6=fd12:3456::1", "EGRESSD_DNS_LOCAL_INTERFACE=egr1")
	if err != nil {
		t.Fatal(err)
	}
	if c.DNS.LocalInterface != "egr1" || c.DNS.Local4 != netip.MustParseAddr("169.254.99.1") || c.DNS.Local6 != netip.MustParseAddr("fd12:3456::1") {
		t.Errorf("file and environment: %q %v %v", c.DNS.LocalInterface, c.DNS.Local4, c.DNS.Local6)
	}
}

func TestLocalAddressesInvalid(t *testing.T) {
	for _, tt := range []struct{ yaml, want string }{
		{"dns:\n  local_ipv4: fd00::1\n", `dns.local_ipv4: "fd00::1" is of the other address family`},
		{"dns:\n  local_ipv4: 169.254.53\n", `dns.local_ipv4: "169.254.53" is not an IPv4 address`},
		{"dns:\n  local_ipv4: 169.254.169.254\n", `dns.local_ipv4: "169.254.169.254" is the cloud metadata service's address`},
		{"dns:\n  local_ipv4: 169.254.20.10\n", `dns.local_ipv4: "169.254.20.10" is NodeLocal DNSCache's address`},
		{"dns:\n  local_ipv4: 127.0.0.53\n", `dns.local_ipv4: "127.0.0.53" is a loopback`},
		{"dns:\n  local_ipv4: 255.255.255.255\n", `dns.local_ipv4: "255.255.255.255" is a loopback, unspecified, multicast or broadcast`},
		{"dns:\n  local_ipv6: 169.254.1.2\n", `dns.local_ipv6: "169.254.1.2" is of the other address family`},
		{"dns:\n  local_ipv6: fe80::53\n", `dns.local_ipv6: "fe80::53" is link-local`},
		{"dns:\n  local_ipv6: \"::1\"\n", `dns.local_ipv6: "::1" is a loopback`},
		{"dns:\n  local_ipv6: \"\"\n", `dns.local_ipv6: "" is not an IPv6 address`},
		{"dns:\n  local_interface: lo\n", `dns.local_interface: "lo" cannot be created`},
		{"dns:\n  local_interface: egressd-local-dns\n", `dns.local_interface: "egressd-local-dns" is longer than an interface name`},
		{"dns:\n  local_interface: \"egr*\"\n", `dns.local_interface: "egr*" has a character`},
		{"dns:\n  local_interface: cali0\nfirewall:\n  containers: [\"cali*\"]\n", `dns.local_interface: "cali0" matches firewall.containers[0] ("cali*")`},
	} {
		_, err := load(t, tt.yaml)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: got %v, want %q", tt.yaml, err, tt.want)
		}
	}
}
