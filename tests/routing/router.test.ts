import { describe, expect, test } from "bun:test";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type KeyMessage, RECORD_LAG_MS, RouteKeyer, Router } from "../../src/routing";
import { Leases } from "../../src/routing/lease";
import { workerRecord } from "../helpers/mesh";

const keyer = new RouteKeyer("a mesh secret of at least thirty-two characters");
const w = (node: string, o: Partial<WorkerInfo> = {}) =>
  workerRecord({ id: `w-${node}`, nodeId: node, addr: `${node}:9337`, models: ["m"], slotsTotal: 4, ...o });
const sys: KeyMessage = { role: "system", content: "s".repeat(4000) };
const turn1: KeyMessage[] = [sys, { role: "user", content: "u".repeat(2000) }];
const reply: KeyMessage = { role: "assistant", content: "a".repeat(500) };
const turn2: KeyMessage[] = [...turn1, reply, { role: "user", content: "next" }];

/** Report, as node `node`'s engine would through the sync, that it holds the whole of `key` + reply. */
function holds(r: Router, node: string, msgs: KeyMessage[]) {
  const k = keyer.chat("m", msgs);
  r.index
    .model("m")
    .insertPath(node, [
      ...k.hashes.map((h, i): [string, string | null] => [h, i ? (k.hashes[i - 1] as string) : null]),
      ...keyer.extend(k, reply),
    ]);
}

describe("router", () => {
  test("a_follow_up_goes_to_the_node_whose_engine_holds_its_prefix", () => {
    let now = 0;
    const r = new Router({ selfId: "A", workers: () => [w("A"), w("B"), w("C")], now: () => now });
    holds(r, "B", turn1);
    now += 60_000;
    const d = r.decide("m", keyer.chat("m", turn2));
    expect(d?.target.worker.nodeId).toBe("B");
    expect(d?.reason).toBe("cache");
    expect(d?.target.via).toBe("index");
    expect(r.stats().toPeer).toBe(1);
  });

  test("this_nodes_own_engine_reports_make_it_a_holder", () => {
    const r = new Router({ selfId: "A", workers: () => [w("A", { slotsBusy: 3 }), w("B")] });
    const k = keyer.chat("m", turn1);
    r.onTenancy("m", { inserts: k.hashes.map((h, i) => [h, i ? (k.hashes[i - 1] as string) : null]), evicts: [] });
    expect(r.decide("m", keyer.chat("m", turn2))?.target.worker.nodeId).toBe("A");
    r.onTenancy("m", { inserts: [], evicts: [...k.hashes].reverse() });
    expect(r.index.model("m").stats().entries).toBe(0);
  });

  test("the_lease_bridges_the_rounds_before_the_engine_reports", () => {
    let now = 0;
    const load = new Map([["B", 0]]);
    const r = new Router({ selfId: "A", workers: () => [w("A", { slotsBusy: 2 }), w("B", { slotsBusy: load.get("B") })], now: () => now });
    // Turn 1 goes to B by load; B becomes as busy as A before turn 2, and has reported nothing yet.
    expect(r.decide("m", keyer.chat("m", turn1))?.target.worker.nodeId).toBe("B");
    load.set("B", 2);
    now += 2000;
    const d = r.decide("m", keyer.chat("m", turn2));
    expect(d?.target.worker.nodeId).toBe("B");
    expect(d?.target.via).toBe("lease");
    // After the lease runs out, with nothing in the index, it is a plain load decision again (A: no hop).
    now += 60_000;
    expect(r.decide("m", keyer.chat("m", turn2))?.target.worker.nodeId).toBe("A");
  });

  test("load_mode_ignores_what_the_engines_hold", () => {
    const r = new Router({ selfId: "A", mode: "load", workers: () => [w("A"), w("B")] });
    holds(r, "B", turn1);
    const d = r.decide("m", keyer.chat("m", turn2));
    expect(d?.target.worker.nodeId).toBe("A");
    expect(d?.reason).toBe("load");
  });

  test("a_model_nobody_serves_or_only_unready_workers_is_null", () => {
    const r = new Router({ selfId: "A", workers: () => [w("B", { health: "loading" })] });
    expect(r.decide("m", keyer.chat("m", turn1))).toBeNull();
    expect(r.decide("other", keyer.chat("other", turn1))).toBeNull();
  });

  test("unfinished_requests_count_towards_a_workers_load", () => {
    const r = new Router({ selfId: "X", workers: () => [w("A"), w("B")] });
    const picks: string[] = [];
    for (let i = 0; i < 4; i++) {
      const d = r.decide("m", keyer.chat("m", [{ role: "user", content: `q${i}` }]));
      picks.push(d?.target.worker.nodeId as string);
      r.begin(d?.target.worker.id as string);
    }
    expect(picks.sort()).toEqual(["A", "A", "B", "B"]);
    for (const id of ["w-A", "w-A", "w-B", "w-B"]) r.end(id);
    expect(r.inflightOf("w-A")).toBe(0);
  });

  test("a_request_counts_towards_load_only_until_the_workers_figures_can_show_it_regression_double_count", () => {
    let now = 0;
    const r = new Router({ selfId: "A", workers: () => [w("A", { slotsBusy: 1 })], now: () => now });
    r.begin("w-A");
    expect(r.inflightOf("w-A")).toBe(1);
    // The node's own figures include it after a publish: counting it on top would count it twice.
    now += RECORD_LAG_MS + 1;
    expect(r.inflightOf("w-A")).toBe(0);
    expect(r.unfinished("w-A")).toBe(1);
    r.end("w-A");
    expect(r.unfinished("w-A")).toBe(0);
  });

  test("observations_refine_the_speed_estimates", () => {
    const r = new Router({ selfId: "A", workers: () => [] });
    const before = r.policyFor("m");
    for (let i = 0; i < 30; i++) r.observe("m", { chars: 3000, promptTokens: 1000, cachedTokens: 0, prefillMs: 5000, serviceMs: 9000 });
    const after = r.policyFor("m");
    expect(after.charsPerToken).toBeCloseTo(3, 1);
    expect(after.prefillMsPerToken).toBeCloseTo(5, 1);
    expect(after.serviceMs).toBeGreaterThan(before.serviceMs);
    expect(r.policyFor("other")).toEqual(before);
  });
});

describe("leases", () => {
  test("the_longest_live_lease_wins_and_expired_ones_go", () => {
    const l = new Leases(1000, 10);
    l.set([1n, 2n], "N1", 0);
    l.set([1n, 2n, 3n, 4n], "N2", 500);
    expect(l.longest([1n, 2n, 3n, 4n, 5n], 900)).toEqual({ node: "N2", depth: 4 });
    expect(l.longest([1n, 2n, 3n, 4n, 5n], 1200)).toEqual({ node: "N2", depth: 4 });
    expect(l.longest([1n, 2n, 9n], 1200)).toBeNull();
    expect(l.longest([1n, 2n, 3n, 4n], 1600)).toBeNull();
  });

  test("leases_are_bounded", () => {
    const l = new Leases(60_000, 100);
    for (let i = 0; i < 1000; i++) l.set([BigInt(i)], "N", 0);
    expect(l.size).toBe(100);
    expect(l.longest([999n], 1)).toEqual({ node: "N", depth: 1 });
    expect(l.longest([0n], 1)).toBeNull();
  });
});
