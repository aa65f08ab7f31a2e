/**
 * One persistent SSH connection per bare-metal machine (ssh2), shared by every grant on it.
 *
 * - The host key is pinned: the verifier compares `SHA256:<base64 without '='>` of the offered key
 *   (what `ssh-keygen -lf` prints) with the configured `host_key_sha256`. A mismatch refuses the
 *   machine (state "refused"): no authentication is attempted, nothing is trusted on first use,
 *   and it is not retried in the background; `probe()` (reconcile, about every minute) tries again.
 * - Keepalives detect a silent peer; a dropped connection is re-opened in the background with
 *   capped exponential backoff and jitter, for as long as the pool is open.
 * - At most `maxChannels` channels are open at once per connection (OpenSSH's MaxSessions defaults
 *   to 10 and refuses the 11th); further commands queue. If the server refuses a channel anyway
 *   (a lower MaxSessions), the limit adapts down and the command waits for a free slot.
 * - `exec()` runs one command with a timeout. A command cut off by a dropped connection is retried
 *   after the reconnect when the caller marks it idempotent (bounded), else it fails with a
 *   TransientError. Workloads never live in a channel: every command here is short.
 *
 * The private key is read from disk at each connect and never logged or put in an error.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import ssh2 from "ssh2";
import type { Client as SshClient, ClientChannel, ConnectConfig } from "ssh2";
import { abortError, type Clock } from "../../util/clock.js";
import type { Logger } from "../../util/logger.js";
import { BackendError, CredentialError, TransientError, type BackendMetrics } from "../backend.js";

const { Client } = ssh2;

export type MachineState = "idle" | "connecting" | "up" | "down" | "refused";

export interface ExecResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  /** Label for metrics and errors ("systemctl show", "provision", ...). Never the command itself. */
  op: string;
  /** Bound on the command once its channel is open. */
  timeoutMs: number;
  /** Sent on the channel's stdin, which is then closed. Stdin is always closed. */
  stdin?: string;
  signal?: AbortSignal;
  /** Safe to run again if the connection dropped mid-command: retried after the reconnect. */
  idempotent?: boolean;
  /** Bound on the wait for a connection (default: the pool's connectWaitMs). */
  connectWaitMs?: number;
  /** Largest stdout kept (bytes); more fails the command. Default 8 MiB. */
  maxStdout?: number;
  /**
   * A command that may hold its channel for minutes (an image download). Long commands never take
   * the last two slots, so status polls and terminates keep flowing behind them.
   */
  long?: boolean;
}

export interface PoolOptions {
  backend: string;
  keepaliveIntervalMs: number;
  keepaliveCountMax: number;
  connectTimeoutMs: number;
  maxChannels: number;
  /** First reconnect delay and the cap of the exponential backoff. */
  reconnectBaseMs: number;
  reconnectCapMs: number;
  /** How long exec() waits for a machine that is (re)connecting. */
  connectWaitMs: number;
  clock: Clock;
  log: Logger;
  metrics?: BackendMetrics;
  random?: () => number;
}

export interface SshTarget {
  name: string;
  host: string;
  port: number;
  user: string;
  /** Absolute path of the private key file. */
  privateKeyPath: string;
  hostKeySha256: string;
}

/** A connection dropped (or was never there) while a command ran: maybe retryable. */
class ConnectionLost extends Error {
  override name = "ConnectionLost";
}
/** The server refused to open a channel although the connection is up (MaxSessions). */
class ChannelRefused extends Error {
  override name = "ChannelRefused";
}

/** The server offered another host key than the pinned one. */
export class HostKeyMismatchError extends CredentialError {}

/** OpenSSH's SHA256 fingerprint of a public key blob, as `ssh-keygen -lf` prints it. */
export function sha256Fingerprint(key: Buffer): string {
  return "SHA256:" + createHash("sha256").update(key).digest("base64").replace(/=+$/, "");
}

const MAX_STDERR = 64 * 1024;
const DEFAULT_MAX_STDOUT = 8 * 1024 * 1024;
const EXEC_RETRIES = 3;
const CHANNEL_REFUSED_RETRIES = 20;

