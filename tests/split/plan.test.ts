import { describe, expect, test } from "bun:test";
import { assignSlots, DEFAULT_MAX_RTT_MS, parseSplitWant, planSplit, type SplitPlan, splitWeights } from "../../src/split/plan";

const MiB = 1024 * 1024;
const model = { nLayer: 23, layerBytes: 10 * MiB }; // 24 slots, 240 MiB

describe("parseSplitWant", () => {
  test("reads_auto_counts_and_node_lists_and_refuses_the_rest", () => {
    expect(parseSplitWant("")).toEqual({ kind: "auto" });
    expect(parseSplitWant("auto")).toEqual({ kind: "auto" });
    expect(parseSplitWant("3")).toEqual({ kind: "count", nodes: 3 });
    expect(parseSplitWant("ab12,cd34")).toEqual({ kind: "nodes", ids: ["ab12", "cd34"] });
    for (const bad of ["1", "0", "18", "a,a", "a b", "a,,b", "x/y"]) expect(parseSplitWant(bad)).toBeNull();
  });
});

describe("planSplit", () => {
  test("splits_layers_in_proportion_to_lent_memory_head_first", () => {
    const p = planSplit({
      model,
      headId: "head",
      headBudgetBytes: 100 * MiB,
      candidates: [{ nodeId: "b", budgetBytes: 200 * MiB, rttMs: 1 }],
      want: { kind: "count", nodes: 2 },
    }) as SplitPlan;
    expect(p.stages.map((s) => [s.nodeId, s.role, s.firstLayer, s.layers])).toEqual([
      ["head", "head", 0, 8],
      ["b", "stage", 8, 16],
    ]);
    expect(p.stages.reduce((a, s) => a + s.layers, 0)).toBe(24);
    expect(splitWeights(p)).toEqual([16]);
  });

  test("refuses_peers_over_the_rtt_bound_and_says_why", () => {
    const r = planSplit({
      model,
      headId: "head",
      headBudgetBytes: 1000 * MiB,
      candidates: [
        { nodeId: "far", budgetBytes: 1000 * MiB, rttMs: DEFAULT_MAX_RTT_MS + 1 },
        { nodeId: "near", budgetBytes: 1000 * MiB, rttMs: 2 },
      ],
      want: { kind: "auto" },
    }) as SplitPlan;
    expect(r.stages.map((s) => s.nodeId)).toEqual(["head", "near"]);
    expect(r.refused.find((x) => x.nodeId === "far")?.reason).toContain("over the 50 ms bound");
    const only = planSplit({
      model,
      headId: "head",
      headBudgetBytes: 0,
      candidates: [{ nodeId: "far", budgetBytes: 1e12, rttMs: 80 }],
      want: { kind: "nodes", ids: ["far"] },
    });
    expect(only).toMatchObject({ code: "split_unplannable" });
    expect((only as { message: string }).message).toContain("80.0 ms");
  });

  test("auto_takes_the_fewest_nearest_peers_that_hold_the_model", () => {
    const p = planSplit({
      model,
      headId: "head",
      headBudgetBytes: 50 * MiB,
      candidates: [
        { nodeId: "c", budgetBytes: 100 * MiB, rttMs: 3 },
        { nodeId: "b", budgetBytes: 100 * MiB, rttMs: 1 },
        { nodeId: "d", budgetBytes: 100 * MiB, rttMs: 9 },
      ],
      want: { kind: "auto" },
    }) as SplitPlan;
    expect(p.stages.map((s) => s.nodeId)).toEqual(["head", "b", "c"]);
    for (const s of p.stages) expect(s.bytes).toBeLessThanOrEqual(s.role === "head" ? 50 * MiB : 100 * MiB);
    expect(p.refused).toEqual([{ nodeId: "d", reason: "not needed for this split" }]);
  });

  test("fails_with_a_value_when_memory_is_short_or_peers_are_missing", () => {
    const short = planSplit({
      model,
      headId: "h",
      headBudgetBytes: 10 * MiB,
      candidates: [{ nodeId: "b", budgetBytes: 20 * MiB, rttMs: 1 }],
      want: { kind: "auto" },
    });
    expect(short).toMatchObject({ code: "split_unplannable" });
    expect((short as { message: string }).message).toContain("240 MiB");
    const few = planSplit({
      model,
      headId: "h",
      headBudgetBytes: 1e12,
      candidates: [{ nodeId: "b", budgetBytes: 1e12, rttMs: null, unreachable: "auth failed" }],
      want: { kind: "count", nodes: 2 },
    });
    expect((few as { message: string }).message).toContain("b: auth failed");
    const unknown = planSplit({ model, headId: "h", headBudgetBytes: 1e12, candidates: [], want: { kind: "nodes", ids: ["zz"] } });
    expect((unknown as { message: string }).message).toContain("--offer-stage");
  });

  test("names_peers_by_id_prefix_in_the_order_given", () => {
    const p = planSplit({
      model,
      headId: "h",
      headBudgetBytes: 1e12,
      candidates: [
        { nodeId: "aaaa1111", budgetBytes: 1e12, rttMs: 1 },
        { nodeId: "bbbb2222", budgetBytes: 1e12, rttMs: 2 },
      ],
      want: { kind: "nodes", ids: ["bbbb", "aaaa"] },
    }) as SplitPlan;
    expect(p.stages.map((s) => s.nodeId)).toEqual(["h", "bbbb2222", "aaaa1111"]);
    expect(p.stages.map((s) => s.layers)).toEqual([8, 8, 8]);
  });
});

describe("assignSlots", () => {
  test("gives_every_node_at_least_one_and_never_more_than_it_holds", () => {
    expect(assignSlots(3, [1, 1, 1])).toEqual([1, 1, 1]);
    expect(assignSlots(3, [100, 1, 1])).toEqual([1, 1, 1]);
    expect(assignSlots(10, [1, 100])).toEqual([1, 9]);
    expect(assignSlots(4, [1, 1, 1])).toBeNull();
    expect(assignSlots(2, [5, 5, 5])).toBeNull();
    for (let caps = 1; caps < 40; caps++) {
      const c = [caps, 7, 40 - caps];
      const a = assignSlots(24, c);
      if (a) {
        expect(a.reduce((x, y) => x + y, 0)).toBe(24);
        a.forEach((v, i) => {
          expect(v).toBeGreaterThanOrEqual(1);
          expect(v).toBeLessThanOrEqual(c[i] as number);
        });
      }
    }
  });
});
