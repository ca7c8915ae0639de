// POST /v1/responses and GET / DELETE /v1/responses/{id} over the fake engine,
// through app.handle() (the official OpenAI client's fetch is the app itself):
// the translation to and from the chat pipeline, the typed event stream,
// previous_response_id and its bounded store, errors naming the field. The fake
// engine can be made to answer with a tool call, which the random-weight tiny
// model rarely does.
import { describe, expect, test } from "bun:test";
import OpenAI from "openai";
import type { GenerateOptions } from "../../../src/engine";
import { FakeEngine, type FakeEngineOptions } from "../../../src/engine/fake";
import { silentLogger } from "../../../src/log";
import { createApp } from "../../../src/server/app";
import type { MeshHooks } from "../../../src/server/mesh";
import { Metrics } from "../../../src/server/metrics";
import { ServedModel } from "../../../src/server/model";
import type { ResponsesBodyT } from "../../../src/server/responses/schema";
import { ResponseStore } from "../../../src/server/responses/store";
import { checkResponsesBody } from "../../../src/server/responses/translate";
import { testMeshHooks, workerRecord } from "../../helpers/mesh";

const MODEL = "fake-model";
const TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
const FINAL = "It is sunny in Paris.";
const tools: OpenAI.Responses.FunctionTool[] = [
  {
    type: "function",
    name: "get_weather",
    description: "Current weather of a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    strict: false,
  },
];

/** Calls the weather tool until the prompt holds its result, then answers. */
const agentReply = (prompt: string) => (prompt.includes("<tool_response>") ? FINAL : `Let me check.\n${TOOL_CALL}`);

