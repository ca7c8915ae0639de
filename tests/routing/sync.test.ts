import { describe, expect, test } from "bun:test";
import type { WireMessage } from "../../src/mesh/wire";
import { hashFromBytes, isPathHash } from "../../src/routing/key";
import { decodeSections, decompress, type Section } from "../../src/routing/sync-wire";
import { epochOf, type RouteMesh, routeMesh, signedBatch } from "./sync-helpers";

const M = "model-m";

/** The sections of a batch as it went over the wire. */
function sectionsOf(msg: WireMessage): Section[] {
  const raw = decompress(Buffer.from(msg.data as string, "base64"), 1 << 20);
  if (!raw.ok) throw new Error(raw.message);
  const d = decodeSections(raw.value);
  if (!d.ok) throw new Error(d.message);
  return d.value;
}

/** `who` want `model`, and every other node has heard so. */
async function wantEverywhere(m: RouteMesh, who: string[], model = M): Promise<void> {
  for (const n of who) m.node(n).sync.noteRouted(model);
  const others = [...m.nodes.keys()];
  const ok = await m.until(() => who.every((w) => others.every((o) => o === w || m.knowsWant(o, w, model))));
  if (!ok) throw new Error("the wanted sets did not propagate");
}

const hashesOf = (pairs: Array<[string, string | null]>) => pairs.map(([h]) => h);

