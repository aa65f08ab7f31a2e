import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import pg from "pg";

// A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, the server on 127.0.0.1 on
// a free port (and a socket in the temp dir), password authentication over TCP, `fsync=off`
// (`{ durable: true }`: fsync and full-page writes on, as in production, for benchmarks).
// One cluster per test file (startPostgres is memoized); each test takes its own database.
//
// The server always stops: `stop()` (registered with t.after / after by the callers), a process
// exit hook, and, should this process be killed outright, the shell wrapper the server runs under,
// which stops it as soon as its stdin (a pipe from this process) closes.
//
// initdb refuses to run as root: as root the cluster runs as the `postgres` user Debian's package
// creates (the temp dir is handed to it); otherwise as the current user.

export const PG_USER = "cb";
export const PG_PASSWORD = "cb-test-pw-0c1d2e3f";

export interface PgCluster {
  port: number;
  /** The URL of `database` (with the password). */
  url(database: string): string;
  /** A new empty database; returns its URL. */
  createDatabase(): Promise<string>;
  /** Run SQL as the cluster's superuser on `database`. */
  query<R extends pg.QueryResultRow = pg.QueryResultRow>(database: string, sql: string, params?: unknown[]): Promise<R[]>;
  /** Fast shutdown, `downMs` without a server, then up again on the same port (a database restart). */
  restart(downMs?: number): Promise<void>;
  stop(): Promise<void>;
}

/** Where the PostgreSQL binaries are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin. */
export function postgresBinDir(): string | null {
  for (const dir of (process.env["PATH"] ?? "").split(":")) if (dir && existsSync(path.join(dir, "initdb")) && existsSync(path.join(dir, "postgres"))) return dir;
  const root = "/usr/lib/postgresql";
  if (!existsSync(root)) return null;
  const versions = readdirSync(root).filter((v) => existsSync(path.join(root, v, "bin", "initdb"))).sort((a, b) => Number(b) - Number(a));
  return versions[0] ? path.join(root, versions[0], "bin") : null;
}

const MISSING = "PostgreSQL is not installed: Debian's package `postgresql` (scripts/test-deps.sh installs it as root; otherwise: sudo apt-get install -y postgresql)";

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

function runAs(): { uid: number; gid: number } | null {
  if (process.getuid?.() !== 0) return null;
  try {
    const uid = Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" }).trim());
    const gid = Number(execFileSync("id", ["-g", "postgres"], { encoding: "utf8" }).trim());
    return { uid, gid };
  } catch {
    throw new Error("running as root, and there is no `postgres` user to run the test cluster as (initdb refuses root): install Debian's package postgresql");
  }
}

let started: Promise<PgCluster> | null = null;
let startedDurable = false;

/**
 * The test file's cluster, started on first use. `durable`: commits are flushed to disk (fsync,
 * full_page_writes), as a production server does; by default they are not (tests run faster).
 */
export function startPostgres(o: { durable?: boolean } = {}): Promise<PgCluster> {
  const durable = o.durable ?? false;
  if (started && durable !== startedDurable) return Promise.reject(new Error(`the cluster is already running with fsync ${startedDurable ? "on" : "off"}`));
  startedDurable = durable;
  return (started ??= start(durable));
}

