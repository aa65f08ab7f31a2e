#!/usr/bin/env bash
# System packages the test suite needs: a real OpenSSH server (bare-metal backend tests).
# Installed automatically when run as root (as CI does); otherwise the exact packages are named.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test-deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "test-deps: missing Debian packages: ${need[*]}" >&2
  echo "test-deps: install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
