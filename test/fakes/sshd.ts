// A real OpenSSH server for tests: one `sshd -D -e` per simulated bare-metal
// host, listening on 127.0.0.1 only, with its own host key, one authorized
// client key, and the systemd/libvirt stand-ins (test/fakes/bin) first on the
// session PATH. Each server has its own stand-in state dir (CB_FAKE_STATE), so
// one server = one machine. See test/fakes/standins/README.md for the tools.
//
//   const sshd = await startSshd();
//   // connect with ssh2: host/port/user/privateKey, pin sshd.hostKeySha256
//   await sshd.dropSessions();   // simulate a connection drop
//   await sshd.stop();
//
// Nothing here ever starts systemd: the stand-ins are plain processes.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export const SSHD_PATH = '/usr/sbin/sshd';
export const SSH_KEYGEN_PATH = '/usr/bin/ssh-keygen';
/** util-linux setpriv: used to tie the listener's life to the test process. */
const SETPRIV_PATH = '/usr/bin/setpriv';

const here = path.dirname(fileURLToPath(import.meta.url));
/** Directory holding the systemd-run / systemctl / virsh stand-ins. */
export const STANDINS_BIN_DIR = path.join(here, 'bin');

export interface SshdOptions {
  /** sshd MaxSessions (channels per connection). Default 10, like OpenSSH. */
  maxSessions?: number;
  /** Stand-in state dir (CB_FAKE_STATE). Default: `<tempdir>/state`. */
  stateDir?: string;
  /** Directory put first on the session PATH. Default: test/fakes/bin. */
  binDir?: string;
  /**
   * Let the login shell source ~/.bashrc for `exec` requests (bash does so when
   * started by sshd at SHLVL 0). Default false: sessions get SHLVL=1, so a
   * developer's rc files neither slow every exec nor reorder PATH.
   */
  sourceBashrc?: boolean;
  /** Extra sshd_config lines, appended verbatim. */
  extraConfig?: string[];
  /** Keep the temp dir (keys, config, state, logs) after stop(). Default false. */
  keepTempDir?: boolean;
  /** How long to wait for the server to accept connections. Default 10 s. */
  readyTimeoutMs?: number;
}

export interface FakeSshd {
  readonly host: '127.0.0.1';
  readonly port: number;
  /** The login user: the user running the tests (root in CI). */
  readonly user: string;
  /** OpenSSH-format ed25519 private key authorized on this server. */
  readonly privateKeyPath: string;
  readonly privateKey: string;
  readonly publicKey: string;
  /** 'SHA256:...' exactly as `ssh-keygen -lf` prints it (no '=' padding). */
  readonly hostKeySha256: string;
  /** Host public key line ("ssh-ed25519 AAAA... comment"). */
  readonly hostPublicKey: string;
  /** CB_FAKE_STATE of the stand-ins on this "machine". */
  readonly stateDir: string;
  /** Temp dir with config, keys, state and logs. */
  readonly dir: string;
  readonly configPath: string;
  /** PID of the current listener (changes on restart()). */
  readonly pid: number;
  /** sshd's own log (stderr of -e), for diagnostics. */
  logs(): string;
  /** SIGKILL the per-connection sshd processes: every open connection drops. Returns how many processes were killed. */
  dropSessions(): Promise<number>;
  /** SIGSTOP the per-connection sshd processes (the peer goes silent: keepalive timeouts). */
  pauseSessions(): Promise<number>;
  /** SIGCONT what pauseSessions() stopped. */
  resumeSessions(): Promise<number>;
  /** Stop and start the listener on the same port with the same host key. Open sessions survive, as with a real sshd. */
  restart(): Promise<void>;
  /** Stop the server, drop sessions, kill everything the stand-ins started on this machine, remove the temp dir. */
  stop(): Promise<void>;
}

