// Which decodes use the plain attention path instead of flash attention.
//
// On CPU, ggml's flash-attention kernel for a ubatch of fewer than 64 queries
// walks the cache one key at a time per query row; for an agent's next turn
// (a short suffix over a long cached prefix) that is most of the step. The
// plain path does the same attention as two matrix products, at the price of a
// transposed copy of V per layer and of a KQ matrix per step. Measured through
// the shim on the bench model (docs/benchmarks.md, "plain attention"): it loses
// below about 8-12 new tokens (one key pass beats the copy), wins from 12 to
// 63 (1.07-2.2x, more the longer the prefix), and from 64 the tiled flash
// kernel is the faster one again.

import { kvBytesPerToken } from "./kv";

/** Inclusive range of batch sizes (tokens per decode) that take the plain path. */
export interface PlainAttn {
  min: number;
  max: number;
}

/** The default window: where the plain path won at every prefix measured (2k, 8k, 16k). */
export const DEFAULT_PLAIN_ATTN: PlainAttn = { min: 12, max: 63 };

/** ggml's CPU flash attention switches to its tiled kernel at this many queries. */
export const FLASH_TILE_QUERIES = 64;

/** Extra compute memory the plain path may take, at least (bytes). */
export const PLAIN_ATTN_MIN_BUDGET = 32 * 1024 * 1024;

/**
 * Architectures whose graph does more than pick the kernel by the flash-attention flag. MiniMax-M3
 * (pinned llama.cpp, models/minimax-m3.cpp) runs its sparse MSA attention only with flash on and
 * stores each token's index key only then: a plain decode would fall back to dense attention and
 * leave those tokens' index keys unwritten for every later sparse decode to select blocks with.
 */
export const PLAIN_ATTN_EXCLUDED_ARCHITECTURES: ReadonlySet<string> = new Set(["minimax-m3"]);

/** What decides the window for one context. */
export interface PlainAttnContext {
  nCtx: number;
  nLayer: number;
  nEmbd: number;
  nHead: number;
  nHeadKv: number;
  /** Every layer and the KV cache on the CPU (no GPU layers, no split over stage servers). */
  cpuOnly: boolean;
  /** general.architecture; absent: not known to need flash attention. */
  architecture?: string;
}

/**
 * The window a context applies, or null when the plain path is not used: off,
 * not a CPU-only context, an architecture that needs flash attention, or no room. The KQ matrix (and its softmax) of a
 * plain step take tokens x cells x heads x 8 bytes at most; that is held to
 * half the KV cache's own size (at least PLAIN_ATTN_MIN_BUDGET), which caps
 * the window's top.
 */
export function plainAttnWindow(want: PlainAttn | null, c: PlainAttnContext): PlainAttn | null {
  if (!want || !c.cpuOnly || c.nCtx <= 0 || c.nHead <= 0) return null;
  if (c.architecture !== undefined && PLAIN_ATTN_EXCLUDED_ARCHITECTURES.has(c.architecture)) return null;
  const kvBytes = c.nCtx * kvBytesPerToken(c);
  const budget = Math.max(PLAIN_ATTN_MIN_BUDGET, kvBytes / 2);
  const fits = Math.floor(budget / (c.nCtx * c.nHead * 8));
  const max = Math.min(want.max, FLASH_TILE_QUERIES - 1, fits);
  const min = Math.max(1, want.min);
  return min <= max ? { min, max } : null;
}

/** Parse a --plain-attn value: "MIN:MAX" or "off"; a string names what is wrong. */
export function parsePlainAttn(v: string): PlainAttn | null | string {
  if (v === "off") return null;
  const m = /^(\d+):(\d+)$/.exec(v);
  if (!m) return `expected MIN:MAX (e.g. ${DEFAULT_PLAIN_ATTN.min}:${DEFAULT_PLAIN_ATTN.max}) or off, got '${v}'`;
  const min = Number(m[1]);
  const max = Number(m[2]);
  if (min < 1 || max < min) return `MIN must be at least 1 and MAX at least MIN, got '${v}'`;
  if (max >= FLASH_TILE_QUERIES)
    return `MAX must be below ${FLASH_TILE_QUERIES} (from there flash attention's tiled kernel is faster), got '${v}'`;
  return { min, max };
}
