// The cache-aware routing index: per model, which nodes hold which prompt
// prefixes in KV cache. Its entries are path hashes (routing/key.ts): a hash
// stands for a whole prefix, and its parent link for the prefix one block
// shorter, so the index is a radix tree whose edges are prompt blocks. It
// stores hashes and node ids only, never prompt text.
//
import { LruMap } from "../lru";
import type { PathKey } from "./key";

// Bounded per model in entries and (estimated) bytes, and in models: the
// least recently used entry goes first. Entries are touched leaf first, root
// last, so an ancestor is always more recent than its descendants and the
// budget trims branches from their tips. An entry nobody holds is deleted at
// once: a node's eviction leaves no zombie tenant behind.

/** Bounds of the index; every one has a default. */
export interface IndexConfig {
  maxEntriesPerModel: number;
  maxBytesPerModel: number;
  maxModels: number;
}

/** Defaults: 100 000 prefixes and 24 MiB per model, 64 models. */
export const INDEX_DEFAULTS: IndexConfig = { maxEntriesPerModel: 100_000, maxBytesPerModel: 24 * 1024 * 1024, maxModels: 64 };

// Estimated heap cost of an entry (map slot, 11-character key, entry object, holder array) and of each holder in it.
const ENTRY_BYTES = 160;
const HOLDER_BYTES = 8;

interface Entry {
  parent: string | null;
  /** Node ids holding this prefix (usually one or a few). */
  holders: string[];
  /** Epoch ms when the index learnt of it (the console shows prefixes by age). */
  at: number;
}

/** One holder's longest match for a request. */
export interface Match {
  holder: string;
  /** Blocks of the request's key that this holder holds (its matched prefix is key.ends[depth - 1] characters). */
  depth: number;
}

/** Sizes of one model's index. */
export interface ModelIndexStats {
  entries: number;
  bytes: number;
  /** Entries dropped to stay within the budget. */
  budgetEvictions: number;
}

/** What one model's index holds, summarised for the console: hashes and sizes, never text. */
export interface IndexSummary {
  entries: number;
  bytes: number;
  /** Prefixes by length in key blocks: 1, 2-3, 4-7, 8-15, 16+. */
  byDepth: number[];
  /** Prefixes by age: under 10 s, 1 min, 10 min, older. */
  byAge: number[];
  /** Holders (nodes) by the prefixes they hold. */
  byHolder: Record<string, number>;
  /** The most recently used prefixes, newest first: path hash, blocks, holders, age. */
  recent: Array<{ hash: string; depth: number; holders: string[]; ageMs: number }>;
}

/** Bucket edges of IndexSummary.byDepth (blocks) and byAge (ms). */
export const DEPTH_EDGES = [2, 4, 8, 16];
export const AGE_EDGES_MS = [10_000, 60_000, 600_000];

function bucket(edges: readonly number[], x: number): number {
  let i = 0;
  while (i < edges.length && x >= (edges[i] as number)) i++;
  return i;
}

/** A plain list of path hashes as a PathKey. */
export function pathKey(hashes: readonly string[]): PathKey {
  return { length: hashes.length, hash: (i) => hashes[i] as string };
}

/** One model's prefix index. */
export class ModelIndex {
  private readonly entries = new LruMap<string, Entry>();
  private bytes = 0;
  private budgetEvictions = 0;

  constructor(private readonly c: Pick<IndexConfig, "maxEntriesPerModel" | "maxBytesPerModel"> = INDEX_DEFAULTS) {}

  /**
   * Record that `holder` holds each prefix of `path` ([hash, parent] pairs in chain order, a parent
   * before its children). Returns the parents the index could not place (not held by `holder` here
   * and not in `path`): the sender is asked for the path to them (layer 2 of the sync).
   */
  insertPath(holder: string, path: ReadonlyArray<readonly [string, string | null]>): string[] {
    const dangling: string[] = [];
    // Leaf first, so the ancestors end up most recently used.
    for (let i = path.length - 1; i >= 0; i--) {
      const [hash, parent] = path[i] as readonly [string, string | null];
      this.add(holder, hash, parent);
    }
    for (let i = 0; i < path.length; i++) {
      const parent = (path[i] as readonly [string, string | null])[1];
      if (parent === null) continue;
      if (i > 0 && (path[i - 1] as readonly [string, string | null])[0] === parent) continue;
      if (!this.holds(holder, parent)) dangling.push(parent);
    }
    this.trim();
    return dangling;
  }

