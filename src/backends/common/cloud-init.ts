/**
 * The boot script a cloud VM runs as user data (at most once: a second boot reports a failure) (cloud-init on EC2, a startup script on GCE,
 * custom data on Azure). Shared by the cloud backends; none of them imports another backend.
 *
 * The script, as root on first boot:
 *  1. appends the grant's SSH public key to the login user's authorized_keys, and writes
 *     `COMPUTE-BRIDGE-HOSTKEY <request_id> <SHA256:fingerprint|none>` (its ed25519 host key) to
 *     the serial console, which only the cloud API reads: the bridge reports it as
 *     host_key_sha256, so whoever connects can pin the key instead of trusting the first
 *     connection (the line comes before anything from the image runs, and the first one counts);
 *     on a TDX grant it then prints attestation evidence bound to (request_id, nonce, that host
 *     key) the same way (src/attestation/guest.ts);
 *  2. downloads the image with curl (common/fetch-script.ts: http/https only, no globbing, idle
 *     timeout, ends by valid_to, size capped while streaming, retried; the URL
 *     given to curl is the WHATWG-normalized form of envelope.image.url), verifies its
 *     sha256 and, on a mismatch, reports COMPUTE-BRIDGE-FAIL and powers off WITHOUT running it;
 *  3. unpacks a tar/tar.gz bundle (default command ./run) or installs a single executable
 *     (default command ./workload), exactly as the local backend does;
 *  4. runs the command in the work directory with a clean environment (PATH, HOME, LANG and the
 *     envelope's env), stopped at the grant's valid_to when a deadline is given;
 *  5. writes `COMPUTE-BRIDGE-EXIT <request_id> <exit_code> cpu=<seconds>` to the serial console
 *     (the workload's user + system CPU time, as times(1) counts the children it waited for) and
 *     powers off.
 *
 * Every value that comes from the grant or envelope is embedded as a single-quoted POSIX literal
 * (util/shell.ts `shq`); nothing from a grant is ever interpolated unquoted. Environment names,
 * which cannot be quoted on the left of `=`, are validated against a strict pattern and passed
 * through env(1) inside a quoted `NAME=value` word as well.
 *
 * Paths only a real VM has are variables at the top with production defaults; tests point them
 * at stand-ins through the environment: CB_CONSOLE (serial console, /dev/ttyS0), CB_POWEROFF
 * (poweroff), CB_ROOT (prefix for the state directory, empty), CB_HOME (the login user's home,
 * looked up with getent by default) and CB_SSH_HOST_KEY (the public half of sshd's ed25519 host
 * key, /etc/ssh/ssh_host_ed25519_key.pub).
 */
import { SshPublicKey } from "../../domain/grant.js";
import type { Envelope } from "../../domain/index.js";
import { HOST_KEY_FINGERPRINT } from "../../domain/instance.js";
import { shq } from "../../util/shell.js";
import { renderAttestStep, type GuestAttestation } from "../../attestation/guest.js";
import { CURL_FETCH } from "./fetch-script.js";

export const EXIT_MARKER = "COMPUTE-BRIDGE-EXIT";
export const FAIL_MARKER = "COMPUTE-BRIDGE-FAIL";
export const HOST_KEY_MARKER = "COMPUTE-BRIDGE-HOSTKEY";

/** Environment variables a test (or an unusual image) may set to move the VM-only paths. */
export const BOOT_SCRIPT_OVERRIDES = {
  console: "CB_CONSOLE",
  poweroff: "CB_POWEROFF",
  root: "CB_ROOT",
  home: "CB_HOME",
  hostKey: "CB_SSH_HOST_KEY",
} as const;

/** Failure kinds the script reports; the bridge turns them into the grant's error_kind. */
export type BootFailureKind = "image_verification" | "fetch" | "unpack" | "setup" | "ssh_key" | "expired";

