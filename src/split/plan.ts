// Which node takes which layers of a split model. Pure: no sockets, no
// native code; the head feeds it the announced stage offers and the round
// trips it measured through their tunnels.
//
// llama.cpp's layer split: the head keeps the input embedding and the first
// layers on its CPU; each stage server then takes a run of layers in order,
// and the last one also takes the output layer's slot (its norm: the shim keeps
// the output matrix on the head, so logits never cross). A decode step crosses every
// stage boundary, so stages are chosen lowest round trip first, and a peer
// slower than the bound is refused outright.

/** A round trip above this (ms) disqualifies a stage peer by default: every token pays it at least once per stage. */
export const DEFAULT_MAX_RTT_MS = 50;

/** What the head asked for with --split. */
export type SplitWant = { kind: "auto" } | { kind: "count"; nodes: number } | { kind: "nodes"; ids: string[] };

/** A peer's stage offer as the head sees it. */
export interface StageCandidate {
  nodeId: string;
  /** Bytes it lends (its --stage-memory, or its free memory when smaller). */
  budgetBytes: number;
  /** Measured handshake round trip through its tunnel; null when the probe failed. */
  rttMs: number | null;
  /** Why the probe failed, when it did. */
  unreachable?: string;
}

/** The model's size as the planner needs it. */
export interface SplitModel {
  /** Repeating layers (blocks). */
  nLayer: number;
  /** Bytes one layer slot needs on its node: its weights plus its share of the KV cache. */
  layerBytes: number;
}

/** One node's share of a split model. */
export interface StagePlan {
  nodeId: string;
  /** "head": this node's CPU; "stage": a peer's device through its tunnel. */
  role: "head" | "stage";
  /** First layer it holds and how many (the last stage's count includes the output slot, index nLayer). */
  firstLayer: number;
  layers: number;
  /** Estimated bytes it holds (layers * layerBytes). */
  bytes: number;
  rttMs: number | null;
}

/** A planned split: the stages in pipeline order (head first), and the peers left out and why. */
export interface SplitPlan {
  stages: StagePlan[];
  refused: Array<{ nodeId: string; reason: string }>;
}

/** Why no split could be planned, as a value. */
export interface SplitPlanError {
  code: "split_unplannable";
  message: string;
}

/** Parse --split's value: "" or "auto", a node count (2-17), or a comma-separated list of peer node ids; null when malformed. */
export function parseSplitWant(value: string): SplitWant | null {
  const v = value.trim();
  if (v === "" || v === "auto") return { kind: "auto" };
  if (/^\d+$/.test(v)) {
    const n = Number(v);
    return n >= 2 && n <= 17 ? { kind: "count", nodes: n } : null;
  }
  const ids = v.split(",").map((s) => s.trim());
  if (ids.some((s) => !/^[A-Za-z0-9_-]{1,64}$/.test(s)) || new Set(ids).size !== ids.length || ids.length > 16) return null;
  return { kind: "nodes", ids };
}

