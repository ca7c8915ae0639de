// Separate `mesh serve` processes on 127.0.0.1 forming one mesh. Each node
// serves the tiny model under its own name (alpha, beta, gamma), so which node
// answered is visible from the model id. The last tests run in order on the
// mesh the earlier ones leave; some send records from a member the test process
// plays (TestMember), others freeze a node with SIGSTOP.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import OpenAI from "openai";
import { meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import type { Hlc } from "../../src/mesh/hlc";
import { type Identity, loadOrCreateIdentity } from "../../src/mesh/identity";
import type { KvRange } from "../../src/mesh/kv";
import { type KvRecord, signRecord } from "../../src/mesh/kv-record";
import { failureDetectionBoundMs } from "../../src/mesh/membership";
import { HttpTransport } from "../../src/mesh/transport-http";
import type { WorkerInfo } from "../../src/mesh/wire";
import { serializeWorker, workerKey } from "../../src/mesh/worker-info";
import type { PeerRow, PeersReport } from "../../src/server/mesh-routes";
import {
  clusterDir,
  MAIN,
  meshCli,
  metricOf,
  modelsOf,
  type NodeProc,
  peersOf,
  secretOf,
  spawnNode,
  TestMember,
  tokenOf,
  waitFor,
} from "../helpers/cluster";

// A killed node must be dead everywhere within failureDetectionBoundMs(n) (12 s for
// 3 members; ~8 s typically). The slack covers this shared 2-core machine: round
// timers fire late and probes wait on processes busy with inference or other tests.
// Bound plus slack stays about twice the bound, so a detector that never fires, or
// fires far later than stated, still fails.
const DETECTION_SLACK_MS = 15_000;
const CONVERGE_MS = 60_000;
// A node SIGSTOPped this long is back before anyone can declare it dead (a probe,
// then 5 suspicion rounds of 1 s) and before it would take itself for frozen (6 s).
const SHORT_FREEZE_MS = 3_000;

const dir = clusterDir();
const nodes: NodeProc[] = [];
let a: NodeProc;
let b: NodeProc;
let c: NodeProc;
let token: string;

async function start(name: string, model: string, args: string[] = [], stateDir?: string): Promise<NodeProc> {
  const n = await spawnNode({ name, dir, model, args, stateDir });
  nodes.push(n);
  return n;
}

function member(r: PeersReport | null, name: string): PeerRow | undefined {
  return r?.members.find((m) => m.name === name);
}

function client(n: NodeProc): OpenAI {
  return new OpenAI({ baseURL: `${n.url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
}

beforeAll(async () => {
  a = await start("a", "alpha");
  token = tokenOf(a);
  [b, c] = await Promise.all([start("b", "beta", ["--join", token]), start("c", "gamma", ["--join", token])]);
});

afterAll(async () => {
  for (const n of nodes) n.proc.kill("SIGKILL");
  await Promise.all(nodes.map((n) => n.proc.exited));
});

describe("a mesh of separate processes", () => {
  test("three_nodes_form_a_mesh_from_one_invite_and_converge", async () => {
    for (const n of [a, b, c]) {
      await waitFor(
        `${n.name} to see three alive members serving alpha, beta, gamma`,
        CONVERGE_MS,
        async () => {
          const r = meshCli(["peers", "--json", "--state-dir", n.stateDir]);
          if (r.code !== 0) return null;
          const report = JSON.parse(r.out) as PeersReport;
          const alive = report.members.filter((m) => m.state === "alive");
          const models = alive.flatMap((m) => m.models).sort();
          return alive.length === 3 && models.join() === "alpha,beta,gamma";
        },
        500,
      );
    }
    const table = meshCli(["peers", "--state-dir", a.stateDir]);
    expect(table.code).toBe(0);
    expect(table.out).toContain("3 of 3 members alive");
    for (const addr of [a.addr, b.addr, c.addr]) expect(table.out).toContain(addr);
  }, 120_000);

  test("mesh_peers_watch_refreshes_until_stopped", async () => {
    const proc = Bun.spawn([process.execPath, MAIN, "peers", "--json", "--watch", "0.5", "--state-dir", a.stateDir], {
      stdout: "pipe",
      stderr: "pipe",
    });
    try {
      let out = "";
      const reader = (proc.stdout as ReadableStream<Uint8Array>).getReader();
      while (out.split("\n").filter((l) => l.startsWith("{")).length < 3) {
        const { value, done } = await reader.read();
        if (done) break;
        out += new TextDecoder().decode(value);
      }
      const reports = out
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as PeersReport);
      expect(reports.length).toBeGreaterThanOrEqual(3);
      for (const r of reports) expect(r.members.length).toBeGreaterThanOrEqual(3);
    } finally {
      proc.kill("SIGKILL");
    }
  }, 60_000);

  test("a_second_node_on_a_state_dir_in_use_is_refused", () => {
    const r = meshCli(["serve", "--port", "0", "--state-dir", a.stateDir]);
    expect(r.code).toBe(2);
    expect(r.err).toContain("uses the state dir");
    expect(r.err.trim().split("\n").length).toBe(1);
  });

  test("mesh_invite_prints_a_token_that_joins_the_same_mesh", () => {
    const r = meshCli(["invite", "--state-dir", b.stateDir]);
    expect(r.code).toBe(0);
    const decoded = JSON.parse(Buffer.from(r.out.trim(), "base64url").toString()) as { meshId: string; addrs: string[] };
    expect(decoded.meshId).toBe(JSON.parse(Buffer.from(token, "base64url").toString()).meshId);
    expect(decoded.addrs[0]).toBe(b.addr);
  });

  test("a_node_joins_with_a_members_address_and_a_secret_file_instead_of_a_token", async () => {
    const secretFile = join(dir, "delta.secret");
    writeFileSync(secretFile, `${secretOf(a.stateDir)}\n`, { mode: 0o600 });
    const d = await start("d", "delta", ["--join", a.addr, "--mesh-secret-file", secretFile]);
    // Same mesh: a lists d's model, and answers for it.
    // Listed is not enough: d publishes its worker as loading first, and A answers 503 until it hears "ready".
    await waitFor("A to list delta as ready", CONVERGE_MS, async () =>
      (await modelsOf(a)).get("delta")?.some((n) => n.status === "ready") ? true : null,
    );
    const r = await client(a).completions.create({ model: "delta", prompt: "hi", max_tokens: 2 });
    expect(r.model).toBe("delta");
    d.proc.kill("SIGTERM");
    expect(await d.proc.exited).toBe(0);
    await waitFor("A to drop delta", CONVERGE_MS, async () => (!(await modelsOf(a)).has("delta") ? true : null));
  }, 120_000);

  test("a_request_to_a_for_a_model_only_c_serves_is_answered_stream_and_not", async () => {
    const r = await client(a).chat.completions.create({ model: "gamma", messages: [{ role: "user", content: "hi" }], max_tokens: 4 });
    expect(r.model).toBe("gamma");
    expect(r.usage?.completion_tokens).toBeGreaterThan(0);
    const stream = await client(a).chat.completions.create({
      model: "gamma",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 5,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    } as OpenAI.ChatCompletionCreateParamsStreaming);
    let text = "";
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      expect(chunk.model).toBe("gamma");
      text += chunk.choices[0]?.delta.content ?? "";
      usage = chunk.usage ?? usage;
    }
    expect(usage?.completion_tokens).toBe(5);
    expect(text.length).toBeGreaterThan(0);
  }, 120_000);

  test("models_on_any_node_list_every_model_with_its_node", async () => {
    const ids: string[] = [];
    for await (const m of client(b).models.list()) ids.push(m.id);
    expect(ids.sort()).toEqual(["alpha", "beta", "gamma"]);
    const raw = (await (await fetch(`${b.url}/v1/models`)).json()) as { data: Array<{ id: string; nodes: Array<{ addr: string }> }> };
    expect(raw.data.find((m) => m.id === "gamma")?.nodes.map((x) => x.addr)).toEqual([c.addr]);
  });

  test("each_nodes_devices_show_in_peers_json_models_and_metrics", async () => {
    const r = meshCli(["peers", "--json", "--state-dir", a.stateDir]);
    expect(r.code).toBe(0);
    const report = JSON.parse(r.out) as PeersReport;
    for (const m of report.members.filter((x) => x.state === "alive")) {
      expect(m.devices?.find((d) => d.type === "cpu")?.total).toBeGreaterThan(0);
    }
    const raw = (await (await fetch(`${b.url}/v1/models`)).json()) as {
      data: Array<{ id: string; backend?: string; gpu_layers?: number; nodes: Array<{ devices?: Array<{ name: string; type: string }> }> }>;
    };
    // Another node's model lists that node's devices; the local one also says what serves it.
    expect(raw.data.find((m) => m.id === "gamma")?.nodes[0]?.devices?.map((d) => d.type)).toContain("cpu");
    const local = raw.data.find((m) => m.id === "beta");
    expect(local).toMatchObject({ backend: "CPU", gpu_layers: 0 });
    const metrics = await (await fetch(`${b.url}/metrics`)).text();
    expect(metrics).toMatch(/^mesh_device_memory_total_bytes\{device="CPU",backend="CPU",type="cpu"\} [1-9]/m);
    expect(metrics).toContain('mesh_gpu_layers{model="beta"} 0');
  });

  test("no_node_serves_the_model_is_404", async () => {
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "delta", messages: [{ role: "user", content: "hi" }] }),
    });
    expect(res.status).toBe(404);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("model_not_found");
  });

  test("wrong_secret_is_refused_and_changes_nothing", async () => {
    const before = await peersOf(a);
    // A node started with another secret pointing at A: its join is refused.
    const intruder = await start("intruder", "alpha", ["--join", a.addr, "--mesh-secret", "not the mesh secret but long enough to pass"]);
    await waitFor("the intruder to report its failed join", 30_000, async () => intruder.log().includes("could not join"));
    // A message signed with the wrong secret, straight from here.
    const wrong = meshKeys("another wrong secret, also long enough!!");
    const t = new HttpTransport(new MeshClient({ keys: wrong, nodeId: "eeee" }), wrong);
    await expect(t.request(a.addr, { type: "join", from: {} }, 30_000)).rejects.toMatchObject({ code: "unauthorized" });
    const raw = await fetch(`http://${a.addr}/mesh/rpc`, { method: "POST", body: '{"type":"join"}' });
    expect(raw.status).toBe(401);
    const body = await raw.text();
    expect(body).not.toContain(before?.mesh_id as string);
    expect(body).not.toContain(a.addr);
    const after = await peersOf(a);
    expect(after?.members.map((m) => m.id).sort()).toEqual(before?.members.map((m) => m.id).sort());
    expect(member(after, "intruder")).toBeUndefined();
    intruder.proc.kill("SIGKILL");
  }, 120_000);

  test("a_peer_that_fails_before_answering_is_retried_on_another", async () => {
    // A second node serving beta, killed without warning: until the mesh notices, A still routes some requests to it.
    const e = await start("e", "beta", ["--join", token]);
    await waitFor("A to see two ready beta workers", CONVERGE_MS, async () => {
      const list = (await (await fetch(`${a.url}/v1/models`)).json()) as { data: Array<{ id: string; nodes: Array<{ status: string }> }> };
      return list.data.find((m) => m.id === "beta")?.nodes.filter((x) => x.status === "ready").length === 2;
    });
    const before = (await peersOf(a))?.forwarding.retried ?? 0;
    e.proc.kill("SIGKILL");
    await e.proc.exited;
    const answers = await Promise.all(
      [1, 2, 3, 4].map(() =>
        client(a).chat.completions.create({ model: "beta", messages: [{ role: "user", content: "hi" }], max_tokens: 2 }),
      ),
    );
    for (const r of answers) expect(r.model).toBe("beta");
    const after = await peersOf(a);
    expect((after?.forwarding.retried ?? 0) - before).toBeGreaterThan(0);
  }, 180_000);

  test("a_killed_node_turns_suspect_then_dead_its_workers_go_and_routing_stops", async () => {
    const beforeReport = await peersOf(a);
    const beforeKill = member(beforeReport, "c") as PeerRow;
    expect(beforeKill.workers.length).toBe(1);
    // n counts every member still probed: E, killed by the previous test, may not be dead yet.
    const size = beforeReport?.members.filter((m) => m.state === "alive" || m.state === "suspect").length ?? 0;
    const deadWithinMs = failureDetectionBoundMs(size) + DETECTION_SLACK_MS;
    const killedAt = Date.now();
    c.proc.kill("SIGKILL");
    await c.proc.exited;
    const seen = new Set<string>();
    await waitFor(
      "A and B to declare C dead",
      deadWithinMs,
      async () => {
        const states = await Promise.all([a, b].map(async (n) => member(await peersOf(n), "c")?.state));
        for (const s of states) if (s) seen.add(s);
        return states.every((s) => s === "dead");
      },
      100,
    );
    const detectMs = Date.now() - killedAt;
    expect(seen.has("suspect")).toBe(true);
    console.log(
      `killed node dead on every survivor after ${detectMs} ms (bound ${failureDetectionBoundMs(size)} ms for ${size} members, plus slack)`,
    );
    for (const n of [a, b]) {
      const row = await waitFor(`${n.name} to drop C's workers`, deadWithinMs, async () => {
        const m = member(await peersOf(n), "c");
        return m && m.workers.length === 0 ? m : null;
      });
      expect(row.models).toEqual([]);
    }
    // /metrics tells the same story: one member dead, declared by A or B (the other may learn it by gossip), nothing forged.
    const texts = await Promise.all([a, b].map(async (n) => (await fetch(`${n.url}/metrics`)).text()));
    let deaths = 0;
    for (const text of texts) {
      expect(text).toMatch(/^mesh_members\{state="dead"\} [1-9]\d*$/m);
      expect(text).toMatch(/^mesh_kv_records_rejected_total\{reason="forged"\} 0$/m);
      expect(text).toMatch(/^mesh_workers\{origin="local"\} 1$/m);
      deaths += Number(/^mesh_membership_events_total\{event="death"\} (\d+)$/m.exec(text)?.[1] ?? "0");
    }
    expect(deaths).toBeGreaterThanOrEqual(1);
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "gamma", messages: [{ role: "user", content: "hi" }], max_tokens: 2 }),
    });
    expect(res.status).toBe(404);

    // It comes back on the same state dir and address: a higher incarnation (it refutes its death), the same worker id.
    const deadInc = member(await peersOf(a), "c")?.incarnation ?? 0;
    c = await start("c", "gamma", ["--join", token, "--port", String(c.port)], c.stateDir);
    const back = await waitFor("A to see C alive again with its worker", CONVERGE_MS, async () => {
      const m = member(await peersOf(a), "c");
      return m && m.state === "alive" && m.workers.length === 1 ? m : null;
    });
    expect(back.id).toBe(beforeKill.id);
    expect(back.incarnation).toBeGreaterThan(deadInc);
    expect(back.incarnation).toBeGreaterThan(beforeKill.incarnation);
    expect(back.workers).toEqual(beforeKill.workers);
    const r = await client(a).chat.completions.create({ model: "gamma", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    expect(r.model).toBe("gamma");
  }, 300_000);

  test("mesh_peers_against_a_node_that_is_not_running_is_one_line_and_exit_1", () => {
    const r = meshCli(["peers", "--state-dir", a.stateDir, "--url", `http://127.0.0.1:${c.port === 1 ? 2 : 1}`]);
    expect(r.code).toBe(1);
    expect(r.err.trim().split("\n").length).toBe(1);
    expect(r.err).toContain("no mesh node is running");
  });
});

