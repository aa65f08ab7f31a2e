/**
 * npm run bench: every benchmark, each in its own process, each figure against its baseline in
 * the same run; the tables are printed and written to bench/results.md with a description of
 * the machine they ran on.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SUITE: { file: string; title: string; args?: string[] }[] = [
  { file: "listener.ts", title: "Listener: durable accept path vs a bare fastify route (32 connections)" },
  { file: "listener.ts", title: "Listener at saturation (128 connections)", args: ["8", "128"] },
  { file: "core.ts", title: "Core: routing, memory, cold start, resume" },
  { file: "pg-accept.ts", title: "PostgreSQL: durable accepts/s vs SQLite, and two replicas into one database (32 connections)" },
  { file: "takeover.ts", title: "Replicas: takeover of 100 running grants after kill -9, lease TTL 15 s and 3 s" },
  { file: "burst.ts", title: "Burst: 1,000 grants at once to AWS on the rate-limited EC2 fake" },
  { file: "aws-watch.ts", title: "AWS: batched vs per-instance watch, grant-to-SSH-ready overhead" },
  { file: "gcp-watch.ts", title: "GCP: batched vs per-instance watch" },
  { file: "azure-watch.ts", title: "Azure: batched vs per-VM watch" },
  { file: "baremetal.ts", title: "Bare metal: pre-established SSH session vs a new connection per grant" },
];

function machine(): string {
  const cpus = os.cpus();
  const sh = (cmd: string) => {
    try {
      return execFileSync("sh", ["-c", cmd], { encoding: "utf8" }).trim();
    } catch {
      return "?";
    }
  };
  return [
    `- date: ${new Date().toISOString()}`,
    `- host: ${os.type()} ${os.release()} ${os.arch()}, ${sh(". /etc/os-release 2>/dev/null && echo $PRETTY_NAME")}`,
    `- cpu: ${cpus.length} x ${cpus[0]?.model ?? "?"}`,
    `- memory: ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB`,
    `- node: ${process.version}`,
    `- disk under /tmp: ${sh("df -h /tmp | tail -1 | awk '{print $1, $2}'")}`,
  ].join("\n");
}

const sections: string[] = [];
let failed = 0;
for (const b of SUITE) {
  const file = path.join(HERE, b.file);
  if (!existsSync(file)) continue;
  process.stdout.write(`\n## ${b.title}\n`);
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ["--import", "tsx", file, ...(b.args ?? [])], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], timeout: 15 * 60_000 });
  const out = (r.stdout ?? "").trim();
  process.stdout.write(`${out}\n`);
  if (r.status !== 0) {
    failed++;
    process.stdout.write(`(failed: exit ${r.status}${r.signal ? `, ${r.signal}` : ""})\n`);
  }
  sections.push(`## ${b.title}\n\n\`node --import tsx bench/${[b.file, ...(b.args ?? [])].join(" ")}\` (${((Date.now() - t0) / 1000).toFixed(0)} s)\n\n\`\`\`\n${out}\n\`\`\`\n`);
}

const doc = `# Benchmark results\n\nProduced by \`npm run bench\` (bench/run.ts). Every figure is compared with its baseline measured in the same run, since these machines are noisy; read the ratios.\n\n${machine()}\n\n${sections.join("\n")}`;
writeFileSync(path.join(HERE, "results.md"), doc);
process.stdout.write(`\nwritten to bench/results.md\n`);
process.exit(failed ? 1 : 0);
