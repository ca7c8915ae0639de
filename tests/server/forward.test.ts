import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { silentLogger } from "../../src/log";
import { AUTH_HEADER, forwardProof, meshKeys, proofsEqual, replyProof } from "../../src/mesh/auth";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { Forwarder } from "../../src/server/forward";
import { TEST_SECRET, testMeshHooks, workerRecord } from "../helpers/mesh";
import { tinyModel } from "../helpers/model";

// A (no model, API key "ka") forwards to B (the tiny model, API key "kb").
let model: ServedModel;
let a: RunningServer;
let b: RunningServer;
let hooksA: ReturnType<typeof testMeshHooks>;
let workers: WorkerInfo[] = [];
const closeAfter: Array<() => unknown> = [];

async function closedPort(): Promise<number> {
  const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
  const port = s.port as number;
  s.stop(true);
  return port;
}

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 8192, nParallel: 2, threads: 2 });
  await model.ready;
  const hooksB = testMeshHooks({ nodeId: "bbbb", apiKeyRequired: true });
  b = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [model],
    apiKeys: ["kb"],
    maxBodyBytes: 1 << 20,
    logger: silentLogger,
    mesh: hooksB,
  });
  const base = testMeshHooks({ nodeId: "aaaa", apiKeyRequired: true, workers: () => workers });
  // A's forwarder checks forward proofs, as a real node's does: every test below relays only proven answers.
  hooksA = {
    ...base,
    forwarder: new Forwarder({
      client: base.client,
      keys: meshKeys(TEST_SECRET),
      selfId: "aaaa",
      workers: () => workers,
      headersTimeoutMs: 60_000,
      logger: silentLogger,
    }),
  };
  a = startServer({ host: "127.0.0.1", port: 0, models: [], apiKeys: ["ka"], maxBodyBytes: 1 << 20, logger: silentLogger, mesh: hooksA });
});

afterAll(async () => {
  for (const c of closeAfter) await c();
  await a?.close();
  await b?.close();
  await model?.close();
});

const enc = new TextEncoder();

/** A plain server on a worker's address that answers like an OpenAI server, with `proof` (if any) as its forward proof. */
function impostor(proof: (nonce: string, status: number) => string | null = () => null) {
  const seen: string[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: async (r) => {
      // Anyone can hand out nonces; only the secret proves an answer.
      if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: "AAAAAAAAAAAAAAAAAAAAAA", ttl_ms: 30000 });
      const body = await r.text();
      seen.push(body);
      const p = proof(r.headers.get(AUTH_HEADER.nonce) ?? "", 200);
      const headers: Record<string, string> = p === null ? {} : { [AUTH_HEADER.forwardProof]: p };
      if ((JSON.parse(body) as { stream?: boolean }).stream) {
        const chunk = {
          id: "x",
          object: "chat.completion.chunk",
          created: 0,
          model: "mesh-tiny",
          choices: [{ index: 0, delta: { content: "IMPOSTOR" } }],
        };
        return new Response(`data: ${JSON.stringify(chunk)}\n\ndata: [DONE]\n\n`, {
          headers: { ...headers, "content-type": "text/event-stream" },
        });
      }
      return Response.json(
        {
          id: "x",
          object: "chat.completion",
          created: 0,
          model: "mesh-tiny",
          choices: [{ index: 0, message: { role: "assistant", content: "IMPOSTOR" }, finish_reason: "stop" }],
          usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
        },
        { headers },
      );
    },
  });
  closeAfter.push(() => server.stop(true));
  return { seen, addr: `127.0.0.1:${server.port}` };
}

const onB = () => workerRecord({ id: "w-b", nodeId: "bbbb", addr: `127.0.0.1:${b.port}` });
const clientA = (key = "ka") => new OpenAI({ baseURL: `${a.url}/v1`, apiKey: key, maxRetries: 0 });

