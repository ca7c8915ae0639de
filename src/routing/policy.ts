// Where a request runs: the node whose KV already holds the longest prefix of
// its prompt, unless that node is overloaded or a cold start elsewhere would
// be faster anyway. Pure decisions over the candidates' figures: no I/O, no
// clock, so the same code runs in the server, the simulation and the tests.
//
// Each candidate's cost is an estimate in milliseconds of how long until its
// first token: the wait for a slot, copying the cached prefix back (when it
// sits in host RAM), prefilling the rest of the prompt (slower on a node whose
// slots are busy), and the hop to a peer. A holder wins only when its cost beats the best cold candidate's by a
// margin, so a small cached prefix never pulls a request onto a busy node; the
// node a conversation was last sent to (its lease) keeps it unless another is
// better by more than the margin, so near-ties do not flap between nodes.
import type { WorkerInfo } from "../mesh/wire";

/** Tunables of the decision; every one has a default. */
export interface PolicyConfig {
  /** A match shorter than this (estimated tokens) is not worth routing for. */
  minMatchTokens: number;
  /** A holder must be cheaper than the best cold candidate by this fraction. */
  margin: number;
  /** Characters per token, to estimate tokens of a prompt this node cannot tokenize. */
  charsPerToken: number;
  /** Milliseconds to prefill one prompt token. */
  prefillMsPerToken: number;
  /** Cost of restoring a cached token (host RAM to KV), as a fraction of prefilling it. */
  restoreFraction: number;
  /** Milliseconds a request holds a slot, on average: the wait per queued request, per slot. */
  serviceMs: number;
  /** Fixed cost of a hop to a peer, plus its measured round trip. */
  hopMs: number;
  /** A prefill shares the node with the sequences already running: it slows by this x the busy fraction of its slots. */
  contention: number;
  /** Load gate: a candidate whose load exceeds max(1, this x the mean load) is passed over as a holder. */
  gateLoadFactor: number;
  /** Load gate: ... or whose KV fill exceeds max(0.9, the mean fill + this). */
  gateKvSlack: number;
}

/** Defaults, from the bench model on two CPU threads (docs/benchmarks.md); the router refines prefill and service times from what it observes. */
export const POLICY_DEFAULTS: PolicyConfig = {
  minMatchTokens: 32,
  margin: 0.1,
  charsPerToken: 4,
  prefillMsPerToken: 1,
  restoreFraction: 0.05,
  serviceMs: 2000,
  hopMs: 2,
  contention: 1,
  gateLoadFactor: 1.5,
  gateKvSlack: 0.25,
};

/** One worker that could run the request, with what routing knows of it. */
export interface Candidate {
  worker: WorkerInfo;
  /** This node's own worker: no hop. */
  local: boolean;
  /** Requests this node sent it that have not finished (its published figures lag by a round). */
  inflight: number;
  /** Blocks of the request's key it holds (0: none). */
  depth: number;
  /** Where `depth` comes from: its engine's reports, or this node's recent routing (a lease). */
  via: "index" | "lease" | null;
  /** The conversation was last sent here, recently. */
  leased: boolean;
  rttMs: number | null;
}

/** What the decision knows of the request. */
export interface RequestShape {
  /** Canonical characters of the request (routing/key.ts). */
  chars: number;
  /** Characters covered by the first i+1 blocks of its key. */
  ends: readonly number[];
}

/** Why a target won. */
export type RouteReason = "cache" | "load" | "only";

/** A candidate's estimate, as the decision saw it. */
export interface CandidateCost {
  candidate: Candidate;
  promptTokens: number;
  cachedTokens: number;
  load: number;
  /** KV committed to running requests, as a fraction of the pool. */
  kvFill: number;
  /** KV holding any prefix (idle cache too), as a fraction: what the KV gate and near-ties read. */
  cacheFill: number;
  /** Failed the load gate: not considered as a holder. */
  gated: boolean;
  waitMs: number;
  prefillMs: number;
  restoreMs: number;
  hopMs: number;
  costMs: number;
}

