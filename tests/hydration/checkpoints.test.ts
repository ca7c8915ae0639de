// The checkpoint hydrator with its peers faked (records and blobs in memory) and a real checkpoint
// store as the engine: which sessions are routed here, what a lying peer's blob does, and the bounds
// of the announced record.
import { describe, expect, test } from "bun:test";
import { CheckpointStore } from "../../src/engine/checkpoints";
import {
  type AnnouncedCheckpoint,
  type AnnouncedModel,
  CKPT_PREFIX,
  encodeRecord,
  MAX_ANNOUNCED,
  MAX_RECORD_BYTES,
  parseRecord,
  sessionHome,
} from "../../src/hydration/checkpoint-record";
import { CheckpointHydrator, MAX_BLOB_BYTES } from "../../src/hydration/checkpoints";

const FP = "ab".repeat(16);
const ME = "node-me";
const PEER = "node-peer";

const storeOf = (portable = FP) =>
  new CheckpointStore({ ramBytes: 1 << 20, diskBytes: 0, dir: null, fingerprint: "local", portable, maxEntries: 64 });

/** Session ids homed at `who` among [ME, PEER]. */
function homedAt(who: string, n: number): string[] {
  const out: string[] = [];
  for (let i = 0; out.length < n; i++) if (sessionHome(`s${i}`, [ME, PEER]) === who) out.push(`s${i}`);
  return out;
}

/** A peer holding one checkpoint per session, announcing them; `lie` corrupts what it sends. */
function setup(o: { sessions: string[]; lie?: boolean; fingerprint?: string; announce?: (c: AnnouncedCheckpoint) => AnnouncedCheckpoint }) {
  const peer = storeOf(o.fingerprint ?? FP);
  const here = storeOf();
  const checkpoints = o.sessions.map((s, i) => {
    const key = `k${i}`;
    peer.put(key, [1, 2, 3, i], new Uint8Array(64).fill(i));
    const [d] = peer.describe([key]);
    return { session: s, key, hash: d?.hash as string, tokens: 4, bytes: 64, lastUsed: 100 + i };
  });
  const announced = o.announce ? checkpoints.map(o.announce) : checkpoints;
  const record = encodeRecord([{ model: "m", fingerprint: o.fingerprint ?? FP, checkpoints: announced }]);
  let fetches = 0;
  const limits: number[] = [];
  const h = new CheckpointHydrator({
    selfId: () => ME,
    records: () => [{ owner: PEER, key: `${CKPT_PREFIX}${PEER}`, value: record }],
    servers: () => [ME, PEER],
    addrOf: () => "127.0.0.1:1",
    nameOf: () => "peer",
    local: () => ({
      engine: {
        hasCheckpoints: async (keys) => here.has(keys),
        importCheckpoint: async (blob, hash, key) => here.importBlob(blob, hash, key),
      },
      fingerprint: FP,
    }),
    models: () => ["m"],
    fetchBlob: async (_addr, _id, path, maxBytes) => {
      fetches++;
      limits.push(maxBytes);
      const blob = peer.exportBlob(path.split("/").pop() as string);
      if (!blob) throw new Error("404");
      if (o.lie) blob[blob.length - 1] = (blob[blob.length - 1] as number) ^ 1;
      return blob;
    },
    clock: { setTimer: (fn, ms) => setTimeout(fn, ms), clearTimer: (t) => clearTimeout(t as ReturnType<typeof setTimeout>) },
    parallelism: 2,
    itemTimeoutMs: 5_000,
  });
  return { h, here, fetches: () => fetches, limits };
}

