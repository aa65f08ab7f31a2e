import assert from "node:assert/strict";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { describe, it } from "node:test";
import { ImagePolicy, ImagePolicyError, parseCidr } from "../../src/util/image-policy.js";
import { tempDir } from "../helpers/tmp.js";

describe("image policy", () => {
  it("refuses file:// when no roots are configured", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] });
    assert.match((await p.refusal("file:///etc/shadow")) ?? "", /file:\/\/ images are not accepted here/);
  });

  it("accepts file:// under a root only, also after resolving symlinks and dot segments", async (t) => {
    const dir = tempDir(t);
    const root = path.join(dir, "images");
    mkdirSync(root);
    writeFileSync(path.join(root, "ok.bin"), "x");
    writeFileSync(path.join(dir, "secret"), "s");
    symlinkSync(path.join(dir, "secret"), path.join(root, "link"));
    symlinkSync("/etc", path.join(root, "etc"));
    const p = new ImagePolicy({ fileRoots: [root], allowCidrs: [] });
    assert.equal(await p.refusal(pathToFileURL(path.join(root, "ok.bin")).href), null);
    assert.equal(await p.refusal(pathToFileURL(path.join(root, "not-yet.bin")).href), null, "a missing file under a root is checked by its path");
    for (const bad of [
      pathToFileURL(path.join(dir, "secret")).href,
      `file://${root}/../secret`,
      `file://${root}/%2e%2e/secret`,
      pathToFileURL(path.join(root, "link")).href,
      pathToFileURL(path.join(root, "etc", "shadow")).href,
      "file:///etc/shadow",
      "file:///proc/self/environ",
      `file://${root}-other/x`,
    ])
      assert.match((await p.refusal(bad)) ?? "", /must lie under one of the configured image_roots/, bad);
    assert.match((await p.refusal("file://otherhost/x")) ?? "", /absolute local path/);
    // The message is the same whether or not the file exists outside the roots.
    assert.equal(await p.refusal(pathToFileURL(path.join(dir, "nope")).href), await p.refusal(pathToFileURL(path.join(dir, "secret")).href));
  });

  it("refuses other schemes and URLs with credentials", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] });
    assert.match((await p.refusal("ftp://example.com/x")) ?? "", /only http, https image URLs/);
    assert.match((await p.refusal("gopher://example.com/x")) ?? "", /not gopher/);
    assert.match((await p.refusal("https://u:p@93.184.215.14/x")) ?? "", /credentials/);
    assert.match((await p.refusal("not a url")) ?? "", /not a valid URL/);
  });

  it("refuses loopback, link-local (metadata), private and special-purpose literal addresses", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] });
    for (const host of [
      "127.0.0.1", "127.1.2.3", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "100.64.0.1",
      "198.18.0.1", "224.0.0.1", "255.255.255.255", "[::1]", "[::]", "[fe80::1]", "[fd00:ec2::254]", "[fc00::1]", "[::ffff:127.0.0.1]",
      "[::ffff:169.254.169.254]", "[::127.0.0.1]", "[64:ff9b::a9fe:a9fe]", "[ff02::1]", "2130706433", "0x7f000001", "017700000001", "127.1",
    ])
      assert.match((await p.refusal(`http://${host}:8080/img`)) ?? "", /not a public address/, host);
    for (const host of ["93.184.215.14", "8.8.8.8", "172.32.0.1", "[2606:4700::1111]"]) assert.equal(await p.refusal(`https://${host}/img`), null, host);
  });

  it("checks names after resolution: localhost is refused", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] });
    assert.match((await p.refusal("http://localhost:1/img")) ?? "", /not a public address/);
  });

  it("a name is judged by every address it resolves to; a name that does not exist is refused alike, a resolver failing for now is not", async () => {
    const answers: Record<string, () => Promise<{ address: string; family: number }[]>> = {
      "mixed.example": async () => [{ address: "93.184.215.14", family: 4 }, { address: "10.0.0.5", family: 4 }],
      "public.example": async () => [{ address: "93.184.215.14", family: 4 }, { address: "2606:4700::1111", family: 6 }],
      "gone.example": async () => Promise.reject(Object.assign(new Error("getaddrinfo ENOTFOUND gone.example"), { code: "ENOTFOUND" })),
      "flaky.example": async () => Promise.reject(Object.assign(new Error("getaddrinfo EAI_AGAIN flaky.example"), { code: "EAI_AGAIN" })),
    };
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] }, (host) => answers[host]!());
    const internal = await p.refusal("https://mixed.example/img");
    assert.match(internal ?? "", /not a public address/);
    assert.equal(await p.refusal("https://gone.example/img"), internal, "the same answer as for an internal name");
    assert.equal(await p.refusal("https://public.example/img"), null);
    assert.equal(await p.refusal("https://flaky.example/img"), null, "left to the fetch, which checks again");
  });

  it("image_allow_cidrs lets the operator's internal ranges through, and only those", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: ["127.0.0.0/8", "10.0.5.7", "fd12::/16"] });
    assert.equal(await p.refusal("http://127.0.0.1:9/x"), null);
    assert.equal(await p.refusal("http://10.0.5.7/x"), null);
    assert.equal(await p.refusal("http://[fd12::1]/x"), null);
    assert.match((await p.refusal("http://10.0.5.8/x")) ?? "", /not a public address/);
    assert.match((await p.refusal("http://169.254.169.254/latest/meta-data/")) ?? "", /not a public address/);
    assert.equal(p.addressAllowed("::ffff:127.0.0.2"), true, "an IPv4-mapped address is judged as its IPv4 address");
  });

  it("the lookup hook refuses a name that resolves to a refused address", async () => {
    const p = new ImagePolicy({ fileRoots: [], allowCidrs: [] });
    const err = await new Promise<Error | null>((resolve) => p.lookup("localhost", {}, (e) => resolve(e)));
    assert.ok(err instanceof ImagePolicyError);
    assert.doesNotMatch(err.message, /127\.0\.0\.1|::1/, "the message names no address");
  });

  it("parses addresses and CIDR blocks, and rejects anything else", () => {
    assert.deepEqual(parseCidr("10.0.0.0/8"), ["10.0.0.0", 8, "ipv4"]);
    assert.deepEqual(parseCidr("fd00::/8"), ["fd00::", 8, "ipv6"]);
    assert.deepEqual(parseCidr("1.2.3.4"), ["1.2.3.4", 32, "ipv4"]);
    for (const bad of ["10.0.0.0/33", "10.0.0/8", "x", "1.2.3.4/8/1", "::/129", "1.2.3.4/", "1.2.3.4/-1"]) assert.equal(parseCidr(bad), null, bad);
    assert.throws(() => new ImagePolicy({ fileRoots: ["relative"], allowCidrs: [] }), /absolute path/);
    assert.throws(() => new ImagePolicy({ fileRoots: [], allowCidrs: ["nope"] }), /not an IP address or CIDR/);
  });
});
