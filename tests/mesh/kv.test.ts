import { describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import { compareHlc } from "../../src/mesh/hlc";
import { generateIdentity, type Identity } from "../../src/mesh/identity";
import type { KvRange } from "../../src/mesh/kv";
import { Kv, type KvConfig, type OwnerDirectory } from "../../src/mesh/kv";
import { type KvRecord, signMark, signRecord } from "../../src/mesh/kv-record";
import { MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { seededRandom, VirtualClock } from "../../src/mesh/sim";
import type { WireMessage } from "../../src/mesh/wire";
import { workerKey } from "../../src/mesh/worker-info";
import { meshOf } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;

/** A store that knows `peers` as live members; no network. */
function store(me: Identity, peers: Identity[], clock: VirtualClock, config: Partial<KvConfig> = {}): Kv {
  const directory: OwnerDirectory = {
    peer: (id: string) => {
      const p = peers.find((x) => x.id === id);
      return p && { publicKey: p.publicKey, state: "alive" };
    },
  };
  return new Kv({ identity: me, directory, clock, log: silentLogger, config });
}

function shuffled<T>(xs: T[], random: () => number): T[] {
  const out = [...xs];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j] as T, out[i] as T];
  }
  return out;
}

describe("last writer wins by hybrid logical clock", () => {
  test("lww_converges_regardless_of_delivery_order", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const writer = store(a, [], clock);
    const written: KvRecord[] = [];
    const random = seededRandom(42);
    for (let i = 0; i < 40; i++) {
      const key = `k${i % 5}`;
      const r = random() < 0.3 ? writer.delete(key) : writer.put(key, `v${i}`);
      if (r.ok && r.value) written.push(r.value);
      // Several writes share a millisecond: the logical counter orders them.
      if (i % 3 === 0) clock.setTimer(() => {}, 1);
    }
    const final = (kv: Kv) => ["k0", "k1", "k2", "k3", "k4"].map((k) => kv.get(a.id, k)?.value ?? "absent");
    const expected = final(writer);
    for (let trial = 0; trial < 20; trial++) {
      const reader = store(generateIdentity(), [a], clock);
      // Every record is delivered, in any order, some twice.
      for (const r of shuffled([...written, ...written.slice(0, 10)], random)) reader.applyRemote(JSON.parse(JSON.stringify(r)));
      expect(final(reader)).toEqual(expected);
    }
  });

  test("hlc_orders_a_remote_write_after_what_it_has_seen_even_if_the_local_clock_lags", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const b = generateIdentity();
    const ahead = new VirtualClock(clock.now() + 5000);
    const kvA = store(a, [b], ahead);
    const kvB = store(b, [a], clock);
    const r = kvA.put("x", "1");
    if (!r.ok || !r.value) throw new Error("put failed");
    expect(kvB.applyRemote(r.value)).toBe(true);
    const mine = kvB.put("y", "2");
    if (!mine.ok || !mine.value) throw new Error("put failed");
    // b's wall clock is 5 s behind, yet its next write orders after the one it observed.
    expect(compareHlc(mine.value.hlc, r.value.hlc)).toBeGreaterThan(0);
  });

  test("record_from_too_far_in_the_future_is_refused_and_counted", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const kv = store(generateIdentity(), [a], clock, { maxClockDriftMs: 1000 });
    const r = signRecord(a, "x", "v", { w: clock.now() + 60_000, l: 0, n: a.id });
    expect(kv.applyRemote(r)).toBe(false);
    expect(kv.stats.rejectedClockSkew).toBe(1);
    expect(kv.get(a.id, "x")).toBeUndefined();
  });
});

