#!/usr/bin/env bash
# System packages the test suite needs: a real OpenSSH server (bare-metal backend tests) and
# PostgreSQL (every store test runs on SQLite and on a throwaway PostgreSQL cluster the tests start
# themselves: test/helpers/postgres.ts).
# Installed automatically when run as root (as CI does); otherwise the exact packages are named.
# Then, optionally, promtool and real libvirt + QEMU (scripts/libvirt-up.sh) for the real-libvirt test: a failure
# there does not stop `npm test`; test/backends/baremetal-libvirt.test.ts skips and says why.
# CB_SKIP_LIBVIRT=1 leaves libvirt alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v openssl >/dev/null || need+=(openssl)
# initdb/postgres on PATH, or where Debian's package puts them (/usr/lib/postgresql/<version>/bin).
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then need+=(postgresql); fi
if [ ${#need[@]} -gt 0 ]; then
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
fi
# promtool (Debian package prometheus) lints /metrics in test/ops/metrics.test.ts, which skips and
# says why without it. Optional: installed as root, otherwise named.
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test-deps: installing prometheus (for promtool)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } ||
      echo "test-deps: could not install prometheus: test/ops/metrics.test.ts will skip the promtool check" >&2
  else
    echo "test-deps: optional: sudo apt-get install -y prometheus (promtool lints /metrics in a test)" >&2
  fi
fi
if [ "${CB_SKIP_LIBVIRT:-}" != 1 ]; then
  bash "$here/libvirt-up.sh" || echo "test-deps: real libvirt is not available (see above): test/backends/baremetal-libvirt.test.ts will be skipped" >&2
fi
exit 0
