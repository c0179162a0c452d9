#!/usr/bin/env bash
# bash bench/kernelpath/run.sh: what the kernel path of a DNS proxy costs.
# A minimal batched responder (bench/kernelpath/responder) answers dnsperf
# in a "container" namespace across a veth and a bridge, reached five ways:
#
#   direct        responder on the gateway address, port 53, no nftables
#                 (conntrack not even loaded in the namespace): the floor
#   direct+ct     the same with conntrack on (a `ct state` rule, as
#                 egressd's filter has): what conntrack alone costs
#   redirect      query to 192.0.2.53:53, `redirect to :10053` at nat
#                 prerouting (conntrack + NAT), what egressd does today
#   tproxy        query to 192.0.2.53:53, mark + `tproxy to :53` + policy
#                 route to local, conntrack on, no NAT
#   tproxy+notrack  the same with `notrack` for DNS both ways
#
# and two loads: "4ports" (dnsperf's 4 long-lived sockets: conntrack
# entries are made once) and "stub" (a new flow per query, as stubs that
# use a new source port per query make: a new conntrack entry per query).
# Setups are interleaved, ROUNDS rounds, median and range reported, since
# the machine's CPUs are shared; every run is sampled with `perf record -a`
# to split the CPU per query by part of the path. Then `perf record -a -g`
# for the setups in PERF. Needs root, nft, ip, dnsperf, perf, python3.
# Writes nothing in the repository; bench/kernelpath/results.md is written
# by hand from its output.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:/usr/local/go/bin"
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-8}
SETUPS=${SETUPS:-"direct direct+ct redirect tproxy tproxy+notrack"}
LOADS=${LOADS:-"4ports stub"}
PERF=${PERF-"redirect tproxy tproxy+notrack"}
# BR_NF=1: bridged IPv4 goes through the IP hooks at the bridge as well
# (br_netfilter's bridge-nf-call-iptables, which Docker turns on). Then
# tproxy's socket assignment does not survive the frame's way up from the
# bridge, and a tproxied query reaches only a socket the ordinary lookup
# finds: here the responder's, bound to 0.0.0.0:53 (see results.md).
BR_NF=${BR_NF:-1}
out=$(mktemp -d /tmp/kernelpath.XXXX)
H=kp$$-host C=kp$$-ctr
resp_pid=""

cleanup() {
	[ -n "$resp_pid" ] && kill "$resp_pid" 2>/dev/null && wait "$resp_pid" 2>/dev/null
	ip netns del $H 2>/dev/null || true
	ip netns del $C 2>/dev/null || true
}
trap cleanup EXIT

go build -o "$out/responder" ./responder
for i in $(seq 0 999); do echo "n$i.example.com A"; done >"$out/queries"

# The lab: host namespace with a bridge (gateway 172.30.0.1), container
# namespace with a veth on it; 192.0.2.53 stands for an outside resolver,
# reached through the gateway.
ip netns add $H
ip netns add $C
ip -n $H link set lo up
ip -n $C link set lo up
ip link add eth0 netns $C type veth peer name veth0 netns $H
ip -n $H link add br0 type bridge
ip -n $H link set br0 up
ip -n $H link set veth0 master br0 up
ip -n $H addr add 172.30.0.1/24 dev br0
ip netns exec $H sysctl -qw net.bridge.bridge-nf-call-iptables="$BR_NF"
ip -n $C link set eth0 up
ip -n $C addr add 172.30.0.2/24 dev eth0
ip -n $C route add default via 172.30.0.1
# tproxy: marked packets are delivered locally, whatever their destination.
ip -n $H rule add fwmark 1 lookup 100
ip -n $H route add local 0.0.0.0/0 dev lo table 100

# ruleset SETUP prints the host's nft ruleset for a setup.
ruleset() {
	echo "flush ruleset"
	[ "$1" = direct ] && return 0
	# Conntrack is on in every other setup, as egressd's filter turns it on.
	echo 'table ip kp {
		chain forward_ct {
			type filter hook forward priority filter
			ct state established,related accept
		}
	}'
	case $1 in
	redirect)
		echo 'table ip kp {
			chain dns {
				type nat hook prerouting priority dstnat - 1
				iifname "br0" udp dport 53 redirect to :10053
			}
		}' ;;
	tproxy*)
		# Mark first, then tproxy: a query that finds no transparent
		# socket is still routed to the host (and refused there), never
		# forwarded to the resolver it was sent to.
		echo 'table ip kp {
			chain dns {
				type filter hook prerouting priority mangle
				iifname "br0" udp dport 53 meta mark set 1 tproxy to :53 accept
			}
		}' ;;
	esac
	if [ "$1" = tproxy+notrack ]; then
		echo 'table ip kp {
			chain raw_pre {
				type filter hook prerouting priority raw
				iifname "br0" udp dport 53 notrack
			}
			chain raw_out {
				type filter hook output priority raw
				oifname "br0" udp sport 53 notrack
			}
		}'
	fi
	return 0
}

