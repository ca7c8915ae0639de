// A replicated key-value namespace (a CRDT): last writer wins by hybrid
// logical clock; each key belongs to one node, whose signature every record
// must carry; deletes are tombstones. Anti-entropy: every local change gets a
// local stamp (an HLC tick, so stamps only grow), the store keeps records in
// stamp order, and for each peer we keep the stamp up to which it acked. Each
// round a peer is sent, in bounded batches, what it has not acked; a batch
// that is not acked is simply sent again next round, because nothing is
// removed from the store to send it.
//
// Tombstones are collected only at causal stability: every live member has
// acked past the tombstone's stamp; members absent at deletion time count as
// live until SWIM declares them dead, and a node declared dead drops everything
// others wrote when it comes back (membership "self-reset"). Never by a timer
// alone: a peer cut off longer than the timer still holds the key's older put
// and replays it when it reconnects; with the tombstone gone the stale put
// lands on an empty slot and the deleted key is back from the dead.
import type { Logger } from "../log";
import { isCount, isList, isObject } from "./check";
import { compareHlc, HLC_ZERO, type Hlc, HlcClock } from "./hlc";
import type { Identity } from "./identity";
import { isKey, type KvRecord, parseRecord, recordBytes, signRecord, verifyRecord } from "./kv-record";
import type { SelfRecord } from "./member";
import type { Clock, NodeId, Transport, WireMessage } from "./wire";

/** Bounds and pacing of the store; every one has a default. */
export interface KvConfig {
  /** Records (values and tombstones) one owner may have, at most. */
  maxKeysPerOwner: number;
  /** Records in all, at most. */
  maxRecords: number;
  maxValueBytes: number;
  /** Records per sync message, at most. */
  batchRecords: number;
  /** Approximate bytes per sync message, at most. */
  batchBytes: number;
  /** Peers sent a batch per round, at most. */
  syncPeersPerRound: number;
  syncMs: number;
  syncTimeoutMs: number;
  /** A remote timestamp this far ahead of our clock is refused. */
  maxClockDriftMs: number;
}

/** Defaults: 256 keys per owner, 8192 records, 16 KiB values, 64-record batches to 8 peers a round. */
export const KV_DEFAULTS: KvConfig = {
  maxKeysPerOwner: 256,
  maxRecords: 8192,
  maxValueBytes: 16 * 1024,
  batchRecords: 64,
  batchBytes: 256 * 1024,
  syncPeersPerRound: 8,
  syncMs: 1000,
  syncTimeoutMs: 2000,
  maxClockDriftMs: 60_000,
};

/** Why a local write was refused. */
export type KvErrorCode = "bad_key" | "value_too_large" | "not_owner" | "owner_key_limit" | "store_full";

/** A local write's result: the record written (null for a delete of an absent key) or an error. */
export type KvResult = { ok: true; value: KvRecord | null } | { ok: false; code: KvErrorCode; message: string };

/** What the store needs to know about the mesh (implemented by Membership). */
export interface PeerDirectory {
  readonly id: NodeId;
  readonly self: SelfRecord;
  liveIds(): NodeId[];
  peer(id: NodeId): { publicKey: string; addr: string; epoch: string; state: string } | undefined;
  /** Called before each sync round, so a node that was frozen resets before it sends stale state. */
  awake?(): void;
}

/** Counters for metrics. */
export interface KvStats {
  records: number;
  tombstones: number;
  accepted: number;
  batchesSent: number;
  recordsSent: number;
  bytesSent: number;
  rejectedForged: number;
  rejectedMalformed: number;
  rejectedUnknownOwner: number;
  rejectedOwnerDown: number;
  rejectedFull: number;
  rejectedClockSkew: number;
  refusedWrites: number;
  tombstonesCollected: number;
  /** Copies of already-collected tombstones that came back and were not stored again. */
  tombstonesRefused: number;
  syncRefused: number;
}

