import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { ConfigError, loadConfig, resolveFromConfig } from "./config/load.js";
import { Almanac, GrantState } from "./domain/index.js";
import { buildCard } from "./fleet/card.js";
import { Fleet } from "./fleet/fleet.js";
import { pricingRows } from "./fleet/spend.js";
import { NotBuiltError } from "./backends/registry.js";
import type { CheckResult } from "./backends/backend.js";
import { readSecret } from "./config/secrets.js";
import { checkStore } from "./store/check.js";
import { splitHostPort } from "./util/hostport.js";
import { fleetOrder, LogConfig } from "./config/schema.js";
import { systemClock } from "./util/clock.js";
import { Identity, verifySignedDoc } from "./util/identity.js";
import { createLogger } from "./util/logger.js";
import { VERSION } from "./version.js";

/** Where `--config` points when neither the flag nor COMPUTE_BRIDGE_CONFIG is given. */
export const DEFAULT_CONFIG = "/etc/compute-bridge/bridge.toml";

/** Exit codes every command honours (documented in --help and docs/operations.md). */
export const EXIT = {
  /** Done; for check commands: every check passed. */
  ok: 0,
  /** A runtime error, a failed check (doctor, verify-log), the daemon refused or failed (listen error, state database). */
  failure: 1,
  /** Usage error (unknown command or flag, bad flag value) or an invalid config file. */
  usage: 2,
} as const;

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}
const stdio: Io = { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) };

export class UsageError extends Error {}

interface Command {
  /** One line for the command list in --help. */
  summary: string;
  run: (argv: string[], io: Io) => Promise<number>;
}

/**
 * The command table. A command gets its own arguments (after the command name) and answers with
 * an exit code; adding one is one line here.
 */
const COMMANDS: Record<string, Command> = {
  run: { summary: "run the daemon (logs: JSON lines on stdout)", run: (a, io) => runCommand(a, io) },
  "check-config": { summary: "validate a boot TOML and print the card it would publish", run: (a, io) => checkConfig(a, io) },
  card: { summary: "print the signed ProviderCard", run: (a, io) => printCard(a, io) },
  grants: { summary: "list, show or cancel grants (asks the running daemon)", run: (a, io) => grants(a, io) },
  doctor: { summary: "check each backend's credentials and reachability", run: (a, io) => doctor(a, io) },
  healthcheck: { summary: "probe the running daemon's /healthz (or /readyz) for container health checks", run: (a, io) => healthcheck(a, io) },
  "verify-log": { summary: "verify ComputeLog signatures against a ProviderCard", run: (a, io) => verifyLog(a, io) },
  "verify-evidence": { summary: "check a TDX grant's attestation evidence offline (quote, signatures, PCK chain, nonce binding)", run: async (a, io) => (await import("./attestation/cli.js")).verifyEvidenceCommand(a, io) },
  version: { summary: "print the version", run: async (a, io) => (parse(a, "version", "compute-bridge version"), io.out(`${VERSION}\n`), EXIT.ok) },
};

const EXIT_CODES = `Exit codes: ${EXIT.ok} ok; ${EXIT.failure} runtime error or failed check (doctor, verify-log), or the daemon could not start or keep running; ${EXIT.usage} usage error (unknown command or flag, bad value) or invalid config.`;
const CONFIG_NOTE = `--config FILE defaults to $COMPUTE_BRIDGE_CONFIG, else ${DEFAULT_CONFIG}.`;

function mainHelp(): string {
  const w = Math.max(...Object.keys(COMMANDS).map((k) => k.length));
  return `compute-bridge ${VERSION}: sell compute on a compute market from many clouds at once.

Usage: compute-bridge COMMAND [options]        (compute-bridge COMMAND --help for its options)

Commands:
${Object.entries(COMMANDS)
  .map(([k, c]) => `  ${k.padEnd(w)}  ${c.summary}`)
  .join("\n")}

Options: -h, --help; -V, --version.
${CONFIG_NOTE}
${EXIT_CODES}
`;
}

export async function main(argv: string[], io: Io = stdio): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    if (cmd === undefined) {
      io.err(mainHelp());
      return EXIT.usage;
    }
    if (cmd === "--help" || cmd === "-h") return (io.out(mainHelp()), EXIT.ok);
    if (cmd === "help") {
      const sub = rest[0];
      if (sub === undefined) return (io.out(mainHelp()), EXIT.ok);
      return await dispatch(sub, ["--help"], io);
    }
    if (cmd === "--version" || cmd === "-V" || cmd === "-v") return (io.out(`${VERSION}\n`), EXIT.ok);
    return await dispatch(cmd, rest, io);
  } catch (e) {
    return failure(e, io);
  }
}

