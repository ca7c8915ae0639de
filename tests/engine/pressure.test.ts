import { describe, expect, test } from "bun:test";
import { collect, Engine, EngineError, type EngineOptions } from "../../src/engine/index";
import { tinyModel } from "../helpers/model";

const greedy = { temperature: 0 };

async function withEngine(o: Partial<EngineOptions>, fn: (e: Engine) => Promise<void>): Promise<void> {
  const e = await Engine.load({ modelPath: await tinyModel(), threads: 2, ...o });
  try {
    await fn(e);
  } finally {
    await e.close();
  }
}

// Deterministic distinct prompts of exact lengths, as token ids (no shared prefix between seeds).
function tokens(seed: number, n: number): number[] {
  let x = seed * 7919 + 13;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 100 + (x % 20000);
  });
}

type Outcome = { ok: true; finish: string; generated: number } | { ok: false; code: string; retryAfter?: number };

async function outcome(e: Engine, prompt: number[], maxTokens?: number): Promise<Outcome> {
  try {
    const r = await collect(e.generate({ prompt, maxTokens, sampling: greedy, ignoreEos: true }));
    return { ok: true, finish: r.done.finishReason, generated: r.done.completionTokens };
  } catch (err) {
    if (!(err instanceof EngineError)) throw err;
    return { ok: false, code: err.code, retryAfter: err.retryAfter };
  }
}

// Resident mode (host cache off): idle prefixes stay in the pool and the
// eviction plan trims them. The host tier is tested further down.
const resident = { hostCacheMiB: 0 };

// 8 requests of 182 cells each against 512 cells (at most two fit at once): all
// finish, none fails a decode; returns the engine's stats for mode-specific checks.
async function overlappingLongPrompts(e: Engine) {
  const results = await Promise.all(Array.from({ length: 8 }, (_, i) => outcome(e, tokens(i + 1, 150), 32)));
  for (const r of results) expect(r).toEqual({ ok: true, finish: "length", generated: 32 });
  const s = await e.stats();
  expect(s.decodeKvFailures).toBe(0);
  expect(s.decodeFailures).toBe(0);
  expect(s.admitted).toBe(8);
  expect(s.kvCellsUsed).toBeLessThanOrEqual(s.kvCellsTotal);
  return s;
}

