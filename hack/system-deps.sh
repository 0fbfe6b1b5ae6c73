#!/usr/bin/env bash
# Installs the Debian packages stockade's build and tests need, and mounts bpffs. Idempotent.
set -euo pipefail
pkgs=(clang llvm libbpf-dev bpftool iproute2 iperf3 netsniff-ng iptables nftables ethtool)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "[setup] error: Go is required to build the sandbox toolchain" >&2; exit 1; }
if ! mountpoint -q /sys/fs/bpf; then
  echo "[setup] mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
