// The tokenizer endpoints (/tokenize, /detokenize, /apply-template): over the fake engine through
// app.handle() for their shapes, errors, model choice and forwarding; then on the tiny model, where
// llama.cpp tokenizes, for what a real tokenizer does with them.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { createApp } from "../../src/server/app";
import { Metrics } from "../../src/server/metrics";
import { challengingServer, testMeshHooks, workerRecord } from "../helpers/mesh";
import { startTestServer, type TestServer } from "../helpers/server";

const SELF = "a".repeat(32);
const PEER = "b".repeat(32);
const OTHER = "c".repeat(32);

type Err = { error: { message: string; code: string; param: string | null } };

function fakeApp(o: { models?: ServedModel[]; maxBodyBytes?: number; mesh?: ReturnType<typeof testMeshHooks> } = {}) {
  const models = o.models ?? [ServedModel.fromEngine("fake-model", new FakeEngine({ reply: "ok" }))];
  const app = createApp({
    models,
    apiKeys: [],
    maxBodyBytes: o.maxBodyBytes ?? 1 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh: o.mesh,
  });
  const post = (path: string, body: unknown) => {
    const text = typeof body === "string" ? body : JSON.stringify(body);
    const headers = { "content-type": "application/json", "content-length": String(Buffer.byteLength(text)) };
    return app.handle(new Request(`http://localhost${path}`, { method: "POST", headers, body: text }));
  };
  return { app, post };
}

const TEXT = "añ🎉 hello";

describe("tokenizer endpoints over the fake engine", () => {
  test("tokenize_then_detokenize_round_trips_text", async () => {
    const { post } = fakeApp();
    const t = await post("/tokenize", { content: TEXT });
    expect(t.status).toBe(200);
    const { tokens } = (await t.json()) as { tokens: number[] };
    // The fake tokenizes one token per UTF-8 byte.
    expect(tokens).toEqual(Array.from(Buffer.from(TEXT)));
    const d = await post("/detokenize", { tokens });
    expect(d.status).toBe(200);
    expect(await d.json()).toEqual({ content: TEXT });
  });

  test("with_pieces_gives_each_id_with_its_text_or_its_bytes_when_it_is_part_of_a_character", async () => {
    const { post } = fakeApp();
    const r = (await (await post("/tokenize", { content: "añ", with_pieces: true })).json()) as {
      tokens: Array<{ id: number; piece: string | number[] }>;
    };
    expect(r.tokens).toEqual([
      { id: 97, piece: "a" },
      { id: 0xc3, piece: [0xc3] },
      { id: 0xb1, piece: [0xb1] },
    ]);
  });

  test("an_invalid_token_id_is_a_400_naming_tokens_i", async () => {
    const { post } = fakeApp();
    for (const [tokens, param] of [
      [[104, 1_000_000], "tokens[1]"],
      [[104, 105, -1], "tokens[2]"],
      [[1.5], "tokens[0]"],
      [[104, "x"], "tokens[1]"],
      [[104, "105"], "tokens[1]"],
    ] as const) {
      const r = await post("/detokenize", { tokens });
      expect({ tokens, status: r.status }).toEqual({ tokens, status: 400 });
      const e = ((await r.json()) as Err).error;
      expect(e.param).toBe(param);
      expect(e.code).toBe("invalid_value");
    }
  });

  test("a_bad_or_missing_field_is_a_400_naming_it_and_a_body_over_the_limit_is_413", async () => {
    const { post } = fakeApp({ maxBodyBytes: 4096 });
    const cases: Array<[string, unknown, string]> = [
      ["/tokenize", {}, "content"],
      ["/tokenize", { content: 5 }, "content"],
      ["/tokenize", { content: "x", with_pieces: "yes" }, "with_pieces"],
      ["/detokenize", {}, "tokens"],
      ["/detokenize", { tokens: "1 2" }, "tokens"],
      ["/apply-template", { messages: "hi" }, "messages"],
      ["/apply-template", {}, "messages"],
      ["/apply-template", { messages: [{ role: "wizard", content: "hi" }] }, "messages[0].role"],
      ["/tokenize", { content: "x", model: "" }, "model"],
    ];
    for (const [path, body, param] of cases) {
      const r = await post(path, body);
      expect({ path, body, status: r.status }).toEqual({ path, body, status: 400 });
      expect(((await r.json()) as Err).error.param).toBe(param);
    }
    const notJson = await post("/tokenize", "{nope");
    expect(notJson.status).toBe(400);
    expect(((await notJson.json()) as Err).error.code).toBe("invalid_json");
    const big = await post("/tokenize", { content: "x".repeat(8192) });
    expect(big.status).toBe(413);
    expect(((await big.json()) as Err).error.code).toBe("request_too_large");
  });

  test("apply_template_renders_the_prompt_the_chat_route_runs", async () => {
    const { post } = fakeApp();
    const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object", properties: {} } } }];
    for (const body of [
      { messages: [{ role: "user", content: "Hi" }] },
      {
        messages: [
          { role: "developer", content: "Be brief." },
          { role: "user", content: "Weather?" },
        ],
        tools,
      },
    ]) {
      const r = await post("/apply-template", body);
      expect(r.status).toBe(200);
      const { prompt } = (await r.json()) as { prompt: string };
      expect(prompt).toContain(body.messages.at(-1)?.content as string);
      const chat = (await (await post("/v1/chat/completions", { ...body, model: "fake-model" })).json()) as {
        usage: { prompt_tokens: number };
      };
      // One token per byte in the fake: the chat route ran exactly this text.
      expect(Buffer.byteLength(prompt)).toBe(chat.usage.prompt_tokens);
    }
  });

  test("model_picks_among_the_served_models_defaulting_to_the_first_and_an_unknown_one_is_404", async () => {
    const calls = { a: 0, b: 0 };
    const spy = (name: "a" | "b") => {
      const e = new FakeEngine();
      const tokenize = e.tokenize.bind(e);
      e.tokenize = (text, opts) => {
        calls[name]++;
        return tokenize(text, opts);
      };
      return e;
    };
    const { post } = fakeApp({ models: [ServedModel.fromEngine("a", spy("a")), ServedModel.fromEngine("b", spy("b"), ["b-alias"])] });
    expect((await post("/tokenize", { content: "x" })).status).toBe(200);
    expect(calls).toEqual({ a: 1, b: 0 });
    expect((await post("/tokenize", { content: "x", model: "b" })).status).toBe(200);
    expect((await post("/tokenize", { content: "x", model: "b-alias" })).status).toBe(200);
    expect(calls).toEqual({ a: 1, b: 2 });
    const r = await post("/tokenize", { content: "x", model: "nope" });
    expect(r.status).toBe(404);
    expect(((await r.json()) as Err).error).toMatchObject({ code: "model_not_found", param: "model" });
  });

  test("a_model_that_is_not_ready_is_503", async () => {
    const loading = ServedModel.start({ modelPath: "/nonexistent/never-loads.gguf", id: "slow" });
    const { post } = fakeApp({ models: [loading] });
    await loading.ready;
    const r = await post("/detokenize", { tokens: [1] });
    expect(r.status).toBe(503);
    expect(((await r.json()) as Err).error.code).toBe("model_unavailable");
  });
});

