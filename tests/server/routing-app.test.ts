// The routing path through the HTTP app, in process over FakeEngine (no llama.cpp): what a node
// answers when routing sends a request to a peer that refuses, fails or is gone, and the labels
// every answer carries. Regression tests for a review of the routing path.
import { afterEach, describe, expect, test } from "bun:test";
import { FakeEngine } from "../../src/engine/fake";
import { silentLogger } from "../../src/log";
import { DEFAULT_AUTHORITY, MeshAuthority, meshKeys } from "../../src/mesh/auth";
import type { WorkerInfo } from "../../src/mesh/wire";
import { Router } from "../../src/routing";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { createApp } from "../../src/server/app";
import { MeshGate } from "../../src/server/mesh-gate";
import { Metrics } from "../../src/server/metrics";
import { closedPort, TEST_SECRET, testMeshHooks, workerRecord } from "../helpers/mesh";

const SELF = "a".repeat(32);
const PEER = "b".repeat(32);
const OTHER = "c".repeat(32);
const servers: RunningServer[] = [];

afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
});

/** This node, in process: it serves mesh-tiny on a FakeEngine, and routes over `workers`. */
function node(workers: () => WorkerInfo[], engine = new FakeEngine({ reply: "hello" })) {
  const mesh = testMeshHooks({ nodeId: SELF, workers });
  const app = createApp({
    models: [ServedModel.fromEngine("mesh-tiny", engine)],
    apiKeys: [],
    maxBodyBytes: 64 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh,
  });
  const post = (body: unknown) =>
    app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: typeof body === "string" ? body : JSON.stringify(body),
      }),
    );
  return { mesh, post };
}

/** A peer on a real port, with the same mesh secret, serving `models` with a body limit of its own. */
function peer(id: string, models: ServedModel[], maxBodyBytes = 1 << 20): RunningServer {
  const hooks = testMeshHooks({ nodeId: id });
  const gate = new MeshGate(new MeshAuthority(meshKeys(TEST_SECRET), { ...DEFAULT_AUTHORITY, now: Date.now }), maxBodyBytes, silentLogger);
  const s = startServer({ host: "127.0.0.1", port: 0, models, apiKeys: [], maxBodyBytes, logger: silentLogger, mesh: { ...hooks, gate } });
  servers.push(s);
  return s;
}

// This node looks busy, so routing sends the request to the idle peer first.
const busySelf = () => workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1", slotsBusy: 2, queueDepth: 6 });
const onPort = (id: string, port: number, o: Partial<WorkerInfo> = {}) =>
  workerRecord({ id: `${id}-w`, nodeId: id, addr: `127.0.0.1:${port}`, ...o });
const chat = { model: "mesh-tiny", messages: [{ role: "user", content: "hello there" }] };

