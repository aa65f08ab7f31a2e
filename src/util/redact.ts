/**
 * Strip credentials from text that came back from a cloud (error bodies, SDK messages) before it
 * goes into an error message or a log line: bearer tokens, JWTs, Google access tokens, PEM
 * private keys, secret query parameters (SAS signatures, OAuth codes) and secret JSON fields.
 * Whitespace is collapsed and the result cut at `max` characters.
 */
export function redactCredentials(text: string, max: number): string {
  let s = text
    .replace(/Bearer\s+[A-Za-z0-9._~+/-]+=*/gi, "Bearer [REDACTED]")
    .replace(/\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/g, "[REDACTED-JWT]")
    .replace(/\bya29\.[A-Za-z0-9._-]+/g, "[REDACTED]")
    .replace(/-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)/g, "[REDACTED]")
    .replace(/([?&](sig|se|sv|skoid|sktid|code|client_secret|client_assertion)=)[^&\s"']+/gi, "$1[REDACTED]")
    .replace(/("?(access_token|refresh_token|id_token|private_key|client_secret|password|adminPassword)"?\s*[:=]\s*)"[^"]*"/gi, '$1"[REDACTED]"')
    .replace(/\s+/g, " ")
    .trim();
  if (s.length > max) s = `${s.slice(0, max)}…`;
  return s;
}
