import type { GrantManager } from "../lifecycle/manager.js";
import type { Store } from "../store/store.js";
import { createLogger } from "../util/logger.js";
import { openApiDocument } from "./openapi.js";
import { buildListener } from "./server.js";

/**
 * The OpenAPI document of the listener as a daemon with the default config serves it (/metrics
 * behind the token), built without starting anything: what docs/openapi.json holds
 * (`npm run openapi` writes it; test/listener/openapi.test.ts checks it against the served one).
 */
export async function defaultOpenApiDocument(): Promise<string> {
  const l = buildListener({
    manager: null as unknown as GrantManager,
    store: null as unknown as Store,
    card: () => {
      throw new Error("not serving");
    },
    token: "unused",
    log: createLogger("silent"),
    bodyLimit: 1024 * 1024,
    metrics: { contentType: "text/plain", text: async () => "" },
  });
  await l.app.ready();
  const doc = JSON.stringify(openApiDocument(l.routes), null, 2) + "\n";
  await l.app.close();
  return doc;
}
