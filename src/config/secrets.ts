import { readFileSync } from "node:fs";
import path from "node:path";

/** Every secret value the bridge has read; logs are scrubbed of these (see util/logger.ts). */
const known = new Set<string>();

export function knownSecrets(): ReadonlySet<string> {
  return known;
}

export function registerSecret(value: string): void {
  if (value.length >= 6) known.add(value);
}

export class SecretError extends Error {
  override name = "SecretError";
}

/**
 * Read a secret referenced by `<key>_file` or `<key>_env` in the config. The value is registered
 * for log redaction; the error names the config key, never the value.
 */
export function readSecret(
  baseDir: string,
  key: string,
  ref: { file?: string | undefined; env?: string | undefined },
): string {
  let value: string;
  if (ref.file !== undefined) {
    const p = path.resolve(baseDir, ref.file);
    try {
      value = readFileSync(p, "utf8").trim();
    } catch (e) {
      throw new SecretError(`${key}_file: cannot read ${p}: ${(e as NodeJS.ErrnoException).code ?? "error"}`);
    }
    if (!value) throw new SecretError(`${key}_file: ${p} is empty`);
  } else if (ref.env !== undefined) {
    const v = process.env[ref.env];
    if (v === undefined || v.trim() === "") throw new SecretError(`${key}_env: environment variable ${ref.env} is not set`);
    value = v.trim();
  } else {
    throw new SecretError(`${key}: no ${key}_file or ${key}_env given`);
  }
  registerSecret(value);
  return value;
}
