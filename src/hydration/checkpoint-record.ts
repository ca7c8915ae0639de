// The `ckpt:{nodeId}` record a node announces in the replicated store: per
// model it serves, the hot sessions it holds and the checkpoint of each one's
// latest turn (key, hash, sizes). Signed by its owner like every record, so
// the hash a fetcher checks a blob against is the holder's own word. Bounded:
// at most MAX_ANNOUNCED sessions and MAX_RECORD_BYTES of JSON (the most
// recently used kept); a peer's record past those bounds is ignored whole.
// Also where a session is routed: the home of a session among the nodes
// serving its model, by rendezvous hashing (a node that joins becomes home to
// its share of the sessions, and only those move).
import { createHash } from "node:crypto";

/** The record's key prefix; a node's record is `ckpt:{its id}`. */
export const CKPT_PREFIX = "ckpt:";

/** Most sessions one record lists (all models together). */
export const MAX_ANNOUNCED = 64;

/** Most bytes of a record's JSON (the replicated store takes values up to 16 KiB). */
export const MAX_RECORD_BYTES = 15 * 1024;

/** One announced checkpoint: the session, its latest turn's checkpoint key and hash, tokens, bytes, last use (unix s). */
export interface AnnouncedCheckpoint {
  session: string;
  key: string;
  hash: string;
  tokens: number;
  bytes: number;
  lastUsed: number;
}

/** A node's announcement for one model. */
export interface AnnouncedModel {
  model: string;
  /** The model's portable checkpoint fingerprint: a node imports only blobs of its own. */
  fingerprint: string;
  checkpoints: AnnouncedCheckpoint[];
}

const SESSION = /^[A-Za-z0-9._:-]{1,128}$/;
const KEY = /^[A-Za-z0-9_-]{1,128}$/;
const HASH = /^[0-9a-f]{64}$/;
const FP = /^[0-9a-f]{8,64}$/;
const MODEL_MAX = 256;

/** The record's JSON for `models`: the most recently used checkpoints first, cut to the bounds. */
export function encodeRecord(models: readonly AnnouncedModel[]): string {
  const all = models.flatMap((m) => m.checkpoints.map((c) => ({ m, c })));
  all.sort((a, b) => b.c.lastUsed - a.c.lastUsed);
  let keep = Math.min(all.length, MAX_ANNOUNCED);
  for (;;) {
    const kept = new Set(all.slice(0, keep).map((x) => x.c));
    const text = JSON.stringify({
      v: 1,
      models: models.map((m) => ({
        id: m.model,
        fp: m.fingerprint,
        c: m.checkpoints.filter((c) => kept.has(c)).map((c) => [c.session, c.key, c.hash, c.tokens, c.bytes, c.lastUsed]),
      })),
    });
    if (Buffer.byteLength(text) <= MAX_RECORD_BYTES || keep === 0) return text;
    keep = Math.floor(keep / 2);
  }
}

/** A peer's record, checked field by field; null when anything is off (a bound, a type, a pattern). */
export function parseRecord(text: string): AnnouncedModel[] | null {
  if (Buffer.byteLength(text) > MAX_RECORD_BYTES) return null;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  const r = v as { v?: unknown; models?: unknown };
  if (typeof v !== "object" || v === null || r.v !== 1 || !Array.isArray(r.models) || r.models.length > 16) return null;
  const out: AnnouncedModel[] = [];
  let total = 0;
  for (const raw of r.models) {
    const m = raw as { id?: unknown; fp?: unknown; c?: unknown };
    if (typeof m !== "object" || m === null || typeof m.id !== "string" || m.id.length === 0 || m.id.length > MODEL_MAX) return null;
    if (typeof m.fp !== "string" || !FP.test(m.fp) || !Array.isArray(m.c)) return null;
    total += m.c.length;
    if (total > MAX_ANNOUNCED) return null;
    const checkpoints: AnnouncedCheckpoint[] = [];
    for (const e of m.c) {
      if (!Array.isArray(e) || e.length !== 6) return null;
      const [session, key, hash, tokens, bytes, lastUsed] = e as unknown[];
      if (typeof session !== "string" || !SESSION.test(session)) return null;
      if (typeof key !== "string" || !KEY.test(key) || typeof hash !== "string" || !HASH.test(hash)) return null;
      if (!isCount(tokens) || !isCount(bytes) || !isCount(lastUsed)) return null;
      checkpoints.push({ session, key, hash, tokens, bytes, lastUsed });
    }
    out.push({ model: m.id, fingerprint: m.fp, checkpoints });
  }
  return out;
}

function isCount(x: unknown): x is number {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}

/** The node a session is routed to among `nodes` (those serving its model): highest rendezvous score; null when none. */
export function sessionHome(session: string, nodes: readonly string[]): string | null {
  let best: string | null = null;
  let bestScore = "";
  for (const n of nodes) {
    const score = createHash("sha256").update(`${session}\n${n}`).digest("hex").slice(0, 16);
    if (best === null || score > bestScore || (score === bestScore && n < best)) {
      best = n;
      bestScore = score;
    }
  }
  return best;
}
