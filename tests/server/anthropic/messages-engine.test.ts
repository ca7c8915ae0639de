// POST /v1/messages on the real engine (the tiny random-weight model, llama.cpp
// in its Worker) with the official Anthropic client: what the fake engine cannot
// show, real tokens, real prefix reuse, and that a conversation gets the same
// tokens and cache through /v1/messages as through /v1/chat/completions.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import Anthropic from "@anthropic-ai/sdk";
import type OpenAI from "openai";
import { startTestServer, type TestServer } from "../../helpers/server";

let s: TestServer;
beforeAll(async () => {
  s = await startTestServer();
});
afterAll(async () => {
  await s?.close();
});

const MODEL = "mesh-tiny";
const anthropic = (t: TestServer = s) => new Anthropic({ baseURL: t.url, apiKey: "unused", maxRetries: 0 });
/** A Messages call; the SDK's types no longer list the sampling fields (temperature, top_k), which older clients still send. */
const create = (params: object, t: TestServer = s) => anthropic(t).messages.create(params as Anthropic.MessageCreateParamsNonStreaming);
const textOf = (m: Anthropic.Message) => m.content.map((b) => (b.type === "text" ? b.text : "")).join("");
const promptOf = (u: Anthropic.Usage) => u.input_tokens + (u.cache_read_input_tokens ?? 0);
const tools = [
  {
    name: "lookup",
    description: "Look a word up",
    input_schema: { type: "object" as const, properties: { q: { type: "string" } }, required: ["q"] },
  },
];

describe("Anthropic Messages on the real engine", () => {
  test("a_message_and_its_stream_give_the_same_greedy_text_and_the_repeat_is_read_from_cache", async () => {
    const params = {
      model: MODEL,
      max_tokens: 8,
      temperature: 0,
      system: "You are a careful assistant. ".repeat(20),
      messages: [{ role: "user" as const, content: "Tell me a story." }],
    };
    const whole = await create(params);
    expect(whole.model).toBe(MODEL);
    expect(whole.content[0]?.type).toBe("text");
    expect(["max_tokens", "end_turn"]).toContain(whole.stop_reason as string);
    if (whole.stop_reason === "max_tokens") expect(whole.usage.output_tokens).toBe(8);

    const events: string[] = [];
    const stream = anthropic().messages.stream(params as Anthropic.MessageCreateParamsNonStreaming);
    stream.on("streamEvent", (e) => events.push(e.type));
    const streamed = await stream.finalMessage();
    expect(textOf(streamed)).toBe(textOf(whole));
    expect(streamed.stop_reason).toBe(whole.stop_reason);
    expect(streamed.usage.output_tokens).toBe(whole.usage.output_tokens);
    expect(events[0]).toBe("message_start");
    expect(events.slice(-2)).toEqual(["message_delta", "message_stop"]);
    expect(events).toContain("content_block_start");
    // The same prompt again: all of it but its last token comes from the KV cache.
    expect(streamed.usage.cache_read_input_tokens).toBe(promptOf(whole.usage) - 1);
    expect(streamed.usage.input_tokens).toBe(1);
  });

  test("a_tool_result_turn_reads_the_conversation_so_far_from_cache", async () => {
    const messages: Anthropic.MessageParam[] = [
      { role: "user", content: `Please look up the word 'mesh'. ${"Context for the lookup. ".repeat(15)}` },
    ];
    const first = await create({ model: MODEL, max_tokens: 6, temperature: 0, system: "Use tools.", tools, messages });
    // The random-weight model does not call tools by itself: the turn goes on as if it had.
    messages.push({
      role: "assistant",
      content: [...first.content, { type: "tool_use", id: "toolu_1", name: "lookup", input: { q: "mesh" } }],
    });
    messages.push({ role: "user", content: [{ type: "tool_result", tool_use_id: "toolu_1", content: "a network of nodes" }] });
    const second = await create({ model: MODEL, max_tokens: 6, temperature: 0, system: "Use tools.", tools, messages });
    // Everything up to the assistant turn (system, tools, the question) is reused.
    expect(second.usage.cache_read_input_tokens).toBeGreaterThanOrEqual(promptOf(first.usage) - 1);
    expect(promptOf(second.usage)).toBeGreaterThan(promptOf(first.usage));
  });

  test("count_tokens_is_the_prompt_size_a_message_of_the_same_conversation_reports", async () => {
    const params = {
      model: MODEL,
      system: "Count me.",
      tools,
      messages: [
        { role: "user" as const, content: "How many tokens is this?" },
        { role: "assistant" as const, content: [{ type: "tool_use" as const, id: "toolu_9", name: "lookup", input: { q: "tokens" } }] },
        { role: "user" as const, content: [{ type: "tool_result" as const, tool_use_id: "toolu_9", content: "many" }] },
      ],
    };
    const counted = await anthropic().messages.countTokens(params);
    const ran = await anthropic().messages.create({ ...params, max_tokens: 1 });
    expect(counted.input_tokens).toBe(promptOf(ran.usage));
  });
});

