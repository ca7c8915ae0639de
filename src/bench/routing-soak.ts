// The routing soak: a few nodes that route and serve, on the in-process
// network under virtual time, taking 200 requests a second of distinct
// 80 000-character prompts for 10 simulated minutes with real allocations:
// every request's body is parsed from JSON (flat strings, as a server sees
// them), keyed with the real RouteKeyer, routed by the real Router, run by a
// simulated engine with a bounded KV (so nearly everything it caches is
// evicted again), and its tenancy synced by the real RouteSync (LZ4,
// signatures) into real bounded indexes. It reports process RSS (after a full
// GC) at a baseline after warm-up, its peak during traffic and after traffic
// stops, with the index, own-tenancy and pending sizes over time.
//
//   bun run src/bench/routing-soak.ts [--nodes 3] [--rps 200] [--minutes 10] [--chars 80000] [--seed 1] [--json]
//   bun run src/bench/routing-sim.ts --soak [same options]
import { parseArgs } from "node:util";
import { silentLogger } from "../log";
import { seededRandom } from "../mesh/sim";
import type { SimNode } from "../mesh/sim-cluster";
import { SimCluster } from "../mesh/sim-cluster";
import { type KeyMessage, RouteKeyer, Router } from "../routing/index";
import { OwnTenancy } from "../routing/own";
import { INDEX_DEFAULTS, type IndexConfig, RoutingIndex } from "../routing/radix";
import { RouteSync, type RouteSyncConfig } from "../routing/sync";
import { seededIdentity, textPool } from "./routing-sim";
import { type EngineShape, SimEngine } from "./routing-sim-engine";

/** Options of a soak. */
export interface SoakOptions {
  nodes: number;
  rps: number;
  /** Virtual seconds of traffic (after a warm-up of `warmupS` at the same rate). */
  trafficS: number;
  warmupS: number;
  /** Virtual seconds after traffic stops before the last measurement. */
  idleS: number;
  promptChars: number;
  seed: number;
  /** Virtual seconds between samples. */
  sampleEveryS: number;
  engine?: Partial<EngineShape>;
  index?: Partial<IndexConfig>;
  sync?: Partial<RouteSyncConfig>;
  /** Measure process RSS (after Bun.gc(true)) at each sample; off in tests, where RSS means nothing. */
  rss: boolean;
  progress?: (line: string) => void;
}

/** Defaults: 3 nodes, 200 requests/s of 80 000 characters, 60 s warm-up, 600 s measured, 60 s idle after. */
export const SOAK_DEFAULTS: SoakOptions = {
  nodes: 3,
  rps: 200,
  trafficS: 600,
  warmupS: 60,
  idleS: 60,
  promptChars: 80_000,
  seed: 1,
  sampleEveryS: 30,
  rss: true,
};

/** A fast engine: 16 slots, 400 000 tokens of KV (20 of these prompts), 5 us a prompt token, 5 ms an output token. */
export const SOAK_ENGINE: EngineShape = { slots: 16, kvTokens: 400_000, charsPerToken: 4, prefillMsPerToken: 0.005, decodeMsPerToken: 5 };

/** One sample over the nodes. */
export interface SoakSample {
  /** Virtual seconds since traffic began (the warm-up included). */
  t: number;
  phase: "warmup" | "traffic" | "idle";
  requests: number;
  /** Process RSS in MB after a full GC (null when not measured). */
  rssMB: number | null;
  /** Largest per-node figures. */
  indexEntries: number;
  ownHashes: number;
  pendingOps: number;
  unresolved: number;
  engineHashes: number;
  timers: number;
}

/** What a soak measured. */
export interface SoakReport {
  options: Omit<SoakOptions, "progress">;
  engine: EngineShape;
  requests: number;
  /** RSS after warm-up, the peak during traffic, and at the end (after traffic stopped and idle rounds ran); MB. */
  rss: { baselineMB: number; peakMB: number; endMB: number; growthMB: number; endAboveBaselineMB: number } | null;
  samples: SoakSample[];
  /** Sync totals over all nodes. */
  sync: {
    batchesSent: number;
    batchesSplit: number;
    insertsSent: number;
    evictsSent: number;
    /** Inserts dropped with their eviction before being sent (cached and evicted between two rounds). */
    cancelled: number;
    /** Batches sent right after an ack (a backlog draining between rounds). */
    burstSent: number;
    resyncs: number;
    pendingOverflows: number;
    pathRequests: number;
    bytesPerNodeRound: number;
  };
  /** Index budget evictions over all nodes. */
  budgetEvictions: number;
  /** Largest figure any node reached at any sample. */
  max: { indexEntries: number; ownHashes: number; pendingOps: number; unresolved: number };
  wallSeconds: number;
}

