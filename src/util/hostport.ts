/** Split a config "host:port" (IPv6 in brackets) into its parts. */
export function splitHostPort(bind: string): [string, number] {
  const i = bind.lastIndexOf(":");
  let host = bind.slice(0, i);
  if (host.startsWith("[")) host = host.slice(1, -1);
  return [host, Number(bind.slice(i + 1))];
}
