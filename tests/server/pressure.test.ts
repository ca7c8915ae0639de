import { afterAll, beforeAll, describe, expect, test } from "bun:test";
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

const post = (b: string) =>
  fetch(`${t.url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: b });

async function metric(name: string): Promise<number> {
  const text = await (await fetch(`${t.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return Number(line?.split(" ")[1] ?? Number.NaN);
}

describe("KV admission over HTTP", () => {
  test("a_full_queue_answers_429_with_retry_after_in_openai_shape", async () => {
    // One slot, one queue place: a running stream, a waiting request, then a refused one.
    const running = await post(body(900, true));
    expect(running.status).toBe(200);
    const reader = running.body?.getReader();
    await reader?.read();
    const waiting = post(body(2));
    // The waiting request must have reached the queue before the third arrives.
    for (let i = 0; i < 200 && (await metric("mesh_requests_waiting")) < 1; i++) await Bun.sleep(10);
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

  test("the_openai_client_sees_a_rate_limit_error", async () => {
    const running = t.client.chat.completions.create({
      model: t.model.id,
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 900,
      temperature: 0,
      // @ts-expect-error llama.cpp extension
      ignore_eos: true,
    });
    for (let i = 0; i < 200 && (await metric("mesh_slots_busy")) < 1; i++) await Bun.sleep(10);
    const waiting = post(body(2));
    for (let i = 0; i < 200 && (await metric("mesh_requests_waiting")) < 1; i++) await Bun.sleep(10);
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
      "mesh_kv_evictions_total",
      "mesh_kv_evicted_cells_total",
      "mesh_decode_kv_failures_total",
      "mesh_cached_prompt_tokens_total",
    ]) {
      expect(text).toContain(series);
    }
    expect(await metric('mesh_admission_rejections_total{reason="queue_full"}')).toBe(2);
    expect(await metric("mesh_decode_kv_failures_total")).toBe(0);
    // Counted 429s appear in the request metrics with the status actually sent.
    expect(text).toContain('status="429"');
  });
});
