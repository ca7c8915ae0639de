// Which kernel computes a decode's attention on the CPU.
//
// mesh's own flash-attention kernel (vendor/llama.cpp/shim/mesh_fa.cpp, linked
// in front of ggml's) takes every ubatch of at least two queries of one
// sequence: it widens each K/V tile once per KV head instead of once per query
// head and runs the softmax down vector columns. Measured through the shim on
// the bench model (docs/benchmarks.md, "mesh's attention kernel"): 1.4x
// ggml's kernel at 2048 + 256 and 1.75x at 8192 + 256, 2-3.4x for 4-63 new
// tokens, and faster than the plain path below at every size; a single query
// (one stream's next token) stays with ggml's kernel, which splits the cache
// over the threads.
//
// The plain path (below) is what runs where mesh's kernel is not built (no
// --wrap in the platform's linker) or is turned off:
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

/** Which CPU flash-attention kernel runs: mesh's, or ggml's own. */
export type AttnKernel = "mesh" | "ggml";

/** The kernel a context runs unless told otherwise. */
export const DEFAULT_ATTN_KERNEL: AttnKernel = "mesh";

/** mesh's kernel takes ubatches of at least this many queries; one query goes to ggml's. */
export const MESH_FA_MIN_QUERIES = 2;

/** Parse an --attn-kernel value; a string names what is wrong. */
export function parseAttnKernel(v: string): AttnKernel | { error: string } {
  if (v === "mesh" || v === "ggml") return v;
  return { error: `expected mesh or ggml, got '${v}'` };
}

/** Inclusive range of batch sizes (tokens per decode) that take the plain path. */
export interface PlainAttn {
  min: number;
  max: number;
}

/** A load's attention as its serve log line states it: the kernel that runs, the plain window, flash on or off, and why. */
export function describeAttention(info: { flashAttn: boolean; attnKernel: AttnKernel; plainAttn: PlainAttn | null }): {
  kernel: AttnKernel | "none";
  plain_for_tokens: string;
  flash: "on" | "off";
  note: string;
} {
  if (!info.flashAttn) {
    // llama.cpp's "auto" turned flash attention off for this model (its kernels cannot run it):
    // the kernel setting has nothing to pick between and the plain window nothing to switch from.
    return {
      kernel: "none",
      plain_for_tokens: "none",
      flash: "off",
      note: "flash attention is off for this model (llama.cpp's auto): matrix-product attention for every decode; --attn-kernel and --plain-attn do not apply",
    };
  }
  const plain = info.plainAttn;
  return {
    kernel: info.attnKernel,
    plain_for_tokens: plain ? `${plain.min}-${plain.max}` : "none",
    flash: "on",
    note: plain
      ? "decodes of this many new tokens use matrix-product attention, the rest flash attention"
      : info.attnKernel === "mesh"
        ? "CPU flash attention: mesh's kernel for one sequence's batch of 2+ tokens, ggml's for the rest"
        : "CPU flash attention: ggml's kernel for every decode",
  };
}

/** The default window where ggml's kernel runs: where the plain path beat it at every prefix measured (2k, 8k, 16k). */
export const DEFAULT_PLAIN_ATTN: PlainAttn = { min: 12, max: 63 };

/** The window a context takes when none was asked for: none beside mesh's kernel (faster at every size), else the default. */
export function defaultPlainAttn(kernel: AttnKernel): PlainAttn | null {
  return kernel === "mesh" ? null : DEFAULT_PLAIN_ATTN;
}

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
