// Anti-entropy for the replicated store. Each round a node
// - pushes its own new records to peers that have not acked them (per-peer
//   ack watermark over its own writes; an unacked push is resent next round),
// - and pulls from one random peer: it sends its completeness vector (only
//   the entries that peer has not seen yet, plus a digest of the whole), and
//   the peer answers with, per owner, the records above our watermark.
// A record thus reaches each node about once: from its owner, or from a peer
// that knew exactly what was missing. Messages are bounded batches. The
// vectors peers report are what tombstone collection waits on.
//
// A message speaks for its sender only: its id must be the node the transport
// authenticated (and a reply's, the peer we asked), so nobody can ack, or
// report a vector, on behalf of another node. What it says about other
// owners' writes is checked against their signatures (kv.ts).
import type { Logger } from "../log";
import { isCount, isList, isNodeId, isObject, isStr } from "./check";
import { compareHlc, type Hlc } from "./hlc";
import type { Kv, KvRange } from "./kv";
import { recordBytes } from "./kv-record";
import { Vector, vectorDigest } from "./vector";
import type { Clock, NodeId, Transport, WireMessage } from "./wire";

/** Pacing and batch bounds of the sync; every one has a default. */
export interface KvSyncConfig {
  syncMs: number;
  syncTimeoutMs: number;
  /** Records per message, at most. */
  batchRecords: number;
  /** Approximate bytes of records per message, at most. */
  batchBytes: number;
  /** Peers our own new records are pushed to per round, at most. */
  pushPeersPerRound: number;
}

/** Defaults: a round a second, 64-record batches, own records pushed to up to 16 peers a round. */
export const KV_SYNC_DEFAULTS: KvSyncConfig = {
  syncMs: 1000,
  syncTimeoutMs: 2000,
  batchRecords: 64,
  batchBytes: 256 * 1024,
  pushPeersPerRound: 16,
};

/** Who the sync talks to (implemented by Membership). */
export interface SyncDirectory {
  readonly id: NodeId;
  readonly self: { epoch: string };
  liveIds(): NodeId[];
  peer(id: NodeId): { addr: string; epoch: string; state: string } | undefined;
  /** Called before each round, so a node that was frozen resets before it sends stale state. */
  awake?(): void;
}

/** Counters for metrics. */
export interface KvSyncStats {
  exchanges: number;
  recordsSent: number;
  bytesSent: number;
  refused: number;
  fullVectorsRequested: number;
  /** Messages and replies refused because they claimed to come from another node than the one that sent them. */
  rejectedSender: number;
}

interface PeerState {
  /** The peer's completeness vector, as it told us (empty until it does). */
  known: Vector;
  /** Our vector as we last told the peer, and the version of it. */
  told: Map<NodeId, Hlc>;
  toldVersion: string;
  sendFull: boolean;
  askFull: boolean;
  /** Our own writes the peer acked. */
  ownAcked: Hlc | null;
  outSeq: number;
  inSeq: number;
  inFlight: boolean;
  gen: number;
}

type VectorEntry = [NodeId, number, number] | [NodeId];

// What a receiver accepts in one message, whatever the sender's settings.
const MAX_RANGES = 1024;
const MAX_VECTOR = 4096;

/** The anti-entropy side of one node's store. */
export class KvSync {
  readonly config: KvSyncConfig;
  readonly stats: KvSyncStats = {
    exchanges: 0,
    recordsSent: 0,
    bytesSent: 0,
    refused: 0,
    fullVectorsRequested: 0,
    rejectedSender: 0,
  };
  private readonly peers = new Map<NodeId, PeerState>();
  private timer: unknown = null;
  private running = false;
  private rotate = 0;
  private pullOrder: NodeId[] = [];
  private pullPos = 0;
  private digestCache = { key: "", digest: "" };
  // Until a peer has sent us what it holds of ours, our own entry stays out of the vector we show:
  // records of an earlier life of this node (a worker it no longer serves) come back to it that way,
  // and the worker registry deletes or re-asserts them.
  private ownCaughtUp = false;

