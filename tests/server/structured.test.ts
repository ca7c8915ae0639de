// Structured output and logprobs through the API, on the real engine (the tiny random-weight model)
// with the official clients: constrained output parses and validates even though the weights mean
// nothing, logprobs have OpenAI's shapes, stream and non-stream agree, and bad values are 400s
// naming the field that change nothing.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import Anthropic from "@anthropic-ai/sdk";
import type OpenAI from "openai";
import { SCHEMAS } from "../helpers/schemas";
import { startTestServer, type TestServer } from "../helpers/server";
import { validate } from "../helpers/validate";

let s: TestServer;
beforeAll(async () => {
  s = await startTestServer({ nCtx: 8192, nParallel: 2 });
});
afterAll(async () => {
  await s?.close();
});

const MODEL = "mesh-tiny";
const user = (content: string) => [{ role: "user" as const, content }];
type ChatParams = OpenAI.Chat.ChatCompletionCreateParamsNonStreaming;

/** A non-streamed and a streamed chat call with the same params: the reply, the streamed content, logprobs and finish reason. */
async function both(params: Omit<ChatParams, "model">) {
  const whole = await s.client.chat.completions.create({ model: MODEL, temperature: 0, ...params } as ChatParams);
  const stream = await s.client.chat.completions.create({
    model: MODEL,
    temperature: 0,
    ...params,
    stream: true,
  } as OpenAI.Chat.ChatCompletionCreateParamsStreaming);
  let content = "";
  let finish: string | null = null;
  const logprobs: OpenAI.Chat.ChatCompletionTokenLogprob[] = [];
  const calls: { name: string; arguments: string }[] = [];
  for await (const c of stream) {
    const choice = c.choices[0];
    if (!choice) continue;
    content += choice.delta.content ?? "";
    for (const t of choice.delta.tool_calls ?? []) calls.push({ name: t.function?.name ?? "", arguments: t.function?.arguments ?? "" });
    logprobs.push(...(choice.logprobs?.content ?? []));
    finish = choice.finish_reason ?? finish;
  }
  return { whole, streamed: { content, finish, logprobs, calls } };
}

describe("response_format on /v1/chat/completions", () => {
  for (const name of ["person", "nested", "tree"] as const) {
    test(`json_schema_${name}_reply_parses_validates_and_streams_the_same`, async () => {
      const schema = SCHEMAS[name] as Record<string, unknown>;
      const { whole, streamed } = await both({
        messages: user("Describe it as JSON."),
        max_tokens: 400,
        response_format: { type: "json_schema", json_schema: { name, schema, strict: true } },
      });
      const content = whole.choices[0]?.message.content ?? "";
      expect(whole.choices[0]?.finish_reason).toBe("stop");
      expect(validate(JSON.parse(content), schema)).toEqual([]);
      expect(streamed.content).toBe(content);
      expect(streamed.finish).toBe("stop");
    });
  }

  test("responses_text_format_json_schema_reply_parses_and_validates_and_is_echoed", async () => {
    const schema = SCHEMAS.person as Record<string, unknown>;
    const r = await s.client.responses.create({
      model: MODEL,
      temperature: 0,
      max_output_tokens: 400,
      input: "Describe it as JSON.",
      store: false,
      text: { format: { type: "json_schema", name: "person", schema, strict: true } },
    });
    expect(r.status).toBe("completed");
    expect(validate(JSON.parse(r.output_text), schema)).toEqual([]);
    expect(r.text?.format?.type).toBe("json_schema");
    // The same format through chat gives the same greedy reply.
    const chat = await s.client.chat.completions.create({
      model: MODEL,
      temperature: 0,
      max_tokens: 400,
      messages: user("Describe it as JSON."),
      response_format: { type: "json_schema", json_schema: { name: "person", schema, strict: true } },
    });
    expect(r.output_text).toBe(chat.choices[0]?.message.content ?? "");
  });

  test("completions_response_format_json_schema_text_parses_and_validates", async () => {
    const schema = SCHEMAS.person as Record<string, unknown>;
    const r = await s.client.completions.create({
      model: MODEL,
      temperature: 0,
      max_tokens: 400,
      prompt: "A person as JSON:",
      response_format: { type: "json_schema", json_schema: { name: "person", schema, strict: true } },
    } as unknown as OpenAI.CompletionCreateParamsNonStreaming);
    expect(r.choices[0]?.finish_reason).toBe("stop");
    expect(validate(JSON.parse(r.choices[0]?.text ?? ""), schema)).toEqual([]);
    const bad = await s.client.completions
      .create({
        model: MODEL,
        prompt: "x",
        response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "string", pattern: "a" } } },
      } as unknown as OpenAI.CompletionCreateParamsNonStreaming)
      .then(
        () => null,
        (err) => err,
      );
    expect({ status: bad?.status, param: bad?.param }).toEqual({ status: 400, param: "response_format.json_schema.schema.pattern" });
  });

  test("json_object_reply_is_a_json_object", async () => {
    // Any JSON may nest on and on; on these random weights this conversation's greedy object closes.
    const r = await s.client.chat.completions.create({
      model: MODEL,
      temperature: 0,
      max_tokens: 400,
      messages: user("Give me JSON."),
      response_format: { type: "json_object" },
    });
    expect(r.choices[0]?.finish_reason).toBe("stop");
    const value = JSON.parse(r.choices[0]?.message.content ?? "");
    expect(value !== null && typeof value === "object" && !Array.isArray(value)).toBe(true);
  });

  test("greedy_output_without_response_format_is_unchanged_by_text_format_and_logprobs", async () => {
    const base = { model: MODEL, temperature: 0, max_tokens: 24, messages: user("Tell me a story.") };
    const plain = await s.client.chat.completions.create(base);
    const text = await s.client.chat.completions.create({ ...base, response_format: { type: "text" } });
    const withLogprobs = await s.client.chat.completions.create({ ...base, logprobs: true, top_logprobs: 3 });
    expect(plain.choices[0]?.logprobs).toBeNull();
    expect(text.choices[0]?.message.content).toBe(plain.choices[0]?.message.content as string);
    expect(withLogprobs.choices[0]?.message.content).toBe(plain.choices[0]?.message.content as string);
    expect(withLogprobs.usage?.completion_tokens).toBe(plain.usage?.completion_tokens as number);
  });
});

