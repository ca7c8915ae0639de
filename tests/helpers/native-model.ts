// The tiny model opened on the test's own thread through the real library, for tests that drive
// the scheduler or the decode calls directly rather than through the engine Worker.
import { findNativeLib } from "../../src/engine/library";
import { type OpenedModel, openModel } from "../../src/engine/open";
import { DEFAULT_SAMPLING, type GenerateRequest, type LoadOptions } from "../../src/engine/protocol";

/** Open the model `options` names, with `control` as the cancel flags; throws the library's message. */
export function openTinyModel(options: LoadOptions, control: Int32Array): OpenedModel {
  const m = openModel(findNativeLib() as string, options, new Float32Array(1), control, 0);
  if (!("ctx" in m)) throw new Error(m.message);
  return m;
}

/** A greedy request for exactly `maxTokens` tokens that reserves room for them. */
export function greedyRequest(prompt: number[], maxTokens: number): GenerateRequest {
  return { prompt, maxTokens, reserveOutput: maxTokens, sampling: { ...DEFAULT_SAMPLING, temperature: 0 }, stop: [], ignoreEos: true };
}

/** `length` plain token ids, the same for the same seed, none below `base` (clear of special tokens). */
export function tokenIds(seed: number, length: number, base = 200): number[] {
  return Array.from({ length }, (_, i) => base + ((seed * 7919 + i * 104729) % 20000));
}
