import { existsSync } from "node:fs";
import { join, resolve } from "node:path";

/** File name of the native library on this platform. */
export function nativeLibName(): string {
  return process.platform === "darwin" ? "libmeshllama.dylib" : process.platform === "win32" ? "meshllama.dll" : "libmeshllama.so";
}

/** The repository root (where vendor/ lives) when running from source. */
export const REPO_ROOT = resolve(import.meta.dir, "..", "..");

/** Where build.ts puts each native variant. */
export function nativeBuildDir(variant: string): string {
  return join(REPO_ROOT, "vendor", "llama.cpp", "build", variant);
}

let embedded: string | null = null;

/** Register the path of a native library bundled into a compiled executable (set by the entry point). */
export function setEmbeddedNativeLib(path: string): void {
  embedded = path;
}

/** Find the native library: MESH_NATIVE_LIB, the one embedded in the executable, else a local build (a GPU build before the CPU one). */
export function findNativeLib(buildDir: (variant: string) => string = nativeBuildDir): string | null {
  const env = process.env.MESH_NATIVE_LIB;
  if (env) return existsSync(env) ? env : null;
  if (embedded) return embedded;
  // `npm start` and `npm test` always (re)build the CPU variant, so a GPU
  // build made with --cuda (or Metal on macOS) must win the search.
  for (const variant of ["cuda", "metal", "cpu"]) {
    const p = join(buildDir(variant), nativeLibName());
    if (existsSync(p)) return p;
  }
  return null;
}

let embeddedBackends: string[] = [];

/** Register the GPU backend libraries bundled into a compiled executable (extracted beside the native library). */
export function setEmbeddedBackends(paths: string[]): void {
  embeddedBackends = [...paths];
}

/**
 * GPU backend libraries (prebuilt libggml-<name>.so) to load into ggml's registry:
 * MESH_BACKEND_LIBS (colon-separated paths) when set, else those embedded in
 * the executable, else none (a source build links its backends in).
 */
export function findBackendLibs(): string[] {
  const env = process.env.MESH_BACKEND_LIBS;
  if (env !== undefined) return env.split(":").filter((p) => p !== "");
  return embeddedBackends;
}

let workerUrl: string | null = null;

/** Where the engine Worker's code is; a compiled executable sets it to its bundled copy. */
export function setEngineWorkerUrl(url: string): void {
  workerUrl = url;
}

/** The engine Worker's URL: the override, else the source file next to the engine. */
export function engineWorkerUrl(): string {
  return workerUrl ?? new URL("./worker.ts", import.meta.url).href;
}
