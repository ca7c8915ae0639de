// Whether to compact the KV pool before a request that reuses a resident
// prefix: a pure decision, testable without llama.cpp. In llama.cpp's unified
// KV pool every ubatch attends over all cells up to the highest one in use
// (padded to 256), so a prefix whose cells sit high in the pool, above holes
// that earlier conversations left, makes every token of the request attend
// over cells it does not use. Compacting copies the prefix's saved state back
// into an empty pool from cell 0: one copy of the prefix against that waste.

/** llama.cpp pads the attention window (n_kv) to a multiple of this many cells. */
export const KV_PAD = 256;

const pad = (cells: number) => Math.ceil(cells / KV_PAD) * KV_PAD;

/** What the decision needs to know about the pool and the request. */
export interface CompactionInput {
  /** Upper bound of the highest cell in use + 1 (cells placed since the pool was last emptied). */
  placed: number;
  /** Cells of the reused prefix, the only ones resident. */
  keep: number;
  /** Tokens the request will still decode: the rest of its prompt plus its expected output. */
  newTokens: number;
}

/**
 * True when compacting saves at least one padded block of attention window and the attention it
 * saves (wasted cells times the tokens that attend over them) is at least the cells copied.
 * Example: placed 4608, keep 2048, 16 + 16 new tokens: window 4864 against 2304, 2560 x 32 >= 2048: true.
 */
export function shouldCompact(o: CompactionInput): boolean {
  if (o.keep <= 0 || o.newTokens <= 0) return false;
  const excess = pad(o.placed + o.newTokens) - pad(o.keep + o.newTokens);
  if (excess < KV_PAD) return false;
  return excess * o.newTokens >= o.keep;
}
