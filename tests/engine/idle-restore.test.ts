// Copying back, while the engine is idle, the conversation an admission moved to host RAM: the
// wait alone, then the scheduler over the real library and the tiny model on a clock the test
// moves, then the engine with its Worker's own timer. The turn that follows must decode exactly
// the greedy tokens and cached_tokens it would have without the copy; no test looks at a time.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { collect, Engine } from "../../src/engine";
import { IDLE_RESTORE_BYTES_PER_MS, IDLE_SAVE_COPY_FACTOR, IDLE_SAVE_MIN_MS, idleRestoreDelayMs } from "../../src/engine/idle-save";
import { closeModel, type OpenedModel, schedulerDeps } from "../../src/engine/open";
import { DEFAULT_SAMPLING, type LoadOptions, type TokenEvent } from "../../src/engine/protocol";
import { Scheduler } from "../../src/engine/scheduler";
import { tinyLoadOptions, tinyModel } from "../helpers/model";
import { greedyRequest, openTinyModel, tokenIds } from "../helpers/native-model";

const MiB = 1024 * 1024;

describe("the idle-restore wait", () => {
  test("small_conversations_wait_the_minimum_and_large_ones_ten_times_their_copy", () => {
    expect(idleRestoreDelayMs(0)).toBe(IDLE_SAVE_MIN_MS);
    expect(idleRestoreDelayMs(MiB)).toBe(IDLE_SAVE_MIN_MS);
    // The bench model's 16k-token conversation: 128 MiB, about 21 ms to copy back, 209 ms of wait.
    const big = 128 * MiB;
    expect(idleRestoreDelayMs(big)).toBe(Math.ceil((IDLE_SAVE_COPY_FACTOR * big) / IDLE_RESTORE_BYTES_PER_MS));
    expect(idleRestoreDelayMs(2 * big)).toBeGreaterThan(idleRestoreDelayMs(big));
  });
});

const FLAGS_OFFSET = 4;
let opened: OpenedModel;
let options: LoadOptions;
let control: Int32Array;
let clock = 0;

beforeAll(async () => {
  options = await tinyLoadOptions({ nCtx: 2048, nParallel: 2, hostCacheMiB: 256 });
  control = new Int32Array(FLAGS_OFFSET + 64);
  opened = openTinyModel(options, control);
});
afterAll(() => {
  if (opened) closeModel(opened);
});

function scheduler(o: { nCtx?: number; idleRestore?: boolean } = {}): Scheduler {
  opened.native.mesh_memory_clear(opened.ctx, 1);
  clock = 1000;
  const deps = schedulerDeps(opened, options, control, FLAGS_OFFSET);
  return new Scheduler({ ...deps, nCtx: o.nCtx ?? deps.nCtx, idleRestore: o.idleRestore ?? true, now: () => clock });
}

let nextId = 1;
/** Run one greedy request to its end; its generated tokens and cached count. */
function run(s: Scheduler, prompt: number[], maxTokens = 8): { tokens: number[]; cached: number } {
  const id = nextId++ % 60;
  const out: TokenEvent[] = [];
  s.submit(id, FLAGS_OFFSET + id, greedyRequest(prompt, maxTokens), prompt, out);
  while (s.hasWork()) s.step(out);
  const done = out.find((e) => e.kind === "done" && e.id === id);
  if (done?.kind !== "done") throw new Error(`request ${id} did not finish: ${JSON.stringify(out.filter((e) => e.kind === "error"))}`);
  return { tokens: out.flatMap((e) => (e.kind === "text" && e.id === id ? e.tokens : [])), cached: done.cachedTokens };
}

const tokens = (seed: number, n: number) => tokenIds(seed, n);
const agent = tokens(1, 300);
const other = tokens(2, 100);
const turn = [...agent, ...tokens(3, 12)];

/** Wait out the idle time in front of the copy back, doing the idle work due on the way. */
function idle(s: Scheduler): void {
  for (let i = 0; i < 10; i++) {
    const due = s.nextIdleWorkInMs();
    if (due === null) return;
    clock += due;
    s.idleWork();
  }
}

