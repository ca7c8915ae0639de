// KV accounting for one unified pool: how many cells running sequences hold,
// how many idle resident prefixes hold, how many are promised to running
// requests (their reservation not yet used), and which resident prefixes to
// trim when something must fit. Pure arithmetic: the scheduler applies plans.
//
// Invariant the scheduler keeps: used + reserved <= total, where `reserved`
// is what running requests may still grow by. Admission is the only way to
// add a reservation, and it only admits when the invariant survives, so a
// decode step within reservations never runs out of cells.

/** One slot's view for accounting. */
export interface SlotUsage {
  seq: number;
  /** Cells this sequence holds in the KV. */
  cells: number;
  /** True while a request runs on it: never evicted. */
  running: boolean;
  /** Cells the running request may still add (reservation minus cells); 0 when idle. */
  reserved: number;
  /** Logical time of last use; lower is colder. */
  lastUsed: number;
}

/** Cells by state, for /metrics and routing. */
export interface KvUsage {
  total: number;
  running: number;
  resident: number;
  reserved: number;
  /** Neither held nor promised. */
  free: number;
}

/** Sum the pool's cells by state. */
export function kvUsage(total: number, slots: readonly SlotUsage[]): KvUsage {
  let running = 0;
  let resident = 0;
  let reserved = 0;
  for (const s of slots) {
    if (s.running) {
      running += s.cells;
      reserved += s.reserved;
    } else resident += s.cells;
  }
  return { total, running, resident, reserved, free: Math.max(0, total - running - resident - reserved) };
}

/** Trim one idle sequence down to `keep` cells. */
export interface Eviction {
  seq: number;
  keep: number;
  /** Cells this trim frees. */
  cells: number;
}

/** The outcome of planning room for `need` cells. */
export type EvictionPlan =
  | { fits: true; evictions: Eviction[]; cells: number }
  /** Even evicting every idle resident prefix would not make room: evict nothing. */
  | { fits: false; shortBy: number };

/**
 * Plan to free room for `need` cells: coldest idle resident prefixes first,
 * trimming each from its tail (its head is the part most likely shared with a
 * future prompt), never a running sequence, never a slot in `protect`, and
 * never more cells than the shortfall.
 */
export function planEviction(
  total: number,
  slots: readonly SlotUsage[],
  need: number,
  protect: ReadonlySet<number> = new Set(),
): EvictionPlan {
  const shortfall = need - kvUsage(total, slots).free;
  if (shortfall <= 0) return { fits: true, evictions: [], cells: 0 };
  const candidates = slots.filter((s) => !s.running && s.cells > 0 && !protect.has(s.seq)).sort((a, b) => a.lastUsed - b.lastUsed);
  let evictable = 0;
  for (const s of candidates) evictable += s.cells;
  if (evictable < shortfall) return { fits: false, shortBy: shortfall - evictable };
  const evictions: Eviction[] = [];
  let left = shortfall;
  for (const s of candidates) {
    if (left <= 0) break;
    const cells = Math.min(s.cells, left);
    evictions.push({ seq: s.seq, keep: s.cells - cells, cells });
    left -= cells;
  }
  return { fits: true, evictions, cells: shortfall };
}

/**
 * Cells a request reserves in total (its cached prefix included): the whole
 * prompt plus its output allowance, capped by what one sequence can hold.
 */
export function reservation(promptTokens: number, outputTokens: number, seqCapacity: number): number {
  return Math.min(promptTokens + Math.max(1, outputTokens), seqCapacity);
}

/** F16 K and V of every layer for one token: what a sequence's KV (and its saved state) costs per token. */
export function kvBytesPerToken(m: { nLayer: number; nEmbd: number; nHead: number; nHeadKv: number }): number {
  if (m.nHead <= 0) return 0;
  return m.nLayer * 2 * m.nHeadKv * Math.floor(m.nEmbd / m.nHead) * 2;
}
