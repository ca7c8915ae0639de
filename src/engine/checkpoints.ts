// Session checkpoints: KV state saved at the end of an assistant turn, kept
// apart from the host-RAM cache's LRU (which forgets a branch as soon as other
// conversations need the room) until the session releases it. RAM holds up to
// a byte budget; past it the least recently used spill to disk under the state
// dir (up to a disk budget), and past that they are dropped: a request whose
// checkpoint is gone is prefilled in full, with the same greedy output.
// Runs in the engine Worker (synchronous file I/O is off the main thread).

import { createHash } from "node:crypto";
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { LoadOptions, ModelInfo } from "./protocol";

/** Defaults: 4 GiB of RAM, 16 GiB of disk. */
export const CHECKPOINT_DEFAULTS = { ramMiB: 4096, diskMiB: 16384, maxEntries: 4096 } as const;

/** What a state blob depends on: the model file and the context shape (a blob from another never loads). */
export function modelFingerprint(info: ModelInfo): string {
  const parts = [info.path, info.sizeBytes, info.nParams, info.nLayer, info.nEmbd, info.nHeadKv, info.nCtxSeq, info.nVocab];
  return createHash("sha256").update(JSON.stringify(parts)).digest("hex").slice(0, 24);
}

/** Bytes sampled from each end of the model file for the portable fingerprint. */
const SAMPLE_BYTES = 1024 * 1024;

/**
 * What a state blob depends on, the same on every node holding the same model file wherever its path:
 * the model's name and shape, the context per sequence, the file's size, and a digest of its first and
 * last MiB (tensor data: two fine-tunes of one base differ there). A blob from a peer loads only here.
 */
export function portableFingerprint(info: ModelInfo, path: string): string {
  const h = createHash("sha256").update(
    JSON.stringify([
      info.name,
      info.architecture,
      info.sizeBytes,
      info.nParams,
      info.nLayer,
      info.nEmbd,
      info.nHeadKv,
      info.nCtxSeq,
      info.nVocab,
    ]),
  );
  let fd = -1;
  try {
    fd = openSync(path, "r");
    const size = statSync(path).size;
    h.update(String(size));
    const buf = Buffer.alloc(Math.min(SAMPLE_BYTES, size));
    h.update(buf.subarray(0, readSync(fd, buf, 0, buf.length, 0)));
    h.update(buf.subarray(0, readSync(fd, buf, 0, buf.length, Math.max(0, size - buf.length))));
  } catch {
    // Unreadable now (it loaded, so this is rare): no peer's blob will match this one.
    h.update(`unreadable:${path}`);
  } finally {
    if (fd >= 0) closeSync(fd);
  }
  return h.digest("hex").slice(0, 32);
}

/** The engine's checkpoint store from its load options, or null when both budgets are 0. */
export function openCheckpoints(info: ModelInfo, o: LoadOptions): CheckpointStore | null {
  const ram = Math.max(0, Math.floor((o.checkpointRamMiB ?? 0) * 1024 * 1024));
  const disk = o.checkpointDir ? Math.max(0, Math.floor((o.checkpointDiskMiB ?? 0) * 1024 * 1024)) : 0;
  if (ram === 0 && disk === 0) return null;
  return new CheckpointStore({
    ramBytes: ram,
    diskBytes: disk,
    dir: o.checkpointDir ?? null,
    fingerprint: modelFingerprint(info),
    portable: portableFingerprint(info, o.modelPath),
    maxEntries: CHECKPOINT_DEFAULTS.maxEntries,
  });
}

/** Budgets and place of the checkpoint store. */
export interface CheckpointOptions {
  ramBytes: number;
  diskBytes: number;
  /** Directory for spilled checkpoints (one per model fingerprint); null keeps them in RAM only. */
  dir: string | null;
  /** Identifies the model and context a state blob fits: files of another fingerprint are never read. */
  fingerprint: string;
  /** The same model on any node (portableFingerprint): blobs exported to and imported from peers carry it. */
  portable?: string;
  /** Most checkpoints indexed (RAM and disk together). */
  maxEntries: number;
}

