import { closeSync, fsync, openSync } from "node:fs";
import { parentPort, workerData } from "node:worker_threads";
import { openDatabase } from "./schema.js";
import { Writer, type FromWriter, type ToWriter, type WriteResult } from "./writer.js";

// Entry point of the writer thread: one connection, one Writer.
//
// Each batch is committed without SQLite's own fsync (synchronous=NORMAL), then the WAL is
// fsync'd on the thread pool, and the batch is answered only when that fsync returns. Meanwhile
// the thread commits the next batch, so a slow disk costs latency, not throughput: fsyncs overlap
// with commits, and one fsync covers every commit written before it. Nothing is acknowledged, and
// so nothing acted on, before it is on disk (ComputeLogs reach compute-log.jsonl only then too).
// Readers may see a commit a moment before its fsync.
//
// An error here ends the thread (an fsync that fails is never retried: the page cache may have
// dropped the data); the main thread then fails every pending write and the daemon stops.

const { dbPath, jsonlPath } = workerData as { dbPath: string; jsonlPath: string };
const port = parentPort!;
const db = openDatabase(dbPath, { syncWal: false });
const writer = new Writer(db, jsonlPath);
const walPath = `${dbPath}-wal`;
/** A descriptor on the WAL (SQLite keeps its inode while any connection is open). */
let walFd: number | null = null;
/** Batches committed and waiting for the next fsync, and whether one is running. */
let unsynced: { id: number; results: WriteResult[]; ms: number; at: number; finished: boolean }[] = [];
let syncing = false;
let closeRequested = false;

function reply(m: FromWriter): void {
  port.postMessage(JSON.stringify(m));
}

function close(): void {
  if (walFd !== null) closeSync(walFd);
  db.close();
  reply({ type: "closed" });
  port.close();
}

/**
 * One fsync at a time: it covers every batch committed before it started; batches committed while
 * it runs wait for the next one. Under load, many commits share one fsync.
 */
function sync(): void {
  const covered = unsynced;
  unsynced = [];
  syncing = true;
  walFd ??= openSync(walPath, "r");
  fsync(walFd, (err) => {
    if (err) throw new Error(`fsync of the state database's WAL failed: ${err.message}`);
    syncing = false;
    if (covered.some((b) => b.finished)) writer.appendLogs();
    const now = performance.now();
    for (const b of covered) reply({ type: "done", id: b.id, results: b.results, ms: b.ms + (now - b.at) });
    if (unsynced.length > 0) sync();
    else if (closeRequested) close();
  });
}

// Messages are JSON strings both ways (cheaper to pass than structured clones).
port.on("message", (raw: string) => {
  const m = JSON.parse(raw) as ToWriter;
  if (m.type === "close") {
    closeRequested = true;
    if (!syncing && unsynced.length === 0) close();
    return;
  }
  const r = writer.apply(m.ops);
  unsynced.push({ id: m.id, results: r.results, ms: r.ms, at: performance.now(), finished: r.finished });
  if (!syncing) sync();
});
