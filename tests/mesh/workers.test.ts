import { describe, expect, test } from "bun:test";
import { generateIdentity } from "../../src/mesh/identity";
import { signRecord } from "../../src/mesh/kv-record";
import { MEMBERSHIP_DEFAULTS } from "../../src/mesh/membership";
import { SimCluster } from "../../src/mesh/sim-cluster";
import { serializeWorker, workerIdOf, workerKey } from "../../src/mesh/worker-info";
import type { WorkerEvent } from "../../src/mesh/workers";
import { meshOf, spec } from "./sim-helpers";

const ROUND = MEMBERSHIP_DEFAULTS.roundMs;

describe("worker ids and origins", () => {
  test("worker_ids_are_deterministic_from_node_model_and_address", () => {
    const node = generateIdentity().id;
    expect(workerIdOf(node, "qwen", "10.0.0.2:9337")).toBe(workerIdOf(node, "qwen", "10.0.0.2:9337"));
    expect(workerIdOf(node, "qwen", "10.0.0.2:9337")).toMatch(/^[0-9a-f]{32}$/);
    expect(workerIdOf(node, "qwen", "10.0.0.2:9338")).not.toBe(workerIdOf(node, "qwen", "10.0.0.2:9337"));
    expect(workerIdOf(node, "llama", "10.0.0.2:9337")).not.toBe(workerIdOf(node, "qwen", "10.0.0.2:9337"));
    expect(workerIdOf(generateIdentity().id, "qwen", "10.0.0.2:9337")).not.toBe(workerIdOf(node, "qwen", "10.0.0.2:9337"));
  });

  test("own_workers_are_local_and_imports_are_mesh_and_never_republished", async () => {
    const c = await meshOf(["a", "b", "c"]);
    await c.clock.advance(40 * ROUND);
    for (const n of ["a", "b", "c"]) {
      const core = c.node(n).core;
      const byOrigin = core.workers.list().map((w) => [w.info.models[0], w.origin]);
      expect(byOrigin.sort()).toEqual(["a", "b", "c"].map((m) => [`model-${m}`, m === n ? "local" : "mesh"]));
      // The only record this node ever wrote is its own worker, once: imports are not published.
      expect(core.workers.stats.published).toBe(1);
      expect([...core.store.live()].filter((r) => r.owner === core.id)).toHaveLength(1);
    }
  });

  test("mesh_workers_cannot_be_removed_or_updated_here", async () => {
    const c = await meshOf(["a", "b"]);
    const imported = c
      .node("b")
      .core.workers.list()
      .find((w) => w.origin === "mesh")?.info.id as string;
    const rm = c.node("b").core.workers.remove(imported);
    expect(rm.ok ? "ok" : rm.code).toBe("not_owner");
    const up = c.node("b").core.workers.update(imported, { health: "failed" });
    expect(up.ok ? "ok" : up.code).toBe("not_owner");
    expect(c.node("b").core.workers.get(imported)?.routable).toBe(true);
  });

  test("bad_spec_is_refused_with_a_message_and_registers_nothing", () => {
    const c = new SimCluster();
    const a = c.add("a").core;
    const r = a.workers.register(spec("a", { models: [], slotsTotal: -1 }));
    expect(r.ok ? "ok" : r.code).toBe("bad_worker");
    expect(a.workers.list()).toHaveLength(0);
    expect(a.store.size).toBe(0);
  });
});

