/**
 * Evidence from inside the guest: the shell the guest runs (embedded in the cloud boot script,
 * cloud-init.ts, and handed to bare-metal TDs as a systemd credential) and the parser the backends
 * use on the serial console capture. Written once, here, for every backend.
 *
 * Console protocol (request ids are A-Z a-z 0-9 . _ -, so every field is one word):
 *
 *   COMPUTE-BRIDGE-EVIDENCE-BEGIN <request_id> <blob>
 *   <the blob, base64, 76 characters a line>
 *   COMPUTE-BRIDGE-EVIDENCE-END <request_id> <blob> <sha256 of the blob, hex>
 *   ... one block per blob ...
 *   COMPUTE-BRIDGE-EVIDENCE-DONE <request_id> <format> <host key fingerprint | none>
 * or
 *   COMPUTE-BRIDGE-EVIDENCE-NONE <request_id> <reason>
 *
 * The guest binds (request_id, nonce, its SSH host key) with binding.ts's encoding:
 * - tdx (GCP C3, bare-metal TDs): the 64-byte binding is written to configfs-tsm
 *   (`<tsm>/report/<entry>/inblob`); `outblob` is the TD quote (blob td_quote, format tdx-quote-v4).
 * - azure (DCesv5/ECesv5): the paravisor owns REPORTDATA. The binding goes into the HCL report's
 *   user data (vTPM NV index 0x01400002, 64 bytes), the HCL report is read from NV index
 *   0x01400001 (blob hcl_report), the TD quote for its TD report comes from the host's quoting
 *   service through IMDS (`POST /acc/tdquote`, blob td_quote), and a TPM2 quote over PCRs 0-23
 *   (sha256) by the vTPM attestation key (persistent handle 0x81000003) carries the binding's first
 *   32 bytes as qualifying data (blobs tpm_quote = TPMS_ATTEST, tpm_signature = the raw RSA signature, tpm2_quote -f plain).
 *   Format azure-tdx-vtpm.
 *
 * A blob whose END line is missing or whose sha256 does not match is not evidence; the bridge
 * stores what the guest printed and never judges it (a requester verifies it, cli.ts).
 */
import { createHash } from "node:crypto";
import type { CollectedEvidence, EvidenceFormat, EvidencePlatform } from "../domain/attestation.js";
import { HOST_KEY_FINGERPRINT } from "../domain/instance.js";
import { BINDING_SCHEME, bindingDigest } from "./binding.js";

export const EVIDENCE_BEGIN = "COMPUTE-BRIDGE-EVIDENCE-BEGIN";
export const EVIDENCE_END = "COMPUTE-BRIDGE-EVIDENCE-END";
export const EVIDENCE_DONE = "COMPUTE-BRIDGE-EVIDENCE-DONE";
export const EVIDENCE_NONE = "COMPUTE-BRIDGE-EVIDENCE-NONE";

/** How a guest produces evidence: configfs-tsm TD quote, or Azure's vTPM chain. */
export type GuestAttestation = "tdx" | "azure";

const BLOB_NAMES = ["td_quote", "hcl_report", "tpm_quote", "tpm_signature"] as const;
type BlobName = (typeof BLOB_NAMES)[number];
const MAX_BLOB_BASE64 = 256 * 1024;

/**
 * Shell functions (POSIX sh) that write the evidence to the console. Expects CB_REQUEST_ID,
 * CB_ATTEST_NONCE (hex), cb_host_key (fingerprint or "none"), CB_STATE (a root-only directory)
 * and CB_CONSOLE to be set, and cb_console defined. VM-only paths are variables tests override:
 * CB_TSM (configfs-tsm reports), CB_AZURE_IMDS (the IMDS base URL), CB_TPM2_TOOLS (directory of
 * the tpm2-tools binaries; empty = PATH).
 */
