/**
 * The shell scripts the bare-metal backend runs on a machine, over SSH.
 *
 * Every script is a constant: nothing is ever interpolated into its text. Values (paths, the
 * request id, the image URL, systemd-run's arguments, ...) travel as positional parameters, each
 * one quoted for a POSIX shell with `shq`, in a command line of the form
 *
 *     /bin/sh -c '<constant script>' cb-<name> '<arg 1>' '<arg 2>' ...
 *
 * so the remote login shell unquotes them exactly once and the script only ever sees "$1", "$@".
 *
 * Conventions: the last line of stdout carries the result ("CB-ADOPT <started_at>", ...);
 * failures print one line on stderr and exit with a code the backend maps to a typed error:
 *   10 image sha256 mismatch  11 download failed  12 image too large  13 host-side setup failed
 *   14 systemctl/virsh unavailable  15 another operation on this grant holds the lock
 *   20 stop/unpack failed  21 executable not found / undefine failed  22 still running / start failed
 *   23 qemu-img rejected the image  30 overlay  31 define  32 virsh start
 * A run directory is `<work_dir>/runs/<request_id>`; `<work_dir>/runs/.lock.<request_id>` serialises
 * provision and terminate of one grant across daemon restarts (flock).
 */
import { shJoin } from "../../util/shell.js";
import { CURL_FETCH } from "../common/fetch-script.js";

/** `/bin/sh -c <script> <name> <args...>`, every word quoted. */
export function remote(script: string, name: string, args: readonly string[]): string {
  return shJoin(["/bin/sh", "-c", script, name, ...args]);
}

export const EXIT = {
  mismatch: 10,
  fetch: 11,
  tooLarge: 12,
  setup: 13,
  tool: 14,
  locked: 15,
  stopOrUnpack: 20,
  notFoundOrUndefine: 21,
  stillRunningOrStart: 22,
  qemuImg: 23,
  overlay: 30,
  define: 31,
  start: 32,
} as const;

const PRELUDE = String.raw`set -u
PATH=$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
cb_die() { printf '%s\n' "$2" >&2; exit "$1"; }
cb_lock() { # runs_dir id seconds
  mkdir -p "$1" || cb_die 13 "cannot create $1"
  exec 9>"$1/.lock.$2" || cb_die 13 "cannot open the lock file in $1"
  flock -w "$3" 9 || cb_die 15 "another operation on this grant is still running on the machine"
}
`;

/**
 * virsh mode: the host's own deadline for a guest, a transient unit (cb-deadline-ID) that destroys
 * it when `left` seconds (until valid_to, by the bridge's clock, like systemd mode's RuntimeMaxSec=)
 * have passed, so that it ends on time even while the bridge is away. Set once per grant (an
 * existing one is kept) when the guest starts or is adopted; without it the grant still runs (the
 * bridge enforces valid_to itself) and the bridge is told why (CB-NO-DEADLINE). Needs: id dom uri left.
 */
const DEADLINE = String.raw`cb_deadline() {
  vb=$(command -v virsh) || { echo "CB-NO-DEADLINE virsh is not on PATH"; return 0; }
  if out=$(systemd-run --quiet --collect --unit "cb-deadline-$id" -p "Description=compute-bridge: destroy $dom at valid_to" -- /bin/sh -c 'sleep "$1"; exec "$2" -c "$3" destroy "$4"' cb-deadline "$left" "$vb" "$uri" "$dom" 2>&1 9>&-); then return 0; fi
  case $out in *"already loaded"*) return 0 ;; esac
  printf 'CB-NO-DEADLINE %s\n' "$(printf '%s' "$out" | tr '\n' ' ' | head -c 300)"
}
`;

/**
 * Download into the content-addressed cache, verify sha256, move into place atomically. Bounded
 * like every fetch the bridge starts (common/fetch-script.ts: idle timeout, valid_to, size while
 * streaming); and while curl runs, a newline goes to stdout every second: once the bridge's SSH
 * channel is gone (cancel, shutdown, a lost connection) that write fails and the fetch stops at
 * once, its partial file removed. Messages name no host or address.
 */
