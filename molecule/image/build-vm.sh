#!/usr/bin/env bash
# Build the local test VM: a Debian disk image that boots its own kernel and
# systemd under QEMU, as a real server does. No image is downloaded: the root
# file system comes from debootstrap (Debian packages only), the kernel and its
# initramfs are Debian's, copied out for a direct kernel boot.
#
#   molecule/image/build-vm.sh [bookworm|trixie] [--force]
#
# Output (printed as the last line): molecule/.image-cache/vm-<suite>-<hash>/
#   disk.raw     ext4 file system, no partition table (root=/dev/vda), sparse
#   vmlinuz      the distro kernel
#   initrd.img   its initramfs
# A directory with the same hash is reused ("cached"); the hash covers this
# script, the suite, the mirror and the package list.
#
# The packages the roles install (Redis, PostgreSQL, python3-venv) are already
# in the image: under software emulation a package install costs minutes, and
# the container scenarios prove installs on fresh hosts. They are installed as
# apt installs them on a server (enabled, started at boot). The image has no
# key and no password: the scenario passes deploy's public key (sudo to root) on the
# kernel command line (xagent.ssh_key=, base64), read at boot by xagent-ssh-key.service.
#
# Environment: XAGENT_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

SUITE=bookworm
FORCE=0
for arg in "$@"; do
    case "$arg" in
        bookworm|trixie) SUITE=$arg ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "usage: $0 [bookworm|trixie] [--force]" >&2; exit 2 ;;
    esac
done

MIRROR=${XAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DISK_SIZE=6G

# A server's base (kernel, init, udev, DHCP, sshd, Python for Ansible) and what
# the roles would install (common, redis, postgresql roles' *_packages).
PACKAGES=(
    linux-image-cloud-amd64 initramfs-tools systemd systemd-sysv udev dbus
    ifupdown isc-dhcp-client openssh-server
    python3 python3-apt sudo ca-certificates iproute2 procps less
    python3-venv redis-server postgresql python3-psycopg2
)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=$(cd "$HERE/.." && pwd)/.image-cache
log() { printf '[build-vm.sh %s] %s\n' "$SUITE" "$*" >&2; }

HASH=$(
    {
        cat "${BASH_SOURCE[0]}"
        printf 'suite=%s\nmirror=%s\n' "$SUITE" "$MIRROR"
        printf 'pkg=%s\n' "${PACKAGES[@]}"
    } | sha256sum | cut -c1-12
)
OUT=$CACHE_DIR/vm-$SUITE-$HASH

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock-vm-$SUITE"
flock 9

if [[ $FORCE == 0 && -s $OUT/disk.raw && -s $OUT/vmlinuz && -s $OUT/initrd.img ]]; then
    log "cached"
    echo "$OUT"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
command -v mkfs.ext4 >/dev/null || { echo "mkfs.ext4 not found (apt-get install e2fsprogs)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }

WORK=$(mktemp -d /var/tmp/xagent-vm.XXXXXX)
cleanup() {
    local m
    if [[ -d $WORK/rootfs ]]; then
        { findmnt -rn -o TARGET | grep -F "$WORK/rootfs" || true; } | sort -r | while read -r m; do
            umount -l "$m" || true
        done
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

start=$SECONDS
R=$WORK/rootfs
log "debootstrap minbase $SUITE from $MIRROR"
pkgs=$(IFS=,; echo "${PACKAGES[*]}")
if ! debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$R" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 40 "$WORK/debootstrap.log" >&2
    [[ -f $R/debootstrap/debootstrap.log ]] && tail -n 40 "$R/debootstrap/debootstrap.log" >&2
    echo "debootstrap failed" >&2
    exit 1
fi
log "debootstrap done in $((SECONDS - start)) s"

# ---- a server's configuration --------------------------------------------------
echo "xagent-vm" >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 xagent-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$R/etc/fstab"
printf 'auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' >"$R/etc/network/interfaces"
cat >"$R/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
EOF
# Direct kernel boot reloads the kernel copied out here: a kernel upgrade in
# the guest would remove the running kernel's modules.
chroot "$R" apt-mark hold linux-image-cloud-amd64 >/dev/null
# As on many servers, Ansible logs in as an unprivileged user and becomes
# root with sudo (inventory/example: ansible_user deploy, ansible_become).
chroot "$R" useradd --create-home --shell /bin/bash deploy
echo "deploy ALL=(ALL) NOPASSWD: ALL" >"$R/etc/sudoers.d/deploy"
chmod 0440 "$R/etc/sudoers.d/deploy"
# The scenario's public key from the kernel command line (the image has none).
cat >"$R/usr/local/sbin/xagent-ssh-key" <<'EOF'
#!/bin/sh
# Authorize deploy's key from the kernel command line (xagent.ssh_key=<base64>).
set -eu
for word in $(cat /proc/cmdline); do
    case $word in
        xagent.ssh_key=*)
            ssh_dir="$(getent passwd deploy | cut -d: -f6)/.ssh"
            install -d -m 0700 -o deploy -g deploy "$ssh_dir"
            echo "${word#xagent.ssh_key=}" | base64 -d >"$ssh_dir/authorized_keys"
            chown deploy:deploy "$ssh_dir/authorized_keys"
            chmod 0600 "$ssh_dir/authorized_keys" ;;
    esac
done
EOF
chmod 0755 "$R/usr/local/sbin/xagent-ssh-key"
cat >"$R/etc/systemd/system/xagent-ssh-key.service" <<'EOF'
[Unit]
Description=Authorize the test scenario's SSH key (kernel command line)
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/xagent-ssh-key

[Install]
WantedBy=multi-user.target
EOF
chroot "$R" systemctl enable xagent-ssh-key.service ssh.service >/dev/null 2>&1
# Host keys are made at build time by openssh-server's postinst; a VM made
# from this image is a throwaway test host, so sharing them is fine.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/debootstrap
rm -f "$R"/var/lib/dbus/machine-id
: >"$R/etc/machine-id"

mkdir -p "$WORK/out"
cp "$R"/boot/vmlinuz-* "$WORK/out/vmlinuz"
cp "$R"/boot/initrd.img-* "$WORK/out/initrd.img"
log "mkfs.ext4 -d ($DISK_SIZE, sparse)"
truncate -s "$DISK_SIZE" "$WORK/out/disk.raw"
mkfs.ext4 -q -F -L root -d "$R" "$WORK/out/disk.raw"

# Keep only the newest image per suite.
find "$CACHE_DIR" -maxdepth 1 -name "vm-$SUITE-*" -exec rm -rf {} +
mv "$WORK/out" "$OUT"
log "built in $((SECONDS - start)) s ($(du -sh "$OUT" | cut -f1) used)"
echo "$OUT"
