import path from "node:path";
import { z } from "zod";
import { Region } from "../domain/grant.js";
import { HOST_KEY_FINGERPRINT } from "../domain/instance.js";
import { bootDisksFor, GCE_BOOT_DISK_TYPES } from "./gce-disks.js";
import { parseCidr } from "../util/image-policy.js";

/**
 * The boot TOML, as zod schemas. Every object is strict: a misspelt key is an error, never a
 * silently disabled backend. Secrets are only ever referenced (`*_file` or `*_env`), never inline.
 */

const HostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'must be "host:port"')
  .refine((s) => {
    const port = Number(s.slice(s.lastIndexOf(":") + 1));
    return port >= 0 && port <= 65535;
  }, "port must be 0-65535");

const Path = z.string().min(1, "must be a non-empty path");
const EnvVarName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "must be an environment variable name");
const Name = z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/, "must be lowercase letters, digits and '-'");
const PositiveInt = z.number().int().positive();
const Url = z.string().url();

/** A secret given as a file path or as the name of an environment variable, never inline. */
function secretRef<K extends string>(key: K, required: boolean) {
  const file = `${key}_file` as const;
  const env = `${key}_env` as const;
  return {
    shape: { [file]: Path.optional(), [env]: EnvVarName.optional() } as Record<`${K}_file` | `${K}_env`, z.ZodOptional<z.ZodString>>,
    check(v: Record<string, unknown>, ctx: z.RefinementCtx) {
      const n = (v[file] !== undefined ? 1 : 0) + (v[env] !== undefined ? 1 : 0);
      if (n > 1) ctx.addIssue({ code: "custom", path: [file], message: `give either ${file} or ${env}, not both` });
      if (required && n === 0) ctx.addIssue({ code: "custom", path: [file], message: `required: ${file} (a file holding the secret) or ${env} (an environment variable name)` });
    },
  };
}

const listenerToken = secretRef("token", true);
export const ListenerConfig = z
  .strictObject({
    bind: HostPort,
    ...listenerToken.shape,
    tls_cert_file: Path.optional(),
    tls_key_file: Path.optional(),
    client_ca_file: Path.optional(),
    metrics_bind: HostPort.optional(),
    body_limit_bytes: PositiveInt.max(64 * 1024 * 1024).default(1024 * 1024),
    /** A request (headers and body) must arrive within this; then 408 and the connection closes. */
    request_timeout_seconds: z.number().positive().max(3600).default(60),
    /** The request line and headers must arrive within this (slowloris); at most request_timeout_seconds. */
    headers_timeout_seconds: z.number().positive().max(3600).default(20),
    /** An idle keep-alive connection is closed after this. */
    keep_alive_timeout_seconds: z.number().positive().max(3600).default(5),
  })
  .superRefine((v, ctx) => {
    listenerToken.check(v, ctx);
    if (v.headers_timeout_seconds > v.request_timeout_seconds)
      ctx.addIssue({ code: "custom", path: ["headers_timeout_seconds"], message: "must be at most request_timeout_seconds" });
    if ((v.tls_cert_file === undefined) !== (v.tls_key_file === undefined))
      ctx.addIssue({ code: "custom", path: ["tls_cert_file"], message: "tls_cert_file and tls_key_file go together" });
    if (v.client_ca_file !== undefined && v.tls_cert_file === undefined)
      ctx.addIssue({ code: "custom", path: ["client_ca_file"], message: "client_ca_file needs tls_cert_file and tls_key_file" });
  });

const Cidr = z.string().refine((s) => parseCidr(s) !== null, 'must be an IP address or CIDR block, e.g. "10.0.5.0/24"');

export const BridgeConfig = z.strictObject({
  provider_id: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/, "must be 1-64 characters of A-Z a-z 0-9 . _ -"),
  state_dir: Path,
  /**
   * http(s) image hosts in otherwise refused ranges (loopback, link-local, private, ...) that
   * images may be fetched from; by default only public addresses (src/util/image-policy.ts).
   */
  image_allow_cidrs: z.array(Cidr).default([]),
});