  /** Record that `holder` no longer holds `hash`; true when it did. */
  evict(holder: string, hash: string): boolean {
    const e = this.entries.peek(hash);
    if (!e) return false;
    const i = e.holders.indexOf(holder);
    if (i < 0) return false;
    e.holders.splice(i, 1);
    this.bytes -= HOLDER_BYTES;
    if (e.holders.length === 0) this.remove(hash, e);
    return true;
  }

  /** Forget everything `holder` held (it died, left, or restarted with empty caches); returns the entries it left. */
  dropHolder(holder: string): number {
    let n = 0;
    for (const [hash, e] of this.entries.entries()) {
      const i = e.holders.indexOf(holder);
      if (i < 0) continue;
      n++;
      e.holders.splice(i, 1);
      this.bytes -= HOLDER_BYTES;
      if (e.holders.length === 0) this.remove(hash, e);
    }
    return n;
  }

  /** Whether `holder` holds `hash`. */
  holds(holder: string, hash: string): boolean {
    return this.entries.peek(hash)?.holders.includes(holder) ?? false;
  }

  /** The parent link of `hash`, or undefined when the index does not have it. */
  parentOf(hash: string): string | null | undefined {
    return this.entries.peek(hash)?.parent;
  }

  /**
   * Every holder's longest prefix of `key` (a request's key), longest first. Each holder's prefixes
   * are prefix-closed (a KV holding a prefix holds every shorter one), and so is the union over any
   * set of holders, so each round is a binary search for the deepest block a not-yet-found holder
   * has: a few path hashes computed per round, not one per block (they cost a BLAKE3 each). At most
   * `maxRounds` depths are found (the deepest). With `touch`, the matched entries and their
   * ancestors count as used (leaf first), so what routing still needs stays in the index.
   */
  match(key: PathKey, touch = true, maxRounds = 16): Match[] {
    const out: Match[] = [];
    const found = new Set<string>();
    const fresh = (i: number): Entry | null => {
      const e = this.entries.peek(key.hash(i));
      return e?.holders.some((h) => !found.has(h)) ? e : null;
    };
    let below = key.length;
    let deepest: string | null = null;
    for (let round = 0; round < maxRounds && below > 0; round++) {
      // The deepest i < below where a holder not found yet holds block i; most requests hit at the last block or nowhere.
      let lo = -1;
      let hi = below;
      if (fresh(hi - 1)) lo = hi - 1;
      // Holders of a prefix hold its first block: none there (a new conversation), none anywhere.
      else if (!fresh(0)) break;
      else {
        lo = 0;
        hi--;
        while (hi - lo > 1) {
          const mid = (lo + hi) >> 1;
          if (fresh(mid)) lo = mid;
          else hi = mid;
        }
      }
      if (lo < 0) break;
      const e = fresh(lo) as Entry;
      if (deepest === null) deepest = key.hash(lo);
      for (const h of e.holders) {
        if (found.has(h)) continue;
        found.add(h);
        out.push({ holder: h, depth: lo + 1 });
      }
      below = lo;
    }
    // Leaf first, up the parent links (no hashing): the ancestors end up most recently used.
    if (touch && deepest !== null) {
      let hash: string | null = deepest;
      for (let n = 0; hash !== null && n < 4096; n++) hash = this.entries.get(hash)?.parent ?? null;
    }
    return out;
  }

