// Proves the bare-metal test infrastructure end to end: a real OpenSSH server
// (test/fakes/sshd.ts), reached with a real ssh2 Client pinned to its host key,
// running the systemd / libvirt stand-ins (test/fakes/bin) that really start,
// stop and account for processes.
//
//   npx tsx --test test/fakes/sshd.test.ts

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import { ensureSshdInstalled, standins, startSshd, type FakeSshd } from './sshd.js';

// --- a tiny ssh2 helper (test-only) ---------------------------------------------

/** OpenSSH's fingerprint format, as printed by `ssh-keygen -lf`. */
function sha256Fingerprint(key: Buffer): string {
  return 'SHA256:' + createHash('sha256').update(key).digest('base64').replace(/=+$/, '');
}

interface Connected {
  client: Client;
  /** Every host key the verifier was shown, as fingerprints. */
  seen: string[];
}

function connect(sshd: FakeSshd, pinned: string = sshd.hostKeySha256, extra: Partial<ConnectConfig> = {}): Promise<Connected> {
  const client = new Client();
  const seen: string[] = [];
  return new Promise((resolve, reject) => {
    client.once('ready', () => resolve({ client, seen }));
    client.once('error', reject);
    client.connect({
      host: sshd.host,
      port: sshd.port,
      username: sshd.user,
      privateKey: sshd.privateKey,
      readyTimeout: 30_000,
      hostVerifier: (key: Buffer) => {
        const fp = sha256Fingerprint(key);
        seen.push(fp);
        return fp === pinned;
      },
      ...extra,
    });
  });
}

interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

function run(client: Client, command: string, stdin?: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    client.exec(command, (err, stream) => {
      if (err) return reject(err);
      let stdout = '';
      let stderr = '';
      let code: number | null = null;
      let signal: string | null = null;
      stream.on('data', (d: Buffer) => (stdout += d.toString()));
      stream.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      stream.on('exit', (c: number | null, s?: string) => {
        code = c;
        signal = s ?? null;
      });
      stream.on('close', () => resolve({ code, signal, stdout, stderr }));
      if (stdin !== undefined) stream.end(stdin);
    });
  });
}

/** POSIX-shell single quoting for building remote command lines. */
function sq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Poll fn every intervalMs until it returns a value that is not undefined. */
async function waitFor<T>(fn: () => Promise<T | undefined>, what: string, timeoutMs = 60_000, intervalMs = 20): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

// --- tests ------------------------------------------------------------------------