describe("routing view", () => {
  test("routable_returns_healthy_workers_across_the_mesh", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const a = c.node("a").core;
    expect(a.workers.routable("model-c").map((w) => w.nodeId)).toEqual([c.node("c").identity.id]);
    expect(a.workers.routable("model-a").map((w) => w.nodeId)).toEqual([a.id]);
    expect(a.workers.routable("nope")).toHaveLength(0);
    const cw = c
      .node("c")
      .core.workers.list()
      .find((w) => w.origin === "local")?.info.id as string;
    c.node("c").core.workers.update(cw, { health: "loading" });
    expect(await c.clock.until(() => a.workers.routable("model-c").length === 0, 10 * ROUND)).not.toBeNull();
    expect(a.workers.get(cw)?.info.health).toBe("loading");
  });

  test("health_changes_publish_at_once_and_load_changes_at_most_once_per_interval", async () => {
    const c = await meshOf(["a", "b"], { config: { workers: { loadPublishMs: 5 * ROUND } } });
    const a = c.node("a").core;
    const id = a.workers.list().find((w) => w.origin === "local")?.info.id as string;
    await c.clock.advance(6 * ROUND);
    const before = a.workers.stats.published;
    for (let i = 1; i <= 10; i++) {
      a.workers.update(id, { slotsBusy: i % 4, queueDepth: i });
      await c.clock.advance(ROUND / 5);
    }
    expect(a.workers.stats.published).toBe(before + 1);
    // The last load figures do reach the mesh, once the interval has passed.
    expect(await c.clock.until(() => c.node("b").core.workers.get(id)?.info.queueDepth === 10, 10 * ROUND)).not.toBeNull();
    expect(a.workers.stats.published).toBe(before + 2);
    a.workers.update(id, { health: "failed" });
    expect(a.workers.stats.published).toBe(before + 3);
  });

  test("failing_import_stays_registered_but_unroutable_until_its_owner_publishes_news", async () => {
    const c = await meshOf(["a", "b"], { config: { workers: { quarantineMs: 1000 * ROUND } } });
    const b = c.node("b").core;
    const aw = c
      .node("a")
      .core.workers.list()
      .find((w) => w.origin === "local")?.info.id as string;
    b.workers.reportFailure(aw);
    expect(b.workers.routable("model-a")).toHaveLength(0);
    expect(b.workers.get(aw)?.problem).toBe("unreachable");
    // The periodic reconcile replays the same (stale, healthy) record: no flap back to routable.
    b.workers.reconcile();
    await c.clock.advance(40 * ROUND);
    expect(b.workers.routable("model-a")).toHaveLength(0);
    expect(b.workers.list()).toHaveLength(2);
    c.node("a").core.workers.update(aw, { slotsBusy: 1 });
    expect(await c.clock.until(() => b.workers.routable("model-a").length === 1, 10 * ROUND)).not.toBeNull();
  });

  test("record_that_does_not_check_out_is_registered_unroutable", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a");
    const b = c.node("b").core;
    const id = workerIdOf(a.identity.id, "ghost", "a:9000");
    // Signed by its owner (say, a newer version with another schema), but not a worker this node can use.
    const value = JSON.stringify({ id, nodeId: a.identity.id, models: ["ghost"], addr: "a:9000", health: "warming" });
    expect(b.store.applyRemote(signRecord(a.identity, workerKey(id), value, { w: c.clock.now(), l: 0, n: a.identity.id }))).toBe(true);
    await c.clock.advance(1);
    const w = b.workers.get(id);
    expect(w?.origin).toBe("mesh");
    expect(w?.routable).toBe(false);
    expect(w?.problem).toBe("bad_record");
    expect(b.workers.routable("ghost")).toHaveLength(0);
    expect(b.workers.stats.badRecords).toBe(1);
  });

  test("record_published_under_another_nodes_worker_id_does_not_touch_it", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const aw = c
      .node("a")
      .core.workers.list()
      .find((w) => w.origin === "local")?.info.id as string;
    const b = c.node("b").core;
    const stolen = c.node("a").core.workers.get(aw)?.info;
    b.store.put(workerKey(aw), JSON.stringify({ ...stolen, health: "failed" }));
    await c.clock.advance(10 * ROUND);
    const seen = c.node("c").core.workers.get(aw);
    expect(seen?.info.nodeId).toBe(c.node("a").identity.id);
    expect(seen?.routable).toBe(true);
    expect(c.node("c").core.workers.stats.impostors).toBeGreaterThan(0);
  });
});

