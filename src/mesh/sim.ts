// A virtual clock and an in-process network for running many MeshCores in
// one process: latency, message loss, partitions, one-way link failures and
// killed nodes, with every byte counted. Time only moves when `advance` is
// called, so a 100-node minute runs in a fraction of a second. A node that
// listens under its id refuses a message addressed to any other node, as the
// HTTP gate does.
import type { Clock, NodeId, Transport, WireMessage } from "./wire";

interface Timer {
  at: number;
  seq: number;
  fn: () => void;
  cancelled: boolean;
}

function before(a: Timer, b: Timer): boolean {
  return a.at < b.at || (a.at === b.at && a.seq < b.seq);
}

/** A clock whose time moves only when told to; timers run in time order. */
export class VirtualClock implements Clock {
  private t: number;
  private seq = 0;
  private live = 0;
  // A binary min-heap by (time, sequence); cancelled timers are skipped when they surface.
  private readonly heap: Timer[] = [];

  constructor(start = 1_700_000_000_000) {
    this.t = start;
  }

  /** Current virtual time in ms. */
  now(): number {
    return this.t;
  }

  /** Schedule `fn` at now + ms. */
  setTimer(fn: () => void, ms: number): unknown {
    const timer: Timer = { at: this.t + Math.max(0, ms), seq: ++this.seq, fn, cancelled: false };
    this.push(timer);
    this.live++;
    return timer;
  }

  /** Cancel a timer. */
  clearTimer(handle: unknown): void {
    const timer = handle as Timer;
    if (timer && !timer.cancelled) {
      timer.cancelled = true;
      this.live--;
    }
  }

  /** Number of pending timers (bounded behaviour shows up here as a flat line). */
  get pending(): number {
    return this.live;
  }

  /** Run every timer due within `ms`, letting promise continuations settle between instants. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    for (;;) {
      await settle();
      const next = this.peek();
      if (!next || next.at > end) break;
      this.t = Math.max(this.t, next.at);
      // Every timer due at this instant runs before continuations: like one event-loop turn.
      for (let x = this.peek(); x && x.at <= this.t; x = this.peek()) {
        this.pop();
        x.cancelled = true;
        this.live--;
        x.fn();
      }
    }
    this.t = end;
  }

  /** Advance in steps until `pred` holds; returns the virtual ms it took, or null after `maxMs`. */
  async until(pred: () => boolean, maxMs: number, stepMs = 100): Promise<number | null> {
    const start = this.t;
    while (this.t - start < maxMs) {
      if (pred()) return this.t - start;
      await this.advance(stepMs);
    }
    return pred() ? this.t - start : null;
  }

  private peek(): Timer | undefined {
    while (this.heap.length > 0 && this.heap[0]?.cancelled) this.pop();
    return this.heap[0];
  }

  private push(x: Timer): void {
    const h = this.heap;
    h.push(x);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i] as Timer, h[p] as Timer)) break;
      [h[i], h[p]] = [h[p] as Timer, h[i] as Timer];
      i = p;
    }
  }

  private pop(): void {
    const h = this.heap;
    const last = h.pop();
    if (h.length === 0 || !last) return;
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < h.length && before(h[l] as Timer, h[m] as Timer)) m = l;
      if (r < h.length && before(h[r] as Timer, h[m] as Timer)) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m] as Timer, h[i] as Timer];
      i = m;
    }
  }
}

