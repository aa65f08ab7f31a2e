/**
 * The image download every script the bridge renders for another machine uses (the cloud boot
 * script, the bare-metal provision scripts): one POSIX shell function, so the limits are the same
 * wherever the bytes are fetched.
 *
 *   cb_curl URL OUT MAX_BYTES DEADLINE_EPOCH IDLE_SECONDS [HEARTBEAT]
 *     - http/https only, also for redirects (at most 5); no URL globbing;
 *     - connect timeout and an idle timeout (less than 1 byte/s for IDLE_SECONDS);
 *     - every attempt ends by DEADLINE_EPOCH (the grant's valid_to, host clock), retries of
 *       transient failures (resolve, connect, timeout, TLS, dropped connection) too;
 *     - size capped while streaming: curl's --max-filesize when the size is announced, and the
 *       kernel's file size limit (ulimit -f: 512-byte blocks in a POSIX sh, 1024 in bash outside
 *       POSIX mode) for the rest, so OUT never grows past twice MAX_BYTES.
 *     - HEARTBEAT non-empty: while curl runs, a newline goes to stdout every second, and a failed
 *       write returns 141 at once (the reader is gone: over SSH, the bridge closed the channel).
 *   curl runs as $cb_curl_pid while it runs (for the caller's traps to kill). Returns curl's exit
 *   status (153 = stopped by the size limit); OUT may be partial on failure (the caller removes it).
 *
 *   cb_curl_why STATUS
 *     a failure description naming no host, address or port (they may be internal).
 */
export const CURL_FETCH = String.raw`cb_curl() { # url out max_bytes deadline_epoch idle_seconds [heartbeat]
  cb_try=0
  while :; do
    cb_left=$(( $4 - $(date +%s) ))
    [ "$cb_left" -gt 0 ] || return 28
    ( ulimit -c 0 2>/dev/null; ulimit -f $(( $3 / 512 + 2 )) 2>/dev/null
      exec curl -fsS --globoff --location --max-redirs 5 --proto '=https,http' --proto-redir '=https,http' \
        --connect-timeout "$5" --speed-limit 1 --speed-time "$5" --max-time "$cb_left" \
        --max-filesize "$3" -o "$2" --url "$1" 2>/dev/null ) &
    cb_curl_pid=$!
    if [ -n "$6" ]; then
      while kill -0 "$cb_curl_pid" 2>/dev/null; do
        printf '\n' || return 141
        sleep 1
      done
    fi
    wait "$cb_curl_pid"; cb_rc=$?
    cb_curl_pid=
    [ "$cb_rc" -eq 0 ] && return 0
    cb_try=$((cb_try + 1))
    case $cb_rc in
      6|7|28|35|52|55|56) if [ "$cb_try" -lt 3 ] && [ $(( $4 - $(date +%s) )) -gt 1 ]; then sleep 1; continue; fi ;;
    esac
    return "$cb_rc"
  done
}
cb_curl_why() {
  case $1 in
    6) echo "the image host's name did not resolve" ;;
    7) echo "could not connect to the image host" ;;
    22) echo "the image server answered with an HTTP error" ;;
    28) echo "timed out (no data for too long, or the grant's valid_to came first)" ;;
    35|51|53|54|58|59|60|77|80|83|90|91) echo "the TLS handshake with the image host failed" ;;
    47) echo "too many redirects" ;;
    1|3) echo "a redirect to a URL that is not http(s), or an invalid URL" ;;
    63|153) echo "the image is larger than the limit" ;;
    *) echo "the transfer failed (curl status $1)" ;;
  esac
}
`;