describe("single-writer ownership", () => {
  test("forged_record_signed_by_the_wrong_key_is_rejected_and_counted", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const b = generateIdentity();
    const kv = store(generateIdentity(), [a, b], clock);
    const honest = signRecord(a, "worker:1", "real", { w: clock.now(), l: 0, n: a.id });
    expect(kv.applyRemote(honest)).toBe(true);
    // b signs a record that claims to be a's: newer, so it would win if it were believed.
    const byB = signRecord(b, "worker:1", "fake", { w: clock.now() + 10, l: 0, n: a.id });
    expect(kv.applyRemote({ ...byB, owner: a.id })).toBe(false);
    expect(kv.stats.rejectedForged).toBe(1);
    expect(kv.get(a.id, "worker:1")?.value).toBe("real");
  });

  test("record_stamped_by_another_node_than_its_owner_is_malformed", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const kv = store(generateIdentity(), [a], clock);
    const r = signRecord(a, "k", "v", { w: clock.now(), l: 0, n: generateIdentity().id });
    expect(kv.applyRemote(r)).toBe(false);
    expect(kv.stats.rejectedMalformed).toBe(1);
  });

  test("delete_of_another_nodes_key_is_refused", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const b = generateIdentity();
    const kvB = store(b, [a], clock);
    const put = signRecord(a, "worker:1", "v", { w: clock.now(), l: 0, n: a.id });
    kvB.applyRemote(put);
    const r = kvB.delete("worker:1", a.id);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.code).toBe("not_owner");
    expect(kvB.get(a.id, "worker:1")?.value).toBe("v");
    // Over the wire: a tombstone for a's key signed by b is a forgery.
    const kvC = store(generateIdentity(), [a, b], clock);
    kvC.applyRemote(put);
    const tomb = signRecord(b, "worker:1", null, { w: clock.now() + 5, l: 0, n: a.id });
    expect(kvC.applyRemote({ ...tomb, owner: a.id })).toBe(false);
    expect(kvC.stats.rejectedForged).toBe(1);
    expect(kvC.get(a.id, "worker:1")?.value).toBe("v");
  });

  test("record_of_an_unknown_owner_is_not_stored", () => {
    const clock = new VirtualClock();
    const stranger = generateIdentity();
    const kv = store(generateIdentity(), [], clock);
    expect(kv.applyRemote(signRecord(stranger, "k", "v", { w: clock.now(), l: 0, n: stranger.id }))).toBe(false);
    expect(kv.stats.rejectedUnknownOwner).toBe(1);
    expect(kv.size).toBe(0);
  });
});

describe("watermark claims", () => {
  const budget = () => ({ records: 64, bytes: 1 << 20 });

  test("refuses_watermark_claim_for_another_node", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const mallory = generateIdentity();
    const kvA = store(a, [], clock);
    const kv = store(generateIdentity(), [a, mallory], clock);
    const worker = kvA.put("worker:1", "up");
    // A member that is not a claims a's writes are complete up to next year, with no record and no mark of a's.
    const claim = { owner: a.id, after: null, upTo: { w: clock.now() + 365 * 86_400_000, l: 0, n: a.id }, records: [], more: false };
    kv.applyRange(JSON.parse(JSON.stringify(claim)));
    expect(kv.haveOf(a.id)).toBeUndefined();
    expect(kv.stats.rejectedUnsignedWatermarks).toBe(1);
    // So a's real record is not taken for one deleted since: it still gets in.
    expect(worker.ok && kv.applyRemote(JSON.parse(JSON.stringify(worker.value)))).toBe(true);
    expect(kv.get(a.id, "worker:1")?.value).toBe("up");
  });

  test("refuses_watermark_claim_with_a_mark_signed_by_another_key", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const mallory = generateIdentity();
    const kv = store(generateIdentity(), [a, mallory], clock);
    const upTo = { w: clock.now() + 60_000, l: 0, n: a.id };
    for (const mark of [signMark(mallory, upTo), signMark(mallory, { ...upTo, n: mallory.id }), "AAAA"]) {
      kv.applyRange({ owner: a.id, after: null, upTo, records: [], more: false, mark });
    }
    expect(kv.haveOf(a.id)).toBeUndefined();
    expect(kv.stats.rejectedUnsignedWatermarks).toBe(3);
    expect(kv.vectorVersion).toBe(0);
  });

  test("relayed_range_carries_the_owners_mark_and_advances_the_watermark_two_hops_away", () => {
    const clock = new VirtualClock();
    const [a, b, c] = [generateIdentity(), generateIdentity(), generateIdentity()];
    const kvA = store(a, [b, c], clock);
    const kvB = store(b, [a, c], clock);
    const kvC = store(c, [a, b], clock);
    kvA.put("k", "v");
    kvA.delete("k");
    // The tombstone, a's last write, was collected: no record of a's attests its watermark any more, only its mark.
    kvA.collect(() => true);
    const have = kvA.haveOf(a.id);
    const own = kvA.rangeFor(a.id, null, budget());
    expect(own?.records).toHaveLength(0);
    expect(own?.mark).toBeDefined();
    kvB.applyRange(JSON.parse(JSON.stringify(own)));
    expect(kvB.haveOf(a.id)).toEqual(have);
    const relayed = kvB.rangeFor(a.id, null, budget());
    expect(relayed?.mark).toBe(own?.mark);
    kvC.applyRange(JSON.parse(JSON.stringify(relayed)));
    expect(kvC.haveOf(a.id)).toEqual(have);
    expect(kvB.stats.rejectedUnsignedWatermarks + kvC.stats.rejectedUnsignedWatermarks).toBe(0);
  });
});

