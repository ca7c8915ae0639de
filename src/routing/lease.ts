// Short leases: the node this node last sent a conversation to, for a few
// seconds. They bridge the round or two before that node's engine reports
// what it now holds, and keep near-ties from flapping a conversation between
// nodes. A lease is a guess from this node's own routing, so it only ever
// tops up what the index knows, and expires on its own.
import { LruMap } from "../lru";

/** One lease: the node and how many blocks of the key it covers. */
export interface Lease {
  node: string;
  depth: number;
}

interface Entry extends Lease {
  until: number;
}

/** Leases by prefix fingerprint (RouteKey.prefixes: local, never published), bounded (least recently set first out) and expiring. */
export class Leases {
  private readonly map = new LruMap<bigint, Entry>();

  constructor(
    private readonly ttlMs = 15_000,
    private readonly max = 8192,
  ) {}

  /** Lease the whole prefix `prefixes` stands for to `node` until now + ttl. */
  set(prefixes: readonly bigint[], node: string, now: number): void {
    const depth = prefixes.length;
    if (depth === 0) return;
    const hash = prefixes[depth - 1] as bigint;
    if (!this.map.has(hash) && this.map.size >= this.max) this.map.shift();
    this.map.set(hash, { node, depth, until: now + this.ttlMs });
  }

  /**
   * The lease on the longest prefix of `prefixes` that has a live one; expired leases met on the way are dropped.
   * `canEnd(i)` says whether a leased request can have ended at block i (a chat request ends at a message's
   * end): the others are not looked up.
   */
  longest(prefixes: readonly bigint[], now: number, canEnd: (i: number) => boolean = () => true): Lease | null {
    for (let i = prefixes.length - 1; i >= 0; i--) {
      if (!canEnd(i)) continue;
      const hash = prefixes[i] as bigint;
      const e = this.map.peek(hash);
      if (!e) continue;
      if (e.until <= now) {
        this.map.delete(hash);
        continue;
      }
      return { node: e.node, depth: Math.min(e.depth, i + 1) };
    }
    return null;
  }

  /** Drop every lease on `node` (it left the mesh). */
  dropNode(node: string): void {
    for (const [h, e] of this.map.entries()) if (e.node === node) this.map.delete(h);
  }

  /** Leases held (expired ones included until met). */
  get size(): number {
    return this.map.size;
  }
}
