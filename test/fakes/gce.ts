/**
 * Fake Google Compute Engine (compute/v1 REST+JSON) for tests.
 *
 * Serves plain HTTP on 127.0.0.1 (random port) and is meant to be driven by the
 * REAL `InstancesClient` / `ZoneOperationsClient` of `@google-cloud/compute` 6.x
 * in REST fallback mode:
 *
 *   const authClient = new OAuth2Client();            // google-auth-library
 *   authClient.setCredentials({ access_token: fake.accessToken, expiry_date: Date.now() + 365 * 864e5 });
 *   const instances = new InstancesClient({ ...fake.clientOptions(), authClient });
 *
 * Only node built-ins are used here (plus the boot script's host key line from
 * src/backends/common/cloud-init.ts). Nothing ever contacts anything but 127.0.0.1
 * (self links look like the real `https://www.googleapis.com/compute/v1/...` URLs
 * but are never dereferenced).
 *
 * ---------------------------------------------------------------------------
 * What was verified BY EXPERIMENT against @google-cloud/compute 6.14.0
 * (google-gax 5.0.8, gaxios 7.3.1, google-auth-library 10.9.1, Node 20):
 *
 * Wire format
 *  - Every URL gets `$alt=json%3Benum-encoding=int` appended to the query (numeric
 *    enums are *requested*, but all enum-ish Compute fields are declared `string`
 *    in the proto, so string values such as "RUNNING"/"DONE" decode fine; this
 *    fake always answers with strings, as GCE does).
 *  - `requestId` travels in the query string (`?requestId=<uuid>&...`) for
 *    insert (POST) and delete (DELETE); the Instance goes in the POST body as
 *    proto3 JSON (camelCase, e.g. `natIP`, `onHostMaintenance`).
 *  - `filter` is percent-encoded with `%20` for spaces, `%3D` for `=`, `%22` for
 *    quotes (`filter=labels.x%20%3D%20%22y%22`); `maxResults`, `pageToken` are
 *    plain query params. `list` auto-paginates by default (follows
 *    `nextPageToken` until absent); `listAsync`/`aggregatedListAsync` page lazily.
 *    `aggregatedList` only exists as `aggregatedListAsync`, which yields
 *    `[scopeKey, InstancesScopedList]` pairs, including `warning`-only scopes.
 *  - `ZoneOperationsClient.wait` POSTs with the literal body `""`.
 *  - Headers: `Authorization: Bearer <access_token>`, `x-goog-request-params:
 *    project=..&zone=..`, `x-goog-api-client: gax/5.0.8-fallback gapic/6.14.0 ...`.
 *  - uint64/int64 fields (`id`, `targetId`, `start`, `next`) come back to the
 *    caller as strings; unknown JSON fields are silently dropped.
 *  - `insert`/`delete` resolve to `[{ latestResponse: <Operation>, done: false,
 *    name, metadata: null, result: {} }, ...]`; a DONE Operation with
 *    `error.errors[].code = 'ZONE_RESOURCE_POOL_EXHAUSTED'` does NOT throw -
 *    neither from insert nor from `ZoneOperationsClient.wait`/`get`.
 *    TYPE CAVEAT: the .d.ts says `LROperation<IOperation, null>` (whose
 *    `latestResponse` is a google.longrunning.Operation and which has
 *    `.promise()`); at runtime it is the plain object above - there is no
 *    `.promise()`, and `latestResponse` must be cast to compute's IOperation.
 *  - google-gax 5.0.8 ships its own nested google-auth-library 10.5.0: passing the
 *    top-level 10.9.1 `OAuth2Client` as `authClient` works at runtime but does not
 *    type-check without a cast (`as unknown as ...['authClient']`).
 * Errors
 *  - Any non-2xx rejects with a `GaxiosError` (name 'Error', thrown by the auth
 *    client's fetch before gax decodes anything): `err.status === err.code ===
 *    err.response.status === <HTTP status>` (a NUMBER, not a gRPC code),
 *    `err.message` is the raw response body text (so `JSON.parse(err.message)
 *    .error.errors[0].reason` gives e.g. 'notFound'), `err.response.data` is
 *    undefined (body consumed as a stream). Non-JSON bodies surface verbatim.
 * Retries
 *  - By default NOTHING is retried: 429, 500, 503 on get/list (configured
 *    "idempotent" with retry codes UNAVAILABLE/DEADLINE_EXCEEDED) and on insert
 *    each produce exactly one HTTP call, because gax compares the numeric HTTP
 *    status against gRPC codes (14/4) and gaxios retry is not enabled for API
 *    calls. 401 is not retried/refreshed either when there is no refresh token.
 *  - Retries can be opted into per call with HTTP statuses as retry codes, e.g.
 *    `{ retry: { retryCodes: [429, 503], backoffSettings } }` - and that also
 *    retries the NON-idempotent insert, which is only safe with a requestId.
 * ---------------------------------------------------------------------------
 *
 * Model (all times are on the fake's clock; see `now`/`advance`):
 *  - insert: instance PROVISIONING for the first half of `bootDelayMs`, STAGING
 *    for the second half, then RUNNING; the insert Operation becomes DONE when
 *    the instance becomes RUNNING. `natIP` (= `publicIp`) shows up in
 *    `networkInterfaces[i].accessConfigs[0]` once RUNNING, only for interfaces
 *    that requested an access config (as on GCE). Ephemeral natIPs are dropped
 *    when the instance is TERMINATED.
 *  - the guest's boot script: when an instance becomes RUNNING, serial port 1 gets
 *    `bootSerial` and then, if its `startup-script` metadata is the bridge's boot
 *    script (a `CB_REQUEST_ID='<id>'` line), the script's host key report
 *    `COMPUTE-BRIDGE-HOSTKEY <id> <fingerprint>` with a fingerprint derived from the
 *    instance (`hostKeyFingerprint`); `guestHostKey` makes it report `none` or nothing.
 *  - delete: STOPPING for `deleteDelayMs`, then gone (404); the delete Operation
 *    is DONE at that moment.
 *  - pool exhausted / quota (operation mode): the instance is PROVISIONING until
 *    the end of the provisioning phase, then the insert Operation is DONE with
 *    `error` + `httpErrorStatusCode`/`httpErrorMessage` and the instance is gone.
 *  - Clock: by default a manual virtual clock (starts at 2025-01-01T00:00:00Z and
 *    only moves via `advance()`, `requestTickMs`, or `wait`). With a manual clock,
 *    `zoneOperations.wait` "blocks" by advancing the clock up to the operation's
 *    completion (at most `waitTimeoutMs`, default 120 s like GCE). Pass
 *    `now: Date.now` for real time (wait then really sleeps, capped).
 *  - requestId: per project, the same requestId returns the same Operation (no
 *    second instance); invalid or all-zero UUIDs are rejected with 400.
 *  - read-only catalogue (what doctor reads): zones.get (UP, or DOWN per
 *    `faults.downZones`; unknown zone 404), machineTypes.get (per
 *    `faults.machineTypesByZone`, as the insert; sizes from the name),
 *    images.get / images.getFromFamily (per `faults.images`, guestOsFeatures with
 *    TDX_CAPABLE per `faults.tdxCapableImages`; a family resolves to
 *    `<family>-v20250101`). Never part of `creates`.
 */
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

import { bootDisksFor } from '../../src/config/gce-disks.js';
import { hostKeyMarker } from '../../src/backends/common/cloud-init.js';

// ----------------------------------------------------------------------------------------------
// Public types

export type GceMethod =
  | 'instances.insert'
  | 'instances.get'
  | 'instances.delete'
  | 'instances.list'
  | 'instances.aggregatedList'
  | 'instances.getSerialPortOutput'
  | 'zoneOperations.get'
  | 'zoneOperations.wait'
  | 'zones.get'
  | 'machineTypes.get'
  | 'images.get'
  | 'images.getFromFamily'
  | 'unknown';

/** Short aliases accepted wherever a method name is taken. */
export type GceMethodAlias =
  | GceMethod
  | 'insert'
  | 'get'
  | 'delete'
  | 'list'
  | 'aggregatedList'
  | 'getSerialPortOutput'
  | 'serialPort'
  | 'operations.get'
  | 'wait'
  | '*';

export interface InsertContext {
  project: string;
  zone: string;
  name: string;
  /** Short machine type name, e.g. 'c3-standard-4'. */
  machineType: string;
  labels: Record<string, string>;
  requestId: string | undefined;
  body: JsonObject;
}

export type QuotaMode = 'operation' | 'http';

/** Which instance a per-instance switch is asked about. */
export interface InstanceRef {
  project: string;
  zone: string;
  name: string;
}

/**
 * What the simulated boot script prints about its SSH host key once the instance is RUNNING:
 * 'report' its fingerprint (`hostKeyFingerprint`), 'none' the line a guest without an ed25519
 * host key prints, 'never' no line at all (a script that did not run, a console that lags).
 */
export type GuestHostKey = 'report' | 'none' | 'never';
export type GuestHostKeyPolicy = GuestHostKey | ((inst: InstanceRef) => GuestHostKey);

export interface GceFaults {
  /** Probability (0..1) that a call is answered 429 rateLimitExceeded. */
  rateLimitRate: number;
  /** Probability (0..1) that a call is answered 500 or 503 backendError. */
  serverErrorRate: number;
  /** Restrict the two rates above to these methods (default: all). */
  rateMethods: GceMethod[] | undefined;
  /** Insert completes DONE with error ZONE_RESOURCE_POOL_EXHAUSTED. */
  poolExhausted: boolean | ((ctx: InsertContext) => boolean);
  /**
   * Quota exceeded on insert: 'operation' (or true) = DONE operation with error
   * QUOTA_EXCEEDED; 'http' = synchronous 403 quotaExceeded.
   */
  quotaExceeded: boolean | QuotaMode | ((ctx: InsertContext) => boolean | QuotaMode);
  /** Quota metric named in quota messages (default 'CPUS'). */
  quotaMetric: string;
  /**
   * getSerialPortOutput answers 403 forbidden "Required 'compute.instances.getSerialPortOutput'
   * permission for ...", as GCE does for a caller whose role lacks that permission: every time.
   */
  serialPortDenied: boolean | ((inst: InstanceRef) => boolean);
  /** PROVISIONING+STAGING duration for new instances (read at insert time). */
  bootDelayMs: number;
  /** STOPPING duration for deleted instances (read at delete time). */
  deleteDelayMs: number;
  /**
   * Machine types each zone offers (a zone not listed offers none of them); undefined = every
   * zone offers every type. Others answer 400 "Machine type with name ... does not exist in zone".
   */
  machineTypesByZone: Readonly<Record<string, readonly string[]>> | undefined;
  /** Zones that offer Intel TDX; undefined = all. A TDX insert elsewhere answers 400 (wording unverified). */
  tdxZones: readonly string[] | undefined;
  /**
   * Images with the TDX_CAPABLE guest OS feature in `guestOsFeatures` (images.get/getFromFamily);
   * undefined = all. A TDX insert from another answers 400 (wording unverified). Entries are image
   * references as a config holds them (`projects/P/global/images/NAME`, `.../images/family/F`,
   * `global/images/...` in the caller's project, or a full URL); a family entry covers its image.
   */
  tdxCapableImages: readonly string[] | undefined;
  /**
   * Images that exist, as references like `tdxCapableImages`; undefined = every well-formed
   * reference exists. images.get/getFromFamily of another answers 404 notFound; an insert from it
   * 400 "The referenced image resource cannot be found." (wording unverified).
   */
  images: readonly string[] | undefined;
  /** Zones whose `status` is DOWN in zones.get (default none: every known zone is UP). */
  downZones: readonly string[];
}