  constructor(
    private readonly o: {
      kv: Kv;
      directory: SyncDirectory;
      transport: Transport;
      clock: Clock;
      log: Logger;
      random?: () => number;
      config?: Partial<KvSyncConfig>;
    },
  ) {
    this.config = { ...KV_SYNC_DEFAULTS, ...o.config };
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

  /** Stop the rounds; exchanges in flight are ignored when they settle. */
  stop(): void {
    this.running = false;
    if (this.timer !== null) this.o.clock.clearTimer(this.timer);
    this.timer = null;
  }

  /** Forget what we knew of `peer`'s replica (it restarted, or we dropped our state): everything is exchanged again. */
  resetPeer(peer: NodeId, restarted = false): void {
    const p = this.state(peer);
    p.known.clear();
    p.told.clear();
    p.toldVersion = "";
    p.sendFull = true;
    p.ownAcked = null;
    p.gen++;
    if (restarted) p.inSeq = 0;
  }

  /** Reset every peer (after this node dropped its replicated state). */
  resetAll(): void {
    for (const id of this.peers.keys()) this.resetPeer(id);
  }

  /** Drop a forgotten member's sync state. */
  forgetPeer(peer: NodeId): void {
    this.peers.delete(peer);
  }

  /** Whether every live member reported holding `owner`'s writes up to `hlc` (tombstones wait for this). */
  stable(owner: NodeId, hlc: Hlc): boolean {
    for (const id of this.o.directory.liveIds()) {
      const h = this.peers.get(id)?.known.get(owner);
      if (!h || compareHlc(h, hlc) < 0) return false;
    }
    return true;
  }

  /** One round: push own records where unacked, pull from one random peer, collect stable tombstones. */
  round(): void {
    this.o.directory.awake?.();
    const live = this.o.directory.liveIds();
    const mine = this.o.kv.haveOf(this.o.directory.id);
    const free = live.filter((id) => !this.peers.get(id)?.inFlight);
    const due = free.filter((id) => {
      const acked = this.peers.get(id)?.ownAcked;
      return mine !== undefined && (!acked || compareHlc(acked, mine) < 0);
    });
    const start = due.length > 0 ? this.rotate++ % due.length : 0;
    const push = [...due.slice(start), ...due.slice(0, start)].slice(0, this.config.pushPeersPerRound);
    const pull = this.nextPullPeer(free);
    for (const id of push) void this.exchange(id, id === pull);
    if (pull !== undefined && !push.includes(pull)) void this.exchange(pull, true);
    this.o.kv.collect((owner, hlc) => this.stable(owner, hlc));
  }

  // Randomised round-robin, as SWIM probes: every peer is pulled from once per n rounds, which bounds
  // how stale our knowledge of its vector gets (tombstone collection waits on it).
  private nextPullPeer(free: NodeId[]): NodeId | undefined {
    if (free.length === 0) return undefined;
    const ok = new Set(free);
    for (let tries = 0; tries < 2; tries++) {
      while (this.pullPos < this.pullOrder.length) {
        const id = this.pullOrder[this.pullPos++] as NodeId;
        if (ok.has(id)) return id;
      }
      this.pullOrder = this.shuffle(this.o.directory.liveIds());
      this.pullPos = 0;
    }
    return undefined;
  }

  private shuffle(xs: NodeId[]): NodeId[] {
    const random = this.o.random ?? Math.random;
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [xs[i], xs[j]] = [xs[j] as NodeId, xs[i] as NodeId];
    }
    return xs;
  }