interface SoakNode {
  node: SimNode;
  router: Router;
  sync: RouteSync;
  own: OwnTenancy;
  engine: SimEngine;
  workerId: string;
}

const MODEL = "m";

function rssMB(): number {
  Bun.gc(true);
  return Math.round((process.memoryUsage().rss / 1048576) * 10) / 10;
}

/** Run the soak. */
export async function runSoak(opts: Partial<SoakOptions> = {}): Promise<SoakReport> {
  const o: SoakOptions = { ...SOAK_DEFAULTS, ...opts };
  const shape = { ...SOAK_ENGINE, ...o.engine };
  const wall = performance.now();
  const say = o.progress ?? (() => {});
  const c = new SimCluster({ seed: o.seed, network: { latencyMs: [1, 5] } });
  const clock = c.clock;
  const keyer = new RouteKeyer("routing-soak");
  const names = Array.from({ length: o.nodes }, (_, i) => `n${i}`);
  for (const n of names) c.add(n, seededIdentity(o.seed, n));
  for (const n of names.slice(1)) await c.wait(c.node(n).core.join([c.node("n0").addr]));
  const nodes: SoakNode[] = names.map((n) => {
    const node = c.node(n);
    const index = new RoutingIndex({ ...INDEX_DEFAULTS, ...o.index });
    const own = new OwnTenancy();
    const router = new Router({
      selfId: node.identity.id,
      workers: () => node.core.workers.list().flatMap((e) => (e.routable ? [e.info] : [])),
      index,
      now: () => clock.now(),
      policy: { prefillMsPerToken: shape.prefillMsPerToken, serviceMs: 100 },
      random: seededRandom(0x50a4 ^ Number(Bun.hash(node.name) & 0xffffn)),
    });
    const sync = new RouteSync({
      selfId: node.identity.id,
      identity: node.identity,
      directory: node.core.directory,
      store: node.core.store,
      transport: c.net.transport(node.addr),
      clock,
      index,
      own,
      config: o.sync,
      log: silentLogger,
      random: seededRandom(o.seed + n.length),
    });
    node.core.extend(sync);
    router.connect(own, sync);
    const engine = new SimEngine(shape, clock, (d) => router.onTenancy(MODEL, d));
    const reg = node.core.workers.register({
      models: [MODEL],
      addr: `${n}:8080`,
      ctxSize: 32_768,
      health: "ready",
      ...engine.load(),
      slotsTotal: shape.slots,
    });
    if (!reg.ok) throw new Error(reg.message);
    sync.setServed([MODEL]);
    return { node, router, sync, own, engine, workerId: reg.value.id };
  });
  const byNode = new Map(nodes.map((x) => [x.node.identity.id, x]));
  const ready = () => nodes.every((x) => x.node.core.workers.list().filter((w) => w.routable).length === o.nodes);
  if ((await clock.until(() => c.converged() && ready(), 120_000, 250)) === null) throw new Error("the soak mesh did not form");
  for (const [i, x] of nodes.entries()) {
    const tick = () => {
      x.node.core.workers.update(x.workerId, x.engine.load());
      clock.setTimer(tick, 1000);
    };
    clock.setTimer(tick, (i * 331) % 1000);
  }

  // One large text every prompt shares but its first characters; each body is built and parsed as a server would.
  const big = textPool(o.seed, o.promptChars);
  const pick = seededRandom(o.seed * 31 + 7);
  const start = clock.now();
  const trafficEnd = start + (o.warmupS + o.trafficS) * 1000;
  let requests = 0;
  let live = 0;
  const oneRequest = (): void => {
    const i = requests++;
    const body = `{"model":"${MODEL}","messages":[{"role":"user","content":${JSON.stringify(`request ${i}: ${big}`.slice(0, o.promptChars))}}]}`;
    const req = JSON.parse(body) as { model: string; messages: KeyMessage[] };
    const entry = nodes[Math.floor(pick() * nodes.length)] as SoakNode;
    const key = keyer.chat(req.model, req.messages);
    const d = entry.router.decide(req.model, key);
    if (!d) throw new Error("no worker");
    const target = byNode.get(d.target.worker.nodeId) as SoakNode;
    const reply: KeyMessage = { role: "assistant", content: `done ${i}` };
    const replyBlocks = keyer.extend(key, reply);
    entry.router.begin(d.target.worker.id);
    live++;
    target.engine.submit({
      key,
      reply: replyBlocks,
      replyTokens: 10,
      done: () => {
        entry.router.end(d.target.worker.id);
        live--;
      },
    });
  };
  // Requests arrive evenly, a tick of 10 ms at a time; counted from the start, so no rounding drifts.
  let ticks = 0;
  const arrive = (): void => {
    if (clock.now() >= trafficEnd) return;
    ticks++;
    const due = Math.floor((ticks * o.rps) / 100 + 1e-9);
    while (requests < due) oneRequest();
    clock.setTimer(arrive, 10);
  };
  clock.setTimer(arrive, 0);

  const samples: SoakSample[] = [];
  const max = { indexEntries: 0, ownHashes: 0, pendingOps: 0, unresolved: 0 };
  const sample = (phase: SoakSample["phase"]): SoakSample => {
    const per = nodes.map((x) => {
      const s = x.sync.stats();
      return {
        index: x.router.index.stats().models[MODEL]?.entries ?? 0,
        own: x.own.stats().hashes,
        pending: s.pendingOps,
        unresolved: s.unresolved,
        held: x.engine.heldHashes,
      };
    });
    const top = (f: (p: (typeof per)[number]) => number) => Math.max(...per.map(f));
    const s: SoakSample = {
      t: Math.round((clock.now() - start) / 1000),
      phase,
      requests,
      rssMB: o.rss ? rssMB() : null,
      indexEntries: top((p) => p.index),
      ownHashes: top((p) => p.own),
      pendingOps: top((p) => p.pending),
      unresolved: top((p) => p.unresolved),
      engineHashes: top((p) => p.held),
      timers: clock.pending,
    };
    max.indexEntries = Math.max(max.indexEntries, s.indexEntries);
    max.ownHashes = Math.max(max.ownHashes, s.ownHashes);
    max.pendingOps = Math.max(max.pendingOps, s.pendingOps);
    max.unresolved = Math.max(max.unresolved, s.unresolved);
    samples.push(s);
    say(
      `${phase} t=${s.t}s requests=${requests} live=${live} rss=${s.rssMB ?? "-"}MB index=${s.indexEntries} own=${s.ownHashes} pending=${s.pendingOps} ` +
        `unresolved=${s.unresolved} wall=${((performance.now() - wall) / 1000).toFixed(0)}s`,
    );
    return s;
  };
  const baseline0 = o.rss ? rssMB() : null;
  say(`before traffic rss=${baseline0 ?? "-"}MB`);
  await clock.advance(o.warmupS * 1000);
  const base = sample("warmup");
  const bytesBase = nodes.reduce((acc, x) => acc + x.sync.stats().bytesSent, 0);
  while (clock.now() < trafficEnd) {
    await clock.advance(Math.min(o.sampleEveryS * 1000, trafficEnd - clock.now()));
    sample("traffic");
  }
  const bytesTraffic = nodes.reduce((acc, x) => acc + x.sync.stats().bytesSent, 0) - bytesBase;
  const idleEnd = clock.now() + o.idleS * 1000;
  while (clock.now() < idleEnd) {
    await clock.advance(Math.min(o.sampleEveryS * 1000, idleEnd - clock.now()));
    sample("idle");
  }
  const end = samples[samples.length - 1] as SoakSample;
  const totals = nodes.map((x) => x.sync.stats());
  const sum = (f: (s: (typeof totals)[number]) => number) => totals.reduce((acc, s) => acc + f(s), 0);
  const report: SoakReport = {
    options: { ...o, progress: undefined } as Omit<SoakOptions, "progress">,
    engine: shape,
    requests,
    rss: null,
    samples,
    sync: {
      batchesSent: sum((s) => s.batchesSent),
      batchesSplit: sum((s) => s.batchesSplit),
      insertsSent: sum((s) => s.insertsSent),
      evictsSent: sum((s) => s.evictsSent),
      cancelled: sum((s) => s.cancelled),
      burstSent: sum((s) => s.burstSent),
      resyncs: sum((s) => s.resyncs),
      pendingOverflows: sum((s) => s.pendingOverflows),
      pathRequests: sum((s) => s.pathRequestsSent),
      bytesPerNodeRound: Math.round(bytesTraffic / o.nodes / o.trafficS),
    },
    budgetEvictions: nodes.reduce((acc, x) => acc + (x.router.index.stats().models[MODEL]?.budgetEvictions ?? 0), 0),
    max,
    wallSeconds: 0,
  };
  for (const x of nodes) x.node.core.stop();
  if (o.rss && base.rssMB !== null && end.rssMB !== null) {
    const peak = Math.max(...samples.filter((s) => s.phase === "traffic").map((s) => s.rssMB ?? 0));
    const r1 = (x: number) => Math.round(x * 10) / 10;
    report.rss = {
      baselineMB: base.rssMB,
      peakMB: peak,
      endMB: end.rssMB,
      growthMB: r1(peak - base.rssMB),
      endAboveBaselineMB: r1(end.rssMB - base.rssMB),
    };
  }
  report.wallSeconds = Math.round((performance.now() - wall) / 100) / 10;
  return report;
}