export interface GceFakeOptions {
  /** Default project reported as `fake.project` (any project is served). */
  project?: string;
  /** Expected bearer token (default 'test-token'). Mutable later via `fake.accessToken`. */
  accessToken?: string;
  /** External IP put in natIP once RUNNING (default '127.0.0.1'). */
  publicIp?: string | ((inst: { project: string; zone: string; name: string; index: number }) => string);
  /** Zones the fake knows (validation + aggregatedList scopes). */
  zones?: string[];
  /** Seed of the PRNG driving fault rates and generated ids (default 1). */
  seed?: number;
  /** Clock. Default: manual virtual clock starting at 2025-01-01T00:00:00Z. */
  now?: () => number;
  /** Max time a zoneOperations.wait blocks (default 120000, like GCE). */
  waitTimeoutMs?: number;
  /** Virtual ms added to the clock at every HTTP request (default 0). */
  requestTickMs?: number;
  /** Serial text appended (port 1) when an instance first becomes RUNNING. */
  bootSerial?: string | ((inst: { project: string; zone: string; name: string }) => string);
  /** The simulated boot script's host key report (default 'report'); mutable later via `fake.guestHostKey`. */
  guestHostKey?: GuestHostKeyPolicy;
  /** TCP port (default 0 = random). Always binds 127.0.0.1. */
  port?: number;
  bootDelayMs?: number;
  deleteDelayMs?: number;
  faults?: Partial<GceFaults>;
}

export interface GceCall {
  seq: number;
  method: GceMethod;
  httpMethod: string;
  path: string;
  query: Record<string, string>;
  status: number;
  /** Fake-clock time at which the request was received. */
  at: number;
  /** Error reason when status >= 400. */
  reason?: string;
  /** True when the error was injected (failNext / rates). */
  injected?: boolean;
}

export type CallFilter =
  | GceMethodAlias
  | ((c: GceCall) => boolean)
  | { method?: GceMethodAlias; status?: number; path?: string | RegExp; injected?: boolean };

export interface CreateRecord {
  seq: number;
  project: string;
  zone: string;
  name: string;
  requestId: string | undefined;
  labels: Record<string, string>;
  machineType: string;
  operation: string;
  /** 'ok', or the operation error code the insert ended with. */
  outcome: 'ok' | 'ZONE_RESOURCE_POOL_EXHAUSTED' | 'QUOTA_EXCEEDED';
  body: JsonObject;
  at: number;
}

export interface InsertAttempt {
  project: string;
  zone: string;
  name: string | undefined;
  requestId: string | undefined;
  body: JsonObject;
  /** HTTP status the fake answered with. */
  status: number;
  reason?: string;
}

export interface FailNextOptions {
  message?: string;
  /** How many consecutive matching calls fail (default 1). */
  times?: number;
  /**
   * Process the request normally (e.g. really create the instance) and only then
   * answer with the error - the "response lost" case that requestId exists for.
   */
  afterCommit?: boolean;
}

export type JsonObject = { [k: string]: unknown };

// ----------------------------------------------------------------------------------------------
// Constants & small helpers

const API_BASE = 'https://www.googleapis.com/compute/v1';
const VIRTUAL_EPOCH = Date.parse('2025-01-01T00:00:00.000Z');
const EMPTY_LABEL_FINGERPRINT = '42WmSpB8rSM=';
const SERIAL_BUFFER_BYTES = 1024 * 1024;
const MAX_RESULTS_LIMIT = 500;
const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const NAME_RE = /^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$/;

export const DEFAULT_ZONES: readonly string[] = [
  'us-central1-a',
  'us-central1-b',
  'us-central1-c',
  'us-central1-f',
  'us-east1-b',
  'us-east1-c',
  'us-east1-d',
  'us-east4-a',
  'us-east4-b',
  'us-east4-c',
  'us-west1-a',
  'us-west1-b',
  'europe-west4-a',
  'europe-west4-b',
  'europe-west4-c',
  'asia-southeast1-a',
];

const GRPC_STATUS: Record<number, string> = {
  400: 'INVALID_ARGUMENT',
  401: 'UNAUTHENTICATED',
  403: 'PERMISSION_DENIED',
  404: 'NOT_FOUND',
  409: 'ALREADY_EXISTS',
  412: 'FAILED_PRECONDITION',
  429: 'RESOURCE_EXHAUSTED',
  500: 'INTERNAL',
  501: 'UNIMPLEMENTED',
  502: 'UNAVAILABLE',
  503: 'UNAVAILABLE',
  504: 'DEADLINE_EXCEEDED',
};

const RPC_NAME: Record<GceMethod, string> = {
  'instances.insert': 'compute.v1.InstancesService.Insert',
  'instances.get': 'compute.v1.InstancesService.Get',
  'instances.delete': 'compute.v1.InstancesService.Delete',
  'instances.list': 'compute.v1.InstancesService.List',
  'instances.aggregatedList': 'compute.v1.InstancesService.AggregatedList',
  'instances.getSerialPortOutput': 'compute.v1.InstancesService.GetSerialPortOutput',
  'zoneOperations.get': 'compute.v1.ZoneOperationsService.Get',
  'zoneOperations.wait': 'compute.v1.ZoneOperationsService.Wait',
  'zones.get': 'compute.v1.ZonesService.Get',
  'machineTypes.get': 'compute.v1.MachineTypesService.Get',
  'images.get': 'compute.v1.ImagesService.Get',
  'images.getFromFamily': 'compute.v1.ImagesService.GetFromFamily',
  unknown: 'compute.v1.Unknown',
};

const ALIASES: Record<string, GceMethod> = {
  insert: 'instances.insert',
  get: 'instances.get',
  delete: 'instances.delete',
  list: 'instances.list',
  aggregatedList: 'instances.aggregatedList',
  getSerialPortOutput: 'instances.getSerialPortOutput',
  serialPort: 'instances.getSerialPortOutput',
  'operations.get': 'zoneOperations.get',
  wait: 'zoneOperations.wait',
  'operations.wait': 'zoneOperations.wait',
};

function normalizeMethod(m: GceMethodAlias): GceMethod | '*' {
  if (m === '*') return '*';
  return ALIASES[m] ?? (m as GceMethod);
}

/** mulberry32: tiny deterministic PRNG. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** RFC 3339 rendering in a fixed -08:00 offset, the way GCE renders Pacific time. */
function rfc3339(ms: number): string {
  const shifted = new Date(ms - 8 * 3600e3).toISOString(); // e.g. 2024-12-31T16:00:00.000Z
  return `${shifted.slice(0, 23)}-08:00`;
}

function fingerprint(value: unknown): string {
  return createHash('sha256').update(JSON.stringify(value)).digest().subarray(0, 8).toString('base64');
}

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function clone<T>(v: T): T {
  return v === undefined ? v : (JSON.parse(JSON.stringify(v)) as T);
}

function lastSegment(s: string): string {
  const i = s.lastIndexOf('/');
  return i >= 0 ? s.slice(i + 1) : s;
}

function regionOf(zone: string): string {
  return zone.replace(/-[a-z]$/, '');
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly reason: string,
    message: string,
    readonly extra: {
      domain?: string;
      infoReason?: string;
      infoDomain?: string;
      metadata?: Record<string, string>;
      location?: string;
      locationType?: string;
      headers?: Record<string, string>;
    } = {},
  ) {
    super(message);
  }
}

function invalidField(field: string, value: unknown, why: string): HttpError {
  const shown = typeof value === 'string' ? value : value === undefined ? '' : JSON.stringify(value);
  return new HttpError(400, 'invalid', `Invalid value for field '${field}': '${shown}'. ${why}`);
}

function notFound(resourcePath: string): HttpError {
  return new HttpError(404, 'notFound', `The resource '${resourcePath}' was not found`);
}

// ----------------------------------------------------------------------------------------------
// Filter expressions (AIP-160 subset + the regex eq/ne form), as documented for list/aggregatedList

type Token =
  | { t: 'lp' }
  | { t: 'rp' }
  | { t: 'op'; v: string }
  | { t: 'word'; v: string; quoted: boolean };

export type FilterNode =
  | { k: 'and' | 'or'; a: FilterNode; b: FilterNode }
  | { k: 'not'; a: FilterNode }
  | { k: 'cmp'; field: string; op: string; value: string; quoted: boolean };