const FETCH = String.raw`${CURL_FETCH}cb_fetch() { # images_dir sha256 url max_bytes seconds_left -> cb_img
  cb_img=$1/$2
  mkdir -p "$1" || cb_die 13 "cannot create the image cache $1"
  if [ -f "$cb_img" ]; then touch "$cb_img" 2>/dev/null; return 0; fi
  [ "$5" -gt 0 ] 2>/dev/null || cb_die 11 "downloading the image failed: the grant's valid_to has passed"
  cb_part=$1/.$2.$$.part
  cb_curl_pid=
  trap '[ -n "$cb_curl_pid" ] && kill "$cb_curl_pid" 2>/dev/null; rm -f "$cb_part"' EXIT
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 141' PIPE; trap 'exit 143' TERM
  cb_curl "$3" "$cb_part" "$4" $(( $(date +%s) + $5 )) 60 heartbeat; cb_rc=$?
  [ "$cb_rc" -eq 141 ] && exit 141
  if [ "$cb_rc" -ne 0 ]; then
    if [ "$cb_rc" -eq 63 ] || [ "$cb_rc" -eq 153 ] || [ "$(wc -c 2>/dev/null <"$cb_part" || echo 0)" -gt "$4" ]; then cb_die 12 "the image is larger than $4 bytes"; fi
    cb_die 11 "downloading the image failed: $(cb_curl_why "$cb_rc")"
  fi
  if [ "$(wc -c <"$cb_part")" -gt "$4" ]; then cb_die 12 "the image is larger than $4 bytes"; fi
  if ! printf '%s  %s\n' "$2" "$cb_part" | sha256sum -c --status; then
    cb_die 10 "image sha256 mismatch (expected $2): nothing was run"
  fi
  mv -f "$cb_part" "$cb_img" || cb_die 13 "cannot move the verified image into the cache"
  trap - EXIT HUP INT PIPE TERM
}
`;

/**
 * ExecStopPost= of every grant's unit: runs in the unit's cgroup after the main process ended
 * (or was stopped) and records how it ended plus final usage read from that cgroup, so usage
 * survives on systemd 252 (no MemoryPeak property before 255). Only trusts a cgroup whose path
 * ends in the unit's own name. Args: run_dir unit.
 */