/** The report as text. */
export function soakTable(r: SoakReport): string {
  const lines = [
    `${r.options.nodes} nodes, ${r.options.rps} requests/s of ${r.options.promptChars}-character prompts, ${r.options.warmupS} s warm-up + ${r.options.trafficS} s measured + ${r.options.idleS} s idle (virtual)`,
    `requests ${r.requests}, wall ${r.wallSeconds} s`,
  ];
  if (r.rss)
    lines.push(
      `RSS MB: baseline ${r.rss.baselineMB}, peak ${r.rss.peakMB} (growth ${r.rss.growthMB}), after idle ${r.rss.endMB} (${r.rss.endAboveBaselineMB} above baseline)`,
    );
  const s = r.sync;
  lines.push(
    `sync: batches ${s.batchesSent} (split ${s.batchesSplit}, right after an ack ${s.burstSent}), inserts ${s.insertsSent}, evicts ${s.evictsSent}, cancelled before sending ${s.cancelled}, resyncs ${s.resyncs}, pending overflows ${s.pendingOverflows}, path requests ${s.pathRequests}, ${s.bytesPerNodeRound} bytes/node/round`,
    `largest per node: index ${r.max.indexEntries}, own ${r.max.ownHashes}, pending ${r.max.pendingOps}, unresolved ${r.max.unresolved}; index budget evictions ${r.budgetEvictions}`,
    "",
    "t (s)  phase    requests  RSS MB  index  own  pending  unresolved  engine hashes",
  );
  for (const x of r.samples) {
    lines.push(
      `${String(x.t).padStart(5)}  ${x.phase.padEnd(7)}  ${String(x.requests).padStart(8)}  ${String(x.rssMB ?? "-").padStart(6)}  ${String(x.indexEntries).padStart(5)}  ${String(x.ownHashes).padStart(4)}  ${String(x.pendingOps).padStart(7)}  ${String(x.unresolved).padStart(10)}  ${String(x.engineHashes).padStart(13)}`,
    );
  }
  return lines.join("\n");
}

