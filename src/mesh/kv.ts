// A replicated key-value namespace (a CRDT): last writer wins by hybrid
// logical clock; each key belongs to one node, whose signature every record
// must carry; deletes are tombstones.
//
// Besides its records, a replica keeps a completeness vector: for each owner,
// an HLC up to which it holds everything that owner wrote (a record, or a
// newer one, for each key). It only grows through a whole range of an owner's
// records, sent in HLC order by a peer that vouches for it, and through our
// own writes. How far it grows is the owner's to say: the range's end must be
// an HLC the owner signed (its mark, kv-record.ts, or one of its records), so
// no peer can push another node's watermark past what that node wrote and
// make its later records look stale. (That the range holds every record up to
// there is still the sender's word.) The vector tells peers exactly what we
// lack (kv-sync.ts), and it makes one rule possible: a record at or below our
// watermark for its owner, for a key we do not hold, is stale (the key was
// deleted since) and is ignored, whichever delayed message or returning peer
// carries it.
//
// Tombstones are collected only at causal stability: this replica and every
// live member are complete past the tombstone; members absent at deletion time
// count as live until SWIM declares them dead, and a node declared dead drops
// everything others wrote when it comes back (membership "self-reset"). Never
// by a timer alone: a peer cut off longer than the timer still holds the key's
// older put and replays it when it reconnects; with the tombstone gone the
// stale put lands on an empty slot and the deleted key is back from the dead.
import type { Logger } from "../log";
import { isList, isNodeId, isObject } from "./check";
import { compareHlc, type Hlc, HlcClock, isHlc } from "./hlc";
import type { Identity } from "./identity";
import { isKey, type KvRecord, parseRecord, recordBytes, signMark, signRecord, verifyMark, verifyRecord } from "./kv-record";
import type { Clock, NodeId } from "./wire";

/** Bounds of the store; every one has a default. */
export interface KvConfig {
  /** Records (values and tombstones) one owner may have, at most. */
  maxKeysPerOwner: number;
  /** Records in all, at most. */
  maxRecords: number;
  maxValueBytes: number;
  /** A remote timestamp this far ahead of our clock is refused. */
  maxClockDriftMs: number;
}

/** Defaults: 256 keys per owner, 8192 records, 16 KiB values, 60 s of clock drift. */
export const KV_DEFAULTS: KvConfig = { maxKeysPerOwner: 256, maxRecords: 8192, maxValueBytes: 16 * 1024, maxClockDriftMs: 60_000 };

/** Why a local write was refused. */
export type KvErrorCode = "bad_key" | "value_too_large" | "not_owner" | "owner_key_limit" | "store_full";

/** A local write's result: the record written (null for a delete of an absent key) or an error. */
export type KvResult = { ok: true; value: KvRecord | null } | { ok: false; code: KvErrorCode; message: string };

/** What the store needs to know about members (implemented by Membership). */
export interface OwnerDirectory {
  peer(id: NodeId): { publicKey: string; state: string } | undefined;
}

/**
 * An owner's records in HLC order: all of them in (after, upTo] (the sender vouches); `more` when cut short by the budget.
 * `mark` is the owner's signature that its writes reached `upTo` (see `signMark`), sent when the range is whole.
 */
export interface KvRange {
  owner: NodeId;
  after: Hlc | null;
  upTo: Hlc | null;
  records: KvRecord[];
  more: boolean;
  mark?: string;
}

/** Counters for metrics. */
export interface KvStats {
  records: number;
  tombstones: number;
  accepted: number;
  stale: number;
  rejectedForged: number;
  /** Watermark claims (a range's `upTo`) the owner did not sign: the records were kept, the watermark did not move. */
  rejectedUnsignedWatermarks: number;
  rejectedMalformed: number;
  rejectedUnknownOwner: number;
  rejectedOwnerDown: number;
  rejectedFull: number;
  rejectedClockSkew: number;
  refusedWrites: number;
  tombstonesCollected: number;
}

/** Options of a store. */
export interface KvOptions {
  identity: Identity;
  directory: OwnerDirectory;
  clock: Clock;
  log: Logger;
  config?: Partial<KvConfig>;
  /** Called after the current value of (owner, key) may have changed; read it with `get`. */
  onChange?: (owner: NodeId, key: string) => void;
}

type Verdict = "stored" | "old" | "stale" | "refused";