export const STOP_POST = String.raw`#!/bin/sh
# compute-bridge: records how this grant's unit ended (ExecStopPost=). Args: RUN_DIR UNIT
run=$1 unit=$2
cpu= peak=
cg=$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null)
case $cg in
  */"$unit")
    [ -r "/sys/fs/cgroup$cg/cpu.stat" ] && cpu=$(sed -n 's/^usage_usec //p' "/sys/fs/cgroup$cg/cpu.stat")
    [ -r "/sys/fs/cgroup$cg/memory.peak" ] && peak=$(cat "/sys/fs/cgroup$cg/memory.peak")
    ;;
esac
{
  printf 'service_result=%s\n' "\${SERVICE_RESULT:-}"
  printf 'exit_code=%s\n' "\${EXIT_CODE:-}"
  printf 'exit_status=%s\n' "\${EXIT_STATUS:-}"
  printf 'cpu_usec=%s\n' "$cpu"
  printf 'memory_peak_bytes=%s\n' "$peak"
  printf 'ended_at=%s\n' "$(date +%s)"
} > "$run/final.tmp" && mv -f "$run/final.tmp" "$run/final"
exit 0
`.replace(/\\\$\{/g, "${");

/**
 * systemd mode, provision. Args: runs_dir id unit images_dir sha256 url max_bytes default_cmd(0|1)
 * alloc run_as seconds_left (until valid_to: bounds the fetch) ; then systemd-run's own arguments (ending with "--" and the command, or just "--"
 * when default_cmd=1: ./run for a bundle, ./workload for a single executable is appended).
 * With run_as (a user name, or empty for root) the work directory is that user's and the run
 * directories above it only traversable. Adopts (prints CB-ADOPT) when the unit exists or this
 * grant already reached systemd-run.
 */
export const SYSTEMD_PROVISION = `${PRELUDE}${FETCH}umask 077
runs=$1 id=$2 unit=$3 images=$4 sha=$5 url=$6 max=$7 defcmd=$8 alloc=$9 runas=\${10} left=\${11}
shift 11
run=$runs/$id
cb_lock "$runs" "$id" 900
cb_adopt() { printf 'CB-ADOPT %s\\n' "$(cat "$run/started_at" 2>/dev/null)"; exit 0; }
st=$(systemctl show "$unit" -p LoadState 2>&1) || cb_die 14 "systemctl show failed: $st"
case $st in *LoadState=loaded*) cb_adopt ;; esac
if [ -e "$run/final" ] || [ -e "$run/started_at" ]; then cb_adopt; fi
cb_fetch "$images" "$sha" "$url" "$max" "$left"
rm -rf "$run" && mkdir -p "$run/work" || cb_die 13 "cannot create the run directory"
printf '%s\\n' "$alloc" > "$run/grant" && printf '%s\\n' "$sha" > "$run/image" || cb_die 13 "cannot write the run directory"
magic=$(od -An -tx1 -N2 "$cb_img" | tr -d ' \\n')
ustar=$(dd if="$cb_img" bs=1 skip=257 count=5 2>/dev/null)
if [ "$magic" = 1f8b ] || [ "$ustar" = ustar ]; then
  if ! tar -xf "$cb_img" -C "$run/work" --no-same-owner --no-same-permissions 2>"$run/unpack.err"; then
    e=$(head -c 300 "$run/unpack.err" | tr '\\n' ' '); rm -rf "$run"
    cb_die 20 "unpacking the bundle failed: $e"
  fi
  rm -f "$run/unpack.err"
  dflt=./run
else
  cp "$cb_img" "$run/work/workload" && chmod 700 "$run/work/workload" || cb_die 13 "cannot install the workload executable"
  dflt=./workload
fi
if [ -n "$runas" ]; then
  id -u -- "$runas" >/dev/null 2>&1 || cb_die 13 "run_as user $runas does not exist on this machine"
  chmod 711 "\${runs%/*}" "$runs" "$run" && chown -R -- "$runas:" "$run/work" || cb_die 13 "cannot hand the work directory to $runas"
fi
cat > "$run/stoppost.sh" <<'CB_STOP_POST_EOF'
${STOP_POST}CB_STOP_POST_EOF
[ "$defcmd" = 1 ] && set -- "$@" "$dflt"
date +%s > "$run/started_at" || cb_die 13 "cannot write the run directory"
cd "$run/work" || cb_die 13 "cannot enter the work directory"
if ! out=$(systemd-run "$@" 2>&1 9>&-); then
  case $out in *"already loaded"*|*"already exists"*) cb_adopt ;; esac
  rm -f "$run/started_at"
  case $out in *"Failed to find executable"*) cb_die 21 "$out" ;; esac
  cb_die 22 "systemd-run failed: $out"
fi
printf 'CB-STARTED %s\\n' "$(cat "$run/started_at")"
`;

/** systemd mode: how a finished unit ended. Args: unit run_dir stop(0|1). Prints RUN_DIR/final. */
export const SYSTEMD_FINALIZE = `${PRELUDE}unit=$1 run=$2
if [ "$3" = 1 ]; then systemctl stop "$unit" >/dev/null 2>&1; fi
cat "$run/final" 2>/dev/null
exit 0
`;

/** systemd mode, terminate: stop, reset-failed, verify, remove the run directory. Args: runs_dir id unit. */
export const SYSTEMD_TERMINATE = `${PRELUDE}runs=$1 id=$2 unit=$3
run=$runs/$id
if [ -d "$runs" ]; then cb_lock "$runs" "$id" 600; fi
if ! out=$(systemctl stop "$unit" 2>&1); then
  case $out in *"not loaded"*|*"not found"*) ;; *) cb_die 20 "systemctl stop failed: $out" ;; esac
fi
systemctl reset-failed "$unit" >/dev/null 2>&1
st=$(systemctl show "$unit" -p LoadState,ActiveState 2>&1) || cb_die 14 "systemctl show failed: $st"
case $st in
  *ActiveState=active*|*ActiveState=activating*|*ActiveState=deactivating*|*ActiveState=reloading*)
    cb_die 22 "the unit is still active after stop" ;;
esac
rm -rf "$run" "$runs/.lock.$id"
echo CB-TERMINATED
`;

/** Listing for reconcile. Args: work_dir. Lines: "unit NAME LOAD ACTIVE", "run ID [CPU RAM]", "lock ID". */
export const SYSTEMD_LIST = `${PRELUDE}work=$1
out=$(systemctl list-units --all --plain --no-legend --type=service 'cb-*' 2>&1) || cb_die 14 "systemctl list-units failed: $out"
printf '%s\\n' "$out" | while read -r a b c d rest; do
  # "UNIT LOAD ACTIVE SUB ...", possibly after a status marker column.
  case $a in
    cb-*.service) printf 'unit %s %s %s\\n' "$a" "$b" "$c" ;;
    *) case $b in cb-*.service) printf 'unit %s %s %s\\n' "$b" "$c" "$d" ;; esac ;;
  esac
done
${LIST_RUNS()}`;

function LIST_RUNS(): string {
  return `if [ -d "$work/runs" ]; then
  for d in "$work"/runs/*; do
    [ -d "$d" ] || continue
    a=$(head -n 1 "$d/grant" 2>/dev/null)
    printf 'run %s %s\\n' "\${d##*/}" "$a"
  done
  for l in "$work"/runs/.lock.*; do
    [ -f "$l" ] || continue
    printf 'lock %s\\n' "\${l##*/.lock.}"
  done
fi
exit 0
`;
}

/**
 * Image cache garbage collection: remove cached images no run directory references and nobody
 * used for `minutes`, and stale partial downloads. Args: work_dir minutes.
 */
export const IMAGE_GC = `${PRELUDE}work=$1 mins=$2
[ -d "$work/images" ] || exit 0
refs=" $(cat "$work"/runs/*/image 2>/dev/null | tr '\\n' ' ') "
for f in "$work"/images/*; do
  [ -f "$f" ] || continue
  case $refs in *" \${f##*/} "*) continue ;; esac
  [ -n "$(find "$f" -maxdepth 0 -mmin +"$mins" 2>/dev/null)" ] && rm -f "$f"
done
find "$work/images" -maxdepth 1 -name '.*.part*' -mmin +"$mins" -exec rm -f {} + 2>/dev/null
exit 0
`;

/**
 * virsh mode, step 1: adopt or fetch + verify + inspect. Args: uri domain runs_dir id images_dir
 * sha256 url max_bytes seconds_left (until valid_to: an adopted guest's deadline). Prints CB-ADOPT
 * / CB-DEFINED, or "CB-IMAGE <path>" then "@@INFO" and qemu-img's JSON (the image is never
 * auto-probed: -f qcow2; qemu-img runs with CPU/memory limits).
 */
export const VIRSH_PREPARE = `${PRELUDE}${FETCH}${DEADLINE}umask 022
uri=$1 dom=$2 runs=$3 id=$4 images=$5 sha=$6 url=$7 max=$8 left=$9
run=$runs/$id
cb_lock "$runs" "$id" 900
cb_adopt() { cb_deadline; printf 'CB-ADOPT %s\\n' "$(cat "$run/started_at" 2>/dev/null)"; exit 0; }
if out=$(virsh -c "$uri" domstate --reason "$dom" 2>&1); then
  [ -e "$run/started" ] && cb_adopt
  echo CB-DEFINED
  exit 0
fi
case $out in *"failed to get domain"*|*"omain not found"*) ;; *) cb_die 14 "virsh domstate failed: $out" ;; esac
[ -e "$run/started" ] && cb_adopt
cb_fetch "$images" "$sha" "$url" "$max" "$left"
chmod 0711 "$images" 2>/dev/null; chmod 0644 "$cb_img" 2>/dev/null
if ! info=$( (ulimit -t 30; ulimit -v 4194304; exec qemu-img info -f qcow2 --output=json "$cb_img") 2>&1 ); then
  cb_die 23 "qemu-img info rejected the image: $(printf '%s' "$info" | head -c 300 | tr '\\n' ' ')"
fi
printf 'CB-IMAGE %s\\n@@INFO\\n%s\\n' "$cb_img" "$info"
`;

/**
 * virsh mode, step 2: overlay, define (not create), start, and the host-side deadline. Args: uri
 * domain runs_dir id image_path alloc sha256 seconds_left (until valid_to); stdin: the domain XML.
 * Prints CB-STARTED / CB-ADOPT, after CB-NO-DEADLINE <why> if the deadline could not be set.
 */
export const VIRSH_START = `${PRELUDE}${DEADLINE}umask 022
uri=$1 dom=$2 runs=$3 id=$4 img=$5 alloc=$6 sha=$7 left=$8
run=$runs/$id
cb_lock "$runs" "$id" 900
cb_adopt() { cb_deadline; printf 'CB-ADOPT %s\\n' "$(cat "$run/started_at" 2>/dev/null)"; exit 0; }
chmod 0711 "$runs" 2>/dev/null
mkdir -p "$run" && chmod 0711 "$run" || cb_die 13 "cannot create the run directory"
cat > "$run/domain.xml.tmp" && mv -f "$run/domain.xml.tmp" "$run/domain.xml" || cb_die 13 "cannot write the domain XML"
printf '%s\\n' "$alloc" > "$run/grant" && printf '%s\\n' "$sha" > "$run/image" || cb_die 13 "cannot write the run directory"
if ! virsh -c "$uri" domstate "$dom" >/dev/null 2>&1; then
  [ -e "$run/started" ] && cb_adopt
  rm -f "$run/disk.qcow2"
  qemu-img create -q -f qcow2 -F qcow2 -b "$img" "$run/disk.qcow2" >"$run/.err" 2>&1 || cb_die 30 "creating the overlay failed: $(head -c 300 "$run/.err" | tr '\\n' ' ')"
  virsh -c "$uri" define "$run/domain.xml" >"$run/.err" 2>&1 9>&- || cb_die 31 "virsh define failed: $(head -c 300 "$run/.err" | tr '\\n' ' ')"
  rm -f "$run/.err"
elif [ -e "$run/started" ]; then
  cb_adopt
fi
date +%s > "$run/started_at" && : > "$run/started" || cb_die 13 "cannot write the run directory"
if ! out=$(virsh -c "$uri" start "$dom" 2>&1 9>&-); then
  case $out in
    *"already active"*|*"already running"*) ;;
    *) rm -f "$run/started"; cb_die 32 "virsh start failed: $(printf '%s' "$out" | tr '\\n' ' ')" ;;
  esac
fi
cb_deadline
printf 'CB-STARTED %s\\n' "$(cat "$run/started_at")"
`;

/**
 * virsh mode, warm path: VIRSH_PREPARE and VIRSH_START in one round trip, for an image the bridge
 * has already inspected (qemu-img info) on this machine, followed by VIRSH_ADDRESS's output so the
 * first readiness poll needs no round trip either. Args: uri domain runs_dir id images_dir sha256
 * alloc seconds_left want_evidence(0|1); stdin: the domain XML. Each step fails with the
 * code and message of its own script (13 run directory, 14 virsh, 15 lock, 30 overlay, 31 define,
 * 32 start). Prints CB-ADOPT / CB-STARTED (after CB-NO-DEADLINE <why> when the deadline could not
 * be set) then "@@STATE ...", or CB-COLD alone when the image is not in the cache (nothing done:
 * the bridge uses the two-step path, which fetches and inspects it).
 */
export const VIRSH_PROVISION_WARM = `${PRELUDE}${DEADLINE}umask 022
uri=$1 dom=$2 runs=$3 id=$4 images=$5 sha=$6 alloc=$7 left=$8 want=$9
run=$runs/$id
img=$images/$sha
cb_lock "$runs" "$id" 900
cb_address() {
  if ! st=$(virsh -c "$uri" domstate "$dom" 2>/dev/null); then echo "@@STATE gone"; exit 0; fi
  printf '@@STATE %s\\n' "$st"
  a=$(virsh -c "$uri" domifaddr "$dom" --source lease 2>/dev/null)
  case $a in *ipv4*|*ipv6*) ;; *) a=$(virsh -c "$uri" domifaddr "$dom" --source agent 2>/dev/null) ;; esac
  printf '@@ADDR\\n%s\\n' "$a"
  if [ "$want" = 1 ]; then
    printf '@@QUOTE\\n'
    awk -v id="$id" 'index($0, "COMPUTE-BRIDGE-EVIDENCE-BEGIN " id " ") { on = 1 } on || index($0, "COMPUTE-BRIDGE-EVIDENCE-") { print } index($0, "COMPUTE-BRIDGE-EVIDENCE-END " id " ") { on = 0 }' "$run/console.log" 2>/dev/null | head -c 524288
    echo
  fi
  exit 0
}
cb_adopt() { cb_deadline; printf 'CB-ADOPT %s\\n' "$(cat "$run/started_at" 2>/dev/null)"; cb_address; }
if out=$(virsh -c "$uri" domstate --reason "$dom" 2>&1); then
  [ -e "$run/started" ] && cb_adopt
else
  case $out in *"failed to get domain"*|*"omain not found"*) ;; *) cb_die 14 "virsh domstate failed: $out" ;; esac
  [ -e "$run/started" ] && cb_adopt
  if [ ! -f "$img" ]; then echo CB-COLD; exit 0; fi
  touch "$img" 2>/dev/null
fi
chmod 0711 "$runs" 2>/dev/null
mkdir -p "$run" && chmod 0711 "$run" || cb_die 13 "cannot create the run directory"
cat > "$run/domain.xml.tmp" && mv -f "$run/domain.xml.tmp" "$run/domain.xml" || cb_die 13 "cannot write the domain XML"
printf '%s\\n' "$alloc" > "$run/grant" && printf '%s\\n' "$sha" > "$run/image" || cb_die 13 "cannot write the run directory"
if ! virsh -c "$uri" domstate "$dom" >/dev/null 2>&1; then
  rm -f "$run/disk.qcow2"
  qemu-img create -q -f qcow2 -F qcow2 -b "$img" "$run/disk.qcow2" >"$run/.err" 2>&1 || cb_die 30 "creating the overlay failed: $(head -c 300 "$run/.err" | tr '\\n' ' ')"
  virsh -c "$uri" define "$run/domain.xml" >"$run/.err" 2>&1 9>&- || cb_die 31 "virsh define failed: $(head -c 300 "$run/.err" | tr '\\n' ' ')"
  rm -f "$run/.err"
fi
date +%s > "$run/started_at" && : > "$run/started" || cb_die 13 "cannot write the run directory"
if ! out=$(virsh -c "$uri" start "$dom" 2>&1 9>&-); then
  case $out in
    *"already active"*|*"already running"*) ;;
    *) rm -f "$run/started"; cb_die 32 "virsh start failed: $(printf '%s' "$out" | tr '\\n' ' ')" ;;
  esac
fi
cb_deadline
printf 'CB-STARTED %s\\n' "$(cat "$run/started_at")"
cb_address
`;

/**
 * virsh mode: guest state, address (DHCP lease, else the guest agent) and, for TDX guests, the
 * evidence lines on the serial console (src/attestation/guest.ts; at most 512 KiB).
 * Args: uri domain run_dir request_id want_evidence(0|1).
 */
export const VIRSH_ADDRESS = `${PRELUDE}uri=$1 dom=$2 run=$3 rid=$4
if ! st=$(virsh -c "$uri" domstate "$dom" 2>/dev/null); then echo "@@STATE gone"; exit 0; fi
printf '@@STATE %s\\n' "$st"
a=$(virsh -c "$uri" domifaddr "$dom" --source lease 2>/dev/null)
case $a in *ipv4*|*ipv6*) ;; *) a=$(virsh -c "$uri" domifaddr "$dom" --source agent 2>/dev/null) ;; esac
printf '@@ADDR\\n%s\\n' "$a"
if [ "$5" = 1 ]; then
  printf '@@QUOTE\\n'
  awk -v id="$rid" 'index($0, "COMPUTE-BRIDGE-EVIDENCE-BEGIN " id " ") { on = 1 } on || index($0, "COMPUTE-BRIDGE-EVIDENCE-") { print } index($0, "COMPUTE-BRIDGE-EVIDENCE-END " id " ") { on = 0 }' "$run/console.log" 2>/dev/null | head -c 524288
  echo
fi
exit 0
`;

/** virsh mode, terminate: destroy, undefine --nvram, verify, remove the overlay. Args: uri domain runs_dir id. */
export const VIRSH_TERMINATE = `${PRELUDE}uri=$1 dom=$2 runs=$3 id=$4
run=$runs/$id
if [ -d "$runs" ]; then cb_lock "$runs" "$id" 600; fi
# The host-side deadline goes first (not loaded: nothing to stop).
systemctl stop "cb-deadline-$id.service" >/dev/null 2>&1 9>&-
if out=$(virsh -c "$uri" domstate "$dom" 2>&1); then
  virsh -c "$uri" destroy "$dom" >/dev/null 2>&1
  if ! out=$(virsh -c "$uri" undefine --nvram "$dom" 2>&1); then
    case $out in *"failed to get domain"*|*"omain not found"*) ;; *) cb_die 21 "virsh undefine failed: $(printf '%s' "$out" | tr '\\n' ' ')" ;; esac
  fi
  if virsh -c "$uri" domstate "$dom" >/dev/null 2>&1; then cb_die 22 "the domain still exists after destroy and undefine"; fi
else
  case $out in *"failed to get domain"*|*"omain not found"*) ;; *) cb_die 14 "virsh domstate failed: $(printf '%s' "$out" | tr '\\n' ' ')" ;; esac
fi
rm -rf "$run" "$runs/.lock.$id"
echo CB-TERMINATED
`;

/** Listing for reconcile. Args: uri work_dir. Lines: "dom NAME", "run ID [CPU RAM]", "lock ID". */
export const VIRSH_LIST = `${PRELUDE}uri=$1 work=$2
out=$(virsh -c "$uri" list --all --name 2>&1) || cb_die 14 "virsh list failed: $(printf '%s' "$out" | tr '\\n' ' ')"
printf '%s\\n' "$out" | while IFS= read -r n; do
  case $n in cb-*) printf 'dom %s\\n' "$n" ;; esac
done
${LIST_RUNS()}`;

/**
 * `compute-bridge doctor`: read-only checks on a machine. Args: mode uri work_dir ovmf_path
 * run_as tdx ("1" for a TDX machine; empty strings for what does not apply).
 * Lines: "ok|fail<TAB>check<TAB>detail".
 */
export const DOCTOR = `${PRELUDE}mode=$1 uri=$2 work=$3 ovmf=$4 runas=$5 tdx=$6
r() { printf '%s\\t%s\\t%s\\n' "$1" "$2" "$(printf '%s' "$3" | tr '\\n\\t' '  ' | head -c 300)"; }
missing=
for t in curl sha256sum tar flock od dd; do command -v "$t" >/dev/null 2>&1 || missing="$missing $t"; done
if [ -z "$missing" ]; then r ok tools "curl, sha256sum, tar, flock present"; else r fail tools "missing:$missing"; fi
if [ "$mode" = systemd ]; then
  if v=$(systemctl --version 2>&1); then r ok systemd "$(printf '%s\\n' "$v" | head -n 1)"; else r fail systemd "systemctl --version failed: $v"; fi
  if command -v systemd-run >/dev/null 2>&1; then r ok systemd-run "$(command -v systemd-run)"; else r fail systemd-run "systemd-run not found"; fi
  if [ -n "$runas" ]; then
    if u=$(id -u -- "$runas" 2>/dev/null); then r ok run_as "workloads run as $runas (uid $u)"; else r fail run_as "user $runas does not exist"; fi
  fi
else
  if v=$(virsh -c "$uri" version 2>&1); then r ok libvirt "$(printf '%s\\n' "$v" | grep -iE 'library|hypervisor' | tr '\\n' ';')"; else r fail libvirt "virsh -c $uri version failed: $v"; fi
  if v=$(qemu-img --version 2>&1); then r ok qemu-img "$(printf '%s\\n' "$v" | head -n 1)"; else r fail qemu-img "qemu-img --version failed: $v"; fi
  if [ -n "$ovmf" ]; then if [ -r "$ovmf" ]; then r ok ovmf "$ovmf readable"; else r fail ovmf "$ovmf is not readable"; fi; fi
  # A TDX guest needs libvirt, QEMU, KVM and the host kernel all to support it; libvirt reports
  # the sum in its domain capabilities (libvirt without TDX support has no <tdx> element there
  # and refuses <launchSecurity type='tdx'> in the domain XML).
  if [ -n "$tdx" ]; then
    if caps=$(virsh -c "$uri" domcapabilities --virttype kvm 2>&1); then
      case $caps in
        *"<tdx supported='yes'"*) r ok tdx "libvirt offers TDX guests here (domcapabilities)" ;;
        *) r fail tdx "libvirt does not offer TDX guests here: its domcapabilities has no <tdx supported='yes'/> (TDX needs a libvirt, QEMU, KVM and host kernel with TDX support)" ;;
      esac
    else
      r fail tdx "virsh -c $uri domcapabilities --virttype kvm failed: $caps"
    fi
  fi
  if command -v systemd-run >/dev/null 2>&1; then r ok systemd-run "$(command -v systemd-run) (guests get a host-side deadline at valid_to)"; else r fail systemd-run "systemd-run not found: guests would run past valid_to while the bridge is away"; fi
fi
d=$work
while [ ! -d "$d" ]; do d=\${d%/*}; [ -n "$d" ] || d=/; done
if [ -w "$d" ]; then
  if [ "$d" = "$work" ]; then r ok work_dir "$work is writable"; else r ok work_dir "$work will be created under $d"; fi
else
  r fail work_dir "$d is not writable (work_dir $work)"
fi
exit 0
`;
