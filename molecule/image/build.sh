#!/usr/bin/env bash
# Build the local test-host image: a minimal Debian rootfs that boots systemd
# as PID 1 inside Docker. No registry is used: the rootfs comes from
# debootstrap, is imported with `docker import`, and a small Dockerfile on top
# is built with --network none.
#
#   molecule/image/build.sh [bookworm|trixie] [--force]
#
# Tags: xagent-testhost:<suite>-<hash>  (hash of every input)
#       xagent-testhost:<suite>         (stable alias the Molecule configs use)
# A matching image already in Docker is reused ("cached"); otherwise a
# `docker save | gzip` copy under molecule/.image-cache/ is loaded if present.
#
# Environment:
#   XAGENT_DEBIAN_MIRROR   default http://deb.debian.org/debian
#   XAGENT_SECURITY_MIRROR default http://deb.debian.org/debian-security
#   XAGENT_CA_DIR          extra CA certs to trust, default /usr/local/share/ca-certificates
#   XAGENT_IMAGE_SAVE      1 (default) to write the gzip cache, 0 to skip it
set -euo pipefail

SUITE=bookworm
FORCE=0
for arg in "$@"; do
    case "$arg" in
        bookworm|trixie) SUITE=$arg ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "usage: $0 [bookworm|trixie] [--force]" >&2; exit 2 ;;
    esac
done

