// Assets bundled into a compiled executable: the native library is copied out
// to a versioned cache directory (dlopen cannot read the executable's embedded
// files), vocab files are read in place.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { cacheDir } from "../dirs";
import { nativeLibName, setEmbeddedBackends, setEmbeddedNativeLib, setEngineWorkerUrl } from "../engine/library";
import { setEmbeddedVocab } from "../gguf/models";

/**
 * Register embedded assets; extracts the native library and any GPU backend
 * libraries on first run, side by side in one content-addressed directory (so
 * versions never clash and a backend's $ORIGIN lookups stay inside it).
 */
export async function installEmbedded(
  libPath: string,
  vocabs: Record<string, string>,
  workerUrl: string,
  backends: string[] = [],
): Promise<void> {
  setEngineWorkerUrl(workerUrl);
  const bytes = readFileSync(libPath);
  const hash = createHash("sha256").update(bytes);
  // Backends are large (the CUDA one is 150 MiB): hash their names and sizes, not their bytes, on every start.
  for (const b of backends) hash.update(`${basename(b)}:${Bun.file(b).size}`);
  const dir = join(cacheDir(), "native", hash.digest("hex").slice(0, 16));
  extract(bytes, join(dir, nativeLibName()));
  const extracted: string[] = [];
  for (const b of backends) {
    const target = join(dir, basename(b).replace(/-[0-9a-z]{8,}(\.so)$/, "$1"));
    if (!existsSync(target)) extract(readFileSync(b), target);
    extracted.push(target);
  }
  setEmbeddedNativeLib(join(dir, nativeLibName()));
  setEmbeddedBackends(extracted);
  for (const [name, path] of Object.entries(vocabs)) setEmbeddedVocab(name, path);
}

/** Write bytes to target once, atomically (a concurrent first run of another process sees all or nothing). */
function extract(bytes: Uint8Array, target: string): void {
  if (existsSync(target)) return;
  mkdirSync(join(target, ".."), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}`;
  writeFileSync(tmp, bytes, { mode: 0o755 });
  renameSync(tmp, target);
}
