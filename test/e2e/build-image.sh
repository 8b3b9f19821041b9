#!/usr/bin/env bash
# Builds the Debian 12 guest used by the real-guest test (test/e2e) and prints the
# directory holding it (vmlinuz, initrd.img, rootfs.ext4, timings.json) on its last line.
#
# Everything comes from Debian packages: mmdebstrap (or debootstrap) for a minimal root fs
# with systemd, the Debian kernel pinned below (dpkg -x, no chroot install), and a tiny
# busybox initrd that loads the virtio/ext4/9p modules and switch_roots to /dev/vda.
# Node is Debian's own `nodejs` package (bookworm: 18.x), the one docs/install.md names:
# the test then runs nestbroker on the Node an operator's Debian 12 guest has, installed
# from the .deb (test/e2e/scenario.ts installNestbroker).
#
# The result is cached OUTSIDE the clone, keyed by a hash of this recipe, so a second run
# (and every other clone on this machine) reuses it:
#   ${NESTBROKER_E2E_CACHE:-/var/cache/nestbroker-e2e}/<key>/
# Measured on a 2-core machine without KVM: see docs/install.md.
set -euo pipefail

# --- the recipe: change any line below and the cache key changes -----------------------
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
# Pinned exactly: the chroot and the host may see different kernel ABIs, and the cache key
# must say which one is inside. bookworm main carried 6.1.0-56 (6.1.192-2) when this was
# last bumped (6.1.0-50 before: CI machines, whose cache is empty, already fell back to
# -56); when a point release drops it, bump all three together (`apt-cache madison
# linux-image-amd64` shows what the mirror has). Until then kernel() falls back, loudly, to
# the package linux-image-amd64 depends on (timings.json records the kernel actually used;
# the cache key is of this recipe, so that image stays cached until the pin is bumped).
KERNEL_PKG=linux-image-6.1.0-56-amd64
KERNEL_VER=6.1.192-2
KERNEL_ABI=6.1.0-56-amd64
# earlyoom and systemd-oomd: the userspace OOM killers bench/graceful-vs-oom compares with
# nestbroker inside this guest (docs/performance.md part 3). Installed with Debian's
# defaults but NOT enabled at boot (configure() below): a variant starts its own daemon and
# stops it again. dbus only so that `oomctl` (a D-Bus client) can show what systemd-oomd
# watches; it too is off at boot.
GUEST_PKGS=systemd,systemd-sysv,udev,kmod,procps,nodejs,earlyoom,systemd-oomd,dbus
# Modules the initrd loads, in this order (each with its dependencies, as modprobe resolves
# them): disk (virtio_blk on virtio_pci), root fs (ext4 needs crc32c_generic), the
# nestbroker channel (virtio_console), the balloon, and 9p for the shared project tree.
INITRD_MODULES="virtio_pci virtio_blk crc32c_generic ext4 virtio_console virtio_balloon 9pnet_virtio 9p"
IMAGE_SIZE=1G
SOURCE_DATE_EPOCH=1735689600 # 2025-01-01: fixed timestamps for files the recipe writes
export SOURCE_DATE_EPOCH
# ------------------------------------------------------------------------------------------

CACHE_ROOT=${NESTBROKER_E2E_CACHE:-/var/cache/nestbroker-e2e}
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf '[build-image] %s\n' "$*" >&2; }
now_ms() { date +%s%3N; }
declare -A PHASE_MS=()
phase() { # phase NAME CMD... : runs CMD and records how long it took
  local name=$1 t0 t1
  shift
  t0=$(now_ms)
  "$@"
  t1=$(now_ms)
  PHASE_MS[$name]=$((t1 - t0))
  log "phase $name: $((t1 - t0)) ms"
}

