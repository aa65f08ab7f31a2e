import { spawn } from "node:child_process";
import http from "node:http";
import { createInterface } from "node:readline";

export interface LoadResult {
  requests: number;
  errors: number;
  seconds: number;
  rps: number;
  p50: number;
  p99: number;
  statuses: Record<number, number>;
  /** CPU time of the load generator's process (loadInChild only). */
  clientCpuMs?: number;
}

/**
 * A closed-loop HTTP load generator: `connections` keep-alive connections, each sending its next
 * request when the previous answer arrives, for `seconds`. Latencies in ms.
 */
export async function load(o: { url: string; connections: number; seconds: number; method?: string; headers?: Record<string, string>; body: (i: number) => string }): Promise<LoadResult> {
  const target = new URL(o.url);
  const agent = new http.Agent({ keepAlive: true, maxSockets: o.connections });
  const lat: number[] = [];
  const statuses: Record<number, number> = {};
  let errors = 0;
  let seq = 0;
  const end = performance.now() + o.seconds * 1000;
  const one = () =>
    new Promise<void>((resolve) => {
      const body = o.body(seq++);
      const t0 = performance.now();
      const req = http.request(
        { host: target.hostname, port: target.port, path: target.pathname, method: o.method ?? "POST", agent, headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body), ...o.headers } },
        (res) => {
          res.resume();
          res.on("end", () => {
            lat.push(performance.now() - t0);
            statuses[res.statusCode ?? 0] = (statuses[res.statusCode ?? 0] ?? 0) + 1;
            resolve();
          });
        },
      );
      req.on("error", () => {
        errors++;
        resolve();
      });
      req.end(body);
    });
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: o.connections }, async () => {
      while (performance.now() < end) await one();
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  agent.destroy();
  lat.sort((a, b) => a - b);
  const q = (p: number) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] ?? NaN;
  return { requests: lat.length, errors, seconds, rps: lat.length / seconds, p50: q(0.5), p99: q(0.99), statuses };
}

export function table(rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === "number" ? (Number.isInteger(c) ? String(c) : c.toFixed(2)) : c)));
  const w = cells[0]!.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)));
  const line = (r: string[]) => `| ${r.map((c, i) => c.padEnd(w[i]!)).join(" | ")} |`;
  return [line(cells[0]!), `|${w.map((x) => "-".repeat(x + 2)).join("|")}|`, ...cells.slice(1).map(line)].join("\n");
}

export interface LoadJob {
  url: string;
  connections: number;
  seconds: number;
  headers?: Record<string, string>;
  template: string;
  offset?: number;
}

/**
 * load() in a separate process that stays up between runs (so short alternating rounds cost no
 * process start each); `template` is the body with "__I__" replaced by a sequence number (plus
 * `offset`), so every request can carry a unique id.
 */
export class LoadClient {
  private readonly child;
  private readonly lines: AsyncIterator<string>;

  constructor() {
    const script = new URL("./load-child.ts", import.meta.url).pathname;
    this.child = spawn(process.execPath, ["--import", "tsx", script], { stdio: ["pipe", "pipe", "inherit"] });
    this.lines = createInterface({ input: this.child.stdout! })[Symbol.asyncIterator]();
  }

  async run(job: LoadJob): Promise<LoadResult> {
    this.child.stdin!.write(`${JSON.stringify({ offset: 0, ...job })}\n`);
    const next = await this.lines.next();
    if (next.done) throw new Error("the load generator exited");
    return JSON.parse(next.value) as LoadResult;
  }

  close(): void {
    this.child.stdin!.end();
  }
}

/** One run of load() in its own process. */
export async function loadInChild(job: LoadJob): Promise<LoadResult> {
  const c = new LoadClient();
  try {
    return await c.run(job);
  } finally {
    c.close();
  }
}