async function dispatch(cmd: string, rest: string[], io: Io): Promise<number> {
  const c = Object.hasOwn(COMMANDS, cmd) ? COMMANDS[cmd]! : undefined;
  if (!c) throw new UsageError(`unknown command "${cmd}" (compute-bridge --help lists them)`);
  try {
    return await c.run(rest, io);
  } catch (e) {
    if (e instanceof HelpShown) return (io.out(e.text), EXIT.ok);
    throw e;
  }
}

function failure(e: unknown, io: Io): number {
  if (e instanceof ConfigError || e instanceof NotBuiltError) {
    io.err(`compute-bridge: ${e.message}\n`);
    return EXIT.usage;
  }
  if (e instanceof UsageError) {
    io.err(`compute-bridge: ${e.message}\n`);
    return EXIT.usage;
  }
  io.err(`compute-bridge: ${(e as Error).message}\n`);
  return EXIT.failure;
}

// ---- argument parsing -------------------------------------------------------------------------

class HelpShown extends Error {
  constructor(readonly text: string) {
    super("help");
  }
}

type Options = NonNullable<ParseArgsConfig["options"]>;
const CONFIG_OPT = { config: { type: "string", short: "c" } } as const satisfies Options;

/**
 * parseArgs with the conventions every command shares: strict (an unknown flag or a missing value
 * is a usage error naming it), `-h/--help` prints the command's usage, `--config` defaults to
 * COMPUTE_BRIDGE_CONFIG and then /etc/compute-bridge/bridge.toml.
 */