export function attestShellFunctions(): string {
  return String.raw`CB_TSM=${"$"}{CB_TSM:-/sys/kernel/config/tsm/report}
CB_AZURE_IMDS=${"$"}{CB_AZURE_IMDS:-http://169.254.169.254}
CB_TPM2_TOOLS=${"$"}{CB_TPM2_TOOLS:-}
cb_ev_none() {
  cb_console "${EVIDENCE_NONE} $CB_REQUEST_ID $1"
}
# The binding (src/attestation/binding.ts), 128 hex digits.
cb_ev_binding() {
  printf '${BINDING_SCHEME}\nrequest_id=%s\nnonce=%s\nhost_key=%s\n' "$CB_REQUEST_ID" "$CB_ATTEST_NONCE" "$cb_host_key" | sha512sum | cut -c1-128
}
# Hex digits -> bytes on stdout (printf octal escapes; no xxd on minimal images).
cb_ev_unhex() {
  printf "$(printf '%s' "$1" | awk '{ h = "0123456789abcdef"; for (i = 1; i < length($0); i += 2) printf "\\%03o", (index(h, substr($0, i, 1)) - 1) * 16 + index(h, substr($0, i + 1, 1)) - 1 }')"
}
cb_ev_blob() {
  [ -s "$2" ] || return 1
  { printf '%s %s %s\n' ${EVIDENCE_BEGIN} "$CB_REQUEST_ID" "$1"; base64 -w 76 "$2"; printf '%s %s %s %s\n' ${EVIDENCE_END} "$CB_REQUEST_ID" "$1" "$(sha256sum <"$2" | cut -c1-64)"; } >>"$CB_CONSOLE" 2>/dev/null
}
cb_ev_done() {
  cb_console "${EVIDENCE_DONE} $CB_REQUEST_ID $1 $cb_host_key"
}
# TD quote from configfs-tsm, REPORTDATA = the binding.
cb_attest_tdx() {
  cb_ev=$CB_STATE/evidence
  rm -rf "$cb_ev" && mkdir -p "$cb_ev" || { cb_ev_none "cannot create the evidence directory"; return 0; }
  if [ ! -d "$CB_TSM" ]; then cb_ev_none "this guest kernel has no configfs-tsm ($CB_TSM is missing; Linux 6.7+ with the TDX guest driver is needed)"; return 0; fi
  cb_r=$CB_TSM/cb-$CB_REQUEST_ID
  mkdir -p "$cb_r" 2>/dev/null || { cb_ev_none "cannot create a configfs-tsm report entry in $CB_TSM"; return 0; }
  cb_p=$(cat "$cb_r/provider" 2>/dev/null)
  if [ "$cb_p" != tdx_guest ]; then rmdir "$cb_r" 2>/dev/null; cb_ev_none "the configfs-tsm provider is '$cb_p', not tdx_guest: this guest is not a TD"; return 0; fi
  if ! cb_ev_unhex "$(cb_ev_binding)" >"$cb_r/inblob"; then rmdir "$cb_r" 2>/dev/null; cb_ev_none "writing REPORTDATA to configfs-tsm failed"; return 0; fi
  cb_g1=$(cat "$cb_r/generation" 2>/dev/null)
  cat "$cb_r/outblob" >"$cb_ev/td_quote" 2>/dev/null
  cb_q=$?
  cb_g2=$(cat "$cb_r/generation" 2>/dev/null)
  rmdir "$cb_r" 2>/dev/null
  if [ "$cb_q" -ne 0 ] || [ ! -s "$cb_ev/td_quote" ]; then cb_ev_none "reading the TD quote from configfs-tsm failed (is a quote generation service configured on the host?)"; return 0; fi
  if [ "$cb_g1" != "$cb_g2" ]; then cb_ev_none "the configfs-tsm report changed while it was read (generation $cb_g1 -> $cb_g2)"; return 0; fi
  cb_ev_blob td_quote "$cb_ev/td_quote"
  cb_ev_done tdx-quote-v4
}
# Azure TDX CVM: HCL report with the binding as user data, its TD quote, a TPM2 quote over the binding.
cb_attest_azure() {
  cb_ev=$CB_STATE/evidence
  cb_t=${"$"}{CB_TPM2_TOOLS:+$CB_TPM2_TOOLS/}
  rm -rf "$cb_ev" && mkdir -p "$cb_ev" || { cb_ev_none "cannot create the evidence directory"; return 0; }
  for cb_x in tpm2_nvdefine tpm2_nvundefine tpm2_nvwrite tpm2_nvread tpm2_quote; do
    command -v "$cb_t$cb_x" >/dev/null 2>&1 || { cb_ev_none "tpm2-tools is not installed ($cb_x missing)"; return 0; }
  done
  cb_b=$(cb_ev_binding)
  cb_ev_unhex "$cb_b" >"$cb_ev/user_data"
  "$cb_t"tpm2_nvundefine -C o 0x01400002 >/dev/null 2>&1
  if ! "$cb_t"tpm2_nvdefine -C o -s 64 -a "ownerread|ownerwrite|authread|authwrite" 0x01400002 >/dev/null 2>&1 ||
    ! "$cb_t"tpm2_nvwrite -C o -i "$cb_ev/user_data" 0x01400002 >/dev/null 2>&1; then
    cb_ev_none "writing the binding to the vTPM (NV index 0x01400002) failed"; return 0
  fi
  if ! "$cb_t"tpm2_nvread -C o -o "$cb_ev/hcl_report" 0x01400001 >/dev/null 2>&1 || [ ! -s "$cb_ev/hcl_report" ]; then
    cb_ev_none "reading the HCL report (vTPM NV index 0x01400001) failed: not an Azure confidential VM?"; return 0
  fi
  if ! "$cb_t"tpm2_quote -c 0x81000003 -l sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23 -q "$(printf '%s' "$cb_b" | cut -c1-64)" \
      -m "$cb_ev/tpm_quote" -s "$cb_ev/tpm_signature" -f plain -g sha256 >/dev/null 2>&1; then
    cb_ev_none "the TPM2 quote by the vTPM attestation key (0x81000003) failed"; return 0
  fi
  cb_tdr=$(dd if="$cb_ev/hcl_report" bs=1 skip=32 count=1024 2>/dev/null | base64 -w 0 | tr -- '+/' '-_' | tr -d '=')
  if ! curl -fsS --max-time 30 --retry 3 -H 'Content-Type: application/json' -d "{\"report\":\"$cb_tdr\"}" -o "$cb_ev/tdquote.json" "$CB_AZURE_IMDS/acc/tdquote"; then
    cb_ev_none "the host's quoting service (IMDS /acc/tdquote) gave no TD quote for the HCL report"; return 0
  fi
  cb_q=$(tr -d ' \n\r' <"$cb_ev/tdquote.json" | sed -n 's/.*"quote":"\([A-Za-z0-9_=-]*\)".*/\1/p' | tr -- '-_' '+/')
  while [ $(( ${"$"}{#cb_q} % 4 )) -ne 0 ]; do cb_q="$cb_q="; done
  if [ -z "$cb_q" ] || ! printf '%s' "$cb_q" | base64 -d >"$cb_ev/td_quote" 2>/dev/null; then
    cb_ev_none "IMDS /acc/tdquote answered without a quote"; return 0
  fi
  cb_ev_blob hcl_report "$cb_ev/hcl_report"
  cb_ev_blob td_quote "$cb_ev/td_quote"
  cb_ev_blob tpm_quote "$cb_ev/tpm_quote"
  cb_ev_blob tpm_signature "$cb_ev/tpm_signature"
  cb_ev_done azure-tdx-vtpm
}
`;
}

