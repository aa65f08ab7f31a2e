import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { TestContext } from "node:test";

/** A fresh temp dir removed when the test ends. */
export function tempDir(t: TestContext | { after: (fn: () => void) => void }, prefix = "cb-test-"): string {
  const d = mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => rmSync(d, { recursive: true, force: true }));
  return d;
}
