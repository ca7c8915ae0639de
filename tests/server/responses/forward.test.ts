// /v1/responses across two in-process nodes: A serves nothing, B serves the
// model on the fake engine. A checks and translates the request, expands
// previous_response_id from its own store, forwards the self-contained chat
// request to B's /v1/chat/completions, and answers (and stores) the response
// itself from B's chat stream.
import { afterEach, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import type { GenerateOptions } from "../../../src/engine";
import { FakeEngine, type FakeEngineOptions } from "../../../src/engine/fake";
import { silentLogger } from "../../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../../src/server";
import { ROUTE_HEADER } from "../../../src/server/mesh";
import { testMeshHooks, workerRecord } from "../../helpers/mesh";

const MODEL = "fake-model";
const TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
const FINAL = "It is sunny in Paris.";
const tools: OpenAI.Responses.FunctionTool[] = [
  { type: "function", name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } }, strict: false },
];
const agentReply = (prompt: string) => (prompt.includes("<tool_response>") ? FINAL : `Let me check.\n${TOOL_CALL}`);

const open: RunningServer[] = [];
afterEach(async () => {
  for (const s of open.splice(0)) await s.close();
});

/** Node A (no model) in front of node B (the fake engine), both in one mesh. */
function pair(engine: FakeEngineOptions = {}) {
  const fake = new FakeEngine({ reply: agentReply, ...engine });
  const prompts: GenerateOptions[] = [];
  const generate = fake.generate.bind(fake);
  fake.generate = (opts) => {
    prompts.push(opts);
    return generate(opts);
  };
  const hooksB = testMeshHooks({ nodeId: "bbbb" });
  const b = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [ServedModel.fromEngine(MODEL, fake)],
    apiKeys: ["kb"],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    mesh: hooksB,
  });
  const onB = workerRecord({ id: "w-b", nodeId: "bbbb", addr: `127.0.0.1:${b.port}`, models: [MODEL] });
  const hooksA = testMeshHooks({ nodeId: "aaaa", workers: () => [onB] });
  const a = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [],
    apiKeys: ["ka"],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    mesh: hooksA,
  });
  open.push(a, b);
  const client = (node = a, key = "ka") => new OpenAI({ baseURL: `${node.url}/v1`, apiKey: key, maxRetries: 0 });
  return { a, b, hooksA, client, prompts, engine: fake };
}

describe("OpenAI Responses across the mesh", () => {
  test("a_response_a_peer_runs_is_answered_and_stored_on_the_entry_node_and_chained_from_there", async () => {
    const { a, b, hooksA, client, prompts } = pair();
    const first = await client().responses.create({ model: MODEL, instructions: "Be terse.", input: "Weather in Paris?", tools });
    expect(first.id).toMatch(/^resp_/);
    expect(first.model).toBe(MODEL);
    const call = first.output.find((o) => o.type === "function_call") as OpenAI.Responses.ResponseFunctionToolCall;
    expect(call.name).toBe("get_weather");
    expect(first.output_text).toBe("Let me check.");
    expect(first.usage?.input_tokens).toBe(prompts[0]?.prompt.length as number);
    // Stored where the client asked, not on the peer that ran it.
    expect((await client().responses.retrieve(first.id)).id).toBe(first.id);
    expect(
      await client(b, "kb")
        .responses.retrieve(first.id)
        .catch((e: unknown) => e),
    ).toBeInstanceOf(OpenAI.NotFoundError);

    // The next turn names the stored response: A sends B the whole conversation, streamed.
    const events: string[] = [];
    const stream = client().responses.stream({
      model: MODEL,
      instructions: "Be terse.",
      tools,
      previous_response_id: first.id,
      input: [{ type: "function_call_output", call_id: call.call_id, output: "sunny" }],
    });
    stream.on("event", (e) => events.push(e.type));
    const second = await stream.finalResponse();
    expect(second.output_text).toBe(FINAL);
    expect(events[0]).toBe("response.created");
    expect(events.at(-1)).toBe("response.completed");
    const turn = (first.usage?.input_tokens ?? 0) + (first.usage?.output_tokens ?? 0);
    expect(second.usage?.input_tokens_details.cached_tokens).toBeGreaterThanOrEqual(turn);
    const prompt = prompts[1]?.prompt as string;
    expect(prompt).toContain("Weather in Paris?");
    expect(prompt).toContain("<tool_response>");
    expect(prompt).toContain("Be terse.");
    expect((await client().responses.retrieve(second.id)).output_text).toBe(FINAL);
    expect(hooksA.forwarder.stats().forwarded).toBe(2);

    // Where it ran is on the answer, streamed or not.
    const res = await fetch(`${a.url}/v1/responses`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, previous_response_id: second.id, input: "Thanks", stream: true }),
    });
    expect(res.headers.get(ROUTE_HEADER.servedBy)).toBe("bbbb");
    expect(await res.text()).toContain("event: response.completed");
    const plain = await fetch(`${a.url}/v1/responses`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, input: "Hi" }),
    });
    expect(plain.headers.get(ROUTE_HEADER.servedBy)).toBe("bbbb");
    expect(((await plain.json()) as { status: string }).status).toBe("completed");
  });

  test("a_peer_refusal_keeps_its_status_and_a_peer_failing_mid_stream_ends_it_with_an_error_event", async () => {
    const busy = pair({ maxInFlight: 0 });
    const refused = await busy
      .client()
      .responses.create({ model: MODEL, input: "Hi" })
      .catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(OpenAI.RateLimitError);

    const slow = pair({ reply: "a long reply that is cut short", tokenDelayMs: 5 });
    const res = await fetch(`${slow.a.url}/v1/responses`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, input: "Hi", stream: true }),
    });
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    let text = new TextDecoder().decode((await reader.read()).value);
    await slow.engine.close();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const events = text.split("\n\n").filter((e) => e.startsWith("event: "));
    expect(events[0]).toStartWith("event: response.created");
    const last = events.at(-1) as string;
    expect(last).toStartWith("event: error\n");
    expect(JSON.parse(last.slice(last.indexOf("data: ") + 6))).toMatchObject({ type: "error", code: "model_unavailable" });
    expect(text).not.toContain("response.completed");
  });
});
