/** vCPUs and memory of the EC2 instance types the bridge knows (on-demand, current generation). */
export interface InstanceShape {
  vcpus: number;
  memory_mib: number;
}

const GIB = 1024;
const SIZE_VCPUS: Record<string, number> = {
  medium: 1, large: 2, xlarge: 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "9xlarge": 36, "12xlarge": 48,
  "16xlarge": 64, "18xlarge": 72, "24xlarge": 96, "32xlarge": 128, "48xlarge": 192,
};
const STD = ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge"];
const TO32 = [...STD, "32xlarge"];
const TO48 = [...TO32, "48xlarge"];
const I7 = [...STD, "48xlarge"];
const A7 = ["medium", ...TO48];
const GRAVITON = ["medium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"];
/** family -> [GiB per vCPU, sizes] for the fixed-ratio families. */
const FAMILIES: Record<string, [number, string[]]> = {
  m5: [4, STD], m5a: [4, STD], m6i: [4, TO32], m6a: [4, TO48], m7i: [4, I7], m7a: [4, A7], m6g: [4, GRAVITON], m7g: [4, GRAVITON],
  c5: [2, ["large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "12xlarge", "18xlarge", "24xlarge"]], c5a: [2, STD], c6i: [2, TO32], c6a: [2, TO48], c7i: [2, I7], c7a: [2, A7], c6g: [2, GRAVITON], c7g: [2, GRAVITON],
  r5: [8, STD], r5a: [8, STD], r6i: [8, TO32], r6a: [8, TO48], r7i: [8, I7], r7a: [8, A7], r6g: [8, GRAVITON], r7g: [8, GRAVITON],
};
const BURSTABLE: Record<string, [number, number]> = {
  nano: [2, 0.5], micro: [2, 1], small: [2, 2], medium: [2, 4], large: [2, 8], xlarge: [4, 16], "2xlarge": [8, 32],
};

export const AWS_INSTANCE_TYPES: Readonly<Record<string, InstanceShape>> = Object.freeze(
  (() => {
    const t: Record<string, InstanceShape> = {};
    for (const [family, [ratio, sizes]] of Object.entries(FAMILIES))
      for (const size of sizes) t[`${family}.${size}`] = { vcpus: SIZE_VCPUS[size]!, memory_mib: SIZE_VCPUS[size]! * ratio * GIB };
    for (const family of ["t3", "t3a", "t4g"])
      for (const [size, [vcpus, gib]] of Object.entries(BURSTABLE)) t[`${family}.${size}`] = { vcpus, memory_mib: gib * GIB };
    return t;
  })(),
);

/** The families the table covers, for error messages. */
export const AWS_FAMILIES: readonly string[] = [...Object.keys(FAMILIES), "t3", "t3a", "t4g"];