interface Stored extends KvRecord {
  /** Local stamp of when this version was applied here; the store is kept in this order. */
  stamp: Hlc;
  /** The peer (and its epoch) we got this version from: it needs no copy back. */
  from?: string;
}

interface PeerSync {
  acked: Hlc;
  /** Bumped on every reset, so an ack for a batch sent before the reset is ignored. */
  gen: number;
  inFlight: boolean;
  /** We dropped this peer's keys (it was declared dead): ask it to send us everything again. */
  askResend: boolean;
  /** Sequence number of our last batch to this peer. */
  outSeq: number;
  /** Its batches numbered at or below this are refused: processed already, or sent before it acked something of ours. */
  inFloor: number;
}

/** Options of a store. */
export interface KvOptions {
  identity: Identity;
  directory: PeerDirectory;
  transport: Transport;
  clock: Clock;
  log: Logger;
  config?: Partial<KvConfig>;
  /** Called after the current value of (owner, key) may have changed; read it with `get`. */
  onChange?: (owner: NodeId, key: string) => void;
}

// What a receiver accepts in one batch, whatever the sender's own batch setting.
const MAX_BATCH_RECORDS = 1024;
const storeKey = (owner: NodeId, key: string) => `${owner}/${key}`;

/** One node's replica of the namespace. */
export class Kv {
  readonly config: KvConfig;
  readonly stats: KvStats = {
    records: 0,
    tombstones: 0,
    accepted: 0,
    batchesSent: 0,
    recordsSent: 0,
    bytesSent: 0,
    rejectedForged: 0,
    rejectedMalformed: 0,
    rejectedUnknownOwner: 0,
    rejectedOwnerDown: 0,
    rejectedFull: 0,
    rejectedClockSkew: 0,
    refusedWrites: 0,
    tombstonesCollected: 0,
    tombstonesRefused: 0,
    syncRefused: 0,
  };
  readonly hlc: HlcClock;
  // Insertion order is stamp order: every apply deletes and re-inserts its key.
  private readonly records = new Map<string, Stored>();
  private readonly perOwner = new Map<NodeId, number>();
  private readonly tombstones = new Set<string>();
  /** Per owner, the newest tombstone collected here (one timestamp per member: bounded). */
  private readonly collected = new Map<NodeId, Hlc>();
  private readonly peers = new Map<NodeId, PeerSync>();
  private head: Hlc = HLC_ZERO;
  private timer: unknown = null;
  private running = false;
  private rotate = 0;

  constructor(private readonly o: KvOptions) {
    this.config = { ...KV_DEFAULTS, ...o.config };
    this.hlc = new HlcClock(o.identity.id, () => o.clock.now(), this.config.maxClockDriftMs);
  }

  /** Start the sync rounds. */
  start(): void {
    if (this.running) return;
    this.running = true;
    const tick = () => {
      this.timer = this.o.clock.setTimer(() => {
        this.round();
        if (this.running) tick();
      }, this.config.syncMs);
    };
    tick();
  }

  /** Stop the sync rounds; batches in flight are ignored when they settle. */
  stop(): void {
    this.running = false;
    if (this.timer !== null) this.o.clock.clearTimer(this.timer);
    this.timer = null;
  }

  /** Write this node's `key`, e.g. `kv.put("worker:ab12", json)`. */
  put(key: string, value: string): KvResult {
    if (Buffer.byteLength(value) > this.config.maxValueBytes) {
      return this.refuse("value_too_large", `value of ${Buffer.byteLength(value)} bytes is over ${this.config.maxValueBytes}`);
    }
    return this.write(key, value);
  }

  /** Delete a key with a tombstone; only this node's own keys (`owner` defaults to self). */
  delete(key: string, owner: NodeId = this.o.identity.id): KvResult {
    if (owner !== this.o.identity.id)
      return this.refuse("not_owner", `key ${key} belongs to node ${owner.slice(0, 8)}; only it may delete it`);
    const cur = this.records.get(storeKey(owner, key));
    if (!cur || cur.value === null) return { ok: true, value: null };
    return this.write(key, null);
  }

