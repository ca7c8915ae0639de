// This node's own tenancy: per model, which path hashes its engines' KV
// really holds, with each hash's parent link. It is the source of truth for
// what the sync tells peers: a full resync streams it (a peer that joined
// late, restarted, or started wanting the model), and a path request is
// answered from it. Bounded per model and in models; what does not fit is
// refused and counted, never silently half-kept.
import { isPathHash } from "./key";

/** What an engine reports its KV started or stopped holding: inserts as [hash, parent] in chain order, evicts as hashes. */
export interface TenancyDelta {
  inserts: ReadonlyArray<readonly [string, string | null]>;
  evicts: readonly string[];
}

/** Bounds of the own tenancy; every one has a default. */
export interface OwnConfig {
  maxHashesPerModel: number;
  maxModels: number;
}

/** Defaults: 200 000 hashes per model, 64 models. */
export const OWN_DEFAULTS: OwnConfig = { maxHashesPerModel: 200_000, maxModels: 64 };

/** What one `apply` did. */
export interface ApplyResult {
  inserted: number;
  evicted: number;
  /** Inserts refused: malformed hash or parent, or past the per-model bound. */
  refused: number;
}

/** Counters for metrics. */
export interface OwnStats {
  models: number;
  hashes: number;
  /** Inserts refused over the node's life (bounds or malformed). */
  refused: number;
  /** Models refused past `maxModels`. */
  modelsRefused: number;
}

/** Whether `m` can name a model on the wire: 1..128 printable ASCII characters, no spaces. */
export function isModelName(m: unknown): m is string {
  return typeof m === "string" && m.length > 0 && m.length <= 128 && /^[!-~]+$/.test(m);
}

interface Held {
  parent: string | null;
  /** Position in insertion order: the map iterates in it, and the cursor compares it (parents first). */
  seq: number;
}

/** One model's tenancy; never reused once the model is dropped or emptied. */
export class OwnModel {
  readonly held = new Map<string, Held>();
  nextSeq = 0;
  /** nextSeq when the latest `apply` began: an entry with seq at or past it is new from that apply. */
  applyFrom = 0;
  /** Dropped wholesale (not emptied by evictions, each of which peers hear of): a cursor over it is stale. */
  dropped = false;
}

// An ancestor chain longer than a request's blocks is not a real prefix chain: the walk stops there.
const MAX_DEPTH = 1024;

/** This node's own tenancy per model. */
export class OwnTenancy {
  readonly config: OwnConfig;
  private readonly byModel = new Map<string, OwnModel>();
  private hashes = 0;
  private refusedTotal = 0;
  private modelsRefused = 0;

  constructor(config: Partial<OwnConfig> = {}) {
    this.config = { ...OWN_DEFAULTS, ...config };
  }

  /** Apply an engine's change for `model`: evicts first, then inserts (in chain order), as the index does. */
  apply(model: string, delta: TenancyDelta): ApplyResult {
    const r: ApplyResult = { inserted: 0, evicted: 0, refused: 0 };
    let m = this.byModel.get(model);
    if (m) {
      for (const h of delta.evicts) {
        if (m.held.delete(h)) {
          r.evicted++;
          this.hashes--;
        }
      }
    }
    if (delta.inserts.length > 0 && !m) {
      if (!isModelName(model) || this.byModel.size >= this.config.maxModels) {
        this.modelsRefused++;
        r.refused = delta.inserts.length;
        this.refusedTotal += r.refused;
        return r;
      }
      m = new OwnModel();
      this.byModel.set(model, m);
    }
    if (!m) return r;
    m.applyFrom = m.nextSeq;
    for (const [hash, parent] of delta.inserts) {
      if (m.held.has(hash)) continue;
      if (!isPathHash(hash) || (parent !== null && !isPathHash(parent)) || m.held.size >= this.config.maxHashesPerModel) {
        r.refused++;
        continue;
      }
      m.held.set(hash, { parent, seq: m.nextSeq++ });
      r.inserted++;
      this.hashes++;
    }
    this.refusedTotal += r.refused;
    if (m.held.size === 0) this.byModel.delete(model);
    return r;
  }

  /** Forget all of `model` (its engine stopped); the sync must then resync it to peers. Returns whether it had any. */
  dropModel(model: string): boolean {
    const m = this.byModel.get(model);
    if (!m) return false;
    this.hashes -= m.held.size;
    m.dropped = true;
    this.byModel.delete(model);
    return true;
  }

  /** Whether this node holds `hash` for `model`. */
  has(model: string, hash: string): boolean {
    return this.byModel.get(model)?.held.has(hash) ?? false;
  }

  /** Whether the latest `apply` for `model` is what made `hash` held (it was not held just before). */
  addedByLastApply(model: string, hash: string): boolean {
    const m = this.byModel.get(model);
    const e = m?.held.get(hash);
    return e !== undefined && e.seq >= (m as OwnModel).applyFrom;
  }

  /** The parent link of a held hash; undefined when not held. */
  parentOf(model: string, hash: string): string | null | undefined {
    return this.byModel.get(model)?.held.get(hash)?.parent;
  }

