// The bare-metal backend's virsh mode against REAL libvirt 9 + QEMU under TCG (no KVM needed),
// through a real OpenSSH server on 127.0.0.1 whose session PATH has the real `virsh` and `qemu-img`
// (not the stand-ins): the backend defines, starts, watches (domstate / domstats), destroys and
// undefines a tiny non-TDX guest (64 MiB, booting an empty qcow2: it only has to run, without a
// NIC). The TDX-only parts (<launchSecurity>, the TD quote) cannot run here; baremetal.test.ts
// checks them against the virsh stand-in.
//
//   sudo bash scripts/libvirt-up.sh    # once: packages, qemu.conf, virtlogd + libvirtd
//   node --import tsx --test test/backends/baremetal-libvirt.test.ts
//
// Without libvirt the real-libvirt suite is skipped with the reason (npm test's pretest runs
// scripts/libvirt-up.sh as root); CB_REQUIRE_LIBVIRT=1 turns that skip into a failure.
// Only this run's own domains (cb-lv-<unique>-*) are ever touched: qemu:///system is shared.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { InvalidRequestError } from "../../src/backends/backend.js";
import type { BareMetalBackend } from "../../src/backends/baremetal.js";
import { remote, VIRSH_LIST } from "../../src/backends/baremetal/scripts.js";
import { domainXml, parseDomstats, qcow2Problem } from "../../src/backends/baremetal/virsh.js";
import { BareMetalMachine } from "../../src/config/schema.js";
import { ensureSshdInstalled, startSshd, type FakeSshd } from "../fakes/sshd.js";
import { backend, grant, imageServer, machine, recorder, sshRun, type ImageServer } from "./baremetal/harness.js";

const URI = "qemu:///system";
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const LIBVIRT_UP = path.join(ROOT, "scripts", "libvirt-up.sh");
const never = new AbortController().signal;

function run(cmd: string, args: string[], timeoutMs = 20_000): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: timeoutMs });
  return { code: r.error ? null : r.status, stdout: r.stdout ?? "", stderr: r.stderr ?? (r.error ? r.error.message : "") };
}

function which(tool: string): string | null {
  for (const d of ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]) if (existsSync(path.join(d, tool))) return path.join(d, tool);
  return null;
}

/** The Debian packages scripts/libvirt-up.sh installs (one list, kept there). */
function libvirtPackages(): string[] {
  const m = /^PKGS=\(([^)]*)\)/m.exec(readFileSync(LIBVIRT_UP, "utf8"));
  return m ? m[1]!.trim().split(/\s+/) : [];
}

/** Why the real-libvirt suite cannot run here, or null. */
function libvirtProblem(): string | null {
  const pkgs = libvirtPackages();
  const missing = which("dpkg-query")
    ? pkgs.filter((p) => run("dpkg-query", ["-W", "-f=${db:Status-Status}", p]).stdout.trim() !== "installed")
    : ["virsh", "libvirtd", "qemu-system-x86_64", "qemu-img"].some((t) => !which(t))
      ? pkgs
      : [];
  if (missing.length)
    return `real libvirt is not installed: missing Debian packages ${missing.join(" ")} (as root: bash scripts/libvirt-up.sh, or apt-get install -y --no-install-recommends ${pkgs.join(" ")})`;
  const v = run("virsh", ["-c", URI, "version"]);
  if (v.code !== 0) return `libvirtd does not answer on ${URI} (${(v.stderr || v.stdout).trim().split("\n")[0] || "no answer"}): start it as root with bash scripts/libvirt-up.sh`;
  if (!/Running hypervisor: QEMU/.test(v.stdout)) return `libvirt on ${URI} has no QEMU hypervisor (missing qemu-system-x86 or libvirt-daemon-driver-qemu?): ${v.stdout.trim()}`;
  return null;
}

const problem = libvirtProblem();
const required = process.env.CB_REQUIRE_LIBVIRT === "1";
/** Each real-libvirt test skips with this reason (counted as skipped, the reason printed). */
const skip = problem && !required ? problem : false;

/** The PID of a running domain's QEMU (libvirt's pid file, else /proc). */
function qemuPid(dom: string): number | null {
  try {
    return Number(readFileSync(`/run/libvirt/qemu/${dom}.pid`, "utf8").trim()) || null;
  } catch {
    for (const e of readdirSync("/proc")) {
      if (!/^\d+$/.test(e)) continue;
      try {
        if (readFileSync(`/proc/${e}/cmdline`, "utf8").split("\0").some((a) => a.startsWith(`guest=${dom},`))) return Number(e);
      } catch {
        /* gone */
      }
    }
    return null;
  }
}