describe("routing through the app", () => {
  test("a_deeply_nested_tool_definition_is_a_400_before_routing_not_a_500_from_keying_it", async () => {
    const { post, mesh } = node(() => [busySelf()]);
    const deep = `${"[".repeat(100_000)}${"]".repeat(100_000)}`;
    const r = await post(
      `{"model":"mesh-tiny","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"x":${deep}}}}]}`,
    );
    expect(r.status).toBe(400);
    expect(((await r.json()) as { error: { param: string } }).error.param).toBe("tools");
    // Refused before routing: no decision was counted for it.
    expect(mesh.router.stats().byReason.only).toBe(0);
  });

  test("a_peer_that_refuses_does_not_answer_for_a_node_that_serves_the_model", async () => {
    const loading = ServedModel.start({ modelPath: "/nonexistent/never-loads.gguf", id: "mesh-tiny" });
    const cases: Array<[string, RunningServer]> = [
      ["stale record: the peer serves nothing (404)", peer(PEER, [])],
      ["the peer's engine is busy (429)", peer(PEER, [ServedModel.fromEngine("mesh-tiny", new FakeEngine({ maxInFlight: 0 }))])],
      ["the peer's model failed to load (503)", peer(PEER, [loading])],
      ["the peer's body limit is smaller (413)", peer(PEER, [ServedModel.fromEngine("mesh-tiny", new FakeEngine())], 200)],
    ];
    await loading.ready;
    for (const [what, b] of cases) {
      const { post, mesh } = node(() => [busySelf(), onPort(PEER, b.port as number)]);
      const r = await post({ ...chat, messages: [{ role: "user", content: `${what} ${"x".repeat(300)}` }] });
      expect({ what, status: r.status }).toEqual({ what, status: 200 });
      expect(r.headers.get("x-mesh-served-by")).toBe(SELF);
      expect(mesh.forwarder.stats().ranHere).toBe(1);
    }
  });

  test("after_a_dead_peer_the_retry_runs_here_when_this_node_ranks_next", async () => {
    const c = peer(OTHER, [ServedModel.fromEngine("mesh-tiny", new FakeEngine())]);
    const dead = await closedPort();
    const { post } = node(() => [
      workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1", slotsBusy: 1 }),
      onPort(PEER, dead),
      onPort(OTHER, c.port as number, { slotsBusy: 2, queueDepth: 20 }),
    ]);
    const r = await post(chat);
    expect(r.status).toBe(200);
    expect(r.headers.get("x-mesh-served-by")).toBe(SELF);
  });

  test("without_this_node_serving_it_a_peers_refusal_is_still_relayed", async () => {
    const b = peer(PEER, []);
    const mesh = testMeshHooks({ nodeId: SELF, workers: () => [onPort(PEER, b.port as number)] });
    const app = createApp({ models: [], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics(), mesh });
    const r = await app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(chat),
      }),
    );
    expect(r.status).toBe(404);
    // A single candidate elsewhere: no contest, sent where the model is (x-mesh-route names local, cache, load or split).
    expect(r.headers.get("x-mesh-route")).toBe("load");
  });

  test("the_lease_follows_the_node_that_really_ran_the_request", async () => {
    const b = peer(PEER, [ServedModel.fromEngine("mesh-tiny", new FakeEngine({ maxInFlight: 0 }))]);
    const { post, mesh } = node(() => [busySelf(), onPort(PEER, b.port as number)]);
    const messages = [{ role: "system", content: "s".repeat(4000) }, chat.messages[0]];
    expect((await post({ ...chat, messages })).headers.get("x-mesh-served-by")).toBe(SELF);
    // The next turn's decision: the lease now names this node (which ran it), not the peer that refused.
    const next = mesh.router.decide(
      "mesh-tiny",
      mesh.keyer.chat("mesh-tiny", [...(messages as never[]), { role: "assistant", content: "hello" }, { role: "user", content: "more" }]),
    );
    expect(next?.ranked.find((c) => c.candidate.leased)?.candidate.worker.nodeId).toBe(SELF);
  });

  test("an_error_answer_produced_here_still_says_where_it_ran", async () => {
    const { post } = node(() => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1" })], new FakeEngine({ maxInFlight: 0 }));
    const r = await post(chat);
    expect(r.status).toBe(429);
    expect(r.headers.get("x-mesh-served-by")).toBe(SELF);
    expect(r.headers.get("x-mesh-node")).toBe(SELF);
    expect(r.headers.get("x-mesh-route")).toBe("local");
  });

  test("a_request_while_this_nodes_own_worker_record_still_says_loading_runs_here_regression_503", async () => {
    // The first request right after the engine is ready can beat the worker record's update: the record is
    // listed (loading) but, as on a real node, not routable, so routing sees no worker at all.
    const { post, mesh } = node(() => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1", health: "loading" })]);
    mesh.router = new Router({ selfId: SELF, workers: () => [] });
    const r = await post(chat);
    expect(r.status).toBe(200);
    expect(r.headers.get("x-mesh-served-by")).toBe(SELF);
  });

  test("a_model_served_only_by_loading_peers_is_503_model_unavailable_not_404", async () => {
    const mesh = testMeshHooks({
      nodeId: SELF,
      workers: () => [workerRecord({ id: "w", nodeId: PEER, addr: "127.0.0.1:2", health: "loading" })],
    });
    const app = createApp({ models: [], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics(), mesh });
    const r = await app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(chat),
      }),
    );
    expect(r.status).toBe(503);
    expect(((await r.json()) as { error: { code: string } }).error.code).toBe("model_unavailable");
    expect(r.headers.get("retry-after")).toBe("5");
  });
});
