#!/usr/bin/env bash
# Kernel matrix: boots Debian's kernels in qemu on this machine's own root
# filesystem (9p, read-only) and runs egressd's end-to-end tests inside them.
#
#   KERNELS        which kernels (default "5.10 6.1 6.12": the newest
#                  linux-image-5.10.0-N-amd64 of Debian 11 (bullseye or
#                  bullseye-security), the newest linux-image-6.1.0-N-amd64
#                  of Debian 12 and the newest linux-image-6.12.N+deb12-amd64
#                  Debian ships for bookworm, from bookworm-security or
#                  bookworm-backports)
#   KERNEL_TESTS   -test.run regex for the e2e tests (default below)
#   KERNEL_CACHE   where the kernel packages are unpacked (outside the repo)
#   VM_ACCEL       auto (KVM, TCG if KVM does not boot), kvm or tcg
#   VM_TCG_THREAD  single (default) or multi: Debian's 6.12 can oops early
#                  under multi-threaded TCG
#   VM_MEM         guest memory in MiB (default 3072)
#   VM_TIMEOUT     seconds a test run may take in the guest (default 1800)
#   KERNEL_CMD     a shell command to run in the guest instead of the tests
#
# Kernels come only from Debian's archive: apt-get download with an apt
# state of our own (the machine's Debian mirror plus bookworm-backports,
# bullseye and bullseye-security),
# so the machine's apt configuration is left as it is. The guest's console
# is streamed with a [kernel] prefix and kept in build/kernels/KERNEL/.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
KERNELS=${KERNELS:-5.10 6.1 6.12}
KERNEL_TESTS=${KERNEL_TESTS:-'^(TestLifetime.*|TestTamper.*|TestForeignElement.*|TestParallelAAndAAAAFromOneSocket|TestResolveThenConnectSequential|TestApplyOpensPinnedNameOnly|TestPrintEqualsInstalledRuleset|TestDriftIsRepaired|TestKill9FailsClosed|TestRestartKeepsLearnedAddresses|TestProxyAddressExpires|TestSIGHUPReload|TestNewBridgeIsFiltered|TestCopiedMarkOpensNothing|TestHostCannotRideUpstreamFlows|TestEngineCgroupDNSIsFiltered|TestOwnCgroupIsTheProof|TestForged.*|TestUnknownBridgeFailsClosed|TestDHCPExemptionOnlyOnTheLink|TestCalicoPod|TestKubernetesNode|TestEventsLostForceAudit|TestSetAtSizeLimit|TestPolicyHostServiceRule)$'}
KERNEL_CACHE=${KERNEL_CACHE:-/var/cache/egressd-kernels}
VM_ACCEL=${VM_ACCEL:-auto}
VM_MEM=${VM_MEM:-3072}
VM_TIMEOUT=${VM_TIMEOUT:-1800}
OUT=$REPO/build/kernels

log() { echo "test-kernels: $*" >&2; }
die() { log "$*"; exit 1; }

# Like the end-to-end tests: skipped with a message where the machine
# cannot run them, except under CI=true, where they must run.
unavailable() {
	[ "${CI:-}" = true ] && die "$*"
	log "skipping the kernel matrix: $*"
	exit 0
}
for tool in qemu-system-x86_64 busybox depmod modprobe dpkg-deb apt-get; do
	command -v "$tool" >/dev/null || unavailable "$tool missing (apt-get install qemu-system-x86 busybox-static kmod xz-utils)"
done
[ "$(id -u)" = 0 ] || unavailable "needs root (the e2e tests and the 9p export of /)"

# apt with a state of its own: the machine's bookworm mirror, plus
# bookworm-backports, and bullseye with bullseye-security for 5.10.
APTDIR=$KERNEL_CACHE/apt
APT=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts="$APTDIR/none"
	-o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt_update() {
	local mirror security sources
	mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" {print $1; exit}')
	[ -n "$mirror" ] || die "no Debian bookworm source in the machine's apt configuration"
	security=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm-security" {print $1; exit}')
	sources=$(
		apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 ~ /^bookworm/' | sort -u |
			while read -r uri rel; do echo "deb $uri $rel main"; done
		echo "deb $mirror bookworm-backports main"
		echo "deb $mirror bullseye main"
		echo "deb ${security:-${mirror%/debian/}/debian-security/} bullseye-security main"
	)
	# The lists are kept for 12 hours, unless the sources changed.
	if [ "$sources" = "$(cat "$APTDIR/sources.list" 2>/dev/null)" ] &&
		[ -n "$(find "$APTDIR/lists" -maxdepth 1 -name '*Packages*' -mmin -720 2>/dev/null)" ]; then
		return
	fi
	mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/none"
	echo "$sources" >"$APTDIR/sources.list"
	# One retry: a release file can change on the mirror mid-update.
	apt-get "${APT[@]}" update -qq || { sleep 5 && apt-get "${APT[@]}" update -qq; }
}