describe("forwarding to the peer that serves the model", () => {
  test("answers_non_stream_and_stream_through_the_openai_client", async () => {
    workers = [onB()];
    const r = await clientA().chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 4 });
    expect(r.object).toBe("chat.completion");
    expect(r.usage?.completion_tokens).toBeGreaterThan(0);
    const stream = await clientA().chat.completions.create({
      model: "mesh-tiny",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 6,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    } as OpenAI.ChatCompletionCreateParamsStreaming);
    let chunks = 0;
    let usage: OpenAI.CompletionUsage | null | undefined = null;
    for await (const c of stream) {
      chunks++;
      usage = c.usage ?? usage;
    }
    expect(chunks).toBeGreaterThan(1);
    expect(usage?.completion_tokens).toBe(6);
    const c = await clientA().completions.create({ model: "mesh-tiny", prompt: "once upon", max_tokens: 3 });
    expect(c.object).toBe("text_completion");
  });

  test("the_body_reaches_the_peer_unchanged_and_a_peer_error_keeps_its_status", async () => {
    workers = [onB()];
    // B refuses the value; its 400 (with B's param) comes back as is.
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], n: 3 }),
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { param: string } }).error.param).toBe("n");
  });

  test("the_inference_key_of_the_first_node_is_still_required_and_the_peers_is_not_needed", async () => {
    workers = [onB()];
    const refused = await clientA("wrong")
      .chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }] })
      .then(
        () => null,
        (e: { status?: number }) => e,
      );
    expect(refused?.status).toBe(401);
    // B's own key is "kb": a client with only A's key gets its answer from B anyway (mesh auth between the nodes).
    const r = await clientA("ka").chat.completions.create({
      model: "mesh-tiny",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 2,
    });
    expect(r.choices.length).toBe(1);
  });

  test("a_body_that_is_not_json_is_still_400_invalid_json", async () => {
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: '{"model": "mesh-tiny", "messages": [',
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_json");
  });

  test("a_model_no_node_serves_is_404_in_openai_shape", async () => {
    workers = [onB()];
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "nobody-serves-this", messages: [{ role: "user", content: "hi" }] }),
    });
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({
      error: {
        message: "The model 'nobody-serves-this' does not exist",
        type: "invalid_request_error",
        param: "model",
        code: "model_not_found",
      },
    });
  });

  test("a_peer_that_fails_before_answering_is_replaced_once_by_another", async () => {
    // The dead worker looks idler, so it is tried first.
    workers = [{ ...onB(), slotsBusy: 1 }, workerRecord({ id: "w-dead", nodeId: "dddd", addr: `127.0.0.1:${await closedPort()}` })];
    const before = hooksA.forwarder.stats();
    const r = await clientA().chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    expect(r.choices.length).toBe(1);
    const after = hooksA.forwarder.stats();
    expect(after.retried - before.retried).toBe(1);
    expect(after.forwarded - before.forwarded).toBe(1);
  });

  test("two_failing_peers_are_a_502_not_a_hang", async () => {
    workers = [
      workerRecord({ id: "w-d1", nodeId: "d1d1", addr: `127.0.0.1:${await closedPort()}` }),
      workerRecord({ id: "w-d2", nodeId: "d2d2", addr: `127.0.0.1:${await closedPort()}` }),
    ];
    const res = await fetch(`${a.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", prompt: "x" }),
    });
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("upstream_failed");
    // The client learns what failed, not where the mesh's peers live.
    expect(body.error.message).not.toContain("127.0.0.1");
    expect(body.error.message).toContain("could not be reached");
    expect(hooksA.forwarder.stats().active).toBe(0);
  });

  test("a_peer_refusing_this_nodes_mesh_credentials_is_a_502_not_the_clients_401", async () => {
    // C runs with another mesh secret: it refuses A's forwarded request with 401.
    const hooksC = testMeshHooks({ nodeId: "cccc", apiKeyRequired: true, secret: "another-mesh-secret-that-is-long-enough-0123456789" });
    const c = startServer({
      host: "127.0.0.1",
      port: 0,
      models: [model],
      apiKeys: ["kc"],
      maxBodyBytes: 1 << 20,
      logger: silentLogger,
      mesh: hooksC,
    });
    closeAfter.push(() => c.close());
    workers = [workerRecord({ id: "w-c", nodeId: "cccc", addr: `127.0.0.1:${c.port}` })];
    const res = await fetch(`${a.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", prompt: "x", max_tokens: 1 }),
    });
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("upstream_failed");
    expect(body.error.message).toContain("mesh credentials");
  });

  test("a_forwarded_request_is_never_forwarded_again", async () => {
    workers = [onB()];
    // Signed as mesh traffic, as a peer would send it: A does not serve the model, so 404, not another hop.
    const { response } = await hooksA.client.send(
      `127.0.0.1:${a.port}`,
      "POST",
      "/v1/chat/completions",
      new TextEncoder().encode(JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }] })),
      { headers: { "content-type": "application/json" } },
    );
    expect(response.status).toBe(404);
    expect(hooksA.forwarder.stats().active).toBe(0);
  });

  test("bad_mesh_credentials_on_a_v1_request_are_401_even_with_a_good_api_key", async () => {
    workers = [onB()];
    const res = await fetch(`${b.url}/v1/chat/completions`, {
      method: "POST",
      headers: {
        authorization: "Bearer kb",
        "content-type": "application/json",
        "x-mesh-proof": "forged",
        "x-mesh-node": "x",
        "x-mesh-nonce": "y",
      },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }] }),
    });
    expect(res.status).toBe(401);
  });

  test("a_client_that_disconnects_cancels_the_peers_generation", async () => {
    workers = [onB()];
    const abort = new AbortController();
    const stream = await clientA().chat.completions.create(
      {
        model: "mesh-tiny",
        messages: [{ role: "user", content: "go on forever" }],
        max_tokens: 7000,
        ignore_eos: true,
        stream: true,
      } as OpenAI.ChatCompletionCreateParamsStreaming,
      { signal: abort.signal },
    );
    let n = 0;
    try {
      for await (const _ of stream) if (++n === 3) abort.abort();
    } catch {
      // the abort ends the iteration
    }
    // B stops generating: its slot frees long before 7000 tokens could be produced.
    const deadline = Date.now() + 120_000;
    while ((model.engine?.inFlight ?? 1) > 0 && Date.now() < deadline) await Bun.sleep(50);
    expect(model.engine?.inFlight).toBe(0);
    const metrics = await (await fetch(`${b.url}/metrics`, { headers: { authorization: "Bearer kb" } })).text();
    const generated = Number(/^mesh_completion_tokens_total (\d+)/m.exec(metrics)?.[1] ?? "0");
    expect(generated).toBeLessThan(7000);
    const until = Date.now() + 30_000;
    while (hooksA.forwarder.stats().active > 0 && Date.now() < until) await Bun.sleep(50);
    expect(hooksA.forwarder.stats().active).toBe(0);
  });

  test("a_peer_that_breaks_off_mid_stream_ends_the_stream_with_an_error_event", async () => {
    // A peer (it holds the secret: its answer is proven) that starts an SSE answer and then drops the connection.
    const broken = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: (r) => {
        if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: "AAAAAAAAAAAAAAAAAAAAAA", ttl_ms: 30000 });
        const proof = forwardProof(meshKeys(TEST_SECRET), { nonce: r.headers.get(AUTH_HEADER.nonce) ?? "", status: 200 });
        let sent = false;
        const body = new ReadableStream({
          async pull(c) {
            if (sent) {
              // Long enough for the first event to reach the client.
              await Bun.sleep(300);
              broken.stop(true);
              return;
            }
            sent = true;
            c.enqueue(new TextEncoder().encode('data: {"id":"x","object":"chat.completion.chunk","choices":[]}\n\n'));
          },
        });
        return new Response(body, { headers: { "content-type": "text/event-stream", [AUTH_HEADER.forwardProof]: proof } });
      },
    });
    closeAfter.push(() => broken.stop(true));
    workers = [workerRecord({ id: "w-broken", nodeId: "eeee", addr: `127.0.0.1:${broken.port}` })];
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], stream: true }),
    });
    const text = await res.text();
    expect(text).toContain("chat.completion.chunk");
    expect(text).toContain("upstream_failed");
    expect(text).not.toContain("[DONE]");
  });
});

