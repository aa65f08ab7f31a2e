import { spawn } from "node:child_process";
import net from "node:net";
import { createInterface } from "node:readline";

export interface LoadResult {
  requests: number;
  errors: number;
  seconds: number;
  rps: number;
  p50: number;
  p99: number;
  statuses: Record<number, number>;
  /** CPU time of the load generator's process (LoadClient only). */
  clientCpuMs?: number;
}

/**
 * A closed-loop HTTP/1.1 load generator: `connections` keep-alive connections, each sending its
 * next request when the previous answer is complete, for `seconds` (or until `requests` have been
 * sent, if given, whichever comes first). Latencies in ms.
 *
 * It speaks HTTP over plain sockets (one preformatted request written per send, answers framed by
 * their content-length) rather than through node's http client, which costs ~40 µs of CPU per
 * request: the generator shares the machine's cores with the server it measures, and every µs it
 * spends is taken from that server (a market sends from its own machines). Answers without a
 * content-length (chunked) are counted as errors and end that connection.
 */
export async function load(o: { url: string; connections: number; seconds: number; requests?: number; method?: string; headers?: Record<string, string>; body: (i: number) => string }): Promise<LoadResult> {
  const target = new URL(o.url);
  const port = Number(target.port || 80);
  const extra = Object.entries({ "content-type": "application/json", ...o.headers })
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join("");
  const head = `${o.method ?? "POST"} ${target.pathname}${target.search} HTTP/1.1\r\nhost: ${target.host}\r\n${extra}content-length: `;
  const lat: number[] = [];
  const statuses: Record<number, number> = {};
  let errors = 0;
  let seq = 0;
  const end = performance.now() + o.seconds * 1000;

  const connection = () =>
    new Promise<void>((resolve) => {
      const socket = net.connect({ host: target.hostname, port, noDelay: true });
      let buf: Buffer = Buffer.alloc(0);
      let sentAt = 0;
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        socket.destroy();
        resolve();
      };
      const send = () => {
        if (performance.now() >= end || (o.requests !== undefined && seq >= o.requests)) return finish();
        const body = o.body(seq++);
        sentAt = performance.now();
        socket.write(`${head}${Buffer.byteLength(body)}\r\n\r\n${body}`);
      };
      socket.on("connect", send);
      socket.on("error", () => {
        if (!done) errors++;
        finish();
      });
      socket.on("close", () => {
        // The server hung up while the run was on.
        if (!done && performance.now() < end) errors++;
        finish();
      });
      socket.on("data", (chunk: Buffer) => {
        buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
        for (;;) {
          const headerEnd = buf.indexOf("\r\n\r\n");
          if (headerEnd < 0) return;
          const header = buf.toString("latin1", 0, headerEnd);
          const m = /\r\ncontent-length: *(\d+)/i.exec(header);
          if (!m) {
            errors++;
            return finish();
          }
          const total = headerEnd + 4 + Number(m[1]);
          if (buf.length < total) return;
          lat.push(performance.now() - sentAt);
          const status = Number(header.slice(9, 12));
          statuses[status] = (statuses[status] ?? 0) + 1;
          buf = buf.subarray(total);
          send();
        }
      });
    });

  const t0 = performance.now();
  await Promise.all(Array.from({ length: o.connections }, connection));
  const seconds = (performance.now() - t0) / 1000;
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
  /** Stop after this many requests (`seconds` is then a limit). */
  requests?: number;
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
    this.child.stdin!.write(`${JSON.stringify(job)}\n`);
    const next = await this.lines.next();
    if (next.done) throw new Error("the load generator exited");
    return JSON.parse(next.value) as LoadResult;
  }

  close(): void {
    this.child.stdin!.end();
  }
}