const storeUrl = secretRef("url", false);
/**
 * Where grant state lives (issue #19). `sqlite` (the default): bridge.db in bridge.state_dir, one
 * bridge per state_dir. `postgres`: a PostgreSQL database, its URL (which holds the password) read
 * from `url_file` or `url_env`, never inline.
 */
export const StoreConfig = z
  .strictObject({
    kind: z.enum(["sqlite", "postgres"]).default("sqlite"),
    ...storeUrl.shape,
    /** Connections to PostgreSQL at most for the grants (postgres only); the leases keep 2 more of their own. */
    pool_size: PositiveInt.max(100).default(8),
    /**
     * Replicas sharing one PostgreSQL database (postgres only): a replica that has not renewed its
     * leases for this long loses them, and another takes its grants over. Renewed every third of it.
     */
    lease_ttl_seconds: z.number().min(3, "must be at least 3 (leases are renewed every third of it)").max(600).default(15),
    /** This replica's name on leases, logs and metrics; default: hostname-pid. */
    replica_id: z
      .string()
      .regex(/^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$/, "letters, digits and . _ : - (at most 100), starting with a letter or digit")
      .optional(),
  })
  .superRefine((v, ctx) => {
    storeUrl.check(v, ctx);
    if (v.kind === "postgres" && v.url_file === undefined && v.url_env === undefined)
      ctx.addIssue({ code: "custom", path: ["url_file"], message: 'required with kind = "postgres": url_file (a file holding the postgres:// URL) or url_env (an environment variable name)' });
    if (v.kind === "sqlite" && (v.url_file !== undefined || v.url_env !== undefined))
      ctx.addIssue({ code: "custom", path: [v.url_file !== undefined ? "url_file" : "url_env"], message: 'only for kind = "postgres" (SQLite keeps bridge.db in bridge.state_dir)' });
  });

export const AlmanacConfig = z.strictObject({
  genesis: z.union([z.date(), z.string()]).transform((v, ctx) => {
    const d = v instanceof Date ? v : new Date(v);
    if (!Number.isFinite(d.getTime())) {
      ctx.addIssue({ code: "custom", message: "must be an RFC 3339 date-time, e.g. 2026-01-01T00:00:00Z" });
      return z.NEVER;
    }
    return d;
  }),
  tick_seconds: z.number().positive("must be > 0"),
});

export const LogConfig = z.strictObject({
  level: z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info"),
});

export const NO_BACKENDS =
  "no backends configured — enable at least one of aws / gcp / azure / baremetal in the boot config (or local, for development)";

/** Money per hour (the fleet's currency); at most 6 decimals matter. */
const Price = z.number().nonnegative().finite();

/** Spend caps per UTC day and month, in the fleet's currency (issue #20). */
export const BudgetConfig = z.strictObject({
  per_day: z.number().positive().finite().optional(),
  per_month: z.number().positive().finite().optional(),
});
export type BudgetConfig = z.infer<typeof BudgetConfig>;

/** Price per hour of each shape (instance type, machine type, VM size) a cloud backend may launch. */
const ShapePrices = z.record(z.string().regex(/^[A-Za-z0-9_.-]{1,80}$/, "must be a shape name"), Price);

export const BACKEND_NAMES = ["aws", "gcp", "azure", "baremetal", "local"] as const;
export type BackendName = (typeof BACKEND_NAMES)[number];

export const FleetConfig = z.strictObject({
  order: z.array(z.enum(BACKEND_NAMES)).optional(),
  /** How many backends a grant may try after capacity errors before it fails. */
  max_attempts: PositiveInt.max(10).default(3),
  /** How long a (backend, region, shape) that just reported no capacity is skipped. */
  unavailable_ttl_seconds: z.number().int().nonnegative().default(300),
  /** Provision calls at most in flight per backend and region; accepted grants beyond wait in order. */
  provision_concurrency: PositiveInt.max(1024).default(32),
  /** "ordered": first backend that can take it (operator's order); "cheapest": lowest hourly price, ties by order. */
  policy: z.enum(["ordered", "cheapest"]).default("ordered"),
  /** ISO 4217 code of every price and budget. */
  currency: z.string().regex(/^[A-Z]{3}$/, 'must be an ISO 4217 code like "USD"').default("USD"),
  /** Publish each backend's prices on the ProviderCard. */
  publish_prices: z.boolean().default(false),
  budget: BudgetConfig.optional(),
});

