import net from "node:net";

const LOOPBACK = new Set(["127.0.0.1", "::1", "localhost", "unix"]);

/**
 * What a net.Socket#connect call targets: its host, or "unix" for a unix socket. Handles every
 * calling form, including the normalized `[options, callback]` array net.connect and http use,
 * and http's `path: null` on TCP connections.
 */
export function connectTarget(args: unknown[]): string {
  const first = Array.isArray(args[0]) ? (args[0] as unknown[])[0] : args[0];
  if (typeof first === "object" && first !== null) {
    const o = first as { host?: unknown; path?: unknown };
    return typeof o.path === "string" && o.host == null ? "unix" : String(o.host ?? "localhost");
  }
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) return typeof args[1] === "string" ? args[1] : "localhost";
  return "unix";
}

const refused: string[] = [];
let installed = false;

/**
 * Refuse, before any DNS lookup or packet, every connection to anything but loopback (127.0.0.1,
 * ::1, localhost, a unix socket). Returns the list of refused targets (shared by every caller in
 * this process); `onRefuse` also hears each one.
 */
export function installNetworkGuard(onRefuse?: (host: string) => void): readonly string[] {
  if (installed) return refused;
  installed = true;
  const orig = net.Socket.prototype.connect;
  (net.Socket.prototype as unknown as { connect: (...a: unknown[]) => net.Socket }).connect = function (this: net.Socket, ...args: unknown[]) {
    const host = connectTarget(args);
    if (!LOOPBACK.has(host)) {
      refused.push(host);
      onRefuse?.(host);
      throw new Error(`test network guard: refusing to connect to ${host}`);
    }
    return (orig as (...a: unknown[]) => net.Socket).apply(this, args);
  };
  return refused;
}
