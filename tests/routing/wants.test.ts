import { describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import { generateIdentity } from "../../src/mesh/identity";
import { Kv } from "../../src/mesh/kv";
import { VirtualClock } from "../../src/mesh/sim";
import { MAX_PEER_WANTS, WANT_KEY, Wants } from "../../src/routing/wants";

/** This node's store and wants, and a peer whose records can be delivered to it. */
function setup(config = {}) {
  const clock = new VirtualClock();
  const me = generateIdentity();
  const peer = generateIdentity();
  const directory = { peer: (id: string) => (id === peer.id ? { publicKey: peer.publicKey, state: "alive" } : undefined) };
  const store = new Kv({ identity: me, directory, clock, log: silentLogger });
  const theirs = new Kv({ identity: peer, directory: { peer: () => undefined }, clock, log: silentLogger });
  const wants = new Wants({ selfId: me.id, store, now: () => clock.now(), config });
  /** The peer writes `value` as its wanted set, and it reaches this node. */
  const peerWrites = (value: string) => {
    const r = theirs.put(WANT_KEY, value);
    if (!r.ok || !r.value) throw new Error("put failed");
    store.applyRemote(r.value);
    return wants.refresh(peer.id);
  };
  return { clock, me, peer, store, wants, peerWrites };
}

describe("routing wants", () => {
  test("routed_models_expire_after_the_ttl_and_served_ones_stay", async () => {
    const { clock, wants } = setup({ wantTtlMs: 10_000 });
    expect(wants.setServed(["served"])).toEqual({ added: ["served"], removed: [] });
    expect(wants.noteRouted("routed")).toEqual({ added: ["routed"], removed: [] });
    await clock.advance(6000);
    wants.noteRouted("routed");
    await clock.advance(6000);
    expect(wants.expire()).toBeNull();
    await clock.advance(5000);
    expect(wants.expire()).toEqual({ added: [], removed: ["routed"] });
    expect([...wants.mine()]).toEqual(["served"]);
    expect(wants.nextExpiry).toBe(Number.POSITIVE_INFINITY);
  });

  test("the_wanted_set_is_bounded_and_the_least_recently_routed_goes", () => {
    const { wants } = setup({ maxWanted: 4 });
    for (let i = 0; i < 10; i++) wants.noteRouted(`m${i}`);
    expect([...wants.mine()].sort()).toEqual(["m6", "m7", "m8", "m9"]);
    expect(wants.displaced).toBe(6);
    expect(wants.noteRouted("bad name")).toBeNull();
    expect(wants.mine().size).toBe(4);
  });

  test("the_record_is_written_only_when_the_set_changes", () => {
    const { store, me, wants } = setup();
    expect(wants.dirty).toBe(false);
    expect(wants.flush()).toBe(false);
    wants.noteRouted("m");
    expect(wants.dirty).toBe(true);
    expect(wants.flush()).toBe(true);
    const rec = store.get(me.id, WANT_KEY);
    expect(rec?.value).toBe('["m"]');
    for (let i = 0; i < 1000; i++) wants.noteRouted("m");
    expect(wants.dirty).toBe(false);
    expect(wants.flush()).toBe(false);
    expect(store.get(me.id, WANT_KEY)).toBe(rec);
  });

  test("peers_sets_are_read_from_the_store_with_a_reverse_map", () => {
    const { peer, wants, peerWrites } = setup();
    expect(peerWrites('["a","b"]')).toEqual({ added: ["a", "b"], removed: [] });
    expect([...wants.wanting("a")]).toEqual([peer.id]);
    expect(peerWrites('["b","c"]')).toEqual({ added: ["c"], removed: ["a"] });
    expect(wants.wanting("a").size).toBe(0);
    expect([...wants.of(peer.id)].sort()).toEqual(["b", "c"]);
    expect(wants.forget(peer.id)).toEqual({ added: [], removed: ["b", "c"] });
    expect(wants.peerIds()).toEqual([]);
  });

  test("a_peer_record_that_does_not_parse_or_is_too_long_wants_nothing", () => {
    const { peer, wants, peerWrites } = setup();
    peerWrites('["a"]');
    for (const bad of [
      "not json",
      '{"a":1}',
      '["ok", 7]',
      '["has space"]',
      JSON.stringify(Array.from({ length: MAX_PEER_WANTS + 1 }, (_, i) => `m${i}`)),
    ]) {
      peerWrites(bad);
      expect(wants.of(peer.id).size).toBe(0);
    }
    expect(wants.malformed).toBe(5);
  });
});
