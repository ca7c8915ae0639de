import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import type { EngineStats } from "../../src/engine";
import { silentLogger } from "../../src/log";
import { type RunningServer, ServedModel, startServer } from "../../src/server";
import { Metrics } from "../../src/server/metrics";
import { tinyModel } from "../helpers/model";
import { startTestServer, type TestServer } from "../helpers/server";

let t: TestServer;

beforeAll(async () => {
  t = await startTestServer({ nCtx: 1024, nParallel: 1, queueCapacity: 1 });
});
afterAll(async () => {
  await t?.close();
});

const body = (maxTokens: number, stream = false) =>
  JSON.stringify({
    model: t.model.id,
    messages: [{ role: "user", content: "Tell me a long story." }],
    max_tokens: maxTokens,
    temperature: 0,
    ignore_eos: true,
    stream,
  });

const post = (b: string, url = t.url) =>
  fetch(`${url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: b });

/** The value of one series in a Prometheus text body (NaN when absent). */
function seriesValue(text: string, name: string): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return Number(line?.split(" ")[1] ?? Number.NaN);
}

async function metric(name: string, url = t.url): Promise<number> {
  return seriesValue(await (await fetch(`${url}/metrics`)).text(), name);
}

/** A refusal must be a plain OpenAI-format 429 with Retry-After, never a 200 event stream carrying the error. */
async function expectRefused(r: Response, code: string): Promise<string> {
  expect(r.status).toBe(429);
  expect(r.headers.get("content-type")).toContain("application/json");
  expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
  const err = (await r.json()) as { error: { type: string; code: string; message: string; param: unknown } };
  expect(err.error.type).toBe("rate_limit_error");
  expect(err.error.code).toBe(code);
  expect(err.error.param).toBeNull();
  return err.error.message;
}

/** Wait until a cancelled stream has given its slot back, so the next request is not queued behind it. */
async function untilIdle(url: string): Promise<void> {
  for (let i = 0; i < 500 && (await metric("mesh_slots_busy", url)) > 0; i++) await Bun.sleep(10);
  expect(await metric("mesh_slots_busy", url)).toBe(0);
}

/** Start a stream that holds the only slot and wait for its first chunk (so it is running, not queued). */
async function occupySlot(url: string, maxTokens: number): Promise<ReadableStreamDefaultReader<Uint8Array>> {
  const running = await post(body(maxTokens, true), url);
  expect(running.status).toBe(200);
  const reader = running.body?.getReader() as ReadableStreamDefaultReader<Uint8Array>;
  await reader.read();
  return reader;
}

// Waits on a condition, not a clock: on a loaded machine a request can take seconds to reach
// the queue, and a 2 s poll let the next request overtake it (an extra refusal, or a queued
// request where a refusal was expected).
async function until(cond: () => Promise<boolean>, limitMs = 120_000): Promise<void> {
  const end = Date.now() + limitMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error("condition not reached");
    await Bun.sleep(10);
  }
}

describe("KV admission over HTTP", () => {
  // A cancelled stream frees its slot a moment after the client hangs up: each test starts from an idle node.
  beforeEach(async () => {
    await until(async () => (await metric("mesh_slots_busy")) === 0 && (await metric("mesh_requests_waiting")) === 0);
  });

  test("a_full_queue_answers_429_with_retry_after_in_openai_shape", async () => {
    // One slot, one queue place: a running stream, a waiting request, then a refused one.
    const running = await post(body(900, true));
    expect(running.status).toBe(200);
    const reader = running.body?.getReader();
    await reader?.read();
    const waiting = post(body(2));
    // The waiting request must have reached the queue before the third arrives.
    await until(async () => (await metric("mesh_requests_waiting")) >= 1);
    const refused = await post(body(2));
    expect(refused.status).toBe(429);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    const err = (await refused.json()) as { error: { type: string; code: string; message: string } };
    expect(err.error.type).toBe("rate_limit_error");
    expect(err.error.code).toBe("queue_full");
    expect(err.error.message).toContain("queue");
    await reader?.cancel();
    expect((await waiting).status).toBe(200);
  });

  test("a_streamed_request_refused_by_a_full_queue_gets_429_not_an_sse_stream", async () => {
    const reader = await occupySlot(t.url, 900);
    const waiting = post(body(2));
    await until(async () => (await metric("mesh_requests_waiting")) >= 1);
    await expectRefused(await post(body(2, true)), "queue_full");
    await reader.cancel();
    expect((await waiting).status).toBe(200);
  });

  test("the_openai_client_sees_a_rate_limit_error", async () => {
    const running = t.client.chat.completions.create({
      model: t.model.id,
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 900,
      temperature: 0,
      // @ts-expect-error llama.cpp extension
      ignore_eos: true,
    });
    await until(async () => (await metric("mesh_slots_busy")) >= 1);
    const waiting = post(body(2));
    await until(async () => (await metric("mesh_requests_waiting")) >= 1);
    const err = await t.client.chat.completions
      .create({ model: t.model.id, messages: [{ role: "user", content: "hi" }], max_tokens: 2 })
      .catch((e) => e);
    expect(err?.status).toBe(429);
    expect(err?.code).toBe("queue_full");
    await running;
    await waiting;
  });

  test("metrics_report_kv_cells_by_state_admissions_and_queue_waits", async () => {
    const text = await (await fetch(`${t.url}/metrics`)).text();
    for (const series of [
      'mesh_kv_cells{state="running"}',
      'mesh_kv_cells{state="resident"}',
      'mesh_kv_cells{state="reserved"}',
      'mesh_kv_cells{state="free"}',
      "mesh_kv_cells_total",
      'mesh_admissions_total{result="admitted"}',
      'mesh_admissions_total{result="queued"}',
      'mesh_admissions_total{result="rejected"}',
      'mesh_admission_rejections_total{reason="queue_full"}',
      "mesh_queue_wait_seconds_count",
      'mesh_kv_evictions_total{reason="budget"}',
      'mesh_kv_evictions_total{reason="offload"}',
      'mesh_kv_evictions_total{reason="divergent"}',
      'mesh_kv_evictions_total{reason="retry"}',
      'mesh_kv_evicted_cells_total{reason="offload"}',
      "mesh_decode_kv_failures_total",
      "mesh_cached_prompt_tokens_total",
    ]) {
      expect(text).toContain(series);
    }
    // One refusal each from the three queue-full tests above.
    expect(await metric('mesh_admission_rejections_total{reason="queue_full"}')).toBe(3);
    expect(await metric('mesh_admissions_total{result="rejected"}')).toBe(3);
    expect(await metric("mesh_decode_kv_failures_total")).toBe(0);
    // Counted 429s appear in the request metrics with the status actually sent.
    expect(text).toContain('status="429"');
  });
});

describe("queue timeout over HTTP", () => {
  let u: TestServer;
  beforeAll(async () => {
    // A 1 ms timeout: whatever has to queue behind the running request expires at the next decode step.
    u = await startTestServer({ nCtx: 4096, nParallel: 1, queueCapacity: 8, queueTimeoutMs: 1 });
  });
  afterAll(async () => {
    await u?.close();
  });

  test("a_request_waiting_past_the_queue_timeout_gets_429_with_retry_after_in_openai_shape", async () => {
    // Far more tokens than the test needs, so the slot is still held when the second request arrives.
    const reader = await occupySlot(u.url, 4000);
    const message = await expectRefused(await post(body(2), u.url), "queue_timeout");
    expect(message).toContain("queue timeout");
    await reader.cancel();
    await untilIdle(u.url);
  });

  test("a_streamed_request_waiting_past_the_queue_timeout_gets_429_not_an_sse_stream", async () => {
    const reader = await occupySlot(u.url, 4000);
    await expectRefused(await post(body(2, true), u.url), "queue_timeout");
    await reader.cancel();
    await untilIdle(u.url);
  });

  test("queue_timeouts_are_counted_as_rejected_admissions", async () => {
    expect(await metric('mesh_admission_rejections_total{reason="queue_timeout"}', u.url)).toBe(2);
    expect(await metric('mesh_admission_rejections_total{reason="queue_full"}', u.url)).toBe(0);
    expect(await metric('mesh_admissions_total{result="rejected"}', u.url)).toBe(2);
  });
});

describe("engine safety cap over HTTP", () => {
  let model: ServedModel;
  let server: RunningServer;
  beforeAll(async () => {
    // One generation in flight at most: the engine itself refuses the second (engine_busy), before any queue.
    model = ServedModel.start({ modelPath: await tinyModel(), nCtx: 4096, nParallel: 1, threads: 2, maxInFlight: 1 });
    await model.ready;
    if (model.status !== "ready") throw new Error(`model failed: ${model.error}`);
    server = startServer({ host: "127.0.0.1", port: 0, models: [model], apiKeys: [], maxBodyBytes: 1024 * 1024, logger: silentLogger });
  });
  afterAll(async () => {
    await server?.close();
    await model?.close();
  });

  test("a_request_over_the_in_flight_cap_gets_429_server_busy_streamed_or_not", async () => {
    const reader = await occupySlot(server.url, 4000);
    await expectRefused(await post(body(2), server.url), "server_busy");
    await expectRefused(await post(body(2, true), server.url), "server_busy");
    await reader.cancel();
    // The cap only limits what is in flight: once the stream is gone, requests are served again.
    // (The slot shows free once the worker has finished the cancelled stream, whose last event frees its place.)
    await untilIdle(server.url);
    expect((await post(body(2), server.url)).status).toBe(200);
  });

  // Pending: src/server/app.ts must call o.metrics.rejectedServerBusy() in onError when toApiError gives code server_busy.
  test("server_busy_refusals_are_counted_as_rejected_admissions", async () => {
    expect(await metric('mesh_admission_rejections_total{reason="server_busy"}', server.url)).toBe(2);
    expect(await metric('mesh_admissions_total{result="rejected"}', server.url)).toBe(2);
  });
});

describe("admission metrics", () => {
  test("server_busy_refusals_count_as_rejected_admissions_beside_the_queues", async () => {
    const g: EngineStats = { ...(await (t.model.engine as NonNullable<ServedModel["engine"]>).stats()) };
    g.rejectedQueueFull = 3;
    g.rejectedQueueTimeout = 5;
    const m = new Metrics();
    expect(seriesValue(m.render(g), 'mesh_admissions_total{result="rejected"}')).toBe(8);
    expect(seriesValue(m.render(g), 'mesh_admission_rejections_total{reason="server_busy"}')).toBe(0);
    m.rejectedServerBusy();
    m.rejectedServerBusy();
    const text = m.render(g);
    expect(seriesValue(text, 'mesh_admissions_total{result="rejected"}')).toBe(10);
    expect(seriesValue(text, 'mesh_admission_rejections_total{reason="server_busy"}')).toBe(2);
    expect(seriesValue(text, 'mesh_admission_rejections_total{reason="queue_full"}')).toBe(3);
    expect(seriesValue(text, 'mesh_admission_rejections_total{reason="queue_timeout"}')).toBe(5);
  });
});
