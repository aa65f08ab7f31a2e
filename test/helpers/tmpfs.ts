import { execFileSync } from "node:child_process";
import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";

/** Mount a tmpfs of `size` on `dir`; returns the reason when this machine does not allow it. */
export function mountTmpfs(t: { after(fn: () => unknown): void }, dir: string, size: string): string | null {
  mkdirSync(dir, { recursive: true });
  if (process.getuid?.() !== 0) return "mounting a tmpfs needs root";
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir], { stdio: "pipe" });
  } catch (e) {
    return `mount -t tmpfs is not allowed here: ${String((e as { stderr?: Buffer }).stderr ?? e).trim()}`;
  }
  t.after(() => {
    try {
      execFileSync("umount", ["-l", dir], { stdio: "pipe" });
    } catch {
      /* already gone */
    }
  });
  return null;
}

/** Write zeros into `file` until the filesystem is full. */
export function fillDisk(file: string): void {
  const fd = openSync(file, "w");
  const buf = Buffer.alloc(64 * 1024);
  try {
    for (;;) writeSync(fd, buf);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOSPC") throw e;
    // The last partial blocks too.
    try {
      for (;;) writeSync(fd, buf, 0, 512);
    } catch {
      /* full */
    }
  } finally {
    closeSync(fd);
  }
}
