// The console's routes and guard through app.handle(), over the fake engine.
import { describe, expect, test } from "bun:test";
import { FakeEngine } from "../../../src/engine/fake";
import { silentLogger } from "../../../src/log";
import { createApp } from "../../../src/server/app";
import { Console, type ConsoleOptions } from "../../../src/server/console";
import type { Route } from "../../../src/server/mesh";
import { Metrics } from "../../../src/server/metrics";
import { ServedModel } from "../../../src/server/model";
import { closedPort, testMeshHooks, workerRecord } from "../../helpers/mesh";

const SELF = "c".repeat(32);
const SECRET_TEXT = "the launch codes are 0000";

function consoleApp(o: { console?: ConsoleOptions; keys?: string[] } = {}) {
  const model = ServedModel.fromEngine("mesh-tiny", new FakeEngine({ reply: "hello there" }));
  const mesh = testMeshHooks({
    nodeId: SELF,
    workers: () => [workerRecord({ id: `${SELF}-w`, nodeId: SELF, addr: "127.0.0.1:1" })],
    apiKeyRequired: (o.keys ?? []).length > 0,
  });
  const app = createApp({
    models: [model],
    apiKeys: o.keys ?? [],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    metrics: new Metrics(),
    mesh,
    ...(o.console ? { console: o.console } : {}),
  });
  const get = (path: string, headers: Record<string, string> = {}) => app.handle(new Request(`http://localhost${path}`, { headers }));
  const chat = (body: object, headers: Record<string, string> = {}) =>
    app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: SECRET_TEXT }], max_tokens: 4, ...body }),
      }),
    );
  return { app, get, chat };
}

const DATA = ["/api/requests", "/api/events", "/api/mesh", "/api/node", "/api/cache"];

