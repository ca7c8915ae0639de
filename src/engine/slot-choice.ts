// Which idle slot a waiting prompt takes: a pure decision over the slots'
// token histories and the best saved sequence in host RAM, so it can be
// tested without llama.cpp. The scheduler carries it out (saves, trims,
// restores, KV budget).

/**
 * Fewer cached tokens than this are not reused: prefilling them costs nothing
 * measurable, while keeping them would pin the new prompt's cells behind
 * them instead of at the start of an empty pool.
 */
export const MIN_REUSE_TOKENS = 16;
/** A saved sequence is restored only when it serves at least this many more prompt tokens than the best resident slot. */
export const RESTORE_MIN_GAIN = 32;

/** An idle slot as the choice sees it. */
export interface IdleSlot {
  /** Tokens in its KV, in position order. */
  history: readonly number[];
  /** Logical time of last use; lower is colder. */
  lastUsed: number;
}

/** Where a waiting prompt goes. */
export interface SlotChoice<S extends IdleSlot> {
  /** The slot whose resident prefix the prompt reuses (or, with keep 0, the one it takes without reuse). */
  reuse: S;
  /** Tokens of `reuse`'s history kept: its common prefix with the prompt, 0 when too short to be worth keeping. */
  keep: number;
  /** When the saved sequence serves clearly more: the idle slot to restore it into; else null. */
  restoreInto: S | null;
}

/** Length of the common prefix of two token arrays. */
export function commonPrefix(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** The idle slot holding the fewest cells, the least recently used among equals. */
export function emptiest<S extends IdleSlot>(free: readonly S[]): S {
  return free.reduce((a, b) =>
    b.history.length < a.history.length || (b.history.length === a.history.length && b.lastUsed < a.lastUsed) ? b : a,
  );
}

/**
 * Choose for `prompt` among `free` (non-empty) idle slots: the slot sharing the longest prefix
 * (then the coldest); with nothing worth reusing, the emptiest (then the coldest) instead of
 * wiping a conversation a later turn may continue. `savedLcp` is the longest prefix the host
 * tier's best entry shares with the prompt (null: none, or the tier is off); it is restored,
 * into the emptiest slot (the least to save first), when it beats the reuse by RESTORE_MIN_GAIN.
 */
export function chooseSlot<S extends IdleSlot>(free: readonly S[], prompt: readonly number[], savedLcp: number | null): SlotChoice<S> {
  let reuse = free[0] as S;
  let lcp = -1;
  for (const s of free) {
    const l = commonPrefix(s.history, prompt);
    if (l > lcp || (l === lcp && s.lastUsed < reuse.lastUsed)) {
      reuse = s;
      lcp = l;
    }
  }
  // At least one prompt token must be decoded to get logits to sample from.
  let keep = Math.min(lcp, prompt.length - 1);
  if (keep < MIN_REUSE_TOKENS) {
    keep = 0;
    reuse = emptiest(free);
  }
  // Compared with the reuse the slot really gives (0 under MIN_REUSE_TOKENS), not its raw match.
  const restoreInto = savedLcp !== null && savedLcp >= keep + RESTORE_MIN_GAIN ? emptiest(free) : null;
  return { reuse, keep, restoreInto };
}
