// The hydration lanes on a fake clock: no network, no native code, no wall time.
import { describe, expect, test } from "bun:test";
import { HydrationLanes, type LaneClock, type LaneEvent, type LanesOptions } from "../../src/hydration/lanes";

/** Timers that fire only when the test advances time. */
class FakeClock implements LaneClock {
  now = 0;
  private timers = new Map<number, { at: number; fn: () => void }>();
  private next = 1;
  setTimer(fn: () => void, ms: number): unknown {
    const id = this.next++;
    this.timers.set(id, { at: this.now + ms, fn });
    return id;
  }
  clearTimer(h: unknown): void {
    this.timers.delete(h as number);
  }
  get pending(): number {
    return this.timers.size;
  }
  async advance(ms: number): Promise<void> {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.now = due[1].at;
      due[1].fn();
      await settle();
    }
    this.now = until;
    await settle();
  }
}

/** Let every resolved promise chain run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve();
}

interface Item {
  key: string;
  peer: string;
}

/** A fetch the test finishes by hand (or never: a stuck peer). */
class Fetches {
  readonly waiting = new Map<string, { resolve: () => void; reject: (e: Error) => void }>();
  readonly stored = new Set<string>();
  fetch = (item: Item, _signal: AbortSignal): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      this.waiting.set(item.key, {
        resolve: () => {
          this.stored.add(item.key);
          resolve();
        },
        reject,
      });
    });
  finish(key: string): void {
    const w = this.waiting.get(key);
    if (!w) throw new Error(`${key} is not being fetched`);
    this.waiting.delete(key);
    w.resolve();
  }
  fail(key: string): void {
    const w = this.waiting.get(key);
    if (!w) throw new Error(`${key} is not being fetched`);
    this.waiting.delete(key);
    w.reject(new Error("peer refused"));
  }
}

function lanes(over: Partial<LanesOptions<Item>> = {}) {
  const clock = new FakeClock();
  const fetches = new Fetches();
  const events: LaneEvent[] = [];
  const l = new HydrationLanes<Item>({
    parallelism: 4,
    itemTimeoutMs: 10_000,
    maxQueue: 1024,
    maxPriority: 8,
    maxPasses: 4,
    clock,
    keyOf: (i) => i.key,
    fetch: fetches.fetch,
    filled: (i) => fetches.stored.has(i.key),
    onEvent: (e) => events.push(e),
    ...over,
  });
  return { l, clock, fetches, events };
}

const items = (n: number, peer = "b", prefix = "k"): Item[] => Array.from({ length: n }, (_, i) => ({ key: `${prefix}${i}`, peer }));

