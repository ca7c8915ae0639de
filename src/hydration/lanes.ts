// Hydration lanes: a background pass that pulls many items from peers with
// bounded parallelism, and a priority lane for the one item a request waits
// on, which never queues behind the pass (seed 003: a pass that fetched one by
// one on a shared worker held a user-facing fetch back for minutes). Per pass
// key, one pass at a time (a second trigger while one runs is dropped, not
// queued); inside a pass, N workers; each item has a timeout; each item is
// re-checked just before its fetch (something else may have filled it); and
// it is best effort: what fails or is dropped is simply wanted again by the
// next pass. Pure: timers come from an injected clock, fetching and checking
// from injected functions, so it is tested without network or native code.

/** Timers the lanes use (real ones in a node, a fake one in tests). */
export interface LaneClock {
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(handle: unknown): void;
}

/** How one item ended. busy: the priority lane was full, nothing was tried. */
export type LaneOutcome = "hydrated" | "skipped" | "failed" | "timeout" | "busy";

/** What happened, in order (tests assert orderings on it; a node counts and logs from it). */
export type LaneEvent =
  | { kind: "pass_start"; pass: string; items: number; dropped: number }
  | { kind: "pass_deduped"; pass: string }
  | { kind: "pass_end"; pass: string; hydrated: number; skipped: number; failed: number }
  | { kind: "fetch_start"; key: string; lane: "background" | "priority" }
  | { kind: "fetch_end"; key: string; lane: "background" | "priority"; outcome: LaneOutcome }
  | { kind: "priority_request"; key: string }
  | { kind: "priority_joined"; key: string };

/** Bounds and behaviour of the lanes. */
export interface LanesOptions<T> {
  /** Background fetches at once, per pass (0 turns the background lane off; the priority lane still runs). */
  parallelism: number;
  /** An item's fetch is abandoned (and counted as a timeout) after this long. */
  itemTimeoutMs: number;
  /** Items one pass takes; the rest are dropped for this pass (the next one wants them again). */
  maxQueue: number;
  /** Priority fetches at once; past it a priority request answers busy at once. */
  maxPriority: number;
  /** Distinct pass keys running at once; past it a trigger is refused. */
  maxPasses: number;
  clock: LaneClock;
  /** The item's identity (in-flight dedupe is by it). */
  keyOf(item: T): string;
  /** Fetch and store the item; rejects on failure. The signal aborts at the timeout. `lane`: which lane asks. */
  fetch(item: T, signal: AbortSignal, lane: "background" | "priority"): Promise<void>;
  /** Whether the item is already there (re-checked just before its fetch). */
  filled(item: T): boolean | Promise<boolean>;
  onEvent?(e: LaneEvent): void;
}

/** Counters since start, and what is running now. */
export interface LaneStats {
  hydrated: number;
  skipped: number;
  failed: number;
  timeouts: number;
  /** Items a pass could not take (queue bound) or a priority request refused (busy). */
  dropped: number;
  priority: number;
  passes: number;
  passesDeduped: number;
  inFlight: number;
  queued: number;
}

/** Defaults: 4 background fetches, 10 s per item, 1024 items a pass, 64 priority fetches, 16 passes. */
export const LANE_DEFAULTS = { parallelism: 4, itemTimeoutMs: 10_000, maxQueue: 1024, maxPriority: 64, maxPasses: 16 } as const;

interface Pass<T> {
  queue: T[];
  done: Promise<void>;
}

/** A background lane per pass key, and a priority lane. */
export class HydrationLanes<T> {
  private readonly passes = new Map<string, Pass<T>>();
  /** Every fetch running (either lane), by item key: a second want of the same item joins it. */
  private readonly inflight = new Map<string, Promise<LaneOutcome>>();
  private priorityRunning = 0;
  /** How to stop each fetch running now (close() aborts them all). */
  private readonly stops = new Set<() => void>();
  private closed = false;
  private readonly counts = { hydrated: 0, skipped: 0, failed: 0, timeouts: 0, dropped: 0, priority: 0, passes: 0, passesDeduped: 0 };

  constructor(private readonly o: LanesOptions<T>) {}

  /**
   * Start a background pass over `items` under `pass` (e.g. a model id); false when one is already
   * running for it (the caller's next trigger brings whatever this one would have) or too many run.
   */
  trigger(pass: string, items: readonly T[]): boolean {
    if (this.closed) return false;
    if (this.passes.has(pass)) {
      this.counts.passesDeduped++;
      this.emit({ kind: "pass_deduped", pass });
      return false;
    }
    if (this.o.parallelism <= 0 || this.passes.size >= this.o.maxPasses) return false;
    const queue = items.slice(0, this.o.maxQueue);
    const dropped = items.length - queue.length;
    this.counts.dropped += dropped;
    this.counts.passes++;
    this.emit({ kind: "pass_start", pass, items: queue.length, dropped });
    const p: Pass<T> = { queue, done: Promise.resolve() };
    const tally = { hydrated: 0, skipped: 0, failed: 0 };
    const worker = async () => {
      for (let item = p.queue.shift(); item !== undefined; item = p.queue.shift()) {
        const outcome = await this.run(item, "background");
        if (outcome === "hydrated") tally.hydrated++;
        else if (outcome === "skipped") tally.skipped++;
        else tally.failed++;
      }
    };
    const workers = Math.max(1, Math.min(this.o.parallelism, queue.length));
    p.done = Promise.all(Array.from({ length: workers }, worker)).then(() => {
      this.passes.delete(pass);
      this.emit({ kind: "pass_end", pass, ...tally });
    });
    this.passes.set(pass, p);
    return true;
  }

