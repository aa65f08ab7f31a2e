/**
 * doctor's read-only placement checks of the gcp backend (issue 18, item 6): what GCE would
 * otherwise refuse only at insert time, checked against the config. Each CheckResult names what
 * it checked and, on failure, the config key to fix.
 *
 * - every zone of `backends.gcp.zones` exists and is UP (`zones.get`);
 * - every machine type of `machine_types` / `tdx_machine_types` is offered in the configured
 *   zones (`machineTypes.get`, 404 = not offered there): usable when at least one zone offers it
 *   (the zones lacking it are named), a failure when none does;
 * - `image` and `tdx_image` exist and are READY (`images.get`, or `images.getFromFamily` for a
 *   family URL), and `tdx_image` has the TDX_CAPABLE guest OS feature.
 *
 * What no read-only call tells (whether a zone offers TDX on C3, capacity) stays with the insert:
 * a PlacementError / CapacityError moves to the next zone, an ImageUnfitError fails over.
 */
import type { protos } from "@google-cloud/compute";
import type { GcpConfig } from "../../config/schema.js";
import { BackendError, NotFoundError, type CheckResult } from "../backend.js";
import type { GceApi } from "./api.js";
import { redact } from "./errors.js";
import { lastSegment } from "./naming.js";

type IImage = protos.google.cloud.compute.v1.IImage;

/** An image as `initializeParams.sourceImage` names it: an image by name, or the newest of a family. */
export interface ImageRef {
  project: string;
  kind: "image" | "family";
  name: string;
}

/**
 * Parse `projects/P/global/images/NAME`, `projects/P/global/images/family/F`, the same as a full
 * `https://www.googleapis.com/compute/v1/...` URL, or `global/images/...` (in `project`), the
 * forms GCE documents for `initializeParams.sourceImage`; anything else is null.
 */