const marketToken = secretRef("token", true);
export const MarketConfig = z
  .strictObject({
    card_url: Url.optional(),
    log_url: Url.optional(),
    ...marketToken.shape,
    retry_max_seconds: z.number().positive().default(300),
  })
  .superRefine((v, ctx) => marketToken.check(v, ctx));

// ---- backends -------------------------------------------------------------------------------

const Timeouts = {
  /** From the create call until the instance is running with an address. */
  launch_timeout_seconds: PositiveInt.default(900),
  /** From running until SSH answers with a banner. */
  ready_timeout_seconds: PositiveInt.default(600),
  /**
   * Once SSH answers, how long to keep reading the serial console for the guest's report of its
   * SSH host key (host_key_sha256); 0 reads it once. Without a report the grant runs anyway, with
   * host_key_sha256 null.
   */
  host_key_timeout_seconds: z.number().nonnegative().default(120),
  poll_interval_seconds: z.number().positive().default(10),
  /** Orphans younger than this are left alone by the sweep (their create may still be recorded). */
  orphan_grace_seconds: z.number().nonnegative().default(600),
  /** How often tagged resources are reconciled against live grants (orphan sweep). */
  reconcile_interval_seconds: z.number().positive().default(300),
  /** Port the readiness probe expects the guest's sshd on. */
  ssh_port: z.number().int().min(1).max(65535).default(22),
};

