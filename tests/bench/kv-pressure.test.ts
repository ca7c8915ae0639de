// A short `mesh bench kv-pressure` run on the tiny model: the bench starts a
// real mesh node (a separate process on 127.0.0.1), drives overlapping loops
// against it and writes its report. Asserts the report's structure, that the
// run really put the KV pool under pressure, and that no request failed;
// never how fast anything was.
import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BenchUsageError } from "../../src/bench/engine";
import { type KvPressureReport, resolveKvPressureOptions, runKvPressure } from "../../src/bench/kv-pressure";
import { xmlProblems } from "../helpers/xml";

describe("mesh bench kv-pressure", () => {
  test("tiny_run_puts_the_pool_under_pressure_and_writes_a_complete_report_with_no_failures", async () => {
    const out = mkdtempSync(join(tmpdir(), "mesh-kvp-"));
    try {
      const lines: string[] = [];
      // The --tiny preset itself (what CI runs), on one thread.
      const { report, outDir } = await runKvPressure({ tiny: true, threads: 1, out, onProgress: (l) => lines.push(l) });
      expect(outDir).toBe(out);
      expect(lines.some((l) => l.startsWith("mesh: ready at http://127.0.0.1:"))).toBe(true);

      const json = JSON.parse(readFileSync(join(out, "summary.json"), "utf8")) as KvPressureReport;
      expect(json).toEqual(JSON.parse(JSON.stringify(report)));
      expect(json).toMatchObject({ kind: "mesh-bench-kv-pressure", version: 1, order: "sequential" });
      expect(json.config).toMatchObject({ ctxSize: 1024, parallel: 2, threads: 1, tiny: true, compare: null, url: null });
      expect(json.config.workload).toMatchObject({ loops: 3, turns: 2, staggerMs: 0, maxTokens: 8 });
      expect(json.config.modelPath).toEndWith("mesh-tiny.gguf");
      expect(json.targets).toHaveLength(1);

      const t = json.targets[0];
      if (!t) throw new Error("no target");
      expect(t).toMatchObject({
        name: "mesh",
        model: "mesh-tiny",
        requests: 9,
        successes: 9,
        status5xx: 0,
        status4xx: 0,
        transportErrors: 0,
      });
      expect(t.decodeFailures.client).toBe(0);
      expect(t.decodeFailures.server).toBe(0);
      expect(t.gaveUpAfter429).toBe(0);
      expect(t.probePromptTokens).toBeGreaterThan(0);
      expect(t.e2eMs.n).toBe(9);
      expect(t.e2eMs.p50).toBeGreaterThan(0);
      expect(t.e2eMs.p95 as number).toBeGreaterThanOrEqual(t.e2eMs.p50 as number);
      expect(t.ttftMs.n).toBe(t.records.filter((r) => r.stream).length);
      expect(t.cachedByTurn.map((c) => c.turn)).toEqual([0, 1]);
      for (const c of t.cachedByTurn) {
        expect(c.requests).toBe(3);
        expect(c.ratio).not.toBeNull();
        expect(c.cachedTokens).toBeLessThanOrEqual(c.promptTokens);
      }
      expect(t.cachedRatio).not.toBeNull();
      expect(t.exactRepeat.attempts).toBe(3);
      expect(t.exactRepeat.suffixPrefill).toHaveLength(3);
      expect(t.samePrefixReuse.minTokens).toBe(128);
      expect(t.kvCellsTotal).toBe(1024);
      expect(t.samples.length).toBeGreaterThan(0);
      expect(t.samples.some((s) => s.kv !== null)).toBe(true);
      // The pool is the node's mesh_kv_cells_total, whatever is reserved at the moment.
      for (const s of t.samples) if (s.kv) expect(s.kv.total).toBe(1024);

      // Pressure by construction: a second turn's reservation (prompt + max_tokens)
      // plus the smallest request's does not fit the pool, so those never run together.
      const reservations = t.records.map((r) => (r.usage?.promptTokens ?? 0) + 8);
      const smallest = Math.min(...reservations);
      for (const r of t.records.filter((x) => x.kind === "turn" && x.turn === 1)) {
        expect((r.usage?.promptTokens ?? 0) + 8 + smallest).toBeGreaterThan(1024);
      }
      // And it happened: requests waited (3 loops on 2 slots would queue for a slot
      // alone), and idle prefixes were evicted, which the engine does only when a
      // reservation does not fit the free cells.
      expect(t.admissions.queued as number).toBeGreaterThan(0);
      expect(t.evictions.count as number).toBeGreaterThan(0);
      expect(t.admissions.rejected).toBe(0);
      for (const r of t.records) {
        expect(r.ok).toBe(true);
        expect(r.usage?.completionTokens).toBe(8);
      }

      const md = readFileSync(join(out, "summary.md"), "utf8");
      expect(md).toStartWith("# mesh bench kv-pressure");
      expect(md).toContain("| figure | mesh |");
      expect(md).toContain("## Cached-token ratio per turn");
      expect(md).toContain("(chart.svg)");
      const svg = readFileSync(join(out, "chart.svg"), "utf8");
      expect(xmlProblems(svg)).toEqual([]);
      expect(svg).toContain("<polygon");
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  test("impossible_options_are_usage_errors_and_start_nothing", () => {
    const out = join(tmpdir(), `mesh-kvp-never-${process.pid}`);
    const bad = [
      { loops: 0 },
      { ctxSize: 100 },
      { compare: "vllm" as "llama-server" },
      { url: "localhost:9337" },
      { url: "http://127.0.0.1:9", compare: "llama-server" as const },
      { apiKey: " " },
      { turns: 1000 },
    ];
    for (const o of bad) expect(() => resolveKvPressureOptions({ ...o, out })).toThrow(BenchUsageError);
    expect(existsSync(out)).toBe(false);
  });

  test("defaults_follow_the_issue_and_tiny_is_ci_sized", () => {
    const d = resolveKvPressureOptions({});
    expect(d).toMatchObject({ model: "bench", ctxSize: 8192, parallel: 4, compare: null, url: null });
    expect(d.workload.loops).toBe(8);
    expect(d.workload.turns).toBeGreaterThanOrEqual(4);
    expect(d.out).toMatch(/^bench-out\/kv-pressure-\d{8}-\d{6}$/);
    const t = resolveKvPressureOptions({ tiny: true, loops: 5 });
    expect(t).toMatchObject({ model: "tiny", ctxSize: 1024, parallel: 2 });
    expect(t.workload.loops).toBe(5);
    const tiny = resolveKvPressureOptions({ tiny: true });
    // More loops than slots, all started at once.
    expect(tiny.workload.loops).toBeGreaterThan(tiny.parallel);
    expect(tiny.workload.staggerMs).toBe(0);
    expect(resolveKvPressureOptions({ url: "http://127.0.0.1:9337/v1/" }).url).toBe("http://127.0.0.1:9337");
  });
});
