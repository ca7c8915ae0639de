// Model aliases (`mesh serve --alias`): a request by alias is served as the model and answered under
// the alias; /v1/models lists them; routing keys a request by alias under the model's id (shared
// cache), and sends it only to nodes that carry the alias.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { createApp } from "../../src/server/app";
import { meshModelOf, ROUTE_HEADER } from "../../src/server/mesh";
import { Metrics } from "../../src/server/metrics";
import { checkAliases } from "../../src/server/model";
import { testMeshHooks, workerRecord } from "../helpers/mesh";
import { startTestServer, type TestServer } from "../helpers/server";

const SELF = "a".repeat(32);
const PEER = "b".repeat(32);
const OTHER = "c".repeat(32);

type Listed = { id: string; status: string; alias_of?: string; aliases?: string[]; nodes?: Array<{ node_id: string }> };

/** An app over `models` (FakeEngines), with mesh hooks when given, and an OpenAI client that calls it in process. */
function fakeNode(models: ServedModel[], mesh?: ReturnType<typeof testMeshHooks>) {
  const app = createApp({ models, apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics(), mesh });
  const handle = (r: Request) => app.handle(r);
  const client = new OpenAI({
    baseURL: "http://localhost/v1",
    apiKey: "unused",
    maxRetries: 0,
    fetch: (url, init) => handle(new Request(url as string, init as RequestInit)),
  });
  const models_ = async () => ((await (await handle(new Request("http://localhost/v1/models"))).json()) as { data: Listed[] }).data;
  return { app, client, handle, models: models_ };
}

const hi = [{ role: "user" as const, content: "hi" }];

describe("aliases on one node", () => {
  let s: TestServer;
  beforeAll(async () => {
    s = await startTestServer({ aliases: ["gpt-4o", "my-model"] });
  });
  afterAll(async () => {
    await s?.close();
  });

  test("a_request_by_alias_is_served_and_answered_under_the_alias", async () => {
    const r = await s.client.chat.completions.create({ model: "gpt-4o", messages: hi, max_tokens: 3 });
    expect(r.model).toBe("gpt-4o");
    expect(r.usage?.completion_tokens).toBeGreaterThan(0);
    const stream = await s.client.chat.completions.create({
      model: "my-model",
      messages: hi,
      max_tokens: 3,
      stream: true,
      stream_options: { include_usage: true },
    });
    const names = new Set<string>();
    for await (const chunk of stream) names.add(chunk.model);
    expect([...names]).toEqual(["my-model"]);
    const c = await s.client.completions.create({ model: "gpt-4o", prompt: "Once", max_tokens: 2 });
    expect(c.model).toBe("gpt-4o");
    // By its id it answers under its id, as before.
    expect((await s.client.chat.completions.create({ model: "mesh-tiny", messages: hi, max_tokens: 1 })).model).toBe("mesh-tiny");
    const missing = await s.client.chat.completions
      .create({ model: "gpt-5", messages: hi })
      .catch((e: unknown) => e as InstanceType<typeof OpenAI.APIError>);
    expect((missing as InstanceType<typeof OpenAI.APIError>).status).toBe(404);
  });

  test("a_conversation_by_alias_continues_from_the_cache_by_id", async () => {
    const messages = [{ role: "system" as const, content: "You are a careful assistant. ".repeat(20) }, ...hi];
    const first = await s.client.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 2 });
    const second = await s.client.chat.completions.create({ model: "mesh-tiny", messages, max_tokens: 2 });
    expect(first.usage?.prompt_tokens).toBe(second.usage?.prompt_tokens);
    expect(second.usage?.prompt_tokens_details?.cached_tokens).toBeGreaterThan((second.usage?.prompt_tokens ?? 0) / 2);
  });

  test("models_lists_each_alias_as_an_entry_naming_its_model", async () => {
    const ids: string[] = [];
    for await (const m of s.client.models.list()) ids.push(m.id);
    expect(ids).toEqual(["mesh-tiny", "gpt-4o", "my-model"]);
    const data = ((await (await fetch(`${s.url}/v1/models`)).json()) as { data: Listed[] }).data;
    expect(data[0]).toMatchObject({ id: "mesh-tiny", status: "ready", aliases: ["gpt-4o", "my-model"] });
    expect(data[1]).toMatchObject({ id: "gpt-4o", status: "ready", alias_of: "mesh-tiny" });
  });

  test("the_tokenizer_endpoints_take_an_alias", async () => {
    const r = await fetch(`${s.url}/tokenize`, { method: "POST", body: JSON.stringify({ model: "gpt-4o", content: "hi" }) });
    expect(r.status).toBe(200);
    expect(((await r.json()) as { tokens: number[] }).tokens.length).toBeGreaterThan(0);
  });
});