  /**
   * A summary for the console: one pass over the entries (depths memoised along parent links), and the
   * `recent` most recently used. Read on demand, never on the decision path.
   */
  summary(recent = 20, now = Date.now()): IndexSummary {
    const depth = new Map<string, number>();
    const depthOf = (hash: string): number => {
      const chain: string[] = [];
      let h: string | null = hash;
      let base = 0;
      while (h !== null && chain.length < 4096) {
        const known = depth.get(h);
        if (known !== undefined) {
          base = known;
          break;
        }
        chain.push(h);
        h = this.entries.peek(h)?.parent ?? null;
      }
      for (let i = chain.length - 1; i >= 0; i--) depth.set(chain[i] as string, ++base);
      return depth.get(hash) as number;
    };
    const byDepth = new Array(DEPTH_EDGES.length + 1).fill(0) as number[];
    const byAge = new Array(AGE_EDGES_MS.length + 1).fill(0) as number[];
    const byHolder: Record<string, number> = {};
    const newest: Array<[string, Entry]> = [];
    for (const [hash, e] of this.entries.entries()) {
      (byDepth[bucket(DEPTH_EDGES, depthOf(hash))] as number)++;
      (byAge[bucket(AGE_EDGES_MS, now - e.at)] as number)++;
      for (const h of e.holders) byHolder[h] = (byHolder[h] ?? 0) + 1;
      // entries() runs least recent first: keep the last `recent`.
      newest.push([hash, e]);
      if (newest.length > recent) newest.shift();
    }
    return {
      entries: this.entries.size,
      bytes: this.bytes,
      byDepth,
      byAge,
      byHolder,
      recent: newest
        .reverse()
        .map(([hash, e]) => ({ hash, depth: depthOf(hash), holders: [...e.holders], ageMs: Math.max(0, now - e.at) })),
    };
  }

  /** Current sizes. */
  stats(): ModelIndexStats {
    return { entries: this.entries.size, bytes: this.bytes, budgetEvictions: this.budgetEvictions };
  }

  private add(holder: string, hash: string, parent: string | null): void {
    // The first parent seen stays: a hash names one prefix, so its parent is the same from every holder.
    let e = this.entries.get(hash);
    if (!e) {
      e = { parent, holders: [], at: Date.now() };
      this.bytes += ENTRY_BYTES;
      this.entries.set(hash, e);
    }
    if (!e.holders.includes(holder)) {
      e.holders.push(holder);
      this.bytes += HOLDER_BYTES;
    }
  }

  private remove(hash: string, e: Entry): void {
    this.entries.delete(hash);
    this.bytes -= ENTRY_BYTES + HOLDER_BYTES * e.holders.length;
  }

  private trim(): void {
    while (this.entries.size > this.c.maxEntriesPerModel || (this.bytes > this.c.maxBytesPerModel && this.entries.size > 0)) {
      const [hash, e] = this.entries.oldest() as [string, Entry];
      this.remove(hash, e);
      this.budgetEvictions++;
    }
  }
}

/** The prefix indexes of every model, bounded in number. */
export class RoutingIndex {
  private readonly models = new LruMap<string, ModelIndex>();
  private modelsDropped = 0;

  constructor(readonly config: IndexConfig = INDEX_DEFAULTS) {}

  /** The index of `model`, created on first use (the least recently used model's is dropped past the bound). */
  model(model: string): ModelIndex {
    let m = this.models.get(model);
    if (m) return m;
    m = new ModelIndex(this.config);
    if (this.models.size >= this.config.maxModels) {
      this.models.shift();
      this.modelsDropped++;
    }
    this.models.set(model, m);
    return m;
  }

  /** The index of `model` if it has one (no creation, no recency change). */
  peek(model: string): ModelIndex | undefined {
    return this.models.peek(model);
  }

  /** Forget `holder` in every model. */
  dropHolder(holder: string): number {
    let n = 0;
    for (const [, m] of this.models.entries()) n += m.dropHolder(holder);
    return n;
  }

  /** Per-model sizes, and models dropped for the bound. */
  stats(): { models: Record<string, ModelIndexStats>; modelsDropped: number } {
    const models: Record<string, ModelIndexStats> = {};
    for (const [id, m] of this.models.entries()) models[id] = m.stats();
    return { models, modelsDropped: this.modelsDropped };
  }
}
