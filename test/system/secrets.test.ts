/**
 * Secrets: the real daemon (a child process, ./run-daemon-injected.ts, log level trace) with every
 * backend enabled against the fakes, configured with CANARY secrets everywhere a secret goes —
 * the listener token, the market token, the AWS key files (the EC2 fake verifies SigV4 with them),
 * the Azure client secret (a real ClientSecretCredential against a local https authority through
 * authority_host + ca_file; the authority issues a canary ARM token), a GCP credentials_file
 * holding a canary private key (with an injected authClient carrying a canary access token: no
 * Google call), the bare-metal machines' private key files — plus the bridge's own identity key
 * and the per-grant SSH private keys the bridge generates.
 *
 * Each backend runs the full lifecycle, including its failure paths: a capacity error, a
 * credential refusal (EC2 AuthFailure echoing the access key id, GCE 401, the Azure authority
 * refusing the client secret, ARM 401, an SSH key the machine does not authorise) and an image
 * hash mismatch (the guest really runs the boot script and refuses the image). Then no canary may
 * appear in the daemon's stdout/stderr, in any HTTP answer of the daemon (error bodies included),
 * in any ComputeLog (API, compute-log.jsonl, what the market received) or in the ProviderCard;
 * a bridge-generated private key appears only in GET /v1/grants/{its id}.
 *
 *   node --import tsx --test test/system/secrets.test.ts
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import path from "node:path";
import { describe, it, type TestContext } from "node:test";
import { azureNaming } from "../../src/backends/azure/naming.js";
import { gceNaming } from "../../src/backends/gcp/naming.js";
import { REGISTRY } from "../../src/backends/registry.js";
import { ArmFake } from "../fakes/arm.js";
import { Ec2Fake } from "../fakes/ec2.js";
import { GceFake } from "../fakes/gce.js";
import { makeTestCert } from "../fakes/tls.js";
import { tickIn } from "../helpers/config.js";
import { call, type Res } from "../helpers/http.js";
import { tempDir } from "../helpers/tmp.js";
import { bannerServer, dumpLives, EC2_REQUEST_TAG, freePort, GUARD_MARKER, GuestSim, imageServer, poll, spawnInjected, TERMINAL, tomlSection, tv, type InjectedDaemon, type InjectSpec } from "./helpers.js";

const PROVIDER = "secrets-provider";
const RG = "rg-secrets";
const GCP_PROJECT = "secrets-project";
const TENANT = "11111111-2222-3333-4444-555555555555";
const CLIENT_ID = "66666666-7777-8888-9999-000000000000";
const gceNames = gceNaming("compute-bridge", PROVIDER);
const azNames = azureNaming(PROVIDER);

/** Base64 body lines of a PEM key that identify it (the first OpenSSH line is the same for every key). */
function keyLines(pem: string): string[] {
  const body = pem.split("\n").filter((l) => l && !l.startsWith("-----"));
  const lines = pem.includes("OPENSSH PRIVATE KEY") ? body.slice(1) : body;
  return lines.filter((l) => l.length >= 16);
}

/** Every file under `dir` (recursively) as text; unreadable ones are skipped. */
function readTree(dir: string): string {
  let out = "";
  const walk = (d: string) => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    for (const n of names) {
      const p = path.join(d, n);
      try {
        const st = statSync(p);
        if (st.isDirectory()) walk(p);
        else if (st.isFile() && st.size < 4 * 1024 * 1024) out += `\n${p}\n${readFileSync(p, "latin1")}`;
      } catch {
        /* vanished */
      }
    }
  };
  walk(dir);
  return out;
}

