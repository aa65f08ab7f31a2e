import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { ConfigError, parseConfigText } from "../../src/config/load.js";
import { localRunsDir } from "../../src/config/schema.js";
import { configDigest } from "../../src/fleet/card.js";

const BASE = `
[bridge]
provider_id = "p1"
state_dir = "/tmp/x"

[listener]
bind = "127.0.0.1:8787"
token_file = "token"

[almanac]
genesis = 2026-01-01T00:00:00Z
tick_seconds = 1
`;
const LOCAL = `
[backends.local]
region = "local"
cpu_millicores = 1000
ram_mib = 1024
max_concurrent = 2
`;
/** An Azure section without credentials, for the credential cases to complete. */
const AZURE_ONE_REGION = `
[backends.azure]
subscription_id = "00000000-0000-0000-0000-000000000000"
resource_group = "rg"
regions = ["westeurope"]
vm_sizes = [{ name = "Standard_D2s_v5", vcpus = 2, memory_mib = 8192 }]
max_concurrent_instances = 1
image = { publisher = "a", offer = "b", sku = "c" }
subnet_id = "/subscriptions/x/resourceGroups/y/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
`;
const AWS = `
[backends.aws]
instance_types = ["m6i.large"]
max_concurrent_instances = 2
access_key_id_file = "k"
secret_access_key_file = "s"
[backends.aws.regions.us-east-1]
image_id = "ami-0123456789abcdef0"
subnet_id = "subnet-0123abcd"
security_group_ids = ["sg-0123abcd"]
`;

