// Model hydration between separate `mesh serve` processes on loopback. Holders
// serve the tiny model (4.8 MiB) cut into 64 KiB chunks (77 of them); a node
// started with `--model mesh-tiny --join <token>` pulls it from them. Transfers
// are made slow enough to interrupt with --upload-limit, never with sleeps.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import OpenAI from "openai";
import { freeBytes } from "../../../src/hydration/files/download";
import { fileKey, rootOf, serializeAnnounce } from "../../../src/hydration/files/manifest";
import type { FilesReport } from "../../../src/hydration/files/service";
import { meshKeys } from "../../../src/mesh/auth";
import { MeshClient } from "../../../src/mesh/client";
import { credentialsFor, encodeInvite } from "../../../src/mesh/invite";
import { signRecord } from "../../../src/mesh/kv-record";
import {
  clusterDir,
  MAIN,
  meshCli,
  meshCliAsync,
  metricOf,
  type NodeProc,
  secretOf,
  spawnNode,
  TestMember,
  tokenOf,
  waitFor,
} from "../../helpers/cluster";
import { tinyModel } from "../../helpers/model";

const dir = clusterDir();
const procs: Array<ReturnType<typeof Bun.spawn>> = [];
afterAll(() => {
  for (const p of procs) p.kill("SIGKILL");
});

const CHUNK = 65536;
const CHUNKS = 77;
const HOLDER = ["--file-chunk-size", String(CHUNK)];

async function holder(name: string, args: string[] = []): Promise<NodeProc> {
  const n = await spawnNode({ name, dir, model: "mesh-tiny", args: [...HOLDER, ...args] });
  procs.push(n.proc);
  return n;
}

/** A node pulling `model` through `token`; resolves once it listens (its model still being pulled). */
async function puller(name: string, model: string, token: string, stateDir = join(dir, `state-${name}`)): Promise<NodeProc> {
  const proc = Bun.spawn(
    [process.execPath, MAIN, "serve", "--model", model, "--join", token, "--port", "0", "--ctx-size", "2048", "--parallel", "2"].concat([
      "--threads",
      "1",
      "--state-dir",
      stateDir,
      "--node-name",
      name,
    ]),
    { stdout: "ignore", stderr: "pipe" },
  );
  procs.push(proc);
  let log = "";
  void (async () => {
    const dec = new TextDecoder();
    for await (const chunk of proc.stderr as ReadableStream<Uint8Array>) log += dec.decode(chunk);
  })();
  await waitFor(`${name} to listen`, 120_000, async () => log.includes("listening on") || proc.exitCode !== null);
  const url = /listening on (http:\/\/\S+)/.exec(log)?.[1];
  if (!url) throw new Error(`${name} did not start:\n${log}`);
  const port = Number(new URL(url).port);
  return { name, url, addr: `127.0.0.1:${port}`, port, stateDir, proc, log: () => log };
}

async function ready(n: NodeProc): Promise<void> {
  await waitFor(`${n.name} to serve its pulled model`, 180_000, async () => {
    if (n.proc.exitCode !== null) throw new Error(`${n.name} exited:\n${n.log()}`);
    return n.log().includes("ready: POST");
  });
}

const doneBytes = (n: NodeProc) => metricOf(n, 'mesh_files_pull_bytes_done{model="mesh-tiny"}').catch(() => 0);
const pulledPath = (n: NodeProc) => join(n.stateDir, "models", "mesh-tiny.gguf");

async function sameAsTiny(path: string): Promise<boolean> {
  return readFileSync(path).equals(readFileSync(await tinyModel()));
}