describe("checkpoint hydrator", () => {
  test("only_sessions_homed_here_are_wanted_and_a_pass_hydrates_them", async () => {
    const mine = homedAt(ME, 3);
    const theirs = homedAt(PEER, 2);
    const { h, here } = setup({ sessions: [...mine, ...theirs] });
    expect(
      h
        .wanted("m")
        .map((i) => i.session)
        .sort(),
    ).toEqual([...mine].sort());
    expect(await h.pass("m")).toBe(true);
    await h.lanes.whenDone("m");
    expect(h.stats()).toMatchObject({ hydrated: 3, failed: 0, corrupt: 0 });
    expect(here.stats().checkpoints).toBe(3);
    // Nothing left to want: the next pass does not start.
    expect(await h.pass("m")).toBe(false);
    expect(h.sourceOf(mine[0] as string)).toMatchObject({ node: PEER, name: "peer", tokens: 4 });
  });

  test("a_lying_peers_blob_is_dropped_and_counted_corrupt_and_the_request_falls_back", async () => {
    const [s] = homedAt(ME, 1);
    const { h, here } = setup({ sessions: [s as string], lie: true });
    expect(await h.prepare(s as string, "m")).toBe(false);
    expect(h.stats()).toMatchObject({ corrupt: 1, hydrated: 0, failed: 1, priority: 1 });
    expect(here.stats().checkpoints).toBe(0);
  });

  test("a_request_for_a_session_homed_elsewhere_that_runs_here_still_fetches_its_checkpoint", async () => {
    // Routing sent it here (its holder overloaded, or a peer forwarded it): the priority lane brings it over.
    const [other] = homedAt(PEER, 1);
    const { h, here } = setup({ sessions: [other as string] });
    expect(h.wanted("m")).toEqual([]);
    expect(await h.prepare(other as string, "m")).toBe(true);
    expect(here.stats().checkpoints).toBe(1);
    expect(h.stats()).toMatchObject({ priority: 1, hydrated: 1 });
  });

  test("a_request_for_a_session_already_hydrated_does_not_fetch_again", async () => {
    const [s] = homedAt(ME, 1);
    const { h, fetches, limits } = setup({ sessions: [s as string] });
    expect(await h.prepare(s as string, "m")).toBe(true);
    // A peer may send no more than the size its holder announced (state, token ids, header room).
    expect(limits).toEqual([64 + 4 * 4 + 8192]);
    expect(await h.prepare(s as string, "m")).toBe(true);
    expect(fetches()).toBe(1);
    // A session no peer announces: nothing to fetch, the turn prefills in full.
    expect(await h.prepare("never-announced", "m")).toBe(false);
    expect(fetches()).toBe(1);
  });

  test("checkpoints_of_another_model_file_are_never_fetched", async () => {
    const { h, fetches } = setup({ sessions: homedAt(ME, 2), fingerprint: "cd".repeat(16) });
    expect(h.wanted("m")).toEqual([]);
    expect(await h.pass("m")).toBe(false);
    expect(fetches()).toBe(0);
  });

  test("metrics_name_every_outcome_and_the_load", async () => {
    const { h } = setup({ sessions: homedAt(ME, 1) });
    const text = h.renderMetrics();
    for (const series of [
      'mesh_hydration_checkpoints_total{outcome="hydrated"} 0',
      'mesh_hydration_checkpoints_total{outcome="corrupt"} 0',
      "mesh_hydration_in_flight 0",
      "mesh_hydration_queue_depth 0",
      "mesh_hydration_routed_here 1",
    ]) {
      expect(text).toContain(series);
    }
  });
});

describe("checkpoint hydrator: regressions", () => {
  test("a_peer_serving_another_keys_blob_under_an_announced_key_cannot_replace_a_local_checkpoint", async () => {
    // This node holds (and announces) "victim". A lying peer announces a session under key "k0" with the hash of a
    // blob whose header says "victim": the hash checks out, but storing it would replace this node's own checkpoint.
    const [s] = homedAt(ME, 1);
    const peer = storeOf();
    peer.put("victim", [9, 9, 9], new Uint8Array(32).fill(9));
    const [d] = peer.describe(["victim"]);
    const blob = peer.exportBlob("victim") as Uint8Array;
    const here = storeOf();
    here.put("victim", [1, 2, 3], new Uint8Array(32).fill(1));
    const record = encodeRecord([
      {
        model: "m",
        fingerprint: FP,
        checkpoints: [{ session: s as string, key: "k0", hash: d?.hash as string, tokens: 3, bytes: 32, lastUsed: 1 }],
      },
    ]);
    const h = new CheckpointHydrator({
      selfId: () => ME,
      records: () => [{ owner: PEER, key: `${CKPT_PREFIX}${PEER}`, value: record }],
      servers: () => [ME, PEER],
      addrOf: () => "127.0.0.1:1",
      nameOf: () => "peer",
      local: () => ({
        engine: {
          hasCheckpoints: async (keys) => here.has(keys),
          importCheckpoint: async (b, hash, key) => here.importBlob(b, hash, key),
        },
        fingerprint: FP,
      }),
      models: () => ["m"],
      fetchBlob: async () => blob.slice(),
      clock: { setTimer: (fn, ms) => setTimeout(fn, ms), clearTimer: (t) => clearTimeout(t as ReturnType<typeof setTimeout>) },
      parallelism: 1,
      itemTimeoutMs: 5_000,
    });
    expect(await h.prepare(s as string, "m")).toBe(false);
    expect(h.stats()).toMatchObject({ corrupt: 1, hydrated: 0 });
    expect(here.has(["victim", "k0"])).toEqual(["victim"]);
    // Still this node's own state and tokens.
    expect(here.find("victim", [1, 2, 3])?.lcp).toBe(3);
    expect(here.find("victim", [9, 9, 9])?.lcp ?? 0).toBe(0);
  });

  test("a_checkpoint_announced_larger_than_any_holder_serves_is_never_fetched", async () => {
    // The announced sizes bound what a fetch reads; a peer announcing 2^50 bytes (or 2^45 tokens) must not get such a read.
    const sessions = homedAt(ME, 2);
    const { h, fetches } = setup({
      sessions,
      announce: (c) => (c.key === "k0" ? { ...c, bytes: 2 ** 50 } : { ...c, tokens: 2 ** 45 }),
    });
    expect(h.wanted("m")).toEqual([]);
    expect(await h.pass("m")).toBe(false);
    expect(await h.prepare(sessions[0] as string, "m")).toBe(false);
    expect(await h.prepare(sessions[1] as string, "m")).toBe(false);
    expect(fetches()).toBe(0);
  });

  test("a_checkpoint_announced_within_the_bound_is_fetched_with_at_most_the_bound", async () => {
    const [s] = homedAt(ME, 1);
    const { h, limits } = setup({ sessions: [s as string] });
    expect(await h.prepare(s as string, "m")).toBe(true);
    expect(limits.every((n) => n <= MAX_BLOB_BYTES)).toBe(true);
  });
});