describe("tokenizer endpoints across the mesh", () => {
  const servers: RunningServer[] = [];
  afterAll(async () => {
    for (const s of servers) await s.close();
  });

  /** A peer on a real port serving `models` on fake engines, routing over `workers`. */
  function peer(id: string, models: ServedModel[], workers: () => WorkerInfo[] = () => []): RunningServer {
    const s = startServer({
      host: "127.0.0.1",
      port: 0,
      models,
      apiKeys: [],
      maxBodyBytes: 1 << 20,
      logger: silentLogger,
      mesh: testMeshHooks({ nodeId: id, workers }),
    });
    servers.push(s);
    return s;
  }

  test("a_model_this_node_does_not_serve_is_tokenized_by_a_peer_that_does", async () => {
    const b = peer(PEER, [ServedModel.fromEngine("far-model", new FakeEngine(), ["far-alias"])]);
    const onB = workerRecord({ id: "w-b", nodeId: PEER, addr: `127.0.0.1:${b.port}`, models: ["far-model", "far-alias"] });
    const { post } = fakeApp({ mesh: testMeshHooks({ nodeId: SELF, workers: () => [onB] }) });
    for (const model of ["far-model", "far-alias"]) {
      const t = await post("/tokenize", { model, content: "hi" });
      expect(t.status).toBe(200);
      expect(await t.json()).toEqual({ tokens: [104, 105] });
    }
    const d = await post("/detokenize", { model: "far-alias", tokens: [104, 105] });
    expect(await d.json()).toEqual({ content: "hi" });
    const a = await post("/apply-template", { model: "far-model", messages: [{ role: "user", content: "hi" }] });
    expect(a.status).toBe(200);
    expect(((await a.json()) as { prompt: string }).prompt).toContain("hi");
    // A bad id is the serving node's 400, relayed as it is.
    const bad = await post("/detokenize", { model: "far-model", tokens: [104, 999] });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as Err).error.param).toBe("tokens[1]");
  });

  test("a_forwarded_tokenizer_request_is_never_forwarded_again", async () => {
    // C would answer anything; B wrongly believes C serves "ghost", and A believes B does.
    const seen: string[] = [];
    const c = challengingServer(async (r) => {
      seen.push(await r.text());
      return Response.json({ tokens: [1] });
    });
    const onC = workerRecord({ id: "w-c", nodeId: OTHER, addr: `127.0.0.1:${c.port}`, models: ["ghost"] });
    const b = peer(PEER, [], () => [onC]);
    const onB = workerRecord({ id: "w-b", nodeId: PEER, addr: `127.0.0.1:${b.port}`, models: ["ghost"] });
    const { post } = fakeApp({ models: [], mesh: testMeshHooks({ nodeId: SELF, workers: () => [onB] }) });
    const r = await post("/tokenize", { model: "ghost", content: "hi" });
    c.stop(true);
    expect(r.status).toBe(404);
    expect(((await r.json()) as Err).error.code).toBe("model_not_found");
    expect(seen).toEqual([]);
  });

  test("no_node_serving_the_model_is_404_and_only_loading_ones_503", async () => {
    const loading = workerRecord({ id: "w-b", nodeId: PEER, addr: "127.0.0.1:9", models: ["slow"], health: "loading" });
    const { post } = fakeApp({ models: [], mesh: testMeshHooks({ nodeId: SELF, workers: () => [loading] }) });
    expect((await post("/tokenize", { model: "nowhere", content: "x" })).status).toBe(404);
    const r = await post("/tokenize", { model: "slow", content: "x" });
    expect(r.status).toBe(503);
    expect(((await r.json()) as Err).error.code).toBe("model_unavailable");
    // A node serving nothing needs to be told which model.
    const none = await post("/tokenize", { content: "x" });
    expect(none.status).toBe(400);
    expect(((await none.json()) as Err).error.param).toBe("model");
  });
});

