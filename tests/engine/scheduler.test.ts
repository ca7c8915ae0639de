// The scheduler driven step by step on this thread, over the real library
// and the tiny model: what a step holds, and what a failed decode takes down.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Native } from "../../src/engine/native";
import { closeModel, type OpenedModel, schedulerDeps } from "../../src/engine/open";
import type { LoadOptions, TokenEvent } from "../../src/engine/protocol";
import { Scheduler, type SchedulerDeps, splitStep } from "../../src/engine/scheduler";
import { commonPrefix } from "../../src/engine/slot-choice";
import type { TokenMark } from "../../src/engine/tenancy";
import { tinyLoadOptions } from "../helpers/model";
import { greedyRequest, openTinyModel, tokenIds } from "../helpers/native-model";

test("a_step_is_split_only_when_a_prompt_chunk_of_2_or_more_tokens_meets_other_sequences_next_tokens", () => {
  const decoding = { pendingToken: 5, fed: 10, prompt: new Array(10) };
  const chunk = (left: number) => ({ pendingToken: -1, fed: 10, prompt: new Array(10 + left) });
  expect(splitStep([decoding, chunk(16)])).toBe(true);
  expect(splitStep([chunk(16), decoding])).toBe(true);
  // A single new token decodes beside the others as before; so do prompts with nobody decoding, or streams alone.
  expect(splitStep([decoding, chunk(1)])).toBe(false);
  expect(splitStep([chunk(16), chunk(32)])).toBe(false);
  expect(splitStep([decoding, decoding])).toBe(false);
  expect(splitStep([])).toBe(false);
});

test("common_prefix_counts_matching_leading_tokens", () => {
  expect(commonPrefix([1, 2, 3], [1, 2, 4])).toBe(2);
  expect(commonPrefix([], [1])).toBe(0);
  expect(commonPrefix([1, 2], [1, 2, 3])).toBe(2);
  expect(commonPrefix([5], [6])).toBe(0);
});

const FLAGS_OFFSET = 1;
let opened: OpenedModel;
let options: LoadOptions;
let control: Int32Array;

beforeAll(async () => {
  options = await tinyLoadOptions({ nParallel: 3 });
  control = new Int32Array(FLAGS_OFFSET + 64);
  opened = openTinyModel(options, control);
});
afterAll(() => {
  if (opened) closeModel(opened);
});

// Each test starts from an empty pool, so KV placement (and greedy output) is the same every time.
// The context has options.nParallel sequences; a scheduler may use fewer of them (schedulerDeps
// takes the slot count from the context, so it is set here).
function scheduler(native: Native = opened.native, o: Partial<LoadOptions> = {}, extra: Partial<SchedulerDeps> = {}): Scheduler {
  opened.native.mesh_memory_clear(opened.ctx, 1);
  const deps = schedulerDeps(opened, { ...options, ...o }, control, FLAGS_OFFSET);
  return new Scheduler({ ...deps, native, nParallel: Math.min(deps.nParallel, o.nParallel ?? deps.nParallel), ...extra });
}

/** Run one request of 2 tokens to the end; the cached tokens its start reported. */
function cachedFor(s: Scheduler, id: number, p: number[]): number {
  const out: TokenEvent[] = [];
  s.submit(id, FLAGS_OFFSET + id, greedyRequest(p, 2), p, out);
  s.step(out);
  const start = out.find((e) => e.kind === "start");
  drain(s);
  return start?.kind === "start" ? start.cachedTokens : -1;
}

/** Deterministic prompts of plain token ids. */
const prompt = (seed: number, length: number) => tokenIds(seed, length);

/** Run the scheduler to completion; each request's tokens, end, and error. */
function drain(s: Scheduler, steps: TokenEvent[][] = []) {
  const got = new Map<number, { tokens: number[]; end?: TokenEvent }>();
  while (s.hasWork()) {
    const out: TokenEvent[] = [];
    s.step(out);
    steps.push(out);
    for (const e of out) {
      const r = got.get(e.id) ?? { tokens: [] };
      got.set(e.id, r);
      if (e.kind === "text") r.tokens.push(...e.tokens);
      if (e.kind === "done" || e.kind === "error") r.end = e;
    }
  }
  return got;
}