const SHELL_NONCE = /^(?:[0-9a-f]{2}){16,64}$/;

/**
 * The boot script's evidence step (cloud-init.ts embeds it right after the host key report, before
 * the image is fetched): the functions above, the nonce as a literal, and the call.
 */
export function renderAttestStep(mode: GuestAttestation, nonceHex: string): string {
  const nonce = nonceHex.toLowerCase();
  if (!SHELL_NONCE.test(nonce)) throw new Error("attestation nonce must be 16 to 64 bytes as hex");
  return `# Attestation evidence bound to (request_id, nonce, host key): src/attestation/guest.ts.
CB_ATTEST_NONCE=${nonce}
${attestShellFunctions()}cb_attest_${mode}
`;
}

/** The boot script's attestation option for a grant: TDX grants with a nonce only. */
export function bootAttestation(tdxRequired: boolean, nonce: string | undefined, mode: GuestAttestation): { mode: GuestAttestation; nonce: string } | undefined {
  return tdxRequired && nonce ? { mode, nonce } : undefined;
}

/**
 * The bare-metal TD's "guest agent": a standalone script the bridge hands the guest as the systemd
 * credential compute-bridge.attest (with compute-bridge.request_id and
 * compute-bridge.attestation_nonce). A unit in the image runs it once at boot, after sshd's host
 * keys exist: ExecStart=/bin/sh %d/compute-bridge.attest with ImportCredential=compute-bridge.*
 * (docs/operations.md). It prints the same console protocol as the cloud boot script.
 */