MIRROR=${XAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${XAGENT_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CA_DIR=${XAGENT_CA_DIR:-/usr/local/share/ca-certificates}
SAVE=${XAGENT_IMAGE_SAVE:-1}
REPO_NAME=xagent-testhost

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=$(cd "$HERE/.." && pwd)/.image-cache

# Baked into the image. python3-apt: Ansible's apt module needs it; sudo:
# become_user (e.g. postgres) with the default become method; openssh-server:
# Ansible reaches the hosts over SSH, as it reaches real servers (Molecule's
# prepare gives each sshd an address and port of its own). Everything else
# the roles install themselves through apt (host networking).
PACKAGES=(
    systemd systemd-sysv dbus
    python3 python3-apt
    ca-certificates debian-archive-keyring
    iproute2 procps sudo openssh-server
)
# Units that make no sense in a container (no console, no kernel mounts to
# manage, read-only /sys); masked so the system reaches "running".
MASK_UNITS=(
    getty.target console-getty.service
    systemd-remount-fs.service systemd-firstboot.service
    sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount
    sys-fs-fuse-connections.mount dev-hugepages.mount
    systemd-modules-load.service systemd-udevd.service
    systemd-udev-trigger.service systemd-udev-settle.service
)

log() { printf '[build.sh %s] %s\n' "$SUITE" "$*" >&2; }

command -v docker >/dev/null || { echo "docker not found" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "docker daemon not reachable (docker info failed)" >&2; exit 1; }

# ---- hash of the inputs ----------------------------------------------------
ca_files=()
if [[ -d $CA_DIR ]]; then
    while IFS= read -r -d '' f; do ca_files+=("$f"); done \
        < <(find "$CA_DIR" -type f -name '*.crt' -print0 | LC_ALL=C sort -z)
fi
HASH=$(
    {
        cat "${BASH_SOURCE[0]}"
        printf 'suite=%s\nmirror=%s\nsecurity=%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR"
        printf 'pkg=%s\n' "${PACKAGES[@]}"
        printf 'mask=%s\n' "${MASK_UNITS[@]}"
        for f in "${ca_files[@]}"; do printf 'ca=%s\n' "$(basename "$f")"; cat "$f"; done
    } | sha256sum | cut -c1-12
)
TAG=$REPO_NAME:$SUITE-$HASH
ALIAS=$REPO_NAME:$SUITE
ARCHIVE=$CACHE_DIR/$SUITE-$HASH.tar.gz

mkdir -p "$CACHE_DIR"
# One build per suite at a time (parallel make jobs share Docker).
exec 9>"$CACHE_DIR/.lock-$SUITE"
flock 9

if [[ $FORCE == 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    docker tag "$TAG" "$ALIAS"
    echo "cached $TAG (alias $ALIAS)"
    exit 0
fi
if [[ $FORCE == 0 && -s $ARCHIVE ]]; then
    log "loading $ARCHIVE"
    if gzip -dc "$ARCHIVE" | docker load >&2 && docker image inspect "$TAG" >/dev/null 2>&1; then
        docker tag "$TAG" "$ALIAS"
        echo "cached $TAG (loaded from $ARCHIVE, alias $ALIAS)"
        exit 0
    fi
    log "archive unusable, rebuilding"
fi

command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
[[ -e /usr/share/debootstrap/scripts/$SUITE ]] || {
    echo "this debootstrap has no script for $SUITE; install a newer debootstrap" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 1; }

# ---- rootfs ------------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/xagent-testhost.XXXXXX)
cleanup() {
    # debootstrap may leave proc/sys mounted when it fails half-way.
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
log "debootstrap minbase $SUITE from $MIRROR"
pkgs=$(IFS=,; echo "${PACKAGES[*]}")
if ! debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$WORK/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
    tail -n 40 "$WORK/debootstrap.log" >&2
    if [[ -f $WORK/rootfs/debootstrap/debootstrap.log ]]; then
        tail -n 40 "$WORK/rootfs/debootstrap/debootstrap.log" >&2
    fi
    echo "debootstrap failed" >&2
    exit 1
fi
log "debootstrap done in $((SECONDS - start)) s"

R=$WORK/rootfs
# Trim: downloaded debs and indexes (the roles run apt-get update anyway).
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/debootstrap
# Host leftovers: Docker provides hostname/hosts/resolv.conf at run time.
rm -f "$R"/etc/hostname "$R"/etc/resolv.conf "$R"/var/lib/dbus/machine-id
: >"$R"/etc/machine-id

log "docker import"
ROOTFS_TAG=$REPO_NAME-rootfs:$SUITE-$HASH
tar -C "$R" --numeric-owner --xattrs -c . | docker import - "$ROOTFS_TAG" >/dev/null
rm -rf --one-file-system "$R"

# ---- build context -------------------------------------------------------------
CTX=$WORK/ctx
mkdir -p "$CTX/ca"
for f in "${ca_files[@]}"; do cp "$f" "$CTX/ca/"; done
cat >"$CTX/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# systemd makes / a shared mount at boot only on real hosts, not in
# containers. Without that, LoadCredential= for a service with User= fails
# here: systemd mounts the credential ramfs in a child mount namespace and
# moves it to /run/credentials/<unit>, which never propagates back, so the
# service sees a root-only plain directory ("Permission denied"). Make /
# rshared early, as on a real host (propagation towards the machine's own
# mounts stays one-way: the container's / remains a slave of it).
cat >"$CTX/testhost-rshared.service" <<'EOF'
[Unit]
Description=Make / a shared mount as on a real host (LoadCredential= needs it)
DefaultDependencies=no
ConditionVirtualization=container
Before=local-fs-pre.target sysinit.target
Wants=local-fs-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --make-rshared /

[Install]
WantedBy=sysinit.target
EOF
# ssh stays off at boot: under host networking its default 0.0.0.0:22 is the
# machine's own port. Molecule's prepare configures and starts it.
cat >"$CTX/Dockerfile" <<EOF
FROM $ROOTFS_TAG
LABEL org.opencontainers.image.title="xagent test host ($SUITE)" \\
      xagent.testhost.suite="$SUITE" \\
      xagent.testhost.hash="$HASH"
ENV container=docker \\
    LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY ca/ /usr/local/share/ca-certificates/
COPY debian.sources /etc/apt/sources.list.d/debian.sources
COPY testhost-rshared.service /etc/systemd/system/
RUN rm -f /etc/apt/sources.list \\
 && update-ca-certificates \\
 && systemctl enable testhost-rshared.service \\
 && systemctl mask ${MASK_UNITS[*]} \\
 && systemctl set-default multi-user.target \\
 && systemctl disable ssh.service ssh.socket \\
 && : > /etc/machine-id
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
EOF

log "docker build --network none"
docker build --network none -q -t "$TAG" "$CTX" >/dev/null
docker tag "$TAG" "$ALIAS"
docker image rm "$ROOTFS_TAG" >/dev/null 2>&1 || true
# Drop images of older input hashes of this suite (kept if a container uses them).
docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPO_NAME" \
    | grep -E "^$REPO_NAME:$SUITE-[0-9a-f]{12}\$" | grep -vxF "$TAG" \
    | xargs -r docker image rm >/dev/null 2>&1 || true
log "built $TAG in $((SECONDS - start)) s"

if [[ $SAVE == 1 ]]; then
    # Keep only the newest archive per suite.
    find "$CACHE_DIR" -maxdepth 1 -name "$SUITE-*.tar.gz" ! -name "$SUITE-$HASH.tar.gz" -delete
    docker save "$TAG" | gzip -1 >"$ARCHIVE.tmp" && mv "$ARCHIVE.tmp" "$ARCHIVE"
    log "saved $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
fi
echo "built $TAG (alias $ALIAS)"
