import { randomBytes } from "node:crypto";
import { mkdtempSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { generateIdentity, type Identity } from "../../src/mesh/identity";
import { loadCredentials } from "../../src/mesh/invite";
import type { KvRange } from "../../src/mesh/kv";
import { type SelfRecord, signSelf } from "../../src/mesh/member";
import { HttpTransport } from "../../src/mesh/transport-http";
import type { WireMessage } from "../../src/mesh/wire";
import type { ModelNode } from "../../src/server/mesh";
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

/** Run the mesh CLI without blocking this process, so a server in this process can answer it. */
export async function meshCliAsync(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  const p = Bun.spawn([process.execPath, MAIN, ...args], { stdout: "pipe", stderr: "pipe", stdin: "ignore" });
  const [out, err] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text()]);
  return { code: await p.exited, out, err };
}

/** Start `mesh serve` and wait until its model is ready (generous: the machine may be slow). */
export async function spawnNode(o: {
  name: string;
  dir: string;
  model: string;
  args?: string[];
  stateDir?: string;
  /** The process's whole environment (default: this one's). */
  env?: Record<string, string>;
}): Promise<NodeProc> {
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
    { stdout: "ignore", stderr: "pipe", env: o.env },
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
  const client = new MeshClient({ keys: meshKeys(secretOf(n.stateDir)), nodeId: "cli-test" });
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

/** GET /v1/models of a node: each model id with the nodes serving it. */
export async function modelsOf(n: NodeProc): Promise<Map<string, ModelNode[]>> {
  const list = (await (await fetch(`${n.url}/v1/models`)).json()) as { data: Array<{ id: string; nodes: ModelNode[] }> };
  return new Map(list.data.map((m) => [m.id, m.nodes]));
}

/** One sample of a node's /metrics, e.g. `metricOf(n, 'mesh_kv_entries{kind="tombstone"}')`; throws if the series is missing. */
export async function metricOf(n: NodeProc, series: string): Promise<number> {
  const text = await (await fetch(`${n.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  if (line === undefined) throw new Error(`no series ${series} in ${n.name}'s /metrics`);
  return Number(line.slice(series.length + 1));
}

/** The mesh secret in a node's state dir. */
export function secretOf(stateDir: string): string {
  const creds = loadCredentials(stateDir);
  if (!creds.ok || !creds.value) throw new Error(`no credentials in ${stateDir}`);
  return creds.value.secret;
}

/**
 * A member played by the test process: a key of its own and the mesh secret (as any holder of an
 * invite has), speaking the peer protocol over authenticated HTTP, without a server of its own.
 * It stands for a misbehaving or confused member that relays records to a real node.
 */
export class TestMember {
  readonly identity: Identity = generateIdentity();
  private readonly transport: HttpTransport;
  private record: SelfRecord;
  private readonly seq = new Map<string, number>();

  constructor(stateDir: string) {
    const keys = meshKeys(secretOf(stateDir));
    this.transport = new HttpTransport(new MeshClient({ keys, nodeId: this.identity.id }), keys);
    // Port 1 refuses at once: nodes that probe it suspect it within a few rounds, so a test
    // sends what it has to right after joining and leaves when done.
    const epoch = randomBytes(8).toString("hex");
    this.record = signSelf(this.identity, { name: "test-member", addr: "127.0.0.1:1", epoch, inc: 0, state: "alive" });
  }

  /** Join through `n` (which then holds this member alive); returns `n`'s own signed record. */
  async join(n: NodeProc): Promise<SelfRecord> {
    const reply = await this.transport.request(n.addr, { type: "join", from: this.record }, 30_000);
    if (reply.type !== "join-ack") throw new Error(`${n.name} refused the test member's join: ${JSON.stringify(reply)}`);
    return reply.from as SelfRecord;
  }

  /** Push store ranges to `n` as one kv-sync message from this member; resolves with `n`'s kv-ack (ok: the message was taken, whatever became of its records). */
  async push(n: NodeProc, ranges: KvRange[]): Promise<WireMessage> {
    // Joining again is harmless and tells us n's current epoch, which a kv-sync must be addressed to.
    const to = await this.join(n);
    const seq = (this.seq.get(n.addr) ?? 0) + 1;
    this.seq.set(n.addr, seq);
    const msg = { type: "kv-sync", id: this.identity.id, epoch: this.record.epoch, toEpoch: to.epoch, seq, pull: false, ranges };
    const reply = await this.transport.request(n.addr, msg, 30_000);
    if (reply.type !== "kv-ack" || reply.ok !== true) throw new Error(`${n.name} did not take the kv-sync: ${JSON.stringify(reply)}`);
    return reply;
  }

  /** Leave gracefully through each of `nodes`: they mark this member left and stop probing it. */
  async leave(nodes: NodeProc[]): Promise<void> {
    this.record = signSelf(this.identity, { ...this.record, state: "left" });
    await Promise.allSettled(nodes.map((n) => this.transport.request(n.addr, { type: "leave", from: this.record }, 30_000)));
  }
}
