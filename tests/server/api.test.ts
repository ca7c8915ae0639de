import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { silentLogger } from "../../src/log";
import { startServer } from "../../src/server";
import { startTestServer, type TestServer } from "../helpers/server";

let s: TestServer;
beforeAll(async () => {
  s = await startTestServer();
});
afterAll(async () => {
  await s?.close();
});

const user = (content: string) => [{ role: "user" as const, content }];
const post = (path: string, body: string, headers: Record<string, string> = {}) =>
  fetch(`${s.url}${path}`, { method: "POST", body, headers: { "content-type": "application/json", ...headers } });

describe("OpenAI API with the official client", () => {
  test("chat_completion_returns_text_and_usage", async () => {
    const r = await s.client.chat.completions.create({ model: "mesh-tiny", messages: user("Hello"), max_tokens: 6, temperature: 0 });
    expect(r.object).toBe("chat.completion");
    expect(r.choices[0]?.message.role).toBe("assistant");
    expect(typeof r.choices[0]?.message.content).toBe("string");
    expect(r.choices[0]?.finish_reason).toBe("length");
    expect(r.usage?.completion_tokens).toBe(6);
    expect(r.usage?.total_tokens).toBe((r.usage?.prompt_tokens ?? 0) + 6);
    expect(r.usage?.prompt_tokens_details?.cached_tokens).toBeNumber();
  });

  test("streamed_chat_matches_non_streamed_and_reports_cached_tokens_on_a_repeated_prefix", async () => {
    const messages = [
      { role: "system" as const, content: "You are a careful assistant. ".repeat(30) },
      { role: "user" as const, content: "Tell me a story." },
    ];
    const whole = await s.client.chat.completions.create({ model: "mesh-tiny", messages, max_tokens: 12, temperature: 0 });
    const stream = await s.client.chat.completions.create({
      model: "mesh-tiny",
      messages,
      max_tokens: 12,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    let chunks = 0;
    for await (const c of stream) {
      chunks++;
      text += c.choices[0]?.delta.content ?? "";
      finish = c.choices[0]?.finish_reason ?? finish;
      if (c.usage) usage = c.usage;
    }
    expect(chunks).toBeGreaterThan(3);
    expect(text).toBe(whole.choices[0]?.message.content ?? "");
    expect(finish).toBe("length");
    expect(usage?.completion_tokens).toBe(12);
    // The second request repeats the whole prompt: all but its last token come from the KV cache.
    expect(usage?.prompt_tokens_details?.cached_tokens).toBe((usage?.prompt_tokens ?? 0) - 1);
  });

  test("completions_endpoint_generates_from_a_raw_prompt", async () => {
    const r = await s.client.completions.create({ model: "mesh-tiny", prompt: "Once upon a time", max_tokens: 5, temperature: 0 });
    expect(r.object).toBe("text_completion");
    expect(typeof r.choices[0]?.text).toBe("string");
    expect(r.usage?.completion_tokens).toBe(5);
    const streamed = await s.client.completions.create({
      model: "mesh-tiny",
      prompt: "Once upon a time",
      max_tokens: 5,
      temperature: 0,
      stream: true,
    });
    let text = "";
    for await (const c of streamed) text += c.choices[0]?.text ?? "";
    expect(text).toBe(r.choices[0]?.text ?? "");
  });

  test("models_lists_the_served_model_with_its_context_and_status", async () => {
    const list = await s.client.models.list();
    const m = list.data.find((x) => x.id === "mesh-tiny") as unknown as Record<string, unknown>;
    expect(m).toBeDefined();
    expect(m.owned_by).toBe("mesh");
    expect(m.status).toBe("ready");
    expect(m.context_length).toBe(4096);
    expect(m.random_weights).toBe(true);
  });

  test("stop_sequence_and_seed_are_honoured", async () => {
    const a = await s.client.chat.completions.create({
      model: "mesh-tiny",
      messages: user("seeded"),
      max_tokens: 8,
      temperature: 0.9,
      seed: 5,
    });
    expect(a.choices[0]?.message.content?.length).toBeGreaterThan(0);
    const text = a.choices[0]?.message.content ?? "";
    const stop = text.slice(2, 4);
    const b = await s.client.chat.completions.create({ model: "mesh-tiny", messages: user("greedy"), max_tokens: 8, temperature: 0 });
    const g = b.choices[0]?.message.content ?? "";
    const cut = await s.client.chat.completions.create({
      model: "mesh-tiny",
      messages: user("greedy"),
      max_tokens: 8,
      temperature: 0,
      stop: [g.slice(3, 5)],
    });
    expect(cut.choices[0]?.message.content).toBe(g.slice(0, g.indexOf(g.slice(3, 5))));
    expect(cut.choices[0]?.finish_reason).toBe("stop");
    expect(stop.length).toBe(2);
  });

  test("health_is_ok_when_the_model_is_ready", async () => {
    const r = await fetch(`${s.url}/health`);
    expect(r.status).toBe(200);
    expect(((await r.json()) as { status: string }).status).toBe("ok");
  });

  test("system_and_tool_messages_reach_the_prompt_even_when_the_template_has_no_place_for_them", async () => {
    // The tiny model's phi-3 template renders only user and assistant turns; they used to be dropped silently.
    const ask = (messages: OpenAI.Chat.ChatCompletionMessageParam[]) =>
      s.client.chat.completions.create({ model: "mesh-tiny", messages, max_tokens: 1, temperature: 0 });
    const bare = await ask([{ role: "user", content: "Hi" }]);
    const withSystem = await ask([
      { role: "system", content: "Follow these rules carefully and answer briefly." },
      { role: "user", content: "Hi" },
    ]);
    expect(withSystem.usage?.prompt_tokens).toBeGreaterThan((bare.usage?.prompt_tokens ?? 0) + 5);
    const withTool = await ask([
      { role: "user", content: "Hi" },
      { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "lookup", arguments: "{}" } }] },
      { role: "tool", tool_call_id: "c1", content: "a large tool result ".repeat(20) },
    ]);
    expect(withTool.usage?.prompt_tokens).toBeGreaterThan((bare.usage?.prompt_tokens ?? 0) + 60);
  });

  test("metrics_expose_requests_tokens_latency_slots_and_kv", async () => {
    const text = await (await fetch(`${s.url}/metrics`)).text();
    expect(text).toContain('mesh_http_requests_total{route="/v1/chat/completions",status="200"}');
    expect(text).toMatch(/mesh_completion_tokens_total \d+/);
    expect(text).toContain("mesh_time_to_first_token_seconds_bucket");
    expect(text).toContain("mesh_time_per_output_token_seconds_count");
    expect(text).toMatch(/mesh_slots_total 2/);
    expect(text).toMatch(/mesh_kv_cells_total 4096/);
    expect(text).toMatch(/mesh_kv_cells\{state="running"\} \d+/);
    for (const op of ["save", "restore", "idle_restore", "restore_failed", "evict"]) {
      expect(text).toMatch(new RegExp(`mesh_host_cache_operations_total\\{op="${op}"\\} \\d+`));
    }
  });
});