describe("scheduler steps over the real library", () => {
  test("a_new_prompt_is_prefilled_in_the_same_decode_as_running_streams_next_tokens_without_separate_prefill", () => {
    const s = scheduler(opened.native, {}, { separatePrefill: false });
    s.submit(1, FLAGS_OFFSET, greedyRequest(prompt(1, 40), 20), prompt(1, 40), []);
    for (let i = 0; i < 4; i++) s.step([]);
    const before = s.stats().decodeSteps;
    const out: TokenEvent[] = [];
    s.submit(2, FLAGS_OFFSET + 1, greedyRequest(prompt(2, 100), 20), prompt(2, 100), out);
    s.step(out);
    // One llama_decode gave request 1 its next token and request 2 its whole prompt and first token.
    expect(s.stats().decodeSteps - before).toBe(1);
    expect(out.filter((e) => e.kind === "text" && e.id === 1)).toHaveLength(1);
    expect(out.filter((e) => e.kind === "text" && e.id === 2)).toHaveLength(1);
    drain(s);
  });

  test("separate_prefill_is_on_where_mesh_kernel_computes_the_tiny_models_attention", () => {
    // The tests below rely on it: the tiny model's attention is one mesh's kernel computes.
    expect(opened.info.attnKernel).toBe("mesh");
    expect(schedulerDeps(opened, options, control, FLAGS_OFFSET).separatePrefill).toBe(true);
  });

  test("with_separate_prefill_a_new_prompt_takes_a_step_of_its_own_then_the_streams_next_tokens_and_greedy_output_is_the_same", () => {
    const run = (separatePrefill: boolean) => {
      const s = scheduler(opened.native, {}, { separatePrefill });
      s.submit(1, FLAGS_OFFSET, greedyRequest(prompt(1, 40), 20), prompt(1, 40), []);
      for (let i = 0; i < 4; i++) s.step([]);
      const before = s.stats();
      const first: TokenEvent[] = [];
      s.submit(2, FLAGS_OFFSET + 1, greedyRequest(prompt(2, 100), 20), prompt(2, 100), first);
      s.step(first);
      const after = s.stats();
      const second: TokenEvent[] = [];
      s.step(second);
      const rest = drain(s);
      const texts = (out: TokenEvent[], id: number) => out.filter((e) => e.kind === "text" && e.id === id).length;
      return {
        firstStep: { one: texts(first, 1), two: texts(first, 2) },
        secondStep: { one: texts(second, 1), two: texts(second, 2) },
        meshOps: after.attnOpsMesh - before.attnOpsMesh,
        tokens: [1, 2].map((id) => [
          ...[...first, ...second].flatMap((e) => (e.kind === "text" && e.id === id ? e.tokens : [])),
          ...(rest.get(id)?.tokens ?? []),
        ]),
      };
    };
    const split = run(true);
    const mixed = run(false);
    // The prompt's chunk alone (mesh's kernel computes it: one sequence's queries), the stream's token a step later.
    expect(split.firstStep).toEqual({ one: 0, two: 1 });
    expect(split.secondStep).toEqual({ one: 1, two: 1 });
    expect(split.meshOps).toBeGreaterThan(0);
    // Mixed in one batch (one ubatch: the tiny options' 512 holds all 101 tokens), the same step goes to ggml's kernel.
    expect(mixed.firstStep).toEqual({ one: 1, two: 1 });
    expect(mixed.meshOps).toBe(0);
    expect(split.tokens).toEqual(mixed.tokens);
    // Request 2's whole reply (request 1's first tokens came before it was submitted).
    expect(split.tokens[1]).toHaveLength(20);
  });

  test("with_separate_prefill_a_long_prompt_takes_turns_with_the_running_stream", () => {
    const s = scheduler(opened.native, {}, { separatePrefill: true });
    s.submit(1, FLAGS_OFFSET, greedyRequest(prompt(3, 40), 60), prompt(3, 40), []);
    for (let i = 0; i < 2; i++) s.step([]);
    // 1200 tokens at 512 a step: three chunks, with the stream's next token between them.
    s.submit(2, FLAGS_OFFSET + 1, greedyRequest(prompt(4, 1200), 4), prompt(4, 1200), []);
    const seen: number[][] = [];
    for (let i = 0; i < 5; i++) {
      const out: TokenEvent[] = [];
      s.step(out);
      seen.push([1, 2].map((id) => out.filter((e) => e.kind === "text" && e.id === id).length));
    }
    expect(seen).toEqual([
      [0, 0],
      [1, 0],
      [0, 0],
      [1, 0],
      [0, 1],
    ]);
    drain(s);
  });

  test("a_shared_prefix_under_16_tokens_is_not_reused_and_does_not_wipe_the_conversation_it_matched", () => {
    for (const kvBudget of [true, false]) {
      const s = scheduler(opened.native, { kvBudget });
      const first = prompt(7, 60);
      cachedFor(s, 1, first);
      expect(cachedFor(s, 2, [...first.slice(0, 12), ...prompt(102, 30)])).toBe(0);
      expect(cachedFor(s, 3, [...first.slice(0, 40), ...prompt(103, 30)])).toBe(40);
    }
  });

  test("a_saved_conversation_is_restored_when_it_beats_the_reuse_a_slot_really_gives", () => {
    // The slot's 15-token match is worth 0 (under 16): the saved conversation's 46 tokens must win.
    const s = scheduler(opened.native, { hostCacheMiB: 64 });
    const first = prompt(7, 60);
    cachedFor(s, 1, first);
    cachedFor(s, 2, [...first.slice(0, 15), ...prompt(102, 50)]);
    expect(s.stats().hostCacheEntries).toBeGreaterThan(0);
    expect(cachedFor(s, 3, [...first.slice(0, 46), ...prompt(103, 30)])).toBe(46);
    expect(s.stats().hostRestores).toBe(1);
  });

  test("a_failed_decode_that_every_sequence_survives_alone_is_not_counted_as_a_failure", () => {
    const real = opened.native;
    let failNext = false;
    const flaky = {
      ...real,
      mesh_decode: (ctx: never, tokens: Int32Array, pos: never, seq: never, logits: never, n: number) => {
        if (failNext) {
          failNext = false;
          return -3;
        }
        return real.mesh_decode(ctx, tokens, pos, seq, logits, n);
      },
    } as unknown as Native;
    const s = scheduler(flaky);
    for (const i of [0, 1]) s.submit(i, FLAGS_OFFSET + i, greedyRequest(prompt(20 + i, 40), 4), prompt(20 + i, 40), []);
    s.step([]);
    failNext = true;
    const got = drain(s);
    expect([got.get(0)?.end?.kind, got.get(1)?.end?.kind]).toEqual(["done", "done"]);
    expect(s.stats().decodeFailures).toBe(0);
  });

  test("a_decode_failure_fails_only_the_request_whose_part_cannot_be_decoded_and_the_rest_continue", () => {
    const prompts = [prompt(3, 60), prompt(4, 80), prompt(5, 70)];
    const clean = scheduler();
    prompts.forEach((p, i) => {
      clean.submit(i, FLAGS_OFFSET + i, greedyRequest(p, 16), p, []);
    });
    const expected = drain(clean);

    // A token llama.cpp "cannot decode": any batch holding it fails, as a broken input would.
    const POISON = 99;
    const poisoned = [...(prompts[1] as number[]).slice(0, 40), POISON, ...(prompts[1] as number[]).slice(40)];
    const real = opened.native;
    let failures = 0;
    const faulty = {
      ...real,
      mesh_decode: (ctx: never, tokens: Int32Array, pos: never, seq: never, logits: never, n: number) => {
        if (tokens.subarray(0, n).includes(POISON)) {
          failures++;
          return -1;
        }
        return real.mesh_decode(ctx, tokens, pos, seq, logits, n);
      },
    } as unknown as Native;
    const s = scheduler(faulty);
    const all = [prompts[0] as number[], poisoned, prompts[2] as number[]];
    all.forEach((p, i) => {
      s.submit(i, FLAGS_OFFSET + i, greedyRequest(p, 16), p, []);
    });
    const got = drain(s);
    expect(failures).toBeGreaterThanOrEqual(2); // the shared step, then the poisoned part alone
    expect(s.stats().decodeFailures).toBe(1);
    const bad = got.get(1)?.end;
    expect(bad?.kind).toBe("error");
    if (bad?.kind === "error") expect(bad.error.code).toBe("decode_failed");
    for (const i of [0, 2]) {
      expect(got.get(i)?.end?.kind).toBe("done");
      expect(got.get(i)?.tokens).toEqual(expected.get(i)?.tokens as number[]);
    }
    expect(s.stats().slotsBusy).toBe(0);
    // The scheduler keeps serving.
    s.submit(9, FLAGS_OFFSET + 9, greedyRequest(prompt(6, 30), 4), prompt(6, 30), []);
    const after = drain(s);
    expect(after.get(9)?.end?.kind).toBe("done");
    expect(after.get(9)?.tokens).toHaveLength(4);
  });
});