/** The decision: the target first, then every other candidate in the order to fall back to. */
export interface Decision {
  target: Candidate;
  reason: RouteReason;
  promptTokens: number;
  /** Every candidate, cheapest first; [0] is the target. */
  ranked: CandidateCost[];
}

/** Load of a worker: (busy slots + queued + our unfinished requests) per slot; 0 is idle, 1 is full, above 1 queues. */
export function workerLoad(w: WorkerInfo, inflight = 0): number {
  return (w.slotsBusy + w.queueDepth + inflight) / Math.max(1, w.slotsTotal);
}

function kvFill(w: WorkerInfo): number {
  return w.kvTotal > 0 ? w.kvUsed / w.kvTotal : 0;
}

function cacheFill(w: WorkerInfo): number {
  return w.kvTotal > 0 ? Math.max(w.kvUsed, w.kvCached) / w.kvTotal : 0;
}

/** Estimate every candidate's cost for a request. */
export function costs(req: RequestShape, cands: readonly Candidate[], c: PolicyConfig = POLICY_DEFAULTS): CandidateCost[] {
  const promptTokens = Math.max(1, Math.ceil(req.chars / c.charsPerToken));
  const loads = cands.map((x) => workerLoad(x.worker, x.inflight));
  const fills = cands.map((x) => cacheFill(x.worker));
  const meanLoad = loads.reduce((s, l) => s + l, 0) / Math.max(1, cands.length);
  const meanFill = fills.reduce((s, f) => s + f, 0) / Math.max(1, cands.length);
  return cands.map((x, i) => {
    const w = x.worker;
    const load = loads[i] as number;
    const fill = fills[i] as number;
    const matched = x.depth > 0 ? (req.ends[x.depth - 1] ?? 0) : 0;
    // At least one prompt token is always prefilled (its logits start the answer).
    const cachedTokens = Math.min(promptTokens - 1, Math.floor(matched / c.charsPerToken));
    // Requests ahead of this one beyond the free slots, each holding a slot for serviceMs.
    const ahead = Math.max(0, w.slotsBusy + w.queueDepth + x.inflight - w.slotsTotal + 1);
    const waitMs = (ahead / Math.max(1, w.slotsTotal)) * c.serviceMs;
    const slow = 1 + c.contention * Math.min(1, load);
    const prefillMs = (promptTokens - cachedTokens) * c.prefillMsPerToken * slow;
    const restoreMs = cachedTokens * c.prefillMsPerToken * c.restoreFraction;
    const hopMs = x.local ? 0 : c.hopMs + (x.rttMs ?? 0);
    // KV use (cache included) gates a worker only when it is fuller than the rest of the mesh and the prompt
    // does not fit beside it: running there would evict other conversations while emptier workers exist.
    // Where every cache is as full, nothing is gated for it. (Gating on the cells of running requests
    // alone, or sparing holders of most of the prompt, measured worse: docs/benchmarks.md.)
    const fits = w.kvTotal <= 0 || Math.max(w.kvUsed, w.kvCached) + promptTokens <= w.kvTotal;
    const gated = load > Math.max(1, c.gateLoadFactor * meanLoad) || (!fits && fill > Math.max(0.9, meanFill + c.gateKvSlack));
    let costMs = waitMs + prefillMs + restoreMs + hopMs;
    // Stickiness against flapping: the lease holder stays unless beaten by more than the margin.
    if (x.leased) costMs *= 1 - c.margin;
    return {
      candidate: x,
      promptTokens,
      cachedTokens,
      load,
      kvFill: kvFill(w),
      cacheFill: fill,
      gated,
      waitMs,
      prefillMs,
      restoreMs,
      hopMs,
      costMs,
    };
  });
}

