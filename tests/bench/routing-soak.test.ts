// runSoak is the code behind the routing soak in docs/benchmarks.md. At CI size (3 nodes, 60
// requests/s of 20 000-character prompts for a virtual minute) it must show what keeps memory
// bounded at any size: indexes within their budget, pending changes and timers flat over simulated
// time rather than growing with it, nothing left pending or unresolved once traffic stops, and the
// sync keeping up without overflowing into resyncs. RSS is measured by the command, never here.
import { describe, expect, test } from "bun:test";
import { runSoak, type SoakReport, type SoakSample } from "../../src/bench/routing-soak";

const RUN_TIMEOUT_MS = 300_000;
const BUDGET = 300;

let running: Promise<SoakReport> | null = null;
const soaked = (): Promise<SoakReport> => {
  running ??= runSoak({
    nodes: 3,
    rps: 60,
    promptChars: 20_000,
    warmupS: 10,
    trafficS: 60,
    idleS: 20,
    sampleEveryS: 5,
    rss: false,
    // A dozen 20 000-character sequences fit each engine, and fewer entries than all of them fit each index.
    engine: { kvTokens: 60_000 },
    index: { maxEntriesPerModel: BUDGET },
  });
  return running;
};

const during = (r: SoakReport) => r.samples.filter((s) => s.phase === "traffic");
const top = (xs: SoakSample[], f: (s: SoakSample) => number) => Math.max(...xs.map(f));

describe("routing soak", () => {
  test(
    "indexes_stay_within_budget_and_nothing_grows_with_simulated_time",
    async () => {
      const r = await soaked();
      expect(r.requests).toBe(60 * 70);
      expect(r.rss).toBeNull();
      for (const s of r.samples) expect(s.indexEntries).toBeLessThanOrEqual(BUDGET);
      expect(r.budgetEvictions).toBeGreaterThan(0);
      // The second half of traffic holds no more than the first half did, give or take a request's worth.
      const t = during(r);
      const first = t.slice(0, t.length >> 1);
      const second = t.slice(t.length >> 1);
      for (const f of [(s: SoakSample) => s.pendingOps, (s: SoakSample) => s.ownHashes, (s: SoakSample) => s.engineHashes] as const) {
        expect(top(second, f)).toBeLessThanOrEqual(top(first, f) + 100);
      }
      expect(top(second, (s) => s.timers)).toBeLessThanOrEqual(top(first, (s) => s.timers) + 50);
      // Pending stays well under one batch's worth: the sync keeps up, so it never overflows into full resyncs.
      expect(r.max.pendingOps).toBeLessThan(2000);
      expect(r.sync.pendingOverflows).toBe(0);
      // The budget drops ancestors, so some parents dangle until a path request answers: within the path queues' bound.
      expect(r.max.unresolved).toBeLessThanOrEqual(2 * 256);
    },
    RUN_TIMEOUT_MS,
  );

  test(
    "prefixes_cached_and_evicted_between_rounds_cost_no_sync_bytes_and_an_idle_mesh_settles",
    async () => {
      const r = await soaked();
      // Many prompts are evicted again before the next round: their inserts and evictions cancel out, and
      // no eviction goes out for an insert that never did.
      expect(r.sync.cancelled).toBeGreaterThan(0.5 * r.sync.insertsSent);
      expect(r.sync.evictsSent).toBeLessThanOrEqual(r.sync.insertsSent);
      const end = r.samples[r.samples.length - 1] as SoakSample;
      expect(end.phase).toBe("idle");
      expect(end.pendingOps).toBe(0);
      expect(end.unresolved).toBe(0);
    },
    RUN_TIMEOUT_MS,
  );
});