describe("routing sync: layer 1 deltas", () => {
  test("deltas_reach_every_peer_that_wants_the_model", async () => {
    const m = await routeMesh(["a", "b", "c", "d"]);
    await wantEverywhere(m, ["b", "c", "d"]);
    const chain = m.chain(30);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(m.node("a").own.size(M)).toBe(30);
    expect(await m.until(() => ["b", "c", "d"].every((n) => m.mirrors(n, "a", M, hashesOf(chain))), 10_000)).toBe(true);
    // The chain's shape arrives too: each hash's parent link.
    for (const [h, parent] of chain) expect(m.node("c").index.peek(M)?.parentOf(h)).toBe(parent);
    // A later change is a delta of its own, not the whole tenancy again.
    const more = m.chain(5, chain[29]?.[0] ?? null);
    const before = m.node("a").sync.stats().insertsSent;
    m.report("a", M, { inserts: more, evicts: [] });
    expect(await m.until(() => ["b", "c", "d"].every((n) => m.mirrors(n, "a", M, hashesOf([...chain, ...more]))), 10_000)).toBe(true);
    expect(m.node("a").sync.stats().insertsSent - before).toBe(15);
  });

  test("a_peer_that_does_not_want_a_model_gets_nothing_for_it", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["b"]);
    await wantEverywhere(m, ["c"], "model-other");
    const chain = m.chain(20);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    await m.advance(10_000);
    expect(m.batches("a", "c")).toHaveLength(0);
    expect(m.node("c").index.peek(M)).toBeUndefined();
    // And what c wants does reach it.
    const other = m.chain(3);
    m.report("a", "model-other", { inserts: other, evicts: [] });
    expect(await m.until(() => m.mirrors("c", "a", "model-other", hashesOf(other)), 10_000)).toBe(true);
    expect(m.batches("a", "c").every((b) => sectionsOf(b).every((s) => s.model === "model-other"))).toBe(true);
  });

  test("lost_deltas_on_a_failed_send_are_resent", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    const c1 = m.chain(20);
    m.report("a", M, { inserts: c1, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(c1)), 10_000)).toBe(true);
    // Every batch from a is lost on the way.
    m.drop = (from, _to, msg) => from === a.addr && msg.type === "route-sync";
    const c2 = m.chain(20, c1[19]?.[0] ?? null);
    m.report("a", M, { inserts: c2, evicts: [] });
    m.report("a", M, { inserts: [], evicts: hashesOf(c1.slice(15)) });
    await m.advance(8000);
    expect(a.sync.stats().batchesFailed).toBeGreaterThan(0);
    expect(
      m
        .node("b")
        .index.peek(M)
        ?.holds(a.id, c2[0]?.[0] as string),
    ).toBe(false);
    // Then every ack is lost: the batches apply, a resends them, and applying twice is harmless.
    m.drop = (_from, _to, msg) => msg.type === "route-ack";
    const c3 = m.chain(10);
    m.report("a", M, { inserts: c3, evicts: hashesOf(c2.slice(0, 5)) });
    const failed = a.sync.stats().batchesFailed;
    await m.advance(40_000);
    expect(a.sync.stats().batchesFailed).toBeGreaterThan(failed);
    m.drop = null;
    const universe = hashesOf([...c1, ...c2, ...c3]);
    expect(await m.until(() => m.mirrors("b", "a", M, universe) && a.sync.stats().pendingOps === 0, 90_000)).toBe(true);
    expect(a.own.size(M)).toBe(15 + 15 + 10);
  });

  test("an_oversized_batch_is_split_never_retried_forever", async () => {
    const m = await routeMesh(["a", "b"], { per: { b: { config: { maxInboundBytes: 4096 } } } });
    await wantEverywhere(m, ["b"]);
    const chains = Array.from({ length: 100 }, () => m.chain(30));
    for (const c of chains) m.report("a", M, { inserts: c, evicts: [] });
    const universe = chains.flatMap(hashesOf);
    expect(await m.until(() => m.mirrors("b", "a", M, universe), 60_000)).toBe(true);
    const a = m.node("a");
    const st = a.sync.stats();
    // 32 KiB -> 16 -> 8 -> 4: three refusals, then batches of at most 4 KiB.
    expect(st.budgetHalvings).toBe(3);
    expect(m.node("b").sync.stats().refused.too_large).toBe(3);
    expect(a.sync.peerState(m.node("b").id)?.budget).toBe(4096);
    const sizes = m.batches("a", "b").map((b) => Buffer.from(b.data as string, "base64").readUInt32LE(0));
    expect(sizes.slice(3).every((s) => s <= 4096)).toBe(true);
    expect(st.batchesSplit).toBeGreaterThan(0);
    // 3000 inserts of 8 bytes in 4 KiB batches: about 7 batches, not a retry each round.
    expect(st.batchesSent).toBeLessThanOrEqual(3 + 9);
    const sent = st.batchesSent;
    await m.advance(30_000);
    expect(a.sync.stats().batchesSent).toBe(sent);
  });

  test("a_peer_refusing_even_the_smallest_batch_is_retried_with_backoff_not_every_round", async () => {
    const m = await routeMesh(["a", "b"], { per: { b: { config: { maxInboundBytes: 600 } } } });
    await wantEverywhere(m, ["b"]);
    for (let i = 0; i < 20; i++) m.report("a", M, { inserts: m.chain(30), evicts: [] });
    await m.advance(120_000);
    const a = m.node("a").sync.stats();
    // 32 -> 16 -> 8 -> 4 -> 2 -> 1 KiB (the floor), then retries backing off to 30 s: not 120 tries.
    expect(a.budgetHalvings).toBe(5);
    expect(a.batchesSent).toBeGreaterThanOrEqual(6);
    expect(a.batchesSent).toBeLessThanOrEqual(12);
    expect(m.node("b").sync.stats().refused.too_large).toBe(a.batchesSent);
  });

  test("a_batch_that_fails_after_its_stream_was_replaced_is_not_put_back", async () => {
    const m = await routeMesh(["a", "b"], { per: { b: { config: { wantTtlMs: 5000 } } } });
    await wantEverywhere(m, ["b"]);
    const [x] = m.chain(1) as Array<[string, string | null]>;
    // a's batch carrying x is held on its way; it will fail.
    let fail: (() => void) | null = null;
    m.intercept = (node, msg, send) => {
      if (node === "a" && msg.type === "route-sync" && fail === null)
        return new Promise((_, reject) => (fail = () => reject(new Error("lost"))));
      return send();
    };
    m.report("a", M, { inserts: [x as [string, string | null]], evicts: [] });
    expect(await m.until(() => fail !== null, 5000)).toBe(true);
    // Meanwhile x is evicted, and b stops wanting the model and wants it again: a new stream.
    m.report("a", M, { inserts: [], evicts: [(x as [string, string | null])[0]] });
    expect(await m.until(() => !m.knowsWant("a", "b", M), 20_000)).toBe(true);
    // Wanted again, now for good (served: no TTL).
    m.node("b").sync.setServed([M]);
    expect(await m.until(() => m.knowsWant("a", "b", M), 20_000)).toBe(true);
    (fail as unknown as () => void)();
    const y = m.chain(2);
    m.report("a", M, { inserts: y, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(y)), 20_000)).toBe(true);
    await m.advance(10_000);
    // Put back into the new stream, x would follow its reset: a zombie of a tenancy long gone.
    expect(m.mirrors("b", "a", M, [(x as [string, string | null])[0], ...hashesOf(y)])).toBe(true);
  });

  test("a_model_dropped_wholesale_is_reset_at_every_peer_wanting_it", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["b", "c"]);
    const chain = m.chain(40);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => ["b", "c"].every((n) => m.mirrors(n, "a", M, hashesOf(chain))), 10_000)).toBe(true);
    // a's engine for the model stopped: no eviction per hash, one reset per peer.
    const a = m.node("a");
    a.index.peek(M)?.dropHolder(a.id);
    a.own.dropModel(M);
    a.sync.resync(M);
    expect(await m.until(() => ["b", "c"].every((n) => m.mirrors(n, "a", M, hashesOf(chain))), 10_000)).toBe(true);
    for (const n of ["b", "c"]) for (const [h] of chain) expect(m.node(n).index.peek(M)?.holds(a.id, h) ?? false).toBe(false);
    expect(a.sync.stats().evictsSent).toBe(0);
  });

  test("evictions_propagate_no_zombie_tenant", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(10);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    const gone = hashesOf(chain.slice(5));
    m.report("a", M, { inserts: [], evicts: gone });
    const idx = () => m.node("b").index.peek(M);
    expect(await m.until(() => gone.every((h) => !idx()?.holds(m.node("a").id, h)), 10_000)).toBe(true);
    // Nobody else held them: the entries themselves are gone, not left without a holder.
    for (const h of gone) expect(idx()?.parentOf(h)).toBeUndefined();
    for (const h of hashesOf(chain.slice(0, 5))) expect(idx()?.holds(m.node("a").id, h)).toBe(true);
    await m.advance(30_000);
    expect(gone.every((h) => !idx()?.holds(m.node("a").id, h))).toBe(true);
  });

  test("insert_then_evict_before_send_sends_nothing_the_peer_never_held_it", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const base = m.chain(3);
    m.report("a", M, { inserts: base, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(base)), 10_000)).toBe(true);
    await m.advance(3000);
    const before = m.batches("a", "b").length;
    const inserted = m.node("a").sync.stats().insertsSent;
    const [x] = m.chain(1, base[2]?.[0] ?? null);
    m.report("a", M, { inserts: [x as [string, string]], evicts: [] });
    m.report("a", M, { inserts: [], evicts: [(x as [string, string])[0]] });
    await m.advance(3000);
    // Cached and evicted between two rounds: no insert, no evict, no batch at all.
    expect(m.batches("a", "b").slice(before)).toHaveLength(0);
    expect(m.node("a").sync.stats().insertsSent).toBe(inserted);
    expect(m.node("a").sync.stats().cancelled).toBe(1);
    expect(m.node("a").sync.stats().pendingOps).toBe(0);
  });

  test("an_all_zero_hash_is_an_ordinary_hash_not_a_global_eviction", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["c"]);
    const zero = hashFromBytes(new Uint8Array(8), 0);
    expect(zero).toBe("AAAAAAAAAAA");
    expect(isPathHash(zero)).toBe(true);
    const ofA: Array<[string, string | null]> = [[zero, null], ...m.chain(4, zero)];
    const ofB: Array<[string, string | null]> = [[zero, null], ...m.chain(3, zero)];
    m.report("a", M, { inserts: ofA, evicts: [] });
    m.report("b", M, { inserts: ofB, evicts: [] });
    const all = hashesOf([...ofA, ...ofB]);
    expect(await m.until(() => m.mirrors("c", "a", M, all) && m.mirrors("c", "b", M, all), 10_000)).toBe(true);
    // a evicts the all-zero hash: that one entry of a's, nothing else of a's, nothing of b's.
    m.report("a", M, { inserts: [], evicts: [zero] });
    const idx = () => m.node("c").index.peek(M);
    expect(await m.until(() => !idx()?.holds(m.node("a").id, zero), 10_000)).toBe(true);
    for (const h of hashesOf(ofA.slice(1))) expect(idx()?.holds(m.node("a").id, h)).toBe(true);
    for (const h of hashesOf(ofB)) expect(idx()?.holds(m.node("b").id, h)).toBe(true);
    expect(m.mirrors("c", "a", M, all) && m.mirrors("c", "b", M, all)).toBe(true);
  });

  test("equal_hashes_under_two_models_do_not_collide", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"], "m1");
    await wantEverywhere(m, ["b"], "m2");
    const chain = m.chain(6);
    m.report("a", "m1", { inserts: chain, evicts: [] });
    m.report("a", "m2", { inserts: chain, evicts: [] });
    const hs = hashesOf(chain);
    expect(await m.until(() => m.mirrors("b", "a", "m1", hs) && m.mirrors("b", "a", "m2", hs), 10_000)).toBe(true);
    m.report("a", "m1", { inserts: [], evicts: hs });
    const only2 = m.chain(2, chain[5]?.[0] ?? null);
    m.report("a", "m2", { inserts: only2, evicts: [] });
    const b = m.node("b");
    const aid = m.node("a").id;
    expect(
      await m.until(() => hs.every((h) => !b.index.peek("m1")?.holds(aid, h)) && m.mirrors("b", "a", "m2", hashesOf(only2)), 10_000),
    ).toBe(true);
    for (const h of hs) expect(b.index.peek("m2")?.holds(aid, h)).toBe(true);
    for (const h of hashesOf(only2)) expect(b.index.peek("m1")?.holds(aid, h) ?? false).toBe(false);
  });
});

