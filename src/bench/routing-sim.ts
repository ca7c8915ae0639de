// The routing simulation: entry nodes that route, worker nodes that serve one
// model through a simulated engine, all real MeshCores on the in-process
// network under virtual time, with the real key, index, policy and sync code.
// Multi-turn agent conversations arrive at random entry nodes; a follow-up
// turn is a hit when the worker it is sent to still holds the conversation's
// previous turn (prompt + reply) in its KV. The same traffic (same seed) runs
// under four variants of what the entry nodes know:
//
//   mesh    the real RouteSync: workers' engines report tenancy, the sync carries it to the entries
//   shared  one RoutingIndex for every entry, updated at once by every worker, and every worker's
//           load as it is now (the upper bound of what any sync could tell the entries)
//   local   each entry's own index learns only from its own decisions (a gateway without sync)
//   random  a uniformly random worker
//
// Every entry but the upper bound's sees load through its worker registry: the store's records,
// republished once a second, as `mesh serve` does. Misses are split by why: evicted everywhere,
// unknown to the entry's index (for local: it never learns replies), or known and passed over by
// the policy (its load gate or its cost).
//
//   bun run src/bench/routing-sim.ts [--entries 8] [--workers 240] [--seed 1] [--json]
//   bun run src/bench/routing-sim.ts --soak [...]   (src/bench/routing-soak.ts)
import { createHash, createPrivateKey, createPublicKey, sign } from "node:crypto";
import { parseArgs } from "node:util";
import { silentLogger } from "../log";
import { type Identity, nodeIdOf } from "../mesh/identity";
import { seededRandom } from "../mesh/sim";
import type { SimNode } from "../mesh/sim-cluster";
import { SimCluster } from "../mesh/sim-cluster";
import type { WorkerInfo } from "../mesh/wire";
import { type KeyMessage, type RouteKey, RouteKeyer, Router } from "../routing/index";
import type { TenancyDelta } from "../routing/own";
import { OwnTenancy } from "../routing/own";
import { RoutingIndex } from "../routing/radix";
import { RouteSync, type RouteSyncConfig } from "../routing/sync";
import { type EngineShape, SimEngine } from "./routing-sim-engine";

/** What the entries know of the workers' caches. */
export type Variant = "mesh" | "shared" | "local" | "random";
/** Every variant, in report order. */
export const VARIANTS: readonly Variant[] = ["mesh", "shared", "local", "random"];

/** The conversations: sizes in characters, times in virtual ms, [min, max] uniform. */
export interface TrafficShape {
  /** New conversations per virtual second (Poisson arrivals). */
  conversationsPerSec: number;
  systemChars: number;
  userChars: [number, number];
  /** The assistant's words before its tool call, and the call's arguments: together, the reply's tokens. */
  replyChars: [number, number];
  argsChars: [number, number];
  toolResultChars: [number, number];
  turns: [number, number];
  thinkMs: [number, number];
}

/** Options of a run. */
export interface RoutingSimOptions {
  entries: number;
  workers: number;
  seed: number;
  variants?: readonly Variant[];
  traffic?: Partial<TrafficShape>;
  engine?: Partial<EngineShape>;
  /** Virtual seconds of traffic before measuring (caches fill; 90 by default), then measured (180). */
  warmupS?: number;
  measureS?: number;
  /** Virtual seconds after traffic stops, measured for idle sync bytes. */
  idleS?: number;
  /** Route sync tunables for variant mesh (defaults otherwise). */
  sync?: Partial<RouteSyncConfig>;
  /** One-way latency of the simulated network, ms. */
  latencyMs?: [number, number];
  /** Called with a line of progress now and then (the CLI prints it to stderr). */
  progress?: (line: string) => void;
}

/** Defaults of the traffic: agent loops of 3-8 turns, a shared 6 000-character system prompt, tool results of 1-4 k characters. */
export const TRAFFIC_DEFAULTS: TrafficShape = {
  conversationsPerSec: 24,
  systemChars: 6000,
  userChars: [2000, 6000],
  replyChars: [100, 400],
  argsChars: [50, 250],
  toolResultChars: [1000, 4000],
  turns: [3, 8],
  thinkMs: [2000, 8000],
};

