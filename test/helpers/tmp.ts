import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";

const dirs = new Set<string>();
process.on("exit", () => {
  for (const d of dirs) {
    try {
      rmSync(d, { recursive: true, force: true });
    } catch {
      // A temp dir left behind is harmless.
    }
  }
});

/**
 * A fresh temp dir, removed when this test file's process exits. Not when the test ends: t.after
 * runs hooks in the order they were registered, so a removal registered here (usually the first
 * thing a test does) would run before the store, servers and workloads the test then opened in the
 * dir are closed, while they still write to it.
 */
export function tempDir(_t?: unknown, prefix = "cb-test-"): string {
  const d = mkdtempSync(path.join(os.tmpdir(), prefix));
  dirs.add(d);
  return d;
}
