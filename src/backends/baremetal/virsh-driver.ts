/**
 * virsh mode (virsh.ts describes the domain): provision an image seen for the first time in two
 * steps, VIRSH_PREPARE (adopt, or fetch + verify + qemu-img info, judged by the bridge) and
 * VIRSH_START (overlay, define, start, host-side deadline, the domain XML on stdin); an image
 * already inspected on the machine in one, VIRSH_PROVISION_WARM. Then wait for the guest's address
 * and a TD's evidence; watch with one `virsh domstats` per machine per interval; terminate with
 * VIRSH_TERMINATE.
 */
import { absentEvidence, evidenceFromConsole } from "../../attestation/guest.js";
import type { CollectedEvidence } from "../../domain/attestation.js";
import type { ExitObservation, ProvisionedInstance } from "../../domain/index.js";
import { abortError } from "../../util/clock.js";
import { shJoin } from "../../util/shell.js";
import { BackendError, InvalidRequestError, TransientError } from "../backend.js";
import { BatchWatcher } from "../common/batch-watcher.js";
import {
  BACKEND,
  COMMAND_TIMEOUT_MS,
  definitive,
  execError,
  FETCH_TIMEOUT_MS,
  instanceOf,
  isRequestId,
  marker,
  provisionError,
  secondsLeft,
  usageFigures,
  usageKey,
  type BaremetalDriver,
  type DriverContext,
  type Machine,
  type ProvisionRequest,
} from "./driver.js";
import { remote, VIRSH_ADDRESS, VIRSH_LIST, VIRSH_PREPARE, VIRSH_PROVISION_WARM, VIRSH_START, VIRSH_TERMINATE } from "./scripts.js";
import { clip, type ExecResult } from "./ssh-pool.js";
import { num, type Usage } from "./systemd.js";
import { domainName, domainXml, NO_NETWORK, parseDomifaddr, parseDomstats, qcow2Problem, requestIdOfDomain, SHUTOFF_REASON } from "./virsh.js";

/** Largest disk image fetched onto a machine. */
const MAX_DISK_BYTES = 256 * 1024 ** 3;

type DomStatus = Record<string, string>;

const inspectedKey = (m: Machine, sha: string) => `${m.cfg.name}\0${sha}`;

function domainEnded(s: DomStatus): boolean {
  if (s.absent) return true;
  const st = num(s["state.state"]);
  return st === 5 || st === 6;
}

export class VirshDriver implements BaremetalDriver {
  readonly mode = "virsh";
  readonly imageFormat = "disk";
  readonly runsTdx = true;
  readonly workloadKind = "domain";
  private readonly domains: BatchWatcher<DomStatus>;
  private readonly samples = new Map<string, Usage>();
  /** Images (machine, sha256) whose qemu-img report this process accepted: provisioned warm. */
  private readonly inspected = new Set<string>();

  constructor(private readonly ctx: DriverContext) {
    this.domains = new BatchWatcher({
      intervalMs: ctx.cfg.poll_interval_ms,
      clock: ctx.clock,
      missingAfter: 3,
      describe: (machine, ids, signal) => this.describe(machine, ids, signal),
    });
  }

  workloadName(requestId: string): string {
    return domainName(requestId);
  }

