// mesh's CPU flash-attention kernel (vendor/llama.cpp/shim/mesh_fa.cpp) over the real library:
// which ops it takes, that its logits agree with ggml's kernel and with the plain (matrix
// product) path, over several head shapes, and that a served turn gives the same greedy tokens
// and cached_tokens with either kernel. No test here looks at how long anything took; the speed
// is in docs/benchmarks.md.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DEFAULT_PLAIN_ATTN, MESH_FA_MIN_QUERIES, parseAttnKernel } from "../../src/engine/attention";
import { collect, Engine } from "../../src/engine/index";
import { closeModel, type OpenedModel } from "../../src/engine/open";
import type { LoadOptions } from "../../src/engine/protocol";
import { generateModel, type ModelSpec, TINY } from "../../src/gguf/generate";
import { vocabPath } from "../../src/gguf/models";
import { tinyLoadOptions, tinyModel } from "../helpers/model";
import { openTinyModel, tokenIds } from "../helpers/native-model";

const dir = mkdtempSync(join(tmpdir(), "mesh-attn-kernel-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Head shapes beside the tiny model's (head size 16, two query heads per KV head): the bench
// model's grouping (64, four per KV head), one KV head per query head (64), and a head size the
// kernel does not take (18: not a whole number of vectors of 4, 8 or 16 floats).
const SHAPES: Record<string, Omit<ModelSpec, "name" | "nLayer" | "nFf" | "nCtxTrain" | "seed" | "tiedOutput">> = {
  grouped: { nEmbd: 256, nHead: 4, nHeadKv: 1 },
  mha: { nEmbd: 128, nHead: 2, nHeadKv: 2 },
  odd: { nEmbd: 72, nHead: 4, nHeadKv: 2 },
};

async function shapedModel(name: string): Promise<string> {
  if (name === "tiny") return tinyModel();
  const path = join(dir, `${name}.gguf`);
  const spec: ModelSpec = { ...TINY, ...SHAPES[name], name: `mesh-fa-${name}`, nLayer: 2, nFf: 192 };
  await generateModel(spec, vocabPath("phi-3") as string, path);
  return path;
}

const ids = (seed: number, n: number) => tokenIds(seed, n, 300);
const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - (b[i] as number))), 0);
const argmax = (a: Float32Array) => a.reduce((best, x, i) => (x > (a[best] as number) ? i : best), 0);

