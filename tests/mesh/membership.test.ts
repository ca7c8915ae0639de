import { describe, expect, test } from "bun:test";
import { generateIdentity } from "../../src/mesh/identity";
import { signClaim, signSelf } from "../../src/mesh/member";
import { failureDetectionBoundMs, MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { SimRefused } from "../../src/mesh/sim";
import { SimCluster } from "../../src/mesh/sim-cluster";
import type { WireMessage } from "../../src/mesh/wire";
import { incarnationOf, meshOf, pingWith, spec, strangerRecord } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;

describe("SWIM failure detection", () => {
  test("killed_node_goes_suspect_then_dead_within_the_stated_bound", async () => {
    const names = ["a", "b", "c", "d", "e"];
    const c = await meshOf(names);
    const observers = names.slice(0, 4);
    const start = c.clock.now();
    c.kill("e");
    let sawSuspect = false;
    const took = await c.clock.until(
      () => {
        if (observers.some((o) => c.stateOf(o, "e") === "suspect")) sawSuspect = true;
        return c.allSee("e", "dead", observers);
      },
      failureDetectionBoundMs(names.length) + ROUND,
      ROUND / 10,
    );
    expect(took).not.toBeNull();
    expect(c.clock.now() - start).toBeLessThanOrEqual(failureDetectionBoundMs(names.length));
    // SWIM never jumps straight to dead: a suspicion comes first, and lasts the suspicion timeout.
    expect(sawSuspect).toBe(true);
    expect(took as number).toBeGreaterThanOrEqual(MEMBERSHIP_DEFAULTS.suspicionRounds * ROUND);
    const deaths = observers.reduce((s, o) => s + c.node(o).core.stats().membership.deaths, 0);
    expect(deaths).toBeGreaterThan(0);
  });

  test("suspected_live_node_refutes_with_a_higher_incarnation_and_stays_alive", async () => {
    const names = ["a", "b", "c", "d"];
    const c = await meshOf(names);
    const before = incarnationOf(c, "a", "d") as number;
    // Nothing reaches d for a while: someone suspects it.
    for (const n of ["a", "b", "c"]) c.net.cutLink(`${n}:9337`, "d:9337");
    expect(await c.clock.until(() => ["a", "b", "c"].some((o) => c.stateOf(o, "d") === "suspect"), 20 * ROUND)).not.toBeNull();
    c.net.restoreLinks();
    let everDead = false;
    await c.clock.until(
      () => {
        if (["a", "b", "c"].some((o) => c.stateOf(o, "d") === "dead")) everDead = true;
        return false;
      },
      3 * MEMBERSHIP_DEFAULTS.suspicionRounds * ROUND,
      ROUND / 4,
    );
    expect(everDead).toBe(false);
    expect(c.allSee("d", "alive")).toBe(true);
    for (const o of ["a", "b", "c"]) expect(incarnationOf(c, o, "d") as number).toBeGreaterThan(before);
    expect(c.node("d").core.stats().membership.refutations).toBeGreaterThan(0);
  });

  test("indirect_probe_saves_a_member_whose_direct_link_is_broken", async () => {
    const names = ["a", "b", "c", "d"];
    const c = await meshOf(names);
    c.net.cutLink("a:9337", "b:9337");
    c.net.cutLink("b:9337", "a:9337");
    let everSuspect = false;
    await c.clock.until(
      () => {
        if (c.stateOf("a", "b") !== "alive" || c.stateOf("b", "a") !== "alive") everSuspect = true;
        return false;
      },
      30 * ROUND,
      ROUND / 4,
    );
    expect(everSuspect).toBe(false);
    expect(c.node("a").core.stats().membership.directProbeFailures).toBeGreaterThan(0);
    expect(c.node("a").core.stats().membership.indirectSaves).toBeGreaterThan(0);
    expect(c.converged()).toBe(true);
  });

  test("members_behind_links_slower_than_the_probe_timeout_are_not_suspected", async () => {
    // 220-260 ms each way: every round trip is longer than the 400 ms direct probe timeout (found by the fault suite,
    // where 200 ms of delay on every link had each member suspected and declared dead in turn).
    const names = ["a", "b", "c", "d", "e"];
    const c = await meshOf(names, { latencyMs: [220, 260] });
    const suspicions = () => names.reduce((s, n) => s + c.node(n).core.stats().membership.suspicions, 0);
    const before = suspicions();
    await c.clock.until(() => false, 40 * ROUND, ROUND);
    expect(suspicions()).toBe(before);
    expect(c.converged()).toBe(true);
    const rtt = c
      .node("a")
      .core.members()
      .find((m) => !m.self)?.rttMs;
    expect(rtt as number).toBeGreaterThan(MEMBERSHIP_DEFAULTS.probeTimeoutMs);
  });

  test("graceful_leave_propagates_as_left_and_removes_its_workers", async () => {
    const names = ["a", "b", "c", "d"];
    const c = await meshOf(names);
    await c.wait(c.node("d").core.leave());
    c.net.kill("d:9337");
    // A leave is announced to everyone at once: no probe, no suspicion timeout.
    expect(await c.clock.until(() => c.allSee("d", "left", ["a", "b", "c"]), 2 * ROUND, 10)).not.toBeNull();
    for (const o of ["a", "b", "c"]) {
      expect(c.node(o).core.workers.routable("model-d")).toHaveLength(0);
      expect(c.node(o).core.workers.list()).toHaveLength(3);
      expect(c.node(o).core.stats().membership.suspicions).toBe(0);
    }
  });

  test("restarted_node_rejoins_with_a_higher_incarnation_and_the_same_worker_id", async () => {
    const names = ["a", "b", "c"];
    const c = await meshOf(names);
    const identity = c.node("c").identity;
    const workerId = c
      .node("c")
      .core.workers.list()
      .find((w) => w.origin === "local")?.info.id;
    c.kill("c");
    expect(await c.clock.until(() => c.allSee("c", "dead", ["a", "b"]), failureDetectionBoundMs(3))).not.toBeNull();
    const deadAt = incarnationOf(c, "a", "c") as number;
    c.add("c", identity);
    await c.join("c", "a");
    c.node("c").core.workers.register(spec("c"));
    expect(await c.clock.until(() => c.converged(), 20 * ROUND)).not.toBeNull();
    expect(incarnationOf(c, "a", "c") as number).toBeGreaterThan(deadAt);
    expect(incarnationOf(c, "b", "c") as number).toBeGreaterThan(deadAt);
    expect(
      await c.clock.until(() => ["a", "b"].every((o) => c.node(o).core.workers.get(workerId as string)?.routable === true), 20 * ROUND),
    ).not.toBeNull();
  });

  test("restart_before_detection_outranks_the_old_incarnation", async () => {
    const names = ["a", "b", "c"];
    const c = await meshOf(names);
    const identity = c.node("c").identity;
    const before = incarnationOf(c, "a", "c") as number;
    c.kill("c");
    // Back within a round: peers still hold its previous life as alive, at the same incarnation.
    c.add("c", identity);
    await c.join("c", "a");
    expect(
      await c.clock.until(
        () => (incarnationOf(c, "a", "c") as number) > before && (incarnationOf(c, "b", "c") as number) > before,
        20 * ROUND,
      ),
    ).not.toBeNull();
    expect(c.converged()).toBe(true);
  });
});

describe("declared dead, back without a reset", () => {
  test("a_member_that_outranks_its_death_without_resetting_stays_dead_until_it_resets", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const b = c.node("b");
    const stranger = strangerRecord();
    const about = { id: b.identity.id, publicKey: b.identity.publicKey, inc: incarnationOf(c, "a", "b") as number };
    // b refutes a suspicion (no reset: suspicion is not death) and freezes before it can gossip that.
    const ack = await pingWith(c, "b", [signClaim(c.node("c").identity, { ...about, state: "suspect" })], stranger);
    const refuted = ack.from;
    c.pause("b");
    expect(b.core.stats().membership.selfResets).toBe(0);
    // Meanwhile a declares b dead at the old incarnation (the suspicion before the refutation timed out).
    const a = c.node("a");
    await pingWith(c, "a", [signClaim(c.node("c").identity, { ...about, state: "dead" })], stranger);
    expect(c.stateOf("a", "b")).toBe("dead");
    // b's refutation reaches a: it outranks the death, but b never reset (same epoch).
    await pingWith(c, "a", [refuted], stranger);
    expect(c.stateOf("a", "b")).toBe("dead");
    expect(a.core.stats().membership.unresetReturns).toBe(1);
    // Thawed, b hears it was declared dead, drops what others wrote, and returns with a new epoch.
    c.resume("b");
    expect(await c.clock.until(() => b.core.stats().membership.selfResets > 0, 10 * ROUND)).not.toBeNull();
    expect(await c.clock.until(() => c.allSee("b", "alive", ["a", "c"]), 20 * ROUND)).not.toBeNull();
    expect(incarnationOf(c, "a", "b") as number).toBeGreaterThan(about.inc + 1);
  });
});

