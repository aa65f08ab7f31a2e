// The bare-metal backend's virsh machines (libvirt guests, Intel TDX trust domains) against real
// OpenSSH servers on 127.0.0.1 (test/fakes/sshd.ts) running the libvirt and systemd stand-ins
// (test/fakes/bin) plus a qemu-img stand-in (baremetal/harness.ts). The systemd machines are in
// baremetal.test.ts; the two files run side by side.
//
//   node --import tsx --test test/backends/baremetal-virsh.test.ts
//
// Synchronisation is by polling (short intervals) for an event (a file, a poll, a domain state),
// never by sleeping a fixed time; ceilings are generous, they only bound a failure.
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { CapacityError, InvalidRequestError, type ManagedBackend } from "../../src/backends/backend.js";
import { bindingDigest } from "../../src/attestation/binding.js";
import { verifyTdxQuote } from "../../src/attestation/verify.js";
import { placeholder } from "../../src/lifecycle/manager.js";
import { ensureSshdInstalled, startSshd, type FakeSshd } from "../fakes/sshd.js";
import { scriptImage } from "../helpers/images.js";
import { backend, domainsOn, grant, imageServer, installGuestCommand, lineLogger, machine, precache, qcow2, recorder, removeLeftovers, sshRun, TD_QUOTE, unitConf, unitsOn, until, virshBinDir, type ImageServer } from "./baremetal/harness.js";

const never = new AbortController().signal;



