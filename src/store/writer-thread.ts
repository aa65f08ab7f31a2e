import { parentPort, workerData } from "node:worker_threads";
import { openDatabase } from "./schema.js";
import { Writer, type FromWriter, type ToWriter } from "./writer.js";

// Entry point of the writer thread: one connection, one Writer, batches answered in order.
// An uncaught error ends the thread; the main thread then fails every pending write and stops.

const { dbPath, jsonlPath } = workerData as { dbPath: string; jsonlPath: string };
const port = parentPort!;
const db = openDatabase(dbPath);
const writer = new Writer(db, jsonlPath);

port.on("message", (m: ToWriter) => {
  if (m.type === "batch") {
    const r = writer.apply(m.ops);
    port.postMessage({ type: "done", id: m.id, results: r.results, ms: r.ms } satisfies FromWriter);
    return;
  }
  db.close();
  port.postMessage({ type: "closed" } satisfies FromWriter);
  port.close();
});
