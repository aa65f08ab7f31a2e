import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

export interface TestImage {
  url: string;
  sha256: string;
  file: string;
}

function image(file: string): TestImage {
  return { file, url: pathToFileURL(file).href, sha256: createHash("sha256").update(readFileSync(file)).digest("hex") };
}

/** A single executable shell script as the image. */
export function scriptImage(dir: string, name: string, body: string): TestImage {
  const file = path.join(dir, name);
  writeFileSync(file, `#!/bin/sh\n${body}\n`);
  chmodSync(file, 0o755);
  return image(file);
}

/** A tar.gz bundle with an executable `run` script (and any extra files). */
export function bundleImage(dir: string, name: string, runBody: string, extra: Record<string, string> = {}): TestImage {
  const src = path.join(dir, `${name}.src`);
  mkdirSync(src, { recursive: true });
  writeFileSync(path.join(src, "run"), `#!/bin/sh\n${runBody}\n`);
  chmodSync(path.join(src, "run"), 0o755);
  for (const [f, c] of Object.entries(extra)) writeFileSync(path.join(src, f), c);
  const file = path.join(dir, `${name}.tar.gz`);
  execFileSync("tar", ["-czf", file, "-C", src, "."]);
  return image(file);
}
