// Plain attention for short batches: the window's rule alone, then the switch
// over the real library and the tiny model. No test here looks at how long
// anything took; the speed is in docs/benchmarks.md.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  DEFAULT_PLAIN_ATTN,
  describeAttention,
  FLASH_TILE_QUERIES,
  PLAIN_ATTN_MIN_BUDGET,
  type PlainAttnContext,
  parsePlainAttn,
  plainAttnWindow,
} from "../../src/engine/attention";
import { collect, Engine } from "../../src/engine/index";
import { closeModel, type OpenedModel } from "../../src/engine/open";
import type { LoadOptions } from "../../src/engine/protocol";
import { tinyLoadOptions, tinyModel } from "../helpers/model";
import { openTinyModel, tokenIds } from "../helpers/native-model";

// The bench model's shape at the engine bench's table context.
const BENCH: PlainAttnContext = { nCtx: 20480, nLayer: 8, nEmbd: 1024, nHead: 16, nHeadKv: 4, cpuOnly: true };

describe("the plain attention window", () => {
  test("cpu_only_context_gets_the_default_window_when_it_fits", () => {
    expect(plainAttnWindow(DEFAULT_PLAIN_ATTN, { ...BENCH, nCtx: 4096 })).toEqual(DEFAULT_PLAIN_ATTN);
  });

  test("off_gpu_layers_or_a_split_mean_flash_attention_for_every_decode", () => {
    expect(plainAttnWindow(null, BENCH)).toBeNull();
    expect(plainAttnWindow(DEFAULT_PLAIN_ATTN, { ...BENCH, cpuOnly: false })).toBeNull();
  });

  test("the_kq_memory_of_a_plain_step_is_held_to_half_the_kv_cache", () => {
    const w = plainAttnWindow(DEFAULT_PLAIN_ATTN, BENCH);
    expect(w).not.toBeNull();
    const max = (w as { max: number }).max;
    const headDim = BENCH.nEmbd / BENCH.nHead;
    const kvBytes = BENCH.nCtx * BENCH.nLayer * 2 * BENCH.nHeadKv * headDim * 2;
    const perToken = BENCH.nCtx * BENCH.nHead * 8;
    expect(max * perToken).toBeLessThanOrEqual(kvBytes / 2);
    // One token more would pass the bound: the cap is the bound, not a round number.
    expect((max + 1) * perToken).toBeGreaterThan(kvBytes / 2);
    expect(max).toBeLessThan(DEFAULT_PLAIN_ATTN.max);
  });

  test("an_architecture_whose_graph_needs_flash_attention_gets_no_window", () => {
    // MiniMax-M3 writes its MSA index keys only in the flash graph: a plain decode would leave them unwritten.
    expect(plainAttnWindow(DEFAULT_PLAIN_ATTN, { ...BENCH, nCtx: 4096, architecture: "minimax-m3" })).toBeNull();
    expect(plainAttnWindow(DEFAULT_PLAIN_ATTN, { ...BENCH, nCtx: 4096, architecture: "llama" })).toEqual(DEFAULT_PLAIN_ATTN);
  });

  test("a_context_too_wide_for_the_budget_gets_no_window", () => {
    // 128k cells x 64 heads: one token's KQ alone is 64 MiB, over half of this KV cache.
    const wide: PlainAttnContext = { nCtx: 131072, nLayer: 2, nEmbd: 4096, nHead: 64, nHeadKv: 1, cpuOnly: true };
    expect(plainAttnWindow(DEFAULT_PLAIN_ATTN, wide)).toBeNull();
  });

  test("small_models_get_at_least_the_fixed_budget", () => {
    const tiny: PlainAttnContext = { nCtx: 4096, nLayer: 2, nEmbd: 64, nHead: 4, nHeadKv: 2, cpuOnly: true };
    const w = plainAttnWindow({ min: 12, max: 63 }, tiny);
    expect(w).toEqual({ min: 12, max: 63 });
    expect(63 * tiny.nCtx * tiny.nHead * 8).toBeLessThanOrEqual(PLAIN_ATTN_MIN_BUDGET);
  });

  test("the_window_never_reaches_the_tiled_flash_kernel", () => {
    const w = plainAttnWindow({ min: 1, max: 1000 }, { ...BENCH, nCtx: 1024 });
    expect(w?.max).toBe(FLASH_TILE_QUERIES - 1);
  });

  test("plain_attn_flag_values_parse_or_name_what_is_wrong", () => {
    expect(parsePlainAttn("off")).toBeNull();
    expect(parsePlainAttn("8:40")).toEqual({ min: 8, max: 40 });
    expect(parsePlainAttn("12")).toContain("MIN:MAX");
    expect(parsePlainAttn("0:10")).toContain("at least 1");
    expect(parsePlainAttn("20:10")).toContain("at least MIN");
    expect(parsePlainAttn("12:64")).toContain("below 64");
  });
});