describe("declared dead, then left or heard about late (review findings)", () => {
  test("a_member_declared_dead_that_then_leaves_is_left_not_kept_dead", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const [a, b] = [c.node("a"), c.node("b")];
    const stranger = strangerRecord();
    const about = { id: b.identity.id, publicKey: b.identity.publicKey, inc: incarnationOf(c, "a", "b") as number };
    const rec = (await c.wait(b.core.handle({ type: "ping", from: stranger, to: b.identity.id }))).from as {
      name: string;
      addr: string;
      epoch: string;
      inc: number;
    };
    c.pause("b");
    await pingWith(c, "a", [signClaim(c.node("c").identity, { ...about, state: "dead" })], stranger);
    expect(c.stateOf("a", "b")).toBe("dead");
    // b (same life, never reset) shuts down gracefully: its own signed "left" at the same incarnation.
    const left = signSelf(b.identity, { name: rec.name, addr: rec.addr, epoch: rec.epoch, inc: rec.inc, state: "left" });
    await c.wait(a.core.handle({ type: "leave", from: left }, b.identity.id));
    expect(c.stateOf("a", "b")).toBe("left");
    expect(a.core.stats().membership.unresetReturns).toBe(0);
  });

  test("a_peers_dead_claim_ahead_of_what_we_know_is_not_counted_as_forged", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const [a, b, cc] = [c.node("a"), c.node("b"), c.node("c")];
    const stranger = strangerRecord();
    const about = { id: b.identity.id, publicKey: b.identity.publicKey, inc: incarnationOf(c, "a", "b") as number };
    const ack = await pingWith(c, "b", [signClaim(cc.identity, { ...about, state: "suspect" })], stranger);
    c.pause("b");
    const dead = signClaim(cc.identity, { ...about, state: "dead" });
    for (const n of [a, cc]) await c.wait(n.core.handle({ type: "ping", from: stranger, to: n.identity.id, updates: [dead] }));
    // b's refutation reaches a only; a keeps b dead at the new incarnation and says so to c, which has not heard it.
    await pingWith(c, "a", [ack.from], stranger);
    expect(a.core.stats().membership.unresetReturns).toBe(1);
    const forged = cc.core.stats().membership.forgedRecords;
    await c.clock.advance(20 * ROUND);
    expect(cc.core.stats().membership.forgedRecords).toBe(forged);
    expect(c.stateOf("c", "b")).toBe("dead");
  });
});

