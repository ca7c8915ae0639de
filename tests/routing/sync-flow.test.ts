// The route sync under load: a backlog drains with more than one batch a round (bounded), a full
// resync finishes under a steady backlog, and an insert cached and evicted between rounds costs
// nothing but one the peer may hold is never dropped. Each test here fails without the change it
// covers (docs/benchmarks.md, "Routing soak", has the figures that motivated them).
import { describe, expect, test } from "bun:test";
import { type RouteMesh, routeMesh } from "./sync-helpers";

const M = "model-m";
const hashesOf = (pairs: Array<[string, string | null]>) => pairs.map(([h]) => h);

async function wantEverywhere(m: RouteMesh, who: string[], model = M): Promise<void> {
  for (const n of who) m.node(n).sync.noteRouted(model);
  const others = [...m.nodes.keys()];
  if (!(await m.until(() => who.every((w) => others.every((o) => o === w || m.knowsWant(o, w, model)))))) {
    throw new Error("the wanted sets did not propagate");
  }
}

describe("routing sync: flow", () => {
  test("a_backlog_drains_with_batches_right_after_acks_at_most_burst_batches_a_round", async () => {
    const m = await routeMesh(["a", "b"], { all: { config: { batchBytes: 1024 } } });
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    // About 120 chained inserts fit a 1 KiB batch: 350 need three batches, 4 000 need 33.
    const small = Array.from({ length: 7 }, () => m.chain(50));
    for (const c of small) m.report("a", M, { inserts: c, evicts: [] });
    const before = m.batches("a", "b").length;
    // One round: the three batches go one after the other, not one a round.
    await m.advance(1100);
    expect(m.mirrors("b", "a", M, small.flatMap(hashesOf))).toBe(true);
    expect(m.batches("a", "b").length - before).toBe(3);
    expect(a.sync.stats().burstSent).toBeGreaterThanOrEqual(2);
    // A backlog larger than the bound still gets burstBatches a round, no more.
    const big = Array.from({ length: 80 }, () => m.chain(50));
    for (const c of big) m.report("a", M, { inserts: c, evicts: [] });
    const mark = m.batches("a", "b").length;
    await m.advance(1050);
    expect(m.batches("a", "b").length - mark).toBe(a.sync.config.burstBatches);
    expect(await m.until(() => m.mirrors("b", "a", M, big.flatMap(hashesOf)), 30_000)).toBe(true);
    expect(a.sync.stats().batchesSplit).toBeGreaterThan(0);
  });

  test("a_full_resync_finishes_while_more_changes_arrive_each_round_than_a_batch_carries", async () => {
    const m = await routeMesh(["a", "b", "c"], { all: { config: { batchBytes: 1024, burstBatches: 1 } } });
    await wantEverywhere(m, ["b"]);
    const base = Array.from({ length: 6 }, () => m.chain(50));
    for (const c of base) m.report("a", M, { inserts: c, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, base.flatMap(hashesOf)), 30_000)).toBe(true);
    // c starts routing the model: a streams it its whole tenancy, while making 200 new changes a
    // round, more than a 1 KiB batch a round carries.
    m.node("c").sync.noteRouted(M);
    // 200 changes every 100 ms (m.until's step): 2 000 a round.
    const ok = await m.until(() => {
      m.report("a", M, { inserts: m.chain(200), evicts: [] });
      return m.mirrors("c", "a", M, base.flatMap(hashesOf));
    }, 20_000);
    // Half of each batch goes to the stream: 300 hashes need about 6 batches of 60.
    expect(ok).toBe(true);
  });

  test("an_insert_the_peer_may_hold_is_never_dropped_with_its_eviction", async () => {
    const m = await routeMesh(["a", "b"]);
    await wantEverywhere(m, ["b"]);
    const a = m.node("a");
    const chain = m.chain(4);
    m.report("a", M, { inserts: chain, evicts: [] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)), 10_000)).toBe(true);
    await m.advance(3000);
    const [h0, h1, h2] = hashesOf(chain.slice(1)) as [string, string, string];
    // 0. An engine that reports a hash it already held (nothing changed here) is not reporting a new one.
    m.report("a", M, { inserts: [chain[1] as [string, string]], evicts: [] });
    m.report("a", M, { inserts: [], evicts: [h0] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)) && a.sync.stats().pendingOps === 0, 10_000)).toBe(true);
    expect(m.node("b").index.peek(M)?.holds(a.id, h0)).toBe(false);
    // 1. b holds h2: evicted, loaded again and evicted again between two rounds, b must still hear the eviction.
    m.report("a", M, { inserts: [], evicts: [h2] });
    m.report("a", M, { inserts: [chain[3] as [string, string]], evicts: [] });
    m.report("a", M, { inserts: [], evicts: [h2] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)) && a.sync.stats().pendingOps === 0, 10_000)).toBe(true);
    expect(a.sync.stats().cancelled).toBe(0);
    // 2. The batch evicting h1 is lost; h1 is loaded again meanwhile (nothing pending about it then), and
    // evicted again after the failure put the lost eviction back: b still holds h1, so the eviction must go.
    m.drop = (from, _to, msg) => from === a.addr && msg.type === "route-sync";
    m.report("a", M, { inserts: [], evicts: [h1] });
    await m.advance(1100);
    expect(a.sync.peerState(m.node("b").id)?.inFlight).toBe(true);
    m.report("a", M, { inserts: [chain[2] as [string, string]], evicts: [] });
    expect(await m.until(() => a.sync.stats().batchesFailed > 0, 10_000)).toBe(true);
    m.drop = null;
    m.report("a", M, { inserts: [], evicts: [h1] });
    expect(await m.until(() => m.mirrors("b", "a", M, hashesOf(chain)) && a.sync.stats().pendingOps === 0, 30_000)).toBe(true);
    expect(m.node("b").index.peek(M)?.holds(a.id, h1)).toBe(false);
  });
});