/** Defaults of a worker's engine: 4 slots, 48 000 tokens of KV, 0.25 ms a prompt token, 20 ms an output token. */
export const ENGINE_DEFAULTS: EngineShape = { slots: 4, kvTokens: 48_000, charsPerToken: 4, prefillMsPerToken: 0.25, decodeMsPerToken: 20 };

/** Mean and max over nodes. */
export interface Spread {
  mean: number;
  max: number;
}

/** The mesh variant's sync figures. */
export interface SyncFigures {
  /** Route-sync bytes each node sent per round while measured (batches and path answers; acks and path requests). */
  routeBytesPerNodeRound: { entries: Spread; workers: Spread };
  /** All mesh bytes each node sent per round (membership, store, worker records and the route sync). */
  totalBytesPerNodeRound: { entries: Spread; workers: Spread };
  /** Route-sync bytes per node per round after traffic stopped. */
  idleRouteBytesPerNodeRound: Spread;
  batchesSent: number;
  batchesFailed: number;
  batchesSplit: number;
  insertsSent: number;
  evictsSent: number;
  /** Inserts dropped with their eviction before being sent, and batches sent right after an ack. */
  cancelled: number;
  burstSent: number;
  resyncs: number;
  pendingOverflows: number;
  pathRequests: number;
  /** Entries' unresolved parents at the end. */
  unresolved: number;
  /** Entries' index sizes at the end of traffic. */
  indexEntries: Spread;
  budgetEvictions: number;
}

/** One variant's figures. */
export interface VariantReport {
  variant: Variant;
  /** Turns routed while measured, and follow-ups (turn >= 1) among them. */
  turns: number;
  followUps: number;
  hits: number;
  hitRate: number;
  /** Prompt tokens found cached at admission, over all prompt tokens of measured turns. */
  cachedTokenFraction: number;
  /** Virtual ms from arrival at the entry to the first token: mean and 95th percentile. */
  ttftMs: { mean: number; p95: number };
  /** Decisions by reason (random: all "load"), and cache decisions that rode a lease. */
  byReason: { cache: number; load: number; only: number };
  viaLease: number;
  /**
   * Follow-ups that missed, by why: no worker held the previous turn any more (evicted everywhere); a worker held
   * it but the entry's index did not say so (unknown); the index said so and the policy chose another (passed over).
   */
  misses: { evicted: number; unknown: number; passedOver: number };
  /** Busy slot time over all slot time while measured. */
  slotUtilization: number;
  /** Sequences evicted from workers' KV while measured, and admissions over capacity. */
  evictedSeqs: number;
  overcommits: number;
  sync: SyncFigures | null;
  wallSeconds: number;
}

/** A whole run. */
export interface RoutingSimReport {
  entries: number;
  workers: number;
  seed: number;
  traffic: TrafficShape;
  engine: EngineShape;
  warmupS: number;
  measureS: number;
  variants: VariantReport[];
}

const MODEL = "m";
// Arrivals ramp up over the first half of the warm-up; the mesh settles by its end (queues formed in
// the ramp have drained), so the measured window is the steady state.
const WARMUP_S = 90;
const MEASURE_S = 180;
const SECRET = "routing-sim";
// One way from an entry to a worker and back, for the request itself (the mesh's own messages have the network's latency).
const HOP_MS = 2;

interface Entry {
  node: SimNode;
  router: Router | null;
  sync: RouteSync | null;
  acks: { bytes: number };
}

interface Worker {
  node: SimNode;
  id: string;
  engine: SimEngine;
  sync: RouteSync | null;
  acks: { bytes: number };
}

interface Conversation {
  id: number;
  rnd: () => number;
  turns: number;
  turn: number;
  messages: KeyMessage[];
  /** The last hash of the previous turn's prompt + reply: what a hit finds held. */
  prevTip: string | null;
}

// PKCS#8 header of a raw 32-byte Ed25519 private key.
const PKCS8_ED25519 = Buffer.from("302e020100300506032b657004220420", "hex");