const at = (hash: string, tokenEnd: number, parent: string | null = null): TokenMark => ({ hash, parent, tokenEnd });

/** Run one request to the end with marks; its generated tokens. */
function runMarked(s: Scheduler, id: number, p: number[], marks: TokenMark[] | null, maxTokens = 2): number[] {
  s.submit(id, FLAGS_OFFSET + id, greedyRequest(p, maxTokens), p, [], marks);
  return drain(s).get(id)?.tokens ?? [];
}

/** Hashes a drain reports held and evicted, sorted. */
function delta(s: Scheduler): { held: string[]; evicted: string[] } {
  const d = s.drainTenancy();
  return { held: (d?.inserts ?? []).map(([h]) => h).sort(), evicted: [...(d?.evicts ?? [])].sort() };
}
const none = { held: [], evicted: [] };

/** One slot and a host cache with room for one saved 60-token conversation (sized by saving one first). */
function oneEntryScheduler(): Scheduler {
  const probe = scheduler(opened.native, { hostCacheMiB: 64, nParallel: 1 });
  runMarked(probe, 1, prompt(50, 60), null);
  runMarked(probe, 2, prompt(51, 60), null);
  const entryBytes = probe.stats().hostCacheBytes;
  probe.dispose();
  if (entryBytes <= 0) throw new Error("nothing was saved");
  return scheduler(opened.native, { hostCacheMiB: (1.5 * entryBytes) / (1024 * 1024), nParallel: 1 });
}

