// Hybrid logical clock: physical milliseconds plus a logical counter, with
// the node id as the final tie-break, so every write in the mesh has one
// total order that follows causality even when wall clocks disagree a little.
import type { NodeId } from "./wire";

/** One timestamp: wall ms, logical counter, and the node that issued it. */
export interface Hlc {
  w: number;
  l: number;
  n: NodeId;
}

/** The timestamp before every other. */
export const HLC_ZERO: Hlc = { w: 0, l: 0, n: "" };

/** Orders two timestamps: negative if a < b, 0 if equal, positive if a > b. */
export function compareHlc(a: Hlc, b: Hlc): number {
  if (a.w !== b.w) return a.w - b.w;
  if (a.l !== b.l) return a.l - b.l;
  return a.n < b.n ? -1 : a.n > b.n ? 1 : 0;
}

/** Whether `v` is a well-formed timestamp (non-negative safe integers and a string node). */
export function isHlc(v: unknown): v is Hlc {
  if (typeof v !== "object" || v === null) return false;
  const h = v as Record<string, unknown>;
  return (
    Number.isSafeInteger(h.w) &&
    (h.w as number) >= 0 &&
    Number.isSafeInteger(h.l) &&
    (h.l as number) >= 0 &&
    typeof h.n === "string" &&
    h.n.length <= 64
  );
}

/** The clock of one node. */
export class HlcClock {
  private last: Hlc;

  constructor(
    private readonly node: NodeId,
    private readonly physical: () => number,
    /** How far ahead of our wall clock a remote timestamp may be before it is refused. */
    readonly maxDriftMs = 60_000,
  ) {
    this.last = { w: 0, l: 0, n: node };
  }

  /** A new timestamp after every one issued or observed so far. */
  tick(): Hlc {
    const pt = Math.floor(this.physical());
    this.last = pt > this.last.w ? { w: pt, l: 0, n: this.node } : { w: this.last.w, l: this.last.l + 1, n: this.node };
    return this.last;
  }

  /** Moves the clock past `remote` so later ticks order after it; false (and no change) if it is too far in the future. */
  observe(remote: Hlc): boolean {
    if (remote.w > Math.floor(this.physical()) + this.maxDriftMs) return false;
    if (remote.w > this.last.w || (remote.w === this.last.w && remote.l > this.last.l)) {
      this.last = { w: remote.w, l: remote.l, n: this.node };
    }
    return true;
  }
}