describe("routing sync: membership", () => {
  test("a_dead_node_loses_all_its_tenancy_everywhere", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["b", "c"]);
    const chain = m.chain(25);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => ["b", "c"].every((n) => m.mirrors(n, "a", M, hashesOf(chain))), 10_000)).toBe(true);
    const aid = m.node("a").id;
    m.c.kill("a");
    expect(await m.until(() => m.c.allSee("a", "dead", ["b", "c"]), 60_000)).toBe(true);
    for (const n of ["b", "c"]) {
      const idx = m.node(n).index.peek(M);
      for (const h of hashesOf(chain)) {
        expect(idx?.holds(aid, h)).toBe(false);
        expect(idx?.parentOf(h)).toBeUndefined();
      }
      expect(m.node(n).sync.peerState(aid)).toBeUndefined();
    }
  });

  test("a_restarted_node_new_epoch_loses_its_old_tenancy", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const old = m.chain(15);
    m.report("a", M, { inserts: old, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(old)), 10_000)).toBe(true);
    const oldEpoch = epochOf(m.node("a"));
    const identity = m.node("a").identity;
    m.c.kill("a");
    // Back before anyone declared it dead: same id, a new epoch, an empty KV.
    m.add("a", { identity });
    await m.join("a", "b");
    expect(epochOf(m.node("a"))).not.toBe(oldEpoch);
    const idx = () => m.node("b").index.peek(M);
    expect(await m.until(() => hashesOf(old).every((h) => !idx()?.holds(identity.id, h)), 30_000)).toBe(true);
    expect(await m.until(() => m.knowsWant("a", "b", M), 30_000)).toBe(true);
    const fresh = m.chain(10);
    m.report("a", M, { inserts: fresh, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf([...old, ...fresh])), 30_000)).toBe(true);
  });

  test("a_node_declared_dead_and_back_resyncs_its_whole_tenancy", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(12);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    const a = m.node("a");
    const epoch = epochOf(a);
    m.c.pause("a");
    expect(await m.until(() => m.c.allSee("a", "dead", ["b", "c"]), 60_000)).toBe(true);
    for (const h of hashesOf(chain)) expect(m.node("b").index.peek(M)?.holds(a.id, h)).toBe(false);
    // Thawed, it hears it was declared dead, takes a new epoch, and gives b all of its tenancy again.
    m.c.resume("a");
    expect(await m.until(() => m.c.converged() && epochOf(a) !== epoch, 60_000)).toBe(true);
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 60_000)).toBe(true);
  });

  test("a_late_joiner_gets_full_tenancy_without_periodic_snapshots", async () => {
    const m = await routeMesh(["a", "b"], { all: { config: { batchBytes: 8192 } } });
    await wantEverywhere(m, ["b"]);
    const chains = Array.from({ length: 100 }, () => m.chain(30));
    for (const c of chains) m.report("a", M, { inserts: c, evicts: [] });
    const universe = chains.flatMap(hashesOf);
    expect(await m.until(() => m.mirrors("b", "a", M, universe), 60_000)).toBe(true);
    m.add("d", { config: { batchBytes: 8192 } });
    await m.join("d", "a");
    m.node("d").sync.noteRouted(M);
    expect(await m.until(() => m.mirrors("d", "a", M, universe), 60_000)).toBe(true);
    // 3000 inserts arrive in budget-sized chunks over several rounds.
    expect(m.batches("a", "d").length).toBeGreaterThan(2);
    for (const [h, parent] of chains[7] ?? []) expect(m.node("d").index.peek(M)?.parentOf(h)).toBe(parent);
    // Nothing is ever pushed again unasked: no snapshot every N rounds, no checkpoint.
    await m.advance(5000);
    const encodes = m.node("a").sync.stats().encodes;
    const seen = m.seen.length;
    await m.advance(120_000);
    expect(m.node("a").sync.stats().encodes).toBe(encodes);
    expect(m.seen.length).toBe(seen);
  });
});