export interface BootScriptOptions {
  requestId: string;
  envelope: Envelope;
  /** Login user whose authorized_keys receives envelope.ssh_public_key. */
  sshUser: string;
  /** Largest image accepted, in bytes (curl --max-filesize plus a check after download). Default 2 GiB. */
  maxImageBytes?: number;
  /** Unix time (seconds) at which the workload is stopped and the VM powers off: the grant's valid_to. */
  deadlineEpochSeconds?: number;
  /** Production serial console device; default /dev/ttyS0 (EC2, GCE and Azure x86 images). */
  consoleDevice?: string;
  /** TDX grants: evidence bound to (request_id, this nonce, the host key) goes on the console (src/attestation/guest.ts). */
  attestation?: { mode: GuestAttestation; nonce: string };
}

const REQUEST_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
const ENV_NAME_RE = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;
const USER_RE = /^[a-z_][a-z0-9_-]{0,31}$/;
const SHA256_RE = /^[0-9a-f]{64}$/;
const DEFAULT_MAX_IMAGE_BYTES = 2 * 1024 * 1024 * 1024;
const WORKLOAD_PATH = "/usr/local/bin:/usr/bin:/bin";

export class BootScriptError extends Error {
  override name = "BootScriptError";
}

/**
 * Render the user-data script. Deterministic: the same inputs give the same bytes, so a
 * retried or restarted create call sends an identical request (EC2 ClientToken idempotency
 * compares every parameter, user data included).
 */