describe("hydration lanes", () => {
  test("a_pass_of_50_with_one_stuck_peer_ends_within_its_timeouts_and_a_priority_fetch_waits_for_no_background_item", async () => {
    const { l, clock, fetches, events } = lanes();
    // 10 of the 50 live on a peer that never answers; the good peer answers every fetch as soon as it starts.
    const all = [...items(10, "stuck", "s"), ...items(40, "good", "g")];
    const answerGood = async () => {
      for (let i = 0; i < 200; i++) {
        const good = [...fetches.waiting.keys()].filter((k) => k.startsWith("g"));
        if (good.length === 0) return;
        for (const k of good) fetches.finish(k);
        await settle();
      }
    };
    expect(l.trigger("m", all)).toBe(true);
    await settle();
    // All four workers are stuck on the dead peer's items; the pass cannot progress until they time out.
    expect([...fetches.waiting.keys()]).toEqual(["s0", "s1", "s2", "s3"]);
    // A request needs g39 now: the priority lane takes it out of the pass's queue and fetches it at once.
    const mark = events.length;
    const p = l.priority({ key: "g39", peer: "good" });
    await settle();
    const since = events.slice(mark);
    expect(since[0]).toEqual({ kind: "priority_request", key: "g39" });
    // Nothing of the background lane comes between the request and its fetch.
    expect(since[1]).toEqual({ kind: "fetch_start", key: "g39", lane: "priority" });
    fetches.finish("g39");
    expect(await p).toBe("hydrated");
    // Timeouts free the workers: 10 stuck items over 4 workers take three timeouts' worth of time.
    for (let round = 0; round < 3; round++) {
      await clock.advance(10_000);
      await answerGood();
    }
    await l.whenDone("m");
    expect(clock.now).toBeLessThanOrEqual(30_000);
    const end = events.find((e) => e.kind === "pass_end");
    // 39 good ones hydrated by the pass (g39 went by the priority lane), 10 stuck ones failed.
    expect(end).toEqual({ kind: "pass_end", pass: "m", hydrated: 39, skipped: 0, failed: 10 });
    expect(l.stats()).toMatchObject({ hydrated: 40, timeouts: 10, inFlight: 0, queued: 0, priority: 1 });
    expect(clock.pending).toBe(0);
  });

  test("a_priority_fetch_of_an_item_already_in_flight_waits_for_that_one_item_only", async () => {
    const { l, fetches, events } = lanes({ parallelism: 1 });
    l.trigger("m", items(5));
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["k0"]);
    const p = l.priority({ key: "k0", peer: "b" });
    await settle();
    expect(events.at(-1)).toEqual({ kind: "priority_joined", key: "k0" });
    const joinedAt = events.length;
    let startsBeforeAnswer = -1;
    const answered = p.then((x) => {
      startsBeforeAnswer = events.slice(joinedAt).filter((e) => e.kind === "fetch_start").length;
      return x;
    });
    fetches.finish("k0");
    expect(await answered).toBe("hydrated");
    // It was answered on k0's own end: no other item was started (let alone waited for) before it.
    expect(startsBeforeAnswer).toBe(0);
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["k1"]);
  });

  test("two_triggers_for_the_same_key_while_a_pass_runs_start_one_pass", async () => {
    const { l, fetches, events } = lanes();
    expect(l.trigger("m", items(3))).toBe(true);
    expect(l.trigger("m", items(3))).toBe(false);
    await settle();
    expect(events.filter((e) => e.kind === "pass_start")).toHaveLength(1);
    expect(events.filter((e) => e.kind === "pass_deduped")).toHaveLength(1);
    expect(fetches.waiting.size).toBe(3);
    // Another key is another lane.
    expect(l.trigger("other", items(1, "b", "o"))).toBe(true);
    await settle();
    for (const k of ["k0", "k1", "k2", "o0"]) fetches.finish(k);
    await l.whenDone("m");
    // Once it ended, the next trigger starts a pass again.
    expect(l.trigger("m", items(3))).toBe(true);
    expect(l.stats().passesDeduped).toBe(1);
  });

  test("an_item_that_does_not_answer_times_out_and_frees_its_worker", async () => {
    const { l, clock, fetches } = lanes({ parallelism: 1, itemTimeoutMs: 5_000 });
    const slow: Item = { key: "slow", peer: "b" };
    l.trigger("m", [slow, { key: "next", peer: "b" }]);
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["slow"]);
    await clock.advance(4_999);
    expect([...fetches.waiting.keys()]).toEqual(["slow"]);
    await clock.advance(1);
    // The worker moved on; the late fetch is abandoned.
    expect(fetches.waiting.has("next")).toBe(true);
    fetches.finish("next");
    await l.whenDone("m");
    expect(l.stats()).toMatchObject({ timeouts: 1, hydrated: 1, inFlight: 0 });
  });

  test("the_timeout_aborts_the_fetch_signal", async () => {
    const clock = new FakeClock();
    let seen: AbortSignal | null = null;
    const l = new HydrationLanes<Item>({
      parallelism: 1,
      itemTimeoutMs: 100,
      maxQueue: 10,
      maxPriority: 1,
      maxPasses: 1,
      clock,
      keyOf: (i) => i.key,
      fetch: (_i, signal) => {
        seen = signal;
        return new Promise(() => {});
      },
      filled: () => false,
    });
    const p = l.priority({ key: "x", peer: "b" });
    await settle();
    await clock.advance(100);
    expect(await p).toBe("timeout");
    expect((seen as AbortSignal | null)?.aborted).toBe(true);
  });

  test("an_item_filled_meanwhile_is_skipped_not_fetched", async () => {
    const { l, fetches } = lanes({ parallelism: 1 });
    l.trigger("m", items(3));
    await settle();
    // While k0 is fetched, a request's own turn fills k2.
    fetches.stored.add("k2");
    fetches.finish("k0");
    await settle();
    fetches.finish("k1");
    await l.whenDone("m");
    expect(fetches.waiting.size).toBe(0);
    expect(l.stats()).toMatchObject({ hydrated: 2, skipped: 1 });
  });

  test("best_effort_what_failed_in_one_pass_is_fetched_by_the_next", async () => {
    const { l, fetches } = lanes();
    const want = items(3);
    l.trigger("m", want);
    await settle();
    fetches.finish("k0");
    fetches.fail("k1");
    fetches.finish("k2");
    await l.whenDone("m");
    expect(l.stats()).toMatchObject({ hydrated: 2, failed: 1 });
    // The next pass is given everything wanted: what is there is skipped, the miss is fetched.
    l.trigger("m", want);
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["k1"]);
    fetches.finish("k1");
    await l.whenDone("m");
    expect(l.stats()).toMatchObject({ hydrated: 3, skipped: 2, failed: 1 });
  });

  test("a_pass_past_the_queue_bound_takes_the_bound_and_drops_the_rest_for_the_next_pass", async () => {
    const { l, fetches, events } = lanes({ maxQueue: 8, parallelism: 2 });
    const want = items(20);
    l.trigger("m", want);
    expect(events[0]).toEqual({ kind: "pass_start", pass: "m", items: 8, dropped: 12 });
    expect(l.stats().queued).toBe(6);
    for (let i = 0; i < 8; i++) {
      await settle();
      fetches.finish(`k${i}`);
    }
    await l.whenDone("m");
    expect(l.stats()).toMatchObject({ hydrated: 8, dropped: 12 });
    // The next pass wants what is still missing (the caller leaves out what it holds).
    l.trigger(
      "m",
      want.filter((i) => !fetches.stored.has(i.key)),
    );
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["k8", "k9"]);
  });

  test("priority_requests_past_their_bound_answer_busy_at_once", async () => {
    const { l, fetches } = lanes({ maxPriority: 2 });
    const a = l.priority({ key: "a", peer: "b" });
    const b = l.priority({ key: "b", peer: "b" });
    expect(await l.priority({ key: "c", peer: "b" })).toBe("busy");
    await settle();
    fetches.finish("a");
    fetches.finish("b");
    expect(await Promise.all([a, b])).toEqual(["hydrated", "hydrated"]);
    expect(l.stats().dropped).toBe(1);
  });

  test("with_parallelism_0_no_pass_runs_but_priority_fetches_do", async () => {
    const { l, fetches } = lanes({ parallelism: 0 });
    expect(l.trigger("m", items(3))).toBe(false);
    const p = l.priority({ key: "k1", peer: "b" });
    await settle();
    fetches.finish("k1");
    expect(await p).toBe("hydrated");
  });
});