describe("errors in OpenAI's shape", () => {
  const errorOf = async (r: Response) => {
    const body = (await r.json()) as { error: { message: string; type: string; param: string | null; code: string | null } };
    expect(JSON.stringify(body)).not.toContain("    at ");
    return body.error;
  };

  test("malformed_json_is_400_invalid_json", async () => {
    const r = await post("/v1/chat/completions", "{not json");
    expect(r.status).toBe(400);
    expect((await errorOf(r)).code).toBe("invalid_json");
  });

  test("schema_violation_is_400_naming_the_field", async () => {
    const r = await post("/v1/chat/completions", JSON.stringify({ model: "mesh-tiny", messages: [{ role: "robot", content: "hi" }] }));
    expect(r.status).toBe(400);
    const e = await errorOf(r);
    expect(e.param).toBe("messages[0].role");
    expect(e.message).toContain("role");
    const r2 = await post("/v1/chat/completions", JSON.stringify({ model: "mesh-tiny", messages: user("x"), temperature: 9 }));
    expect((await errorOf(r2)).param).toBe("temperature");
    const r3 = await post("/v1/chat/completions", JSON.stringify({ model: "mesh-tiny" }));
    expect((await errorOf(r3)).param).toBe("messages");
  });

  test("deeply_nested_tool_parameters_are_400_naming_tools_before_the_template_overflows", async () => {
    const deep = (n: number) => `${'{"a":'.repeat(n)}1${"}".repeat(n)}`;
    const body = (params: string, choice = '"auto"') =>
      `{"model":"mesh-tiny","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"tool_choice":${choice},` +
      `"tools":[{"type":"function","function":{"name":"f","parameters":${params}}}]}`;
    const r = await post("/v1/chat/completions", body(deep(5000)));
    expect(r.status).toBe(400);
    const e = await errorOf(r);
    expect(e.param).toBe("tools");
    expect(e.message).toContain("tools[0].function.parameters.a");
    expect(e.message).toContain("nested deeper than 64 levels");
    const r2 = await post("/v1/chat/completions", body("{}", deep(5000)));
    expect(r2.status).toBe(400);
    expect((await errorOf(r2)).param).toBe("tool_choice");
    // A realistic schema depth is fine.
    const ok = await post("/v1/chat/completions", body(deep(20)));
    expect(ok.status).toBe(200);
  });

  test("unknown_model_is_404_model_not_found", async () => {
    const err = await s.client.chat.completions.create({ model: "no-such-model", messages: user("hi") }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect((err as InstanceType<typeof OpenAI.NotFoundError>).code).toBe("model_not_found");
  });

  test("n_other_than_one_is_400", async () => {
    const err = await s.client.chat.completions.create({ model: "mesh-tiny", messages: user("hi"), n: 2 }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe("n");
  });

  test("prompt_over_the_context_is_400_with_the_limits_streaming_or_not", async () => {
    const huge = "word ".repeat(5000);
    for (const stream of [false, true]) {
      const r = await post("/v1/chat/completions", JSON.stringify({ model: "mesh-tiny", messages: user(huge), stream }));
      expect(r.status).toBe(400);
      const e = await errorOf(r);
      expect(e.code).toBe("context_length_exceeded");
      expect(e.message).toContain("4096");
    }
  });

  test("body_over_the_cap_is_413", async () => {
    const r = await post("/v1/chat/completions", JSON.stringify({ model: "mesh-tiny", messages: user("x".repeat(2 * 1024 * 1024)) }));
    expect(r.status).toBe(413);
    expect((await errorOf(r)).code).toBe("request_too_large");
  });

  test("unknown_route_is_404_in_openai_shape", async () => {
    const r = await fetch(`${s.url}/v1/nope`);
    expect(r.status).toBe(404);
    expect((await errorOf(r)).code).toBe("not_found");
  });
});

describe("streams and clients", () => {
  test("client_disconnect_mid_stream_cancels_and_frees_the_slot", async () => {
    const abort = new AbortController();
    const r = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: user("go on forever"), max_tokens: 3000, ignore_eos: true, stream: true }),
      signal: abort.signal,
    });
    const reader = r.body?.getReader();
    await reader?.read();
    await reader?.read();
    expect(s.model.engine?.inFlight).toBe(1);
    abort.abort();
    for (let i = 0; i < 200 && (s.model.engine?.inFlight ?? 0) > 0; i++) await Bun.sleep(10);
    expect(s.model.engine?.inFlight).toBe(0);
    expect((await s.model.engine?.stats())?.slotsBusy).toBe(0);
  });
});

