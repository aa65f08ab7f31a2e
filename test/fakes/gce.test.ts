/**
 * Tests of the fake GCE server, driven by the REAL @google-cloud/compute 6.x clients
 * (REST fallback) and a google-auth-library OAuth2Client holding a static token.
 *
 *   npx tsx --test test/fakes/gce.test.ts
 *
 * A guard on net.Socket#connect makes any connection attempt to something other than
 * 127.0.0.1 fail the run (no OAuth server, no metadata server, no googleapis.com).
 */
import assert from 'node:assert/strict';
import { installNetworkGuard } from '../helpers/net-guard.js';
import { after, describe, test } from 'node:test';

import { ImagesClient, InstancesClient, MachineTypesClient, ZoneOperationsClient, ZonesClient, type protos } from '@google-cloud/compute';
import { OAuth2Client } from 'google-auth-library';

import { GceFake, matchesFilter, parseFilter, type GceFakeOptions, type JsonObject } from './gce.js';

// ------------------------------------------------------------------ network guard

const refusedConnects = installNetworkGuard();
after(() => assert.deepEqual(refusedConnects, [], 'only loopback may be contacted'));

// ------------------------------------------------------------------ helpers

const ZONE = 'us-central1-a';
const ZONE2 = 'europe-west4-a';
const MT_C3 = `zones/${ZONE}/machineTypes/c3-standard-4`;
const MT_N2 = `zones/${ZONE}/machineTypes/n2-standard-4`;

type GaxAuthClient = NonNullable<NonNullable<ConstructorParameters<typeof InstancesClient>[0]>['authClient']>;
type ComputeOperation = protos.google.cloud.compute.v1.IOperation;

/**
 * insert/delete are typed as returning a gax LROperation whose latestResponse is a
 * google.longrunning.Operation; at runtime (6.14.0) it is a plain object whose
 * latestResponse is the Compute Operation (and there is no .promise()).
 */
function computeOp(lro: unknown): ComputeOperation {
  return (lro as { latestResponse: ComputeOperation }).latestResponse;
}

interface Harness {
  fake: GceFake;
  instances: InstancesClient;
  operations: ZoneOperationsClient;
  project: string;
  close(): Promise<void>;
}

function makeClients(fake: GceFake, token: string = fake.accessToken) {
  const authClient = new OAuth2Client();
  authClient.setCredentials({ access_token: token, expiry_date: Date.now() + 3600e3 * 24 * 365 });
  // google-gax 5.0.8 carries its own google-auth-library (10.5.0): the top-level 10.9.1
  // OAuth2Client works at runtime but is not assignable type-wise, hence the cast.
  const opts = { ...fake.clientOptions(), authClient: authClient as unknown as GaxAuthClient };
  return { instances: new InstancesClient(opts), operations: new ZoneOperationsClient(opts) };
}

async function harness(opts: GceFakeOptions = {}): Promise<Harness> {
  const fake = await GceFake.start({ project: 'proj-1', ...opts });
  const { instances, operations } = makeClients(fake);
  return {
    fake,
    instances,
    operations,
    project: fake.project,
    async close() {
      await instances.close();
      await operations.close();
      await fake.close();
    },
  };
}

let uuidCounter = 0;
function uuid(): string {
  uuidCounter++;
  return `5a0c1d2e-0000-4000-8000-${uuidCounter.toString(16).padStart(12, '0')}`;
}

function vm(name: string, extra: JsonObject = {}): JsonObject {
  // C3 refuses GCE's default boot disk type (pd-standard): pd-balanced, in the machine type's zone.
  const zone = /zones\/([^/]+)\//.exec(typeof extra['machineType'] === 'string' ? extra['machineType'] : MT_C3)?.[1] ?? ZONE;
  return {
    name,
    machineType: MT_C3,
    labels: { app: 'compute-bridge' },
    disks: [{ boot: true, autoDelete: true, initializeParams: { sourceImage: 'projects/debian-cloud/global/images/family/debian-12', diskSizeGb: '20', diskType: `zones/${zone}/diskTypes/pd-balanced` } }],
    networkInterfaces: [{ network: 'global/networks/default', accessConfigs: [{ name: 'External NAT', type: 'ONE_TO_ONE_NAT' }] }],
    metadata: { items: [{ key: 'startup-script', value: '#!/bin/sh\necho hi' }] },
    ...extra,
  };
}

interface HttpErr {
  status: number;
  code: unknown;
  body: { error: { code: number; message: string; status: string; errors: { reason: string; domain: string; message: string }[]; details: { '@type': string; reason: string; domain: string; metadata: Record<string, string> }[] } };
}

async function httpError(p: Promise<unknown>): Promise<HttpErr> {
  try {
    await p;
  } catch (e) {
    const err = e as { status?: number; code?: unknown; message: string; response?: { status: number } };
    assert.equal(typeof err.status, 'number', `expected an HTTP error, got ${String(e)}`);
    assert.equal(err.response?.status, err.status);
    return { status: err.status!, code: err.code, body: JSON.parse(err.message) as HttpErr['body'] };
  }
  assert.fail('expected the call to reject');
}

