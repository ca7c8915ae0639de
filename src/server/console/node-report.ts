// One node's figures as the console shows them: its backend, each served
// model's KV cells by state, slots, queue and host-RAM tier, and what its
// recent requests showed (TTFT, tokens/s, cache hit rate). Peers fetch each
// other's with mesh credentials, so any node's console shows every node.
import type { EngineStats } from "../../engine/protocol";
import type { ServedModel } from "../model";
import type { RequestRecord } from "./log";

/** One served model's engine figures. */
export interface ModelReport {
  id: string;
  status: string;
  randomWeights: boolean | null;
  ctx: number | null;
  kv: { running: number; resident: number; reserved: number; free: number; total: number } | null;
  slots: { busy: number; total: number } | null;
  queue: { waiting: number; capacity: number } | null;
  hostCache: { bytes: number; capacity: number; entries: number } | null;
}

/** What this node's served requests showed over a window. */
export interface RecentFigures {
  windowS: number;
  requests: number;
  /** Median time to first token, ms. */
  ttftMs: number | null;
  /** Mean decode speed of a request, completion tokens per second. */
  tokensPerS: number | null;
  promptTokens: number;
  cachedTokens: number;
  /** cachedTokens / promptTokens; null without requests. */
  hitRate: number | null;
}

/** GET /api/node. */
export interface NodeReport {
  id: string;
  name: string;
  at: number;
  /** llama.cpp backends (CPU, CUDA, Metal, ...), from the engine's system info. */
  backends: string[];
  models: ModelReport[];
  recent: RecentFigures;
  /** Since the node started (as far as the request log reaches). */
  totals: { requests: number; promptTokens: number; cachedTokens: number; completionTokens: number };
}

/** Backend names in llama.cpp's system info ("CPU : SSE3 = 1 | ..." and the like). */
export function backendsOf(systemInfo: string): string[] {
  const out = new Set<string>();
  for (const m of systemInfo.matchAll(/(?:^|\|\s*)([A-Za-z][A-Za-z0-9_-]*)\s*:/g)) out.add(m[1] as string);
  return [...out].slice(0, 8);
}

async function modelReport(m: ServedModel): Promise<ModelReport> {
  const s: EngineStats | null = m.engine ? await m.engine.stats().catch(() => null) : null;
  return {
    id: m.id,
    status: m.status,
    randomWeights: m.info?.randomWeights ?? null,
    ctx: m.info?.nCtx ?? null,
    kv: s
      ? {
          running: s.kvCellsRunning,
          resident: s.kvCellsResident,
          reserved: s.kvCellsReserved,
          free: s.kvCellsFree,
          total: s.kvCellsTotal,
        }
      : null,
    slots: s ? { busy: s.slotsBusy, total: s.slotsTotal } : null,
    queue: s ? { waiting: s.waiting, capacity: s.queueCapacity } : null,
    hostCache: s ? { bytes: s.hostCacheBytes, capacity: s.hostCacheCapacityBytes, entries: s.hostCacheEntries } : null,
  };
}

/** Recent figures of the requests `self` served, from the request log (newest first). */
export function recentFigures(records: readonly RequestRecord[], self: string, now: number, windowS = 60): RecentFigures {
  const since = now - windowS * 1000;
  const ttfts: number[] = [];
  let speed = 0;
  let speeds = 0;
  let prompt = 0;
  let cached = 0;
  let n = 0;
  for (const r of records) {
    if (r.at < since) break;
    if (r.servedBy !== self || !r.done || r.status !== 200) continue;
    n++;
    if (r.ttftMs !== null) ttfts.push(r.ttftMs);
    if (r.tokensPerS !== null) {
      speed += r.tokensPerS;
      speeds++;
    }
    prompt += r.promptTokens ?? 0;
    cached += r.cachedTokens ?? 0;
  }
  ttfts.sort((a, b) => a - b);
  return {
    windowS,
    requests: n,
    ttftMs: ttfts.length > 0 ? (ttfts[Math.floor(ttfts.length / 2)] as number) : null,
    tokensPerS: speeds > 0 ? speed / speeds : null,
    promptTokens: prompt,
    cachedTokens: cached,
    hitRate: prompt > 0 ? cached / prompt : null,
  };
}

/** This node's report. */
export async function nodeReport(
  id: string,
  name: string,
  models: readonly ServedModel[],
  records: readonly RequestRecord[],
  now = Date.now(),
): Promise<NodeReport> {
  const totals = { requests: 0, promptTokens: 0, cachedTokens: 0, completionTokens: 0 };
  for (const r of records) {
    if (r.servedBy !== id || !r.done || r.status !== 200) continue;
    totals.requests++;
    totals.promptTokens += r.promptTokens ?? 0;
    totals.cachedTokens += r.cachedTokens ?? 0;
    totals.completionTokens += r.completionTokens ?? 0;
  }
  const backends = new Set<string>();
  for (const m of models) for (const b of backendsOf(m.info?.systemInfo ?? "")) backends.add(b);
  return {
    id,
    name,
    at: now,
    backends: [...backends],
    models: await Promise.all(models.map(modelReport)),
    recent: recentFigures(records, id, now),
    totals,
  };
}
