/**
 * GCE boot disk types and the machine series that can boot from them, from Google's machine
 * series pages ("Supported disk types" of each: https://cloud.google.com/compute/docs/general-purpose-machines,
 * .../compute-optimized-machines, .../memory-optimized-machines, .../accelerator-optimized-machines)
 * and https://cloud.google.com/compute/docs/disks#disk-types. An instance inserted without
 * `initializeParams.diskType` gets pd-standard, which the newer series (C3: every Intel TDX
 * type; C4, N4 Hyperdisk only) refuse. Series not listed here are not checked.
 */
export const GCE_BOOT_DISK_TYPES = ["pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced", "hyperdisk-extreme", "hyperdisk-throughput"] as const;
export type GceBootDiskType = (typeof GCE_BOOT_DISK_TYPES)[number];

const PD = ["pd-standard", "pd-balanced", "pd-ssd"] as const;
const C3_LIKE = ["pd-balanced", "pd-ssd", "hyperdisk-balanced", "hyperdisk-extreme", "hyperdisk-throughput"] as const;
const HYPERDISK = ["hyperdisk-balanced", "hyperdisk-extreme", "hyperdisk-throughput"] as const;

/** Machine series (the name before the first "-") -> boot disk types it supports. */
export const GCE_SERIES_DISKS: Readonly<Record<string, readonly GceBootDiskType[]>> = {
  e2: PD,
  n1: PD,
  n2: [...PD, "pd-extreme", "hyperdisk-throughput"],
  n2d: [...PD, "hyperdisk-throughput"],
  t2d: PD,
  t2a: PD,
  c2: PD,
  c2d: PD,
  c3: C3_LIKE,
  c3d: C3_LIKE,
  a3: ["pd-balanced", "pd-ssd", "hyperdisk-balanced", "hyperdisk-extreme"],
  c4: HYPERDISK,
  c4a: HYPERDISK,
  c4d: HYPERDISK,
  n4: ["hyperdisk-balanced", "hyperdisk-throughput"],
};

/** The types `machineType`'s series can boot from, or undefined for a series not in the table. */
export function bootDisksFor(machineType: string): readonly GceBootDiskType[] | undefined {
  return GCE_SERIES_DISKS[machineType.split("-")[0] ?? ""];
}