function fakeApp(o: { engine?: FakeEngineOptions; apiKeys?: string[]; mesh?: MeshHooks; store?: ResponseStore; aliases?: string[] } = {}) {
  const engine = new FakeEngine({ reply: agentReply, ...o.engine });
  const model = ServedModel.fromEngine(MODEL, engine, o.aliases ?? []);
  const store = o.store ?? new ResponseStore(64 << 20);
  const app = createApp({
    models: [model],
    apiKeys: o.apiKeys ?? [],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh: o.mesh,
    responseStore: store,
  });
  const handle = (input: string | URL | Request, init?: RequestInit) =>
    app.handle(input instanceof Request ? new Request(input, init) : new Request(String(input), init));
  const post = (path: string, body: unknown) =>
    handle(`http://localhost${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  const client = new OpenAI({
    apiKey: o.apiKeys?.[0] ?? "unused",
    baseURL: "http://localhost/v1",
    maxRetries: 0,
    fetch: handle as typeof fetch,
  });
  // The prompts the engine was asked to run, in order.
  const prompts: GenerateOptions[] = [];
  const generate = engine.generate.bind(engine);
  engine.generate = (opts) => {
    prompts.push(opts);
    return generate(opts);
  };
  return { app, engine, store, post, handle, client, prompts };
}

/** The events of a Responses SSE body: each event's name and its data (whose type must be the same name). */
function sseEvents(text: string): Array<{ event: string; data: Record<string, unknown> }> {
  return text
    .split("\n\n")
    .filter((e) => e.trim() !== "" && !e.startsWith(":"))
    .map((e) => {
      const event = /^event: (.*)$/m.exec(e)?.[1] ?? "";
      const data = JSON.parse(/^data: (.*)$/m.exec(e)?.[1] ?? "null") as Record<string, unknown>;
      expect(data.type).toBe(event);
      return { event, data };
    });
}

type OpenAiError = { error: { message: string; type: string; param: string | null; code: string | null } };
const callOf = (r: OpenAI.Responses.Response) =>
  r.output.find((o) => o.type === "function_call") as OpenAI.Responses.ResponseFunctionToolCall;
/** Output items without their (random) ids and the fields the SDK's stream helper adds (parsed, parsed_arguments). */
const comparable = (r: OpenAI.Responses.Response) =>
  JSON.parse(
    JSON.stringify(r.output, (k, v) => (k === "id" || k === "call_id" ? "" : k === "parsed" || k === "parsed_arguments" ? undefined : v)),
  ) as unknown;

describe("OpenAI Responses over the fake engine", () => {
  test("a_tool_loop_through_the_sdk_returns_a_function_call_then_answers_its_output_from_cache", async () => {
    const { client } = fakeApp();
    const first = await client.responses.create({
      model: MODEL,
      instructions: "You are terse.",
      input: "What is the weather in Paris?",
      tools,
    });
    expect(first.object).toBe("response");
    expect(first.id).toMatch(/^resp_/);
    expect(first.status).toBe("completed");
    expect(first.incomplete_details).toBeNull();
    expect(first.model).toBe(MODEL);
    expect(first.instructions).toBe("You are terse.");
    expect(first.output_text).toBe("Let me check.");
    expect(first.output[0]).toMatchObject({
      type: "message",
      role: "assistant",
      status: "completed",
      content: [{ type: "output_text", text: "Let me check.", annotations: [] }],
    });
    expect((first.output[0] as { id: string }).id).toMatch(/^msg_/);
    const call = callOf(first);
    expect(call).toMatchObject({ type: "function_call", status: "completed", name: "get_weather" });
    expect(JSON.parse(call.arguments)).toEqual({ city: "Paris" });
    expect(call.id).toMatch(/^fc_/);
    expect(call.call_id.length).toBeGreaterThan(8);
    expect(first.usage?.input_tokens_details.cached_tokens).toBe(0);
    expect(first.usage?.total_tokens).toBe((first.usage?.input_tokens ?? 0) + (first.usage?.output_tokens ?? 0));

    // The client sends the output back with the call's result, as a whole conversation.
    const second = await client.responses.create({
      model: MODEL,
      instructions: "You are terse.",
      tools,
      input: [
        { role: "user", content: "What is the weather in Paris?" },
        ...(first.output as OpenAI.Responses.ResponseInputItem[]),
        { type: "function_call_output", call_id: call.call_id, output: "sunny, 24 C" },
      ],
    });
    expect(second.output_text).toBe(FINAL);
    expect(second.output.map((o) => o.type)).toEqual(["message"]);
    // The whole first turn, its tool call included, is read from cache; only the tool result is new.
    const firstTurn = (first.usage?.input_tokens ?? 0) + (first.usage?.output_tokens ?? 0);
    expect(second.usage?.input_tokens_details.cached_tokens).toBeGreaterThanOrEqual(firstTurn);
    expect(second.usage?.input_tokens).toBeGreaterThan(second.usage?.input_tokens_details.cached_tokens ?? 0);

    // The same loop, chained by previous_response_id: only the output travels.
    const chained = await client.responses.create({
      model: MODEL,
      instructions: "You are terse.",
      tools,
      previous_response_id: first.id,
      input: [{ type: "function_call_output", call_id: call.call_id, output: "sunny, 24 C" }],
    });
    expect(chained.output_text).toBe(FINAL);
    expect(chained.previous_response_id).toBe(first.id);
    expect(chained.usage?.input_tokens).toBe(second.usage?.input_tokens as number);
    expect(chained.usage?.input_tokens_details.cached_tokens).toBeGreaterThanOrEqual(firstTurn);
  });

  test("streams_typed_events_in_order_with_consecutive_sequence_numbers_for_a_function_call_turn", async () => {
    const { post, client } = fakeApp();
    const body = { model: MODEL, input: "Weather?", tools };
    const res = await post("/v1/responses", { ...body, stream: true });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/event-stream");
    const events = sseEvents(await res.text());
    const names = events.map((e) => e.event);
    const deltas = names.filter((n) => n === "response.output_text.delta").length;
    expect(deltas).toBeGreaterThan(1);
    expect(names).toEqual([
      "response.created",
      "response.in_progress",
      "response.output_item.added",
      "response.content_part.added",
      ...Array.from({ length: deltas }, () => "response.output_text.delta"),
      "response.output_text.done",
      "response.content_part.done",
      "response.output_item.done",
      "response.output_item.added",
      "response.function_call_arguments.delta",
      "response.function_call_arguments.done",
      "response.output_item.done",
      "response.completed",
    ]);
    expect(events.map((e) => e.data.sequence_number)).toEqual(events.map((_, i) => i));
    const created = events[0]?.data.response as OpenAI.Responses.Response;
    expect(created).toMatchObject({ object: "response", status: "in_progress", output: [], model: MODEL });
    const text = events.filter((e) => e.event === "response.output_text.delta").map((e) => e.data.delta as string);
    expect(text.join("")).toBe("Let me check.");
    expect(events.find((e) => e.event === "response.output_text.done")?.data.text).toBe("Let me check.");
    const args = events.find((e) => e.event === "response.function_call_arguments.done")?.data;
    expect(JSON.parse(args?.arguments as string)).toEqual({ city: "Paris" });
    expect(args?.output_index).toBe(1);
    const done = events.at(-1)?.data.response as OpenAI.Responses.Response;
    expect(done.status).toBe("completed");
    expect(done.output.map((o) => o.type)).toEqual(["message", "function_call"]);
    expect(done.id).toBe(created.id);

    // The SDK's stream helper assembles the same response as the non-streamed call.
    const whole = await client.responses.create(body);
    const seen: string[] = [];
    const stream = client.responses.stream(body);
    stream.on("event", (e) => seen.push(e.type));
    const streamed = await stream.finalResponse();
    expect(seen).toEqual(names);
    expect(streamed.output_text).toBe(whole.output_text);
    expect(comparable(streamed)).toEqual(comparable(whole));
    expect(streamed.usage?.output_tokens).toBe(whole.usage?.output_tokens as number);
    // create({stream: true}) yields the same typed events.
    const raw = await client.responses.create({ ...body, stream: true });
    const types: string[] = [];
    for await (const e of raw) types.push(e.type);
    expect(types).toEqual(names);
  });

  test("max_output_tokens_cuts_the_reply_as_an_incomplete_response_streamed_and_not", async () => {
    const { client, post } = fakeApp({ engine: { reply: "Hello from the fake engine." } });
    const r = await client.responses.create({ model: MODEL, input: "Hi", max_output_tokens: 5 });
    expect(r.status).toBe("incomplete");
    expect(r.incomplete_details).toEqual({ reason: "max_output_tokens" });
    expect(r.output[0]).toMatchObject({ type: "message", status: "incomplete" });
    expect(r.output_text).toBe("Hello");
    expect(r.usage?.output_tokens).toBe(5);
    expect(r.max_output_tokens).toBe(5);
    const events = sseEvents(await (await post("/v1/responses", { model: MODEL, input: "Hi", max_output_tokens: 5, stream: true })).text());
    expect(events.at(-1)?.event).toBe("response.incomplete");
    expect(events.at(-1)?.data.response).toMatchObject({ status: "incomplete", incomplete_details: { reason: "max_output_tokens" } });
    // A full answer is complete.
    expect((await client.responses.create({ model: MODEL, input: "Hi" })).status).toBe("completed");
  });

  test("previous_response_id_runs_the_same_prompt_as_sending_the_whole_conversation_and_drops_old_instructions", async () => {
    const { client, prompts } = fakeApp({ engine: { reply: "ok" } });
    const first = await client.responses.create({ model: MODEL, instructions: "Be brief.", input: "One" });
    const chained = await client.responses.create({
      model: MODEL,
      instructions: "Be brief.",
      previous_response_id: first.id,
      input: "Two",
    });
    const whole = await client.responses.create({
      model: MODEL,
      instructions: "Be brief.",
      input: [
        { role: "user", content: "One" },
        ...(first.output as OpenAI.Responses.ResponseInputItem[]),
        { role: "user", content: "Two" },
      ],
    });
    expect(prompts[1]?.prompt).toBe(prompts[2]?.prompt as string);
    expect(chained.usage?.input_tokens).toBe(whole.usage?.input_tokens as number);
    // Instructions are not carried over: a request without them runs without them.
    await client.responses.create({ model: MODEL, previous_response_id: first.id, input: "Two" });
    expect(prompts[3]?.prompt).not.toContain("Be brief.");
    expect(prompts[3]?.prompt).toContain("One");
    // A chain of three holds all three turns.
    await client.responses.create({ model: MODEL, previous_response_id: chained.id, input: "Three" });
    const third = (prompts[4]?.prompt ?? "") as string;
    expect(third.indexOf("One")).toBeLessThan(third.indexOf("Two"));
    expect(third.indexOf("Two")).toBeLessThan(third.indexOf("Three"));
  });

  test("a_stored_response_can_be_retrieved_and_deleted_and_store_false_keeps_nothing", async () => {
    const { client, store, handle } = fakeApp({ engine: { reply: "ok" } });
    const kept = await client.responses.create({ model: MODEL, input: "Keep me", metadata: { run: "7" } });
    // The SDK's types leave `store` out of the response object; OpenAI's API and this one send it.
    expect((kept as unknown as { store: boolean }).store).toBe(true);
    expect(kept.metadata).toEqual({ run: "7" });
    const got = await client.responses.retrieve(kept.id);
    expect(got.id).toBe(kept.id);
    expect(got.output_text).toBe("ok");
    expect(got.usage).toEqual(kept.usage);

    const unstored = await client.responses.create({ model: MODEL, input: "Forget me", store: false });
    expect((unstored as unknown as { store: boolean }).store).toBe(false);
    expect(store.size).toBe(1);
    const missing = await client.responses
      .create({ model: MODEL, input: "More", previous_response_id: unstored.id })
      .catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(OpenAI.NotFoundError);
    expect((missing as InstanceType<typeof OpenAI.NotFoundError>).error).toMatchObject({
      param: "previous_response_id",
      code: "previous_response_not_found",
      type: "invalid_request_error",
    });
    const streamedUnstored = await client.responses.stream({ model: MODEL, input: "Forget me too", store: false }).finalResponse();
    expect(streamedUnstored.output_text).toBe("ok");
    expect(store.size).toBe(1);

    await client.responses.delete(kept.id);
    expect(store.size).toBe(0);
    expect(await client.responses.retrieve(kept.id).catch((e: unknown) => e)).toBeInstanceOf(OpenAI.NotFoundError);
    const again = await handle("http://localhost/v1/responses/nope", { method: "DELETE" });
    expect(again.status).toBe(404);
    expect(((await again.json()) as OpenAiError).error.type).toBe("invalid_request_error");
    // Every id counts under one route label, not one per id.
    const counted = 'mesh_http_requests_total{route="/v1/responses/{id}",status="404"} 2';
    let metrics = "";
    for (let i = 0; i < 100 && !metrics.includes(counted); i++) {
      await Bun.sleep(10);
      metrics = await (await handle("http://localhost/metrics")).text();
    }
    expect(metrics).toContain(counted);
    expect(metrics).not.toContain(kept.id);
  });

  test("the_store_keeps_the_most_recently_used_responses_within_its_byte_bound", async () => {
    // Room for about three of these responses: each counts its conversation and its response object.
    const engine = { reply: "ok", info: { nCtx: 1 << 16 } };
    const probe = fakeApp({ engine });
    await probe.client.responses.create({ model: MODEL, input: "x".repeat(2000) });
    const one = probe.store.bytes;
    expect(one).toBeGreaterThan(2000);
    const store = new ResponseStore(Math.floor(one * 3.5));
    const { client } = fakeApp({ engine, store });
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push((await client.responses.create({ model: MODEL, input: `${i}`.repeat(2000) })).id);
    expect(store.size).toBe(3);
    // Using the oldest makes it the most recent: the next one pushes out the second instead.
    await client.responses.retrieve(ids[0] as string);
    ids.push((await client.responses.create({ model: MODEL, input: "3".repeat(2000) })).id);
    expect(store.size).toBe(3);
    expect(store.bytes).toBeLessThanOrEqual(store.maxBytes);
    const gone = await client.responses.retrieve(ids[1] as string).catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(OpenAI.NotFoundError);
    for (const id of [ids[0], ids[2], ids[3]]) expect((await client.responses.retrieve(id as string)).id).toBe(id as string);
    // A chain grows its conversation with each turn; entries still fit the bound, the oldest going first.
    let last = ids[3] as string;
    for (let i = 0; i < 6; i++) {
      const next = await client.responses.create({ model: MODEL, previous_response_id: last, input: "y".repeat(300) });
      last = next.id;
      expect(store.bytes).toBeLessThanOrEqual(store.maxBytes);
    }
    expect((await client.responses.retrieve(last)).id).toBe(last);
    // A response larger than the whole bound is answered but not kept.
    const big = await client.responses.create({ model: MODEL, input: "z".repeat(one * 4) });
    expect(big.output_text).toBe("ok");
    expect(await client.responses.retrieve(big.id).catch((e: unknown) => e)).toBeInstanceOf(OpenAI.NotFoundError);
  });

  test("bad_requests_are_400s_naming_the_field_before_routing_and_store_nothing", async () => {
    const self = "a".repeat(32);
    const mesh = testMeshHooks({ nodeId: self, workers: () => [workerRecord({ id: "w", nodeId: self, addr: "x:1", models: [MODEL] })] });
    const store = new ResponseStore(1 << 20);
    const seed = fakeApp({ engine: { reply: "ok" }, store });
    const prior = await seed.client.responses.create({ model: MODEL, input: "Hello", tools });
    const { post, engine } = fakeApp({ mesh, store });
    expect(store.size).toBe(1);
    const bytes = store.bytes;
    const call = { type: "function_call", call_id: "call_1", name: "get_weather", arguments: '{"city":"Paris"}' };
    const ok = { model: MODEL, input: [{ role: "user", content: "Hi" }] };
    const cases: Array<[string, unknown, string, string?]> = [
      ["no input", { model: MODEL }, "input"],
      ["input of the wrong type", { model: MODEL, input: 42 }, "input"],
      ["an empty input list", { model: MODEL, input: [] }, "input"],
      ["a message with an unknown role", { model: MODEL, input: [{ role: "robot", content: "x" }] }, "input[0].role"],
      ["a message without content", { model: MODEL, input: [{ type: "message", role: "user" }] }, "input[0].content"],
      [
        "an image part",
        { model: MODEL, input: [{ role: "user", content: [{ type: "input_image", image_url: "http://x" }] }] },
        "input[0].content[0].type",
      ],
      [
        "a text part without text",
        { model: MODEL, input: [{ role: "user", content: [{ type: "input_text" }] }] },
        "input[0].content[0].text",
      ],
      ["an item of an unknown type", { model: MODEL, input: [{ type: "web_search_call", id: "w" }] }, "input[0].type"],
      ["a function_call without call_id", { model: MODEL, input: [{ ...call, call_id: undefined }] }, "input[0].call_id"],
      ["a function_call without name", { model: MODEL, input: [{ ...call, name: "" }] }, "input[0].name"],
      [
        "a function_call whose arguments are an object",
        { model: MODEL, input: [{ ...call, arguments: { city: "Paris" } }] },
        "input[0].arguments",
      ],
      [
        "a function_call_output without call_id",
        { model: MODEL, input: [{ role: "user", content: "Hi" }, call, { type: "function_call_output", output: "x" }] },
        "input[2].call_id",
      ],
      [
        "a function_call_output for a call never made",
        { model: MODEL, input: [{ role: "user", content: "Hi" }, call, { type: "function_call_output", call_id: "call_9", output: "x" }] },
        "input[2].call_id",
      ],
      [
        "a function_call_output before its call",
        { model: MODEL, input: [{ type: "function_call_output", call_id: "call_1", output: "x" }, call] },
        "input[0].call_id",
      ],
      [
        "a function_call_output whose output is a number",
        { model: MODEL, input: [call, { type: "function_call_output", call_id: "call_1", output: 7 }] },
        "input[1].output",
      ],
      ["a built-in tool", { ...ok, tools: [{ type: "web_search" }] }, "tools[0].type"],
      ["a function tool without a name", { ...ok, tools: [{ type: "function", parameters: {} }] }, "tools[0].name"],
      [
        "a function tool whose parameters are a string",
        { ...ok, tools: [{ type: "function", name: "f", parameters: "x" }] },
        "tools[0].parameters",
      ],
      ["tool_choice of the wrong shape", { ...ok, tool_choice: 5 }, "tool_choice"],
      ["tool_choice function without a name", { ...ok, tools, tool_choice: { type: "function" } }, "tool_choice.name"],
      ["tool_choice of a built-in tool", { ...ok, tools, tool_choice: { type: "file_search" } }, "tool_choice.type", "unsupported_value"],
      ["max_output_tokens 0", { ...ok, max_output_tokens: 0 }, "max_output_tokens"],
      ["temperature above 2", { ...ok, temperature: 2.5 }, "temperature"],
      ["store of the wrong type", { ...ok, store: "no" }, "store"],
      ["metadata values that are not strings", { ...ok, metadata: { a: 1 } }, "metadata"],
      ["a text format of an unknown type", { ...ok, text: { format: { type: "yaml" } } }, "text.format.type", "invalid_value"],
      ["background", { ...ok, background: true }, "background", "unsupported_value"],
      ["a conversation", { ...ok, conversation: "conv_1" }, "conversation", "unsupported_value"],
      [
        "an output for a call the stored response did not make",
        { model: MODEL, previous_response_id: prior.id, input: [{ type: "function_call_output", call_id: "call_zz", output: "x" }] },
        "input[0].call_id",
      ],
    ];
    for (const [what, body, param, code] of cases) {
      const res = await post("/v1/responses", body);
      expect({ what, status: res.status }).toEqual({ what, status: 400 });
      const e = ((await res.json()) as OpenAiError).error;
      expect({ what, type: e.type, param: e.param }).toEqual({ what, type: "invalid_request_error", param });
      expect({ what, code: e.code }).toEqual({ what, code: code ?? "invalid_value" });
      expect({ what, message: e.message }).toEqual({ what, message: expect.stringContaining(param) });
    }
    const unknown = await post("/v1/responses", { ...ok, previous_response_id: "resp_unknown" });
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as OpenAiError).error).toMatchObject({
      param: "previous_response_id",
      code: "previous_response_not_found",
      message: expect.stringContaining("resp_unknown"),
    });
    const notJson = await post("/v1/responses", "{nope");
    expect(notJson.status).toBe(400);
    expect(((await notJson.json()) as OpenAiError).error.code).toBe("invalid_json");
    // Nothing was routed, run or stored, and the stored response is unchanged.
    expect(mesh.router.stats().byReason).toEqual({ cache: 0, load: 0, only: 0, local: 0 });
    expect((await engine.stats()).admitted).toBe(0);
    expect(store.size).toBe(1);
    expect(store.bytes).toBe(bytes);
  });

  test("an_unknown_model_is_404_overload_is_429_and_a_prompt_too_long_names_input", async () => {
    const { client, post } = fakeApp();
    const err = await client.responses.create({ model: "no-such-model", input: "Hi" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect((err as InstanceType<typeof OpenAI.NotFoundError>).error).toMatchObject({ code: "model_not_found", param: "model" });
    const busy = fakeApp({ engine: { maxInFlight: 0 } });
    const r = await busy.post("/v1/responses", { model: MODEL, input: "Hi" });
    expect(r.status).toBe(429);
    expect(r.headers.get("retry-after")).not.toBeNull();
    const long = await post("/v1/responses", { model: MODEL, input: "x".repeat(5000) });
    expect(long.status).toBe(400);
    expect(((await long.json()) as OpenAiError).error).toMatchObject({ code: "context_length_exceeded", param: "input" });
    expect(busy.store.size).toBe(0);
  });

  test("an_error_mid_stream_ends_the_stream_with_an_error_event_and_stores_nothing", async () => {
    const { post, engine, store } = fakeApp({ engine: { reply: "a long reply that is cut short", tokenDelayMs: 5 } });
    const res = await post("/v1/responses", { model: MODEL, input: "Hi", stream: true });
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    let text = new TextDecoder().decode((await reader.read()).value);
    await engine.close();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const events = sseEvents(text);
    expect(events[0]?.event).toBe("response.created");
    const last = events.at(-1);
    expect(last?.event).toBe("error");
    expect(last?.data).toMatchObject({ type: "error", code: "model_unavailable", message: expect.any(String) });
    expect(last?.data.sequence_number).toBe(events.length - 1);
    expect(events.some((e) => e.event === "response.completed")).toBe(false);
    expect(store.size).toBe(0);
  });

  test("an_alias_is_answered_under_its_name_and_keys_are_required_on_every_responses_route", async () => {
    const { handle, client } = fakeApp({ aliases: ["gpt-4o"], apiKeys: ["k1"], engine: { reply: "ok" } });
    const r = await client.responses.create({ model: "gpt-4o", input: "Hi" });
    expect(r.model).toBe("gpt-4o");
    for (const [method, path] of [
      ["POST", "/v1/responses"],
      ["GET", `/v1/responses/${r.id}`],
      ["DELETE", `/v1/responses/${r.id}`],
    ] as const) {
      const res = await handle(`http://localhost${path}`, {
        method,
        headers: { "content-type": "application/json" },
        body: method === "POST" ? "{}" : undefined,
      });
      expect({ path, method, status: res.status }).toEqual({ path, method, status: 401 });
    }
    expect((await client.responses.retrieve(r.id)).model).toBe("gpt-4o");
  });
});