describe("routing sync: layer 2 paths", () => {
  test("a_dangling_parent_is_resolved_by_a_path_request_rate_limited", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const chains = Array.from({ length: 100 }, () => m.chain(3));
    for (const c of chains) m.report("a", M, { inserts: c, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, chains.flatMap(hashesOf)), 20_000)).toBe(true);
    const a = m.node("a");
    const b = m.node("b");
    // b's index dropped every chain's tip (as its budget would); then a's engine extends each chain.
    const tips = chains.map((c) => (c[2] as [string, string])[0]);
    for (const t of tips) b.index.model(M).evict(a.id, t);
    const ext = tips.map((t) => m.chain(1, t)[0] as [string, string]);
    const asked = m.seen.length;
    for (const e of ext) m.report("a", M, { inserts: [e], evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, [...tips, ...hashesOf(ext)]), 30_000)).toBe(true);
    const st = b.sync.stats();
    expect(st.pathHashesRequested).toBe(100);
    expect(st.pathHashesResolved).toBe(100);
    expect(st.unresolved).toBe(0);
    const requests = m.seen.slice(asked).filter((s) => s.msg.type === "route-path");
    expect(requests.length).toBeGreaterThanOrEqual(4);
    for (const r of requests) {
      const n = (r.msg.want as Array<[string, string[]]>).reduce((k, [, hs]) => k + hs.length, 0);
      expect(n).toBeLessThanOrEqual(32);
    }
    expect(a.sync.stats().pathRequestsAnswered).toBe(0);
    expect(b.sync.stats().pathRequestsAnswered).toBe(requests.length);
  });

  test("a_path_queue_past_its_bound_drops_the_oldest_and_counts_them", async () => {
    const m = await routeMesh(["a", "b"], { per: { b: { config: { pathQueue: 50, pathPerRound: 8 } } } });
    await wantEverywhere(m, ["b"]);
    const chains = Array.from({ length: 120 }, () => m.chain(2));
    for (const c of chains) m.report("a", M, { inserts: c, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, chains.flatMap(hashesOf)), 20_000)).toBe(true);
    const a = m.node("a");
    const b = m.node("b");
    const tips = chains.map((c) => (c[1] as [string, string])[0]);
    for (const t of tips) b.index.model(M).evict(a.id, t);
    for (const t of tips) m.report("a", M, { inserts: m.chain(1, t), evicts: [] });
    let most = 0;
    for (let i = 0; i < 200; i++) {
      await m.advance(100);
      most = Math.max(most, b.sync.peerState(a.id)?.queuedPaths ?? 0);
    }
    await m.advance(30_000);
    const st = b.sync.stats();
    expect(most).toBeLessThanOrEqual(50);
    expect(st.pathHashesGivenUp).toBe(70);
    expect(st.pathHashesResolved).toBe(50);
    expect(st.unresolved).toBe(0);
  });
  test("a_path_answer_older_than_a_batch_applied_since_is_not_applied", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(3);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    const a = m.node("a");
    const b = m.node("b");
    const tip = (chain[2] as [string, string])[0];
    b.index.model(M).evict(a.id, tip);
    // b's first path request is answered (a still holds the tip), but the answer is held up on its way
    // back while a evicts the tip and that batch reaches b first.
    let release: (() => void) | null = null;
    let held = 0;
    m.intercept = async (node, msg, send) => {
      const reply = await send();
      if (node === "b" && msg.type === "route-path" && held++ === 0) await new Promise<void>((r) => (release = r));
      return reply;
    };
    m.report("a", M, { inserts: m.chain(1, tip), evicts: [] });
    expect(await m.until(() => release !== null, 10_000)).toBe(true);
    m.report("a", M, { inserts: [], evicts: [tip] });
    expect(await m.until(() => a.sync.stats().batchesAcked >= 3 && a.sync.stats().pendingOps === 0, 10_000)).toBe(true);
    (release as unknown as () => void)();
    await m.advance(10_000);
    // Applied late, the answer would have made a hold its evicted tip again at b: a zombie tenant.
    expect(b.index.peek(M)?.holds(a.id, tip) ?? false).toBe(false);
    expect(b.sync.stats().pathHashesResolved).toBe(0);
    expect(b.sync.stats().pathHashesGivenUp).toBe(1);
    expect(b.sync.stats().unresolved).toBe(0);
  });
  test("a_path_request_past_its_bounds_or_from_another_sender_is_refused", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    const a = m.node("a");
    const b = m.node("b");
    const chain = m.chain(3);
    a.own.apply(M, { inserts: chain, evicts: [] });
    const base = { type: "route-path", id: b.id, epoch: epochOf(b), toEpoch: epochOf(a) };
    const ask = (want: unknown, from: string | undefined = b.id, over = {}) => a.sync.handle({ ...base, want, ...over }, from);
    const ok = await ask([[M, [chain[2]?.[0]]]]);
    expect(ok).toMatchObject({ type: "route-paths", ok: true, id: a.id });
    const many = Array.from({ length: 129 }, () => m.hash());
    expect((await ask([[M, many]])).code).toBe("malformed");
    expect((await ask(Array.from({ length: 5 }, () => [M, many.slice(0, 30)]))).code).toBe("too_large");
    expect((await ask([[M, ["not-a-hash"]]])).code).toBe("malformed");
    expect((await ask([["bad model", [chain[0]?.[0]]]])).code).toBe("malformed");
    expect((await ask([[M, [chain[2]?.[0]]]], m.node("c").id)).code).toBe("wrong_sender");
    expect((await ask([[M, [chain[2]?.[0]]]], b.id, { toEpoch: "old" })).code).toBe("stale_epoch");
    expect(a.sync.stats().refused).toMatchObject({ malformed: 3, too_large: 1, wrong_sender: 1, stale_epoch: 1 });
  });
});

