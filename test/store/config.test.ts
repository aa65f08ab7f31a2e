import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { after, describe, it } from "node:test";
import { main } from "../../src/cli.js";
import { ConfigError, parseConfigText } from "../../src/config/load.js";
import { SCHEMA_VERSION } from "../../src/store/store.js";
import { tickIn } from "../helpers/config.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { call, until } from "../helpers/http.js";
import { scriptImage } from "../helpers/images.js";
import { PG_PASSWORD } from "../helpers/postgres.js";
import { ENGINES, stopEngines, type Place } from "../helpers/store-engines.js";
import { tempDir } from "../helpers/tmp.js";

// The [store] section: validation, `check-config` and `doctor`, and a daemon on either engine.

after(stopEngines);

const BASE = `[bridge]
provider_id = "p"
state_dir = "/tmp/x"
[listener]
bind = "127.0.0.1:0"
token_file = "t"
[almanac]
genesis = "2026-01-01T00:00:00Z"
tick_seconds = 1
[backends.local]
region = "local"
cpu_millicores = 1000
ram_mib = 1024
max_concurrent = 1
`;

function problems(toml: string): string[] {
  try {
    parseConfigText(BASE + toml, "t.toml");
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
  return [];
}

async function runCli(args: string[]) {
  let out = "";
  let err = "";
  const code = await main(args, { out: (s) => (out += s), err: (s) => (err += s) });
  return { code, out, err };
}

/** The [store] lines for a place: the URL in a file beside the config (never inline). */
function storeToml(dir: string, p: Place, url = p.url): string {
  if (p.engine === "sqlite") return "";
  writeFileSync(path.join(dir, "database.url"), `${url}\n`, { mode: 0o600 });
  return `[store]\nkind = "postgres"\nurl_file = ${JSON.stringify(path.join(dir, "database.url"))}\n`;
}

describe("[store] config", () => {
  it("defaults to sqlite; postgres needs url_file or url_env; the URL is never inline; errors name the field", () => {
    assert.equal(parseConfigText(BASE, "t").store.kind, "sqlite");
    assert.deepEqual(problems('[store]\nkind = "postgres"\nurl_env = "DB_URL"\n'), []);
    assert.deepEqual(problems('[store]\nkind = "postgres"\n'), ['store.url_file: required with kind = "postgres": url_file (a file holding the postgres:// URL) or url_env (an environment variable name)']);
    assert.deepEqual(problems('[store]\nkind = "postgres"\nurl = "postgres://u:pw@h/db"\n'), [
      'store.url: unknown key (secrets are never inline: use url_file = "/path" or url_env = "VAR")',
      'store.url_file: required with kind = "postgres": url_file (a file holding the postgres:// URL) or url_env (an environment variable name)',
    ]);
    assert.deepEqual(problems('[store]\nkind = "postgres"\nurl_file = "a"\nurl_env = "B"\n'), ["store.url_file: give either url_file or url_env, not both"]);
    assert.deepEqual(problems('[store]\nurl_env = "B"\n'), ['store.url_env: only for kind = "postgres" (SQLite keeps bridge.db in bridge.state_dir)']);
    assert.match(problems('[store]\nkind = "mysql"\n')[0]!, /^store\.kind: /);
    assert.match(problems('[store]\nkind = "postgres"\nurl_env = "B"\npool_size = 0\n')[0]!, /^store\.pool_size: /);
  });
});

for (const engine of ENGINES) {
  describe(`check-config, doctor and the daemon on ${engine.name}`, () => {
    it("check-config and doctor check the store: reachable, at a schema version this build runs on", async (t) => {
      const p = await engine.place(t);
      const dir = tempDir(t);
      const f = path.join(dir, "bridge.toml");
      writeFileSync(path.join(dir, "dev.token"), "x-token-123456\n");
      const dev = readFileSync("config/dev.toml", "utf8").replace('state_dir = "../.state/dev"', `state_dir = ${JSON.stringify(p.dir)}`);
      writeFileSync(f, dev + storeToml(dir, p));
      const fresh = await runCli(["check-config", "--config", f]);
      assert.equal(fresh.code, 0, fresh.err);
      assert.match(fresh.err, /schema version\s+ok\s+.*no schema yet: created at the first start/);
      await (await p.open()).close();
      const ok = await runCli(["doctor", "--config", f]);
      assert.equal(ok.code, 0, ok.out);
      assert.match(ok.out, new RegExp(`store \\(${engine.name}\\)\\s+schema version\\s+ok\\s+.*version ${SCHEMA_VERSION} \\(this build's\\)`));
      if (engine.name === "postgres") assert.match(ok.out, /store \(postgres\)\s+connection\s+ok\s+database \S+ on 127\.0\.0\.1:\d+, PostgreSQL 15/);
      await p.setVersion(SCHEMA_VERSION + 1);
      const newer = await runCli(["check-config", "--config", f]);
      assert.equal(newer.code, 1);
      assert.match(newer.err, /schema version\s+FAIL\s+.*newer than this build understands/);
      const doc = await runCli(["doctor", "--config", f]);
      assert.equal(doc.code, 1);
      for (const r of [fresh, ok, newer, doc]) assert.ok(!(r.out + r.err).includes(PG_PASSWORD), "no password in the output");
    });

    if (engine.name === "postgres")
      it("a wrong password or an unreachable database fails the check with the reason, never the URL's password", async (t) => {
        const p = await engine.place(t);
        const dir = tempDir(t);
        const f = path.join(dir, "bridge.toml");
        writeFileSync(path.join(dir, "dev.token"), "x-token-123456\n");
        const dev = readFileSync("config/dev.toml", "utf8").replace('state_dir = "../.state/dev"', `state_dir = ${JSON.stringify(p.dir)}`);
        const wrong = new URL(p.url!);
        wrong.password = "not-the-password-4711";
        writeFileSync(f, dev + storeToml(dir, p, wrong.href));
        const bad = await runCli(["check-config", "--config", f]);
        assert.equal(bad.code, 1);
        assert.match(bad.err, /connection\s+FAIL\s+.*password authentication failed.*\(28P01\)/);
        const down = new URL(p.url!);
        down.port = "1";
        writeFileSync(f, dev + storeToml(dir, p, down.href));
        const refused = await runCli(["doctor", "--config", f]);
        assert.equal(refused.code, 1);
        assert.match(refused.out, /store \(postgres\)\s+connection\s+FAIL\s+.*ECONNREFUSED/);
        writeFileSync(f, dev + `[store]\nkind = "postgres"\nurl_file = "missing.url"\n`);
        const unreadable = await runCli(["doctor", "--config", f]);
        assert.equal(unreadable.code, 1);
        assert.match(unreadable.out, /url readable\s+FAIL\s+store\.url_file: cannot read/);
        for (const r of [bad, refused, unreadable]) assert.ok(!(r.out + r.err).includes("not-the-password-4711") && !(r.out + r.err).includes(PG_PASSWORD));
      });

    it("a daemon accepts, runs and finishes a grant, serves its record and log, and keeps them across a restart", async (t) => {
      const p = await engine.place(t);
      const dir = tempDir(t);
      const td = await startTestDaemon(t, { extra: storeToml(dir, p) });
      assert.equal(td.d.store.engine, engine.name);
      const img = scriptImage(tempDir(t), "s", "echo hi; exit 3");
      const body = {
        grant: { request_id: "st-1", region: "local", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(120) },
        envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
      };
      assert.equal((await call(td.url, "POST", "/v1/grants", body)).status, 202);
      assert.equal((await call(td.url, "POST", "/v1/grants", body)).status, 200, "idempotent re-post");
      assert.equal((await call(td.url, "POST", "/v1/grants", { ...body, grant: { ...body.grant, ram_mib: 65 } })).status, 409);
      await until(async () => (await td.d.store.get("st-1"))?.state === "completed", "the grant to complete");
      const log = await call(td.url, "GET", "/v1/grants/st-1/log");
      assert.equal(log.status, 200);
      assert.equal((log.body as { exit_code: number }).exit_code, 3);
      assert.equal(readFileSync(path.join(td.stateDir, "compute-log.jsonl"), "utf8").trim().split("\n").length, 1);
      const again = await td.restart();
      assert.equal((await call(again.url, "GET", "/v1/grants/st-1")).status, 200);
      assert.equal(((await call(again.url, "GET", "/v1/grants?state=completed&limit=10")).body as { grants: unknown[] }).grants.length, 1);
      assert.ok(!td.logs.text.includes(PG_PASSWORD) && !again.logs.text.includes(PG_PASSWORD), "the password is never logged");
    });
  });
}