describe("mesh's attention kernel over the real library", () => {
  const control = new Int32Array(8);
  let opened: OpenedModel;

  function open(path: string, o: Partial<LoadOptions> = {}): Promise<OpenedModel> {
    return tinyLoadOptions({ modelPath: path, nBatch: 1024, nCtx: 2048, nParallel: 4, flashAttn: 1, ...o }).then((o) =>
      openTinyModel(o, control),
    );
  }
  afterAll(() => {
    if (opened) closeModel(opened);
    control.fill(0);
  });

  // One decode of (sequence, tokens) groups at their positions, logits for each group's last token.
  function decode(m: OpenedModel, groups: Array<{ seq: number; at: number; tokens: number[] }>): Float32Array[] {
    const n = groups.reduce((k, g) => k + g.tokens.length, 0);
    const tok = new Int32Array(n);
    const pos = new Int32Array(n);
    const seq = new Int32Array(n);
    const logits = new Int8Array(n);
    const lasts: number[] = [];
    let i = 0;
    for (const g of groups) {
      g.tokens.forEach((t, j) => {
        tok[i] = t;
        pos[i] = g.at + j;
        seq[i] = g.seq;
        logits[i] = j === g.tokens.length - 1 ? 1 : 0;
        i++;
      });
      lasts.push(i - 1);
    }
    expect(m.native.mesh_decode(m.ctx, tok, pos, seq, logits, n)).toBe(0);
    return lasts.map((k) => {
      const out = new Float32Array(m.info.nVocab);
      m.native.mesh_logits_get(m.ctx, k, out, out.length);
      return out;
    });
  }

  const counts = (m: OpenedModel) => {
    const c = new BigInt64Array(2);
    m.native.mesh_fa_counts(c);
    return { mesh: Number(c[0]), ggml: Number(c[1]) };
  };

  // The same decode three ways over the same cached prefixes: ggml's kernel, mesh's, and the plain
  // path (matrix products, F32 softmax) as the reference; the suffixes are removed after each.
  function threeWays(m: OpenedModel, groups: Array<{ seq: number; at: number; tokens: number[] }>) {
    const run = (kernel: "ggml" | "mesh" | "plain") => {
      m.native.mesh_set_attn_kernel(m.ctx, kernel === "mesh" ? MESH_FA_MIN_QUERIES : 0, 1);
      m.native.mesh_set_plain_attn(m.ctx, kernel === "plain" ? 1 : 0, kernel === "plain" ? 4096 : 0);
      const before = counts(m);
      const out = decode(m, groups);
      const after = counts(m);
      for (const g of groups) m.native.mesh_seq_rm(m.ctx, g.seq, g.at, -1);
      m.native.mesh_set_plain_attn(m.ctx, 0, 0);
      return { out, took: after.mesh - before.mesh, passed: after.ggml - before.ggml };
    };
    const r = { ggml: run("ggml"), mesh: run("mesh"), plain: run("plain") };
    m.native.mesh_set_attn_kernel(m.ctx, MESH_FA_MIN_QUERIES, 1);
    return r;
  }

  for (const shape of ["tiny", "grouped", "mha"]) {
    test(`${shape}: one_sequence_suffixes_take_the_mesh_kernel_and_match_the_references`, async () => {
      if (opened) closeModel(opened);
      opened = await open(await shapedModel(shape));
      const layers = opened.info.nLayer;
      opened.native.mesh_memory_clear(opened.ctx, 1);
      decode(opened, [{ seq: 0, at: 0, tokens: ids(1, 300) }]);
      // Sizes around the kernel's column blocks and ggml's tiled kernel (64 queries).
      for (const n of [2, 16, 63, 64, 100, 300]) {
        const r = threeWays(opened, [{ seq: 0, at: 300, tokens: ids(2 + n, n) }]);
        expect({ n, took: r.mesh.took, passed: r.mesh.passed }).toEqual({ n, took: layers, passed: 0 });
        expect({ n, took: r.ggml.took }).toEqual({ n, took: 0 });
        const [mesh, ggml, plain] = [r.mesh.out[0], r.ggml.out[0], r.plain.out[0]] as [Float32Array, Float32Array, Float32Array];
        // As close to the reference as ggml's kernel is, give or take rounding: the same attention.
        expect({ n, close: maxDiff(mesh, plain) <= 2 * maxDiff(ggml, plain) + 1e-3 }).toEqual({ n, close: true });
        expect({ n, top: argmax(mesh) }).toEqual({ n, top: argmax(plain) });
      }
    });
  }

  test("tiny: short_batches_are_closer_to_the_reference_than_ggml_kernel_which_sums_values_in_f16", async () => {
    if (opened) closeModel(opened);
    opened = await open(await tinyModel());
    opened.native.mesh_memory_clear(opened.ctx, 1);
    decode(opened, [{ seq: 0, at: 0, tokens: ids(1, 600) }]);
    const r = threeWays(opened, [{ seq: 0, at: 600, tokens: ids(3, 16) }]);
    const [mesh, ggml, plain] = [r.mesh.out[0], r.ggml.out[0], r.plain.out[0]] as [Float32Array, Float32Array, Float32Array];
    expect(maxDiff(mesh, plain)).toBeLessThan(maxDiff(ggml, plain));
  });

  test("tiny: single_token_steps_and_several_streams_one_token_each_go_to_ggml_kernel", async () => {
    if (opened) closeModel(opened);
    opened = await open(await tinyModel());
    const m = opened;
    const layers = m.info.nLayer;
    m.native.mesh_memory_clear(m.ctx, 1);
    for (let s = 0; s < 4; s++) decode(m, [{ seq: s, at: 0, tokens: ids(10 + s, 200) }]);
    let before = counts(m);
    decode(m, [{ seq: 0, at: 200, tokens: ids(20, 1) }]);
    let after = counts(m);
    expect({ mesh: after.mesh - before.mesh, ggml: after.ggml - before.ggml }).toEqual({ mesh: 0, ggml: layers });
    // Four streams' next tokens in one step: queries of different sequences in one column block.
    before = after;
    decode(
      m,
      [0, 1, 2, 3].map((s) => ({ seq: s, at: s === 0 ? 201 : 200, tokens: ids(30 + s, 1) })),
    );
    after = counts(m);
    expect({ mesh: after.mesh - before.mesh, ggml: after.ggml - before.ggml }).toEqual({ mesh: 0, ggml: layers });
  });

  test("tiny: two_sequences_whose_blocks_do_not_mix_take_the_mesh_kernel_and_each_sees_only_its_own_cells", async () => {
    if (opened) closeModel(opened);
    opened = await open(await tinyModel());
    const m = opened;
    m.native.mesh_memory_clear(m.ctx, 1);
    decode(m, [{ seq: 0, at: 0, tokens: ids(40, 150) }]);
    decode(m, [{ seq: 1, at: 0, tokens: ids(41, 250) }]);
    // 32 queries per sequence: whole column blocks (64 columns / 2 query heads per KV head).
    const groups = [
      { seq: 0, at: 150, tokens: ids(42, 32) },
      { seq: 1, at: 250, tokens: ids(43, 32) },
    ];
    const r = threeWays(m, groups);
    expect(r.mesh.took).toBe(m.info.nLayer);
    for (const k of [0, 1]) {
      const [mesh, ggml, plain] = [r.mesh.out[k], r.ggml.out[k], r.plain.out[k]] as [Float32Array, Float32Array, Float32Array];
      expect({ k, close: maxDiff(mesh, plain) <= 2 * maxDiff(ggml, plain) + 1e-3 }).toEqual({ k, close: true });
    }
    // Alone, sequence 1's suffix gives the same logits: nothing of sequence 0 leaked into it.
    const alone = threeWays(m, [groups[1] as (typeof groups)[number]]);
    expect(maxDiff(alone.mesh.out[0] as Float32Array, r.mesh.out[1] as Float32Array)).toBeLessThan(1e-4);
  });

  test("odd: a_head_size_the_kernel_does_not_take_goes_to_ggml_kernel", async () => {
    if (opened) closeModel(opened);
    opened = await open(await shapedModel("odd"));
    const m = opened;
    m.native.mesh_memory_clear(m.ctx, 1);
    decode(m, [{ seq: 0, at: 0, tokens: ids(50, 200) }]);
    // Known at open from the model's heads: the context says so (and gets the plain default).
    expect(m.info.attnKernel).toBe("ggml");
    expect(m.native.mesh_set_attn_kernel(m.ctx, MESH_FA_MIN_QUERIES, 1)).toBe(0);
    // The kernel's own per-op check, which guards pools without a setting (an RPC stage server's):
    // with the model check skipped, every op still goes to ggml's kernel.
    expect(m.native.mesh_set_attn_kernel(m.ctx, MESH_FA_MIN_QUERIES, 0)).toBe(MESH_FA_MIN_QUERIES);
    const before = counts(m);
    decode(m, [{ seq: 0, at: 200, tokens: ids(51, 100) }]);
    const after = counts(m);
    m.native.mesh_seq_rm(m.ctx, 0, 200, -1);
    expect({ took: after.mesh - before.mesh, passed: after.ggml - before.ggml }).toEqual({ took: 0, passed: m.info.nLayer });
  });

  // The setting was once the process's: a context loading with another value while one decoded
  // could split one op's threads between the two kernels (mismatched barriers). It is per
  // context now, kept per thread pool.
  test("each_context_keeps_its_own_kernel_setting", async () => {
    if (opened) closeModel(opened);
    opened = await open(await tinyModel());
    // Its own thread pool for batches (threads 1, batch threads 2): the setting covers both pools.
    const other = await open(await tinyModel(), { threads: 1, threadsBatch: 2 });
    try {
      expect(opened.native.mesh_set_attn_kernel(opened.ctx, 0, 1)).toBe(0);
      expect(other.native.mesh_set_attn_kernel(other.ctx, MESH_FA_MIN_QUERIES, 1)).toBe(MESH_FA_MIN_QUERIES);
      const step = (m: OpenedModel) => {
        m.native.mesh_memory_clear(m.ctx, 1);
        decode(m, [{ seq: 0, at: 0, tokens: ids(70, 100) }]);
        const before = counts(m);
        decode(m, [{ seq: 0, at: 100, tokens: ids(71, 100) }]);
        const after = counts(m);
        return { mesh: after.mesh - before.mesh, ggml: after.ggml - before.ggml };
      };
      const layers = opened.info.nLayer;
      expect(step(opened)).toEqual({ mesh: 0, ggml: layers });
      expect(step(other)).toEqual({ mesh: layers, ggml: 0 });
      expect(step(opened)).toEqual({ mesh: 0, ggml: layers });
    } finally {
      closeModel(other);
    }
    opened.native.mesh_set_attn_kernel(opened.ctx, MESH_FA_MIN_QUERIES, 1);
  });
});