function tokenizeFilter(src: string): Token[] {
  const out: Token[] = [];
  let i = 0;
  while (i < src.length) {
    const c = src[i]!;
    if (/\s/.test(c)) {
      i++;
    } else if (c === '(') {
      out.push({ t: 'lp' });
      i++;
    } else if (c === ')') {
      out.push({ t: 'rp' });
      i++;
    } else if (c === '"' || c === "'") {
      let j = i + 1;
      let v = '';
      while (j < src.length && src[j] !== c) {
        if (src[j] === '\\' && j + 1 < src.length) j++;
        v += src[j];
        j++;
      }
      if (j >= src.length) throw new Error('unterminated string');
      out.push({ t: 'word', v, quoted: true });
      i = j + 1;
    } else if (src.startsWith('!=', i) || src.startsWith('>=', i) || src.startsWith('<=', i)) {
      out.push({ t: 'op', v: src.slice(i, i + 2) });
      i += 2;
    } else if (c === '=' || c === '>' || c === '<' || c === ':') {
      out.push({ t: 'op', v: c });
      i++;
    } else {
      let j = i;
      while (j < src.length && !/[\s()=!<>:"']/.test(src[j]!)) j++;
      if (j === i) throw new Error(`unexpected character '${c}'`);
      out.push({ t: 'word', v: src.slice(i, j), quoted: false });
      i = j;
    }
  }
  return out;
}

/**
 * Grammar (AIP-160 precedence: OR binds tighter than AND; juxtaposition = AND):
 *   expr     := sequence ('AND' sequence)*
 *   sequence := factor factor*
 *   factor   := term ('OR' term)*
 *   term     := 'NOT' term | '-' term | '(' expr ')' | field op value | field ('eq'|'ne') value
 */
export function parseFilter(src: string): FilterNode | undefined {
  const toks = tokenizeFilter(src);
  let p = 0;
  const peek = (): Token | undefined => toks[p];
  const isKw = (tok: Token | undefined, kw: string): boolean => tok?.t === 'word' && !tok.quoted && tok.v === kw;
  let sawRegex = false;
  let sawAip = false;

  const parseExpr = (): FilterNode => {
    let node = parseSequence();
    while (isKw(peek(), 'AND')) {
      p++;
      node = { k: 'and', a: node, b: parseSequence() };
    }
    return node;
  };
  const startsTerm = (tok: Token | undefined): boolean =>
    tok !== undefined && (tok.t === 'lp' || (tok.t === 'word' && !(isKw(tok, 'AND') || isKw(tok, 'OR'))));
  const parseSequence = (): FilterNode => {
    let node = parseFactor();
    while (startsTerm(peek())) node = { k: 'and', a: node, b: parseFactor() };
    return node;
  };
  const parseFactor = (): FilterNode => {
    let node = parseTerm();
    while (isKw(peek(), 'OR')) {
      p++;
      node = { k: 'or', a: node, b: parseTerm() };
    }
    return node;
  };
  const parseTerm = (): FilterNode => {
    const tok = peek();
    if (tok === undefined) throw new Error('unexpected end of filter');
    if (isKw(tok, 'NOT')) {
      p++;
      return { k: 'not', a: parseTerm() };
    }
    if (tok.t === 'lp') {
      p++;
      const inner = parseExpr();
      if (peek()?.t !== 'rp') throw new Error("expected ')'");
      p++;
      return inner;
    }
    if (tok.t !== 'word') throw new Error('expected a field name');
    let field = tok.v;
    let negate = false;
    if (!tok.quoted && field.startsWith('-') && field.length > 1) {
      negate = true;
      field = field.slice(1);
    }
    p++;
    const opTok = peek();
    let op: string;
    if (opTok?.t === 'op') {
      op = opTok.v;
      sawAip = true;
    } else if (opTok?.t === 'word' && !opTok.quoted && (opTok.v === 'eq' || opTok.v === 'ne')) {
      op = opTok.v;
      sawRegex = true;
    } else {
      throw new Error(`expected an operator after '${field}'`);
    }
    p++;
    const valTok = peek();
    if (valTok?.t !== 'word') throw new Error(`expected a value after '${field} ${op}'`);
    p++;
    const cmp: FilterNode = { k: 'cmp', field, op, value: valTok.v, quoted: valTok.quoted };
    return negate ? { k: 'not', a: cmp } : cmp;
  };

  if (toks.length === 0) return undefined;
  const node = parseExpr();
  if (p !== toks.length) throw new Error('trailing tokens in filter');
  if (sawRegex && sawAip) throw new Error('regular expression and AIP-160 filters cannot be mixed');
  return node;
}

function resolvePath(obj: unknown, path: string[]): unknown[] {
  if (path.length === 0) return obj === undefined ? [] : Array.isArray(obj) ? obj : [obj];
  if (Array.isArray(obj)) return obj.flatMap((el) => resolvePath(el, path));
  if (!isObject(obj)) return [];
  const [head, ...rest] = path;
  return resolvePath(obj[head!], rest);
}

function compareValue(actual: unknown, op: string, expected: string): boolean {
  if (actual === null || actual === undefined) return false;
  if (typeof actual === 'object') return false;
  const a = String(actual);
  const an = Number(a);
  const en = Number(expected);
  const numeric = a.trim() !== '' && expected.trim() !== '' && !Number.isNaN(an) && !Number.isNaN(en);
  switch (op) {
    case '=':
      if (expected.includes('*') && typeof actual === 'string') {
        const re = new RegExp(`^${expected.split('*').map(escapeRegExp).join('.*')}$`);
        return re.test(a);
      }
      return numeric ? an === en : a === expected;
    case '!=':
      return numeric ? an !== en : a !== expected;
    case '>':
      return numeric ? an > en : a > expected;
    case '<':
      return numeric ? an < en : a < expected;
    case '>=':
      return numeric ? an >= en : a >= expected;
    case '<=':
      return numeric ? an <= en : a <= expected;
    case ':':
      return typeof actual === 'string' ? a.includes(expected) : a === expected;
    case 'eq':
      return new RegExp(`^(?:${expected})$`).test(a);
    case 'ne':
      return !new RegExp(`^(?:${expected})$`).test(a);
    default:
      return false;
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

export function matchesFilter(node: FilterNode | undefined, resource: JsonObject): boolean {
  if (node === undefined) return true;
  switch (node.k) {
    case 'and':
      return matchesFilter(node.a, resource) && matchesFilter(node.b, resource);
    case 'or':
      return matchesFilter(node.a, resource) || matchesFilter(node.b, resource);
    case 'not':
      return !matchesFilter(node.a, resource);
    case 'cmp': {
      const values = resolvePath(resource, node.field.split('.'));
      if (node.op === ':' && node.value === '*' && !node.quoted) return values.length > 0;
      if (node.op === '!=' || node.op === 'ne') {
        // A missing field is "not equal" to anything.
        return values.length === 0 || values.every((v) => compareValue(v, node.op, node.value));
      }
      return values.some((v) => compareValue(v, node.op, node.value));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Internal records

interface InstanceRec {
  project: string;
  zone: string;
  name: string;
  id: string;
  index: number;
  createdAt: number;
  stagingAt: number;
  runningAt: number;
  /** Insert failure: instance disappears at this time. */
  failAt?: number;
  deleteAt?: number;
  goneAt?: number;
  terminatedAt?: number;
  startedAt?: number;
  body: JsonObject;
  machineType: string;
  labels: Record<string, string>;
  publicIp: string;
  networkIP: string;
  serial: Map<number, Buffer>;
  bootSerialDone: boolean;
  insertOp: string;
}

interface OpRec {
  name: string;
  id: string;
  project: string;
  zone: string;
  type: 'insert' | 'delete';
  targetName: string;
  targetId: string;
  startAt: number;
  doneAt: number;
  requestId?: string;
  error?: { code: string; message: string; errorDetails?: JsonObject[] };
  httpErrorStatusCode?: number;
  httpErrorMessage?: string;
}

interface PendingFailure {
  method: GceMethod | '*';
  status: number;
  reason: string;
  message?: string;
  remaining: number;
  afterCommit: boolean;
}

interface Route {
  method: GceMethod;
  project: string;
  zone?: string;
  name?: string;
  op?: string;
}

// ----------------------------------------------------------------------------------------------
// The fake

export class GceFake {
  readonly apiEndpoint = '127.0.0.1' as const;
  readonly protocol = 'http' as const;
  readonly project: string;
  /** Token expected in `Authorization: Bearer ...`; may be changed at runtime. */
  accessToken: string;
  /** Mutable at runtime. */
  readonly faults: GceFaults;
  /** Every HTTP request handled, in order. */
  readonly calls: GceCall[] = [];
  /** Every insert that created an instance resource (not idempotent replays, not rejects). */
  readonly creates: CreateRecord[] = [];
  /** Every insert request that got past auth/fault injection, with the answer given. */
  readonly insertAttempts: InsertAttempt[] = [];
  readonly zones: string[];
  waitTimeoutMs: number;
  requestTickMs: number;
  /** Read when an instance becomes RUNNING; may be changed at runtime. */
  guestHostKey: GuestHostKeyPolicy;

  private server!: Server;
  private _port = 0;
  private readonly instances = new Map<string, InstanceRec>();
  private readonly ops = new Map<string, OpRec>();
  private readonly requestIds = new Map<string, string>();
  private readonly pending: PendingFailure[] = [];
  private readonly faultRand: () => number;
  private readonly idRand: () => number;
  private readonly baseNow: () => number;
  private readonly manualClock: boolean;
  private offset = 0;
  private seq = 0;
  private instanceCounter = 0;
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly opts: GceFakeOptions;

  private constructor(opts: GceFakeOptions) {
    this.opts = opts;
    this.project = opts.project ?? 'test-project';
    this.accessToken = opts.accessToken ?? 'test-token';
    this.zones = [...(opts.zones ?? DEFAULT_ZONES)];
    this.waitTimeoutMs = opts.waitTimeoutMs ?? 120_000;
    this.requestTickMs = opts.requestTickMs ?? 0;
    this.guestHostKey = opts.guestHostKey ?? 'report';
    const seed = opts.seed ?? 1;
    this.faultRand = prng(seed);
    this.idRand = prng(seed ^ 0x5bd1e995);
    this.manualClock = opts.now === undefined;
    this.baseNow = opts.now ?? (() => VIRTUAL_EPOCH);
    this.faults = {
      rateLimitRate: 0,
      serverErrorRate: 0,
      rateMethods: undefined,
      poolExhausted: false,
      quotaExceeded: false,
      quotaMetric: 'CPUS',
      serialPortDenied: false,
      machineTypesByZone: undefined,
      tdxZones: undefined,
      tdxCapableImages: undefined,
      images: undefined,
      downZones: [],
      bootDelayMs: opts.bootDelayMs ?? 20_000,
      deleteDelayMs: opts.deleteDelayMs ?? 10_000,
      ...opts.faults,
    };
  }

  static async start(opts: GceFakeOptions = {}): Promise<GceFake> {
    const fake = new GceFake(opts);
    fake.server = createServer((req, res) => fake.onRequest(req, res));
    fake.server.keepAliveTimeout = 1000;
    await new Promise<void>((resolve, reject) => {
      fake.server.once('error', reject);
      fake.server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
    });
    fake._port = (fake.server.address() as AddressInfo).port;
    return fake;
  }

  get port(): number {
    return this._port;
  }

  /** Spread into `new InstancesClient({ ...fake.clientOptions(), authClient })`. */
  clientOptions(): { apiEndpoint: string; port: number; protocol: 'http'; fallback: true } {
    return { apiEndpoint: this.apiEndpoint, port: this._port, protocol: 'http', fallback: true };
  }

  async close(): Promise<void> {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  // -------------------------------------------------------------------- clock

  /** Current time on the fake's clock (ms since epoch). */
  now(): number {
    return this.baseNow() + this.offset;
  }

  /** Move the fake's clock forward. */
  advance(ms: number): void {
    if (ms < 0) throw new Error('cannot go back in time');
    this.offset += ms;
    this.sweep();
  }

  /** Finish booting every instance now: RUNNING, insert operations DONE (failing inserts fail now). */
  bootAll(): void {
    const now = this.now();
    for (const inst of this.instances.values()) {
      if (inst.goneAt !== undefined || inst.terminatedAt !== undefined) continue;
      const op = this.ops.get(inst.insertOp);
      if (inst.failAt !== undefined) {
        inst.failAt = Math.min(inst.failAt, now);
        if (op) op.doneAt = Math.min(op.doneAt, now);
        continue;
      }
      if (inst.runningAt > now) {
        inst.stagingAt = Math.min(inst.stagingAt, now);
        inst.runningAt = now;
      }
      if (op) op.doneAt = Math.min(op.doneAt, inst.runningAt);
    }
    this.sweep();
  }

  /** Advance the clock until every pending operation is DONE. */
  settle(): void {
    let latest = this.now();
    for (const op of this.ops.values()) latest = Math.max(latest, op.doneAt);
    for (const inst of this.instances.values()) {
      if (inst.goneAt !== undefined) latest = Math.max(latest, inst.goneAt);
      else if (inst.failAt !== undefined) latest = Math.max(latest, inst.failAt);
      else latest = Math.max(latest, inst.runningAt);
    }
    this.advance(latest - this.now());
  }

  // -------------------------------------------------------------------- test-side state manipulation

  /**
   * Guest-initiated shutdown (e.g. `poweroff` inside the VM): the instance becomes
   * TERMINATED and keeps existing, as on GCE. Optional text is appended to serial port 1.
   */
  guestPowerOff(project: string, zone: string, name: string, serialText?: string): void {
    const inst = this.mustFind(project, zone, name);
    const now = this.now();
    if (inst.goneAt !== undefined) throw new Error(`instance ${name} is being deleted`);
    if (inst.runningAt > now) {
      inst.stagingAt = Math.min(inst.stagingAt, now);
      inst.runningAt = now;
      const op = this.ops.get(inst.insertOp);
      if (op) op.doneAt = Math.min(op.doneAt, now);
    }
    this.sweep();
    if (serialText !== undefined) this.appendSerial(project, zone, name, serialText);
    inst.terminatedAt ??= now;
  }

  /** Append text to an instance's serial port (default port 1). */
  appendSerial(project: string, zone: string, name: string, text: string, port = 1): void {
    const inst = this.mustFind(project, zone, name);
    const prev = inst.serial.get(port) ?? Buffer.alloc(0);
    inst.serial.set(port, Buffer.concat([prev, Buffer.from(text, 'utf8')]));
  }

  /**
   * The SSH host key fingerprint the simulated guest of this instance reports, as `ssh-keygen -lf`
   * prints it: "SHA256:" + unpadded base64 of sha256 of the instance's resource name (43
   * characters). Deterministic, so a test can compute it even after the instance is deleted.
   */
  hostKeyFingerprint(project: string, zone: string, name: string): string {
    const digest = createHash('sha256').update(`projects/${project}/zones/${zone}/instances/${name}`).digest('base64');
    return `SHA256:${digest.replace(/=+$/, '')}`;
  }

  /**
   * Create an instance directly (no HTTP, no call log, not counted in `creates`).
   * `status: 'RUNNING'` (default) makes it already booted.
   */
  addInstance(
    zone: string,
    body: JsonObject,
    opts: { project?: string; status?: 'PROVISIONING' | 'RUNNING' | 'TERMINATED' } = {},
  ): JsonObject {
    const project = opts.project ?? this.project;
    this.sweep();
    const ctx = this.validateInsert(project, zone, body, undefined);
    if (this.instances.has(key(project, zone, ctx.name))) throw new Error(`GceFake: instance ${ctx.name} already exists`);
    const inst = this.createInstance(ctx, undefined, false);
    if ((opts.status ?? 'RUNNING') !== 'PROVISIONING') {
      const now = this.now();
      inst.stagingAt = inst.runningAt = now;
      const op = this.ops.get(inst.insertOp);
      if (op) op.doneAt = now;
      this.sweep();
      if (opts.status === 'TERMINATED') inst.terminatedAt = now;
    }
    return this.renderInstance(inst);
  }

  /** The Instance resource as the API would return it now, or undefined if absent. */
  getInstance(project: string, zone: string, name: string): JsonObject | undefined {
    this.sweep();
    const inst = this.instances.get(key(project, zone, name));
    return inst ? this.renderInstance(inst) : undefined;
  }

  /** All live instances (optionally restricted), rendered as the API would. */
  listInstances(where: { project?: string; zone?: string; filter?: string } = {}): JsonObject[] {
    this.sweep();
    const node = where.filter ? parseFilter(where.filter) : undefined;
    return this.sortedInstances()
      .filter((i) => (where.project === undefined || i.project === where.project) && (where.zone === undefined || i.zone === where.zone))
      .map((i) => this.renderInstance(i))
      .filter((r) => matchesFilter(node, r));
  }

  /** Live instances carrying label key (and value, if given). */
  instancesByLabel(labelKey: string, value?: string): JsonObject[] {
    this.sweep();
    return this.sortedInstances()
      .filter((i) => labelKey in i.labels && (value === undefined || i.labels[labelKey] === value))
      .map((i) => this.renderInstance(i));
  }

  /** Body received by the latest insert (accepted or rejected) for this instance name. */
  insertBody(zone: string, name: string, project: string = this.project): JsonObject | undefined {
    for (let i = this.insertAttempts.length - 1; i >= 0; i--) {
      const a = this.insertAttempts[i]!;
      if (a.project === project && a.zone === zone && a.name === name) return a.body;
    }
    return undefined;
  }

  get createdCount(): number {
    return this.creates.length;
  }

  createsByName(name: string, zone?: string): number {
    return this.creates.filter((c) => c.name === name && (zone === undefined || c.zone === zone)).length;
  }

  createsByRequestId(requestId: string): number {
    return this.creates.filter((c) => c.requestId === requestId).length;
  }

  createsByLabel(labelKey: string, value?: string): number {
    return this.creates.filter((c) => labelKey in c.labels && (value === undefined || c.labels[labelKey] === value)).length;
  }

  /** Rendered Operation (as zoneOperations.get would return it), or undefined. */
  getOperation(project: string, zone: string, name: string): JsonObject | undefined {
    this.sweep();
    const op = this.ops.get(name);
    return op && op.project === project && op.zone === zone ? this.renderOp(op) : undefined;
  }

  // -------------------------------------------------------------------- faults & call log

  /**
   * Make the next matching call(s) fail with `status` and GCE error `reason`
   * (e.g. failNext('insert', 503, 'backendError')). Use method '*' for any call.
   */
  failNext(method: GceMethodAlias, status: number, reason: string, opts: FailNextOptions = {}): void {
    this.pending.push({
      method: normalizeMethod(method),
      status,
      reason,
      message: opts.message,
      remaining: opts.times ?? 1,
      afterCommit: opts.afterCommit ?? false,
    });
  }

  /** Drop all queued failNext entries. */
  clearFailures(): void {
    this.pending.length = 0;
  }

  countCalls(filter?: CallFilter): number {
    return this.callsMatching(filter).length;
  }

  callsMatching(filter?: CallFilter): GceCall[] {
    if (filter === undefined) return [...this.calls];
    if (typeof filter === 'function') return this.calls.filter(filter);
    if (typeof filter === 'string') {
      const m = normalizeMethod(filter);
      return this.calls.filter((c) => m === '*' || c.method === m);
    }
    const m = filter.method === undefined ? '*' : normalizeMethod(filter.method);
    return this.calls.filter(
      (c) =>
        (m === '*' || c.method === m) &&
        (filter.status === undefined || c.status === filter.status) &&
        (filter.injected === undefined || (c.injected ?? false) === filter.injected) &&
        (filter.path === undefined || (typeof filter.path === 'string' ? c.path === filter.path : filter.path.test(c.path))),
    );
  }

  resetCalls(): void {
    this.calls.length = 0;
  }

  // -------------------------------------------------------------------- HTTP plumbing

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      this.handle(req, Buffer.concat(chunks).toString('utf8'))
        .then(({ status, body, headers, call }) => {
          this.calls.push(call);
          res.statusCode = status;
          res.setHeader('content-type', 'application/json; charset=UTF-8');
          for (const [k, v] of Object.entries(headers ?? {})) res.setHeader(k, v);
          res.end(JSON.stringify(body));
        })
        .catch((err: unknown) => {
          this.calls.push({ seq: ++this.seq, method: 'unknown', httpMethod: req.method ?? '', path: req.url ?? '', query: {}, status: 500, at: this.now(), reason: 'fakeCrashed' });
          res.statusCode = 500;
          res.setHeader('content-type', 'application/json; charset=UTF-8');
          res.end(JSON.stringify({ error: { code: 500, message: `fake crashed: ${String(err)}` } }));
        });
    });
  }

  private async handle(
    req: IncomingMessage,
    rawBody: string,
  ): Promise<{ status: number; body: unknown; headers?: Record<string, string>; call: GceCall }> {
    if (this.requestTickMs > 0) this.offset += this.requestTickMs;
    this.sweep();
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const query: Record<string, string> = {};
    for (const [k, v] of url.searchParams) query[k] = v;
    const httpMethod = (req.method ?? 'GET').toUpperCase();
    const route = matchRoute(httpMethod, url.pathname);
    const call: GceCall = {
      seq: ++this.seq,
      method: route?.method ?? 'unknown',
      httpMethod,
      path: url.pathname,
      query,
      status: 0,
      at: this.now(),
    };
    const fail = (e: HttpError, injected = false) => {
      call.status = e.status;
      call.reason = e.reason;
      if (injected) call.injected = true;
      return { status: e.status, body: this.errorBody(e, call.method), headers: e.extra.headers, call };
    };

    // 1. authentication comes first, as on GCE
    const auth = req.headers.authorization;
    if (auth !== `Bearer ${this.accessToken}`) {
      const missing = auth === undefined;
      return fail(
        new HttpError(
          401,
          missing ? 'required' : 'authError',
          missing
            ? 'Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.'
            : 'Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.',
          {
            domain: 'global',
            infoReason: missing ? 'CREDENTIALS_MISSING' : 'ACCESS_TOKEN_TYPE_UNSUPPORTED',
            infoDomain: 'googleapis.com',
            location: 'Authorization',
            locationType: 'header',
            headers: { 'www-authenticate': 'Bearer realm="https://accounts.google.com/"' },
          },
        ),
      );
    }
    if (!route) {
      return fail(new HttpError(404, 'notFound', `The requested URL ${url.pathname} was not found on this server.`));
    }

    // 2. injected failures
    let deferred: PendingFailure | undefined;
    const idx = this.pending.findIndex((f) => f.method === '*' || f.method === route.method);
    if (idx >= 0) {
      const f = this.pending[idx]!;
      if (--f.remaining <= 0) this.pending.splice(idx, 1);
      if (f.afterCommit) deferred = f;
      else return fail(this.injectedError(f.status, f.reason, f.message), true);
    }
    const rateApplies = this.faults.rateMethods === undefined || this.faults.rateMethods.includes(route.method);
    if (rateApplies && this.faults.rateLimitRate > 0 && this.faultRand() < this.faults.rateLimitRate) {
      return fail(this.injectedError(429, 'rateLimitExceeded'), true);
    }
    if (rateApplies && this.faults.serverErrorRate > 0 && this.faultRand() < this.faults.serverErrorRate) {
      const status = this.faultRand() < 0.5 ? 500 : 503;
      return fail(this.injectedError(status, 'backendError'), true);
    }

    // 3. the actual API
    try {
      const body = await this.dispatch(route, query, rawBody);
      if (deferred) return fail(this.injectedError(deferred.status, deferred.reason, deferred.message), true);
      call.status = 200;
      return { status: 200, body, call };
    } catch (e) {
      if (e instanceof HttpError) return fail(e);
      throw e;
    }
  }

  private injectedError(status: number, reason: string, message?: string): HttpError {
    switch (reason) {
      case 'rateLimitExceeded':
        return new HttpError(status, reason, message ?? 'Rate Limit Exceeded', {
          domain: 'usageLimits',
          infoReason: 'RATE_LIMIT_EXCEEDED',
          infoDomain: 'googleapis.com',
          metadata: { service: 'compute.googleapis.com', quota_metric: 'compute.googleapis.com/default_requests' },
        });
      case 'backendError':
        return new HttpError(
          status,
          reason,
          message ?? (status === 503 ? 'The service is currently unavailable.' : 'Internal error. Please try again or contact Google Support.'),
          { domain: 'global', infoReason: status === 503 ? 'SERVICE_UNAVAILABLE' : 'INTERNAL_ERROR' },
        );
      case 'quotaExceeded':
        return new HttpError(status, reason, message ?? `Quota '${this.faults.quotaMetric}' exceeded.  Limit: 24.0 globally.`, {
          domain: 'usageLimits',
          infoReason: 'QUOTA_EXCEEDED',
        });
      default:
        return new HttpError(status, reason, message ?? `Injected ${status} ${reason}`, { domain: 'global' });
    }
  }

  private errorBody(e: HttpError, method: GceMethod): JsonObject {
    const errEntry: JsonObject = { message: e.message, domain: e.extra.domain ?? 'global', reason: e.reason };
    if (e.extra.location) errEntry['location'] = e.extra.location;
    if (e.extra.locationType) errEntry['locationType'] = e.extra.locationType;
    const infoReason =
      e.extra.infoReason ?? e.reason.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase();
    return {
      error: {
        code: e.status,
        message: e.message,
        errors: [errEntry],
        status: GRPC_STATUS[e.status] ?? 'UNKNOWN',
        details: [
          {
            '@type': 'type.googleapis.com/google.rpc.ErrorInfo',
            reason: infoReason,
            domain: e.extra.infoDomain ?? 'compute.googleapis.com',
            metadata: { service: 'compute.googleapis.com', method: RPC_NAME[method], ...e.extra.metadata },
          },
        ],
      },
    };
  }

  private async dispatch(route: Route, query: Record<string, string>, rawBody: string): Promise<unknown> {
    const { project } = route;
    switch (route.method) {
      case 'instances.insert':
        return this.apiInsert(project, route.zone!, query, rawBody);
      case 'instances.get': {
        this.checkZone(route.zone!);
        return this.renderInstance(this.find404(project, route.zone!, route.name!));
      }
      case 'instances.delete':
        return this.apiDelete(project, route.zone!, route.name!, query);
      case 'instances.list':
        return this.apiList(project, route.zone!, query);
      case 'instances.aggregatedList':
        return this.apiAggregatedList(project, query);
      case 'instances.getSerialPortOutput':
        return this.apiSerial(project, route.zone!, route.name!, query);
      case 'zoneOperations.get':
        return this.renderOp(this.findOp404(project, route.zone!, route.op!));
      case 'zoneOperations.wait':
        return this.apiWait(project, route.zone!, route.op!);
      case 'zones.get':
        return this.apiZone(project, route.zone!);
      case 'machineTypes.get':
        return this.apiMachineType(project, route.zone!, route.name!);
      case 'images.get':
        return this.apiImage(project, { kind: 'image', name: route.name! });
      case 'images.getFromFamily':
        return this.apiImage(project, { kind: 'family', name: route.name! });
      case 'unknown':
        throw new HttpError(404, 'notFound', 'Not found');
    }
  }

  // -------------------------------------------------------------------- API methods

  private checkZone(zone: string): void {
    if (!this.zones.includes(zone)) throw invalidField('zone', zone, 'Unknown zone.');
  }

  private checkRequestId(query: Record<string, string>): string | undefined {
    const rid = query['requestId'];
    if (rid === undefined || rid === '') return undefined;
    if (!UUID_RE.test(rid) || /^[0-]+$/.test(rid)) {
      throw invalidField(
        'requestId',
        rid,
        'The request id must be a valid UUID with the exception that zero UUID is not supported (00000000-0000-0000-0000-000000000000).',
      );
    }
    return rid.toLowerCase();
  }

  private apiInsert(project: string, zone: string, query: Record<string, string>, rawBody: string): JsonObject {
    this.checkZone(zone);
    let body: JsonObject;
    try {
      const parsed: unknown = rawBody.trim() === '' ? {} : JSON.parse(rawBody);
      body = isObject(parsed) ? parsed : {};
    } catch {
      throw new HttpError(400, 'parseError', 'Invalid JSON payload received.');
    }
    const attempt: InsertAttempt = {
      project,
      zone,
      name: typeof body['name'] === 'string' ? body['name'] : undefined,
      requestId: query['requestId'],
      body,
      status: 200,
    };
    this.insertAttempts.push(attempt);
    try {
      const rid = this.checkRequestId(query);
      if (rid !== undefined) {
        const prior = this.requestIds.get(`${project}/${rid}`);
        const priorOp = prior === undefined ? undefined : this.ops.get(prior);
        if (priorOp) return this.renderOp(priorOp);
      }
      const ctx = this.validateInsert(project, zone, body, rid);
      if (this.instances.has(key(project, zone, ctx.name))) {
        throw new HttpError(409, 'alreadyExists', `The resource 'projects/${project}/zones/${zone}/instances/${ctx.name}' already exists`);
      }
      const quota = this.quotaMode(ctx);
      if (quota === 'http') {
        throw new HttpError(
          403,
          'quotaExceeded',
          `Quota '${this.faults.quotaMetric}' exceeded.  Limit: 24.0 in region ${regionOf(zone)}.`,
          { domain: 'usageLimits', infoReason: 'QUOTA_EXCEEDED', metadata: { quota_metric: this.faults.quotaMetric, region: regionOf(zone) } },
        );
      }
      const failure = quota === 'operation' ? 'QUOTA_EXCEEDED' : this.poolExhausted(ctx) ? 'ZONE_RESOURCE_POOL_EXHAUSTED' : undefined;
      const inst = this.createInstance(ctx, failure, true);
      return this.renderOp(this.ops.get(inst.insertOp)!);
    } catch (e) {
      if (e instanceof HttpError) {
        attempt.status = e.status;
        attempt.reason = e.reason;
      }
      throw e;
    }
  }

  private quotaMode(ctx: InsertContext): QuotaMode | undefined {
    const q = this.faults.quotaExceeded;
    const v = typeof q === 'function' ? q(ctx) : q;
    if (v === true || v === 'operation') return 'operation';
    if (v === 'http') return 'http';
    return undefined;
  }

  private poolExhausted(ctx: InsertContext): boolean {
    const p = this.faults.poolExhausted;
    return typeof p === 'function' ? p(ctx) : p;
  }

  /** Validates an Instance body like GCE does (the subset that matters here). */
  private validateInsert(project: string, zone: string, body: JsonObject, requestId: string | undefined): InsertContext {
    this.checkZone(zone);
    const name = body['name'];
    if (typeof name !== 'string' || !NAME_RE.test(name)) {
      throw invalidField('resource.name', name, "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'");
    }
    const mt = body['machineType'];
    if (typeof mt !== 'string' || mt === '') {
      throw invalidField('resource.machineType', mt, 'The resource must be specified.');
    }
    const m = /^(?:(?:https:\/\/www\.googleapis\.com\/compute\/v1\/)?projects\/[^/]+\/)?zones\/([^/]+)\/machineTypes\/([a-z0-9-]+)$/.exec(mt);
    if (!m) throw invalidField('resource.machineType', mt, 'The URL is malformed.');
    if (m[1] !== zone) {
      throw invalidField('resource.machineType', mt, `Cross-zone references are not allowed; the instance is in zone '${zone}'.`);
    }
    const machineType = m[2]!;
    const labels: Record<string, string> = {};
    if (body['labels'] !== undefined) {
      if (!isObject(body['labels'])) throw invalidField('resource.labels', body['labels'], 'Labels must be a map of strings.');
      for (const [k, v] of Object.entries(body['labels'])) {
        if (!/^[a-z][a-z0-9_-]{0,62}$/.test(k)) {
          throw invalidField(`resource.labels`, k, 'Label keys must start with a lowercase letter and contain only lowercase letters, digits, underscores and dashes (at most 63 characters).');
        }
        if (typeof v !== 'string' || !/^[a-z0-9_-]{0,63}$/.test(v)) {
          throw invalidField(`resource.labels.${k}`, v, 'Label values can only contain lowercase letters, digits, underscores and dashes (at most 63 characters).');
        }
        labels[k] = v;
      }
    }
    const offered = this.faults.machineTypesByZone;
    if (offered !== undefined && !(offered[zone] ?? []).includes(machineType)) {
      throw invalidField('resource.machineType', mt, `Machine type with name '${machineType}' does not exist in zone '${zone}'.`);
    }
    // The boot disk: GCE's default type is pd-standard, which newer series (C3, C4, N4) refuse.
    const disks = Array.isArray(body['disks']) ? body['disks'] : [];
    const bootDisk = disks.find((d) => isObject(d) && d['boot'] === true) ?? disks[0];
    const init = isObject(bootDisk) && isObject(bootDisk['initializeParams']) ? bootDisk['initializeParams'] : {};
    const dtRaw = init['diskType'];
    let diskType = 'pd-standard';
    if (dtRaw !== undefined) {
      const dm = typeof dtRaw === 'string' ? /^(?:(?:https:\/\/www\.googleapis\.com\/compute\/v1\/)?projects\/[^/]+\/)?zones\/([^/]+)\/diskTypes\/([a-z0-9-]+)$/.exec(dtRaw) : null;
      if (!dm) throw invalidField('resource.disks[0].initializeParams.diskType', dtRaw, 'The URL is malformed.');
      if (dm[1] !== zone) throw invalidField('resource.disks[0].initializeParams.diskType', dtRaw, `Cross-zone references are not allowed; the instance is in zone '${zone}'.`);
      diskType = dm[2]!;
    }
    const sourceImage = typeof init['sourceImage'] === 'string' ? init['sourceImage'] : '';
    const imageRef = parseImageRef(sourceImage, project);
    if (imageRef && !this.imageExists(imageRef)) {
      // Status documented as an error of the insert; the 400 and its wording are unverified.
      throw invalidField('resource.disks[0].initializeParams.sourceImage', sourceImage, 'The referenced image resource cannot be found.');
    }
    const bootOk = bootDisksFor(machineType);
    if (bootOk !== undefined && !(bootOk as readonly string[]).includes(diskType)) {
      // Status documented as 400; the wording is the fake's own.
      throw invalidField('resource.disks[0].initializeParams.diskType', dtRaw ?? diskType, `${diskType} disk type cannot be used by ${machineType} machine type.`);
    }
    const cic = body['confidentialInstanceConfig'];
    const ctype = isObject(cic) ? cic['confidentialInstanceType'] : undefined;
    if (ctype === 'TDX') {
      if (this.faults.tdxZones !== undefined && !this.faults.tdxZones.includes(zone)) {
        throw new HttpError(400, 'invalid', `Confidential Instance Type 'TDX' is not supported in zone '${zone}'.`);
      }
      const image = sourceImage;
      const capable = imageRef ? this.imageTdxCapable(imageRef) : this.faults.tdxCapableImages === undefined || this.faults.tdxCapableImages.includes(image);
      if (!capable) {
        throw invalidField('resource.disks[0].initializeParams.sourceImage', image, "Confidential Instance Type 'TDX' requires an image with the guest OS feature TDX_CAPABLE.");
      }
      const series = machineType.split('-')[0];
      if (series !== 'c3') {
        throw invalidField(
          'resource.machineType',
          mt,
          `Confidential Instance Type 'TDX' is not supported for machine type '${machineType}'. TDX requires a machine type of series C3.`,
        );
      }
      const sched = body['scheduling'];
      const ohm = isObject(sched) && typeof sched['onHostMaintenance'] === 'string' ? sched['onHostMaintenance'] : 'MIGRATE';
      if (ohm !== 'TERMINATE') {
        throw invalidField(
          'resource.scheduling.onHostMaintenance',
          ohm,
          "Confidential VM instances with Confidential Instance Type 'TDX' do not support live migration; onHostMaintenance must be set to TERMINATE.",
        );
      }
    }
    return { project, zone, name, machineType, labels, requestId, body };
  }

  private createInstance(ctx: InsertContext, failure: 'ZONE_RESOURCE_POOL_EXHAUSTED' | 'QUOTA_EXCEEDED' | undefined, record: boolean): InstanceRec {
    const now = this.now();
    const boot = Math.max(0, this.faults.bootDelayMs);
    const index = this.instanceCounter++;
    const publicIp =
      typeof this.opts.publicIp === 'function'
        ? this.opts.publicIp({ project: ctx.project, zone: ctx.zone, name: ctx.name, index })
        : (this.opts.publicIp ?? '127.0.0.1');
    const inst: InstanceRec = {
      project: ctx.project,
      zone: ctx.zone,
      name: ctx.name,
      id: this.newNumericId(),
      index,
      createdAt: now,
      stagingAt: now + Math.floor(boot / 2),
      runningAt: now + boot,
      body: clone(ctx.body),
      machineType: ctx.machineType,
      labels: ctx.labels,
      publicIp,
      networkIP: `10.128.${Math.floor((index + 2) / 250)}.${((index + 2) % 250) + 2}`,
      serial: new Map(),
      bootSerialDone: false,
      insertOp: '',
    };
    const op: OpRec = {
      name: this.newOpName(now),
      id: this.newNumericId(),
      project: ctx.project,
      zone: ctx.zone,
      type: 'insert',
      targetName: ctx.name,
      targetId: inst.id,
      startAt: now,
      doneAt: inst.runningAt,
      requestId: ctx.requestId,
    };
    if (failure !== undefined) {
      inst.failAt = inst.stagingAt;
      op.doneAt = inst.failAt;
      op.error = this.insertFailure(failure, ctx);
      op.httpErrorStatusCode = failure === 'QUOTA_EXCEEDED' ? 403 : 503;
      op.httpErrorMessage = failure === 'QUOTA_EXCEEDED' ? 'FORBIDDEN' : 'SERVICE UNAVAILABLE';
    }
    inst.insertOp = op.name;
    this.ops.set(op.name, op);
    if (ctx.requestId !== undefined) this.requestIds.set(`${ctx.project}/${ctx.requestId}`, op.name);
    this.instances.set(key(ctx.project, ctx.zone, ctx.name), inst);
    if (record) {
      this.creates.push({
        seq: this.creates.length + 1,
        project: ctx.project,
        zone: ctx.zone,
        name: ctx.name,
        requestId: ctx.requestId,
        labels: { ...ctx.labels },
        machineType: ctx.machineType,
        operation: op.name,
        outcome: failure ?? 'ok',
        body: clone(ctx.body),
        at: now,
      });
    }
    this.sweep();
    return inst;
  }

  private insertFailure(code: 'ZONE_RESOURCE_POOL_EXHAUSTED' | 'QUOTA_EXCEEDED', ctx: InsertContext): NonNullable<OpRec['error']> {
    if (code === 'QUOTA_EXCEEDED') {
      const region = regionOf(ctx.zone);
      return {
        code,
        message: `Quota '${this.faults.quotaMetric}' exceeded.  Limit: 24.0 in region ${region}.`,
        errorDetails: [
          {
            quotaInfo: {
              metricName: `compute.googleapis.com/${this.faults.quotaMetric.toLowerCase()}`,
              limitName: `${this.faults.quotaMetric}-per-project-region`,
              dimensions: { region },
              limit: 24,
            },
          },
        ],
      };
    }
    return {
      code,
      message: `The zone 'projects/${ctx.project}/zones/${ctx.zone}' does not have enough resources available to fulfill the request.  Try a different zone, or try again later.`,
      errorDetails: [
        {
          errorInfo: {
            reason: 'RESOURCE_AVAILABILITY',
            domain: 'compute.googleapis.com',
            metadatas: { zone: ctx.zone, vmType: ctx.machineType },
          },
        },
      ],
    };
  }

  private apiDelete(project: string, zone: string, name: string, query: Record<string, string>): JsonObject {
    this.checkZone(zone);
    const rid = this.checkRequestId(query);
    if (rid !== undefined) {
      const prior = this.requestIds.get(`${project}/${rid}`);
      const priorOp = prior === undefined ? undefined : this.ops.get(prior);
      if (priorOp) return this.renderOp(priorOp);
    }
    const inst = this.find404(project, zone, name);
    const now = this.now();
    if (inst.failAt !== undefined) {
      // deleting an instance whose creation is failing: it is going away anyway
      inst.failAt = Math.min(inst.failAt, now);
    }
    if (inst.goneAt === undefined) {
      inst.deleteAt = now;
      inst.goneAt = now + Math.max(0, this.faults.deleteDelayMs);
      // an insert still in flight ends when the instance goes away
      const insertOp = this.ops.get(inst.insertOp);
      if (insertOp) insertOp.doneAt = Math.min(insertOp.doneAt, inst.goneAt);
    }
    const op: OpRec = {
      name: this.newOpName(now),
      id: this.newNumericId(),
      project,
      zone,
      type: 'delete',
      targetName: name,
      targetId: inst.id,
      startAt: now,
      doneAt: inst.goneAt,
      requestId: rid,
    };
    this.ops.set(op.name, op);
    if (rid !== undefined) this.requestIds.set(`${project}/${rid}`, op.name);
    this.sweep();
    return this.renderOp(op);
  }

  private parsePaging(query: Record<string, string>): { max: number; filter: FilterNode | undefined; after: string | undefined } {
    let max = MAX_RESULTS_LIMIT;
    if (query['maxResults'] !== undefined) {
      const n = Number(query['maxResults']);
      if (!Number.isInteger(n) || n < 0) throw invalidField('maxResults', query['maxResults'], 'Must be a non-negative integer.');
      if (n > MAX_RESULTS_LIMIT) throw invalidField('maxResults', query['maxResults'], `Must be less than or equal to ${MAX_RESULTS_LIMIT}`);
      if (n > 0) max = n;
    }
    let filter: FilterNode | undefined;
    const src = query['filter'];
    if (src !== undefined && src.trim() !== '') {
      try {
        filter = parseFilter(src);
      } catch (e) {
        throw invalidField('filter', src, `Invalid list filter expression: ${(e as Error).message}.`);
      }
    }
    if (query['orderBy'] !== undefined && query['orderBy'] !== '' && query['orderBy'] !== 'name') {
      // GCE only supports `name` and `creationTimestamp desc`; the fake supports name only.
      if (query['orderBy'] !== 'creationTimestamp desc') throw invalidField('orderBy', query['orderBy'], 'Invalid sort order.');
    }
    let after: string | undefined;
    const tok = query['pageToken'];
    if (tok !== undefined && tok !== '') {
      try {
        const decoded = JSON.parse(Buffer.from(tok, 'base64url').toString('utf8')) as { a?: unknown; f?: unknown };
        if (typeof decoded.a !== 'string' || decoded.f !== (src ?? '')) throw new Error('mismatch');
        after = decoded.a;
      } catch {
        throw invalidField('pageToken', tok, 'The page token is invalid or does not match the request.');
      }
    }
    return { max, filter, after };
  }

  private pageToken(after: string, filter: string | undefined): string {
    return Buffer.from(JSON.stringify({ a: after, f: filter ?? '' }), 'utf8').toString('base64url');
  }

  private apiList(project: string, zone: string, query: Record<string, string>): JsonObject {
    this.checkZone(zone);
    const { max, filter, after } = this.parsePaging(query);
    let candidates = this.sortedInstances().filter((i) => i.project === project && i.zone === zone);
    if (query['orderBy'] === 'creationTimestamp desc') candidates = [...candidates].sort((a, b) => b.createdAt - a.createdAt || cmp(a.name, b.name));
    const rendered = candidates.map((i) => ({ sortKey: i.name, r: this.renderInstance(i) })).filter((x) => matchesFilter(filter, x.r));
    const startIdx = after === undefined ? 0 : rendered.findIndex((x) => x.sortKey === after) + 1;
    if (after !== undefined && startIdx === 0) {
      // the anchor disappeared: continue after the first name greater than it
      const i = rendered.findIndex((x) => x.sortKey > after);
      return this.listPage(project, zone, rendered.slice(i < 0 ? rendered.length : i), max, query['filter']);
    }
    return this.listPage(project, zone, rendered.slice(startIdx), max, query['filter']);
  }

  private listPage(project: string, zone: string, rest: { sortKey: string; r: JsonObject }[], max: number, filter: string | undefined): JsonObject {
    const page = rest.slice(0, max);
    const out: JsonObject = {
      kind: 'compute#instanceList',
      id: `projects/${project}/zones/${zone}/instances`,
      selfLink: `${API_BASE}/projects/${project}/zones/${zone}/instances`,
    };
    if (page.length > 0) out['items'] = page.map((x) => x.r);
    if (rest.length > max) out['nextPageToken'] = this.pageToken(page[page.length - 1]!.sortKey, filter);
    return out;
  }

  private apiAggregatedList(project: string, query: Record<string, string>): JsonObject {
    const { max, filter, after } = this.parsePaging(query);
    const all = this.sortedInstances()
      .filter((i) => i.project === project)
      .map((i) => ({ sortKey: `${i.zone}/${i.name}`, zone: i.zone, r: this.renderInstance(i) }))
      .filter((x) => matchesFilter(filter, x.r));
    const rest = after === undefined ? all : all.filter((x) => x.sortKey > after);
    const page = rest.slice(0, max);
    const scopes = new Set<string>(this.zones);
    for (const i of this.instances.values()) if (i.project === project) scopes.add(i.zone);
    const items: JsonObject = {};
    for (const zone of [...scopes].sort(cmp)) {
      const scope = `zones/${zone}`;
      const inZone = page.filter((x) => x.zone === zone).map((x) => x.r);
      items[scope] =
        inZone.length > 0
          ? { instances: inZone }
          : {
              warning: {
                code: 'NO_RESULTS_ON_PAGE',
                message: `There are no results for scope '${scope}' on this page.`,
                data: [{ key: 'scope', value: scope }],
              },
            };
    }
    const out: JsonObject = {
      kind: 'compute#instanceAggregatedList',
      id: `projects/${project}/aggregated/instances`,
      items,
      selfLink: `${API_BASE}/projects/${project}/aggregated/instances`,
    };
    if (rest.length > max) out['nextPageToken'] = this.pageToken(page[page.length - 1]!.sortKey, query['filter']);
    return out;
  }

  private apiSerial(project: string, zone: string, name: string, query: Record<string, string>): JsonObject {
    this.checkZone(zone);
    const ref = { project, zone, name };
    const denied = this.faults.serialPortDenied;
    // IAM is checked before the resource is looked up, as on GCE (a 403 does not reveal existence).
    if (typeof denied === 'function' ? denied(ref) : denied) {
      throw new HttpError(403, 'forbidden', `Required 'compute.instances.getSerialPortOutput' permission for 'projects/${project}/zones/${zone}/instances/${name}'`);
    }
    const inst = this.find404(project, zone, name);
    const port = query['port'] === undefined || query['port'] === '' ? 1 : Number(query['port']);
    if (!Number.isInteger(port) || port < 1) throw invalidField('port', query['port'], 'Must be greater than or equal to 1');
    if (port > 4) throw invalidField('port', query['port'], 'Must be less than or equal to 4');
    const startRaw = query['start'] === undefined || query['start'] === '' ? 0 : Number(query['start']);
    if (!Number.isInteger(startRaw)) throw invalidField('start', query['start'], 'Must be an integer.');
    const buf = inst.serial.get(port) ?? Buffer.alloc(0);
    const total = buf.length;
    const oldest = Math.max(0, total - SERIAL_BUFFER_BYTES);
    // negative start = the most recent |start| bytes; discarded output moves start forward
    const start = startRaw < 0 ? Math.max(oldest, total + startRaw) : Math.max(oldest, startRaw);
    const contents = start >= total ? '' : buf.subarray(start, total).toString('utf8');
    return {
      kind: 'compute#serialPortOutput',
      contents,
      start: String(start),
      next: String(Math.max(total, start)),
      selfLink: `${API_BASE}/projects/${project}/zones/${zone}/instances/${name}/serialPort?port=${port}`,
    };
  }

  private async apiWait(project: string, zone: string, opName: string): Promise<JsonObject> {
    const op = this.findOp404(project, zone, opName);
    const remaining = op.doneAt - this.now();
    if (remaining > 0) {
      const step = Math.min(remaining, this.waitTimeoutMs);
      if (this.manualClock) {
        this.advance(step);
      } else if (step > 0) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(() => {
            this.timers.delete(t);
            resolve();
          }, step);
          this.timers.add(t);
        });
        this.sweep();
      }
    }
    return this.renderOp(op);
  }

  // -------------------------------------------------------------------- read-only catalogue (zones, machine types, images)

  /** zones.get: every zone the fake knows, UP unless listed in `faults.downZones`; others 404. */
  private apiZone(project: string, zone: string): JsonObject {
    if (!this.zones.includes(zone)) throw notFound(`projects/${project}/zones/${zone}`);
    return {
      kind: 'compute#zone',
      id: stableId(`zone/${zone}`),
      creationTimestamp: rfc3339(0),
      name: zone,
      description: zone,
      status: this.faults.downZones.includes(zone) ? 'DOWN' : 'UP',
      region: `${API_BASE}/projects/${project}/regions/${regionOf(zone)}`,
      selfLink: `${API_BASE}/projects/${project}/zones/${zone}`,
      availableCpuPlatforms: ['Intel Sapphire Rapids', 'Intel Ice Lake', 'Intel Cascade Lake', 'AMD Milan'],
      supportsPzs: false,
    };
  }

  /**
   * machineTypes.get: offered per `faults.machineTypesByZone` (undefined = every type in every
   * known zone), as the insert decides; others 404. Sizes are derived from the name.
   */
  private apiMachineType(project: string, zone: string, machineType: string): JsonObject {
    const offered = this.faults.machineTypesByZone;
    const path = `projects/${project}/zones/${zone}/machineTypes/${machineType}`;
    if (!this.zones.includes(zone) || !/^[a-z][a-z0-9-]*$/.test(machineType) || (offered !== undefined && !(offered[zone] ?? []).includes(machineType))) throw notFound(path);
    const { cpus, memoryMb } = machineSize(machineType);
    return {
      kind: 'compute#machineType',
      id: stableId(`machineType/${machineType}`),
      creationTimestamp: rfc3339(0),
      name: machineType,
      description: `${cpus} vCPUs ${Math.round(memoryMb / 1024)} GB RAM`,
      guestCpus: cpus,
      memoryMb,
      imageSpaceGb: 0,
      maximumPersistentDisks: 128,
      maximumPersistentDisksSizeGb: '263168',
      zone,
      selfLink: `${API_BASE}/${path}`,
      isSharedCpu: false,
      architecture: 'X86_64',
    };
  }

  /**
   * images.get / images.getFromFamily: per `faults.images` (undefined = every well-formed
   * reference exists); a family resolves to its image `<family>-v20250101`. `guestOsFeatures`
   * carries TDX_CAPABLE per `faults.tdxCapableImages`.
   */
  private apiImage(project: string, ref: ImageRef): JsonObject {
    const path = ref.kind === 'family' ? `projects/${project}/global/images/family/${ref.name}` : `projects/${project}/global/images/${ref.name}`;
    if (!NAME_RE.test(ref.name) || !this.imageExists({ project, ...ref })) throw notFound(path);
    const family = ref.kind === 'family' ? ref.name : familyOfImage(ref.name);
    const name = ref.kind === 'family' ? imageOfFamily(ref.name) : ref.name;
    const features = ['UEFI_COMPATIBLE', 'VIRTIO_SCSI_MULTIQUEUE', 'GVNIC', 'SEV_CAPABLE'];
    if (this.imageTdxCapable({ project, ...ref })) features.push('TDX_CAPABLE');
    return {
      kind: 'compute#image',
      id: stableId(`image/${project}/${name}`),
      creationTimestamp: rfc3339(VIRTUAL_EPOCH),
      name,
      description: `${name}, built on 20250101`,
      sourceType: 'RAW',
      status: 'READY',
      archiveSizeBytes: '1073741824',
      diskSizeGb: '10',
      ...(family ? { family } : {}),
      selfLink: `${API_BASE}/projects/${project}/global/images/${name}`,
      labelFingerprint: EMPTY_LABEL_FINGERPRINT,
      guestOsFeatures: features.map((type) => ({ type })),
      storageLocations: ['us', 'eu', 'asia'],
      architecture: 'X86_64',
    };
  }

  private imageExists(ref: ResolvedImageRef): boolean {
    return this.faults.images === undefined || this.faults.images.some((e) => imageRefCovers(e, ref));
  }

  private imageTdxCapable(ref: ResolvedImageRef): boolean {
    return this.faults.tdxCapableImages === undefined || this.faults.tdxCapableImages.some((e) => imageRefCovers(e, ref));
  }

  // -------------------------------------------------------------------- lookups & rendering

  private mustFind(project: string, zone: string, name: string): InstanceRec {
    this.sweep();
    const inst = this.instances.get(key(project, zone, name));
    if (!inst) throw new Error(`GceFake: no instance ${project}/${zone}/${name}`);
    return inst;
  }

  private find404(project: string, zone: string, name: string): InstanceRec {
    const inst = this.instances.get(key(project, zone, name));
    if (!inst) throw notFound(`projects/${project}/zones/${zone}/instances/${name}`);
    return inst;
  }

  private findOp404(project: string, zone: string, name: string): OpRec {
    const op = this.ops.get(name);
    if (!op || op.project !== project || op.zone !== zone) throw notFound(`projects/${project}/zones/${zone}/operations/${name}`);
    return op;
  }

  private sortedInstances(): InstanceRec[] {
    return [...this.instances.values()].sort((a, b) => cmp(a.zone, b.zone) || cmp(a.name, b.name));
  }

  /** Apply time: remove vanished instances, run one-shot boot side effects. */
  private sweep(): void {
    const now = this.now();
    for (const [k, inst] of this.instances) {
      if ((inst.goneAt !== undefined && now >= inst.goneAt) || (inst.failAt !== undefined && now >= inst.failAt)) {
        this.instances.delete(k);
        continue;
      }
      if (!inst.bootSerialDone && inst.failAt === undefined && inst.deleteAt === undefined && now >= inst.runningAt) {
        inst.bootSerialDone = true;
        inst.startedAt = inst.runningAt;
        const text = typeof this.opts.bootSerial === 'function' ? this.opts.bootSerial(inst) : this.opts.bootSerial;
        // Kernel and image output first, then the startup script's first line about the host key.
        const report = this.hostKeyReport(inst);
        for (const t of [text, report]) {
          if (!t) continue;
          const prev = inst.serial.get(1) ?? Buffer.alloc(0);
          inst.serial.set(1, Buffer.concat([prev, Buffer.from(t, 'utf8')]));
        }
      }
    }
  }

  /** The boot script's host key line for this instance, if it runs the bridge's boot script and reports. */
  private hostKeyReport(inst: InstanceRec): string | undefined {
    const requestId = bootScriptRequestId(inst.body);
    if (requestId === undefined) return undefined;
    const ref = { project: inst.project, zone: inst.zone, name: inst.name };
    const mode = typeof this.guestHostKey === 'function' ? this.guestHostKey(ref) : this.guestHostKey;
    if (mode === 'never') return undefined;
    // A TDX grant's script reports evidence next (src/attestation/guest.ts); this fake guest's kernel
    // has no configfs-tsm, so the report is the script's "none" line (tests run the real script
    // through `bootSerial` for a quote).
    const evidence = bootScriptAttests(inst.body) ? `COMPUTE-BRIDGE-EVIDENCE-NONE ${requestId} this guest kernel has no configfs-tsm\n` : '';
    return `${hostKeyMarker(requestId, mode === 'none' ? null : this.hostKeyFingerprint(inst.project, inst.zone, inst.name))}\n${evidence}`;
  }

  private statusOf(inst: InstanceRec): string {
    const now = this.now();
    if (inst.goneAt !== undefined) return 'STOPPING';
    if (inst.terminatedAt !== undefined) return 'TERMINATED';
    if (now < inst.stagingAt) return 'PROVISIONING';
    if (now < inst.runningAt) return 'STAGING';
    return 'RUNNING';
  }

  private renderInstance(inst: InstanceRec): JsonObject {
    const b = inst.body;
    const { project, zone, name } = inst;
    const status = this.statusOf(inst);
    const zoneUrl = `${API_BASE}/projects/${project}/zones/${zone}`;
    const selfLink = `${zoneUrl}/instances/${name}`;
    const hasIp =
      inst.startedAt !== undefined && inst.terminatedAt === undefined && (status === 'RUNNING' || status === 'STOPPING');
    const nicsIn = Array.isArray(b['networkInterfaces']) && b['networkInterfaces'].length > 0 ? b['networkInterfaces'] : [{}];
    const networkInterfaces = nicsIn.map((raw: unknown, i: number) => {
      const nic = isObject(raw) ? clone(raw) : {};
      const out: JsonObject = {
        kind: 'compute#networkInterface',
        network: expandUrl(nic['network'], project, 'global/networks/default'),
        networkIP: i === 0 ? inst.networkIP : `10.${129 + i}.0.${(inst.index % 250) + 2}`,
        name: `nic${i}`,
        fingerprint: fingerprint([inst.id, i]),
        stackType: 'IPV4_ONLY',
        ...nic,
      };
      out['network'] = expandUrl(nic['network'], project, 'global/networks/default');
      if (nic['subnetwork'] !== undefined) out['subnetwork'] = expandUrl(nic['subnetwork'], project, '');
      if (Array.isArray(nic['accessConfigs'])) {
        out['accessConfigs'] = nic['accessConfigs'].map((acRaw: unknown, j: number) => {
          const ac = isObject(acRaw) ? acRaw : {};
          const rendered: JsonObject = {
            kind: 'compute#accessConfig',
            type: 'ONE_TO_ONE_NAT',
            name: 'External NAT',
            networkTier: 'PREMIUM',
            ...ac,
          };
          const staticIp = typeof ac['natIP'] === 'string' && ac['natIP'] !== '';
          if (staticIp) rendered['natIP'] = ac['natIP'];
          else if (hasIp && j === 0) rendered['natIP'] = inst.publicIp;
          else delete rendered['natIP'];
          return rendered;
        });
      }
      return out;
    });
    const disks = (Array.isArray(b['disks']) ? b['disks'] : []).map((raw: unknown, i: number) => {
      const d = isObject(raw) ? raw : {};
      const init = isObject(d['initializeParams']) ? d['initializeParams'] : {};
      const deviceName = typeof d['deviceName'] === 'string' ? d['deviceName'] : i === 0 ? name : `persistent-disk-${i}`;
      const out: JsonObject = {
        kind: 'compute#attachedDisk',
        type: 'PERSISTENT',
        mode: 'READ_WRITE',
        source: `${zoneUrl}/disks/${typeof init['diskName'] === 'string' ? init['diskName'] : deviceName}`,
        deviceName,
        index: i,
        boot: d['boot'] === true || i === 0,
        autoDelete: d['autoDelete'] !== false,
        interface: 'SCSI',
        diskSizeGb: String(init['diskSizeGb'] ?? '10'),
        architecture: 'X86_64',
      };
      return out;
    });
    const sched = isObject(b['scheduling']) ? b['scheduling'] : {};
    const metadataIn = isObject(b['metadata']) ? b['metadata'] : {};
    const metadataItems = Array.isArray(metadataIn['items']) ? clone(metadataIn['items']) : [];
    const tagsIn = isObject(b['tags']) ? b['tags'] : {};
    const labels = { ...inst.labels };
    const out: JsonObject = {
      kind: 'compute#instance',
      id: inst.id,
      creationTimestamp: rfc3339(inst.createdAt),
      name,
      tags: { ...(Array.isArray(tagsIn['items']) ? { items: clone(tagsIn['items']) } : {}), fingerprint: fingerprint(tagsIn['items'] ?? []) },
      machineType: `${zoneUrl}/machineTypes/${inst.machineType}`,
      status,
      zone: zoneUrl,
      canIpForward: b['canIpForward'] === true,
      networkInterfaces,
      disks,
      metadata: {
        kind: 'compute#metadata',
        fingerprint: fingerprint(metadataItems),
        ...(metadataItems.length > 0 ? { items: metadataItems } : {}),
      },
      selfLink,
      scheduling: {
        onHostMaintenance: 'MIGRATE',
        automaticRestart: true,
        preemptible: false,
        provisioningModel: 'STANDARD',
        ...clone(sched),
      },
      cpuPlatform: cpuPlatformFor(inst.machineType),
      labelFingerprint: Object.keys(labels).length === 0 ? EMPTY_LABEL_FINGERPRINT : fingerprint(labels),
      startRestricted: false,
      deletionProtection: b['deletionProtection'] === true,
      fingerprint: fingerprint([inst.id, status]),
      lastStartTimestamp: inst.startedAt !== undefined ? rfc3339(inst.startedAt) : undefined,
      lastStopTimestamp: inst.terminatedAt !== undefined ? rfc3339(inst.terminatedAt) : undefined,
      satisfiesPzi: true,
    };
    if (Object.keys(labels).length > 0) out['labels'] = labels;
    if (typeof b['description'] === 'string') out['description'] = b['description'];
    if (typeof b['hostname'] === 'string') out['hostname'] = b['hostname'];
    if (Array.isArray(b['serviceAccounts'])) out['serviceAccounts'] = clone(b['serviceAccounts']);
    if (Array.isArray(b['guestAccelerators'])) out['guestAccelerators'] = clone(b['guestAccelerators']);
    if (isObject(b['shieldedInstanceConfig'])) out['shieldedInstanceConfig'] = clone(b['shieldedInstanceConfig']);
    if (isObject(b['confidentialInstanceConfig'])) out['confidentialInstanceConfig'] = clone(b['confidentialInstanceConfig']);
    if (isObject(b['advancedMachineFeatures'])) out['advancedMachineFeatures'] = clone(b['advancedMachineFeatures']);
    if (typeof b['minCpuPlatform'] === 'string') out['minCpuPlatform'] = b['minCpuPlatform'];
    if (out['lastStartTimestamp'] === undefined) delete out['lastStartTimestamp'];
    if (out['lastStopTimestamp'] === undefined) delete out['lastStopTimestamp'];
    return out;
  }

  private renderOp(op: OpRec): JsonObject {
    const now = this.now();
    const done = now >= op.doneAt;
    const zoneUrl = `${API_BASE}/projects/${op.project}/zones/${op.zone}`;
    const out: JsonObject = {
      kind: 'compute#operation',
      id: op.id,
      name: op.name,
      zone: zoneUrl,
      operationType: op.type,
      targetLink: `${zoneUrl}/instances/${op.targetName}`,
      targetId: op.targetId,
      status: done ? 'DONE' : 'RUNNING',
      user: `fake-sa@${op.project}.iam.gserviceaccount.com`,
      progress: done ? 100 : 0,
      insertTime: rfc3339(op.startAt),
      startTime: rfc3339(op.startAt),
      selfLink: `${zoneUrl}/operations/${op.name}`,
    };
    if (op.requestId !== undefined) out['clientOperationId'] = op.requestId;
    if (done) {
      out['endTime'] = rfc3339(op.doneAt);
      if (op.error) {
        out['error'] = { errors: [clone(op.error)] };
        out['httpErrorStatusCode'] = op.httpErrorStatusCode;
        out['httpErrorMessage'] = op.httpErrorMessage;
      }
    }
    return out;
  }

  private newNumericId(): string {
    const hi = Math.floor(this.idRand() * 0x7fffffff);
    const lo = Math.floor(this.idRand() * 0xffffffff);
    const n = ((BigInt(hi) << 32n) | BigInt(lo)) % 8_000_000_000_000_000_000n;
    return (n + 1_000_000_000_000_000_000n).toString();
  }

  private newOpName(now: number): string {
    const hex = (n: number) =>
      Array.from({ length: n }, () => Math.floor(this.idRand() * 16).toString(16)).join('');
    return `operation-${now}-${hex(13)}-${hex(8)}-${hex(8)}`;
  }
}

// ----------------------------------------------------------------------------------------------

/**
 * The request id in the bridge's boot script (`startup-script` metadata), as the script itself
 * has it: the value of its `CB_REQUEST_ID='...'` line, a single-quoted POSIX literal (`'\''` is a
 * quote). undefined for any other startup script.
 */
function bootScriptAttests(body: JsonObject): boolean {
  const items = (body['metadata'] as JsonObject | undefined)?.['items'];
  const script = Array.isArray(items) ? (items as JsonObject[]).find((i) => i?.['key'] === 'startup-script')?.['value'] : undefined;
  return typeof script === 'string' && /^CB_ATTEST_NONCE=/m.test(script);
}

function bootScriptRequestId(body: JsonObject): string | undefined {
  const items = (body['metadata'] as JsonObject | undefined)?.['items'];
  if (!Array.isArray(items)) return undefined;
  const script = (items as JsonObject[]).find((i) => i?.['key'] === 'startup-script')?.['value'];
  if (typeof script !== 'string') return undefined;
  const m = /^CB_REQUEST_ID='((?:[^']|'\\'')*)'$/m.exec(script);
  return m ? m[1]!.replace(/'\\''/g, "'") : undefined;
}

interface ImageRef {
  kind: 'image' | 'family';
  name: string;
}
interface ResolvedImageRef extends ImageRef {
  project: string;
}

/**
 * An image reference as GCE takes it in `initializeParams.sourceImage`: optionally a full
 * `https://.../compute/v1/` URL, optionally `projects/P/`, then `global/images/NAME` or
 * `global/images/family/FAMILY` (without a project: the caller's).
 */
function parseImageRef(value: string, project: string): ResolvedImageRef | undefined {
  const m = /^(?:https:\/\/[a-z.]+\/compute\/v1\/)?(?:projects\/([^/]+)\/)?global\/images\/(?:(family)\/)?([^/]+)$/.exec(value);
  if (!m) return undefined;
  return { project: m[1] ?? project, kind: m[2] ? 'family' : 'image', name: m[3]! };
}

/** The image a family resolves to in this fake. */
function imageOfFamily(family: string): string {
  return `${family}-v20250101`;
}
function familyOfImage(name: string): string | undefined {
  return /^(.+)-v20250101$/.exec(name)?.[1];
}

/** Does the configured reference `entry` name the image `ref` (a family entry also names its image)? */
function imageRefCovers(entry: string, ref: ResolvedImageRef): boolean {
  const e = parseImageRef(entry, ref.project);
  if (!e || e.project !== ref.project) return false;
  if (e.kind === ref.kind) return e.name === ref.name;
  return e.kind === 'family' && ref.kind === 'image' && imageOfFamily(e.name) === ref.name;
}

/**
 * vCPUs and memory from a predefined machine type name: standard 4 GB per vCPU, highmem 8,
 * highcpu 1 (2 on C3/C3D/C4), N1 3.75 / 6.5 / 0.9 (GCE's machine family pages); others 4 GB per vCPU.
 */
function machineSize(machineType: string): { cpus: number; memoryMb: number } {
  const m = /^([a-z0-9]+)-([a-z]+)-(\d+)/.exec(machineType);
  const cpus = m ? Number(m[3]) : 2;
  const series = m?.[1] ?? '';
  const kind = m?.[2] ?? 'standard';
  const n1 = series === 'n1';
  const perCpuGb = kind === 'highmem' ? (n1 ? 6.5 : 8) : kind === 'highcpu' ? (n1 ? 0.9 : /^c(3|3d|4)$/.test(series) ? 2 : 1) : n1 ? 3.75 : 4;
  return { cpus, memoryMb: Math.round(cpus * perCpuGb * 1024) };
}

/** A stable uint64-looking id (decimal string, as GCE renders ids) for a catalogue resource. */
function stableId(what: string): string {
  return BigInt('0x' + createHash('sha256').update(what).digest('hex').slice(0, 15)).toString();
}

function key(project: string, zone: string, name: string): string {
  return `${project}/${zone}/${name}`;
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function expandUrl(v: unknown, project: string, dflt: string): string {
  const s = typeof v === 'string' && v !== '' ? v : dflt;
  if (s.startsWith('https://')) return s;
  if (s.startsWith('projects/')) return `${API_BASE}/${s}`;
  return `${API_BASE}/projects/${project}/${s}`;
}

function cpuPlatformFor(machineType: string): string {
  const series = machineType.split('-')[0] ?? '';
  if (series === 'c3') return 'Intel Sapphire Rapids';
  if (series === 'n2d' || series === 'c2d' || series === 'c3d' || series === 't2d') return 'AMD Milan';
  if (series === 'n2' || series === 'c2') return 'Intel Cascade Lake';
  return 'Intel Broadwell';
}

function matchRoute(httpMethod: string, pathname: string): Route | undefined {
  const prefix = '/compute/v1/projects/';
  if (!pathname.startsWith(prefix)) return undefined;
  let parts: string[];
  try {
    parts = pathname.slice(prefix.length).split('/').map(decodeURIComponent);
  } catch {
    return undefined;
  }
  const [project, a, b, c, d, e, f] = parts;
  if (!project) return undefined;
  if (a === 'aggregated' && b === 'instances' && c === undefined && httpMethod === 'GET') {
    return { method: 'instances.aggregatedList', project };
  }
  // GET /global/images/{image} and /global/images/family/{family} (ImagesService Get, GetFromFamily)
  if (a === 'global' && b === 'images' && c && httpMethod === 'GET') {
    if (c === 'family' && d && e === undefined) return { method: 'images.getFromFamily', project, name: d };
    if (d === undefined) return { method: 'images.get', project, name: c };
    return undefined;
  }
  if (a !== 'zones' || !b) return undefined;
  const zone = b;
  if (c === undefined) return httpMethod === 'GET' ? { method: 'zones.get', project, zone } : undefined;
  if (c === 'machineTypes' && d && e === undefined && httpMethod === 'GET') return { method: 'machineTypes.get', project, zone, name: d };
  if (c === 'instances') {
    if (d === undefined) {
      if (httpMethod === 'GET') return { method: 'instances.list', project, zone };
      if (httpMethod === 'POST') return { method: 'instances.insert', project, zone };
      return undefined;
    }
    if (e === undefined) {
      if (httpMethod === 'GET') return { method: 'instances.get', project, zone, name: d };
      if (httpMethod === 'DELETE') return { method: 'instances.delete', project, zone, name: d };
      return undefined;
    }
    if (e === 'serialPort' && f === undefined && httpMethod === 'GET') {
      return { method: 'instances.getSerialPortOutput', project, zone, name: d };
    }
    return undefined;
  }
  if (c === 'operations' && d) {
    if (e === undefined && httpMethod === 'GET') return { method: 'zoneOperations.get', project, zone, op: d };
    if (e === 'wait' && f === undefined && httpMethod === 'POST') return { method: 'zoneOperations.wait', project, zone, op: d };
  }
  return undefined;
}
