// The knobs bench (paired A/B of one context setting, shim only): its flags,
// its table, and one real run on the tiny model. Checks what is measured and
// reported, never how fast anything is.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { type KnobsOptions, type KnobsResult, knobsTable, measureKnobs, parseKnobsArgs } from "../../src/bench/knobs";
import { findNativeLib } from "../../src/engine/library";
import { openNative } from "../../src/engine/native";
import { TINY } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";

const ROOT = join(import.meta.dir, "..", "..");

function cli(...args: string[]) {
  const r = Bun.spawnSync([process.execPath, "run", "src/bench/knobs.ts", ...args], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

describe("knobs bench", () => {
  test("flags_parse_the_varied_knob_and_size_the_context_to_the_longest_cell", () => {
    const { o, cells } = parseKnobsArgs([
      "--vary",
      "ubatch=512,1024",
      "--prefixes",
      "2048,8192",
      "--suffixes",
      "16,1024",
      "--repeats",
      "3",
    ]);
    expect(o).toMatchObject({ vary: "ubatch", values: [512, 1024], repeats: 3, ubatch: 512, batch: 2048, flashAttn: -1 });
    expect(cells).toEqual([
      { prefix: 2048, suffix: 16 },
      { prefix: 2048, suffix: 1024 },
      { prefix: 8192, suffix: 16 },
      { prefix: 8192, suffix: 1024 },
    ]);
    expect(o.ctx).toBeGreaterThanOrEqual(8192 + 1024);
    expect(o.ctx % 256).toBe(0);
  });

  test("flags_reject_a_missing_or_single_valued_vary_and_unknown_knobs", () => {
    expect(() => parseKnobsArgs([])).toThrow(/--vary KEY=V1,V2 is required/);
    expect(() => parseKnobsArgs(["--vary", "ubatch=512"])).toThrow(/at least two values/);
    expect(() => parseKnobsArgs(["--vary", "poll=0,50"])).toThrow(/--vary KEY=V1,V2 is required/);
    expect(() => parseKnobsArgs(["--vary", "flash=1,0", "--repeats", "0"])).toThrow(/--repeats must be a positive integer/);
    expect(() => parseKnobsArgs(["--vary", "flash=1,0", "--flash-attn", "maybe"])).toThrow(/--flash-attn must be on, off or auto/);
  });

  test("a_plain_window_top_that_would_be_empty_or_past_the_tiled_kernel_is_refused", () => {
    // plain=8 would open 12..8: an empty window, flash for every decode, labelled as a plain variant.
    expect(() => parseKnobsArgs(["--vary", "plain=0,8"])).toThrow(/--vary plain takes 0/);
    expect(() => parseKnobsArgs(["--vary", "plain=0,64"])).toThrow(/--vary plain takes 0/);
    expect(parseKnobsArgs(["--vary", "plain=0,12,63"]).o.values).toEqual([0, 12, 63]);
  });

  test("cli_rejects_a_bad_flag_with_one_line_and_exit_2", () => {
    const r = cli("--vary", "ubatch=512,x");
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toContain("--vary must be a comma-separated list of integers");
  });

  test("table_gives_medians_paired_ratios_against_the_first_value_and_whether_tokens_agree", () => {
    const o = { vary: "ubatch", values: [512, 1024] } as KnobsOptions;
    const r: KnobsResult = new Map([
      [
        "2048+16",
        new Map([
          [512, { ms: [10, 20, 30], tokens: [5, 6, 7] }],
          [1024, { ms: [5, 20, 10], tokens: [5, 6, 7] }],
        ]),
      ],
      [
        "2048+256",
        new Map([
          [512, { ms: [10, 10, 10], tokens: [5, 6, 7] }],
          [1024, { ms: [10, 10, 10], tokens: [5, 9, 7] }],
        ]),
      ],
    ]);
    const lines = knobsTable(o, r).split("\n");
    expect(lines[0]).toBe("| prefix + suffix | ubatch=512 (ms) | ubatch=1024 (ms) | ubatch=1024 vs 512 (paired) | same greedy tokens |");
    // Medians 20 and 10: 2.00x; per repeat 10/5, 20/20, 30/10 -> 2, 1, 3: median 2.
    expect(lines[2]).toBe("| 2048 + 16 | 20.0 | 10.0 | 2.00x (2.00x) | yes |");
    expect(lines[3]).toBe("| 2048 + 256 | 10.0 | 10.0 | 1.00x (1.00x) | no |");
  });

  test("measures_every_cell_on_every_variant_with_the_same_greedy_token_for_a_batch_size_change", async () => {
    const modelPath = await ensureModel(TINY);
    const o: KnobsOptions = {
      modelPath,
      ctx: 1024,
      parallel: 1,
      batch: 512,
      ubatch: 128,
      threads: 2,
      flashAttn: -1,
      plainAttn: null,
      attnKernel: "mesh",
      repeats: 2,
      pauseMs: 1,
      vary: "ubatch",
      values: [128, 512],
    };
    const r = measureKnobs(o, [{ prefix: 256, suffix: 300 }], () => {});
    const cell = r.get("256+300");
    expect(cell).toBeDefined();
    for (const v of o.values) {
      const s = cell?.get(v);
      expect(s?.ms).toHaveLength(2);
      expect(s?.ms.every((ms) => ms > 0)).toBe(true);
      expect(s?.tokens.every((t) => t >= 0)).toBe(true);
    }
    // The ubatch only splits the same computation differently: greedy picks agree.
    expect(cell?.get(512)?.tokens).toEqual(cell?.get(128)?.tokens as number[]);
  });

  // A one-context variant run (plain, kernel) on the tiny model.
  async function sharedContextOptions(vary: KnobsOptions["vary"], values: number[], repeats: number): Promise<KnobsOptions> {
    return {
      modelPath: await ensureModel(TINY),
      ctx: 1024,
      parallel: 1,
      batch: 512,
      ubatch: 512,
      threads: 2,
      flashAttn: 1,
      plainAttn: null,
      attnKernel: "mesh",
      repeats,
      pauseMs: 1,
      vary,
      values,
    };
  }

  test("plain_attention_variants_run_on_one_context_with_the_same_greedy_token", async () => {
    const o = await sharedContextOptions("plain", [0, 63], 3);
    const r = measureKnobs(o, [{ prefix: 300, suffix: 16 }], () => {});
    const cell = r.get("300+16");
    for (const v of o.values) expect(cell?.get(v)?.ms).toHaveLength(3);
    expect(cell?.get(63)?.tokens).toEqual(cell?.get(0)?.tokens as number[]);
  });

  test("kernel_variants_run_on_one_context_and_the_mesh_kernel_takes_the_suffix", async () => {
    const o = await sharedContextOptions("kernel", [0, 2], 2);
    // The process's op counts (the library is loaded once per process): the kernel=2 decodes ran mesh's.
    const native = openNative(findNativeLib() as string);
    const counts = () => {
      const c = new BigInt64Array(2);
      native.mesh_fa_counts(c);
      return { mesh: Number(c[0]), ggml: Number(c[1]) };
    };
    const before = counts();
    const r = measureKnobs(o, [{ prefix: 300, suffix: 100 }], () => {});
    const after = counts();
    const cell = r.get("300+100");
    for (const v of o.values) expect(cell?.get(v)?.ms).toHaveLength(2);
    expect(cell?.get(2)?.tokens).toEqual(cell?.get(0)?.tokens as number[]);
    // Two measured decodes per kernel over the tiny model's 2 layers, plus the prefix (mesh's too).
    expect(after.mesh - before.mesh).toBeGreaterThanOrEqual(2 * 2);
    expect(after.ggml - before.ggml).toBeGreaterThanOrEqual(2 * 2);
  });
});
