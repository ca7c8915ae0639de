// Short leases: the node this node last sent a conversation to, for a few
// seconds. They bridge the round or two before that node's engine reports
// what it now holds, and keep near-ties from flapping a conversation between
// nodes. A lease is a guess from this node's own routing, so it only ever
// tops up what the index knows, and expires on its own.

/** One lease: the node and how many blocks of the key it covers. */
export interface Lease {
  node: string;
  depth: number;
}

interface Entry extends Lease {
  until: number;
}

/** Leases by path hash, bounded (least recently set first out) and expiring. */
export class Leases {
  private readonly map = new Map<string, Entry>();

  constructor(
    private readonly ttlMs = 15_000,
    private readonly max = 8192,
  ) {}

  /** Lease the prefix ending in hashes[depth - 1] to `node` until now + ttl. */
  set(hashes: readonly string[], node: string, now: number): void {
    const depth = hashes.length;
    if (depth === 0) return;
    const hash = hashes[depth - 1] as string;
    this.map.delete(hash);
    if (this.map.size >= this.max) this.map.delete(this.map.keys().next().value as string);
    this.map.set(hash, { node, depth, until: now + this.ttlMs });
  }

  /** The lease on the longest prefix of `hashes` that has a live one; expired leases met on the way are dropped. */
  longest(hashes: readonly string[], now: number): Lease | null {
    for (let i = hashes.length - 1; i >= 0; i--) {
      const hash = hashes[i] as string;
      const e = this.map.get(hash);
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
    for (const [h, e] of this.map) if (e.node === node) this.map.delete(h);
  }

  /** Leases held (expired ones included until met). */
  get size(): number {
    return this.map.size;
  }
}
