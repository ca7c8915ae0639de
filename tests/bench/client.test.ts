// sendChat against a real HTTP server on 127.0.0.1 that answers like an
// OpenAI-compatible endpoint would, including the ways one can misbehave.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { MAX_BODY_BYTES, parseRetryAfter, sendChat } from "../../src/bench/client";

const usage = { prompt_tokens: 120, completion_tokens: 4, total_tokens: 124, prompt_tokens_details: { cached_tokens: 100 } };
const sse = (events: unknown[]) =>
  new Response(events.map((e) => `data: ${typeof e === "string" ? e : JSON.stringify(e)}\n\n`).join(""), {
    headers: { "content-type": "text/event-stream" },
  });

let server: ReturnType<typeof Bun.serve>;
let url = "";
const seenAuth: Array<string | null> = [];

beforeAll(() => {
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      seenAuth.push(req.headers.get("authorization"));
      const body = (await req.json()) as { model: string; stream?: boolean };
      switch (body.model) {
        case "ok":
          if (!body.stream) return Response.json({ choices: [{ message: { content: "hi" } }], usage });
          return sse([
            { choices: [{ delta: { role: "assistant", content: "" } }] },
            { choices: [{ delta: { content: "hi" } }] },
            { choices: [{ delta: {}, finish_reason: "length" }] },
            { choices: [], usage },
            "[DONE]",
          ]);
        case "tool-only":
          return sse([{ choices: [{ delta: { tool_calls: [{ index: 0 }] } }] }, { choices: [], usage }, "[DONE]"]);
        case "busy":
          return Response.json({ error: { message: "busy", code: "server_busy" } }, { status: 429, headers: { "retry-after": "3" } });
        case "kv":
          return Response.json({ error: { message: "no KV cache space left", code: "kv_exhausted" } }, { status: 503 });
        case "stream-error":
          return sse([
            { choices: [{ delta: { content: "a" } }] },
            { error: { message: "llama_decode failed", code: "decode_failed" } },
            "[DONE]",
          ]);
        case "no-usage-plain":
          return Response.json({ choices: [{ message: { content: "hi" } }] });
        case "no-usage":
          return sse([{ choices: [{ delta: { content: "a" } }] }, "[DONE]"]);
        case "huge":
          return new Response("x".repeat(MAX_BODY_BYTES + 1024), { headers: { "content-type": "application/json" } });
        case "not-json":
          return new Response("<html>oops</html>", { status: 502 });
        default:
          return Response.json({ error: { message: "no such model", code: "model_not_found" } }, { status: 404 });
      }
    },
  });
  url = `http://127.0.0.1:${server.port}`;
});

afterAll(() => server.stop(true));

const send = (model: string, stream = false, apiKey?: string) =>
  sendChat({ url, ...(apiKey ? { apiKey } : {}) }, { model, stream }, 60_000);

describe("bench client", () => {
  test("reads_usage_and_cached_tokens_of_a_plain_answer", async () => {
    const r = await send("ok", false, "k1");
    expect(r).toMatchObject({ status: 200, error: null, streamError: false, ttftMs: null });
    expect(r.usage).toEqual({ promptTokens: 120, cachedTokens: 100, completionTokens: 4 });
    expect(r.ttfbMs).not.toBeNull();
    expect(seenAuth.at(-1)).toBe("Bearer k1");
  });

  test("times_the_first_token_of_a_stream_and_reads_its_usage_chunk", async () => {
    const r = await send("ok", true);
    expect(r.status).toBe(200);
    expect(r.error).toBeNull();
    expect(r.usage?.cachedTokens).toBe(100);
    expect(r.ttftMs).not.toBeNull();
    expect(r.ttftMs as number).toBeLessThanOrEqual(r.totalMs);
    const t = await send("tool-only", true);
    expect(t.ttftMs).not.toBeNull();
  });

  test("keeps_status_retry_after_and_the_error_message", async () => {
    const busy = await send("busy");
    expect(busy).toMatchObject({ status: 429, retryAfterS: 3, usage: null, error: "server_busy: busy" });
    const kv = await send("kv");
    expect(kv).toMatchObject({ status: 503, retryAfterS: null, error: "kv_exhausted: no KV cache space left" });
    const bad = await send("not-json");
    expect(bad.status).toBe(502);
    expect(bad.error).toContain("oops");
  });

  test("an_error_inside_a_200_stream_is_a_stream_error", async () => {
    const r = await send("stream-error", true);
    expect(r).toMatchObject({ status: 200, streamError: true, error: "decode_failed: llama_decode failed" });
    const n = await send("no-usage", true);
    expect(n.error).toContain("without usage");
    const p = await send("no-usage-plain");
    expect(p).toMatchObject({ status: 200, usage: null, error: "the answer has no usage" });
  });

  test("a_body_over_the_cap_fails_instead_of_being_buffered", async () => {
    const r = await send("huge");
    expect(r.status).toBe(200);
    expect(r.usage).toBeNull();
    expect(r.error).toContain(`exceeds ${MAX_BODY_BYTES} bytes`);
  });

  test("no_server_is_status_0_not_an_exception", async () => {
    const r = await sendChat({ url: "http://127.0.0.1:1" }, { model: "ok" }, 10_000);
    expect(r.status).toBe(0);
    expect(r.error).not.toBeNull();
  });

  test("retry_after_takes_seconds_or_an_http_date", () => {
    expect(parseRetryAfter("2")).toBe(2);
    expect(parseRetryAfter("0.5")).toBe(0.5);
    expect(parseRetryAfter(null)).toBeNull();
    expect(parseRetryAfter("soon")).toBeNull();
    const now = Date.parse("2026-01-01T00:00:00Z");
    expect(parseRetryAfter("Thu, 01 Jan 2026 00:00:05 GMT", now)).toBe(5);
    expect(parseRetryAfter("Wed, 31 Dec 2025 00:00:00 GMT", now)).toBe(0);
  });
});
