import { readFileSync } from "node:fs";
import path from "node:path";
import { parse as parseToml, TomlError } from "smol-toml";
import type { z } from "zod";
import { BootConfig } from "./schema.js";

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: string[],
  ) {
    super(`invalid boot config ${file}:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
    this.name = "ConfigError";
  }
}

export interface LoadedConfig {
  config: BootConfig;
  /** Absolute path of the TOML file; relative paths in it are resolved against its directory. */
  file: string;
  dir: string;
}

/** `backends.aws.regions[1]` style path for a zod issue path. */
export function formatPath(p: ReadonlyArray<PropertyKey>): string {
  let out = "";
  for (const seg of p) {
    if (typeof seg === "number") out += `[${seg}]`;
    else {
      const s = String(seg);
      const plain = /^[A-Za-z0-9_-]+$/.test(s);
      out += plain ? (out ? `.${s}` : s) : `[${JSON.stringify(s)}]`;
    }
  }
  return out || "(root)";
}

const SECRETISH = /(secret|token|password|passwd|private_key|access_key|credential)s?$|^url$/i;

/** Human messages for zod issues, each naming the key path. */
export function formatIssues(error: z.ZodError): string[] {
  const out: string[] = [];
  for (const issue of error.issues) {
    if (issue.code === "unrecognized_keys") {
      for (const key of issue.keys) {
        const where = formatPath([...issue.path, key]);
        const hint = SECRETISH.test(key)
          ? ` (secrets are never inline: use ${key}_file = "/path" or ${key}_env = "VAR")`
          : "";
        out.push(`${where}: unknown key${hint}`);
      }
      continue;
    }
    if (issue.code === "invalid_type" && issue.input === undefined) {
      out.push(`${formatPath(issue.path)}: required (${issue.expected})`);
      continue;
    }
    out.push(`${formatPath(issue.path)}: ${issue.message}`);
  }
  return out;
}

export function parseConfigText(text: string, file: string): BootConfig {
  let raw: unknown;
  try {
    raw = parseToml(text);
  } catch (e) {
    if (e instanceof TomlError) throw new ConfigError(file, [`TOML syntax error at line ${e.line}, column ${e.column}: ${e.message.split("\n")[0]}`]);
    throw e;
  }
  const parsed = BootConfig.safeParse(raw, { reportInput: true });
  if (!parsed.success) throw new ConfigError(file, formatIssues(parsed.error));
  return parsed.data;
}

export function loadConfig(file: string): LoadedConfig {
  const abs = path.resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, "utf8");
  } catch (e) {
    throw new ConfigError(abs, [`cannot read the config file: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`]);
  }
  const config = parseConfigText(text, abs);
  return { config, file: abs, dir: path.dirname(abs) };
}

/** Resolve a path from the config against the config file's directory. */
export function resolveFromConfig(loaded: Pick<LoadedConfig, "dir">, p: string): string {
  return path.resolve(loaded.dir, p);
}
