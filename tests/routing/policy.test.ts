import { describe, expect, test } from "bun:test";
import type { WorkerInfo } from "../../src/mesh/wire";
import { type Candidate, decide, POLICY_DEFAULTS, workerLoad } from "../../src/routing/policy";
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

// A request of 40 blocks of 1000 characters: 10 000 estimated tokens at 4 characters a token.
const req = { chars: 40_000, ends: Array.from({ length: 40 }, (_, i) => (i + 1) * 1000) };

describe("routing policy", () => {
  test("without_a_holder_the_least_loaded_wins_by_slots_and_queue", () => {
    const d = decide(req, [cand(w("a", { slotsBusy: 4, queueDepth: 2 })), cand(w("b", { slotsBusy: 3 })), cand(w("c", { slotsBusy: 1 }))]);
    expect(d?.target.worker.id).toBe("c");
    expect(d?.reason).toBe("load");
    expect(d?.ranked.map((x) => x.candidate.worker.id)).toEqual(["c", "b", "a"]);
  });

  test("load_is_relative_to_slots_so_a_big_node_takes_more", () => {
    const big = w("big", { slotsTotal: 16, slotsBusy: 6 });
    const small = w("small", { slotsTotal: 2, slotsBusy: 1 });
    expect(workerLoad(big)).toBeLessThan(workerLoad(small));
    expect(decide(req, [cand(small), cand(big)])?.target.worker.id).toBe("big");
  });

  test("the_longest_holder_wins_when_it_beats_a_cold_prefill", () => {
    const d = decide(req, [cand(w("a")), cand(w("b"), { depth: 30, via: "index" }), cand(w("c"), { depth: 10, via: "index" })]);
    expect(d?.target.worker.id).toBe("b");
    expect(d?.reason).toBe("cache");
    expect(d?.ranked[0]?.cachedTokens).toBe(7500);
  });

  test("running_locally_costs_no_hop_so_an_idle_tie_stays_here", () => {
    const d = decide(req, [cand(w("peer")), cand(w("self"), { local: true })]);
    expect(d?.target.worker.id).toBe("self");
    expect(d?.ranked[0]?.hopMs).toBe(0);
  });

  test("a_short_match_is_not_worth_a_hop", () => {
    // 100 characters = 25 tokens: under the minimum match.
    const short = { chars: 40_000, ends: [100, ...req.ends.slice(1)] };
    const d = decide(short, [cand(w("self"), { local: true }), cand(w("peer"), { depth: 1, via: "index" })]);
    expect(d?.target.worker.id).toBe("self");
    expect(d?.reason).toBe("load");
  });

  test("an_overloaded_holder_fails_the_load_gate", () => {
    const busy = w("busy", { slotsBusy: 4, queueDepth: 12 });
    const d = decide(req, [cand(busy, { depth: 40, via: "index" }), cand(w("idle1")), cand(w("idle2"))]);
    expect(d?.ranked.find((x) => x.candidate.worker.id === "busy")?.gated).toBe(true);
    expect(d?.target.worker.id).not.toBe("busy");
  });

  test("a_holder_that_must_wait_loses_when_a_cold_start_is_cheaper", () => {
    // The holder has a queue; the prompt is short, so prefilling it elsewhere is cheaper than waiting.
    const small = { chars: 800, ends: [400, 800] };
    const queued = w("queued", { slotsBusy: 4, queueDepth: 2 });
    const d = decide(small, [
      cand(queued, { depth: 1, via: "index" }),
      cand(w("queued2", { slotsBusy: 4, queueDepth: 2 })),
      cand(w("free")),
    ]);
    expect(d?.target.worker.id).toBe("free");
  });

  test("a_holder_must_beat_cold_by_the_margin", () => {
    // Cached prefix saves less than the hop plus the margin: stay cold (local).
    const c = { ...POLICY_DEFAULTS, hopMs: 500 };
    const d = decide(req, [cand(w("self"), { local: true }), cand(w("peer"), { depth: 1, via: "index" })], c);
    expect(d?.target.worker.id).toBe("self");
  });

  test("the_lease_holder_keeps_a_near_tie", () => {
    // Two holders of the same prefix, the other slightly less loaded: the leased one stays.
    const leased = w("leased", { slotsBusy: 1 });
    const other = w("other", { slotsBusy: 0 });
    const d = decide(req, [cand(other, { depth: 40, via: "index" }), cand(leased, { depth: 40, via: "index", leased: true })]);
    expect(d?.target.worker.id).toBe("leased");
  });

  test("counts_requests_this_node_already_sent_so_a_burst_spreads", () => {
    const ws = [w("a"), w("b")];
    const inflight = new Map<string, number>();
    const picks: string[] = [];
    for (let i = 0; i < 4; i++) {
      const d = decide(
        req,
        ws.map((x) => cand(x, { inflight: inflight.get(x.id) ?? 0 })),
      );
      const id = d?.target.worker.id as string;
      picks.push(id);
      inflight.set(id, (inflight.get(id) ?? 0) + 1);
    }
    expect(picks.filter((p) => p === "a").length).toBe(2);
    expect(picks.filter((p) => p === "b").length).toBe(2);
  });

  test("a_holder_whose_cache_is_no_fuller_than_the_rest_passes_the_kv_gate", () => {
    // Its KV is all cache, nothing committed, and every worker's is as full: nowhere is better.
    const holder = w("holder", { kvTotal: 16_384, kvUsed: 0, kvCached: 16_384 });
    const d = decide(req, [cand(holder, { depth: 30, via: "index" }), cand(w("cold", { kvTotal: 16_384, kvCached: 15_000 }))]);
    expect(d?.target.worker.id).toBe("holder");
    expect(d?.ranked[0]?.gated).toBe(false);
  });

  test("a_holder_that_would_evict_others_while_the_rest_have_room_fails_the_kv_gate", () => {
    // Full of cache, the rest nearly empty: the prompt does not fit without evicting other conversations there.
    const holder = w("holder", { kvTotal: 16_384, kvUsed: 0, kvCached: 16_384 });
    const d = decide(req, [cand(holder, { depth: 30, via: "index" }), cand(w("cold", { kvTotal: 16_384, kvCached: 1000 }))]);
    expect(d?.ranked.find((x) => x.candidate.worker.id === "holder")?.gated).toBe(true);
    expect(d?.target.worker.id).toBe("cold");
  });

  test("a_holder_with_room_for_the_prompt_passes_the_kv_gate_however_full", () => {
    // 91 % full, but a 1 000-token prompt fits beside it.
    const small = { chars: 4000, ends: Array.from({ length: 4 }, (_, i) => (i + 1) * 1000) };
    const busy = w("busy", { kvTotal: 16_384, kvUsed: 14_900, kvCached: 14_900 });
    const d = decide(small, [cand(busy, { depth: 3, via: "index" }), cand(w("cold", { kvTotal: 16_384 }))]);
    expect(d?.ranked.find((x) => x.candidate.worker.id === "busy")?.gated).toBe(false);
    expect(d?.target.worker.id).toBe("busy");
  });

  test("a_holder_whose_running_requests_leave_no_room_for_the_prompt_fails_the_kv_gate", () => {
    // 10 000 prompt tokens do not fit beside 15 000 committed cells of 16 384: the request would wait.
    const full = w("full", { kvTotal: 16_384, kvUsed: 15_000, kvCached: 16_384 });
    const d = decide(req, [cand(full, { depth: 30, via: "index" }), cand(w("cold", { kvTotal: 16_384 }))]);
    expect(d?.target.worker.id).toBe("cold");
    expect(d?.ranked.find((x) => x.candidate.worker.id === "full")?.gated).toBe(true);
    // Every worker as full: nowhere is better, so the holder keeps it.
    const alike = w("alike", { kvTotal: 16_384, kvUsed: 15_000 });
    expect(decide(req, [cand(full, { depth: 30, via: "index" }), cand(alike)])?.target.worker.id).toBe("full");
  });

  test("a_new_conversation_under_a_shared_system_prompt_avoids_a_holder_whose_cache_is_full", () => {
    // All three hold the system prompt (5 blocks of 40); A's cache is full: the rest of the prompt would evict others.
    const full = w("a", { kvTotal: 16_384, kvCached: 16_000 });
    const roomy = (id: string) => w(id, { kvTotal: 16_384, kvCached: 2000 });
    const d = decide(req, [
      cand(full, { depth: 5, via: "index" }),
      cand(roomy("b"), { depth: 5, via: "index" }),
      cand(roomy("c"), { depth: 5, via: "index" }),
    ]);
    expect(d?.ranked.find((x) => x.candidate.worker.id === "a")?.gated).toBe(true);
    expect(d?.target.worker.id).not.toBe("a");
    // Every cache as full: nowhere is better, so nothing is gated for it.
    const alike = decide(req, [
      cand(full, { depth: 5, via: "index" }),
      cand(w("d", { kvTotal: 16_384, kvCached: 16_000 }), { depth: 5, via: "index" }),
    ]);
    expect(alike?.ranked.every((x) => !x.gated)).toBe(true);
  });

  test("near_ties_between_idle_workers_go_to_the_emptier_cache", () => {
    const d = decide(req, [cand(w("b", { kvTotal: 16_384, kvCached: 9000 })), cand(w("a", { kvTotal: 16_384, kvCached: 12_000 }))]);
    expect(d?.target.worker.id).toBe("b");
  });

  test("ties_go_to_more_free_kv_then_a_stable_order", () => {
    const d = decide(req, [cand(w("b")), cand(w("a", { kvUsed: 3000 })), cand(w("c"))]);
    expect(d?.ranked.map((x) => x.candidate.worker.id)).toEqual(["b", "c", "a"]);
  });

  test("entry_nodes_break_near_ties_at_random_instead_of_herding_onto_one_worker", () => {
    // Ten idle workers, none local: without randomness every entry picks the same one.
    const ws = Array.from({ length: 10 }, (_, i) => cand(w(`w${i}`)));
    const fixed = new Set(Array.from({ length: 20 }, () => decide(req, ws)?.target.worker.id));
    expect(fixed.size).toBe(1);
    let s = 7;
    const random = () => {
      s = (s * 1103515245 + 12345) % 2 ** 31;
      return s / 2 ** 31;
    };
    const spread = new Set(Array.from({ length: 20 }, () => decide(req, ws, POLICY_DEFAULTS, random)?.target.worker.id));
    expect(spread.size).toBeGreaterThan(3);
    // This node among the near-ties still wins: no hop.
    const withSelf = [...ws, cand(w("self"), { local: true })];
    expect(new Set(Array.from({ length: 20 }, () => decide(req, withSelf, POLICY_DEFAULTS, random)?.target.worker.id))).toEqual(
      new Set(["self"]),
    );
    // A clearly cheaper worker is never traded for a random one.
    const busy = Array.from({ length: 5 }, (_, i) => cand(w(`b${i}`, { slotsBusy: 4, queueDepth: 4 })));
    expect(
      new Set(Array.from({ length: 20 }, () => decide(req, [...busy, cand(w("free"))], POLICY_DEFAULTS, random)?.target.worker.id)),
    ).toEqual(new Set(["free"]));
  });

  test("a_single_candidate_is_only_and_none_is_null", () => {
    expect(decide(req, [cand(w("a"))])?.reason).toBe("only");
    expect(decide(req, [])).toBeNull();
  });
});
