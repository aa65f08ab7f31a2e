#!/usr/bin/env bash
# Real libvirt + QEMU (TCG) for the bare-metal libvirt test (test/backends/baremetal-libvirt.test.ts)
# on a machine without systemd (CI, a container): installs the minimal Debian packages when they are
# missing (as root), configures qemu.conf for a host without cgroup controllers, starts virtlogd and
# libvirtd as daemons unless they run, and waits until `virsh -c qemu:///system version` answers.
#
# Idempotent and quick when everything is up already. Exit 0 = libvirt answers; otherwise it names
# what is missing and exits non-zero (1: packages missing and not installable here, 2: the daemons
# could not be started or did not answer in time). Never starts systemd or any network.
set -euo pipefail

# libvirt-daemon-system is NOT used: it pulls in systemd units, polkit, dnsmasq and iptables.
PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils ovmf)
URI=qemu:///system
READY_SECONDS=${CB_LIBVIRT_READY_SECONDS:-60}
QEMU_CONF=/etc/libvirt/qemu.conf
MARK="# compute-bridge scripts/libvirt-up.sh: no cgroup controllers here (no systemd, a container)"

say() { echo "libvirt-up: $*" >&2; }
t0=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - t0) / 1000000 )) ms"; }

answers() { command -v virsh >/dev/null 2>&1 && timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

# Fast path: already up (a previous run, or the operator's own libvirtd).
if answers && command -v qemu-img >/dev/null 2>&1; then
  say "libvirt already answers on $URI"
  exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  say "not a Debian system: install the equivalents of these Debian packages: ${PKGS[*]}"
  say "then start virtlogd and libvirtd so that 'virsh -c $URI version' answers"
  exit 1
fi

need=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages: ${need[*]}"
    say "install them with: sudo apt-get install -y --no-install-recommends ${PKGS[*]}"
    say "then run: sudo bash scripts/libvirt-up.sh"
    exit 1
  fi
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  out=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}"; } >"$out" 2>&1; then
    tail -n 20 "$out" | sed 's/^/libvirt-up:   /' >&2
    rm -f "$out"
    say "apt-get install failed; missing Debian packages: ${need[*]}"
    exit 1
  fi
  rm -f "$out"
  say "installed in $(elapsed)"
fi

if [ "$(id -u)" != 0 ]; then
  say "libvirt does not answer on $URI: $(timeout 10 virsh -c "$URI" version 2>&1 >/dev/null | head -n 1)"
  say "only root can configure and start libvirtd: sudo bash scripts/libvirt-up.sh"
  exit 2
fi

# The unprivileged user QEMU runs as (Debian's default; libvirt-daemon-system would create it).
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id -u libvirt-qemu >/dev/null 2>&1 || useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt /run/libvirt

# No systemd, no delegated cgroup tree: libvirt must not create per-domain cgroups (it would write
# into the machine's own cgroup hierarchy). Without libvirt-daemon-system there is no qemu.conf.
if [ ! -f "$QEMU_CONF" ]; then
  mkdir -p "${QEMU_CONF%/*}"
  printf '%s\ncgroup_controllers = [ ]\n' "$MARK" >"$QEMU_CONF"
elif ! grep -qF "$MARK" "$QEMU_CONF"; then
  if grep -qE '^[[:space:]]*cgroup_controllers[[:space:]]*=' "$QEMU_CONF"; then
    say "$QEMU_CONF already sets cgroup_controllers; leaving it as it is"
  else
    printf '\n%s\ncgroup_controllers = [ ]\n' "$MARK" >>"$QEMU_CONF"
  fi
fi

# /dev/kvm as udev leaves it on Debian (root:kvm 0660). A root-only node makes libvirt re-probe
# QEMU on every call (~4 s each: "KVM was enabled when probing ..., but it is not available now").
if [ -c /dev/kvm ] && ! setpriv --reuid=libvirt-qemu --regid=libvirt-qemu --init-groups test -w /dev/kvm 2>/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || say "could not open /dev/kvm to the kvm group; libvirt calls will be slow"
fi

running() { pgrep -x "$1" >/dev/null 2>&1; }
running virtlogd || virtlogd -d
running libvirtd || libvirtd -d

deadline=$(( $(date +%s) + READY_SECONDS ))
until answers; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "libvirtd did not answer on $URI within ${READY_SECONDS} s"
    timeout 10 virsh -c "$URI" version 2>&1 | sed 's/^/libvirt-up:   /' >&2 || true
    tail -n 20 /var/log/libvirt/libvirtd.log 2>/dev/null | sed 's/^/libvirt-up:   /' >&2 || true
    exit 2
  fi
  sleep 0.2
done
say "libvirt answers on $URI ($(elapsed))"
