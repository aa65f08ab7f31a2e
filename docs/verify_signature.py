#!/usr/bin/env python3
"""Verify compute-bridge signatures without compute-bridge: a worked example (docs/signatures.md).

    python3 verify_signature.py CARD.json [LOG.json | compute-log.jsonl ...]
    python3 verify_signature.py --jcs < doc.json      # print the RFC 8785 canonical form

A signature is ed25519 over the UTF-8 bytes of the RFC 8785 (JCS) canonical JSON of the document
without its "signature" member; the card's "public_key" is the raw 32-byte ed25519 key in base64.
Needs the `cryptography` package (Debian: python3-cryptography). Exit 0 when everything verifies.
"""
import base64
import json
import sys
from decimal import Decimal


def es_number(x):
    """ECMAScript Number::toString, as RFC 8785 section 3.2.2.3 requires."""
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError("NaN and Infinity have no JSON form")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr() gives the shortest digits that round-trip, as ECMAScript does.
    _, digits, exp = Decimal(repr(abs(x))).as_tuple()
    s = "".join(map(str, digits)).rstrip("0")
    exp += len(digits) - len(s)
    k, n = len(s), exp + len(s)  # value = 0.s * 10**n
    if k <= n <= 21:
        out = s + "0" * (n - k)
    elif 0 < n <= 21:
        out = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + s
    else:
        e = n - 1
        out = s[0] + ("." + s[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + out


def jcs(v):
    """RFC 8785 canonical JSON of a parsed JSON value."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return es_number(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # the same escapes as ECMAScript's JSON.stringify
    if isinstance(v, list):
        return "[" + ",".join(jcs(x) for x in v) + "]"
    if isinstance(v, dict):
        # Member names sorted as UTF-16 code units (not code points: they differ outside the BMP).
        keys = sorted(v, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + jcs(v[k]) for k in keys) + "}"
    raise TypeError(type(v).__name__)


def verify(doc, public_key_b64):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    unsigned = {k: x for k, x in doc.items() if k != "signature"}
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        key.verify(base64.b64decode(doc["signature"]), jcs(unsigned).encode("utf-8"))
        return True
    except InvalidSignature:
        return False


def docs_in(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv):
    if argv[1:2] == ["--jcs"]:
        sys.stdout.write(jcs(json.load(sys.stdin)))
        return 0
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    card = docs_in(argv[1])[0]
    ok = verify(card, card["public_key"])
    print(("ok  " if ok else "FAIL") + "  card " + card["provider_id"])
    for path in argv[2:]:
        for log in docs_in(path):
            good = log.get("provider_id") == card["provider_id"] and verify(log, card["public_key"])
            ok = ok and good
            print(("ok  " if good else "FAIL") + "  log " + str(log.get("request_id")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
