// Which prefix marks the KV holds, as pure bookkeeping: the scheduler (and
// the fake engine) tell it when a holder (a slot, a host-RAM entry, a fake
// sequence) grows, is trimmed or is dropped, and drain() turns the net change
// since the last drain into a TenancyDelta for routing. Routing learns from
// what the KV really holds, so every path that changes a holder must come
// through here, and refcounts must stay exact across all of them.
import type { PrefixMark, TenancyDelta } from "./protocol";

/** A mark placed on a token sequence: held by a holder whose token history reaches tokenEnd. */
export interface TokenMark {
  hash: string;
  parent: string | null;
  /** Prompt tokens that cover the mark's bytes; at least 1. */
  tokenEnd: number;
}

/** Most marks one request (or one reply) may attach; the rest are ignored, so a request cannot grow the engine's state without bound. */
export const MAX_MARKS = 1024;

/** One holder's marks, sorted by tokenEnd; the first `held` are covered by its `length` tokens. */
interface Holding {
  marks: TokenMark[];
  byHash: Map<string, TokenMark>;
  held: number;
  length: number;
}

/**
 * tokenEnd for each mark from the cumulative byte ends of the prompt's token
 * pieces (ends[i] = bytes covered by tokens 0..i): the fewest tokens whose
 * pieces cover byteEnd bytes, the whole prompt when byteEnd lies beyond it.
 * Malformed marks are skipped; at most MAX_MARKS are kept.
 */
export function tokenMarks(marks: readonly PrefixMark[], ends: ArrayLike<number>): TokenMark[] {
  const n = ends.length;
  const out: TokenMark[] = [];
  for (const m of marks) {
    if (out.length >= MAX_MARKS) break;
    if (!validMark(m)) continue;
    // Binary search: the first i with ends[i] >= byteEnd; tokenEnd = i + 1.
    let lo = 0;
    let hi = n;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((ends[mid] as number) >= m.byteEnd) hi = mid;
      else lo = mid + 1;
    }
    out.push({ hash: m.hash, parent: m.parent, tokenEnd: Math.max(1, Math.min(n, lo + 1)) });
  }
  return out;
}

function validMark(m: PrefixMark): boolean {
  return (
    typeof m === "object" &&
    m !== null &&
    typeof m.hash === "string" &&
    (m.parent === null || typeof m.parent === "string") &&
    typeof m.byteEnd === "number" &&
    Number.isFinite(m.byteEnd)
  );
}

/** Refcounted marks per holder, with a coalescing record of what changed since the last drain. */
export class Tenancy<H> {
  private readonly holdings = new Map<H, Holding>();
  /** Holders per held hash, and the parent of the mark that made it held. */
  private readonly refs = new Map<string, { n: number; parent: string | null }>();
  /** Hashes the last drains reported held. */
  private readonly reported = new Set<string>();
  /** Hashes whose held state changed since the last drain (in order of first change). */
  private readonly changed = new Set<string>();

  /** True when some holder has marks: callers skip per-step work otherwise, so requests without marks cost nothing. */
  get active(): boolean {
    return this.holdings.size > 0;
  }

  /** Number of distinct hashes held now. */
  get heldCount(): number {
    return this.refs.size;
  }

  /** True when at least one holder holds hash. */
  holds(hash: string): boolean {
    return this.refs.has(hash);
  }

  /** True when holder has marks its tokens do not cover yet (the scheduler grows it as prefill goes on). */
  waiting(holder: H): boolean {
    const h = this.holdings.get(holder);
    return h !== undefined && h.held < h.marks.length;
  }

  /** Marks attached to holder whose tokenEnd is at most upTo (its held ones by default). */
  marks(holder: H, upTo = Number.POSITIVE_INFINITY): TokenMark[] {
    const h = this.holdings.get(holder);
    if (!h) return [];
    const limit = Math.min(upTo, h.length);
    const out: TokenMark[] = [];
    for (const m of h.marks) {
      if (m.tokenEnd > limit) break;
      out.push(m);
    }
    return out;
  }

  /**
   * Attach marks to holder (a hash it already has keeps the smaller tokenEnd)
   * and record that its token history is now `length` long: every attached
   * mark with tokenEnd <= length is held from now on. A shorter length than
   * before trims first.
   */
  hold(holder: H, length: number, marks: readonly TokenMark[] = []): void {
    let h = this.holdings.get(holder);
    if (h && length < h.length) {
      this.trim(holder, length);
      h = this.holdings.get(holder);
    }
    if (!h) {
      if (marks.length === 0) return;
      h = { marks: [], byHash: new Map(), held: 0, length };
      this.holdings.set(holder, h);
    }
    // Attach at the length already recorded, where the first `held` marks are
    // exactly those it covers, and only then grow: attaching at the new length
    // would count a new covered mark held while older waiting marks before it
    // are not yet, and the loop below would then count it a second time.
    for (const m of marks) this.attach(h, m);
    h.length = length;
    while (h.held < h.marks.length && (h.marks[h.held] as TokenMark).tokenEnd <= length) {
      this.ref(h.marks[h.held] as TokenMark);
      h.held++;
    }
  }

  /** Holder's history was cut to keep tokens: its marks past keep are gone, held or not. */
  trim(holder: H, keep: number): void {
    const h = this.holdings.get(holder);
    if (!h) return;
    while (h.marks.length > 0 && (h.marks[h.marks.length - 1] as TokenMark).tokenEnd > keep) {
      const m = h.marks.pop() as TokenMark;
      h.byHash.delete(m.hash);
      if (h.marks.length < h.held) {
        h.held--;
        this.unref(m.hash);
      }
    }
    h.length = Math.min(h.length, keep);
    if (h.marks.length === 0) this.holdings.delete(holder);
  }

