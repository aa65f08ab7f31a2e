/**
 * virsh mode: the workload is a libvirt domain `cb-<request_id>` booted from a verified qcow2
 * (through a per-grant overlay), optionally as an Intel TDX trust domain. Building the domain XML
 * and reading virsh / qemu-img output are pure functions here.
 *
 * Guest contract (documented for image builders):
 * - The grant's SSH public key arrives as the systemd credential `ssh.authorized_keys.root`
 *   (SMBIOS OEM string, type 11), which systemd >= 252 installs for root at boot.
 * - Every guest gets `compute-bridge.request_id`; TDX guests also `compute-bridge.attestation_nonce`
 *   (hex) and `compute-bridge.attest`, a POSIX sh script (src/attestation/guest.ts
 *   renderGuestAttestScript). A unit in the image runs it once at boot: it writes the binding of
 *   (request_id, nonce, the guest's SSH host key) to configfs-tsm as REPORTDATA and prints the TD
 *   quote between COMPUTE-BRIDGE-EVIDENCE markers on its first serial port. The bridge reads them
 *   from the console log on the host; it never executes anything inside a trust domain.
 */
import { renderGuestAttestScript } from "../../attestation/guest.js";
import type { ComputeGrant } from "../../domain/index.js";

export function domainName(requestId: string): string {
  return `cb-${requestId}`;
}

export function requestIdOfDomain(name: string, isRequestId: (s: string) => boolean): string | null {
  const m = /^cb-(.+)$/.exec(name);
  return m && isRequestId(m[1]!) ? m[1]! : null;
}

export function xmlEscape(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;" })[c]!);
}

/** The `network` value that gives a guest no NIC at all (it then gets no address). */
export const NO_NETWORK = "none";

export interface DomainXmlInput {
  name: string;
  grant: ComputeGrant;
  providerId: string;
  runDir: string;
  /** A libvirt network name, or NO_NETWORK. */
  network: string;
  tdx: boolean;
  /**
   * libvirt domain type: "kvm" (hardware virtualization, host-passthrough CPU; the only choice for
   * TDX) or "qemu" (TCG software emulation with QEMU's default CPU model: hosts without KVM, tests).
   */
  virtType?: "kvm" | "qemu";
  /** OVMF build with TDX support (required for TDX guests). */
  ovmfPath?: string;
  sshPublicKey?: string;
  /** TDX guests: the nonce their evidence binds (lowercase hex). */
  attestationNonce?: string;
}

/**
 * The domain definition. Every interpolated value is XML-escaped (they are also validated:
 * names and paths are plain characters, the key matches the OpenSSH public key pattern).
 */
export function domainXml(d: DomainXmlInput): string {
  const e = xmlEscape;
  const vcpus = Math.max(1, Math.ceil(d.grant.cpu_millicores / 1000));
  const creds: string[] = [];
  if (d.sshPublicKey) creds.push(`io.systemd.credential.binary:ssh.authorized_keys.root=${Buffer.from(`${d.sshPublicKey}\n`).toString("base64")}`);
  creds.push(`io.systemd.credential:compute-bridge.request_id=${d.grant.request_id}`);
  if (d.tdx && d.attestationNonce) {
    if (!/^(?:[0-9a-f]{2}){16,64}$/.test(d.attestationNonce)) throw new Error("attestation nonce must be lowercase hex, 16 to 64 bytes");
    creds.push(`io.systemd.credential:compute-bridge.attestation_nonce=${d.attestationNonce}`);
    creds.push(`io.systemd.credential.binary:compute-bridge.attest=${Buffer.from(renderGuestAttestScript()).toString("base64")}`);
  }
  const virtType = d.virtType ?? "kvm";
  if (d.tdx && virtType !== "kvm") throw new Error("a TDX guest needs virt type kvm");
  const lines = [
    `<domain type='${virtType}'>`,
    `  <name>${e(d.name)}</name>`,
    `  <title>compute-bridge grant ${e(d.grant.request_id)}</title>`,
    `  <metadata>`,
    `    <cb:grant xmlns:cb='https://compute-bridge.dev/xmlns/libvirt/1' provider='${e(d.providerId)}' request_id='${e(d.grant.request_id)}' tdx='${d.tdx ? "yes" : "no"}'/>`,
    `  </metadata>`,
    `  <memory unit='MiB'>${d.grant.ram_mib}</memory>`,
    `  <vcpu placement='static'>${vcpus}</vcpu>`,
  ];
  if (d.grant.cpu_millicores % 1000 !== 0) {
    // Fractional CPUs: cap the whole guest at the granted millicores.
    lines.push(`  <cputune><global_period>100000</global_period><global_quota>${d.grant.cpu_millicores * 100}</global_quota></cputune>`);
  }
  lines.push(`  <sysinfo type='smbios'>`, `    <oemStrings>`, ...creds.map((c) => `      <entry>${e(c)}</entry>`), `    </oemStrings>`, `  </sysinfo>`);
  lines.push(`  <os>`, `    <type arch='x86_64' machine='q35'>hvm</type>`);
  if (d.tdx) lines.push(`    <loader type='rom'>${e(d.ovmfPath ?? "")}</loader>`);
  lines.push(`    <smbios mode='sysinfo'/>`, `    <boot dev='hd'/>`, `  </os>`);
  lines.push(`  <features><acpi/><apic/>${d.tdx ? "<ioapic driver='qemu'/>" : ""}</features>`);
  // TCG cannot pass the host CPU through; QEMU's default model is used there.
  if (virtType === "kvm") lines.push(`  <cpu mode='host-passthrough'/>`);
  lines.push(`  <clock offset='utc'/>`);
  // A trust domain cannot reboot; any power event ends the grant's guest.
  lines.push(`  <on_poweroff>destroy</on_poweroff>`, `  <on_reboot>destroy</on_reboot>`, `  <on_crash>destroy</on_crash>`);
  if (d.tdx) lines.push(`  <memoryBacking><source type='anonymous'/><access mode='private'/></memoryBacking>`);
  lines.push(
    `  <devices>`,
    `    <disk type='file' device='disk'>`,
    `      <driver name='qemu' type='qcow2'/>`,
    `      <source file='${e(d.runDir)}/disk.qcow2'/>`,
    `      <target dev='vda' bus='virtio'/>`,
    `    </disk>`,
    ...(d.network === NO_NETWORK ? [] : [`    <interface type='network'>`, `      <source network='${e(d.network)}'/>`, `      <model type='virtio'/>`, `    </interface>`]),
    `    <serial type='file'>`,
    `      <source path='${e(d.runDir)}/console.log'/>`,
    `      <target port='0'/>`,
    `    </serial>`,
    `    <channel type='unix'>`,
    `      <target type='virtio' name='org.qemu.guest_agent.0'/>`,
    `    </channel>`,
    `    <memballoon model='none'/>`,
    `  </devices>`,
  );
  if (d.tdx) lines.push(`  <launchSecurity type='tdx'>`, `    <policy>0x10000000</policy>`, `    <quoteGenerationService/>`, `  </launchSecurity>`);
  lines.push(`</domain>`, ``);
  return lines.join("\n");
}

