// POST /v1/messages and /v1/messages/count_tokens over the fake engine, through
// app.handle() (the official Anthropic client's fetch is the app itself): the
// translation to and from the chat pipeline, the event stream, errors in
// Anthropic's shape, keys. The fake engine can be made to answer with a tool
// call, which the random-weight tiny model rarely does.
import { describe, expect, test } from "bun:test";
import Anthropic from "@anthropic-ai/sdk";
import type { GenerateOptions } from "../../../src/engine";
import { FakeEngine, type FakeEngineOptions } from "../../../src/engine/fake";
import { silentLogger } from "../../../src/log";
import { checkMessagesBody } from "../../../src/server/anthropic/messages";
import type { MessagesBodyT } from "../../../src/server/anthropic/schema";
import { createApp } from "../../../src/server/app";
import type { MeshHooks } from "../../../src/server/mesh";
import { Metrics } from "../../../src/server/metrics";
import { ServedModel } from "../../../src/server/model";
import { testMeshHooks, workerRecord } from "../../helpers/mesh";

const MODEL = "fake-model";
const TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
const FINAL = "It is sunny in Paris.";
const tools = [
  {
    name: "get_weather",
    description: "Current weather of a city",
    input_schema: { type: "object" as const, properties: { city: { type: "string" } }, required: ["city"] },
  },
];

/** Calls the weather tool until the prompt holds its result, then answers. */
const agentReply = (prompt: string) => (prompt.includes("<tool_response>") ? FINAL : `Let me check.\n${TOOL_CALL}`);