describe("the engine with either kernel", () => {
  test("attn_kernel_values_parse_or_name_what_is_wrong", () => {
    expect(parseAttnKernel("mesh")).toBe("mesh");
    expect(parseAttnKernel("ggml")).toBe("ggml");
    expect(parseAttnKernel("fast")).toEqual({ error: "expected mesh or ggml, got 'fast'" });
  });

  // An agent's turn: a long prompt, then the same prompt plus a 16-token suffix from cache.
  async function turn(attnKernel: "mesh" | "ggml") {
    const engine = await Engine.load({ modelPath: await tinyModel(), nCtx: 4096, nParallel: 2, threads: 2, attnKernel });
    try {
      const prefix = ids(60, 1500);
      const suffix = ids(61, 100);
      await collect(engine.generate({ prompt: prefix, maxTokens: 1, ignoreEos: true, sampling: { temperature: 0 } }));
      const before = await engine.stats();
      const r = await collect(
        engine.generate({ prompt: [...prefix, ...suffix], maxTokens: 24, ignoreEos: true, sampling: { temperature: 0 } }),
      );
      const after = await engine.stats();
      return {
        tokens: r.tokens,
        cached: r.done.cachedTokens,
        kernel: engine.info.attnKernel,
        plain: engine.info.plainAttn,
        meshOps: after.attnOpsMesh - before.attnOpsMesh,
      };
    } finally {
      await engine.close();
    }
  }

  test("a_cached_turn_gives_the_same_tokens_and_cached_tokens_with_either_kernel", async () => {
    const mesh = await turn("mesh");
    const ggml = await turn("ggml");
    expect(mesh.kernel).toBe("mesh");
    expect(ggml.kernel).toBe("ggml");
    // The plain path is the fallback beside ggml's kernel only.
    expect(mesh.plain).toBeNull();
    expect(ggml.plain).toEqual(DEFAULT_PLAIN_ATTN);
    // The suffix really took mesh's kernel (else the comparison proves nothing), and ggml's did not.
    expect(mesh.meshOps).toBeGreaterThan(0);
    expect(ggml.meshOps).toBe(0);
    expect(mesh.cached).toBe(1500);
    expect(ggml.cached).toBe(1500);
    expect(mesh.tokens).toEqual(ggml.tokens);
  });

  test("a_model_whose_heads_the_kernel_does_not_take_runs_ggml_kernel_with_the_plain_default", async () => {
    const engine = await Engine.load({ modelPath: await shapedModel("odd"), nCtx: 2048, nParallel: 2, threads: 2 });
    try {
      expect(engine.info.attnKernel).toBe("ggml");
      expect(engine.info.plainAttn).toEqual(DEFAULT_PLAIN_ATTN);
    } finally {
      await engine.close();
    }
  });
});