  /**
   * Fetch one item now, for a request waiting on it: it never waits behind a pass. An item a pass has
   * queued is taken out of that queue; one already being fetched is joined (the only wait: that one
   * item). Resolves with how it ended; never rejects.
   */
  priority(item: T): Promise<LaneOutcome> {
    if (this.closed) return Promise.resolve("busy");
    const key = this.o.keyOf(item);
    this.emit({ kind: "priority_request", key });
    const running = this.inflight.get(key);
    if (running) {
      this.emit({ kind: "priority_joined", key });
      return running;
    }
    // Refused before anything changes: a busy request leaves its item in the pass's queue, so the pass still fetches it.
    if (this.priorityRunning >= this.o.maxPriority) {
      this.counts.dropped++;
      return Promise.resolve("busy");
    }
    for (const p of this.passes.values()) {
      const i = p.queue.findIndex((x) => this.o.keyOf(x) === key);
      if (i >= 0) p.queue.splice(i, 1);
    }
    this.counts.priority++;
    this.priorityRunning++;
    return this.run(item, "priority").finally(() => {
      this.priorityRunning--;
    });
  }

  /**
   * Stop for good (the node shuts down): queued items are dropped, every running fetch is aborted and ends as
   * failed (its timer cleared, so nothing of the lanes keeps the process alive), and nothing new starts:
   * trigger() answers false, priority() busy. Idempotent.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.passes.values()) p.queue.length = 0;
    for (const stop of [...this.stops]) stop();
  }

  /** Resolves when the pass under `pass` (if any) has ended. */
  whenDone(pass: string): Promise<void> {
    return this.passes.get(pass)?.done ?? Promise.resolve();
  }

  /** Whether a pass runs under `pass`. */
  running(pass: string): boolean {
    return this.passes.has(pass);
  }

  /** Counters and current load. */
  stats(): LaneStats {
    let queued = 0;
    for (const p of this.passes.values()) queued += p.queue.length;
    return { ...this.counts, inFlight: this.inflight.size, queued };
  }

  /** One item through re-check, fetch and timeout; the in-flight entry lives exactly as long as it runs. */
  private run(item: T, lane: "background" | "priority"): Promise<LaneOutcome> {
    const key = this.o.keyOf(item);
    const joined = this.inflight.get(key);
    // A background worker reaching an item the priority lane is fetching waits for it rather than fetching twice.
    if (joined) return joined.then((x) => (x === "hydrated" ? "skipped" : x));
    const p = this.attempt(item, key, lane).then((outcome) => {
      this.inflight.delete(key);
      this.count(outcome);
      this.emit({ kind: "fetch_end", key, lane, outcome });
      return outcome;
    });
    this.inflight.set(key, p);
    return p;
  }

  private async attempt(item: T, key: string, lane: "background" | "priority"): Promise<LaneOutcome> {
    try {
      if (await this.o.filled(item)) return "skipped";
    } catch {
      // Unknown: fetch it (importing twice is harmless, missing it is not).
    }
    if (this.closed) return "failed";
    this.emit({ kind: "fetch_start", key, lane });
    const abort = new AbortController();
    let stop = () => {};
    const stopped = new Promise<LaneOutcome>((resolve) => {
      stop = () => {
        abort.abort(new Error("hydration closed"));
        resolve("failed");
      };
    });
    this.stops.add(stop);
    let timer: unknown = null;
    const timedOut = new Promise<LaneOutcome>((resolve) => {
      timer = this.o.clock.setTimer(() => {
        abort.abort(new Error("hydration item timed out"));
        resolve("timeout");
      }, this.o.itemTimeoutMs);
    });
    // A fetch that throws instead of rejecting is a failure like any other: the race below (and its finally, which
    // clears the timer) must still run, or the item's in-flight entry and its pass would never end.
    let started: Promise<void>;
    try {
      started = this.o.fetch(item, abort.signal, lane);
    } catch (e) {
      started = Promise.reject(e);
    }
    const fetched = started.then(
      (): LaneOutcome => "hydrated",
      (): LaneOutcome => "failed",
    );
    try {
      return await Promise.race([fetched, timedOut, stopped]);
    } finally {
      this.o.clock.clearTimer(timer);
      this.stops.delete(stop);
    }
  }

  private count(outcome: LaneOutcome): void {
    if (outcome === "hydrated") this.counts.hydrated++;
    else if (outcome === "skipped") this.counts.skipped++;
    else if (outcome === "timeout") this.counts.timeouts++;
    else if (outcome === "failed") this.counts.failed++;
  }

  private emit(e: LaneEvent): void {
    try {
      this.o.onEvent?.(e);
    } catch {
      // An observer that throws must not end a worker or a fetch half-way (its pass would never end).
    }
  }
}