  async provision(m: Machine, { grant, envelope, sha, url, alloc, signal }: ProvisionRequest): Promise<ProvisionedInstance> {
    if (envelope.image.format !== "disk") throw new InvalidRequestError(`virsh-mode machines boot "disk" images (qcow2); got "${envelope.image.format}"`, BACKEND);
    const id = grant.request_id;
    const dom = domainName(id);
    const runDir = `${m.runs}/${id}`;
    const tdx = grant.tdx_required;
    if (tdx && !m.cfg.ovmf_path) throw new InvalidRequestError(`machine ${m.cfg.name} has no ovmf_path for TDX guests`, BACKEND);
    const uri = m.cfg.libvirt_uri;
    // The host's own deadline for the guest, counted when each command is sent (the download in
    // between may take minutes).
    const left = () => String(secondsLeft(this.ctx, grant));
    const nonce = tdx ? (envelope.attestation_nonce ?? null) : null;
    const xml = () =>
      domainXml({
        name: dom,
        grant,
        providerId: this.ctx.providerId,
        runDir,
        network: m.cfg.network,
        virtType: m.cfg.virt_type,
        tdx,
        ...(m.cfg.ovmf_path ? { ovmfPath: m.cfg.ovmf_path } : {}),
        ...(envelope.ssh_public_key ? { sshPublicKey: envelope.ssh_public_key } : {}),
        ...(envelope.attestation_nonce ? { attestationNonce: envelope.attestation_nonce } : {}),
      });
    const alloced = `${grant.cpu_millicores} ${grant.ram_mib}`;
    const seen = inspectedKey(m, sha);
    let r: ExecResult;
    let startedAt: string | undefined;
    // The first readiness poll, when the provision script already answered it.
    let firstPoll: ExecResult | undefined;
    if (this.inspected.has(seen)) {
      // Warm: qemu-img accepted this image here already; one round trip adopts or starts the
      // guest and reads its first address (a cache miss changes nothing on the machine).
      alloc.started = true;
      try {
        r = await m.conn.exec(remote(VIRSH_PROVISION_WARM, "cb-provision", [uri, dom, m.runs, id, m.images, sha, alloced, left(), tdx && nonce !== null ? "1" : "0"]), { op: "provision", timeoutMs: 5 * 60_000, stdin: xml(), signal, idempotent: true });
      } catch (e) {
        throw execError(e, m, "provision");
      }
      const head = r.stdout.split(/^@@STATE /m)[0] ?? "";
      if (r.code === 0 && /^CB-COLD$/m.test(head)) {
        alloc.started = false;
        this.inspected.delete(seen);
      } else {
        const started = marker(head, /^CB-(STARTED|ADOPT) ?(\d*)$/);
        if (r.code !== 0 || !started) {
          if (definitive(r)) alloc.started = false;
          throw provisionError(m, r, envelope);
        }
        startedAt = started[2];
        if (started[1] === "ADOPT") {
          this.noDeadline(m, id, head);
          this.ctx.log.info({ request_id: id, machine: m.cfg.name, domain: dom }, "adopted the grant's existing domain (idempotent provision)");
        } else {
          this.ctx.log.info({ request_id: id, machine: m.cfg.name, domain: dom, tdx }, "domain defined and started");
          this.noDeadline(m, id, head);
        }
        firstPoll = r;
      }
    }
    if (!firstPoll) startedAt = await this.prepareAndStart(m, { grant, envelope, sha, url, alloc, signal }, { dom, uri, tdx, xml, alloced, left });
    const guest = await this.waitGuest(m, id, dom, runDir, nonce, tdx, signal, firstPoll);
    const inst = instanceOf(this.ctx, m, grant, startedAt, { mode: "virsh", domain: dom, run_dir: runDir, tdx: tdx ? "yes" : "no" });
    // The host key the TD bound into its quote is the one to pin.
    const hostKey = guest.evidence?.status === "present" ? guest.evidence.binding.host_key_sha256 : null;
    return { ...inst, host: guest.host, ssh_port: guest.host ? 22 : null, ssh_user: guest.host ? "root" : null, host_key_sha256: hostKey, attestation: guest.evidence };
  }

  /**
   * Cold: two round trips. VIRSH_PREPARE adopts, or fetches, verifies and inspects the image
   * (the bridge judges qemu-img's report); VIRSH_START then defines and starts the guest.
   * Returns the guest's start time (epoch seconds, as text) if the machine knows it.
   */
  private async prepareAndStart(
    m: Machine,
    { grant, envelope, sha, url, alloc, signal }: ProvisionRequest,
    o: { dom: string; uri: string; tdx: boolean; xml: () => string; alloced: string; left: () => string },
  ): Promise<string | undefined> {
    const id = grant.request_id;
    const { dom, uri, tdx } = o;
    let r: ExecResult;
    try {
      r = await m.conn.exec(remote(VIRSH_PREPARE, "cb-prepare", [uri, dom, m.runs, id, m.images, sha, url, String(MAX_DISK_BYTES), o.left()]), { op: "prepare", timeoutMs: FETCH_TIMEOUT_MS, signal, idempotent: true, long: true });
    } catch (e) {
      throw execError(e, m, "prepare");
    }
    if (r.code !== 0) throw provisionError(m, r, envelope);
    const adopt = /^CB-ADOPT ?(\d*)$/m.exec(r.stdout);
    if (adopt) {
      this.noDeadline(m, id, r.stdout);
      alloc.started = true;
      this.ctx.log.info({ request_id: id, machine: m.cfg.name, domain: dom }, "adopted the grant's existing domain (idempotent provision)");
      return adopt[1];
    }
    let image = `${m.images}/${sha}`;
    if (!/^CB-DEFINED$/m.test(r.stdout)) {
      const img = /^CB-IMAGE (\S+)$/m.exec(r.stdout);
      const info = r.stdout.split("\n@@INFO\n")[1];
      if (!img || info === undefined) throw new BackendError(`machine ${m.cfg.name}: unexpected output from the prepare step`, BACKEND);
      const problem = qcow2Problem(info);
      if (problem) throw new InvalidRequestError(`refusing the disk image: ${problem}`, BACKEND);
      image = img[1]!;
      this.inspected.add(inspectedKey(m, sha));
    }
    const xml = o.xml();
    alloc.started = true;
    try {
      r = await m.conn.exec(remote(VIRSH_START, "cb-start", [uri, dom, m.runs, id, image, o.alloced, sha, o.left()]), { op: "start", timeoutMs: 5 * 60_000, stdin: xml, signal, idempotent: true });
    } catch (e) {
      throw execError(e, m, "start");
    }
    const started = marker(r.stdout, /^CB-(STARTED|ADOPT) ?(\d*)$/);
    if (r.code !== 0 || !started) {
      if (definitive(r)) alloc.started = false;
      throw provisionError(m, r, envelope);
    }
    this.ctx.log.info({ request_id: id, machine: m.cfg.name, domain: dom, tdx }, started[1] === "ADOPT" ? "adopted the grant's existing domain" : "domain defined and started");
    this.noDeadline(m, id, r.stdout);
    return started[2];
  }