describe("idle restore in the scheduler over the real library", () => {
  test("a_conversation_another_request_displaced_is_back_in_the_pool_before_its_next_turn", () => {
    // Reference: the turn right after the conversation, nothing in between.
    const ref = scheduler();
    run(ref, agent);
    const expected = run(ref, turn, 16);
    expect(expected.cached).toBe(agent.length);
    ref.dispose();

    const s = scheduler();
    run(s, agent);
    run(s, other);
    // The other request's admission moved the agent's conversation to host RAM.
    expect(s.stats().hostSaves).toBeGreaterThanOrEqual(1);
    expect(s.stats().kvCellsResident).toBeLessThan(agent.length);
    idle(s);
    const back = s.stats();
    expect(back.hostIdleRestores).toBe(1);
    // Its prompt and all but the last of its 8 generated tokens (never fed back).
    expect(back.hostIdleRestoredTokens).toBe(agent.length + 7);
    expect(back.kvCellsResident).toBeGreaterThanOrEqual(agent.length + other.length);
    const r = run(s, turn, 16);
    // Served from the pool as it was: no copy at the turn's admission, the same tokens.
    expect(s.stats().hostRestores).toBe(back.hostRestores);
    expect(r.cached).toBe(expected.cached);
    expect(r.tokens).toEqual(expected.tokens);
    s.dispose();
  });

  test("nothing_comes_back_before_the_engine_has_been_idle_for_the_wait", () => {
    const s = scheduler();
    run(s, agent);
    run(s, other);
    const wait = s.nextIdleWorkInMs();
    expect(wait).toBe(IDLE_SAVE_MIN_MS);
    clock += IDLE_SAVE_MIN_MS - 1;
    expect(s.restoreIdle()).toBe(false);
    // A turn arriving now copies it back itself, as without idle restore.
    const r = run(s, turn, 4);
    expect(r.cached).toBe(agent.length);
    expect(s.stats().hostRestores).toBe(1);
    expect(s.stats().hostIdleRestores).toBe(0);
    s.dispose();
  });

  test("the_conversation_the_turn_displaced_is_the_one_that_comes_back_and_only_once", () => {
    const s = scheduler();
    run(s, agent);
    run(s, other);
    // The agent's turn comes first and restores itself, displacing the other conversation.
    run(s, turn, 4);
    idle(s);
    const st = s.stats();
    expect(st.hostIdleRestores).toBe(1);
    expect(st.hostIdleRestoredTokens).toBe(other.length + 7);
    expect(s.nextIdleWorkInMs()).toBeNull();
    expect(s.idleWork()).toBe(false);
    s.dispose();
  });

  test("a_request_that_does_not_continue_it_clears_it_again_without_a_second_save", () => {
    const s = scheduler();
    run(s, agent);
    run(s, other);
    idle(s);
    const before = s.stats();
    expect(before.hostIdleRestores).toBe(1);
    const r = run(s, tokens(4, 80), 4);
    expect(r.cached).toBe(0);
    const after = s.stats();
    // Its host copy still covers it, and the other conversation was saved in idle time.
    expect(after.hostSaves).toBe(before.hostSaves);
    expect(after.evictedCellsOffload).toBeGreaterThan(before.evictedCellsOffload);
    expect(after.kvCellsResident).toBeLessThan(agent.length);
    s.dispose();
  });

  // Review finding: the copy back lands above the displacing conversation, and the bound of placed
  // cells kept counting it after it was cleared, so the displacer's next turn was compacted (a copy).
  test("the_displacers_next_turn_is_not_compacted_for_cells_the_copy_back_left", () => {
    const big = tokens(7, 400);
    const bigTurn = [...big, ...tokens(8, 12)];
    const ref = scheduler({ idleRestore: false });
    run(ref, agent);
    run(ref, big);
    const expected = run(ref, bigTurn, 16);
    ref.dispose();

    const s = scheduler();
    run(s, agent);
    run(s, big);
    idle(s);
    expect(s.stats().hostIdleRestores).toBe(1);
    const r = run(s, bigTurn, 16);
    expect(s.stats().compactions).toBe(0);
    expect(r.cached).toBe(expected.cached);
    expect(r.tokens).toEqual(expected.tokens);
    s.dispose();
  });

  // Found in the engine bench: the copied-back conversation was the agent's last turn (prefix and a
  // long tail); the next turn kept only the prefix, and the bound of placed cells still counted the
  // tail, so the turn was compacted (a copy as long as the restore it was meant to save).
  test("a_turn_that_keeps_only_the_prefix_of_the_copied_back_conversation_is_not_compacted", () => {
    const long = [...agent, ...tokens(12, 300)];
    const ref = scheduler({ idleRestore: false });
    run(ref, agent);
    run(ref, long);
    run(ref, other);
    const expected = run(ref, turn, 16);
    ref.dispose();

    const s = scheduler();
    run(s, agent);
    run(s, long);
    run(s, other);
    idle(s);
    expect(s.stats().hostIdleRestoredTokens).toBe(long.length + 7);
    const r = run(s, turn, 16);
    expect(s.stats().compactions).toBe(0);
    expect(s.stats().hostRestores).toBe(0);
    expect(r.cached).toBe(agent.length);
    expect(r.cached).toBe(expected.cached);
    expect(r.tokens).toEqual(expected.tokens);
    s.dispose();
  });

  // Review finding: every later admission recorded the copied-back conversation as displaced again,
  // so one that never came back was copied in after every idle gap.
  test("a_conversation_copied_back_and_displaced_again_unused_is_not_copied_back_again", () => {
    const s = scheduler();
    run(s, agent);
    run(s, other);
    idle(s);
    expect(s.stats().hostIdleRestores).toBe(1);
    // The other conversation's next turn comes first: the agent's is cleared again, unused.
    const r = run(s, [...other, ...tokens(11, 12)], 4);
    expect(r.cached).toBe(other.length);
    idle(s);
    expect(s.stats().hostIdleRestores).toBe(1);
    // Its host copy is still there for its own turn.
    const back = run(s, turn, 4);
    expect(back.cached).toBe(agent.length);
    s.dispose();
  });

  test("it_does_not_come_back_without_an_empty_slot_or_without_free_room", () => {
    // One slot: the request that displaced it still holds its conversation there.
    const one = new Scheduler({
      ...schedulerDeps(opened, { ...options, nParallel: 1 }, control, FLAGS_OFFSET),
      nParallel: 1,
      now: () => clock,
    });
    opened.native.mesh_memory_clear(opened.ctx, 1);
    run(one, agent);
    run(one, tokens(5, 200));
    idle(one);
    expect(one.stats().hostIdleRestores).toBe(0);
    one.dispose();
    // A pool too small to hold both: nothing is evicted to make room for a guess.
    const small = scheduler({ nCtx: 400 });
    run(small, agent);
    run(small, tokens(6, 200));
    idle(small);
    expect(small.stats().hostIdleRestores).toBe(0);
    expect(small.stats().evictedCellsBudget).toBe(0);
    small.dispose();
  });

  test("idle_restore_off_leaves_the_pool_as_the_admission_left_it", () => {
    const s = scheduler({ idleRestore: false });
    run(s, agent);
    run(s, other);
    idle(s);
    expect(s.stats().hostIdleRestores).toBe(0);
    expect(s.stats().kvCellsResident).toBeLessThan(agent.length);
    s.dispose();
  });
});

describe("idle restore in the engine", () => {
  test("the_worker_copies_a_displaced_conversation_back_on_its_own_and_the_turn_is_served_from_the_pool", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), threads: 2, nCtx: 2048, nParallel: 2 });
    try {
      const greedy = { ...DEFAULT_SAMPLING, temperature: 0 };
      await collect(e.generate({ prompt: agent, maxTokens: 4, sampling: greedy, ignoreEos: true }));
      await collect(e.generate({ prompt: other, maxTokens: 4, sampling: greedy, ignoreEos: true }));
      // The Worker's idle timer does it; wait for it without assuming how long it takes.
      for (let i = 0; i < 600 && (await e.stats()).hostIdleRestores === 0; i++) await Bun.sleep(50);
      const back = await e.stats();
      expect(back.hostIdleRestores).toBe(1);
      const r = await collect(e.generate({ prompt: turn, maxTokens: 4, sampling: greedy, ignoreEos: true }));
      expect(r.done.cachedTokens).toBe(agent.length);
      expect((await e.stats()).hostRestores).toBe(back.hostRestores);
    } finally {
      await e.close();
    }
  });
});