describe("store bounds", () => {
  test("keys_per_owner_bound_refuses_writes_and_remote_records_past_it", () => {
    const clock = new VirtualClock();
    const a = generateIdentity();
    const kvA = store(a, [], clock, { maxKeysPerOwner: 3 });
    for (let i = 0; i < 3; i++) expect(kvA.put(`k${i}`, "v").ok).toBe(true);
    const over = kvA.put("k3", "v");
    expect(over.ok).toBe(false);
    if (!over.ok) expect(over.code).toBe("owner_key_limit");
    // Updating an existing key is not growth.
    expect(kvA.put("k0", "v2").ok).toBe(true);
    const kvB = store(generateIdentity(), [a], clock, { maxKeysPerOwner: 3 });
    for (let i = 0; i < 5; i++) kvB.applyRemote(signRecord(a, `r${i}`, "v", { w: clock.now(), l: i, n: a.id }));
    expect(kvB.size).toBe(3);
    expect(kvB.stats.rejectedFull).toBe(2);
  });

  test("total_record_bound_refuses_past_it", () => {
    const clock = new VirtualClock();
    const owners = [generateIdentity(), generateIdentity(), generateIdentity()];
    const kv = store(generateIdentity(), owners, clock, { maxRecords: 4 });
    owners.forEach((o, i) => {
      kv.applyRemote(signRecord(o, "a", "v", { w: clock.now(), l: i, n: o.id }));
      kv.applyRemote(signRecord(o, "b", "v", { w: clock.now(), l: i, n: o.id }));
    });
    expect(kv.size).toBe(4);
    expect(kv.stats.rejectedFull).toBe(2);
    const r = kv.put("mine", "v");
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.code).toBe("store_full");
  });

  test("oversized_value_and_bad_key_are_refused_with_a_code", () => {
    const kv = store(generateIdentity(), [], new VirtualClock(), { maxValueBytes: 10 });
    const big = kv.put("k", "x".repeat(11));
    expect(big.ok ? "ok" : big.code).toBe("value_too_large");
    const bad = kv.put("has space", "v");
    expect(bad.ok ? "ok" : bad.code).toBe("bad_key");
    expect(kv.size).toBe(0);
  });
});

