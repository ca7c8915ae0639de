// The fake engine keeps the real engine's contract: event shapes and order,
// error codes, cachedTokens and tenancy deltas. No native code.
import { describe, expect, test } from "bun:test";
import { FakeEngine, fakeReply } from "../../src/engine/fake";
import { collect, EngineError, type GenerationEvent, type TenancyDelta } from "../../src/engine/index";

const bytes = (s: string) => Buffer.byteLength(s, "utf8");

async function events(e: FakeEngine, opts: Parameters<FakeEngine["generate"]>[0]): Promise<GenerationEvent[]> {
  const out: GenerationEvent[] = [];
  for await (const ev of e.generate(opts)) out.push(ev);
  return out;
}

function watch(e: FakeEngine) {
  const deltas: TenancyDelta[] = [];
  const held = new Set<string>();
  e.onTenancy((d) => {
    deltas.push(d);
    for (const [h] of d.inserts) held.add(h);
    for (const h of d.evicts) held.delete(h);
  });
  return { deltas, held };
}

const settle = () => Bun.sleep(1);

describe("fake engine", () => {
  test("a_generation_is_start_then_text_then_done_with_the_real_shapes", async () => {
    const e = new FakeEngine({ reply: "héllo" });
    const got = await events(e, { prompt: "hi" });
    expect(got[0]).toEqual({ kind: "start", promptTokens: 2, cachedTokens: 0, slot: 0, waitedMs: 0 });
    const text = got.filter((x) => x.kind === "text");
    // One token per byte: "é" is two tokens, and its text comes whole with the second.
    expect(text.map((x) => (x.kind === "text" ? x.tokens.length : -1))).toEqual([1, 1, 1, 1, 1, 1]);
    expect(text.map((x) => (x.kind === "text" ? x.text : "")).join("")).toBe("héllo");
    // Ended by its end-of-generation token, which the done event names (as the engine's does).
    expect(got.at(-1)).toEqual({
      kind: "done",
      finishReason: "stop",
      promptTokens: 2,
      cachedTokens: 0,
      completionTokens: 6,
      eog: { token: 257 },
    });
  });

  test("the_default_reply_is_a_deterministic_function_of_the_prompt", async () => {
    const e = new FakeEngine();
    const a = await collect(e.generate({ prompt: "one" }));
    const b = await collect(e.generate({ prompt: "one" }));
    expect(a.text).toBe(fakeReply("one"));
    expect(b.text).toBe(a.text);
    expect(fakeReply("two")).not.toBe(a.text);
  });

  test("max_tokens_ends_with_length_after_that_many_tokens", async () => {
    const e = new FakeEngine({ reply: "abcdefgh" });
    const r = await collect(e.generate({ prompt: "p", maxTokens: 3 }));
    expect(r.text).toBe("abc");
    expect(r.done).toMatchObject({ finishReason: "length", completionTokens: 3 });
  });

  test("stop_strings_end_generation_and_are_not_emitted", async () => {
    const e = new FakeEngine({ reply: "hello STOP world" });
    const r = await collect(e.generate({ prompt: "p", stop: ["STOP"] }));
    expect(r.text).toBe("hello ");
    expect(r.done.finishReason).toBe("stop");
  });

  test("cancelling_by_signal_or_by_cancel_ends_with_cancelled", async () => {
    const e = new FakeEngine({ reply: "x".repeat(1000), tokenDelayMs: 1 });
    const ac = new AbortController();
    const gen = e.generate({ prompt: "p", signal: ac.signal });
    let n = 0;
    let last: GenerationEvent | null = null;
    for await (const ev of gen) {
      if (ev.kind === "text" && ++n === 3) ac.abort();
      last = ev;
    }
    expect(last).toMatchObject({ kind: "done", finishReason: "cancelled" });
    const other = e.generate({ prompt: "p" });
    e.cancel(other.id);
    expect((await collect(other)).done.finishReason).toBe("cancelled");
    expect(e.inFlight).toBe(0);
  });

  test("a_per_token_delay_spaces_the_tokens", async () => {
    const e = new FakeEngine({ reply: "abcde", tokenDelayMs: 10 });
    const t0 = performance.now();
    await collect(e.generate({ prompt: "p" }));
    expect(performance.now() - t0).toBeGreaterThanOrEqual(40);
  });

  test("errors_are_engine_errors_with_the_real_codes", async () => {
    const e = new FakeEngine({ info: { nCtx: 16 }, maxInFlight: 1 });
    const long = await collect(e.generate({ prompt: "x".repeat(16) })).catch((x) => x);
    expect(long).toBeInstanceOf(EngineError);
    expect((long as EngineError).code).toBe("context_length_exceeded");
    expect((long as EngineError).message).toContain("16");
    const badIds = await collect(e.generate({ prompt: [1, 999] })).catch((x) => x);
    expect((badIds as EngineError).code).toBe("invalid_request");
    expect(() => e.generate({ prompt: "p", maxTokens: Number.NaN })).toThrow(EngineError);
    const busy = e.generate({ prompt: "p" });
    expect(() => e.generate({ prompt: "q" })).toThrow(expect.objectContaining({ code: "engine_busy" }));
    await collect(busy);
    await e.close();
    expect(() => e.generate({ prompt: "p" })).toThrow(expect.objectContaining({ code: "engine_closed" }));
    expect(await e.stats().catch((x) => (x as EngineError).code)).toBe("engine_closed");
  });

  test("the_context_end_stops_a_reply_with_length", async () => {
    const e = new FakeEngine({ info: { nCtx: 10 }, reply: "y".repeat(50) });
    const r = await collect(e.generate({ prompt: "12345" }));
    expect(r.done.finishReason).toBe("length");
    expect(r.done.promptTokens + r.done.completionTokens).toBeLessThanOrEqual(10);
  });

  test("tokenize_is_one_token_per_utf8_byte_and_detokenize_inverts_it", async () => {
    const e = new FakeEngine();
    const t = await e.tokenize("añ🎉");
    expect(t).toHaveLength(bytes("añ🎉"));
    expect(await e.detokenize(t)).toBe("añ🎉");
    expect(await e.detokenize([300]).catch((x) => (x as EngineError).code)).toBe("invalid_request");
  });

  test("pieces_are_each_tokens_byte_and_bos_eos_have_none", async () => {
    const e = new FakeEngine();
    const p = await e.pieces([97, 0xc3, e.info.bos, e.info.eos]);
    expect(p.map((x) => Array.from(x))).toEqual([[97], [0xc3], [], []]);
    expect(await e.detokenize([e.info.bos, 97], { special: true })).toBe("a");
    expect(await e.pieces([300]).catch((x) => (x as EngineError).code)).toBe("invalid_request");
  });

  test("cached_tokens_count_the_prefix_shared_with_a_recent_prompt_and_reply", async () => {
    const e = new FakeEngine({ reply: "the answer", cacheSequences: 2 });
    const first = await collect(e.generate({ prompt: "question one" }));
    expect(first.done.cachedTokens).toBe(0);
    // The next turn repeats the prompt and the reply: all of it is cached.
    const turn = `question one${first.text} and more`;
    const second = await collect(e.generate({ prompt: turn }));
    expect(second.done.cachedTokens).toBe(bytes(`question one${first.text}`));
    // An exact repeat reuses all but its last token, as the real engine does.
    expect((await collect(e.generate({ prompt: "abc" }))).done.cachedTokens).toBe(0);
    expect((await collect(e.generate({ prompt: "abc" }))).done.cachedTokens).toBe(2);
    const s = await e.stats();
    expect(s.admitted).toBe(4);
    expect(s.cachedTokens).toBe(second.done.cachedTokens + 2);
    expect(s.kvCellsUsed).toBeGreaterThan(0);
    expect(s.kvCellsUsed).toBeLessThanOrEqual(s.kvCellsTotal);
  });

  test("marks_are_held_while_a_cached_sequence_covers_them_and_dropped_with_it", async () => {
    const e = new FakeEngine({ reply: "ok", cacheSequences: 1 });
    const t = watch(e);
    const a = "first prompt";
    const gen = e.generate({ prompt: a, marks: [{ hash: "a", parent: null, byteEnd: bytes(a) }] });
    await collect(gen);
    await settle();
    expect([...t.held]).toEqual(["a"]);
    e.addMarks(gen.id, [["a-reply", "a"]]);
    await settle();
    expect(t.deltas.at(-1)).toEqual({ inserts: [["a-reply", "a"]], evicts: [] });
    // One cached sequence: an unrelated prompt replaces it.
    await collect(e.generate({ prompt: "zzz unrelated" }));
    await settle();
    expect(t.held.size).toBe(0);
    expect(t.deltas.at(-1)?.evicts.sort()).toEqual(["a", "a-reply"]);
  });

  test("reply_marks_for_a_sequence_cut_by_a_later_prompt_are_dropped", async () => {
    const e = new FakeEngine({ reply: "reply text" });
    const t = watch(e);
    const gen = e.generate({ prompt: "shared head, first tail", marks: [{ hash: "p", parent: null, byteEnd: 5 }] });
    await collect(gen);
    await collect(e.generate({ prompt: "shared head, other tail" }));
    e.addMarks(gen.id, [["r", "p"]]);
    await settle();
    expect(t.held.has("r")).toBe(false);
    expect(t.held.has("p")).toBe(true);
  });

  test("reply_marks_of_a_cancelled_generation_are_not_claimed", async () => {
    // Review finding (as in the real engine): the sequence ends short of the reply the server marks.
    const e = new FakeEngine({ reply: "a long reply that is cut short", tokenDelayMs: 1 });
    const t = watch(e);
    const gen = e.generate({ prompt: "question", marks: [{ hash: "q", parent: null, byteEnd: 8 }] });
    const done = collect(gen);
    await Bun.sleep(5);
    gen.cancel();
    expect((await done).done.finishReason).toBe("cancelled");
    e.addMarks(gen.id, [["reply", "q"]]);
    await settle();
    expect([...t.held]).toEqual(["q"]);
  });

  test("reply_marks_whose_first_parent_the_sequence_does_not_hold_are_dropped", async () => {
    const e = new FakeEngine({ reply: "ok" });
    const t = watch(e);
    const a = e.generate({ prompt: "first question", marks: [{ hash: "a", parent: null, byteEnd: 14 }] });
    await collect(a);
    const b = e.generate({ prompt: "second question", marks: [{ hash: "b", parent: null, byteEnd: 15 }] });
    await collect(b);
    // "b" is held, but by the other sequence.
    e.addMarks(a.id, [["a-reply", "b"]]);
    e.addMarks(b.id, [["b-reply", "b"]]);
    await settle();
    expect([...t.held].sort()).toEqual(["a", "b", "b-reply"]);
  });

  test("clear_marks_reports_every_held_mark_evicted_and_keeps_the_cache", async () => {
    const e = new FakeEngine({ reply: "ok", tokenDelayMs: 1 });
    const t = watch(e);
    const first = "first question";
    const a = e.generate({ prompt: first, marks: [{ hash: "a", parent: null, byteEnd: bytes(first) }] });
    await collect(a);
    const running = e.generate({ prompt: "still running", marks: [{ hash: "r", parent: null, byteEnd: 5 }] });
    const runningDone = collect(running);
    await Bun.sleep(2);
    await settle();
    expect([...t.held].sort()).toEqual(["a", "r"]);
    e.clearMarks();
    await settle();
    expect(t.held.size).toBe(0);
    expect(t.deltas.at(-1)?.evicts.sort()).toEqual(["a", "r"]);
    // Generations from before the clear get no reply marks, even one that ends after it.
    await runningDone;
    e.addMarks(a.id, [["a-reply", "a"]]);
    e.addMarks(running.id, [["r-reply", null]]);
    await settle();
    expect(t.held.size).toBe(0);
    // The cached sequences stay, and marks given now are reported.
    const next = await collect(e.generate({ prompt: `${first}ok more`, marks: [{ hash: "a", parent: null, byteEnd: bytes(first) }] }));
    expect(next.done.cachedTokens).toBe(bytes(`${first}ok`));
    await settle();
    expect([...t.held]).toEqual(["a"]);
  });

  test("closing_the_fake_evicts_everything_held_and_ends_running_generations", async () => {
    const e = new FakeEngine({ reply: "z".repeat(500), tokenDelayMs: 1 });
    const t = watch(e);
    const gen = e.generate({ prompt: "long", marks: [{ hash: "m", parent: null, byteEnd: 4 }] });
    const result = collect(gen);
    await Bun.sleep(5);
    expect(t.held.has("m")).toBe(true);
    await e.close();
    expect((await result).done.finishReason).toBe("cancelled");
    expect(t.deltas.at(-1)).toEqual({ inserts: [], evicts: ["m"] });
    expect(t.held.size).toBe(0);
  });

  test("requests_without_marks_report_nothing", async () => {
    const e = new FakeEngine({ cacheSequences: 1 });
    const t = watch(e);
    for (const p of ["a", "b", "a b"]) await collect(e.generate({ prompt: p }));
    await e.close();
    expect(t.deltas).toEqual([]);
  });
});
