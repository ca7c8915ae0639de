import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { collect, Engine, EngineError, type TenancyDelta } from "../../src/engine/index";
import { tinyModel } from "../helpers/model";

const greedy = { temperature: 0 };
let engine: Engine;

beforeAll(async () => {
  engine = await Engine.load({ modelPath: await tinyModel(), nCtx: 8192, nParallel: 4, nBatch: 512, threads: 2 });
});
afterAll(async () => {
  await engine?.close();
});

const prompts = [
  "The quick brown fox jumps over the lazy dog.",
  "Once upon a time, in a land far away,",
  "def fibonacci(n):\n    return",
  "Ceci n'est pas une pipe. 你好世界",
];

async function run(e: Engine, prompt: string | number[], maxTokens = 24) {
  return collect(e.generate({ prompt, maxTokens, sampling: greedy, ignoreEos: true }));
}

describe("engine on the tiny model", () => {
  test("tokenize_detokenize_round_trips_multibyte_utf8", async () => {
    for (const text of ["Hello, wörld!", "你好，世界 🎉 émoji", "tabs\tand\nnewlines"]) {
      const tokens = await engine.tokenize(text, { addSpecial: false });
      expect(tokens.length).toBeGreaterThan(0);
      expect(await engine.detokenize(tokens)).toBe(text);
    }
  });

  test("detokenize_with_special_renders_control_tokens_and_pieces_are_each_tokens_text", async () => {
    const text = "<|user|>\nHi there<|end|>\n<|assistant|>\n";
    const tokens = await engine.tokenize(text, { addSpecial: true, parseSpecial: true });
    expect(await engine.detokenize(tokens, { special: true })).toBe(`${engine.info.addBos ? engine.info.bosText : ""}${text}`);
    // Without `special`, control tokens render as nothing.
    expect(await engine.detokenize(tokens)).not.toContain(engine.info.bosText || "<s>");
    const pieces = await engine.pieces(tokens);
    expect(pieces).toHaveLength(tokens.length);
    if (engine.info.addBos) expect(Buffer.from(pieces[0] as Uint8Array).toString()).toBe(engine.info.bosText);
    expect(Buffer.concat(pieces).toString()).toContain("there");
    expect(await engine.pieces([engine.info.nVocab]).catch((e) => (e as EngineError).code)).toBe("invalid_request");
  });

  test("model_info_reports_the_random_weights_and_context", () => {
    expect(engine.info.randomWeights).toBe(true);
    expect(engine.info.nCtx).toBe(8192);
    expect(engine.info.nParallel).toBe(4);
    expect(engine.info.chatTemplate).toContain("messages");
  });

  test("greedy_batched_generation_equals_one_by_one", async () => {
    const sequential = [];
    for (const p of prompts) sequential.push(await run(engine, p));
    const before = await engine.stats();
    const batched = await Promise.all(prompts.map((p) => run(engine, p)));
    const after = await engine.stats();
    for (let i = 0; i < prompts.length; i++) {
      expect(batched[i]?.tokens).toEqual(sequential[i]?.tokens as number[]);
      expect(batched[i]?.text).toBe(sequential[i]?.text as string);
      expect(batched[i]?.done.completionTokens).toBe(24);
    }
    // Four streams shared steps: far fewer decode calls than four separate runs.
    expect(after.decodeSteps - before.decodeSteps).toBeLessThan(4 * 24);
  });

  test("shared_prefix_is_served_from_cache_and_skips_prefill", async () => {
    const base = await engine.tokenize("A long shared system prompt. ".repeat(60));
    const a = [...base, ...(await engine.tokenize(" first question", { addSpecial: false }))];
    const b = [...base, ...(await engine.tokenize(" second question", { addSpecial: false }))];
    await run(engine, a, 4);
    const s0 = await engine.stats();
    const second = await run(engine, b, 8);
    const s1 = await engine.stats();
    expect(second.done.cachedTokens).toBeGreaterThanOrEqual(base.length);
    expect(s1.prefillTokens - s0.prefillTokens).toBe(b.length - second.done.cachedTokens);
    // Reusing the cache must not change the result: a cold engine agrees.
    const cold = await Engine.load({ modelPath: engine.info.path, nCtx: 4096, nParallel: 1, threads: 2 });
    try {
      const fresh = await run(cold, b, 8);
      expect(fresh.done.cachedTokens).toBe(0);
      expect(second.tokens).toEqual(fresh.tokens);
    } finally {
      await cold.close();
    }
  });

  test("exact_repeat_reuses_all_but_the_last_prompt_token", async () => {
    const p = await engine.tokenize("Repeat me exactly, please. ".repeat(20));
    const first = await run(engine, p, 4);
    const again = await run(engine, p, 4);
    expect(again.done.cachedTokens).toBe(p.length - 1);
    expect(again.tokens).toEqual(first.tokens);
  });

  test("cancelling_one_request_frees_its_slot_and_leaves_the_others_unchanged", async () => {
    const reference = [];
    for (const p of prompts.slice(0, 3)) reference.push(await run(engine, p, 32));
    const gens = prompts.slice(0, 3).map((p) => engine.generate({ prompt: p, maxTokens: 32, sampling: greedy, ignoreEos: true }));
    const victim = gens[1] as (typeof gens)[number];
    const victimResult = (async () => {
      let n = 0;
      for await (const e of victim) {
        if (e.kind === "text" && ++n === 2) victim.cancel();
        if (e.kind === "done") return e;
      }
    })();
    // When the cancelled request reports done, its slot is already free and the others still run.
    const freedWhileOthersRun = victimResult.then(async (done) => ({ done, stats: await engine.stats() }));
    const [r0, r2, { done: cancelled, stats: atCancel }] = await Promise.all([
      collect(gens[0] as never),
      collect(gens[2] as never),
      freedWhileOthersRun,
    ]);
    expect(cancelled?.finishReason).toBe("cancelled");
    expect(atCancel.slotsBusy).toBe(2);
    expect(r0.tokens).toEqual(reference[0]?.tokens as number[]);
    expect(r2.tokens).toEqual(reference[2]?.tokens as number[]);
    const s = await engine.stats();
    expect(s.slotsBusy).toBe(0);
    expect(engine.inFlight).toBe(0);
  });

  test("breaking_out_of_the_iterator_cancels_the_generation", async () => {
    const gen = engine.generate({ prompt: "stream then leave", maxTokens: 500, sampling: greedy, ignoreEos: true });
    for await (const e of gen) if (e.kind === "text") break;
    // the cancel reaches the worker within a step; stats round-trips after it
    for (let i = 0; i < 50 && engine.inFlight > 0; i++) await Bun.sleep(10);
    expect(engine.inFlight).toBe(0);
    expect((await engine.stats()).slotsBusy).toBe(0);
  });

  test("stop_strings_end_generation_and_are_not_emitted", async () => {
    const free = await run(engine, "Stop test:", 16);
    // pick a stop string from inside the greedy output, then ask again
    const stop = free.text.slice(6, 9);
    expect(stop.length).toBe(3);
    const r = await collect(engine.generate({ prompt: "Stop test:", maxTokens: 16, sampling: greedy, ignoreEos: true, stop: [stop] }));
    expect(r.done.finishReason).toBe("stop");
    expect(r.text).toBe(free.text.slice(0, free.text.indexOf(stop)));
    expect(r.text).not.toContain(stop);
  });

  test("seeded_sampling_is_reproducible_and_the_seed_matters", async () => {
    // Fresh engines: identical KV placement, so the logits match bit for bit.
    const sample = async (seed: number) => {
      const e = await Engine.load({ modelPath: engine.info.path, nCtx: 512, nParallel: 1, threads: 2 });
      try {
        const opts = { prompt: "Sample this", maxTokens: 12, ignoreEos: true, sampling: { temperature: 1, topK: 50, seed } };
        return (await collect(e.generate(opts))).tokens;
      } finally {
        await e.close();
      }
    };
    const a = await sample(42);
    expect(await sample(42)).toEqual(a);
    expect(await sample(7)).not.toEqual(a);
  });

  test("max_tokens_ends_with_finish_reason_length", async () => {
    const r = await run(engine, "count", 5);
    expect(r.done.finishReason).toBe("length");
    expect(r.done.completionTokens).toBe(5);
  });

  test("main_thread_timers_keep_running_during_a_long_prefill", async () => {
    const long = await engine.tokenize("Prefill is long and runs in the worker thread. ".repeat(700));
    expect(long.length).toBeGreaterThan(7000);
    // The longest gap between timer ticks while the prompt is prefilled: a
    // prefill on this thread would show up as one gap as long as the prefill.
    let last = performance.now();
    let longestGap = 0;
    let measuring = false;
    const timer = setInterval(() => {
      const now = performance.now();
      if (measuring) longestGap = Math.max(longestGap, now - last);
      last = now;
    }, 1);
    try {
      let startedAt = 0;
      let prefillMs = 0;
      for await (const e of engine.generate({ prompt: long, maxTokens: 4, sampling: greedy, ignoreEos: true })) {
        if (e.kind === "start") {
          startedAt = performance.now();
          last = startedAt;
          measuring = true;
        }
        if (e.kind === "text" && prefillMs === 0) {
          prefillMs = performance.now() - startedAt;
          measuring = false;
        }
      }
      expect(prefillMs).toBeGreaterThan(0);
      expect(longestGap).toBeLessThan(prefillMs / 2);
    } finally {
      clearInterval(timer);
    }
  });

  test("an_end_of_generation_token_ends_the_request_with_stop_unless_ignore_eos", async () => {
    const opts = { prompt: "The quick brown fox", maxTokens: 200, sampling: greedy };
    const natural = await collect(engine.generate(opts));
    expect(natural.done.finishReason).toBe("stop");
    expect(natural.done.completionTokens).toBeLessThan(200);
    const forced = await collect(engine.generate({ ...opts, ignoreEos: true }));
    expect(forced.done.finishReason).toBe("length");
    expect(forced.done.completionTokens).toBe(200);
    // Up to the end-of-generation token, both runs agree.
    expect(forced.tokens.slice(0, natural.tokens.length)).toEqual(natural.tokens);
    // The token it stopped on is reported (never as text): the one the forced run sampled there.
    expect(natural.done.eog?.token).toBe(forced.tokens[natural.tokens.length] as number);
    expect(natural.tokens).not.toContain(natural.done.eog?.token as number);
    expect(forced.done.eog).toBeUndefined();
    const withLogprobs = await collect(engine.generate({ ...opts, logprobs: 0 }));
    expect(withLogprobs.done.eog?.token).toBe(natural.done.eog?.token as number);
    expect(withLogprobs.done.eog?.logprob).toBeLessThanOrEqual(0);
    expect(natural.done.eog?.logprob).toBeUndefined();
  });

  test("top_k_top_p_and_min_p_narrowed_to_one_token_sample_the_greedy_choice_at_any_temperature", async () => {
    const p = "Sampling filters:";
    const base = (await run(engine, p, 12)).tokens;
    for (const narrow of [{ topK: 1 }, { topK: 0, topP: 1e-6 }, { topK: 0, minP: 1 }]) {
      for (const seed of [1, 2]) {
        const r = await collect(
          engine.generate({ prompt: p, maxTokens: 12, ignoreEos: true, sampling: { temperature: 1.5, seed, ...narrow } }),
        );
        expect(r.tokens).toEqual(base);
      }
    }
  });

  test("repeat_frequency_and_presence_penalties_change_the_greedy_output", async () => {
    const p = "Penalties: ";
    const base = (await run(engine, p, 48)).tokens;
    // Random weights repeat themselves: greedy output has repeated tokens for the penalties to act on.
    expect(new Set(base).size).toBeLessThan(base.length);
    for (const penalty of [{ repeatPenalty: 1.5 }, { frequencyPenalty: 1.5 }, { presencePenalty: 1.5 }]) {
      const r = await collect(engine.generate({ prompt: p, maxTokens: 48, ignoreEos: true, sampling: { temperature: 0, ...penalty } }));
      expect(r.tokens).not.toEqual(base);
      expect(new Set(r.tokens).size).toBeGreaterThan(new Set(base).size);
    }
  });
});

