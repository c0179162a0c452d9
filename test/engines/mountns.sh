#!/bin/sh
# The engine lab's mount namespace: sets it up, then holds it until killed.
#
#   nsenter --net=/run/netns/<lab host> \
#       unshare --mount --propagation private sh mountns.sh LABDIR
#
# Container engines then run in here (nsenter --target <this pid> --mount
# --net), in the lab's host network namespace, and see:
#   /sys              a sysfs of the lab's network namespace (as `ip netns
#                     exec` mounts it), with the machine's cgroup mounts
#                     moved onto it: they are not mounted again (a second
#                     cgroup2 mount would reset its options, nsdelegate,
#                     for the whole machine)
#   /run, /dev/shm    fresh tmpfs: sockets, pid files, netns files, locks,
#                     podman's shm locks, iptables' lock
#   /var/lib          LABDIR/varlib: /var/lib/docker, /var/lib/containerd,
#                     /var/lib/containers (podman's blob cache goes there
#                     whatever its --root says)
#   /etc/resolv.conf  LABDIR/resolv.conf (the host's resolv.conf as the
#                     engines read it)
#   /run/systemd/resolve/resolv.conf
#                     LABDIR/resolved.conf (systemd-resolved's upstreams)
# Nothing of it is visible outside. When it is ready it creates
# LABDIR/mountns.ready.
set -eu
lab=$1

# /etc/resolv.conf may be a symlink into /run (systemd-resolved): find its
# target before /run is replaced.
resolv=$(readlink -f /etc/resolv.conf)

mkdir -p "$lab/mnt/cgroup" "$lab/varlib"
mount --rbind /sys/fs/cgroup "$lab/mnt/cgroup"
mount -t sysfs lab-sysfs /sys
mount --move "$lab/mnt/cgroup" /sys/fs/cgroup

# Copies of the machine's mounts under /run (netns files of `ip netns`,
# Docker's) would keep the namespaces they name alive for as long as this
# one lives: detach them.
awk '$5 ~ "^/run/" { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
	umount -l "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=0755 lab-run /run
mount -t tmpfs -o mode=1777 lab-shm /dev/shm
mkdir -p /run/lock /run/netns /run/systemd/resolve
mount --bind "$lab/varlib" /var/lib

mkdir -p "$(dirname "$resolv")"
[ -e "$resolv" ] || : >"$resolv"
mount --bind "$lab/resolv.conf" "$resolv"
: >/run/systemd/resolve/resolv.conf
mount --bind "$lab/resolved.conf" /run/systemd/resolve/resolv.conf

: >"$lab/mountns.ready"
exec sleep 2147483647
