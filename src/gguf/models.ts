import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { cacheDir } from "../dirs";
import { REPO_ROOT } from "../engine/library";
import { BENCH, generateModel, type ModelSpec, TINY } from "./generate";

/** Which real tokenizer each generated model borrows (vocab-only GGUFs from the llama.cpp source). */
const VOCAB: Record<string, string> = { [TINY.name]: "phi-3", [BENCH.name]: "llama-spm" };

const embeddedVocab = new Map<string, string>();

/** Register a vocab file bundled into a compiled executable. */
export function setEmbeddedVocab(name: string, path: string): void {
  embeddedVocab.set(name, path);
}

/** Path of a vocab-only GGUF by short name (e.g. "phi-3"), or null when it is not available. */
export function vocabPath(name: string): string | null {
  const embedded = embeddedVocab.get(name);
  if (embedded) return embedded;
  const p = join(REPO_ROOT, "vendor", "llama.cpp", "src", "models", `ggml-vocab-${name}.gguf`);
  return existsSync(p) ? p : null;
}

/** Generated models, by the name used on the command line. */
export const GENERATED_MODELS: Record<string, ModelSpec> = { tiny: TINY, bench: BENCH };

/** Path of a generated model, generating it on first use (deterministic, so a cached file is reused). */
export async function ensureModel(spec: ModelSpec, dir = join(cacheDir(), "models")): Promise<string> {
  // Bump the folder version when the generator changes what it writes; the
  // file name stays the model's id.
  const path = join(dir, "v2", `${spec.name}.gguf`);
  if (existsSync(path)) return path;
  const vocabName = VOCAB[spec.name];
  const vocab = vocabName ? vocabPath(vocabName) : null;
  if (!vocab) throw new Error(`the ${vocabName} vocabulary is not available: run 'bun run build.ts native' to fetch the llama.cpp source`);
  mkdirSync(join(dir, "v2"), { recursive: true });
  await generateModel(spec, vocab, path);
  return path;
}
