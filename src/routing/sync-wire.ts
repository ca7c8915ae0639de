// The binary form of a tenancy batch, its compression and what its signature
// covers. A batch holds sections, one per model (hashes are per model: the
// same 8 bytes under two models are two different prefixes):
//
//   u8 version (1) | varint sections
//   section: u8 name length | name (ASCII) | u8 flags (bit 0 reset, bit 1 a full
//            sync is still streaming) | varint evicts | 8 bytes each
//            | varint runs | runs
//   run:     varint (n << 1 | has parent) | [8-byte parent] | n hashes of 8 bytes,
//            each one's parent being the hash before it
//
// so an insert in a chain costs its 8 bytes. Eviction is always an explicit
// list of hashes: no hash value means "everything" (an all-zero hash is a hash
// like any other). Decoding trusts nothing: every count is checked against the
// bytes left before anything is allocated, and the decompressed size is
// checked against the receiver's cap before the decompressor sees the data.
import { compressSync, uncompressSync } from "lz4-napi";
import { hashFromBytes, hashToBytes } from "./key";
import { isModelName } from "./own";

/** One model's part of a batch. */
export interface Section {
  model: string;
  /** The receiver drops all the sender's tenancy for the model before applying the rest. */
  reset: boolean;
  /** A full sync of the model is still streaming: parents missing now arrive in later batches. */
  syncing: boolean;
  evicts: string[];
  /** [hash, parent] in chain order. */
  inserts: Array<[string, string | null]>;
}

/** Why a payload was refused. */
export type WireErrorCode = "too_large" | "malformed";

/** A decode result: the sections, or why not. */
export type DecodeResult = { ok: true; value: Section[] } | { ok: false; code: WireErrorCode; message: string };

const VERSION = 1;
const FLAG_RESET = 1;
const FLAG_SYNCING = 2;
const HASH_BYTES = 8;
/** Sections in one batch, at most (a receiver wants at most this many models from one sender at once anyway). */
export const MAX_SECTIONS = 256;
/** Bytes of a batch header. */
export const BATCH_HEADER_BYTES = 1 + 2;
/** Upper bound of a section's bytes besides its hashes and runs: name, flags, two counts. */
export function sectionOverhead(model: string): number {
  return 1 + model.length + 1 + 4 + 4;
}
/** Upper bound of a run's header: the count and the parent. */
export const RUN_HEADER_BYTES = 4 + HASH_BYTES;
/** Bytes of one hash. */
export const HASH_SIZE = HASH_BYTES;

function varintSize(n: number): number {
  let s = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 128);
    s++;
  }
  return s;
}

function runsOf(inserts: ReadonlyArray<readonly [string, string | null]>): Array<{ parent: string | null; from: number; to: number }> {
  const runs: Array<{ parent: string | null; from: number; to: number }> = [];
  for (let i = 0; i < inserts.length; i++) {
    const [, parent] = inserts[i] as readonly [string, string | null];
    const prev = i > 0 ? (inserts[i - 1] as readonly [string, string | null])[0] : undefined;
    const last = runs[runs.length - 1];
    if (last && parent !== null && parent === prev) last.to = i + 1;
    else runs.push({ parent, from: i, to: i + 1 });
  }
  return runs;
}

/** The exact encoded size of `sections`. */
export function encodedSize(sections: readonly Section[]): number {
  let n = 1 + varintSize(sections.length);
  for (const s of sections) {
    const runs = runsOf(s.inserts);
    n += 1 + s.model.length + 1 + varintSize(s.evicts.length) + HASH_BYTES * s.evicts.length + varintSize(runs.length);
    for (const r of runs) n += varintSize((r.to - r.from) * 2 + 1) + (r.parent === null ? 0 : HASH_BYTES) + HASH_BYTES * (r.to - r.from);
  }
  return n;
}

/** Encode sections (model names must pass isModelName, hashes isPathHash: the caller's own, already checked). */
export function encodeSections(sections: readonly Section[]): Uint8Array {
  const out = new Uint8Array(encodedSize(sections));
  let at = 0;
  const varint = (v: number) => {
    while (v >= 0x80) {
      out[at++] = (v % 128) | 0x80;
      v = Math.floor(v / 128);
    }
    out[at++] = v;
  };
  const hash = (h: string) => {
    hashToBytes(h, out, at);
    at += HASH_BYTES;
  };
  out[at++] = VERSION;
  varint(sections.length);
  for (const s of sections) {
    out[at++] = s.model.length;
    for (let i = 0; i < s.model.length; i++) out[at++] = s.model.charCodeAt(i);
    out[at++] = (s.reset ? FLAG_RESET : 0) | (s.syncing ? FLAG_SYNCING : 0);
    varint(s.evicts.length);
    for (const h of s.evicts) hash(h);
    const runs = runsOf(s.inserts);
    varint(runs.length);
    for (const r of runs) {
      varint((r.to - r.from) * 2 + (r.parent === null ? 0 : 1));
      if (r.parent !== null) hash(r.parent);
      for (let i = r.from; i < r.to; i++) hash((s.inserts[i] as [string, string | null])[0]);
    }
  }
  return out;
}