describe("secrets", { timeout: 180_000 }, () => {
  it("no canary secret reaches a log, an HTTP answer, a ComputeLog or the card; a bridge-generated key only GET /v1/grants/{id}", async (t: TestContext) => {
    const started = Date.now();
    const dir = tempDir(t, "cb-secrets-");
    const hex = () => randomBytes(12).toString("hex");
    const canary = {
      listener: `cnry-listener-${hex()}`,
      market: `cnry-market-${hex()}`,
      awsKeyId: `AKIA${randomBytes(8).toString("hex").toUpperCase()}`,
      awsSecret: `cnry/aws/${hex()}/secret`,
      azureSecret: `cnry-azure-client-secret-${hex()}`,
      armToken: `cnry-arm-token-${hex()}`,
      gceToken: `cnry-gce-token-${hex()}`,
      gcpPrivateKey: `cnry-gcp-private-key-${hex()}`,
    };

    // ---- loopback servers and fakes ----
    const sshPort = await bannerServer(t);
    const images = await imageServer(t);
    const img = images.add("workload", "#!/bin/sh\nexit 7\n");
    const cert = await makeTestCert();
    writeFileSync(path.join(dir, "ca.pem"), cert.ca);

    // The market: takes the card (PUT) and ComputeLogs (POST) with the market token.
    const market = { bodies: [] as string[], auth: new Set<string>(), logs: new Set<string>(), refusedFirst: false };
    const marketServer = http.createServer((req, res) => {
      let b = "";
      req.on("data", (c: Buffer) => (b += c.toString()));
      req.on("end", () => {
        market.auth.add(String(req.headers.authorization));
        if (!market.refusedFirst) {
          // One outage first: the publisher's retry path logs too.
          market.refusedFirst = true;
          res.writeHead(503).end("market busy");
          return;
        }
        market.bodies.push(b);
        if (req.method === "POST") market.logs.add((JSON.parse(b) as { request_id: string }).request_id);
        res.writeHead(req.headers.authorization === `Bearer ${canary.market}` ? 204 : 401).end();
      });
    });
    await new Promise<void>((r) => marketServer.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => marketServer.close(() => r())));
    const marketBase = `http://127.0.0.1:${(marketServer.address() as AddressInfo).port}`;

    // The Azure authority (AAD v2 endpoints) over https: refuses every token request until `accept`.
    const authority = { accept: false, requests: 0, refused: 0 };
    const authorityServer = https.createServer({ cert: cert.cert, key: cert.key }, (req, res) => {
      let b = "";
      req.on("data", (c: Buffer) => (b += c.toString()));
      req.on("end", () => {
        const base = `https://127.0.0.1:${(authorityServer.address() as AddressInfo).port}/${TENANT}`;
        res.setHeader("content-type", "application/json");
        if (req.method === "GET" && /\/v2\.0\/\.well-known\/openid-configuration/.test(req.url ?? "")) {
          res.end(JSON.stringify({ token_endpoint: `${base}/oauth2/v2.0/token`, authorization_endpoint: `${base}/oauth2/v2.0/authorize`, issuer: `${base}/v2.0`, jwks_uri: `${base}/discovery/v2.0/keys` }));
          return;
        }
        if (req.method === "POST" && /\/oauth2\/v2\.0\/token/.test(req.url ?? "")) {
          authority.requests++;
          const form = new URLSearchParams(b);
          if (!authority.accept || form.get("client_secret") !== canary.azureSecret || form.get("client_id") !== CLIENT_ID) {
            authority.refused++;
            res.statusCode = 401;
            res.end(JSON.stringify({ error: "invalid_client", error_description: `AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${CLIENT_ID}'.`, error_codes: [7000215] }));
            return;
          }
          res.end(JSON.stringify({ token_type: "Bearer", expires_in: 3600, ext_expires_in: 3600, access_token: canary.armToken }));
          return;
        }
        res.statusCode = 404;
        res.end("{}");
      });
    });
    await new Promise<void>((r) => authorityServer.listen(0, "127.0.0.1", r));
    t.after(() => new Promise<void>((r) => authorityServer.close(() => r())));

    const ec2 = await Ec2Fake.start({ seed: 3, now: Date.now, credentials: [{ accessKeyId: canary.awsKeyId, secretAccessKey: canary.awsSecret }], faults: { bootDelayMs: 150, terminateDelayMs: 100 } });
    t.after(() => ec2.close());
    ec2.faults.capacity = (req) => (req.tags[EC2_REQUEST_TAG] === "aws-capacity" ? "InsufficientInstanceCapacity" : null);

    const gce = await GceFake.start({ project: GCP_PROJECT, seed: 3, now: Date.now, accessToken: canary.gceToken, zones: ["us-central1-a", "us-central1-b"], bootDelayMs: 200, deleteDelayMs: 100, waitTimeoutMs: 5000 });
    t.after(() => gce.close());
    gce.faults.poolExhausted = (ctx) => ctx.name === gceNames.instanceName("gcp-capacity");

    const arm = await ArmFake.start({ tls: cert, seed: 3, accessToken: canary.armToken, bootDelayMs: 100, resourceGroups: [RG] });
    t.after(() => arm.close());
    arm.faults.allocationFailure = (req) => (req.name.toLowerCase() === azNames.names("az-capacity").vm.toLowerCase() ? "AllocationFailed" : null);

    // ---- bare metal (when registered): one real sshd; a second machine entry with a key it refuses ----
    const bm = REGISTRY.baremetal === null ? null : await (async () => {
      const { startSshd, ensureSshdInstalled } = await import("../fakes/sshd.js");
      ensureSshdInstalled();
      const sshd = await startSshd();
      t.after(() => sshd.stop());
      const badKey = path.join(dir, "bm-refused-key");
      execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "not-authorised", "-f", badKey]);
      return { sshd, badKey, badPem: readFileSync(badKey, "utf8") };
    })();
    if (!bm) t.diagnostic("baremetal is not registered in src/backends/registry.ts: its part is skipped");

    // ---- config: every secret in a file, nothing inline ----
    const files: Record<string, string> = {
      "listener.token": canary.listener,
      "market.token": canary.market,
      "aws-akid": canary.awsKeyId,
      "aws-secret": canary.awsSecret,
      "azure-client-secret": canary.azureSecret,
      "gcp-key.json": JSON.stringify({
        type: "service_account",
        project_id: GCP_PROJECT,
        private_key_id: "0123456789abcdef",
        private_key: `-----BEGIN PRIVATE KEY-----\n${canary.gcpPrivateKey}\n-----END PRIVATE KEY-----\n`,
        client_email: `bridge@${GCP_PROJECT}.iam.gserviceaccount.com`,
        client_id: "1234567890",
      }),
    };
    for (const [f, v] of Object.entries(files)) writeFileSync(path.join(dir, f), `${v}\n`, { mode: 0o600 });
    const port = await freePort();
    const common = { launch_timeout_seconds: 60, ready_timeout_seconds: 30, ssh_port: sshPort, orphan_grace_seconds: 3600, reconcile_interval_seconds: 3600 };
    const config = path.join(dir, "bridge.toml");
    const machine = (o: Record<string, unknown>) => `\n[[backends.baremetal.machines]]\n${Object.entries(o).map(([k, v]) => `${k} = ${tv(v)}`).join("\n")}\n`;
    writeFileSync(
      config,
      [
        tomlSection("bridge", { provider_id: PROVIDER, state_dir: "state", image_allow_cidrs: ["127.0.0.1/32"] }), // images from the test server on loopback
        tomlSection("listener", { bind: `127.0.0.1:${port}`, token_file: "listener.token" }),
        tomlSection("almanac", { genesis: "2026-01-01T00:00:00Z", tick_seconds: 1 }),
        tomlSection("log", { level: "trace" }),
        tomlSection("fleet", { max_attempts: 3, unavailable_ttl_seconds: 0 }),
        tomlSection("market", { card_url: `${marketBase}/card`, log_url: `${marketBase}/logs`, token_file: "market.token", retry_max_seconds: 1 }),
        tomlSection("backends.aws", { instance_types: ["m6i.large"], max_concurrent_instances: 10, access_key_id_file: "aws-akid", secret_access_key_file: "aws-secret", endpoint: ec2.endpoint, poll_interval_seconds: 0.1, ...common }),
        tomlSection("backends.aws.regions.us-east-1", { image_id: "ami-0123456789abcdef0", subnet_id: "subnet-0123abcd", security_group_ids: ["sg-0123abcd"] }),
        tomlSection("backends.gcp", {
          project: GCP_PROJECT,
          zones: ["us-central1-a", "us-central1-b"],
          machine_types: [{ name: "e2-standard-2", vcpus: 2, memory_mib: 8192 }],
          max_concurrent_instances: 10,
          image: "projects/debian-cloud/global/images/family/debian-12",
          credentials_file: "gcp-key.json",
          api_endpoint: `http://127.0.0.1:${gce.port}`,
          poll_interval_seconds: 0.1,
          ...common,
        }),
        tomlSection("backends.azure", {
          subscription_id: arm.subscriptionId,
          resource_group: RG,
          regions: ["westeurope"],
          vm_sizes: [{ name: "Standard_D2s_v5", vcpus: 2, memory_mib: 8192 }],
          max_concurrent_instances: 10,
          image: { publisher: "Canonical", offer: "ubuntu-24_04-lts", sku: "server", version: "latest" },
          subnet_id: `/subscriptions/${arm.subscriptionId}/resourceGroups/${RG}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default`,
          tenant_id: TENANT,
          client_id: CLIENT_ID,
          client_secret_file: "azure-client-secret",
          endpoint: arm.endpoint,
          authority_host: `https://127.0.0.1:${(authorityServer.address() as AddressInfo).port}`,
          ca_file: "ca.pem",
          poll_interval_seconds: 0.05,
          ...common,
        }),
        bm
          ? tomlSection("backends.baremetal", { poll_interval_ms: 100, connect_timeout_ms: 3000, keepalive_interval_ms: 2000, ready_timeout_seconds: 20 }) +
            machine({ name: "bm-good", host: bm.sshd.host, port: bm.sshd.port, user: bm.sshd.user, private_key_file: bm.sshd.privateKeyPath, host_key_sha256: bm.sshd.hostKeySha256, region: "bm-one", cpu_millicores: 4000, ram_mib: 8192, mode: "systemd", work_dir: path.join(dir, "bm-work") }) +
            machine({ name: "bm-refused", host: bm.sshd.host, port: bm.sshd.port, user: bm.sshd.user, private_key_file: bm.badKey, host_key_sha256: bm.sshd.hostKeySha256, region: "bm-two", cpu_millicores: 4000, ram_mib: 8192, mode: "systemd", work_dir: path.join(dir, "bm-work2") })
          : "",
        tomlSection("backends.local", { region: "local-one", cpu_millicores: 4000, ram_mib: 8192, max_concurrent: 1, poll_interval_ms: 50, terminate_grace_seconds: 1 }),
      ].join("\n"),
    );
    const spec: InjectSpec = {
      aws: { retry: { maxAttempts: 4, delayMs: 5 }, options: { readyPollIntervalMs: 50, sshProbeIntervalMs: 20, consoleGraceMs: 3000 } },
      // The GCE fake's token in an injected OAuth2Client: the daemon never reaches Google's OAuth server.
      gcp: { accessToken: canary.gceToken, options: { retry: { attempts: 3, baseMs: 5, capMs: 20 }, sshProbeIntervalMs: 20 } },
      // No injected credential: the backend builds its ClientSecretCredential from the config.
      azure: { options: { retryDelayInMs: 5, maxRetries: 2 } },
      daemon: { expiryGraceMs: 2000, retryBaseMs: 50, cardCheckIntervalMs: 200 },
    };

    const guests = new GuestSim({ ec2, gce: { fake: gce, project: GCP_PROJECT }, arm: { fake: arm, resourceGroup: RG }, mode: { script: { dir: path.join(dir, "guests") } }, intervalMs: 25 });
    t.after(() => guests.stop());

    // ---- the daemon; every answer it gives is kept ----
    const lives: InjectedDaemon[] = [];
    t.after(async () => {
      for (const d of lives) await d.kill9();
    });
    const daemon = await spawnInjected(config, spec);
    lives.push(daemon);
    // On failure, the daemon's whole output is kept in a file named in the message.
    await scenario().catch((e: unknown) => {
      if (e instanceof Error) e.message += dumpLives("secrets", lives);
      throw e;
    });

    async function scenario(): Promise<void> {
      const base = `http://127.0.0.1:${port}`;
      const answers: { what: string; res: Res }[] = [];
      const api = async (method: string, p: string, body?: unknown, headers: Record<string, string> = {}, token: string | null = canary.listener) => {
        const res = await call(base, method, p, body, headers, token);
        answers.push({ what: `${method} ${p}`, res });
        return res;
      };
      const identityPem = readFileSync(path.join(dir, "state", "identity.key"), "utf8");

      interface Outcome {
        id: string;
        view: { state: string; backend: string | null; instance: { host: string | null } | null; error: { kind: string; message: string } | null; private_key?: string };
        log: { exit_code: number | null; error_kind: string | null };
      }
      const privateKeys = new Map<string, string>();
      const bodies = new Map<string, unknown>();
      const post = (id: string, region: string, o: { sha256?: string; cpu?: number } = {}) => {
        const body = {
          grant: { request_id: id, region, tdx_required: false, cpu_millicores: o.cpu ?? 1000, ram_mib: 1024, valid_to: tickIn(300) },
          // No ssh_public_key: the bridge generates the per-grant key pair.
          envelope: { image: { url: img.url, sha256: o.sha256 ?? img.sha256, format: "bundle" }, env: { GREETING: "hello" } },
        };
        bodies.set(id, body);
        return api("POST", "/v1/grants", body);
      };
      const settle = async (id: string): Promise<Outcome> => {
        const view = await poll(
          async () => {
            const r = await api("GET", `/v1/grants/${id}`);
            return TERMINAL.includes(r.body?.state) ? (r.body as Outcome["view"]) : null;
          },
          `${id} to finish`,
          60_000,
          50,
        );
        if (view.private_key) privateKeys.set(id, view.private_key);
        const log = (await api("GET", `/v1/grants/${id}/log`)).body as Outcome["log"];
        return { id, view, log };
      };
      const run = async (id: string, region: string, o: { sha256?: string; cpu?: number } = {}) => {
        const r = await post(id, region, o);
        assert.equal(r.status, 202, `${id}: ${r.status} ${r.text}`);
        // Before it is terminal, its ComputeLog is a 409 (an error body too).
        await api("GET", `/v1/grants/${id}/log`);
        return settle(id);
      };
      const wrongSha = "0".repeat(64);
      let bmCred = "(no bare metal)";
      const results = new Map<string, Outcome>();
      const keep = (o: Outcome) => results.set(o.id, o);

      // ---- Azure first, while the authority refuses the client secret (the start-up sweep already met the refusal) ----
      await poll(() => authority.refused > 0, "the start-up reconcile to ask the authority for a token", 120_000); // a ceiling: the reconcile loads the cloud SDKs first, slow on a loaded machine
      await api("GET", "/v1/provider-card"); // with the reconcile error in the azure backend's status
      assert.equal((await post("az-auth", "westeurope")).status, 202);
      // It fails on the refused credential; its terminate (which must look for anything it left
      // behind) keeps retrying until the credential works again, as it should.
      await poll(async () => (await api("GET", "/v1/grants/az-auth")).body?.state === "terminating", "az-auth to fail and terminate", 30_000, 50);
      authority.accept = true;
      keep(await settle("az-auth"));

      const scenarios: (() => Promise<void>)[] = [
        async () => {
          keep(await run("aws-ok", "us-east-1"));
          keep(await run("aws-hash", "us-east-1", { sha256: wrongSha }));
          keep(await run("aws-capacity", "us-east-1"));
          // Refused credentials; the message echoes the access key id, as AWS error messages can.
          ec2.failNext("RunInstances", "AuthFailure", 401, { message: `AWS was not able to validate the provided access credentials (access key ${canary.awsKeyId})` });
          keep(await run("aws-cred", "us-east-1"));
        },
        async () => {
          keep(await run("gcp-ok", "us-central1"));
          keep(await run("gcp-hash", "us-central1", { sha256: wrongSha }));
          keep(await run("gcp-capacity", "us-central1"));
          gce.failNext("insert", 401, "authError", { message: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential." });
          keep(await run("gcp-cred", "us-central1"));
        },
        async () => {
          keep(await run("az-ok", "westeurope"));
          keep(await run("az-hash", "westeurope", { sha256: wrongSha }));
          keep(await run("az-capacity", "westeurope"));
          arm.failNext("PUT", new RegExp(`/virtualMachines/${azNames.names("az-cred").vm}$`, "i"), 401, "InvalidAuthenticationToken", "The access token is invalid.");
          keep(await run("az-cred", "westeurope"));
        },
        async () => {
          keep(await run("local-ok", "local-one"));
          keep(await run("local-hash", "local-one", { sha256: wrongSha }));
          // A long one, cancelled while it runs: DELETE answers with the record.
          const long = images.add("long", "#!/bin/sh\nexec sleep 60\n");
          const r = await api("POST", "/v1/grants", { grant: { request_id: "local-cancel", region: "local-one", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: tickIn(300) }, envelope: { image: { url: long.url, sha256: long.sha256, format: "bundle" } } });
          assert.equal(r.status, 202, r.text);
          await poll(async () => (await api("GET", "/v1/grants/local-cancel")).body?.state === "running", "local-cancel to run", 20_000, 50);
          // local is full now (max_concurrent = 1): a capacity refusal, as a 422 with the reason.
          const full = await post("local-full", "local-one");
          assert.equal(full.status, 422, full.text);
          assert.match(full.text, /at_capacity/);
          assert.equal((await api("DELETE", "/v1/grants/local-cancel")).status, 202);
          keep(await settle("local-cancel"));
        },
        async () => {
          if (!bm) return;
          keep(await run("bm-ok", "bm-one"));
          keep(await run("bm-hash", "bm-one", { sha256: wrongSha }));
          // The machine refuses the other key: nothing can take bm-two grants (422), or one fails.
          const r = await post("bm-cred", "bm-two");
          bmCred = `${r.status}: ${JSON.stringify((r.body?.declines as { backend: string }[] | undefined)?.find((d) => d.backend === "baremetal") ?? r.body)}`;
          if (r.status === 202) keep(await settle("bm-cred"));
          else assert.equal(r.status, 422, r.text);
        },
      ];
      await Promise.all(scenarios.map((s) => s()));

      // ---- the HTTP error answers ----
      const probes = {
        wrongToken: await api("GET", "/v1/grants", undefined, {}, "not-the-token"),
        noToken: await api("GET", "/v1/provider-card", undefined, {}, null),
        notFound: await api("GET", "/v1/grants/no-such-grant"),
        conflict: await api("POST", "/v1/grants", { grant: { request_id: "aws-ok", region: "us-east-1", tdx_required: false, cpu_millicores: 2000, ram_mib: 1024, valid_to: tickIn(300) }, envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } } }),
        duplicate: await api("POST", "/v1/grants", bodies.get("local-ok")),
        invalid: await api("POST", "/v1/grants", { grant: { request_id: "bad id!", region: "x" }, envelope: {} }),
        notJson: await api("POST", "/v1/grants", "grant=1", { "content-type": "text/plain" }),
        unroutable: await api("POST", "/v1/grants", { grant: { request_id: "nowhere", region: "mars-1", tdx_required: false, cpu_millicores: 100, ram_mib: 64, valid_to: tickIn(300) }, envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } } }),
        tooLarge: await api("POST", "/v1/grants", { pad: "x".repeat(1100 * 1024) }),
      };
      assert.deepEqual(
        Object.fromEntries(Object.entries(probes).map(([k, r]) => [k, r.status])),
        { wrongToken: 401, noToken: 401, notFound: 404, conflict: 409, duplicate: 200, invalid: 400, notJson: 415, unroutable: 422, tooLarge: 413 },
      );
      const list = await api("GET", "/v1/grants?limit=1000");
      const card = await api("GET", "/v1/provider-card");
      await api("GET", "/metrics");

      // ---- outcomes ----
      const expect: Record<string, [string, string | null, number | null]> = {
        "az-auth": ["failed", "credential", null],
        "aws-ok": ["completed", null, 7],
        "aws-hash": ["failed", "image_verification", null],
        "aws-capacity": ["failed", "capacity", null],
        "aws-cred": ["failed", "credential", null],
        "gcp-ok": ["completed", null, 7],
        "gcp-hash": ["failed", "image_verification", null],
        "gcp-capacity": ["failed", "capacity", null],
        "gcp-cred": ["failed", "credential", null],
        "az-ok": ["completed", null, 7],
        "az-hash": ["failed", "image_verification", null],
        "az-capacity": ["failed", "capacity", null],
        "az-cred": ["failed", "credential", null],
        "local-ok": ["completed", null, 7],
        "local-hash": ["failed", "image_verification", null],
        "local-cancel": ["cancelled", null, null],
        ...(bm ? { "bm-ok": ["completed", null, 7], "bm-hash": ["failed", "image_verification", null] } : {}),
        ...(results.has("bm-cred") ? { "bm-cred": ["failed", "credential", null] } : {}),
      } as Record<string, [string, string | null, number | null]>;
      const got = Object.fromEntries([...results].map(([id, o]) => [id, [o.view.state, o.view.error?.kind ?? null, o.log.exit_code]]));
      assert.deepEqual(got, expect, JSON.stringify([...results].map(([id, o]) => [id, o.view.error]), null, 1));

      // Everything reached the market (after its one refusal), then a graceful stop flushes the logs.
      await poll(() => [...results.keys()].every((id) => market.logs.has(id)), "every ComputeLog to reach the market", 20_000, 50);
      assert.equal(await daemon.stop(), 0, "graceful stop");
      assert.deepEqual([...market.auth].filter((a) => a !== `Bearer ${canary.market}`), [], "the market always got its token");

      // ---- the scan ----
      const out = lives.map((d) => `${d.stdout()}\n${d.stderr()}`).join("\n");
      assert.ok(out.length > 10_000 && /"level":"trace"|"level":"debug"/.test(out), "trace-level logs were captured");
      assert.ok(!out.includes(GUARD_MARKER), "only 127.0.0.1 was contacted");
      const jsonl = readFileSync(path.join(dir, "state", "compute-log.jsonl"), "utf8");
      const marketText = market.bodies.join("\n");
      const places: Record<string, string> = {
        "daemon stdout/stderr": out,
        "compute-log.jsonl": jsonl,
        "what the market received (card, ComputeLogs)": marketText,
        "the local backend's run directories": readTree(path.join(dir, "state", "local")),
        ...Object.fromEntries(answers.map((a, i) => [`answer ${i}: ${a.what} -> ${a.res.status}`, a.res.text])),
      };
      const secrets: Record<string, string[]> = {
        ...Object.fromEntries(Object.entries(canary).map(([k, v]) => [k, [v]])),
        "identity key": keyLines(identityPem),
        ...(bm ? { "bare-metal key": keyLines(bm.sshd.privateKey), "refused bare-metal key": keyLines(bm.badPem) } : {}),
      };
      const leaks: string[] = [];
      for (const [where, text] of Object.entries(places))
        for (const [name, values] of Object.entries(secrets)) if (values.some((v) => text.includes(v))) leaks.push(`${name} in ${where}`);

      // Per-grant keys: only in GET /v1/grants/{that id}, nowhere else (not even what the clouds or hosts received).
      const cloudReceived = [
        JSON.stringify(ec2.calls.map((c) => c.params)),
        JSON.stringify(gce.insertAttempts.map((a) => a.body)),
        JSON.stringify(arm.received.map((r) => r.body)),
        bm ? readTree(bm.sshd.stateDir) + readTree(path.join(dir, "bm-work")) : "",
      ].join("\n");
      // The bridge-generated key is shown only for an instance with an SSH host to use it on.
      const withHost = [...results.values()].filter((o) => o.view.instance?.host).map((o) => o.id);
      assert.deepEqual([...privateKeys.keys()].sort(), withHost.sort(), "GET /v1/grants/{id} gave the generated key exactly where there is a host to use it on");
      for (const [id, pem] of privateKeys) {
        const lines = keyLines(pem);
        assert.ok(lines.length > 0);
        for (const [where, text] of Object.entries({ ...places, "what clouds and hosts received": cloudReceived })) {
          if (!lines.some((l) => text.includes(l))) continue;
          if (where.includes(`: GET /v1/grants/${id} -> 200`)) continue;
          leaks.push(`the per-grant private key of ${id} in ${where}`);
        }
      }
      assert.deepEqual(leaks, [], "no secret leaked");

      // The card and the list carry no key at all; the error bodies said something useful.
      assert.ok(!card.text.includes("PRIVATE KEY") && !list.text.includes("PRIVATE KEY"));
      assert.match(probes.unroutable.text, /region_not_served/);
      const awsCred = results.get("aws-cred")!.view.error!.message;
      assert.match(awsCred, /AuthFailure/);
      assert.ok(awsCred.includes("[REDACTED]"), `the echoed access key id is redacted: ${awsCred}`);

      const figures = `secrets: ${results.size} grants over ${bm ? 5 : 4} backends, ${answers.length} HTTP answers, ${(out.length / 1024).toFixed(0)} KiB of daemon output, ${Object.values(secrets).flat().length + privateKeys.size} canaries, ${authority.requests} token requests (${authority.refused} refused), ${((Date.now() - started) / 1000).toFixed(1)} s`;
      t.diagnostic(figures);
      t.diagnostic(`bare metal with a key the machine refuses: POST answered ${bmCred}`);
      if (process.env.CB_SYSTEM_DUMP) t.diagnostic(dumpLives("secrets", lives).trim());
    }
  });
});