describe("routing sync: costs", () => {
  test("an_idle_mesh_allocates_nothing_per_round", async () => {
    const names = ["a", "b", "c", "d"];
    const m = await routeMesh(names);
    await wantEverywhere(m, ["b", "c", "d"]);
    m.report("a", M, { inserts: m.chain(20), evicts: [] });
    m.report("b", M, { inserts: m.chain(20), evicts: [] });
    await m.advance(10_000);
    const snap = () =>
      names.map((n) => {
        const s = m.node(n).sync.stats();
        return { rounds: s.rounds, encodes: s.encodes, signs: m.node(n).signs.n, pending: s.pendingOps, unresolved: s.unresolved };
      });
    const before = snap();
    const seen = m.seen.length;
    // 100 membership rounds with nothing new in any KV.
    await m.advance(100_000);
    expect(snap()).toEqual(before);
    expect(m.seen.length).toBe(seen);
    for (const s of before) expect(s.pending + s.unresolved).toBe(0);
    for (const n of names) expect(m.node(n).sync.stats().bytesLastRound).toBe(0);
  });

  test("bytes_per_insert_on_the_wire_are_at_most_32", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const warm = m.chain(4);
    m.report("a", M, { inserts: warm, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(warm)), 10_000)).toBe(true);
    await m.advance(3000);
    const before = m.batches("a", "b").length;
    // A realistic round: 50 requests of 40 blocks each, sharing a 4-block system prompt.
    const reqs = Array.from({ length: 50 }, () => m.chain(36, warm[3]?.[0] ?? null));
    for (const r of reqs) m.report("a", M, { inserts: r, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, reqs.flatMap(hashesOf)), 10_000)).toBe(true);
    const sent = m.batches("a", "b").slice(before);
    const bytes = sent.reduce((n, msg) => n + JSON.stringify(msg).length, 0);
    const inserts = sent.reduce((n, msg) => n + sectionsOf(msg).reduce((k, s) => k + s.inserts.length, 0), 0);
    expect(inserts).toBe(50 * 36);
    const perInsert = bytes / inserts;
    console.log(
      `route sync: ${sent.length} batch(es), ${bytes} bytes on the wire for ${inserts} inserts = ${perInsert.toFixed(2)} bytes/insert`,
    );
    expect(perInsert).toBeLessThanOrEqual(32);
    // The node's own count agrees with what the network carried.
    const st = m.node("a").sync.stats();
    expect(st.bytesSent).toBeGreaterThanOrEqual(bytes);
  });

  test("pending_per_peer_is_bounded_and_overflow_resyncs", async () => {
    const m = await routeMesh(["a", "b"], { per: { a: { config: { maxPendingOps: 500 } } } });
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    const b = m.node("b");
    m.drop = (from, _to, msg) => from === a.addr && msg.type === "route-sync";
    const all: Array<[string, string | null]> = [];
    for (let i = 0; i < 40; i++) {
      const c = m.chain(50);
      all.push(...c);
      m.report("a", M, { inserts: c, evicts: i % 5 === 4 ? hashesOf(all.slice(i * 10, i * 10 + 20)) : [] });
      expect(a.sync.peerState(b.id)?.ops ?? 0).toBeLessThanOrEqual(500);
      await m.advance(300);
    }
    expect(a.sync.stats().pendingOverflows).toBeGreaterThan(0);
    m.drop = null;
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(all)) && a.sync.stats().pendingOps === 0, 90_000)).toBe(true);
  });
});