export function renderGuestAttestScript(): string {
  return `#!/bin/sh
# compute-bridge attestation for a bare-metal TD (generated): prints the TD quote bound to
# (request_id, nonce, SSH host key) on the serial console. Reads its inputs from credentials.
CB_CREDS=\${CREDENTIALS_DIRECTORY:-/run/credentials/@system}
CB_CONSOLE=\${CB_CONSOLE:-/dev/ttyS0}
CB_STATE=\${CB_STATE:-/run/compute-bridge}
CB_SSH_HOST_KEY=\${CB_SSH_HOST_KEY:-/etc/ssh/ssh_host_ed25519_key.pub}
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 077
cb_console() {
  printf '%s\n' "$1" >>"$CB_CONSOLE" 2>/dev/null || printf '%s\n' "$1" >&2
}
CB_REQUEST_ID=$(cat "$CB_CREDS/compute-bridge.request_id" 2>/dev/null)
CB_ATTEST_NONCE=$(cat "$CB_CREDS/compute-bridge.attestation_nonce" 2>/dev/null)
case $CB_REQUEST_ID in ''|*[!A-Za-z0-9._-]*) echo "compute-bridge.request_id credential missing or invalid" >&2; exit 1 ;; esac
case $CB_ATTEST_NONCE in ''|*[!0-9a-f]*) cb_console "${EVIDENCE_NONE} $CB_REQUEST_ID the compute-bridge.attestation_nonce credential is missing or not lowercase hex"; exit 0 ;; esac
mkdir -p "$CB_STATE" || exit 1
cb_host_key=none
if [ -r "$CB_SSH_HOST_KEY" ] && command -v ssh-keygen >/dev/null 2>&1; then
  cb_fp=$(ssh-keygen -E sha256 -lf "$CB_SSH_HOST_KEY" 2>/dev/null | awk '{ print $2 }')
  case "$cb_fp" in SHA256:*) cb_host_key=$cb_fp ;; esac
fi
${attestShellFunctions()}cb_attest_tdx
`;
}

/** The guest's evidence report on a console, or null while there is none for `requestId`. */
export type ConsoleEvidence = { format: EvidenceFormat; hostKey: string | null; blobs: Partial<Record<BlobName, string>> } | { none: string } | null;

/**
 * Read the evidence blocks for `requestId` from a console capture. The first DONE or NONE line
 * counts (the guest writes them before anything from the image runs, so a workload cannot replace
 * them); a blob counts only with its END line and a matching sha256. Lines may end in CR and
 * carry a prefix before a marker; kernel messages between base64 lines are skipped.
 */
