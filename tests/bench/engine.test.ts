// The engine benchmark on the tiny model, mesh only (llama-server is not built
// in CI). Checks the report's shape and that every figure is a positive
// number; never how fast anything is.
import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { type EngineBenchReport, formatEngineBenchTable, pairedRatio, runEngineBench } from "../../src/bench/engine";
import { defaultLlamaServerPath } from "../../src/bench/llama-server";
import { TINY } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";

const ROOT = join(import.meta.dir, "..", "..");
const positive = (x: unknown) => typeof x === "number" && Number.isFinite(x) && x > 0;

function cli(...args: string[]) {
  const r = Bun.spawnSync([process.execPath, "run", "src/bench/engine.ts", ...args], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

describe("engine benchmark", () => {
  test("tiny_run_without_compare_reports_positive_figures", async () => {
    const lines: string[] = [];
    const report: EngineBenchReport = await runEngineBench({
      model: await ensureModel(TINY),
      compare: false,
      threads: 1,
      ctx: 1024,
      parallel: 2,
      promptTokens: 64,
      prefixTokens: 128,
      suffixTokens: 8,
      genTokens: 8,
      repeats: 1,
      onProgress: (s) => lines.push(s),
    });
    expect(report.llamaServer).toBeNull();
    expect(report.config).toMatchObject({ compare: false, ctx: 1024, parallel: 2, promptTokens: 64, genTokens: 8, repeats: 1 });
    expect(report.figures.map((f) => f.key)).toEqual(["prefill", "decode", "aggregateDecode", "cachedTtft"]);
    for (const f of report.figures) {
      expect(positive(f.mesh)).toBe(true);
      expect(f.llamaServer).toBeNull();
      expect(f.ratio).toBeNull();
      expect(f.pairedRatio).toBeNull();
      expect(f.higherIsBetter).toBe(f.unit === "tok/s");
    }
    const m = report.mesh;
    for (const s of [m.prefillTokensPerSecond, m.decodeTokensPerSecond, m.aggregateDecodeTokensPerSecond, m.cachedTtftMs]) {
      expect(s.samples).toHaveLength(1);
      expect(s.samples.every(positive)).toBe(true);
      expect(s.median).toBe(s.samples[0] as number);
    }
    // The second request of the TTFT figure reused the whole prefix.
    expect(m.cachedTokens).toEqual([128]);
    expect(positive(report.model.sizeBytes)).toBe(true);
    expect(lines.some((l) => l.startsWith("mesh: prefill 1/1"))).toBe(true);
    const table = formatEngineBenchTable(report);
    expect(table).toContain("| figure | mesh | llama-server |");
    expect(table.split("\n").filter((l) => l.startsWith("| ") && !l.startsWith("| ---"))).toHaveLength(5);
  });

  test("paired_ratio_is_the_median_of_per_repeat_ratios_in_mesh_favour", () => {
    // Rates: mesh / llama-server per repeat = 2, 0.5, 1.5 -> median 1.5.
    expect(pairedRatio([200, 50, 150], [100, 100, 100], true)).toBe(1.5);
    // Times: llama-server / mesh.
    expect(pairedRatio([50, 100], [100, 100], false)).toBe(1.5);
    expect(pairedRatio([1, 2], [], true)).toBeNull();
  });

  // llama-server is built only on demand (not in CI); where it exists, check the interleaving.
  test.skipIf(!existsSync(defaultLlamaServerPath()))("compare_keeps_both_loaded_and_alternates_repeats", async () => {
    const lines: string[] = [];
    const report = await runEngineBench({
      model: await ensureModel(TINY),
      threads: 1,
      ctx: 1024,
      parallel: 2,
      promptTokens: 64,
      prefixTokens: 128,
      suffixTokens: 8,
      genTokens: 8,
      repeats: 2,
      onProgress: (s) => lines.push(s),
    });
    const order = lines.filter((l) => / prefill \d\/2:/.test(l)).map((l) => l.slice(0, l.indexOf(":", l.indexOf("prefill"))));
    expect(order).toEqual(["mesh: prefill 1/2", "llama-server: prefill 1/2", "mesh: prefill 2/2", "llama-server: prefill 2/2"]);
    // llama-server was started before either side measured anything.
    expect(lines.findIndex((l) => l.startsWith("llama-server: ready"))).toBeLessThan(lines.findIndex((l) => l.includes("prefill 1/2")));
    for (const f of report.figures) {
      expect(positive(f.llamaServer)).toBe(true);
      expect(positive(f.ratio)).toBe(true);
      expect(positive(f.pairedRatio)).toBe(true);
    }
    expect(report.llamaServer?.cachedTokens).toEqual([128, 128]);
    expect(formatEngineBenchTable(report)).toContain("| paired ratio |");
  });

  test("cli_rejects_a_bad_flag_with_one_line_and_exit_2", () => {
    const r = cli("--bogus");
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stdout).toBe("");
  });

  test("cli_rejects_a_bad_number_with_exit_2", () => {
    const r = cli("--repeats", "zero");
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("--repeats");
  });

  test("cli_missing_llama_server_says_how_to_build_it", () => {
    const r = cli("--model", "tiny", "--llama-server", "/nonexistent/llama-server");
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toContain("bun run build.ts native --with-llama-server");
  });
});
