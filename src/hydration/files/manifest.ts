// What a node says about a model file it can upload: its own signed
// `file:{hash}` record in the replicated store (apart from worker records),
// and the chunk list a downloader fetches from a holder and checks against
// the record's root. Everything here is checked, bounded and pure.
import { blake3 } from "@napi-rs/blake-hash";
import { isCount, isList, isObject, isStr } from "../../mesh/check";

/** Key prefix of file records in the replicated store. */
export const FILE_PREFIX = "file:";
/** Smallest and largest chunk a file may be cut into. */
export const MIN_CHUNK = 4 * 1024;
export const MAX_CHUNK = 256 * 1024 * 1024;
/** Default chunk: 4 MiB (a 70 GB model is ~17k chunks, a manifest of ~1.1 MB). */
export const DEFAULT_CHUNK = 4 * 1024 * 1024;
/** Most chunks one manifest may list (bounds what a downloader buffers: 256 GiB at the default chunk). */
export const MAX_CHUNKS = 1 << 16;
/** Most names (model id and aliases) a record carries, and the longest. */
const MAX_NAMES = 16;
const MAX_NAME = 256;
const HEX64 = /^[0-9a-f]{64}$/;
// A file name only: never a path, never hidden, never "..".
const FILE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$/;

/** One announced file, as its holder's record says. */
export interface FileAnnounce {
  /** The model id it serves as (the file name without .gguf). */
  name: string;
  aliases: string[];
  /** The file's base name, e.g. "qwen2.5-7b-q4_k_m.gguf" (where a downloader stores it). */
  file: string;
  size: number;
  /** BLAKE3 of the whole file, hex. */
  hash: string;
  chunkSize: number;
  /** BLAKE3 over the concatenated raw chunk hashes, hex: the manifest must match it. */
  root: string;
}

/** The chunk hashes of a file, served by its holders. */
export interface FileManifest {
  hash: string;
  size: number;
  chunkSize: number;
  /** BLAKE3 of each chunk, hex. */
  chunks: string[];
}

/** Chunks a file of `size` bytes is cut into (an empty file has none). */
export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

/** Byte range [start, end) of chunk `i`. */
export function chunkRange(size: number, chunkSize: number, i: number): { start: number; end: number } {
  const start = i * chunkSize;
  return { start, end: Math.min(size, start + chunkSize) };
}

/** The root over a chunk list: BLAKE3 of the raw 32-byte hashes in order, hex. */
export function rootOf(chunks: readonly string[]): string {
  return blake3(Buffer.from(chunks.join(""), "hex")).toString("hex");
}

/** Whether `s` is a lowercase 64-hex BLAKE3 hash. */
export function isHash(s: unknown): s is string {
  return typeof s === "string" && HEX64.test(s);
}

/** Whether `s` is a bare file name (no directory, not hidden). */
export function isFileName(s: unknown): s is string {
  return typeof s === "string" && FILE_NAME.test(s) && !s.includes("..");
}

/** The store key of a file's record. */
export function fileKey(hash: string): string {
  return `${FILE_PREFIX}${hash}`;
}

/** Canonical JSON of a record (fixed field order). */
export function serializeAnnounce(a: FileAnnounce): string {
  return JSON.stringify({
    name: a.name,
    aliases: a.aliases,
    file: a.file,
    size: a.size,
    hash: a.hash,
    chunkSize: a.chunkSize,
    root: a.root,
  });
}

/** Parse an untrusted record stored under `key`; null if it does not check out. */
export function parseAnnounce(key: string, value: string): FileAnnounce | null {
  let v: unknown;
  try {
    v = JSON.parse(value);
  } catch {
    return null;
  }
  if (!isObject(v) || !isStr(v.name, MAX_NAME) || !isList(v.aliases, MAX_NAMES) || !v.aliases.every((a) => isStr(a, MAX_NAME))) return null;
  if (!isFileName(v.file) || !isCount(v.size) || !isHash(v.hash) || !isHash(v.root)) return null;
  if (!isCount(v.chunkSize) || v.chunkSize < MIN_CHUNK || v.chunkSize > MAX_CHUNK) return null;
  if (chunkCount(v.size, v.chunkSize) > MAX_CHUNKS) return null;
  // The key names the content: a record cannot claim one hash and be filed under another.
  if (key !== fileKey(v.hash)) return null;
  return {
    name: v.name,
    aliases: v.aliases as string[],
    file: v.file,
    size: v.size,
    hash: v.hash,
    chunkSize: v.chunkSize,
    root: v.root,
  };
}

/** Whether a record answers to `name`: its model id, an alias, or its file name. */
export function answersTo(a: FileAnnounce, name: string): boolean {
  return a.name === name || a.file === name || a.aliases.includes(name);
}

/** Parse an untrusted manifest and check it against the signed record `a`; null if it does not match. */
export function checkManifest(v: unknown, a: FileAnnounce): FileManifest | null {
  if (!isObject(v) || v.hash !== a.hash || v.size !== a.size || v.chunkSize !== a.chunkSize) return null;
  const n = chunkCount(a.size, a.chunkSize);
  if (!Array.isArray(v.chunks) || v.chunks.length !== n || !v.chunks.every(isHash)) return null;
  const chunks = v.chunks as string[];
  if (rootOf(chunks) !== a.root) return null;
  return { hash: a.hash, size: a.size, chunkSize: a.chunkSize, chunks };
}