  /** The host could not set its own deadline for a guest: the bridge's watch alone enforces valid_to. */
  private noDeadline(m: Machine, id: string, stdout: string): void {
    const why = /^CB-NO-DEADLINE (.*)$/m.exec(stdout)?.[1];
    if (why !== undefined) this.ctx.log.warn({ request_id: id, machine: m.cfg.name, err: { message: why } }, "no host-side deadline for the guest (systemd-run failed); valid_to is enforced by the bridge alone");
  }

  /** Poll until the guest has an address (DHCP lease, else the guest agent), and a TD its evidence. */
  private async waitGuest(m: Machine, id: string, dom: string, runDir: string, nonce: string | null, isTd: boolean, signal: AbortSignal, firstPoll?: ExecResult): Promise<{ host: string | null; evidence: CollectedEvidence | null }> {
    // Without a nonce the TD was given no attest credential: nothing to wait for.
    const tdx = isTd && nonce !== null;
    const none = (why: string) => (isTd ? absentEvidence("baremetal", nonce, why) : null);
    const { clock, cfg, log } = this.ctx;
    const poll = cfg.poll_interval_ms;
    const deadline = clock.now() + cfg.ready_timeout_seconds * 1000;
    let host: string | null = null;
    let quoteDeadline = 0;
    let pending = firstPoll ?? null;
    for (;;) {
      let r: ExecResult | null = pending;
      pending = null;
      if (!r) {
        try {
          r = await m.conn.exec(remote(VIRSH_ADDRESS, "cb-address", [m.cfg.libvirt_uri, dom, runDir, id, tdx ? "1" : "0"]), { op: "domifaddr", timeoutMs: COMMAND_TIMEOUT_MS, signal, idempotent: true });
        } catch (e) {
          if (signal.aborted) throw abortError(signal);
          log.warn({ request_id: id, machine: m.cfg.name, err: { message: (e as Error).message } }, "waiting for the guest: query failed; retrying");
        }
      }
      if (r && r.code === 0) {
        const state = /^@@STATE (.*)$/m.exec(r.stdout)?.[1]?.trim() ?? "";
        const addr = r.stdout.split("\n@@ADDR\n")[1]?.split("\n@@QUOTE\n")[0] ?? "";
        const evidence = tdx ? evidenceFromConsole("baremetal", id, nonce!, r.stdout.split("\n@@QUOTE\n")[1] ?? "") : null;
        host = host ?? parseDomifaddr(addr);
        if (evidence) return { host, evidence };
        // Ended already (very short workload, or it failed to boot): the watch reports it.
        if (state === "gone" || /^shut off|^crashed/.test(state)) return { host, evidence: none("the TD stopped before it printed evidence on its serial console") };
        // A guest without a NIC never gets an address: running is as ready as it gets.
        if (host || (m.cfg.network === NO_NETWORK && state.startsWith("running"))) {
          if (!tdx) return { host, evidence: none("no attestation nonce reached the backend") };
          if (quoteDeadline === 0) quoteDeadline = clock.now() + Math.min(20_000, 40 * poll);
          if (clock.now() >= quoteDeadline) {
            log.info({ request_id: id, machine: m.cfg.name }, "the TD printed no evidence on its console; continuing without attestation evidence");
            return { host, evidence: none("the TD printed no evidence on its serial console (does its image run the compute-bridge.attest credential at boot?)") };
          }
        }
      }
      if (clock.now() >= deadline) throw new BackendError(`machine ${m.cfg.name}: guest ${dom} got no address within ${cfg.ready_timeout_seconds} s`, BACKEND);
      await clock.sleep(poll, signal);
    }
  }

