// The decision benchmark's figures are in docs/benchmarks.md; here only what it reports, at CI size (never a time).
import { describe, expect, test } from "bun:test";
import { formatDecisionReport, runDecisionBench } from "../../src/bench/routing-decision";

describe("routing decision benchmark", () => {
  test("reports_every_kind_of_request_before_and_after_filling_the_index", () => {
    const r = runDecisionBench({ fill: 3000, samples: 200, workers: 4, seed: 1 });
    expect(r.promptChars).toBeGreaterThanOrEqual(80_000);
    expect(r.blocks).toBeGreaterThan(40);
    expect(r.many.indexedPrompts).toBe(r.few.indexedPrompts + 3000);
    expect(r.many.indexEntries).toBeGreaterThan(r.few.indexEntries);
    for (const f of [r.few, r.many]) {
      for (const l of [f.cold, f.newTask, f.followUp]) {
        expect(l.p50Us).toBeGreaterThan(0);
        expect(l.p99Us).toBeGreaterThanOrEqual(l.p50Us);
        expect(l.maxUs).toBeGreaterThanOrEqual(l.p99Us);
        expect(l.keyP50Us).toBeGreaterThan(0);
      }
    }
    const table = formatDecisionReport(r);
    expect(table.split("\n").filter((l) => l.startsWith("| few") || l.startsWith("| many"))).toHaveLength(6);
  });
});
