#!/bin/bash
# The process that stands in for a libvirt guest (QEMU) started by the `virsh`
# stand-in. It lives in its own session; its death means "shut off".
#
#   guest.sh DOMAIN_DIR
#
# - SIGUSR1 (virsh shutdown / cb-fake-poweroff --reason shutdown) or SIGTERM:
#   the guest powers itself off cleanly -> "shut off (shutdown)".
# - SIGKILL: QEMU died without a shutdown event -> "shut off (crashed)".
# - If $CB_FAKE_STATE/libvirt/guest-command exists, its content is run with
#   `bash -c` as the guest's workload (e.g. a CPU burner); when that command
#   exits by itself the guest has powered off -> "shut off (shutdown)".
#   Otherwise the guest idles (`sleep infinity`).
dir=$1
child=""
poweroff() {
  printf 'shutdown\n' > "$dir/poweroff"
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
  exit 0
}
trap poweroff USR1 TERM
trap '' HUP PIPE
cmdfile=${CB_FAKE_STATE:-}/libvirt/guest-command
if [[ -n ${CB_FAKE_STATE:-} && -s $cmdfile ]]; then
  bash -c "$(<"$cmdfile")" &
else
  sleep infinity &
fi
child=$!
wait "$child"
printf 'shutdown\n' > "$dir/poweroff"
exit 0