describe("signed membership records", () => {
  test("alive_record_signed_by_the_wrong_key_is_rejected_and_counted", async () => {
    const c = await meshOf(["a", "b"]);
    const victim = c.node("b").identity;
    const forger = generateIdentity();
    const honest = signSelf(victim, { name: "b", addr: "evil:1", epoch: "x", inc: 99, state: "alive" });
    const forgedSig = signSelf(forger, { name: "b", addr: "evil:1", epoch: "x", inc: 99, state: "alive" }).sig;
    const from = signSelf(forger, { name: "forger", addr: "forger:1", epoch: "y", inc: 0, state: "alive" });
    const reply = await pingWith(c, "a", [{ ...honest, sig: forgedSig }], from);
    expect(reply.type).toBe("ack");
    expect(c.node("a").core.stats().membership.forgedRecords).toBe(1);
    const b = c
      .node("a")
      .core.members()
      .find((m) => m.id === victim.id);
    expect(b?.addr).toBe("b:9337");
    expect(b?.incarnation).toBeLessThan(99);
  });

  test("a_dead_claim_at_a_higher_incarnation_than_known_is_refused", async () => {
    // Only a node raises its own incarnation; a claim far ahead would force a
    // refutation past the largest safe integer and lock the node out.
    const c = await meshOf(["a", "b"]);
    const victim = c.node("b").identity;
    const from = strangerRecord();
    const claim = { id: victim.id, publicKey: victim.publicKey, inc: Number.MAX_SAFE_INTEGER, state: "dead" as const };
    await pingWith(c, "a", [claim], from);
    const b = c
      .node("a")
      .core.members()
      .find((m) => m.id === victim.id);
    expect(b?.state).toBe("alive");
    expect(b?.incarnation).toBeLessThan(1000);
  });

  test("forged_dead_claim_without_a_valid_claimer_signature_is_rejected_and_counted", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const victim = c.node("b").identity;
    const inc = incarnationOf(c, "a", "b") as number;
    const forger = generateIdentity();
    const from = signSelf(forger, { name: "f", addr: "f:1", epoch: "e", inc: 0, state: "alive" });
    const about = { id: victim.id, publicKey: victim.publicKey, inc, state: "dead" as const };
    // Claimed in c's name but signed by the forger; claimed by a node nobody knows; not signed at all.
    const inCsName = { ...signClaim(forger, about), by: c.node("c").identity.id };
    const byStranger = signClaim(generateIdentity(), about);
    const { sig: _sig, ...unsigned } = signClaim(c.node("c").identity, about);
    for (const target of ["a", "b"]) {
      const core = c.node(target).core;
      const to = c.node(target).identity.id;
      await c.wait(core.handle({ type: "ping", from, to, updates: [inCsName, byStranger, unsigned] }));
      expect(core.stats().membership.forgedRecords).toBe(2);
      expect(core.stats().membership.unsignedRecords).toBe(1);
    }
    expect(c.stateOf("a", "b")).toBe("alive");
    // The victim neither refutes nor drops what others wrote: nothing valid was said about it.
    expect(c.node("b").core.stats().membership.refutations).toBe(0);
    expect(incarnationOf(c, "b", "b")).toBe(inc);
    expect(await c.clock.until(() => !c.allSee("b", "alive", ["a", "c"]), 10 * ROUND)).toBeNull();
  });

  test("claim_signed_by_a_known_member_spreads_suspicion_and_the_subject_refutes_it", async () => {
    const c = await meshOf(["a", "b", "c", "d"]);
    const subject = c.node("b").identity;
    const inc = incarnationOf(c, "a", "b") as number;
    const claim = signClaim(c.node("c").identity, { id: subject.id, publicKey: subject.publicKey, inc, state: "suspect" });
    const from = strangerRecord();
    await pingWith(c, "a", [claim], from);
    expect(c.stateOf("a", "b")).toBe("suspect");
    expect(c.node("a").core.stats().membership.forgedRecords).toBe(0);
    // a passes the suspicion on under its own signature; b hears it and outranks it.
    expect(await c.clock.until(() => c.node("b").core.stats().membership.refutations > 0, 10 * ROUND)).not.toBeNull();
    expect(await c.clock.until(() => ["a", "c", "d"].every((o) => (incarnationOf(c, o, "b") as number) > inc), 10 * ROUND)).not.toBeNull();
    expect(c.allSee("b", "alive", ["a", "c", "d"])).toBe(true);
    // Replaying the claim now says nothing new: it is outranked by b's refutation.
    await pingWith(c, "d", [claim], from);
    expect(c.stateOf("d", "b")).toBe("alive");
  });

  test("claim_signature_moved_to_another_subject_or_state_is_rejected_and_counted", async () => {
    const c = await meshOf(["a", "b", "c", "d"]);
    const b = c.node("b").identity;
    const d = c.node("d").identity;
    const genuine = signClaim(c.node("c").identity, {
      id: b.id,
      publicKey: b.publicKey,
      inc: incarnationOf(c, "a", "b") as number,
      state: "suspect",
    });
    const otherSubject = { ...genuine, id: d.id, publicKey: d.publicKey, inc: incarnationOf(c, "a", "d") as number };
    const otherState = { ...genuine, state: "dead" as const };
    const from = strangerRecord();
    await pingWith(c, "a", [otherSubject, otherState], from);
    expect(c.node("a").core.stats().membership.forgedRecords).toBe(2);
    expect(c.stateOf("a", "d")).toBe("alive");
    expect(c.stateOf("a", "b")).toBe("alive");
  });

  test("unsigned_alive_record_is_rejected_and_counted", async () => {
    const c = await meshOf(["a", "b"]);
    const stranger = generateIdentity();
    const rec = signSelf(stranger, { name: "s", addr: "s:1", epoch: "e", inc: 0, state: "alive" });
    const { sig: _sig, ...unsigned } = rec;
    const from = strangerRecord();
    await pingWith(c, "a", [unsigned], from);
    expect(c.node("a").core.stats().membership.unsignedRecords).toBe(1);
    expect(
      c
        .node("a")
        .core.members()
        .some((m) => m.id === stranger.id),
    ).toBe(false);
  });

  test("message_without_a_valid_sender_record_changes_nothing", async () => {
    const c = await meshOf(["a", "b"]);
    const before = c.node("a").core.members();
    const reply = await c.wait(c.node("a").core.handle({ type: "ping", from: { id: "nope" }, to: c.node("a").identity.id, updates: [] }));
    expect(reply.type).toBe("error");
    expect(reply.code).toBe("bad_sender");
    expect(
      c
        .node("a")
        .core.members()
        .map((m) => [m.id, m.state, m.incarnation]),
    ).toEqual(before.map((m) => [m.id, m.state, m.incarnation]));
  });
});