/** The soak's command line (also behind `routing-sim.ts --soak`). */
export async function soakMain(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      nodes: { type: "string", default: "3" },
      rps: { type: "string", default: "200" },
      minutes: { type: "string", default: "10" },
      chars: { type: "string", default: "80000" },
      seed: { type: "string", default: "1" },
      json: { type: "boolean", default: false },
      quiet: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log("usage: bun run src/bench/routing-soak.ts [--nodes 3] [--rps 200] [--minutes 10] [--chars 80000] [--seed 1] [--json]");
    return;
  }
  const num = (v: unknown, what: string, lo: number, hi: number): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < lo || n > hi) {
      console.error(`--${what} must be a number from ${lo} to ${hi}`);
      process.exit(2);
    }
    return n;
  };
  const r = await runSoak({
    nodes: num(values.nodes, "nodes", 2, 16),
    rps: num(values.rps, "rps", 1, 5000),
    trafficS: num(values.minutes, "minutes", 0.1, 120) * 60,
    promptChars: num(values.chars, "chars", 100, 1_000_000),
    seed: num(values.seed, "seed", 0, 2 ** 31),
    progress: values.quiet ? undefined : (line) => console.error(line),
  });
  console.log(values.json ? JSON.stringify(r, null, 2) : soakTable(r));
}

if (import.meta.main) await soakMain(process.argv.slice(2));