describe("KV tenancy over the real library", () => {
  test("token_byte_ends_add_up_to_the_prompt_text_with_special_tokens_a_bos_and_multibyte_text", () => {
    const n = opened.native;
    for (const text of ["Hello world", "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n", "你好 🎉 ok", " leading space"]) {
      const bytes = Buffer.from(text, "utf8");
      const out = new Int32Array(bytes.length + 8);
      const count = n.mesh_tokenize(opened.model, bytes, bytes.length, out, out.length, 1, 1);
      const ends = new Int32Array(count);
      expect(n.mesh_token_byte_ends(opened.model, out.subarray(0, count), count, ends)).toBe(bytes.length);
      // The BOS the tokenizer added covers no text.
      expect(out[0]).toBe(opened.info.bos);
      expect(ends[0]).toBe(0);
      for (let i = 1; i < count; i++) expect(ends[i] as number).toBeGreaterThanOrEqual(ends[i - 1] as number);
    }
  });

  test("marks_are_reported_once_their_tokens_are_in_kv", () => {
    const s = scheduler();
    const p = prompt(40, 700);
    // nBatch is 512: the prefill takes two steps.
    s.submit(1, FLAGS_OFFSET + 1, greedyRequest(p, 2), p, [], [at("a", 100), at("b", 600, "a"), at("c", 700, "b")]);
    expect(delta(s)).toEqual(none);
    s.step([]);
    expect(delta(s)).toEqual({ held: ["a"], evicted: [] });
    s.step([]);
    expect(s.drainTenancy()?.inserts).toEqual([
      ["b", "a"],
      ["c", "b"],
    ]);
    drain(s);
    expect(delta(s)).toEqual(none);
  });

  test("a_reused_slot_trimmed_below_a_mark_evicts_it", () => {
    const s = scheduler();
    const first = prompt(41, 60);
    runMarked(s, 1, first, [at("head", 20), at("tail", 50, "head")]);
    expect(delta(s).held).toEqual(["head", "tail"]);
    // Shares 30 tokens: the same slot is reused and cut to them.
    runMarked(s, 2, [...first.slice(0, 30), ...prompt(42, 40)], null);
    expect(delta(s)).toEqual({ held: [], evicted: ["tail"] });
  });

  test("a_request_cancelled_in_prefill_holds_only_what_reached_the_kv", () => {
    const s = scheduler();
    const p = prompt(43, 700);
    s.submit(1, FLAGS_OFFSET + 1, greedyRequest(p, 2), p, [], [at("early", 100), at("late", 650, "early")]);
    s.step([]);
    s.cancel(1, []);
    expect(delta(s).held).toEqual(["early"]);
    // The slot's next prompt happens to continue the same tokens: the cancelled request's mark is not claimed.
    runMarked(s, 2, p, null);
    expect(delta(s)).toEqual(none);
  });

  test("offloaded_sequence_keeps_its_marks_in_host_tier", () => {
    const s = scheduler(opened.native, { hostCacheMiB: 64, nParallel: 1 });
    try {
      runMarked(s, 1, prompt(44, 60), [at("x", 60)]);
      expect(delta(s).held).toEqual(["x"]);
      // One slot: the next prompt takes it and the first conversation moves to host RAM.
      runMarked(s, 2, prompt(45, 60), null);
      expect(s.stats().hostCacheEntries).toBe(1);
      expect(delta(s)).toEqual(none);
      // Restored, trimmed to a shared head of 40 tokens: still held by the host entry.
      runMarked(s, 3, [...prompt(44, 60).slice(0, 40), ...prompt(46, 30)], null);
      expect(s.stats().hostRestores).toBe(1);
      expect(delta(s)).toEqual(none);
    } finally {
      s.dispose();
    }
    expect(delta(s)).toEqual({ held: [], evicted: ["x"] });
  });

  test("host_eviction_evicts_marks_no_slot_holds", () => {
    const s = oneEntryScheduler();
    try {
      runMarked(s, 1, prompt(50, 60), [at("first", 60)]);
      runMarked(s, 2, prompt(51, 60), [at("second", 60)]);
      expect(delta(s).held).toEqual(["first", "second"]);
      runMarked(s, 3, prompt(52, 60), null);
      expect(s.stats().hostCacheEvictions).toBe(1);
      expect(delta(s)).toEqual({ held: [], evicted: ["first"] });
    } finally {
      s.dispose();
    }
  });

  test("reply_marks_for_a_sequence_dropped_from_host_ram_are_dropped", () => {
    const s = oneEntryScheduler();
    try {
      runMarked(s, 1, prompt(53, 60), [at("q", 60)], 4);
      runMarked(s, 2, prompt(54, 60), null);
      runMarked(s, 3, prompt(55, 60), null);
      expect(s.stats().hostCacheEvictions).toBe(1);
      delta(s);
      s.addMarks(1, [["reply", "q"]]);
      expect(delta(s)).toEqual(none);
    } finally {
      s.dispose();
    }
  });

  test("reply_marks_attach_at_the_end_of_the_finished_sequence", () => {
    const s = scheduler();
    const p = prompt(60, 60);
    // Four tokens generated: the last is sampled but never decoded, so the sequence ends 3 past the prompt.
    const out = runMarked(s, 1, p, [at("q", 60)], 4);
    expect(out).toHaveLength(4);
    delta(s);
    s.addMarks(1, [["reply", "q"]]);
    expect(s.drainTenancy()?.inserts).toEqual([["reply", "q"]]);
    const end = [...p, ...out.slice(0, 3)];
    // A next turn that keeps the whole sequence keeps the reply's mark...
    runMarked(s, 2, [...end, ...prompt(61, 20)], null);
    expect(delta(s)).toEqual(none);
    // ...one that keeps one token less does not.
    runMarked(s, 3, [...end.slice(0, end.length - 1), ...prompt(62, 20)], null);
    expect(delta(s)).toEqual({ held: [], evicted: ["reply"] });
  });

  test("reply_marks_for_a_reused_slot_are_dropped", () => {
    const s = scheduler(opened.native, { nParallel: 1 });
    const p = prompt(63, 60);
    runMarked(s, 1, p, [at("q", 60)], 4);
    runMarked(s, 2, [...p.slice(0, 30), ...prompt(64, 40)], null);
    delta(s);
    s.addMarks(1, [["reply", "q"]]);
    expect(delta(s)).toEqual(none);
  });

  test("reply_marks_follow_a_sequence_saved_to_host_ram", () => {
    const s = scheduler(opened.native, { hostCacheMiB: 64, nParallel: 1 });
    try {
      runMarked(s, 1, prompt(65, 60), [at("q", 60)], 4);
      runMarked(s, 2, prompt(66, 60), null);
      delta(s);
      s.addMarks(1, [["reply", "q"]]);
      expect(delta(s).held).toEqual(["reply"]);
    } finally {
      s.dispose();
    }
  });

  test("requests_without_marks_report_nothing", () => {
    const s = scheduler(opened.native, { hostCacheMiB: 64, nParallel: 2 });
    try {
      const p = prompt(70, 60);
      runMarked(s, 1, p, null);
      runMarked(s, 2, prompt(71, 60), null);
      runMarked(s, 3, prompt(72, 60), null);
      runMarked(s, 4, [...p, ...prompt(73, 10)], null);
      s.addMarks(1, [["reply", null]]);
      expect(s.drainTenancy()).toBeNull();
    } finally {
      s.dispose();
    }
    expect(s.drainTenancy()).toBeNull();
  });

  test("a_request_shed_for_lack_of_kv_leaves_no_marks_behind", () => {
    // Review finding: the shed request's waiting marks stayed on its slot (its history was already
    // empty, so cutting it to 0 did nothing) and the slot's next prompt then held them.
    const real = opened.native;
    const POISON = 77;
    // llama.cpp refuses (KV exhausted, rc 1) every batch that holds the first request's first token.
    const full = {
      ...real,
      mesh_decode: (ctx: never, tokens: Int32Array, pos: never, seq: never, logits: never, n: number) =>
        tokens.subarray(0, n).includes(POISON) ? 1 : real.mesh_decode(ctx, tokens, pos, seq, logits, n),
    } as unknown as Native;
    const s = scheduler(full, { nParallel: 1 });
    const shed = [POISON, ...prompt(80, 59)];
    const out: TokenEvent[] = [];
    s.submit(1, FLAGS_OFFSET + 1, greedyRequest(shed, 2), shed, out, [at("shed", 30)]);
    s.step(out);
    expect(out).toContainEqual(expect.objectContaining({ id: 1, kind: "error", error: expect.objectContaining({ code: "kv_exhausted" }) }));
    // An unrelated prompt without marks takes the same (only) slot: nothing of request 1 is in the KV.
    runMarked(s, 2, prompt(81, 60), null);
    expect(delta(s)).toEqual(none);
  });

  test("reply_marks_of_a_generation_cancelled_in_prefill_are_not_claimed", () => {
    // Review finding: it was remembered as finished at its partial length, so its reply's marks were
    // held on a sequence that lacks the end of the prompt they extend.
    const s = scheduler();
    const p = prompt(82, 700);
    s.submit(1, FLAGS_OFFSET + 1, greedyRequest(p, 4), p, [], [at("p0", 100), at("p1", 700, "p0")]);
    s.step([]); // 512 of the 700 prompt tokens reach the KV
    const out: TokenEvent[] = [];
    s.cancel(1, out);
    expect(out).toContainEqual(expect.objectContaining({ id: 1, kind: "done", finishReason: "cancelled" }));
    expect(delta(s).held).toEqual(["p0"]);
    s.addMarks(1, [["reply", "p1"]]);
    expect(delta(s)).toEqual(none);
  });

  test("reply_marks_of_a_generation_cancelled_after_its_prompt_are_not_claimed", () => {
    // The whole prompt is in the KV, but not the reply the server marks (it would have been longer).
    const s = scheduler();
    const p = prompt(83, 60);
    s.submit(1, FLAGS_OFFSET + 1, greedyRequest(p, 20), p, [], [at("q", 60)]);
    s.step([]);
    s.step([]);
    s.cancel(1, []);
    expect(delta(s).held).toEqual(["q"]);
    s.addMarks(1, [["reply", "q"]]);
    expect(delta(s)).toEqual(none);
  });

  test("reply_marks_whose_first_parent_the_sequence_does_not_hold_are_dropped", () => {
    const s = scheduler();
    runMarked(s, 1, prompt(84, 60), [at("q", 60)], 4);
    runMarked(s, 2, prompt(85, 60), [at("r", 60)], 4);
    expect(delta(s).held).toEqual(["q", "r"]);
    // "r" is held, but by another sequence: the reply would claim a chain this one does not have.
    s.addMarks(1, [
      ["reply", "r"],
      ["reply-2", "reply"],
    ]);
    expect(delta(s)).toEqual(none);
    // A chain that starts with the reply (no parent) has nothing to check.
    s.addMarks(2, [["root-reply", null]]);
    expect(delta(s).held).toEqual(["root-reply"]);
  });

  test("clear_marks_reports_every_held_mark_evicted_and_keeps_the_kv", () => {
    const s = scheduler(opened.native, { hostCacheMiB: 64, nParallel: 1 });
    try {
      const first = prompt(86, 60);
      runMarked(s, 1, first, [at("x", 60)], 4);
      // One slot: the first conversation moves to host RAM, the second holds the slot.
      runMarked(s, 2, prompt(87, 60), [at("y", 60)], 4);
      expect(s.stats().hostCacheEntries).toBe(1);
      // A long prompt in prefill with a mark still waiting, and a marked request queued behind it.
      const long = prompt(88, 700);
      s.submit(3, FLAGS_OFFSET + 3, greedyRequest(long, 2), long, [], [at("z0", 100), at("z1", 700, "z0")]);
      s.submit(4, FLAGS_OFFSET + 4, greedyRequest(prompt(89, 60), 2), prompt(89, 60), [], [at("w", 60)]);
      s.step([]);
      expect(delta(s).held).toEqual(["x", "y", "z0"]);
      s.clearMarks();
      expect(delta(s)).toEqual({ held: [], evicted: ["x", "y", "z0"] });
      // Marks given before the clear are never claimed: not the running prompt's, not the queued one's,
      // not the replies of generations that ended before it.
      drain(s);
      s.addMarks(1, [["x-reply", null]]);
      s.addMarks(2, [["y-reply", "y"]]);
      s.addMarks(3, [["z-reply", null]]);
      expect(delta(s)).toEqual(none);
      // The KV itself stays: the first conversation is reused, and marks given now are reported.
      const again = [...first, ...prompt(90, 20)];
      const out: TokenEvent[] = [];
      s.submit(5, FLAGS_OFFSET + 5, greedyRequest(again, 2), again, out, [at("x", 60)]);
      s.step(out);
      expect(out).toContainEqual(expect.objectContaining({ id: 5, kind: "start", cachedTokens: 60 }));
      drain(s);
      expect(delta(s)).toEqual({ held: ["x"], evicted: [] });
    } finally {
      s.dispose();
    }
  });
});