/** Printable, single-line, bounded: for error messages built from remote output. */
export function clip(s: string, max = 400): string {
  const one = s.replace(/[\r\n\t]+/g, " ").replace(/[^\x20-\x7e]/g, "?").trim();
  return one.length > max ? `${one.slice(0, max)}...` : one;
}

export class SshConnection {
  state: MachineState = "idle";
  /** Coarse reason for the card: never an address or a remote message. */
  reason: "" | "unreachable" | "host_key_mismatch" | "auth_failed" | "private_key" = "";
  lastError: string | null = null;
  stateSince: number;
  /** Highest number of channels open at once (diagnostics). */
  peakChannels = 0;
  private client: SshClient | null = null;
  private connecting: Promise<void> | null = null;
  private failures = 0;
  private timer: NodeJS.Timeout | null = null;
  private active = 0;
  private activeLong = 0;
  /** Commands whose channel the server refused and that still hold their slot. */
  private refusing = 0;
  /** Channels open now, and the most the server has had open at once on this connection. */
  private openNow = 0;
  private maxOpenSeen = 0;
  private limit: number;
  private readonly queue: Array<{ long: boolean; grant: () => void }> = [];
  private readonly waiters = new Set<() => void>();
  private closed = false;

  constructor(
    readonly target: SshTarget,
    private readonly o: PoolOptions,
  ) {
    this.limit = Math.max(1, o.maxChannels);
    this.stateSince = o.clock.now();
  }

  /** Worth placing work on: up, never tried yet, or on its first connect attempt. */
  get usable(): boolean {
    return this.state === "up" || this.state === "idle" || (this.state === "connecting" && this.failures === 0);
  }

  /** The state for the card: a machine retrying after failures stays "down" between attempts. */
  get publicState(): MachineState {
    if (this.state !== "connecting" || this.failures === 0) return this.state;
    return this.reason === "host_key_mismatch" ? "refused" : "down";
  }

  get channelsInUse(): number {
    return this.active;
  }
  get queued(): number {
    return this.queue.length;
  }
  get channelLimit(): number {
    return this.limit;
  }

  /** Connect now if idle or down (not while a backoff timer runs, unless `force`). */
  probe(force = false): Promise<void> {
    if (this.closed || this.state === "up") return Promise.resolve();
    if (this.connecting) return this.connecting;
    if (this.timer && !force) return Promise.resolve();
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    return this.connect();
  }