  /** Hashes held for `model`. */
  size(model: string): number {
    return this.byModel.get(model)?.held.size ?? 0;
  }

  /** Models with any tenancy. */
  models(): string[] {
    return [...this.byModel.keys()];
  }

  /** The current tenancy object of `model` (a cursor keeps it to notice a drop); undefined when none. */
  modelOf(model: string): OwnModel | undefined {
    return this.byModel.get(model);
  }

  /** A cursor over `model`'s [hash, parent] pairs as held now, parents before children; what it reaches is checked against what is held then. */
  cursor(model: string): OwnCursor {
    return new OwnCursor(this, model);
  }

  /** Every [hash, parent] pair of `model`, parents before children (a snapshot; tests and diagnostics). */
  entries(model: string): Array<[string, string | null]> {
    const out: Array<[string, string | null]> = [];
    const c = this.cursor(model);
    for (let e: [string, string | null] | null = c.peek(); e !== null; e = c.peek()) {
      out.push(e);
      c.take();
    }
    return out;
  }

  /** The chain root..hash through parent links, at most `max` pairs (the root side is cut); [] when `hash` is not held. */
  pathTo(model: string, hash: string, max: number): Array<[string, string | null]> {
    const m = this.byModel.get(model);
    const out: Array<[string, string | null]> = [];
    let h: string | null = hash;
    while (h !== null && out.length < Math.min(max, MAX_DEPTH)) {
      const e: Held | undefined = m?.held.get(h);
      if (!e) break;
      out.push([h, e.parent]);
      h = e.parent;
    }
    return out.reverse();
  }

  /** Sizes and refusals. */
  stats(): OwnStats {
    return { models: this.byModel.size, hashes: this.hashes, refused: this.refusedTotal, modelsRefused: this.modelsRefused };
  }
}

/**
 * Streams one model's tenancy over many rounds, parents before children, while it keeps changing: it
 * yields what was held when it began and is still held when reached (an entry removed before the
 * cursor reaches it is never yielded). An entry added after it began is not yielded: the sync queues
 * every later change for the peer anyway. An entry whose held parent comes later in insertion order
 * (the parent was evicted and inserted again) is preceded by that parent chain, so a receiver never
 * sees a child before its parent; the parent is yielded again later, which a receiver takes as a no-op.
 * `stale` turns true when the model was dropped: what it would still yield belongs to the dropped
 * tenancy. (A model emptied by evictions is not stale: the cursor just finishes, and what comes after
 * reaches peers as changes.)
 *
 * It walks a snapshot of the keys, not a live Map iterator: in Bun (JSC) a live iterator keeps every
 * entry deleted after its position reachable, so a cursor that a busy peer's backlog kept from
 * finishing grew the heap by about 200 bytes per eviction, without bound (the routing soak in
 * docs/benchmarks.md: 380 MB in two simulated minutes on two nodes).
 */
export class OwnCursor {
  private readonly m: OwnModel | undefined;
  private keys: string[] | null;
  private at = 0;
  private readonly ahead: Array<[string, string | null]> = [];
  private done = false;

  constructor(own: OwnTenancy, model: string) {
    this.m = own.modelOf(model);
    this.keys = this.m ? [...this.m.held.keys()] : null;
    if (!this.keys) this.done = true;
  }

  /** Whether the model's tenancy was dropped wholesale since the cursor began (what it streams is void). */
  get stale(): boolean {
    return this.m?.dropped === true;
  }

  /** The next pair without consuming it; null when the cursor is finished. */
  peek(): [string, string | null] | null {
    if (this.stale) this.ahead.length = 0;
    if (this.ahead.length === 0) this.fill();
    return this.ahead[this.ahead.length - 1] ?? null;
  }

  /** Consume the pair `peek` returned. */
  take(): void {
    this.ahead.pop();
  }

  /** Whether nothing is left to yield. */
  get finished(): boolean {
    return this.peek() === null;
  }

  // `ahead` is a stack: the entry itself at the bottom, its not-yet-yielded ancestors above it, the root-most on top.
  private fill(): void {
    if (this.done || !this.keys || !this.m || this.stale) {
      this.finish();
      return;
    }
    for (;;) {
      if (this.at >= this.keys.length) {
        this.finish();
        return;
      }
      const hash = this.keys[this.at++] as string;
      // Gone since the snapshot: its eviction reaches the peer as a change (or it never had it).
      const e = this.m.held.get(hash);
      if (!e) continue;
      this.ahead.push([hash, e.parent]);
      let p = e.parent;
      for (let depth = 0; p !== null && depth < MAX_DEPTH; depth++) {
        const pe = this.m.held.get(p);
        if (!pe || pe.seq < e.seq) break;
        this.ahead.push([p, pe.parent]);
        p = pe.parent;
      }
      return;
    }
  }

  private finish(): void {
    this.done = true;
    // The snapshot can be large (a model's whole tenancy): let it go as soon as it is walked.
    this.keys = null;
  }
}
