// POST /v1/responses on the real engine (the tiny random-weight model, llama.cpp
// in its Worker) with the official OpenAI client: what the fake engine cannot
// show, real tokens, real prefix reuse, and that a conversation gets the same
// tokens and cache through /v1/responses as through /v1/chat/completions.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
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
const tools: OpenAI.Responses.FunctionTool[] = [
  {
    type: "function",
    name: "lookup",
    description: "Look a word up",
    parameters: { type: "object", properties: { q: { type: "string" } }, required: ["q"] },
    strict: false,
  },
];
const cachedOf = (r: OpenAI.Responses.Response) => r.usage?.input_tokens_details.cached_tokens ?? 0;

describe("OpenAI Responses on the real engine", () => {
  test("a_response_and_its_stream_give_the_same_greedy_text_and_the_repeat_is_read_from_cache", async () => {
    const params = {
      model: MODEL,
      max_output_tokens: 8,
      temperature: 0,
      instructions: "You are a careful assistant. ".repeat(20),
      input: "Tell me a story.",
    };
    const whole = await s.client.responses.create(params);
    expect(whole.model).toBe(MODEL);
    expect(["completed", "incomplete"]).toContain(whole.status as string);
    if (whole.status === "incomplete") expect(whole.usage?.output_tokens).toBe(8);

    const events: string[] = [];
    const stream = s.client.responses.stream(params);
    stream.on("event", (e) => events.push(e.type));
    const streamed = await stream.finalResponse();
    expect(streamed.output_text).toBe(whole.output_text);
    expect(streamed.status).toBe(whole.status);
    expect(streamed.usage?.output_tokens).toBe(whole.usage?.output_tokens as number);
    expect(events.slice(0, 2)).toEqual(["response.created", "response.in_progress"]);
    expect(events.at(-1)).toBe(whole.status === "incomplete" ? "response.incomplete" : "response.completed");
    // The same prompt again: all of it but its last token comes from the KV cache.
    expect(cachedOf(streamed)).toBe((whole.usage?.input_tokens ?? 0) - 1);
  });

  test("a_tool_loop_chained_by_previous_response_id_reads_the_conversation_so_far_from_cache", async () => {
    const first = await s.client.responses.create({
      model: MODEL,
      max_output_tokens: 6,
      temperature: 0,
      instructions: "Use tools.",
      tools,
      input: `Please look up the word 'mesh'. ${"Context for the lookup. ".repeat(15)}`,
    });
    // The random-weight model does not call tools by itself: the turn goes on as if it had.
    const second = await s.client.responses.create({
      model: MODEL,
      max_output_tokens: 6,
      temperature: 0,
      instructions: "Use tools.",
      tools,
      previous_response_id: first.id,
      input: [
        { type: "function_call", call_id: "call_1", name: "lookup", arguments: '{"q":"mesh"}' },
        { type: "function_call_output", call_id: "call_1", output: "a network of nodes" },
      ],
    });
    // Everything up to the assistant turn (instructions, tools, the question) is reused.
    expect(cachedOf(second)).toBeGreaterThanOrEqual((first.usage?.input_tokens ?? 0) - 1);
    expect(second.usage?.input_tokens).toBeGreaterThan(first.usage?.input_tokens as number);
    // And the turn after it, chained again, reuses that one.
    const third = await s.client.responses.create({
      model: MODEL,
      max_output_tokens: 4,
      temperature: 0,
      instructions: "Use tools.",
      tools,
      previous_response_id: second.id,
      input: "Thanks.",
    });
    expect(cachedOf(third)).toBeGreaterThanOrEqual((second.usage?.input_tokens ?? 0) - 1);
  });
});

describe("one conversation through /v1/chat/completions and /v1/responses", () => {
  test("gives_the_same_greedy_tokens_and_the_same_cached_token_counts_turn_by_turn", async () => {
    // Two fresh servers, one per API, so both conversations meet the same (empty) cache.
    const [viaChat, viaResponses] = await Promise.all([startTestServer(), startTestServer()]);
    try {
      const instructions = "You answer briefly and use tools when useful.";
      const question = `What does 'mesh' mean? ${"Some background. ".repeat(12)}`;
      const chatTools = tools.map((t) => ({
        type: "function" as const,
        function: { name: t.name, description: t.description ?? undefined, parameters: t.parameters ?? undefined },
      }));
      const chat: OpenAI.ChatCompletionMessageParam[] = [
        { role: "system", content: instructions },
        { role: "user", content: question },
      ];
      const ask = async (o: { input: OpenAI.Responses.ResponseCreateParams["input"]; previous_response_id?: string }) => {
        const c = await viaChat.client.chat.completions.create({
          model: MODEL,
          messages: chat,
          tools: chatTools,
          max_tokens: 8,
          temperature: 0,
        });
        const r = await viaResponses.client.responses.create({
          model: MODEL,
          instructions,
          tools,
          max_output_tokens: 8,
          temperature: 0,
          ...o,
        });
        expect(r.output_text).toBe(c.choices[0]?.message.content ?? "");
        expect(r.usage?.input_tokens).toBe(c.usage?.prompt_tokens as number);
        expect(cachedOf(r)).toBe(c.usage?.prompt_tokens_details?.cached_tokens as number);
        expect(r.usage?.output_tokens).toBe(c.usage?.completion_tokens as number);
        return r;
      };
      const first = await ask({ input: question });
      // The assistant called a tool (the same call, written in each API's way), and its result comes back:
      // through Responses as the whole conversation, its output items sent back as they came.
      const args = JSON.stringify({ q: "mesh" });
      const result = "a network of nodes that route to each other";
      chat.push(
        {
          role: "assistant",
          content: first.output_text,
          tool_calls: [{ id: "call_1", type: "function", function: { name: "lookup", arguments: args } }],
        },
        { role: "tool", tool_call_id: "call_1", content: result },
      );
      const second = await ask({
        input: [
          { role: "user", content: question },
          ...(first.output as OpenAI.Responses.ResponseInputItem[]),
          { type: "function_call", call_id: "call_1", name: "lookup", arguments: args },
          { type: "function_call_output", call_id: "call_1", output: result },
        ],
      });
      expect(cachedOf(second)).toBeGreaterThan(0);
      // Then chained by previous_response_id: only the new user message travels.
      chat.push({ role: "assistant", content: second.output_text }, { role: "user", content: "Thanks. And 'node'?" });
      const third = await ask({ previous_response_id: second.id, input: "Thanks. And 'node'?" });
      expect(cachedOf(third)).toBeGreaterThan(cachedOf(second));
    } finally {
      await Promise.all([viaChat.close(), viaResponses.close()]);
    }
  });
});
