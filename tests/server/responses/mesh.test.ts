// /v1/responses across a mesh of two `mesh serve` processes: A serves alpha, B
// serves beta, both require an API key. A request to A for beta is checked on
// A, its previous_response_id expanded from A's store, and the conversation
// forwarded to B as a chat request; A answers and keeps the response.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { clusterDir, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../../helpers/cluster";

const KEY = "k-responses-mesh";
const dir = clusterDir();
const nodes: NodeProc[] = [];
let a: NodeProc;
let b: NodeProc;

beforeAll(async () => {
  a = await spawnNode({ name: "a", dir, model: "alpha", args: ["--api-key", KEY] });
  nodes.push(a);
  b = await spawnNode({ name: "b", dir, model: "beta", args: ["--join", tokenOf(a), "--api-key", KEY] });
  nodes.push(b);
  await waitFor("A to list beta as ready", 60_000, async () => {
    const res = await fetch(`${a.url}/v1/models`, { headers: { authorization: `Bearer ${KEY}` } });
    const list = (await res.json()) as { data: Array<{ id: string; nodes?: Array<{ status: string }> }> };
    return list.data.find((m) => m.id === "beta")?.nodes?.some((n) => n.status === "ready");
  });
});

afterAll(async () => {
  for (const n of nodes) n.proc.kill("SIGKILL");
  await Promise.all(nodes.map((n) => n.proc.exited));
});

const client = (node: NodeProc = a) => new OpenAI({ baseURL: `${node.url}/v1`, apiKey: KEY, maxRetries: 0, timeout: 120_000 });

describe("OpenAI Responses across the mesh", () => {
  test("a_conversation_with_a_model_only_the_peer_serves_is_chained_on_the_entry_node_and_runs_on_the_peer_from_cache", async () => {
    const before = (await peersOf(a))?.forwarding.forwarded ?? 0;
    const first = await client().responses.create({
      model: "beta",
      instructions: "Be brief.",
      input: `Hello from the other side of the mesh. ${"Some context. ".repeat(10)}`,
      max_output_tokens: 4,
      temperature: 0,
    });
    expect(first.model).toBe("beta");
    expect(first.usage?.output_tokens).toBeGreaterThan(0);
    const events: string[] = [];
    const stream = client().responses.stream({
      model: "beta",
      instructions: "Be brief.",
      previous_response_id: first.id,
      input: "And again.",
      max_output_tokens: 4,
      temperature: 0,
    });
    stream.on("event", (e) => events.push(e.type));
    const second = await stream.finalResponse();
    expect(events[0]).toBe("response.created");
    // B's cache held the first turn: the expanded conversation was routed back to it.
    expect(second.usage?.input_tokens_details.cached_tokens).toBeGreaterThanOrEqual((first.usage?.input_tokens ?? 0) - 1);
    expect(second.usage?.input_tokens).toBeGreaterThan(first.usage?.input_tokens as number);
    // A holds both responses; B, which ran them, holds none.
    expect((await client().responses.retrieve(second.id)).previous_response_id).toBe(first.id);
    expect(
      await client(b)
        .responses.retrieve(first.id)
        .catch((e: unknown) => e),
    ).toBeInstanceOf(OpenAI.NotFoundError);
    expect(((await peersOf(a))?.forwarding.forwarded ?? 0) - before).toBe(2);
  }, 120_000);

  test("a_bad_request_or_an_unknown_previous_response_is_refused_on_the_entry_node_and_never_forwarded", async () => {
    const before = (await peersOf(a))?.forwarding.forwarded ?? 0;
    const bad = await client()
      .responses.create({ model: "beta", input: [{ type: "function_call_output", call_id: "nope", output: "x" }] })
      .catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
    expect((bad as InstanceType<typeof OpenAI.BadRequestError>).param).toBe("input[0].call_id");
    const unknown = await client()
      .responses.create({ model: "beta", input: "Hi", previous_response_id: "resp_nope" })
      .catch((e: unknown) => e);
    expect(unknown).toBeInstanceOf(OpenAI.NotFoundError);
    expect((unknown as InstanceType<typeof OpenAI.NotFoundError>).param).toBe("previous_response_id");
    expect(((await peersOf(a))?.forwarding.forwarded ?? 0) - before).toBe(0);
  }, 120_000);
});
