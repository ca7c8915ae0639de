// When an idle conversation's KV is copied to host RAM ahead of need: the wait alone, then the
// scheduler over the real library and the tiny model on a clock the test moves. A long
// conversation waits longer, so an agent's next turn does not queue behind its own copy.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { IDLE_COPY_BYTES_PER_MS, IDLE_SAVE_COPY_FACTOR, IDLE_SAVE_MIN_MS, idleSaveDelayMs } from "../../src/engine/idle-save";
import { kvBytesPerToken } from "../../src/engine/kv";
import { closeModel, type OpenedModel, schedulerDeps } from "../../src/engine/open";
import type { LoadOptions, TokenEvent } from "../../src/engine/protocol";
import { Scheduler } from "../../src/engine/scheduler";
import { tinyLoadOptions } from "../helpers/model";
import { greedyRequest, openTinyModel } from "../helpers/native-model";

const MiB = 1024 * 1024;

describe("the idle-save wait", () => {
  test("short_conversations_wait_the_minimum_and_long_ones_ten_times_their_copy", () => {
    expect(idleSaveDelayMs(0)).toBe(IDLE_SAVE_MIN_MS);
    expect(idleSaveDelayMs(MiB)).toBe(IDLE_SAVE_MIN_MS);
    // The bench model's 16k-token conversation: 128 MiB.
    const big = 128 * MiB;
    expect(idleSaveDelayMs(big)).toBe(Math.ceil((IDLE_SAVE_COPY_FACTOR * big) / IDLE_COPY_BYTES_PER_MS));
    expect(idleSaveDelayMs(big)).toBeGreaterThan(1000);
    expect(idleSaveDelayMs(2 * big)).toBeGreaterThan(idleSaveDelayMs(big));
  });

  test("kv_bytes_per_token_counts_k_and_v_of_every_layer_in_f16", () => {
    // The bench model: 8 layers, 4 KV heads of 64: 8 KiB per token.
    expect(kvBytesPerToken({ nLayer: 8, nEmbd: 1024, nHead: 16, nHeadKv: 4 })).toBe(8192);
    expect(kvBytesPerToken({ nLayer: 8, nEmbd: 0, nHead: 0, nHeadKv: 0 })).toBe(0);
  });
});

describe("idle-time saves in the scheduler over the real library", () => {
  const FLAGS_OFFSET = 4;
  let opened: OpenedModel;
  let options: LoadOptions;
  let control: Int32Array;
  let clock = 0;

  beforeAll(async () => {
    options = await tinyLoadOptions({ nCtx: 2048, hostCacheMiB: 256 });
    control = new Int32Array(FLAGS_OFFSET + 16);
    opened = openTinyModel(options, control);
  });
  afterAll(() => {
    if (opened) closeModel(opened);
  });

  // bytesPerToken stands in for a large model's state, so a 300-token conversation plans like a long one.
  function scheduler(bytesPerToken: number): Scheduler {
    opened.native.mesh_memory_clear(opened.ctx, 1);
    clock = 1000;
    return new Scheduler({ ...schedulerDeps(opened, options, control, FLAGS_OFFSET), now: () => clock, kvBytesPerToken: bytesPerToken });
  }

  function finish(s: Scheduler, id: number, prompt: number[]): void {
    const out: TokenEvent[] = [];
    s.submit(id, FLAGS_OFFSET + id, greedyRequest(prompt, 1), prompt, out);
    while (s.hasWork()) s.step(out);
    expect(out.some((e) => e.kind === "done" && e.id === id)).toBe(true);
  }

  const conversation = Array.from({ length: 300 }, (_, i) => 200 + ((i * 104729) % 20000));

  test("a_long_conversation_is_copied_only_after_ten_times_its_expected_copy_time", () => {
    // 300 tokens x 1 MiB: planned as a 300 MiB state, about 2.9 s of wait.
    const s = scheduler(MiB);
    finish(s, 1, conversation);
    const wait = idleSaveDelayMs(300 * MiB);
    expect(s.nextIdleSaveInMs()).toBe(wait);
    clock += IDLE_SAVE_MIN_MS;
    expect(s.saveIdle()).toBe(false);
    expect(s.stats().hostSaves).toBe(0);
    expect(s.nextIdleSaveInMs()).toBe(wait - IDLE_SAVE_MIN_MS);
    clock += wait;
    expect(s.saveIdle()).toBe(true);
    expect(s.stats().hostSaves).toBe(1);
    // Saved: nothing more is due, so the Worker stops re-arming its timer.
    expect(s.nextIdleSaveInMs()).toBeNull();
    s.dispose();
  });

  test("a_short_conversation_is_copied_after_the_minimum_wait", () => {
    const s = scheduler(kvBytesPerToken(opened.info));
    finish(s, 2, conversation);
    expect(s.nextIdleSaveInMs()).toBe(IDLE_SAVE_MIN_MS);
    clock += IDLE_SAVE_MIN_MS;
    expect(s.saveIdle()).toBe(true);
    expect(s.nextIdleSaveInMs()).toBeNull();
    s.dispose();
  });

  test("a_turn_before_the_wait_is_over_finds_its_conversation_resident_and_starts_the_wait_again", () => {
    const s = scheduler(MiB);
    finish(s, 3, conversation);
    clock += 500;
    expect(s.saveIdle()).toBe(false);
    finish(s, 4, [...conversation, 500, 501, 502]);
    expect(s.stats().hostSaves).toBe(0);
    expect(s.stats().cachedTokens).toBeGreaterThanOrEqual(300);
    // Its 303 prompt tokens are in the KV (the one generated token was never fed back).
    expect(s.nextIdleSaveInMs()).toBe(idleSaveDelayMs(303 * MiB));
    s.dispose();
  });
});