describe("the attention a load states", () => {
  test("flash_on_names_the_kernel_and_window_that_run", () => {
    expect(describeAttention({ flashAttn: true, attnKernel: "mesh", plainAttn: null })).toMatchObject({
      kernel: "mesh",
      plain_for_tokens: "none",
      flash: "on",
    });
    const plain = describeAttention({ flashAttn: true, attnKernel: "ggml", plainAttn: DEFAULT_PLAIN_ATTN });
    expect(plain).toMatchObject({ kernel: "ggml", plain_for_tokens: "12-63", flash: "on" });
    expect(plain.note).toContain("matrix-product");
  });

  // Regression: serve logged "CPU flash attention: mesh's kernel ..." for a context whose "auto" had
  // resolved flash attention off, where neither kernel nor the plain window ever runs.
  test("flash_off_says_so_and_names_no_kernel_or_window", () => {
    const d = describeAttention({ flashAttn: false, attnKernel: "mesh", plainAttn: null });
    expect(d).toMatchObject({ kernel: "none", plain_for_tokens: "none", flash: "off" });
    expect(d.note).toContain("flash attention is off");
    expect(d.note).not.toContain("mesh's kernel");
  });

  test("the_library_reports_flash_as_the_context_resolved_it", async () => {
    const control = new Int32Array(8);
    for (const [flashAttn, on] of [
      [-1, true],
      [1, true],
      [0, false],
    ] as const) {
      const m = openTinyModel(await tinyLoadOptions({ nCtx: 1024, nParallel: 1, flashAttn }), control);
      try {
        expect({ flashAttn, on: m.info.flashAttn }).toEqual({ flashAttn, on });
        expect(describeAttention(m.info).flash).toBe(on ? "on" : "off");
      } finally {
        closeModel(m);
      }
    }
  });
});