/** Decode an untrusted payload; any inconsistency refuses the whole of it. */
export function decodeSections(buf: Uint8Array): DecodeResult {
  let at = 0;
  const bad = (message: string): DecodeResult => ({ ok: false, code: "malformed", message });
  // At most 4 bytes (values below 2^28): every count here is bounded by the payload's size anyway.
  const varint = (): number => {
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 4; i++) {
      if (at >= buf.length) return -1;
      const b = buf[at++] as number;
      v += (b & 0x7f) * mul;
      if ((b & 0x80) === 0) return v;
      mul *= 128;
    }
    return -1;
  };
  if (buf.length < 2 || buf[at++] !== VERSION) return bad("unknown batch version");
  const count = varint();
  if (count < 0 || count > MAX_SECTIONS) return bad("bad section count");
  const sections: Section[] = [];
  const seen = new Set<string>();
  for (let s = 0; s < count; s++) {
    if (at >= buf.length) return bad("truncated section");
    const len = buf[at++] as number;
    if (len === 0 || at + len + 1 > buf.length) return bad("bad model name length");
    let model = "";
    for (let i = 0; i < len; i++) model += String.fromCharCode(buf[at++] as number);
    if (!isModelName(model)) return bad("bad model name");
    if (seen.has(model)) return bad("a model appears twice");
    seen.add(model);
    const flags = buf[at++] as number;
    if ((flags & ~(FLAG_RESET | FLAG_SYNCING)) !== 0) return bad("unknown flags");
    const nEvicts = varint();
    if (nEvicts < 0 || nEvicts * HASH_BYTES > buf.length - at) return bad("bad evict count");
    const evicts: string[] = [];
    for (let i = 0; i < nEvicts; i++) {
      evicts.push(hashFromBytes(buf, at));
      at += HASH_BYTES;
    }
    const nRuns = varint();
    // Every run carries at least one hash.
    if (nRuns < 0 || nRuns * (1 + HASH_BYTES) > buf.length - at) return bad("bad run count");
    const inserts: Array<[string, string | null]> = [];
    for (let r = 0; r < nRuns; r++) {
      const head = varint();
      const n = Math.floor(head / 2);
      const hasParent = head % 2 === 1;
      if (head < 0 || n === 0 || (n + (hasParent ? 1 : 0)) * HASH_BYTES > buf.length - at) return bad("bad run");
      let parent: string | null = null;
      if (hasParent) {
        parent = hashFromBytes(buf, at);
        at += HASH_BYTES;
      }
      for (let i = 0; i < n; i++) {
        const h = hashFromBytes(buf, at);
        at += HASH_BYTES;
        inserts.push([h, parent]);
        parent = h;
      }
    }
    sections.push({ model, reset: (flags & FLAG_RESET) !== 0, syncing: (flags & FLAG_SYNCING) !== 0, evicts, inserts });
  }
  if (at !== buf.length) return bad("trailing bytes");
  return { ok: true, value: sections };
}

/** LZ4 (size-prepended block) of `raw`. */
export function compress(raw: Uint8Array): Buffer {
  return compressSync(Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength));
}

/** The longest compressed form of `rawCap` raw bytes (LZ4's worst case plus the size header). */
export function compressedBound(rawCap: number): number {
  return 4 + rawCap + Math.ceil(rawCap / 255) + 16;
}

/** Base64 characters of `bytes` bytes. */
export function base64Length(bytes: number): number {
  return 4 * Math.ceil(bytes / 3);
}

/**
 * Decompress untrusted bytes of at most `cap` raw bytes. The size header is read and checked first: a
 * forged header would otherwise make the decompressor allocate whatever it claims.
 */
export function decompress(
  data: Uint8Array,
  cap: number,
): { ok: true; value: Uint8Array } | { ok: false; code: WireErrorCode; message: string } {
  if (data.length < 5) return { ok: false, code: "malformed", message: "compressed data too short" };
  const claimed = new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
  if (claimed > cap) return { ok: false, code: "too_large", message: `batch of ${claimed} bytes is over ${cap}` };
  if (data.length > compressedBound(claimed)) return { ok: false, code: "malformed", message: "compressed data longer than its content" };
  let raw: Buffer;
  try {
    raw = uncompressSync(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  } catch {
    return { ok: false, code: "malformed", message: "not LZ4" };
  }
  if (raw.length !== claimed) return { ok: false, code: "malformed", message: "LZ4 size header does not match its content" };
  return { ok: true, value: raw };
}

const enc = new TextEncoder();

/**
 * What a signature covers: the domain (batch or path answer), both ends and their epochs, the sequence
 * number and the compressed payload, so a batch cannot be replayed to another node, to another life of
 * the receiver, or claimed for another sender.
 */
export function signedBytes(
  domain: string,
  from: string,
  fromEpoch: string,
  to: string,
  toEpoch: string,
  seq: number,
  payload: Uint8Array,
): Uint8Array {
  const head = enc.encode(`${domain}\n${JSON.stringify([from, fromEpoch, to, toEpoch, seq])}\n`);
  const out = new Uint8Array(head.length + payload.length);
  out.set(head, 0);
  out.set(payload, head.length);
  return out;
}