  /** The current record of (owner, key), a tombstone included; undefined if absent. */
  get(owner: NodeId, key: string): KvRecord | undefined {
    return this.records.get(storeKey(owner, key));
  }

  /** Live (non-tombstone) records whose key starts with `prefix`. */
  *live(prefix = ""): IterableIterator<KvRecord> {
    for (const r of this.records.values()) if (r.value !== null && r.key.startsWith(prefix)) yield r;
  }

  /** Records (values and tombstones) held. */
  get size(): number {
    return this.records.size;
  }

  /** Answer a peer's sync batch; `sender` was authenticated by the transport and checked by membership. */
  handleSync(sender: NodeId, msg: WireMessage): WireMessage {
    const peer = this.o.directory.peer(sender);
    if (!peer || (peer.state !== "alive" && peer.state !== "suspect"))
      return this.refuseSync("not_member", "you are not a live member here");
    const from = isObject(msg.from) ? msg.from.epoch : undefined;
    // A batch from an earlier life of the sender, or addressed to an earlier life of ours, may carry
    // state that was since dropped: it is refused, and the sender resends after it catches up.
    if (from !== peer.epoch || msg.toEpoch !== this.o.directory.self.epoch) return this.refuseSync("stale_epoch", "epoch mismatch");
    if (!isList(msg.records, MAX_BATCH_RECORDS) || !isCount(msg.seq))
      return this.refuseSync("bad_message", `records must be a list of at most ${MAX_BATCH_RECORDS}, seq a count`);
    const p = this.peerSync(sender);
    // A batch that arrives after the sender acked one of ours may predate what that ack proved it holds
    // (a tombstone we then collected): replaying its older puts would resurrect keys. Refused; the sender
    // resends what is still current.
    if (msg.seq <= p.inFloor) return this.refuseSync("stale_seq", "batch sent before a later exchange");
    p.inFloor = msg.seq;
    for (const raw of msg.records) this.applyRemote(raw, `${sender}/${peer.epoch}`);
    if (msg.resend === true) this.resetPeer(sender);
    return { type: "kv-ack", ok: true, lastSeq: p.outSeq };
  }

  /** Apply one untrusted record; returns whether it was stored. Exposed for tests of forged input. */
  applyRemote(raw: unknown, from?: string): boolean {
    const r = parseRecord(raw, this.config.maxValueBytes);
    if (!r) {
      this.stats.rejectedMalformed++;
      return false;
    }
    const me = this.o.identity.id;
    const owner = r.owner === me ? { publicKey: this.o.identity.publicKey, state: "alive" } : this.o.directory.peer(r.owner);
    if (!owner) {
      // Not an error: the owner sends its own records once we know it.
      this.stats.rejectedUnknownOwner++;
      return false;
    }
    if (owner.state !== "alive" && owner.state !== "suspect") {
      // A dead owner's keys were removed everywhere; relays that have not heard yet must not bring them back.
      this.stats.rejectedOwnerDown++;
      return false;
    }
    const sk = storeKey(r.owner, r.key);
    const cur = this.records.get(sk);
    if (cur && compareHlc(r.hlc, cur.hlc) <= 0) return false;
    if (!cur && r.value === null && this.alreadyCollected(r)) {
      this.stats.tombstonesRefused++;
      return false;
    }
    if (!verifyRecord(r, owner.publicKey)) {
      this.stats.rejectedForged++;
      this.o.log.warn("mesh refused a record not signed by its owner", { owner: r.owner.slice(0, 8), key: r.key, from: from?.slice(0, 8) });
      return false;
    }
    if (!this.hlc.observe(r.hlc)) {
      this.stats.rejectedClockSkew++;
      return false;
    }
    if (!cur && !this.hasRoom(r.owner)) {
      this.stats.rejectedFull++;
      return false;
    }
    this.store(r, from);
    this.stats.accepted++;
    this.o.onChange?.(r.owner, r.key);
    return true;
  }

