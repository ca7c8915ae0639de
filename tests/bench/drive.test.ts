// drive() and its 429 handling against a real HTTP endpoint on 127.0.0.1
// that answers like a mesh node (usage with cached tokens, /metrics).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { type DriveOptions, drive, ProbeError, requestWithRetries } from "../../src/bench/drive";
import { buildWorkload } from "../../src/bench/workload";

interface Seen {
  model: string;
  stream: boolean;
  body: string;
}

let server: ReturnType<typeof Bun.serve>;
let url = "";
const seen: Seen[] = [];
let refusals = 0;
// Bodies already refused once: whether a body gets a 429 depends only on its bytes, never on timing.
const refused = new Set<string>();
let scrapes = 0;

beforeAll(() => {
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const path = new URL(req.url).pathname;
      if (path === "/metrics") {
        scrapes++;
        return new Response(
          `mesh_kv_cells{state="running"} ${scrapes % 7}\nmesh_kv_cells{state="resident"} 5\nmesh_kv_cells{state="free"} 100\nmesh_kv_evictions_total ${scrapes}\n`,
        );
      }
      const text = await req.text();
      const body = JSON.parse(text) as { model: string; stream?: boolean; messages: unknown[] };
      const stream = body.stream === true;
      if (body.model === "always-busy")
        return Response.json({ error: { message: "busy" } }, { status: 429, headers: { "retry-after": "0" } });
      if (body.model === "slow-busy" && refusals++ === 0) {
        return Response.json({ error: { message: "busy" } }, { status: 429, headers: { "retry-after": "3600" } });
      }
      if (body.model !== "m" && body.model !== "slow-busy") return Response.json({ error: { message: "no such model" } }, { status: 404 });
      seen.push({ model: body.model, stream, body: text });
      // About a third of the bodies are refused once, as a node with a full queue would.
      if (BigInt(Bun.hash(text)) % 3n === 0n && !refused.has(text)) {
        refused.add(text);
        return Response.json({ error: { message: "queue full" } }, { status: 429, headers: { "retry-after": "0" } });
      }
      const usage = { prompt_tokens: 10 * body.messages.length, completion_tokens: 2, prompt_tokens_details: { cached_tokens: 5 } };
      if (!stream) return Response.json({ choices: [{ message: { content: "x" } }], usage });
      return new Response(
        `data: ${JSON.stringify({ choices: [{ delta: { content: "x" } }] })}\n\ndata: ${JSON.stringify({ choices: [], usage })}\n\ndata: [DONE]\n\n`,
        {
          headers: { "content-type": "text/event-stream" },
        },
      );
    },
  });
  url = `http://127.0.0.1:${server.port}`;
});

afterAll(() => server.stop(true));

const options = (model: string, lines: string[] = []): DriveOptions => ({
  name: "fake",
  endpoint: { url },
  model,
  maxRetries: 5,
  maxRetryWaitS: 1,
  requestTimeoutMs: 60_000,
  sampleIntervalMs: 50,
  maxSamples: 1000,
  progressIntervalMs: 60_000,
  onProgress: (l) => lines.push(l),
});

const WORKLOAD = { seed: 3, loops: 3, turns: 2, systemTokens: 50, toolResultTokens: 20, userTokens: 5, maxTokens: 4, staggerMs: 20 };
const clock = () => performance.now();

describe("kv-pressure driver", () => {
  test("runs_every_turn_and_one_repeat_per_loop_and_retries_429s", async () => {
    seen.length = 0;
    const lines: string[] = [];
    const d = await drive(buildWorkload(WORKLOAD), options("m", lines));
    expect(d.records).toHaveLength(3 * 3);
    expect(d.records.every((r) => r.ok)).toBe(true);
    // The probe is the first request; and some answers were 429s that were retried.
    expect(d.probePromptTokens).toBe(20);
    expect(d.records.reduce((n, r) => n + r.status429, 0)).toBeGreaterThan(0);
    for (const loop of [0, 1, 2]) {
      const mine = d.records.filter((r) => r.loop === loop);
      expect(mine.map((r) => `${r.kind}${r.turn}`)).toEqual(["turn0", "turn1", "repeat1"]);
      expect(mine.every((r, i) => i === 0 || r.startMs >= (mine[i - 1]?.endMs ?? 0))).toBe(true);
    }
    expect(d.before?.kv).not.toBeNull();
    expect(d.after?.evictions).toBeGreaterThan(d.before?.evictions ?? 0);
    expect(d.samples.length).toBeGreaterThan(0);
    expect(d.samples.at(-1)?.done).toBe(9);
    expect(lines.at(-1)).toContain("finished 9 requests");
  });

  test("the_same_workload_sends_the_same_bytes_every_run", async () => {
    const w = buildWorkload(WORKLOAD);
    seen.length = 0;
    refused.clear();
    await drive(w, options("m"));
    const first = seen.map((s) => s.body).sort();
    seen.length = 0;
    refused.clear();
    await drive(buildWorkload({ ...WORKLOAD }), options("m"));
    expect(seen.map((s) => s.body).sort()).toEqual(first);
    // Turns are streamed or not as planned, and the repeat is the last turn again.
    expect(new Set(first).size).toBeLessThan(first.length);
  });

  test("a_failed_warm_up_stops_the_target_with_a_clear_error", async () => {
    const run = drive(buildWorkload(WORKLOAD), options("nope"));
    await expect(run).rejects.toBeInstanceOf(ProbeError);
    await expect(drive(buildWorkload(WORKLOAD), options("nope"))).rejects.toThrow("warm-up request failed (HTTP 404): no such model");
  });

  test("gives_up_after_the_retry_budget", async () => {
    const r = await requestWithRetries({ ...options("always-busy"), maxRetries: 3 }, { model: "always-busy" }, clock);
    expect(r).toMatchObject({ attempts: 4, status429: 4, status: 429, ok: false });
    // Retry-After: 0 still pauses briefly before each retry.
    expect(r.waitedMs).toBe(3 * 50);
  });

  test("a_long_retry_after_is_capped", async () => {
    refusals = 0;
    const r = await requestWithRetries({ ...options("slow-busy"), maxRetryWaitS: 1 }, { model: "slow-busy", messages: [] }, clock);
    expect(r).toMatchObject({ attempts: 2, status429: 1, ok: true, waitedMs: 1000 });
  });
});
