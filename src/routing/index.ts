// routing/: where a request runs. The Router turns a request's key into a
// decision over every worker that serves the model (this node's own included:
// running locally is one candidate, with no hop), from the prefix index the
// engines' reports fill, this node's leases, the workers' load and what this
// node has observed of the model's speed. server/ carries the decision out.
import type { NodeId, WorkerInfo } from "../mesh/wire";
import { explain, type RouteExplanation } from "./explain";
import type { RouteKey } from "./key";
import { Leases } from "./lease";
import { type Candidate, type Decision, decide, POLICY_DEFAULTS, type PolicyConfig, type RouteReason } from "./policy";
import { RoutingIndex } from "./radix";

export type { BlockAnchor } from "./anchors";
export { chatAnchors, completionAnchors } from "./anchors";
export { type CandidateExplanation, MAX_EXPLAINED, type PredictionOutcome, predictionOutcome, type RouteExplanation } from "./explain";
export { type KeyMessage, type RouteKey, RouteKeyer } from "./key";
export type { Candidate, CandidateCost, Decision, PolicyConfig, RouteReason } from "./policy";
export { RoutingIndex } from "./radix";

/** What an engine reports its KV started or stopped holding: inserts as [hash, parent] in chain order, evicts as hashes. */
export interface TenancyChange {
  inserts: ReadonlyArray<readonly [string, string | null]>;
  evicts: readonly string[];
}

/** Where this node's own tenancy goes besides its index: the sync to peers. */
export interface TenancySink {
  /** Queue this node's change for the peers that want the model. */
  publish(model: string, change: TenancyChange): void;
  /** This node routed a request for `model` (it wants the model's index from now on). */
  noteRouted(model: string): void;
}

/** How requests are routed: cache-aware (default), or by load alone (the baseline the routing bench compares with). */
export type RoutingMode = "cache" | "load";

/** What the router needs from the node. */
export interface RouterOptions {
  selfId: NodeId;
  /** Routable workers of the whole mesh, this node's own included. */
  workers: () => readonly WorkerInfo[];
  index?: RoutingIndex;
  /** Smoothed round trip to a member, when measured. */
  rtt?: (node: NodeId) => number | null;
  now?: () => number;
  mode?: RoutingMode;
  policy?: Partial<PolicyConfig>;
  leaseMs?: number;
  /** Breaks near-ties between peers at random, so entry nodes deciding from the same figures do not herd (default Math.random; simulations pass a seeded one). */
  random?: () => number;
  /** This node's own tenancy, as the source of full resyncs and path answers. */
  own?: { apply(model: string, change: TenancyChange): void };
  /** This node's own tenancy changes also go here: the sync to peers. */
  sink?: TenancySink;
}

/** What one served request showed about a model's speed on this node. */
export interface Observation {
  /** Canonical characters of its key, and its prompt and cached tokens as the engine counted them. */
  chars: number;
  /** The key left blocks out (MAX_BLOCKS): its characters undercount the prompt. */
  truncated?: boolean;
  promptTokens: number;
  cachedTokens: number;
  /** From admission to the first token (prefill of the uncached part), and from admission to the end. */
  prefillMs: number;
  serviceMs: number;
}

/** Decision counters: by what won, and whether this node or a peer ran it. */
export interface RoutingCounts {
  byReason: Record<RouteReason | "local", number>;
  toSelf: number;
  toPeer: number;
  /** Requests routed to a holder whose index entry came from a lease (its engine had not reported yet). */
  viaLease: number;
}

// Observations move the estimates by this much each, so one odd request cannot swing them.
const LEARN = 0.2;

/**
 * How long a worker's published load can lag a request that reached it: its node reads engine
 * figures every second and the replicated store carries them within about a round.
 */
export const RECORD_LAG_MS = 2500;

