// The request log: the last N generating requests this node took part in (it
// was their entry node, or it served them for a peer), each with routing's own
// decision record and what really happened. A ring with a cap; records hold
// sizes and hashes, never prompt text. Mispredictions (routing expected a
// cached prefix the engine did not have) are counted per serving node.
import { LruMap } from "../../lru";
import { type PredictionOutcome, predictionOutcome, type RouteExplanation } from "../../routing";

/** One request as the console and /api/requests show it. */
export interface RequestRecord {
  id: string;
  /** Epoch milliseconds when it arrived. */
  at: number;
  /** The node the client called (for a request a peer forwarded here: that peer). */
  entry: string;
  /** The node that ran it; null until known. */
  servedBy: string | null;
  model: string;
  /** The API path, e.g. /v1/chat/completions. */
  api: string;
  stream: boolean;
  /** local, cache, load (x-mesh-route); only: a single node could run it. */
  route: string;
  /** Canonical characters of the request and the hash of its routing key's last block: sizes and hashes, never text. */
  promptChars: number | null;
  promptHash: string | null;
  status: number | null;
  promptTokens: number | null;
  cachedTokens: number | null;
  completionTokens: number | null;
  /** What routing expected the serving node to hold; null when this node made no decision. */
  predictedCachedTokens: number | null;
  /** predicted vs actual: agree, short (the cache was not there), more (more was cached than predicted). */
  prediction: PredictionOutcome | null;
  ttftMs: number | null;
  tokensPerS: number | null;
  durationMs: number | null;
  /** Routing's decision record; null when no decision was made (a request from a peer, or a single node). */
  explanation: RouteExplanation | null;
  done: boolean;
}

/** Per serving node: decisions checked against what its engine reused. */
export interface PredictionCounts {
  checked: number;
  short: number;
}

/** What a finished request showed. */
export interface Outcome {
  status?: number;
  servedBy?: string | null;
  promptTokens?: number | null;
  cachedTokens?: number | null;
  completionTokens?: number | null;
  ttftMs?: number | null;
  tokensPerS?: number | null;
  durationMs?: number | null;
}

/** Filters of GET /api/requests. */
export interface RequestFilter {
  model?: string;
  node?: string;
  route?: string;
  status?: "ok" | "error";
  limit?: number;
}

/** Default cap of the ring. */
export const REQUEST_LOG_CAP = 1000;
// Nodes whose mispredictions are counted; the least recently seen goes first beyond this.
const MAX_COUNTED_NODES = 1024;

/** A bounded ring of request records. */
export class RequestLog {
  private readonly ring: Array<RequestRecord | undefined>;
  private next = 0;
  private size = 0;
  private readonly byId = new Map<string, RequestRecord>();
  private readonly counts = new LruMap<string, PredictionCounts>();

  constructor(readonly cap = REQUEST_LOG_CAP) {
    if (!Number.isInteger(cap) || cap < 1) throw new Error("the request log needs a cap of at least 1");
    this.ring = new Array(cap);
  }

  /** Records held. */
  get length(): number {
    return this.size;
  }

  /** Add a record (the oldest goes when the ring is full). */
  add(r: RequestRecord): void {
    const old = this.ring[this.next];
    if (old) this.byId.delete(old.id);
    this.ring[this.next] = r;
    this.byId.set(r.id, r);
    this.next = (this.next + 1) % this.cap;
    this.size = Math.min(this.cap, this.size + 1);
  }

  /** The record `id`, while the ring still holds it. */
  get(id: string): RequestRecord | undefined {
    return this.byId.get(id);
  }

  /** Fill in what request `id` showed; compares prediction and reality once both are known. Returns the record, if held. */
  complete(id: string, o: Outcome): RequestRecord | undefined {
    const r = this.byId.get(id);
    if (!r) return undefined;
    for (const [k, v] of Object.entries(o)) if (v !== undefined && v !== null) (r as unknown as Record<string, unknown>)[k] = v;
    if (r.prediction === null && r.predictedCachedTokens !== null && r.cachedTokens !== null && r.servedBy) {
      r.prediction = predictionOutcome(r.predictedCachedTokens, r.cachedTokens);
      // Only cache decisions promised a prefix; a shortfall there is the router trusting a stale index.
      if (r.route === "cache") {
        const c = this.counts.get(r.servedBy) ?? { checked: 0, short: 0 };
        c.checked++;
        if (r.prediction === "short") c.short++;
        this.counts.set(r.servedBy, c);
        while (this.counts.size > MAX_COUNTED_NODES) this.counts.shift();
      }
    }
    return r;
  }

  /** Mark request `id` finished. */
  finish(id: string): RequestRecord | undefined {
    const r = this.byId.get(id);
    if (r) r.done = true;
    return r;
  }

  /** Records, newest first, matching `f` (at most f.limit, default 100, at most the cap). */
  list(f: RequestFilter = {}): RequestRecord[] {
    const limit = Math.max(0, Math.min(f.limit ?? 100, this.cap));
    const out: RequestRecord[] = [];
    for (let i = 1; i <= this.size && out.length < limit; i++) {
      const r = this.ring[(this.next - i + this.cap) % this.cap] as RequestRecord;
      if (f.model !== undefined && r.model !== f.model) continue;
      if (f.node !== undefined && r.servedBy !== f.node && r.entry !== f.node) continue;
      if (f.route !== undefined && r.route !== f.route) continue;
      if (f.status === "ok" && (r.status === null || r.status >= 400)) continue;
      if (f.status === "error" && (r.status === null || r.status < 400)) continue;
      out.push(r);
    }
    return out;
  }

  /** Cache decisions checked against the engine, per serving node. */
  mispredictions(): Record<string, PredictionCounts> {
    const out: Record<string, PredictionCounts> = {};
    for (const [k, v] of this.counts.entries()) out[k] = { ...v };
    return out;
  }
}