export function parseImageRef(value: string, project: string): ImageRef | null {
  const m = /^(?:https:\/\/[a-z0-9.-]+\/compute\/v1\/)?(?:projects\/([a-z0-9][a-z0-9.:-]*)\/)?global\/images\/(?:(family)\/)?([a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)$/.exec(value);
  if (!m) return null;
  return { project: m[1] ?? project, kind: m[2] ? "family" : "image", name: m[3]! };
}

const why = (e: unknown) => (e instanceof BackendError ? e.message : redact(e instanceof Error ? e.message : String(e)));

export async function placementChecks(api: GceApi, cfg: GcpConfig): Promise<CheckResult[]> {
  const project = cfg.project;
  const zoneKey = "backends.gcp.zones";

  // Zones, in config order.
  const zones = [...new Set(cfg.zones)];
  const existing: string[] = [];
  const zoneResults = await Promise.all(
    zones.map(async (zone): Promise<CheckResult> => {
      const check = `zone ${zone}`;
      try {
        const [z] = await api.catalogueCall(`zones.get ${zone}`, (c) => c.zones.get({ project, zone }));
        existing.push(zone);
        const status = String(z.status ?? "UNKNOWN");
        if (status !== "UP") return { check, ok: false, detail: `status ${status}: GCE does not place instances in it now; remove it from ${zoneKey} or wait until it is UP` };
        const dep = z.deprecated?.state ? `; deprecated (${z.deprecated.state})` : "";
        return { check, ok: true, detail: `UP (region ${lastSegment(z.region ?? "") || "?"})${dep}` };
      } catch (e) {
        if (e instanceof NotFoundError) return { check, ok: false, detail: `GCE has no such zone (404); fix ${zoneKey}` };
        existing.push(zone); // unknown: still look for machine types there
        return { check, ok: false, detail: `could not read it: ${why(e)}` };
      }
    }),
  );
  const zonesToProbe = zones.filter((z) => existing.includes(z));

  // Machine types, per list (a type in both lists gets a line for each key).
  const typeResults: CheckResult[] = [];
  for (const [list, key, label] of [
    [cfg.machine_types, "backends.gcp.machine_types", "machine type"],
    [cfg.tdx_machine_types, "backends.gcp.tdx_machine_types", "tdx machine type"],
  ] as const) {
    for (const shape of list) typeResults.push(await machineTypeCheck(api, project, shape, zonesToProbe, `${label} ${shape.name}`, key));
  }

  // Images.
  const imageResults = [await imageCheck(api, project, cfg.image, "image", "backends.gcp.image", false)];
  if (cfg.tdx_image !== undefined) imageResults.push(await imageCheck(api, project, cfg.tdx_image, "tdx_image", "backends.gcp.tdx_image", true));

  return [...zoneResults, ...typeResults, ...imageResults];
}

async function machineTypeCheck(api: GceApi, project: string, shape: { name: string; vcpus: number; memory_mib: number }, zones: readonly string[], check: string, key: string): Promise<CheckResult> {
  const offered: string[] = [];
  const lacking: string[] = [];
  const unknown: string[] = [];
  const sizes: { cpus: number; memoryMb: number }[] = [];
  await Promise.all(
    zones.map(async (zone) => {
      try {
        const [mt] = await api.catalogueCall(`machineTypes.get ${zone}/${shape.name}`, (c) => c.machineTypes.get({ project, zone, machineType: shape.name }));
        offered.push(zone);
        if (typeof mt.guestCpus === "number" && typeof mt.memoryMb === "number") sizes.push({ cpus: mt.guestCpus, memoryMb: mt.memoryMb });
      } catch (e) {
        if (e instanceof NotFoundError) lacking.push(zone);
        else unknown.push(`${zone}: ${why(e)}`);
      }
    }),
  );
  const inOrder = (l: string[]) => zones.filter((z) => l.includes(z));
  const unchecked = unknown.length > 0 ? `could not check ${unknown.sort().join("; ")}` : null;
  if (offered.length === 0) {
    if (zones.length === 0) return { check, ok: false, detail: "no configured zone exists to offer it; fix backends.gcp.zones" };
    if (lacking.length === 0) return { check, ok: false, detail: unchecked! };
    return { check, ok: false, detail: [`offered in none of the configured zones (not in ${inOrder(lacking).join(", ")})`, unchecked, `fix ${key} or backends.gcp.zones`].filter(Boolean).join("; ") };
  }
  const lackingNote = lacking.length > 0 ? `not offered in ${inOrder(lacking).join(", ")} (an insert there moves on to the next zone)` : null;
  // GCE's own size: the config's vcpus / memory_mib decide which grants fit the type.
  const s = sizes[0];
  if (s && (shape.vcpus > s.cpus || shape.memory_mib > s.memoryMb))
    return { check, ok: false, detail: `the config says ${shape.vcpus} vCPUs / ${shape.memory_mib} MiB, GCE's ${shape.name} has ${s.cpus} vCPUs / ${s.memoryMb} MiB: grants larger than the VM would be placed on it; fix vcpus / memory_mib in ${key}` };
  return { check, ok: true, detail: [`offered in ${inOrder(offered).join(", ")}`, lackingNote, unchecked].filter(Boolean).join("; ") };
}

async function imageCheck(api: GceApi, project: string, value: string, check: string, key: string, tdx: boolean): Promise<CheckResult> {
  const ref = parseImageRef(value, project);
  if (!ref) return { check, ok: false, detail: `${JSON.stringify(value)} is not an image GCE can boot from (expected projects/PROJECT/global/images/NAME or projects/PROJECT/global/images/family/FAMILY); fix ${key}` };
  let image: IImage;
  try {
    [image] =
      ref.kind === "family"
        ? await api.catalogueCall(`images.getFromFamily ${ref.project}/${ref.name}`, (c) => c.images.getFromFamily({ project: ref.project, family: ref.name }))
        : await api.catalogueCall(`images.get ${ref.project}/${ref.name}`, (c) => c.images.get({ project: ref.project, image: ref.name }));
  } catch (e) {
    if (e instanceof NotFoundError) return { check, ok: false, detail: `${value}: no such image${ref.kind === "family" ? " family" : ""} (or not visible to the service account); fix ${key}` };
    return { check, ok: false, detail: `could not read ${value}: ${why(e)}` };
  }
  const name = image.name ?? ref.name;
  const status = String(image.status ?? "UNKNOWN");
  if (status !== "READY") return { check, ok: false, detail: `${value} (${name}) is ${status}, not READY; fix ${key}` };
  const deprecated = image.deprecated?.state ? String(image.deprecated.state) : null;
  if (deprecated === "OBSOLETE" || deprecated === "DELETED") return { check, ok: false, detail: `${value} (${name}) is ${deprecated}: GCE refuses new disks from it; fix ${key}` };
  const features = (image.guestOsFeatures ?? []).map((f) => String(f.type ?? ""));
  const resolved = ref.kind === "family" ? ` -> ${name}` : "";
  if (tdx && !features.includes("TDX_CAPABLE"))
    return { check, ok: false, detail: `${value}${resolved} lacks the TDX_CAPABLE guest OS feature: GCE refuses TDX instances from it; fix ${key} (a TDX-capable image, e.g. a recent Ubuntu LTS)` };
  return { check, ok: true, detail: `${value}${resolved} READY${tdx ? ", TDX_CAPABLE" : ""}${deprecated ? ` (${deprecated})` : ""}` };
}