export function parseConsoleEvidence(consoleText: string, requestId: string): ConsoleEvidence {
  const blobs: Partial<Record<BlobName, string>> = {};
  let open: { name: BlobName; lines: string[] } | null = null;
  for (const raw of consoleText.split("\n")) {
    const line = raw.replace(/\r$/, "").trimEnd();
    const m = /(?:^|\s)(COMPUTE-BRIDGE-EVIDENCE-(?:BEGIN|END|DONE|NONE)) (\S+) (\S+)(?: (.*))?$/.exec(line);
    if (m && m[2] === requestId) {
      const [, kind, , a, rest] = m;
      if (kind === EVIDENCE_BEGIN) {
        open = (BLOB_NAMES as readonly string[]).includes(a!) ? { name: a as BlobName, lines: [] } : null;
      } else if (kind === EVIDENCE_END) {
        if (open && open.name === a) {
          const b64 = open.lines.join("");
          const sha = rest?.trim() ?? "";
          if (b64.length <= MAX_BLOB_BASE64 && /^[0-9a-f]{64}$/.test(sha) && createHash("sha256").update(Buffer.from(b64, "base64")).digest("hex") === sha && blobs[open.name] === undefined) blobs[open.name] = b64;
        }
        open = null;
      } else if (kind === EVIDENCE_DONE) {
        if (a !== "tdx-quote-v4" && a !== "azure-tdx-vtpm") return { none: `the guest reported an unknown evidence format "${a!.slice(0, 40)}"` };
        const hk = rest?.trim() ?? "none";
        const need: BlobName[] = a === "tdx-quote-v4" ? ["td_quote"] : ["hcl_report", "td_quote", "tpm_quote", "tpm_signature"];
        const missing = need.filter((n) => blobs[n] === undefined);
        if (missing.length > 0) return { none: `the guest's evidence report is incomplete on the console (missing or corrupted: ${missing.join(", ")})` };
        const keep: Partial<Record<BlobName, string>> = {};
        for (const n of need) keep[n] = blobs[n];
        return { format: a, hostKey: HOST_KEY_FINGERPRINT.test(hk) ? hk : null, blobs: keep };
      } else {
        const reason = `${a} ${rest ?? ""}`.trim().replace(/[^\x20-\x7e]/g, "?").slice(0, 400);
        return { none: `the guest produced no evidence: ${reason}` };
      }
      continue;
    }
    if (open) {
      const t = line.trim();
      if (/^[A-Za-z0-9+/]+={0,2}$/.test(t)) open.lines.push(t);
    }
  }
  return null;
}

/**
 * The evidence to store on the instance from a console capture: present with its binding, absent
 * with the guest's reason, or null while the guest has reported nothing (the caller decides when
 * to stop waiting and records `absentEvidence` with its own reason).
 */
export function evidenceFromConsole(platform: EvidencePlatform, requestId: string, nonceHex: string, consoleText: string): CollectedEvidence | null {
  const r = parseConsoleEvidence(consoleText, requestId);
  if (r === null) return null;
  if ("none" in r) return absentEvidence(platform, nonceHex, r.none);
  return {
    status: "present",
    platform,
    format: r.format,
    nonce: nonceHex.toLowerCase(),
    binding: { scheme: BINDING_SCHEME, request_id: requestId, host_key_sha256: r.hostKey, digest: bindingDigest(requestId, nonceHex, r.hostKey).toString("hex") },
    blobs: r.blobs,
  };
}

export function absentEvidence(platform: EvidencePlatform | null, nonceHex: string | null, reason: string): CollectedEvidence {
  return { status: "absent", platform, nonce: nonceHex === null ? null : nonceHex.toLowerCase(), reason: reason.slice(0, 500) };
}