describe("anti-entropy", () => {
  test("unacked_records_are_resent_until_acked", async () => {
    const c = await meshOf(["a", "b", "c"]);
    let blocked = true;
    let pushes = 0;
    const kvTraffic = (t: string) => t === "kv-sync" || t === "kv-ack";
    c.net.dropIf = (from, to, msg) => {
      if (msg.type === "kv-sync" && from === "a:9337" && to === "b:9337" && JSON.stringify(msg).includes('"note"')) pushes++;
      return blocked && kvTraffic(msg.type) && (to === "b:9337" || from === "b:9337");
    };
    const a = c.node("a").core;
    a.store.put("note", "hello");
    await c.clock.advance(5 * ROUND);
    expect(c.node("b").core.store.get(a.id, "note")).toBeUndefined();
    expect(pushes).toBeGreaterThan(1);
    blocked = false;
    expect(await c.clock.until(() => c.node("b").core.store.get(a.id, "note")?.value === "hello", 5 * ROUND)).not.toBeNull();
  });

  test("sync_batches_are_bounded_and_deliver_everything", async () => {
    const c = await meshOf(["a", "b"], { config: { sync: { batchRecords: 4 } } });
    let biggest = 0;
    c.net.dropIf = (_from, _to, msg) => {
      if (msg.type === "kv-sync" || msg.type === "kv-ack") {
        const n = ((msg.ranges as KvRange[] | undefined) ?? []).reduce((s, r) => s + r.records.length, 0);
        biggest = Math.max(biggest, n);
      }
      return false;
    };
    const a = c.node("a").core;
    for (let i = 0; i < 30; i++) a.store.put(`k${i}`, `v${i}`);
    expect(await c.clock.until(() => [...c.node("b").core.store.live("k")].length === 30, 30 * ROUND)).not.toBeNull();
    expect(biggest).toBe(4);
  });

  test("each_record_reaches_each_node_about_once", async () => {
    const names = ["a", "b", "c", "d", "e", "f"];
    const c = await meshOf(names);
    await c.clock.advance(20 * ROUND);
    const sent = () => names.reduce((s, n) => s + c.node(n).core.stats().sync.recordsSent, 0);
    const before = sent();
    for (const n of names) c.node(n).core.store.put("load", "x".repeat(100));
    expect(
      await c.clock.until(
        () => names.every((o) => names.every((n) => c.node(o).core.store.get(c.node(n).identity.id, "load"))),
        20 * ROUND,
      ),
    ).not.toBeNull();
    await c.clock.advance(10 * ROUND);
    // 6 records, each needed by 5 other nodes: 30 deliveries; relaying everything to everyone would be 150.
    // A few more than 30 are pulls that cross an owner's push in flight.
    expect(sent() - before).toBeLessThan(75);
  });

  test("dead_nodes_keys_are_removed_everywhere", async () => {
    const c = await meshOf(["a", "b", "c", "d"]);
    const d = c.node("d").identity.id;
    c.node("d").core.store.put("extra", "x");
    expect(
      await c.clock.until(() => ["a", "b", "c"].every((n) => c.node(n).core.store.get(d, "extra") !== undefined), 10 * ROUND),
    ).not.toBeNull();
    c.kill("d");
    expect(await c.clock.until(() => c.allSee("d", "dead", ["a", "b", "c"]), 30 * ROUND)).not.toBeNull();
    await c.clock.advance(ROUND);
    for (const n of ["a", "b", "c"]) {
      const kv = c.node(n).core.store;
      expect([...kv.live()].filter((r) => r.owner === d)).toHaveLength(0);
      expect(kv.get(d, "extra")).toBeUndefined();
      expect(c.node(n).core.workers.routable("model-d")).toHaveLength(0);
    }
  });

  test("record_of_a_dead_owner_relayed_late_is_refused", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const old = c.node("c").core.store.get(
      c.node("c").identity.id,
      workerKey(
        c
          .node("c")
          .core.workers.list()
          .find((w) => w.origin === "local")?.info.id ?? "",
      ),
    );
    c.kill("c");
    expect(await c.clock.until(() => c.allSee("c", "dead", ["a", "b"]), 30 * ROUND)).not.toBeNull();
    expect(c.node("a").core.store.applyRemote(old)).toBe(false);
    expect(c.node("a").core.store.stats.rejectedOwnerDown).toBe(1);
  });
});

