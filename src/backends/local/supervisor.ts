/**
 * The local backend's per-workload supervisor (cf. containerd's shim), as a bash script the
 * daemon writes into state_dir and starts detached in its own session, so it outlives the daemon.
 * Once started it needs nothing of that state_dir (bash keeps its script open; the image is
 * copied or unpacked into RUN_DIR/work): another replica sharing runs_dir watches and stops it by
 * RUN_DIR and /proc alone, even after the starting one and its state_dir are gone.
 *
 * Contract with src/backends/local.ts (all paths inside RUN_DIR):
 *   started/            created with mkdir (atomic): whoever creates it owns the run. A second
 *                       supervisor for the same grant exits at once: a workload never starts twice.
 *   started/supervisor_pid, started/workload_pid
 *                       the workload runs in its own process group (pgid = workload_pid).
 *   env0                NUL-separated K=V lines: the workload's whole environment.
 *   expired             touched by the watchdog before it kills the group at the deadline.
 *   result              written atomically when the workload is gone:
 *                       exit_status=<0-255, 128+signal when killed> cpu_seconds=<user+sys>
 *                       started_ms=<epoch ms> ended_ms=<epoch ms> failure=<text or empty>
 *   stdout.log, stderr.log
 *
 * usage: supervisor.sh RUN_DIR DEADLINE_EPOCH_MS -- COMMAND [ARGS...]
 */
export const SUPERVISOR_SCRIPT = String.raw`#!/bin/bash
set -u
run=$1 deadline_ms=$2
shift 3
mkdir "$run/started" 2>/dev/null || exit 0
echo "$$" > "$run/started/supervisor_pid"

now_ms() { local t; t=$(date +%s%N); echo $(( t / 1000000 )); }
finish() { # exit_status cpu_seconds started_ms failure
  printf 'exit_status=%s\ncpu_seconds=%s\nstarted_ms=%s\nended_ms=%s\nfailure=%s\n' "$1" "$2" "$3" "$(now_ms)" "$4" > "$run/result.tmp"
  mv -f "$run/result.tmp" "$run/result"
}

started=$(now_ms)
if ! cd "$run/work" 2>/dev/null; then finish "" "" "$started" "work directory missing"; exit 0; fi

set -m
(
  while IFS= read -r -d '' kv; do export "$kv"; done < "$run/env0"
  exec "$@"
) </dev/null >>"$run/stdout.log" 2>>"$run/stderr.log" &
wl=$!
echo "$wl" > "$run/started/workload_pid"

remaining=$(( deadline_ms - $(now_ms) ))
watchdog=""
if (( remaining <= 0 )); then
  : > "$run/expired"; kill -KILL -- "-$wl" 2>/dev/null
else
  ( sleep "$(( remaining / 1000 )).$(printf '%03d' $(( remaining % 1000 )))"; : > "$run/expired"; kill -KILL -- "-$wl" 2>/dev/null ) </dev/null >/dev/null 2>&1 &
  watchdog=$!
fi

wait "$wl"; status=$?
if [ -n "$watchdog" ]; then kill -KILL -- "-$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; fi
kill -KILL -- "-$wl" 2>/dev/null   # anything the workload left behind in its group

# times (run in this shell, not a subshell): line 2 is the user and system time of the reaped
# children, as "XmY.YYYs XmY.YYYs".
times > "$run/times"
cpu=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] } printf "%.3f", t }' "$run/times")
finish "$status" "$cpu" "$started" ""
`;