export const LocalConfig = z.strictObject({
  region: Region,
  cpu_millicores: PositiveInt,
  ram_mib: PositiveInt,
  max_concurrent: PositiveInt,
  poll_interval_ms: PositiveInt.default(200),
  terminate_grace_seconds: z.number().nonnegative().default(5),
  max_image_bytes: PositiveInt.default(1024 * 1024 * 1024),
  /** Price per hour of 1,000 millicores and of 1 GiB allocated (absent: free). */
  price_per_cpu_hour: Price.optional(),
  price_per_gib_hour: Price.optional(),
  budget: BudgetConfig.optional(),
  /** Directories file:// images may be read from; none by default (no file:// images). */
  image_roots: z.array(z.string().regex(/^\//, "must be an absolute path")).default([]),
  /** An image fetch fails when no byte arrives for this long (also the connect timeout). */
  image_idle_timeout_seconds: z.number().positive().default(60),
  /**
   * Where the run directories are (localRunsDir: <state_dir>/local/runs when absent). Replicas on
   * one machine, each with its own state_dir, share one (running as the same user, seeing each
   * other's processes), so that any of them can watch and stop a workload another started: its
   * files are the workloads' state (the supervisor's pids, exit and usage), not a cache.
   */
  runs_dir: z.string().regex(/^\//, "must be an absolute path").optional(),
});

/** The local backend's run directories: `runs_dir`, else under state_dir as before it existed. */
export function localRunsDir(cfg: Pick<LocalConfig, "runs_dir"> | undefined, stateDir: string): string {
  return cfg?.runs_dir ?? path.join(stateDir, "local", "runs");
}

const AwsRegion = z.strictObject({
  image_id: z.string().regex(/^ami-[0-9a-f]{8,17}$/, 'must be an AMI id like "ami-0123456789abcdef0"'),
  subnet_id: z.string().regex(/^subnet-[0-9a-f]{8,17}$/, 'must be a subnet id like "subnet-0123abcd"'),
  security_group_ids: z.array(z.string().regex(/^sg-[0-9a-f]{8,17}$/, 'must be a security group id like "sg-0123abcd"')).min(1),
  key_name: z.string().min(1).optional(),
});

/** A request-rate token bucket: burst size and tokens added per second. */
const RateBucket = z.strictObject({ bucket: PositiveInt, refill_per_second: z.number().positive() });
/**
 * Client-side pacing of EC2 API calls per region and API class, at EC2's documented account
 * buckets by default (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html):
 * non-mutating Describe* 100 / 20 per s; mutating (RunInstances, TerminateInstances) 50 / 5 per s;
 * GetConsoleOutput, in the lowest class, 50 / 5 per s. On top of those, EC2's resource buckets take
 * one token per instance: launched (RunInstances) 1000 / 2 per s, terminated (TerminateInstances)
 * 1000 / 20 per s. Lower them when other tools share the account.
 */
export const AWS_RATE_LIMIT_DEFAULTS = {
  describe: { bucket: 100, refill_per_second: 20 },
  mutate: { bucket: 50, refill_per_second: 5 },
  console: { bucket: 50, refill_per_second: 5 },
  launched_instances: { bucket: 1000, refill_per_second: 2 },
  terminated_instances: { bucket: 1000, refill_per_second: 20 },
};
const AwsRateLimits = z.strictObject({
  describe: RateBucket.default(AWS_RATE_LIMIT_DEFAULTS.describe),
  mutate: RateBucket.default(AWS_RATE_LIMIT_DEFAULTS.mutate),
  console: RateBucket.default(AWS_RATE_LIMIT_DEFAULTS.console),
  launched_instances: RateBucket.default(AWS_RATE_LIMIT_DEFAULTS.launched_instances),
  terminated_instances: RateBucket.default(AWS_RATE_LIMIT_DEFAULTS.terminated_instances),
});

const awsAccessKey = secretRef("access_key_id", false);
const awsSecretKey = secretRef("secret_access_key", false);
export const AwsConfig = z
  .strictObject({
    regions: z.record(Region, AwsRegion).refine((r) => Object.keys(r).length > 0, "at least one region"),
    instance_types: z.array(z.string().regex(/^[a-z0-9]+\.[a-z0-9]+$/, 'must be an instance type like "m6i.large"')).min(1),
    max_concurrent_instances: PositiveInt,
    profile: z.string().min(1).optional(),
    ...awsAccessKey.shape,
    ...awsSecretKey.shape,
    endpoint: Url.optional(),
    tag_prefix: z.string().regex(/^[A-Za-z0-9:._-]{1,64}$/).default("compute-bridge"),
    ssh_user: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/).default("ec2-user"),
    prices: ShapePrices.default({}),
    budget: BudgetConfig.optional(),
    rate_limits: AwsRateLimits.default(AWS_RATE_LIMIT_DEFAULTS),
    ...Timeouts,
  })
  .superRefine((v, ctx) => {
    awsAccessKey.check(v, ctx);
    awsSecretKey.check(v, ctx);
    const hasKeyId = v.access_key_id_file !== undefined || v.access_key_id_env !== undefined;
    const hasSecret = v.secret_access_key_file !== undefined || v.secret_access_key_env !== undefined;
    if (hasKeyId !== hasSecret)
      ctx.addIssue({ code: "custom", path: [hasKeyId ? "secret_access_key_file" : "access_key_id_file"], message: "access_key_id_* and secret_access_key_* go together" });
    if (v.profile !== undefined && hasKeyId)
      ctx.addIssue({ code: "custom", path: ["profile"], message: "give either profile or access_key_id_*/secret_access_key_*, not both" });
    if (v.profile === undefined && !hasKeyId)
      ctx.addIssue({ code: "custom", path: ["profile"], message: "credentials required: profile, or access_key_id_file + secret_access_key_file" });
  });

const MachineShape = z.strictObject({
  name: z.string().regex(/^[A-Za-z0-9_.-]{1,80}$/, "must be a machine type/size name"),
  vcpus: PositiveInt,
  memory_mib: PositiveInt,
});

export const GcpConfig = z.strictObject({
  project: z.string().regex(/^[a-z][a-z0-9-]{4,28}[a-z0-9]$/, "must be a GCP project id"),
  zones: z.array(z.string().regex(/^[a-z]+-[a-z]+[0-9]+-[a-z]$/, 'must be a zone like "us-central1-a"')).min(1),
  machine_types: z.array(MachineShape).default([]),
  tdx_machine_types: z.array(MachineShape).default([]),
  max_concurrent_instances: PositiveInt,
  image: z.string().min(1),
  tdx_image: z.string().min(1).optional(),
  network: z.string().min(1).default("global/networks/default"),
  subnetwork: z.string().min(1).optional(),
  credentials_file: Path,
  api_endpoint: Url.optional(),
  ssh_user: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/).default("compute-bridge"),
  label_prefix: z.string().regex(/^[a-z][a-z0-9_-]{0,30}$/).default("compute-bridge"),
  prices: ShapePrices.default({}),
  budget: BudgetConfig.optional(),
  /** Boot disk type of every instance; GCE's own default (pd-standard) is refused by C3 (every TDX type). */
  boot_disk_type: z.enum(GCE_BOOT_DISK_TYPES).default("pd-balanced"),
  ...Timeouts,
}).superRefine((v, ctx) => {
  for (const [key, list] of [["machine_types", v.machine_types], ["tdx_machine_types", v.tdx_machine_types]] as const)
    list.forEach((m, i) => {
      const ok = bootDisksFor(m.name);
      if (ok && !ok.includes(v.boot_disk_type))
        ctx.addIssue({ code: "custom", path: [key, i, "name"], message: `"${m.name}" cannot boot from boot_disk_type "${v.boot_disk_type}"; its series supports ${ok.join(", ")}` });
    });
  if (v.machine_types.length + v.tdx_machine_types.length === 0)
    ctx.addIssue({ code: "custom", path: ["machine_types"], message: "configure machine_types and/or tdx_machine_types" });
  if (v.tdx_machine_types.length > 0 && v.tdx_image === undefined)
    ctx.addIssue({ code: "custom", path: ["tdx_image"], message: "required when tdx_machine_types is set (a TDX-capable guest image)" });
  v.tdx_machine_types.forEach((m, i) => {
    if (!m.name.startsWith("c3-"))
      ctx.addIssue({ code: "custom", path: ["tdx_machine_types", i, "name"], message: `"${m.name}" is not a TDX machine type (Intel TDX on GCE runs on C3: c3-standard-*, c3-highmem-*, ...)` });
  });
});

/** Intel TDX confidential sizes on Azure: DCesv5/ECesv5 and DCedsv5/ECedsv5 (v5, v6). */
export const AZURE_TDX_SIZE = /^Standard_[DE]C\d+e(d)?s_v[56]$/i;
/** AMD SEV-SNP confidential sizes: DCasv5/DCadsv5/ECasv5/ECadsv5 (and v6). */
export const AZURE_SEV_SNP_SIZE = /^Standard_[DE]C\d+a(d)?s_v[56]$/i;

const AzureImage = z.strictObject({
  publisher: z.string().min(1),
  offer: z.string().min(1),
  sku: z.string().min(1),
  version: z.string().min(1).default("latest"),
});

const AzureSubnetId = z
  .string()
  .regex(/^\/subscriptions\/[^/]+\/resourceGroups\/[^/]+\/providers\/Microsoft\.Network\/virtualNetworks\/[^/]+\/subnets\/[^/]+$/i, "must be a full subnet resource id");

const azureSecret = secretRef("client_secret", false);
export const AzureConfig = z
  .strictObject({
    subscription_id: z.guid("must be a subscription id (GUID)"),
    resource_group: z.string().regex(/^[-\w._()]{1,90}$/, "must be a resource group name"),
    regions: z.array(Region).min(1),
    vm_sizes: z.array(MachineShape).default([]),
    tdx_vm_sizes: z.array(MachineShape).default([]),
    max_concurrent_instances: PositiveInt,
    image: AzureImage,
    confidential_image: AzureImage.optional(),
    /** One subnet (single region) or a table `region = "subnet id"`: a NIC lives in its subnet's region. */
    subnet_id: z.union([AzureSubnetId, z.record(Region, AzureSubnetId)]),
    tenant_id: z.guid("must be a GUID").optional(),
    client_id: z.guid("must be a GUID").optional(),
    ...azureSecret.shape,
    managed_identity: z.boolean().default(false),
    /** A user-assigned identity of the VM, by its client id; without it, the system-assigned one. */
    managed_identity_client_id: z.guid("must be the identity's client id (GUID)").optional(),
    endpoint: Url.optional(),
    authority_host: Url.optional(),
    /** PEM bundle to trust in addition to the system CAs (private endpoints, tests). */
    ca_file: Path.optional(),
    admin_username: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/).default("computebridge"),
    prices: ShapePrices.default({}),
    budget: BudgetConfig.optional(),
    ...Timeouts,
  })
  .superRefine((v, ctx) => {
    azureSecret.check(v, ctx);
    const sp = v.tenant_id !== undefined || v.client_id !== undefined || v.client_secret_file !== undefined || v.client_secret_env !== undefined;
    if (v.managed_identity && sp)
      ctx.addIssue({ code: "custom", path: ["managed_identity"], message: "give either managed_identity = true or tenant_id + client_id + client_secret_file, not both" });
    if (v.managed_identity_client_id !== undefined && !v.managed_identity)
      ctx.addIssue({ code: "custom", path: ["managed_identity_client_id"], message: "names a user-assigned managed identity: set managed_identity = true with it" });
    if (!v.managed_identity) {
      for (const k of ["tenant_id", "client_id"] as const)
        if (v[k] === undefined) ctx.addIssue({ code: "custom", path: [k], message: "required for a service principal (or set managed_identity = true)" });
      if (v.client_secret_file === undefined && v.client_secret_env === undefined)
        ctx.addIssue({ code: "custom", path: ["client_secret_file"], message: "required for a service principal (or set managed_identity = true)" });
    }
    if (v.vm_sizes.length + v.tdx_vm_sizes.length === 0)
      ctx.addIssue({ code: "custom", path: ["vm_sizes"], message: "configure vm_sizes and/or tdx_vm_sizes" });
    v.tdx_vm_sizes.forEach((s, i) => {
      if (AZURE_SEV_SNP_SIZE.test(s.name))
        ctx.addIssue({ code: "custom", path: ["tdx_vm_sizes", i, "name"], message: `"${s.name}" is an AMD SEV-SNP size, not Intel TDX; TDX sizes are DCesv5/ECesv5 and DCedsv5/ECedsv5` });
      else if (!AZURE_TDX_SIZE.test(s.name))
        ctx.addIssue({ code: "custom", path: ["tdx_vm_sizes", i, "name"], message: `"${s.name}" is not an Intel TDX size; TDX sizes are DCesv5/ECesv5 and DCedsv5/ECedsv5` });
    });
    if (typeof v.subnet_id === "string") {
      if (v.regions.length > 1)
        ctx.addIssue({ code: "custom", path: ["subnet_id"], message: `a NIC must be in its subnet's region: with several regions give a table, e.g. subnet_id = { ${v.regions.map((r) => `${r} = "..."`).join(", ")} }` });
    } else {
      for (const r of v.regions) if (!v.subnet_id[r]) ctx.addIssue({ code: "custom", path: ["subnet_id", r], message: `no subnet for region ${r}` });
    }
    if (v.tdx_vm_sizes.length > 0 && v.confidential_image === undefined)
      ctx.addIssue({ code: "custom", path: ["confidential_image"], message: "required when tdx_vm_sizes is set (a confidential-VM image)" });
  });