export function renderBootScript(o: BootScriptOptions): string {
  const { requestId, envelope, sshUser } = o;
  if (!REQUEST_ID_RE.test(requestId) || requestId === "." || requestId === "..") throw new BootScriptError("request_id must be 1-64 characters of A-Z a-z 0-9 . _ -");
  if (!USER_RE.test(sshUser)) throw new BootScriptError(`ssh user "${sshUser}" is not a valid user name`);
  const sha = envelope.image.sha256.toLowerCase();
  if (!SHA256_RE.test(sha)) throw new BootScriptError("image.sha256 must be 64 hex characters");
  if (envelope.image.format !== "bundle") throw new BootScriptError(`cloud VMs run "bundle" images (an executable or a tar/tar.gz); got "${envelope.image.format}"`);
  // curl gets the WHATWG-normalized URL (what any HTTP client would request): quotes, backticks
  // and spaces percent-encoded, tabs and newlines dropped. It is still embedded quoted.
  let parsed: URL;
  try {
    parsed = new URL(envelope.image.url);
  } catch {
    throw new BootScriptError("image.url is not a URL");
  }
  const scheme = parsed.protocol;
  if (scheme !== "http:" && scheme !== "https:") throw new BootScriptError(`a cloud VM fetches its image over http(s); ${scheme} URLs cannot be used`);
  const key = envelope.ssh_public_key;
  if (key !== undefined && !SshPublicKey.safeParse(key).success) throw new BootScriptError("ssh_public_key must be a single OpenSSH public key line");
  const maxBytes = o.maxImageBytes ?? DEFAULT_MAX_IMAGE_BYTES;
  if (!Number.isSafeInteger(maxBytes) || maxBytes <= 0) throw new BootScriptError("maxImageBytes must be a positive integer");
  const deadline = o.deadlineEpochSeconds;
  if (deadline !== undefined && (!Number.isFinite(deadline) || deadline < 0)) throw new BootScriptError("deadlineEpochSeconds must be a non-negative number");
  const consoleDevice = o.consoleDevice ?? "/dev/ttyS0";
  if (!/^\/dev\/[A-Za-z0-9]+$/.test(consoleDevice)) throw new BootScriptError(`console device "${consoleDevice}" must look like /dev/ttyS0`);

  // The workload's environment, as local.ts builds it: defaults, then the envelope's values.
  const envWords: string[] = [];
  const env = envelope.env ?? {};
  for (const name of Object.keys(env)) if (!ENV_NAME_RE.test(name)) throw new BootScriptError(`env name "${name.slice(0, 64)}" is not a shell-safe variable name`);
  if (!("PATH" in env)) envWords.push(shq(`PATH=${WORKLOAD_PATH}`));
  if (!("HOME" in env)) envWords.push(`"HOME=$CB_WORK"`);
  if (!("LANG" in env)) envWords.push(shq("LANG=C.UTF-8"));
  for (const [name, value] of Object.entries(env)) envWords.push(shq(`${name}=${value}`));

  const command = envelope.command;
  const setCommand = command && command.length > 0 ? `set -- ${command.map(shq).join(" ")}` : `set -- "$cb_default_cmd"`;

  return `#!/bin/sh
# compute-bridge boot script (generated). Fetches and verifies the workload image, installs the
# grant's SSH key, runs the workload, reports its exit code on the serial console, powers off.
# Every value taken from the grant is a single-quoted literal.

# VM-only paths; tests override them through the environment.
CB_CONSOLE=\${CB_CONSOLE:-${consoleDevice}}
CB_POWEROFF=\${CB_POWEROFF:-poweroff}
CB_ROOT=\${CB_ROOT:-}
CB_HOME=\${CB_HOME:-}
CB_SSH_HOST_KEY=\${CB_SSH_HOST_KEY:-/etc/ssh/ssh_host_ed25519_key.pub}
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 077

CB_REQUEST_ID=${shq(requestId)}
CB_SSH_USER=${shq(sshUser)}
CB_SSH_KEY=${shq(key ?? "")}
CB_IMAGE_URL=${shq(parsed.href)}
CB_IMAGE_SHA256=${shq(sha)}
CB_IMAGE_MAX_BYTES=${maxBytes}
CB_DEADLINE=${deadline === undefined ? "" : Math.floor(deadline)}
CB_STATE="$CB_ROOT/var/lib/compute-bridge"
CB_WORK="$CB_STATE/work"

cb_console() {
  printf '%s\\n' "$1" >>"$CB_CONSOLE" 2>/dev/null || printf '%s\\n' "$1" >&2
}
# Report one final marker line, then power off; nothing runs after it.
cb_end() {
  cb_console "$1"
  sync 2>/dev/null
  "$CB_POWEROFF"
  exit 0
}
cb_fail() {
  cb_end "${FAIL_MARKER} $CB_REQUEST_ID $1 $2"
}
${CURL_FETCH}
cb_console "compute-bridge: boot script for $CB_REQUEST_ID started"

# 0. At most once per instance: GCE runs a startup-script on every boot, and a rebooted guest
#    must not fetch and run the workload a second time.
mkdir -p "$CB_STATE" || cb_fail setup "cannot create the state directory"
if ! mkdir "$CB_STATE/started" 2>/dev/null; then
  cb_fail setup "the boot script already ran on this instance (the guest rebooted); the workload is not run twice"
fi

# 1. The grant's SSH key for the login user.
if [ -n "$CB_SSH_KEY" ]; then
  cb_home=$CB_HOME
  if [ -z "$cb_home" ]; then cb_home=$(getent passwd "$CB_SSH_USER" | cut -d: -f6); fi
  if [ -z "$cb_home" ]; then cb_home="/home/$CB_SSH_USER"; fi
  mkdir -p "$cb_home/.ssh" && touch "$cb_home/.ssh/authorized_keys" || cb_fail ssh_key "cannot create authorized_keys for the login user"
  if ! grep -qxF -e "$CB_SSH_KEY" "$cb_home/.ssh/authorized_keys"; then
    printf '%s\\n' "$CB_SSH_KEY" >>"$cb_home/.ssh/authorized_keys" || cb_fail ssh_key "cannot write authorized_keys for the login user"
  fi
  chmod 700 "$cb_home/.ssh" && chmod 600 "$cb_home/.ssh/authorized_keys"
  chown -R "$CB_SSH_USER:" "$cb_home/.ssh" 2>/dev/null || :
fi
# The host key's fingerprint, for the bridge to publish: before anything from the image runs.
cb_host_key=none
if [ -r "$CB_SSH_HOST_KEY" ] && command -v ssh-keygen >/dev/null 2>&1; then
  cb_fp=$(ssh-keygen -E sha256 -lf "$CB_SSH_HOST_KEY" 2>/dev/null | awk '{ print $2 }')
  case "$cb_fp" in SHA256:*) cb_host_key=$cb_fp ;; esac
fi
cb_console "${HOST_KEY_MARKER} $CB_REQUEST_ID $cb_host_key"
${o.attestation ? renderAttestStep(o.attestation.mode, o.attestation.nonce) : ""}
# 2. Fetch and verify the image; on a mismatch nothing from it runs.
rm -rf "$CB_WORK" "$CB_STATE/image" "$CB_STATE/image.part"
mkdir -p "$CB_WORK" && cd "$CB_STATE" || cb_fail setup "cannot create the work directory"
cb_console "compute-bridge: fetching the image"
# Bounded (common/fetch-script.ts): idle timeout, valid_to (or a day without one), size while streaming.
cb_fetch_by=\${CB_DEADLINE:-$(( $(date +%s) + 86400 ))}
if [ "$(date +%s)" -ge "$cb_fetch_by" ]; then cb_fail expired "valid_to passed before the image was fetched"; fi
cb_curl "$CB_IMAGE_URL" image.part "$CB_IMAGE_MAX_BYTES" "$cb_fetch_by" 60; cb_rc=$?
if [ "$cb_rc" -ne 0 ]; then
  rm -f image.part
  cb_fail fetch "downloading the image failed: $(cb_curl_why "$cb_rc")"
fi
cb_size=$(wc -c <image.part)
if [ "$cb_size" -gt "$CB_IMAGE_MAX_BYTES" ]; then
  rm -f image.part
  cb_fail fetch "the image is larger than the limit"
fi
if ! echo "$CB_IMAGE_SHA256  image.part" | sha256sum -c --status; then
  rm -f image.part
  cb_fail image_verification "image sha256 mismatch: nothing was run"
fi
mv image.part image || cb_fail setup "cannot move the verified image into place"

# 3. A tar/tar.gz bundle is unpacked (default ./run); anything else is one executable (./workload).
cb_magic=$(od -An -tx1 -N2 image | tr -d ' \\n')
cb_ustar=$(dd if=image bs=1 skip=257 count=5 2>/dev/null)
if [ "$cb_magic" = 1f8b ]; then
  tar -xzf image -C "$CB_WORK" --no-same-owner --no-same-permissions || cb_fail unpack "unpacking the bundle failed"
  cb_default_cmd=./run
elif [ "$cb_ustar" = ustar ]; then
  tar -xf image -C "$CB_WORK" --no-same-owner --no-same-permissions || cb_fail unpack "unpacking the bundle failed"
  cb_default_cmd=./run
else
  cp image "$CB_WORK/workload" && chmod 700 "$CB_WORK/workload" || cb_fail setup "cannot install the workload executable"
  cb_default_cmd=./workload
fi
cd "$CB_WORK" || cb_fail setup "cannot enter the work directory"

# 4. Run it with a clean environment; the command words are positional parameters, so env(1)
# never mistakes one of them for an assignment.
${setCommand}
set -- env -i ${envWords.join(" ")} /bin/sh -c 'exec "$@"' workload "$@"
if [ -n "$CB_DEADLINE" ]; then
  cb_left=$((CB_DEADLINE - $(date +%s)))
  if [ "$cb_left" -le 0 ]; then cb_fail expired "valid_to passed before the workload started"; fi
  if command -v timeout >/dev/null 2>&1; then set -- timeout -k 30 "$cb_left" "$@"; fi
fi
cb_console "compute-bridge: starting the workload"
# Its CPU time: the children's user + system time this shell has waited for, after minus before
# (times is a builtin: redirected, not piped, so it reports this shell and not a subshell).
times >"$CB_STATE/times.before" 2>/dev/null
"$@" </dev/null >"$CB_STATE/workload.log" 2>&1
cb_rc=$?
times >"$CB_STATE/times.after" 2>/dev/null
cb_cpu=$(awk 'function s(t, a) { sub(/s$/, "", t); split(t, a, "m"); return a[1] * 60 + a[2] }
  FNR == 2 { v[FILENAME] = s($1) + s($2) }
  END { d = v[ARGV[2]] - v[ARGV[1]]; if (d < 0) d = 0; printf "%.3f", d }' "$CB_STATE/times.before" "$CB_STATE/times.after" 2>/dev/null)
if [ -n "$CB_DEADLINE" ] && [ "$(date +%s)" -ge "$CB_DEADLINE" ] && { [ "$cb_rc" -eq 124 ] || [ "$cb_rc" -eq 137 ]; }; then
  cb_fail expired "valid_to reached: the workload was stopped"
fi

# 5. Report and power off.
cb_end "${EXIT_MARKER} $CB_REQUEST_ID $cb_rc\${cb_cpu:+ cpu=$cb_cpu}"
`;
}