// setImmediate runs after every queued microtask: all promise chains woken by a timer finish first.
function settle(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/** Deterministic random numbers in [0, 1) from a seed (mulberry32). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// What a refusal weighs on the wire: the gate's one 401 body, the same every time.
const REFUSAL: WireMessage = { type: "error", code: "mesh_unauthorized", message: "mesh authentication required" };

/** Network conditions. */
export interface SimNetworkOptions {
  /** One-way latency is uniform in [min, max] ms. */
  latencyMs?: [number, number];
  /** Probability that any one message (request or reply) is lost. */
  loss?: number;
  random?: () => number;
}

/** Answers a message; `from` is the sender's address (what an authenticated transport would vouch for). */
type Handler = (msg: WireMessage, from: string) => Promise<WireMessage>;

/** Thrown by a simulated request that got no answer. */
export class SimTimeout extends Error {
  constructor(addr: string) {
    super(`no answer from ${addr}`);
    this.name = "SimTimeout";
  }
}

/** Thrown by a simulated request addressed to another node than the one listening at its address (the gate's 401). */
export class SimRefused extends Error {
  constructor(addr: string, to: NodeId) {
    super(`${addr} refused a message for node ${to.slice(0, 8)}`);
    this.name = "SimRefused";
  }
}

interface Listener {
  handler: Handler;
  id: NodeId | undefined;
}

/** An in-process network of nodes, each at an address, with faults on demand. */
export class SimNetwork {
  private readonly listeners = new Map<string, Listener>();
  private readonly down = new Set<string>();
  private readonly cut = new Set<string>();
  private groups: Map<string, number> | null = null;
  private readonly random: () => number;
  private readonly latency: [number, number];
  /** Bytes each address sent (requests and replies), as JSON. */
  readonly sent = new Map<string, number>();
  /** Messages each address sent. */
  readonly messages = new Map<string, number>();
  /** Messages each address refused because they were addressed to another node. */
  readonly refused = new Map<string, number>();
  /** Return true to drop a message: (from, to, msg). */
  dropIf: ((from: string, to: string, msg: WireMessage) => boolean) | null = null;
  loss: number;

  constructor(
    private readonly clock: VirtualClock,
    o: SimNetworkOptions = {},
  ) {
    this.random = o.random ?? Math.random;
    this.latency = o.latencyMs ?? [1, 10];
    this.loss = o.loss ?? 0;
  }

  /**
   * Put a node's handler at `addr` (replacing a killed one: a restart). With its node `id`, messages addressed
   * to any other node are refused there; without it, every message is taken, whoever it names.
   */
  listen(addr: string, handler: Handler, id?: NodeId): void {
    this.listeners.set(addr, { handler, id });
    this.down.delete(addr);
  }

  /** The node at `addr` stops answering (kill -9). */
  kill(addr: string): void {
    this.down.add(addr);
  }

  /** No message from `a` reaches `b` (one way). */
  cutLink(a: string, b: string): void {
    this.cut.add(`${a}>${b}`);
  }

  /** Restore every cut link. */
  restoreLinks(): void {
    this.cut.clear();
  }

  /** Only nodes in the same group can talk; addresses in no group talk to nobody. */
  partition(groups: string[][]): void {
    this.groups = new Map();
    groups.forEach((g, i) => {
      for (const a of g) this.groups?.set(a, i);
    });
  }

  /** End the partition. */
  heal(): void {
    this.groups = null;
  }

  /** The Transport a node at `from` uses. */
  transport(from: string): Transport {
    return { request: (addr, msg, timeoutMs, to) => this.request(from, addr, msg, timeoutMs, to) };
  }

  /** Zero every counter. */
  resetCounters(): void {
    this.sent.clear();
    this.messages.clear();
    this.refused.clear();
  }

  private reaches(from: string, to: string, msg: WireMessage): boolean {
    if (this.down.has(from) || this.down.has(to)) return false;
    if (this.cut.has(`${from}>${to}`)) return false;
    if (this.groups && this.groups.get(from) !== this.groups.get(to)) return false;
    if (this.dropIf?.(from, to, msg)) return false;
    return this.random() >= this.loss;
  }

  private count(from: string, json: string): void {
    this.sent.set(from, (this.sent.get(from) ?? 0) + json.length);
    this.messages.set(from, (this.messages.get(from) ?? 0) + 1);
  }

  private delay(): number {
    const [lo, hi] = this.latency;
    return lo + this.random() * (hi - lo);
  }

  private request(from: string, to: string, msg: WireMessage, timeoutMs: number, toNode?: NodeId): Promise<WireMessage> {
    const json = JSON.stringify(msg);
    this.count(from, json);
    return new Promise((resolve, reject) => {
      let done = false;
      const timer = this.clock.setTimer(() => {
        if (done) return;
        done = true;
        reject(new SimTimeout(to));
      }, timeoutMs);
      const finish = (outcome: () => void) => {
        if (done) return;
        done = true;
        this.clock.clearTimer(timer);
        outcome();
      };
      if (!this.reaches(from, to, msg)) return;
      this.clock.setTimer(() => {
        const listener = this.listeners.get(to);
        if (!listener || this.down.has(to)) return;
        if (toNode !== undefined && listener.id !== undefined && toNode !== listener.id) {
          // The gate refuses before any handler runs; the refusal itself travels back like any reply.
          this.refused.set(to, (this.refused.get(to) ?? 0) + 1);
          const back = JSON.stringify(REFUSAL);
          this.count(to, back);
          if (!this.reaches(to, from, REFUSAL)) return;
          this.clock.setTimer(() => finish(() => reject(new SimRefused(to, toNode))), this.delay());
          return;
        }
        // Every message crosses as JSON, as on the wire: no object is shared between nodes.
        void listener.handler(JSON.parse(json), from).then((reply) => {
          const back = JSON.stringify(reply);
          this.count(to, back);
          if (!this.reaches(to, from, reply)) return;
          this.clock.setTimer(() => finish(() => resolve(JSON.parse(back))), this.delay());
        });
      }, this.delay());
    });
  }
}
