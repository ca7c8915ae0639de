// One replicated key-value record: a value or a tombstone, stamped with its
// owner's hybrid logical clock and signed by the owner, who alone may write it.
import { isNodeId, isObject, isStr } from "./check";
import { type Hlc, isHlc } from "./hlc";
import { type Identity, verifySignature } from "./identity";
import type { NodeId } from "./wire";

/** A record as it travels; `value` null is a tombstone. */
export interface KvRecord {
  key: string;
  owner: NodeId;
  value: string | null;
  hlc: Hlc;
  sig: string;
}

/** Longest key, in characters. */
export const MAX_KEY_LENGTH = 256;
const MAX_SIG_B64 = 128;
// Keys are printable: they end up in logs and tables.
const KEY = /^[\x21-\x7e]+$/;

/** Whether `key` is a usable key: 1..256 printable ASCII characters, no spaces. */
export function isKey(key: unknown): key is string {
  return isStr(key, MAX_KEY_LENGTH) && KEY.test(key);
}

function payload(r: Omit<KvRecord, "sig">): Uint8Array {
  return new TextEncoder().encode(`mesh/kv/v1\n${JSON.stringify([r.key, r.owner, r.value, r.hlc.w, r.hlc.l, r.hlc.n])}`);
}

/** Sign a record written by `identity` (its owner). */
export function signRecord(identity: Identity, key: string, value: string | null, hlc: Hlc): KvRecord {
  const r = { key, owner: identity.id, value, hlc };
  return { ...r, sig: identity.sign(payload(r)) };
}

/** Whether `r` is signed by `publicKey` (the owner's key). */
export function verifyRecord(r: KvRecord, publicKey: string): boolean {
  return verifySignature(publicKey, payload(r), r.sig);
}

function markPayload(owner: NodeId, upTo: Hlc): Uint8Array {
  return new TextEncoder().encode(`mesh/kv-mark/v1\n${JSON.stringify([owner, upTo.w, upTo.l, upTo.n])}`);
}

/**
 * A watermark mark: the owner's signature that its writes reached `upTo`
 * (its own HLC). A peer that relays the owner's records forwards the mark, so
 * nobody but the owner can move another node's watermark past what it wrote.
 */
export function signMark(identity: Identity, upTo: Hlc): string {
  return identity.sign(markPayload(identity.id, upTo));
}

/** Whether `sig` is `owner`'s mark for `upTo` (`publicKey` is the owner's key). */
export function verifyMark(owner: NodeId, upTo: Hlc, sig: unknown, publicKey: string): boolean {
  return isStr(sig, MAX_SIG_B64) && upTo.n === owner && verifySignature(publicKey, markPayload(owner, upTo), sig);
}

/** Check the shape of an untrusted record (the signature is checked later, only if the record would win). */
export function parseRecord(v: unknown, maxValueBytes: number): KvRecord | null {
  if (!isObject(v) || !isKey(v.key) || !isNodeId(v.owner) || !isHlc(v.hlc) || !isStr(v.sig, MAX_SIG_B64)) return null;
  // The timestamp is the owner's: a record stamped by another node was not written by its owner.
  if (v.hlc.n !== v.owner) return null;
  if (v.value !== null && (typeof v.value !== "string" || Buffer.byteLength(v.value) > maxValueBytes)) return null;
  return { key: v.key, owner: v.owner, value: v.value, hlc: { w: v.hlc.w, l: v.hlc.l, n: v.hlc.n }, sig: v.sig };
}

/** Rough wire size of a record, for batch limits and byte counters (no serialisation on the hot path). */
export function recordBytes(r: KvRecord): number {
  return 160 + r.key.length + (r.value?.length ?? 0);
}