describe("hydration lanes: regressions", () => {
  test("a_busy_priority_request_leaves_its_item_in_the_pass_queue", async () => {
    // The priority lane is full; a request for an item the pass has queued is answered busy: the pass must still fetch it.
    const { l, fetches } = lanes({ parallelism: 1, maxPriority: 1 });
    l.trigger("m", items(3));
    await settle();
    expect([...fetches.waiting.keys()]).toEqual(["k0"]);
    const first = l.priority({ key: "p", peer: "b" });
    expect(await l.priority({ key: "k2", peer: "b" })).toBe("busy");
    expect(l.stats().queued).toBe(2);
    fetches.finish("p");
    expect(await first).toBe("hydrated");
    fetches.finish("k0");
    await settle();
    fetches.finish("k1");
    await settle();
    // k2 is still the pass's to fetch.
    expect([...fetches.waiting.keys()]).toEqual(["k2"]);
    fetches.finish("k2");
    await l.whenDone("m");
    expect(fetches.stored.has("k2")).toBe(true);
    expect(l.stats()).toMatchObject({ hydrated: 4, dropped: 1, queued: 0 });
  });
});

describe("hydration lanes: injected functions that throw", () => {
  test("a_fetch_that_throws_instead_of_rejecting_fails_its_item_and_the_pass_still_ends", async () => {
    const clock = new FakeClock();
    const fetches = new Fetches();
    const l = new HydrationLanes<Item>({
      parallelism: 2,
      itemTimeoutMs: 10_000,
      maxQueue: 16,
      maxPriority: 4,
      maxPasses: 2,
      clock,
      keyOf: (i) => i.key,
      // Not async: a bad item throws synchronously.
      fetch: (i, signal) => {
        if (i.peer === "bad") throw new Error("no address for this peer");
        return fetches.fetch(i, signal);
      },
      filled: (i) => fetches.stored.has(i.key),
    });
    l.trigger("m", [{ key: "x", peer: "bad" }, ...items(2)]);
    await settle();
    fetches.finish("k0");
    await settle();
    fetches.finish("k1");
    await l.whenDone("m");
    expect(l.running("m")).toBe(false);
    expect(l.stats()).toMatchObject({ hydrated: 2, failed: 1, inFlight: 0 });
    expect(clock.pending).toBe(0);
    // The priority lane answers it as failed (never rejects), and it is not left in flight.
    expect(await l.priority({ key: "x", peer: "bad" })).toBe("failed");
    expect(l.stats().inFlight).toBe(0);
    expect(clock.pending).toBe(0);
    // And the next pass for the key starts.
    expect(l.trigger("m", [{ key: "x", peer: "bad" }])).toBe(true);
    await l.whenDone("m");
  });

  test("an_event_listener_that_throws_does_not_stop_a_pass_or_a_priority_fetch", async () => {
    const { l, fetches } = lanes({
      parallelism: 1,
      onEvent: (e) => {
        if (e.kind === "fetch_end" || e.kind === "fetch_start") throw new Error("log sink closed");
      },
    });
    l.trigger("m", items(2));
    await settle();
    fetches.finish("k0");
    await settle();
    fetches.finish("k1");
    await l.whenDone("m");
    expect(l.running("m")).toBe(false);
    const p = l.priority({ key: "p", peer: "b" });
    await settle();
    fetches.finish("p");
    expect(await p).toBe("hydrated");
    expect(l.stats()).toMatchObject({ hydrated: 3, inFlight: 0 });
  });
});

