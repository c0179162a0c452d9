#!/bin/sh
# Installing egressd does not start filtering: the admin enables it once
# /etc/egressd/config.yaml is right. An upgrade restarts a running daemon,
# which keeps its learned addresses (the firewall stays in place meanwhile).
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	if systemctl is-active --quiet egressd.service; then
		systemctl try-restart egressd.service || true
	fi
fi
if [ -z "$2" ]; then
	echo "egressd installed, not running. Check the config with"
	echo "  egressd print --config /etc/egressd/config.yaml"
	echo "then start filtering with"
	echo "  systemctl enable --now egressd.service"
fi
exit 0
