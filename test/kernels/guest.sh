#!/bin/bash
# PID 1 in the kernel matrix's guest, on the host's read-only root: mounts
# what the e2e tests need writable, runs them, and leaves their exit status
# in /run/vm/rc (a 9p share the host reads) before powering off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# shellcheck source=/dev/null
. /run/vm/job
# The tmpfs below may cover the repository (a clone under /tmp or /root):
# keep it visible at its own path.
mkdir -p /run/repo
mount --bind "$REPO" /run/repo
for d in /tmp /var/tmp /var/lib /var/log /var/cache /root; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
chmod 1777 /tmp /var/tmp
if [ ! -d "$REPO/test" ]; then
	mkdir -p "$REPO"
	mount --bind /run/repo "$REPO"
fi
ip link set lo up
# What egressd's ruleset and the lab use, loaded up front: the kernel would
# load them on demand too, but under emulation each load costs a second or
# so inside the first install and eats the tests' start-up timeouts.
modprobe -a nf_tables nft_chain_nat nft_ct nft_fib_inet nft_fib_ipv4 nft_fib_ipv6 nft_log \
	nft_redir nft_reject_inet nft_socket nft_limit nfnetlink_log nf_conntrack_netlink veth bridge ||
	echo "egressd-vm: modprobe failed"

echo "egressd-vm: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"
start=$(date +%s)
cd "$REPO/test" || exit 1
export CI=true EGRESSD_TEST_BIN=$EGRESSD_BIN HOME=/root TMPDIR=/tmp
if [ -n "${CMD:-}" ]; then # KERNEL_CMD: a command line instead of the tests
	bash -c "$CMD" 2>&1 | tee /run/vm/test.log
else
	"$TEST_BIN" -test.v -test.count=1 -test.timeout "$TIMEOUT" -test.run "$TESTS" 2>&1 | tee /run/vm/test.log
fi
rc=${PIPESTATUS[0]}
echo "egressd-vm: tests took $(($(date +%s) - start))s"
echo "egressd-vm: modules loaded: $(lsmod | awk 'NR > 1 {print $1}' | sort | tr '\n' ' ')"
echo "$rc" >/run/vm/rc
sync
echo "egressd-vm: exit $rc"
echo o >/proc/sysrq-trigger
read -rt 10 _ </dev/console # not sleep: the 9p root is going away
