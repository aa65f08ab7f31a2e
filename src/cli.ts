import { existsSync } from "node:fs";
import path from "node:path";
import { ConfigError, loadConfig, resolveFromConfig } from "./config/load.js";
import { Almanac } from "./domain/index.js";
import { buildCard } from "./fleet/card.js";
import { Fleet } from "./fleet/fleet.js";
import { NotBuiltError } from "./backends/registry.js";
import type { CheckResult } from "./backends/backend.js";
import { readSecret } from "./config/secrets.js";
import { splitHostPort } from "./util/hostport.js";
import { fleetOrder } from "./config/schema.js";
import { systemClock } from "./util/clock.js";
import { Identity } from "./util/identity.js";
import { createLogger } from "./util/logger.js";
import { VERSION } from "./version.js";

const HELP = `compute-bridge ${VERSION}: sell compute on a compute market from many clouds at once.

Usage:
  compute-bridge run --config FILE [--log-level LEVEL]   run the daemon (logs: JSON lines on stdout)
  compute-bridge check-config FILE                       validate a boot TOML and print the card it would publish
  compute-bridge card --config FILE                      print the signed ProviderCard
  compute-bridge grants list [--state S] --config FILE   list grants (asks the running daemon)
  compute-bridge grants show ID --config FILE            one grant, with its ComputeLog when finished
  compute-bridge grants cancel ID --config FILE          cancel a grant
  compute-bridge doctor --config FILE                    check each backend's credentials and reachability
  compute-bridge --help | --version

Exit codes: 0 ok, 1 runtime error, 2 invalid config or usage.
`;

interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}
const stdio: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

function flag(args: string[], name: string): string | undefined {
  const i = args.findIndex((a) => a === name || a.startsWith(`${name}=`));
  if (i < 0) return undefined;
  const a = args[i]!;
  return a.includes("=") ? a.slice(a.indexOf("=") + 1) : args[i + 1];
}

class UsageError extends Error {}

export async function main(argv: string[], io: Io = stdio): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case undefined:
      case "--help":
      case "-h":
      case "help":
        io.out(HELP);
        return cmd === undefined ? 2 : 0;
      case "--version":
      case "-v":
        io.out(`${VERSION}\n`);
        return 0;
      case "check-config":
        return await checkConfig(rest[0] ?? flag(rest, "--config"), io);
      case "card":
        return await printCard(requireConfig(rest), io);
      case "run":
        return await run(requireConfig(rest), flag(rest, "--log-level"), io);
      case "grants":
        return await grants(rest, io);
      case "doctor":
        return await doctor(requireConfig(rest), io);
      case "verify-evidence": return await (await import("./attestation/cli.js")).verifyEvidenceCommand(rest, io);
      default:
        throw new UsageError(`unknown command "${cmd}"`);
    }
  } catch (e) {
    if (e instanceof ConfigError) {
      io.err(`${e.message}\n`);
      return 2;
    }
    if (e instanceof UsageError) {
      io.err(`compute-bridge: ${e.message}\n\n${HELP}`);
      return 2;
    }
    if (e instanceof NotBuiltError) {
      io.err(`compute-bridge: ${e.message}\n`);
      return 2;
    }
    io.err(`compute-bridge: ${(e as Error).message}\n`);
    return 1;
  }
}

function requireConfig(args: string[]): string {
  const f = flag(args, "--config");
  if (!f) throw new UsageError("--config FILE is required");
  return f;
}