describe("routing sync: interest", () => {
  test("a_node_that_stops_wanting_a_model_drops_its_index", async () => {
    const m = await routeMesh(["a", "b"], { per: { b: { config: { wantTtlMs: 20_000 } } } });
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(10);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    const b = m.node("b");
    const aid = m.node("a").id;
    // No request for the model for longer than the TTL.
    expect(await m.until(() => !b.sync.wants(b.id).has(M), 30_000)).toBe(true);
    for (const h of hashesOf(chain)) expect(b.index.peek(M)?.holds(aid, h) ?? false).toBe(false);
    expect(await m.until(() => !m.knowsWant("a", "b", M), 10_000)).toBe(true);
    const before = m.batches("a", "b").length;
    m.report("a", M, { inserts: m.chain(5), evicts: [] });
    await m.advance(10_000);
    expect(m.batches("a", "b")).toHaveLength(before);
    // Wanting it again brings all of it back.
    b.sync.noteRouted(M);
    expect(await m.until(() => m.knowsWant("a", "b", M), 10_000)).toBe(true);
    expect(await m.until(() => b.index.peek(M)?.holds(aid, chain[0]?.[0] as string) === true, 10_000)).toBe(true);
  });
});

describe("routing sync: untrusted input", () => {
  test("a_forged_or_misattributed_batch_changes_nothing", async () => {
    const m = await routeMesh(["a", "b", "c"]);
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(8);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    await m.advance(3000);
    const a = m.node("a");
    const b = m.node("b");
    const c = m.node("c");
    // A reset would wipe a's tenancy at b, were it accepted.
    const wipe: Section[] = [{ model: M, reset: true, syncing: false, evicts: hashesOf(chain), inserts: m.chain(2) }];
    const to = { to: b.id, toEpoch: epochOf(b) };
    const asA = { id: a.id, epoch: epochOf(a), seq: 1e9, ...to };
    const cases: Array<[string, WireMessage, string | undefined]> = [
      ["wrong_sender", signedBatch(a.identity, { ...asA, sections: wipe }), c.id],
      ["wrong_sender", signedBatch(a.identity, { ...asA, sections: wipe }), undefined],
      ["forged", signedBatch(c.identity, { ...asA, sections: wipe }), a.id],
      [
        "forged",
        { ...signedBatch(a.identity, { ...asA, sections: [] }), data: signedBatch(a.identity, { ...asA, sections: wipe }).data },
        a.id,
      ],
      ["forged", { ...signedBatch(a.identity, { ...asA, sections: wipe }), seq: 1e9 + 1 }, a.id],
      // A batch a signed for c, replayed to b.
      ["forged", signedBatch(a.identity, { ...asA, to: c.id, sections: wipe }), a.id],
      ["stale_epoch", signedBatch(a.identity, { ...asA, toEpoch: "an-earlier-life", sections: wipe }), a.id],
      ["stale_epoch", signedBatch(a.identity, { ...asA, epoch: "an-earlier-life", sections: wipe }), a.id],
      ["stale_seq", signedBatch(a.identity, { ...asA, seq: 1, sections: wipe }), a.id],
      ["malformed", signedBatch(a.identity, { ...asA, data: Buffer.from([9, 0, 0, 0, 1, 2, 3, 4, 5]) }), a.id],
      ["malformed", { type: "route-sync", id: a.id, epoch: epochOf(a), toEpoch: epochOf(b), seq: -1, data: "", sig: "x" }, a.id],
      ["malformed", { type: "route-sync", id: "not-a-node" }, a.id],
    ];
    for (const [code, msg, from] of cases) {
      const reply = await b.sync.handle(msg, from);
      expect({ code, reply: reply.code }).toEqual({ code, reply: code });
    }
    expect(b.sync.stats().refused).toMatchObject({ wrong_sender: 2, forged: 4, stale_epoch: 2, stale_seq: 1, malformed: 3 });
    expect(m.mirrors("b", "a", M, hashesOf(chain))).toBe(true);
    for (const [h] of wipe[0]?.inserts ?? []) expect(b.index.peek(M)?.holds(a.id, h) ?? false).toBe(false);
    // c may claim whatever it likes about its own tenancy; a's stays a's.
    const own = await b.sync.handle(signedBatch(c.identity, { id: c.id, epoch: epochOf(c), seq: 5, ...to, sections: wipe }), c.id);
    expect(own.type).toBe("route-ack");
    expect(m.mirrors("b", "a", M, hashesOf(chain))).toBe(true);
    expect(b.index.peek(M)?.holds(c.id, wipe[0]?.inserts[0]?.[0] as string)).toBe(true);
  });

  test("a_decompression_bomb_header_is_refused_before_allocation", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    const b = m.node("b");
    // A member's correctly signed batch whose LZ4 header claims 2 GiB.
    const bomb = Buffer.alloc(64, 0x11);
    bomb.writeUInt32LE(0x7fffffff, 0);
    const msg = signedBatch(a.identity, { id: a.id, epoch: epochOf(a), to: b.id, toEpoch: epochOf(b), seq: 77, data: bomb });
    const t0 = performance.now();
    const reply = await b.sync.handle(msg, a.id);
    expect(performance.now() - t0).toBeLessThan(100);
    expect(reply).toMatchObject({ type: "error", code: "too_large" });
    expect(b.sync.stats().refused.too_large).toBe(1);
    expect(b.index.peek(M)).toBeUndefined();
    // And a header that lies the other way (smaller than its content) is malformed, not trusted.
    const small = Buffer.alloc(64, 0x11);
    small.writeUInt32LE(3, 0);
    const r2 = await b.sync.handle(
      signedBatch(a.identity, { id: a.id, epoch: epochOf(a), to: b.id, toEpoch: epochOf(b), seq: 78, data: small }),
      a.id,
    );
    expect(r2.code).toBe("malformed");
  });

  test("a_receiver_without_a_base_for_a_stream_applies_it_and_asks_for_a_resync", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    const b = m.node("b");
    const pairs = m.chain(3);
    const msg = signedBatch(a.identity, {
      id: a.id,
      epoch: epochOf(a),
      to: b.id,
      toEpoch: epochOf(b),
      // Before any batch of a's own: the seq a's first batch must still beat.
      seq: 0,
      sections: [{ model: M, reset: false, syncing: false, evicts: [], inserts: pairs }],
    });
    const reply = await b.sync.handle(msg, a.id);
    expect(reply).toMatchObject({ type: "route-ack", ok: true, resync: [M] });
    expect(b.index.peek(M)?.holds(a.id, pairs[2]?.[0] as string)).toBe(true);
    // a answers a resync with its real tenancy: the made-up pairs go.
    const real = m.chain(4);
    m.report("a", M, { inserts: real, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf([...pairs, ...real])), 20_000)).toBe(true);
  });

  test("a_batch_addressed_to_an_earlier_life_of_the_receiver_is_refused_and_resent_to_the_new_one", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const chain = m.chain(6);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    const identity = m.node("b").identity;
    m.c.kill("b");
    m.add("b", { identity });
    await m.join("b", "a");
    m.node("b").sync.noteRouted(M);
    // The new life starts empty and gets a's whole tenancy again.
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 30_000)).toBe(true);
  });
});
