import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BenchUsageError } from "../../src/bench/engine";
import { growthOf, resolveSoakOptions, runSoak, type SoakReport } from "../../src/bench/soak";
import { renderSoakChart } from "../../src/bench/soak-report";
import { xmlProblems } from "../helpers/xml";

describe("mesh bench soak", () => {
  test("options_out_of_range_or_a_missing_model_are_refused_before_anything_starts", () => {
    expect(() => resolveSoakOptions({ nodes: 1 })).toThrow(BenchUsageError);
    expect(() => resolveSoakOptions({ durationS: 0 })).toThrow("--duration");
    expect(() => resolveSoakOptions({ model: "/nonexistent/model.gguf" })).toThrow("model not found");
    const c = resolveSoakOptions();
    expect([c.nodes, c.durationS, c.killEveryS, c.rssGrowthMiB]).toEqual([3, 600, 60, 128]);
  });

  test("rss_growth_is_measured_per_node_process_from_after_its_warm_up", () => {
    const rss = [
      { tS: 0, node: "node-1", life: 0, rssMiB: 50 },
      { tS: 35, node: "node-1", life: 0, rssMiB: 100 },
      { tS: 90, node: "node-1", life: 0, rssMiB: 130 },
      { tS: 95, node: "node-1", life: 1, rssMiB: 60 },
      { tS: 100, node: "node-1", life: 1, rssMiB: 70 },
    ];
    expect(growthOf(rss)).toEqual([
      { node: "node-1", life: 0, fromMiB: 100, toMiB: 130, growthMiB: 30 },
      { node: "node-1", life: 1, fromMiB: 60, toMiB: 70, growthMiB: 10 },
    ]);
  });

  test("a_short_soak_with_kills_passes_and_writes_its_summary_and_chart", async () => {
    const out = mkdtempSync(join(tmpdir(), "mesh-soak-"));
    try {
      // CI-sized: about 30 s on an idle 2-core machine, two kills and restarts.
      const { report } = await runSoak({ durationS: 20, killEveryS: 8, out });
      expect(report.failures).toEqual([]);
      expect(report.passed).toBe(true);
      expect(report.kills.length).toBeGreaterThanOrEqual(1);
      expect(report.kills.every((k) => k.readyS !== null)).toBe(true);
      expect(report.counts.ok).toBeGreaterThan(0);
      expect(new Set(report.rss.map((s) => s.node)).size).toBe(3);
      const summary = JSON.parse(readFileSync(join(out, "summary.json"), "utf8")) as SoakReport;
      expect(summary.counts).toEqual(report.counts);
      expect(existsSync(join(out, "rss.svg"))).toBe(true);
      expect(xmlProblems(readFileSync(join(out, "rss.svg"), "utf8"))).toEqual([]);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 240_000);

  test("the_chart_is_well_formed_with_no_samples_and_escapes_names", () => {
    const r = { elapsedS: 0, kills: [], rss: [{ tS: 1, node: "a<b", life: 0, rssMiB: 10 }] } as unknown as SoakReport;
    expect(xmlProblems(renderSoakChart(r))).toEqual([]);
    expect(xmlProblems(renderSoakChart({ ...r, rss: [] }))).toEqual([]);
  });
});
