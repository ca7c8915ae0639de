import { describe, expect, test } from "bun:test";
import type { WorkerInfo } from "../../src/mesh/wire";
import { rankWorkers, workerLoad } from "../../src/routing/policy";
import { workerRecord } from "../helpers/mesh";

const w = (id: string, o: Partial<WorkerInfo> = {}): WorkerInfo =>
  workerRecord({ id, nodeId: `node-${id}`, addr: `127.0.0.1:${1000 + id.length}`, models: ["m"], slotsTotal: 4, ...o });

describe("routing policy", () => {
  test("picks_the_least_loaded_by_slots_and_queue", () => {
    const ws = [w("a", { slotsBusy: 4, queueDepth: 2 }), w("b", { slotsBusy: 3 }), w("c", { slotsBusy: 1, queueDepth: 1 })];
    expect(rankWorkers(ws, "m", { selfId: "x" }).map((x) => x.id)).toEqual(["c", "b", "a"]);
  });

  test("load_is_relative_to_slots_so_a_big_node_takes_more", () => {
    const big = w("big", { slotsTotal: 16, slotsBusy: 6 });
    const small = w("small", { slotsTotal: 2, slotsBusy: 1 });
    expect(workerLoad(big)).toBeLessThan(workerLoad(small));
    expect(rankWorkers([small, big], "m", { selfId: "x" })[0]?.id).toBe("big");
  });

  test("skips_unhealthy_other_models_and_this_node", () => {
    const ws = [
      w("loading", { health: "loading" }),
      w("failed", { health: "failed" }),
      w("other", { models: ["n"] }),
      w("self", { nodeId: "me" }),
      w("ok", { slotsBusy: 3 }),
    ];
    expect(rankWorkers(ws, "m", { selfId: "me" }).map((x) => x.id)).toEqual(["ok"]);
    expect(rankWorkers(ws, "absent", { selfId: "me" })).toEqual([]);
  });

  test("counts_requests_this_node_already_sent_so_a_burst_spreads", () => {
    const ws = [w("a"), w("b")];
    const inflight = new Map<string, number>();
    const picks: string[] = [];
    for (let i = 0; i < 4; i++) {
      const best = rankWorkers(ws, "m", { selfId: "x", inflight: (id) => inflight.get(id) ?? 0 })[0] as WorkerInfo;
      picks.push(best.id);
      inflight.set(best.id, (inflight.get(best.id) ?? 0) + 1);
    }
    expect(picks.filter((p) => p === "a").length).toBe(2);
    expect(picks.filter((p) => p === "b").length).toBe(2);
  });

  test("ties_go_to_more_free_kv_then_a_stable_order", () => {
    const ws = [w("b"), w("a", { kvUsed: 3000 }), w("c")];
    expect(rankWorkers(ws, "m", { selfId: "x" }).map((x) => x.id)).toEqual(["b", "c", "a"]);
  });
});
