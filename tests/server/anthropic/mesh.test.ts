// /v1/messages across a mesh of two `mesh serve` processes: A serves alpha, B
// serves beta, both require an API key. A request to A for beta is checked on
// A, forwarded to B, which answers on its own /v1/messages; the Anthropic
// client sees one server.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import Anthropic from "@anthropic-ai/sdk";
import { clusterDir, type NodeProc, peersOf, spawnNode, tokenOf, waitFor } from "../../helpers/cluster";

const KEY = "k-anthropic-mesh";
const dir = clusterDir();
const nodes: NodeProc[] = [];
let a: NodeProc;

beforeAll(async () => {
  a = await spawnNode({ name: "a", dir, model: "alpha", args: ["--api-key", KEY] });
  nodes.push(a);
  nodes.push(await spawnNode({ name: "b", dir, model: "beta", args: ["--join", tokenOf(a), "--api-key", KEY] }));
  await waitFor("A to list beta as ready", 60_000, async () => {
    const res = await fetch(`${a.url}/v1/models`, { headers: { "x-api-key": KEY } });
    const list = (await res.json()) as { data: Array<{ id: string; nodes?: Array<{ status: string }> }> };
    return list.data.find((m) => m.id === "beta")?.nodes?.some((n) => n.status === "ready");
  });
});

afterAll(async () => {
  for (const n of nodes) n.proc.kill("SIGKILL");
  await Promise.all(nodes.map((n) => n.proc.exited));
});

const client = (apiKey = KEY) => new Anthropic({ baseURL: a.url, apiKey, maxRetries: 0, timeout: 120_000 });
const conversation = {
  model: "beta",
  system: "Be brief.",
  messages: [{ role: "user" as const, content: "Hello from the other side of the mesh" }],
};

describe("Anthropic Messages across the mesh", () => {
  test("a_message_for_a_model_only_the_peer_serves_is_forwarded_and_answered_streamed_and_not", async () => {
    const before = (await peersOf(a))?.forwarding.forwarded ?? 0;
    const whole = await client().messages.create({ ...conversation, max_tokens: 4 });
    expect(whole.type).toBe("message");
    expect(whole.model).toBe("beta");
    expect(whole.usage.output_tokens).toBeGreaterThan(0);
    const events: string[] = [];
    const stream = client().messages.stream({ ...conversation, max_tokens: 4 });
    stream.on("streamEvent", (e) => events.push(e.type));
    const streamed = await stream.finalMessage();
    expect(streamed.model).toBe("beta");
    expect(events[0]).toBe("message_start");
    expect(events.at(-1)).toBe("message_stop");
    // The repeat met the first request's prefix in B's cache.
    expect(streamed.usage.cache_read_input_tokens).toBeGreaterThan(0);
    const counted = await client().messages.countTokens(conversation);
    expect(counted.input_tokens).toBe(whole.usage.input_tokens + (whole.usage.cache_read_input_tokens ?? 0));
    expect(((await peersOf(a))?.forwarding.forwarded ?? 0) - before).toBe(3);
  }, 120_000);

  test("a_bad_request_is_refused_on_the_entry_node_and_never_forwarded", async () => {
    const before = (await peersOf(a))?.forwarding.forwarded ?? 0;
    const err = await client()
      .messages.create({ ...conversation, max_tokens: 0 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Anthropic.BadRequestError);
    expect((err as InstanceType<typeof Anthropic.BadRequestError>).error).toMatchObject({
      type: "error",
      error: { type: "invalid_request_error", message: expect.stringContaining("max_tokens") },
    });
    const missing = await client()
      .messages.create({ ...conversation, model: "delta", max_tokens: 4 })
      .catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(Anthropic.NotFoundError);
    const anon = await client("wrong")
      .messages.create({ ...conversation, max_tokens: 4 })
      .catch((e: unknown) => e);
    expect(anon).toBeInstanceOf(Anthropic.AuthenticationError);
    expect(((await peersOf(a))?.forwarding.forwarded ?? 0) - before).toBe(0);
  }, 120_000);
});