describe("logprobs", () => {
  test("chat_logprobs_have_openais_shape_and_stream_and_non_stream_agree", async () => {
    const { whole, streamed } = await both({ messages: user("Tell me a story."), max_tokens: 20, logprobs: true, top_logprobs: 4 });
    const content = whole.choices[0]?.logprobs?.content ?? [];
    expect(content).toHaveLength(whole.usage?.completion_tokens as number);
    for (const t of content) {
      expect(t.logprob).toBeLessThanOrEqual(0);
      expect(t.top_logprobs).toHaveLength(4);
      // Greedy: the chosen token is the most probable one.
      expect(t.top_logprobs[0]?.token).toBe(t.token);
      expect(t.top_logprobs[0]?.logprob).toBe(t.logprob);
      for (let i = 1; i < t.top_logprobs.length; i++) {
        expect(t.top_logprobs[i]?.logprob as number).toBeLessThanOrEqual(t.top_logprobs[i - 1]?.logprob as number);
      }
      expect(Array.isArray(t.bytes)).toBe(true);
    }
    expect(Buffer.from(content.flatMap((t) => t.bytes ?? [])).toString("utf8")).toBe(whole.choices[0]?.message.content as string);
    expect(streamed.logprobs).toEqual(content);
  });

  test("logprobs_with_a_schema_report_the_allowed_tokens", async () => {
    const { whole, streamed } = await both({
      messages: user("Pick one."),
      max_tokens: 20,
      logprobs: true,
      top_logprobs: 20,
      response_format: { type: "json_schema", json_schema: { name: "pick", schema: { enum: ["alpha", "beta"] } } },
    });
    const content = whole.choices[0]?.logprobs?.content ?? [];
    expect(['"alpha"', '"beta"']).toContain(whole.choices[0]?.message.content as string);
    const first = content[0];
    expect(first?.top_logprobs[0]?.token).toBe(first?.token as string);
    for (const alt of first?.top_logprobs ?? []) expect(['"alpha"', '"beta"'].some((w) => w.startsWith(alt.token))).toBe(true);
    expect(streamed.logprobs).toEqual(content);
  });

  test("completions_logprobs_have_the_legacy_shape_and_stream_agrees", async () => {
    const prompt = "Once upon a time";
    const params = { model: MODEL, prompt, max_tokens: 12, temperature: 0, logprobs: 3 };
    const r = await s.client.completions.create(params);
    const lp = r.choices[0]?.logprobs;
    const text = r.choices[0]?.text ?? "";
    expect(lp?.tokens).toHaveLength(r.usage?.completion_tokens as number);
    expect(lp?.tokens?.join("")).toBe(text);
    expect(lp?.text_offset?.[0]).toBe(prompt.length);
    lp?.token_logprobs?.forEach((l, i) => {
      expect(l).toBeLessThanOrEqual(0);
      const top = lp.top_logprobs?.[i] as Record<string, number>;
      expect(Object.keys(top).length).toBeLessThanOrEqual(3);
      expect(Math.max(...Object.values(top))).toBe(l);
      expect(lp.text_offset?.[i]).toBe(prompt.length + (lp.tokens ?? []).slice(0, i).join("").length);
    });
    const stream = await s.client.completions.create({ ...params, stream: true });
    const merged = {
      tokens: [] as string[],
      token_logprobs: [] as number[],
      top_logprobs: [] as Record<string, number>[],
      text_offset: [] as number[],
    };
    for await (const c of stream) {
      const l = c.choices[0]?.logprobs;
      if (!l) continue;
      merged.tokens.push(...(l.tokens ?? []));
      merged.token_logprobs.push(...(l.token_logprobs ?? []));
      merged.top_logprobs.push(...((l.top_logprobs ?? []) as Record<string, number>[]));
      merged.text_offset.push(...(l.text_offset ?? []));
    }
    expect(merged).toEqual(lp as typeof merged);
  });
});