export const BareMetalMachine = z
  .strictObject({
    name: Name,
    host: z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/, "must be a host name or IP address"),
    port: z.number().int().min(1).max(65535).default(22),
    user: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/, "must be a user name"),
    private_key_file: Path,
    host_key_sha256: z.string().regex(HOST_KEY_FINGERPRINT, 'must be a pinned host key fingerprint as printed by ssh-keygen -lf, "SHA256:..."'),
    region: Region,
    tdx_capable: z.boolean().default(false),
    cpu_millicores: PositiveInt,
    ram_mib: PositiveInt,
    mode: z.enum(["systemd", "virsh"]),
    work_dir: z.string().regex(/^\/[A-Za-z0-9._/-]*$/, "must be an absolute path of plain characters").default("/var/lib/compute-bridge"),
    libvirt_uri: z.string().regex(/^[a-z+]+:\/\/[A-Za-z0-9._/@:-]*$/).default("qemu:///system"),
    ovmf_path: z.string().regex(/^\/[A-Za-z0-9._/-]*$/).optional(),
    /** libvirt network of the guests' NIC; "none" = no NIC (the guests get no address). */
    network: z.string().regex(/^[A-Za-z0-9._-]+$/).default("default"),
    /** libvirt domain type: "kvm", or "qemu" for software emulation (TCG) on hosts without KVM. */
    virt_type: z.enum(["kvm", "qemu"]).default("kvm"),
    /** systemd mode: the (unprivileged) user workloads run as; unset, they run as root. */
    run_as: z.string().regex(/^[a-z_][a-z0-9_-]{0,31}$/, "must be a user name").optional(),
    /** What the machine's capacity costs per hour: per 1,000 millicores and per GiB allocated. */
    price_per_cpu_hour: Price.optional(),
    price_per_gib_hour: Price.optional(),
  })
  .superRefine((m, ctx) => {
    if (m.tdx_capable && m.mode !== "virsh")
      ctx.addIssue({ code: "custom", path: ["tdx_capable"], message: 'TDX guests need mode = "virsh"' });
    if (m.tdx_capable && m.virt_type !== "kvm")
      ctx.addIssue({ code: "custom", path: ["virt_type"], message: 'a TDX machine needs virt_type = "kvm": trust domains run on KVM, "qemu" is software emulation (TCG)' });
    if (m.run_as !== undefined && m.mode !== "systemd")
      ctx.addIssue({ code: "custom", path: ["run_as"], message: 'applies to mode = "systemd" (virsh guests are their own machines)' });
    if (m.tdx_capable && m.ovmf_path === undefined)
      ctx.addIssue({ code: "custom", path: ["ovmf_path"], message: "required for a TDX machine (an OVMF build with TDX support)" });
  });