  /** Holder is gone (cleared, freed, dropped): it holds nothing. */
  release(holder: H): void {
    const h = this.holdings.get(holder);
    if (!h) return;
    this.holdings.delete(holder);
    for (let i = 0; i < h.held; i++) this.unref((h.marks[i] as TokenMark).hash);
  }

  /** True when holder holds hash, within its first upTo tokens (anywhere by default). */
  heldBy(holder: H, hash: string, upTo = Number.POSITIVE_INFINITY): boolean {
    const h = this.holdings.get(holder);
    const m = h?.byHash.get(hash);
    return h !== undefined && m !== undefined && m.tokenEnd <= Math.min(upTo, h.length);
  }

  /**
   * Forget every holder's marks, held or waiting (the tokens stay where they
   * are): each hash reported held is reported evicted at the next drain.
   */
  clear(): void {
    for (const hash of this.refs.keys()) this.changed.add(hash);
    this.refs.clear();
    this.holdings.clear();
  }

  /**
   * What started or stopped being held since the last drain, null when
   * nothing did: a hash that came and went in between is not reported, an
   * insert only when not already reported held, an evict only when it was.
   * Inserts come parent before child.
   */
  drain(): TenancyDelta | null {
    if (this.changed.size === 0) return null;
    const inserts: Array<[string, string | null]> = [];
    const evicts: string[] = [];
    for (const hash of this.changed) {
      const r = this.refs.get(hash);
      if (r && !this.reported.has(hash)) {
        this.reported.add(hash);
        inserts.push([hash, r.parent]);
      } else if (!r && this.reported.has(hash)) {
        this.reported.delete(hash);
        evicts.push(hash);
      }
    }
    this.changed.clear();
    if (inserts.length === 0 && evicts.length === 0) return null;
    return { inserts: chainOrder(inserts), evicts };
  }

  private attach(h: Holding, m: TokenMark): void {
    const old = h.byHash.get(m.hash);
    if (old) {
      if (old.tokenEnd <= m.tokenEnd) return;
      const i = h.marks.indexOf(old);
      h.marks.splice(i, 1);
      if (i < h.held) {
        h.held--;
        this.unref(old.hash);
      }
    }
    h.byHash.set(m.hash, m);
    // Marks mostly arrive in tokenEnd order: insert from the back.
    let i = h.marks.length;
    while (i > 0 && (h.marks[i - 1] as TokenMark).tokenEnd > m.tokenEnd) i--;
    h.marks.splice(i, 0, m);
    if (m.tokenEnd <= h.length) {
      // Inside the covered part (so i <= held): held at once.
      h.held++;
      this.ref(m);
    }
  }

  private ref(m: TokenMark): void {
    const r = this.refs.get(m.hash);
    if (r) {
      r.n++;
      return;
    }
    this.refs.set(m.hash, { n: 1, parent: m.parent });
    this.changed.add(m.hash);
  }

  private unref(hash: string): void {
    const r = this.refs.get(hash);
    if (!r) return;
    if (--r.n > 0) return;
    this.refs.delete(hash);
    this.changed.add(hash);
  }
}

/** Reorder inserts so that each parent among them comes before its children (a cycle in bad input cannot loop). */
function chainOrder(inserts: Array<[string, string | null]>): Array<[string, string | null]> {
  if (inserts.length < 2) return inserts;
  const byHash = new Map(inserts.map((e) => [e[0], e]));
  const done = new Set<string>();
  const out: Array<[string, string | null]> = [];
  for (const e of inserts) {
    const chain: Array<[string, string | null]> = [];
    let cur: [string, string | null] | undefined = e;
    while (cur && !done.has(cur[0])) {
      done.add(cur[0]);
      chain.push(cur);
      cur = cur[1] === null ? undefined : byHash.get(cur[1]);
    }
    for (let i = chain.length - 1; i >= 0; i--) out.push(chain[i] as [string, string | null]);
  }
  return out;
}

/**
 * Tenancy listeners on the main thread, with the set of hashes reported held
 * so that an engine that closes or dies can evict exactly those, once.
 */
export class TenancyFeed {
  private readonly listeners = new Set<(delta: TenancyDelta) => void>();
  private readonly held = new Set<string>();
  private ended = false;

  /** Add a listener; returns its unsubscribe function. */
  listen(listener: (delta: TenancyDelta) => void): () => void {
    if (this.ended) return () => {};
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /** Pass a delta on to every listener (nothing after end). */
  emit(delta: TenancyDelta): void {
    if (this.ended || (delta.inserts.length === 0 && delta.evicts.length === 0)) return;
    for (const [hash] of delta.inserts) this.held.add(hash);
    for (const hash of delta.evicts) this.held.delete(hash);
    this.send(delta);
  }

  /** The engine is gone: evict everything still held, then stay silent. */
  end(): void {
    if (this.ended) return;
    const evicts = [...this.held];
    this.held.clear();
    if (evicts.length > 0) this.send({ inserts: [], evicts });
    this.ended = true;
    this.listeners.clear();
  }

  private send(delta: TenancyDelta): void {
    for (const l of this.listeners) {
      // One broken listener must not starve the others or the engine's message loop.
      try {
        l(delta);
      } catch {}
    }
  }
}