[ "$(id -u)" = 0 ] || { log "must run as root (mmdebstrap --mode=root, mknod in the initrd)"; exit 1; }
KEY=$(sha256sum <"$0" | cut -c1-16)
OUT=$CACHE_ROOT/$KEY
if [ -f "$OUT/done" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
# One builder at a time per key; a second caller waits and then finds the cache.
exec 9>"$CACHE_ROOT/$KEY.lock"
flock -w 900 9 || { log "timed out waiting for another build of $KEY"; exit 1; }
if [ -f "$OUT/done" ]; then echo "$OUT"; exit 0; fi

host_packages() {
  local missing=()
  for c in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mmdebstrap:mmdebstrap \
    busybox:busybox-static cpio:cpio depmod:kmod mkfs.ext4:e2fsprogs; do
    command -v "${c%%:*}" >/dev/null || missing+=("${c#*:}")
  done
  # busybox must be the static one: it runs alone in the initrd.
  if command -v busybox >/dev/null && ! file -L "$(command -v busybox)" 2>/dev/null | grep -q static; then
    [ -x /bin/busybox ] && ldd /bin/busybox >/dev/null 2>&1 && missing+=(busybox-static)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

WORK=$(mktemp -d "$CACHE_ROOT/.build-$KEY.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

rootfs() {
  mmdebstrap --mode=root --variant=minbase --include="$GUEST_PKGS" \
    --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    "$SUITE" "$ROOT" "$MIRROR" >&2 2>"$WORK/mmdebstrap.log" ||
    { tail -30 "$WORK/mmdebstrap.log" >&2; return 1; }
}

# The kernel that linux-image-amd64 depends on now, as "<package> <version>"
# (e.g. "linux-image-6.1.0-56-amd64 6.1.192-2"), from the host's package lists.
current_kernel() {
  local pkg ver
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  [ -n "$pkg" ] || return 1
  ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }')
  [ -n "$ver" ] || return 1
  printf '%s %s\n' "$pkg" "$ver"
}

kernel_download() { # kernel_download PKG VER: into $WORK/kernel
  (cd "$WORK/kernel" && apt-get download "$1=$2" >&2 2>/dev/null)
}

kernel() {
  mkdir -p "$WORK/kernel"
  # The pin first; stale package lists are the commonest reason it is not found.
  if ! kernel_download "$KERNEL_PKG" "$KERNEL_VER"; then
    log "cannot download the pinned $KERNEL_PKG=$KERNEL_VER; apt-get update and retry"
    apt-get update -qq >&2 || log "apt-get update failed; trying with the lists as they are"
  fi
  if ! ls "$WORK/kernel/${KERNEL_PKG}_"*_amd64.deb >/dev/null 2>&1 &&
    ! kernel_download "$KERNEL_PKG" "$KERNEL_VER"; then
    # A Debian point release dropped the pin: take what linux-image-amd64 depends on now,
    # so the e2e test keeps working, and say so loudly (the pin wants a bump).
    local cur pinned="$KERNEL_PKG=$KERNEL_VER"
    cur=$(current_kernel) ||
      { log "cannot download $pinned and linux-image-amd64 names no kernel package: update the pin (apt-cache madison linux-image-amd64)"; return 1; }
    KERNEL_PKG=${cur%% *}
    KERNEL_VER=${cur#* }
    KERNEL_ABI=${KERNEL_PKG#linux-image-}
    log "################################################################################"
    log "WARNING: pinned kernel $pinned is gone from the mirror."
    log "WARNING: FALLING BACK to $KERNEL_PKG=$KERNEL_VER (what linux-image-amd64 depends on)."
    log "WARNING: update KERNEL_PKG/KERNEL_VER/KERNEL_ABI in $0."
    log "################################################################################"
    kernel_download "$KERNEL_PKG" "$KERNEL_VER" ||
      { log "cannot download the fallback $KERNEL_PKG=$KERNEL_VER either"; return 1; }
  fi
  # Debian kernel versions carry no epoch, but apt would write one as %3a: match any.
  local deb
  deb=$(ls "$WORK/kernel/${KERNEL_PKG}_"*_amd64.deb | head -1)
  dpkg -x "$deb" "$WORK/kernel/x"
  cp "$WORK/kernel/x/boot/vmlinuz-$KERNEL_ABI" "$WORK/vmlinuz"
  # The guest gets every module (modprobe of e.g. a filesystem works inside it).
  mkdir -p "$ROOT/lib/modules"
  cp -a "$WORK/kernel/x/lib/modules/$KERNEL_ABI" "$ROOT/lib/modules/"
  depmod -b "$ROOT" "$KERNEL_ABI"
}

# The guest's node: Debian's package, checked here so a broken install fails the build,
# not the first test.
node_check() {
  chroot "$ROOT" /usr/bin/node --version >"$WORK/node-version"
  log "guest node: $(cat "$WORK/node-version") (Debian nodejs $(chroot "$ROOT" dpkg-query -W -f '${Version}' nodejs))"
}

configure() {
  echo nbguest >"$ROOT/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 nbguest\n' >"$ROOT/etc/hosts"
  : >"$ROOT/etc/machine-id" # systemd fills it at first boot
  cat >"$ROOT/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,noatime 0 1
# The project tree, shared read-only by the host (test/e2e/vm.ts, virtio-9p tag "code").
code /mnt/code 9p trans=virtio,version=9p2000.L,ro,nofail,x-systemd.device-timeout=10s 0 0
FSTAB
  mkdir -p "$ROOT/mnt/code"
  # Root on the serial console without a password: a TEST image, for a person debugging a
  # failed run with the console (the test itself uses the runner below).
  sed -i 's|^root:[^:]*:|root::|' "$ROOT/etc/shadow"
  mkdir -p "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d"
  cat >"$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
UNIT
  # Timers and jobs that only cost boot time in a throwaway VM.
  for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer systemd-timesyncd.service getty@tty1.service; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
  done
  # earlyoom and systemd-oomd are installed (GUEST_PKGS) and their postinst enabled them:
  # disable them, so that the real-guest test's other phases run without them and each
  # variant of bench/graceful-vs-oom starts only its own. Disabled, not masked: a variant
  # runs `systemctl start` on Debian's unit with Debian's defaults, nothing changed. The
  # socket too: PID 1 would otherwise start systemd-oomd by connecting to it (Debian's
  # -.slice drop-in sets ManagedOOMSwap=kill).
  chroot "$ROOT" systemctl disable earlyoom.service systemd-oomd.service systemd-oomd.socket >&2
  # dbus is enabled by static links in its packages: remove those, so that the system bus
  # (and logind with the console's session, and user@0.service that Debian's oomd drop-in
  # would watch) stays off unless the systemd-oomd variant starts dbus for oomctl.
  rm -f "$ROOT/lib/systemd/system/sockets.target.wants/dbus.socket" \
    "$ROOT/lib/systemd/system/multi-user.target.wants/dbus.service"
  if ls "$ROOT"/{etc,lib}/systemd/system/*.wants/{earlyoom,systemd-oomd,dbus}.* >/dev/null 2>&1; then
    log "earlyoom, systemd-oomd or dbus is still enabled: $(ls "$ROOT"/{etc,lib}/systemd/system/*.wants/)"
    return 1
  fi
  # TEST-ONLY command runner on its own virtio-serial port (org.nestbroker.test). It lives
  # in this image and in test/e2e/guest/, never in systemd/ and never in `make install`.
  cat >"$ROOT/etc/systemd/system/nestbroker-test-runner.service" <<'UNIT'
[Unit]
Description=nestbroker e2e test command runner (TEST ONLY)
Requires=mnt-code.mount
After=mnt-code.mount

[Service]
Type=exec
ExecStart=/usr/bin/node /mnt/code/test/e2e/guest/runner.js /dev/virtio-ports/org.nestbroker.test
Restart=always
RestartSec=1s
# The runner is how the test sees the guest: never let the OOM killer pick it.
OOMScoreAdjust=-1000

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/nestbroker-test-runner.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/nestbroker-test-runner.service"
  # Persistent journal is useless here; keep it in memory and small.
  mkdir -p "$ROOT/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' >"$ROOT/etc/systemd/journald.conf.d/e2e.conf"
  rm -rf "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"*
}

initrd() {
  local I=$WORK/initrd m kmod
  mkdir -p "$I"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$(command -v busybox)" "$I/bin/busybox"
  for a in sh mount umount insmod switch_root mkdir sleep cat echo ls mknod; do ln -s busybox "$I/bin/$a"; done
  : >"$WORK/initrd.order"
  for m in $INITRD_MODULES; do
    # modprobe prints "insmod PATH" for each dependency first, then the module itself.
    modprobe -S "$KERNEL_ABI" -d "$ROOT" --show-depends "$m" | awk '$1=="insmod"{print $2}' >>"$WORK/initrd.order"
  done
  awk '!seen[$0]++' "$WORK/initrd.order" | while read -r kmod; do
    cp "$kmod" "$I/lib/modules/"
    basename "$kmod" >>"$I/lib/modules/order"
  done
  cat >"$I/init" <<'INIT'
#!/bin/sh
# Minimal initrd: load the modules the root fs and the test need, mount /dev/vda, go.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
INIT
  chmod 0755 "$I/init"
  (cd "$I" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet) | gzip -9n >"$WORK/initrd.img"
}

image() {
  mkfs.ext4 -q -F -L vmroot -U 6a1e5f5e-5b1a-4e2e-9c6e-6e657374622e -E hash_seed=6a1e5f5e-5b1a-4e2e-9c6e-6e657374622e \
    -d "$ROOT" "$WORK/rootfs.ext4" "$IMAGE_SIZE"
}

T0=$(now_ms)
phase host-packages host_packages
phase rootfs rootfs
phase kernel kernel
phase node node_check
phase configure configure
phase initrd initrd
phase image image

mkdir -p "$OUT.tmp"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/rootfs.ext4" "$OUT.tmp/"
{
  printf '{"key":"%s","kernel":"%s=%s","node":"%s","totalMs":%d,"phasesMs":{' \
    "$KEY" "$KERNEL_PKG" "$KERNEL_VER" "$(cat "$WORK/node-version")" $(($(now_ms) - T0))
  sep=""
  for p in host-packages rootfs kernel node configure initrd image; do
    printf '%s"%s":%d' "$sep" "$p" "${PHASE_MS[$p]}"
    sep=","
  done
  printf '}}\n'
} >"$OUT.tmp/timings.json"
touch "$OUT.tmp/done"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "built $OUT in $(($(now_ms) - T0)) ms: $(cat "$OUT/timings.json")"
echo "$OUT"