describe("KV pressure on a small pool", () => {
  test("overlapping_long_prompts_queue_instead_of_failing_a_decode", async () => {
    await withEngine({ nCtx: 512, nParallel: 4, nBatch: 512, ...resident }, async (e) => {
      const s = await overlappingLongPrompts(e);
      expect(s.queued).toBeGreaterThan(0);
      // Later requests found the pool full of finished requests' prefixes and trimmed them.
      expect(s.evictions).toBeGreaterThan(0);
    });
  });

  test("one_chunk_prefill_evicts_cold_residents_before_its_decode", async () => {
    // The whole prompt fits one batch, so admission is the only chance to make room (seed 004's hole).
    await withEngine({ nCtx: 512, nParallel: 2, nBatch: 512, ...resident }, async (e) => {
      expect(await outcome(e, tokens(1, 220), 8)).toEqual({ ok: true, finish: "length", generated: 8 });
      expect(await outcome(e, tokens(2, 220), 8)).toEqual({ ok: true, finish: "length", generated: 8 });
      const before = await e.stats();
      expect(before.kvCellsResident).toBeGreaterThan(400);
      const r = await outcome(e, tokens(3, 400), 8);
      expect(r).toEqual({ ok: true, finish: "length", generated: 8 });
      const after = await e.stats();
      expect(after.evictions).toBeGreaterThan(before.evictions);
      expect(after.decodeKvFailures).toBe(0);
      expect(after.decodeFailures).toBe(0);
    });
  });

  test("eviction_keeps_the_head_of_a_cold_prefix_when_trimming_suffices", async () => {
    // Three slots, so the third request takes an empty one and only eviction can make room.
    await withEngine({ nCtx: 512, nParallel: 3, nBatch: 512, ...resident }, async (e) => {
      const shared = tokens(7, 200);
      await outcome(e, [...shared, ...tokens(8, 40)], 4);
      await outcome(e, tokens(9, 200), 4);
      // Needs more room than the free cells: the coldest prefix loses only its tail.
      await outcome(e, tokens(10, 230), 4);
      const s = await e.stats();
      expect(s.evictions).toBeGreaterThan(0);
      expect(s.kvCellsResident).toBeGreaterThan(0);
      // The shared head survived: a request continuing it is served from cache.
      const g = e.generate({ prompt: [...shared, ...tokens(11, 10)], maxTokens: 2, sampling: greedy, ignoreEos: true });
      const r = await collect(g);
      expect(r.done.cachedTokens).toBeGreaterThan(0);
    });
  });

  test("overlapping_long_prompts_with_the_host_cache_move_idle_prefixes_out_instead_of_failing", async () => {
    await withEngine({ nCtx: 512, nParallel: 4, nBatch: 512 }, async (e) => {
      const s = await overlappingLongPrompts(e);
      // Finished requests' prefixes went to host RAM instead of being trimmed in the pool.
      expect(s.hostSaves).toBeGreaterThan(0);
      expect(s.hostCacheEntries).toBeGreaterThan(0);
      // Moving them out is counted as an eviction with its own reason.
      expect(s.evictionsOffload).toBeGreaterThan(0);
      expect(s.evictedCellsOffload).toBeGreaterThan(0);
    });
  });

  test("without_the_budget_the_last_line_sheds_only_the_newest_requests_and_keeps_serving", async () => {
    await withEngine({ nCtx: 512, nParallel: 4, nBatch: 512, kvBudget: false }, async (e) => {
      const results = await Promise.all(Array.from({ length: 4 }, (_, i) => outcome(e, tokens(i + 20, 150), 64)));
      const failed = results.filter((r) => !r.ok);
      const done = results.filter((r) => r.ok);
      const s = await e.stats();
      expect(s.decodeKvFailures).toBeGreaterThan(0);
      expect(failed.length).toBeGreaterThan(0);
      for (const f of failed) expect(f).toMatchObject({ ok: false, code: "kv_exhausted" });
      // The oldest request always continues: it has the most invested.
      expect(results[0]).toMatchObject({ ok: true, generated: 64 });
      expect(done.length).toBeGreaterThan(0);
      expect(await outcome(e, tokens(99, 20), 4)).toMatchObject({ ok: true, generated: 4 });
    });
  });
});

describe("the last line of defence with prompts arriving while a stream decodes", () => {
  // Review finding: the retry after shedding rebuilt the batch with the other turn of a split step (the chunk
  // instead of the next tokens, or back), so it could shed a request the retried turn did not need to.
  test("a_stream_decoding_while_prompts_arrive_keeps_going_and_only_newer_requests_are_shed", async () => {
    await withEngine({ nCtx: 512, nParallel: 4, nBatch: 512, kvBudget: false }, async (e) => {
      const first = e.generate({ prompt: tokens(40, 150), maxTokens: 64, sampling: greedy, ignoreEos: true });
      const firstDone = collect(first);
      // Once it decodes, the others arrive: their chunks and its next tokens take turns.
      for (let i = 0; i < 200 && (await e.stats()).generatedTokens < 4; i++) await Bun.sleep(5);
      const later = await Promise.all(Array.from({ length: 3 }, (_, i) => outcome(e, tokens(i + 41, 150), 64)));
      const r = await firstDone;
      expect({ finish: r.done.finishReason, generated: r.done.completionTokens }).toEqual({ finish: "length", generated: 64 });
      for (const x of later) if (!x.ok) expect(x).toMatchObject({ ok: false, code: "kv_exhausted" });
      expect((await e.stats()).decodeKvFailures).toBeGreaterThan(0);
      expect(await outcome(e, tokens(98, 20), 4)).toMatchObject({ ok: true, generated: 4 });
    });
  });
});