/** An Ed25519 identity derived from (seed, name): node ids, and so every tie broken by id, repeat from run to run. */
export function seededIdentity(seed: number, name: string): Identity {
  const raw = createHash("sha256").update(`routing-sim/${seed}/${name}`).digest();
  const key = createPrivateKey({ key: Buffer.concat([PKCS8_ED25519, raw]), format: "der", type: "pkcs8" });
  const spki = createPublicKey(key).export({ format: "der", type: "spki" });
  const publicKey = spki.subarray(spki.length - 32).toString("base64");
  return { id: nodeIdOf(publicKey), publicKey, sign: (data) => sign(null, data, key).toString("base64") };
}

/** A deterministic text of `n` characters starting with `tag`, cut from a shared pool. */
function textOf(pool: string, rnd: () => number, tag: string, n: number): string {
  const len = Math.max(0, n - tag.length - 1);
  const at = Math.floor(rnd() * (pool.length - len));
  return `${tag} ${pool.slice(at, at + len)}`;
}

function between(rnd: () => number, [lo, hi]: [number, number]): number {
  return lo + Math.floor(rnd() * (hi - lo + 1));
}

/** A pool of word-like text, the same for a seed. */
export function textPool(seed: number, chars = 1 << 20): string {
  const rnd = seededRandom(seed ^ 0x7e57);
  const parts: string[] = [];
  let n = 0;
  while (n < chars) {
    const w = 2 + Math.floor(rnd() * 8);
    let s = "";
    for (let i = 0; i < w; i++) s += String.fromCharCode(97 + Math.floor(rnd() * 26));
    parts.push(s);
    n += w + 1;
  }
  return parts.join(" ").slice(0, chars);
}

function spread(xs: number[]): Spread {
  if (xs.length === 0) return { mean: 0, max: 0 };
  return { mean: Math.round(xs.reduce((s, x) => s + x, 0) / xs.length), max: Math.round(Math.max(...xs)) };
}

function pairsOf(key: RouteKey): Array<[string, string | null]> {
  const hs = key.hashes;
  return hs.map((h, i) => [h, i > 0 ? (hs[i - 1] as string) : null]);
}