# The stub load: on the way out the container rewrites each query's
# source address to the next of 60 000 (10.0.0.0/16, routed back to the
# container and local there), statelessly, so the host sees a new
# connection per query, as it does with real stubs (glibc, systemd-resolved:
# a new source port per query). nft can write a counter into an address
# (4 bytes) but not into a port (it byte-swaps 4 bytes and writes the top
# 2, always 0). With the host's UDP conntrack timeout at 1 s (an address
# comes round again after ~1 s at these rates, and with another of the 4
# client ports most times) nearly every query finds no live entry and makes
# a new one, without the table filling up as it would with the default 30 s.
ip -n $C route add local 10.0.0.0/16 dev lo
ip -n $H route add 10.0.0.0/16 via 172.30.0.2
stub_rules='flush ruleset
table ip stub {
	chain out {
		type filter hook output priority raw
		udp dport 53 ip saddr set numgen inc mod 60000 offset 167772160
	}
}'

# start SETUP: ruleset and responder for a setup.
start() {
	ruleset "$1" | ip netns exec $H nft -f -
	# A UDP answer leaves from the port of the socket that sends it,
	# so the transparent socket listens on 53 itself (tproxy to :53):
	# its answers then leave from the resolver's address and port 53.
	local port=10053 flags=()
	case $1 in direct* | tproxy*) port=53 ;; esac
	case $1 in tproxy*) flags=(-transparent) ;; esac
	ip netns exec $H "$out/responder" -addr "0.0.0.0:$port" -sockets 2 -names "$out/queries" "${flags[@]}" >"$out/resp.out" 2>&1 &
	resp_pid=$!
	for _ in $(seq 50); do grep -q ready "$out/resp.out" && return; sleep 0.1; done
	cat "$out/resp.out" >&2
	exit 1
}
stop() { kill "$resp_pid"; wait "$resp_pid" 2>/dev/null || true; resp_pid=""; }

server() { case $1 in direct*) echo 172.30.0.1 ;; *) echo 192.0.2.53 ;; esac; }

# dnsperf's clients: 4 sockets, 2 threads, both loads.
clients="-c 4 -T 2"

# busy prints the machine's busy jiffies (all but idle, iowait and steal).
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
# ptime PID: utime+stime in jiffies.
ptime() { awk '{print $14+$15}' "/proc/$1/stat"; }

# groups reads `perf script -F comm,ip,sym,dso` and prints the share of the
# lab's samples (dnsperf's and the responder's, softirq work included:
# this kernel charges it to the task it interrupts) per part of the path.
groups() {
	awk '$1 == "dnsperf" || $1 == "responder" || $1 ~ /^ksoftirqd/ {
		sym = $3; g = "kernel, rest"
		if ($NF !~ /kernel/) g = "user space"
		else if (sym ~ /nf_nat|nft_redir|manip_pkt|nat_ipv4|hash_by_src/) g = "nat"
		else if (sym ~ /conntrack|nf_ct_|__nf_ct|nf_confirm|ipv4_confirm|udp_packet/) g = "conntrack"
		else if (sym ~ /tproxy/) g = "tproxy"
		else if (sym ~ /^nft_|^nf_hook|^nf_tables|^__nft/) g = "nftables"
		else if (sym ~ /^veth|^br_|^__br_|bridge/) g = "veth+bridge"
		n[g]++; all++}
		END {split("conntrack nat tproxy nftables veth+bridge", order, " ")
			for (i = 1; i <= 5; i++) printf " %.4f", n[order[i]] / all
			printf "\n"}'
}