  /** Run one command. Rejects with TransientError (drop, timeout, unreachable), HostKeyMismatchError, or an AbortError. */
  async exec(command: string, o: ExecOptions): Promise<ExecResult> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.execOnce(command, o);
      } catch (e) {
        if (e instanceof ConnectionLost) {
          this.o.metrics?.apiCall(this.o.backend, o.op, "connection_lost");
          if (o.idempotent && attempt < EXEC_RETRIES && !o.signal?.aborted && !this.closed) {
            this.o.metrics?.retry(this.o.backend, o.op);
            this.o.log.warn({ machine: this.target.name, op: o.op, attempt: attempt + 1 }, "ssh connection dropped during a command; retrying after the reconnect");
            continue;
          }
          throw new TransientError(`machine ${this.target.name}: the SSH connection dropped during ${o.op}`, this.o.backend, { cause: e });
        }
        throw e;
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const c = this.client;
    this.client = null;
    this.setState("down", "closed");
    for (const w of this.queue.splice(0)) w.grant();
    this.notify();
    if (c) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          c.destroy();
          resolve();
        }, 1000);
        t.unref();
        c.once("close", () => {
          clearTimeout(t);
          resolve();
        });
        c.end();
      });
    }
  }

  // ---- connection management ------------------------------------------------------------------

  private connect(): Promise<void> {
    if (this.connecting) return this.connecting;
    if (this.state !== "up") this.setState("connecting", this.lastError);
    this.connecting = new Promise<void>((resolve) => {
      let privateKey: Buffer;
      try {
        privateKey = this.loadKey();
      } catch (e) {
        this.failed((e as Error).message, "private_key");
        resolve();
        return;
      }
      const c = new Client();
      let mismatch: string | null = null;
      let settled = false;
      const settle = (err: string | null, reason: SshConnection["reason"] = "unreachable") => {
        if (settled) return;
        settled = true;
        if (err === null) {
          this.client = c;
          this.failures = 0;
          // A new connection may allow more sessions than the last one did (sshd reconfigured).
          this.limit = Math.max(1, this.o.maxChannels);
          this.openNow = 0;
          this.maxOpenSeen = 0;
          this.setState("up", null);
          this.o.log.info({ machine: this.target.name }, "ssh session up");
          this.o.metrics?.sshSession(this.o.backend, this.target.name, true);
        } else {
          c.removeAllListeners("ready");
          c.destroy();
          this.failed(err, reason);
        }
        resolve();
      };
      c.on("ready", () => {
        if (this.closed) {
          settled = true;
          c.end();
          resolve();
          return;
        }
        settle(null);
      });
      c.on("error", (e: Error & { level?: string }) => {
        if (!settled) {
          if (mismatch) return settle(mismatch, "host_key_mismatch");
          if (e.level === "client-authentication")
            return settle(`authentication as ${this.target.user} was refused (is the public key of private_key_file in authorized_keys?)`, "auth_failed");
          return settle(describeSshError(e));
        }
        this.lastError = describeSshError(e);
      });
      c.on("close", () => {
        if (!settled) return settle(mismatch ?? "connection closed during the SSH handshake", mismatch ? "host_key_mismatch" : "unreachable");
        if (this.client === c) this.dropped();
      });
      const cfg: ConnectConfig = {
        host: this.target.host,
        port: this.target.port,
        username: this.target.user,
        privateKey,
        readyTimeout: this.o.connectTimeoutMs,
        keepaliveInterval: this.o.keepaliveIntervalMs,
        keepaliveCountMax: this.o.keepaliveCountMax,
        hostVerifier: (key: Buffer) => {
          const fp = sha256Fingerprint(key);
          if (fp === this.target.hostKeySha256) return true;
          mismatch = `host key mismatch: the server offered ${fp}, the pinned host_key_sha256 is ${this.target.hostKeySha256}; refusing the machine (if it was reinstalled, verify its new key out of band and update host_key_sha256)`;
          return false;
        },
      };
      try {
        c.connect(cfg);
      } catch (e) {
        settle(`cannot connect: ${(e as Error).message}`);
      }
    }).finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private loadKey(): Buffer {
    let buf: Buffer;
    try {
      buf = readFileSync(this.target.privateKeyPath);
    } catch (e) {
      throw new Error(`cannot read private_key_file ${this.target.privateKeyPath}: ${(e as NodeJS.ErrnoException).code ?? "error"}`);
    }
    const parsed = ssh2.utils.parseKey(buf);
    if (parsed instanceof Error) throw new Error(`private_key_file ${this.target.privateKeyPath} is not a usable private key (${clip(parsed.message, 120)})`);
    return buf;
  }

  private failed(message: string, reason: SshConnection["reason"]): void {
    this.failures++;
    this.lastError = message;
    this.setState(reason === "host_key_mismatch" ? "refused" : "down", message, reason);
    this.o.metrics?.sshSession(this.o.backend, this.target.name, false);
    this.o.log.warn({ machine: this.target.name, err: { message }, failures: this.failures }, reason === "host_key_mismatch" ? "machine refused: host key mismatch" : "ssh connect failed");
    if (reason !== "host_key_mismatch") this.scheduleReconnect();
  }

  private dropped(): void {
    this.client = null;
    this.failures++;
    this.setState("down", this.lastError ?? "connection closed", "unreachable");
    this.o.metrics?.sshSession(this.o.backend, this.target.name, false);
    this.o.log.warn({ machine: this.target.name, err: { message: this.lastError ?? "connection closed" } }, "ssh session dropped; reconnecting");
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closed || this.timer) return;
    const exp = Math.min(this.o.reconnectCapMs, this.o.reconnectBaseMs * 2 ** Math.min(this.failures - 1, 20));
    // "Equal jitter": at least half the backoff, so a flapping host is never hammered.
    const delay = Math.floor(exp / 2 + (this.o.random ?? Math.random)() * (exp / 2));
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.closed) void this.connect();
    }, delay);
    this.timer.unref();
  }

  private setState(s: MachineState, err: string | null, reason: SshConnection["reason"] = ""): void {
    if (s !== this.state) this.stateSince = this.o.clock.now();
    this.state = s;
    if (s === "up") {
      this.lastError = null;
      this.reason = "";
    } else if (err !== null) {
      this.lastError = err;
      if (reason) this.reason = reason;
    }
    this.notify();
  }

  private notify(): void {
    for (const w of [...this.waiters]) w();
  }

  /** The connected client, waiting (bounded) for a connect or reconnect. */
  private async ready(waitMs: number, signal?: AbortSignal): Promise<SshClient> {
    const deadline = this.o.clock.now() + waitMs;
    for (;;) {
      if (signal?.aborted) throw abortError(signal);
      if (this.closed) throw new BackendError(`machine ${this.target.name}: the SSH pool is closed`, this.o.backend);
      if (this.state === "up" && this.client) return this.client;
      if (this.state === "refused") throw new HostKeyMismatchError(`machine ${this.target.name}: ${this.lastError}`, this.o.backend);
      if (this.state === "idle" || (!this.connecting && !this.timer)) void this.connect();
      const left = deadline - this.o.clock.now();
      if (left <= 0) throw new TransientError(`machine ${this.target.name} is unreachable over SSH: ${this.lastError ?? "not connected"}`, this.o.backend);
      await this.waitChange(left, signal);
    }
  }

  private waitChange(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(t);
        this.waiters.delete(done);
        signal?.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = () => {
        clearTimeout(t);
        this.waiters.delete(done);
        reject(abortError(signal!));
      };
      const t = setTimeout(done, ms);
      this.waiters.add(done);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  // ---- channels -------------------------------------------------------------------------------

  private canTake(long: boolean): boolean {
    if (this.active >= this.limit) return false;
    return !long || this.activeLong < Math.max(1, this.limit - 2);
  }

  private take(long: boolean): void {
    this.active++;
    if (long) this.activeLong++;
    if (this.active > this.peakChannels) this.peakChannels = this.active;
  }

  private acquire(long: boolean, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    // Whatever waits in the queue cannot take a slot now (release() grants all that fit), so a
    // command that fits never overtakes one of its own kind: FIFO per kind.
    if (this.canTake(long)) {
      this.take(long);
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const entry = {
        long,
        grant: () => {
          signal?.removeEventListener("abort", onAbort);
          if (this.closed) return reject(new BackendError(`machine ${this.target.name}: the SSH pool is closed`, this.o.backend));
          this.take(long);
          resolve();
        },
      };
      const onAbort = () => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) this.queue.splice(i, 1);
        reject(abortError(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.queue.push(entry);
    });
  }

  private release(long: boolean): void {
    this.active--;
    if (long) this.activeLong--;
    // FIFO, except that a long command waiting for a long slot does not block short ones behind it.
    for (let i = 0; i < this.queue.length && this.active < this.limit; ) {
      const e = this.queue[i]!;
      if (this.canTake(e.long)) {
        this.queue.splice(i, 1);
        e.grant();
      } else i++;
    }
  }

  private async execOnce(command: string, o: ExecOptions): Promise<ExecResult> {
    const long = o.long ?? false;
    for (let refused = 0; ; refused++) {
      let wasRefused = false;
      await this.acquire(long, o.signal);
      try {
        const client = await this.ready(o.connectWaitMs ?? this.o.connectWaitMs, o.signal);
        const t0 = this.o.clock.now();
        const r = await this.run(client, command, o);
        this.o.metrics?.apiCall(this.o.backend, o.op, r.code === 0 ? "ok" : `exit_${r.code ?? r.signal ?? "unknown"}`);
        if (this.o.clock.now() - t0 > 10_000) this.o.log.debug({ machine: this.target.name, op: o.op, ms: this.o.clock.now() - t0 }, "slow remote command");
        return r;
      } catch (e) {
        if (e instanceof ChannelRefused) wasRefused = true;
        if (!(e instanceof ChannelRefused) || refused >= CHANNEL_REFUSED_RETRIES) {
          if (e instanceof ChannelRefused) throw new TransientError(`machine ${this.target.name}: the server keeps refusing new SSH channels (${e.message})`, this.o.backend);
          throw e;
        }
        // The server allows fewer sessions than we thought: about as many as are in flight and not
        // being refused, never fewer than it has granted at once (a closed session is freed on the
        // server a moment later). Only ever lowered; a reconnect starts from the config again.
        const newLimit = Math.max(1, this.maxOpenSeen, this.active - this.refusing);
        if (newLimit < this.limit) {
          this.o.log.warn({ machine: this.target.name, limit: newLimit }, "the server refused an SSH channel: lowering the per-connection channel limit (check sshd MaxSessions)");
          this.limit = newLimit;
        }
      } finally {
        if (wasRefused) this.refusing--;
        this.release(long);
      }
      await this.o.clock.sleep(20 * (refused + 1), o.signal);
    }
  }

  private run(client: SshClient, command: string, o: ExecOptions): Promise<ExecResult> {
    const maxStdout = o.maxStdout ?? DEFAULT_MAX_STDOUT;
    return new Promise<ExecResult>((resolve, reject) => {
      let ch: ClientChannel | null = null;
      let finished = false;
      const out: Buffer[] = [];
      let outLen = 0;
      let err = "";
      let code: number | null | undefined;
      let sig: string | null = null;
      const finish = (e: Error | null) => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        o.signal?.removeEventListener("abort", onAbort);
        if (e) {
          try {
            ch?.close();
          } catch {
            /* already gone */
          }
          return reject(e);
        }
        resolve({ code: code ?? null, signal: sig, stdout: Buffer.concat(out).toString("utf8"), stderr: err });
      };
      const onAbort = () => finish(abortError(o.signal!));
      const timer = setTimeout(() => {
        this.o.metrics?.apiCall(this.o.backend, o.op, "timeout");
        finish(new TransientError(`machine ${this.target.name}: ${o.op} did not finish within ${Math.round(o.timeoutMs / 1000)} s`, this.o.backend));
      }, o.timeoutMs);
      timer.unref();
      o.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        client.exec(command, (e, stream) => {
          if (e) {
            if (finished) return;
            const up = this.client === client && this.state === "up";
            if (up && /open fail/i.test(e.message)) {
              this.refusing++;
              return finish(new ChannelRefused(e.message));
            }
            return finish(new ConnectionLost(e.message));
          }
          ch = stream;
          if (finished) {
            stream.close();
            return;
          }
          if (this.client === client) {
            this.openNow++;
            if (this.openNow > this.maxOpenSeen) this.maxOpenSeen = this.openNow;
            stream.once("close", () => {
              if (this.client === client) this.openNow--;
            });
          }

          stream.on("data", (d: Buffer) => {
            outLen += d.length;
            if (outLen > maxStdout) return finish(new BackendError(`machine ${this.target.name}: ${o.op} printed more than ${maxStdout} bytes`, this.o.backend));
            out.push(d);
          });
          stream.stderr.on("data", (d: Buffer) => {
            err = (err + d.toString("utf8")).slice(-MAX_STDERR);
          });
          stream.on("exit", (c: number | null, s?: string) => {
            code = c;
            sig = s ?? null;
          });
          stream.on("error", () => {
            /* surfaced through close */
          });
          stream.on("close", () => {
            if (code === undefined && sig === null) return finish(new ConnectionLost("the channel closed without an exit status"));
            finish(null);
          });
          if (o.stdin !== undefined) stream.end(o.stdin);
          else stream.end();
        });
      } catch (e) {
        finish(new ConnectionLost((e as Error).message));
      }
    });
  }
}

function describeSshError(e: Error & { level?: string; code?: string }): string {
  if (e.code) return `${e.code}${e.message && !e.message.includes(e.code) ? ` (${clip(e.message, 120)})` : ""}`;
  return clip(e.message || String(e), 200);
}