/** `cpuSeconds`: the workload's CPU time as the script measured it; null when the marker has none. */
export type MarkerResult = { exitCode: number; cpuSeconds: number | null } | { failure: { kind: string; message: string } } | null;

/** The exact marker lines the script writes (for guest simulators and tests). */
export function exitMarker(requestId: string, exitCode: number, cpuSeconds?: number): string {
  return `${EXIT_MARKER} ${requestId} ${exitCode}${cpuSeconds === undefined ? "" : ` cpu=${cpuSeconds.toFixed(3)}`}`;
}
export function failMarker(requestId: string, kind: string, message: string): string {
  return `${FAIL_MARKER} ${requestId} ${kind} ${message.replace(/[\r\n]+/g, " ")}`;
}

export function hostKeyMarker(requestId: string, fingerprint: string | null): string {
  return `${HOST_KEY_MARKER} ${requestId} ${fingerprint ?? "none"}`;
}

const MARKER_RE = /(?:^|\s)(COMPUTE-BRIDGE-EXIT|COMPUTE-BRIDGE-FAIL) (\S+) (\S+)(?: (.*))?$/;
const MAX_MESSAGE = 500;

/**
 * The last marker for `requestId` in a serial console capture, or null when there is none.
 * Lines may carry a prefix (timestamps, "cloud-init[123]:"); markers for other request ids and
 * malformed ones are ignored. The last one wins: the script writes its marker last, so a line a
 * workload printed earlier cannot mask it.
 */