  /** Dead-node key cleanup: drop every record of `owner` (no tombstones: it is their only writer). */
  dropOwner(owner: NodeId): void {
    this.removeWhere((r) => r.owner === owner);
    this.peerSync(owner).askResend = true;
  }

  /** After this node was declared dead: drop what others wrote and resend ours to everyone. */
  purgeForeign(): void {
    const me = this.o.identity.id;
    this.removeWhere((r) => r.owner !== me);
    for (const id of this.peers.keys()) this.resetPeer(id);
  }

  /** Send `peer` everything again from the start; `restarted`: it is a new life whose batches number from 1 again. */
  resetPeer(peer: NodeId, restarted = false): void {
    const p = this.peerSync(peer);
    p.acked = HLC_ZERO;
    p.gen++;
    if (restarted) p.inFloor = 0;
  }

  /** Forget a member's sync state (it was forgotten by membership). */
  forgetPeer(peer: NodeId): void {
    this.peers.delete(peer);
    this.collected.delete(peer);
  }

  /** One anti-entropy round: batches to up to `syncPeersPerRound` peers that lack something, then tombstone GC. */
  round(): void {
    this.o.directory.awake?.();
    const live = this.o.directory.liveIds();
    const due = live.filter((id) => {
      const p = this.peers.get(id);
      return !p || (!p.inFlight && (p.askResend || compareHlc(p.acked, this.head) < 0));
    });
    if (due.length > 0) {
      const start = this.rotate++ % due.length;
      const picked = [...due.slice(start), ...due.slice(0, start)].slice(0, this.config.syncPeersPerRound);
      for (const id of picked) void this.syncPeer(id);
    }
    this.collect(live);
  }

  private async syncPeer(id: NodeId): Promise<void> {
    const peer = this.o.directory.peer(id);
    if (!peer) return;
    const p = this.peerSync(id);
    const gen = p.gen;
    const fromTag = `${id}/${peer.epoch}`;
    let lastStamp = p.acked;
    const batch: KvRecord[] = [];
    // When the batch reaches the end of the store, an ack covers everything up to the head.
    let upTo = this.head;
    let bytes = 0;
    for (const r of this.records.values()) {
      if (compareHlc(r.stamp, p.acked) <= 0) continue;
      if (r.from !== fromTag) {
        const size = recordBytes(r);
        if (batch.length >= this.config.batchRecords || (batch.length > 0 && bytes + size > this.config.batchBytes)) {
          upTo = lastStamp;
          break;
        }
        batch.push({ key: r.key, owner: r.owner, value: r.value, hlc: r.hlc, sig: r.sig });
        bytes += size;
      }
      lastStamp = r.stamp;
    }
    const askResend = p.askResend;
    if (batch.length === 0 && !askResend) {
      p.acked = upTo;
      return;
    }
    p.inFlight = true;
    const seq = ++p.outSeq;
    const msg = { type: "kv-sync", from: this.o.directory.self, toEpoch: peer.epoch, seq, records: batch, resend: askResend };
    this.stats.batchesSent++;
    this.stats.recordsSent += batch.length;
    this.stats.bytesSent += bytes;
    try {
      const reply = await this.o.transport.request(peer.addr, msg, this.config.syncTimeoutMs);
      if (reply.type !== "kv-ack" || reply.ok !== true) {
        this.stats.syncRefused++;
        return;
      }
      // Acks for a batch sent before a reset (restart, dropped keys) say nothing about the peer now.
      if (p.gen !== gen || this.peers.get(id) !== p) return;
      if (isCount(reply.lastSeq) && reply.lastSeq > p.inFloor) p.inFloor = reply.lastSeq;
      if (compareHlc(upTo, p.acked) > 0) p.acked = upTo;
      if (askResend) p.askResend = false;
    } catch {
      // Unacked: the same records go again next round.
    } finally {
      p.inFlight = false;
    }
  }

