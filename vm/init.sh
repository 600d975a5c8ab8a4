#!/bin/bash
# PID 1 of the kernel-suite VM (installed as /sbin/nodeagent-vm-init in the cached
# root image). Mounts what the suite needs, mounts the per-run work disk
# (/dev/nvme0n2, made by run-kernel-suite.sh) on /work, runs its
# nodeagent-vm-run.sh, and powers off. Nothing here may stop the power-off:
# the host also has a timeout, and panic=-1 plus -no-reboot end QEMU on a panic.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

say() { echo "nodeagent-vm-init: $*" >/dev/console 2>/dev/null || echo "nodeagent-vm-init: $*"; }

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
mount -t cgroup2 cgroup2 /sys/fs/cgroup || say "cannot mount cgroup2"
mount -t bpf bpf /sys/fs/bpf || say "cannot mount bpffs"
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
hostname nodeagent-vm
ip link set lo up

mkdir -p /work
if mount -t ext4 /dev/nvme0n2 /work && [ -f /work/nodeagent-vm-run.sh ]; then
    bash /work/nodeagent-vm-run.sh
    say "suite runner exited with status $?"
else
    say "no work disk on /dev/nvme0n2 (or no nodeagent-vm-run.sh on it)"
fi

sync
umount /work 2>/dev/null || { sync; mount -o remount,ro /work 2>/dev/null; }
sync
echo o >/proc/sysrq-trigger   # power off now (no init system to ask)
sleep 30
exit 1                        # PID 1 exiting panics; panic=-1 + -no-reboot end QEMU
