import { closeSync, fdatasyncSync, openSync } from "node:fs";
import { parentPort, receiveMessageOnPort, workerData } from "node:worker_threads";
import { openDatabase } from "./schema.js";
import { Writer, type FromWriter, type ToWriter, type WriteOp } from "./writer.js";

// Entry point of the writer thread: one connection, one Writer, and a group-commit loop.
//
// When batches arrive, the thread takes every batch already queued, commits them all in one
// transaction (SQLite's own sync is off: synchronous=NORMAL), fsyncs the WAL once (fdatasync, as
// SQLite itself syncs on Linux: the frames and the file size, not the mtime), and only then
// answers each batch. Batches sent while it commits and fsyncs wait in the queue and share the
// next commit and fsync, so under load many requests share one fsync, and none of this blocks the
// event loop. Nothing is acknowledged, and so nothing acted on, before it is on disk (ComputeLogs
// reach compute-log.jsonl only then too). Readers may see a commit a moment before its fsync.
//
// An error here ends the thread (an fsync that fails is never retried: the page cache may have
// dropped the data); the main thread then fails every pending write and the daemon stops.

const { dbPath, jsonlPath } = workerData as { dbPath: string; jsonlPath: string };
const port = parentPort!;
const db = openDatabase(dbPath, { syncWal: false });
const writer = new Writer(db, jsonlPath);
/** A descriptor on the WAL (SQLite keeps its inode while any connection is open). */
let walFd: number | null = null;

function reply(m: FromWriter): void {
  port.postMessage(JSON.stringify(m));
}

// Messages are JSON strings both ways (cheaper to pass than structured clones).
port.on("message", (first: string) => {
  const batches: { id: number; ops: WriteOp[] }[] = [];
  let closing = false;
  for (let raw: unknown = first; raw !== undefined; raw = receiveMessageOnPort(port)?.message) {
    const m = JSON.parse(raw as string) as ToWriter;
    if (m.type === "close") {
      closing = true; // the main thread sends nothing after it
      break;
    }
    batches.push(m);
  }
  if (batches.length > 0) {
    const t0 = performance.now();
    const r = writer.apply(batches.flatMap((b) => b.ops));
    fdatasyncSync((walFd ??= openSync(`${dbPath}-wal`, "r")));
    if (r.finished) writer.appendLogs();
    const ms = performance.now() - t0;
    let i = 0;
    reply({ type: "done", batches: batches.map((b) => ({ id: b.id, results: r.results.slice(i, (i += b.ops.length)) })), ms });
  }
  if (closing) {
    if (walFd !== null) closeSync(walFd);
    db.close();
    port.close(); // the thread ends; the main thread waits for its exit
  }
});