/** One node's replica of the namespace. */
export class Kv {
  readonly config: KvConfig;
  readonly stats: KvStats = {
    records: 0,
    tombstones: 0,
    accepted: 0,
    stale: 0,
    rejectedForged: 0,
    rejectedUnsignedWatermarks: 0,
    rejectedMalformed: 0,
    rejectedUnknownOwner: 0,
    rejectedOwnerDown: 0,
    rejectedFull: 0,
    rejectedClockSkew: 0,
    refusedWrites: 0,
    tombstonesCollected: 0,
  };
  readonly hlc: HlcClock;
  private readonly byOwner = new Map<NodeId, Map<string, KvRecord>>();
  private readonly tombstones = new Set<KvRecord>();
  private readonly have = new Map<NodeId, Hlc>();
  /** The owner's mark for `have` of each other owner, when we got one (relayed with its records). */
  private readonly marks = new Map<NodeId, { upTo: Hlc; sig: string }>();
  /** Per other owner, the highest HLC we hold its signature for (a record we stored, or a mark). */
  private readonly signedUpTo = new Map<NodeId, Hlc>();
  private ownMark: { upTo: Hlc; sig: string } | null = null;
  private total = 0;
  /** Bumped whenever the completeness vector changes (for cached digests). */
  vectorVersion = 0;

  constructor(private readonly o: KvOptions) {
    this.config = { ...KV_DEFAULTS, ...o.config };
    this.hlc = new HlcClock(o.identity.id, () => o.clock.now(), this.config.maxClockDriftMs);
  }

  /** This node's id (the owner of its writes). */
  get id(): NodeId {
    return this.o.identity.id;
  }

  /** Write this node's `key`, e.g. `kv.put("worker:ab12", json)`. */
  put(key: string, value: string): KvResult {
    if (Buffer.byteLength(value) > this.config.maxValueBytes) {
      return this.refuse("value_too_large", `value of ${Buffer.byteLength(value)} bytes is over ${this.config.maxValueBytes}`);
    }
    return this.write(key, value);
  }

  /** Delete a key with a tombstone; only this node's own keys (`owner` defaults to self). */
  delete(key: string, owner: NodeId = this.id): KvResult {
    if (owner !== this.id) return this.refuse("not_owner", `key ${key} belongs to node ${owner.slice(0, 8)}; only it may delete it`);
    const cur = this.get(owner, key);
    if (!cur || cur.value === null) return { ok: true, value: null };
    return this.write(key, null);
  }

  /** The current record of (owner, key), a tombstone included; undefined if absent. */
  get(owner: NodeId, key: string): KvRecord | undefined {
    return this.byOwner.get(owner)?.get(key);
  }

  /** Live (non-tombstone) records whose key starts with `prefix`. */
  *live(prefix = ""): IterableIterator<KvRecord> {
    for (const keys of this.byOwner.values()) for (const r of keys.values()) if (r.value !== null && r.key.startsWith(prefix)) yield r;
  }

  /** Records (values and tombstones) held. */
  get size(): number {
    return this.total;
  }

  /** The watermark up to which this replica holds all of `owner`'s writes. */
  haveOf(owner: NodeId): Hlc | undefined {
    return this.have.get(owner);
  }

  /** The completeness vector (owner -> watermark). */
  vector(): ReadonlyMap<NodeId, Hlc> {
    return this.have;
  }

  /** Apply one untrusted record outside any range (it advances no watermark); returns whether it was stored. */
  applyRemote(raw: unknown): boolean {
    const r = parseRecord(raw, this.config.maxValueBytes);
    if (!r) {
      this.stats.rejectedMalformed++;
      return false;
    }
    return this.apply(r) === "stored";
  }

