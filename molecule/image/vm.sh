#!/usr/bin/env bash
# Start, stop or power-cut a test VM made from build-vm.sh's image. Everything
# of one VM lives in its state directory: the disk (a qcow2 overlay on the
# image's disk.raw, kept across stops, as a server's disk is), qemu.pid,
# console.log (the serial console, every boot appended), qmp.sock, accel.
#
#   vm.sh start STATE_DIR IMAGE_DIR SSH_PORT PUBKEY_FILE [FWD...]
#   vm.sh stop STATE_DIR        guest poweroff through ACPI, then SIGKILL
#   vm.sh kill STATE_DIR        power cut: SIGKILL, nothing flushed by the guest
#
# FWD: extra `hostfwd` rules, HOST_PORT:GUEST_PORT (TCP, host side on
# 127.0.0.1 only). User-mode networking with restrict=on: the guest reaches
# nothing, neither this machine nor the outside; only the forwards reach it.
#
# Accelerator: KVM only if a probe boot under KVM prints the kernel's banner
# within XAGENT_VM_KVM_PROBE_SECONDS (default 10; 0 = never try KVM); else TCG
# (software emulation). The one used is written to STATE_DIR/accel and printed;
# a restart of the same VM reuses it. (On this project's CI machines /dev/kvm
# exists, but a guest under it hangs before its first line: TCG.)
# Environment: XAGENT_VM_MEMORY (MiB, default 3072), XAGENT_VM_CPUS (default 2).
set -euo pipefail

die() { echo "vm.sh: $*" >&2; exit 1; }
log() { printf '[vm.sh] %s\n' "$*" >&2; }

running() { [[ -s $1/qemu.pid ]] && kill -0 "$(cat "$1/qemu.pid")" 2>/dev/null; }

launch() {  # launch STATE_DIR ACCEL: start qemu in the background
    local state=$1 accel=$2 cpu
    case $accel in
        kvm) cpu=host ;;
        tcg) cpu=max; accel="tcg,thread=multi" ;;
    esac
    local net="user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22"
    local fwd
    for fwd in "${FWDS[@]}"; do
        net+=",hostfwd=tcp:127.0.0.1:${fwd%%:*}-:${fwd##*:}"
    done
    rm -f "$state/qemu.pid" "$state/qmp.sock"
    echo "=== boot $(date -u +%FT%TZ) accel=$accel" >>"$state/console.log"
    CONSOLE_FROM=$(stat -c %s "$state/console.log")
    qemu-system-x86_64 -name xagent-vm -machine q35 -accel "$accel" -cpu "$cpu" \
        -smp "${XAGENT_VM_CPUS:-2}" -m "${XAGENT_VM_MEMORY:-3072}" \
        -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 xagent.ssh_key=$KEY_B64" \
        -drive "file=$state/disk.qcow2,format=qcow2,if=virtio,cache=writeback" \
        -netdev "$net" -device virtio-net-pci,netdev=n0 \
        -object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 \
        -display none -monitor none \
        -chardev "file,id=console,path=$state/console.log,append=on" -serial chardev:console \
        -qmp "unix:$state/qmp.sock,server=on,wait=off" \
        -pidfile "$state/qemu.pid" -daemonize
}

banner_within() {  # banner_within STATE_DIR SECONDS: the kernel printed its banner
    local i
    for ((i = 0; i < $2 * 2; i++)); do
        tail -c +"$((CONSOLE_FROM + 1))" "$1/console.log" | grep -q "Linux version" && return 0
        running "$1" || return 1
        sleep 0.5
    done
    return 1
}

cmd=${1:-}
case $cmd in
    start)
        (($# >= 5)) || die "usage: vm.sh start STATE_DIR IMAGE_DIR SSH_PORT PUBKEY_FILE [HOST:GUEST...]"
        STATE=$2 IMAGE=$3 SSH_PORT=$4 PUBKEY=$5
        shift 5
        FWDS=("$@")
        for f in disk.raw vmlinuz initrd.img; do [[ -s $IMAGE/$f ]] || die "$IMAGE/$f missing (build-vm.sh)"; done
        [[ -s $PUBKEY ]] || die "$PUBKEY missing"
        command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
        command -v nc >/dev/null || die "nc not found (apt-get install netcat-openbsd): stop talks QMP with it"
        mkdir -p "$STATE"
        realpath "$IMAGE" >"$STATE/image"
        if running "$STATE"; then log "already running (pid $(cat "$STATE/qemu.pid"))"; exit 0; fi
        KEY_B64=$(base64 -w0 <"$PUBKEY")
        [[ -e $STATE/disk.qcow2 ]] || qemu-img create -q -f qcow2 -b "$(realpath "$IMAGE/disk.raw")" -F raw "$STATE/disk.qcow2"
        touch "$STATE/console.log"
        # The probe runs once per VM: a restart (after a power cut) keeps its answer.
        probe=${XAGENT_VM_KVM_PROBE_SECONDS:-10}
        if [[ -s $STATE/accel ]]; then
            accel=$(cat "$STATE/accel")
            launch "$STATE" "$accel"
        elif ((probe > 0)) && [[ -r /dev/kvm && -w /dev/kvm ]] \
            && launch "$STATE" kvm 2>"$STATE/kvm-probe.log" && banner_within "$STATE" "$probe"; then
            accel=kvm
        else
            if running "$STATE"; then
                kill -9 "$(cat "$STATE/qemu.pid")"
                for _ in $(seq 20); do running "$STATE" || break; sleep 0.2; done
            fi
            log "no KVM guest printed the kernel's banner within ${probe} s: software emulation (TCG)"
            accel=tcg
            launch "$STATE" tcg
        fi
        echo "$accel" >"$STATE/accel"
        log "started (pid $(cat "$STATE/qemu.pid"), accelerator $accel, ssh 127.0.0.1:$SSH_PORT)"
        echo "$accel"
        ;;
    stop | kill)
        (($# == 2)) || die "usage: vm.sh $cmd STATE_DIR"
        STATE=$2
        running "$STATE" || { log "not running"; exit 0; }
        pid=$(cat "$STATE/qemu.pid")
        if [[ $cmd == stop ]]; then
            # ACPI power button through QMP; the guest shuts down cleanly.
            printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"system_powerdown"}' \
                | timeout 5 nc -U -q 2 "$STATE/qmp.sock" >/dev/null 2>&1 || true
            for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        fi
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        log "$cmd: pid $pid ended"
        ;;
    *) die "usage: vm.sh start|stop|kill STATE_DIR ..." ;;
esac