/** Throws a clear error when OpenSSH's server is not installed. */
export function ensureSshdInstalled(): void {
  for (const [bin, pkg] of [[SSHD_PATH, 'openssh-server'], [SSH_KEYGEN_PATH, 'openssh-client']] as const) {
    try {
      fs.accessSync(bin, fs.constants.X_OK);
    } catch {
      throw new Error(
        `${bin} is missing: the bare-metal SSH tests need a real OpenSSH server. ` +
          `Install the Debian package ${pkg} (as root: apt-get install -y ${pkg}).`,
      );
    }
  }
}

// --- /proc helpers --------------------------------------------------------------

interface ProcInfo {
  pid: number;
  ppid: number;
  sid: number;
  state: string;
  comm: string;
  start: string;
}

function readProc(pid: number): ProcInfo | null {
  let s: string;
  try {
    s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  const open = s.indexOf('(');
  const close = s.lastIndexOf(')');
  const f = s.slice(close + 2).split(' ');
  return {
    pid,
    comm: s.slice(open + 1, close),
    state: f[0] ?? '?',
    ppid: Number(f[1]),
    sid: Number(f[3]),
    start: f[19] ?? '',
  };
}

function allProcs(): ProcInfo[] {
  const out: ProcInfo[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const p = readProc(Number(e));
    if (p && p.state !== 'Z' && p.state !== 'X') out.push(p);
  }
  return out;
}

function descendants(roots: number[], procs: ProcInfo[]): ProcInfo[] {
  const byParent = new Map<number, ProcInfo[]>();
  for (const p of procs) {
    const list = byParent.get(p.ppid) ?? [];
    list.push(p);
    byParent.set(p.ppid, list);
  }
  const out: ProcInfo[] = [];
  const queue = [...roots];
  const seen = new Set<number>();
  while (queue.length) {
    const pid = queue.shift() as number;
    for (const c of byParent.get(pid) ?? []) {
      if (seen.has(c.pid)) continue;
      seen.add(c.pid);
      out.push(c);
      queue.push(c.pid);
    }
  }
  return out;
}

function signal(pid: number, sig: NodeJS.Signals): boolean {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false;
  }
}

function alive(pid: number, start?: string): boolean {
  const p = readProc(pid);
  if (!p || p.state === 'Z' || p.state === 'X') return false;
  return start === undefined || p.start === start;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => (addr && typeof addr === 'object' ? resolve(addr.port) : reject(new Error('no port'))));
    });
  });
}

/** Resolves once a TCP connect to port gets an SSH banner. */
function probeBanner(port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok: boolean) => {
      clearTimeout(timer);
      sock.removeAllListeners();
      sock.on('error', () => {});
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    sock.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (buf.includes('\n')) done(buf.startsWith('SSH-'));
    });
    sock.on('error', () => done(false));
    sock.on('close', () => done(false));
  });
}

// One process 'exit' hook for all servers: best-effort cleanup of servers the
// test forgot to stop().
const exitCleanups = new Set<() => void>();
let exitHooked = false;