describe("bare-metal backend over SSH: virsh machines (TDX)", () => {
  let tmp: string;
  let work: string;
  let srv: ImageServer;
  /** A systemd machine beside the virsh ones (placement between modes). */
  let A: FakeSshd;
  const open: ManagedBackend[] = [];
  const track = <T extends ManagedBackend>(b: T): T => (open.push(b), b);

  before(async () => {
    ensureSshdInstalled();
    tmp = mkdtempSync(path.join(os.tmpdir(), "cb-bm-virsh-"));
    work = path.join(tmp, "work");
    srv = await imageServer();
    A = await startSshd();
  });

  after(async () => {
    await Promise.allSettled(open.map((b) => b.close?.()));
    await Promise.allSettled([A?.stop()]);
    await srv?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  function executable(name: string, body: string) {
    const img = scriptImage(tmp, name, body);
    return { ...srv.put(name, readFileSync(img.file)), format: "bundle" as const };
  }

  let T: FakeSshd;
  let V: FakeSshd;
  before(async () => {
    const bin = virshBinDir(path.join(tmp, "virsh-tools"));
    [T, V] = await Promise.all([startSshd({ binDir: bin }), startSshd({ binDir: bin })]);
    installGuestCommand(T);
    installGuestCommand(V);
  });
  after(async () => {
    await Promise.allSettled([T?.stop(), V?.stop()]);
  });
  afterEach(() => removeLeftovers([A, T, V]));
  const tdxMachine = (name: string, s: FakeSshd, over: Record<string, unknown> = {}) =>
    machine(name, s, work, { mode: "virsh", tdx_capable: true, ovmf_path: "/usr/share/ovmf/OVMF.inteltdx.fd", ...over });

  it("doctor: a TDX machine's libvirt must offer TDX guests (its domcapabilities), a plain virsh machine is not asked", async () => {
    // T's libvirt answers as a TDX host's does; V's as libvirt 9 (Debian 12), which has no TDX.
    mkdirSync(path.join(T.stateDir, "libvirt"), { recursive: true });
    writeFileSync(path.join(T.stateDir, "libvirt", "tdx-host"), "");
    const checks = await track(backend([tdxMachine("tdxok", T), tdxMachine("tdxno", V), tdxMachine("plain", V, { tdx_capable: false, ovmf_path: undefined })])).check!();
    const tdx = (name: string) => checks.find((c) => c.check === `${name}: tdx`);
    assert.equal(tdx("tdxok")?.ok, true, JSON.stringify(checks));
    assert.match(tdx("tdxok")!.detail, /libvirt offers TDX guests here/);
    assert.equal(tdx("tdxno")?.ok, false);
    assert.match(tdx("tdxno")!.detail, /no <tdx supported='yes'\/>/);
    assert.equal(tdx("plain"), undefined);
    // Everything else on the TDX machine passes (the OVMF file aside: it is not on this host).
    for (const c of checks.filter((c) => c.check.startsWith("tdxok: ") && c.check !== "tdxok: ovmf")) assert.ok(c.ok, `${c.check}: ${c.detail}`);
  });

  it("a TDX grant lands only on the TDX machine: <launchSecurity type='tdx'> defined, TD quote attached, overlay removed at the end", async () => {
    const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
    const rec = recorder();
    const b = track(backend([machine("m1", A, work), tdxMachine("tdx1", T)], { rec }));
    const key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0k3mP1vWbP6YbXbXQFh7lWlWnE2x0Hj0oQb1Q2b3c tenant@example";
    const g = grant("td-1", 60_000, { tdx_required: true, cpu_millicores: 1500, ram_mib: 512 });
    const nonce = "c0ffee".repeat(8);
    const inst = await b.provision(g, { image: disk, ssh_public_key: key, attestation_nonce: nonce }, never);
    assert.equal(inst.details.machine, "tdx1");
    assert.equal(inst.details.tdx, "yes");
    assert.equal(inst.host, "127.0.0.1");
    assert.equal(inst.ssh_user, "root");
    // The TD ran the compute-bridge.attest credential: its quote, read back from the console log
    // on the host, with the binding of (request_id, nonce, host key) the TD wrote as REPORTDATA.
    const ev = inst.attestation;
    assert.ok(ev && ev.status === "present", JSON.stringify(ev));
    assert.equal(ev.platform, "baremetal");
    assert.equal(ev.nonce, nonce);
    assert.deepEqual(Buffer.from(ev.blobs.td_quote!, "base64"), TD_QUOTE);
    assert.equal(ev.binding.digest, bindingDigest("td-1", nonce, null).toString("hex"));
    const inblob = readFileSync(path.join(T.stateDir, "libvirt", "domains", "cb-td-1", "td", "tsm", "cb-td-1", "inblob"));
    assert.equal(inblob.toString("hex"), ev.binding.digest, "the stand-in configfs-tsm got the binding as REPORTDATA");
    assert.deepEqual(verifyTdxQuote(Buffer.from(ev.blobs.td_quote!, "base64"), { now: new Date("2026-06-01T00:00:00Z") }).checks, { structure: true, signature: true, pck_chain: true });
    assert.deepEqual(domainsOn(T), ["cb-td-1"]);
    const xml = readFileSync(path.join(T.stateDir, "libvirt", "domains", "cb-td-1", "domain.xml"), "utf8");
    assert.match(xml, /<launchSecurity type='tdx'>\s*<policy>0x10000000<\/policy>/);
    assert.match(xml, /<memoryBacking><source type='anonymous'\/><access mode='private'\/><\/memoryBacking>/);
    assert.match(xml, /<loader type='rom'>\/usr\/share\/ovmf\/OVMF.inteltdx.fd<\/loader>/);
    assert.match(xml, /<memory unit='MiB'>512<\/memory>/);
    assert.match(xml, /<vcpu placement='static'>2<\/vcpu>/);
    assert.match(xml, /<global_quota>150000<\/global_quota>/);
    assert.ok(xml.includes(`ssh.authorized_keys.root=${Buffer.from(`${key}\n`).toString("base64")}`), "key injected as an SMBIOS credential");
    const runDir = path.join(work, "tdx1", "runs", "td-1");
    const overlay = await sshRun(T, `qemu-img info -f qcow2 --output=json ${runDir}/disk.qcow2`);
    assert.equal(JSON.parse(overlay.stdout)["backing-filename"], path.join(work, "tdx1", "images", disk.sha256));
    assert.ok((await sshRun(T, "virsh -c qemu:///system dumpxml cb-td-1")).stdout.includes("<launchSecurity type='tdx'>"));

    // A plain bundle grant in the same region goes to the systemd machine, never the TD host.
    const plain = await b.provision(grant("plain-1"), { image: executable("plain", "exec sleep 600") }, never);
    assert.equal(plain.details.machine, "m1");
    // A TDX grant cannot run a bundle here (failover to another backend).
    await assert.rejects(b.provision(grant("td-bundle", 60_000, { tdx_required: true }), { image: executable("tdb", "true") }, never), CapacityError);

    const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
    // Usage is sampled while the guest runs (a shut-off domain has no CPU or RSS statistics).
    await until(() => (rec.calls.get("virsh domstats:ok") ?? 0) >= 1, "a usage sample");
    writeFileSync(path.join(T.stateDir, "poweroff-cb-td-1"), "");
    const obs = await watch;
    assert.equal(obs.kind, "exited");
    assert.equal(obs.exit_code, 0);
    assert.equal(obs.failure, null);
    assert.ok(obs.cpu_seconds !== null && obs.peak_memory_mib !== null && obs.peak_memory_mib > 0, JSON.stringify(obs));
    await b.terminate(inst);
    assert.deepEqual(domainsOn(T), []);
    assert.equal(existsSync(runDir), false, "overlay, console log and XML removed");
    await b.terminate(inst);
    await b.terminate(plain);
  });

  it("the host destroys a guest at valid_to on its own (cb-deadline unit) while the bridge is away; the resumed watch says expired; terminate stops a pending deadline", async () => {
    const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
    const plain = (over: Record<string, unknown> = {}) => tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined, ...over });
    const logs: string[] = [];
    const b = track(backend([plain()], { log: lineLogger(logs) }));
    const g = grant("dl-1", 2500);
    await precache(path.join(work, "v1"), disk); // valid_to would bound a download too
    const inst = await b.provision(g, { image: disk }, never);
    // systemd-run created the deadline unit (its journal file stays; on a slow machine the unit
    // may have run and been collected by now, so it is not looked for in the unit list here).
    assert.ok(existsSync(path.join(V.stateDir, "systemd", "logs", "cb-deadline-dl-1.service.log")), JSON.stringify(unitsOn(V)));
    assert.ok(!logs.some((l) => /no host-side deadline/.test(l)), "the deadline was set");
    assert.match((await b.check!()).find((c) => c.check === "v1: systemd-run")?.detail ?? "", /host-side deadline/);
    // Nobody watches (the bridge is away): the host ends the guest at valid_to by itself.
    const state = async () => (await sshRun(V, "virsh -c qemu:///system domstate --reason cb-dl-1")).stdout.trim();
    await until(async () => (await state()) === "shut off (destroyed)", "the host's deadline to destroy the guest", 60_000);
    assert.ok(Date.now() >= g.valid_to, "not before valid_to");
    // The bridge is back: the watch resumed after valid_to reports expiry, not a lost guest.
    const b2 = track(backend([plain()]));
    const obs = await b2.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "expired");
    assert.equal(obs.failure, null);
    await b2.terminate(inst);
    assert.deepEqual(domainsOn(V), []);
    assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-dl-1")), JSON.stringify(unitsOn(V)));

    // Terminated before valid_to: its deadline is stopped with it.
    const early = await b2.provision(grant("dl-2", 60_000), { image: disk }, never);
    assert.ok(unitsOn(V).includes("cb-deadline-dl-2.service"));
    assert.match(unitConf(V, "cb-deadline-dl-2.service"), /destroy/);
    await b2.terminate(early);
    assert.deepEqual(domainsOn(V), []);
    assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-dl-2")), JSON.stringify(unitsOn(V)));
  });

  it("a host where systemd-run fails still runs the guest (the bridge's watch enforces valid_to) and says why", async (t) => {
    const bin = virshBinDir(path.join(tmp, "virsh-no-systemd"));
    rmSync(path.join(bin, "systemd-run"));
    // What Debian's systemd-run says in a container without systemd as PID 1.
    writeFileSync(path.join(bin, "systemd-run"), "#!/bin/sh\necho 'System has not been booted with systemd as init system (PID 1). Can'\\''t operate.' >&2\necho 'Failed to connect to bus: Host is down' >&2\nexit 1\n", { mode: 0o755 });
    const N = await startSshd({ binDir: bin });
    t.after(() => N.stop());
    installGuestCommand(N);
    const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
    const logs: string[] = [];
    const b = track(backend([tdxMachine("n1", N, { tdx_capable: false, ovmf_path: undefined })], { log: lineLogger(logs) }));
    const g = grant("nd-1", 1500);
    await precache(path.join(work, "n1"), disk); // valid_to would bound a download too
    const inst = await b.provision(g, { image: disk }, never);
    assert.ok(logs.some((l) => /no host-side deadline/.test(l) && /Failed to connect to bus/.test(l)), logs.join("\n"));
    const obs = await b.watchUntilExit(inst, new Date(g.valid_to), never);
    assert.equal(obs.kind, "expired");
    await b.terminate(inst);
    assert.deepEqual(domainsOn(N), []);
  });

  it("warm provision: an image already inspected there takes one round trip (adopt or start, first address); a cache miss fetches and inspects again; a failed step names itself and its file", async () => {
    const disk = { ...srv.put("warm.qcow2", qcow2(1024 ** 3)), format: "disk" as const };
    const rec = recorder();
    const b = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })], { rec }));
    const execs = () => [...rec.calls.values()].reduce((a, x) => a + x, 0);
    const first = await b.provision(grant("warm-1"), { image: disk }, never);
    let n = execs();
    const second = await b.provision(grant("warm-2"), { image: disk }, never);
    assert.equal(execs() - n, 1, "one SSH round trip");
    assert.equal(second.host, "127.0.0.1");
    assert.ok(domainsOn(V).includes("cb-warm-1") && domainsOn(V).includes("cb-warm-2"), JSON.stringify(domainsOn(V)));
    assert.ok(unitsOn(V).includes("cb-deadline-warm-2.service"), "the host-side deadline is set on the warm path too");
    n = execs();
    const again = await b.provision(grant("warm-2"), { image: disk }, never);
    assert.equal(execs() - n, 1, "adopting is one round trip as well");
    assert.equal(again.started_at, second.started_at);

    // The cached image went away (image GC): nothing is done on the warm path, the image is fetched and inspected again.
    const cached = path.join(work, "v1", "images", disk.sha256);
    rmSync(cached);
    const fetched = srv.requests.length;
    const third = await b.provision(grant("warm-3"), { image: disk }, never);
    assert.equal(srv.requests.length, fetched + 1, "fetched again");
    assert.ok(existsSync(cached));

    // A step that fails on the warm path says which step and which file.
    writeFileSync(cached, "not a qcow2 image");
    await assert.rejects(b.provision(grant("warm-4"), { image: disk }, never), (e: Error) => {
      assert.match(e.message, /^machine v1: creating the overlay failed: .*Could not open '[^']*\/images\/[0-9a-f]{64}'/);
      return true;
    });
    assert.ok(!domainsOn(V).includes("cb-warm-4"), "nothing defined");
    assert.equal((b.status().machines as Record<string, { grants: number }>).v1!.grants, 3, "its capacity is given back");
    rmSync(cached);
    for (const i of [first, second, third]) await b.terminate(i);
    await b.terminate(placeholder(grant("warm-4"), "baremetal"));
    assert.ok(!domainsOn(V).some((d) => d.startsWith("cb-warm-")), JSON.stringify(domainsOn(V)));
    assert.ok(!unitsOn(V).some((u) => u.startsWith("cb-deadline-warm")), JSON.stringify(unitsOn(V)));
  });

  it("refuses a qcow2 with a backing file (nothing defined) and reports a crashed guest as a failure", async () => {
    const evil = { ...srv.put("evil.qcow2", qcow2(1024 ** 3, "/etc/shadow")), format: "disk" as const };
    const b = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })]));
    await assert.rejects(b.provision(grant("bk-1"), { image: evil }, never), (e: Error) => e instanceof InvalidRequestError && /backing file/.test(e.message));
    assert.deepEqual(domainsOn(V), []);
    assert.equal(existsSync(path.join(work, "v1", "runs", "bk-1")), false);

    const disk = { ...srv.put("guest.qcow2", qcow2(2 * 1024 ** 3)), format: "disk" as const };
    const g = grant("crash-1");
    const inst = await b.provision(g, { image: disk }, never);
    assert.equal(inst.attestation, null, "not a TD: no quote");
    const xml = readFileSync(path.join(V.stateDir, "libvirt", "domains", "cb-crash-1", "domain.xml"), "utf8");
    assert.ok(!xml.includes("launchSecurity"), "a plain guest");
    const watch = b.watchUntilExit(inst, new Date(g.valid_to), never);
    const r = await sshRun(V, "virsh cb-fake-poweroff cb-crash-1 --reason crashed");
    assert.equal(r.code, 0, r.stderr);
    const obs = await watch;
    assert.equal(obs.failure?.kind, "guest_crashed");
    assert.match(obs.failure!.message, /shut off \(crashed\)/);
    // Restart: reconcile re-attaches nothing (no live grant) and removes the domain.
    const b2 = track(backend([tdxMachine("v1", V, { tdx_capable: false, ovmf_path: undefined })]));
    await b2.reconcile(new Set());
    assert.deepEqual(domainsOn(V), []);
    assert.equal(existsSync(path.join(work, "v1", "runs", "crash-1")), false);
  });
});