describe("forced tool calls", () => {
  const parameters = {
    type: "object",
    properties: { city: { type: "string", maxLength: 12 }, unit: { enum: ["C", "F"] } },
    required: ["city", "unit"],
    additionalProperties: false,
  };
  const tools: OpenAI.Chat.ChatCompletionTool[] = [
    { type: "function", function: { name: "get_weather", parameters } },
    {
      type: "function",
      function: { name: "get_time", parameters: { type: "object", properties: { tz: { enum: ["UTC"] } }, required: ["tz"] } },
    },
  ];

  test("a_named_tool_choice_gives_that_call_with_valid_arguments_streamed_the_same", async () => {
    const { whole, streamed } = await both({
      messages: user("Weather in Paris?"),
      max_tokens: 120,
      tools,
      tool_choice: { type: "function", function: { name: "get_weather" } },
    });
    const choice = whole.choices[0];
    expect(choice?.finish_reason).toBe("tool_calls");
    const call = choice?.message.tool_calls?.[0] as OpenAI.Chat.ChatCompletionMessageFunctionToolCall;
    expect(call.function.name).toBe("get_weather");
    expect(validate(JSON.parse(call.function.arguments), parameters)).toEqual([]);
    expect(streamed.finish).toBe("tool_calls");
    expect(streamed.calls).toEqual([{ name: "get_weather", arguments: call.function.arguments }]);
  });

  test("required_gives_a_call_of_one_of_the_tools", async () => {
    const r = await s.client.chat.completions.create({
      model: MODEL,
      temperature: 0,
      max_tokens: 120,
      messages: user("Hi"),
      tools,
      tool_choice: "required",
    });
    const call = r.choices[0]?.message.tool_calls?.[0] as OpenAI.Chat.ChatCompletionMessageFunctionToolCall;
    expect(["get_weather", "get_time"]).toContain(call.function.name);
    const schema = tools.find(
      (t) => t.type === "function" && t.function.name === call.function.name,
    ) as OpenAI.Chat.ChatCompletionFunctionTool;
    expect(validate(JSON.parse(call.function.arguments), schema.function.parameters as Record<string, unknown>)).toEqual([]);
  });

  test("anthropic_tool_choice_tool_and_output_config_are_constrained_too", async () => {
    const client = new Anthropic({ baseURL: s.url, apiKey: "unused", maxRetries: 0 });
    const m = await client.messages.create({
      model: MODEL,
      max_tokens: 120,
      messages: user("Weather?"),
      tools: [{ name: "get_weather", input_schema: parameters as Anthropic.Tool.InputSchema }],
      tool_choice: { type: "tool", name: "get_weather" },
      temperature: 0,
    } as Anthropic.MessageCreateParamsNonStreaming);
    expect(m.stop_reason).toBe("tool_use");
    const use = m.content.find((b) => b.type === "tool_use") as Anthropic.ToolUseBlock;
    expect(use.name).toBe("get_weather");
    expect(validate(use.input, parameters)).toEqual([]);

    const schema = SCHEMAS.person as Record<string, unknown>;
    const o = await client.messages.create({
      model: MODEL,
      max_tokens: 400,
      messages: user("Describe it as JSON."),
      output_config: { format: { type: "json_schema", schema } },
      temperature: 0,
    } as Anthropic.MessageCreateParamsNonStreaming);
    const text = o.content.map((b) => (b.type === "text" ? b.text : "")).join("");
    expect(validate(JSON.parse(text), schema)).toEqual([]);
  });
});