// ------------------------------------------------------------------ tests

describe('GceFake with the real @google-cloud/compute 6.x REST clients', () => {
  test('insert + wait + get: PROVISIONING -> STAGING -> RUNNING with natIP after boot', async () => {
    const h = await harness({ publicIp: '203.0.113.7', bootDelayMs: 30_000 });
    try {
      const requestId = uuid();
      const [lro] = await h.instances.insert({ project: h.project, zone: ZONE, requestId, instanceResource: vm('vm-1') });
      const op = computeOp(lro);
      assert.equal(op.kind, 'compute#operation');
      assert.equal(op.operationType, 'insert');
      assert.equal(op.status, 'RUNNING');
      assert.equal(op.progress, 0);
      assert.equal(op.clientOperationId, requestId);
      assert.equal(op.zone, `https://www.googleapis.com/compute/v1/projects/${h.project}/zones/${ZONE}`);
      assert.equal(op.targetLink, `https://www.googleapis.com/compute/v1/projects/${h.project}/zones/${ZONE}/instances/vm-1`);
      assert.match(String(op.selfLink), /\/zones\/us-central1-a\/operations\/operation-\d+-[0-9a-f]{13}-[0-9a-f]{8}-[0-9a-f]{8}$/);
      assert.match(String(op.insertTime), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}-08:00$/);
      assert.match(String(op.targetId), /^\d{19}$/);

      let [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-1' });
      assert.equal(inst.status, 'PROVISIONING');
      assert.equal(inst.id, op.targetId);
      assert.equal(inst.networkInterfaces?.[0]?.accessConfigs?.[0]?.natIP ?? undefined, undefined);
      assert.equal(inst.machineType, `https://www.googleapis.com/compute/v1/projects/${h.project}/zones/${ZONE}/machineTypes/c3-standard-4`);
      assert.deepEqual(inst.labels, { app: 'compute-bridge' });
      assert.equal(typeof inst.labelFingerprint, 'string');
      assert.deepEqual(inst.metadata?.items?.map((i) => i.key), ['startup-script']);

      h.fake.advance(15_000);
      [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-1' });
      assert.equal(inst.status, 'STAGING');

      // wait "blocks" on the virtual clock until the operation is DONE
      const [done] = await h.operations.wait({ project: h.project, zone: ZONE, operation: String(op.name) });
      assert.equal(done.status, 'DONE');
      assert.equal(done.progress, 100);
      assert.equal(done.error ?? undefined, undefined);
      assert.equal(typeof done.endTime, 'string');
      const [viaGet] = await h.operations.get({ project: h.project, zone: ZONE, operation: String(op.name) });
      assert.equal(viaGet.status, 'DONE');

      [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-1' });
      assert.equal(inst.status, 'RUNNING');
      assert.equal(inst.networkInterfaces?.[0]?.accessConfigs?.[0]?.natIP, '203.0.113.7');
      assert.equal(inst.networkInterfaces?.[0]?.accessConfigs?.[0]?.type, 'ONE_TO_ONE_NAT');
      assert.match(String(inst.networkInterfaces?.[0]?.networkIP), /^10\.128\./);
      assert.equal(typeof inst.lastStartTimestamp, 'string');
      assert.equal(h.fake.countCalls('wait'), 1);
      assert.equal(h.fake.countCalls({ method: 'get', status: 200 }), 3);
    } finally {
      await h.close();
    }
  });

  test('bootAll() makes everything RUNNING without touching the clock', async () => {
    const h = await harness({ bootDelayMs: 60_000 });
    try {
      await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-a') });
      await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-b') });
      const t0 = h.fake.now();
      h.fake.bootAll();
      assert.equal(h.fake.now(), t0);
      const [a] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-a' });
      assert.equal(a.status, 'RUNNING');
      assert.equal(a.networkInterfaces?.[0]?.accessConfigs?.[0]?.natIP, '127.0.0.1');
      assert.equal(h.fake.getInstance(h.project, ZONE, 'vm-b')?.['status'], 'RUNNING');
    } finally {
      await h.close();
    }
  });

  test('requestId idempotency, 409 alreadyExists, invalid requestId, response-lost retry', async () => {
    const h = await harness();
    try {
      const rid = uuid();
      const req = { project: h.project, zone: ZONE, requestId: rid, instanceResource: vm('vm-idem', { labels: { lease: 'l-42' } }) };
      const [a] = await h.instances.insert(req);
      const [b] = await h.instances.insert(req);
      const opA = computeOp(a);
      const opB = computeOp(b);
      assert.equal(opB.name, opA.name);
      assert.equal(opB.id, opA.id);
      assert.equal(h.fake.createdCount, 1);
      assert.equal(h.fake.createsByRequestId(rid), 1);
      assert.equal(h.fake.createsByName('vm-idem'), 1);
      assert.equal(h.fake.createsByLabel('lease', 'l-42'), 1);
      assert.equal(h.fake.instancesByLabel('lease', 'l-42').length, 1);
      assert.equal(h.fake.countCalls('insert'), 2);

      // same name, new requestId -> 409
      const conflict = await httpError(h.instances.insert({ ...req, requestId: uuid() }));
      assert.equal(conflict.status, 409);
      assert.equal(conflict.code, 409);
      assert.equal(conflict.body.error.status, 'ALREADY_EXISTS');
      assert.equal(conflict.body.error.errors[0]?.reason, 'alreadyExists');
      assert.equal(conflict.body.error.message, `The resource 'projects/${h.project}/zones/${ZONE}/instances/vm-idem' already exists`);
      assert.equal(conflict.body.error.details[0]?.['@type'], 'type.googleapis.com/google.rpc.ErrorInfo');
      assert.equal(h.fake.createdCount, 1);

      for (const bad of ['not-a-uuid', '00000000-0000-0000-0000-000000000000']) {
        const e = await httpError(h.instances.insert({ ...req, requestId: bad, instanceResource: vm('vm-other') }));
        assert.equal(e.status, 400);
        assert.equal(e.body.error.errors[0]?.reason, 'invalid');
        assert.match(e.body.error.message, /requestId/);
      }

      // the response of a committed insert is lost (503); retrying with the same requestId is safe
      h.fake.failNext('insert', 503, 'backendError', { afterCommit: true });
      const rid2 = uuid();
      const req2 = { project: h.project, zone: ZONE, requestId: rid2, instanceResource: vm('vm-lost') };
      const lost = await httpError(h.instances.insert(req2));
      assert.equal(lost.status, 503);
      const [retried] = await h.instances.insert(req2);
      assert.equal(computeOp(retried).operationType, 'insert');
      assert.equal(h.fake.createsByRequestId(rid2), 1);
      assert.equal(h.fake.createsByName('vm-lost'), 1);
      assert.equal(h.fake.createdCount, 2);
    } finally {
      await h.close();
    }
  });

  test('pool exhausted / quota: DONE operation carrying error, or 403 quotaExceeded', async () => {
    const h = await harness();
    try {
      h.fake.faults.poolExhausted = (ctx) => ctx.zone === ZONE && ctx.machineType.startsWith('c3-');
      const [lro] = await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-pool') });
      const opName = String(computeOp(lro).name);
      const [op] = await h.operations.wait({ project: h.project, zone: ZONE, operation: opName });
      assert.equal(op.status, 'DONE');
      assert.equal(op.error?.errors?.[0]?.code, 'ZONE_RESOURCE_POOL_EXHAUSTED');
      assert.match(String(op.error?.errors?.[0]?.message), /does not have enough resources available/);
      assert.equal(op.error?.errors?.[0]?.errorDetails?.[0]?.errorInfo?.reason, 'RESOURCE_AVAILABILITY');
      assert.equal(op.httpErrorStatusCode, 503);
      assert.equal(op.httpErrorMessage, 'SERVICE UNAVAILABLE');
      const gone = await httpError(h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-pool' }));
      assert.equal(gone.status, 404);
      assert.equal(h.fake.creates[0]?.outcome, 'ZONE_RESOURCE_POOL_EXHAUSTED');

      // other zone is fine
      const otherMt = `zones/${ZONE2}/machineTypes/c3-standard-4`;
      const [ok] = await h.instances.insert({ project: h.project, zone: ZONE2, requestId: uuid(), instanceResource: vm('vm-pool', { machineType: otherMt }) });
      const [okDone] = await h.operations.wait({ project: h.project, zone: ZONE2, operation: String(computeOp(ok).name) });
      assert.equal(okDone.error ?? undefined, undefined);
      h.fake.faults.poolExhausted = false;

      h.fake.faults.quotaExceeded = 'operation';
      const [q] = await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-quota') });
      const [qDone] = await h.operations.wait({ project: h.project, zone: ZONE, operation: String(computeOp(q).name) });
      assert.equal(qDone.error?.errors?.[0]?.code, 'QUOTA_EXCEEDED');
      assert.match(String(qDone.error?.errors?.[0]?.message), /^Quota 'CPUS' exceeded\.\s+Limit: 24\.0 in region us-central1\.$/);
      assert.equal(qDone.httpErrorStatusCode, 403);

      h.fake.faults.quotaExceeded = 'http';
      const e = await httpError(h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-quota2') }));
      assert.equal(e.status, 403);
      assert.equal(e.body.error.errors[0]?.reason, 'quotaExceeded');
      assert.equal(e.body.error.errors[0]?.domain, 'usageLimits');
      assert.equal(e.body.error.details[0]?.reason, 'QUOTA_EXCEEDED');
      assert.equal(h.fake.createsByName('vm-quota2'), 0);
    } finally {
      await h.close();
    }
  });

  test('list with label filter + pagination (120 instances, maxResults 50), aggregatedList across 2 zones', async () => {
    const h = await harness({ zones: [ZONE, 'us-central1-b', ZONE2], bootDelayMs: 0 });
    try {
      for (let batch = 0; batch < 120; batch += 30) {
        await Promise.all(
          Array.from({ length: 30 }, (_, k) => {
            const i = batch + k;
            const labels: Record<string, string> = { app: 'compute-bridge', pool: i % 2 === 0 ? 'blue' : 'green' };
            if (i % 10 === 0) labels['gpu'] = 'h100';
            return h.instances.insert({
              project: h.project,
              zone: ZONE,
              requestId: uuid(),
              instanceResource: vm(`w-${String(i).padStart(3, '0')}`, { labels }),
            });
          }),
        );
      }
      assert.equal(h.fake.createdCount, 120);
      h.fake.guestPowerOff(h.project, ZONE, 'w-000');

      // manual paging
      const names: string[] = [];
      const pageSizes: number[] = [];
      let pageToken: string | undefined;
      do {
        const [items, , raw] = await h.instances.list(
          { project: h.project, zone: ZONE, maxResults: 50, filter: 'labels.app = "compute-bridge"', ...(pageToken ? { pageToken } : {}) },
          { autoPaginate: false },
        );
        pageSizes.push(items.length);
        names.push(...items.map((i) => String(i.name)));
        pageToken = raw.nextPageToken ?? undefined;
      } while (pageToken);
      assert.deepEqual(pageSizes, [50, 50, 20]);
      assert.equal(new Set(names).size, 120);
      assert.deepEqual(names, [...names].sort());

      // autoPaginate (default) with a compound filter
      const [blueRunning] = await h.instances.list({
        project: h.project,
        zone: ZONE,
        maxResults: 50,
        filter: 'labels.pool = "blue" AND status = RUNNING',
      });
      assert.equal(blueRunning.length, 59); // 60 blue, w-000 is TERMINATED
      assert.ok(blueRunning.every((i) => i.labels?.['pool'] === 'blue' && i.status === 'RUNNING'));

      const [gpus] = await h.instances.list({ project: h.project, zone: ZONE, filter: 'labels.gpu:* labels.pool = "blue"' });
      assert.equal(gpus.length, 12);
      const [none] = await h.instances.list({ project: h.project, zone: ZONE, filter: 'labels.pool = "red"' });
      assert.deepEqual(none, []);
      assert.equal(h.fake.countCalls({ method: 'list', status: 200 }), 3 + 2 + 1 + 1);

      const tooMany = await httpError(h.instances.list({ project: h.project, zone: ZONE, maxResults: 501 }, { autoPaginate: false }));
      assert.equal(tooMany.status, 400);
      const badFilter = await httpError(h.instances.list({ project: h.project, zone: ZONE, filter: 'labels.pool = ' }, { autoPaginate: false }));
      assert.equal(badFilter.status, 400);

      // aggregatedList: 120 in ZONE, 3 in ZONE2, us-central1-b empty
      for (const n of ['e-1', 'e-2', 'e-3']) {
        await h.instances.insert({
          project: h.project,
          zone: ZONE2,
          requestId: uuid(),
          instanceResource: vm(n, { machineType: `zones/${ZONE2}/machineTypes/n2-standard-2`, labels: { app: 'compute-bridge', pool: 'blue' } }),
        });
      }
      const perScope = new Map<string, number>();
      const warnings = new Map<string, string>();
      for await (const [scope, scoped] of h.instances.aggregatedListAsync(
        { project: h.project, maxResults: 50, filter: 'labels.app = "compute-bridge"' },
        { autoPaginate: false },
      )) {
        perScope.set(scope, (perScope.get(scope) ?? 0) + (scoped.instances?.length ?? 0));
        if (scoped.warning?.code) warnings.set(scope, String(scoped.warning.code));
      }
      assert.deepEqual(Object.fromEntries(perScope), { 'zones/europe-west4-a': 3, 'zones/us-central1-a': 120, 'zones/us-central1-b': 0 });
      assert.equal(warnings.get('zones/us-central1-b'), 'NO_RESULTS_ON_PAGE');
      assert.equal(h.fake.countCalls('aggregatedList'), 3); // 123 results / 50 per page

      const blue: string[] = [];
      for await (const [, scoped] of h.instances.aggregatedListAsync({ project: h.project, filter: 'labels.pool = "blue"' }, { autoPaginate: false })) {
        for (const i of scoped.instances ?? []) blue.push(`${String(i.zone).split('/').pop()}/${String(i.name)}`);
      }
      assert.equal(blue.length, 63);
      assert.ok(blue.includes('europe-west4-a/e-2'));
    } finally {
      await h.close();
    }
  });

  test('serial port output roundtrip; guestPowerOff -> TERMINATED keeps the instance', async () => {
    const h = await harness({ bootSerial: 'boot ok\n' });
    try {
      await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-serial') });
      h.fake.settle();
      h.fake.appendSerial(h.project, ZONE, 'vm-serial', 'hello ✓\n');
      const [s1] = await h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-serial', port: 1, start: 0 });
      assert.equal(s1.contents, 'boot ok\nhello ✓\n');
      assert.equal(s1.start, '0');
      const total = Buffer.byteLength('boot ok\nhello ✓\n');
      assert.equal(Number(s1.next), total);
      assert.equal(h.fake.callsMatching('serialPort')[0]?.query['start'], '0');

      const [s2] = await h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-serial', port: 1, start: Number(s1.next) });
      assert.equal(s2.contents, '');
      assert.equal(Number(s2.next), total);

      h.fake.guestPowerOff(h.project, ZONE, 'vm-serial', 'reboot: Power down\n');
      const [s3] = await h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-serial', port: 1, start: Number(s2.next) });
      assert.equal(s3.contents, 'reboot: Power down\n');
      const [tail] = await h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-serial', port: 1, start: -5 });
      assert.equal(tail.contents, 'down\n');

      const [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-serial' });
      assert.equal(inst.status, 'TERMINATED');
      assert.equal(inst.networkInterfaces?.[0]?.accessConfigs?.[0]?.natIP ?? undefined, undefined); // ephemeral IP released
      assert.equal(typeof inst.lastStopTimestamp, 'string');

      const badPort = await httpError(h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-serial', port: 5 }));
      assert.equal(badPort.status, 400);
      const missing = await httpError(h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'nope' }));
      assert.equal(missing.status, 404);
    } finally {
      await h.close();
    }
  });

  test("simulated boot script: the host key report on serial port 1 at RUNNING ('report', 'none', 'never'); serialPortDenied answers 403", async () => {
    const modes: Record<string, 'report' | 'none' | 'never'> = { 'vm-none': 'none', 'vm-never': 'never' };
    const h = await harness({ bootSerial: 'boot ok\n', bootDelayMs: 10_000, guestHostKey: (i) => modes[i.name] ?? 'report' });
    try {
      // The request id as the bridge's script quotes it (shq): a quote inside is '\''.
      const script = (rid: string) => `#!/bin/sh\nCB_CONSOLE=\${CB_CONSOLE:-/dev/ttyS0}\nCB_REQUEST_ID='${rid.replace(/'/g, "'\\''")}'\nCB_SSH_USER='u'\n`;
      const withScript = (name: string, rid: string) => vm(name, { metadata: { items: [{ key: 'startup-script', value: script(rid) }] } });
      for (const [name, rid] of [['vm-key', "It's.Grant_1"], ['vm-none', 'g-none'], ['vm-never', 'g-never']] as const) {
        await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: withScript(name, rid) });
      }
      await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-plain') });
      const serial = async (name: string) => (await h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: name, port: 1, start: 0 }))[0].contents;
      assert.equal(await serial('vm-key'), '', 'nothing before the guest runs');
      h.fake.settle();

      const fp = h.fake.hostKeyFingerprint(h.project, ZONE, 'vm-key');
      assert.match(fp, /^SHA256:[A-Za-z0-9+/]{43}$/);
      assert.equal(fp, h.fake.hostKeyFingerprint(h.project, ZONE, 'vm-key'), 'deterministic');
      assert.notEqual(fp, h.fake.hostKeyFingerprint(h.project, ZONE2, 'vm-key'), 'per instance');
      assert.equal(await serial('vm-key'), `boot ok\nCOMPUTE-BRIDGE-HOSTKEY It's.Grant_1 ${fp}\n`);
      assert.equal(await serial('vm-none'), 'boot ok\nCOMPUTE-BRIDGE-HOSTKEY g-none none\n');
      assert.equal(await serial('vm-never'), 'boot ok\n');
      assert.equal(await serial('vm-plain'), 'boot ok\n', 'another startup script reports nothing');

      h.fake.faults.serialPortDenied = (i) => i.name === 'vm-key';
      const denied = await httpError(h.instances.getSerialPortOutput({ project: h.project, zone: ZONE, instance: 'vm-key', port: 1 }));
      assert.equal(denied.status, 403);
      assert.equal(denied.body.error.errors[0]?.reason, 'forbidden');
      assert.match(denied.body.error.message, /^Required 'compute\.instances\.getSerialPortOutput' permission for 'projects\/proj-1\/zones\/us-central1-a\/instances\/vm-key'$/);
      assert.equal(await serial('vm-none'), 'boot ok\nCOMPUTE-BRIDGE-HOSTKEY g-none none\n', 'only the instances the switch names');
    } finally {
      await h.close();
    }
  });

  test('delete -> STOPPING -> gone: get rejects with status 404; delete of unknown -> 404', async () => {
    const h = await harness({ deleteDelayMs: 5_000 });
    try {
      h.fake.addInstance(ZONE, vm('vm-del'));
      const [lro] = await h.instances.delete({ project: h.project, zone: ZONE, instance: 'vm-del', requestId: uuid() });
      const op = computeOp(lro);
      assert.equal(op.operationType, 'delete');
      assert.equal(op.status, 'RUNNING');
      const [stopping] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-del' });
      assert.equal(stopping.status, 'STOPPING');
      const [done] = await h.operations.wait({ project: h.project, zone: ZONE, operation: String(op.name) });
      assert.equal(done.status, 'DONE');

      const e = await httpError(h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-del' }));
      assert.equal(e.status, 404);
      assert.equal(e.code, 404);
      assert.equal(e.body.error.errors[0]?.reason, 'notFound');
      assert.equal(e.body.error.status, 'NOT_FOUND');
      assert.equal(e.body.error.message, `The resource 'projects/${h.project}/zones/${ZONE}/instances/vm-del' was not found`);

      const unknown = await httpError(h.instances.delete({ project: h.project, zone: ZONE, instance: 'never-was', requestId: uuid() }));
      assert.equal(unknown.status, 404);
      assert.equal(unknown.body.error.errors[0]?.reason, 'notFound');
      const unknownOp = await httpError(h.operations.get({ project: h.project, zone: ZONE, operation: 'operation-0-nope' }));
      assert.equal(unknownOp.status, 404);

      // the name can be reused once gone
      await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-del') });
      assert.equal(h.fake.createsByName('vm-del'), 1); // addInstance() is not counted
    } finally {
      await h.close();
    }
  });

  test('TDX validation like GCE; received body recorded', async () => {
    const h = await harness();
    try {
      const tdx = { confidentialInstanceConfig: { confidentialInstanceType: 'TDX' } };
      const wrongMt = await httpError(
        h.instances.insert({
          project: h.project,
          zone: ZONE,
          requestId: uuid(),
          instanceResource: vm('vm-tdx', { ...tdx, machineType: MT_N2, scheduling: { onHostMaintenance: 'TERMINATE' } }),
        }),
      );
      assert.equal(wrongMt.status, 400);
      assert.equal(wrongMt.body.error.errors[0]?.reason, 'invalid');
      assert.match(wrongMt.body.error.message, /^Invalid value for field 'resource\.machineType': '.*n2-standard-4'\. .*TDX/);

      const migrate = await httpError(h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-tdx', { ...tdx }) }));
      assert.equal(migrate.status, 400);
      assert.match(migrate.body.error.message, /^Invalid value for field 'resource\.scheduling\.onHostMaintenance': 'MIGRATE'\./);
      assert.equal(h.fake.insertAttempts.at(-1)?.status, 400);
      assert.equal(h.fake.createdCount, 0);

      const [ok] = await h.instances.insert({
        project: h.project,
        zone: ZONE,
        requestId: uuid(),
        instanceResource: vm('vm-tdx', { ...tdx, scheduling: { onHostMaintenance: 'TERMINATE', automaticRestart: false } }),
      });
      assert.equal(computeOp(ok).status, 'RUNNING');
      const body = h.fake.insertBody(ZONE, 'vm-tdx');
      assert.deepEqual(body?.['confidentialInstanceConfig'], { confidentialInstanceType: 'TDX' });
      assert.deepEqual(body?.['scheduling'], { onHostMaintenance: 'TERMINATE', automaticRestart: false });
      assert.equal(h.fake.creates[0]?.machineType, 'c3-standard-4');
      const [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-tdx' });
      assert.equal(inst.confidentialInstanceConfig?.confidentialInstanceType, 'TDX');
      assert.equal(inst.scheduling?.onHostMaintenance, 'TERMINATE');

      const bareMt = await httpError(h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-bare', { machineType: 'c3-standard-4' }) }));
      assert.equal(bareMt.status, 400);
    } finally {
      await h.close();
    }
  });

  test('429: the 6.x client does not retry by default; opt-in retryCodes [429] does', async () => {
    const h = await harness();
    try {
      h.fake.addInstance(ZONE, vm('vm-rl'));
      h.fake.faults.rateLimitRate = 1;
      const e = await httpError(h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-rl' }));
      assert.equal(e.status, 429);
      assert.equal(e.code, 429); // HTTP status, not a gRPC code
      assert.equal(e.body.error.status, 'RESOURCE_EXHAUSTED');
      assert.equal(e.body.error.errors[0]?.reason, 'rateLimitExceeded');
      assert.equal(e.body.error.details[0]?.reason, 'RATE_LIMIT_EXCEEDED');
      assert.equal(h.fake.countCalls('get'), 1, 'exactly one HTTP call: no automatic retry');
      const ie = await httpError(h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-rl2') }));
      assert.equal(ie.status, 429);
      assert.equal(h.fake.countCalls('insert'), 1);
      h.fake.faults.rateLimitRate = 0;

      // 503 on an "idempotent" method is not retried either
      h.fake.failNext('get', 503, 'backendError');
      const e503 = await httpError(h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-rl' }));
      assert.equal(e503.status, 503);
      assert.equal(h.fake.countCalls('get'), 2);

      // opt-in: gax retries when the HTTP status is listed in retryCodes
      h.fake.resetCalls();
      h.fake.failNext('get', 429, 'rateLimitExceeded', { times: 2 });
      const backoffSettings = {
        initialRetryDelayMillis: 1,
        retryDelayMultiplier: 1,
        maxRetryDelayMillis: 1,
        initialRpcTimeoutMillis: 5_000,
        rpcTimeoutMultiplier: 1,
        maxRpcTimeoutMillis: 5_000,
        totalTimeoutMillis: 10_000,
      };
      const [inst] = await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-rl' }, { retry: { retryCodes: [429], backoffSettings } });
      assert.equal(inst.status, 'RUNNING');
      assert.deepEqual(h.fake.calls.map((c) => c.status), [429, 429, 200]);
    } finally {
      await h.close();
    }
  });

  test('seeded fault rates are deterministic', async () => {
    const run = async (): Promise<number[]> => {
      const h = await harness({ seed: 42, faults: { serverErrorRate: 0.5 } });
      try {
        h.fake.addInstance(ZONE, vm('vm-x'));
        const out: number[] = [];
        for (let i = 0; i < 12; i++) {
          out.push(await h.instances.get({ project: h.project, zone: ZONE, instance: 'vm-x' }).then(() => 200, (e: { status: number }) => e.status));
        }
        return out;
      } finally {
        await h.close();
      }
    };
    const a = await run();
    const b = await run();
    assert.deepEqual(a, b);
    assert.ok(a.includes(200) && a.some((s) => s === 500 || s === 503), `mixed outcomes expected: ${a.join(',')}`);
  });

  test('clock modes: wait capped by waitTimeoutMs; real clock (now: Date.now) really waits', async () => {
    const h = await harness({ bootDelayMs: 60_000, waitTimeoutMs: 0 });
    try {
      const [lro] = await h.instances.insert({ project: h.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-c') });
      const t0 = h.fake.now();
      const [still] = await h.operations.wait({ project: h.project, zone: ZONE, operation: String(computeOp(lro).name) });
      assert.equal(still.status, 'RUNNING');
      assert.equal(h.fake.now(), t0);
      h.fake.waitTimeoutMs = 120_000;
      const [done] = await h.operations.wait({ project: h.project, zone: ZONE, operation: String(computeOp(lro).name) });
      assert.equal(done.status, 'DONE');
      assert.equal(h.fake.now(), t0 + 60_000);
    } finally {
      await h.close();
    }
    const r = await harness({ now: Date.now, bootDelayMs: 150 });
    try {
      const [lro] = await r.instances.insert({ project: r.project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-r') });
      const started = Date.now();
      const [done] = await r.operations.wait({ project: r.project, zone: ZONE, operation: String(computeOp(lro).name) });
      assert.equal(done.status, 'DONE');
      assert.ok(Date.now() - started >= 100);
      const [inst] = await r.instances.get({ project: r.project, zone: ZONE, instance: 'vm-r' });
      assert.equal(inst.status, 'RUNNING');
    } finally {
      await r.close();
    }
  });

  test('wrong or missing token -> 401 UNAUTHENTICATED, not retried', async () => {
    const fake = await GceFake.start({ accessToken: 'right-token' });
    const bad = makeClients(fake, 'wrong-token');
    try {
      const e = await httpError(bad.instances.get({ project: fake.project, zone: ZONE, instance: 'x' }));
      assert.equal(e.status, 401);
      assert.equal(e.body.error.status, 'UNAUTHENTICATED');
      assert.equal(e.body.error.errors[0]?.reason, 'authError');
      assert.equal(fake.countCalls({ status: 401 }), 1);
      const eo = await httpError(bad.operations.wait({ project: fake.project, zone: ZONE, operation: 'operation-1' }));
      assert.equal(eo.status, 401);

      const res = await fetch(`http://127.0.0.1:${fake.port}/compute/v1/projects/${fake.project}/zones/${ZONE}/instances`);
      assert.equal(res.status, 401);
      const body = (await res.json()) as HttpErr['body'];
      assert.equal(body.error.errors[0]?.reason, 'required');

      const good = makeClients(fake, 'right-token');
      const [items] = await good.instances.list({ project: fake.project, zone: ZONE });
      assert.deepEqual(items, []);
      await good.instances.close();
      await good.operations.close();
    } finally {
      await bad.instances.close();
      await bad.operations.close();
      await fake.close();
    }
  });
});

describe('read-only catalogue: zones.get, machineTypes.get, images.get / getFromFamily', () => {
  test('UP / DOWN zones, machine types per zone, images with guestOsFeatures, 404s; the insert agrees', async () => {
    const h = await harness({ zones: [ZONE, ZONE2] });
    const authClient = new OAuth2Client();
    authClient.setCredentials({ access_token: h.fake.accessToken, expiry_date: Date.now() + 3600e3 });
    const opts = { ...h.fake.clientOptions(), authClient: authClient as unknown as GaxAuthClient };
    const zones = new ZonesClient(opts);
    const machineTypes = new MachineTypesClient(opts);
    const images = new ImagesClient(opts);
    try {
      const project = h.project;
      const [z] = await zones.get({ project, zone: ZONE });
      assert.equal(z.status, 'UP');
      assert.equal(z.name, ZONE);
      assert.equal(z.region, `https://www.googleapis.com/compute/v1/projects/${project}/regions/us-central1`);
      h.fake.faults.downZones = [ZONE2];
      assert.equal((await zones.get({ project, zone: ZONE2 }))[0].status, 'DOWN');
      const noZone = await httpError(zones.get({ project, zone: 'us-east1-b' }));
      assert.equal(noZone.status, 404);
      assert.equal(noZone.body.error.errors[0]?.reason, 'notFound');

      const [mt] = await machineTypes.get({ project, zone: ZONE, machineType: 'c3-standard-4' });
      assert.equal(mt.guestCpus, 4);
      assert.equal(mt.memoryMb, 16384);
      assert.equal(mt.zone, ZONE);
      h.fake.faults.machineTypesByZone = { [ZONE2]: ['c3-standard-4'] };
      assert.equal((await httpError(machineTypes.get({ project, zone: ZONE, machineType: 'c3-standard-4' }))).status, 404);
      assert.equal((await machineTypes.get({ project, zone: ZONE2, machineType: 'c3-standard-4' }))[0].name, 'c3-standard-4');

      const [fam] = await images.getFromFamily({ project: 'debian-cloud', family: 'debian-12' });
      assert.equal(fam.family, 'debian-12');
      assert.equal(fam.status, 'READY');
      assert.ok(fam.guestOsFeatures?.some((f) => f.type === 'TDX_CAPABLE'), 'undefined tdxCapableImages: every image is TDX_CAPABLE');
      const [byName] = await images.get({ project: 'debian-cloud', image: fam.name! });
      assert.equal(byName.selfLink, fam.selfLink);

      h.fake.faults.images = ['projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64'];
      h.fake.faults.tdxCapableImages = ['https://www.googleapis.com/compute/v1/projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64'];
      const [ubuntu] = await images.getFromFamily({ project: 'ubuntu-os-cloud', family: 'ubuntu-2404-lts-amd64' });
      assert.ok(ubuntu.guestOsFeatures?.some((f) => f.type === 'TDX_CAPABLE'));
      const missing = await httpError(images.getFromFamily({ project: 'debian-cloud', family: 'debian-12' }));
      assert.equal(missing.status, 404);
      assert.match(missing.body.error.message, /projects\/debian-cloud\/global\/images\/family\/debian-12/);
      h.fake.faults.images = undefined;
      const [plain] = await images.getFromFamily({ project: 'debian-cloud', family: 'debian-12' });
      assert.ok(!plain.guestOsFeatures?.some((f) => f.type === 'TDX_CAPABLE'), 'not in tdxCapableImages: no TDX_CAPABLE');

      // The insert agrees with the catalogue: a missing image is refused, nothing created.
      h.fake.faults.images = [];
      h.fake.faults.machineTypesByZone = undefined;
      const refused = await httpError(h.instances.insert({ project, zone: ZONE, requestId: uuid(), instanceResource: vm('vm-noimage') }));
      assert.equal(refused.status, 400);
      assert.match(refused.body.error.message, /sourceImage.*cannot be found/);
      assert.equal(h.fake.createdCount, 0);
    } finally {
      await zones.close();
      await machineTypes.close();
      await images.close();
      await h.close();
    }
  });
});

describe('filter expressions', () => {
  const r: JsonObject = { name: 'w-001', status: 'RUNNING', labels: { pool: 'blue', gpu: 'h100' }, scheduling: { automaticRestart: false } };
  const cases: [string, boolean][] = [
    ['labels.pool = "blue"', true],
    ['labels.pool = blue', true],
    ['labels.pool != "blue"', false],
    ['labels.gpu:*', true],
    ['labels.tpu:*', false],
    ['labels.tpu != "x"', true],
    ['labels.pool = "blue" AND status = RUNNING', true],
    ['labels.pool = "blue" status = TERMINATED', false],
    ['(status = TERMINATED) OR (labels.pool = "blue")', true],
    ['(status = TERMINATED) OR (status = STOPPING) AND (labels.pool = "blue")', false],
    ['NOT status = TERMINATED', true],
    ['scheduling.automaticRestart = false', true],
    ['name eq w-0.*', true],
    ['name ne .*1', false],
    ['name = "w-*"', true],
  ];
  for (const [expr, want] of cases) {
    test(`${expr} -> ${String(want)}`, () => {
      assert.equal(matchesFilter(parseFilter(expr), r), want);
    });
  }
  test('mixing regex and AIP-160 forms is rejected', () => {
    assert.throws(() => parseFilter('name eq foo AND status = RUNNING'));
  });
});