# fetch VERSION: unpacks the newest Debian package of that kernel series
# and prints its root directory (with modules.dep).
fetch() {
	local series=$1 pattern pkg root
	case $series in
	5.10) pattern='^linux-image-5\.10\.0-[0-9]+-amd64$' ;;
	6.1) pattern='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
	6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-amd64$' ;;
	*) die "unknown kernel $series (known: 5.10 6.1 6.12)" ;;
	esac
	# Other runs of the matrix on this machine share the cache (apt runs
	# here without its own locking).
	mkdir -p "$KERNEL_CACHE"
	exec 9>"$KERNEL_CACHE/.lock"
	flock 9
	apt_update
	pkg=$(apt-cache "${APT[@]}" search --names-only "$pattern" | awk '{print $1}' | sort -V | tail -1)
	[ -n "$pkg" ] || die "no package matches $pattern"
	root=$KERNEL_CACHE/$pkg
	# An unpacked package whose kernel or modules have gone since is
	# unpacked again.
	if [ ! -e "$root/.done" ] || ! compgen -G "$root/boot/vmlinuz-*" >/dev/null || [ -z "$(ls "$root/lib/modules" 2>/dev/null)" ]; then
		log "downloading $pkg"
		rm -rf "$root" && mkdir -p "$root"
		(cd "$APTDIR/cache" && apt-get "${APT[@]}" download -qq "$pkg")
		dpkg-deb -x "$APTDIR/cache/${pkg}_"*.deb "$root"
		rm -f "$APTDIR/cache/${pkg}_"*.deb
		# Newer packages put the modules under usr/lib; kmod looks in lib.
		[ -d "$root/lib/modules" ] || { mkdir -p "$root/lib" && mv "$root/usr/lib/modules" "$root/lib/"; }
		depmod -b "$root" "$(ls "$root/lib/modules")"
		touch "$root/.done"
	fi
	echo "$root"
}

# initramfs ROOT KVER OUTFILE: busybox plus the 9p modules, in load order.
initramfs() {
	local root=$1 kver=$2 dst=$3 dir n=0 line
	dir=$(mktemp -d)
	mkdir -p "$dir/bin" "$dir/mods" "$dir/proc" "$dir/dev" "$dir/newroot"
	cp "$(command -v busybox)" "$dir/bin/busybox"
	cp "$REPO/test/kernels/initramfs-init" "$dir/init"
	# modprobe resolves the dependencies (netfs before 9pnet on 6.12,
	# fscache before 9p on 5.10); .ko.xz modules (6.1, 6.12) are unpacked
	# here because busybox insmod cannot read them, 5.10's plain .ko are
	# copied.
	while read -r kind path; do
		[ "$kind" = insmod ] || continue
		grep -qxF "$path" "$dir/loaded" 2>/dev/null && continue
		echo "$path" >>"$dir/loaded"
		n=$((n + 1))
		line=$(printf '%02d-%s' $n "$(basename "${path%.xz}")")
		case $path in
		*.xz) xz -dc "$path" >"$dir/mods/$line" ;;
		*) cp "$path" "$dir/mods/$line" ;;
		esac
	done < <(modprobe -d "$root" -S "$kver" --show-depends -a virtio_pci 9pnet_virtio 9p overlay)
	rm "$dir/loaded"
	(cd "$dir" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$dst"
	rm -rf "$dir"
}

