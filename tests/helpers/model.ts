import { QUEUE_DEFAULTS } from "../../src/engine/index";
import type { LoadOptions } from "../../src/engine/protocol";
import { TINY } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";

/** Path of the tiny random-weight test model (generated once into the cache dir). */
export function tinyModel(): Promise<string> {
  return ensureModel(TINY);
}

/** Load options for the tiny model on the CPU, 2 threads, tests' own queue; `o` overrides any of them. */
export async function tinyLoadOptions(o: Partial<LoadOptions> = {}): Promise<LoadOptions> {
  return {
    modelPath: await tinyModel(),
    nCtx: 4096,
    nBatch: 512,
    nUbatch: 512,
    nParallel: 2,
    threads: 2,
    threadsBatch: 2,
    nGpuLayers: 0,
    flashAttn: -1,
    useMmap: true,
    backendLibs: [],
    modelShape: null,
    queueCapacity: QUEUE_DEFAULTS.capacity,
    queueTimeoutMs: QUEUE_DEFAULTS.timeoutMs,
    kvBudget: true,
    hostCacheMiB: 0,
    ...o,
  };
}