/**
 * Reject what qemu-img reports for an image we are about to boot: anything but a plain qcow2, a
 * backing file (a qcow2 can point at /etc/shadow or another tenant's disk) or an external data file.
 * Returns a reason, or null when the image is acceptable.
 */
export function qcow2Problem(infoJson: string): string | null {
  let info: Record<string, unknown>;
  try {
    const v: unknown = JSON.parse(infoJson);
    if (typeof v !== "object" || v === null || Array.isArray(v)) return "qemu-img info did not return a JSON object";
    info = v as Record<string, unknown>;
  } catch {
    return "qemu-img info did not return JSON";
  }
  if (info.format !== "qcow2") return `the image is ${JSON.stringify(info.format)}, not qcow2`;
  for (const k of ["backing-filename", "full-backing-filename", "backing-filename-format", "backing-image"])
    if (info[k] !== undefined) return "the qcow2 image has a backing file; only self-contained images are accepted";
  const fs = info["format-specific"] as { data?: Record<string, unknown> } | undefined;
  if (fs?.data && (fs.data["data-file"] !== undefined || fs.data["data-file-raw"] === true)) return "the qcow2 image uses an external data file; only self-contained images are accepted";
  const size = info["virtual-size"];
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size <= 0) return "the qcow2 image has no valid virtual size";
  return null;
}

/** First address from `virsh domifaddr` (IPv4 preferred), without its prefix length. */
export function parseDomifaddr(text: string): string | null {
  let v6: string | null = null;
  for (const line of text.split("\n")) {
    const m = /\s(ipv4|ipv6)\s+([0-9a-fA-F.:]+)\/\d+\s*$/.exec(line);
    if (!m) continue;
    if (m[1] === "ipv4") return m[2]!;
    if (v6 === null && !m[2]!.toLowerCase().startsWith("fe80")) v6 = m[2]!;
  }
  return v6;
}

/** `virsh domstats` output, by domain name: the indented key=value lines of each block. */
export function parseDomstats(text: string): Map<string, Record<string, string>> {
  const out = new Map<string, Record<string, string>>();
  let cur: Record<string, string> | null = null;
  for (const line of text.split("\n")) {
    const d = /^Domain: '(.*)'\s*$/.exec(line);
    if (d) {
      cur = {};
      out.set(d[1]!, cur);
      continue;
    }
    const kv = /^\s+([A-Za-z0-9._-]+)=(.*)$/.exec(line);
    if (kv && cur) cur[kv[1]!] = kv[2]!;
  }
  return out;
}

/** libvirt's virDomainState and shut-off reasons (virsh domstats state.state / state.reason). */
export const DOMAIN_STATE = { running: 1, blocked: 2, paused: 3, shutdown: 4, shutoff: 5, crashed: 6, pmsuspended: 7 } as const;
export const SHUTOFF_REASON = ["unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot", "daemon"] as const;