/** Build the fleet from config alone (no daemon, no cloud calls) for check-config and card. */
async function offlineFleet(file: string, skipUnbuilt: boolean) {
  const loaded = loadConfig(file);
  const cfg = loaded.config;
  const log = createLogger("silent");
  const almanac = new Almanac(cfg.almanac.genesis, cfg.almanac.tick_seconds);
  const stateDir = resolveFromConfig(loaded, cfg.bridge.state_dir);
  const notBuilt: NotBuiltError[] = [];
  let effective = cfg;
  if (skipUnbuilt) {
    const { REGISTRY } = await import("./backends/registry.js");
    const missing = fleetOrder(cfg).filter((n) => REGISTRY[n] === null);
    notBuilt.push(...missing.map((n) => new NotBuiltError(n)));
    const backends = { ...cfg.backends };
    for (const n of missing) delete backends[n];
    effective = { ...cfg, backends, fleet: { ...cfg.fleet, order: fleetOrder(cfg).filter((n) => !missing.includes(n)) } };
  }
  const fleet = await Fleet.build(effective, { providerId: cfg.bridge.provider_id, stateDir, configDir: loaded.dir, log, clock: systemClock, almanac });
  return { loaded, cfg: effective, fleet, stateDir, notBuilt };
}

async function checkConfig(file: string | undefined, io: Io): Promise<number> {
  if (!file) throw new UsageError("check-config needs a FILE");
  const { cfg, fleet, stateDir, notBuilt } = await offlineFleet(file, true);
  const keyFile = path.join(stateDir, "identity.key");
  const identity = existsSync(keyFile) ? Identity.loadOrCreate(stateDir) : Identity.ephemeral();
  for (const e of notBuilt) io.err(`warning: ${e.message} (run would refuse this config)\n`);
  if (!existsSync(keyFile)) io.err(`note: no identity yet in ${stateDir}; the card below is signed with a throwaway key (run creates the real one)\n`);
  io.out(`${JSON.stringify(buildCard(cfg, fleet, identity), null, 2)}\n`);
  io.err(`config ok: ${path.resolve(file)}\n`);
  return 0;
}

async function printCard(file: string, io: Io): Promise<number> {
  const { cfg, fleet, stateDir } = await offlineFleet(file, false);
  io.out(`${JSON.stringify(buildCard(cfg, fleet, Identity.loadOrCreate(stateDir)), null, 2)}\n`);
  return 0;
}

async function run(file: string, logLevel: string | undefined, io: Io): Promise<number> {
  const { startDaemon } = await import("./daemon.js");
  const d = await startDaemon({ configFile: file, ...(logLevel ? { logLevel } : {}) });
  io.err(`compute-bridge listening on ${d.url} (provider ${d.config.bridge.provider_id}; backends: ${d.fleet.backends.map((b) => b.name).join(", ")})\n`);
  return await new Promise<number>((resolve) => {
    let stopping = false;
    /** Close within 10 s and exit with `code` (1 whatever the reason if closing fails). */
    const stop = (why: Record<string, string>, code: 0 | 1) => {
      if (stopping) return;
      stopping = true;
      d.log.info(why, "shutting down");
      const hard = setTimeout(() => {
        d.log.error("graceful shutdown took longer than 10 s; exiting");
        resolve(1);
      }, 10_000);
      hard.unref();
      d.close().then(
        () => {
          clearTimeout(hard);
          resolve(code);
        },
        (e) => {
          d.log.error({ err: e }, "shutdown failed");
          resolve(1);
        },
      );
    };
    process.once("SIGTERM", () => stop({ signal: "SIGTERM" }, 0));
    process.once("SIGINT", () => stop({ signal: "SIGINT" }, 0));
    // The state database can no longer be written (logged as fatal): exit non-zero to be restarted.
    void d.failed.then(() => stop({ reason: "state database failure" }, 1));
  });
}

