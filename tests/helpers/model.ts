import { TINY } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";

/** Path of the tiny random-weight test model (generated once into the cache dir). */
export function tinyModel(): Promise<string> {
  return ensureModel(TINY);
}