describe("tokenizer endpoints on the tiny model", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer();
  });
  afterAll(async () => {
    await s?.close();
  });

  const post = async (path: string, body: unknown) => {
    const r = await fetch(`${s.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: (await r.json()) as Record<string, unknown> };
  };

  test("tokenize_then_detokenize_round_trips_text_on_a_real_tokenizer", async () => {
    for (const content of ["Hello world", "  two leading spaces, ñ and 🎉\nnew line", "x"]) {
      const t = await post("/tokenize", { content });
      const tokens = t.body.tokens as number[];
      expect(tokens.length).toBeGreaterThan(0);
      expect((await post("/detokenize", { tokens })).body.content).toBe(content);
    }
  });

  test("add_special_adds_the_bos_and_pieces_show_each_tokens_text", async () => {
    const plain = (await post("/tokenize", { content: "Hello world" })).body.tokens as number[];
    const special = (await post("/tokenize", { content: "Hello world", add_special: true })).body.tokens as number[];
    if (s.model.info?.addBos) expect(special).toEqual([s.model.info.bos, ...plain]);
    const pieces = (await post("/tokenize", { content: "Hello world", with_pieces: true })).body.tokens as Array<{
      id: number;
      piece: string;
    }>;
    expect(pieces.map((p) => p.id)).toEqual(plain);
    expect(
      pieces
        .map((p) => p.piece)
        .join("")
        .trim(),
    ).toBe("Hello world");
  });

  test("apply_template_prompt_tokenizes_to_the_chat_responses_prompt_tokens", async () => {
    const tools = [{ type: "function", function: { name: "lookup", description: "Look it up", parameters: { type: "object" } } }];
    for (const extra of [{}, { tools }]) {
      const body = {
        messages: [
          { role: "system", content: "Be brief." },
          { role: "user", content: "Hello there" },
        ],
        ...extra,
      };
      const prompt = (await post("/apply-template", body)).body.prompt as string;
      const tokens = (await post("/tokenize", { content: prompt, add_special: true })).body.tokens as number[];
      const chat = await s.client.chat.completions.create({ model: "mesh-tiny", max_tokens: 1, ...body } as never);
      expect(tokens.length).toBe((chat as { usage: { prompt_tokens: number } }).usage.prompt_tokens);
      // Rendered special tokens come back as their text: the templated prompt round-trips.
      expect((await post("/detokenize", { tokens })).body.content).toBe(`${s.model.info?.addBos ? s.model.info.bosText : ""}${prompt}`);
    }
  });

  test("an_out_of_range_token_is_a_400_naming_it_on_the_real_engine", async () => {
    const r = await post("/detokenize", { tokens: [1, s.model.info?.nVocab ?? 0] });
    expect(r.status).toBe(400);
    expect((r.body.error as Err["error"]).param).toBe("tokens[1]");
  });
});