describe("model hydration across processes", () => {
  test("hydrates_from_two_holders_byte_identical_then_loads_and_answers_and_forwards_meanwhile", async () => {
    const a = await holder("ha", ["--upload-limit", "512k"]);
    const b = await holder("hb", ["--join", tokenOf(a), "--upload-limit", "512k"]);
    const c = await puller("hc", "mesh-tiny", tokenOf(a));
    // A request arriving while the file is pulled is served by a peer.
    await waitFor("the pull to start", 60_000, async () => (await doneBytes(c)) > 0);
    const openai = new OpenAI({ baseURL: `${c.url}/v1`, apiKey: "none", maxRetries: 0 });
    const { data, response } = await openai.chat.completions
      .create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 })
      .withResponse();
    expect(data.choices.length).toBe(1);
    expect(existsSync(pulledPath(c))).toBe(false); // still pulling when it was answered
    expect([a.name, b.name]).toContain(nameOf(response.headers.get("x-mesh-served-by"), [a, b]) ?? "not a holder");
    await ready(c);
    expect(await sameAsTiny(pulledPath(c))).toBe(true);
    expect(existsSync(`${pulledPath(c)}.part`)).toBe(false);
    // Both holders sent chunks; every chunk was fetched once and verified.
    expect(await metricOf(a, "mesh_files_upload_chunks_total")).toBeGreaterThan(0);
    expect(await metricOf(b, "mesh_files_upload_chunks_total")).toBeGreaterThan(0);
    expect(await metricOf(c, "mesh_files_pull_chunks_total")).toBe(CHUNKS);
    expect(await metricOf(c, "mesh_files_pulls_completed_total")).toBe(1);
    // It serves the model now: its own /v1/models entry is ready, and it answers.
    const models = (await (await fetch(`${c.url}/v1/models`)).json()) as { data: Array<{ id: string; status: string }> };
    expect(models.data.find((m) => m.id === "mesh-tiny")?.status).toBe("ready");
    const after = await openai.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    expect(after.choices.length).toBe(1);
    // `mesh models` lists the file with its three holders, this node among them.
    const listed = Bun.spawnSync([process.execPath, MAIN, "models", "--json", "--state-dir", c.stateDir], {
      stdout: "pipe",
      stderr: "pipe",
    });
    expect(listed.exitCode).toBe(0);
    const report = JSON.parse(listed.stdout.toString()) as FilesReport;
    await waitFor("c to announce the pulled file", 30_000, async () => {
      const r = (await signedGet(c, "/api/files")) as FilesReport | null;
      return r?.mesh.find((f) => f.name === "mesh-tiny")?.holders.length === 3;
    });
    expect(report.mesh.find((f) => f.name === "mesh-tiny")?.size).toBe(readFileSync(pulledPath(c)).length);
    for (const n of [a, b, c]) n.proc.kill("SIGKILL");
  }, 300_000);

  test("kill_9_of_one_holder_mid_transfer_finishes_from_the_other", async () => {
    const a = await holder("ka", ["--upload-limit", "400k"]);
    const b = await holder("kb", ["--join", tokenOf(a), "--upload-limit", "400k"]);
    const c = await puller("kc", "mesh-tiny", tokenOf(a));
    await waitFor("a quarter of the file", 60_000, async () => (await doneBytes(c)) > (CHUNKS * CHUNK) / 4);
    const fromA = await metricOf(a, "mesh_files_upload_chunks_total");
    expect(fromA).toBeGreaterThan(0);
    a.proc.kill("SIGKILL");
    await ready(c);
    expect(await sameAsTiny(pulledPath(c))).toBe(true);
    // b sent the rest: everything c holds came from a before the kill or from b.
    expect(fromA + (await metricOf(b, "mesh_files_upload_chunks_total"))).toBeGreaterThanOrEqual(CHUNKS);
    for (const n of [b, c]) n.proc.kill("SIGKILL");
  }, 300_000);

  test("a_restart_mid_transfer_resumes_without_refetching_verified_chunks", async () => {
    const a = await holder("ra", ["--upload-limit", "400k"]);
    const c1 = await puller("rc", "mesh-tiny", tokenOf(a));
    await waitFor("a third of the file", 60_000, async () => (await doneBytes(c1)) > (CHUNKS * CHUNK) / 3);
    c1.proc.kill("SIGKILL");
    await c1.proc.exited;
    expect(existsSync(pulledPath(c1))).toBe(false); // the partial file never passes for whole
    const c2 = await puller("rc", "mesh-tiny", tokenOf(a), c1.stateDir);
    await ready(c2);
    expect(c2.log()).toContain("resuming a download");
    const resumed = await metricOf(c2, "mesh_files_pull_chunks_resumed_total");
    const fetched = await metricOf(c2, "mesh_files_pull_chunks_total");
    expect(resumed).toBeGreaterThan(0);
    expect(resumed + fetched).toBe(CHUNKS);
    expect(await sameAsTiny(pulledPath(c2))).toBe(true);
    for (const n of [a, c2]) n.proc.kill("SIGKILL");
  }, 300_000);

  test("sigterm_during_a_pull_stops_cleanly_and_keeps_the_verified_chunks", async () => {
    const a = await holder("sa", ["--upload-limit", "256k"]);
    const c = await puller("sc", "mesh-tiny", tokenOf(a));
    await waitFor("the pull to start", 60_000, async () => (await doneBytes(c)) > 0);
    c.proc.kill("SIGTERM");
    expect(await c.proc.exited).toBe(0);
    expect(c.log()).toContain("the next start resumes the pull");
    expect(existsSync(pulledPath(c))).toBe(false);
    expect(existsSync(`${pulledPath(c)}.part.json`)).toBe(true);
    a.proc.kill("SIGKILL");
  }, 300_000);

  test("a_lying_holder_is_detected_its_chunks_refetched_elsewhere_and_counted", async () => {
    // The honest holder is slow, so the pull is still running when the puller learns of the liar.
    const a = await holder("la", ["--upload-limit", "512k"]);
    const liar = await holder("ll", ["--join", tokenOf(a), "--fault-corrupt-uploads"]);
    await waitFor("both holders announced", 30_000, async () => {
      const r = (await signedGet(a, "/api/files")) as FilesReport | null;
      return r?.mesh.find((f) => f.name === "mesh-tiny")?.holders.length === 2;
    });
    const c = await puller("lc", "mesh-tiny", tokenOf(a));
    await ready(c);
    expect(await sameAsTiny(pulledPath(c))).toBe(true);
    expect(await metricOf(liar, "mesh_files_upload_chunks_total")).toBeGreaterThan(0);
    expect(await metricOf(c, "mesh_files_pull_chunks_corrupt_total")).toBeGreaterThanOrEqual(1);
    expect(await metricOf(c, "mesh_files_pull_chunks_total")).toBe(CHUNKS);

    // Holders serve files to members only, and only the files they announce.
    const report = (await signedGet(a, "/api/files")) as FilesReport;
    const hash = report.mesh.find((f) => f.name === "mesh-tiny")?.hash as string;
    expect((await fetch(`${a.url}/mesh/files/${hash}/chunks/0`)).status).toBe(401);
    expect((await fetch(`${a.url}/mesh/files/${hash}/manifest`)).status).toBe(401);
    expect((await fetch(`${a.url}/api/files`)).status).toBe(401);
    const member = new MeshClient({ keys: meshKeys(secretOf(a.stateDir)), nodeId: "cli-test" });
    const get = async (path: string) => {
      const { response } = await member.send(a.addr, "GET", path, new Uint8Array());
      return { status: response.status, bytes: new Uint8Array(await response.arrayBuffer()) };
    };
    const first = await get(`/mesh/files/${hash}/chunks/0`);
    expect(first.status).toBe(200);
    expect(Buffer.from(first.bytes).equals(readFileSync(await tinyModel()).subarray(0, CHUNK))).toBe(true);
    for (const path of [
      `/mesh/files/${"0".repeat(64)}/chunks/0`,
      `/mesh/files/${hash}/chunks/${CHUNKS}`,
      "/mesh/files/..%2F..%2F..%2Fetc%2Fpasswd/manifest",
      `/mesh/files/${hash}/..%2F..%2Fnode.key`,
      "/mesh/files/%2Fetc%2Fpasswd/chunks/0",
    ]) {
      const r = await get(path);
      expect(r.status).toBe(404);
      expect(new TextDecoder().decode(r.bytes)).not.toContain("root:");
    }
    for (const n of [a, liar, c]) n.proc.kill("SIGKILL");
  }, 300_000);

  test("not_enough_disk_is_a_clear_error_exit_2_and_nothing_is_written", async () => {
    const a = await holder("da");
    // A member announces a file larger than this disk's free room (records are all a downloader checks before the first byte).
    const m = new TestMember(a.stateDir);
    await m.join(a);
    const size = freeBytes(dir) + 4 * 1024 ** 3;
    const chunkSize = 256 * 1024 * 1024;
    const chunks = Array.from({ length: Math.ceil(size / chunkSize) }, (_, i) => i.toString(16).padStart(64, "0"));
    const hash = "ab".repeat(32);
    const value = serializeAnnounce({ name: "huge", aliases: [], file: "huge.gguf", size, hash, chunkSize, root: rootOf(chunks) });
    const rec = signRecord(m.identity, fileKey(hash), value, { w: Date.now(), l: 0, n: m.identity.id });
    await m.push(a, [{ owner: m.identity.id, after: null, upTo: null, records: [rec], more: false }]);
    const out = join(dir, "huge-out");
    const r = await meshCliAsync(["pull", "huge", "--state-dir", a.stateDir, "--dir", out]);
    expect(r.code).toBe(2);
    expect(r.err).toContain("not enough disk space for huge.gguf");
    expect(r.err.trim().split("\n").at(-1)).toStartWith("mesh: not enough disk space");
    expect(existsSync(out)).toBe(false);
    await m.leave([a]);
    a.proc.kill("SIGKILL");
  }, 120_000);

  test("bad_hydration_flags_and_unknown_models_exit_2_with_one_line", () => {
    const state = join(dir, "state-flags");
    const limit = meshCli(["serve", "--upload-limit", "fast", "--state-dir", state, "--port", "0"]);
    expect(limit.code).toBe(2);
    expect(limit.err).toContain("--upload-limit must be bytes per second");
    const lonely = meshCli(["serve", "--model", "no-such-model", "--state-dir", state, "--port", "0"]);
    expect(lonely.code).toBe(2);
    expect(lonely.err).toContain("model file not found: no-such-model (to pull a model by name from the mesh, join it");
    expect(lonely.err.trim().split("\n").length).toBe(1);
  });

  // Regression: a bad --alias for a model pulled by name was reported only after the whole pull.
  test("a_bad_alias_for_a_model_pulled_by_name_exits_2_before_joining_or_pulling", () => {
    const state = join(dir, "state-alias");
    const secret = "s".repeat(43);
    // Nobody listens at this address: a check that came after joining would hang on it, not exit 2 at once.
    const token = encodeInvite({ ...credentialsFor(secret), addrs: ["127.0.0.1:9"] });
    for (const [aliases, said] of [
      [["gpt", "gpt"], "--alias 'gpt' is given twice"],
      [[" "], "--alias must not be empty"],
    ] as const) {
      const r = meshCli([
        "serve",
        "--model",
        "some-model",
        ...aliases.flatMap((a) => ["--alias", a]),
        "--join",
        token,
        "--state-dir",
        state,
        "--port",
        "0",
      ]);
      expect({ aliases, code: r.code }).toEqual({ aliases, code: 2 });
      expect(r.err).toContain(said);
      expect(r.err.trim().split("\n").length).toBe(1);
    }
    expect(existsSync(join(state, "models"))).toBe(false);
  });
});

function nameOf(nodeId: string | null, ns: NodeProc[]): string | undefined {
  for (const n of ns) if (nodeId !== null && n.log().length > 0 && idOf(n) === nodeId) return n.name;
  return undefined;
}

function idOf(n: NodeProc): string {
  return (JSON.parse(readFileSync(join(n.stateDir, "node.json"), "utf8")) as { id: string }).id;
}

async function signedGet(n: NodeProc, path: string): Promise<unknown> {
  const client = new MeshClient({ keys: meshKeys(secretOf(n.stateDir)), nodeId: "cli-test" });
  const { response } = await client.send(n.addr, "GET", path, new Uint8Array(), { signal: AbortSignal.timeout(30_000) });
  return response.status === 200 ? response.json() : null;
}
