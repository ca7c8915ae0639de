// Cache-aware routing between real `mesh serve` processes on loopback, with
// the official openai client: a conversation's follow-up entering at another
// node runs where its prefix is cached, and survives that node's death.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { clusterDir, metricOf, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../helpers/cluster";

const MODEL = "mesh-tiny";
let dir: string;
let a: NodeProc;
let b: NodeProc;
let c: NodeProc;
const nodes: NodeProc[] = [];

beforeAll(async () => {
  dir = clusterDir();
  a = await spawnNode({ name: "a", dir, model: MODEL });
  nodes.push(a);
  const token = tokenOf(a);
  [b, c] = await Promise.all([
    spawnNode({ name: "b", dir, model: MODEL, args: ["--join", token] }),
    spawnNode({ name: "c", dir, model: MODEL, args: ["--join", token] }),
  ]);
  nodes.push(b, c);
  // Every node routes to every node's worker.
  await waitFor("three ready workers everywhere", 60_000, async () => {
    const reports = await Promise.all(nodes.map(peersOf));
    return reports.every((r) => r !== null && r.members.filter((m) => m.state === "alive" && m.models.includes(MODEL)).length === 3);
  });
});

afterAll(() => {
  for (const n of nodes) n.proc.kill("SIGKILL");
});

const clientOf = (n: NodeProc) => new OpenAI({ baseURL: `${n.url}/v1`, apiKey: "unused", maxRetries: 0 });
const idOf = async (n: NodeProc) => (await peersOf(n))?.node_id as string;

// A system prompt long enough to be worth a hop (a few hundred tokens), then the user's turn.
const system = `You are the build agent of a large repository. ${"Follow the style guide, run the tests, keep commits small. ".repeat(30)}`;
const turn1: OpenAI.ChatCompletionMessageParam[] = [
  { role: "system", content: system },
  { role: "user", content: "List the files under src/routing and say what each one does." },
];

describe("cache-aware routing across processes", () => {
  test("a_follow_up_entering_at_another_node_runs_where_its_prefix_is_cached_and_survives_that_nodes_death", async () => {
    const bId = await idOf(b);
    // Turn 1 enters at B: with nothing cached anywhere and every node idle, it runs there (no hop).
    const first = await clientOf(b)
      .chat.completions.create({ model: MODEL, messages: turn1, max_tokens: 8, temperature: 0 })
      .withResponse();
    expect(first.response.headers.get("x-mesh-served-by")).toBe(bId);
    const reply = first.data.choices[0]?.message.content ?? "";

    // B's engine reports what its KV holds; the sync carries it to A.
    const entries = (n: NodeProc) => metricOf(n, `mesh_routing_index_entries{model="${MODEL}"}`).catch(() => 0);
    await waitFor("B's prefixes in A's index", 30_000, async () => (await entries(a)) >= 2);

    // Turn 2 enters at A: it runs on B, from B's cache.
    const turn2: OpenAI.ChatCompletionMessageParam[] = [
      ...turn1,
      { role: "assistant", content: reply },
      { role: "user", content: "Now the tests for the index." },
    ];
    const second = await clientOf(a)
      .chat.completions.create({ model: MODEL, messages: turn2, max_tokens: 8, temperature: 0 })
      .withResponse();
    expect(second.response.headers.get("x-mesh-served-by")).toBe(bId);
    expect(second.response.headers.get("x-mesh-route")).toBe("cache");
    const cached = second.data.usage?.prompt_tokens_details?.cached_tokens ?? 0;
    expect(cached).toBeGreaterThan(100);
    expect(await metricOf(a, 'mesh_routing_decisions_total{by="cache"}')).toBeGreaterThanOrEqual(1);

    // B dies. The same follow-up, entering at A again, runs elsewhere and still succeeds.
    b.proc.kill("SIGKILL");
    await b.proc.exited;
    const third = await clientOf(a)
      .chat.completions.create({ model: MODEL, messages: turn2, max_tokens: 8, temperature: 0 })
      .withResponse();
    expect(third.data.choices[0]?.message).toBeDefined();
    expect(third.response.headers.get("x-mesh-served-by")).not.toBe(bId);
  });
});