describe("engine errors", () => {
  test("prompt_longer_than_the_context_fails_that_request_and_the_engine_keeps_serving", async () => {
    const small = await Engine.load({ modelPath: await tinyModel(), nCtx: 256, nParallel: 2, threads: 2 });
    try {
      const long = await small.tokenize("too long ".repeat(400));
      expect(long.length).toBeGreaterThan(small.info.nCtx);
      const err = await run(small, long).catch((e) => e);
      expect(err).toBeInstanceOf(EngineError);
      expect((err as EngineError).code).toBe("context_length_exceeded");
      expect((err as EngineError).message).toContain(String(small.info.nCtx));
      const ok = await run(small, "short", 4);
      expect(ok.done.completionTokens).toBe(4);
    } finally {
      await small.close();
    }
  });

  test("generation_stops_at_the_context_end_with_length", async () => {
    const small = await Engine.load({ modelPath: await tinyModel(), nCtx: 128, nParallel: 1, threads: 2 });
    try {
      const r = await run(small, "fill the context", 1000);
      expect(r.done.finishReason).toBe("length");
      // llama.cpp rounds the context up (to 256 here): the limit is what it reports.
      expect(r.done.promptTokens + r.done.completionTokens).toBeLessThanOrEqual(small.info.nCtx);
    } finally {
      await small.close();
    }
  });

  test("a_model_that_fails_to_load_is_a_typed_error", async () => {
    const missing = await Engine.load({ modelPath: "/nonexistent/model.gguf" }).catch((e) => e);
    expect(missing).toBeInstanceOf(EngineError);
    expect((missing as EngineError).code).toBe("model_load_failed");
    const path = `${process.env.TMPDIR ?? "/tmp"}/mesh-not-a-model-${process.pid}.gguf`;
    await Bun.write(path, "this is not a gguf file at all");
    const bad = await Engine.load({ modelPath: path }).catch((e) => e);
    expect((bad as EngineError).code).toBe("model_load_failed");
  });

  test("too_many_requests_in_flight_is_engine_busy", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 512, nParallel: 1, threads: 2, maxInFlight: 2 });
    try {
      const g1 = e.generate({ prompt: "a", maxTokens: 50, ignoreEos: true });
      const g2 = e.generate({ prompt: "b", maxTokens: 50, ignoreEos: true });
      expect(() => e.generate({ prompt: "c", maxTokens: 1 })).toThrow(EngineError);
      g1.cancel();
      g2.cancel();
      await Promise.all([collect(g1), collect(g2)]);
      expect((await run(e, "d", 2)).done.completionTokens).toBe(2);
    } finally {
      await e.close();
    }
  });

  test("closing_the_engine_ends_running_generations", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 512, nParallel: 1, threads: 2 });
    const g = e.generate({ prompt: "long", maxTokens: 400, ignoreEos: true });
    const result = collect(g).then(
      (r) => r.done.finishReason,
      (err) => (err as EngineError).code,
    );
    await e.close();
    expect(["cancelled", "engine_closed"]).toContain(await result);
    expect(() => e.generate({ prompt: "x" })).toThrow(EngineError);
  });
});

