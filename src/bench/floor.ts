// The floor of a cached-prefix request: the prefix decoded once into an
// empty context, then, repeat by repeat, one decode of the suffix over it and
// one greedy sampling through the shim alone (no scheduler, Worker, HTTP).
// Whatever a server adds on top of this is its own cost. Runs on the calling
// thread and blocks it for the whole measurement: call it only from a bench
// process before anything else is served.
import type { Pointer } from "bun:ffi";
import type { AttnKernel, PlainAttn } from "../engine/attention";
import { findNativeLib } from "../engine/library";
import { closeModel, type OpenedModel, openModel } from "../engine/open";
import type { LoadOptions } from "../engine/protocol";
import { type Cell, cellKey } from "./cached-prefix";
import { median } from "./stats";

/** How the floor's context is made: the same settings the compared targets use. */
export interface FloorOptions {
  modelPath: string;
  ctx: number;
  parallel: number;
  batch: number;
  ubatch: number;
  threads: number;
  flashAttn: -1 | 0 | 1;
  /** mesh's plain-attention window, so the floor decodes with the kernels mesh uses. */
  plainAttn?: PlainAttn | null;
  /** mesh's CPU flash-attention kernel, as the engine runs it. */
  attnKernel: AttnKernel;
  repeats: number;
}

/** Token ids of a deterministic filler prompt (ids 200..20199, inside any real vocabulary). */
export function filler(seed: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => 200 + ((seed * 7919 + i * 104729) % 20000));
}

/**
 * A decoder of token ids into sequence 0 from position `at`, in chunks of `batch` tokens (the
 * context splits them into ubatches), logits for the last token only. It returns the batch index
 * of that token in the last chunk; a failed decode throws, named by `label`.
 */
export function chunkedDecoder(
  batch: number,
): (m: Pick<OpenedModel, "native" | "ctx">, ids: number[], at: number, label: string) => number {
  const tokens = new Int32Array(batch);
  const pos = new Int32Array(batch);
  const seq = new Int32Array(batch);
  const logits = new Int8Array(batch);
  return (m, ids, at, label) => {
    let last = 0;
    for (let off = 0; off < ids.length; off += batch) {
      const k = Math.min(batch, ids.length - off);
      for (let i = 0; i < k; i++) {
        tokens[i] = ids[off + i] as number;
        pos[i] = at + off + i;
        seq[i] = 0;
        logits[i] = off + i === ids.length - 1 ? 1 : 0;
      }
      const rc = m.native.mesh_decode(m.ctx, tokens, pos, seq, logits, k);
      if (rc !== 0) throw new Error(`${label}: llama_decode failed (${rc})`);
      last = k - 1;
    }
    return last;
  };
}

/** Median milliseconds of suffix decode + greedy sample over a resident prefix, by cell key. */
export function measureFloor(o: FloorOptions, cells: readonly Cell[], log: (s: string) => void): Map<string, number> {
  const lib = findNativeLib();
  if (!lib) throw new Error("the native library is not built: run 'bun run build.ts native'");
  const load: LoadOptions = {
    modelPath: o.modelPath,
    nCtx: o.ctx,
    nBatch: o.batch,
    nUbatch: o.ubatch,
    nParallel: o.parallel,
    threads: o.threads,
    threadsBatch: o.threads,
    nGpuLayers: 0,
    flashAttn: o.flashAttn,
    plainAttn: o.plainAttn,
    attnKernel: o.attnKernel,
    useMmap: true,
    backendLibs: [],
    modelShape: null,
    queueCapacity: 1,
    queueTimeoutMs: 1000,
    kvBudget: true,
    hostCacheMiB: 0,
  };
  // The shim keeps a pointer to the abort flag for the context's life: this array must outlive it.
  const control = new Int32Array(2);
  const m = openModel(lib, load, new Float32Array(1), control, 0);
  if (!("ctx" in m)) throw new Error(`floor: ${m.message}`);
  const { native: n, ctx } = m;
  const decode = chunkedDecoder(o.batch);
  const sampler = n.mesh_sampler_new(m.model, new Float32Array([0, 1, 0, 1, 0, 0]), new Int32Array([40, 0, 0]), null) as Pointer | null;
  if (!sampler) throw new Error("floor: could not build a sampler");
  const samplers = new BigUint64Array([BigInt(sampler as unknown as number)]);
  const picked = new Int32Array(1);
  const out = new Map<string, number>();
  try {
    for (const size of [...new Set(cells.map((c) => c.prefix))]) {
      n.mesh_memory_clear(ctx, 1);
      decode(m, filler(1, size), 0, "floor");
      for (const c of cells.filter((x) => x.prefix === size)) {
        const times: number[] = [];
        for (let r = 0; r < o.repeats; r++) {
          const suffix = filler(100 + r, c.suffix);
          const t0 = performance.now();
          const idx = decode(m, suffix, size, "floor");
          n.mesh_sample_many(ctx, samplers, new Int32Array([idx]), new Int32Array([-1]), picked, new Int32Array(1), new Float32Array(1), 1);
          times.push(performance.now() - t0);
          n.mesh_seq_rm(ctx, 0, size, -1);
        }
        out.set(cellKey(c), median(times));
        log(`floor: ${cellKey(c)}: ${median(times).toFixed(1)} ms (${times.map((t) => t.toFixed(1)).join(", ")})`);
      }
    }
  } finally {
    n.mesh_sampler_free(sampler);
    closeModel(m);
    control.fill(0);
  }
  return out;
}