function fakeApp(o: { engine?: FakeEngineOptions; apiKeys?: string[]; mesh?: MeshHooks } = {}) {
  const engine = new FakeEngine({ reply: agentReply, ...o.engine });
  const model = ServedModel.fromEngine(MODEL, engine);
  const metrics = new Metrics();
  const app = createApp({ models: [model], apiKeys: o.apiKeys ?? [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics, mesh: o.mesh });
  const handle = (input: string | URL | Request, init?: RequestInit) =>
    app.handle(input instanceof Request ? new Request(input, init) : new Request(String(input), init));
  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    handle(`http://localhost${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  const client = (apiKey = o.apiKeys?.[0] ?? "unused") =>
    new Anthropic({ apiKey, baseURL: "http://localhost", maxRetries: 0, fetch: handle as unknown as typeof fetch });
  return { app, engine, metrics, post, client };
}

/** The events of an Anthropic SSE body: each event's name, and its data (whose type must be the same name). */
function sseEvents(text: string): Array<{ event: string; data: Record<string, unknown> }> {
  return text
    .split("\n\n")
    .filter((e) => e.trim() !== "")
    .map((e) => {
      const event = /^event: (.*)$/m.exec(e)?.[1] ?? "";
      const data = JSON.parse(/^data: (.*)$/m.exec(e)?.[1] ?? "null") as Record<string, unknown>;
      expect(data.type).toBe(event);
      return { event, data };
    });
}

type AnthropicError = { type: string; error: { type: string; message: string } };

describe("Anthropic Messages over the fake engine", () => {
  test("a_tool_loop_through_the_sdk_returns_tool_use_then_answers_the_tool_result_from_cache", async () => {
    const { client } = fakeApp();
    const messages: Anthropic.MessageParam[] = [{ role: "user", content: "What is the weather in Paris?" }];
    const first = await client().messages.create({ model: MODEL, max_tokens: 256, system: "You are terse.", tools, messages });
    expect(first.type).toBe("message");
    expect(first.role).toBe("assistant");
    expect(first.id).toMatch(/^msg_/);
    expect(first.stop_reason).toBe("tool_use");
    expect(first.stop_sequence).toBeNull();
    expect(first.content[0] as unknown).toEqual({ type: "text", text: "Let me check." });
    const call = first.content[1] as Anthropic.ToolUseBlock;
    expect(call).toMatchObject({ type: "tool_use", name: "get_weather", input: { city: "Paris" } });
    expect(call.id.length).toBeGreaterThan(8);
    expect(first.usage.cache_read_input_tokens).toBe(0);
    expect(first.usage.input_tokens).toBeGreaterThan(10);

    messages.push({ role: "assistant", content: first.content });
    messages.push({ role: "user", content: [{ type: "tool_result", tool_use_id: call.id, content: "sunny, 24 C" }] });
    const second = await client().messages.create({ model: MODEL, max_tokens: 256, system: "You are terse.", tools, messages });
    expect(second.stop_reason).toBe("end_turn");
    expect(second.content as unknown).toEqual([{ type: "text", text: FINAL }]);
    // The whole first turn, its tool call included, is read from cache; only the tool result is new.
    const firstTurn = first.usage.input_tokens + first.usage.output_tokens;
    expect(second.usage.cache_read_input_tokens).toBeGreaterThanOrEqual(firstTurn);
    expect(second.usage.cache_creation_input_tokens).toBe(0);
    expect(second.usage.input_tokens).toBeGreaterThan(0);
  });

  test("streams_anthropic_events_in_order_for_a_tool_use_turn", async () => {
    const { post, client } = fakeApp();
    const body = { model: MODEL, max_tokens: 256, tools, messages: [{ role: "user", content: "Weather?" }] };
    const res = await post("/v1/messages", { ...body, stream: true });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/event-stream");
    const events = sseEvents(await res.text());
    const names = events.map((e) => e.event);
    const deltas = names.filter((n) => n === "content_block_delta").length;
    expect(names).toEqual([
      "message_start",
      "ping",
      "content_block_start",
      ...names.slice(3, 3 + deltas - 1).map(() => "content_block_delta"),
      "content_block_stop",
      "content_block_start",
      "content_block_delta",
      "content_block_stop",
      "message_delta",
      "message_stop",
    ]);
    const start = events[0]?.data.message as Anthropic.Message;
    expect(start).toMatchObject({ type: "message", role: "assistant", model: MODEL, content: [], stop_reason: null });
    expect(start.usage.input_tokens).toBeGreaterThan(10);
    const blocks = events.filter((e) => e.event === "content_block_start").map((e) => e.data);
    expect(blocks[0]).toEqual({ type: "content_block_start", index: 0, content_block: { type: "text", text: "" } });
    expect(blocks[1]).toMatchObject({ index: 1, content_block: { type: "tool_use", name: "get_weather", input: {} } });
    const json = events.find((e) => (e.data.delta as { type?: string } | undefined)?.type === "input_json_delta")?.data.delta;
    expect(JSON.parse((json as { partial_json: string }).partial_json)).toEqual({ city: "Paris" });
    const text = events
      .filter((e) => (e.data.delta as { type?: string } | undefined)?.type === "text_delta")
      .map((e) => (e.data.delta as { text: string }).text)
      .join("");
    expect(text).toBe("Let me check.");
    const end = events.find((e) => e.event === "message_delta")?.data as { delta: object; usage: Anthropic.MessageDeltaUsage };
    expect(end.delta).toEqual({ stop_reason: "tool_use", stop_sequence: null });
    expect(end.usage.output_tokens).toBe(Buffer.byteLength(`Let me check.\n${TOOL_CALL}`));

    // The SDK's stream helper assembles the same message as the non-streamed call.
    const whole = await client().messages.create(body as Anthropic.MessageCreateParamsNonStreaming);
    const streamed = await client()
      .messages.stream(body as Anthropic.MessageCreateParamsNonStreaming)
      .finalMessage();
    const strip = (m: Anthropic.Message) => m.content.map((b) => (b.type === "tool_use" ? { ...b, id: "" } : b));
    expect(strip(streamed)).toEqual(strip(whole));
    expect(streamed.stop_reason).toBe("tool_use");
    expect(streamed.usage.output_tokens).toBe(whole.usage.output_tokens);
  });

  test("stop_reasons_end_turn_max_tokens_and_stop_sequence_with_the_string", async () => {
    const { client, post } = fakeApp({ engine: { reply: "Hello from the fake engine." } });
    const ask = (o: Partial<Anthropic.MessageCreateParamsNonStreaming> = {}) =>
      client().messages.create({ model: MODEL, max_tokens: 100, messages: [{ role: "user", content: "Hi" }], ...o });
    const plain = await ask();
    expect(plain.stop_reason).toBe("end_turn");
    expect(plain.content as unknown).toEqual([{ type: "text", text: "Hello from the fake engine." }]);
    const cut = await ask({ max_tokens: 5 });
    expect(cut.stop_reason).toBe("max_tokens");
    expect(cut.usage.output_tokens).toBe(5);
    const stopped = await ask({ stop_sequences: ["zzz", "fake"] });
    expect(stopped.stop_reason).toBe("stop_sequence");
    expect(stopped.stop_sequence).toBe("fake");
    expect(stopped.content as unknown).toEqual([{ type: "text", text: "Hello from the " }]);
    const res = await post("/v1/messages", {
      model: MODEL,
      max_tokens: 100,
      stop_sequences: ["fake"],
      stream: true,
      messages: [{ role: "user", content: "Hi" }],
    });
    const delta = sseEvents(await res.text()).find((e) => e.event === "message_delta")?.data.delta;
    expect(delta).toEqual({ stop_reason: "stop_sequence", stop_sequence: "fake" });
  });

  test("bad_requests_are_anthropic_400s_naming_the_field_before_routing_and_change_nothing", async () => {
    const mesh = testMeshHooks({ nodeId: "a".repeat(32), workers: () => [workerRecord({ id: "w", nodeId: "a".repeat(32), addr: "x:1" })] });
    const { post, engine, app } = fakeApp({ mesh });
    const user = { role: "user", content: "Hi" };
    const ok = { model: MODEL, max_tokens: 16, messages: [user] };
    const useBlock = { type: "tool_use", id: "t1", name: "get_weather", input: { city: "Paris" } };
    const cases: Array<[string, unknown, string]> = [
      ["missing max_tokens", { model: MODEL, messages: [user] }, "max_tokens"],
      ["max_tokens 0", { ...ok, max_tokens: 0 }, "max_tokens"],
      ["a system role in messages", { ...ok, messages: [{ role: "system", content: "x" }] }, "messages.0.role"],
      ["no messages", { ...ok, messages: [] }, "messages"],
      ["an image block", { ...ok, messages: [{ role: "user", content: [{ type: "image", source: {} }] }] }, "messages.0.content.0.type"],
      ["a text block without text", { ...ok, messages: [{ role: "user", content: [{ type: "text" }] }] }, "messages.0.content.0.text"],
      [
        "a tool_result from the assistant",
        { ...ok, messages: [user, { role: "assistant", content: [{ type: "tool_result", tool_use_id: "t1" }] }] },
        "messages.1.content.0.type",
      ],
      [
        "a tool_use whose input is not an object",
        { ...ok, messages: [user, { role: "assistant", content: [{ ...useBlock, input: "Paris" }] }] },
        "messages.1.content.0.input",
      ],
      [
        "a tool_result without its tool_use_id",
        { ...ok, messages: [user, { role: "assistant", content: [useBlock] }, { role: "user", content: [{ type: "tool_result" }] }] },
        "messages.2.content.0.tool_use_id",
      ],
      ["a tool without input_schema", { ...ok, tools: [{ name: "f" }] }, "tools.0.input_schema"],
      ["a server tool", { ...ok, tools: [{ type: "web_search_20250305", name: "web_search" }] }, "tools.0.type"],
      ["tool_choice tool without a name", { ...ok, tools, tool_choice: { type: "tool" } }, "tool_choice.name"],
      ["tool_choice of an unknown type", { ...ok, tools, tool_choice: { type: "sometimes" } }, "tool_choice.type"],
      ["temperature above 1", { ...ok, temperature: 1.5 }, "temperature"],
      ["system of the wrong shape", { ...ok, system: 42 }, "system"],
      ["system blocks that are not text", { ...ok, system: [{ type: "image" }] }, "system.0.type"],
    ];
    for (const [what, body, field] of cases) {
      const res = await post("/v1/messages", body);
      expect({ what, status: res.status }).toEqual({ what, status: 400 });
      const e = (await res.json()) as AnthropicError;
      expect({ what, type: e.type, errorType: e.error.type }).toEqual({ what, type: "error", errorType: "invalid_request_error" });
      expect({ what, message: e.error.message }).toEqual({ what, message: expect.stringContaining(field) });
    }
    const count = await post("/v1/messages/count_tokens", { model: MODEL, messages: [{ role: "robot", content: "x" }] });
    expect(count.status).toBe(400);
    expect(((await count.json()) as AnthropicError).error.message).toContain("messages.0.role");
    const notJson = await post("/v1/messages", "{nope");
    expect(notJson.status).toBe(400);
    expect(((await notJson.json()) as AnthropicError).error.type).toBe("invalid_request_error");
    // Nothing was routed, leased or run.
    expect(mesh.router.stats().byReason).toEqual({ cache: 0, load: 0, only: 0, local: 0 });
    expect((await engine.stats()).admitted).toBe(0);
    // Counted after each response went out.
    const counted = `mesh_http_requests_total{route="/v1/messages",status="400"} ${cases.length + 1}`;
    let metrics = "";
    for (let i = 0; i < 100 && !metrics.includes(counted); i++) {
      await Bun.sleep(10);
      metrics = await (await app.handle(new Request("http://localhost/metrics"))).text();
    }
    expect(metrics).toContain(counted);
    expect(metrics).toContain('mesh_http_requests_total{route="/v1/messages/count_tokens",status="400"} 1');
  });

  test("an_unknown_model_is_an_anthropic_404_and_unknown_routes_below_messages_too", async () => {
    const { client, app } = fakeApp();
    const err = await client()
      .messages.create({ model: "no-such-model", max_tokens: 4, messages: [{ role: "user", content: "Hi" }] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Anthropic.NotFoundError);
    expect((err as InstanceType<typeof Anthropic.NotFoundError>).error).toMatchObject({
      type: "error",
      error: { type: "not_found_error", message: expect.stringContaining("no-such-model") },
    });
    const r = await app.handle(new Request("http://localhost/v1/messages/batches", { method: "POST", body: "{}" }));
    expect(r.status).toBe(404);
    expect(((await r.json()) as AnthropicError).error.type).toBe("not_found_error");
  });

  test("x_api_key_is_accepted_as_well_as_bearer_and_a_wrong_key_is_an_anthropic_401", async () => {
    const { client, post, app } = fakeApp({ apiKeys: ["k-one", "k-two"] });
    const params = { model: MODEL, max_tokens: 4, messages: [{ role: "user" as const, content: "Hi" }] };
    expect((await client("k-two").messages.create(params)).usage.output_tokens).toBe(4);
    const err = await client("wrong")
      .messages.create(params)
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Anthropic.AuthenticationError);
    expect((err as InstanceType<typeof Anthropic.AuthenticationError>).error).toMatchObject({
      type: "error",
      error: { type: "authentication_error" },
    });
    expect((await post("/v1/messages", params)).status).toBe(401);
    expect((await post("/v1/messages", params, { authorization: "Bearer k-one" })).status).toBe(200);
    // Wherever a key is checked, either header does.
    const chat = { model: MODEL, max_tokens: 2, messages: [{ role: "user", content: "Hi" }] };
    expect((await post("/v1/chat/completions", chat, { "x-api-key": "k-one" })).status).toBe(200);
    const openaiShape = (await (await post("/v1/chat/completions", chat, { "x-api-key": "nope" })).json()) as { error: { code: string } };
    expect(openaiShape.error.code).toBe("invalid_api_key");
    expect((await app.handle(new Request("http://localhost/v1/models", { headers: { "x-api-key": "k-two" } }))).status).toBe(200);
  });

  test("count_tokens_is_the_input_a_message_of_the_same_conversation_reports", async () => {
    const { client } = fakeApp({ engine: { reply: "ok" } });
    const params = {
      model: MODEL,
      system: [{ type: "text" as const, text: "You are terse." }],
      tools,
      messages: [
        { role: "user" as const, content: "Weather?" },
        { role: "assistant" as const, content: [{ type: "tool_use" as const, id: "t1", name: "get_weather", input: { city: "Oslo" } }] },
        {
          role: "user" as const,
          content: [{ type: "tool_result" as const, tool_use_id: "t1", content: [{ type: "text" as const, text: "rain" }] }],
        },
      ],
    };
    const counted = await client().messages.countTokens(params);
    const ran = await client().messages.create({ ...params, max_tokens: 2 });
    expect(counted.input_tokens).toBe(ran.usage.input_tokens + (ran.usage.cache_read_input_tokens ?? 0));
    // Without the tools the prompt is shorter: they are rendered.
    const bare = await client().messages.countTokens({ ...params, tools: undefined });
    expect(bare.input_tokens).toBeLessThan(counted.input_tokens);
  });

  test("overload_is_429_rate_limit_error_with_retry_after_and_a_closed_model_is_503_overloaded_error", async () => {
    const busy = fakeApp({ engine: { maxInFlight: 0 } });
    const params = { model: MODEL, max_tokens: 4, messages: [{ role: "user", content: "Hi" }] };
    const r = await busy.post("/v1/messages", params);
    expect(r.status).toBe(429);
    expect(r.headers.get("retry-after")).not.toBeNull();
    expect(((await r.json()) as AnthropicError).error.type).toBe("rate_limit_error");
    const closed = fakeApp();
    await closed.engine.close();
    const c = await closed.post("/v1/messages", params);
    expect(c.status).toBe(503);
    expect(((await c.json()) as AnthropicError).error.type).toBe("overloaded_error");
  });

  test("an_error_mid_stream_ends_the_stream_with_an_error_event_and_no_message_stop", async () => {
    const { post, engine } = fakeApp({ engine: { reply: "a long reply that is cut short", tokenDelayMs: 5 } });
    const res = await post("/v1/messages", { model: MODEL, max_tokens: 100, stream: true, messages: [{ role: "user", content: "Hi" }] });
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    let text = new TextDecoder().decode((await reader.read()).value);
    await engine.close();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const events = sseEvents(text);
    expect(events[0]?.event).toBe("message_start");
    expect(events.at(-1)).toMatchObject({ event: "error", data: { type: "error", error: { type: "overloaded_error" } } });
    expect(events.some((e) => e.event === "message_stop")).toBe(false);
  });
});

describe("the equivalent chat request", () => {
  const anthropic = {
    model: MODEL,
    max_tokens: 32,
    system: [
      { type: "text", text: "You are terse. " },
      { type: "text", text: "Use tools." },
    ],
    tools,
    tool_choice: { type: "any" },
    stop_sequences: ["END"],
    temperature: 0,
    top_k: 5,
    metadata: { user_id: "u1" },
    messages: [
      { role: "user", content: "Weather in Paris and Oslo?" },
      {
        role: "assistant",
        content: [
          { type: "text", text: "Checking." },
          { type: "tool_use", id: "t1", name: "get_weather", input: { city: "Paris" } },
          { type: "tool_use", id: "t2", name: "get_weather", input: { city: "Oslo" } },
        ],
      },
      {
        role: "user",
        content: [
          { type: "tool_result", tool_use_id: "t1", content: "sunny" },
          { type: "tool_result", tool_use_id: "t2", content: [{ type: "text", text: "rain" }], is_error: false },
          { type: "text", text: "And tomorrow?", cache_control: { type: "ephemeral" } },
        ],
      },
    ],
  };
  const chat = {
    model: MODEL,
    max_tokens: 32,
    stop: ["END"],
    temperature: 0,
    top_k: 5,
    tool_choice: "required",
    tools: tools.map((t) => ({ type: "function", function: { name: t.name, description: t.description, parameters: t.input_schema } })),
    messages: [
      {
        role: "system",
        content: [
          { type: "text", text: "You are terse. " },
          { type: "text", text: "Use tools." },
        ],
      },
      { role: "user", content: "Weather in Paris and Oslo?" },
      {
        role: "assistant",
        content: "Checking.",
        tool_calls: [
          { id: "t1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } },
          { id: "t2", type: "function", function: { name: "get_weather", arguments: '{"city":"Oslo"}' } },
        ],
      },
      { role: "tool", tool_call_id: "t1", content: "sunny" },
      { role: "tool", tool_call_id: "t2", content: [{ type: "text", text: "rain" }] },
      { role: "user", content: [{ type: "text", text: "And tomorrow?" }] },
    ],
  };

  test("a_messages_body_translates_to_system_tool_calls_tool_messages_and_function_tools", () => {
    expect(checkMessagesBody(anthropic as unknown as MessagesBodyT)).toEqual(chat as unknown as ReturnType<typeof checkMessagesBody>);
    expect(
      checkMessagesBody({ ...anthropic, tool_choice: { type: "tool", name: "get_weather" } } as unknown as MessagesBodyT).tool_choice,
    ).toEqual({ type: "function", function: { name: "get_weather" } });
    expect(checkMessagesBody({ ...anthropic, tool_choice: { type: "none" } } as unknown as MessagesBodyT).tool_choice).toBe("none");
  });

  test("a_messages_request_renders_the_same_prompt_and_routing_marks_as_the_equivalent_chat_request", async () => {
    const self = "a".repeat(32);
    const mesh = testMeshHooks({ nodeId: self, workers: () => [workerRecord({ id: "w", nodeId: self, addr: "x:1", models: [MODEL] })] });
    const { post, engine } = fakeApp({ mesh, engine: { reply: "ok" } });
    const seen: GenerateOptions[] = [];
    const generate = engine.generate.bind(engine);
    engine.generate = (opts) => {
      seen.push(opts);
      return generate(opts);
    };
    expect((await post("/v1/messages", anthropic)).status).toBe(200);
    expect((await post("/v1/chat/completions", chat)).status).toBe(200);
    const [viaMessages, viaChat] = seen;
    expect(viaMessages?.prompt).toBe(viaChat?.prompt as string);
    // The marks carry the routing key's path hashes: the conversation keys alike on both routes.
    expect(viaMessages?.marks?.length).toBeGreaterThan(3);
    expect(viaMessages?.marks).toEqual(viaChat?.marks as NonNullable<GenerateOptions["marks"]>);
    expect(viaMessages?.stop).toEqual(["END"]);
    expect(viaMessages?.maxTokens).toBe(32);
    expect(viaMessages?.sampling).toEqual({ temperature: 0, topK: 5 });
  });
});