describe("engine input checks (review findings)", () => {
  test("out_of_range_token_ids_fail_that_request_and_never_crash_the_process", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 512, nParallel: 2, threads: 2 });
    try {
      const bad = await collect(e.generate({ prompt: [1, e.info.nVocab + 5], maxTokens: 2 })).catch((x) => x);
      expect((bad as EngineError).code).toBe("invalid_request");
      const detok = await e.detokenize([e.info.nVocab]).catch((x) => x);
      expect((detok as EngineError).code).toBe("invalid_request");
      const notArray = await collect(e.generate({ prompt: 42 as unknown as string, maxTokens: 2 })).catch((x) => x);
      expect((notArray as EngineError).code).toBe("invalid_request");
      expect((await collect(e.generate({ prompt: "still serving", maxTokens: 2, ignoreEos: true }))).done.completionTokens).toBe(2);
    } finally {
      await e.close();
    }
  });

  test("a_batch_smaller_than_the_slot_count_is_raised_so_no_slot_starves", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 1024, nParallel: 4, nBatch: 2, threads: 2 });
    try {
      expect(e.info.nBatch).toBeGreaterThanOrEqual(4);
      const runs = await Promise.all(["a", "b", "c", "d"].map((p) => collect(e.generate({ prompt: p, maxTokens: 3, ignoreEos: true }))));
      for (const r of runs) expect(r.done.completionTokens).toBe(3);
    } finally {
      await e.close();
    }
  });

  test("a_shared_abort_signal_does_not_collect_listeners", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 512, nParallel: 1, threads: 2 });
    try {
      const shared = new AbortController();
      let added = 0;
      let removed = 0;
      const add = shared.signal.addEventListener.bind(shared.signal);
      const remove = shared.signal.removeEventListener.bind(shared.signal);
      shared.signal.addEventListener = ((...a: Parameters<typeof add>) => {
        added++;
        return add(...a);
      }) as typeof add;
      shared.signal.removeEventListener = ((...a: Parameters<typeof remove>) => {
        removed++;
        return remove(...a);
      }) as typeof remove;
      for (let i = 0; i < 3; i++) await collect(e.generate({ prompt: "x", maxTokens: 1, signal: shared.signal }));
      expect(added).toBe(3);
      expect(removed).toBe(3);
    } finally {
      await e.close();
    }
  });
});

