import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import type { DestinationStream } from "pino";
import { loadConfig, resolveFromConfig, type LoadedConfig } from "./config/load.js";
import { readSecret } from "./config/secrets.js";
import { localRunsDir, type BootConfig } from "./config/schema.js";
import { Almanac, type ProviderCard } from "./domain/index.js";
import { buildCard, configDigest } from "./fleet/card.js";
import { Fleet } from "./fleet/fleet.js";
import { GrantManager, type ManagerEvents } from "./lifecycle/manager.js";
import { SweepGuard } from "./lifecycle/sweep-guard.js";
import { buildListener, readTls, ZOD_SCHEMA_CONTROLLER, type Listener } from "./listener/server.js";
import { MarketPublisher } from "./market/publisher.js";
import { defaultReplicaId, isStoreUnavailable, openCheckedStore, storeSpec, type Store } from "./store/store.js";
import type { BackendOptions } from "./backends/registry.js";
import { canonicalJson, sha256Hex } from "./util/canonical-json.js";
import { systemClock, type Clock } from "./util/clock.js";
import { splitHostPort } from "./util/hostport.js";
import { Identity } from "./util/identity.js";
import { ImagePolicy } from "./util/image-policy.js";
import { createLogger, type Logger } from "./util/logger.js";
import Fastify, { type FastifyInstance } from "fastify";
import { BridgeMetrics } from "./metrics/metrics.js";

export interface DaemonOptions {
  configFile: string;
  logLevel?: string;
  clock?: Clock;
  logDestination?: DestinationStream;
  /** Test knobs: how long past valid_to a backend gets before the bridge terminates anyway, retry pacing. */
  expiryGraceMs?: number;
  retryBaseMs?: number;
  cardCheckIntervalMs?: number;
  reconcileIntervalMs?: number;
  /** Extra listener routes and lifecycle hooks (metrics). */
  extraRoutes?: (app: FastifyInstance, d: Daemon) => void;
  events?: ManagerEvents;
  /** Injected backend options (tests, benchmarks): see BackendOptions in backends/registry.ts. */
  backendOptions?: BackendOptions;
}

export interface Daemon {
  loaded: LoadedConfig;
  config: BootConfig;
  log: Logger;
  fleet: Fleet;
  store: Store;
  manager: GrantManager;
  identity: Identity;
  listener: Listener;
  /** "http(s)://host:port" the listener is bound to. */
  url: string;
  card(): ProviderCard;
  metrics: BridgeMetrics;
  /** Resolves (with the number of resumed grants) once backends reconciled and open grants resumed. */
  ready: Promise<number>;
  /** Address of the separate metrics listener, when metrics_bind is set. */
  metricsUrl: string | null;
  close(): Promise<void>;
  /**
   * SIGHUP: re-read the config file and apply what can change without a restart (the listener
   * token, the log level); anything else that changed is logged as needing a restart. A config
   * that no longer loads is logged and the running one kept.
   */
  reload(): Promise<void>;
  /**
   * Resolves if the daemon can no longer keep its promises (the state database writer died):
   * nothing more is acknowledged, and the process should exit non-zero so its supervisor restarts it.
   */
  failed: Promise<Error>;
}

function mergeEvents(a: ManagerEvents, b: ManagerEvents): ManagerEvents {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof ManagerEvents>;
  const out: Record<string, (...args: never[]) => void> = {};
  for (const k of keys)
    out[k] = (...args: never[]) => {
      (a[k] as ((...x: never[]) => void) | undefined)?.(...args);
      (b[k] as ((...x: never[]) => void) | undefined)?.(...args);
    };
  return out as ManagerEvents;
}

