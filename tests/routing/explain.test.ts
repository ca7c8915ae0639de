import { describe, expect, test } from "bun:test";
import type { WorkerInfo } from "../../src/mesh/wire";
import { explain, MAX_EXPLAINED, predictionOutcome } from "../../src/routing/explain";
import { type Candidate, decide, POLICY_DEFAULTS } from "../../src/routing/policy";
import { workerRecord } from "../helpers/mesh";

const w = (id: string, o: Partial<WorkerInfo> = {}): WorkerInfo =>
  workerRecord({ id, nodeId: `node-${id}`, addr: `127.0.0.1:${1000 + id.length}`, models: ["m"], slotsTotal: 4, ...o });
const cand = (worker: WorkerInfo, o: Partial<Candidate> = {}): Candidate => ({
  worker,
  local: false,
  inflight: 0,
  depth: 0,
  via: null,
  leased: false,
  rttMs: null,
  ...o,
});
const req = { chars: 40_000, ends: Array.from({ length: 40 }, (_, i) => (i + 1) * 1000) };

describe("route explanation", () => {
  test("names_the_winner_first_with_its_predicted_prefix_and_says_why_each_other_lost", () => {
    const d = decide(req, [
      cand(w("a"), { local: true }),
      cand(w("b"), { depth: 30, via: "index" }),
      cand(w("c", { slotsBusy: 12 }), { depth: 35, via: "index" }),
    ]);
    if (!d) throw new Error("no decision");
    const e = explain(d, POLICY_DEFAULTS);
    expect(e.reason).toBe("cache");
    expect(e.candidates[0]?.node).toBe("node-b");
    expect(e.candidates[0]?.won).toBe(true);
    expect(e.candidates[0]?.predictedCachedTokens).toBe(7500);
    expect(e.predictedCachedTokens).toBe(7500);
    expect(e.candidates[0]?.why).toContain("holds 7500 prompt tokens");
    const c = e.candidates.find((x) => x.node === "node-c");
    expect(c?.gated).toBe(true);
    expect(c?.why).toContain("overloaded");
    const a = e.candidates.find((x) => x.node === "node-a");
    expect(a?.won).toBe(false);
    expect(a?.why).toContain("slower to the first token");
    // The figures are the decision's own, not recomputed.
    expect(e.candidates.map((x) => x.costMs)).toEqual(d.ranked.map((x) => Math.round(x.costMs * 100) / 100));
  });

  test("keeps_at_most_the_top_candidates_and_counts_the_rest_however_large_the_mesh", () => {
    const many = Array.from({ length: 200 }, (_, i) => cand(w(`n${i}`, { slotsBusy: i % 4 })));
    const d = decide(req, many);
    if (!d) throw new Error("no decision");
    const e = explain(d, POLICY_DEFAULTS);
    expect(e.candidates).toHaveLength(MAX_EXPLAINED);
    expect(e.omitted).toBe(200 - MAX_EXPLAINED);
    expect(e.candidates[0]?.won).toBe(true);
  });

  test("a_prefix_below_the_minimum_is_said_to_be_too_short", () => {
    const d = decide(req, [cand(w("a"), { local: true }), cand(w("b"), { depth: 0 }), cand(w("c"), { depth: 1, via: "index" })], {
      ...POLICY_DEFAULTS,
      minMatchTokens: 1000,
    });
    if (!d) throw new Error("no decision");
    const e = explain(d, { ...POLICY_DEFAULTS, minMatchTokens: 1000 });
    expect(e.reason).toBe("load");
    expect(e.candidates.find((x) => x.node === "node-c")?.why).toContain("below the 1000-token minimum");
  });

  test("a_single_candidate_is_the_only_one", () => {
    const d = decide(req, [cand(w("a"), { local: true })]);
    if (!d) throw new Error("no decision");
    expect(explain(d, POLICY_DEFAULTS).candidates[0]?.why).toBe("the only node serving the model");
  });

  test("prediction_agrees_within_a_quarter_and_is_short_when_the_cache_was_gone", () => {
    expect(predictionOutcome(252, 231)).toBe("agree");
    expect(predictionOutcome(0, 10)).toBe("agree");
    expect(predictionOutcome(400, 0)).toBe("short");
    expect(predictionOutcome(100, 300)).toBe("more");
  });
});
