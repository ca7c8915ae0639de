import { describe, expect, test } from "bun:test";
import { Stream } from "openai/streaming";
import { sseResponse } from "../../../src/server/openai/run";

describe("sseResponse", () => {
  test("a_silent_stream_gets_keep_alive_comments_the_openai_client_ignores", async () => {
    const abort = new AbortController();
    const res = sseResponse(
      abort,
      async (send) => {
        await Bun.sleep(200); // waiting for KV room, say
        send({ id: "x", choices: [{ index: 0, delta: { content: "hi" } }] });
      },
      (e) => ({ error: String(e) }),
      40,
    );
    const text = await res.text();
    expect(text.startsWith(": keep-alive\n\n")).toBe(true);
    expect(text).toContain('data: {"id":"x"');
    expect(text.endsWith("data: [DONE]\n\n")).toBe(true);

    // The official client parses the same bytes into exactly the one chunk.
    const again = sseResponse(
      new AbortController(),
      async (send) => {
        await Bun.sleep(120);
        send({ id: "y", choices: [] });
      },
      (e) => ({ error: String(e) }),
      30,
    );
    const chunks: unknown[] = [];
    for await (const c of Stream.fromSSEResponse(again, new AbortController())) chunks.push(c);
    expect(chunks).toEqual([{ id: "y", choices: [] }]);
  });

  test("no_keep_alive_is_sent_after_the_stream_ends_or_the_client_leaves", async () => {
    const abort = new AbortController();
    const res = sseResponse(
      abort,
      async () => {},
      () => ({}),
      10,
    );
    expect(await res.text()).toBe("data: [DONE]\n\n");
    const left = new AbortController();
    const r2 = sseResponse(
      left,
      () => new Promise<void>((resolve) => left.signal.addEventListener("abort", () => resolve())),
      () => ({}),
      10,
    );
    const reader = (r2.body as ReadableStream<Uint8Array>).getReader();
    await reader.read(); // one keep-alive
    await reader.cancel();
    expect(left.signal.aborted).toBe(true);
    await Bun.sleep(50); // a leaked timer would enqueue into a cancelled stream and throw
  });
});