describe("console routes", () => {
  test("the_page_is_one_html_document_with_everything_inline", async () => {
    const { get } = consoleApp();
    const r = await get("/", { "accept-encoding": "gzip" });
    expect(r.status).toBe(200);
    expect(r.headers.get("content-type")).toContain("text/html");
    expect(r.headers.get("content-encoding")).toBe("gzip");
    const plain = await (await get("/")).text();
    expect(plain).toContain("<title>mesh console</title>");
    expect(plain).not.toMatch(/<script[^>]+src=|<link[^>]+href=|https?:\/\/(?!www\.w3\.org)/);
  }, 30_000);

  test("every_answer_says_which_node_served_it_and_how_it_was_routed", async () => {
    const { get, chat } = consoleApp();
    for (const path of ["/health", "/v1/models", "/api/node", "/no/such/route"]) {
      const r = await get(path);
      expect(r.headers.get("x-mesh-node")).toBe(SELF);
      expect(r.headers.get("x-mesh-route")).toBe("local");
    }
    const c = await chat({});
    expect(c.headers.get("x-mesh-node")).toBe(SELF);
    expect(c.headers.get("x-mesh-route")).toBe("local");
  });

  test("a_routed_request_is_logged_with_routings_decision_and_its_real_figures_but_never_its_prompt_text", async () => {
    const { get, chat } = consoleApp();
    await (await chat({})).json();
    await (await chat({ stream: true, stream_options: { include_usage: true } })).text();
    // Statuses are settled after the answers left (onAfterResponse): look until both records are done.
    let list: { data: Array<Record<string, unknown>> } = { data: [] };
    for (let i = 0; i < 200 && !(list.data.length === 2 && list.data.every((r) => r.done)); i++) {
      list = (await (await get("/api/requests")).json()) as { data: Array<Record<string, unknown>> };
      await Bun.sleep(10);
    }
    expect(list.data).toHaveLength(2);
    for (const r of list.data) {
      expect(r).toMatchObject({ entry: SELF, servedBy: SELF, model: "mesh-tiny", route: "local", status: 200, done: true });
      expect(r.promptTokens).toBeGreaterThan(0);
      expect(r.completionTokens).toBe(4);
      expect((r.explanation as { candidates: unknown[] }).candidates).toHaveLength(1);
    }
    expect(JSON.stringify(list)).not.toContain("launch codes");
    const one = await get(`/api/requests/${list.data[0]?.id}`);
    expect(((await one.json()) as { id: string }).id).toBe(list.data[0]?.id as string);
    const node = (await (await get("/api/node")).json()) as { totals: { requests: number }; models: Array<{ kv: unknown }> };
    expect(node.totals.requests).toBe(2);
  });

  test("a_request_that_routing_could_not_place_is_logged_with_its_error_status", async () => {
    const port = await closedPort();
    const model = ServedModel.fromEngine("mesh-tiny", new FakeEngine({ reply: "x" }));
    // The only worker of "elsewhere" is a peer that refuses connections: the forward fails (502).
    const mesh = testMeshHooks({
      nodeId: SELF,
      workers: () => [workerRecord({ id: "peer-w", nodeId: "d".repeat(32), addr: `127.0.0.1:${port}`, models: ["elsewhere"] })],
    });
    const app = createApp({ models: [model], apiKeys: [], maxBodyBytes: 1 << 20, logger: silentLogger, metrics: new Metrics(), mesh });
    const r = await app.handle(
      new Request("http://localhost/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "elsewhere", messages: [{ role: "user", content: "hi" }] }),
      }),
    );
    expect(r.status).toBe(502);
    // The status is settled after the answer left (onAfterResponse), so look until it is there.
    let rec: Record<string, unknown> | undefined;
    for (let i = 0; i < 100 && rec?.status !== 502; i++) {
      await Bun.sleep(10);
      const list = (await (await app.handle(new Request("http://localhost/api/requests?status=error"))).json()) as {
        data: Array<Record<string, unknown>>;
      };
      rec = list.data[0];
    }
    expect(rec).toMatchObject({ model: "elsewhere", route: "load", status: 502, servedBy: null, done: true });
  });

  test("bad_filters_are_400_naming_the_field_and_an_unknown_request_is_404", async () => {
    const { get } = consoleApp();
    const bad = await get("/api/requests?limit=0");
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { param: string } }).error.param).toBe("limit");
    const status = await get("/api/requests?status=maybe");
    expect(((await status.json()) as { error: { param: string } }).error.param).toBe("status");
    expect((await get("/api/requests/nope")).status).toBe(404);
    const scope = await get("/api/requests?scope=galaxy");
    expect(((await scope.json()) as { error: { param: string } }).error.param).toBe("scope");
    // A node alone: the mesh's log is its own.
    expect((await get("/api/requests?scope=mesh")).status).toBe(200);
  });

  test("off_the_page_and_every_data_endpoint_are_404", async () => {
    const { get } = consoleApp({ console: { mode: "off", loopback: true } });
    for (const path of ["/", ...DATA]) {
      const r = await get(path);
      expect(r.status).toBe(404);
      expect(((await r.json()) as { error: { message: string } }).error.message).toContain("--no-console");
    }
  });

  test("without_keys_on_a_non_loopback_listener_the_console_is_refused_unless_public", async () => {
    const closed = consoleApp({ console: { mode: "local", loopback: false } });
    for (const path of ["/", ...DATA]) {
      const r = await closed.get(path);
      expect(r.status).toBe(403);
      expect(((await r.json()) as { error: { code: string } }).error.code).toBe("console_not_public");
    }
    const open = consoleApp({ console: { mode: "public", loopback: false } });
    expect((await open.get("/api/requests")).status).toBe(200);
  });

  test("with_a_key_the_page_loads_without_it_but_no_data_does", async () => {
    const { get } = consoleApp({ keys: ["k1"], console: { mode: "local", loopback: false } });
    expect((await get("/")).status).toBe(200);
    for (const path of DATA) {
      const refused = await get(path);
      expect(refused.status).toBe(401);
      expect(refused.headers.get("x-mesh-node")).toBe(SELF);
      const ok = await get(path, { authorization: "Bearer k1" });
      expect(ok.status).toBe(200);
      await ok.body?.cancel();
    }
  });
});

describe("console records", () => {
  // Regression: a peer's refusal relayed as a Response was logged with the 200 the app's status hook saw.
  test("a_relayed_peer_refusal_keeps_its_status_in_the_log_regression", () => {
    const model = ServedModel.fromEngine("mesh-tiny", new FakeEngine({ reply: "x" }));
    const con = new Console(
      { mode: "local", loopback: true },
      { nodeId: () => SELF, nodeName: () => "self", models: [model], apiKeyRequired: false },
    );
    const request = new Request("http://localhost/v1/chat/completions", { method: "POST" });
    const route = { kind: "peer", response: new Response("{}"), decision: null, key: null } as unknown as Route;
    const id = con.begin(request, "/v1/chat/completions", "mesh-tiny", false, route, performance.now()) as string;
    con.answer(request, new Response(JSON.stringify({ error: { code: "queue_full" } }), { status: 429 }), performance.now());
    con.settle(request, 200);
    expect(con.log.get(id)).toMatchObject({ status: 429, done: true });
  });
});