/** Plan a split of `model` over the head (headBudgetBytes of its own memory) and the candidates, refusing those over maxRttMs. */
export function planSplit(opts: {
  model: SplitModel;
  headId: string;
  headBudgetBytes: number;
  candidates: StageCandidate[];
  want: SplitWant;
  maxRttMs?: number;
}): SplitPlan | SplitPlanError {
  const { model, want } = opts;
  const maxRtt = opts.maxRttMs ?? DEFAULT_MAX_RTT_MS;
  const slots = model.nLayer + 1;
  const cap = (bytes: number) => (model.layerBytes > 0 ? Math.floor(bytes / model.layerBytes) : slots);
  const refused: SplitPlan["refused"] = [];
  const eligible: StageCandidate[] = [];
  for (const c of opts.candidates) {
    if (c.nodeId === opts.headId) continue;
    if (c.rttMs === null) refused.push({ nodeId: c.nodeId, reason: c.unreachable ?? "its stage tunnel did not answer" });
    else if (c.rttMs > maxRtt)
      refused.push({ nodeId: c.nodeId, reason: `round trip ${c.rttMs.toFixed(1)} ms is over the ${maxRtt} ms bound` });
    else if (cap(c.budgetBytes) < 1) refused.push({ nodeId: c.nodeId, reason: "its stage memory holds no whole layer" });
    else eligible.push(c);
  }
  eligible.sort((a, b) => (a.rttMs as number) - (b.rttMs as number) || a.nodeId.localeCompare(b.nodeId));
  const fail = (message: string): SplitPlanError => ({ code: "split_unplannable", message });
  const why = (id: string) => refused.find((r) => r.nodeId === id)?.reason;

  let chosen: StageCandidate[];
  if (want.kind === "nodes") {
    chosen = [];
    for (const id of want.ids) {
      const c = eligible.find((e) => e.nodeId === id || e.nodeId.startsWith(id));
      if (!c) return fail(`peer ${id} cannot take stages: ${why(id) ?? "it offers none (start it with --offer-stage)"}`);
      if (chosen.includes(c)) return fail(`peer ${id} is named twice`);
      chosen.push(c);
    }
  } else if (want.kind === "count") {
    if (eligible.length < want.nodes - 1) {
      return fail(
        `a split over ${want.nodes} nodes needs ${want.nodes - 1} stage peers; ${eligible.length} qualify${refused.length > 0 ? ` (${refused.map((r) => `${r.nodeId}: ${r.reason}`).join("; ")})` : ""}`,
      );
    }
    chosen = eligible.slice(0, want.nodes - 1);
  } else {
    // The fewest peers (lowest round trip first) that hold the model with the head; at least one.
    chosen = [];
    let room = cap(opts.headBudgetBytes);
    for (const c of eligible) {
      if (chosen.length > 0 && room >= slots) break;
      chosen.push(c);
      room += cap(c.budgetBytes);
    }
    if (chosen.length === 0)
      return fail(`no peer offers stages${refused.length > 0 ? ` (${refused.map((r) => `${r.nodeId}: ${r.reason}`).join("; ")})` : ""}`);
  }
  const counts = assignSlots(slots, [cap(opts.headBudgetBytes), ...chosen.map((c) => cap(c.budgetBytes))]);
  if (!counts) {
    const mib = (b: number) => Math.round(b / 1024 / 1024);
    return fail(
      `the model needs about ${mib(slots * model.layerBytes)} MiB; the head and ${chosen.length} peer(s) lend ${mib(opts.headBudgetBytes + chosen.reduce((a, c) => a + c.budgetBytes, 0))} MiB`,
    );
  }
  const nodes = [{ nodeId: opts.headId, rttMs: null as number | null }, ...chosen.map((c) => ({ nodeId: c.nodeId, rttMs: c.rttMs }))];
  let first = 0;
  const stages = nodes.map((n, i): StagePlan => {
    const layers = counts[i] as number;
    const s: StagePlan = {
      nodeId: n.nodeId,
      role: i === 0 ? "head" : "stage",
      firstLayer: first,
      layers,
      bytes: layers * model.layerBytes,
      rttMs: n.rttMs,
    };
    first += layers;
    return s;
  });
  for (const c of eligible) if (!chosen.includes(c)) refused.push({ nodeId: c.nodeId, reason: "not needed for this split" });
  return { stages, refused };
}

/** Spread `slots` over nodes in proportion to their capacities (in slots), each at least one and none over its capacity; null when they cannot hold them. */
export function assignSlots(slots: number, caps: number[]): number[] | null {
  if (caps.length > slots || caps.some((c) => c < 1)) return null;
  const total = caps.reduce((a, b) => a + b, 0);
  if (total < slots) return null;
  const counts = caps.map((c) => Math.max(1, Math.min(c, Math.floor((slots * c) / total))));
  let left = slots - counts.reduce((a, b) => a + b, 0);
  // Hand out the rest one at a time to the node with the most room left relative to its capacity.
  while (left > 0) {
    let best = -1;
    let bestRoom = 0;
    for (let i = 0; i < caps.length; i++) {
      const room = ((caps[i] as number) - (counts[i] as number)) / (caps[i] as number);
      if ((caps[i] as number) > (counts[i] as number) && (best < 0 || room > bestRoom)) {
        best = i;
        bestRoom = room;
      }
    }
    if (best < 0) return null;
    counts[best] = (counts[best] as number) + 1;
    left--;
  }
  // The floor of a large share may overshoot when many small nodes were lifted to one.
  while (left < 0) {
    const i = counts.indexOf(Math.max(...counts));
    if ((counts[i] as number) <= 1) return null;
    counts[i] = (counts[i] as number) - 1;
    left++;
  }
  return counts;
}

/** The stage servers' share as the native split load takes it: layer slots per stage, in pipeline order (the head's share is implied). */
export function splitWeights(plan: SplitPlan): number[] {
  return plan.stages.filter((s) => s.role === "stage").map((s) => s.layers);
}
