// The HTTP surface over the fake engine, through app.handle(): no llama.cpp,
// no Worker, no port. For tests that need the server's behaviour, not a model's.
import { describe, expect, test } from "bun:test";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import { createApp } from "../../src/server/app";
import { Metrics } from "../../src/server/metrics";
import { ServedModel } from "../../src/server/model";

const REPLY = "Hello from the fake engine.";

function fakeApp(engine = new FakeEngine({ reply: REPLY })) {
  const model = ServedModel.fromEngine("fake-model", engine);
  const app = createApp({ models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics() });
  const post = (path: string, body: unknown) =>
    app.handle(
      new Request(`http://localhost${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      }),
    );
  return { app, model, engine, post };
}

const user = (content: string) => [{ role: "user", content }];

describe("server over the fake engine", () => {
  test("a_fake_engine_is_served_ready_at_once_with_the_fallback_template", async () => {
    const { app, model } = fakeApp();
    expect(model.status).toBe("ready");
    expect(model.template?.usesFallback).toBe(true);
    const health = await app.handle(new Request("http://localhost/health"));
    expect(health.status).toBe(200);
    const models = (await (await app.handle(new Request("http://localhost/v1/models"))).json()) as { data: Array<{ id: string }> };
    expect(models.data.map((m) => m.id)).toEqual(["fake-model"]);
  });

  test("chat_completion_answers_with_the_engines_text_and_usage", async () => {
    const { post } = fakeApp();
    const res = await post("/v1/chat/completions", { model: "fake-model", messages: user("Hi") });
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      object: string;
      choices: Array<{ message: { content: string }; finish_reason: string }>;
      usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
    };
    expect(body.object).toBe("chat.completion");
    expect(body.choices[0]?.message.content).toBe(REPLY);
    expect(body.choices[0]?.finish_reason).toBe("stop");
    // One token per byte in the fake: the reply's bytes, and the rendered prompt around "Hi".
    expect(body.usage.completion_tokens).toBe(Buffer.byteLength(REPLY));
    expect(body.usage.prompt_tokens).toBeGreaterThan(2);
    expect(body.usage.prompt_tokens_details.cached_tokens).toBe(0);
    // The same conversation again comes from the fake's prefix cache.
    const again = (await (await post("/v1/chat/completions", { model: "fake-model", messages: user("Hi") })).json()) as typeof body;
    expect(again.usage.prompt_tokens_details.cached_tokens).toBe(again.usage.prompt_tokens - 1);
  });

  test("a_streamed_chat_completion_sends_the_text_as_sse_chunks_and_ends_with_done", async () => {
    const { post } = fakeApp();
    const res = await post("/v1/chat/completions", { model: "fake-model", messages: user("Hi"), stream: true, max_tokens: 5 });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/event-stream");
    const text = await res.text();
    const chunks = text
      .split("\n\n")
      .filter((l) => l.startsWith("data: {"))
      .map((l) => JSON.parse(l.slice(6)) as { choices: Array<{ delta: { content?: string }; finish_reason: string | null }> });
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? "").join("")).toBe(REPLY.slice(0, 5));
    expect(chunks.at(-1)?.choices[0]?.finish_reason).toBe("length");
    expect(text.endsWith("data: [DONE]\n\n")).toBe(true);
  });

  test("a_bad_field_is_a_400_naming_it", async () => {
    const { post } = fakeApp();
    const res = await post("/v1/chat/completions", { model: "fake-model", messages: [{ role: "wizard", content: "Hi" }] });
    expect(res.status).toBe(400);
    const body = (await res.json()) as { error: { code: string; param: string } };
    expect(body.error.code).toBe("invalid_value");
    expect(body.error.param).toBe("messages[0].role");
  });

  test("a_prompt_longer_than_the_context_is_a_400_context_length_exceeded", async () => {
    const { post } = fakeApp(new FakeEngine({ info: { nCtx: 64 } }));
    const res = await post("/v1/chat/completions", { model: "fake-model", messages: user("x".repeat(200)) });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("context_length_exceeded");
  });
});