# boot NAME ROOT ACCEL: runs the tests in one VM; returns the tests' status.
boot() {
	local name=$1 root=$2 accel=$3 kver share console qpid start rc bound=60
	kver=$(ls "$root/lib/modules")
	share=$OUT/$name
	console=$share/console.log
	rm -rf "$share" && mkdir -p "$share"
	initramfs "$root" "$kver" "$share/initramfs.gz"
	cat >"$share/job" <<-EOF
		REPO=$(printf %q "$REPO")
		TEST_BIN=$(printf %q "$OUT/e2e.test")
		EGRESSD_BIN=$(printf %q "$OUT/egressd")
		TESTS=$(printf %q "$KERNEL_TESTS")
		TIMEOUT=${VM_TIMEOUT}s
		CMD=$(printf %q "${KERNEL_CMD:-}")
	EOF
	local q=(qemu-system-x86_64 -m "$VM_MEM" -nographic -no-reboot -nodefaults -serial stdio
		-kernel "$root/boot/vmlinuz-$kver" -initrd "$share/initramfs.gz"
		-append "console=ttyS0 quiet panic=-1 egressd_vm_init=$REPO/test/kernels/guest.sh"
		-virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap"
		-virtfs "local,path=$share,mount_tag=out,security_model=passthrough"
		-virtfs "local,path=$root/lib/modules/$kver,mount_tag=modules,security_model=passthrough,readonly=on")
	case $accel in
	kvm) q+=(-accel kvm -cpu host -smp 2) ;;
	# Debian's 6.12 oopses early under multi-threaded TCG.
	tcg) q+=(-accel "tcg,thread=${VM_TCG_THREAD:-single}" -cpu max -smp 2) bound=300 ;;
	esac
	log "$name: booting $kver with $accel"
	start=$(date +%s)
	"${q[@]}" </dev/null > >(tee "$console" | sed -u "s/^/[$name] /") 2>&1 &
	qpid=$!
	QPID=$qpid
	# A guest that does not reach its init within the bound is given up
	# on: nested KVM can hang before the kernel prints a line.
	while ! grep -q 'egressd-vm: booted' "$console" 2>/dev/null; do
		if ! kill -0 $qpid 2>/dev/null; then
			sleep 1 # the console's last lines
			grep -q 'egressd-vm: booted' "$console" && break
		fi
		if ! kill -0 $qpid 2>/dev/null || [ $(($(date +%s) - start)) -ge $bound ]; then
			kill $qpid 2>/dev/null || true
			wait $qpid 2>/dev/null || true
			log "$name: $accel did not boot (qemu ended, or no init within ${bound}s)"
			return 125
		fi
		sleep 1
	done
	log "$name: booted in $(($(date +%s) - start))s with $accel"
	# The guest powers off when its tests end; one that hangs is stopped.
	while kill -0 $qpid 2>/dev/null; do
		if [ $(($(date +%s) - start)) -ge $((VM_TIMEOUT + 300)) ]; then
			log "$name: guest still running after $((VM_TIMEOUT + 300))s; stopping it"
			kill $qpid
		fi
		sleep 2
	done
	wait $qpid || true
	log "$name: VM ran $(($(date +%s) - start))s"
	rc=$(cat "$share/rc" 2>/dev/null || echo 99) # no status: the guest died
	return "$rc"
}

log "building the e2e test binary and egressd (race detector)"
mkdir -p "$OUT"
go test -c -race -o "$OUT/e2e.test" ./test
go build -race -o "$OUT/egressd" ./cmd/egressd

QPID=
trap '[ -z "$QPID" ] || kill $QPID 2>/dev/null || true' EXIT
failed=()
kvm_ok=maybe
[ -e /dev/kvm ] || kvm_ok=no
[ "$VM_ACCEL" = tcg ] && kvm_ok=no
for k in $KERNELS; do
	root=$(fetch "$k")
	rc=125
	if [ "$kvm_ok" != no ]; then
		boot "$k" "$root" kvm && rc=0 || rc=$?
		if [ "$rc" = 125 ]; then
			[ "$VM_ACCEL" = kvm ] && die "KVM did not boot (VM_ACCEL=kvm)"
			kvm_ok=no
		fi
	fi
	if [ "$rc" = 125 ]; then
		boot "$k" "$root" tcg && rc=0 || rc=$?
	fi
	if [ "$rc" = 0 ]; then log "$k: PASS"; else log "$k: FAIL (status $rc; console: $OUT/$k/console.log)"; failed+=("$k"); fi
done
[ ${#failed[@]} = 0 ] || die "failed on: ${failed[*]}"
log "all kernels passed: $KERNELS"