describe("aliases across the mesh", () => {
  const servers: RunningServer[] = [];
  afterAll(async () => {
    for (const s of servers) await s.close();
  });

  function peer(id: string, model: ServedModel): RunningServer {
    const mesh = testMeshHooks({ nodeId: id });
    const s = startServer({ host: "127.0.0.1", port: 0, models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, mesh });
    servers.push(s);
    return s;
  }

  test("a_conversation_by_alias_and_by_id_shares_one_routing_key", async () => {
    let workers: WorkerInfo[] = [];
    const mesh = testMeshHooks({ nodeId: SELF, workers: () => workers });
    const engine = new FakeEngine({ reply: "hello" });
    // As a node does: what its engine's KV holds feeds the index under the model's id.
    engine.onTenancy((d) => mesh.router.onTenancy("mesh-tiny", d));
    workers = [workerRecord({ id: "w-self", nodeId: SELF, addr: "127.0.0.1:1", models: ["mesh-tiny", "gpt-4o"] })];
    const { client } = fakeNode([ServedModel.fromEngine("mesh-tiny", engine, ["gpt-4o"])], mesh);
    const messages = [{ role: "system" as const, content: "s".repeat(3000) }, ...hi];
    const r = await client.chat.completions.create({ model: "gpt-4o", messages });
    expect(r.model).toBe("gpt-4o");
    await Bun.sleep(0);
    // The index holds the conversation under the model's id only, and the next turn by id finds it here.
    expect(mesh.router.index.peek("gpt-4o")).toBeUndefined();
    expect(mesh.router.index.peek("mesh-tiny")).toBeDefined();
    const next = [...messages, { role: "assistant" as const, content: "hello" }, { role: "user" as const, content: "more" }];
    const d = mesh.router.decide("mesh-tiny", mesh.keyer.chat("mesh-tiny", next));
    const here = d?.ranked.find((c) => c.candidate.worker.nodeId === SELF)?.candidate;
    expect(here?.depth).toBeGreaterThan(0);
    expect(here?.leased).toBe(true);
  });

  test("a_peer_routes_a_request_for_an_alias_to_the_node_that_carries_it", async () => {
    const b = peer(PEER, ServedModel.fromEngine("mesh-tiny", new FakeEngine({ reply: "from b" }), ["gpt-4o"]));
    const onB = workerRecord({ id: "w-b", nodeId: PEER, addr: `127.0.0.1:${b.port}`, models: ["mesh-tiny", "gpt-4o"] });
    // C serves the same model without the alias: a request by alias never goes there.
    const onC = workerRecord({ id: "w-c", nodeId: OTHER, addr: "127.0.0.1:9", models: ["mesh-tiny"] });
    const a = fakeNode([], testMeshHooks({ nodeId: SELF, workers: () => [onC, onB] }));
    for (let i = 0; i < 4; i++) {
      const r = await a.client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: `q${i}` }] }).withResponse();
      expect(r.data.model).toBe("gpt-4o");
      expect(r.data.choices[0]?.message.content).toBe("from b");
      expect(r.response.headers.get(ROUTE_HEADER.servedBy)).toBe(PEER);
    }
    const listed = await a.models();
    expect(listed.find((m) => m.id === "gpt-4o")).toMatchObject({ status: "remote", alias_of: "mesh-tiny", nodes: [{ node_id: PEER }] });
    expect(listed.find((m) => m.id === "mesh-tiny")?.alias_of).toBeUndefined();
    // Without any node carrying it, the alias does not exist, though its model is served.
    const without = fakeNode([], testMeshHooks({ nodeId: SELF, workers: () => [onC] }));
    const missing = await without.client.chat.completions
      .create({ model: "gpt-4o", messages: hi })
      .catch((e: unknown) => e as InstanceType<typeof OpenAI.APIError>);
    expect((missing as InstanceType<typeof OpenAI.APIError>).status).toBe(404);
  });

  test("a_name_that_is_one_models_id_and_another_nodes_alias_means_the_model", () => {
    const workers = [
      workerRecord({ id: "w1", nodeId: PEER, addr: "127.0.0.1:1", models: ["qwen", "llama", "gpt"] }),
      workerRecord({ id: "w2", nodeId: OTHER, addr: "127.0.0.1:2", models: ["llama"] }),
    ];
    const mesh = testMeshHooks({ nodeId: SELF, workers: () => workers });
    expect(meshModelOf(mesh, "llama")).toBe("llama");
    expect(meshModelOf(mesh, "gpt")).toBe("qwen");
    expect(meshModelOf(mesh, "qwen")).toBe("qwen");
    expect(meshModelOf(mesh, "none")).toBeNull();
    expect(mesh.router.workersFor("llama").map((w) => w.id)).toEqual(["w2"]);
    expect(mesh.router.workersFor("qwen", "gpt").map((w) => w.id)).toEqual(["w1"]);
  });

  test("aliases_are_checked_before_serving", () => {
    expect(checkAliases(["gpt-4o", "gpt-4"], ["qwen"])).toBeNull();
    expect(checkAliases([""], ["qwen"])).toContain("empty");
    expect(checkAliases(["qwen"], ["qwen"])).toContain("id of a served model");
    expect(checkAliases(["a", "a"], ["qwen"])).toContain("twice");
    expect(checkAliases(["x".repeat(257)], ["qwen"])).toContain("limit");
    expect(checkAliases(["x".repeat(256)], ["qwen"])).toBeNull();
    expect(
      checkAliases(
        Array.from({ length: 16 }, (_, i) => `a${i}`),
        ["qwen"],
      ),
    ).toContain("at most 15");
  });
});
