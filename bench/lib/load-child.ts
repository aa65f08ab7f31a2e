// Runs bench/lib/load.ts in its own process so the load generator does not share the server's
// event loop. Input: one JSON argument; output: the LoadResult as JSON on stdout.
import { load } from "./load.js";

const o = JSON.parse(process.argv[2]!) as { url: string; connections: number; seconds: number; headers?: Record<string, string>; template: string; offset: number };
const cpu0 = process.cpuUsage();
const r = await load({ url: o.url, connections: o.connections, seconds: o.seconds, ...(o.headers ? { headers: o.headers } : {}), body: (i) => o.template.replaceAll("__I__", String(i + o.offset)) });
const cpu = process.cpuUsage(cpu0);
process.stdout.write(JSON.stringify({ ...r, clientCpuMs: (cpu.user + cpu.system) / 1000 }));
