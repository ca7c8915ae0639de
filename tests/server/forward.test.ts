import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { silentLogger } from "../../src/log";
import {
  AUTH_HEADER,
  DEFAULT_AUTHORITY,
  type Exchange,
  forwardProof,
  MeshAuthority,
  meshKeys,
  proofsEqual,
  replyProof,
} from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { Forwarder } from "../../src/server/forward";
import { MeshGate } from "../../src/server/mesh-gate";
import { ANY_NONCE, challengingServer, closedPort, exchangeOf, TEST_SECRET, testMeshHooks, workerRecord } from "../helpers/mesh";
import { tinyModel } from "../helpers/model";

// A (no model, API key "ka") forwards to B (the tiny model, API key "kb").
let model: ServedModel;
let a: RunningServer;
let b: RunningServer;
let hooksA: ReturnType<typeof testMeshHooks>;
let hooksB: ReturnType<typeof testMeshHooks>;
let workers: WorkerInfo[] = [];
/** Workers A's forwarder reported as failed (the registry would stop routing to them for a while). */
const peerFailures: string[] = [];
const closeAfter: Array<() => unknown> = [];

beforeAll(async () => {
  model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 8192, nParallel: 2, threads: 2 });
  await model.ready;
  hooksB = testMeshHooks({ nodeId: "bbbb", apiKeyRequired: true });
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
      headersTimeoutMs: 60_000,
      logger: silentLogger,
      onPeerFailure: (id) => peerFailures.push(id),
      inflight: base.router,
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
/** A peer node `nodeId` whose body limit (64 KiB) is far below this mesh's: its gate refuses large bodies with 413. */
function smallPeer(nodeId: string): RunningServer {
  const small = 64 * 1024;
  const base = testMeshHooks({ nodeId, apiKeyRequired: true });
  const gate = new MeshGate(new MeshAuthority(meshKeys(TEST_SECRET), { ...DEFAULT_AUTHORITY, now: Date.now }), small, silentLogger);
  const server = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [],
    apiKeys: ["kb"],
    maxBodyBytes: small,
    logger: silentLogger,
    mesh: { ...base, gate },
  });
  closeAfter.push(() => server.close());
  return server;
}

function impostor(proof: (x: Exchange, status: number) => string | null = () => null, status = 200) {
  const seen: string[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: async (r) => {
      // Anyone can hand out nonces; only the secret proves an answer.
      if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: ANY_NONCE, ttl_ms: 30000 });
      const body = await r.text();
      seen.push(body);
      const p = proof(exchangeOf(r), status);
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
          status,
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
        { status, headers },
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

  test("a_relayed_responses_error_names_input_and_is_counted_under_its_own_status_in_request_metrics", async () => {
    workers = [onB()];
    const metric = 'mesh_http_requests_total{route="/v1/responses",status="400"}';
    const count = async () => {
      const text = await (await fetch(`${a.url}/metrics`, { headers: { authorization: "Bearer ka" } })).text();
      const line = text.split("\n").find((l) => l.startsWith(`${metric} `));
      return line ? Number(line.slice(metric.length + 1)) : 0;
    };
    const before = await count();
    const res = await fetch(`${a.url}/v1/responses`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", input: "word ".repeat(9000) }),
    });
    expect(res.status).toBe(400);
    // B refused the chat request it was sent; on /v1/responses the prompt is `input`, as a local refusal names it.
    expect(((await res.json()) as { error: { param: string; code: string } }).error).toMatchObject({
      param: "input",
      code: "context_length_exceeded",
    });
    // onAfterResponse runs once the answer is sent; the next /metrics read comes after it.
    expect(await count()).toBe(before + 1);
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
    // Its 401 proves nothing (anything on that port could send one): the peer failed, like any unproven answer.
    expect(peerFailures).toContain("w-c");
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

  /** A peer (it holds the secret: its answer is proven) that starts an SSE answer with `first` and then drops the connection. */
  function breaksOffMidStream(first: string) {
    const broken = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: (r) => {
        if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: ANY_NONCE, ttl_ms: 30000 });
        const proof = forwardProof(meshKeys(TEST_SECRET), { ...exchangeOf(r), status: 200 });
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
            c.enqueue(new TextEncoder().encode(first));
          },
        });
        return new Response(body, { headers: { "content-type": "text/event-stream", [AUTH_HEADER.forwardProof]: proof } });
      },
    });
    closeAfter.push(() => broken.stop(true));
    workers = [workerRecord({ id: "w-broken", nodeId: "eeee", addr: `127.0.0.1:${broken.port}` })];
  }

  test("a_peer_that_breaks_off_mid_stream_ends_the_stream_with_an_error_event", async () => {
    breaksOffMidStream('data: {"id":"x","object":"chat.completion.chunk","choices":[]}\n\n');
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

  test("a_peer_that_breaks_off_an_anthropic_stream_ends_it_with_an_anthropic_error_event", async () => {
    breaksOffMidStream('event: message_start\ndata: {"type":"message_start","message":{}}\n\n');
    const res = await fetch(`${a.url}/v1/messages`, {
      method: "POST",
      headers: { "x-api-key": "ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", max_tokens: 4, messages: [{ role: "user", content: "hi" }], stream: true }),
    });
    const events = (await res.text()).split("\n\n").filter((e) => e !== "");
    expect(events[0]).toStartWith("event: message_start");
    const last = events.at(-1) as string;
    expect(last).toStartWith("event: error\n");
    const data = JSON.parse(last.slice(last.indexOf("data: ") + 6)) as { type: string; error: { type: string; message: string } };
    expect(data).toEqual({ type: "error", error: { type: "api_error", message: "the peer serving this request failed mid-answer" } });
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
      impostor((x, status) => forwardProof(other, { ...x, status })),
      // Even with the secret, a /mesh reply proof is not a forward proof (domain separation).
      impostor((x, status) => replyProof(mesh, { ...x, status, body: new Uint8Array() })),
    ];
    for (const fake of fakes) {
      workers = [workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr })];
      const res = await ask(false);
      expect(res.status).toBe(502);
      expect(await res.text()).not.toContain("IMPOSTOR");
      expect(fake.seen.length).toBe(1);
    }
    // The same impostor with a real forward proof is relayed: the refusals above are the proof check's doing.
    const genuine = impostor((x, status) => forwardProof(mesh, { ...x, status }));
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
      const { response, nonce, callerNonce } = await send(body);
      await response.arrayBuffer();
      expect(response.status).toBe(status);
      const proof = response.headers.get(AUTH_HEADER.forwardProof) ?? "";
      expect(proofsEqual(proof, forwardProof(keys, { nonce, callerNonce, status }))).toBe(true);
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