let setprivOk: boolean | undefined;
function hasSetpriv(): boolean {
  if (setprivOk === undefined) {
    try {
      fs.accessSync(SETPRIV_PATH, fs.constants.X_OK);
      setprivOk = true;
    } catch {
      setprivOk = false;
    }
  }
  return setprivOk;
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function keygen(file: string, comment: string): Promise<void> {
  await execFileP(SSH_KEYGEN_PATH, ['-q', '-t', 'ed25519', '-N', '', '-C', comment, '-f', file]);
}

async function fingerprint(pubFile: string): Promise<string> {
  const { stdout } = await execFileP(SSH_KEYGEN_PATH, ['-l', '-E', 'sha256', '-f', pubFile]);
  // "256 SHA256:abc... comment (ED25519)"
  const fp = stdout.trim().split(/\s+/)[1];
  if (!fp || !fp.startsWith('SHA256:')) throw new Error(`unexpected ssh-keygen -lf output: ${stdout}`);
  return fp;
}

export async function startSshd(opts: SshdOptions = {}): Promise<FakeSshd> {
  ensureSshdInstalled();
  const maxSessions = opts.maxSessions ?? 10;
  const binDir = path.resolve(opts.binDir ?? STANDINS_BIN_DIR);
  const readyTimeoutMs = opts.readyTimeoutMs ?? 10_000;

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cb-sshd-'));
  const stateDir = path.resolve(opts.stateDir ?? path.join(dir, 'state'));
  fs.mkdirSync(stateDir, { recursive: true });
  // privilege separation directory, required by sshd
  fs.mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });

  const hostKeyPath = path.join(dir, 'ssh_host_ed25519_key');
  const privateKeyPath = path.join(dir, 'client_ed25519');
  const authorizedKeysPath = path.join(dir, 'authorized_keys');
  const pidFile = path.join(dir, 'sshd.pid');
  const configPath = path.join(dir, 'sshd_config');
  await Promise.all([keygen(hostKeyPath, 'cb-fake-host'), keygen(privateKeyPath, 'cb-test-client')]);
  const publicKey = fs.readFileSync(`${privateKeyPath}.pub`, 'utf8').trim();
  const hostPublicKey = fs.readFileSync(`${hostKeyPath}.pub`, 'utf8').trim();
  fs.writeFileSync(authorizedKeysPath, `${publicKey}\n`, { mode: 0o600 });
  const privateKey = fs.readFileSync(privateKeyPath, 'utf8');
  const hostKeySha256 = await fingerprint(`${hostKeyPath}.pub`);

  const sessionPath = `${binDir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`;
  for (const v of [sessionPath, stateDir]) {
    if (/[\s"']/.test(v)) throw new Error(`path with whitespace or quotes not supported in SetEnv: ${v}`);
  }
  const setEnv = [`PATH=${sessionPath}`, `CB_FAKE_STATE=${stateDir}`];
  if (!opts.sourceBashrc) setEnv.push('SHLVL=1');

  const writeConfig = (port: number) => {
    const lines = [
      `# generated by test/fakes/sshd.ts`,
      `Port ${port}`,
      `ListenAddress 127.0.0.1`,
      `HostKey ${hostKeyPath}`,
      `PidFile ${pidFile}`,
      `AuthorizedKeysFile ${authorizedKeysPath}`,
      `PermitRootLogin prohibit-password`,
      `PubkeyAuthentication yes`,
      `PasswordAuthentication no`,
      `KbdInteractiveAuthentication no`,
      `UsePAM no`,
      `StrictModes no`,
      `MaxSessions ${maxSessions}`,
      `MaxStartups 100`,
      `UseDNS no`,
      `PrintMotd no`,
      `PrintLastLog no`,
      `X11Forwarding no`,
      `LogLevel INFO`,
      // sshd uses only the first SetEnv line: all variables go on this one.
      `SetEnv ${setEnv.join(' ')}`,
      `Subsystem sftp internal-sftp`,
      ...(opts.extraConfig ?? []),
      '',
    ];
    fs.writeFileSync(configPath, lines.join('\n'), { mode: 0o600 });
  };

  let log = '';
  const appendLog = (d: Buffer) => {
    log += d.toString();
    if (log.length > 256 * 1024) log = log.slice(-128 * 1024);
  };

  let child: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();
  // per-connection processes orphaned by restart(): still ours to drop
  let orphanedSessions: Array<{ pid: number; start: string }> = [];

  const launch = async (port: number): Promise<void> => {
    writeConfig(port);
    try {
      await execFileP(SSHD_PATH, ['-t', '-f', configPath]);
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`sshd -t rejected ${configPath}: ${err.stderr || err.message}`);
    }
    const before = log.length;
    // If the test process dies without stop(), the listener must not outlive
    // it: setpriv sets PDEATHSIG and execs sshd in place (same pid).
    const sshdArgs = ['-D', '-e', '-f', configPath];
    const c = hasSetpriv()
      ? spawn(SETPRIV_PATH, ['--pdeathsig', 'KILL', SSHD_PATH, ...sshdArgs], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn(SSHD_PATH, sshdArgs, { stdio: ['ignore', 'pipe', 'pipe'] });
    child = c;
    c.stdout?.on('data', appendLog);
    c.stderr?.on('data', appendLog);
    let hasExited = false;
    exited = new Promise<void>((resolve) => {
      c.once('exit', () => {
        hasExited = true;
        resolve();
      });
      c.once('error', () => {
        hasExited = true;
        resolve();
      });
    });
    const deadline = Date.now() + readyTimeoutMs;
    for (;;) {
      if (hasExited) {
        throw new Error(`sshd exited during start-up:\n${log.slice(before)}`);
      }
      if (await probeBanner(port, 1000)) return;
      if (Date.now() > deadline) {
        c.kill('SIGKILL');
        throw new Error(`sshd did not accept connections on 127.0.0.1:${port} within ${readyTimeoutMs} ms:\n${log.slice(before)}`);
      }
      await delay(10);
    }
  };

  // The port is picked free and then handed to sshd: retry if someone else grabbed it.
  let port = 0;
  for (let attempt = 1; ; attempt++) {
    port = await freePort();
    try {
      await launch(port);
      break;
    } catch (e) {
      const msg = (e as Error).message;
      if (attempt < 5 && /Address already in use|Cannot bind any address/.test(msg)) continue;
      if (!opts.keepTempDir) fs.rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  const listenerPid = () => child?.pid ?? 0;

  /** The per-connection sshd processes (monitor + its sshd children). */
  const sessionProcs = (): ProcInfo[] => {
    const procs = allProcs();
    const roots: ProcInfo[] = [];
    const lp = listenerPid();
    if (lp) roots.push(...procs.filter((p) => p.ppid === lp));
    for (const o of orphanedSessions) {
      const p = procs.find((x) => x.pid === o.pid && x.start === o.start);
      if (p) roots.push(p);
    }
    const sshdDesc = descendants(roots.map((r) => r.pid), procs).filter((p) => p.comm === 'sshd');
    const seen = new Set<number>();
    return [...roots, ...sshdDesc].filter((p) => (seen.has(p.pid) ? false : (seen.add(p.pid), true)));
  };

  const signalSessions = async (sig: NodeJS.Signals): Promise<number> => {
    let n = 0;
    for (const p of sessionProcs()) if (signal(p.pid, sig)) n++;
    return n;
  };

  const stopListener = async () => {
    const c = child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 2000);
    await exited;
    clearTimeout(t);
  };

  let stopped = false;
  // Best-effort synchronous cleanup if the process exits without stop().
  const onExit = () => {
    if (stopped) return;
    const sess = sessionProcs();
    for (const p of [...sess, ...descendants(sess.map((x) => x.pid), allProcs())]) signal(p.pid, 'SIGKILL');
    const lp = listenerPid();
    if (lp) signal(lp, 'SIGKILL');
    killRegistered(stateDir);
    if (!opts.keepTempDir) fs.rmSync(dir, { recursive: true, force: true });
  };
  exitCleanups.add(onExit);
  if (!exitHooked) {
    exitHooked = true;
    process.once('exit', () => {
      for (const f of exitCleanups) f();
    });
  }
  const api: FakeSshd = {
    host: '127.0.0.1',
    get port() {
      return port;
    },
    user: os.userInfo().username,
    privateKeyPath,
    privateKey,
    publicKey,
    hostKeySha256,
    hostPublicKey,
    stateDir,
    dir,
    configPath,
    get pid() {
      return listenerPid();
    },
    logs: () => log,
    dropSessions: async () => {
      const procs = sessionProcs();
      for (const p of procs) signal(p.pid, 'SIGCONT');
      let n = 0;
      for (const p of procs) if (signal(p.pid, 'SIGKILL')) n++;
      // wait until they are really gone (the kernel closes the sockets)
      const deadline = Date.now() + 2000;
      while (procs.some((p) => alive(p.pid, p.start)) && Date.now() < deadline) await delay(5);
      return n;
    },
    pauseSessions: () => signalSessions('SIGSTOP'),
    resumeSessions: () => signalSessions('SIGCONT'),
    restart: async () => {
      if (stopped) throw new Error('sshd was stopped');
      const lp = listenerPid();
      const conns = allProcs().filter((p) => p.ppid === lp);
      await stopListener();
      orphanedSessions = [...orphanedSessions, ...conns.map((p) => ({ pid: p.pid, start: p.start }))];
      await launch(port);
    },
    stop: async () => {
      if (stopped) return;
      stopped = true;
      exitCleanups.delete(onExit);
      // 1. everything running inside SSH sessions, and the session processes
      const sess = sessionProcs();
      const inSessions = descendants(sess.map((p) => p.pid), allProcs());
      await stopListener();
      for (const p of [...sess, ...inSessions]) signal(p.pid, 'SIGKILL');
      // 2. everything the stand-ins started on this machine (unit supervisors,
      //    workloads, guests): each was registered with its start time and
      //    leads its own session.
      killRegistered(stateDir);
      if (!opts.keepTempDir) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return api;
}

/** SIGKILL every process registered by the stand-ins in stateDir/pids, with its whole session. */
export function killRegistered(stateDir: string): number {
  let text = '';
  try {
    text = fs.readFileSync(path.join(stateDir, 'pids'), 'utf8');
  } catch {
    return 0;
  }
  // session id -> start time of its leader; members started no earlier
  const sids = new Map<number, number>();
  let n = 0;
  for (const line of text.split('\n')) {
    const [pidS, start] = line.split(' ');
    const pid = Number(pidS);
    if (!pid || !start) continue;
    sids.set(pid, Number(start));
    if (alive(pid, start) && signal(pid, 'SIGKILL')) n++;
  }
  if (sids.size) {
    for (const p of allProcs()) {
      const leaderStart = sids.get(p.sid);
      if (leaderStart !== undefined && Number(p.start) >= leaderStart && signal(p.pid, 'SIGKILL')) n++;
    }
  }
  return n;
}

// --- control hooks for the stand-ins (plain files in the state dir) ---------------
// Everything here can equally be done from inside an SSH session; these are
// conveniences for tests that hold the FakeSshd. See standins/README.md.

function writeOrRemove(file: string, content: string | null): void {
  if (content === null) {
    fs.rmSync(file, { force: true });
    return;
  }
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
}

export const standins = {
  /**
   * DHCP lease(s) `virsh domifaddr --source lease` reports for a running
   * domain: e.g. ['127.0.0.1/24']; [] = no lease yet (header only); null =
   * back to the default (the machine-wide default lease, else 127.0.0.1/24).
   * The domain must be defined (its directory exists from `virsh define` on).
   */
  setLease(stateDir: string, domain: string, addrs: string[] | null): void {
    writeOrRemove(path.join(stateDir, 'libvirt', 'domains', domain, 'lease'), addrs === null ? null : addrs.map((a) => `${a}\n`).join(''));
  },
  /** Lease for every domain without its own lease file (same values as setLease). */
  setDefaultLease(stateDir: string, addrs: string[] | null): void {
    writeOrRemove(path.join(stateDir, 'libvirt', 'default-lease'), addrs === null ? null : addrs.map((a) => `${a}\n`).join(''));
  },
  /**
   * Shell command the next started guests run (`bash -c`), e.g. a CPU burner
   * or `sleep 2` for a guest that powers itself off; null = idle forever.
   */
  setGuestCommand(stateDir: string, command: string | null): void {
    writeOrRemove(path.join(stateDir, 'libvirt', 'guest-command'), command === null ? null : `${command}\n`);
  },
  /** How long `systemctl stop` waits after SIGTERM before SIGKILL when the unit has no TimeoutStopSec= (default 5000). */
  setDefaultStopTimeoutMs(stateDir: string, ms: number | null): void {
    writeOrRemove(path.join(stateDir, 'systemd', 'default-stop-timeout-ms'), ms === null ? null : `${ms}\n`);
  },
  /** stdout+stderr of a unit's processes (its "journal"); '' if none yet. */
  unitLog(stateDir: string, unit: string): string {
    const name = unit.includes('.') ? unit : `${unit}.service`;
    try {
      return fs.readFileSync(path.join(stateDir, 'systemd', 'logs', `${name}.log`), 'utf8');
    } catch {
      return '';
    }
  },
};