/** Run one variant on a fresh mesh. */
export async function runVariant(variant: Variant, o: RoutingSimOptions): Promise<VariantReport> {
  const wall = performance.now();
  const traffic = { ...TRAFFIC_DEFAULTS, ...o.traffic };
  const shape = { ...ENGINE_DEFAULTS, ...o.engine };
  const warmupMs = (o.warmupS ?? WARMUP_S) * 1000;
  const measureMs = (o.measureS ?? MEASURE_S) * 1000;
  const idleMs = (o.idleS ?? 30) * 1000;
  const say = o.progress ?? (() => {});
  const c = new SimCluster({ seed: o.seed, network: { latencyMs: o.latencyMs ?? [1, 5] } });
  const clock = c.clock;
  const t0 = clock.now();
  const keyer = new RouteKeyer(SECRET);
  const shared = variant === "shared" ? new RoutingIndex() : null;
  const synced = variant === "mesh";
  // Entries serve nothing, so they never learn the engines' speed: they are told it, as an operator would configure it.
  const policy = { prefillMsPerToken: shape.prefillMsPerToken, serviceMs: 3000 };

  // ---- the mesh --------------------------------------------------------------------------------
  const names = [...Array.from({ length: o.entries }, (_, i) => `e${i}`), ...Array.from({ length: o.workers }, (_, i) => `w${i}`)];
  for (const n of names) c.add(n, seededIdentity(o.seed, n));
  const seeds = names.slice(0, 3).map((n) => c.node(n).addr);
  await Promise.all(names.slice(1).map((n) => c.wait(c.node(n).core.join(seeds.filter((s) => s !== c.node(n).addr)), 600_000)));
  const routeAcks = new Map<string, { bytes: number }>();
  for (const n of names) routeAcks.set(c.node(n).addr, { bytes: 0 });
  // Acks travel as replies; the sync's own counter covers what it sends, this covers what it answers.
  c.net.dropIf = (from, _to, msg) => {
    const a = msg.type === "route-ack" ? routeAcks.get(from) : undefined;
    if (a) a.bytes += JSON.stringify(msg).length;
    return false;
  };
  const syncFor = (node: SimNode, index: RoutingIndex, own: OwnTenancy, wantServed: boolean): RouteSync => {
    const sync = new RouteSync({
      selfId: node.identity.id,
      identity: node.identity,
      directory: node.core.directory,
      store: node.core.store,
      transport: c.net.transport(node.addr),
      clock,
      index,
      own,
      config: { ...o.sync, wantServed },
      log: silentLogger,
      random: seededRandom(o.seed ^ Number(Bun.hash(node.name) & 0xffffffffn)),
    });
    node.core.extend(sync);
    return sync;
  };

  const byId = new Map<string, Worker>();
  const entries: Entry[] = names.slice(0, o.entries).map((n) => {
    const node = c.node(n);
    const acks = routeAcks.get(node.addr) as { bytes: number };
    if (variant === "random") return { node, router: null, sync: null, acks };
    const index = shared ?? new RoutingIndex();
    const router = new Router({
      selfId: node.identity.id,
      workers: () =>
        node.core.workers.list().flatMap((e) => {
          if (!e.routable) return [];
          // The upper bound knows every worker's load as it is now, not as last published.
          const w = shared ? byId.get(e.info.id) : undefined;
          return [w ? { ...e.info, ...w.engine.load() } : e.info];
        }),
      index,
      now: () => clock.now(),
      // Near-ties broken at random as on a real node, seeded so a run is reproducible.
      random: seededRandom(o.seed ^ 0x71e5 ^ Number(Bun.hash(node.name) & 0xffffn)),
      policy,
    });
    let sync: RouteSync | null = null;
    if (synced) {
      const own = new OwnTenancy();
      sync = syncFor(node, index, own, true);
      router.connect(own, sync);
    }
    return { node, router, sync, acks };
  });

  const workers: Worker[] = names.slice(o.entries).map((n) => {
    const node = c.node(n);
    const acks = routeAcks.get(node.addr) as { bytes: number };
    let report: ((d: TenancyDelta) => void) | null = null;
    let sync: RouteSync | null = null;
    if (synced || variant === "shared") {
      // The worker's own node: its engine's reports go through its Router (index, own tenancy, sync), as in `mesh serve`.
      const index = shared ?? new RoutingIndex();
      const router = new Router({ selfId: node.identity.id, workers: () => [], index, now: () => clock.now() });
      if (synced) {
        const own = new OwnTenancy();
        // Workers take no client traffic: they do not want the index, they only feed it.
        sync = syncFor(node, index, own, false);
        router.connect(own, sync);
      }
      report = (d) => router.onTenancy(MODEL, d);
    }
    const engine = new SimEngine(shape, clock, report);
    const reg = node.core.workers.register({
      models: [MODEL],
      addr: `${n}:8080`,
      ctxSize: 32_768,
      health: "ready",
      ...engine.load(),
      slotsTotal: shape.slots,
    });
    if (!reg.ok) throw new Error(`cannot register ${n}'s worker: ${reg.message}`);
    return { node, id: reg.value.id, engine, sync, acks };
  });
  const byNode = new Map(workers.map((w) => [w.node.identity.id, w]));
  for (const w of workers) byId.set(w.id, w);

  const formed = await clock.until(() => c.converged(), 600_000, 250);
  if (formed === null) throw new Error("the mesh did not form");
  const ready = () => entries.every((e) => e.node.core.workers.list().filter((w) => w.routable).length === o.workers);
  if ((await clock.until(ready, 600_000, 250)) === null) throw new Error("the workers did not reach every entry");
  if (synced) {
    // An entry that routes wants the model's index; a gateway in service has been routing for a while.
    for (const e of entries) e.sync?.noteRouted(MODEL);
    const known = () => workers.every((w) => entries.every((e) => w.sync?.wants(e.node.identity.id).has(MODEL)));
    if ((await clock.until(known, 600_000, 250)) === null) throw new Error("the entries' wanted sets did not spread");
  }
  say(`${variant}: mesh of ${names.length} formed at ${((clock.now() - t0) / 1000).toFixed(0)} s virtual`);

  // Load figures, as `mesh serve` publishes them: read every second, the registry publishes changes.
  for (const [i, w] of workers.entries()) {
    const tick = () => {
      w.node.core.workers.update(w.id, w.engine.load());
      clock.setTimer(tick, 1000);
    };
    clock.setTimer(tick, Math.floor((i * 997) % 1000));
  }

  // ---- the traffic -----------------------------------------------------------------------------
  const pool = textPool(o.seed);
  const system: KeyMessage = { role: "system", content: textOf(pool, seededRandom(o.seed ^ 0x5e5), "system", traffic.systemChars) };
  const arrivals = seededRandom(o.seed * 7919 + 1);
  const pick = seededRandom(o.seed * 104_729 + 3);
  const start = clock.now();
  const measureFrom = start + warmupMs;
  const measureTo = measureFrom + measureMs;
  const m = {
    turns: 0,
    followUps: 0,
    hits: 0,
    cached: 0,
    prompt: 0,
    ttft: [] as number[],
    byReason: { cache: 0, load: 0, only: 0 },
    viaLease: 0,
    misses: { evicted: 0, unknown: 0, passedOver: 0 },
  };
  let live = 0;

  const runTurn = (conv: Conversation): void => {
    if (clock.now() >= measureTo) return;
    const entryAt = clock.now();
    const measured = entryAt >= measureFrom;
    const entry = entries[Math.floor(conv.rnd() * entries.length)] as Entry;
    const key = keyer.chat(MODEL, conv.messages);
    let target: WorkerInfo;
    if (entry.router) {
      const d = entry.router.decide(MODEL, key);
      if (!d) throw new Error("no worker to route to");
      target = d.target.worker;
      if (measured) {
        m.byReason[d.reason]++;
        if (d.reason === "cache" && d.target.via === "lease") m.viaLease++;
      }
      // A gateway without sync learns what it sent where: the whole prompt, as held by its target.
      if (variant === "local") entry.router.index.model(MODEL).insertPath(target.nodeId, pairsOf(key));
      entry.router.begin(target.id);
    } else {
      const all = entry.node.core.workers.list().filter((w) => w.routable);
      target = (all[Math.floor(pick() * all.length)] as (typeof all)[number]).info;
      if (measured) m.byReason.load++;
    }
    const w = byNode.get(target.nodeId) as Worker;
    if (measured) {
      m.turns++;
      if (conv.turn > 0) {
        m.followUps++;
        const tip = conv.prevTip as string;
        if (w.engine.holds(tip)) m.hits++;
        else {
          const holders = workers.filter((x) => x.engine.holds(tip));
          const idx = entry.router?.index.peek(MODEL);
          if (holders.length === 0) m.misses.evicted++;
          else if (idx && holders.some((x) => idx.holds(x.node.identity.id, tip))) m.misses.passedOver++;
          else m.misses.unknown++;
        }
      }
    }
    const replyChars = between(conv.rnd, traffic.replyChars);
    const argsChars = between(conv.rnd, traffic.argsChars);
    const reply: KeyMessage = {
      role: "assistant",
      content: textOf(pool, conv.rnd, `c${conv.id}t${conv.turn}`, replyChars),
      tool_calls: [
        {
          id: `call_${conv.id}_${conv.turn}`,
          type: "function",
          function: { name: "run", arguments: textOf(pool, conv.rnd, "args", argsChars) },
        },
      ],
    };
    const replyBlocks = keyer.extend(key, reply);
    const tool: KeyMessage = {
      role: "tool",
      tool_call_id: `call_${conv.id}_${conv.turn}`,
      content: textOf(pool, conv.rnd, `r${conv.id}t${conv.turn}`, between(conv.rnd, traffic.toolResultChars)),
    };
    const think = between(conv.rnd, traffic.thinkMs);
    const tip = replyBlocks.length > 0 ? (replyBlocks[replyBlocks.length - 1] as [string, string | null])[0] : key.hash(key.length - 1);
    clock.setTimer(() => {
      w.engine.submit({
        key,
        reply: replyBlocks,
        replyTokens: Math.ceil((replyChars + argsChars) / shape.charsPerToken),
        done: (r) => {
          if (measured) {
            m.cached += r.cachedTokens;
            m.prompt += r.promptTokens;
            m.ttft.push(2 * HOP_MS + r.queuedMs + r.prefillMs);
          }
          clock.setTimer(() => {
            entry.router?.end(target.id);
            conv.messages.push(reply, tool);
            conv.prevTip = tip;
            conv.turn++;
            if (conv.turn < conv.turns) clock.setTimer(() => runTurn(conv), think);
            else live--;
          }, HOP_MS);
        },
      });
    }, HOP_MS);
  };

  let nextId = 0;
  const arrive = (): void => {
    if (clock.now() >= measureTo) return;
    const id = nextId++;
    const rnd = seededRandom((o.seed * 1_000_003 + id * 7_919) >>> 0);
    const conv: Conversation = {
      id,
      rnd,
      turns: between(rnd, traffic.turns),
      turn: 0,
      messages: [system, { role: "user", content: textOf(pool, rnd, `task ${id}`, between(rnd, traffic.userChars)) }],
      prevTip: null,
    };
    live++;
    runTurn(conv);
    // Arrivals ramp up over the first half of the warm-up: a mesh in service does not start cold at full rate.
    const ramp = Math.min(1, Math.max(0.1, (clock.now() - start) / Math.max(1, warmupMs / 2)));
    clock.setTimer(arrive, (-Math.log(1 - arrivals()) / (traffic.conversationsPerSec * ramp)) * 1000);
  };
  clock.setTimer(arrive, 0);

  // ---- measuring -------------------------------------------------------------------------------
  let engineBase = { busy: 0, evicted: 0, over: 0 };
  const engineSum = () => {
    let busy = 0;
    let evicted = 0;
    let over = 0;
    for (const w of workers) {
      busy += w.engine.counts.busyMs;
      evicted += w.engine.counts.evictedSeqs;
      over += w.engine.counts.overcommits;
    }
    return { busy, evicted, over };
  };
  const syncSent = (x: { sync: RouteSync | null; acks: { bytes: number } }) => (x.sync?.stats().bytesSent ?? 0) + x.acks.bytes;
  let routeBase = new Map<string, number>();
  for (let t = clock.now(); t < measureTo; t = clock.now()) {
    if (t < measureFrom && t + 10_000 >= measureFrom) {
      await clock.advance(measureFrom - t);
      engineBase = engineSum();
      c.net.resetCounters();
      routeBase = new Map([...entries, ...workers].map((x) => [x.node.addr, syncSent(x)]));
      continue;
    }
    await clock.advance(Math.min(10_000, measureTo - t));
    const at = (clock.now() - start) / 1000;
    const loads = workers.map((w) => w.engine.load());
    const queued = loads.filter((l) => l.queueDepth > 0).length;
    const maxQ = Math.max(...loads.map((l) => l.queueDepth));
    const busy = loads.reduce((acc, l) => acc + l.slotsBusy, 0) / (o.workers * shape.slots);
    say(
      `${variant}: ${at.toFixed(0)} s virtual, ${live} conversations live, slots ${(busy * 100).toFixed(0)} % busy, ` +
        `${queued} workers queueing (max ${maxQ}), ${((performance.now() - wall) / 1000).toFixed(0)} s wall`,
    );
  }
  const rounds = measureMs / 1000;
  const eng = engineSum();
  let sync: SyncFigures | null = null;
  const perRound = (xs: Array<Entry | Worker>, f: (x: Entry | Worker) => number) => spread(xs.map((x) => f(x) / rounds));
  if (synced) {
    const routeBytes = (x: Entry | Worker) => syncSent(x) - (routeBase.get(x.node.addr) ?? 0);
    const netBytes = (x: Entry | Worker) => c.net.sent.get(x.node.addr) ?? 0;
    const stats = [...entries, ...workers].map((x) => (x.sync as RouteSync).stats());
    const sum = (f: (s: (typeof stats)[number]) => number) => stats.reduce((acc, s) => acc + f(s), 0);
    const idx = entries.map((e) => e.router?.index.stats().models[MODEL] ?? { entries: 0, bytes: 0, budgetEvictions: 0 });
    sync = {
      routeBytesPerNodeRound: { entries: perRound(entries, routeBytes), workers: perRound(workers, routeBytes) },
      totalBytesPerNodeRound: { entries: perRound(entries, netBytes), workers: perRound(workers, netBytes) },
      idleRouteBytesPerNodeRound: { mean: 0, max: 0 },
      batchesSent: sum((s) => s.batchesSent),
      batchesFailed: sum((s) => s.batchesFailed),
      batchesSplit: sum((s) => s.batchesSplit),
      insertsSent: sum((s) => s.insertsSent),
      evictsSent: sum((s) => s.evictsSent),
      cancelled: sum((s) => s.cancelled),
      burstSent: sum((s) => s.burstSent),
      resyncs: sum((s) => s.resyncs),
      pendingOverflows: sum((s) => s.pendingOverflows),
      pathRequests: sum((s) => s.pathRequestsSent),
      unresolved: 0,
      indexEntries: spread(idx.map((x) => x.entries)),
      budgetEvictions: idx.reduce((s, x) => s + x.budgetEvictions, 0),
    };
    // Traffic stopped: let what is running finish and the last changes go out, then count what an idle mesh sends.
    await clock.advance(idleMs);
    const idleBase = new Map([...entries, ...workers].map((x) => [x.node.addr, syncSent(x)]));
    await clock.advance(idleMs);
    sync.idleRouteBytesPerNodeRound = spread(
      [...entries, ...workers].map((x) => (syncSent(x) - (idleBase.get(x.node.addr) ?? 0)) / (idleMs / 1000)),
    );
    sync.unresolved = entries.reduce((s, e) => s + (e.sync?.stats().unresolved ?? 0), 0);
  }
  for (const n of names) c.node(n).core.stop();
  const ttft = [...m.ttft].sort((a, b) => a - b);
  const r3 = (x: number) => Math.round(x * 1000) / 1000;
  return {
    variant,
    turns: m.turns,
    followUps: m.followUps,
    hits: m.hits,
    hitRate: r3(m.followUps > 0 ? m.hits / m.followUps : 0),
    cachedTokenFraction: r3(m.prompt > 0 ? m.cached / m.prompt : 0),
    ttftMs: {
      mean: Math.round(ttft.reduce((s, x) => s + x, 0) / Math.max(1, ttft.length)),
      p95: Math.round(ttft[Math.floor(0.95 * (ttft.length - 1))] ?? 0),
    },
    byReason: m.byReason,
    viaLease: m.viaLease,
    misses: m.misses,
    slotUtilization: r3((eng.busy - engineBase.busy) / (o.workers * shape.slots * measureMs)),
    evictedSeqs: eng.evicted - engineBase.evicted,
    overcommits: eng.over - engineBase.over,
    sync,
    wallSeconds: Math.round((performance.now() - wall) / 100) / 10,
  };
}

