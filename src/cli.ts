import { existsSync } from "node:fs";
import path from "node:path";
import { ConfigError, loadConfig, resolveFromConfig } from "./config/load.js";
import { Almanac } from "./domain/index.js";
import { buildCard } from "./fleet/card.js";
import { Fleet } from "./fleet/fleet.js";
import { NotBuiltError } from "./backends/registry.js";
import { fleetOrder } from "./config/schema.js";
import { systemClock } from "./util/clock.js";
import { Identity } from "./util/identity.js";
import { createLogger } from "./util/logger.js";
import { VERSION } from "./version.js";

const HELP = `compute-bridge ${VERSION}: sell compute on a compute market from many clouds at once.

Usage:
  compute-bridge run --config FILE [--log-level LEVEL]   run the daemon
  compute-bridge check-config FILE                       validate a boot TOML and print the card it would publish
  compute-bridge card --config FILE                      print the signed ProviderCard
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
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      d.log.info({ signal: sig }, "shutting down");
      const hard = setTimeout(() => {
        d.log.error("graceful shutdown took longer than 10 s; exiting");
        resolve(1);
      }, 10_000);
      hard.unref();
      d.close().then(
        () => {
          clearTimeout(hard);
          resolve(0);
        },
        (e) => {
          d.log.error({ err: e }, "shutdown failed");
          resolve(1);
        },
      );
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
}