describe("one conversation through /v1/chat/completions and /v1/messages", () => {
  test("gives_the_same_greedy_tokens_and_the_same_cached_token_counts_turn_by_turn", async () => {
    // Two fresh servers, one per API, so both conversations meet the same (empty) cache.
    const [viaChat, viaMessages] = await Promise.all([startTestServer(), startTestServer()]);
    try {
      const system = "You answer briefly and use tools when useful.";
      const question = `What does 'mesh' mean? ${"Some background. ".repeat(12)}`;
      const chatTools = tools.map((t) => ({
        type: "function" as const,
        function: { name: t.name, description: t.description, parameters: t.input_schema },
      }));
      const chat: OpenAI.ChatCompletionMessageParam[] = [
        { role: "system", content: system },
        { role: "user", content: question },
      ];
      const messages: Anthropic.MessageParam[] = [{ role: "user", content: question }];
      const ask = async () => {
        const c = await viaChat.client.chat.completions.create({
          model: MODEL,
          messages: chat,
          tools: chatTools,
          max_tokens: 8,
          temperature: 0,
        });
        const m = await create({ model: MODEL, system, tools, messages, max_tokens: 8, temperature: 0 }, viaMessages);
        expect(textOf(m)).toBe(c.choices[0]?.message.content ?? "");
        expect(promptOf(m.usage)).toBe(c.usage?.prompt_tokens as number);
        expect(m.usage.cache_read_input_tokens).toBe(c.usage?.prompt_tokens_details?.cached_tokens as number);
        expect(m.usage.output_tokens).toBe(c.usage?.completion_tokens as number);
        return { text: textOf(m), cached: m.usage.cache_read_input_tokens ?? 0 };
      };
      const first = await ask();
      // The assistant called a tool (the same call, written in each API's way), and its result comes back.
      const args = { q: "mesh" };
      chat.push({
        role: "assistant",
        content: first.text,
        tool_calls: [{ id: "call_1", type: "function", function: { name: "lookup", arguments: JSON.stringify(args) } }],
      });
      chat.push({ role: "tool", tool_call_id: "call_1", content: "a network of nodes that route to each other" });
      messages.push({
        role: "assistant",
        content: [
          { type: "text", text: first.text },
          { type: "tool_use", id: "call_1", name: "lookup", input: args },
        ],
      });
      messages.push({
        role: "user",
        content: [{ type: "tool_result", tool_use_id: "call_1", content: "a network of nodes that route to each other" }],
      });
      const second = await ask();
      expect(second.cached).toBeGreaterThan(0);
      chat.push({ role: "assistant", content: second.text }, { role: "user", content: "Thanks. And 'node'?" });
      messages.push({ role: "assistant", content: second.text }, { role: "user", content: "Thanks. And 'node'?" });
      const third = await ask();
      expect(third.cached).toBeGreaterThan(second.cached);
    } finally {
      await Promise.all([viaChat.close(), viaMessages.close()]);
    }
  });
});
