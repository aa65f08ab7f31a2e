import os from "node:os";
import type { BackendContext } from "../../src/backends/backend.js";
import { LocalBackend } from "../../src/backends/local.js";
import { OfferingCache } from "../../src/backends/offering-cache.js";
import { Almanac, type ComputeGrant } from "../../src/domain/index.js";
import { systemClock } from "../../src/util/clock.js";
import { ImagePolicy } from "../../src/util/image-policy.js";
import { createLogger } from "../../src/util/logger.js";

/** Genesis at the epoch and 1 ms ticks: valid_to in ticks is simply a wall-clock ms timestamp. */
export const MS_ALMANAC = new Almanac(new Date(0), 0.001);

/** For tests whose image servers listen on loopback: a backend context that may fetch from there. */
export const loopbackImages = (): Partial<BackendContext> => ({ imagePolicy: new ImagePolicy({ fileRoots: [os.tmpdir()], allowCidrs: ["127.0.0.0/8"] }) });

export function localBackend(stateDir: string, over: Partial<ConstructorParameters<typeof LocalBackend>[0]> = {}, ctx: Partial<BackendContext> = {}) {
  return new LocalBackend(
    { region: "local", cpu_millicores: 4000, ram_mib: 4096, max_concurrent: 50, poll_interval_ms: 20, terminate_grace_seconds: 1, max_image_bytes: 64 * 1024 * 1024, image_roots: [os.tmpdir()], ...over },
    { providerId: "test", stateDir, configDir: stateDir, log: createLogger("silent"), clock: systemClock, almanac: MS_ALMANAC, unavailable: new OfferingCache(1000, systemClock), ...ctx },
  );
}

export function localGrant(id: string, validInMs = 60_000, over: Partial<ComputeGrant> = {}): ComputeGrant {
  return { request_id: id, region: "local", tdx_required: false, cpu_millicores: 500, ram_mib: 256, valid_to: Date.now() + validInMs, ...over };
}