function parse<O extends Options>(argv: string[], name: string, usage: string, options?: O, maxPositionals = 0) {
  const all = { ...options, help: { type: "boolean", short: "h" } } as const;
  let r;
  try {
    r = parseArgs({ args: argv, options: all, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(`${name}: ${(e as Error).message.replace(/\. To specify a positional argument.*$/s, "")}\n\n${usage}`);
  }
  const values = r.values as { help?: boolean } & { [K in keyof O]?: O[K] extends { type: "boolean" } ? boolean : string };
  if (values.help) throw new HelpShown(usage);
  if (r.positionals.length > maxPositionals) throw new UsageError(`${name}: unexpected argument "${r.positionals[maxPositionals]}"\n\n${usage}`);
  return { values, positionals: r.positionals };
}

function configPath(value: unknown): string {
  if (typeof value === "string") {
    if (value === "") throw new UsageError("--config needs a FILE");
    return value;
  }
  return process.env.COMPUTE_BRIDGE_CONFIG || DEFAULT_CONFIG;
}

const usageOf = (lines: string) => `Usage:\n${lines}\n\n${CONFIG_NOTE}\n${EXIT_CODES}\n`;

// ---- commands ----------------------------------------------------------------------------------

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

async function checkConfig(argv: string[], io: Io): Promise<number> {
  const usage = usageOf("  compute-bridge check-config [--config FILE | FILE]\n\nValidates the boot TOML (exit 2 with the key path of every problem), checks the state store (a PostgreSQL\nstore's connection and schema version; exit 1 if that fails) and prints the card it would publish.");
  const a = parse(argv, "check-config", usage, CONFIG_OPT, 1);
  const given = a.positionals[0];
  if (given !== undefined && a.values.config !== undefined && given !== a.values.config)
    throw new UsageError(`check-config: give the file once (--config ${a.values.config} or ${given})`);
  const file = configPath(a.values.config ?? given);
  const { loaded, cfg, fleet, stateDir, notBuilt } = await offlineFleet(file, true);
  const keyFile = path.join(stateDir, "identity.key");
  const identity = existsSync(keyFile) ? Identity.loadOrCreate(stateDir) : Identity.ephemeral();
  for (const e of notBuilt) io.err(`warning: ${e.message} (run would refuse this config)\n`);
  if (!existsSync(keyFile)) io.err(`note: no identity yet in ${stateDir}; the card below is signed with a throwaway key (run creates the real one)\n`);
  io.out(`${JSON.stringify(buildCard(cfg, fleet, identity), null, 2)}\n`);
  // Prices and caps for the operator (stderr: stdout stays the card, for tools).
  io.err(formatTable([["SCOPE", "PRICING", "VALUE"], ...pricingRows(cfg)]));
  // The state database: reachable (PostgreSQL) and at a schema version this build runs on.
  const store = await checkStore(cfg.store, loaded.dir, stateDir);
  io.err(formatTable([["STORE", "CHECK", "RESULT", "DETAIL"], ...store.map((c) => [cfg.store.kind, c.check, c.ok ? "ok" : "FAIL", c.detail])]));
  const failed = store.filter((c) => !c.ok);
  if (failed.length > 0) {
    io.err(`config valid, but the store check failed: ${failed.map((c) => c.detail).join("; ")}\n`);
    return EXIT.failure;
  }
  io.err(`config ok: ${path.resolve(file)}\n`);
  return EXIT.ok;
}

async function printCard(argv: string[], io: Io): Promise<number> {
  const a = parse(argv, "card", usageOf("  compute-bridge card [--config FILE]\n\nPrints the ProviderCard signed with the identity in state_dir (created on first use)."), CONFIG_OPT);
  const { cfg, fleet, stateDir } = await offlineFleet(configPath(a.values.config), false);
  io.out(`${JSON.stringify(buildCard(cfg, fleet, Identity.loadOrCreate(stateDir)), null, 2)}\n`);
  return EXIT.ok;
}

const LOG_LEVELS = LogConfig.shape.level.unwrap().options;

async function runCommand(argv: string[], io: Io): Promise<number> {
  const usage = usageOf(
    `  compute-bridge run [--config FILE] [--log-level LEVEL]

Runs the daemon. Logs are JSON lines on stdout; a start-up failure is one JSON line (level fatal).
--log-level overrides [log] level: ${LOG_LEVELS.join(", ")}.
Signals: SIGTERM/SIGINT stop within 10 s (workloads keep running); SIGHUP reloads the listener
token and the log level from the config file (anything else changed is logged and needs a restart).`,
  );
  const a = parse(argv, "run", usage, { ...CONFIG_OPT, "log-level": { type: "string" } });
  const level = a.values["log-level"];
  if (level !== undefined && !(LOG_LEVELS as readonly string[]).includes(level))
    throw new UsageError(`run: --log-level must be one of ${LOG_LEVELS.join(", ")} (got "${level}")`);
  const file = configPath(a.values.config);
  const { startDaemon } = await import("./daemon.js");
  let d;
  try {
    d = await startDaemon({ configFile: file, ...(level ? { logLevel: level } : {}) });
  } catch (e) {
    // One JSON line, like every other line the daemon writes (journalctl -o cat | jq keeps working).
    const log = createLogger(level && level !== "silent" ? level : "info", { write: (s: string) => io.out(s) });
    log.fatal({ err: e, config: path.resolve(file) }, "compute-bridge could not start");
    return e instanceof ConfigError || e instanceof NotBuiltError ? EXIT.usage : EXIT.failure;
  }
  const daemon = d;
  return await new Promise<number>((resolve) => {
    let stopping = false;
    /** Close within 10 s and exit with `code` (1 whatever the reason if closing fails). */
    const stop = (why: Record<string, string>, code: number) => {
      if (stopping) return;
      stopping = true;
      process.off("SIGHUP", onHup);
      daemon.log.info(why, "shutting down");
      const hard = setTimeout(() => {
        daemon.log.error("graceful shutdown took longer than 10 s; exiting");
        resolve(EXIT.failure);
      }, 10_000);
      hard.unref();
      daemon.close().then(
        () => {
          clearTimeout(hard);
          resolve(code);
        },
        (e) => {
          daemon.log.error({ err: e }, "shutdown failed");
          resolve(EXIT.failure);
        },
      );
    };
    const onHup = () => void daemon.reload();
    process.on("SIGHUP", onHup);
    process.once("SIGTERM", () => stop({ signal: "SIGTERM" }, EXIT.ok));
    process.once("SIGINT", () => stop({ signal: "SIGINT" }, EXIT.ok));
    // The state database can no longer be written (logged as fatal): exit non-zero to be restarted.
    void daemon.failed.then(() => stop({ reason: "state database failure" }, EXIT.failure));
  });
}

/** Talk to the running daemon's listener, with the token from its config. */
async function grants(argv: string[], io: Io): Promise<number> {
  const usage = usageOf(`  compute-bridge grants list [--state STATE] [--config FILE]
  compute-bridge grants show ID [--config FILE]      one grant, with its ComputeLog when finished
  compute-bridge grants cancel ID [--config FILE]    cancel a grant

STATE: ${GrantState.options.join(", ")}.`);
  const a = parse(argv, "grants", usage, { ...CONFIG_OPT, state: { type: "string" } }, 2);
  const [sub, id] = a.positionals;
  if (sub !== "list" && sub !== "show" && sub !== "cancel") throw new UsageError(`grants needs list, show ID or cancel ID\n\n${usage}`);
  if (sub === "list" && id !== undefined) throw new UsageError(`grants list: unexpected argument "${id}"`);
  if (sub !== "list" && id === undefined) throw new UsageError(`grants ${sub} needs a request id`);
  if (a.values.state !== undefined && (sub !== "list" || !GrantState.safeParse(a.values.state).success))
    throw new UsageError(sub !== "list" ? `grants ${sub}: --state is only for list` : `grants list: --state must be one of ${GrantState.options.join(", ")}`);
  const loaded = loadConfig(configPath(a.values.config));
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
  const eid = encodeURIComponent(id ?? "");
  switch (sub) {
    case "list": {
      const state = a.values.state;
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
      return EXIT.ok;
    }
    case "show": {
      const r = await req("GET", `/v1/grants/${eid}`);
      if (r.status !== 200) return report(r, io);
      const { private_key: _omit, ...view } = r.body as Record<string, unknown>;
      const log = await req("GET", `/v1/grants/${eid}/log`);
      io.out(`${JSON.stringify({ ...view, ...(log.status === 200 ? { compute_log: log.body } : {}) }, null, 2)}\n`);
      return EXIT.ok;
    }
    case "cancel": {
      const r = await req("DELETE", `/v1/grants/${eid}`);
      if (r.status !== 200 && r.status !== 202) return report(r, io);
      io.out(`${id}: ${(r.body as { state: string }).state}${r.status === 202 ? " (cancelling)" : ""}\n`);
      return EXIT.ok;
    }
  }
}

function report(r: { status: number; body: Record<string, unknown> | null }, io: Io): number {
  io.err(`compute-bridge: the daemon answered ${r.status}: ${String(r.body?.message ?? r.body?.error ?? "")}\n`);
  return EXIT.failure;
}

function formatTable(rows: string[][]): string {
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd()).join("\n") + "\n";
}

/** Read-only checks of every configured backend: credentials, reachability, tools. */
async function doctor(argv: string[], io: Io): Promise<number> {
  const a = parse(argv, "doctor", usageOf("  compute-bridge doctor [--config FILE]\n\nRead-only checks of the state store and every configured backend; exit 1 if any fails."), CONFIG_OPT);
  const { loaded, cfg, fleet, notBuilt } = await offlineFleet(configPath(a.values.config), true);
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
  for (const c of await checkStore(cfg.store, loaded.dir, resolveFromConfig(loaded, cfg.bridge.state_dir))) {
    if (!c.ok) failed = true;
    rows.push([`store (${cfg.store.kind})`, c.check, c.ok ? "ok" : "FAIL", c.detail]);
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
  for (const [scope, what, value] of pricingRows(cfg)) rows.push([scope, what, "info", value]);
  await fleet.close();
  io.out(formatTable(rows));
  return failed ? EXIT.failure : EXIT.ok;
}

/** Read a JSON document, or JSON lines (compute-log.jsonl), naming the file on any problem. */
function readJsonDocs(file: string, what: string): Record<string, unknown>[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw new UsageError(`cannot read the ${what} ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const parseOne = (s: string, where: string) => {
    try {
      const v = JSON.parse(s) as unknown;
      if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("not a JSON object");
      return v as Record<string, unknown>;
    } catch (e) {
      throw new UsageError(`${file}${where}: ${(e as Error).message}`);
    }
  };
  try {
    return [parseOne(text, "")];
  } catch (e) {
    const lines = text.split("\n").filter((l) => l.trim() !== "");
    if (lines.length < 2) throw e;
    return lines.map((l, i) => parseOne(l, ` line ${i + 1}`));
  }
}

/** Verify ComputeLogs (one JSON document, or compute-log.jsonl) against a ProviderCard. */
async function verifyLog(argv: string[], io: Io): Promise<number> {
  const usage = usageOf(`  compute-bridge verify-log FILE --card CARD

FILE is one ComputeLog (GET /v1/grants/{id}/log) or compute-log.jsonl; CARD is the ProviderCard
(GET /v1/provider-card). The card's own signature is checked first, then each log's signature with
the card's public_key and its provider_id. Prints one line per log; exit 1 if any does not verify.`);
  const a = parse(argv, "verify-log", usage, { card: { type: "string" } }, 1);
  const file = a.positionals[0];
  if (file === undefined) throw new UsageError(`verify-log needs a FILE\n\n${usage}`);
  if (a.values.card === undefined) throw new UsageError(`verify-log needs --card CARD\n\n${usage}`);
  const logs = readJsonDocs(file, "ComputeLog file");
  const [card] = readJsonDocs(a.values.card, "card");
  if (typeof card!.public_key !== "string" || typeof card!.signature !== "string") throw new UsageError(`${a.values.card}: not a ProviderCard (no public_key or signature)`);
  const key = card!.public_key;
  if (!safeVerify(card as { signature: string }, key)) {
    io.err(`compute-bridge: the card's own signature does not verify (${a.values.card})\n`);
    return EXIT.failure;
  }
  let bad = 0;
  for (const log of logs) {
    const id = String(log.request_id ?? "?");
    let why = "";
    if (typeof log.signature !== "string") why = "no signature";
    else if (log.provider_id !== card!.provider_id) why = `provider_id ${JSON.stringify(log.provider_id)} is not the card's ${JSON.stringify(card!.provider_id)}`;
    else if (!safeVerify(log as { signature: string }, key)) why = "signature does not verify";
    if (why) bad++;
    io.out(`${why ? "FAIL" : "ok"}  ${id}${why ? `  ${why}` : ""}\n`);
  }
  return bad > 0 ? EXIT.failure : EXIT.ok;
}

function safeVerify(doc: { signature: string }, key: string): boolean {
  try {
    return verifySignedDoc(doc, key);
  } catch {
    return false;
  }
}

/**
 * The container HEALTHCHECK: GET /healthz (or /readyz) of the running daemon, on metrics_bind when
 * set (plain HTTP, no token: works whatever TLS the main listener has), else on the listener.
 */
async function healthcheck(argv: string[], io: Io): Promise<number> {
  const usage = usageOf(`  compute-bridge healthcheck [--config FILE] [--ready]

Asks the running daemon's /healthz (with --ready: /readyz) and exits 0 when it answers 200. Uses
listener.metrics_bind when set (plain HTTP), else listener.bind (https when TLS is on; the
daemon's certificate is not checked on this loopback probe). A listener that demands client
certificates (client_ca_file) can only be probed through metrics_bind.`);
  const a = parse(argv, "healthcheck", usage, { ...CONFIG_OPT, ready: { type: "boolean" } });
  const cfg = loadConfig(configPath(a.values.config)).config;
  const via = cfg.listener.metrics_bind ?? cfg.listener.bind;
  if (!cfg.listener.metrics_bind && cfg.listener.client_ca_file) {
    io.err("compute-bridge: the listener requires client certificates; set listener.metrics_bind to probe health over plain HTTP\n");
    return EXIT.failure;
  }
  let [host, port] = splitHostPort(via);
  if (host === "0.0.0.0" || host === "::") host = "127.0.0.1";
  const tls = !cfg.listener.metrics_bind && Boolean(cfg.listener.tls_cert_file);
  const { request } = tls ? await import("node:https") : await import("node:http");
  const p = a.values.ready ? "/readyz" : "/healthz";
  const status = await new Promise<number | string>((resolve) => {
    const req = request({ host, port, path: p, method: "GET", timeout: 5000, ...(tls ? { rejectUnauthorized: false } : {}) }, (res: import("node:http").IncomingMessage) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("timeout", () => req.destroy(new Error("no answer within 5 s")));
    req.on("error", (e: Error) => resolve(e.message));
    req.end();
  });
  if (status === 200) return (io.out(`ok ${p} on ${via}\n`), EXIT.ok);
  io.err(`compute-bridge: ${p} on ${via}: ${typeof status === "number" ? `answered ${status}` : status}\n`);
  return EXIT.failure;
}
