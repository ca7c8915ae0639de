// The arithmetic of benchmark reports: percentiles, safe ratios, and a time
// series that keeps its whole span in bounded memory.

/** The p-th percentile (0..100) by linear interpolation between closest ranks; null for an empty list. */
export function percentile(xs: readonly number[], p: number): number | null {
  if (xs.length === 0) return null;
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile must be within 0..100, got ${p}`);
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p / 100) * (s.length - 1);
  const lo = Math.floor(rank);
  const hi = Math.ceil(rank);
  const a = s[lo] as number;
  const b = s[hi] as number;
  return a + (b - a) * (rank - lo);
}

/** a / b, or null when b is 0 (a ratio of nothing is unknown, not zero or infinite). */
export function ratio(a: number, b: number): number | null {
  return b === 0 ? null : a / b;
}

/** Median of a non-empty list (mean of the middle two for even lengths). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

/** Median over repeats of the per-repeat ratio (> 1 = mesh better); null without a pair. */
export function pairedRatio(mesh: number[], llama: number[], higherIsBetter: boolean): number | null {
  const rs: number[] = [];
  for (let i = 0; i < Math.min(mesh.length, llama.length); i++) {
    const m = mesh[i] as number;
    const l = llama[i] as number;
    const r = higherIsBetter ? m / l : l / m;
    if (Number.isFinite(r)) rs.push(r);
  }
  return rs.length === 0 ? null : median(rs);
}

/** p50 and p95 of a list, with its size. */
export interface Spread {
  n: number;
  p50: number | null;
  p95: number | null;
}

/** p50/p95 of a list of values. */
export function spread(xs: readonly number[]): Spread {
  return { n: xs.length, p50: percentile(xs, 50), p95: percentile(xs, 95) };
}

/**
 * Points appended in time order, never more than `cap`: when full, every
 * other point is dropped and only every `stride`-th new point is kept, so the
 * series still covers the whole run at a coarser resolution.
 */
export class BoundedSeries<T> {
  private points: T[] = [];
  private stride = 1;
  private sinceKept = 0;

  constructor(readonly cap: number) {
    if (!Number.isInteger(cap) || cap < 2) throw new RangeError(`cap must be an integer >= 2, got ${cap}`);
  }

  /** Offer a point; it is kept or skipped according to the current stride. */
  push(p: T): void {
    if (++this.sinceKept < this.stride) return;
    this.sinceKept = 0;
    if (this.points.length >= this.cap) {
      this.points = this.points.filter((_, i) => i % 2 === 0);
      this.stride *= 2;
    }
    this.points.push(p);
  }

  /** The kept points, oldest first. */
  values(): T[] {
    return [...this.points];
  }

  /** Number of kept points. */
  get length(): number {
    return this.points.length;
  }
}
