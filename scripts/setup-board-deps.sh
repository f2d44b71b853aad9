#!/bin/sh
# Host packages for the emulated arm64 board (`edgekit board up`, tests/boards/test_emulator.py) on
# Debian or Ubuntu, and qemu-aarch64 registered with binfmt_misc. Run as root; safe to rerun.
# edgekit registers qemu-aarch64 itself when it starts a board; this only saves it the step.
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-board-deps.sh: run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
# debootstrap builds the board's Debian arm64 root filesystem; qemu-user-static runs it;
# iproute2 makes its network namespace and veth; gcc-aarch64-linux-gnu cross-links artifacts.
apt-get install -y --no-install-recommends \
    debootstrap qemu-user-static iproute2 util-linux mount \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross ca-certificates
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # The F flag makes the kernel open qemu now, so it also runs programs inside the chroot.
    grep '^:' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
echo "emulated board dependencies ready: $(head -n 1 /proc/sys/fs/binfmt_misc/qemu-aarch64) qemu-aarch64"
