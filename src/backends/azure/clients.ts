/**
 * The ARM clients of the Azure adapter: credentials from the config only (service principal secret
 * or managed identity; never DefaultAzureCredential), the TLS context for ca_file built once and
 * shared by the ARM clients and the boot-diagnostics blob reads, and the SDKs loaded on first use.
 */
import { readFileSync } from "node:fs";
import https from "node:https";
import path from "node:path";
import tls from "node:tls";
import type { ComputeManagementClient } from "@azure/arm-compute";
import type { NetworkManagementClient } from "@azure/arm-network";
import type { TokenCredential } from "@azure/identity";
import type { AzureConfig } from "../../config/schema.js";
import { readSecret, SecretError } from "../../config/secrets.js";
import { VERSION } from "../../version.js";
import { BackendError, CredentialError } from "../backend.js";
import { redact } from "./errors.js";

export interface Clients {
  compute: ComputeManagementClient;
  network: NetworkManagementClient;
}

export interface ArmClientOptions {
  /**
   * Use this credential instead of building one from the config (tests pass the ARM fake's).
   * The bridge itself never uses DefaultAzureCredential: production credentials come only from
   * the config (service principal secret or managed identity).
   */
  credential?: TokenCredential;
  /** Base delay of the SDK's exponential request retry (default 800 ms); tests shorten it. */
  retryDelayInMs?: number;
  /** Request retries by the SDK pipeline (default 3): 429 honours Retry-After, 5xx back off. */
  maxRetries?: number;
}

const KNOWN_AUTHORITY_HOSTS = new Set(["login.microsoftonline.com", "login.chinacloudapi.cn", "login.microsoftonline.us", "login.microsoftonline.de"]);

export class ArmClients {
  private clientsP: Promise<Clients> | null = null;
  private loaded = false;
  private extraCaCache: string | null | undefined;
  private secureContextCache: tls.SecureContext | null | undefined;
  /** Keep-alive agent for boot-diagnostics blobs; its TLS context (CA list) is built once. */
  private blobAgentP: https.Agent | null = null;
  /** Keep-alive agent of the ARM clients when ca_file is set, sharing one TLS context (see armAgent()). */
  private armAgentP: https.Agent | null = null;

  constructor(
    private readonly cfg: AzureConfig,
    /** Files (CA bundle, client secret) are read on first use, relative to it: constructors stay offline. */
    private readonly configDir: string,
    private readonly opts: ArmClientOptions,
    private readonly backend: string,
    private readonly blobSockets: number,
  ) {}

  get sdkLoaded(): boolean {
    return this.loaded;
  }

  get(): Promise<Clients> {
    if (!this.clientsP) {
      this.clientsP = this.create();
      this.clientsP.then(() => (this.loaded = true)).catch(() => (this.clientsP = null));
    }
    return this.clientsP;
  }

  blobAgent(): https.Agent {
    const secureContext = this.secureContext();
    return (this.blobAgentP ??= new https.Agent({ keepAlive: true, maxSockets: this.blobSockets, ...(secureContext ? { secureContext } : {}) }));
  }

  close(): void {
    this.blobAgentP?.destroy();
    this.armAgentP?.destroy();
  }

  private async create(): Promise<Clients> {
    let sdk: [typeof import("@azure/arm-compute"), typeof import("@azure/arm-network")];
    try {
      sdk = await Promise.all([import("@azure/arm-compute"), import("@azure/arm-network")]);
    } catch (e) {
      throw new BackendError(`azure: cannot load the Azure SDK (@azure/arm-compute, @azure/arm-network): ${(e as Error).message}`, this.backend);
    }
    const [{ ComputeManagementClient }, { NetworkManagementClient }] = sdk;
    let credential: TokenCredential;
    try {
      credential = this.opts.credential ?? (await this.buildCredential());
    } catch (e) {
      if (e instanceof BackendError) throw e;
      throw new CredentialError(`azure: cannot set up the credential from backends.azure: ${redact((e as Error).message)}`, this.backend);
    }
    const endpoint = this.cfg.endpoint?.replace(/\/+$/, "");
    // Tokens for the ARM endpoint in use. Left to themselves the clients disagree: the compute
    // client asks for the public cloud's audience whatever its endpoint, which a sovereign cloud's
    // authority refuses; the network client asks for its endpoint's.
    const scopes = [`${endpoint ?? "https://management.azure.com"}/.default`];
    const options = {
      ...(endpoint ? { endpoint } : {}),
      credentials: { scopes },
      credentialScopes: scopes,
      ...this.armAgent(),
      retryOptions: {
        maxRetries: this.opts.maxRetries ?? 3,
        ...(this.opts.retryDelayInMs !== undefined ? { retryDelayInMs: this.opts.retryDelayInMs } : {}),
        maxRetryDelayInMs: 60_000,
      },
      userAgentOptions: { userAgentPrefix: `compute-bridge/${VERSION}` },
    };
    return {
      compute: new ComputeManagementClient(credential, this.cfg.subscription_id, options),
      network: new NetworkManagementClient(credential, this.cfg.subscription_id, options),
    };
  }

