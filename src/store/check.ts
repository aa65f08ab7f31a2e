import Database from "better-sqlite3";
import { existsSync } from "node:fs";
import path from "node:path";
import type { StoreConfig } from "../config/schema.js";
import { SCHEMA_VERSION } from "./schema.js";
import { storeSpec } from "./store.js";

/** One line of `check-config` / `doctor` about the store. */
export interface StoreCheck {
  check: string;
  ok: boolean;
  detail: string;
}

/** What a schema version means for this build. */
function versionCheck(version: number | null, where: string): StoreCheck {
  if (version === null || version === 0) return { check: "schema version", ok: true, detail: `${where} has no schema yet: created at the first start (version ${SCHEMA_VERSION})` };
  if (version > SCHEMA_VERSION) return { check: "schema version", ok: false, detail: `${where} is at version ${version}, newer than this build understands (${SCHEMA_VERSION}): run the newer build, the bridge refuses to downgrade` };
  if (version < SCHEMA_VERSION) return { check: "schema version", ok: true, detail: `${where} is at version ${version}: migrated to ${SCHEMA_VERSION} at the next start` };
  return { check: "schema version", ok: true, detail: `${where} is at version ${version} (this build's)` };
}

/**
 * Read-only checks of the configured store (nothing is created or migrated): for PostgreSQL the
 * URL's secret is readable, the database answers, and its schema version is one this build can
 * run on; for SQLite the schema version of bridge.db, when it exists. Details never carry the URL.
 */
export async function checkStore(cfg: StoreConfig, configDir: string, stateDir: string, connectTimeoutMs = 5000): Promise<StoreCheck[]> {
  if (cfg.kind === "sqlite") {
    const file = path.join(stateDir, "bridge.db");
    if (!existsSync(file)) return [{ check: "sqlite", ok: true, detail: `${file} does not exist yet: created at the first start` }, versionCheck(null, file)];
    try {
      const db = new Database(file, { readonly: true, fileMustExist: true });
      try {
        return [{ check: "sqlite", ok: true, detail: file }, versionCheck(db.pragma("user_version", { simple: true }) as number, file)];
      } finally {
        db.close();
      }
    } catch (e) {
      return [{ check: "sqlite", ok: false, detail: `cannot open ${file}: ${(e as Error).message}` }];
    }
  }
  let url: string;
  try {
    const spec = storeSpec(cfg, configDir, stateDir);
    if (spec.kind !== "postgres") throw new Error("unreachable: kind is postgres");
    url = spec.url;
  } catch (e) {
    return [{ check: "url readable", ok: false, detail: (e as Error).message }];
  }
  const { newPool } = await import("./postgres.js");
  const { pgSchemaVersion } = await import("./pg-schema.js");
  const u = new URL(url);
  const where = `database ${decodeURIComponent(u.pathname.slice(1)) || "(default)"} on ${u.hostname}:${u.port || "5432"}`;
  const pool = newPool(url, 1, connectTimeoutMs);
  try {
    const server = (await pool.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]?.v ?? "?";
    const version = await pgSchemaVersion(pool);
    return [{ check: "connection", ok: true, detail: `${where}, PostgreSQL ${server}` }, versionCheck(version, where)];
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    return [{ check: "connection", ok: false, detail: `${where}: ${(e as Error).message}${typeof code === "string" ? ` (${code})` : ""}` }];
  } finally {
    await pool.end().catch(() => undefined);
  }
}