/** One checkpoint: its tokens, and its state in RAM, on disk, or both. */
export interface Checkpoint {
  readonly key: string;
  readonly tokens: Int32Array;
  /** llama.cpp's sequence state; null once spilled. */
  ram: Uint8Array | null;
  /** Bytes of the state (wherever it is). */
  readonly size: number;
  onDisk: boolean;
  lastUsed: number;
  /** Whatever the engine attaches (its prefix-mark holder), handed back to onDrop. */
  tag: object | null;
  /** checkpointHash of its tokens and state, once computed (lazily: most are never announced). */
  hash?: string;
}

/** A checkpoint as announced to peers: enough to fetch it and check what arrives. */
export interface CheckpointSummary {
  key: string;
  hash: string;
  tokens: number;
  bytes: number;
}

/** Why an imported blob was refused. */
export type ImportRefusal = "corrupt" | "incompatible" | "no_room";

/** The integrity digest of a checkpoint: sha256 over its token ids (i32 LE) and its state, hex. */
export function checkpointHash(tokens: Int32Array, state: Uint8Array): string {
  const t = Buffer.from(tokens.buffer, tokens.byteOffset, tokens.byteLength);
  return createHash("sha256").update(t).update(state).digest("hex");
}

/** Counts for stats. */
export interface CheckpointStats {
  checkpoints: number;
  checkpointRamBytes: number;
  checkpointDiskBytes: number;
  checkpointSpills: number;
  checkpointDrops: number;
}

const MAGIC = "MESHCKP1";
/** Keys are server-made hex digests; anything else is refused rather than put in a file name. */
const KEY = /^[A-Za-z0-9_-]{1,128}$/;