describe("a forwarded request is meant for one node and one answer", () => {
  const ask = (content = "secret plans") =>
    fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content }], max_tokens: 1 }),
    });
  const forged = {
    id: "x",
    object: "chat.completion",
    created: 0,
    model: "mesh-tiny",
    choices: [{ index: 0, message: { role: "assistant", content: "IMPOSTOR: wire the money" }, finish_reason: "stop" }],
    usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
  };

  test("an_impostor_passing_the_request_on_to_a_live_node_gets_it_refused_there_and_nothing_is_relayed", async () => {
    // On a dead peer's address: it fetches the live node B's challenge, passes A's signed request to B unchanged,
    // keeps B's status and forward proof and swaps the body.
    const genuine = `http://127.0.0.1:${b.port}`;
    const addressedTo: Array<string | null> = [];
    const relayer = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: async (r) => {
        const u = new URL(r.url);
        if (u.pathname === "/mesh/challenge") return fetch(`${genuine}/mesh/challenge`);
        addressedTo.push(r.headers.get(AUTH_HEADER.to));
        const up = await fetch(`${genuine}${u.pathname}`, { method: r.method, headers: r.headers, body: await r.arrayBuffer() });
        await up.arrayBuffer();
        const headers = new Headers({ "content-type": "application/json" });
        headers.set(AUTH_HEADER.forwardProof, up.headers.get(AUTH_HEADER.forwardProof) ?? "");
        return new Response(JSON.stringify(forged), { status: up.status, headers });
      },
    });
    closeAfter.push(() => relayer.stop(true));
    workers = [workerRecord({ id: "w-dead", nodeId: "dddd", addr: `127.0.0.1:${relayer.port}` })];
    const before = hooksA.forwarder.stats();
    const refusedByB = hooksB.gate.refused;
    const res = await ask();
    const text = await res.text();
    expect(text).not.toContain("IMPOSTOR");
    expect(res.status).toBe(502);
    // A named the node it meant, and B, not being it, refused before generating anything in its own name.
    expect(addressedTo).toEqual(["dddd"]);
    expect(hooksB.gate.refused - refusedByB).toBe(1);
    expect((hooksA.forwarder.stats().unproven ?? 0) - (before.unproven ?? 0)).toBe(1);
    expect(peerFailures).toContain("w-dead");
  });

  test("a_recorded_forward_answer_replayed_under_its_recorded_nonce_is_not_relayed", async () => {
    // One genuine exchange with B, as anyone on the network could record it (traffic is not encrypted).
    const keys = meshKeys(TEST_SECRET);
    const body = enc.encode(JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 1 }));
    const recorded = await new MeshClient({ keys, nodeId: "cccc" }).send(`127.0.0.1:${b.port}`, "POST", "/v1/chat/completions", body, {
      headers: { "content-type": "application/json" },
      to: "bbbb",
    });
    await recorded.response.arrayBuffer();
    const proof = recorded.response.headers.get(AUTH_HEADER.forwardProof) ?? "";
    expect(proofsEqual(proof, forwardProof(keys, { ...recorded, status: 200 }))).toBe(true);
    // Later, on a dead peer's address: the recorded nonce as its challenge, the recorded status and proof with its own body.
    const replayer = challengingServer(
      () => Response.json(forged, { status: recorded.response.status, headers: { [AUTH_HEADER.forwardProof]: proof } }),
      recorded.nonce,
    );
    closeAfter.push(() => replayer.stop(true));
    workers = [workerRecord({ id: "w-replay", nodeId: "bbbb", addr: `127.0.0.1:${replayer.port}` })];
    const before = hooksA.forwarder.stats();
    const res = await ask();
    expect(await res.text()).not.toContain("IMPOSTOR");
    expect(res.status).toBe(502);
    expect((hooksA.forwarder.stats().unproven ?? 0) - (before.unproven ?? 0)).toBe(1);
  });

  test("a_peers_413_for_an_oversized_body_is_this_nodes_413_and_the_peer_is_not_blamed", async () => {
    // An honest peer with a smaller body limit: its gate answers 413 before it can verify A, so without a proof.
    const b2 = smallPeer("b2b2");
    // Something without the secret answering 413 gets its refusal through, but none of its words.
    const fake = impostor(() => null, 413);
    for (const [id, addr] of [
      ["w-b2", `127.0.0.1:${b2.port}`],
      ["w-fake413", fake.addr],
    ]) {
      workers = [workerRecord({ id: id as string, nodeId: "b2b2", addr: addr as string })];
      const before = hooksA.forwarder.stats();
      const res = await ask("x".repeat(100_000));
      const text = await res.text();
      expect(res.status).toBe(413);
      expect(text).not.toContain("IMPOSTOR");
      const error = (JSON.parse(text) as { error: { code: string; message: string } }).error;
      expect(error.code).toBe("request_too_large");
      expect(error.message).toContain("a node serving 'mesh-tiny' refused the request body size");
      const after = hooksA.forwarder.stats();
      expect((after.unproven ?? 0) - (before.unproven ?? 0)).toBe(0);
      expect(after.active).toBe(0);
      expect(peerFailures).not.toContain(id);
    }
  });

  // Regression: the gate read 64 KiB of a clone of the body and answered 413 with the rest unread behind the
  // clone's tee; the sender blocked writing it and never saw the answer (a 60 s hang, then a 502 upstream).
  test("a_gate_answers_413_at_once_to_signed_bodies_far_over_its_limit_again_and_again", async () => {
    const b4 = smallPeer("b4b4");
    const client = new MeshClient({ keys: meshKeys(TEST_SECRET), nodeId: "a1a1" });
    for (const size of [100_000, 150_000, 300_000, 1_000_000, 150_000]) {
      const body = new TextEncoder().encode(
        JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "x".repeat(size) }] }),
      );
      const { response } = await client.send(`127.0.0.1:${b4.port}`, "POST", "/v1/chat/completions", body, {
        headers: { "content-type": "application/json" },
        to: "b4b4",
        signal: AbortSignal.timeout(20_000),
      });
      expect({ size, status: response.status }).toEqual({ size, status: 413 });
      await response.body?.cancel();
    }
  });

  test("this_nodes_own_413_for_a_forwarded_messages_request_is_in_anthropics_shape", async () => {
    const fake = impostor(() => null, 413);
    workers = [workerRecord({ id: "w-fake413-messages", nodeId: "b3b3", addr: fake.addr })];
    const res = await fetch(`${a.url}/v1/messages`, {
      method: "POST",
      headers: { "x-api-key": "ka", "content-type": "application/json" },
      body: JSON.stringify({ model: "mesh-tiny", max_tokens: 1, messages: [{ role: "user", content: "x".repeat(100_000) }] }),
    });
    expect(res.status).toBe(413);
    const body = (await res.json()) as { type: string; error: { type: string; message: string } };
    expect(body.type).toBe("error");
    expect(body.error.type).toBe("request_too_large");
    expect(body.error.message).toContain("a node serving 'mesh-tiny' refused the request body size");
  });

  test("something_answering_413_to_everything_does_not_hide_the_other_node_serving_the_model", async () => {
    // Tried first (it looks idler): its unprovable 413 is not final while another node can still answer.
    const fake = impostor(() => null, 413);
    workers = [{ ...onB(), slotsBusy: 1 }, workerRecord({ id: "w-fake413-first", nodeId: "ffff", addr: fake.addr })];
    const res = await ask("hello");
    expect(res.status).toBe(200);
    expect(await res.text()).not.toContain("IMPOSTOR");
  });

  test("an_unproven_retryable_status_is_counted_unproven_and_reported_before_the_retry", async () => {
    // Tried first (it looks idler): an impostor answering 503 was once retried quietly, never counted nor reported.
    const fake = impostor(() => null, 503);
    workers = [{ ...onB(), slotsBusy: 1 }, workerRecord({ id: "w-fake503", nodeId: "ffff", addr: fake.addr })];
    const before = hooksA.forwarder.stats();
    const res = await ask("hi");
    expect(res.status).toBe(200);
    expect(await res.text()).not.toContain("IMPOSTOR");
    const after = hooksA.forwarder.stats();
    expect(after.retried - before.retried).toBe(1);
    expect((after.unproven ?? 0) - (before.unproven ?? 0)).toBe(1);
    expect(peerFailures).toContain("w-fake503");
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
