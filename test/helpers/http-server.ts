import http from "node:http";
import type { AddressInfo, Socket } from "node:net";

/**
 * An HTTP server on 127.0.0.1 driven by `handler` (tests' image servers: silent, slow, endless);
 * it counts connections and destroys every socket when the test ends.
 */
export async function loopbackServer(t: { after(fn: () => unknown): void }, handler: http.RequestListener = () => {}) {
  const sockets = new Set<Socket>();
  let connections = 0;
  const srv = http.createServer(handler);
  srv.on("connection", (s) => {
    connections++;
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise((r) => srv.close(r));
  });
  return { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`, sockets, connections: () => connections };
}
