// Compacting the KV pool before an agent's next turn: the decision alone, and
// the scheduler carrying it out over the real library and the tiny model. A
// compacted turn must produce exactly the greedy tokens and cached_tokens of
// the same turn in a clean pool; no test here looks at how long anything took.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { KV_PAD, shouldCompact } from "../../src/engine/compaction";
import { closeModel, type OpenedModel, schedulerDeps } from "../../src/engine/open";
import type { LoadOptions, TokenEvent } from "../../src/engine/protocol";
import { Scheduler } from "../../src/engine/scheduler";
import { tinyLoadOptions } from "../helpers/model";
import { greedyRequest, openTinyModel, tokenIds } from "../helpers/native-model";

describe("the compaction decision", () => {
  test("compacts_when_the_window_shrinks_by_a_padded_block_and_the_saved_attention_outweighs_the_copy", () => {
    // Window 4864 against 2304 cells: 2560 wasted cells for each of 32 new tokens, against 2048 copied.
    expect(shouldCompact({ placed: 4608, keep: 2048, newTokens: 32 })).toBe(true);
  });

  test("does_not_compact_a_pool_that_is_already_compact_or_within_one_padded_block", () => {
    expect(shouldCompact({ placed: 2048, keep: 2048, newTokens: 16 })).toBe(false);
    // 2100 + 16 and 2048 + 16 pad to the same 2304-cell window.
    expect(shouldCompact({ placed: 2100, keep: 2048, newTokens: 16 })).toBe(false);
    expect(shouldCompact({ placed: 2048 + KV_PAD - 1, keep: 2048, newTokens: 1 })).toBe(false);
  });

  test("does_not_compact_when_the_copy_outweighs_the_attention_it_saves", () => {
    // 256 wasted cells for 1 new token do not pay for copying 16384 cells.
    expect(shouldCompact({ placed: 16384 + 300, keep: 16384, newTokens: 1 })).toBe(false);
    expect(shouldCompact({ placed: 5000, keep: 0, newTokens: 100 })).toBe(false);
  });
});

const FLAGS_OFFSET = 1;
let opened: OpenedModel;
let options: LoadOptions;
let control: Int32Array;

beforeAll(async () => {
  options = await tinyLoadOptions({ nParallel: 3, hostCacheMiB: 256 });
  control = new Int32Array(FLAGS_OFFSET + 64);
  opened = openTinyModel(options, control);
});
afterAll(() => {
  if (opened) closeModel(opened);
});

// Every scenario starts from an empty pool, so placement is the same each time.
function scheduler(o: Partial<LoadOptions> = {}): Scheduler {
  opened.native.mesh_memory_clear(opened.ctx, 1);
  return new Scheduler(schedulerDeps(opened, { ...options, ...o }, control, FLAGS_OFFSET));
}

const prompt = (seed: number, length: number) => tokenIds(seed, length);

interface Run {
  tokens: number[];
  done?: Extract<TokenEvent, { kind: "done" }>;
}

/** Submit requests (id -> prompt, max tokens) together and run the scheduler until all are done. */
function run(s: Scheduler, reqs: Array<[number, number[], number]>): Map<number, Run> {
  const got = new Map<number, Run>();
  const out: TokenEvent[] = [];
  for (const [id, p, max] of reqs) {
    got.set(id, { tokens: [] });
    s.submit(id, FLAGS_OFFSET + id, greedyRequest(p, max), p, out);
  }
  const take = (events: TokenEvent[]) => {
    for (const e of events) {
      const r = got.get(e.id);
      if (!r) continue;
      if (e.kind === "text") r.tokens.push(...e.tokens);
      if (e.kind === "done") r.done = e;
      if (e.kind === "error") throw new Error(`request ${e.id}: ${e.error.message}`);
    }
  };
  take(out);
  while (s.hasWork()) {
    const step: TokenEvent[] = [];
    s.step(step);
    take(step);
  }
  return got;
}

const PREFIX = prompt(1, 300);
const TURN = [...PREFIX, ...prompt(2, 20)];

/** The next turn of a conversation whose 300-token prefix sits in the pool: greedy tokens and cached tokens. */
function cleanTurn(): Run {
  const s = scheduler();
  run(s, [[1, PREFIX, 1]]);
  const r = run(s, [[2, TURN, 8]]).get(2) as Run;
  s.dispose();
  return r;
}

// The prefix computed while a long stream ran beside it, so its cells sit above the stream's; the
// stream's slot is then saved and cleared when the turn is admitted, leaving the prefix high.
function dirtyTurn(hostCacheMiB: number): { turn: Run; compactions: number } {
  const s = scheduler({ hostCacheMiB });
  run(s, [
    [1, prompt(3, 700), 4],
    [2, PREFIX, 1],
  ]);
  const turn = run(s, [[3, TURN, 8]]).get(3) as Run;
  const compactions = s.stats().compactions;
  s.dispose();
  return { turn, compactions };
}

describe("compaction in the scheduler over the real library", () => {
  test("a_prefix_left_high_in_the_pool_is_compacted_and_the_turn_gives_the_clean_pools_tokens_and_cached_tokens", () => {
    const clean = cleanTurn();
    const dirty = dirtyTurn(options.hostCacheMiB);
    expect(dirty.compactions).toBe(1);
    expect(dirty.turn.done?.cachedTokens).toBe(PREFIX.length);
    expect(clean.done?.cachedTokens).toBe(PREFIX.length);
    expect(dirty.turn.tokens).toHaveLength(8);
    expect(dirty.turn.tokens).toEqual(clean.tokens);
  });

  test("a_turn_in_a_clean_pool_is_not_compacted", () => {
    const s = scheduler();
    run(s, [[1, PREFIX, 1]]);
    run(s, [[2, TURN, 8]]);
    // The next turn after it trims the reply and reuses the rest: still one compact sequence.
    run(s, [[3, [...TURN, ...prompt(4, 10)], 4]]);
    expect(s.stats().compactions).toBe(0);
    s.dispose();
  });

  test("without_the_host_cache_nothing_is_compacted_and_the_prefix_is_still_reused", () => {
    const dirty = dirtyTurn(0);
    expect(dirty.compactions).toBe(0);
    expect(dirty.turn.done?.cachedTokens).toBe(PREFIX.length);
    expect(dirty.turn.tokens).toHaveLength(8);
  });

  test("done_reports_where_the_time_to_first_token_went", () => {
    const s = scheduler();
    const r = run(s, [[1, PREFIX, 2]]).get(1) as Run;
    const p = r.done?.phases;
    expect(p).toBeDefined();
    const keys = ["queuedMs", "admitMs", "restoreMs", "saveMs", "decodeMs", "sampleMs"] as const;
    for (const k of keys) {
      const v = p?.[k];
      expect(typeof v === "number" && Number.isFinite(v) && v >= 0).toBe(true);
    }
    // Parts of the admission cannot exceed it.
    expect((p?.restoreMs ?? 0) + (p?.saveMs ?? 0)).toBeLessThanOrEqual((p?.admitMs ?? 0) + 1e-6);
    s.dispose();
  });
});