  /** The extra CA bundle from ca_file, read once. */
  private extraCa(): string | null {
    if (this.extraCaCache === undefined) this.extraCaCache = this.cfg.ca_file ? readCaFile(path.resolve(this.configDir, this.cfg.ca_file)) : null;
    return this.extraCaCache;
  }

  /** The public roots plus ca_file as one TLS context, built once; null without ca_file. */
  private secureContext(): tls.SecureContext | null {
    // Building a TLS context from ~150 PEM roots costs ~50 ms of CPU: once, not per connection.
    if (this.secureContextCache === undefined) {
      const extra = this.extraCa();
      this.secureContextCache = extra ? tls.createSecureContext({ ca: [...tls.rootCertificates, extra] }) : null;
    }
    return this.secureContextCache;
  }

  /**
   * With ca_file, the ARM clients get one keep-alive agent holding the prebuilt TLS context. The
   * pipeline's `tlsOptions: { ca }` would instead make Node build a context from every root for
   * each new connection (~50 ms of CPU each) and hash the whole CA list into the agent key of every
   * request: a restart resuming 100 Azure grants blocked the event loop for seconds.
   */
  private armAgent(): { agent?: https.Agent } {
    const secureContext = this.secureContext();
    if (!secureContext) return {};
    return { agent: (this.armAgentP ??= new https.Agent({ keepAlive: true, secureContext })) };
  }

  /** Service principal (client secret) or managed identity (system- or user-assigned), from the config only. */
  private async buildCredential(): Promise<TokenCredential> {
    const identity = await import("@azure/identity");
    // `ca` replaces Node's trust store, so keep the public roots next to the extra CA.
    const extra = this.extraCa();
    const common = extra ? { tlsOptions: { ca: [...tls.rootCertificates, extra] } } : {};
    if (this.cfg.managed_identity) {
      const clientId = this.cfg.managed_identity_client_id;
      return new identity.ManagedIdentityCredential({ ...common, ...(clientId ? { clientId } : {}) });
    }
    const tenant = this.cfg.tenant_id;
    const client = this.cfg.client_id;
    const secret = readSecret(this.configDir, "backends.azure.client_secret", { file: this.cfg.client_secret_file, env: this.cfg.client_secret_env });
    if (!tenant || !client || !secret) throw new CredentialError("azure: backends.azure needs tenant_id, client_id and client_secret_file (or managed_identity = true)", this.backend);
    const authorityHost = this.cfg.authority_host?.replace(/\/+$/, "");
    const custom = authorityHost !== undefined && !KNOWN_AUTHORITY_HOSTS.has(new URL(authorityHost).hostname);
    return new identity.ClientSecretCredential(tenant, client, secret, {
      ...common,
      ...(authorityHost ? { authorityHost } : {}),
      // A private authority (Azure Stack, tests) cannot be validated against login.microsoft.com.
      ...(custom ? { disableInstanceDiscovery: true } : {}),
    });
  }
}

function readCaFile(file: string): string {
  try {
    const pem = readFileSync(file, "utf8");
    if (!pem.includes("-----BEGIN CERTIFICATE-----")) throw new Error("no PEM certificate in it");
    return pem;
  } catch (e) {
    throw new SecretError(`backends.azure.ca_file: cannot use ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}
