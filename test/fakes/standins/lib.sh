# shellcheck shell=bash
# Shared helpers for the systemd / libvirt stand-ins in test/fakes/bin.
# Sourced, never executed. Pure bash builtins on the hot paths (no forks), so
# `systemctl show` and `virsh domstate` answer in a few milliseconds.
#
# State lives under $CB_FAKE_STATE (one directory per simulated machine, set by
# the fake sshd through `SetEnv CB_FAKE_STATE=...`). See standins/README.md.

CB_STANDINS_DIR=${BASH_SOURCE[0]%/*}
CB_STANDINS_DIR=${CB_STANDINS_DIR/\/bin\/..\//\/}   # ".../bin/../standins" -> ".../standins"
CB_BIN_DIR=${CB_STANDINS_DIR%/standins}/bin

cb_require_state() {
  if [[ -z ${CB_FAKE_STATE:-} ]]; then
    printf '%s: CB_FAKE_STATE is not set; this is a test stand-in and needs a state dir\n' "${0##*/}" >&2
    exit 1
  fi
  mkdir -p "$CB_FAKE_STATE" 2>/dev/null
}

# Realtime in microseconds -> REPLY.
cb_now_us() { REPLY=$(( 10#${EPOCHREALTIME/./} )); }

# Monotonic-ish clock (time since boot) in microseconds -> REPLY.
cb_mono_us() {
  local up _
  read -r up _ < /proc/uptime
  REPLY=$(( 10#${up/./} * 10000 ))
}

# systemd's FORMAT_TIMESTAMP: "Thu 2024-01-04 10:00:00 UTC"; 0 or empty -> "".
cb_fmt_timestamp() {
  local us=${1:-0}
  if [[ -z $us || $us == 0 ]]; then REPLY=""; return; fi
  printf -v REPLY '%(%a %Y-%m-%d %H:%M:%S %Z)T' "$(( us / 1000000 ))"
}

# systemd's format_timespan(t, accuracy=0) as used by `systemctl show` for *USec.
cb_fmt_timespan() {
  local t=$1
  if [[ $t == infinity || -z $t ]]; then REPLY=infinity; return; fi
  if (( t <= 0 )); then REPLY=0; return; fi
  local -a names=(y month w d h min s ms us)
  local -a vals=(31557600000000 2629800000000 604800000000 86400000000 3600000000 60000000 1000000 1000 1)
  local out="" part i a b j cc
  for i in "${!vals[@]}"; do
    (( t <= 0 )) && break
    (( t < vals[i] )) && continue
    a=$(( t / vals[i] )); b=$(( t % vals[i] ))
    if (( t < 60000000 && b > 0 )); then
      j=0
      for (( cc = vals[i]; cc > 1; cc /= 10 )); do (( j++ )); done
      if (( j > 0 )); then
        printf -v part '%d.%0*d%s' "$a" "$j" "$b" "${names[i]}"
        out+="${out:+ }$part"
        t=0
        break
      fi
    fi
    out+="${out:+ }$a${names[i]}"
    t=$b
  done
  REPLY=$out
}

# Parse a systemd time span ("5", "5s", "500ms", "1min 30s", "1.5s", "infinity")
# into microseconds -> REPLY. Default unit: seconds. Returns 1 on syntax error.
cb_parse_timespan() {
  local s=$1 total=0 num unit int frac mult w
  if [[ $s == infinity ]]; then REPLY=infinity; return 0; fi
  s=${s//$'\t'/ }
  for w in $s; do
    if [[ ! $w =~ ^([0-9]+)(\.[0-9]+)?([a-z]*)$ ]]; then return 1; fi
    int=${BASH_REMATCH[1]}; frac=${BASH_REMATCH[2]#.}; unit=${BASH_REMATCH[3]}
    case $unit in
      us|usec) mult=1 ;;
      ms|msec) mult=1000 ;;
      ''|s|sec|second|seconds) mult=1000000 ;;
      m|min|minute|minutes) mult=60000000 ;;
      h|hr|hour|hours) mult=3600000000 ;;
      d|day|days) mult=86400000000 ;;
      w|week|weeks) mult=604800000000 ;;
      *) return 1 ;;
    esac
    num=$(( 10#$int * mult ))
    if [[ -n $frac ]]; then
      frac=${frac:0:9}
      local scale=1 k
      for (( k = 0; k < ${#frac}; k++ )); do scale=$(( scale * 10 )); done
      num=$(( num + 10#$frac * mult / scale ))
    fi
    total=$(( total + num ))
  done
  REPLY=$total
}

# Parse a size ("512M", "1G", "1048576", "infinity"; K/M/G/T are base 1024 like
# systemd's parse_size) into bytes -> REPLY. Returns 1 on syntax error.
cb_parse_size() {
  local s=$1
  if [[ $s == infinity ]]; then REPLY=infinity; return 0; fi
  [[ $s =~ ^([0-9]+)(\.[0-9]+)?([KMGTPE]?)B?$ ]] || return 1
  local int=${BASH_REMATCH[1]} frac=${BASH_REMATCH[2]#.} u=${BASH_REMATCH[3]} mult=1
  case $u in
    K) mult=1024 ;; M) mult=1048576 ;; G) mult=1073741824 ;; T) mult=1099511627776 ;;
    P) mult=1125899906842624 ;; E) mult=1152921504606846976 ;;
  esac
  local v=$(( 10#$int * mult ))
  if [[ -n $frac ]]; then
    frac=${frac:0:6}
    local scale=1 k
    for (( k = 0; k < ${#frac}; k++ )); do scale=$(( scale * 10 )); done
    v=$(( v + 10#$frac * mult / scale ))
  fi
  REPLY=$v
}

# systemd's parse_boolean -> REPLY=yes|no. Returns 1 if not a boolean.
cb_parse_bool() {
  case ${1,,} in
    1|yes|y|true|t|on) REPLY=yes ;;
    0|no|n|false|f|off) REPLY=no ;;
    *) return 1 ;;
  esac
}

# shell_maybe_quote(SHELL_ESCAPE_EMPTY) as used by systemd-run for descriptions.
cb_shell_maybe_quote() {
  local s=$1
  if [[ -z $s ]]; then REPLY='""'; return; fi
  if [[ $s == *[\"\\\`\$\*\?\[\'\(\)\<\>\|\&\;\!\ $'\t\n\r']* ]]; then
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\`/\\\`}; s=${s//\$/\\\$}
    REPLY="\"$s\""
  else
    REPLY=$s
  fi
}

# Process helpers --------------------------------------------------------------

# Read /proc/PID/stat. Sets STAT_STATE STAT_PPID STAT_PGRP STAT_SID STAT_UTIME
# STAT_STIME STAT_CUTIME STAT_CSTIME STAT_START STAT_RSS. Returns 1 if gone.
cb_proc_stat() {
  local line rest
  { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  STAT_STATE=$1 STAT_PPID=$2 STAT_PGRP=$3 STAT_SID=$4
  STAT_UTIME=${12} STAT_STIME=${13} STAT_CUTIME=${14} STAT_CSTIME=${15}
  STAT_START=${20} STAT_RSS=${22}
  return 0
}

# Is PID alive (not a zombie), and (if given) still the process started at START?
cb_alive() {
  local pid=$1 start=${2:-}
  [[ -n $pid && $pid != 0 ]] || return 1
  cb_proc_stat "$pid" || return 1
  [[ $STAT_STATE == Z || $STAT_STATE == X ]] && return 1
  [[ -z $start || $start == "$STAT_START" ]]
}

CB_CLK_TCK=100
CB_PAGE_KIB=4

# Sum CPU (ns), RSS (bytes) and task count over all live processes whose
# session id is SID -> SUM_CPU_NS SUM_RSS SUM_TASKS.
cb_session_usage() {
  local sid=$1 f ticks=0 rss=0 tasks=0 pid
  SUM_CPU_NS=0 SUM_RSS=0 SUM_TASKS=0
  [[ -n $sid && $sid != 0 ]] || return 0
  for f in /proc/[0-9]*; do
    pid=${f#/proc/}
    cb_proc_stat "$pid" || continue
    [[ $STAT_SID == "$sid" ]] || continue
    [[ $STAT_STATE == Z || $STAT_STATE == X ]] && continue
    ticks=$(( ticks + STAT_UTIME + STAT_STIME + STAT_CUTIME + STAT_CSTIME ))
    rss=$(( rss + STAT_RSS * CB_PAGE_KIB * 1024 ))
    tasks=$(( tasks + 1 ))
  done
  SUM_CPU_NS=$(( ticks * (1000000000 / CB_CLK_TCK) ))
  SUM_RSS=$rss
  SUM_TASKS=$tasks
}

# Pids of live processes in session SID -> SESSION_PIDS array.
cb_session_pids() {
  local sid=$1 f pid
  SESSION_PIDS=()
  [[ -n $sid && $sid != 0 ]] || return 0
  for f in /proc/[0-9]*; do
    pid=${f#/proc/}
    cb_proc_stat "$pid" || continue
    [[ $STAT_SID == "$sid" && $STAT_STATE != Z && $STAT_STATE != X ]] && SESSION_PIDS+=("$pid")
  done
}

# Record a long-lived process we spawned so the test harness can reap it on
# sshd.stop(): "PID STARTTIME KIND NAME".
cb_register_pid() {
  local pid=$1 kind=$2 name=$3
  cb_proc_stat "$pid" || return 0
  printf '%s %s %s %s\n' "$pid" "$STAT_START" "$kind" "$name" >> "$CB_FAKE_STATE/pids"
}

# Small sleep without forking: a read with timeout on a private FIFO that
# nobody ever writes to.
cb_sleep() {
  if [[ -z ${CB_SLEEP_FD:-} ]]; then
    local fifo="$CB_FAKE_STATE/.sleep.$$"
    mkfifo "$fifo" 2>/dev/null
    exec {CB_SLEEP_FD}<>"$fifo"
    rm -f "$fifo"
  fi
  read -rt "$1" -u "$CB_SLEEP_FD" _ 2>/dev/null || :
}

# Signal name <-> number (Linux x86_64/arm64 numbering).
CB_SIGNAMES=(0 HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM STKFLT CHLD CONT STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF WINCH IO PWR SYS)
cb_signum() {
  local s=${1#SIG} i
  s=${s^^}
  if [[ $s =~ ^[0-9]+$ ]]; then REPLY=$s; return 0; fi
  for i in "${!CB_SIGNAMES[@]}"; do
    [[ ${CB_SIGNAMES[i]} == "$s" ]] && { REPLY=$i; return 0; }
  done
  return 1
}