export const BareMetalConfig = z
  .strictObject({
    machines: z.array(BareMetalMachine).min(1),
    keepalive_interval_ms: PositiveInt.default(15000),
    keepalive_count_max: PositiveInt.default(3),
    connect_timeout_ms: PositiveInt.default(10000),
    max_channels_per_machine: PositiveInt.max(9).default(8),
    poll_interval_ms: PositiveInt.default(1000),
    ready_timeout_seconds: PositiveInt.default(300),
    budget: BudgetConfig.optional(),
  })
  .superRefine((v, ctx) => {
    const seen = new Map<string, number>();
    v.machines.forEach((m, i) => {
      const prev = seen.get(m.name);
      if (prev !== undefined) ctx.addIssue({ code: "custom", path: ["machines", i, "name"], message: `duplicate machine name "${m.name}" (also machines[${prev}])` });
      seen.set(m.name, i);
    });
  });

export const BackendsConfig = z.strictObject({
  aws: AwsConfig.optional(),
  gcp: GcpConfig.optional(),
  azure: AzureConfig.optional(),
  baremetal: BareMetalConfig.optional(),
  local: LocalConfig.optional(),
});

export const BootConfig = z
  .strictObject({
    bridge: BridgeConfig,
    listener: ListenerConfig,
    almanac: AlmanacConfig,
    log: LogConfig.default({ level: "info" }),
    store: StoreConfig.default({ kind: "sqlite", pool_size: 8, lease_ttl_seconds: 15 }),
    fleet: FleetConfig.default({ max_attempts: 3, unavailable_ttl_seconds: 300, provision_concurrency: 32, policy: "ordered", currency: "USD", publish_prices: false }),
    market: MarketConfig.optional(),
    backends: BackendsConfig.default({}),
  })
  .superRefine((v, ctx) => {
    const configured = BACKEND_NAMES.filter((n) => v.backends[n] !== undefined);
    if (configured.length === 0)
      ctx.addIssue({ code: "custom", path: ["backends"], message: NO_BACKENDS });
    const order = v.fleet.order;
    if (order) {
      order.forEach((n, i) => {
        if (v.backends[n] === undefined) ctx.addIssue({ code: "custom", path: ["fleet", "order", i], message: `"${n}" is not configured (no [backends.${n}] section)` });
        if (order.indexOf(n) !== i) ctx.addIssue({ code: "custom", path: ["fleet", "order", i], message: `"${n}" is listed twice` });
      });
      for (const n of configured)
        if (!order.includes(n)) ctx.addIssue({ code: "custom", path: ["fleet", "order"], message: `configured backend "${n}" is missing from the order (list every configured backend)` });
    }
    // Spend caps and the cheapest policy need a price for everything that may be launched.
    const budgeted = v.fleet.budget !== undefined || configured.some((n) => v.backends[n]?.budget !== undefined);
    if (budgeted || v.fleet.policy === "cheapest") {
      const why = budgeted ? "a budget is set" : 'fleet.policy is "cheapest"';
      for (const { path, message } of unpricedShapes(v)) ctx.addIssue({ code: "custom", path, message: `${message} (required because ${why})` });
    }
  });

