/**
 * An Ec2Fake in a child process on the wall clock, so its SigV4/XML work does not share the
 * measured thread. The parent sends the fake's options (JSON) and then requests by name.
 */
import { fork, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { Ec2Fake } from "../../test/fakes/ec2.js";

export interface RemoteEc2Fake {
  endpoint: string;
  credentials: { accessKeyId: string; secretAccessKey: string };
  bootAll(): Promise<void>;
  /** Requests the fake answered RequestLimitExceeded by its rate limits. */
  rateLimited(): Promise<number>;
  close(): Promise<void>;
}

/** `faults`: the fake's fault options (JSON-serializable: boot delay, rate limits, ...). */
export async function remoteEc2Fake(seed: number, faults: Record<string, unknown>): Promise<RemoteEc2Fake> {
  const child: ChildProcess = fork(fileURLToPath(import.meta.url), ["--ec2-fake-host", JSON.stringify({ seed, faults })], { execArgv: ["--import", "tsx"], stdio: ["ignore", "ignore", "inherit", "ipc"] });
  const request = (msg: string) =>
    new Promise<unknown>((resolve, reject) => {
      const onMsg = (m: { reply: string; data?: unknown }) => {
        if (m.reply !== msg) return;
        child.off("message", onMsg);
        resolve(m.data);
      };
      child.on("message", onMsg);
      child.once("exit", (code) => reject(new Error(`the fake host exited (${code})`)));
      if (msg !== "ready") child.send(msg);
    });
  const info = (await request("ready")) as { endpoint: string; credentials: { accessKeyId: string; secretAccessKey: string } };
  return {
    ...info,
    bootAll: async () => void (await request("bootAll")),
    rateLimited: async () => (await request("rateLimited")) as number,
    close: async () => {
      await request("close").catch(() => undefined);
      child.kill();
    },
  };
}

async function host(spec: { seed: number; faults: Record<string, unknown> }): Promise<void> {
  const fake = await Ec2Fake.start({ seed: spec.seed, now: () => Date.now(), faults: spec.faults });
  process.on("message", (m: string) => {
    if (m === "bootAll") {
      fake.bootAll();
      process.send!({ reply: m });
    } else if (m === "rateLimited") process.send!({ reply: m, data: fake.rateLimited });
    else if (m === "close")
      void fake.close().then(() => {
        process.send!({ reply: "close" });
        process.exit(0);
      });
  });
  process.on("disconnect", () => process.exit(0));
  process.send!({ reply: "ready", data: { endpoint: fake.endpoint, credentials: fake.credentials } });
}

if (process.argv[2] === "--ec2-fake-host") await host(JSON.parse(process.argv[3]!) as { seed: number; faults: Record<string, unknown> });
