#!/usr/bin/env bash
# make bench: the DNS load benchmark (direct upstream vs dnsmasq --nftset vs
# egressd, in a network-namespace lab) and the Go micro-benchmarks. Needs
# root. Writes bench/results.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

need=()
for cmd in nft:nftables ip:iproute2 sysctl:procps nsd:nsd dnsperf:dnsperf dnsmasq:dnsmasq-base; do
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
EGRESSD_BENCH=full EGRESSD_BENCH_OUT="$PWD/bench/dns.md" go test ./test -count=1 -run TestDNSBenchmark -timeout 30m
cat bench/dns.md >>"$out"
rm -f bench/dns.md
{
	echo
	echo "Go micro-benchmarks:"
	echo
	echo '```'
	go test -run XXX -bench . -benchtime 2s ./dnsresolve ./rules | grep -E '^Benchmark'
	echo '```'
} >>"$out"
cat "$out"
