import { describe, expect, test } from "bun:test";
import { failureDetectionBoundMs, MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { SimNetwork, SimTimeout, VirtualClock } from "../../src/mesh/sim";
import { SimCluster } from "../../src/mesh/sim-cluster";
import { meshOf, spec } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;
// A hundred cores in one process take 5-20 wall seconds on a 2-core machine (more when it is shared):
// past bun's 5 s default (`npm test` passes --timeout; `bun test` on this file alone does not).
const SIM_100_TIMEOUT_MS = 120_000;
// Ten cores for 100 virtual rounds: under a second alone, a few on a loaded machine.
const SIM_10_TIMEOUT_MS = 30_000;

describe("virtual clock", () => {
  test("runs_timers_in_time_order_and_skips_cancelled_ones", async () => {
    const clock = new VirtualClock(0);
    const seen: string[] = [];
    clock.setTimer(() => seen.push("b"), 20);
    clock.setTimer(() => seen.push("a"), 10);
    const gone = clock.setTimer(() => seen.push("never"), 15);
    clock.setTimer(() => clock.setTimer(() => seen.push("c"), 5), 20);
    clock.clearTimer(gone);
    await clock.advance(100);
    expect(seen).toEqual(["a", "b", "c"]);
    expect(clock.now()).toBe(100);
    expect(clock.pending).toBe(0);
  });

  test("lets_promise_chains_woken_by_a_timer_finish_before_time_moves_on", async () => {
    const clock = new VirtualClock(0);
    let at = -1;
    const sleep = (ms: number) => new Promise<void>((r) => clock.setTimer(r, ms));
    void (async () => {
      await sleep(10);
      await Promise.resolve();
      await sleep(10);
      at = clock.now();
    })();
    await clock.advance(50);
    expect(at).toBe(20);
  });
});

describe("simulated network", () => {
  test("delivers_replies_and_times_out_on_loss_kill_and_partition", async () => {
    const clock = new VirtualClock(0);
    const net = new SimNetwork(clock, { latencyMs: [1, 1] });
    net.listen("b:1", async (msg) => ({ type: "echo", got: msg.type }));
    const t = net.transport("a:1");
    const call = async () => {
      const p = t.request("b:1", { type: "hi" }, 100).then(
        (r) => r,
        (e) => e,
      );
      await clock.advance(200);
      return p;
    };
    expect(await call()).toEqual({ type: "echo", got: "hi" });
    net.partition([["a:1"], ["b:1"]]);
    expect(await call()).toBeInstanceOf(SimTimeout);
    net.heal();
    net.kill("b:1");
    expect(await call()).toBeInstanceOf(SimTimeout);
    net.listen("b:1", async () => ({ type: "back" }));
    net.cutLink("b:1", "a:1");
    // The request arrives, the reply does not.
    expect(await call()).toBeInstanceOf(SimTimeout);
    net.restoreLinks();
    expect(((await call()) as { type: string }).type).toBe("back");
    expect(net.sent.get("a:1")).toBeGreaterThan(0);
  });
});

describe("simulated mesh", () => {
  test(
    "a_100_node_mesh_converges_and_detects_a_failure_within_the_bound",
    async () => {
      const c = new SimCluster({ seed: 3, network: { latencyMs: [1, 20] } });
      const names = Array.from({ length: 100 }, (_, i) => `n${i}`);
      for (const n of names) c.add(n);
      const seeds = names.slice(0, 3).map((n) => c.node(n).addr);
      for (const n of names.slice(1)) void c.node(n).core.join(seeds.filter((s) => s !== c.node(n).addr));
      for (const n of names) c.node(n).core.workers.register(spec(n));
      const formed = await c.clock.until(
        () => c.converged() && names.every((n) => c.node(n).core.workers.list().length === 100),
        120 * ROUND,
        ROUND,
      );
      expect(formed).not.toBeNull();
      // Timers stay bounded: a few periodic ones per node plus messages in flight.
      expect(c.clock.pending).toBeLessThan(100 * 20);
      c.kill("n42");
      const observers = names.filter((n) => n !== "n42");
      const took = await c.clock.until(() => c.allSee("n42", "dead", observers), failureDetectionBoundMs(100), ROUND / 2);
      expect(took).not.toBeNull();
      expect(
        await c.clock.until(() => observers.every((n) => c.node(n).core.workers.routable("model-n42").length === 0), 5 * ROUND),
      ).not.toBeNull();
    },
    SIM_100_TIMEOUT_MS,
  );

  test(
    "quiet_mesh_traffic_per_node_and_round_is_small_and_flat",
    async () => {
      const names = Array.from({ length: 10 }, (_, i) => `q${i}`);
      const c = await meshOf(names);
      await c.clock.advance(60 * ROUND);
      c.net.resetCounters();
      await c.clock.advance(20 * ROUND);
      const first = names.map((n) => c.net.sent.get(c.node(n).addr) ?? 0);
      c.net.resetCounters();
      await c.clock.advance(20 * ROUND);
      const second = names.map((n) => c.net.sent.get(c.node(n).addr) ?? 0);
      // Probes, acks and empty store pulls only: about a kilobyte and a half per node and round, not growing.
      for (const b of [...first, ...second]) expect(b / 20).toBeLessThan(4000);
      const sum = (xs: number[]) => xs.reduce((s, x) => s + x, 0);
      expect(sum(second)).toBeLessThan(sum(first) * 1.5);
    },
    SIM_10_TIMEOUT_MS,
  );
});
