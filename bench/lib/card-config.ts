/**
 * A boot config for the card route of an in-process listener (bench/listener.ts, bench/pg-accept.ts):
 * parsed for buildCard only; the benchmark's own backend takes the grants.
 */
export function cardConfigToml(region: string): string {
  return `
[bridge]
provider_id = "bench"
state_dir = "/tmp/unused"
[listener]
bind = "127.0.0.1:0"
token_file = "t"
[almanac]
genesis = 2026-01-01T00:00:00Z
tick_seconds = 1
[backends.local]
region = "${region}"
cpu_millicores = 1000
ram_mib = 1000
max_concurrent = 1
`;
}