  /**
   * Answer a peer's kv-sync; `from` is the node the transport authenticated (undefined if none), and the
   * message's id must be it: its seq, vector and acks are then the sender's own.
   */
  handle(msg: WireMessage, from: NodeId | undefined): WireMessage {
    const sender = msg.id;
    if (!isNodeId(sender)) return this.refuse("bad_message", "id must be a node id");
    const peer = this.o.directory.peer(sender);
    if (!peer || (peer.state !== "alive" && peer.state !== "suspect")) return this.refuse("not_member", "you are not a live member here");
    // A batch from an earlier life of the sender, or addressed to an earlier life of ours, may carry
    // state that was since dropped: refused, and the sender catches up first.
    if (msg.epoch !== peer.epoch || msg.toEpoch !== this.o.directory.self.epoch) return this.refuse("stale_epoch", "epoch mismatch");
    if (!isCount(msg.seq) || !isList(msg.ranges, MAX_RANGES)) return this.refuse("bad_message", "seq must be a count and ranges a list");
    const p = this.state(sender);
    // Messages of one sender apply in order: a delayed one must not roll its vector back.
    if (msg.seq <= p.inSeq) return this.refuse("stale_seq", "an older message than one already handled");
    if (from !== sender) {
      this.stats.rejectedSender++;
      this.o.log.warn("mesh refused a kv-sync sent on behalf of another node", { id: sender.slice(0, 8), from: from?.slice(0, 8) });
      return this.refuse("wrong_sender", "the message's id is not the authenticated sender");
    }
    p.inSeq = msg.seq;
    for (const r of msg.ranges) this.o.kv.applyRange(r);
    const me = this.o.directory.id;
    if (msg.pull !== true) return { type: "kv-ack", ok: true, id: me, ranges: [] };
    this.takeVector(p, msg);
    return { type: "kv-ack", ok: true, id: me, ...this.vectorFor(p), ranges: this.rangesFor(p) };
  }

  private async exchange(id: NodeId, pull: boolean): Promise<void> {
    const peer = this.o.directory.peer(id);
    if (!peer) return;
    const p = this.state(id);
    const gen = p.gen;
    const me = this.o.directory.id;
    const budget = { records: this.config.batchRecords, bytes: this.config.batchBytes };
    const own = this.o.kv.rangeFor(me, p.ownAcked, budget);
    // Vectors travel only on pulls: a push is just our new records and its ack.
    const msg = {
      type: "kv-sync",
      id: me,
      epoch: this.o.directory.self.epoch,
      toEpoch: peer.epoch,
      seq: ++p.outSeq,
      pull,
      ...(pull ? this.vectorFor(p) : {}),
      ranges: own ? [own] : [],
    };
    this.count(own ? [own] : []);
    p.inFlight = true;
    try {
      const reply = await this.o.transport.request(peer.addr, msg, this.config.syncTimeoutMs, id);
      if (!this.running || p.gen !== gen || this.peers.get(id) !== p) return;
      if (reply.type !== "kv-ack" || reply.ok !== true) {
        this.stats.refused++;
        if (pull) this.forgetTold(p);
        return;
      }
      // An ack (and the vector in it) counts only from the peer we asked.
      if (reply.id !== id) {
        this.stats.rejectedSender++;
        if (pull) this.forgetTold(p);
        return;
      }
      this.stats.exchanges++;
      if (pull) this.takeVector(p, reply);
      const ranges = isList(reply.ranges, MAX_RANGES) ? reply.ranges : [];
      for (const r of ranges) this.o.kv.applyRange(r);
      if (pull && !ranges.some((r) => isRange(r) && r.owner === me && r.more === true)) this.ownCaughtUp = true;
      if (own?.upTo && (!p.ownAcked || compareHlc(own.upTo, p.ownAcked) > 0)) p.ownAcked = own.upTo;
    } catch {
      // No answer: the same records go next round; a vector we sent goes again in full.
      if (pull) this.forgetTold(p);
    } finally {
      p.inFlight = false;
    }
  }