describe("virt_type and network = \"none\" (no libvirt needed)", () => {
  const base = { name: "h", host: "127.0.0.1", user: "root", private_key_file: "/k", host_key_sha256: `SHA256:${"A".repeat(43)}`, region: "r1", cpu_millicores: 1000, ram_mib: 1024, mode: "virsh" };

  it("the schema defaults virt_type to kvm and refuses a TDX machine on qemu (TCG)", () => {
    assert.equal(BareMetalMachine.parse(base).virt_type, "kvm");
    assert.equal(BareMetalMachine.parse({ ...base, virt_type: "qemu" }).virt_type, "qemu");
    const r = BareMetalMachine.safeParse({ ...base, virt_type: "qemu", tdx_capable: true, ovmf_path: "/usr/share/ovmf/OVMF.fd" });
    assert.equal(r.success, false);
    const issue = r.error!.issues.find((i) => i.path.join(".") === "virt_type");
    assert.match(issue?.message ?? "", /TDX machine needs virt_type = "kvm"/);
    assert.equal(BareMetalMachine.safeParse({ ...base, virt_type: "xen" }).success, false);
  });

  it("domain XML: kvm keeps host-passthrough and the NIC; qemu drops host-passthrough; none drops the NIC; TDX stays kvm-only", () => {
    const d = { name: "cb-x", grant: grant("x", 1000, { cpu_millicores: 1000 }), providerId: "p", runDir: "/w/runs/x", network: "default", tdx: false };
    const kvm = domainXml(d);
    assert.match(kvm, /^<domain type='kvm'>/);
    assert.match(kvm, /<cpu mode='host-passthrough'\/>/);
    assert.match(kvm, /<interface type='network'>\s*<source network='default'\/>/);
    const tcg = domainXml({ ...d, virtType: "qemu", network: "none" });
    assert.match(tcg, /^<domain type='qemu'>/);
    assert.ok(!tcg.includes("<cpu") && !tcg.includes("<interface"), tcg);
    assert.throws(() => domainXml({ ...d, tdx: true, ovmfPath: "/o.fd", virtType: "qemu" }), /kvm/);
  });
});