describe("hydration lanes: close", () => {
  test("close_aborts_running_fetches_clears_their_timers_and_starts_nothing_new", async () => {
    const clock = new FakeClock();
    const signals: AbortSignal[] = [];
    const l = new HydrationLanes<Item>({
      parallelism: 2,
      itemTimeoutMs: 3_600_000,
      maxQueue: 16,
      maxPriority: 4,
      maxPasses: 2,
      clock,
      keyOf: (i) => i.key,
      // A peer that never answers (and a fetch that ignores its signal).
      fetch: (_i, signal) => {
        signals.push(signal);
        return new Promise(() => {});
      },
      filled: () => false,
    });
    l.trigger("m", items(5));
    const p = l.priority({ key: "p", peer: "b" });
    await settle();
    expect(signals).toHaveLength(3);
    expect(clock.pending).toBe(3);
    l.close();
    // Everything ends now, not at the (hour-long) timeout: no timer is left to hold the process.
    expect(await p).toBe("failed");
    await l.whenDone("m");
    expect(signals.every((s) => s.aborted)).toBe(true);
    expect(clock.pending).toBe(0);
    expect(l.stats()).toMatchObject({ inFlight: 0, queued: 0 });
    expect(l.running("m")).toBe(false);
    // Nothing new starts.
    expect(l.trigger("m", items(2))).toBe(false);
    expect(await l.priority({ key: "q", peer: "b" })).toBe("busy");
    await settle();
    expect(signals).toHaveLength(3);
    expect(clock.pending).toBe(0);
  });
});
