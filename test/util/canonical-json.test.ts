import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { canonicalJson } from "../../src/util/canonical-json.js";
import { startTestDaemon } from "../helpers/daemon.js";
import { signedLogAndCard } from "../helpers/signed.js";

/** RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical form. */
const NUMBERS: [string, string][] = [
  ["0000000000000000", "0"],
  ["8000000000000000", "0"], // minus zero
  ["0000000000000001", "5e-324"],
  ["8000000000000001", "-5e-324"],
  ["7fefffffffffffff", "1.7976931348623157e+308"],
  ["ffefffffffffffff", "-1.7976931348623157e+308"],
  ["4340000000000000", "9007199254740992"],
  ["c340000000000000", "-9007199254740992"],
  ["4430000000000000", "295147905179352830000"],
  ["44b52d02c7e14af5", "9.999999999999997e+22"],
  ["44b52d02c7e14af6", "1e+23"],
  ["44b52d02c7e14af7", "1.0000000000000001e+23"],
  ["444b1ae4d6e2ef4e", "999999999999999700000"],
  ["444b1ae4d6e2ef4f", "999999999999999900000"],
  ["444b1ae4d6e2ef50", "1e+21"],
  ["3eb0c6f7a0b5ed8c", "9.999999999999997e-7"],
  ["3eb0c6f7a0b5ed8d", "0.000001"],
  ["41b3de4355555553", "333333333.3333332"],
  ["41b3de4355555554", "333333333.33333325"],
  ["41b3de4355555555", "333333333.3333333"],
  ["41b3de4355555556", "333333333.3333334"],
  ["41b3de4355555557", "333333333.33333343"],
  ["becbf647612f3696", "-0.0000033333333333333333"],
  ["43143ff3c1cb0959", "1424953923781206.2"],
];
const fromBits = (hex: string) => Buffer.from(hex, "hex").readDoubleBE(0);

/** RFC 8785 §3.2.2: the example's input (as parsed) and its canonical output. */
const EXAMPLE_INPUT = '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001], "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", "literals": [null, true, false]}';
const EXAMPLE_OUTPUT = '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}';

/** RFC 8785 §3.2.3: member names sorted by UTF-16 code units (the emoji's surrogates sort before U+FB33). */
const SORT_INPUT = '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One", "\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080": "Control", "\\u00f6": "Latin Small Letter O With Diaeresis"}';
const SORTED_VALUES = ["Carriage Return", "One", "Control", "Latin Small Letter O With Diaeresis", "Euro Sign", "Emoji: Grinning Face", "Hebrew Letter Dalet With Dagesh"];

const python = (() => {
  const r = spawnSync("python3", ["-c", "import cryptography"], { encoding: "utf8" });
  if (r.error) return { ok: false as const, why: "python3 is not installed" };
  if (r.status !== 0) return { ok: false as const, why: "python3 has no `cryptography` module (Debian: python3-cryptography)" };
  return { ok: true as const, why: "" };
})();
const SCRIPT = path.resolve("docs/verify_signature.py");

describe("canonical JSON (RFC 8785)", () => {
  it("formats numbers as RFC 8785 Appendix B says", () => {
    for (const [bits, want] of NUMBERS) assert.equal(canonicalJson(fromBits(bits)), want, bits);
    for (const bad of ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"]) assert.throws(() => canonicalJson({ x: fromBits(bad) }), /\$\.x is (NaN|-?Infinity)/, bad);
  });

  it("the §3.2.2 example and the §3.2.3 sorting example", () => {
    assert.equal(canonicalJson(JSON.parse(EXAMPLE_INPUT)), EXAMPLE_OUTPUT);
    const sorted = canonicalJson(JSON.parse(SORT_INPUT));
    assert.deepEqual([...sorted.matchAll(/:"([^"]*)"/g)].map((m) => m[1]), SORTED_VALUES, "(not Object.values: it puts the key \"1\" first)");
    assert.equal(sorted, '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign","\ud83d\ude00":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}');
  });

  it("refuses what is not I-JSON or has no JSON form; drops undefined members as JSON.stringify does", () => {
    assert.throws(() => canonicalJson({ s: "a\ud800b" }), /lone surrogate/);
    assert.throws(() => canonicalJson({ ["\udc00"]: 1 }), /lone surrogate/);
    assert.throws(() => canonicalJson({ n: 10n }), /bigint/);
    assert.equal(canonicalJson({ b: undefined, a: [undefined, new Date(0)] }), '{"a":[null,"1970-01-01T00:00:00.000Z"]}');
  });

  it("a card and a ComputeLog from the daemon verify in Python (cryptography + docs/verify_signature.py)", { skip: python.ok ? false : python.why }, async (t) => {
    // The script's JCS matches ours on the RFC vectors...
    const jcs = (input: string) => spawnSync("python3", [SCRIPT, "--jcs"], { input, encoding: "utf8" });
    for (const [input, want] of [[EXAMPLE_INPUT, EXAMPLE_OUTPUT], [SORT_INPUT, canonicalJson(JSON.parse(SORT_INPUT))], [`[${NUMBERS.map(([b]) => JSON.stringify(fromBits(b))).join(",")}]`, `[${NUMBERS.map(([, w]) => w).join(",")}]`]]) {
      const r = jcs(input!);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, want);
    }
    // ...and real signatures verify there, tampered ones do not.
    const td = await startTestDaemon(t);
    const { log, card, logFile } = await signedLogAndCard(td.url, "py-1", 7);
    const ok = spawnSync("python3", [SCRIPT, card, logFile], { encoding: "utf8" });
    assert.equal(ok.status, 0, ok.stdout + ok.stderr);
    assert.equal(ok.stdout, "ok    card test-provider\nok    log py-1\n");
    writeFileSync(logFile, JSON.stringify({ ...log, usage: { ...log.usage, cpu_millicore_seconds: log.usage.cpu_millicore_seconds + 1 } }));
    const bad = spawnSync("python3", [SCRIPT, card, logFile], { encoding: "utf8" });
    assert.equal(bad.status, 1);
    assert.match(bad.stdout, /FAIL {2}log py-1/);
  });
});