/** Talk to the running daemon's listener, with the token from its config. */
async function grants(args: string[], io: Io): Promise<number> {
  const [sub, id] = args;
  const file = requireConfig(args);
  const loaded = loadConfig(file);
  const cfg = loaded.config;
  const token = readSecret(loaded.dir, "listener.token", { file: cfg.listener.token_file, env: cfg.listener.token_env });
  let [host, port] = splitHostPort(cfg.listener.bind);
  if (host === "0.0.0.0" || host === "::") host = "127.0.0.1";
  const base = `${cfg.listener.tls_cert_file ? "https" : "http"}://${host.includes(":") ? `[${host}]` : host}:${port}`;
  const req = async (method: string, p: string) => {
    let res: Response;
    try {
      res = await fetch(base + p, { method, headers: { authorization: `Bearer ${token}` } });
    } catch (e) {
      throw new Error(`cannot reach the daemon at ${base}: ${(e as Error).cause ? String((e as { cause: Error }).cause.message) : (e as Error).message}`);
    }
    const body = (await res.json().catch(() => null)) as Record<string, unknown> | null;
    return { status: res.status, body };
  };
  const needId = () => {
    if (!id || id.startsWith("--")) throw new UsageError(`grants ${sub} needs a request id`);
    return encodeURIComponent(id);
  };
  switch (sub) {
    case "list": {
      const state = flag(args, "--state");
      let after = 0;
      const rows: string[][] = [["REQUEST_ID", "STATE", "BACKEND", "INSTANCE", "UPDATED"]];
      for (;;) {
        const r = await req("GET", `/v1/grants?limit=500&after=${after}${state ? `&state=${encodeURIComponent(state)}` : ""}`);
        if (r.status !== 200) return report(r, io);
        const page = r.body as { grants: { request_id: string; state: string; backend: string | null; instance: { instance_id: string } | null; updated_at: string }[]; next_after: number | null };
        for (const g of page.grants) rows.push([g.request_id, g.state, g.backend ?? "-", g.instance?.instance_id ?? "-", g.updated_at]);
        if (page.next_after === null) break;
        after = page.next_after;
      }
      io.out(formatTable(rows));
      return 0;
    }
    case "show": {
      const r = await req("GET", `/v1/grants/${needId()}`);
      if (r.status !== 200) return report(r, io);
      const { private_key: _omit, ...view } = r.body as Record<string, unknown>;
      const log = await req("GET", `/v1/grants/${needId()}/log`);
      io.out(`${JSON.stringify({ ...view, ...(log.status === 200 ? { compute_log: log.body } : {}) }, null, 2)}\n`);
      return 0;
    }
    case "cancel": {
      const r = await req("DELETE", `/v1/grants/${needId()}`);
      if (r.status !== 200 && r.status !== 202) return report(r, io);
      io.out(`${id}: ${(r.body as { state: string }).state}${r.status === 202 ? " (cancelling)" : ""}\n`);
      return 0;
    }
    default:
      throw new UsageError("grants needs list, show ID or cancel ID");
  }
}

function report(r: { status: number; body: Record<string, unknown> | null }, io: Io): number {
  io.err(`compute-bridge: the daemon answered ${r.status}: ${String(r.body?.message ?? r.body?.error ?? "")}\n`);
  return 1;
}

function formatTable(rows: string[][]): string {
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd()).join("\n") + "\n";
}

/** Read-only checks of every configured backend: credentials, reachability, tools. */
async function doctor(file: string, io: Io): Promise<number> {
  const { loaded, cfg, fleet, notBuilt } = await offlineFleet(file, true);
  const rows: string[][] = [["BACKEND", "CHECK", "RESULT", "DETAIL"]];
  let failed = notBuilt.length > 0;
  for (const e of notBuilt) rows.push([e.backend, "built", "FAIL", "not built in this version"]);
  try {
    readSecret(loaded.dir, "listener.token", { file: cfg.listener.token_file, env: cfg.listener.token_env });
    rows.push(["listener", "token readable", "ok", ""]);
  } catch (e) {
    failed = true;
    rows.push(["listener", "token readable", "FAIL", (e as Error).message]);
  }
  for (const b of fleet.backends) {
    if (!b.check) {
      rows.push([b.name, "checks", "skip", "this backend has no read-only checks"]);
      continue;
    }
    let results: CheckResult[];
    try {
      results = await b.check();
    } catch (e) {
      results = [{ check: "checks ran", ok: false, detail: (e as Error).message }];
    }
    for (const r of results) {
      if (!r.ok) failed = true;
      rows.push([b.name, r.check, r.ok ? "ok" : "FAIL", r.detail]);
    }
  }
  await fleet.close();
  io.out(formatTable(rows));
  return failed ? 1 : 0;
}