  // A tombstone is collected once every live member has acked past its stamp.
  private collect(live: NodeId[]): void {
    if (this.tombstones.size === 0) return;
    let floor: Hlc | null = null;
    for (const id of live) {
      const acked = this.peers.get(id)?.acked ?? HLC_ZERO;
      if (floor === null || compareHlc(acked, floor) < 0) floor = acked;
    }
    for (const sk of [...this.tombstones]) {
      const r = this.records.get(sk);
      if (!r) {
        this.tombstones.delete(sk);
        continue;
      }
      if (floor !== null && compareHlc(r.stamp, floor) > 0) continue;
      this.remove(sk, r);
      const seen = this.collected.get(r.owner);
      if (!seen || compareHlc(r.hlc, seen) > 0) this.collected.set(r.owner, r.hlc);
      this.stats.tombstonesCollected++;
    }
  }

  // A peer whose copy of a tombstone we collected may still send it (it has not yet seen our ack of its
  // own copy); storing it again would start the collection over, and the copies would circle forever.
  // Refusing is safe: at collection every live member held the tombstone, so no older put of that key
  // is left to beat, and an absent key already reads as deleted.
  private alreadyCollected(r: KvRecord): boolean {
    const seen = this.collected.get(r.owner);
    return seen !== undefined && compareHlc(r.hlc, seen) <= 0;
  }

  private write(key: string, value: string | null): KvResult {
    if (!isKey(key)) return this.refuse("bad_key", "a key is 1 to 256 printable ASCII characters without spaces");
    const me = this.o.identity.id;
    if (!this.records.has(storeKey(me, key)) && !this.hasRoom(me)) {
      const full = (this.perOwner.get(me) ?? 0) >= this.config.maxKeysPerOwner;
      return full
        ? this.refuse("owner_key_limit", `this node already has ${this.config.maxKeysPerOwner} keys`)
        : this.refuse("store_full", `the store already holds ${this.config.maxRecords} records`);
    }
    const r = signRecord(this.o.identity, key, value, this.hlc.tick());
    this.store(r, undefined);
    this.o.onChange?.(me, key);
    return { ok: true, value: r };
  }

  private hasRoom(owner: NodeId): boolean {
    return (this.perOwner.get(owner) ?? 0) < this.config.maxKeysPerOwner && this.records.size < this.config.maxRecords;
  }

  private store(r: KvRecord, from: string | undefined): void {
    const sk = storeKey(r.owner, r.key);
    const prev = this.records.get(sk);
    if (prev) this.records.delete(sk);
    else this.perOwner.set(r.owner, (this.perOwner.get(r.owner) ?? 0) + 1);
    const stamp = this.hlc.tick();
    this.records.set(sk, { ...r, stamp, ...(from ? { from } : {}) });
    this.head = stamp;
    if (r.value === null) this.tombstones.add(sk);
    else this.tombstones.delete(sk);
    this.count();
  }

  private removeWhere(pred: (r: Stored) => boolean): void {
    for (const [sk, r] of [...this.records]) {
      if (!pred(r)) continue;
      this.remove(sk, r);
      if (r.value !== null) this.o.onChange?.(r.owner, r.key);
    }
  }

  private remove(sk: string, r: Stored): void {
    this.records.delete(sk);
    this.tombstones.delete(sk);
    const n = (this.perOwner.get(r.owner) ?? 1) - 1;
    if (n <= 0) this.perOwner.delete(r.owner);
    else this.perOwner.set(r.owner, n);
    this.count();
  }

  private count(): void {
    this.stats.records = this.records.size;
    this.stats.tombstones = this.tombstones.size;
  }

  private peerSync(id: NodeId): PeerSync {
    let p = this.peers.get(id);
    if (!p) {
      p = { acked: HLC_ZERO, gen: 0, inFlight: false, askResend: false, outSeq: 0, inFloor: 0 };
      this.peers.set(id, p);
    }
    return p;
  }

  private refuse(code: KvErrorCode, message: string): KvResult {
    this.stats.refusedWrites++;
    return { ok: false, code, message };
  }

  private refuseSync(code: string, message: string): WireMessage {
    return { type: "kv-ack", ok: false, code, message };
  }
}
