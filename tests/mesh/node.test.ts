import { describe, expect, test } from "bun:test";
import { generateIdentity } from "../../src/mesh/identity";
import { signRecord } from "../../src/mesh/kv-record";
import { signSelf } from "../../src/mesh/member";
import { MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import type { WireMessage } from "../../src/mesh/wire";
import { meshOf } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;

describe("inbound messages", () => {
  test("malformed_or_unknown_messages_get_an_error_code_and_change_nothing", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a").core;
    const before = JSON.stringify([a.members().map((m) => [m.id, m.state, m.incarnation]), [...a.store.live()].length]);
    const bad: unknown[] = [
      null,
      "ping",
      { type: 7 },
      { type: "nope" },
      { type: "ping", from: 1, to: a.id },
      {
        type: "ping",
        from: signSelf(c.node("b").identity, { name: "b", addr: "b:9337", epoch: "e", inc: 0, state: "alive" }),
        to: a.id,
        updates: "x",
      },
      { type: "kv-sync", id: "zz", epoch: "e" },
      { type: "kv-sync", id: generateIdentity().id, epoch: "e", toEpoch: "e", seq: 1, ranges: [] },
      { type: "join", from: { id: a.id } },
    ];
    const replies: WireMessage[] = [];
    for (const m of bad) replies.push(await c.wait(a.handle(m as WireMessage)));
    for (const r of replies.slice(0, 5)) expect(r.type).toBe("error");
    // A valid ping with a malformed update list is answered; the list is counted and ignored.
    expect(replies[5]?.type).toBe("ack");
    expect(a.stats().membership.malformedRecords).toBeGreaterThan(0);
    expect(replies[6]).toMatchObject({ type: "kv-ack", ok: false, code: "bad_message" });
    expect(replies[7]).toMatchObject({ type: "kv-ack", ok: false, code: "not_member" });
    expect(replies[8]?.type).toBe("error");
    expect(JSON.stringify([a.members().map((m) => [m.id, m.state, m.incarnation]), [...a.store.live()].length])).toBe(before);
  });

  test("kv_sync_claiming_a_member_from_another_epoch_is_refused", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a").core;
    const b = c.node("b");
    const rec = signRecord(b.identity, "k", "v", b.core.store.hlc.tick());
    const msg = {
      type: "kv-sync",
      id: b.identity.id,
      epoch: "old-life",
      toEpoch: "x",
      seq: 99,
      ranges: [{ owner: b.identity.id, after: null, upTo: rec.hlc, records: [rec], more: false }],
    };
    const reply = await c.wait(a.handle(msg));
    expect(reply).toMatchObject({ ok: false, code: "stale_epoch" });
    expect(a.store.get(b.identity.id, "k")).toBeUndefined();
  });

  test("a_membership_message_carrying_another_nodes_record_is_refused_before_any_state_change", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const a = c.node("a").core;
    const b = c.node("b");
    const stranger = generateIdentity();
    // B's transport identity, but a record of a node A has never seen (a replay or a lie).
    const from = signSelf(stranger, { name: "x", addr: "x:1", epoch: "e", inc: 0, state: "alive" });
    const reply = await c.wait(a.handle({ type: "ping", from, to: a.id, updates: [] }, b.identity.id));
    expect(reply).toMatchObject({ type: "error", code: "wrong_sender" });
    expect(a.members().some((m) => m.id === stranger.id)).toBe(false);
    expect(a.stats().membership.wrongSender).toBe(1);
    // Its own record from its own transport identity is fine.
    const own = signSelf(b.identity, { name: "b", addr: "b:9337", epoch: "e2", inc: 0, state: "alive" });
    const ok = await c.wait(a.handle({ type: "ping", from: own, to: a.id, updates: [] }, b.identity.id));
    expect(ok.type).toBe("ack");
  });

  test("stopped_node_answers_nothing_but_an_error", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a").core;
    a.stop();
    const from = signSelf(generateIdentity(), { name: "x", addr: "x:1", epoch: "e", inc: 0, state: "alive" });
    expect(await c.wait(a.handle({ type: "ping", from, to: a.id, updates: [] }))).toMatchObject({ type: "error", code: "stopped" });
    expect(a.members().some((m) => m.name === "x")).toBe(false);
  });
});

describe("bounded work for others", () => {
  test("indirect_probes_run_for_others_are_bounded", async () => {
    const c = await meshOf(["a", "b", "c"], { config: { membership: { maxRelays: 0 } } });
    c.net.cutLink("a:9337", "b:9337");
    c.net.cutLink("b:9337", "a:9337");
    // With no relay capacity anywhere, nobody probes for a: b is suspected by a (and a by b).
    expect(await c.clock.until(() => c.stateOf("a", "b") === "suspect" || c.stateOf("b", "a") === "suspect", 20 * ROUND)).not.toBeNull();
    expect(c.node("c").core.stats().membership.relaysRefused).toBeGreaterThan(0);
  });

  test("worker_listeners_are_bounded", async () => {
    const c = await meshOf(["a"], { config: { workers: { maxListeners: 2 } } });
    const w = c.node("a").core.workers;
    const off = w.on(() => {});
    w.on(() => {});
    expect(() => w.on(() => {})).toThrow(/listeners/);
    off();
    expect(() => w.on(() => {})).not.toThrow();
  });
});
