// A completeness vector (owner -> HLC watermark) with an order-independent
// digest kept up to date entry by entry: XOR of each row's 128-bit hash. Two
// replicas compare whole vectors by one short string, and a change costs one
// hash. It detects lost updates between honest peers; it is not a MAC.
import type { Hlc } from "./hlc";
import type { NodeId } from "./wire";

const MASK = (1n << 64n) - 1n;

function rowHash(owner: NodeId, h: Hlc): [bigint, bigint] {
  const row = `${owner}:${h.w}:${h.l}`;
  return [BigInt(Bun.hash.wyhash(row, 1n)) & MASK, BigInt(Bun.hash.wyhash(row, 2n)) & MASK];
}

function show(a: bigint, b: bigint): string {
  return `${a.toString(16).padStart(16, "0")}${b.toString(16).padStart(16, "0")}`;
}

/** Digest of any vector, e.g. `vectorDigest(kv.vector())`; equal to `Vector.digest` of the same entries. */
export function vectorDigest(vec: ReadonlyMap<NodeId, Hlc>): string {
  let a = 0n;
  let b = 0n;
  for (const [o, h] of vec) {
    const [x, y] = rowHash(o, h);
    a ^= x;
    b ^= y;
  }
  return show(a, b);
}

/** A vector that keeps its digest current. */
export class Vector {
  private readonly rows = new Map<NodeId, Hlc>();
  private a = 0n;
  private b = 0n;

  /** The watermark of `owner`. */
  get(owner: NodeId): Hlc | undefined {
    return this.rows.get(owner);
  }

  /** Set `owner`'s watermark. */
  set(owner: NodeId, h: Hlc): void {
    this.delete(owner);
    this.rows.set(owner, h);
    const [x, y] = rowHash(owner, h);
    this.a ^= x;
    this.b ^= y;
  }

  /** Remove `owner`. */
  delete(owner: NodeId): void {
    const old = this.rows.get(owner);
    if (!old) return;
    this.rows.delete(owner);
    const [x, y] = rowHash(owner, old);
    this.a ^= x;
    this.b ^= y;
  }

  /** Remove everything. */
  clear(): void {
    this.rows.clear();
    this.a = 0n;
    this.b = 0n;
  }

  /** Digest of the current entries. */
  digest(): string {
    return show(this.a, this.b);
  }
}
