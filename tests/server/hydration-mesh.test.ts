// Checkpoint hydration across real `mesh serve` processes on loopback. Node b serves a few sessions
// alone and holds their checkpoints. Node a joins: the sessions whose home is a (rendezvous over the
// nodes serving the model) are its share. First a joins with no background pass, and a request for
// such a session that runs on a (a peer forwarded it there) fetches its checkpoint through the
// priority lane; then a restarts and rejoins with the background pass on, which pulls its share
// before any request asks, so that when b dies those sessions go on warm on a. Either way the next
// turn on a reports cached tokens from b's checkpoint and the same greedy text as a run without it.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { sessionHome } from "../../src/hydration/checkpoint-record";
import { meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { loadOrCreateIdentity } from "../../src/mesh/identity";
import { clusterDir, metricOf, type NodeProc, secretOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const dir = clusterDir();
const nodes: NodeProc[] = [];
let b: NodeProc;
/** a's first run (killed before its rejoin, even when the first test failed half-way). */
let first: NodeProc | null = null;
const stateA = join(dir, "state-a");
// Long enough (about 700 tokens) that a restored checkpoint clearly counts.
const SYSTEM = "You are a build agent. Follow the plan and report each step. ".repeat(55);
type Msg = { role: string; content: string | null };

const idOf = (stateDir: string) => {
  mkdirSync(stateDir, { recursive: true });
  const r = loadOrCreateIdentity(stateDir);
  if (!r.ok) throw new Error(r.message);
  return r.value.id;
};

type Reply = {
  choices: Array<{ message: { content: string | null } }>;
  usage: { prompt_tokens_details: { cached_tokens: number } };
};
const bodyOf = (messages: Msg[]) => JSON.stringify({ model: "shared", messages, max_tokens: 8, temperature: 0 });

/** A turn as a forwarding peer sends it: signed with the mesh secret, the session in the signed path. It runs where it is sent. */
async function forwarded(n: NodeProc, messages: Msg[], session: string) {
  const client = new MeshClient({ keys: meshKeys(secretOf(n.stateDir)), nodeId: "test-forwarder" });
  const path = `/v1/chat/completions?session=${encodeURIComponent(session)}`;
  const { response } = await client.send(n.addr, "POST", path, new TextEncoder().encode(bodyOf(messages)), {
    signal: AbortSignal.timeout(120_000),
    headers: { "content-type": "application/json" },
  });
  expect(response.status).toBe(200);
  const body = (await response.json()) as Reply;
  return { text: body.choices[0]?.message.content ?? null, cached: body.usage.prompt_tokens_details.cached_tokens };
}

async function chat(n: NodeProc, messages: Msg[], session: string | null) {
  const r = await fetch(`${n.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(session ? { "x-session-id": session } : {}) },
    body: bodyOf(messages),
  });
  expect(r.status).toBe(200);
  const body = (await r.json()) as Reply;
  return {
    route: r.headers.get("x-mesh-route"),
    node: r.headers.get("x-mesh-node"),
    text: body.choices[0]?.message.content ?? null,
    cached: body.usage.prompt_tokens_details.cached_tokens,
  };
}

// Session ids chosen so that, with a and b serving the model, the first three are homed at a and the last at b.
let sessions: { priority: string; background: string[]; stays: string };
const history = new Map<string, Msg[]>();
const reference = new Map<string, string | null>();

beforeAll(async () => {
  b = await spawnNode({ name: "b", dir, model: "shared", args: ["--cache-ram", "0"] });
  nodes.push(b);
  const [ia, ib] = [idOf(stateA), idOf(b.stateDir)];
  const homedA: string[] = [];
  let homedB: string | null = null;
  for (let i = 0; homedA.length < 3 || homedB === null; i++) {
    const id = `agent-${i}`;
    if (sessionHome(id, [ia, ib]) === ia) homedA.push(id);
    else homedB ??= id;
  }
  sessions = { priority: homedA[0] as string, background: homedA.slice(1, 3), stays: homedB as string };
  // b alone: each session's first turn (b saves its checkpoint), and the second turn's greedy text without any session.
  for (const s of [sessions.priority, ...sessions.background, sessions.stays]) {
    const first: Msg[] = [
      // Each session its own prefix: a slot another session left behind shares only the template's first tokens.
      { role: "system", content: `Session ${s}. ${SYSTEM}` },
      { role: "user", content: `task ${s}` },
    ];
    const t1 = await chat(b, first, s);
    const second = [...first, { role: "assistant", content: t1.text }, { role: "user", content: "next step" }];
    history.set(s, second);
    reference.set(s, (await chat(b, second, null)).text);
  }
}, 240_000);

afterAll(async () => {
  for (const n of nodes) n.proc.kill("SIGKILL");
  await Promise.all(nodes.map((n) => n.proc.exited));
});

describe("checkpoint hydration in a mesh", () => {
  test("a_checkpoint_blob_is_refused_without_mesh_credentials", async () => {
    const r = await fetch(`${b.url}/mesh/checkpoints/shared/anykey`);
    expect(r.status).toBe(401);
    const body = (await r.json()) as { error: { code: string } };
    expect(body.error.code).toBe("mesh_unauthorized");
  });

  test("a_request_that_runs_here_before_any_pass_fetches_its_checkpoint_by_the_priority_lane_and_restores_it", async () => {
    // No background pass: the only way the checkpoint can come over is the request's own priority fetch.
    const a = await spawnNode({
      name: "a",
      dir,
      model: "shared",
      stateDir: stateA,
      args: ["--cache-ram", "0", "--hydrate-parallel", "0", "--join", tokenOf(b)],
    });
    nodes.push(a);
    first = a;
    await waitFor("a to learn b's announced sessions", 60_000, async () => (await metricOf(a, "mesh_hydration_routed_here")) >= 3);
    expect(await metricOf(a, 'mesh_hydration_checkpoints_total{outcome="hydrated"}')).toBe(0);
    const s = sessions.priority;
    const t2 = await forwarded(a, history.get(s) as Msg[], s);
    // The system prompt alone is about 700 tokens: they came from b's checkpoint.
    expect(t2.cached).toBeGreaterThan(500);
    expect(t2.text).toBe(reference.get(s) as string | null);
    expect(await metricOf(a, "mesh_hydration_priority_total")).toBe(1);
    expect(await metricOf(a, 'mesh_hydration_checkpoints_total{outcome="hydrated"}')).toBe(1);
    expect(await metricOf(a, "mesh_hydration_passes_total")).toBe(0);
    const listed = (await (await fetch(`${a.url}/v1/sessions/${s}`)).json()) as { checkpoint_hydrated_from?: { node: string } };
    expect(listed.checkpoint_hydrated_from?.node).toBe("b");
    a.proc.kill("SIGKILL");
    await a.proc.exited;
  }, 240_000);

  test("after_a_rejoin_the_background_pass_hydrates_its_share_so_those_sessions_go_on_warm_when_their_holder_dies", async () => {
    const before = first as NodeProc | null;
    before?.proc.kill("SIGKILL");
    await before?.proc.exited;
    const a = await spawnNode({ name: "a", dir, model: "shared", stateDir: stateA, args: ["--cache-ram", "0", "--join", tokenOf(b)] });
    nodes.push(a);
    // Three sessions are homed at a (the one a served before its restart too: what a held died with it, b still announces it).
    await waitFor(
      "a's background pass to hydrate its share of the sessions",
      60_000,
      async () => (await metricOf(a, 'mesh_hydration_checkpoints_total{outcome="hydrated"}')) >= 3,
    );
    expect(await metricOf(a, "mesh_hydration_passes_total")).toBeGreaterThanOrEqual(1);
    // The holder dies: its sessions now run on a.
    b.proc.kill("SIGKILL");
    await b.proc.exited;
    for (const s of sessions.background) {
      const t2 = await chat(a, history.get(s) as Msg[], s);
      expect(t2.cached).toBeGreaterThan(500);
      expect(t2.text).toBe(reference.get(s) as string | null);
    }
    // Their checkpoints were here already: no request waited for a fetch.
    expect(await metricOf(a, "mesh_hydration_priority_total")).toBe(0);
    // The session homed at b had no copy here (a may still try b, not yet known dead, and fail): a full prefill, the same text.
    const stays = await chat(a, history.get(sessions.stays) as Msg[], sessions.stays);
    expect(stays.cached).toBeLessThan(100);
    expect(stays.text).toBe(reference.get(sessions.stays) as string | null);
    expect(await metricOf(a, 'mesh_hydration_checkpoints_total{outcome="hydrated"}')).toBe(3);
    expect(await metricOf(a, 'mesh_hydration_checkpoints_total{outcome="corrupt"}')).toBe(0);
  }, 240_000);
});