function problems(text: string): string[] {
  try {
    parseConfigText(text, "test.toml");
  } catch (e) {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${String(e)}`);
    return e.problems;
  }
  assert.fail("config was accepted");
}

function expectProblem(text: string, ...fragments: string[]) {
  const ps = problems(text);
  for (const f of fragments) assert.ok(ps.some((p) => p.includes(f)), `expected a problem containing ${JSON.stringify(f)}; got:\n${ps.join("\n")}`);
}

describe("boot config", () => {
  it("accepts the shipped dev and example configs", () => {
    for (const f of ["config/dev.toml", "config/example.toml"]) parseConfigText(readFileSync(f, "utf8"), f);
  });

  it("prices: a budget or the cheapest policy needs a price for every shape and machine, named by its path", () => {
    expectProblem(BASE + "[fleet.budget]\nper_day = 100\n" + AWS, 'backends.aws.prices["m6i.large"]: no price_per_hour for m6i.large: add "m6i.large" = <price> to [backends.aws.prices] (required because a budget is set)');
    expectProblem(BASE + '[fleet]\npolicy = "cheapest"\n' + AWS, 'required because fleet.policy is "cheapest"');
    expectProblem(BASE + AWS.replace("[backends.aws.regions", "[backends.aws.budget]\nper_month = 10\n[backends.aws.regions"), "no price_per_hour for m6i.large");
    const ok = parseConfigText(BASE + "[fleet.budget]\nper_day = 100\n" + AWS.replace("[backends.aws.regions", '[backends.aws.prices]\n"m6i.large" = 0.096\n[backends.aws.regions'), "t");
    assert.equal(ok.backends.aws?.prices["m6i.large"], 0.096);
    assert.equal(ok.fleet.currency, "USD");
    // Without budgets or the cheapest policy, prices are optional (and local is free by default).
    parseConfigText(BASE + AWS, "t");
    parseConfigText(BASE + "[fleet.budget]\nper_day = 1\n" + LOCAL, "t");
    expectProblem(BASE + '[fleet]\ncurrency = "usd"\n' + LOCAL, "fleet.currency");
    expectProblem(BASE + "[fleet.budget]\nper_day = -1\n" + LOCAL, "fleet.budget.per_day");
  });

  it("prices and budgets stay out of the card's config digest", () => {
    const plain = parseConfigText(BASE + AWS, "t");
    const priced = parseConfigText(BASE + AWS.replace("[backends.aws.regions", '[backends.aws.prices]\n"m6i.large" = 0.096\n[backends.aws.budget]\nper_day = 5\n[backends.aws.regions'), "t");
    assert.equal(configDigest(priced), configDigest(plain));
  });

  it("applies defaults", () => {
    const c = parseConfigText(BASE + LOCAL, "t");
    assert.equal(c.log.level, "info");
    assert.equal(c.fleet.max_attempts, 3);
    assert.equal(c.listener.body_limit_bytes, 1024 * 1024);
    assert.equal(c.backends.local?.poll_interval_ms, 200);
    assert.equal(localRunsDir(c.backends.local, "/var/lib/cb"), "/var/lib/cb/local/runs", "runs under state_dir, as before runs_dir");
    const shared = parseConfigText(BASE + LOCAL + 'runs_dir = "/srv/cb-runs"\n', "t");
    assert.equal(localRunsDir(shared.backends.local, "/var/lib/cb"), "/srv/cb-runs");
  });

  const cases: [string, string, string[]][] = [
    ["no backends", BASE, ["backends: no backends configured — enable at least one of aws / gcp / azure / baremetal in the boot config"]],
    ["TOML syntax error", BASE + "[backends.local\n", ["TOML syntax error at line"]],
    ["missing [bridge]", BASE.replace(/\[bridge\][^[]*/, "") + LOCAL, ["bridge: required"]],
    ["unknown top-level key", BASE + LOCAL + "\n[bridges]\nx = 1\n", ["bridges: unknown key"]],
    ["typo in a backend key", BASE + LOCAL.replace("max_concurrent", "max_concurent"), ["backends.local.max_concurent: unknown key", "backends.local.max_concurrent: required"]],
    ["unknown backend section", BASE + LOCAL + "\n[backends.awz]\nregions = []\n", ["backends.awz: unknown key"]],
    ["inline secret", BASE.replace('token_file = "token"', 'token = "hunter2"') + LOCAL, ["listener.token: unknown key (secrets are never inline", "listener.token_file: required"]],
    ["both token_file and token_env", BASE.replace('token_file = "token"', 'token_file = "t"\ntoken_env = "T"') + LOCAL, ["listener.token_file: give either token_file or token_env, not both"]],
    ["bad bind", BASE.replace("127.0.0.1:8787", "localhost") + LOCAL, ['listener.bind: must be "host:port"']],
    ["wrong type", BASE + LOCAL.replace("cpu_millicores = 1000", 'cpu_millicores = "lots"'), ["backends.local.cpu_millicores:"]],
    ["negative number", BASE + LOCAL.replace("ram_mib = 1024", "ram_mib = -5"), ["backends.local.ram_mib:"]],
    ["bad tick_seconds", BASE.replace("tick_seconds = 1", "tick_seconds = 0") + LOCAL, ["almanac.tick_seconds: must be > 0"]],
    ["bad genesis", BASE.replace("2026-01-01T00:00:00Z", '"yesterday"') + LOCAL, ["almanac.genesis: must be an RFC 3339 date-time"]],
    ["bad region in aws array position", BASE + AWS.replace('security_group_ids = ["sg-0123abcd"]', 'security_group_ids = ["sg-0123abcd", "default"]'), ['backends.aws.regions.us-east-1.security_group_ids[1]: must be a security group id']],
    ["aws without credentials", BASE + AWS.replace('access_key_id_file = "k"\nsecret_access_key_file = "s"\n', ""), ["backends.aws.profile: credentials required"]],
    ["aws half credentials", BASE + AWS.replace('secret_access_key_file = "s"\n', ""), ["backends.aws.secret_access_key_file: access_key_id_* and secret_access_key_* go together"]],
    ["fleet order names an unconfigured backend", BASE + LOCAL + '\n[fleet]\norder = ["local", "gcp"]\n', ['fleet.order[1]: "gcp" is not configured']],
    ["fleet order misses a configured backend", BASE + LOCAL + AWS + '\n[fleet]\norder = ["local"]\n', ['fleet.order: configured backend "aws" is missing from the order']],
    ["fleet order unknown name", BASE + LOCAL + '\n[fleet]\norder = ["locl"]\n', ["fleet.order[0]:"]],
    [
      "azure SEV-SNP size as TDX",
      BASE +
        `[backends.azure]
subscription_id = "00000000-0000-0000-0000-000000000000"
resource_group = "rg"
regions = ["westeurope"]
tdx_vm_sizes = [{ name = "Standard_DC4as_v5", vcpus = 4, memory_mib = 16384 }]
max_concurrent_instances = 1
image = { publisher = "a", offer = "b", sku = "c" }
confidential_image = { publisher = "a", offer = "b", sku = "c" }
subnet_id = "/subscriptions/x/resourceGroups/y/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
managed_identity = true
`,
      ['backends.azure.tdx_vm_sizes[0].name: "Standard_DC4as_v5" is an AMD SEV-SNP size, not Intel TDX'],
    ],
    [
      "baremetal TDX machine in systemd mode, unpinned host key",
      BASE +
        `[[backends.baremetal.machines]]
name = "m1"
host = "10.0.0.1"
user = "bridge"
private_key_file = "k"
host_key_sha256 = "deadbeef"
region = "r"
tdx_capable = true
cpu_millicores = 1000
ram_mib = 1024
mode = "systemd"
`,
      ["backends.baremetal.machines[0].host_key_sha256: must be a pinned host key fingerprint", 'backends.baremetal.machines[0].tdx_capable: TDX guests need mode = "virsh"'],
    ],
    [
      "bare-metal run_as on a virsh machine, and not a user name",
      BASE +
        `[[backends.baremetal.machines]]
name = "m1"
host = "10.0.0.1"
user = "bridge"
private_key_file = "k"
host_key_sha256 = "SHA256:${"A".repeat(43)}"
region = "r"
cpu_millicores = 1000
ram_mib = 1024
mode = "virsh"
run_as = "cbwork"

[[backends.baremetal.machines]]
name = "m2"
host = "10.0.0.2"
user = "bridge"
private_key_file = "k"
host_key_sha256 = "SHA256:${"A".repeat(43)}"
region = "r"
cpu_millicores = 1000
ram_mib = 1024
mode = "systemd"
run_as = "Robert'); --"
`,
      ['backends.baremetal.machines[0].run_as: applies to mode = "systemd"', "backends.baremetal.machines[1].run_as: must be a user name"],
    ],
    ["gcp TDX on a non-C3 type", BASE + `[backends.gcp]
project = "my-project-1"
zones = ["us-central1-a"]
tdx_machine_types = [{ name = "n2-standard-4", vcpus = 4, memory_mib = 16384 }]
tdx_image = "img"
max_concurrent_instances = 1
image = "img"
credentials_file = "sa.json"
`, ['backends.gcp.tdx_machine_types[0].name: "n2-standard-4" is not a TDX machine type']],
    ["bad provider id", BASE.replace('provider_id = "p1"', 'provider_id = "has space"') + LOCAL, ["bridge.provider_id: must be 1-64 characters"]],
    [
      "azure with several regions but one subnet",
      BASE +
        `[backends.azure]
subscription_id = "00000000-0000-0000-0000-000000000000"
resource_group = "rg"
regions = ["westeurope", "eastus"]
vm_sizes = [{ name = "Standard_D2s_v5", vcpus = 2, memory_mib = 8192 }]
max_concurrent_instances = 1
image = { publisher = "a", offer = "b", sku = "c" }
subnet_id = "/subscriptions/x/resourceGroups/y/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
managed_identity = true
`,
      ["backends.azure.subnet_id: a NIC must be in its subnet's region"],
    ],
    [
      "azure user-assigned identity without managed_identity",
      BASE +
        AZURE_ONE_REGION +
        `tenant_id = "11111111-1111-1111-1111-111111111111"
client_id = "22222222-2222-2222-2222-222222222222"
client_secret_file = "s"
managed_identity_client_id = "33333333-3333-3333-3333-333333333333"
`,
      ["backends.azure.managed_identity_client_id: names a user-assigned managed identity: set managed_identity = true with it"],
    ],
    [
      "azure managed_identity_client_id that is not a GUID",
      BASE +
        AZURE_ONE_REGION +
        `managed_identity = true
managed_identity_client_id = "my-identity"
`,
      ["backends.azure.managed_identity_client_id: must be the identity's client id (GUID)"],
    ],
    ["relative local runs_dir", BASE + LOCAL + 'runs_dir = "runs"\n', ["backends.local.runs_dir: must be an absolute path"]],
    ["client_ca without TLS", BASE.replace('token_file = "token"', 'token_file = "token"\nclient_ca_file = "ca.pem"') + LOCAL, ["listener.client_ca_file: client_ca_file needs tls_cert_file and tls_key_file"]],
  ];
  for (const [name, text, fragments] of cases) it(`rejects: ${name}`, () => expectProblem(text, ...fragments));

  it("digest is stable under table reordering and changes with the backend set", () => {
    const a = parseConfigText(BASE + LOCAL + AWS, "a");
    const b = parseConfigText(BASE + AWS + LOCAL, "b");
    const c = parseConfigText(BASE + LOCAL, "c");
    const d = parseConfigText(BASE + LOCAL.replace("max_concurrent = 2", "max_concurrent = 3"), "d");
    assert.equal(configDigest(a), configDigest(b));
    assert.notEqual(configDigest(a), configDigest(c));
    assert.notEqual(configDigest(c), configDigest(d));
    assert.match(configDigest(a), /^[0-9a-f]{64}$/);
  });
});
