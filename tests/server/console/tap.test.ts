import { describe, expect, test } from "bun:test";
import { type Tapped, tapResponse, usageOf } from "../../../src/server/console/tap";

const enc = new TextEncoder();

function sse(lines: string[], chunkSize = 7): Response {
  const bytes = enc.encode(lines.join(""));
  const body = new ReadableStream<Uint8Array>({
    start(c) {
      for (let i = 0; i < bytes.length; i += chunkSize) c.enqueue(bytes.slice(i, i + chunkSize));
      c.close();
    },
  });
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
}

async function through(r: Response): Promise<{ text: string; seen: Tapped }> {
  let seen: Tapped | null = null;
  const tapped = tapResponse(r, (t) => {
    seen = t;
  });
  const text = await tapped.text();
  if (!seen) throw new Error("the tap never finished");
  return { text, seen };
}

describe("reading a relayed answer on its way through", () => {
  test("a_chat_stream_passes_unchanged_and_yields_its_usage_and_first_text_time", async () => {
    const lines = [
      `data: ${JSON.stringify({ choices: [{ delta: { role: "assistant", content: "" } }] })}\n\n`,
      `data: ${JSON.stringify({ choices: [{ delta: { content: "Hi" } }] })}\n\n`,
      `data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 300, completion_tokens: 5, prompt_tokens_details: { cached_tokens: 250 } } })}\n\n`,
      "data: [DONE]\n\n",
    ];
    const { text, seen } = await through(sse(lines));
    expect(text).toBe(lines.join(""));
    expect(seen.usage).toEqual({ promptTokens: 300, cachedTokens: 250, completionTokens: 5 });
    expect(seen.firstTextAt).not.toBeNull();
  });

  test("an_anthropic_stream_merges_input_and_output_usage", async () => {
    const lines = [
      `event: message_start\ndata: ${JSON.stringify({ type: "message_start", message: { usage: { input_tokens: 40, cache_read_input_tokens: 60, output_tokens: 0 } } })}\n\n`,
      `event: content_block_delta\ndata: ${JSON.stringify({ type: "content_block_delta", delta: { type: "text_delta", text: "Hi" } })}\n\n`,
      `event: message_delta\ndata: ${JSON.stringify({ type: "message_delta", usage: { output_tokens: 7 } })}\n\n`,
    ];
    const { seen } = await through(sse(lines, 3));
    expect(seen.usage).toEqual({ promptTokens: 100, cachedTokens: 60, completionTokens: 7 });
  });

  test("a_json_answer_yields_its_usage", async () => {
    const body = { choices: [], usage: { prompt_tokens: 10, completion_tokens: 2, prompt_tokens_details: { cached_tokens: 3 } } };
    const { seen } = await through(Response.json(body));
    expect(seen.usage).toEqual({ promptTokens: 10, cachedTokens: 3, completionTokens: 2 });
    expect(usageOf({ usage: { input_tokens: 9, input_tokens_details: { cached_tokens: 4 }, output_tokens: 1 } })).toEqual({
      promptTokens: 9,
      cachedTokens: 4,
      completionTokens: 1,
    });
  });

  test("an_endless_line_is_passed_through_unread_without_buffering_it", async () => {
    const huge = `data: ${"x".repeat(2 * 1024 * 1024)}`;
    const tail = `\n\ndata: ${JSON.stringify({ usage: { prompt_tokens: 1, completion_tokens: 1 } })}\n\n`;
    const { text, seen } = await through(sse([huge, tail], 64 * 1024));
    expect(text.length).toBe(huge.length + tail.length);
    expect(seen.usage?.promptTokens).toBe(1);
  });

  test("a_client_that_goes_away_still_ends_the_record", async () => {
    let ended = false;
    const endless = new ReadableStream<Uint8Array>({
      pull: async (c) => {
        await Bun.sleep(1);
        c.enqueue(enc.encode("data: {}\n\n"));
      },
    });
    const tapped = tapResponse(new Response(endless, { headers: { "content-type": "text/event-stream" } }), () => {
      ended = true;
    });
    const reader = (tapped.body as ReadableStream<Uint8Array>).getReader();
    await reader.read();
    await reader.cancel();
    expect(ended).toBe(true);
  });
});