describe("answers must carry the peer's forward proof", () => {
  const ask = (stream: boolean) =>
    fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "secret plans" }], max_tokens: 2, stream }),
    });

  test("an_impostor_on_the_only_peers_address_is_a_502_and_nothing_it_sent_is_relayed", async () => {
    const fake = impostor();
    workers = [workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr })];
    for (const stream of [false, true]) {
      const before = hooksA.forwarder.stats();
      const res = await ask(stream);
      const text = await res.text();
      expect(res.status).toBe(502);
      expect(text).not.toContain("IMPOSTOR");
      const body = JSON.parse(text) as { error: { code: string; message: string } };
      expect(body.error.code).toBe("upstream_failed");
      expect(body.error.message).toContain("mesh proof");
      // The client learns what failed, not where the mesh's peers live.
      expect(body.error.message).not.toContain("127.0.0.1");
      const after = hooksA.forwarder.stats();
      expect((after.unproven ?? 0) - (before.unproven ?? 0)).toBe(1);
      expect(after.failed - before.failed).toBe(1);
      expect(after.forwarded - before.forwarded).toBe(0);
      expect(after.active).toBe(0);
    }
    // It did get the requests (that is what the port takeover buys it); it answered neither in the peer's name.
    expect(fake.seen.length).toBe(2);
  });

  test("an_impostor_tried_first_is_replaced_by_the_genuine_peer", async () => {
    const fake = impostor();
    // The impostor looks idler, so it is tried first.
    workers = [{ ...onB(), slotsBusy: 1 }, workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr })];
    for (const stream of [false, true]) {
      const before = hooksA.forwarder.stats();
      const res = await ask(stream);
      const text = await res.text();
      expect(res.status).toBe(200);
      expect(text).not.toContain("IMPOSTOR");
      expect(text).toContain(stream ? "chat.completion.chunk" : '"chat.completion"');
      const after = hooksA.forwarder.stats();
      expect(after.retried - before.retried).toBe(1);
      expect((after.unproven ?? 0) - (before.unproven ?? 0)).toBe(1);
      expect(after.forwarded - before.forwarded).toBe(1);
    }
    expect(fake.seen.length).toBe(2);
  });

  test("a_proof_under_another_secret_or_a_mesh_reply_proof_does_not_pass", async () => {
    const other = meshKeys("another-mesh-secret-that-is-long-enough-0123456789");
    const mesh = meshKeys(TEST_SECRET);
    const fakes = [
      impostor((nonce, status) => forwardProof(other, { nonce, status })),
      // Even with the secret, a /mesh reply proof is not a forward proof (domain separation).
      impostor((nonce, status) => replyProof(mesh, { nonce, status, body: new Uint8Array() })),
    ];
    for (const fake of fakes) {
      workers = [workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr })];
      const res = await ask(false);
      expect(res.status).toBe(502);
      expect(await res.text()).not.toContain("IMPOSTOR");
      expect(fake.seen.length).toBe(1);
    }
    // The same impostor with a real forward proof is relayed: the refusals above are the proof check's doing.
    const genuine = impostor((nonce, status) => forwardProof(mesh, { nonce, status }));
    workers = [workerRecord({ id: "w-fake", nodeId: "ffff", addr: genuine.addr })];
    const res = await ask(false);
    expect(res.status).toBe(200);
    expect(await res.text()).toContain("IMPOSTOR");
  });

  test("a_peer_proves_its_answers_to_forwarded_requests_errors_included_and_hands_out_the_next_nonce", async () => {
    const keys = meshKeys(TEST_SECRET);
    const addr = `127.0.0.1:${b.port}`;
    const send = (body: unknown) =>
      hooksA.client.send(addr, "POST", "/v1/chat/completions", enc.encode(JSON.stringify(body)), {
        headers: { "content-type": "application/json" },
      });
    for (const [body, status] of [
      [{ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 1 }, 200],
      [{ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 1, stream: true }, 200],
      [{ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], n: 3 }, 400],
      [{ model: "not-here", messages: [{ role: "user", content: "hi" }] }, 404],
    ] as Array<[unknown, number]>) {
      const { response, nonce } = await send(body);
      await response.arrayBuffer();
      expect(response.status).toBe(status);
      const proof = response.headers.get(AUTH_HEADER.forwardProof) ?? "";
      expect(proofsEqual(proof, forwardProof(keys, { nonce, status }))).toBe(true);
      expect(response.headers.get(AUTH_HEADER.nextNonce)).toMatch(/^[A-Za-z0-9_-]{22}$/);
    }
    // A client's own request (no mesh credentials) gets no mesh headers, and neither does A's client.
    const direct = await fetch(`${b.url}/v1/models`, { headers: { authorization: "Bearer kb" } });
    expect(direct.headers.has(AUTH_HEADER.forwardProof)).toBe(false);
    expect(direct.headers.has(AUTH_HEADER.nextNonce)).toBe(false);
    workers = [onB()];
    const relayed = await fetch(`${a.url}/v1/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", prompt: "x", max_tokens: 1 }),
    });
    await relayed.arrayBuffer();
    expect(relayed.status).toBe(200);
    expect(relayed.headers.has(AUTH_HEADER.forwardProof)).toBe(false);
  });
});

describe("/v1/models across the mesh", () => {
  test("lists_models_served_elsewhere_with_their_nodes", async () => {
    workers = [onB(), workerRecord({ id: "w-c", nodeId: "cccc", addr: "127.0.0.1:9", models: ["other-model"] })];
    const list = (await (await fetch(`${a.url}/v1/models`, { headers: { authorization: "Bearer ka" } })).json()) as {
      object: string;
      data: Array<{ id: string; object: string; nodes: Array<{ node_id: string }> }>;
    };
    expect(list.object).toBe("list");
    const ids = list.data.map((m) => m.id).sort();
    expect(ids).toEqual(["mesh-tiny", "other-model"]);
    expect(list.data.find((m) => m.id === "mesh-tiny")?.nodes.map((n) => n.node_id)).toEqual(["bbbb"]);
    expect(list.data.every((m) => m.object === "model")).toBe(true);
    // The openai client reads the same list.
    const models = [];
    for await (const m of clientA().models.list()) models.push(m.id);
    expect(models.sort()).toEqual(["mesh-tiny", "other-model"]);
  });
});