describe("bare-metal virsh mode on real libvirt + QEMU (TCG) over a real sshd", () => {
  let tmp: string;
  let work: string;
  let bin: string;
  let srv: ImageServer;
  let S: FakeSshd;
  let b: BareMetalBackend;
  let disk: { url: string; sha256: string; format: "disk" };
  const rec = recorder();
  const uniq = `${process.pid.toString(36)}${Date.now().toString(36)}`;
  const ids: string[] = [];
  const newId = (n: string) => {
    const id = `lv-${uniq}-${n}`;
    ids.push(id);
    return id;
  };
  const virsh = (args: string) => sshRun(S, `virsh -c ${URI} ${args}`);

  before(async () => {
    if (skip) return;
    if (problem) throw new Error(`CB_REQUIRE_LIBVIRT=1: ${problem}`);
    ensureSshdInstalled();
    tmp = mkdtempSync(path.join(os.tmpdir(), "cb-lv-"));
    // QEMU runs as libvirt-qemu: it must traverse to the overlay and the cached image.
    chmodSync(tmp, 0o711);
    work = path.join(tmp, "work");
    bin = path.join(tmp, "bin");
    mkdirSync(bin);
    for (const t of ["virsh", "qemu-img"]) symlinkSync(which(t)!, path.join(bin, t));
    const img = path.join(tmp, "tiny.qcow2");
    const c = run("qemu-img", ["create", "-q", "-f", "qcow2", img, "64M"]);
    assert.equal(c.code, 0, c.stderr);
    srv = await imageServer();
    disk = { ...srv.put("tiny.qcow2", readFileSync(img)), format: "disk" };
    S = await startSshd({ binDir: bin });
    b = backend([machine("lv1", S, work, { mode: "virsh", virt_type: "qemu", network: "none", cpu_millicores: 2000, ram_mib: 1024 })], {
      rec,
      cfg: { poll_interval_ms: 100, ready_timeout_seconds: 30 },
    });
  });

  after(async () => {
    await b?.close();
    // Only this run's own domains, whatever a failed test left.
    for (const id of ids) {
      run("virsh", ["-c", URI, "destroy", `cb-${id}`]);
      run("virsh", ["-c", URI, "undefine", "--nvram", `cb-${id}`]);
    }
    await S?.stop();
    await srv?.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("the machine's session runs the real virsh and qemu-img (no stand-ins on PATH)", { skip }, async () => {
    const r = await sshRun(S, `command -v virsh; command -v qemu-img; readlink -f "$(command -v virsh)"; echo "$PATH"; virsh -c ${URI} version`);
    assert.equal(r.code, 0, r.stderr);
    const [v, q, real, p] = r.stdout.split("\n");
    assert.equal(v, path.join(bin, "virsh"));
    assert.equal(q, path.join(bin, "qemu-img"));
    assert.equal(real, which("virsh"));
    assert.ok(!p!.includes(path.join("test", "fakes")), p);
    assert.match(r.stdout, /Running hypervisor: QEMU \d/);
    // doctor reads the same real outputs.
    const checks = await b.check();
    for (const c of ["ssh", "tools", "libvirt", "qemu-img", "work_dir"]) assert.ok(checks.find((x) => x.check === `lv1: ${c}`)?.ok, `${c}: ${JSON.stringify(checks)}`);
    assert.match(checks.find((x) => x.check === "lv1: libvirt")!.detail, /hypervisor: QEMU/);
    // A machine configured for TDX is asked whether its libvirt offers TDX guests, from the real
    // domcapabilities output; this host's (libvirt 9, no TDX, likely no KVM either) does not.
    const tdx = backend([machine("lvtdx", S, work, { mode: "virsh", tdx_capable: true, ovmf_path: "/usr/share/ovmf/OVMF.inteltdx.fd" })]);
    try {
      const tdxCheck = (await tdx.check()).find((x) => x.check === "lvtdx: tdx");
      assert.equal(tdxCheck?.ok, false, JSON.stringify(tdxCheck));
      assert.match(tdxCheck!.detail, /no <tdx supported='yes'\/>|domcapabilities --virttype kvm failed/);
    } finally {
      await tdx.close();
    }
  });

  it("refuses a real qcow2 with a backing file (real qemu-img JSON) and defines nothing", { skip }, async () => {
    const evil = path.join(tmp, "evil.qcow2");
    const c = run("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", evil, "64M"]);
    assert.equal(c.code, 0, c.stderr);
    const info = run("qemu-img", ["info", "-f", "qcow2", "--output=json", evil]);
    assert.match(qcow2Problem(info.stdout) ?? "", /backing file/);
    assert.equal(qcow2Problem(run("qemu-img", ["info", "-f", "qcow2", "--output=json", path.join(tmp, "tiny.qcow2")]).stdout), null);
    const id = newId("evil");
    const image = { ...srv.put("evil.qcow2", readFileSync(evil)), format: "disk" as const };
    await assert.rejects(b.provision(grant(id, 60_000, { cpu_millicores: 1000, ram_mib: 64 }), { image }, never), (e: Error) => e instanceof InvalidRequestError && /backing file/.test(e.message));
    const st = await virsh(`domstate cb-${id}`);
    assert.equal(st.code, 1);
    assert.match(st.stderr, /failed to get domain/);
    assert.equal(existsSync(path.join(work, "lv1", "runs", id)), false);
  });

  it("defines and starts a TCG guest, adopts it on a repeated provision, samples domstats until expiry, then destroys and undefines it", { skip }, async (t) => {
    const id = newId("a");
    const dom = `cb-${id}`;
    const g = grant(id, 60_000, { cpu_millicores: 1000, ram_mib: 64 });
    let t0 = Date.now();
    const inst = await b.provision(g, { image: disk }, never);
    t.diagnostic(`provision (fetch + verify + qemu-img info + overlay + define + start): ${Date.now() - t0} ms`);
    assert.equal(inst.instance_id, `lv1/${dom}`);
    assert.equal(inst.host, null, "no NIC, no address");
    assert.equal(inst.attestation, null);
    assert.equal(inst.details.tdx, "no");

    // libvirt's and QEMU's own view of the guest.
    assert.equal((await virsh(`domstate --reason ${dom}`)).stdout.trim(), "running (booted)");
    const xml = (await virsh(`dumpxml ${dom}`)).stdout;
    assert.match(xml, /^<domain type='qemu' id='\d+'>/);
    assert.match(xml, /<memory unit='KiB'>65536<\/memory>/);
    assert.ok(xml.includes(`io.systemd.credential:compute-bridge.request_id=${id}`), "SMBIOS credential");
    assert.ok(!/host-passthrough|<interface|launchSecurity/.test(xml), xml);
    const pid = qemuPid(dom);
    assert.ok(pid, "QEMU runs");
    const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    assert.equal(argv[argv.indexOf("-accel") + 1], "tcg", argv.join(" "));
    const runDir = path.join(work, "lv1", "runs", id);
    const overlay = await sshRun(S, `qemu-img info -U -f qcow2 --output=json ${runDir}/disk.qcow2`);
    assert.equal(JSON.parse(overlay.stdout)["backing-filename"], path.join(work, "lv1", "images", disk.sha256));

    // Provision again (a retry after a crash): the existing domain is adopted, not redefined.
    const again = await b.provision(g, { image: disk }, never);
    assert.equal(again.instance_id, inst.instance_id);
    assert.equal(again.started_at, inst.started_at);

    // The real outputs parse: domstats, and the reconcile listing.
    const ds = parseDomstats((await virsh(`domstats --state --cpu-total --balloon ${dom}`)).stdout).get(dom);
    assert.ok(ds, "a Domain: block for the guest");
    assert.equal(ds["state.state"], "1");
    assert.equal(ds["state.reason"], "1");
    assert.ok(Number(ds["cpu.time"]) > 0 && Number(ds["balloon.rss"]) > 0, JSON.stringify(ds));
    const list = await sshRun(S, remote(VIRSH_LIST, "cb-list", [URI, path.join(work, "lv1")]));
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, new RegExp(`^dom ${dom}$`, "m"));
    assert.match(list.stdout, new RegExp(`^run ${id} 1000 64$`, "m"));

    // Watch: batched domstats polls record CPU time and RSS until the grant's end.
    const polls = rec.calls.get("virsh domstats:ok") ?? 0;
    const obs = await b.watchUntilExit(inst, new Date(Date.now() + 2500), never);
    assert.equal(obs.kind, "expired");
    assert.ok((rec.calls.get("virsh domstats:ok") ?? 0) - polls >= 5, `domstats polled: ${rec.calls.get("virsh domstats:ok")}`);
    assert.ok(obs.cpu_seconds !== null && obs.cpu_seconds > 0, JSON.stringify(obs));
    assert.ok(obs.peak_memory_mib !== null && obs.peak_memory_mib > 1, JSON.stringify(obs));
    assert.equal((await virsh(`domstate ${dom}`)).stdout.trim(), "running", "expiry alone stops nothing");

    t0 = Date.now();
    await b.terminate(inst);
    t.diagnostic(`terminate (destroy + undefine --nvram + verify): ${Date.now() - t0} ms`);
    const gone = await virsh(`domstate ${dom}`);
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, /failed to get domain/);
    assert.equal(qemuPid(dom) === null || !existsSync(`/proc/${qemuPid(dom)}`), true, "QEMU ended");
    assert.equal(existsSync(runDir), false, "overlay, console log and XML removed");
    assert.ok(existsSync(path.join(work, "lv1", "images", disk.sha256)), "the verified image stays cached");
    await b.terminate(inst); // idempotent
    assert.equal((b.status().machines as Record<string, { grants: number }>).lv1!.grants, 0);
  });

  it("reports a guest whose QEMU died as crashed, and one destroyed outside the bridge as lost (real domstate reasons)", { skip }, async () => {
    const idC = newId("crash");
    const idD = newId("gone");
    const [ic, id] = await Promise.all([idC, idD].map((i) => b.provision(grant(i, 60_000, { cpu_millicores: 1000, ram_mib: 64 }), { image: disk }, never)));
    const watchC = b.watchUntilExit(ic!, new Date(Date.now() + 60_000), never);
    const watchD = b.watchUntilExit(id!, new Date(Date.now() + 60_000), never);
    const pid = qemuPid(`cb-${idC}`);
    assert.ok(pid);
    process.kill(pid, "SIGKILL");
    const d = await virsh(`destroy cb-${idD}`);
    assert.equal(d.code, 0, d.stderr);
    const [oc, od] = await Promise.all([watchC, watchD]);
    assert.equal(oc.kind, "exited");
    assert.equal(oc.failure?.kind, "guest_crashed");
    assert.match(oc.failure!.message, /shut off \(crashed\)/);
    assert.equal(od.kind, "lost");
    assert.match(od.failure!.message, /destroyed outside compute-bridge \(shut off \(destroyed\)\)/);
    await Promise.all([ic!, id!].map((i) => b.terminate(i)));
    for (const i of [idC, idD]) assert.match((await virsh(`domstate cb-${i}`)).stderr, /failed to get domain/);
  });
});