  // Our vector for `p`: the entries it has not seen, or all of them when asked; `told` is updated as if
  // delivered, and a lost message shows up at the peer as a digest mismatch, which asks for all.
  private vectorFor(p: PeerState): { vec: VectorEntry[]; full: boolean; digest: string; askFull: boolean } {
    const full = p.sendFull;
    const vec: VectorEntry[] = [];
    if (full || p.toldVersion !== this.shownVersion()) {
      const mine = this.shown();
      for (const [o, h] of mine) {
        const t = p.told.get(o);
        if (full || !t || compareHlc(t, h) !== 0) vec.push([o, h.w, h.l]);
      }
      if (!full) for (const o of p.told.keys()) if (!mine.has(o)) vec.push([o]);
      p.told = new Map(mine);
      p.toldVersion = this.shownVersion();
    }
    p.sendFull = false;
    const askFull = p.askFull;
    p.askFull = false;
    return { vec, full, digest: this.digest(), askFull };
  }

  private forgetTold(p: PeerState): void {
    p.told.clear();
    p.toldVersion = "";
    p.sendFull = true;
  }

  private takeVector(p: PeerState, msg: WireMessage): void {
    if (msg.askFull === true) p.sendFull = true;
    if (!isList(msg.vec, MAX_VECTOR) || !isStr(msg.digest, 64)) return;
    const me = this.o.directory.id;
    const before = p.known.get(me);
    if (msg.full === true) p.known.clear();
    for (const e of msg.vec) {
      if (!Array.isArray(e) || !isNodeId(e[0])) continue;
      if (e.length === 1) p.known.delete(e[0]);
      else if (isCount(e[1]) && isCount(e[2])) p.known.set(e[0], { w: e[1], l: e[2], n: e[0] });
    }
    if (p.known.digest() !== msg.digest) {
      // Some delta got lost: what we believe of the peer may be wrong, so believe nothing until it resends all.
      p.known.clear();
      p.askFull = true;
      this.stats.fullVectorsRequested++;
    }
    // The peer dropped our records (it declared us dead, or restarted): push them all again.
    const after = p.known.get(me);
    if (before && (!after || compareHlc(after, before) < 0)) p.ownAcked = after ?? null;
  }

  private rangesFor(p: PeerState): KvRange[] {
    const budget = { records: this.config.batchRecords, bytes: this.config.batchBytes };
    const out: KvRange[] = [];
    for (const [owner, have] of this.o.kv.vector()) {
      if (budget.records <= 0) break;
      const theirs = p.known.get(owner) ?? null;
      if (theirs && compareHlc(theirs, have) >= 0) continue;
      const r = this.o.kv.rangeFor(owner, theirs, budget);
      if (r) out.push(r);
    }
    this.count(out);
    return out;
  }

  private count(ranges: KvRange[]): void {
    for (const r of ranges) {
      this.stats.recordsSent += r.records.length;
      for (const rec of r.records) this.stats.bytesSent += recordBytes(rec);
    }
  }

  private shown(): ReadonlyMap<NodeId, Hlc> {
    const v = this.o.kv.vector();
    if (this.ownCaughtUp || !v.has(this.o.directory.id)) return v;
    const out = new Map(v);
    out.delete(this.o.directory.id);
    return out;
  }

  private shownVersion(): string {
    return `${this.o.kv.vectorVersion}/${this.ownCaughtUp}`;
  }

  private digest(): string {
    const key = this.shownVersion();
    if (this.digestCache.key !== key) this.digestCache = { key, digest: vectorDigest(this.shown()) };
    return this.digestCache.digest;
  }

  private state(id: NodeId): PeerState {
    let p = this.peers.get(id);
    if (!p) {
      p = {
        known: new Vector(),
        told: new Map(),
        toldVersion: "",
        sendFull: true,
        askFull: false,
        ownAcked: null,
        outSeq: 0,
        inSeq: 0,
        inFlight: false,
        gen: 0,
      };
      this.peers.set(id, p);
    }
    return p;
  }

  private refuse(code: string, message: string): WireMessage {
    return { type: "kv-ack", ok: false, code, message };
  }
}

function isRange(v: unknown): v is KvRange {
  return isObject(v) && isNodeId(v.owner) && Array.isArray(v.records);
}