/** Build the whole daemon from a boot TOML and start listening. */
export async function startDaemon(o: DaemonOptions): Promise<Daemon> {
  const loaded = loadConfig(o.configFile);
  const cfg = loaded.config;
  const clock = o.clock ?? systemClock;
  // Several replicas may share one database: every line says which one wrote it.
  const replicaId = cfg.store.replica_id ?? defaultReplicaId();
  const log = createLogger(o.logLevel ?? cfg.log.level, o.logDestination, replicaId);
  const stateDir = resolveFromConfig(loaded, cfg.bridge.state_dir);
  const token = readSecret(loaded.dir, "listener.token", { file: cfg.listener.token_file, env: cfg.listener.token_env });
  const marketToken = cfg.market ? readSecret(loaded.dir, "market.token", { file: cfg.market.token_file, env: cfg.market.token_env }) : null;
  const tls = readTls({
    cert: cfg.listener.tls_cert_file && resolveFromConfig(loaded, cfg.listener.tls_cert_file),
    key: cfg.listener.tls_key_file && resolveFromConfig(loaded, cfg.listener.tls_key_file),
    ca: cfg.listener.client_ca_file && resolveFromConfig(loaded, cfg.listener.client_ca_file),
  });

  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const releaseLock = lockStateDir(stateDir);
  // The store first: a lost database (state-check.ts) is refused before the identity is created.
  let store: Store;
  try {
    store = await openCheckedStore(storeSpec(cfg.store, loaded.dir, stateDir), clock, localRunsDir(cfg.backends.local, stateDir));
  } catch (e) {
    releaseLock();
    throw e;
  }
  const identity = Identity.loadOrCreate(stateDir);
  // Replicas sharing a database are one provider: one signature on the card and every ComputeLog.
  if (store.shared) {
    try {
      const pinned = await store.pinIdentity(identity.publicKeyBase64);
      if (pinned !== identity.publicKeyBase64)
        throw new Error(
          `${path.join(stateDir, "identity.key")} is not the provider identity the other replicas on this database sign with (public key ${pinned.slice(0, 24)}...): copy identity.key from a replica's state_dir into this one (docs/operations.md, "Several replicas")`,
        );
    } catch (e) {
      await store.close().catch(() => undefined);
      releaseLock();
      throw e;
    }
  }
  const almanac = new Almanac(cfg.almanac.genesis, cfg.almanac.tick_seconds);
  let manager!: GrantManager;
  const metrics = new BridgeMetrics(store, () => manager.activeCount);
  const imagePolicy = new ImagePolicy({ fileRoots: cfg.backends.local?.image_roots ?? [], allowCidrs: cfg.bridge.image_allow_cidrs });
  const fleet = await Fleet.build(cfg, { providerId: cfg.bridge.provider_id, stateDir, configDir: loaded.dir, log, clock, almanac, metrics, imagePolicy }, o.backendOptions);
  // The market outbox is delivered by the leader alone (with one replica: by it).
  let publisher: MarketPublisher | null = null;
  const newPublisher = () => (cfg.market && marketToken ? new MarketPublisher(store, cfg.market, marketToken, log.child({ component: "market" }), clock) : null);

  const events = metrics.managerEvents();
  manager = await GrantManager.open({
    store,
    fleet,
    almanac,
    identity,
    log,
    clock,
    providerId: cfg.bridge.provider_id,
    maxAttempts: cfg.fleet.max_attempts,
    provisionConcurrency: cfg.fleet.provision_concurrency,
    publishLogs: Boolean(cfg.market?.log_url),
    onLogWritten: () => publisher?.notify(),
    imagePolicy,
    ...(o.expiryGraceMs !== undefined ? { expiryGraceMs: o.expiryGraceMs } : {}),
    ...(o.retryBaseMs !== undefined ? { retryBaseMs: o.retryBaseMs } : {}),
    events: o.events ? mergeEvents(events, o.events) : events,
  });

  metrics.watchAdmission(fleet, manager);

  const card = () => buildCard(cfg, fleet, identity);
  let lastCardDigest = "";
  const publishCardIfChanged = () => {
    if (!cfg.market?.card_url || !leader) return;
    const c = card();
    const d = sha256Hex(canonicalJson(c));
    if (d === lastCardDigest) return;
    lastCardDigest = d;
    store.enqueue("card", "card", JSON.stringify(c)).then(
      () => publisher?.notify(),
      (e: unknown) => {
        lastCardDigest = ""; // the next check queues it again
        if (!stopping) log.error({ err: e }, "could not queue the provider card for the market");
      },
    );
  };

  // The singletons (orphan sweep, card, market outbox) run on one replica: the holder of the
  // leased, fenced "leader" role. With SQLite there is one replica, and it is the leader.
  let leader = !store.shared;
  metrics.leader.set(leader ? 1 : 0);
  let stopping = false;
  const leaderStop = new AbortController();
  const leaderTick = async () => {
    let now = false;
    try {
      now = await store.role("leader");
    } catch (e) {
      // Unsure: step down (a sweep also checks the role, fenced, right before it runs).
      if (leader) log.warn({ err: { message: (e as Error).message } }, "could not renew the leader role");
    }
    if (now === leader || stopping) return;
    leader = now;
    metrics.leader.set(now ? 1 : 0);
    log.info({ leader: now }, now ? "this replica is the leader now: it runs the orphan sweep, card publishing and the market outbox" : "this replica is no longer the leader");
    if (now) {
      publisher = newPublisher();
      publisher?.start();
      lastCardDigest = "";
      publishCardIfChanged();
      if (resumed) void reconcileAll();
    } else {
      const p = publisher;
      publisher = null;
      await p?.stop();
    }
  };
  const leaderLoop = async () => {
    for (;;) {
      try {
        await clock.sleep(Math.max(100, Math.floor(store.leaseTtlMs / 3)), leaderStop.signal);
      } catch {
        return;
      }
      await leaderTick();
    }
  };

  // Re-attach or sweep what backends hold, then continue every open grant.
  let reconciling = false;
  // Other replicas accept grants while the leader sweeps: see sweep-guard.ts.
  const sweepGuard = store.shared ? new SweepGuard() : null;
  const reconcileAll = async () => {
    if (reconciling || stopping || !leader) return;
    reconciling = true;
    // Ended grants of past months no longer count against any cap.
    fleet.spend?.budgets.prune(clock.now());
    try {
      let live: ReadonlySet<string>;
      try {
        const snapshot = (await store.nonTerminal()).map((g) => g.request_id);
        live = sweepGuard ? sweepGuard.pass(snapshot) : new Set(snapshot);
      } catch (e) {
        // Without the list of live grants nothing can be told apart from an orphan: skip this pass.
        log.error({ err: e }, "reconcile skipped: the state database cannot be read; it runs again at the next interval");
        return;
      }
      // Every backend at once: each loads its own SDK and asks its own cloud, so a slow or
      // unreachable one no longer holds up the others (at a restart, the resume waits for all).
      await Promise.all(
        fleet.backends.map(async (b) => {
          if (!b.reconcile) return;
          try {
            // Fenced: a leader that stalled (and lost the role meanwhile) sweeps nothing.
            if (store.shared && !(await store.role("leader", { fenced: true }))) return;
            await b.reconcile(live);
          } catch (e) {
            log.error({ backend: b.name, err: e }, "reconcile failed; it runs again at the next interval");
          }
        }),
      );
    } finally {
      reconciling = false;
    }
  };
  let reconcileTimer: NodeJS.Timeout | undefined;

  let daemon!: Daemon;
  // Ready once every open grant resumed, and as long as the state database can be written.
  let resumed = false;
  let storeFailure: Error | null = null;
  void store.failed.then((e) => (storeFailure = e));
  const notReadyReason = () => (storeFailure ? "the state database cannot be written" : (store.unavailable() ?? (resumed ? null : "resuming open grants")));
  const promText = { contentType: metrics.registry.contentType, text: () => metrics.registry.metrics() };
  const listener = buildListener({
    manager,
    store,
    card,
    token,
    log,
    bodyLimit: cfg.listener.body_limit_bytes,
    tls,
    notReadyReason,
    timeouts: {
      requestMs: cfg.listener.request_timeout_seconds * 1000,
      headersMs: cfg.listener.headers_timeout_seconds * 1000,
      keepAliveMs: cfg.listener.keep_alive_timeout_seconds * 1000,
    },
    metrics: cfg.listener.metrics_bind ? undefined : promText,
    extraRoutes: (app) => o.extraRoutes?.(app, daemon),
  });
  // A separate, unauthenticated metrics listener when metrics_bind is set (keep it on loopback).
  let metricsServer: FastifyInstance | null = null;
  const [host, port] = splitHostPort(cfg.listener.bind);
  let binding = cfg.listener.bind;
  try {
    if (cfg.listener.metrics_bind) {
      binding = cfg.listener.metrics_bind;
      metricsServer = Fastify({ logger: false, schemaController: ZOD_SCHEMA_CONTROLLER });
      metricsServer.get("/metrics", async (_req, reply) => reply.type(promText.contentType).send(await promText.text()));
      // The probes too, so a container health check or a load balancer needs neither TLS nor the token.
      metricsServer.get("/healthz", async () => ({ status: "ok" }));
      metricsServer.get("/readyz", async (_req, reply) => {
        const why = notReadyReason();
        return why === null ? { status: "ready" } : reply.code(503).send({ status: "not_ready", reason: why });
      });
      const [mh, mp] = splitHostPort(cfg.listener.metrics_bind);
      await metricsServer.listen({ host: mh, port: mp });
    }
    binding = cfg.listener.bind;
    await listener.app.listen({ host, port });
  } catch (e) {
    // EADDRINUSE, EACCES, EADDRNOTAVAIL...: undo what was started, so that the caller can exit at once.
    const err = e as NodeJS.ErrnoException;
    await Promise.allSettled([listener.app.close(), metricsServer?.close()]);
    await manager.shutdown().catch(() => undefined);
    await fleet.close().catch(() => undefined);
    await store.close().catch(() => undefined);
    releaseLock();
    throw Object.assign(new Error(`cannot listen on ${binding}: ${err.message}`), { code: err.code });
  }
  const addr = listener.app.server.address();
  const boundPort = typeof addr === "object" && addr ? addr.port : port;
  const url = `${tls ? "https" : "http"}://${host.includes(":") ? `[${host}]` : host}:${boundPort}`;

  // The start-up line is written whatever the level (unless silent): where the daemon listens is
  // what an operator (and a supervisor waiting for it) needs first, so it comes before the resume
  // below starts (whose first steps, reading the open grants, run before its first await).
  const configured = log.level;
  if (configured !== "silent" && !log.isLevelEnabled("info")) log.level = "info";
  log.info(
    { url, provider_id: cfg.bridge.provider_id, backends: fleet.backends.map((b) => b.name), state_dir: stateDir, config_digest: configDigest(cfg) },
    "compute-bridge listening",
  );
  log.level = configured;

  // Listening comes first (a slow or unreachable cloud must not keep the listener down); then each
  // backend reconciles what it holds while every open grant resumes. Backends count grants they
  // provision themselves as live, so grants accepted meanwhile are never taken for orphans.
  let leaderLoopDone: Promise<void> = Promise.resolve();
  const ready = (async () => {
    if (store.shared) {
      await leaderTick();
      leaderLoopDone = leaderLoop();
    }
    // The start-up sweep runs beside the resume, not before it: a sweep held up by a throttling
    // or unreachable cloud must not leave every open grant undriven (under load, a bridge killed
    // again and again before its sweeps ended resumed nothing, and its grants ran out of time).
    // Resumed grants are in the sweep's live set, and grants provisioned meanwhile count as live.
    const sweep = reconcileAll();
    // A database that cannot be read right now (PostgreSQL restarting) is waited for: resuming
    // is what readiness waits on.
    let n = 0;
    for (let attempt = 1; ; attempt++) {
      try {
        n = await manager.resumeAll();
        break;
      } catch (e) {
        if (!isStoreUnavailable(e)) throw e;
        log.warn({ err: { message: (e as Error).message }, attempt }, "cannot read the open grants to resume them; retrying");
        await clock.sleep(Math.min(30_000, 500 * 2 ** Math.min(attempt, 6)));
        if (stopping) return 0;
      }
    }
    resumed = true;
    log.info({ resumed: n }, n > 0 ? "resumed open grants" : "no open grants to resume");
    await sweep;
    reconcileTimer = setInterval(() => void reconcileAll(), o.reconcileIntervalMs ?? 60_000);
    reconcileTimer.unref();
    return n;
  })();
  if (leader) {
    publisher = newPublisher();
    publisher?.start();
  }
  publishCardIfChanged();
  const cardTimer = setInterval(publishCardIfChanged, o.cardCheckIntervalMs ?? 30_000);
  cardTimer.unref();


  let currentToken = token;
  const reload = async () => {
    let next;
    try {
      next = loadConfig(o.configFile);
    } catch (e) {
      log.error({ err: { message: (e as Error).message }, signal: "SIGHUP" }, "reload: the config file no longer loads; keeping the running configuration");
      return;
    }
    const applied: string[] = [];
    try {
      const t = readSecret(next.dir, "listener.token", { file: next.config.listener.token_file, env: next.config.listener.token_env });
      if (t !== currentToken) {
        currentToken = t;
        listener.setToken(t);
        applied.push("listener token");
      }
    } catch (e) {
      log.error({ err: { message: (e as Error).message }, signal: "SIGHUP" }, "reload: cannot read the listener token; keeping the current one");
    }
    const level = o.logLevel ?? next.config.log.level;
    if (level !== log.level) {
      log.level = level;
      applied.push(`log level ${level}`);
    }
    // Everything else needs a restart: name the sections that differ.
    const rest = (c: BootConfig): Record<string, unknown> => ({ ...c, log: null, listener: { ...c.listener, token_file: null, token_env: null } });
    const a = rest(cfg);
    const b = rest(next.config);
    const needsRestart = [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => canonicalJson(a[k] ?? null) !== canonicalJson(b[k] ?? null)).sort();
    log.info({ signal: "SIGHUP", applied, needs_restart: needsRestart }, needsRestart.length ? "reloaded; changes in needs_restart take effect on the next start" : "reloaded");
  };

  let closing: Promise<void> | null = null;
  daemon = {
    reload,
    loaded,
    config: cfg,
    log,
    fleet,
    store,
    manager,
    identity,
    listener,
    url,
    card,
    metrics,
    ready,
    failed: store.failed.then((e) => {
      log.fatal({ err: e }, "the state database can no longer be written; stopping (running workloads are left running and resume on the next start)");
      return e;
    }),
    metricsUrl: metricsServer ? `http://${cfg.listener.metrics_bind!.replace(/:0$/, `:${(metricsServer.server.address() as { port: number }).port}`)}` : null,
    close: () =>
      (closing ??= (async () => {
        listener.drain();
        clearInterval(cardTimer);
        stopping = true;
        clearInterval(reconcileTimer);
        leaderStop.abort();
        await leaderLoopDone;
        await manager.shutdown();
        await Promise.race([listener.app.close(), new Promise((r) => setTimeout(r, 1000).unref())]);
        await publisher?.stop();
        await metricsServer?.close();
        await fleet.close();
        await store.close();
        releaseLock();
        log.info("compute-bridge stopped; running workloads were left running and resume on the next start");
        log.flush?.();
      })()),
  };
  return daemon;
}


/** One daemon per state_dir: a pid file, taken over only when its owner is dead. */
function lockStateDir(stateDir: string): () => void {
  const file = path.join(stateDir, "daemon.pid");
  if (existsSync(file)) {
    const pid = Number(readFileSync(file, "utf8").trim());
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isAlive(pid))
      throw new Error(`state_dir ${stateDir} is in use by another compute-bridge (pid ${pid}); stop it first`);
  }
  writeFileSync(file, `${process.pid}\n`, { mode: 0o600 });
  return () => {
    try {
      if (readFileSync(file, "utf8").trim() === String(process.pid)) rmSync(file, { force: true });
    } catch {
      /* already gone */
    }
  };
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    // A recycled pid belongs to some other program: only a node process counts as the owner.
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmdline.includes("compute-bridge") || cmdline.includes("node");
  } catch {
    return false;
  }
}
