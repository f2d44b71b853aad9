#!/usr/bin/env bash
# Sets up everything edgekit needs on a Debian/Ubuntu machine, idempotently:
#   system packages (cross compilers, qemu + debootstrap for the emulated board, OpenSSH),
#   a virtual environment in .venv with edgekit and its pinned stack.
# Re-running it is cheap: it installs only what is missing or what pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  gcc g++ libc6-dev                               # TVM links .so artifacts with g++ by default
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross     # cross-links for 64-bit ARM boards
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross   # and for 32-bit ARM (armv7, hard float)
  g++-aarch64-linux-gnu                           # builds `edgekit export`'s C++ runner for arm64
  debootstrap qemu-user-static                    # the emulated Raspberry Pi 4 (arm64)
  iproute2 util-linux mount coreutils             # its network namespace and mounts
  ca-certificates                                 # pip and debootstrap over https
  openssh-server openssh-client                   # the ssh transport and its tests
  python3 python3-venv                            # a bare board python for the ssh install tests
  chromium                                        # renders the --html report in its test
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing system packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: edgekit's pinned torch 2.14.1 wheels are for Python 3.11; set PYTHON=python3.11" >&2
  exit 1
fi
# A venv whose creation was interrupted has a python but no pip: make it again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m venv --clear .venv
  rm -f .venv/.edgekit-installed
fi

stamp=.venv/.edgekit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: installing edgekit with its pinned stack into .venv (torch, apache-tvm, ...)"
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  .venv/bin/python -m pip install -q -e '.[host,bench,test,tracker]'
  echo "$want" > "$stamp"
fi
.venv/bin/edgekit --version