describe("admission queue", () => {
  test("a_full_queue_refuses_with_queue_full_and_a_retry_after", async () => {
    await withEngine({ nCtx: 1024, nParallel: 1, queueCapacity: 1 }, async (e) => {
      const results = await Promise.all([outcome(e, tokens(1, 20), 200), outcome(e, tokens(2, 20), 4), outcome(e, tokens(3, 20), 4)]);
      expect(results[0]).toMatchObject({ ok: true, generated: 200 });
      expect(results[1]).toMatchObject({ ok: true, generated: 4 });
      expect(results[2]).toMatchObject({ ok: false, code: "queue_full" });
      expect((results[2] as { retryAfter?: number }).retryAfter).toBeGreaterThanOrEqual(1);
      const s = await e.stats();
      expect(s.rejectedQueueFull).toBe(1);
      // The refused request counts as rejected only, not also as queued.
      expect(s.queued).toBe(1);
    });
  });

  test("a_zero_capacity_queue_refuses_whatever_cannot_start_at_once", async () => {
    await withEngine({ nCtx: 1024, nParallel: 1, queueCapacity: 0 }, async (e) => {
      const results = await Promise.all([outcome(e, tokens(1, 20), 100), outcome(e, tokens(2, 20), 4)]);
      expect(results[0]).toMatchObject({ ok: true });
      expect(results[1]).toMatchObject({ ok: false, code: "queue_full" });
    });
  });

  test("a_request_waiting_past_the_queue_timeout_is_refused", async () => {
    await withEngine({ nCtx: 2048, nParallel: 1, queueTimeoutMs: 1 }, async (e) => {
      const results = await Promise.all([outcome(e, tokens(1, 20), 1000), outcome(e, tokens(2, 20), 4)]);
      expect(results[0]).toMatchObject({ ok: true, generated: 1000 });
      expect(results[1]).toMatchObject({ ok: false, code: "queue_timeout" });
      expect((await e.stats()).rejectedQueueTimeout).toBe(1);
    });
  });

  test("a_cancelled_waiting_request_leaves_the_queue", async () => {
    await withEngine({ nCtx: 1024, nParallel: 1, queueCapacity: 1 }, async (e) => {
      const first = e.generate({ prompt: tokens(1, 20), maxTokens: 300, ignoreEos: true });
      const second = e.generate({ prompt: tokens(2, 20), maxTokens: 4, ignoreEos: true });
      second.cancel();
      const r2 = await collect(second);
      expect(r2.done.finishReason).toBe("cancelled");
      // Its place is free again: a third request may wait.
      const third = await outcome(e, tokens(3, 20), 4);
      expect(third).toMatchObject({ ok: true });
      await collect(first);
    });
  });
});

describe("reservations", () => {
  test("a_request_without_max_tokens_grows_past_its_reservation_into_free_room", async () => {
    await withEngine({ nCtx: 512, nParallel: 1, defaultReserveOutput: 8 }, async (e) => {
      const r = await outcome(e, tokens(1, 20));
      expect(r).toMatchObject({ ok: true, finish: "length" });
      expect((r as { generated: number }).generated).toBeGreaterThan(400);
    });
  });

  test("a_request_outgrowing_its_reservation_in_a_full_pool_ends_with_length_not_an_error", async () => {
    await withEngine({ nCtx: 512, nParallel: 2, defaultReserveOutput: 8 }, async (e) => {
      // The second request's explicit reservation takes what the first could grow into.
      const grow = outcome(e, tokens(1, 100));
      const fixed = outcome(e, tokens(2, 100), 300);
      const [a, b] = await Promise.all([grow, fixed]);
      expect(b).toEqual({ ok: true, finish: "length", generated: 300 });
      expect(a).toMatchObject({ ok: true, finish: "length" });
      const s = await e.stats();
      expect(s.stoppedAtPoolLimit).toBe(1);
      expect(s.decodeKvFailures).toBe(0);
    });
  });

  test("a_prompt_larger_than_the_pool_fails_at_once_naming_the_limit", async () => {
    await withEngine({ nCtx: 256, nParallel: 2 }, async (e) => {
      const r = await outcome(e, tokens(1, 300), 4);
      expect(r).toMatchObject({ ok: false, code: "context_length_exceeded" });
    });
  });
});
