// Hashing a model file once: BLAKE3 of every chunk and of the whole, read in
// slices with an await between them (the event loop keeps serving), and a
// cache under the state dir keyed by (path, size, mtime, chunk size) so a
// restart does not rehash a file of tens of gigabytes.

import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { Blake3Hasher, blake3 } from "@napi-rs/blake-hash";
import { isCount, isObject } from "../../mesh/check";
import { chunkCount, isHash, rootOf } from "./manifest";

/** A file's hashes. */
export interface FileDigest {
  size: number;
  hash: string;
  chunkSize: number;
  chunks: string[];
  root: string;
}

const CACHE_FILE = "file-hashes.json";
/** Files whose digests the cache keeps (most recently hashed last). */
export const MAX_CACHED = 32;
// Read granularity: bounded memory whatever the chunk size.
const SLICE = 4 * 1024 * 1024;

/** Hash `path` in chunks of `chunkSize`; `onProgress` gets the fraction done. */
export async function hashFile(path: string, chunkSize: number, onProgress?: (f: number) => void): Promise<FileDigest> {
  const fh = await open(path, "r");
  try {
    const size = (await fh.stat()).size;
    const whole = new Blake3Hasher();
    const chunks: string[] = [];
    const buf = Buffer.allocUnsafe(Math.min(SLICE, Math.max(1, chunkSize)));
    for (let c = 0; c < chunkCount(size, chunkSize); c++) {
      const start = c * chunkSize;
      const end = Math.min(size, start + chunkSize);
      const h = new Blake3Hasher();
      for (let at = start; at < end; ) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - at), at);
        if (bytesRead === 0) throw new Error(`${path} shrank while it was hashed`);
        const slice = buf.subarray(0, bytesRead);
        h.update(slice);
        whole.update(slice);
        at += bytesRead;
      }
      chunks.push(h.digest("hex"));
      onProgress?.(end / size);
    }
    return { size, hash: whole.digest("hex"), chunkSize, chunks, root: rootOf(chunks) };
  } finally {
    await fh.close();
  }
}

/** BLAKE3 of one chunk's bytes, hex. */
export function chunkHash(bytes: Uint8Array): string {
  return blake3(bytes).toString("hex");
}

interface CacheEntry {
  path: string;
  size: number;
  mtimeMs: number;
  digest: FileDigest;
}

function readCache(stateDir: string): CacheEntry[] {
  const file = join(stateDir, CACHE_FILE);
  if (!existsSync(file)) return [];
  try {
    const v = JSON.parse(readFileSync(file, "utf8")) as unknown;
    return Array.isArray(v) ? v.filter(isEntry).slice(-MAX_CACHED) : [];
  } catch {
    return []; // a damaged cache costs one rehash, nothing else
  }
}

function isEntry(v: unknown): v is CacheEntry {
  if (!isObject(v) || typeof v.path !== "string" || !isCount(v.size) || typeof v.mtimeMs !== "number" || !isObject(v.digest)) return false;
  const d = v.digest;
  return (
    d.size === v.size &&
    isCount(d.chunkSize) &&
    (d.chunkSize as number) > 0 &&
    isHash(d.hash) &&
    isHash(d.root) &&
    Array.isArray(d.chunks) &&
    d.chunks.length === chunkCount(v.size, d.chunkSize as number) &&
    d.chunks.every(isHash) &&
    rootOf(d.chunks as string[]) === d.root
  );
}

/** Record `digest` for `path` as it was when hashing began (`st`: its size and mtime then) in the state dir's cache. */
export function rememberDigest(
  stateDir: string,
  path: string,
  digest: FileDigest,
  st: { size: number; mtimeMs: number } = statSync(path),
): void {
  const abs = resolve(path);
  const entries = readCache(stateDir).filter((e) => !(e.path === abs && e.digest.chunkSize === digest.chunkSize));
  entries.push({ path: abs, size: st.size, mtimeMs: st.mtimeMs, digest });
  const file = join(stateDir, CACHE_FILE);
  try {
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(`${file}.${process.pid}.tmp`, JSON.stringify(entries.slice(-MAX_CACHED)), { mode: 0o600 });
    renameSync(`${file}.${process.pid}.tmp`, file);
  } catch {
    // Best effort: a read-only state dir only costs a rehash next time.
  }
}

/** The cached digest of `path` if its size and mtime are unchanged since it was hashed in `chunkSize` chunks (null: any chunking, the latest). */
export function cachedDigest(stateDir: string, path: string, chunkSize: number | null): FileDigest | null {
  const abs = resolve(path);
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(abs);
  } catch {
    return null;
  }
  const e = readCache(stateDir)
    .reverse()
    .find((x) => x.path === abs && (chunkSize === null || x.digest.chunkSize === chunkSize));
  return e && e.size === st.size && e.mtimeMs === st.mtimeMs ? e.digest : null;
}

/**
 * The digest of `path`: cached when the file is unchanged, else hashed now in `chunkSize` chunks and cached.
 * With `anyChunking`, a cached digest of another chunk size counts too (a pulled file keeps the chunking its
 * holders announced, so every holder of it serves the same chunks).
 */
export async function digestOf(
  stateDir: string,
  path: string,
  chunkSize: number,
  o: { anyChunking?: boolean; onProgress?: (f: number) => void } = {},
): Promise<FileDigest> {
  const hit = cachedDigest(stateDir, path, o.anyChunking ? null : chunkSize) ?? cachedDigest(stateDir, path, chunkSize);
  if (hit) return hit;
  // Stat before reading: a file changed while it was hashed is then hashed again next time.
  const st = statSync(path);
  const d = await hashFile(path, chunkSize, o.onProgress);
  if (d.size === st.size) rememberDigest(stateDir, path, d, st);
  return d;
}