/** The routing decision for one node. */
export class Router {
  readonly index: RoutingIndex;
  readonly mode: RoutingMode;
  private readonly leases: Leases;
  // Start times of the unfinished requests this node sent each worker (a forward, or a local run).
  private readonly inflight = new Map<string, number[]>();
  // Per-model estimates learnt from local runs; bounded by the models served here.
  private readonly learnt = new Map<string, Pick<PolicyConfig, "charsPerToken" | "prefillMsPerToken" | "serviceMs">>();
  private readonly counts: RoutingCounts = { byReason: { cache: 0, load: 0, only: 0, local: 0 }, toSelf: 0, toPeer: 0, viaLease: 0 };
  private readonly now: () => number;

  private readonly o: RouterOptions;

  constructor(o: RouterOptions) {
    this.o = { ...o };
    this.index = o.index ?? new RoutingIndex();
    this.mode = o.mode ?? "cache";
    this.leases = new Leases(o.leaseMs);
    this.now = o.now ?? Date.now;
  }

  /**
   * Ready workers of `model` (the first name in their record) that answer to `name` (the model's id,
   * or an alias some of them carry).
   */
  workersFor(model: string, name = model): WorkerInfo[] {
    return this.o.workers().filter((w) => w.health === "ready" && w.models[0] === model && w.models.includes(name));
  }

  /**
   * Decide where a request for `model` with routing key `key` runs; null when no worker of the mesh serves it.
   * A request that named the model by an alias (`name`) runs only where that alias is served; its key and the
   * index are the model's, so requests by either name share cache.
   */
  decide(model: string, key: RouteKey, name = model): Decision | null {
    const workers = this.workersFor(model, name);
    if (workers.length === 0) return null;
    this.o.sink?.noteRouted(model);
    const cache = this.mode === "cache";
    const depths = new Map<string, number>();
    if (cache) for (const m of this.index.peek(model)?.match(key) ?? []) depths.set(m.holder, m.depth);
    // A leased request's key ended where a message ended (or anywhere, for a completion's chunks).
    const spans = key.spans;
    const lease = cache ? this.leases.longest(key.prefixes, this.now(), (i) => spans[i]?.last !== false || spans[i]?.message === -1) : null;
    const cands: Candidate[] = workers.map((w) => {
      const fromIndex = depths.get(w.nodeId) ?? 0;
      const leased = lease !== null && lease.node === w.nodeId;
      const fromLease = leased ? (lease as { depth: number }).depth : 0;
      return {
        worker: w,
        local: w.nodeId === this.o.selfId,
        inflight: this.inflightOf(w.id),
        depth: Math.max(fromIndex, fromLease),
        via: fromIndex >= fromLease ? (fromIndex > 0 ? "index" : null) : "lease",
        leased,
        rttMs: this.o.rtt?.(w.nodeId) ?? null,
      };
    });
    const d = decide({ chars: key.chars, ends: key.ends }, cands, this.policyFor(model), this.o.random ?? Math.random);
    if (!d) return null;
    if (cache) this.leases.set(key.prefixes, d.target.worker.nodeId, this.now());
    this.counts.byReason[d.reason]++;
    if (d.target.local) this.counts.toSelf++;
    else this.counts.toPeer++;
    if (d.reason === "cache" && d.target.via === "lease") this.counts.viaLease++;
    return d;
  }

  /** Why `d` (a decision for `model`) went where it did: the record the console and /api/requests show. */
  explain(model: string, d: Decision): RouteExplanation {
    return explain(d, this.policyFor(model));
  }

  /** This node's worker for `model`, if it serves it. */
  localWorker(model: string): WorkerInfo | undefined {
    return this.o.workers().find((w) => w.nodeId === this.o.selfId && w.models[0] === model);
  }

  /** Lease `key`'s conversation to `node` (it ran there after all: a fallback, or a retry on another node). */
  lease(key: RouteKey, node: NodeId): void {
    if (this.mode === "cache") this.leases.set(key.prefixes, node, this.now());
  }

