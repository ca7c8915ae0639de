// Why a request went where it did, from the decision itself: each candidate
// the policy costed, with the prefix it was predicted to hold, its load, its
// estimated cost, and the reason it won or lost. Built after the decision (so
// the decision path stays as fast as before) and bounded: the top candidates
// only, the rest counted. The console and /api/requests show this record; they
// never re-derive it.
import type { NodeId } from "../mesh/wire";
import type { CandidateCost, Decision, PolicyConfig, RouteReason } from "./policy";

/** One candidate as the decision saw it. */
export interface CandidateExplanation {
  node: NodeId;
  worker: string;
  local: boolean;
  /** Prompt tokens the decision expected this node to hold in KV (from the index or a lease). */
  predictedCachedTokens: number;
  /** Where that prediction came from: the engines' reports (index), this node's recent routing (lease), or nothing. */
  via: "index" | "lease" | null;
  /** (busy slots + queued + unfinished requests sent by this node) per slot. */
  load: number;
  /** KV holding any prefix, as a fraction of the pool. */
  kvFill: number;
  /** Estimated milliseconds to the first token: waitMs + prefillMs + restoreMs + hopMs (x (1 - margin) when leased). */
  costMs: number;
  waitMs: number;
  prefillMs: number;
  hopMs: number;
  /** Passed over as a cache holder (overloaded, or its KV too full beside the others). */
  gated: boolean;
  won: boolean;
  /** A short sentence: why it won or lost. */
  why: string;
}

/** The decision record of one routed request. */
export interface RouteExplanation {
  /** cache: a holder won; load: least cost without cache; only: one candidate. */
  reason: RouteReason;
  promptTokens: number;
  /** The winner's predicted cached prompt tokens. */
  predictedCachedTokens: number;
  /** The best candidates, the winner first (at most MAX_EXPLAINED). */
  candidates: CandidateExplanation[];
  /** Candidates left out of `candidates`. */
  omitted: number;
}

/** Candidates kept in an explanation: enough to see the contest, bounded whatever the mesh's size. */
export const MAX_EXPLAINED = 8;

const round = (x: number, places = 1) => Math.round(x * 10 ** places) / 10 ** places;

function whyOf(x: CandidateCost, d: Decision, c: PolicyConfig, winner: CandidateCost): string {
  if (x === winner) {
    if (d.reason === "only") return "the only node serving the model";
    if (d.reason === "cache") return `holds ${x.cachedTokens} prompt tokens in KV: cheapest by more than the ${c.margin * 100}% margin`;
    return x.candidate.local ? "least estimated cost (no hop)" : "least estimated cost";
  }
  if (x.gated && x.candidate.depth > 0)
    return `holds a prefix but is overloaded (load ${round(x.load, 2)}, KV ${Math.round(x.cacheFill * 100)}%)`;
  if (x.candidate.depth > 0 && x.cachedTokens < c.minMatchTokens)
    return `cached prefix of ${x.cachedTokens} tokens is below the ${c.minMatchTokens}-token minimum`;
  const more = x.costMs - winner.costMs;
  if (more > 0) return `estimated ${round(more)} ms slower to the first token`;
  return "within the margin of the winner: a tie, broken by locality and load";
}

/** The explanation of `d`, decided under `c`: at most `max` candidates, the winner first. */
export function explain(d: Decision, c: PolicyConfig, max = MAX_EXPLAINED): RouteExplanation {
  const winner = d.ranked[0] as CandidateCost;
  const shown = d.ranked.slice(0, Math.max(1, max));
  return {
    reason: d.reason,
    promptTokens: d.promptTokens,
    predictedCachedTokens: winner.cachedTokens,
    candidates: shown.map((x) => ({
      node: x.candidate.worker.nodeId,
      worker: x.candidate.worker.id,
      local: x.candidate.local,
      predictedCachedTokens: x.candidate.depth > 0 ? x.cachedTokens : 0,
      via: x.candidate.via,
      load: round(x.load, 3),
      kvFill: round(x.cacheFill, 3),
      costMs: round(x.costMs, 2),
      waitMs: round(x.waitMs, 2),
      prefillMs: round(x.prefillMs, 2),
      hopMs: round(x.hopMs, 2),
      gated: x.gated,
      won: x === winner,
      why: whyOf(x, d, c, winner),
    })),
    omitted: d.ranked.length - shown.length,
  };
}

/** How an actual cached-token count compares with the prediction: within a quarter (or 16 tokens) agrees. */
export type PredictionOutcome = "agree" | "short" | "more";

/** Compare routing's predicted cached tokens with what the engine really reused. */
export function predictionOutcome(predicted: number, actual: number): PredictionOutcome {
  // The prediction converts matched characters to tokens at the model's observed ratio: exact only to a tolerance.
  const tolerance = Math.max(16, predicted * 0.25);
  if (actual < predicted - tolerance) return "short";
  if (actual > predicted + tolerance) return "more";
  return "agree";
}
