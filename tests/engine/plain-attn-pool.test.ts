// Which scheduler steps take the plain attention path, watched through the real library: the
// plain path multiplies every query with every cell up to the highest in use (other sequences'
// cells too) where flash attention skips the cells a query may not see, so only one sequence's
// batch over a pool that holds little else may take it. No test here looks at a time.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { DEFAULT_PLAIN_ATTN } from "../../src/engine/attention";
import type { Native } from "../../src/engine/native";
import { closeModel, type OpenedModel, schedulerDeps } from "../../src/engine/open";
import type { LoadOptions, TokenEvent } from "../../src/engine/protocol";
import { Scheduler } from "../../src/engine/scheduler";
import { tinyLoadOptions } from "../helpers/model";
import { greedyRequest, openTinyModel, tokenIds } from "../helpers/native-model";

const FLAGS_OFFSET = 1;
const PARALLEL = 16;
let opened: OpenedModel;
let options: LoadOptions;
const control = new Int32Array(FLAGS_OFFSET + 64);

beforeAll(async () => {
  options = await tinyLoadOptions({ nCtx: 8192, nBatch: 1024, nParallel: PARALLEL, flashAttn: 1, plainAttn: DEFAULT_PLAIN_ATTN });
  opened = openTinyModel(options, control);
});
afterAll(() => {
  if (opened) closeModel(opened);
});

interface Step {
  n: number;
  seqs: number;
  flash: number;
}

// A scheduler over an empty pool whose every decode records its size, its sequences and the
// kernel the library really ran it with.
function watched(): { s: Scheduler; steps: Step[] } {
  const real = opened.native;
  real.mesh_memory_clear(opened.ctx, 1);
  // As an earlier scheduler may leave it: disarmed (the next one must arm it again).
  real.mesh_set_plain_attn(opened.ctx, 0, 0);
  const steps: Step[] = [];
  const native = {
    ...real,
    mesh_decode: (ctx: never, tokens: never, pos: never, seq: Int32Array, logits: never, n: number) => {
      const rc = real.mesh_decode(ctx, tokens, pos, seq, logits, n);
      steps.push({ n, seqs: new Set(seq.subarray(0, n)).size, flash: real.mesh_attn_is_flash(opened.ctx) });
      return rc;
    },
  } as unknown as Native;
  const deps = schedulerDeps(opened, options, control, FLAGS_OFFSET);
  expect(deps.plainAttn).toEqual(DEFAULT_PLAIN_ATTN);
  return { s: new Scheduler({ ...deps, native }), steps };
}

const prompt = (seed: number, length: number) => tokenIds(seed, length);

function run(s: Scheduler, id: number, p: number[], maxTokens: number): void {
  s.submit(id, FLAGS_OFFSET + (id % 32), greedyRequest(p, maxTokens), p, []);
  while (s.hasWork()) s.step([] as TokenEvent[]);
}

describe("plain attention only where the pool holds little but the step's own sequence", () => {
  test("a_turn_over_its_own_cached_prefix_alone_in_the_pool_takes_the_plain_path", () => {
    const { s, steps } = watched();
    const p = prompt(1, 600);
    run(s, 1, p, 1);
    steps.length = 0;
    run(s, 2, [...p, ...prompt(2, 16)], 1);
    expect(steps[0]).toEqual({ n: 16, seqs: 1, flash: 0 });
    expect(s.stats().plainAttnSteps).toBe(1);
  });

  test("a_turn_in_a_pool_dirty_with_another_conversations_idle_prefix_keeps_flash_attention", () => {
    const { s, steps } = watched();
    const mine = prompt(3, 600);
    run(s, 1, mine, 1);
    // Another conversation, as long as this one, stays resident and idle in the pool.
    run(s, 2, prompt(4, 600), 1);
    steps.length = 0;
    const before = s.stats().plainAttnSteps;
    run(s, 3, [...mine, ...prompt(5, 16)], 1);
    expect(steps[0]?.n).toBe(16);
    expect(steps[0]?.seqs).toBe(1);
    expect(steps[0]?.flash).toBe(1);
    expect(s.stats().plainAttnSteps).toBe(before);
  });

  test("a_step_of_a_dozen_streams_each_decoding_one_token_keeps_flash_attention", () => {
    const { s, steps } = watched();
    for (let i = 0; i < PARALLEL; i++) s.submit(i, FLAGS_OFFSET + i, greedyRequest(prompt(10 + i, 100), 4), prompt(10 + i, 100), []);
    while (s.hasWork()) s.step([] as TokenEvent[]);
    const generation = steps.filter((x) => x.seqs >= DEFAULT_PLAIN_ATTN.min && x.n === x.seqs);
    expect(generation.length).toBeGreaterThan(0);
    for (const x of generation) expect(x).toEqual({ n: x.n, seqs: x.seqs, flash: 1 });
    expect(s.stats().plainAttnSteps).toBe(0);
  });
});