  async watch(m: Machine, id: string, validToMs: number, signal: AbortSignal, callerSignal: AbortSignal): Promise<ExitObservation> {
    const dom = domainName(id);
    const key = usageKey(m, dom);
    if (!this.samples.has(key)) this.samples.set(key, { cpuNs: null, memBytes: null });
    const res = await this.domains.waitFor(m.cfg.name, dom, { until: domainEnded, signal });
    const s = res.kind === "match" ? res.status : { absent: "1" };
    const u = this.samples.get(key)!;
    let text = "";
    if (!s.absent) {
      try {
        const r = await m.conn.exec(shJoin(["virsh", "-c", m.cfg.libvirt_uri, "domstate", "--reason", dom]), { op: "domstate", timeoutMs: COMMAND_TIMEOUT_MS, signal: callerSignal, idempotent: true });
        text = r.code === 0 ? clip(r.stdout, 80) : "";
      } catch (e) {
        if (callerSignal.aborted) throw abortError(callerSignal);
      }
    }
    this.samples.delete(key);
    const base = { ...usageFigures(u), ended_at: new Date(this.ctx.clock.now()).toISOString() };
    if (s.absent) return { kind: "lost", exit_code: null, ...base, ended_at: null, failure: { kind: "lost", message: `domain ${dom} on machine ${m.cfg.name} disappeared (undefined outside compute-bridge)` } };
    const state = num(s["state.state"]);
    const reason = num(s["state.reason"]) ?? 0;
    const shown = text || (state === 5 ? `shut off (${SHUTOFF_REASON[reason] ?? reason})` : `state ${state}`);
    if (state === 5 && reason === 1) return { kind: "exited", exit_code: 0, ...base, failure: null };
    // Destroyed at valid_to: the host's deadline unit (VIRSH_START), while the bridge was away or
    // just before its own watch noticed the time.
    if (state === 5 && reason === 2 && this.ctx.clock.now() >= validToMs - 2000) return { kind: "expired", exit_code: null, ...base, failure: null };
    if (state === 5 && reason === 2) return { kind: "lost", exit_code: null, ...base, failure: { kind: "lost", message: `domain ${dom} was destroyed outside compute-bridge (${shown})` } };
    if (state === 6 || (state === 5 && reason === 3)) return { kind: "exited", exit_code: null, ...base, failure: { kind: "guest_crashed", message: `domain ${dom} crashed (${shown})` } };
    return { kind: "exited", exit_code: null, ...base, failure: { kind: "lost", message: `domain ${dom} stopped unexpectedly (${shown})` } };
  }

  async endedNow(m: Machine, id: string, signal: AbortSignal): Promise<boolean> {
    const dom = domainName(id);
    const s = (await this.describe(m.cfg.name, [dom], signal)).get(dom);
    return s !== undefined && domainEnded(s) && !s.absent;
  }

  usage(m: Machine, id: string): Usage | undefined {
    return this.samples.get(usageKey(m, domainName(id)));
  }

  forget(m: Machine, id: string): void {
    this.samples.delete(usageKey(m, domainName(id)));
  }

  terminateCommand(m: Machine, id: string): string {
    return remote(VIRSH_TERMINATE, "cb-terminate", [m.cfg.libvirt_uri, domainName(id), m.runs, id]);
  }

  listCommand(m: Machine, workDir: string): string {
    return remote(VIRSH_LIST, "cb-list", [m.cfg.libvirt_uri, workDir]);
  }

  listedWorkload([kind, name]: readonly string[]): string | null {
    if (kind !== "dom" || !name) return null;
    return requestIdOfDomain(name, isRequestId);
  }

  close(): void {
    this.domains.close();
  }

  /** One `virsh domstats` per machine per interval; a watched domain missing from it is gone. */
  private async describe(machine: string, names: readonly string[], signal: AbortSignal): Promise<ReadonlyMap<string, DomStatus>> {
    const m = this.ctx.machine(machine);
    const r = await m.conn.exec(shJoin(["virsh", "-c", m.cfg.libvirt_uri, "domstats", "--state", "--cpu-total", "--balloon"]), { op: "virsh domstats", timeoutMs: COMMAND_TIMEOUT_MS, signal });
    if (r.code !== 0) throw new TransientError(`machine ${machine}: virsh domstats failed: ${clip(r.stderr)}`, BACKEND);
    const all = parseDomstats(r.stdout);
    const out = new Map<string, DomStatus>();
    for (const n of names) {
      const s = all.get(n);
      if (!s) {
        out.set(n, { absent: "1" });
        continue;
      }
      out.set(n, s);
      const usage = this.samples.get(usageKey(m, n));
      if (usage) {
        const cpu = num(s["cpu.time"]);
        const rssKiB = num(s["balloon.rss"]);
        if (cpu !== null && (usage.cpuNs === null || cpu > usage.cpuNs)) usage.cpuNs = cpu;
        if (rssKiB !== null && (usage.memBytes === null || rssKiB * 1024 > usage.memBytes)) usage.memBytes = rssKiB * 1024;
      }
    }
    return out;
  }
}
