// Separate `mesh serve` processes on 127.0.0.1 forming one mesh. Each node
// serves the tiny model under its own name (alpha, beta, gamma), so which node
// answered is visible from the model id.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { HttpTransport } from "../../src/mesh/transport-http";
import type { PeerRow, PeersReport } from "../../src/server/mesh-routes";
import { clusterDir, MAIN, meshCli, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

// Detection bound stated for these tests: with 1 s rounds and 5 suspicion
// rounds a killed node is dead everywhere after ~8 s typically; 45 s leaves
// room for a slow, shared machine without hiding a detector that never fires.
const DEAD_WITHIN_MS = 45_000;
const CONVERGE_MS = 60_000;

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
    const beforeKill = member(await peersOf(a), "c") as PeerRow;
    expect(beforeKill.workers.length).toBe(1);
    const killedAt = Date.now();
    c.proc.kill("SIGKILL");
    await c.proc.exited;
    const seen = new Set<string>();
    await waitFor(
      "A and B to declare C dead",
      DEAD_WITHIN_MS,
      async () => {
        const states = await Promise.all([a, b].map(async (n) => member(await peersOf(n), "c")?.state));
        for (const s of states) if (s) seen.add(s);
        return states.every((s) => s === "dead");
      },
      100,
    );
    const detectMs = Date.now() - killedAt;
    expect(seen.has("suspect")).toBe(true);
    console.log(`killed node dead on every survivor after ${detectMs} ms (bound ${DEAD_WITHIN_MS} ms)`);
    for (const n of [a, b]) {
      const row = await waitFor(`${n.name} to drop C's workers`, DEAD_WITHIN_MS, async () => {
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
    const res = await fetch(`${a.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "beta", prompt: "x", max_tokens: 1 }),
    });
    expect(res.status).toBe(404);
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