describe("leaving and coming back", () => {
  test("sigterm_leaves_gracefully_and_peers_drop_its_workers_without_waiting_for_suspicion", async () => {
    const bId = member(await peersOf(a), "b")?.id;
    b.proc.kill("SIGTERM");
    expect(await b.proc.exited).toBe(0);
    const row = await waitFor("A to see B as left with no workers", CONVERGE_MS, async () => {
      const m = member(await peersOf(a), "b");
      return m && m.state === "left" && m.workers.length === 0 ? m : null;
    });
    expect(row.id).toBe(bId as string);
    // Under a loaded full suite a peer may gossip B's worker record back for a moment (a retryable 503,
    // "loading on every node that serves it"); it must settle at 404 and never be routed to B.
    const seen: number[] = [];
    await waitFor("A to answer 404 for the model only B served", CONVERGE_MS, async () => {
      const res = await fetch(`${a.url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "beta", prompt: "x", max_tokens: 1 }),
      });
      await res.arrayBuffer();
      seen.push(res.status);
      return res.status === 404;
    });
    expect(seen.every((s) => s === 404 || s === 503)).toBe(true);
  }, 120_000);

  test("a_restart_without_join_finds_the_mesh_through_the_peers_it_remembered", async () => {
    b = await start("b", "beta", ["--port", String(b.port)], b.stateDir);
    // Alive comes from membership, the worker record from sync: wait for both before routing to it.
    await waitFor("A to see B alive again with a ready beta worker", CONVERGE_MS, async () => {
      if (member(await peersOf(a), "b")?.state !== "alive") return false;
      const list = (await (await fetch(`${a.url}/v1/models`)).json()) as { data: Array<{ id: string; nodes: Array<{ status: string }> }> };
      return list.data.find((m) => m.id === "beta")?.nodes.some((x) => x.status === "ready") ?? false;
    });
    expect(b.log()).toContain("joined the mesh");
    const r = await client(a).completions.create({ model: "beta", prompt: "x", max_tokens: 1 });
    expect(r.model).toBe("beta");
  }, 180_000);
});

const FORGED = 'mesh_kv_records_rejected_total{reason="forged"}';
const TOMBSTONES = 'mesh_kv_entries{kind="tombstone"}';

/** A record of `owner`'s key signed with `signer`'s key: what a member relaying a forgery sends. */
function forgedRecord(signer: Identity, owner: string, key: string, value: string | null, hlc: Hlc): KvRecord {
  // signRecord makes the signing identity the owner: lend it the owner's id, keep the signer's key.
  return signRecord({ id: owner, publicKey: signer.publicKey, sign: (d) => signer.sign(d) }, key, value, hlc);
}

/** A range carrying `records` of `owner` that vouches for no watermark (no `upTo`). */
function rangeOf(owner: string, records: KvRecord[]): KvRange {
  return { owner, after: null, upTo: null, records, more: false };
}

/** A timestamp of `owner` a little ahead of now: newer than its current records, within the accepted clock drift. */
function aheadOf(owner: string, ms: number): Hlc {
  return { w: Date.now() + ms, l: 0, n: owner };
}

/** The record value of `owner`'s worker for `model` at `addr`, as the cluster's nodes publish it (ctx 2048, 2 slots). */
function workerValue(id: string, owner: string, addr: string, model: string, health: WorkerInfo["health"]): string {
  const info: WorkerInfo = {
    id,
    nodeId: owner,
    addr,
    models: [model],
    ctxSize: 2048,
    slotsTotal: 2,
    slotsBusy: 0,
    kvUsed: 0,
    kvCached: 0,
    kvTotal: 0,
    queueDepth: 0,
    health,
  };
  return serializeWorker(info);
}

/** The key `n` signs with, read from its state dir (only for records that node itself could have written). */
function keyOf(n: NodeProc): Identity {
  const id = loadOrCreateIdentity(n.stateDir);
  if (!id.ok) throw new Error(id.message);
  return id.value;
}

/** How `observer` lists `model`: [addr, status] of each node serving it. */
async function servedAt(observer: NodeProc, model: string): Promise<Array<[string, string]>> {
  return ((await modelsOf(observer)).get(model) ?? []).map((x) => [x.addr, x.status]);
}

/** Wait until `observer` holds `owner`'s one worker, ready for `model`; returns `owner`'s row as `observer` sees it. */
async function holdsWorkerOf(observer: NodeProc, owner: NodeProc, model: string): Promise<PeerRow> {
  return waitFor(`${observer.name} to hold ${owner.name}'s worker`, CONVERGE_MS, async () => {
    const row = member(await peersOf(observer), owner.name);
    return row?.workers.length === 1 && (await servedAt(observer, model)).join() === [owner.addr, "ready"].join() ? row : null;
  });
}

/** Wait until each of `observers` holds `subject` alive at the incarnation `subject` itself has: no suspicion left over. */
async function settled(subject: NodeProc, observers: NodeProc[]): Promise<void> {
  await waitFor(`${subject.name} alive at its own incarnation everywhere`, CONVERGE_MS, async () => {
    const own = member(await peersOf(subject), subject.name)?.incarnation;
    const seen = await Promise.all(observers.map(async (o) => member(await peersOf(o), subject.name)));
    return own !== undefined && seen.every((m) => m?.state === "alive" && m.incarnation === own);
  });
}

describe("what a running node refuses and repairs", () => {
  test("a_worker_record_of_node_a_signed_with_another_key_is_refused_and_a_stays_routable", async () => {
    const t = new TestMember(a.stateDir);
    try {
      // B restarted in the test before: it may still be fetching A's worker record.
      const aRow = await holdsWorkerOf(b, a, "alpha");
      // Were it taken, A's worker would turn unroutable everywhere the record reached.
      const value = workerValue(aRow.workers[0] as string, aRow.id, a.addr, "alpha", "failed");
      const record = forgedRecord(t.identity, aRow.id, workerKey(aRow.workers[0] as string), value, aheadOf(aRow.id, 5_000));
      const before = await Promise.all([a, b].map((n) => metricOf(n, FORGED)));
      // To B, relayed as if it were A's; to A itself, a record of its own key it never signed.
      await t.push(b, [rangeOf(aRow.id, [record])]);
      await t.push(a, [rangeOf(aRow.id, [record])]);
      const after = await Promise.all([a, b].map((n) => metricOf(n, FORGED)));
      expect(after.map((x, i) => x - (before[i] as number))).toEqual([1, 1]);
      for (const n of [a, b]) expect(await servedAt(n, "alpha")).toEqual([[a.addr, "ready"]]);
      expect(member(await peersOf(b), "a")?.workers).toEqual(aRow.workers);
      const r = await client(b).chat.completions.create({ model: "alpha", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
      expect(r.model).toBe("alpha");
    } finally {
      await t.leave([a, b, c]);
    }
  }, 60_000);

  test("a_tombstone_for_another_nodes_worker_is_refused_its_owner_reasserts_it_and_requests_still_reach_it", async () => {
    const t = new TestMember(a.stateDir);
    try {
      const cRow = await holdsWorkerOf(a, c, "gamma");
      const key = workerKey(cRow.workers[0] as string);
      // Sent to A by another member and signed by it, not by C: refused, nothing changes.
      const before = await metricOf(a, FORGED);
      await t.push(a, [rangeOf(cRow.id, [forgedRecord(t.identity, cRow.id, key, null, aheadOf(cRow.id, 1_000))])]);
      expect(await metricOf(a, FORGED)).toBe(before + 1);
      expect(await servedAt(a, "gamma")).toEqual([[c.addr, "ready"]]);

      // A tombstone C did sign passes every store: a delete from an earlier life of C whose clock ran
      // ahead. Only C's key can make one, so it is read from C's state dir.
      const cKey = keyOf(c);
      expect(cKey.id).toBe(cRow.id);
      const tombstone = signRecord(cKey, key, null, aheadOf(cRow.id, 1_000));
      await t.push(a, [rangeOf(cRow.id, [tombstone])]);
      // A takes its owner's word: gamma is gone there. A does not pass the tombstone on (it is past
      // the watermark C signed), so C learns of it only from the next push.
      await waitFor("A to drop C's worker on C's own tombstone", 5_000, async () => (await servedAt(a, "gamma")).length === 0);
      await t.push(c, [rangeOf(cRow.id, [tombstone])]);
      // C still serves gamma: its registry refuses the delete and publishes the worker again with a
      // newer clock, which outranks the tombstone on A.
      await waitFor("C to re-assert its worker", 10_000, async () => /mesh re-asserted a local worker .*tombstone=true/.test(c.log()));
      await waitFor(
        "A to list C's worker as ready again",
        CONVERGE_MS,
        async () => (await servedAt(a, "gamma")).join() === [c.addr, "ready"].join(),
      );
      expect(member(await peersOf(a), "c")?.workers).toEqual(cRow.workers);
      const r = await client(a).chat.completions.create({ model: "gamma", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
      expect(r.model).toBe("gamma");
      // C's own signature is no forgery: only the first tombstone was counted.
      expect(await metricOf(a, FORGED)).toBe(before + 1);
    } finally {
      await t.leave([a, b, c]);
    }
  }, 120_000);

  test("published_kv_use_counts_running_requests_not_idle_cache", async () => {
    // The load gate reads kv_used: a node whose KV is full of idle cache, freed as needed, is not loaded.
    await client(a).completions.create({ model: "alpha", prompt: "y ".repeat(200), max_tokens: 1 });
    // Once the request is done (a record published while it ran may still be the latest for a second), the
    // cache stays and the use is gone. Counting cache as use never gets here.
    const row = await waitFor("A to publish its cached conversation with nothing running", CONVERGE_MS, async () => {
      const r = member(await peersOf(b), "a");
      return r && r.kv_cached > 100 && r.kv_used === 0 ? r : null;
    });
    expect(row.kv_cached).toBeGreaterThan(row.kv_used);
  }, 60_000);

  test("a_node_frozen_while_a_peer_changed_its_worker_catches_up_when_it_resumes", async () => {
    const own = async () => member(await peersOf(a), "a") as PeerRow;
    const seenByB = async () => member(await peersOf(b), "a");
    const agreed = await waitFor("B to agree with A on A's worker", CONVERGE_MS, async () => {
      const [mine, theirs] = await Promise.all([own(), seenByB()]);
      return theirs?.kv_cached === mine.kv_cached ? mine : null;
    });
    b.proc.kill("SIGSTOP");
    const frozenAt = Date.now();
    let changed: PeerRow;
    try {
      // The KV cells a finished conversation leaves cached on A depend on its prompt's length: a new length changes
      // A's worker record, which A publishes within a second.
      changed = await waitFor(
        "A's cached KV to change while B is frozen",
        20_000,
        async () => {
          const prompt = "x ".repeat(20 + Math.floor(Math.random() * 300));
          await client(a).completions.create({ model: "alpha", prompt, max_tokens: 1 });
          await Bun.sleep(1_200);
          const row = await own();
          return row.kv_cached !== agreed.kv_cached ? row : null;
        },
        0,
      );
      // A's push of the new record to B waits for an answer that does not come, and times out.
      await Bun.sleep(Math.max(0, frozenAt + SHORT_FREEZE_MS - Date.now()));
    } finally {
      b.proc.kill("SIGCONT");
    }
    // Only a record A wrote after B froze carries the new figure.
    const caught = await waitFor("B to hold A's current worker record", CONVERGE_MS, async () => {
      const [mine, theirs] = await Promise.all([own(), seenByB()]);
      return theirs && mine.kv_cached !== agreed.kv_cached && theirs.kv_cached === mine.kv_cached ? theirs : null;
    });
    expect(caught.kv_cached).not.toBe(agreed.kv_cached);
    expect(changed.kv_cached).not.toBe(agreed.kv_cached);
    expect(caught.workers).toEqual(agreed.workers);
  }, 120_000);

  test("a_tombstone_collected_while_a_frozen_peer_missed_it_stays_deleted_when_the_peer_resumes", async () => {
    // The real source of a worker tombstone: a node restarted before anyone declared it dead, serving
    // another model. Peers hand its old worker record back and it deletes it. B is frozen throughout,
    // still holding the old record; it is declared dead, which lets the tombstone be collected.
    const cRow = await holdsWorkerOf(a, c, "gamma");
    const oldWorker = cRow.workers[0] as string;
    // Frozen from "alive", B is declared dead no sooner than a probe plus 5 suspicion rounds (6 s)
    // later, so when it resumes it finds itself frozen past that and drops what others wrote.
    // A suspicion left over from the previous test's freeze would make the death come sooner, within
    // a freeze B does not notice; B then refutes a stale suspicion, outranks its own death, never drops
    // its state and keeps the deleted worker. That is a gap of its own, not this test's scenario.
    await settled(b, [a, c]);
    const aBaseline = await metricOf(a, TOMBSTONES);
    b.proc.kill("SIGSTOP");
    // C's first life ends here: its records are stamped about now or earlier, its new life's later.
    const endOfOldLife = Date.now();
    try {
      c.proc.kill("SIGKILL");
      await c.proc.exited;
      c = await start("c", "omega", ["--join", token, "--port", String(c.port)], c.stateDir);
      let held = false;
      await waitFor(
        "C's tombstone for its gamma worker on A and C, then collected on both once B is dead",
        failureDetectionBoundMs(3) + DETECTION_SLACK_MS + CONVERGE_MS,
        async () => {
          // C's new process started with no tombstones.
          const [onA, onC] = await Promise.all([metricOf(a, TOMBSTONES), metricOf(c, TOMBSTONES)]);
          if (onA > aBaseline || onC > 0) held = true;
          const bDead = member(await peersOf(a), "b")?.state === "dead";
          return held && bDead && onA <= aBaseline && onC === 0;
        },
      );
      expect(await servedAt(a, "gamma")).toEqual([]);
      expect(await servedAt(a, "omega")).toEqual([[c.addr, "ready"]]);
    } finally {
      b.proc.kill("SIGCONT");
    }
    await waitFor("B back in the mesh, routing to C's new worker", CONVERGE_MS, async () => {
      const back = member(await peersOf(a), "b")?.state === "alive";
      return back && (await servedAt(b, "omega")).join() === [c.addr, "ready"].join();
    });
    // The put B held, replayed straight to A by a member (C's own signature, its first life's clock):
    // A is complete for C past it and no longer holds the key, so it knows the key was deleted since.
    const t = new TestMember(a.stateDir);
    try {
      const stalePut = signRecord(keyOf(c), workerKey(oldWorker), workerValue(oldWorker, cRow.id, c.addr, "gamma", "ready"), {
        w: endOfOldLife,
        l: 0,
        n: cRow.id,
      });
      await t.push(a, [rangeOf(cRow.id, [stalePut])]);
    } finally {
      await t.leave([a, b, c]);
    }
    // Several sync rounds: a stale put that got in anywhere would show on some node as gamma again.
    const watchUntil = Date.now() + 5_000;
    while (Date.now() < watchUntil) {
      for (const n of [a, b, c]) expect({ node: n.name, gamma: await servedAt(n, "gamma") }).toEqual({ node: n.name, gamma: [] });
      await Bun.sleep(200);
    }
    for (const n of [a, b]) expect(member(await peersOf(n), "c")?.workers).not.toContain(oldWorker);
    const r = await client(b).chat.completions.create({ model: "omega", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    expect(r.model).toBe("omega");
  }, 180_000);
});