async function start(durable: boolean): Promise<PgCluster> {
  const bin = postgresBinDir();
  if (!bin) throw new Error(MISSING);
  const owner = runAs();
  const base = mkdtempSync(path.join(os.tmpdir(), "cb-pg-"));
  const data = path.join(base, "data");
  if (owner) chownSync(base, owner.uid, owner.gid);
  const as = owner ? { uid: owner.uid, gid: owner.gid } : {};
  const pwfile = path.join(base, "pw");
  writeFileSync(pwfile, `${PG_PASSWORD}\n`, { mode: 0o600 });
  if (owner) chownSync(pwfile, owner.uid, owner.gid);
  execFileSync(path.join(bin, "initdb"), ["-D", data, "-U", PG_USER, `--pwfile=${pwfile}`, "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], { stdio: "pipe", cwd: base, ...as });

  let child: ChildProcess | null = null;
  let port = 0;
  const logFile = path.join(base, "postgres.log");
  const killNow = () => {
    // The postmaster (its pid file's first line): SIGQUIT, immediate shutdown of it and its children.
    try {
      const pid = Number(readFileSync(path.join(data, "postmaster.pid"), "utf8").split("\n")[0]);
      if (pid > 0) process.kill(pid, "SIGQUIT");
    } catch {
      /* not running */
    }
    child?.kill("SIGKILL");
  };
  const onExit = () => {
    killNow();
    rmSync(base, { recursive: true, force: true });
  };
  process.on("exit", onExit);

  /** Start the server on `port` (a free one when 0); false if it did not come up. */
  const launch = async (on: number): Promise<boolean> => {
    port = on || (await freePort());
    const out = openSync(logFile, "a");
    // The wrapper: the server in the background; when stdin closes (stop(), or this process gone),
    // a fast shutdown (SIGINT), waited for.
    child = spawn(
      "sh",
      ["-c", '"$@" & pid=$!; cat >/dev/null; kill -INT "$pid" 2>/dev/null; wait "$pid"', "sh", path.join(bin, "postgres"), "-D", data, "-p", String(port), "-k", base, "-c", "listen_addresses=127.0.0.1", ...(durable ? [] : ["-c", "fsync=off", "-c", "full_page_writes=off"]), "-c", "max_connections=200", "-c", "shared_buffers=16MB"],
      { stdio: ["pipe", out, out], cwd: base, ...as },
    );
    const exited = new Promise<number | null>((r) => child!.once("exit", (code) => r(code)));
    if (await waitReady(port, exited)) return true;
    child.stdin?.end();
    child.kill("SIGKILL");
    return false;
  };
  /** Fast shutdown (SIGINT to the postmaster through the wrapper), waited for. */
  const shutdown = async () => {
    const c = child!;
    if (c.exitCode !== null || c.signalCode !== null) return;
    const gone = new Promise<void>((r) => c.once("exit", () => r()));
    c.stdin?.end();
    const timer = setTimeout(killNow, 10_000);
    await gone;
    clearTimeout(timer);
  };
  const up = async (on: number) => {
    for (let attempt = 1; !(await launch(on)); attempt++)
      if (attempt >= 3) throw new Error(`the test PostgreSQL did not start; its log:\n${readFileSync(logFile, "utf8").slice(-4000)}`);
  };
  await up(0);

  const url = (database: string) => `postgres://${PG_USER}:${encodeURIComponent(PG_PASSWORD)}@127.0.0.1:${port}/${database}`;
  let n = 0;
  const query = async <R extends pg.QueryResultRow>(database: string, sql: string, params: unknown[] = []): Promise<R[]> => {
    const c = new pg.Client({ connectionString: url(database) });
    await c.connect();
    try {
      return (await c.query<R>(sql, params)).rows;
    } finally {
      await c.end();
    }
  };
  let stopping: Promise<void> | null = null;
  return {
    port,
    url,
    query,
    async createDatabase() {
      const name = `t${process.pid}_${++n}`;
      await query("postgres", `CREATE DATABASE ${name}`);
      return url(name);
    },
    async restart(downMs = 0) {
      await shutdown();
      // The outage lasts this long (a restart's length in real life), then the same port again.
      if (downMs > 0) await new Promise((r) => setTimeout(r, downMs));
      await up(port);
    },
    stop: () =>
      (stopping ??= (async () => {
        await shutdown();
        process.off("exit", onExit);
        rmSync(base, { recursive: true, force: true });
      })()),
  };
}

/** Until the server accepts a connection (true), or its process ended (false). */
async function waitReady(port: number, exited: Promise<number | null>): Promise<boolean> {
  let done = false;
  void exited.then(() => (done = true));
  const deadline = Date.now() + 30_000;
  while (!done && Date.now() < deadline) {
    const c = new pg.Client({ host: "127.0.0.1", port, user: PG_USER, password: PG_PASSWORD, database: "postgres", connectionTimeoutMillis: 2000 });
    try {
      await c.connect();
      await c.end();
      return true;
    } catch {
      await c.end().catch(() => undefined);
      // Polling a condition (the server accepting connections): there is nothing to wait on instead.
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return false;
}

/** Stop the test file's cluster if one was started. */
export async function stopPostgres(): Promise<void> {
  if (!started) return;
  const c = await started.catch(() => null);
  started = null;
  await c?.stop();
}
