import { describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import type { Hlc } from "../../src/mesh/hlc";
import { generateIdentity } from "../../src/mesh/identity";
import { Kv } from "../../src/mesh/kv";
import { KvSync } from "../../src/mesh/kv-sync";
import { MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { VirtualClock } from "../../src/mesh/sim";
import { vectorDigest } from "../../src/mesh/vector";
import type { NodeId, WireMessage } from "../../src/mesh/wire";
import { workerKey } from "../../src/mesh/worker-info";
import { meshOf, spec } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;
const NEXT_YEAR = 365 * 86_400_000;

/** A full pull vector saying its sender holds everything of `ids` up to `h`, with a matching digest. */
function fullVector(ids: NodeId[], h: { w: number; l: number }): { vec: [NodeId, number, number][]; full: true; digest: string } {
  const rows = new Map<NodeId, Hlc>(ids.map((id) => [id, { ...h, n: id }]));
  return { vec: [...rows].map(([id, x]) => [id, x.w, x.l]), full: true, digest: vectorDigest(rows) };
}

describe("sync messages speak only for their sender", () => {
  test("ack_from_unverified_sender_does_not_advance_gc", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const [a, b, owner] = ["a", "b", "c"].map((n) => c.node(n));
    if (!a || !b || !owner) throw new Error("no node");
    // b stays a healthy member but gets no store sync, so it never acks c's delete; a real message of b's
    // to c gives the epochs a forger would use.
    let template: WireMessage | null = null;
    c.net.dropIf = (from, to, msg) => {
      if (msg.type !== "kv-sync" && msg.type !== "kv-ack") return false;
      if (from === b.addr && to === owner.addr && msg.type === "kv-sync") template ??= JSON.parse(JSON.stringify(msg));
      return from === b.addr || to === b.addr;
    };
    owner.core.store.put("k", "v");
    owner.core.store.delete("k");
    expect(await c.clock.until(() => template !== null, 20 * ROUND)).not.toBeNull();
    // a, which holds the mesh secret and authenticates as itself, sends c an ack in b's name for everything up to next year.
    const forged = { ...(template as unknown as WireMessage), seq: 1e9, pull: true, askFull: false, ranges: [] };
    Object.assign(forged, fullVector([a.identity.id, b.identity.id, owner.identity.id], { w: c.clock.now() + NEXT_YEAR, l: 0 }));
    const reply = await c.wait(owner.core.handle(forged, a.identity.id));
    expect(reply).toMatchObject({ type: "kv-ack", ok: false, code: "wrong_sender" });
    expect(owner.core.stats().sync.rejectedSender).toBe(1);
    await c.clock.advance(20 * ROUND);
    expect(owner.core.store.stats.tombstonesCollected).toBe(0);
    expect(owner.core.store.get(owner.identity.id, "k")?.value).toBeNull();
    // Nothing of b's sync state moved: once b really hears of the delete and acks it, the tombstone goes.
    c.net.dropIf = null;
    expect(await c.clock.until(() => owner.core.store.stats.tombstonesCollected === 1, 40 * ROUND)).not.toBeNull();
  });

  test("ack_in_a_reply_from_another_node_than_the_one_asked_is_not_taken", async () => {
    const clock = new VirtualClock();
    const me = generateIdentity();
    const peer = generateIdentity();
    const other = generateIdentity();
    const members = new Map([peer, other].map((p) => [p.id, { addr: `${p.id}:1`, epoch: "e", state: "alive", publicKey: p.publicKey }]));
    const directory = { id: me.id, self: { epoch: "e" }, liveIds: () => [peer.id], peer: (id: NodeId) => members.get(id) };
    const kv = new Kv({ identity: me, directory, clock, log: silentLogger });
    const tomb = kv.put("k", "v") && kv.delete("k");
    const hlc = tomb.ok ? tomb.value?.hlc : undefined;
    if (!hlc) throw new Error("no tombstone");
    // Whoever answers at the peer's address replies with another node's id and a vector acking everything.
    const transport = {
      request: async (): Promise<WireMessage> => ({
        type: "kv-ack",
        ok: true,
        id: other.id,
        ranges: [],
        ...fullVector([me.id], { w: hlc.w + NEXT_YEAR, l: 0 }),
      }),
    };
    const sync = new KvSync({ kv, directory, transport, clock, log: silentLogger, random: () => 0 });
    sync.start();
    sync.round();
    await new Promise((r) => setImmediate(r));
    sync.stop();
    expect(sync.stats.rejectedSender).toBe(1);
    expect(sync.stable(me.id, hlc)).toBe(false);
    kv.collect((o, h) => sync.stable(o, h));
    expect(kv.stats.tombstonesCollected).toBe(0);
  });

  test("forged_watermark_for_another_node_does_not_hide_its_later_workers", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const [a, b, owner] = ["a", "b", "c"].map((n) => c.node(n));
    if (!a || !b || !owner) throw new Error("no node");
    // a, authenticated as itself, pushes b a range of c's claiming c's writes are all in, up to next year.
    let template: WireMessage | null = null;
    c.net.dropIf = (from, to, msg) => {
      if (from === a.addr && to === b.addr && msg.type === "kv-sync") template ??= JSON.parse(JSON.stringify(msg));
      return false;
    };
    expect(await c.clock.until(() => template !== null, 20 * ROUND)).not.toBeNull();
    c.net.dropIf = null;
    const before = b.core.store.haveOf(owner.identity.id);
    const upTo = { w: c.clock.now() + NEXT_YEAR, l: 0, n: owner.identity.id };
    const claim = { owner: owner.identity.id, after: before ?? null, upTo, records: [], more: false };
    const push = { ...(template as unknown as WireMessage), seq: 1e9, pull: false, ranges: [claim] };
    expect(await c.wait(b.core.handle(push, a.identity.id))).toMatchObject({ type: "kv-ack", ok: true });
    expect(b.core.store.haveOf(owner.identity.id)).toEqual(before);
    expect(b.core.stats().kv.rejectedUnsignedWatermarks).toBe(1);
    // c's next worker reaches b, and through b's pulls everyone: nobody takes it for a record deleted long ago.
    const reg = owner.core.workers.register(spec("c", { addr: "c:8081", models: ["late"] }));
    if (!reg.ok) throw new Error(reg.message);
    expect(
      await c.clock.until(() => b.core.store.get(owner.identity.id, workerKey(reg.value.id)) !== undefined, 20 * ROUND),
    ).not.toBeNull();
    expect(b.core.store.stats.stale).toBe(0);
  });
});
