import { pino, type Logger, type LoggerOptions, type DestinationStream } from "pino";
import { knownSecrets } from "../config/secrets.js";

export type { Logger };

/** Paths that may carry secrets; pino replaces them before serialising. */
export const REDACT_PATHS = [
  "private_key",
  "*.private_key",
  "token",
  "*.token",
  "password",
  "*.password",
  "secret",
  "*.secret",
  "authorization",
  "*.authorization",
  "req.headers.authorization",
  "req.headers.cookie",
  "headers.authorization",
  "*.headers.authorization",
  "*.secretAccessKey",
  "*.accessKeyId",
  "*.client_secret",
  "*.sessionToken",
  "connectionString",
  "*.connectionString",
];

/**
 * Replace any secret value the bridge has read (tokens, cloud keys) wherever it appears in a
 * line: a last line of defence behind path redaction, for values that end up inside messages.
 */
export function scrubSecrets(line: string): string {
  let out = line;
  for (const s of knownSecrets()) {
    if (out.includes(s)) out = out.split(s).join("[REDACTED]");
    const escaped = JSON.stringify(s).slice(1, -1);
    if (escaped !== s && out.includes(escaped)) out = out.split(escaped).join("[REDACTED]");
  }
  return out;
}

/** `replica`: on every line when given (several replicas share one database: whose line is it). */
export function createLogger(level: string, destination?: DestinationStream, replica?: string): Logger {
  const opts: LoggerOptions = {
    level,
    base: { service: "compute-bridge", ...(replica !== undefined ? { replica } : {}) },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: { paths: REDACT_PATHS, censor: "[REDACTED]" },
    formatters: { level: (label) => ({ level: label }) },
    hooks: { streamWrite: scrubSecrets },
  };
  return destination ? pino(opts, destination) : pino(opts, pino.destination({ fd: 1, sync: false }));
}
