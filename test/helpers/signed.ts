import { writeFileSync } from "node:fs";
import path from "node:path";
import { tickIn } from "./config.js";
import { call, until } from "./http.js";
import { scriptImage } from "./images.js";
import { tempDir } from "./tmp.js";

/**
 * Run a grant whose workload exits with `exitCode` on a test daemon and write its ComputeLog and
 * the daemon's ProviderCard as JSON files (what a market would hold), for signature checks.
 */
export async function signedLogAndCard(url: string, id: string, exitCode: number) {
  const dir = tempDir();
  const img = scriptImage(dir, `exit${exitCode}`, `exit ${exitCode}`);
  await call(url, "POST", "/v1/grants", {
    grant: { request_id: id, region: "local", tdx_required: false, cpu_millicores: 250, ram_mib: 64, valid_to: tickIn(120) },
    envelope: { image: { url: img.url, sha256: img.sha256, format: "bundle" } },
  });
  const log = await until(async () => {
    const r = await call(url, "GET", `/v1/grants/${id}/log`);
    return r.status === 200 ? r.body : null;
  }, `the ComputeLog of ${id}`);
  const card = path.join(dir, "card.json");
  const logFile = path.join(dir, "log.json");
  writeFileSync(card, (await call(url, "GET", "/v1/provider-card")).text);
  writeFileSync(logFile, JSON.stringify(log));
  return { log, card, logFile, dir };
}