describe("the equivalent chat request", () => {
  const responses = {
    model: MODEL,
    instructions: "You are terse.",
    max_output_tokens: 32,
    temperature: 0,
    top_p: 0.5,
    tools,
    tool_choice: { type: "function", name: "get_weather" },
    input: [
      { role: "developer", content: "Use tools." },
      { role: "user", content: [{ type: "input_text", text: "Weather in Paris and Oslo?" }] },
      { type: "message", role: "assistant", content: [{ type: "output_text", text: "Checking." }] },
      { type: "function_call", call_id: "c1", name: "get_weather", arguments: '{"city":"Paris"}' },
      { type: "reasoning", id: "rs_1", summary: [] },
      { type: "function_call", call_id: "c2", name: "get_weather", arguments: '{"city":"Oslo"}' },
      { type: "function_call_output", call_id: "c1", output: "sunny" },
      { type: "function_call_output", call_id: "c2", output: [{ type: "input_text", text: "rain" }] },
      { role: "user", content: "And tomorrow?" },
    ],
  };
  const chat = {
    model: MODEL,
    max_tokens: 32,
    temperature: 0,
    top_p: 0.5,
    tool_choice: { type: "function", function: { name: "get_weather" } },
    tools: tools.map((t) => ({ type: "function", function: { name: t.name, description: t.description, parameters: t.parameters } })),
    messages: [
      { role: "system", content: "You are terse." },
      { role: "developer", content: "Use tools." },
      { role: "user", content: [{ type: "text", text: "Weather in Paris and Oslo?" }] },
      {
        role: "assistant",
        content: "Checking.",
        tool_calls: [
          { id: "c1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } },
          { id: "c2", type: "function", function: { name: "get_weather", arguments: '{"city":"Oslo"}' } },
        ],
      },
      { role: "tool", tool_call_id: "c1", content: "sunny" },
      { role: "tool", tool_call_id: "c2", content: [{ type: "text", text: "rain" }] },
      { role: "user", content: "And tomorrow?" },
    ],
  };

  test("a_responses_body_translates_to_a_system_message_tool_calls_tool_messages_and_function_tools", () => {
    const req = checkResponsesBody(responses as unknown as ResponsesBodyT, new ResponseStore(1 << 20));
    expect(req.chat).toEqual(chat as unknown as typeof req.chat);
    // The input without the instructions is what a stored response keeps.
    expect(req.input).toEqual(chat.messages.slice(1) as unknown as typeof req.input);
    expect(req.prior).toBeNull();
    const only = checkResponsesBody(
      { model: MODEL, input: [{ type: "function_call", call_id: "c", name: "f", arguments: "{}" }] },
      new ResponseStore(1 << 20),
    );
    expect(only.chat.messages).toEqual([
      { role: "assistant", content: null, tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "{}" } }] },
    ]);
    expect(checkResponsesBody({ model: MODEL, input: "Hi" }, new ResponseStore(1 << 20)).chat.messages).toEqual([
      { role: "user", content: "Hi" },
    ]);
  });

  test("a_responses_request_renders_the_same_prompt_and_routing_marks_as_the_equivalent_chat_request", async () => {
    const self = "a".repeat(32);
    const mesh = testMeshHooks({ nodeId: self, workers: () => [workerRecord({ id: "w", nodeId: self, addr: "x:1", models: [MODEL] })] });
    const { post, prompts } = fakeApp({ mesh, engine: { reply: "ok" } });
    expect((await post("/v1/responses", responses)).status).toBe(200);
    expect((await post("/v1/chat/completions", chat)).status).toBe(200);
    const [viaResponses, viaChat] = prompts;
    expect(viaResponses?.prompt).toBe(viaChat?.prompt as string);
    // The marks carry the routing key's path hashes: the conversation keys alike on both routes.
    expect(viaResponses?.marks?.length).toBeGreaterThan(3);
    expect(viaResponses?.marks).toEqual(viaChat?.marks as NonNullable<GenerateOptions["marks"]>);
    expect(viaResponses?.maxTokens).toBe(32);
    expect(viaResponses?.sampling).toEqual({ temperature: 0, topP: 0.5 });
  });
});