# measure SETUP LOAD: one dnsperf run under `perf record -a`; appends
# "setup load q/s lost machine-CPU-µs/query lab-CPU-µs/query
# responder-CPU-µs/query" and the shares of groups to results.
measure() {
	local setup=$1 load=$2
	if [ "$load" = stub ]; then
		echo "$stub_rules" | ip netns exec $C nft -f -
		ip netns exec $H sysctl -qw net.netfilter.nf_conntrack_udp_timeout=1 2>/dev/null || true
	else
		ip netns exec $C nft flush ruleset
		ip netns exec $H sysctl -qw net.netfilter.nf_conntrack_udp_timeout=30 2>/dev/null || true
	fi
	local b0 r0 b1 r1
	b0=$(busy) r0=$(ptime "$resp_pid")
	perf record -q -a -e cpu-clock -c 250000 -o "$out/perf.data" -- sleep "$SECS" >/dev/null 2>&1 &
	local TIMEFORMAT='%U %S'
	# shellcheck disable=SC2086
	{ time ip netns exec $C dnsperf -s "$(server "$setup")" -d "$out/queries" -l "$SECS" -q 100 $clients >"$out/dnsperf.out" 2>&1; } 2>"$out/dnsperf.time"
	b1=$(busy) r1=$(ptime "$resp_pid")
	wait $!
	local shares
	perf script -i "$out/perf.data" -F comm,ip,sym,dso >"$out/samples" 2>/dev/null
	shares=$(groups <"$out/samples")
	# the lab's samples per symbol, kept per run to check the groups
	awk '$1 == "dnsperf" || $1 == "responder" {print $3}' "$out/samples" | sort | uniq -c | sort -rn >"$out/syms.$setup.$load.$round"
	awk -v s="$setup" -v l="$load" -v b=$((b1 - b0)) -v r=$((r1 - r0)) -v hz="$(getconf CLK_TCK)" \
		-v dp="$(awk '{print $1 + $2}' "$out/dnsperf.time")" -v shares="$shares" '
		/Queries completed:/ {done=$3}
		/Queries lost:/ {lost=$3}
		/Queries per second:/ {qps=$4}
		END {printf "%s %s %.0f %d %.2f %.2f %.2f%s\n", s, l, qps, lost, b*1e6/hz/done, (dp + r/hz)*1e6/done, r*1e6/hz/done, shares}' "$out/dnsperf.out" | tee -a "$out/results"
}

# Every setup must answer from the address and port the query went to:
# a stub drops an answer from anywhere else.
for setup in $SETUPS; do
	start "$setup"
	src=$(ip netns exec $C python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
header = bytes.fromhex("1234 0100 0001 0000 0000 0000")  # ID, RD, one question
q = header + b"\x02n0\x07example\x03com\x00" + bytes.fromhex("0001 0001")  # A IN
s.sendto(q, (sys.argv[1], 53))
a, src = s.recvfrom(512)
print("%s:%d" % src)' "$(server "$setup")")
	stop
	echo "$setup: query to $(server "$setup"):53, answer from $src"
	[ "$src" = "$(server "$setup"):53" ] || { echo "wrong answer source" >&2; exit 1; }
done

for round in $(seq "$ROUNDS"); do
	for load in $LOADS; do
		for setup in $SETUPS; do
			start "$setup"
			measure "$setup" "$load"
			stop
		done
	done
done

# Median and range per setup and load. col SETUP LOAD FIELD: the field's
# values over the rounds, sorted; med: their median.
col() { awk -v s="$1" -v l="$2" -v f="$3" '$1 == s && $2 == l {print $f}' "$out/results" | sort -n; }
med() { col "$@" | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
echo
echo "| setup | load | q/s median | q/s range | lost | lab CPU µs/query | conntrack | nat | tproxy | nftables | veth+bridge | responder CPU µs/query | machine CPU µs/query |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for load in $LOADS; do
	for setup in $SETUPS; do
		# µs per query of a group: its share of the lab's samples times
		# the lab's CPU per query, median over the rounds.
		part() { awk -v s="$setup" -v l="$load" -v f="$1" '$1 == s && $2 == l {printf "%.2f\n", $6 * $f}' "$out/results" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
		printf "| %s | %s | %s | %s–%s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" "$setup" "$load" \
			"$(med "$setup" "$load" 3)" "$(col "$setup" "$load" 3 | head -1)" "$(col "$setup" "$load" 3 | tail -1)" \
			"$(col "$setup" "$load" 4 | awk '{n += $1} END {print n}')" \
			"$(med "$setup" "$load" 6)" "$(part 8)" "$(part 9)" "$(part 10)" "$(part 11)" "$(part 12)" \
			"$(med "$setup" "$load" 7)" "$(med "$setup" "$load" 5)"
	done
done

# Where the kernel's time goes: perf per setup, 4-port load.
ip netns exec $C nft flush ruleset
for setup in $PERF; do
	start "$setup"
	ip netns exec $C dnsperf -s "$(server "$setup")" -d "$out/queries" -l $((SECS + 2)) -q 100 $clients >/dev/null 2>&1 &
	dp=$!
	sleep 1
	perf record -q -a -g -o "$out/perf.$setup" -- sleep "$SECS" >/dev/null 2>&1
	wait $dp || true
	stop
	perf report -i "$out/perf.$setup" --comms dnsperf,responder --percentage relative --no-children --sort sym --stdio -g none 2>/dev/null |
		grep '\[k\]' >"$out/perf.$setup.txt" || true
	echo
	echo "### perf, $setup (4 ports): top kernel symbols of dnsperf and the responder, self % of their samples"
	echo '```'
	head -25 "$out/perf.$setup.txt"
	echo '```'
done
echo
echo "raw results: $out"