  /** Count a request this node ran without a choice (it came from a peer, or routing is off for it). */
  countLocal(): void {
    this.counts.byReason.local++;
    this.counts.toSelf++;
  }

  /**
   * A request to `workerId` started (a forward, or a local run): it counts towards that worker's
   * load until its published figures can show it (RECORD_LAG_MS) or it ends, whichever is first.
   * Counting it for longer would count it twice, and this node's own worker (whose every request
   * shows in its figures) would always look busier than an equally busy peer.
   */
  begin(workerId: string): void {
    const list = this.inflight.get(workerId);
    if (list) list.push(this.now());
    else this.inflight.set(workerId, [this.now()]);
  }

  /** Where this node's own tenancy goes from now on (the sync is built once the mesh core exists). */
  connect(own: RouterOptions["own"], sink: TenancySink): void {
    this.o.own = own;
    this.o.sink = sink;
  }

  /** A request started with `begin` finished (the oldest is taken: which one does not matter for the count). */
  end(workerId: string): void {
    const list = this.inflight.get(workerId);
    if (!list) return;
    list.shift();
    if (list.length === 0) this.inflight.delete(workerId);
  }

  /** Unfinished requests this node sent to `workerId` that its published figures cannot show yet. */
  inflightOf(workerId: string): number {
    const list = this.inflight.get(workerId);
    if (!list) return 0;
    const since = this.now() - RECORD_LAG_MS;
    let n = 0;
    for (let i = list.length - 1; i >= 0 && (list[i] as number) > since; i--) n++;
    return n;
  }

  /** Unfinished requests this node sent to `workerId`, however old. */
  unfinished(workerId: string): number {
    return this.inflight.get(workerId)?.length ?? 0;
  }

  /** This node's engine for `model` reported a change in what its KV holds. */
  onTenancy(model: string, change: TenancyChange): void {
    const m = this.index.model(model);
    for (const h of change.evicts) m.evict(this.o.selfId, h);
    if (change.inserts.length > 0) m.insertPath(this.o.selfId, change.inserts);
    this.o.own?.apply(model, change);
    this.o.sink?.publish(model, change);
  }

  /** Learn a model's speed on this node from one of its requests (peers are assumed alike). */
  observe(model: string, s: Observation): void {
    const cur = this.policyFor(model);
    const next = { charsPerToken: cur.charsPerToken, prefillMsPerToken: cur.prefillMsPerToken, serviceMs: cur.serviceMs };
    if (s.promptTokens > 0 && s.chars > 0 && !s.truncated) next.charsPerToken = mix(cur.charsPerToken, s.chars / s.promptTokens);
    const prefilled = s.promptTokens - s.cachedTokens;
    // A handful of tokens says more about per-step overhead than about prefill speed.
    if (prefilled >= 16 && s.prefillMs > 0) next.prefillMsPerToken = mix(cur.prefillMsPerToken, s.prefillMs / prefilled);
    if (s.serviceMs > 0) next.serviceMs = mix(cur.serviceMs, s.serviceMs);
    if (!this.learnt.has(model) && this.learnt.size >= 64) this.learnt.delete(this.learnt.keys().next().value as string);
    this.learnt.set(model, next);
  }

  /** A member left or died: its leases go (its tenancy leaves the index through the sync). */
  dropNode(node: NodeId): void {
    this.leases.dropNode(node);
  }

  /** The decision's tunables for `model`: defaults, overridden by configuration, refined by observation. */
  policyFor(model: string): PolicyConfig {
    return { ...POLICY_DEFAULTS, ...this.o.policy, ...this.learnt.get(model) };
  }

  /** Decision counters. */
  stats(): RoutingCounts {
    return {
      byReason: { ...this.counts.byReason },
      toSelf: this.counts.toSelf,
      toPeer: this.counts.toPeer,
      viaLease: this.counts.viaLease,
    };
  }
}

function mix(old: number, sample: number): number {
  return Number.isFinite(sample) && sample > 0 ? old + LEARN * (sample - old) : old;
}
