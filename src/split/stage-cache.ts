// The stage server's tensor cache (ggml RPC's cache_dir: weights a head sent
// once, by hash, so a reload does not send them again) kept within a budget:
// the least recently written files go first.
import { readdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";

/** Delete the oldest files of dir until it holds at most maxBytes; returns what was removed. */
export function pruneCache(dir: string, maxBytes: number): { files: number; bytes: number } {
  let entries: Array<{ path: string; size: number; mtime: number }>;
  try {
    entries = readdirSync(dir).flatMap((name) => {
      const path = join(dir, name);
      try {
        const s = statSync(path);
        return s.isFile() ? [{ path, size: s.size, mtime: s.mtimeMs }] : [];
      } catch {
        return []; // removed meanwhile
      }
    });
  } catch {
    return { files: 0, bytes: 0 };
  }
  let total = entries.reduce((a, e) => a + e.size, 0);
  const removed = { files: 0, bytes: 0 };
  entries.sort((a, b) => a.mtime - b.mtime);
  for (const e of entries) {
    if (total <= maxBytes) break;
    try {
      rmSync(e.path, { force: true });
      total -= e.size;
      removed.files++;
      removed.bytes += e.size;
    } catch {
      // A file we cannot remove still counts; the next round tries again.
    }
  }
  return removed;
}
