/**
 * A VM's serial console log through boot diagnostics: ARM hands out a short-lived SAS URL for the
 * blob (retrieveBootDiagnosticsData), which is then fetched, keeping its last MiB.
 */
import https from "node:https";
import type { ComputeManagementClient } from "@azure/arm-compute";
import { abortError } from "../../util/clock.js";
import { BackendError, TransientError } from "../backend.js";
import { ConsoleUnavailableError } from "../common/ssh-ready.js";
import { describeArmError, isBootDiagnosticsDisabled } from "./errors.js";

/** Serial console bytes read when looking for a marker (the end of the log is kept). */
const MAX_SERIAL_LOG_BYTES = 8 * 1024 * 1024;
const SERIAL_TAIL_BYTES = 1024 * 1024;

export interface SerialLogRead {
  compute: ComputeManagementClient;
  resourceGroup: string;
  vmName: string;
  agent: https.Agent;
  /** The caller's signal: its abort is passed through as an AbortError. */
  signal: AbortSignal;
  timeoutMs: number;
  mapError(e: unknown, what: string): BackendError;
  backend: string;
}

/**
 * The log's last MiB as text. A blob that does not exist yet (nothing written so far) is empty
 * text. Rejects with ConsoleUnavailableError when the log can never be read (boot diagnostics
 * disabled on the VM, no serial log offered), with a TransientError for a failed blob read worth
 * retrying (429, 5xx, a dropped connection), a BackendError otherwise, an AbortError on `signal`.
 */
export async function readSerialLog(o: SerialLogRead): Promise<string> {
  const bounded = AbortSignal.any([o.signal, AbortSignal.timeout(o.timeoutMs)]);
  const what = `reading the serial console of VM ${o.vmName}`;
  let url: string | undefined;
  try {
    const uris = await o.compute.virtualMachines.retrieveBootDiagnosticsData(o.resourceGroup, o.vmName, { sasUriExpirationTimeInMinutes: 5, abortSignal: bounded });
    url = uris.serialConsoleLogBlobUri;
  } catch (e) {
    if (o.signal.aborted) throw abortError(o.signal);
    // Our VMs are created with boot diagnostics on; an adopted or hand-edited one may have them
    // off, and no amount of retrying makes its console readable.
    if (isBootDiagnosticsDisabled(e)) throw new ConsoleUnavailableError(`boot diagnostics are not enabled on VM ${o.vmName} (${describeArmError(e).message})`);
    throw o.mapError(e, what);
  }
  if (!url) throw new ConsoleUnavailableError(`ARM offers no serial console log for VM ${o.vmName}`);
  try {
    return await fetchBlobTail(url, o.agent, bounded, o.timeoutMs);
  } catch (e) {
    if (o.signal.aborted) throw abortError(o.signal);
    if (e instanceof BlobError) throw e.transient ? new TransientError(`azure: ${what}: ${e.message}`, o.backend) : new BackendError(`azure: ${what}: ${e.message}`, o.backend);
    throw e;
  }
}

/** A failed read of a boot-diagnostics blob (never carries the SAS URL). */
class BlobError extends Error {
  override name = "BlobError";
  constructor(
    message: string,
    readonly transient: boolean,
  ) {
    super(message);
  }
}

/** GET a boot-diagnostics blob (a SAS URL: never logged) and return its last MiB as text. */
function fetchBlobTail(url: string, agent: https.Agent, signal: AbortSignal, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    if (u.protocol !== "https:") return reject(new ConsoleUnavailableError("the serial console log URL ARM gave is not https"));
    const req = https.get(u, { signal, agent, timeout: timeoutMs, headers: { "x-ms-version": "2021-08-06" } }, (res) => {
      const status = res.statusCode ?? 0;
      // Boot diagnostics create the blob on the guest's first console output: until then the
      // log is empty, not unreadable.
      if (status === 404) {
        res.resume();
        return resolve("");
      }
      if (status !== 200) {
        res.resume();
        return reject(new BlobError(`the boot diagnostics blob answered HTTP ${status}`, status === 429 || status >= 500));
      }
      const chunks: Buffer[] = [];
      let kept = 0;
      let total = 0;
      res.on("data", (chunk: Buffer) => {
        total += chunk.length;
        if (total > MAX_SERIAL_LOG_BYTES) return res.destroy(new BlobError("the serial console log is larger than 8 MiB", false));
        chunks.push(chunk);
        kept += chunk.length;
        while (kept - (chunks[0]?.length ?? 0) >= SERIAL_TAIL_BYTES) kept -= chunks.shift()!.length;
      });
      res.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
      res.on("error", (e) => reject(e instanceof BlobError ? e : new BlobError(`reading the boot diagnostics blob failed: ${(e as NodeJS.ErrnoException).code ?? e.name}`, true)));
    });
    req.on("timeout", () => req.destroy(new BlobError("the boot diagnostics blob did not answer in time", true)));
    // Never put the URL in a message: its query string is a SAS credential.
    req.on("error", (e) => reject(e instanceof BlobError ? e : new BlobError(`fetching the boot diagnostics blob failed: ${(e as NodeJS.ErrnoException).code ?? e.name}`, true)));
  });
}
