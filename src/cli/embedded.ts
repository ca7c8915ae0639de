// Assets bundled into a compiled executable: the native library is copied out
// to a versioned cache directory (dlopen cannot read the executable's embedded
// files), vocab files are read in place.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { cacheDir } from "../dirs";
import { nativeLibName, setEmbeddedNativeLib, setEngineWorkerUrl } from "../engine/library";
import { setEmbeddedVocab } from "../gguf/models";

/** Register embedded assets; extracts the native library on first run (content-addressed, so versions never clash). */
export async function installEmbedded(libPath: string, vocabs: Record<string, string>, workerUrl: string): Promise<void> {
  setEngineWorkerUrl(workerUrl);
  const bytes = readFileSync(libPath);
  const digest = createHash("sha256").update(bytes).digest("hex").slice(0, 16);
  const dir = join(cacheDir(), "native", digest);
  const target = join(dir, nativeLibName());
  if (!existsSync(target)) {
    mkdirSync(dir, { recursive: true });
    const tmp = `${target}.tmp-${process.pid}`;
    writeFileSync(tmp, bytes, { mode: 0o755 });
    renameSync(tmp, target);
  }
  setEmbeddedNativeLib(target);
  for (const [name, path] of Object.entries(vocabs)) setEmbeddedVocab(name, path);
}