/** Order of candidates when costs tie: this node first (no hop), then the less loaded, the emptier cache, the id. */
function tieBreak(a: CandidateCost, b: CandidateCost): number {
  if (a.candidate.local !== b.candidate.local) return a.candidate.local ? -1 : 1;
  return a.load - b.load || a.cacheFill - b.cacheFill || (a.candidate.worker.id < b.candidate.worker.id ? -1 : 1);
}

/** Cold cost: as if nothing were cached anywhere (the lease discount kept: it stands for what the index has not heard yet). */
function coldCost(x: CandidateCost, c: PolicyConfig): number {
  const undo = x.candidate.leased ? 1 - c.margin : 1;
  const full = x.waitMs + x.prefillMs * (x.promptTokens / Math.max(1, x.promptTokens - x.cachedTokens)) + x.hopMs;
  return full * undo;
}

/**
 * Among candidates whose cost is within the margin of the best (`best` first), the one to take: this
 * node when it is among them (no hop), else, with `random`, the less loaded of two of them picked at
 * random. Several entry nodes deciding from the same (seconds-old) figures would otherwise all break
 * near-ties the same way and herd onto one worker, while two random choices still spread a burst by
 * load; without `random`, the deterministic order (tests, reproducibility).
 */
function pickNear(
  best: CandidateCost,
  costOf: (x: CandidateCost) => number,
  pool: readonly CandidateCost[],
  c: PolicyConfig,
  random?: () => number,
): CandidateCost {
  const limit = costOf(best) * (1 + c.margin) + NEAR_MS;
  const near = pool.filter((x) => costOf(x) <= limit);
  const local = near.find((x) => x.candidate.local);
  if (local) return local;
  if (!random || near.length < 2) return best;
  const i = Math.min(near.length - 1, Math.floor(random() * near.length));
  const j = (i + 1 + Math.min(near.length - 2, Math.floor(random() * (near.length - 1)))) % near.length;
  const a = near[i] as CandidateCost;
  const b = near[j] as CandidateCost;
  return tieBreak(a, b) <= 0 ? a : b;
}

// Costs this close are equal for all purposes (a millisecond is below any estimate's precision).
const NEAR_MS = 1;

/**
 * Pick where a request runs; null when there is no candidate. The cheapest holder of a long enough
 * prefix that passes the load gate wins when it beats the cheapest cold start by the margin; else
 * the cheapest cold start (least load). With `random`, near-ties are broken at random (see pickNear).
 */
export function decide(
  req: RequestShape,
  cands: readonly Candidate[],
  c: PolicyConfig = POLICY_DEFAULTS,
  random?: () => number,
): Decision | null {
  if (cands.length === 0) return null;
  const all = costs(req, cands, c);
  const promptTokens = Math.max(1, Math.ceil(req.chars / c.charsPerToken));
  const holders = all.filter((x) => !x.gated && x.candidate.depth > 0 && x.cachedTokens >= c.minMatchTokens);
  let holder: CandidateCost | null = null;
  for (const x of holders) {
    if (!holder || x.costMs < holder.costMs || (x.costMs === holder.costMs && tieBreak(x, holder) < 0)) holder = x;
  }
  let cold = all[0] as CandidateCost;
  let coldMs = coldCost(cold, c);
  for (const x of all.slice(1)) {
    const ms = coldCost(x, c);
    if (ms < coldMs || (ms === coldMs && tieBreak(x, cold) < 0)) {
      cold = x;
      coldMs = ms;
    }
  }
  const useHolder = holder !== null && holder.costMs * (1 + c.margin) < coldMs;
  const target = useHolder
    ? pickNear(holder as CandidateCost, (x) => x.costMs, holders, c, random)
    : pickNear(cold, (x) => coldCost(x, c), all, c, random);
  const reason: RouteReason = cands.length === 1 ? "only" : useHolder ? "cache" : "load";
  const rest = all.filter((x) => x !== target).sort((a, b) => a.costMs - b.costMs || tieBreak(a, b));
  return { target: target.candidate, reason, promptTokens, ranked: [target, ...rest] };
}