/** Every shape or machine of the config that has no price, with the config path to give it one. */
export function unpricedShapes(v: { backends: z.infer<typeof BackendsConfig> }): { path: (string | number)[]; message: string }[] {
  const out: { path: (string | number)[]; message: string }[] = [];
  const b = v.backends;
  const shapes = (name: "aws" | "gcp" | "azure", prices: Record<string, number>, list: string[]) => {
    for (const s of list) if (prices[s] === undefined) out.push({ path: ["backends", name, "prices", s], message: `no price_per_hour for ${s}: add ${JSON.stringify(s)} = <price> to [backends.${name}.prices]` });
  };
  if (b.aws) shapes("aws", b.aws.prices, b.aws.instance_types);
  if (b.gcp) shapes("gcp", b.gcp.prices, [...b.gcp.machine_types, ...b.gcp.tdx_machine_types].map((m) => m.name));
  if (b.azure) shapes("azure", b.azure.prices, [...b.azure.vm_sizes, ...b.azure.tdx_vm_sizes].map((m) => m.name));
  b.baremetal?.machines.forEach((m, i) => {
    for (const k of ["price_per_cpu_hour", "price_per_gib_hour"] as const)
      if (m[k] === undefined) out.push({ path: ["backends", "baremetal", "machines", i, k], message: `machine ${m.name} has no ${k}` });
  });
  return out;
}
export type BootConfig = z.infer<typeof BootConfig>;
export type LocalConfig = z.infer<typeof LocalConfig>;
export type AwsConfig = z.infer<typeof AwsConfig>;
export type GcpConfig = z.infer<typeof GcpConfig>;
export type AzureConfig = z.infer<typeof AzureConfig>;
export type BareMetalConfig = z.infer<typeof BareMetalConfig>;
export type BareMetalMachine = z.infer<typeof BareMetalMachine>;
export type MarketConfig = z.infer<typeof MarketConfig>;
export type ListenerConfig = z.infer<typeof ListenerConfig>;
export type StoreConfig = z.infer<typeof StoreConfig>;

/** The fleet order: the operator's, or the default preference among configured backends. */
export function fleetOrder(cfg: BootConfig): BackendName[] {
  return cfg.fleet.order ?? BACKEND_NAMES.filter((n) => cfg.backends[n] !== undefined);
}