describe("bad values are 400s naming the field, and change nothing", () => {
  const badChat: [string, Record<string, unknown>, string][] = [
    ["top_logprobs above 20", { logprobs: true, top_logprobs: 21 }, "top_logprobs"],
    ["logprobs not a boolean", { logprobs: 3 }, "logprobs"],
    ["top_logprobs without logprobs", { top_logprobs: 2 }, "top_logprobs"],
    ["response_format of an unknown type", { response_format: { type: "yaml" } }, "response_format.type"],
    ["json_schema without its object", { response_format: { type: "json_schema" } }, "response_format.json_schema"],
    [
      "an unsupported schema feature",
      {
        response_format: {
          type: "json_schema",
          json_schema: { name: "x", schema: { type: "object", properties: { x: { type: "string", pattern: "a+" } } } },
        },
      },
      "response_format.json_schema.schema.properties.x.pattern",
    ],
    [
      "a tool_choice naming no tool",
      { tools: [{ type: "function", function: { name: "f" } }], tool_choice: { type: "function", function: { name: "g" } } },
      "tool_choice.function.name",
    ],
  ];

  test("chat_and_completions_refusals", async () => {
    const before = await s.model.engine?.stats();
    for (const [what, extra, param] of badChat) {
      const e = await s.client.chat.completions
        .create({ model: MODEL, max_tokens: 4, messages: user("x"), ...extra } as unknown as ChatParams)
        .then(
          () => null,
          (err) => err,
        );
      expect({ what, status: e?.status, param: e?.param }).toEqual({ what, status: 400, param });
    }
    for (const logprobs of [21, -1, true]) {
      const e = await s.client.completions
        .create({ model: MODEL, prompt: "x", max_tokens: 4, logprobs } as unknown as OpenAI.CompletionCreateParamsNonStreaming)
        .then(
          () => null,
          (err) => err,
        );
      expect({ logprobs, status: e?.status, param: e?.param }).toEqual({ logprobs, status: 400, param: "logprobs" });
    }
    // Nothing reached the engine.
    const after = await s.model.engine?.stats();
    expect(after?.admitted).toBe(before?.admitted as number);
  });

  test("responses_text_format_refusal_names_its_field_and_stores_nothing", async () => {
    const before = await s.model.engine?.stats();
    const e = await s.client.responses
      .create({
        model: MODEL,
        input: "x",
        text: {
          format: { type: "json_schema", name: "x", schema: { type: "object", properties: { x: { type: "string", pattern: "a+" } } } },
        },
      })
      .then(
        () => null,
        (err) => err,
      );
    expect({ status: e?.status, param: e?.param }).toEqual({ status: 400, param: "text.format.schema.properties.x.pattern" });
    const unknown = await s.client.responses
      .create({
        model: MODEL,
        input: "x",
        text: { format: { type: "yaml" } },
      } as unknown as OpenAI.Responses.ResponseCreateParamsNonStreaming)
      .then(
        () => null,
        (err) => err,
      );
    expect({ status: unknown?.status, param: unknown?.param }).toEqual({ status: 400, param: "text.format.type" });
    expect((await s.model.engine?.stats())?.admitted).toBe(before?.admitted as number);
  });

  test("anthropic_output_config_refusal_names_its_field", async () => {
    const r = await fetch(`${s.url}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: MODEL,
        max_tokens: 4,
        messages: user("x"),
        output_config: { format: { type: "json_schema", schema: { type: "string", format: "email" } } },
      }),
    });
    expect(r.status).toBe(400);
    const body = (await r.json()) as { error: { type: string; message: string } };
    expect(body.error.type).toBe("invalid_request_error");
    expect(body.error.message).toContain("output_config.format.schema.format");
  });
});