// SimCluster listens without naming its nodes; this names node `name` at its address (as the HTTP gate
// knows its own id), so messages addressed to another node are refused there, and records what gets in.
function named(c: SimCluster, name: string): WireMessage[] {
  const n = c.node(name);
  const seen: WireMessage[] = [];
  c.net.listen(
    n.addr,
    (msg, from) => {
      seen.push(msg);
      return n.core.handle(msg, c.idAt(from));
    },
    n.identity.id,
  );
  return seen;
}

describe("messages name the member they are for", () => {
  test("a_membership_message_relayed_to_another_node_than_the_one_it_names_is_refused", async () => {
    const c = await meshOf(["a", "b", "c"]);
    for (const n of ["a", "b", "c"]) named(c, n);
    const target = c.node("c");
    const before = target.core.members().map((m) => [m.id, m.state, m.incarnation]);
    // A newcomer's table push meant for b, handed to c instead (whatever sits at an address passes it on).
    const stranger = signSelf(generateIdentity(), { name: "x", addr: "x:1", epoch: "e", inc: 0, state: "alive" });
    const push = { type: "sync-push", from: stranger, members: [] };
    const relayed = await c.wait(
      c.net
        .transport("x:1")
        .request(target.addr, push, 1000, c.node("b").identity.id)
        .then(
          () => null,
          (e: unknown) => e,
        ),
    );
    expect(relayed).toBeInstanceOf(SimRefused);
    expect(c.net.refused.get(target.addr)).toBe(1);
    expect(target.core.members().map((m) => [m.id, m.state, m.incarnation])).toEqual(before);
    // Addressed to c, the same push is taken: what is refused is the name, not the message.
    const reply = await c.wait(c.net.transport("x:1").request(target.addr, push, 1000, target.identity.id));
    expect(reply.type).toBe("ack");
    expect(target.core.members().some((m) => m.id === stranger.id)).toBe(true);
  });

  test("a_node_that_took_a_dead_members_address_gets_no_message_meant_for_that_member", async () => {
    const c = await meshOf(["a", "b", "c"]);
    for (const n of ["a", "b", "c"]) named(c, n);
    const oldB = c.node("b").identity.id;
    c.kill("b");
    // Another node starts on b's address before the others notice b is gone.
    c.add("b", generateIdentity());
    const seen = named(c, "b");
    const sent = new Set<string>();
    c.net.dropIf = (_from, to, msg) => {
      if (to === "b:9337") sent.add(msg.type);
      return false;
    };
    const deadEverywhere = () => ["a", "c"].every((o) => c.node(o).core.memberState(oldB)?.state === "dead");
    expect(await c.clock.until(deadEverywhere, failureDetectionBoundMs(3))).not.toBeNull();
    // Probes and store sync meant for b went to its address, and the node there refused every one of them.
    expect(sent.has("ping")).toBe(true);
    expect(sent.has("kv-sync")).toBe(true);
    expect(seen).toEqual([]);
    expect(c.net.refused.get("b:9337") ?? 0).toBeGreaterThanOrEqual(2);
    expect(c.node("b").core.members()).toHaveLength(1);
    // Joined under its own name, the newcomer is then reached at that same address.
    await c.join("b", "a");
    expect(await c.clock.until(() => c.converged(), 20 * ROUND)).not.toBeNull();
    expect(seen.some((m) => m.type === "ping")).toBe(true);
  });
});

