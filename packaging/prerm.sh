#!/bin/sh
# On removal, stop the daemon. The firewall stays in place (egressd never
# opens egress by stopping); `egressd remove`, run before removing the
# package, or `nft delete table inet egressd` opens it.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl disable --now egressd.service egressd-apply.service || true
	echo "egressd stopped; its firewall (table inet egressd) stays until: nft delete table inet egressd"
fi
exit 0