describe("API keys", () => {
  test("without_a_valid_key_requests_get_401_and_health_stays_open", async () => {
    const secured = await startTestServer({ apiKeys: ["k-one", "k-two"] });
    try {
      const anon = new OpenAI({ baseURL: `${secured.url}/v1`, apiKey: "wrong", maxRetries: 0 });
      const err = await anon.models.list().catch((e) => e);
      expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
      const none = await fetch(`${secured.url}/v1/models`);
      expect(none.status).toBe(401);
      expect((await fetch(`${secured.url}/health`)).status).toBe(200);
      const ok = await secured.client.chat.completions.create({ model: "mesh-tiny", messages: user("hi"), max_tokens: 2 });
      expect(ok.usage?.completion_tokens).toBe(2);
      const second = new OpenAI({ baseURL: `${secured.url}/v1`, apiKey: "k-two", maxRetries: 0 });
      expect((await second.models.list()).data.length).toBe(1);
      // Refused requests are answered before routing and still counted.
      const metrics = await (await fetch(`${secured.url}/metrics`, { headers: { authorization: "Bearer k-one" } })).text();
      expect(metrics).toContain('mesh_http_requests_total{route="/v1/models",status="401"} 2');
    } finally {
      await secured.close();
    }
  });
});

describe("review findings", () => {
  test("a_second_server_on_a_port_in_use_fails_instead_of_sharing_it", () => {
    let err: unknown = null;
    try {
      const dup = startServer({
        host: "127.0.0.1",
        port: s.server.port,
        models: [s.model],
        apiKeys: [],
        maxBodyBytes: 1024,
        logger: silentLogger,
      });
      void dup.close();
    } catch (e) {
      err = e;
    }
    expect((err as { code?: string } | null)?.code).toBe("EADDRINUSE");
  });

  test("a_request_cut_short_by_shutdown_is_503_not_a_finished_answer", async () => {
    const t = await startTestServer({ nParallel: 1 });
    try {
      const pending = fetch(`${t.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "mesh-tiny", messages: user("long"), max_tokens: 3500, ignore_eos: true }),
      });
      for (let i = 0; i < 500 && (t.model.engine?.inFlight ?? 0) === 0; i++) await Bun.sleep(5);
      await t.model.engine?.close();
      const r = await pending;
      expect(r.status).toBe(503);
      const body = (await r.json()) as { error: { code: string } };
      expect(body.error.code).toBe("model_unavailable");
      expect(r.headers.get("retry-after")).not.toBeNull();
    } finally {
      await t.server.close();
    }
  });
});
