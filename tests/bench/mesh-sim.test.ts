// runMeshSim is the code behind the mesh figures in docs/benchmarks.md: a report with a NaN, a
// zero where time must have passed, or detection past the bound it prints would publish nonsense.
import { describe, expect, test } from "bun:test";
import { type MeshSimReport, runMeshSim } from "../../src/bench/mesh-sim";
import { failureDetectionBoundMs, MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";

// Ten cores for a few hundred virtual rounds: well under a second alone, a few seconds on a loaded machine.
const RUN_TIMEOUT_MS = 60_000;

/** Every number in the report, by its path, e.g. ["steadyBytesPerNodeRound.max", 1194]. */
function numbers(v: unknown, path = ""): Array<[string, unknown]> {
  if (Array.isArray(v)) return v.flatMap((x, i) => numbers(x, `${path}[${i}]`));
  if (typeof v === "object" && v !== null) return Object.entries(v).flatMap(([k, x]) => numbers(x, path ? `${path}.${k}` : k));
  return [[path, v]];
}

function expectSane(r: MeshSimReport, loss: number): void {
  for (const [path, v] of numbers(r)) {
    // The path goes into the message, so a failure names the field.
    expect({ path, finite: typeof v === "number" && Number.isFinite(v) && v >= 0 }).toEqual({ path, finite: true });
  }
  expect(r.nodes).toBe(10);
  expect(r.loss).toBe(loss);
  expect(r.roundMs).toBe(MEMBERSHIP_DEFAULTS.roundMs);
  expect(r.latencyMs[0]).toBeGreaterThan(0);
  expect(r.latencyMs[1]).toBeGreaterThanOrEqual(r.latencyMs[0]);
  // Every measured interval spans at least one simulated message, so none can be zero.
  for (const f of [
    "formMs",
    "joinReachMs",
    "joinWorkerMs",
    "firstSuspectMs",
    "detectAllDeadMs",
    "workerGoneMs",
    "detectBoundMs",
  ] as const) {
    expect({ f, positive: r[f] > 0 }).toEqual({ f, positive: true });
  }
  for (const b of [r.steadyBytesPerNodeRound, r.churnBytesPerNodeRound]) {
    expect(b.mean).toBeGreaterThan(0);
    expect(b.max).toBeGreaterThanOrEqual(b.mean);
  }
  // The events it times happen in this order, each measured from the same start.
  expect(r.firstSuspectMs).toBeLessThanOrEqual(r.detectAllDeadMs);
  expect(r.detectAllDeadMs).toBeLessThanOrEqual(r.workerGoneMs);
  expect(r.joinReachMs).toBeLessThanOrEqual(r.joinWorkerMs);
  // A false death left at the end would be a member the mesh never healed.
  expect(r.falseDeaths).toBe(0);
}

describe("mesh simulation benchmark", () => {
  test(
    "a_ten_node_run_reports_finite_positive_figures_and_detects_within_its_stated_bound",
    async () => {
      const r = await runMeshSim({ nodes: 10, loss: 0, seed: 1 });
      expectSane(r, 0);
      expect(r.detectBoundMs).toBe(failureDetectionBoundMs(10));
      // The bound is stated for a lossless network, which this run is.
      expect(r.detectAllDeadMs).toBeLessThanOrEqual(r.detectBoundMs);
      // Nothing is lost and one-way latency (20 ms at most) is far below the 400 ms probe timeout: a suspicion of a live node is a bug.
      expect(r.refutations).toBe(0);
      // A quiet round is one probe, its ack and an empty store pull per node: about a kilobyte, not tens.
      expect(r.steadyBytesPerNodeRound.max).toBeLessThan(4000);
    },
    RUN_TIMEOUT_MS,
  );

  test(
    "a_lossy_run_still_finishes_with_sane_figures_and_no_false_deaths",
    async () => {
      const r = await runMeshSim({ nodes: 10, loss: 0.05, seed: 2 });
      expectSane(r, 0.05);
    },
    RUN_TIMEOUT_MS,
  );
});