describe("store truth and repair", () => {
  test("tombstone_for_a_local_worker_is_refused_and_reasserted", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const a = c.node("a");
    const aw = a.core.workers.list().find((w) => w.origin === "local")?.info.id as string;
    // A tombstone validly signed by a (left from an earlier life, when its clock ran ahead) arrives via b.
    const stale = signRecord(a.identity, workerKey(aw), null, { w: c.clock.now() + 10_000, l: 0, n: a.identity.id });
    const b = c.node("b").core.store;
    b.applyRange({ owner: a.identity.id, after: b.haveOf(a.identity.id), upTo: stale.hlc, records: [stale], more: false });
    expect(b.get(a.identity.id, workerKey(aw))?.value).toBeNull();
    expect(await c.clock.until(() => a.core.workers.stats.reasserted > 0, 10 * ROUND)).not.toBeNull();
    // a's registry never lost the worker, and the re-asserted put outranks the tombstone everywhere.
    expect(a.core.workers.get(aw)?.origin).toBe("local");
    expect(
      await c.clock.until(() => ["b", "c"].every((n) => c.node(n).core.workers.get(aw)?.routable === true), 10 * ROUND),
    ).not.toBeNull();
    const rec = a.core.store.get(a.identity.id, workerKey(aw));
    expect(rec?.value).toBeString();
    expect(rec?.hlc.w).toBeGreaterThanOrEqual(stale.hlc.w);
  });

  test("inbound_applies_the_current_store_value_not_the_event_snapshot", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a");
    const b = c.node("b").core;
    const events: WorkerEvent[] = [];
    b.workers.on((e) => events.push(e));
    const id = workerIdOf(a.identity.id, "flash", "a:7000");
    const value = serializeWorker({ ...spec("a", { models: ["flash"], addr: "a:7000" }), id, nodeId: a.identity.id });
    const t = c.clock.now();
    // A put and its delete land in one turn, before the queued notifications drain.
    b.store.applyRemote(signRecord(a.identity, workerKey(id), value, { w: t, l: 1, n: a.identity.id }));
    b.store.applyRemote(signRecord(a.identity, workerKey(id), null, { w: t, l: 2, n: a.identity.id }));
    await c.clock.advance(1);
    expect(b.workers.get(id)).toBeUndefined();
    expect(events.filter((e) => e.worker.info.id === id)).toHaveLength(0);
  });

  test("reconcile_repairs_a_dropped_put_and_a_dropped_tombstone", async () => {
    const c = await meshOf(["a", "b"], { config: { workers: { maxPending: 1, reconcileMs: 30 * ROUND } } });
    const a = c.node("a").core;
    const b = c.node("b").core;
    const specs = ["x", "y", "z"].map((m) => spec("a", { models: [m], addr: `a:${m.charCodeAt(0)}` }));
    for (const s of specs) a.workers.register(s);
    // All three arrive in one batch; b's bounded queue of store changes keeps one and drops the rest.
    expect(
      await c.clock.until(() => b.store.get(a.id, workerKey(workerIdOf(a.id, "z", "a:122"))) !== undefined, 10 * ROUND),
    ).not.toBeNull();
    await c.clock.advance(1);
    expect(b.workers.stats.pendingDropped).toBeGreaterThan(0);
    expect(b.workers.list().length).toBeLessThan(5);
    expect(await c.clock.until(() => b.workers.list().length === 5, 31 * ROUND)).not.toBeNull();
    const ids = specs.map((s) => workerIdOf(a.id, s.models[0] as string, s.addr));
    for (const id of ids) a.workers.remove(id);
    expect(
      await c.clock.until(
        () => ids.every((id) => b.store.get(a.id, workerKey(id))?.value !== "x" && !b.store.get(a.id, workerKey(id))?.value),
        10 * ROUND,
      ),
    ).not.toBeNull();
    await c.clock.advance(1);
    expect(b.workers.list().length).toBeGreaterThan(2);
    expect(await c.clock.until(() => b.workers.list().length === 2, 31 * ROUND)).not.toBeNull();
    expect(b.workers.stats.reconcileRepairs).toBeGreaterThanOrEqual(4);
  });

  test("reconcile_repairs_a_lost_publish", async () => {
    const c = await meshOf(["a", "b"], { config: { kv: { maxKeysPerOwner: 2 }, workers: { reconcileMs: 20 * ROUND } } });
    const a = c.node("a").core;
    const first = a.workers.list().find((w) => w.origin === "local")?.info.id as string;
    expect(a.workers.register(spec("a", { models: ["second"] })).ok).toBe(true);
    a.workers.remove(first);
    // The tombstone still holds a key slot until it is collected: this publish is refused for now.
    const third = a.workers.register(spec("a", { models: ["third"] }));
    expect(third.ok ? "ok" : third.code).toBe("publish_failed");
    expect(a.workers.stats.publishFailures).toBe(1);
    const id = workerIdOf(a.id, "third", "a:8080");
    expect(await c.clock.until(() => c.node("b").core.workers.get(id)?.routable === true, 30 * ROUND)).not.toBeNull();
    expect(a.workers.stats.reconcileRepairs).toBeGreaterThan(0);
  });

  test("own_record_from_an_earlier_life_without_a_local_worker_is_tombstoned", async () => {
    const c = await meshOf(["a", "b"]);
    const a = c.node("a");
    const id = workerIdOf(a.identity.id, "old", "a:1");
    const value = serializeWorker({ ...spec("a", { models: ["old"], addr: "a:1" }), id, nodeId: a.identity.id });
    const old = signRecord(a.identity, workerKey(id), value, { w: c.clock.now() + 5000, l: 0, n: a.identity.id });
    const b = c.node("b").core.store;
    b.applyRange({ owner: a.identity.id, after: b.haveOf(a.identity.id), upTo: old.hlc, records: [old], more: false });
    expect(b.get(a.identity.id, workerKey(id))?.value).toBeString();
    expect(await c.clock.until(() => a.core.workers.stats.staleOwnTombstoned > 0, 10 * ROUND)).not.toBeNull();
    expect(
      await c.clock.until(
        () => c.node("b").core.workers.get(id) === undefined && !c.node("b").core.store.get(a.identity.id, workerKey(id))?.value,
        10 * ROUND,
      ),
    ).not.toBeNull();
  });

  test("restarted_node_deletes_the_workers_it_no_longer_serves", async () => {
    const c = await meshOf(["a", "b", "c"]);
    const identity = c.node("c").identity;
    const old = c
      .node("c")
      .core.workers.list()
      .find((w) => w.origin === "local")?.info.id as string;
    c.kill("c");
    // Back at once, before anyone noticed, now serving another model: peers still hold the old worker.
    c.add("c", identity);
    await c.join("c", "a");
    c.node("c").core.workers.register(spec("c", { models: ["model-c2"] }));
    expect(
      await c.clock.until(
        () =>
          ["a", "b"].every(
            (n) => c.node(n).core.workers.get(old) === undefined && c.node(n).core.workers.routable("model-c2").length === 1,
          ),
        30 * ROUND,
      ),
    ).not.toBeNull();
    expect(c.node("c").core.workers.stats.staleOwnTombstoned).toBe(1);
    expect(
      c
        .node("c")
        .core.workers.list()
        .map((w) => w.info.models[0])
        .sort(),
    ).toEqual(["model-a", "model-b", "model-c2"]);
  });
});