  /** Apply a range from a peer; the owner's watermark advances only if the range is whole, contiguous and valid. */
  applyRange(raw: unknown): void {
    if (!isObject(raw) || !isNodeId(raw.owner) || !isList(raw.records, this.config.maxKeysPerOwner * 4)) {
      this.stats.rejectedMalformed++;
      return;
    }
    const owner = raw.owner;
    const after = isHlc(raw.after) ? raw.after : null;
    const upTo = isHlc(raw.upTo) ? raw.upTo : null;
    let whole = upTo !== null && (after === null || compareHlc(after, upTo) <= 0);
    for (const v of raw.records) {
      const r = parseRecord(v, this.config.maxValueBytes);
      // A record outside the range, or of another owner, makes the sender's claim worthless.
      if (!r || r.owner !== owner || (after && compareHlc(r.hlc, after) <= 0) || (upTo && compareHlc(r.hlc, upTo) > 0)) {
        if (!r) this.stats.rejectedMalformed++;
        whole = false;
        continue;
      }
      if (this.apply(r) === "refused") whole = false;
    }
    const mine = this.have.get(owner);
    const contiguous = after === null || (mine !== undefined && compareHlc(after, mine) <= 0);
    if (!whole || !contiguous || !upTo || owner === this.id || !this.isLiveOwner(owner) || (mine && compareHlc(upTo, mine) <= 0)) return;
    const mark = this.attested(owner, upTo, raw.mark);
    if (mark === null) {
      this.stats.rejectedUnsignedWatermarks++;
      this.o.log.warn("mesh refused a watermark not signed by its owner", { owner: owner.slice(0, 8), upTo: `${upTo.w}.${upTo.l}` });
      return;
    }
    this.have.set(owner, upTo);
    if (mark) this.marks.set(owner, { upTo, sig: mark });
    else this.marks.delete(owner);
    this.vectorVersion++;
  }

  // Whether `owner` itself vouches that its writes reached `upTo`: its valid mark (returned, to relay
  // on), or "" when we already hold its signature on that HLC or a later one (a record of the range);
  // null when only the sender says so.
  private attested(owner: NodeId, upTo: Hlc, sig: unknown): string | null {
    if (upTo.n !== owner) return null;
    const key = this.o.directory.peer(owner)?.publicKey;
    if (key !== undefined && sig !== undefined && verifyMark(owner, upTo, sig, key)) {
      this.signed(owner, upTo);
      return sig as string;
    }
    const seen = this.signedUpTo.get(owner);
    return seen && compareHlc(upTo, seen) <= 0 ? "" : null;
  }

  private signed(owner: NodeId, h: Hlc): void {
    const seen = this.signedUpTo.get(owner);
    if (!seen || compareHlc(h, seen) > 0) this.signedUpTo.set(owner, h);
  }

  // The owner's mark for `upTo` when we have one: ours is signed once per watermark, others' are relayed.
  private markOf(owner: NodeId, upTo: Hlc): string | undefined {
    if (owner === this.id) {
      if (!this.ownMark || compareHlc(this.ownMark.upTo, upTo) !== 0) this.ownMark = { upTo, sig: signMark(this.o.identity, upTo) };
      return this.ownMark.sig;
    }
    const m = this.marks.get(owner);
    return m && compareHlc(m.upTo, upTo) === 0 ? m.sig : undefined;
  }

  /** `owner`'s records after `after`, in HLC order, within a budget; `upTo` is set when the range is whole. */
  rangeFor(owner: NodeId, after: Hlc | null, budget: { records: number; bytes: number }): KvRange | null {
    const have = this.have.get(owner);
    if (!have || (after && compareHlc(after, have) >= 0)) return null;
    const keys = this.byOwner.get(owner);
    const newer = keys ? [...keys.values()].filter((r) => !after || compareHlc(r.hlc, after) > 0) : [];
    newer.sort((a, b) => compareHlc(a.hlc, b.hlc));
    const records: KvRecord[] = [];
    for (const r of newer) {
      const size = recordBytes(r);
      if (budget.records <= 0 || size > budget.bytes) break;
      records.push(r);
      budget.records--;
      budget.bytes -= size;
    }
    const whole = records.length === newer.length;
    if (!whole && records.length === 0) return null;
    if (!whole) return { owner, after, upTo: records[records.length - 1]?.hlc ?? null, records, more: true };
    const mark = this.markOf(owner, have);
    return { owner, after, upTo: have, records, more: false, ...(mark ? { mark } : {}) };
  }

  /** Dead-node key cleanup: drop every record of `owner` (no tombstones: it is their only writer). */
  dropOwner(owner: NodeId): void {
    this.removeOwner(owner);
    this.marks.delete(owner);
    this.signedUpTo.delete(owner);
    if (this.have.delete(owner)) this.vectorVersion++;
  }

  /** After this node was declared dead: drop what others wrote (and our watermarks for them). */
  purgeForeign(): void {
    for (const owner of [...this.byOwner.keys()]) if (owner !== this.id) this.removeOwner(owner);
    for (const owner of [...this.have.keys()]) if (owner !== this.id) this.have.delete(owner);
    this.marks.clear();
    this.signedUpTo.clear();
    this.vectorVersion++;
  }

