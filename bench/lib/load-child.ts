// Runs bench/lib/load.ts in its own process so the load generator does not share the server's
// event loop. It stays up between rounds: one JSON request per stdin line, one LoadResult (with
// this process's CPU time for the round) per stdout line.
import { createInterface } from "node:readline";
import { load, type LoadJob } from "./load.js";

for await (const line of createInterface({ input: process.stdin })) {
  const o = JSON.parse(line) as LoadJob;
  const offset = o.offset ?? 0;
  const cpu0 = process.cpuUsage();
  const r = await load({ url: o.url, connections: o.connections, seconds: o.seconds, ...(o.requests !== undefined ? { requests: o.requests } : {}), ...(o.headers ? { headers: o.headers } : {}), body: (i) => o.template.replaceAll("__I__", String(i + offset)) });
  const cpu = process.cpuUsage(cpu0);
  process.stdout.write(`${JSON.stringify({ ...r, clientCpuMs: (cpu.user + cpu.system) / 1000 })}\n`);
}