/** Length of the common prefix of a checkpoint's tokens and a prompt. */
function lcp(a: Int32Array, b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** Checkpoints of one engine, by key, within RAM and disk budgets. */
export class CheckpointStore {
  private readonly entries = new Map<string, Checkpoint>();
  private clock = 0;
  private ramUsed = 0;
  private diskUsed = 0;
  private spills = 0;
  private drops = 0;
  private readonly dir: string | null;
  /** Called for every checkpoint dropped (released, evicted, unreadable), once. */
  onDrop: ((e: Checkpoint) => void) | null = null;

  constructor(private readonly o: CheckpointOptions) {
    this.dir = o.dir && o.diskBytes > 0 ? join(o.dir, o.fingerprint) : null;
    if (this.dir) this.scan(this.dir);
  }

  /** The portable fingerprint its blobs carry (null: it neither exports nor imports). */
  get portable(): string | null {
    return this.o.portable ?? null;
  }

  /** False when both budgets are 0. */
  get enabled(): boolean {
    return this.o.ramBytes > 0 || this.dir !== null;
  }

  /** Store a turn's state under `key` (replacing one of the same key); the entry, or null when it fits nowhere. */
  put(key: string, tokens: readonly number[], state: Uint8Array): Checkpoint | null {
    if (!KEY.test(key) || !this.enabled) return null;
    this.release([key]);
    const e: Checkpoint = {
      key,
      tokens: Int32Array.from(tokens),
      ram: state,
      size: state.length,
      onDisk: false,
      lastUsed: ++this.clock,
      tag: null,
    };
    while (this.entries.size >= this.o.maxEntries) if (!this.dropColdest()) return null;
    this.entries.set(key, e);
    this.ramUsed += e.size;
    this.fitRam();
    return this.entries.get(key) === e ? e : null;
  }

  /**
   * The checkpoint to restore for a prompt: `key`'s when it shares a prefix with the prompt, else
   * (a warm start, or a restart that lost the session) the one sharing the longest prefix.
   */
  find(key: string | undefined, prompt: readonly number[]): { entry: Checkpoint; lcp: number } | null {
    const named = key ? this.entries.get(key) : undefined;
    if (named) {
      const l = lcp(named.tokens, prompt);
      if (l > 0) return { entry: named, lcp: l };
    }
    let best: Checkpoint | null = null;
    let bestLcp = 0;
    for (const e of this.entries.values()) {
      const l = lcp(e.tokens, prompt);
      if (l > bestLcp) {
        best = e;
        bestLcp = l;
      }
    }
    return best ? { entry: best, lcp: bestLcp } : null;
  }

  /** The state bytes of a checkpoint (read back from disk when spilled); null, and the entry dropped, when unreadable. */
  load(e: Checkpoint): Uint8Array | null {
    e.lastUsed = ++this.clock;
    if (e.ram) return e.ram;
    try {
      const data = readFileSync(this.file(e.key));
      const read = parse(data, this.o.fingerprint);
      if (read && read.key === e.key && read.state.length === e.size) return read.state;
    } catch {}
    this.forget(e);
    return null;
  }

  /** Summaries of the checkpoints held under `keys` (at most 256 looked at), hashing those not hashed yet. */
  describe(keys: readonly string[]): CheckpointSummary[] {
    const out: CheckpointSummary[] = [];
    for (const key of keys.slice(0, 256)) {
      const e = this.entries.get(key);
      if (!e) continue;
      if (!e.hash) {
        const state = this.peekState(e);
        if (!state) continue;
        e.hash = checkpointHash(e.tokens, state);
      }
      out.push({ key, hash: e.hash, tokens: e.tokens.length, bytes: e.size });
    }
    return out;
  }

  /** Which of `keys` are held (at most 4096 looked at). */
  has(keys: readonly string[]): string[] {
    return keys.slice(0, 4096).filter((k) => this.entries.has(k));
  }

  /** The checkpoint `key` as a blob a peer can import (portable fingerprint and hash in its header); null when not held. */
  exportBlob(key: string): Uint8Array | null {
    const e = this.entries.get(key);
    if (!e || !this.o.portable) return null;
    const state = this.peekState(e);
    if (!state) return null;
    e.hash ??= checkpointHash(e.tokens, state);
    return serialize(e.key, e.tokens, state, this.o.portable, e.hash);
  }

  /**
   * Store a peer's blob: refused as corrupt when it does not parse, its header names another key than `key`
   * (the announced one: the hash does not cover the key, and a blob stored under another key would replace
   * that checkpoint), or its tokens and state do not hash to `hash` (what the holder announced); as
   * incompatible when made for another model or context.
   */
  importBlob(blob: Uint8Array, hash: string, key: string): { ok: true; key: string; tokens: number } | { ok: false; code: ImportRefusal } {
    const read = parseBlob(Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength));
    if (!read || read.key !== key) return { ok: false, code: "corrupt" };
    if (!this.o.portable || read.fingerprint !== this.o.portable) return { ok: false, code: "incompatible" };
    if (checkpointHash(read.tokens, read.state) !== hash) return { ok: false, code: "corrupt" };
    // A copy: the blob's buffer may be reused by the caller; the store keeps the state.
    const e = this.put(read.key, Array.from(read.tokens), read.state.slice());
    if (!e) return { ok: false, code: "no_room" };
    e.hash = hash;
    return { ok: true, key: read.key, tokens: read.tokens.length };
  }

  /** A checkpoint's state without touching its recency (announcing or serving it is not a use); null when unreadable. */
  private peekState(e: Checkpoint): Uint8Array | null {
    if (e.ram) return e.ram;
    const used = e.lastUsed;
    const state = this.load(e);
    e.lastUsed = used;
    return state;
  }

  /** Drop checkpoints (RAM and disk): their session released them. */
  release(keys: readonly string[]): void {
    for (const k of keys) {
      const e = this.entries.get(k);
      if (e) this.forget(e);
    }
  }

  /** Drop everything held in RAM (shutdown); spilled files stay for the next start. */
  clearRam(): void {
    for (const e of [...this.entries.values()]) {
      if (e.onDisk) {
        if (e.ram) this.ramUsed -= e.size;
        e.ram = null;
      } else this.forget(e);
    }
  }

  /** Sizes and counts. */
  stats(): CheckpointStats {
    return {
      checkpoints: this.entries.size,
      checkpointRamBytes: this.ramUsed,
      checkpointDiskBytes: this.diskUsed,
      checkpointSpills: this.spills,
      checkpointDrops: this.drops,
    };
  }

  /** Spill (or drop) the least recently used RAM entries until RAM is within budget. */
  private fitRam(): void {
    while (this.ramUsed > this.o.ramBytes) {
      let coldest: Checkpoint | null = null;
      for (const e of this.entries.values()) if (e.ram && (!coldest || e.lastUsed < coldest.lastUsed)) coldest = e;
      if (!coldest) return;
      if (!this.spill(coldest)) this.forget(coldest);
    }
  }

  /** Move a checkpoint's state to disk, making disk room first; false when it cannot go there. */
  private spill(e: Checkpoint): boolean {
    if (!this.dir || !e.ram || e.size > this.o.diskBytes) return false;
    if (!e.onDisk) {
      while (this.diskUsed + e.size > this.o.diskBytes) {
        let coldest: Checkpoint | null = null;
        for (const x of this.entries.values()) if (x.onDisk && !x.ram && (!coldest || x.lastUsed < coldest.lastUsed)) coldest = x;
        if (!coldest) return false;
        this.forget(coldest);
      }
      try {
        const tmp = `${this.file(e.key)}.tmp`;
        writeFileSync(tmp, serialize(e.key, e.tokens, e.ram, this.o.fingerprint));
        renameSync(tmp, this.file(e.key));
      } catch {
        return false;
      }
      e.onDisk = true;
      this.diskUsed += e.size;
    }
    this.spills++;
    this.ramUsed -= e.size;
    e.ram = null;
    return true;
  }

  private dropColdest(): boolean {
    let coldest: Checkpoint | null = null;
    for (const e of this.entries.values()) if (!coldest || e.lastUsed < coldest.lastUsed) coldest = e;
    if (!coldest) return false;
    this.forget(coldest);
    return true;
  }

  private forget(e: Checkpoint): void {
    if (this.entries.get(e.key) !== e) return;
    this.entries.delete(e.key);
    this.drops++;
    if (e.ram) this.ramUsed -= e.size;
    if (e.onDisk) {
      this.diskUsed -= e.size;
      try {
        rmSync(this.file(e.key), { force: true });
      } catch {}
    }
    e.ram = null;
    this.onDrop?.(e);
  }

  private file(key: string): string {
    return join(this.dir as string, `${key}.ckpt`);
  }

  /** Index the checkpoints a previous run spilled (headers only), within the disk budget; unreadable files are removed. */
  private scan(dir: string): void {
    try {
      mkdirSync(dir, { recursive: true });
    } catch {
      return;
    }
    let names: string[] = [];
    try {
      names = readdirSync(dir).filter((n) => n.endsWith(".ckpt"));
    } catch {}
    const found: Array<{ key: string; tokens: Int32Array; size: number; mtime: number }> = [];
    for (const name of names) {
      const path = join(dir, name);
      const head = readHeader(path, this.o.fingerprint);
      if (!head || `${head.key}.ckpt` !== name) {
        rmSync(path, { force: true });
        continue;
      }
      found.push({ ...head, mtime: statSync(path).mtimeMs });
    }
    // Most recent first, so the budget keeps those.
    found.sort((a, b) => b.mtime - a.mtime);
    for (const f of found) {
      if (this.entries.size >= this.o.maxEntries || this.diskUsed + f.size > this.o.diskBytes) {
        rmSync(this.file(f.key), { force: true });
        continue;
      }
      this.entries.set(f.key, { key: f.key, tokens: f.tokens, ram: null, size: f.size, onDisk: true, lastUsed: 0, tag: null });
      this.diskUsed += f.size;
    }
  }
}