describe("checkpoint hydrator: close", () => {
  test("close_aborts_a_fetch_from_a_peer_that_never_answers", async () => {
    const [s] = homedAt(ME, 1);
    const record = encodeRecord([
      {
        model: "m",
        fingerprint: FP,
        checkpoints: [{ session: s as string, key: "k0", hash: "e".repeat(64), tokens: 4, bytes: 64, lastUsed: 1 }],
      },
    ]);
    const here = storeOf();
    let seen: AbortSignal | null = null;
    const h = new CheckpointHydrator({
      selfId: () => ME,
      records: () => [{ owner: PEER, key: `${CKPT_PREFIX}${PEER}`, value: record }],
      servers: () => [ME, PEER],
      addrOf: () => "127.0.0.1:1",
      nameOf: () => "peer",
      local: () => ({
        engine: { hasCheckpoints: async (keys) => here.has(keys), importCheckpoint: async (b, hash, key) => here.importBlob(b, hash, key) },
        fingerprint: FP,
      }),
      models: () => ["m"],
      // Answers only by failing once aborted (a black-holed peer).
      fetchBlob: (_addr, _id, _path, _max, signal) =>
        new Promise((_resolve, reject) => {
          seen = signal;
          signal.addEventListener("abort", () => reject(signal.reason));
        }),
      clock: { setTimer: (fn, ms) => setTimeout(fn, ms), clearTimer: (t) => clearTimeout(t as ReturnType<typeof setTimeout>) },
      parallelism: 1,
      // An hour: only close() can end it within the test.
      itemTimeoutMs: 3_600_000,
    });
    const asked = h.prepare(s as string, "m");
    while (!seen) await Bun.sleep(1);
    h.close();
    expect(await asked).toBe(false);
    expect((seen as AbortSignal | null)?.aborted).toBe(true);
    expect(h.stats()).toMatchObject({ inFlight: 0 });
    // Nothing starts after it.
    expect(await h.pass("m")).toBe(false);
    expect(await h.prepare(s as string, "m")).toBe(false);
  });
});