describe("tombstone collection", () => {
  test("tombstone_is_kept_until_every_live_member_acked_it", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const a = c.node("a").core;
    a.store.put("k", "v");
    expect(await c.clock.until(() => c.node("c").core.store.get(a.id, "k") !== undefined, 10 * ROUND)).not.toBeNull();
    // c stays a healthy member (SWIM works) but receives no store sync.
    c.net.dropIf = (f, to, msg) => (msg.type === "kv-sync" || msg.type === "kv-ack") && (to === "c:9337" || f === "c:9337");
    a.store.delete("k");
    await c.clock.advance(40 * ROUND);
    expect(c.stateOf("a", "c")).toBe("alive");
    expect(a.store.get(a.id, "k")?.value).toBeNull();
    expect(a.store.stats.tombstonesCollected).toBe(0);
    c.net.dropIf = null;
    expect(
      await c.clock.until(() => ["a", "b", "c"].every((n) => c.node(n).core.store.get(a.id, "k") === undefined), 20 * ROUND),
    ).not.toBeNull();
    // Collected once per node and gone for good: copies still in flight do not bring it back.
    await c.clock.advance(20 * ROUND);
    for (const n of ["a", "b", "c"]) {
      expect(c.node(n).core.store.get(a.id, "k")).toBeUndefined();
      expect(c.node(n).core.store.stats.tombstonesCollected).toBe(1);
    }
  });

  test("tombstone_gc_does_not_resurrect_a_key_when_a_peer_that_missed_the_delete_reconnects", async () => {
    // The seed's scenario: a peer misses a delete and stays away (frozen, so it keeps its old state)
    // well past any grace period; the tombstone is collected; the peer comes back holding the older
    // put. With forgetAfterRounds short, the others no longer even remember it when it returns.
    const c = await meshOf(["a", "b", "c"], { config: { membership: { forgetAfterRounds: 8 } } });
    const a = c.node("a").core;
    const worker = a.workers.list().find((w) => w.origin === "local")?.info.id as string;
    const key = workerKey(worker);
    c.pause("c");
    a.workers.remove(worker);
    expect(
      await c.clock.until(() => a.store.stats.tombstonesCollected > 0 && c.node("b").core.store.stats.tombstonesCollected > 0, 60 * ROUND),
    ).not.toBeNull();
    expect(await c.clock.until(() => c.allSee("c", undefined, ["a", "b"]), 60 * ROUND)).not.toBeNull();
    expect(a.store.get(a.id, key)).toBeUndefined();
    expect(c.node("c").core.store.get(a.id, key)?.value).toBeString();
    c.resume("c");
    await c.join("c", "a");
    let resurrected = false;
    const healed = await c.clock.until(
      () => {
        for (const n of ["a", "b"]) {
          if (c.node(n).core.store.get(a.id, key)?.value) resurrected = true;
          if (c.node(n).core.workers.get(worker)) resurrected = true;
        }
        return c.converged() && c.node("c").core.store.get(a.id, key) === undefined;
      },
      60 * ROUND,
      ROUND / 4,
    );
    expect(healed).not.toBeNull();
    expect(resurrected).toBe(false);
    await c.clock.advance(10 * ROUND);
    for (const n of ["a", "b", "c"]) {
      expect(c.node(n).core.workers.get(worker)).toBeUndefined();
      expect(c.node(n).core.workers.list()).toHaveLength(2);
    }
  });

  test("delayed_batch_sent_before_a_delete_cannot_resurrect_the_key_after_collection", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const owner = c.node("c").core;
    // c's push of its put to b is held up in the network (not lost); b gets the put from a meanwhile.
    let held: WireMessage | null = null;
    c.net.dropIf = (from, to, msg) => {
      if (held || from !== "c:9337" || to !== "b:9337" || msg.type !== "kv-sync") return false;
      if (!JSON.stringify(msg.ranges).includes('"key":"k"')) return false;
      held = JSON.parse(JSON.stringify(msg));
      return true;
    };
    owner.store.put("k", "v");
    expect(await c.clock.until(() => held !== null, 20 * ROUND)).not.toBeNull();
    c.net.dropIf = null;
    owner.store.delete("k");
    expect(
      await c.clock.until(() => ["a", "b", "c"].every((n) => c.node(n).core.store.stats.tombstonesCollected === 1), 60 * ROUND),
    ).not.toBeNull();
    // The old batch finally arrives, after b collected the tombstone that made its put obsolete.
    const reply = await c.wait(c.node("b").core.handle(held as unknown as WireMessage));
    expect(reply).toMatchObject({ type: "kv-ack", ok: false, code: "stale_seq" });
    expect(c.node("b").core.store.get(owner.id, "k")).toBeUndefined();
    // Even replayed as a fresh message, its put is below b's watermark for c, for a key b no longer holds.
    expect(c.node("b").core.store.applyRemote((held as unknown as { ranges: KvRange[] }).ranges[0]?.records[0])).toBe(false);
    expect(c.node("b").core.store.get(owner.id, "k")).toBeUndefined();
  });

  test("partitioned_peer_drops_the_owners_keys_and_gets_the_delete_after_healing", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const a = c.node("a").core;
    const worker = a.workers.list().find((w) => w.origin === "local")?.info.id as string;
    c.net.partition([["a:9337", "b:9337"], ["c:9337"]]);
    a.workers.remove(worker);
    expect(await c.clock.until(() => a.store.stats.tombstonesCollected > 0, 60 * ROUND)).not.toBeNull();
    // On its side, c declared a dead and dropped a's keys: it holds no stale put to replay.
    expect(c.stateOf("c", "a")).toBe("dead");
    expect(c.node("c").core.store.get(a.id, workerKey(worker))).toBeUndefined();
    c.net.heal();
    expect(await c.clock.until(() => c.converged(), 60 * ROUND)).not.toBeNull();
    await c.clock.advance(5 * ROUND);
    for (const n of ["a", "b", "c"]) {
      expect(c.node(n).core.workers.get(worker)).toBeUndefined();
      expect(c.node(n).core.workers.list()).toHaveLength(2);
    }
  });

  test("peer_cut_off_past_the_forget_time_drops_stale_state_on_return", async () => {
    const c = await meshOf(["a", "b", "c"], { config: { membership: { forgetAfterRounds: 8 } } });
    const a = c.node("a").core;
    a.store.put("k", "v");
    expect(await c.clock.until(() => c.node("c").core.store.get(a.id, "k") !== undefined, 10 * ROUND)).not.toBeNull();
    c.net.partition([["a:9337", "b:9337"], ["c:9337"]]);
    a.store.delete("k");
    // Long enough for a and b to forget c entirely, and for c to declare both dead.
    expect(await c.clock.until(() => c.allSee("c", undefined, ["a", "b"]), 60 * ROUND)).not.toBeNull();
    expect(a.store.get(a.id, "k")).toBeUndefined();
    c.net.heal();
    let resurrected = false;
    const healed = await c.clock.until(
      () => {
        if (["a", "b"].some((n) => c.node(n).core.store.get(a.id, "k")?.value)) resurrected = true;
        return c.converged() && c.node("c").core.store.get(a.id, "k") === undefined;
      },
      60 * ROUND,
      ROUND / 4,
    );
    expect(healed).not.toBeNull();
    expect(resurrected).toBe(false);
  });
});