export function parseMarker(consoleText: string, requestId: string): MarkerResult {
  let result: MarkerResult = null;
  for (const raw of consoleText.split("\n")) {
    const line = raw.replace(/\s+$/, "");
    const m = MARKER_RE.exec(line);
    if (!m || m[2] !== requestId) continue;
    if (m[1] === EXIT_MARKER) {
      const cpu = m[4] === undefined ? null : /^cpu=(\d{1,9}(?:\.\d{1,6})?)$/.exec(m[4]);
      if ((m[4] !== undefined && !cpu) || !/^\d{1,3}$/.test(m[3]!)) continue;
      const code = Number(m[3]);
      if (code > 255) continue;
      result = { exitCode: code, cpuSeconds: cpu ? Number(cpu[1]) : null };
    } else {
      if (!/^[a-z][a-z0-9_]{0,63}$/.test(m[3]!)) continue;
      const message = (m[4] ?? "").trim().replace(/[^\x20-\x7e]/g, "?").slice(0, MAX_MESSAGE);
      result = { failure: { kind: m[3]!, message } };
    }
  }
  return result;
}

const HOST_KEY_RE = /(?:^|\s)COMPUTE-BRIDGE-HOSTKEY (\S+) (\S+)$/;

/**
 * The guest's own report of its SSH host key in a console capture: its fingerprint, or null when
 * it has no ed25519 host key (or printed something that is not a fingerprint); null as the whole
 * result while the console has no report for `requestId` yet. The FIRST report counts: the script
 * writes it before anything from the image runs, so a later line (a workload's) cannot replace it.
 */
export function parseHostKey(consoleText: string, requestId: string): { fingerprint: string | null } | null {
  for (const raw of consoleText.split("\n")) {
    const m = HOST_KEY_RE.exec(raw.replace(/\s+$/, ""));
    if (!m || m[1] !== requestId) continue;
    return { fingerprint: HOST_KEY_FINGERPRINT.test(m[2]!) ? m[2]! : null };
  }
  return null;
}