describe("checkpoint hydrator: the engine's queue", () => {
  test("a_priority_import_waits_behind_at_most_one_background_import_in_the_engine", async () => {
    // The engine answers one call at a time, in order (its Worker's message queue): background imports queued
    // there ahead of a request's calls delay it as surely as a shared worker did in seed 003.
    const sessions = homedAt(ME, 6);
    const peer = storeOf();
    const checkpoints = sessions.map((session, i) => {
      peer.put(`k${i}`, [1, 2, 3, i], new Uint8Array(64).fill(i));
      const [d] = peer.describe([`k${i}`]);
      return { session, key: `k${i}`, hash: d?.hash as string, tokens: 4, bytes: 64, lastUsed: 100 - i };
    });
    const record = encodeRecord([{ model: "m", fingerprint: FP, checkpoints }]);
    const here = storeOf();
    const queue: Array<{ what: string; run: () => void }> = [];
    const log: string[] = [];
    const engineCall = <T>(what: string, f: () => T) => new Promise<T>((resolve) => queue.push({ what, run: () => resolve(f()) }));
    const h = new CheckpointHydrator({
      selfId: () => ME,
      records: () => [{ owner: PEER, key: `${CKPT_PREFIX}${PEER}`, value: record }],
      servers: () => [ME, PEER],
      addrOf: () => "127.0.0.1:1",
      nameOf: () => "peer",
      local: () => ({
        engine: {
          hasCheckpoints: (keys) => engineCall(`has ${keys.join(",")}`, () => here.has(keys)),
          importCheckpoint: (b, hash, key) => engineCall(`import ${key}`, () => here.importBlob(b, hash, key)),
        },
        fingerprint: FP,
      }),
      models: () => ["m"],
      fetchBlob: async (_addr, _id, path) => peer.exportBlob(path.split("/").pop() as string) as Uint8Array,
      clock: { setTimer: (fn, ms) => setTimeout(fn, ms), clearTimer: (t) => clearTimeout(t as ReturnType<typeof setTimeout>) },
      parallelism: 4,
      itemTimeoutMs: 60_000,
    });
    /** Let the engine answer one call. */
    const step = async () => {
      await Bun.sleep(1);
      const next = queue.shift();
      if (!next) return false;
      log.push(next.what);
      next.run();
      return true;
    };
    // The pass wants k0..k5 (k5 is the session a request will ask for): answer the engine until 4 background fetches are under way.
    const started = h.pass("m");
    while (!(await Promise.race([started.then(() => true), Bun.sleep(1).then(() => false)]))) await step();
    for (let i = 0; i < 4; i++) await step(); // the four re-checks
    await Bun.sleep(5);
    // The blobs are here; what the engine has queued now is what a request's calls would wait behind.
    const mark = log.length;
    const asked = h.prepare(sessions[5] as string, "m");
    while (!here.has(["k5"]).length) if (!(await step())) await Bun.sleep(1);
    expect(await asked).toBe(true);
    const before = log.slice(mark, log.indexOf("import k5"));
    // At most one background import went first (the one the engine may already be running), never the whole pass's.
    expect(before.filter((w) => w.startsWith("import ")).length).toBeLessThanOrEqual(1);
    while (await step()) {}
    await h.lanes.whenDone("m");
    expect(here.has(checkpoints.map((c) => c.key)).sort()).toEqual(["k0", "k1", "k2", "k3", "k4", "k5"]);
  });
});

describe("checkpoint hydrator: the engine's queue, joined", () => {
  test("a_request_for_a_checkpoint_whose_background_import_waits_its_turn_is_answered_without_a_timeout", async () => {
    // k1's blob is here and waits for its import turn (k0's import is in the engine); a request for k1's session joins
    // that very fetch: it must not hold k1's turn back while it waits for it (a stall until the item timeout).
    const sessions = homedAt(ME, 2);
    const peer = storeOf();
    const checkpoints = sessions.map((session, i) => {
      peer.put(`k${i}`, [1, 2, 3, i], new Uint8Array(64).fill(i));
      const [d] = peer.describe([`k${i}`]);
      return { session, key: `k${i}`, hash: d?.hash as string, tokens: 4, bytes: 64, lastUsed: 100 - i };
    });
    const record = encodeRecord([{ model: "m", fingerprint: FP, checkpoints }]);
    const here = storeOf();
    const queue: Array<{ what: string; run: () => void }> = [];
    const engineCall = <T>(what: string, f: () => T) => new Promise<T>((resolve) => queue.push({ what, run: () => resolve(f()) }));
    const h = new CheckpointHydrator({
      selfId: () => ME,
      records: () => [{ owner: PEER, key: `${CKPT_PREFIX}${PEER}`, value: record }],
      servers: () => [ME, PEER],
      addrOf: () => "127.0.0.1:1",
      nameOf: () => "peer",
      local: () => ({
        engine: {
          hasCheckpoints: (keys) => engineCall(`has ${keys.join(",")}`, () => here.has(keys)),
          importCheckpoint: (b, hash, key) => engineCall(`import ${key}`, () => here.importBlob(b, hash, key)),
        },
        fingerprint: FP,
      }),
      models: () => ["m"],
      fetchBlob: async (_addr, _id, path) => peer.exportBlob(path.split("/").pop() as string) as Uint8Array,
      // Far beyond the test's own timeout: only a stall ends there.
      clock: { setTimer: (fn, ms) => setTimeout(fn, ms), clearTimer: (t) => clearTimeout(t as ReturnType<typeof setTimeout>) },
      parallelism: 2,
      itemTimeoutMs: 3_600_000,
    });
    const step = async () => {
      await Bun.sleep(1);
      const next = queue.shift();
      next?.run();
      return next?.what ?? null;
    };
    const started = h.pass("m");
    while (!(await Promise.race([started.then(() => true), Bun.sleep(1).then(() => false)]))) await step();
    await step();
    await step(); // the two re-checks
    await Bun.sleep(5);
    expect(queue.map((q) => q.what)).toEqual(["import k0"]);
    let answer: boolean | null = null;
    void h.prepare(sessions[1] as string, "m").then((x) => {
      answer = x;
    });
    // Let the engine work until it has nothing left: by then the request has its answer.
    for (let idle = 0; idle < 20 && answer === null; ) idle = (await step()) === null ? idle + 1 : 0;
    expect(answer as boolean | null).toBe(true);
    await h.lanes.whenDone("m");
    expect(here.has(["k0", "k1"])).toEqual(["k0", "k1"]);
    h.close();
  });
});

