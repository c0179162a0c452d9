#!/usr/bin/env bash
# sudo make demo: egressd on its embedded default config in a throw-away
# network-namespace sandbox, with a short transcript. Installs what it lacks
# (Debian packages) and changes nothing else on this machine; Ctrl-C stops it
# and removes the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

if [ "$(id -u)" != 0 ]; then
	echo "the demo builds network namespaces and nftables rules: run it as root (sudo make demo)" >&2
	exit 1
fi
need=()
for cmd in nft:nftables ip:iproute2 sysctl:procps nsd:nsd; do
	command -v "${cmd%%:*}" >/dev/null || need+=("${cmd#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]} ..."
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "building egressd ..."
go test -c -o "$tmp/egressd-demo" ./test
cd test
EGRESSD_DEMO=1 "$tmp/egressd-demo" -test.run '^TestDemo$' | grep --line-buffered -v '^PASS$'