/** File layout: magic, u32 header length, JSON header, tokens (i32 LE), state. A peer blob's header also carries its hash. */
function serialize(key: string, tokens: Int32Array, state: Uint8Array, fingerprint: string, hash?: string): Uint8Array {
  const header = Buffer.from(JSON.stringify({ fingerprint, key, tokens: tokens.length, size: state.length, ...(hash ? { hash } : {}) }));
  const out = Buffer.alloc(8 + 4 + header.length + tokens.length * 4 + state.length);
  out.write(MAGIC, 0, "latin1");
  out.writeUInt32LE(header.length, 8);
  header.copy(out, 12);
  let at = 12 + header.length;
  for (const t of tokens) {
    out.writeInt32LE(t, at);
    at += 4;
  }
  out.set(state, at);
  return out;
}

interface Header {
  key: string;
  tokens: Int32Array;
  size: number;
}

/** A file's header and tokens, or null when it is not a checkpoint of this fingerprint. */
function readHeader(path: string, fingerprint: string): Header | null {
  let fd = -1;
  try {
    fd = openSync(path, "r");
    const pre = Buffer.alloc(12);
    if (readSync(fd, pre, 0, 12, 0) !== 12 || pre.toString("latin1", 0, 8) !== MAGIC) return null;
    const len = pre.readUInt32LE(8);
    if (len > 4096) return null;
    const hb = Buffer.alloc(len);
    if (readSync(fd, hb, 0, len, 12) !== len) return null;
    const h = JSON.parse(hb.toString("utf8")) as { fingerprint?: unknown; key?: unknown; tokens?: unknown; size?: unknown };
    if (h.fingerprint !== fingerprint || typeof h.key !== "string" || !KEY.test(h.key)) return null;
    if (!Number.isInteger(h.tokens) || !Number.isInteger(h.size)) return null;
    const n = h.tokens as number;
    const tb = Buffer.alloc(n * 4);
    if (readSync(fd, tb, 0, tb.length, 12 + len) !== tb.length) return null;
    if (statSync(path).size !== 12 + len + tb.length + (h.size as number)) return null;
    const tokens = new Int32Array(n);
    for (let i = 0; i < n; i++) tokens[i] = tb.readInt32LE(i * 4);
    return { key: h.key, tokens, size: h.size as number };
  } catch {
    return null;
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}

/** A whole file's key, tokens and state, or null. */
function parse(data: Buffer, fingerprint: string): { key: string; state: Uint8Array } | null {
  if (data.length < 12 || data.toString("latin1", 0, 8) !== MAGIC) return null;
  const len = data.readUInt32LE(8);
  const h = JSON.parse(data.toString("utf8", 12, 12 + len)) as { fingerprint?: unknown; key?: unknown; tokens?: unknown; size?: unknown };
  if (h.fingerprint !== fingerprint || typeof h.key !== "string") return null;
  const start = 12 + len + (h.tokens as number) * 4;
  return { key: h.key, state: new Uint8Array(data.buffer, data.byteOffset + start, data.length - start) };
}

/** A peer's blob read whole and checked for shape (not yet for its hash or fingerprint); null when malformed. */
function parseBlob(data: Buffer): { fingerprint: string; key: string; tokens: Int32Array; state: Uint8Array } | null {
  try {
    if (data.length < 12 || data.toString("latin1", 0, 8) !== MAGIC) return null;
    const len = data.readUInt32LE(8);
    if (len > 4096 || 12 + len > data.length) return null;
    const h = JSON.parse(data.toString("utf8", 12, 12 + len)) as { fingerprint?: unknown; key?: unknown; tokens?: unknown; size?: unknown };
    if (typeof h.fingerprint !== "string" || typeof h.key !== "string" || !KEY.test(h.key)) return null;
    if (!Number.isInteger(h.tokens) || !Number.isInteger(h.size) || (h.tokens as number) <= 0 || (h.size as number) <= 0) return null;
    const n = h.tokens as number;
    const start = 12 + len + n * 4;
    if (data.length !== start + (h.size as number)) return null;
    const tokens = new Int32Array(n);
    for (let i = 0; i < n; i++) tokens[i] = data.readInt32LE(12 + len + i * 4);
    return {
      fingerprint: h.fingerprint,
      key: h.key,
      tokens,
      state: new Uint8Array(data.buffer, data.byteOffset + start, data.length - start),
    };
  } catch {
    return null;
  }
}