describe("membership bounds", () => {
  test("member_table_refuses_members_past_its_bound_and_forgets_dead_ones_first", async () => {
    const c = new SimCluster({ config: { membership: { maxMembers: 3 } } });
    c.add("a");
    const a = c.node("a").core;
    const to = c.node("a").identity.id;
    const records = Array.from({ length: 6 }, (_, i) =>
      signSelf(generateIdentity(), { name: `x${i}`, addr: `x${i}:1`, epoch: "e", inc: 0, state: "alive" }),
    );
    for (const r of records) await c.wait(a.handle({ type: "ping", from: r, to, updates: [] }));
    expect(a.members().filter((m) => !m.self)).toHaveLength(3);
    expect(a.stats().membership.membersRejectedFull).toBe(3);
    // Once those members are dead, newcomers take their places.
    expect(await c.clock.until(() => a.members().some((m) => m.state === "dead"), 30 * ROUND)).not.toBeNull();
    await c.wait(
      a.handle({
        type: "ping",
        from: signSelf(generateIdentity(), { name: "late", addr: "late:1", epoch: "e", inc: 0, state: "alive" }),
        to,
        updates: [],
      }),
    );
    expect(a.members().some((m) => m.name === "late")).toBe(true);
    expect(a.members().filter((m) => !m.self).length).toBeLessThanOrEqual(3);
  });

  test("dead_members_are_forgotten_after_the_retention_time", async () => {
    const c = await meshOf(["a", "b", "c"], { config: { membership: { forgetAfterRounds: 10 } } });
    c.kill("c");
    expect(await c.clock.until(() => c.allSee("c", "dead", ["a", "b"]), failureDetectionBoundMs(3))).not.toBeNull();
    expect(await c.clock.until(() => c.allSee("c", undefined, ["a", "b"]), 12 * ROUND)).not.toBeNull();
    expect(c.node("a").core.stats().membership.membersForgotten).toBe(1);
  });
});