describe('fake bare-metal host: real sshd + systemd/libvirt stand-ins', () => {
  let sshd: FakeSshd;
  let conn: Client;

  before(async () => {
    ensureSshdInstalled();
    sshd = await startSshd();
    conn = (await connect(sshd)).client;
  });

  after(async () => {
    conn?.end();
    await sshd?.stop();
  });

  it('pins the host key: the verifier sees exactly the ssh-keygen fingerprint', async () => {
    assert.match(sshd.hostKeySha256, /^SHA256:[A-Za-z0-9+/]{43}$/);
    const { client, seen } = await connect(sshd);
    assert.deepEqual(seen, [sshd.hostKeySha256]);
    const r = await run(client, 'echo "$CB_FAKE_STATE"; command -v systemctl virsh systemd-run');
    client.end();
    assert.equal(r.code, 0);
    const [state, ...tools] = r.stdout.trim().split('\n');
    assert.equal(state, sshd.stateDir);
    assert.equal(tools.length, 3);
    for (const t of tools) assert.ok(t.includes('/test/fakes/bin/'), `stand-in first on PATH: ${t}`);
  });

  it('refuses a server whose host key does not match the pin', async () => {
    const wrong = 'SHA256:' + 'A'.repeat(43);
    await assert.rejects(connect(sshd, wrong), (e: Error) => {
      assert.match(e.message, /verification failed/i);
      return true;
    });
  });

  it('systemd-run: a unit exiting 3 with RemainAfterExit=yes reads exactly like systemd 252', async () => {
    const start = await run(conn,
      'systemd-run --unit=cb-t1 -p RemainAfterExit=yes -p CPUAccounting=yes -p MemoryAccounting=yes ' +
      "-p CPUQuota=50% -p MemoryMax=64M -- sh -c 'exit 3'");
    assert.equal(start.code, 0, start.stderr);
    assert.equal(start.stderr, 'Running as unit: cb-t1.service\n');
    assert.equal(start.stdout, '');

    const props = 'Result,ExecMainCode,ExecMainStatus,ActiveState,SubState,LoadState,MemoryPeak';
    const out = await waitFor(async () => {
      const r = await run(conn, `systemctl show cb-t1.service -p ${props}`);
      assert.equal(r.code, 0, r.stderr);
      return /^ActiveState=(active|activating|deactivating)$/m.test(r.stdout) ? undefined : r.stdout;
    }, 'cb-t1 to finish');
    // systemd's own order (Service vtable, then Unit vtable), not the order
    // asked for; MemoryPeak does not exist in 252 and prints nothing.
    assert.equal(out,
      'Result=exit-code\n' +
      'ExecMainCode=1\n' +
      'ExecMainStatus=3\n' +
      'LoadState=loaded\n' +
      'ActiveState=failed\n' +
      'SubState=failed\n');

    const limits = await run(conn, 'systemctl show cb-t1.service --property=MemoryMax --property=CPUQuotaPerSecUSec -p MemoryCurrent,CPUUsageNSec');
    // CPUUsageNSec is what `sh -c 'exit 3'` really used: 0 on an idle machine, a 10 ms tick or
    // more on a loaded one, so only its format is asserted.
    assert.match(limits.stdout, /^MemoryCurrent=\[not set\]\nCPUUsageNSec=\d+\nCPUQuotaPerSecUSec=500ms\nMemoryMax=67108864\n$/);

    const listed = await run(conn, "systemctl list-units --all --plain --no-legend --type=service 'cb-*'");
    assert.equal(listed.stdout, 'cb-t1.service loaded failed failed /usr/bin/sh -c "exit 3"\n');

    const reset = await run(conn, 'systemctl reset-failed cb-t1.service');
    assert.equal(reset.code, 0, reset.stderr);
    const gone = await run(conn, 'systemctl show cb-t1.service -p LoadState,ActiveState,SubState,Result');
    assert.equal(gone.stdout, 'Result=success\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n');
  });

  it('systemd-run: duplicate unit names, missing executables, stop of unknown units', async () => {
    const first = await run(conn, 'systemd-run --unit=cb-dup -- sleep 30');
    assert.equal(first.code, 0, first.stderr);
    const running = await run(conn, 'systemctl show cb-dup.service -p ActiveState,SubState,Result,ExecMainCode,ExecMainStatus,MainPID');
    assert.match(running.stdout, /^MainPID=[1-9]\d*\nResult=success\nExecMainCode=0\nExecMainStatus=0\nActiveState=active\nSubState=running\n$/);

    const dup = await run(conn, 'systemd-run --unit=cb-dup -- sleep 30');
    assert.equal(dup.code, 1);
    assert.equal(dup.stderr, 'Failed to start transient service unit: Unit cb-dup.service was already loaded or has a fragment file.\n');

    const missing = await run(conn, 'systemd-run --unit=cb-missing -- /p');
    assert.equal(missing.code, 1);
    assert.equal(missing.stderr, 'Failed to find executable /p: No such file or directory\n');

    const stop = await run(conn, 'systemctl stop cb-dup.service');
    assert.equal(stop.code, 0, stop.stderr);
    const after = await run(conn, 'systemctl show cb-dup.service -p LoadState,ActiveState');
    assert.equal(after.stdout, 'LoadState=not-found\nActiveState=inactive\n');

    const unknown = await run(conn, 'systemctl stop cb-nope.service');
    assert.equal(unknown.code, 5);
    assert.equal(unknown.stderr, 'Failed to stop cb-nope.service: Unit cb-nope.service not loaded.\n');
  });

  it('ExecStopPost runs after the main process with SERVICE_RESULT / EXIT_CODE / EXIT_STATUS', async () => {
    const post = `${sshd.stateDir}/post.txt`;
    const hook = `/bin/sh -c "echo $SERVICE_RESULT $EXIT_CODE $EXIT_STATUS >> ${post}"`;
    const r = await run(conn, `systemd-run --unit=cb-post -p ${sq(`ExecStopPost=${hook}`)} -- sh -c 'kill -9 $$'`);
    assert.equal(r.code, 0, r.stderr);
    const line = await waitFor(async () => {
      const c = await run(conn, `cat ${post} 2>/dev/null`);
      return c.stdout || undefined;
    }, 'ExecStopPost output');
    assert.equal(line, 'signal killed KILL\n');
    const show = await run(conn, 'systemctl show cb-post.service -p Result,ExecMainCode,ExecMainStatus,ActiveState,SubState');
    assert.equal(show.stdout, 'Result=signal\nExecMainCode=2\nExecMainStatus=9\nActiveState=failed\nSubState=failed\n');

    // A stop of a running unit: SIGTERM is a clean death, so Result=success and the unit is unloaded.
    const r2 = await run(conn, `systemd-run -q --unit=cb-post2 -p ${sq(`ExecStopPost=${hook}`)} -- sleep 30`);
    assert.equal(r2.code, 0, r2.stderr);
    assert.equal(r2.stderr, '');
    const stop = await run(conn, 'systemctl stop cb-post2.service');
    assert.equal(stop.code, 0, stop.stderr);
    const c2 = await run(conn, `cat ${post}`);
    assert.equal(c2.stdout, 'signal killed KILL\nsuccess killed TERM\n');
    const gone = await run(conn, 'systemctl show cb-post2.service -p LoadState');
    assert.equal(gone.stdout, 'LoadState=not-found\n');

    // RemainAfterExit=yes and exit 0: active/exited, ExecStopPost only at stop,
    // and the CPU the workload really burnt is kept.
    const busy = "sh -c 'i=0; while [ $i -lt 60000 ]; do i=$((i+1)); done'";
    const r3 = await run(conn, `systemd-run -q --unit=cb-post3 -p RemainAfterExit=yes -p ${sq(`ExecStopPost=${hook}`)} -- ${busy}`);
    assert.equal(r3.code, 0, r3.stderr);
    const exited = await waitFor(async () => {
      const r = await run(conn, 'systemctl show cb-post3.service -p Result,ExecMainCode,ExecMainStatus,CPUUsageNSec,ActiveState,SubState');
      return /^SubState=exited$/m.test(r.stdout) ? r.stdout : undefined;
    }, 'cb-post3 to exit');
    const cpu = Number(/^CPUUsageNSec=(\d+)$/m.exec(exited)?.[1]);
    assert.ok(cpu > 0, `CPUUsageNSec recorded: ${exited}`);
    assert.equal(exited.replace(/^CPUUsageNSec=\d+\n/m, ''),
      'Result=success\nExecMainCode=1\nExecMainStatus=0\nActiveState=active\nSubState=exited\n');
    assert.equal((await run(conn, `cat ${post}`)).stdout.split('\n').length, 3, 'no ExecStopPost before the stop');
    assert.equal((await run(conn, 'systemctl stop cb-post3')).code, 0);
    assert.equal((await run(conn, `tail -n 1 ${post}`)).stdout, 'success exited 0\n');
    assert.equal((await run(conn, 'systemctl show cb-post3.service -p LoadState')).stdout, 'LoadState=not-found\n');
  });

  it('virsh: define / start / domstate / domstats / domifaddr / destroy / undefine', async () => {
    const xmlPath = `${sshd.stateDir}/cb-vm1.xml`;
    const xml = [
      "<domain type='kvm'>",
      '  <name>cb-vm1</name>',
      "  <memory unit='MiB'>64</memory>",
      "  <vcpu placement='static'>1</vcpu>",
      "  <os><type arch='x86_64' machine='q35'>hvm</type></os>",
      '</domain>',
    ].join('\n');
    const up = await run(conn, `cat > ${xmlPath}`, xml);
    assert.equal(up.code, 0);

    const virsh = (args: string) => run(conn, `virsh -c qemu:///system ${args}`);
    const def = await virsh(`define ${xmlPath}`);
    assert.equal(def.code, 0, def.stderr);
    assert.equal(def.stdout, `Domain 'cb-vm1' defined from ${xmlPath}\n\n`);
    assert.equal((await virsh('domstate cb-vm1 --reason')).stdout, 'shut off (unknown)\n\n');

    const start = await virsh('start cb-vm1');
    assert.equal(start.stdout, "Domain 'cb-vm1' started\n\n");
    assert.equal((await virsh('domstate cb-vm1 --reason')).stdout, 'running (booted)\n\n');
    assert.equal((await virsh('list --all --name')).stdout, 'cb-vm1\n\n');

    const stats = await virsh('domstats cb-vm1 --state --cpu-total --balloon');
    assert.equal(stats.code, 0, stats.stderr);
    assert.match(stats.stdout, new RegExp(
      "^Domain: 'cb-vm1'\\n" +
      '  state\\.state=1\\n  state\\.reason=1\\n' +
      '  cpu\\.time=\\d+\\n  cpu\\.user=\\d+\\n  cpu\\.system=\\d+\\n  cpu\\.cache\\.monitor\\.count=0\\n' +
      '  balloon\\.current=65536\\n  balloon\\.maximum=65536\\n  balloon\\.rss=[1-9]\\d*\\n\\n$'));

    const addr = await virsh('domifaddr cb-vm1 --source lease');
    assert.match(addr.stdout, new RegExp(
      '^ Name       MAC address          Protocol     Address\\n-{79}\\n' +
      ' vnet0      52:54:00(:[0-9a-f]{2}){3}    ipv4         127\\.0\\.0\\.1/24\\n\\n$'));
    // the lease is a control file: empty means "no lease yet" -> header only, rc 0
    standins.setLease(sshd.stateDir, 'cb-vm1', []);
    const noLease = await virsh('domifaddr cb-vm1 --source lease');
    assert.equal(noLease.code, 0);
    assert.equal(noLease.stdout, ` Name       MAC address          Protocol     Address\n${'-'.repeat(79)}\n\n`);

    const destroy = await virsh('destroy cb-vm1');
    assert.equal(destroy.stdout, "Domain 'cb-vm1' destroyed\n\n");
    assert.equal((await virsh('domstate cb-vm1 --reason')).stdout, 'shut off (destroyed)\n\n');
    const offStats = await virsh('domstats cb-vm1 --state --cpu-total --balloon');
    assert.equal(offStats.stdout, "Domain: 'cb-vm1'\n  state.state=5\n  state.reason=2\n  balloon.current=65536\n  balloon.maximum=65536\n\n");

    const undef = await virsh('undefine cb-vm1 --nvram');
    assert.equal(undef.stdout, "Domain 'cb-vm1' has been undefined\n\n");
    const gone = await virsh('domstate cb-vm1 --reason');
    assert.equal(gone.code, 1);
    assert.equal(gone.stderr, "error: failed to get domain 'cb-vm1'\n");
  });

  it('virsh: a guest can power off by itself (test hook)', async () => {
    const xmlPath = `${sshd.stateDir}/cb-vm2.xml`;
    await run(conn, `cat > ${xmlPath}`, "<domain type='kvm'><name>cb-vm2</name><memory>32768</memory></domain>");
    const virsh = (args: string) => run(conn, `virsh ${args}`);
    assert.equal((await virsh(`define ${xmlPath}`)).code, 0);
    assert.equal((await virsh('start cb-vm2')).code, 0);
    assert.equal((await virsh('cb-fake-poweroff cb-vm2 --reason shutdown')).code, 0);
    assert.equal((await virsh('domstate cb-vm2 --reason')).stdout, 'shut off (shutdown)\n\n');
    assert.equal((await virsh('start cb-vm2')).code, 0);
    assert.equal((await virsh('cb-fake-poweroff cb-vm2 --reason crashed')).code, 0);
    assert.equal((await virsh('domstate cb-vm2 --reason')).stdout, 'shut off (crashed)\n\n');
    // a guest whose workload ends powers itself off; pollers see it (the workload waits for a
    // gate, so "running" is observed however slow the machine is)
    const gate = `${sshd.stateDir}/cb-vm2.gate`;
    standins.setGuestCommand(sshd.stateDir, `while [ ! -e ${sq(gate)} ]; do sleep 0.05; done`);
    assert.equal((await virsh('start cb-vm2')).code, 0);
    assert.equal((await virsh('domstate cb-vm2 --reason')).stdout, 'running (booted)\n\n');
    assert.equal((await run(conn, `touch ${sq(gate)}`)).code, 0);
    await waitFor(async () => ((await virsh('domstate cb-vm2 --reason')).stdout === 'shut off (shutdown)\n\n' ? true : undefined),
      'cb-vm2 to power off by itself');
    standins.setGuestCommand(sshd.stateDir, null);
    assert.equal((await virsh('undefine cb-vm2')).code, 0);
  });

  it('MaxSessions 10: the 11th concurrent channel fails to open', async () => {
    const { client } = await connect(sshd);
    const open = (): Promise<ClientChannel> =>
      new Promise((resolve, reject) => client.exec('cat', (err, ch) => (err ? reject(err) : resolve(ch))));
    const channels: ClientChannel[] = [];
    for (let i = 0; i < 10; i++) channels.push(await open());
    await assert.rejects(open(), (e: Error) => {
      assert.match(e.message, /open failure|open failed/i);
      return true;
    });
    const closed = channels.map((ch) => new Promise((r) => ch.once('close', r)));
    for (const ch of channels) {
      ch.resume(); // a paused stream never reaches 'close'
      ch.end();
    }
    await Promise.all(closed);
    // and a slot is free again
    const again = await run(client, 'echo ok');
    assert.equal(again.stdout, 'ok\n');
    client.end();
  });

  it('pauseSessions() makes a keepalive-enabled client give up; dropSessions() closes connections', async () => {
    const paused = await connect(sshd, sshd.hostKeySha256, { keepaliveInterval: 100, keepaliveCountMax: 2 });
    const gaveUp = new Promise<Error>((resolve) => paused.client.once('error', resolve));
    assert.ok((await sshd.pauseSessions()) > 0);
    const e = await gaveUp;
    assert.match(e.message, /keepalive/i);
    await sshd.resumeSessions();
    paused.client.destroy();

    const victim = (await connect(sshd)).client;
    assert.equal((await run(victim, 'echo alive')).stdout, 'alive\n');
    const closed = new Promise<void>((resolve) => victim.once('close', () => resolve()));
    victim.on('error', () => {});
    assert.ok((await sshd.dropSessions()) > 0);
    await closed;
    // the server itself is still there
    conn = (await connect(sshd)).client;
    assert.equal((await run(conn, 'echo back')).stdout, 'back\n');
  });

  it('restart() keeps the port and host key, and open sessions survive', async () => {
    const port = sshd.port;
    const oldPid = sshd.pid;
    await sshd.restart();
    assert.equal(sshd.port, port);
    assert.notEqual(sshd.pid, oldPid);
    assert.equal((await run(conn, 'echo still-here')).stdout, 'still-here\n');
    const fresh = await connect(sshd);
    assert.deepEqual(fresh.seen, [sshd.hostKeySha256]);
    fresh.client.end();
  });
});