describe("announced checkpoint record", () => {
  const entry = (i: number) => ({ session: `session-${i}`, key: `key${i}`, hash: "f".repeat(64), tokens: 10, bytes: 100, lastUsed: i });

  test("past_its_bound_a_record_keeps_the_most_recently_used_sessions", () => {
    const models: AnnouncedModel[] = [{ model: "m", fingerprint: FP, checkpoints: Array.from({ length: 200 }, (_, i) => entry(i)) }];
    const text = encodeRecord(models);
    expect(Buffer.byteLength(text)).toBeLessThanOrEqual(MAX_RECORD_BYTES);
    const back = parseRecord(text);
    const kept = back?.[0]?.checkpoints ?? [];
    expect(kept.length).toBeGreaterThan(0);
    expect(kept.length).toBeLessThanOrEqual(MAX_ANNOUNCED);
    // The newest ones survived the cut.
    expect(Math.min(...kept.map((c) => c.lastUsed))).toBeGreaterThanOrEqual(200 - kept.length);
  });

  test("a_record_with_a_bad_field_or_past_the_bounds_is_ignored_whole", () => {
    const good = encodeRecord([{ model: "m", fingerprint: FP, checkpoints: [entry(1)] }]);
    expect(parseRecord(good)?.[0]?.checkpoints).toHaveLength(1);
    const bad = (f: (v: { v: number; models: Array<{ id: string; fp: string; c: unknown[][] }> }) => void) => {
      const v = JSON.parse(good);
      f(v);
      return parseRecord(JSON.stringify(v));
    };
    expect(bad((v) => ((v.models[0] as { c: unknown[][] }).c[0] as unknown[]).splice(2, 1, "not-a-hash"))).toBeNull();
    expect(bad((v) => ((v.models[0] as { c: unknown[][] }).c[0] as unknown[]).splice(1, 1, "../etc/passwd"))).toBeNull();
    expect(bad((v) => ((v.models[0] as { c: unknown[][] }).c[0] as unknown[]).splice(3, 1, -1))).toBeNull();
    expect(bad((v) => (v.v = 2))).toBeNull();
    expect(
      bad((v) => {
        const m = v.models[0] as { c: unknown[][] };
        m.c = Array.from({ length: MAX_ANNOUNCED + 1 }, () => m.c[0] as unknown[]);
      }),
    ).toBeNull();
    expect(parseRecord("not json")).toBeNull();
    expect(parseRecord(`{"v":1,"models":[],"pad":"${"x".repeat(MAX_RECORD_BYTES)}"}`)).toBeNull();
  });

  test("a_session_keeps_its_home_when_a_node_that_is_not_its_home_joins", () => {
    const nodes = ["n1", "n2", "n3"];
    let moved = 0;
    for (let i = 0; i < 200; i++) {
      const before = sessionHome(`s${i}`, nodes);
      const after = sessionHome(`s${i}`, [...nodes, "n4"]);
      if (after !== before) {
        expect(after).toBe("n4");
        moved++;
      }
    }
    // About a quarter move, all of them to the new node.
    expect(moved).toBeGreaterThan(20);
    expect(moved).toBeLessThan(90);
    expect(sessionHome("s", [])).toBeNull();
  });
});
