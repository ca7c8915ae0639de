import { mkdtempSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { loadCredentials } from "../../src/mesh/invite";
import type { PeersReport } from "../../src/server/mesh-routes";
import { tinyModel } from "./model";

/** The CLI entry point, run with this Bun. */
export const MAIN = join(import.meta.dir, "..", "..", "src", "cli", "main.ts");
// A node's log is kept for failure messages, bounded.
const MAX_LOG = 256 * 1024;

/** A `mesh serve` process on 127.0.0.1. */
export interface NodeProc {
  name: string;
  url: string;
  addr: string;
  port: number;
  stateDir: string;
  proc: ReturnType<typeof Bun.spawn>;
  /** stderr so far. */
  log(): string;
}

/** A scratch dir for one cluster: state dirs and model files named after the models they serve. */
export function clusterDir(): string {
  return mkdtempSync(join(tmpdir(), "mesh-cluster-"));
}

/** A GGUF path whose model id is `id` (the tiny model under another name). */
export async function modelNamed(dir: string, id: string): Promise<string> {
  const path = join(dir, `${id}.gguf`);
  try {
    symlinkSync(await tinyModel(), path);
  } catch {
    // already there
  }
  return path;
}

/** Run the mesh CLI to completion. */
export function meshCli(args: string[]): { code: number | null; out: string; err: string } {
  const r = Bun.spawnSync([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

/** Start `mesh serve` and wait until its model is ready (generous: the machine may be slow). */
export async function spawnNode(o: { name: string; dir: string; model: string; args?: string[]; stateDir?: string }): Promise<NodeProc> {
  const stateDir = o.stateDir ?? join(o.dir, `state-${o.name}`);
  const proc = Bun.spawn(
    [
      process.execPath,
      MAIN,
      "serve",
      "--model",
      await modelNamed(o.dir, o.model),
      "--port",
      "0",
      "--ctx-size",
      "2048",
      "--parallel",
      "2",
      "--threads",
      "1",
      "--state-dir",
      stateDir,
      "--node-name",
      o.name,
      ...(o.args ?? []),
    ],
    { stdout: "ignore", stderr: "pipe" },
  );
  let log = "";
  // Drained for the process's whole life: a full pipe would block the node.
  void (async () => {
    const dec = new TextDecoder();
    for await (const chunk of proc.stderr as ReadableStream<Uint8Array>) {
      log += dec.decode(chunk);
      if (log.length > MAX_LOG) log = log.slice(-MAX_LOG / 2);
    }
  })();
  const deadline = Date.now() + 180_000;
  while (!log.includes("ready: POST")) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`node ${o.name} did not start:\n${log}`);
    }
    await Bun.sleep(50);
  }
  const url = /listening on (http:\/\/\S+)/.exec(log)?.[1] as string;
  const port = Number(new URL(url).port);
  return { name: o.name, url, addr: `127.0.0.1:${port}`, port, stateDir, proc, log: () => log };
}

/** The invite token a new mesh's first node printed. */
export function tokenOf(n: NodeProc): string {
  const m = /mesh serve --join (\S+)/.exec(n.log());
  if (!m) throw new Error(`no invite line in ${n.name}'s log:\n${n.log()}`);
  return m[1] as string;
}

/** GET /api/peers of a node, signed with its state dir's credentials (fast enough to poll). */
export async function peersOf(n: NodeProc): Promise<PeersReport | null> {
  const creds = loadCredentials(n.stateDir);
  if (!creds.ok || !creds.value) throw new Error(`no credentials in ${n.stateDir}`);
  const client = new MeshClient({ keys: meshKeys(creds.value.secret), nodeId: "cli-test" });
  try {
    const { response } = await client.send(n.addr, "GET", "/api/peers", new Uint8Array(), { signal: AbortSignal.timeout(30_000) });
    return response.status === 200 ? ((await response.json()) as PeersReport) : null;
  } catch {
    return null;
  }
}

/** Poll `check` until it returns a value (not undefined/false/null) or `ms` pass. */
export async function waitFor<T>(what: string, ms: number, check: () => Promise<T | null | undefined | false>, every = 100): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v !== null && v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await Bun.sleep(every);
  }
}