  /** Collect tombstones that `stable(owner, hlc)` says every live member holds; we must be complete past them too. */
  collect(stable: (owner: NodeId, hlc: Hlc) => boolean): void {
    for (const r of [...this.tombstones]) {
      const have = this.have.get(r.owner);
      if (!have || compareHlc(have, r.hlc) < 0 || !stable(r.owner, r.hlc)) continue;
      this.remove(r);
      this.stats.tombstonesCollected++;
    }
  }

  private apply(r: KvRecord): Verdict {
    const own = r.owner === this.id;
    const owner = own ? { publicKey: this.o.identity.publicKey, state: "alive" } : this.o.directory.peer(r.owner);
    if (!owner) {
      this.stats.rejectedUnknownOwner++;
      return "refused";
    }
    if (owner.state !== "alive" && owner.state !== "suspect") {
      // A dead owner's keys were removed everywhere; relays that have not heard yet must not bring them back.
      this.stats.rejectedOwnerDown++;
      return "refused";
    }
    const cur = this.get(r.owner, r.key);
    if (cur && compareHlc(r.hlc, cur.hlc) <= 0) return "old";
    const have = this.have.get(r.owner);
    // We hold everything the owner wrote up to `have`: an absent key older than that was deleted since.
    // Not for our own keys: records of an earlier life of ours must reach the worker registry.
    if (!cur && !own && have && compareHlc(r.hlc, have) <= 0) {
      this.stats.stale++;
      return "stale";
    }
    if (!verifyRecord(r, owner.publicKey)) {
      this.stats.rejectedForged++;
      this.o.log.warn("mesh refused a record not signed by its owner", { owner: r.owner.slice(0, 8), key: r.key });
      return "refused";
    }
    if (!this.hlc.observe(r.hlc)) {
      this.stats.rejectedClockSkew++;
      return "refused";
    }
    if (!cur && !this.hasRoom(r.owner)) {
      this.stats.rejectedFull++;
      return "refused";
    }
    this.store(r);
    if (!own) this.signed(r.owner, r.hlc);
    this.stats.accepted++;
    this.o.onChange?.(r.owner, r.key);
    return "stored";
  }

  private isLiveOwner(owner: NodeId): boolean {
    const p = this.o.directory.peer(owner);
    return p !== undefined && (p.state === "alive" || p.state === "suspect");
  }

  private write(key: string, value: string | null): KvResult {
    if (!isKey(key)) return this.refuse("bad_key", "a key is 1 to 256 printable ASCII characters without spaces");
    if (!this.get(this.id, key) && !this.hasRoom(this.id)) {
      const full = (this.byOwner.get(this.id)?.size ?? 0) >= this.config.maxKeysPerOwner;
      return full
        ? this.refuse("owner_key_limit", `this node already has ${this.config.maxKeysPerOwner} keys`)
        : this.refuse("store_full", `the store already holds ${this.config.maxRecords} records`);
    }
    const r = signRecord(this.o.identity, key, value, this.hlc.tick());
    this.store(r);
    this.have.set(this.id, r.hlc);
    this.vectorVersion++;
    this.o.onChange?.(this.id, key);
    return { ok: true, value: r };
  }

  private hasRoom(owner: NodeId): boolean {
    return (this.byOwner.get(owner)?.size ?? 0) < this.config.maxKeysPerOwner && this.total < this.config.maxRecords;
  }

  private store(r: KvRecord): void {
    let keys = this.byOwner.get(r.owner);
    if (!keys) {
      keys = new Map();
      this.byOwner.set(r.owner, keys);
    }
    const prev = keys.get(r.key);
    if (prev) this.tombstones.delete(prev);
    else this.total++;
    keys.set(r.key, r);
    if (r.value === null) this.tombstones.add(r);
    this.count();
  }

  private removeOwner(owner: NodeId): void {
    const keys = this.byOwner.get(owner);
    if (!keys) return;
    for (const r of [...keys.values()]) {
      this.remove(r);
      if (r.value !== null) this.o.onChange?.(r.owner, r.key);
    }
  }

  private remove(r: KvRecord): void {
    const keys = this.byOwner.get(r.owner);
    if (keys?.get(r.key) !== r) return;
    keys.delete(r.key);
    if (keys.size === 0) this.byOwner.delete(r.owner);
    this.tombstones.delete(r);
    this.total--;
    this.count();
  }

  private count(): void {
    this.stats.records = this.total;
    this.stats.tombstones = this.tombstones.size;
  }

  private refuse(code: KvErrorCode, message: string): KvResult {
    this.stats.refusedWrites++;
    return { ok: false, code, message };
  }
}