/** What an engine's tenancy listeners were told: the deltas, and the hashes held by their sum. */
function watchTenancy(e: Engine) {
  const deltas: TenancyDelta[] = [];
  const held = new Set<string>();
  const off = e.onTenancy((d) => {
    deltas.push(d);
    for (const [h] of d.inserts) held.add(h);
    for (const h of d.evicts) held.delete(h);
  });
  const until = async (ok: () => boolean) => {
    for (let i = 0; i < 200 && !ok(); i++) await Bun.sleep(5);
    expect(ok()).toBe(true);
  };
  return { deltas, held, off, until };
}

describe("KV tenancy through the worker", () => {
  const user = "<|user|>\nHello there, how are you?<|end|>\n";
  const text = `${user}<|assistant|>\n`;
  const bytes = (s: string) => Buffer.byteLength(s, "utf8");

  test("marks_of_a_text_prompt_are_reported_in_chain_order_and_reply_marks_attach_after_done", async () => {
    const t = watchTenancy(engine);
    try {
      const marks = [
        { hash: "w-user", parent: null, byteEnd: bytes(user) },
        { hash: "w-turn", parent: "w-user", byteEnd: bytes(text) },
      ];
      const gen = engine.generate({ prompt: text, maxTokens: 4, sampling: greedy, ignoreEos: true, marks });
      await collect(gen);
      await t.until(() => t.held.has("w-turn"));
      expect(t.deltas.flatMap((d) => d.inserts)).toEqual([
        ["w-user", null],
        ["w-turn", "w-user"],
      ]);
      engine.addMarks(gen.id, [["w-reply", "w-turn"]]);
      await t.until(() => t.held.has("w-reply"));
      expect(t.deltas.flatMap((d) => d.inserts)).toContainEqual(["w-reply", "w-turn"]);
    } finally {
      t.off();
    }
  });

  test("a_mark_beyond_the_prompt_ends_at_the_prompt_end_and_is_held_after_prefill", async () => {
    const t = watchTenancy(engine);
    try {
      await collect(
        engine.generate({ prompt: "short prompt", maxTokens: 1, sampling: greedy, marks: [{ hash: "w-far", parent: null, byteEnd: 1e9 }] }),
      );
      await t.until(() => t.held.has("w-far"));
    } finally {
      t.off();
    }
  });

  test("marks_on_a_token_id_prompt_are_ignored", async () => {
    const t = watchTenancy(engine);
    try {
      const prompt = await engine.tokenize("token prompt");
      await collect(engine.generate({ prompt, maxTokens: 1, sampling: greedy, marks: [{ hash: "w-ids", parent: null, byteEnd: 1 }] }));
      // A later marked request's report would come after anything this one caused.
      await collect(
        engine.generate({ prompt: "x", maxTokens: 1, sampling: greedy, marks: [{ hash: "w-after", parent: null, byteEnd: 1 }] }),
      );
      await t.until(() => t.held.has("w-after"));
      expect(t.deltas.flatMap((d) => d.inserts).map(([h]) => h)).not.toContain("w-ids");
    } finally {
      t.off();
    }
  });

  test("closing_the_engine_evicts_everything_held", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 1024, nParallel: 2, threads: 2 });
    const t = watchTenancy(e);
    let closedEngine = false;
    try {
      for (const [i, hash] of ["c-1", "c-2", "c-3"].entries()) {
        const p = `conversation ${i}: ${"words ".repeat(40)}`;
        await collect(e.generate({ prompt: p, maxTokens: 2, sampling: greedy, marks: [{ hash, parent: null, byteEnd: bytes(p) }] }));
      }
      await t.until(() => t.held.size === 3);
      const before = t.deltas.length;
      await e.close();
      closedEngine = true;
      expect(t.deltas.length).toBe(before + 1);
      expect(t.deltas[before]).toEqual({ inserts: [], evicts: expect.arrayContaining(["c-1", "c-2", "c-3"]) });
      expect(t.held.size).toBe(0);
      // Nothing more, ever: not from the worker's own shutdown, not to a late listener.
      await Bun.sleep(50);
      e.onTenancy(() => {
        throw new Error("a closed engine reported tenancy");
      });
      e.addMarks(1, [["late", null]]);
      expect(t.deltas.length).toBe(before + 1);
    } finally {
      if (!closedEngine) await e.close();
    }
  });

  test("clear_marks_evicts_every_held_mark_and_the_kv_is_still_reused", async () => {
    const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 1024, nParallel: 2, threads: 2, hostCacheMiB: 0 });
    const t = watchTenancy(e);
    try {
      const p = `conversation: ${"words ".repeat(40)}`;
      const mark = { hash: "k-1", parent: null, byteEnd: bytes(p) };
      const gen = e.generate({ prompt: p, maxTokens: 2, sampling: greedy, ignoreEos: true, marks: [mark] });
      await collect(gen);
      await t.until(() => t.held.has("k-1"));
      e.clearMarks();
      await t.until(() => t.held.size === 0);
      expect(t.deltas.at(-1)).toEqual({ inserts: [], evicts: ["k-1"] });
      // A reply marked after the clear, for a generation that ended before it, is not claimed; a later
      // marked request's report would come after anything it caused.
      e.addMarks(gen.id, [["k-reply", "k-1"]]);
      const again = await collect(e.generate({ prompt: `${p} and more`, maxTokens: 1, sampling: greedy, marks: [mark] }));
      await t.until(() => t.held.has("k-1"));
      expect(t.held.has("k-reply")).toBe(false);
      // The KV was kept: the next turn reused the conversation.
      expect(again.done.cachedTokens).toBeGreaterThan(40);
    } finally {
      t.off();
      await e.close();
    }
  });
});