describe("the switch over the real library", () => {
  let opened: OpenedModel;
  let options: LoadOptions;
  const control = new Int32Array(8);

  beforeAll(async () => {
    options = await tinyLoadOptions({ nBatch: 1024, flashAttn: 1, plainAttn: DEFAULT_PLAIN_ATTN });
    opened = openTinyModel(options, control);
  });
  afterAll(() => {
    if (opened) closeModel(opened);
    control.fill(0);
  });

  const ids = (seed: number, n: number) => tokenIds(seed, n, 300);

  // Decodes tokens at positions from `at` in one call, logits for the last; returns a copy of those logits.
  function decode(tokens: number[], at: number, seq: number): Float32Array {
    const n = tokens.length;
    const { native, ctx } = opened;
    const rc = native.mesh_decode(
      ctx,
      new Int32Array(tokens),
      new Int32Array(tokens.map((_, i) => at + i)),
      new Int32Array(n).fill(seq),
      new Int8Array(n).map((_, i) => (i === n - 1 ? 1 : 0)),
      n,
    );
    expect(rc).toBe(0);
    const out = new Float32Array(opened.info.nVocab);
    expect(native.mesh_logits_get(ctx, n - 1, out, out.length)).toBe(opened.info.nVocab);
    return out;
  }

  test("the_context_reports_the_window_it_applied", () => {
    expect(opened.info.plainAttn).toEqual(DEFAULT_PLAIN_ATTN);
  });

  test("only_decodes_inside_the_window_take_the_plain_path", () => {
    const { native, ctx } = opened;
    native.mesh_memory_clear(ctx, 1);
    decode(ids(1, 100), 0, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    decode(ids(2, 16), 100, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(0);
    decode(ids(3, 1), 116, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    decode(ids(4, 11), 117, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    decode(ids(5, 63), 128, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(0);
    decode(ids(6, 64), 191, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    // Off: flash for every decode.
    expect(native.mesh_set_plain_attn(ctx, 0, 0)).toBe(0);
    decode(ids(7, 16), 255, 0);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    expect(native.mesh_set_plain_attn(ctx, DEFAULT_PLAIN_ATTN.min, DEFAULT_PLAIN_ATTN.max)).toBe(1);
  });

  const same = (a: Float32Array, b: Float32Array) => a.length === b.length && a.every((x, i) => x === b[i]);

  // The bug this guards: llama.cpp reuses the previous graph when the next
  // ubatch has the same shape, without looking at the attention flag. A batch
  // past the window whose last ubatch has 16 tokens leaves a flash graph of
  // exactly the shape of a 16-token turn; the turn must not run on it.
  test("a_turn_after_a_same_shaped_flash_ubatch_does_not_reuse_its_graph", () => {
    const { native, ctx } = opened;
    native.mesh_memory_clear(ctx, 1);
    decode(ids(10, 100), 0, 0);
    // 528 tokens (over the window: flash), ubatches of 512 and 16, another sequence.
    decode(ids(11, 528), 0, 1);
    expect(native.mesh_attn_is_flash(ctx)).toBe(1);
    const suffix = ids(12, 16);
    const plain1 = decode(suffix, 100, 0);
    native.mesh_seq_rm(ctx, 0, 100, -1);
    native.mesh_set_plain_attn(ctx, 0, 0);
    const flash = decode(suffix, 100, 0);
    native.mesh_seq_rm(ctx, 0, 100, -1);
    native.mesh_set_plain_attn(ctx, DEFAULT_PLAIN_ATTN.min, DEFAULT_PLAIN_ATTN.max);
    const plain2 = decode(suffix, 100, 0);
    native.mesh_seq_rm(ctx, 0, 100, -1);
    // The two kernels round differently (else this test could not fail), each the same every time.
    expect(same(plain1, flash)).toBe(false);
    expect(same(plain1, plain2)).toBe(true);
  });
});

describe("the kq budget over the real library", () => {
  // The window's top comes from the KQ budget: a context wide enough that a 63-token plain step
  // would pass it must get a lower top from the library too, and a batch one past it flash.
  test("a_batch_one_past_the_budget_capped_top_decodes_with_flash_attention", async () => {
    const control = new Int32Array(8);
    const o = await tinyLoadOptions({ nCtx: 65536, nParallel: 1, flashAttn: 1, plainAttn: DEFAULT_PLAIN_ATTN });
    const m = openTinyModel(o, control);
    try {
      const { info, native, ctx } = m;
      const w = plainAttnWindow(DEFAULT_PLAIN_ATTN, { ...info, cpuOnly: true });
      expect(w).not.toBeNull();
      const top = (w as { max: number }).max;
      expect(top).toBeLessThan(DEFAULT_PLAIN_ATTN.max);
      expect(info.plainAttn).toEqual(w);
      const step = (n: number, at: number) => {
        const rc = native.mesh_decode(
          ctx,
          new Int32Array(n).map((_, i) => 300 + i),
          new Int32Array(n).map((_, i) => at + i),
          new Int32Array(n),
          new Int8Array(n).fill(1),
          n,
        );
        expect(rc).toBe(0);
        return native.mesh_attn_is_flash(ctx);
      };
      expect(step(top, 0)).toBe(0);
      expect(step(top + 1, top)).toBe(1);
    } finally {
      closeModel(m);
    }
  });
});

describe("greedy output with and without plain attention", () => {
  // An agent's turn: a long prompt, then the same prompt plus a 16-token suffix from cache.
  async function turn(
    plainAttn: LoadOptions["plainAttn"],
  ): Promise<{ tokens: number[]; cached: number; window: unknown; plainSteps: number }> {
    const engine = await Engine.load({ modelPath: await tinyModel(), nCtx: 4096, nParallel: 2, threads: 2, plainAttn });
    try {
      const prefix = Array.from({ length: 1500 }, (_, i) => 300 + ((i * 104729) % 20000));
      const suffix = Array.from({ length: 16 }, (_, i) => 400 + i * 37);
      await collect(engine.generate({ prompt: prefix, maxTokens: 1, ignoreEos: true, sampling: { temperature: 0 } }));
      const r = await collect(
        engine.generate({ prompt: [...prefix, ...suffix], maxTokens: 24, ignoreEos: true, sampling: { temperature: 0 } }),
      );
      const plainSteps = (await engine.stats()).plainAttnSteps;
      return { tokens: r.tokens, cached: r.done.cachedTokens, window: engine.info.plainAttn, plainSteps };
    } finally {
      await engine.close();
    }
  }

  test("a_cached_turn_gives_the_same_tokens_and_cached_tokens_either_way", async () => {
    const plain = await turn(DEFAULT_PLAIN_ATTN);
    const flash = await turn(null);
    expect(plain.window).toEqual(DEFAULT_PLAIN_ATTN);
    expect(flash.window).toBeNull();
    // The suffix really took the plain path (else the comparison below proves nothing).
    expect(plain.plainSteps).toBe(1);
    expect(flash.plainSteps).toBe(0);
    expect(plain.cached).toBe(1500);
    expect(flash.cached).toBe(1500);
    expect(plain.tokens).toEqual(flash.tokens);
  });
});
