#!/usr/bin/env bash
# make bench: the DNS load benchmark (direct upstream vs dnsmasq --nftset vs
# egressd, in a network-namespace lab) and the Go micro-benchmarks. Needs
# root. Writes bench/results.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

need=()
for cmd in nft:nftables ip:iproute2 sysctl:procps nsd:nsd dnsperf:dnsperf dnsmasq:dnsmasq-base unbound:unbound modprobe:kmod; do
	command -v "${cmd%%:*}" >/dev/null || need+=("${cmd#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

out=bench/results.md
{
	echo "# egressd benchmark, $(date -u +%Y-%m-%d) on $(nproc) CPUs ($(uname -r))"
	echo
	echo '```'
	echo "make bench   # bench/run.sh"
	echo '```'
	echo
} >"$out"
prof=$(mktemp -d)
trap 'rm -rf "$prof"' EXIT
EGRESSD_BENCH=full EGRESSD_BENCH_OUT="$PWD/bench/dns.md" EGRESSD_BENCH_PROFILE="$prof/cpu" \
	go test ./test -count=1 -run TestDNSBenchmark -timeout 30m
cat bench/dns.md >>"$out"
rm -f bench/dns.md
{
	# Where the time goes, for the targets that are missed: the CPU profile
	# of egressd's first run in the lab condition (warm, fresh, 100 000 live
	# elements), cumulative, the functions that split the work.
	echo
	echo "Where egressd's CPU went in its first run in the lab condition (\`go tool pprof -top -cum\`; warm answers are"
	echo "udpServer.serveBatch, fresh ones udpServer.worker; syscalls are mostly kernel packet and netfilter work):"
	echo
	echo '```'
	go tool pprof -top -cum -nodecount=1000 "$prof/cpu" 2>/dev/null | grep -E '^ *(flat|Duration)|Total samples' || true
	go tool pprof -top -cum -nodecount=1000 "$prof/cpu" 2>/dev/null |
		grep -E ' (github.com/egressd/egressd/dnsresolve\.\(\*udpServer\)\.(serveBatch|worker)|golang.org/x/net/ipv4.\(\*payloadHandler\)\.(ReadBatch|WriteBatch)|github.com/egressd/egressd/dnsresolve\.\(\*Proxy\)\.fastReply|github.com/egressd/egressd/dnsresolve\.\(\*Upstream\)\.(Exchange|dial)|github.com/egressd/egressd/dnsresolve\.\(\*exchange\)\.send|github.com/egressd/egressd/firewall\.\(\*Firewall\)\.(Allow|Audit|watch)|github.com/google/nftables\.\(\*Conn\)\.Flush|github.com/egressd/egressd/dnsresolve\.\(\*udpResponse\)\.WriteMsg|runtime\.gcBgMarkWorker|runtime\.mallocgc)$' || true
	echo '```'
	echo
	echo "The kernel's share of the DNS path (redirect, conntrack, veth, tproxy): bench/kernelpath/results.md."
} >>"$out"
{
	echo
	echo "Go micro-benchmarks:"
	echo
	echo '```'
	go test -run XXX -bench . -benchtime 2s ./dnsresolve ./firewall | grep -E '^Benchmark'
	echo '```'
} >>"$out"
cat "$out"