/** Run every variant (each on a fresh mesh, same seed, same traffic). */
export async function runRoutingSim(o: RoutingSimOptions): Promise<RoutingSimReport> {
  const variants: VariantReport[] = [];
  for (const v of o.variants ?? VARIANTS) {
    variants.push(await runVariant(v, o));
    Bun.gc(true);
  }
  return {
    entries: o.entries,
    workers: o.workers,
    seed: o.seed,
    traffic: { ...TRAFFIC_DEFAULTS, ...o.traffic },
    engine: { ...ENGINE_DEFAULTS, ...o.engine },
    warmupS: o.warmupS ?? WARMUP_S,
    measureS: o.measureS ?? MEASURE_S,
    variants,
  };
}

/** The report as a table, one column per variant. */
export function routingSimTable(r: RoutingSimReport): string {
  const vs = r.variants;
  const rows: string[][] = [["", ...vs.map((v) => v.variant)]];
  const row = (k: string, f: (v: VariantReport) => string) => rows.push([k, ...vs.map(f)]);
  row("follow-up hit rate", (v) => v.hitRate.toFixed(3));
  row("follow-ups / turns measured", (v) => `${v.followUps} / ${v.turns}`);
  row("prompt tokens cached", (v) => `${(v.cachedTokenFraction * 100).toFixed(1)} %`);
  row("time to first token, mean / p95", (v) => `${v.ttftMs.mean} / ${v.ttftMs.p95} ms`);
  row("decisions cache / load (via lease)", (v) => `${v.byReason.cache} / ${v.byReason.load} (${v.viaLease})`);
  row("misses: evicted / unknown / passed over", (v) => `${v.misses.evicted} / ${v.misses.unknown} / ${v.misses.passedOver}`);
  row("slot utilisation", (v) => `${(v.slotUtilization * 100).toFixed(1)} %`);
  row("sequences evicted (overcommits)", (v) => `${v.evictedSeqs} (${v.overcommits})`);
  row("wall time", (v) => `${v.wallSeconds} s`);
  const w = rows[0]?.map((_, i) => Math.max(...rows.map((x) => (x[i] ?? "").length))) ?? [];
  const out = rows.map((x) => x.map((s, i) => (i === 0 ? s.padEnd(w[i] ?? 0) : s.padStart(w[i] ?? 0))).join("  "));
  for (const mesh of vs) {
    if (!mesh.sync) continue;
    const s = mesh.sync;
    const sp = (x: Spread) => `${x.mean} / ${x.max}`;
    out.push(
      "",
      `${mesh.variant}: bytes per node per round (mean / max):`,
      `  route sync, entries ${sp(s.routeBytesPerNodeRound.entries)}; workers ${sp(s.routeBytesPerNodeRound.workers)}`,
      `  all mesh traffic, entries ${sp(s.totalBytesPerNodeRound.entries)}; workers ${sp(s.totalBytesPerNodeRound.workers)}`,
      `  route sync once idle ${sp(s.idleRouteBytesPerNodeRound)}`,
      `  batches ${s.batchesSent} (failed ${s.batchesFailed}, split ${s.batchesSplit}, right after an ack ${s.burstSent}), inserts ${s.insertsSent}, evicts ${s.evictsSent}, cancelled ${s.cancelled}`,
      `  resyncs ${s.resyncs}, pending overflows ${s.pendingOverflows}, path requests ${s.pathRequests}, unresolved ${s.unresolved}`,
      `  entry index entries ${sp(s.indexEntries)}, budget evictions ${s.budgetEvictions}`,
    );
  }
  return out.join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      entries: { type: "string", default: "8" },
      workers: { type: "string", default: "240" },
      seed: { type: "string", default: "1" },
      rate: { type: "string" },
      warmup: { type: "string", default: String(WARMUP_S) },
      measure: { type: "string", default: String(MEASURE_S) },
      variants: { type: "string" },
      soak: { type: "boolean", default: false },
      json: { type: "boolean", default: false },
      quiet: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
    strict: false,
  });
  if (values.soak) {
    const { soakMain } = await import("./routing-soak");
    await soakMain(process.argv.slice(2).filter((a) => a !== "--soak"));
    process.exit(0);
  }
  if (values.help) {
    console.log(
      `usage: bun run src/bench/routing-sim.ts [--entries 8] [--workers 240] [--seed 1] [--rate 24] [--warmup ${WARMUP_S}] [--measure ${MEASURE_S}] [--variants ${VARIANTS.join(",")}] [--json]\n` +
        "       bun run src/bench/routing-sim.ts --soak [--help]",
    );
    process.exit(0);
  }
  const num = (v: unknown, what: string, lo: number, hi: number): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < lo || n > hi) {
      console.error(`--${what} must be a number from ${lo} to ${hi}`);
      process.exit(2);
    }
    return n;
  };
  const variants = typeof values.variants === "string" ? values.variants.split(",") : [...VARIANTS];
  if (!variants.every((v) => (VARIANTS as readonly string[]).includes(v))) {
    console.error(`--variants is a comma-separated list of ${VARIANTS.join(", ")}`);
    process.exit(2);
  }
  try {
    const r = await runRoutingSim({
      entries: num(values.entries, "entries", 1, 64),
      workers: num(values.workers, "workers", 1, 1000),
      seed: num(values.seed, "seed", 0, 2 ** 31),
      variants: variants as Variant[],
      warmupS: num(values.warmup, "warmup", 0, 3600),
      measureS: num(values.measure, "measure", 1, 3600),
      ...(values.rate !== undefined ? { traffic: { conversationsPerSec: num(values.rate, "rate", 0.01, 10_000) } } : {}),
      progress: values.quiet ? undefined : (line) => console.error(line),
    });
    console.log(values.json ? JSON.stringify(r, null, 2) : routingSimTable(r));
  } catch (e) {
    console.error((e as Error).stack ?? (e as Error).message);
    process.exit(1);
  }
}
