// Routing index sync: every node's own tenancy (which prompt prefixes its
// engines' KV holds) reaches the RoutingIndex of every node that wants that
// model. Seed 000's two-layer design, with each bug its reviewers found
// designed out:
//
// Layer 1, per round, per peer: pending changes coalesced by hash (the last
// change of a hash wins; a reset flag per model), kept until the peer ACKS
// them. One batch in flight per peer; a failed send puts it back under what
// is pending, newer changes winning, so nothing is lost. A batch is built up
// to a byte budget, never oversized; a peer that still answers "too large"
// gets its budget halved (to a floor), so no payload is resent unchanged
// forever. Pending is bounded per peer: past it, it is dropped for a full
// resync, which streams the own tenancy from a cursor instead of copying it.
// A full resync happens on demand only (a peer starts wanting a model, joins,
// restarts, or lost its base): there is no periodic snapshot or checkpoint,
// and an idle mesh runs no round at all.
//
// Under a sustained backlog a peer gets more than one batch a round: when an
// ack comes back and more is pending, the next batch goes at once (still one
// in flight), up to `burstBatches` a round. A full resync's cursor always gets
// half of a batch, so a backlog of changes cannot keep it from finishing. An
// insert still pending when its own eviction comes is dropped with it, when
// the peer cannot hold it (it was new to this node and nothing about it was
// pending): a prefix cached and evicted between two rounds costs no bytes.
//
// Layer 2, on demand: a receiver that gets a chain whose parent it does not
// hold (it joined late, or its index budget dropped the ancestor) asks the
// sender for the path root..parent, rate-limited per peer; the sender answers
// from its own tenancy, or not at all for what it no longer holds.
//
// Claims are single-writer: a batch changes only its sender's tenancy, is
// signed with the sender's key over both ends and both epochs, and must come
// from the authenticated sender. Hashes are per model (a batch names its
// model); eviction is an explicit list, never a sentinel hash.

import type { Logger } from "../log";
import { isCount, isList, isNodeId, isStr } from "../mesh/check";
import { type Identity, verifySignature } from "../mesh/identity";
import type { Kv } from "../mesh/kv";
import type { MembershipEvent } from "../mesh/membership";
import type { MeshDirectory, MeshExtension } from "../mesh/node";
import type { Clock, NodeId, Transport, WireMessage } from "../mesh/wire";
import { isPathHash } from "./key";
import { isModelName, type OwnCursor, type OwnTenancy, type TenancyDelta } from "./own";
import type { ModelIndex, RoutingIndex } from "./radix";
import {
  BATCH_HEADER_BYTES,
  base64Length,
  compress,
  compressedBound,
  decodeSections,
  decompress,
  encodeSections,
  HASH_SIZE,
  MAX_SECTIONS,
  RUN_HEADER_BYTES,
  type Section,
  sectionOverhead,
  signedBytes,
} from "./sync-wire";
import { WANT_KEY, WANTS_DEFAULTS, type WantChange, Wants, type WantsConfig } from "./wants";

export type { TenancyDelta } from "./own";

/** Message types of the sync. */
export const ROUTE_SYNC = "route-sync";
/** A receiver asking a sender for the paths to parents it lacks. */
export const ROUTE_PATH = "route-path";
const BATCH_DOMAIN = "mesh/route-sync/v1";
const PATH_DOMAIN = "mesh/route-path/v1";

/** Tunables of the sync; every one has a default. */
export interface RouteSyncConfig extends WantsConfig {
  /** A round: pending changes go out at most this often (the membership round). */
  roundMs: number;
  timeoutMs: number;
  /** Raw (uncompressed) bytes of a batch this node builds, at most: the starting budget of every peer. */
  batchBytes: number;
  /** A peer's budget is never halved below this. */
  minBatchBytes: number;
  /** Raw bytes of a batch this node accepts, at most; larger ones are answered "too large". */
  maxInboundBytes: number;
  /** Pending changes per peer, at most; past it, they are dropped and the peer resynced in full. */
  maxPendingOps: number;
  /** Longest wait before retrying a peer whose sends keep failing. */
  maxBackoffMs: number;
  /** Parents waiting for a path request, per peer, at most (the oldest goes first). */
  pathQueue: number;
  /** Hashes asked of one peer per round, at most. */
  pathPerRound: number;
  /** Longest path (pairs) answered for one hash. */
  pathMaxDepth: number;
  /** Times a hash is asked for before it is given up. */
  pathTries: number;
  /** Batches one peer gets per round, at most: after an ack, more pending goes at once, one in flight. */
  burstBatches: number;
}

/** Defaults: 1 s rounds, 32 KiB batches (floor 1 KiB) and up to 4 a round per peer, 50 000 pending changes per peer, 32 path hashes per peer a round. */
export const ROUTE_SYNC_DEFAULTS: RouteSyncConfig = {
  ...WANTS_DEFAULTS,
  roundMs: 1000,
  timeoutMs: 2000,
  batchBytes: 32 * 1024,
  minBatchBytes: 1024,
  maxInboundBytes: 128 * 1024,
  maxPendingOps: 50_000,
  maxBackoffMs: 30_000,
  pathQueue: 256,
  pathPerRound: 32,
  pathMaxDepth: 1024,
  pathTries: 2,
  burstBatches: 4,
};

/** Why an inbound message was refused. */
export type RefuseReason = "malformed" | "wrong_sender" | "not_member" | "stale_epoch" | "stale_seq" | "forged" | "too_large";

/** Counters and gauges for /metrics and `mesh peers`. */
export interface RouteSyncStats {
  /** Rounds that ran (none while the mesh is idle). */
  rounds: number;
  /** Bytes this node sent in the last round, and in all (batches, path requests and path answers). */
  bytesLastRound: number;
  bytesSent: number;
  batchesSent: number;
  batchesAcked: number;
  batchesFailed: number;
  /** Batches that left pending changes behind for the budget. */
  batchesSplit: number;
  /** Times a peer's "too large" answer halved its budget. */
  budgetHalvings: number;
  /** Batches encoded (an idle mesh encodes none). */
  encodes: number;
  insertsSent: number;
  evictsSent: number;
  /** Pending inserts dropped with their eviction before they were sent (the peer never held them). */
  cancelled: number;
  /** Batches sent right after an ack, before the next round (a backlog draining). */
  burstSent: number;
  insertsApplied: number;
  evictsApplied: number;
  /** Full resyncs started (per peer and model), and those a receiver asked for. */
  resyncs: number;
  resyncsAsked: number;
  /** Peers whose pending changes overflowed the bound (dropped for a full resync). */
  pendingOverflows: number;
  /** Sections of models this node does not want (skipped, acked). */
  ignoredUnwanted: number;
  pathRequestsSent: number;
  pathRequestsAnswered: number;
  pathHashesRequested: number;
  pathHashesResolved: number;
  pathHashesGivenUp: number;
  /** Gauge: parents queued or asked for and not resolved yet. */
  unresolved: number;
  /** Gauge: changes pending for peers. */
  pendingOps: number;
  /** Gauge: models this node wants. */
  wanted: number;
  /** Peers' wanted-set records that did not parse (such a peer wants nothing). */
  badWantRecords: number;
  refused: Record<RefuseReason, number>;
}

/** What the sync is built from. */
export interface RouteSyncOptions {
  selfId: NodeId;
  identity: Identity;
  directory: MeshDirectory;
  store: Kv;
  transport: Transport;
  clock: Clock;
  index: RoutingIndex;
  own: OwnTenancy;
  config?: Partial<RouteSyncConfig>;
  log: Logger;
  /** Random numbers in [0, 1) to jitter retry backoff; without it, no jitter. */
  random?: () => number;
}

// A pending eviction (an insert's value is its parent).
const EVICT = 0;
type Op = string | null | typeof EVICT;

/** What is pending for one peer and model. */
interface ModelOut {
  reset: boolean;
  /**
   * The next section for the model carries a reset, though the reset alone is no work: the peer started
   * wanting a model this node held none of, so every change since is pending, and reset + pending is all of it.
   */
  resetNext: boolean;
  /** The last change of each hash, in the order first changed (chain order for inserts). */
  ops: Map<string, Op>;
  /**
   * Pending inserts the peer cannot hold: new to this node's tenancy, with nothing about them pending or
   * unacked before. Their eviction drops them instead of queueing an evict.
   */
  fresh: Set<string>;
  /** A full sync streaming the own tenancy. */
  cursor: OwnCursor | null;
  /** Changed by every full resync (and new for every new stream): a failed batch built before it is not put back. */
  gen: number;
}

interface SentSection extends Section {
  gen: number;
}

interface InFlight {
  sections: SentSection[];
}

interface PathAsk {
  model: string;
  hash: string;
  tries: number;
}

interface Peer {
  id: NodeId;
  // Sending: the epoch of the peer our stream is addressed to.
  epoch: string;
  out: Map<string, ModelOut>;
  ops: number;
  inFlight: InFlight | null;
  budget: number;
  fails: number;
  retryAt: number;
  // Receiving: the sender's epoch and last sequence number applied.
  inEpoch: string | null;
  inSeq: number;
  /** Per model: the index we hold the sender's full tenancy in (its base), or null when applied without one. */
  inModels: Map<string, ModelIndex | null>;
  pathQueue: Map<string, PathAsk>;
  pathInFlight: PathAsk[] | null;
  /** Batches sent in round `burstRound`. */
  burst: number;
  burstRound: number;
  /** Clock ms of the last batch this peer acked, and of the last batch applied from it (0: never): the console's sync freshness. */
  ackedAt: number;
  appliedAt: number;
}

/** One peer's sync state, as the console shows it. */
export interface PeerSyncState {
  node: NodeId;
  /** Milliseconds since the peer last acked a batch of ours, and since we last applied one of its; null: never. */
  sinceAckMs: number | null;
  sinceAppliedMs: number | null;
  /** Changes queued for it, failed sends in a row, and parents we asked it for. */
  pendingOps: number;
  fails: number;
  unresolved: number;
}

const live = (state: string) => state === "alive" || state === "suspect";

/** Cache-aware routing's index sync, riding on the mesh core. */
export class RouteSync implements MeshExtension {
  readonly types: string[] = [ROUTE_SYNC, ROUTE_PATH];
  readonly config: RouteSyncConfig;
  private readonly wantsOf: Wants;
  private readonly peers = new Map<NodeId, Peer>();
  /** Peers with something to send or ask. */
  private readonly dirty = new Set<NodeId>();
  private readonly s: Omit<RouteSyncStats, "bytesLastRound" | "unresolved" | "pendingOps" | "wanted" | "badWantRecords" | "refused">;
  private readonly refused: Record<RefuseReason, number> = {
    malformed: 0,
    wrong_sender: 0,
    not_member: 0,
    stale_epoch: 0,
    stale_seq: 0,
    forged: 0,
    too_large: 0,
  };
  private seq = 0;
  /** Generations of ModelOut streams, never reused: a batch built for a stream that was replaced is never put back into its successor. */
  private gens = 0;
  private running = false;
  private roundTimer: unknown = null;
  private expiryTimer: unknown = null;
  private roundBytes = 0;
  private lastRoundAt = Number.NEGATIVE_INFINITY;
  private readonly maxInboundB64: number;

  constructor(private readonly o: RouteSyncOptions) {
    this.config = { ...ROUTE_SYNC_DEFAULTS, ...o.config };
    this.config.minBatchBytes = Math.max(512, this.config.minBatchBytes);
    this.config.batchBytes = Math.max(this.config.minBatchBytes, this.config.batchBytes);
    this.maxInboundB64 = base64Length(compressedBound(this.config.maxInboundBytes));
    this.wantsOf = new Wants({ selfId: o.selfId, store: o.store, now: () => o.clock.now(), config: this.config });
    this.s = {
      rounds: 0,
      bytesSent: 0,
      batchesSent: 0,
      batchesAcked: 0,
      batchesFailed: 0,
      batchesSplit: 0,
      budgetHalvings: 0,
      encodes: 0,
      insertsSent: 0,
      evictsSent: 0,
      cancelled: 0,
      burstSent: 0,
      insertsApplied: 0,
      evictsApplied: 0,
      resyncs: 0,
      resyncsAsked: 0,
      pendingOverflows: 0,
      ignoredUnwanted: 0,
      pathRequestsSent: 0,
      pathRequestsAnswered: 0,
      pathHashesRequested: 0,
      pathHashesResolved: 0,
      pathHashesGivenUp: 0,
    };
  }

  /** Start: publish the wanted set if it is not in the store yet, and arm what is due. */
  start(): void {
    if (this.running) return;
    this.running = true;
    if (this.wantsOf.dirty || this.dirty.size > 0) this.armRound();
    this.armExpiry();
  }

  /** Stop every timer; exchanges in flight are ignored when they settle. */
  stop(): void {
    this.running = false;
    if (this.roundTimer !== null) this.o.clock.clearTimer(this.roundTimer);
    if (this.expiryTimer !== null) this.o.clock.clearTimer(this.expiryTimer);
    this.roundTimer = null;
    this.expiryTimer = null;
  }

  /** Queue this node's own tenancy change for every peer that wants `model` (the caller applied it to `own` and to the index). */
  publish(model: string, delta: TenancyDelta): void {
    const peers = this.wantsOf.wanting(model);
    if (peers.size === 0) return;
    // What goes out is what `own` holds now: a change it refused (bound, malformed hash) is not claimed.
    const own = this.o.own;
    const inserts: Array<[string, string | null]> = [];
    // Whether each insert is new to this node (not held before this change): only those can be fresh.
    const isNew: boolean[] = [];
    const evicts: string[] = [];
    for (const h of delta.evicts) if (!own.has(model, h)) evicts.push(h);
    for (const [h] of delta.inserts) {
      const parent = own.parentOf(model, h);
      if (parent === undefined) continue;
      inserts.push([h, parent]);
      isNew.push(own.addedByLastApply(model, h));
    }
    if (inserts.length === 0 && evicts.length === 0) return;
    for (const id of peers) {
      const p = this.peerFor(id);
      if (!p) continue;
      const mo = this.modelOut(p, model);
      for (const h of evicts) {
        if (mo.fresh.delete(h)) {
          // Never sent, and the peer cannot hold it from before: the insert and its eviction cancel out.
          mo.ops.delete(h);
          p.ops--;
          this.s.cancelled++;
        } else this.setOp(p, mo, h, EVICT);
      }
      for (let i = 0; i < inserts.length; i++) {
        const [h, parent] = inserts[i] as [string, string | null];
        const pending = mo.ops.has(h);
        this.setOp(p, mo, h, parent);
        // Nothing about it pending, nothing unacked (a failed batch puts its changes back and unmarks these): the peer lacks it.
        if (!pending && isNew[i]) mo.fresh.add(h);
      }
      if (p.ops > this.config.maxPendingOps) this.overflow(p);
      this.markDirty(p);
    }
  }

  /** This node's own tenancy of `model` was replaced wholesale (e.g. `own.dropModel`): every peer wanting it is resynced. */
  resync(model: string): void {
    for (const id of this.wantsOf.wanting(model)) {
      const p = this.peerFor(id);
      if (p) this.scheduleFull(p, model);
    }
  }

  /** This node routed a request for `model`: it wants the model's index for the TTL. */
  noteRouted(model: string): void {
    const ch = this.wantsOf.noteRouted(model);
    if (ch) this.ownWantsChanged(ch);
    // A note only pushes expiry later: a timer already armed fires early at worst and re-arms.
    if (this.expiryTimer === null) this.armExpiry();
  }

  /** The models this node serves (wanted when `wantServed`). */
  setServed(models: string[]): void {
    const ch = this.wantsOf.setServed(models);
    if (ch) this.ownWantsChanged(ch);
  }

  /** The models `peer` wants (this node's own set for its own id). */
  wants(peer: NodeId): ReadonlySet<string> {
    return this.wantsOf.of(peer);
  }

  /** Answer a peer's message (already authenticated by the transport as coming from `from`); never throws. */
  async handle(msg: WireMessage, from?: NodeId): Promise<WireMessage> {
    if (msg.type === ROUTE_SYNC) return this.onBatch(msg, from);
    if (msg.type === ROUTE_PATH) return this.onPathRequest(msg, from);
    return this.refuse("malformed", "unknown message type");
  }

  /** Membership changed: a node that went down or restarted loses its tenancy everywhere; one that came up or restarted is resynced. */
  onMembership(e: MembershipEvent): void {
    switch (e.kind) {
      case "down":
      case "forgotten":
        this.forgetNode(e.id);
        break;
      case "epoch":
        this.forgetNode(e.id);
        this.resyncPeer(e.id);
        break;
      case "up":
        if (e.back) this.forgetNode(e.id);
        this.resyncPeer(e.id);
        break;
      case "self-reset":
        // Our new epoch makes every receiver drop what it holds of ours: each needs it all again.
        for (const id of this.wantsOf.peerIds()) this.resyncPeer(id);
        break;
    }
  }

  /** A record of the store changed: a peer's (or our own) wanted set. */
  onStoreChange(owner: NodeId, key: string): void {
    if (key !== WANT_KEY) return;
    if (owner === this.o.selfId) {
      // An earlier life's record came back, or ours was overwritten: re-assert the current set.
      if (this.wantsOf.dirty) this.armRound();
      return;
    }
    const ch = this.wantsOf.refresh(owner);
    if (ch.added.length === 0 && ch.removed.length === 0) return;
    const p = this.peerFor(owner);
    if (!p) return;
    for (const m of ch.removed) {
      const mo = p.out.get(m);
      if (!mo) continue;
      p.ops -= mo.ops.size;
      p.out.delete(m);
    }
    for (const m of ch.added) this.startStream(p, m);
  }

  /** Each peer's sync state (bounded by the members). */
  peerStates(): PeerSyncState[] {
    const now = this.o.clock.now();
    const since = (t: number) => (t > 0 ? Math.max(0, now - t) : null);
    return [...this.peers.values()].map((p) => ({
      node: p.id,
      sinceAckMs: since(p.ackedAt),
      sinceAppliedMs: since(p.appliedAt),
      pendingOps: p.ops,
      fails: p.fails,
      unresolved: p.pathQueue.size + (p.pathInFlight?.length ?? 0),
    }));
  }

  /** Counters and gauges. */
  stats(): RouteSyncStats {
    let unresolved = 0;
    let pendingOps = 0;
    for (const p of this.peers.values()) {
      unresolved += p.pathQueue.size + (p.pathInFlight?.length ?? 0);
      pendingOps += p.ops;
    }
    // No round runs while idle: the last round's bytes stand for a round ago at most, then for nothing.
    const recent = this.o.clock.now() - this.lastRoundAt <= this.config.roundMs;
    return {
      ...this.s,
      bytesLastRound: recent ? this.roundBytes : 0,
      unresolved,
      pendingOps,
      wanted: this.wantsOf.mine().size,
      badWantRecords: this.wantsOf.malformed,
      refused: { ...this.refused },
    };
  }

  /** Pending changes and budget for one peer (diagnostics and tests). */
  peerState(id: NodeId): { ops: number; budget: number; inFlight: boolean; queuedPaths: number } | undefined {
    const p = this.peers.get(id);
    return p && { ops: p.ops, budget: p.budget, inFlight: p.inFlight !== null, queuedPaths: p.pathQueue.size };
  }

  // ---- rounds ------------------------------------------------------------------------------------

  private armRound(): void {
    if (!this.running || this.roundTimer !== null) return;
    this.roundTimer = this.o.clock.setTimer(() => this.round(), this.config.roundMs);
  }

  private armExpiry(): void {
    const at = this.wantsOf.nextExpiry;
    if (!this.running || at === Number.POSITIVE_INFINITY) return;
    if (this.expiryTimer !== null) this.o.clock.clearTimer(this.expiryTimer);
    this.expiryTimer = this.o.clock.setTimer(
      () => {
        this.expiryTimer = null;
        const ch = this.wantsOf.expire();
        if (ch) this.ownWantsChanged(ch);
        this.armExpiry();
      },
      Math.max(0, at - this.o.clock.now()),
    );
  }

  private round(): void {
    this.roundTimer = null;
    if (!this.running) return;
    this.s.rounds++;
    if (this.wantsOf.dirty) this.wantsOf.flush();
    this.roundBytes = 0;
    const now = this.o.clock.now();
    for (const id of this.dirty) {
      const p = this.peers.get(id);
      const info = this.o.directory.peer(id);
      if (!p) {
        this.dirty.delete(id);
        continue;
      }
      if (!info || !live(info.state)) {
        // Gone from the table, or down: what its down event does, in case that event never comes.
        this.forgetNode(id);
        continue;
      }
      if (info.epoch !== p.epoch) {
        // It restarted and we have not heard the event yet: the stream starts over for its new life.
        this.forgetNode(id);
        this.resyncPeer(id);
        continue;
      }
      const sendWork = this.hasSendWork(p);
      if (sendWork && p.inFlight === null && now >= p.retryAt) this.send(p, info.addr);
      if (p.pathQueue.size > 0 && p.pathInFlight === null) this.askPaths(p, info.addr);
      if (!sendWork && p.pathQueue.size === 0) this.dirty.delete(id);
    }
    this.lastRoundAt = now;
    if (this.dirty.size > 0) this.armRound();
  }

  private markDirty(p: Peer): void {
    this.dirty.add(p.id);
    this.armRound();
  }

  // ---- sending -----------------------------------------------------------------------------------

  private hasSendWork(p: Peer): boolean {
    for (const mo of p.out.values()) if (mo.reset || mo.ops.size > 0 || mo.cursor !== null) return true;
    return false;
  }

  private send(p: Peer, addr: string): void {
    const sections = this.build(p);
    if (sections.length === 0) return;
    if (p.burstRound !== this.s.rounds) {
      p.burstRound = this.s.rounds;
      p.burst = 0;
    }
    p.burst++;
    const payload = encodeSections(sections);
    this.s.encodes++;
    const data = compress(payload);
    const seq = ++this.seq;
    const me = this.o.selfId;
    const myEpoch = this.o.directory.self.epoch;
    const sig = this.o.identity.sign(signedBytes(BATCH_DOMAIN, me, myEpoch, p.id, p.epoch, seq, data));
    const msg: WireMessage = { type: ROUTE_SYNC, id: me, epoch: myEpoch, toEpoch: p.epoch, seq, data: data.toString("base64"), sig };
    const bytes = wireBytes(msg);
    this.roundBytes += bytes;
    this.s.bytesSent += bytes;
    this.s.batchesSent++;
    for (const s of sections) {
      this.s.insertsSent += s.inserts.length;
      this.s.evictsSent += s.evicts.length;
    }
    const sent: InFlight = { sections };
    p.inFlight = sent;
    void this.exchange(p, addr, msg, sent);
  }

  private async exchange(p: Peer, addr: string, msg: WireMessage, sent: InFlight): Promise<void> {
    let reply: WireMessage | null = null;
    try {
      reply = await this.o.transport.request(addr, msg, this.config.timeoutMs, p.id);
    } catch {
      reply = null;
    }
    // A peer dropped meanwhile (down, restarted) starts over from a full resync: this batch is moot.
    // (A node stopped meanwhile still settles it, so a node thawed later is not stuck with it in flight.)
    if (this.peers.get(p.id) !== p || p.inFlight !== sent) return;
    p.inFlight = null;
    if (reply !== null && reply.type === "route-ack" && reply.ok === true && reply.id === p.id) {
      this.s.batchesAcked++;
      p.ackedAt = this.o.clock.now();
      p.fails = 0;
      p.retryAt = 0;
      if (isList(reply.resync, MAX_SECTIONS)) {
        for (const m of reply.resync) {
          if (!isModelName(m) || !this.wantsOf.of(p.id).has(m)) continue;
          this.s.resyncsAsked++;
          this.scheduleFull(p, m);
        }
      }
      // A backlog drains at once, one batch in flight, up to burstBatches a round; the rest waits for the next round.
      const info = this.o.directory.peer(p.id);
      if (
        this.running &&
        p.burstRound === this.s.rounds &&
        p.burst < this.config.burstBatches &&
        info !== undefined &&
        live(info.state) &&
        info.epoch === p.epoch &&
        this.hasSendWork(p)
      ) {
        this.s.burstSent++;
        this.send(p, info.addr);
        if (p.inFlight !== null) return;
      }
    } else {
      this.s.batchesFailed++;
      const code = reply?.type === "error" ? reply.code : undefined;
      let halved = false;
      if (code === "too_large" && p.budget > this.config.minBatchBytes) {
        p.budget = Math.max(this.config.minBatchBytes, Math.floor(p.budget / 2));
        this.s.budgetHalvings++;
        halved = true;
      }
      this.mergeBack(p, sent);
      p.fails++;
      // A smaller budget is tried next round; anything else backs off, so a refusing peer costs little.
      const backoff = Math.min(this.config.maxBackoffMs, this.config.roundMs * 2 ** (p.fails - 1));
      // Jitter, when given randomness, spreads the retries of many nodes after one shared outage.
      const jitter = this.o.random ? 0.75 + 0.5 * this.o.random() : 1;
      p.retryAt = halved ? 0 : this.o.clock.now() + backoff * jitter;
      if (code !== undefined) this.o.log.debug("route sync batch refused", { peer: p.id.slice(0, 8), code: String(code).slice(0, 32) });
    }
    if (this.hasSendWork(p)) this.markDirty(p);
  }

  // Take what fits the peer's budget out of its pending changes: per model the reset, its changes in the
  // order made, then the full sync's cursor. The size is counted as the encoder will write it (upper
  // bounds), so the batch never exceeds the budget.
  private build(p: Peer): SentSection[] {
    const budget = p.budget;
    let used = BATCH_HEADER_BYTES;
    const sections: SentSection[] = [];
    let more = false;
    for (const [model, mo] of p.out) {
      if (mo.cursor?.stale) this.scheduleFull(p, model);
      if (!mo.reset && mo.ops.size === 0 && mo.cursor === null) continue;
      const over = sectionOverhead(model);
      if (sections.length >= MAX_SECTIONS || (sections.length > 0 && used + over + RUN_HEADER_BYTES + HASH_SIZE > budget)) {
        more = true;
        break;
      }
      used += over;
      const sec: SentSection = { model, reset: mo.reset || mo.resetNext, syncing: false, evicts: [], inserts: [], gen: mo.gen };
      mo.reset = false;
      mo.resetNext = false;
      let last: string | null = null;
      let taken = 0;
      // A full sync streaming gets at least half of what is left, so a steady backlog cannot starve it.
      const opsBudget = mo.cursor !== null ? used + Math.floor((budget - used) / 2) : budget;
      for (const [h, op] of mo.ops) {
        const cost = op === EVICT || (op !== null && op === last) ? HASH_SIZE : HASH_SIZE + RUN_HEADER_BYTES;
        if (used + cost > opsBudget) {
          more = true;
          break;
        }
        used += cost;
        taken++;
        if (op === EVICT) sec.evicts.push(h);
        else {
          sec.inserts.push([h, op]);
          last = h;
        }
      }
      p.ops -= taken;
      // Taking them all is the common case: a fresh map leaves no deleted slots for the next walk.
      if (taken === mo.ops.size) {
        mo.ops = new Map();
        mo.fresh = new Set();
      } else {
        for (const h of sec.evicts) mo.ops.delete(h);
        for (const [h] of sec.inserts) {
          mo.ops.delete(h);
          mo.fresh.delete(h);
        }
      }
      if (mo.cursor !== null) {
        const c = mo.cursor;
        let left = false;
        for (let e = c.peek(); e !== null; e = c.peek()) {
          const cost = e[1] !== null && e[1] === last ? HASH_SIZE : HASH_SIZE + RUN_HEADER_BYTES;
          if (used + cost > budget) {
            left = true;
            break;
          }
          used += cost;
          c.take();
          sec.inserts.push(e);
          last = e[0];
        }
        if (left) more = true;
        else mo.cursor = null;
      }
      sec.syncing = mo.cursor !== null;
      // A cursor that found nothing left (its model emptied meanwhile) makes no section.
      if (sec.reset || sec.evicts.length > 0 || sec.inserts.length > 0) sections.push(sec);
      else used -= over;
      if (more) break;
    }
    if (more) this.s.batchesSplit++;
    return sections;
  }

  // A failed batch goes back under what is pending: older than anything queued since, so a hash changed
  // meanwhile keeps its newer change; a model resynced meanwhile (gen moved) or no longer wanted takes nothing.
  private mergeBack(p: Peer, sent: InFlight): void {
    for (const sec of sent.sections) {
      const mo = p.out.get(sec.model);
      if (!mo || mo.gen !== sec.gen) continue;
      if (sec.reset) mo.reset = true;
      const merged = new Map<string, Op>();
      // The batch may have applied (only its ack was lost): a newer pending insert of one of its hashes
      // is no longer one the peer cannot hold.
      for (const h of sec.evicts) {
        if (!mo.ops.has(h)) merged.set(h, EVICT);
        else mo.fresh.delete(h);
      }
      for (const [h, parent] of sec.inserts) {
        if (!mo.ops.has(h)) merged.set(h, parent);
        else mo.fresh.delete(h);
      }
      p.ops += merged.size;
      for (const [h, op] of mo.ops) merged.set(h, op);
      mo.ops = merged;
    }
    if (p.ops > this.config.maxPendingOps) this.overflow(p);
  }

  private setOp(p: Peer, mo: ModelOut, hash: string, op: Op): void {
    const cur = mo.ops.get(hash);
    if (cur === undefined && !mo.ops.has(hash)) {
      mo.ops.set(hash, op);
      p.ops++;
      return;
    }
    if (cur === op) return;
    // A change of kind (insert <-> evict) is the newest change: it moves to the end, after what it may depend on.
    mo.ops.delete(hash);
    mo.ops.set(hash, op);
  }

  private overflow(p: Peer): void {
    this.s.pendingOverflows++;
    this.o.log.info("route sync pending overflowed; resyncing the peer in full", { peer: p.id.slice(0, 8), ops: p.ops });
    for (const model of p.out.keys()) this.scheduleFull(p, model);
  }

  private scheduleFull(p: Peer, model: string): void {
    const mo = this.modelOut(p, model);
    p.ops -= mo.ops.size;
    mo.ops = new Map();
    mo.fresh = new Set();
    mo.reset = true;
    mo.cursor = this.o.own.cursor(model);
    mo.gen = ++this.gens;
    this.s.resyncs++;
    this.markDirty(p);
  }

  private resyncPeer(id: NodeId): void {
    const p = this.peerFor(id);
    if (!p) return;
    for (const m of this.wantsOf.of(id)) this.startStream(p, m);
  }

  // A peer starts wanting `model` (or starts over): it gets all of it. When this node holds none of it,
  // nothing is sent now (no burst of empty resets from every node to a node that starts routing a
  // model); the reset rides on the first change this node makes.
  private startStream(p: Peer, model: string): void {
    if (this.o.own.size(model) > 0) this.scheduleFull(p, model);
    else this.modelOut(p, model).resetNext = true;
  }

  private modelOut(p: Peer, model: string): ModelOut {
    let mo = p.out.get(model);
    if (!mo) {
      mo = { reset: false, resetNext: false, ops: new Map(), fresh: new Set(), cursor: null, gen: ++this.gens };
      p.out.set(model, mo);
    }
    return mo;
  }

  // ---- receiving ---------------------------------------------------------------------------------

  private onBatch(msg: WireMessage, from: NodeId | undefined): WireMessage {
    const id = msg.id;
    if (!isNodeId(id) || !isStr(msg.epoch, 128) || !isStr(msg.toEpoch, 128) || !isCount(msg.seq) || !isStr(msg.sig, 128)) {
      return this.refuse("malformed", "id, epoch, toEpoch, seq and sig are required");
    }
    if (typeof msg.data !== "string") return this.refuse("malformed", "data must be base64");
    if (from !== id || id === this.o.selfId) {
      this.o.log.warn("route sync refused a batch sent on behalf of another node", { id: id.slice(0, 8), from: from?.slice(0, 8) });
      return this.refuse("wrong_sender", "the batch's id is not the authenticated sender");
    }
    const info = this.o.directory.peer(id);
    if (!info || !live(info.state)) return this.refuse("not_member", "you are not a live member here");
    // A batch of an earlier life of the sender, or for an earlier life of ours, is about state since dropped.
    if (msg.epoch !== info.epoch || msg.toEpoch !== this.o.directory.self.epoch) return this.refuse("stale_epoch", "epoch mismatch");
    if (msg.data.length > this.maxInboundB64) return this.refuse("too_large", `batch over ${this.config.maxInboundBytes} bytes`);
    const data = Buffer.from(msg.data, "base64");
    const signed = signedBytes(BATCH_DOMAIN, id, msg.epoch, this.o.selfId, msg.toEpoch, msg.seq, data);
    if (!verifySignature(info.publicKey, signed, msg.sig)) {
      this.o.log.warn("route sync refused a batch not signed by its sender", { id: id.slice(0, 8) });
      return this.refuse("forged", "bad signature");
    }
    const known = this.peers.get(id);
    const sameLife = known !== undefined && known.inEpoch === msg.epoch;
    // Batches of one sender apply in order: a delayed one must not undo what a later one did.
    if (sameLife && msg.seq <= known.inSeq) return this.refuse("stale_seq", "an older batch than one already applied");
    const raw = decompress(data, this.config.maxInboundBytes);
    if (!raw.ok) return this.refuse(raw.code, raw.message);
    const dec = decodeSections(raw.value);
    if (!dec.ok) return this.refuse(dec.code, dec.message);
    const p = this.peerFor(id);
    if (!p) return this.refuse("not_member", "you are not a live member here");
    if (p.inEpoch !== msg.epoch) this.newSenderLife(p, msg.epoch);
    p.inSeq = msg.seq;
    p.appliedAt = this.o.clock.now();
    const resync: string[] = [];
    for (const sec of dec.value) {
      if (!this.wantsOf.has(sec.model)) {
        this.s.ignoredUnwanted++;
        continue;
      }
      const idx = this.o.index.model(sec.model);
      if (sec.reset) {
        idx.dropHolder(id);
        p.inModels.set(sec.model, idx);
      } else if (p.inModels.get(sec.model) !== idx) {
        // No base for this stream (we restarted, dropped the model, or the index's bound dropped it):
        // apply what we can and ask for all of it.
        p.inModels.set(sec.model, null);
        resync.push(sec.model);
      }
      for (const h of sec.evicts) if (idx.evict(id, h)) this.s.evictsApplied++;
      if (sec.inserts.length > 0) {
        const dangling = idx.insertPath(id, sec.inserts);
        this.s.insertsApplied += sec.inserts.length;
        // While a full sync streams, a missing parent is still on its way.
        if (!sec.syncing) for (const h of dangling) this.queuePath(p, sec.model, h, 0);
      }
    }
    return { type: "route-ack", ok: true, id: this.o.selfId, resync };
  }

  // A batch from a new life of its sender: what its earlier life held is gone.
  private newSenderLife(p: Peer, epoch: string): void {
    if (p.inEpoch !== null) this.o.index.dropHolder(p.id);
    p.inEpoch = epoch;
    p.inSeq = 0;
    p.inModels.clear();
    this.s.pathHashesGivenUp += p.pathQueue.size + (p.pathInFlight?.length ?? 0);
    p.pathQueue.clear();
    // An answer still on its way is about the earlier life: it is dropped when it lands.
    p.pathInFlight = null;
  }

  // ---- layer 2: paths to missing parents ---------------------------------------------------------

  private queuePath(p: Peer, model: string, hash: string, tries: number): void {
    const key = `${model}\n${hash}`;
    if (p.pathQueue.has(key) || p.pathInFlight?.some((a) => a.model === model && a.hash === hash)) return;
    if (p.pathQueue.size >= this.config.pathQueue) {
      p.pathQueue.delete(p.pathQueue.keys().next().value as string);
      this.s.pathHashesGivenUp++;
    }
    p.pathQueue.set(key, { model, hash, tries });
    this.markDirty(p);
  }

  private askPaths(p: Peer, addr: string): void {
    const asks: PathAsk[] = [];
    for (const [key, a] of p.pathQueue) {
      if (asks.length >= this.config.pathPerRound) break;
      p.pathQueue.delete(key);
      // Resolved meanwhile (a later batch brought it), or the model is no longer wanted: nothing to ask.
      const based = p.inModels.get(a.model);
      if (!this.wantsOf.has(a.model) || based === undefined || this.o.index.peek(a.model)?.holds(p.id, a.hash)) continue;
      asks.push(a);
    }
    if (asks.length === 0) return;
    const byModel = new Map<string, string[]>();
    for (const a of asks) {
      const hs = byModel.get(a.model);
      if (hs) hs.push(a.hash);
      else byModel.set(a.model, [a.hash]);
    }
    const msg: WireMessage = {
      type: ROUTE_PATH,
      id: this.o.selfId,
      epoch: this.o.directory.self.epoch,
      toEpoch: p.inEpoch,
      want: [...byModel],
    };
    const bytes = wireBytes(msg);
    this.roundBytes += bytes;
    this.s.bytesSent += bytes;
    this.s.pathRequestsSent++;
    this.s.pathHashesRequested += asks.length;
    p.pathInFlight = asks;
    void this.pathExchange(p, addr, msg, asks);
  }

  private async pathExchange(p: Peer, addr: string, msg: WireMessage, asks: PathAsk[]): Promise<void> {
    let reply: WireMessage | null = null;
    try {
      reply = await this.o.transport.request(addr, msg, this.config.timeoutMs, p.id);
    } catch {
      reply = null;
    }
    if (this.peers.get(p.id) !== p || p.pathInFlight !== asks) return;
    p.pathInFlight = null;
    const applied = reply !== null && this.applyPaths(p, reply);
    if (applied === "stale" || applied === false) {
      // Unanswered, or answered before a batch we applied since: ask again, a bounded number of times.
      for (const a of asks) {
        if (a.tries + 1 < this.config.pathTries) this.queuePath(p, a.model, a.hash, a.tries + 1);
        else this.s.pathHashesGivenUp++;
      }
    } else {
      this.s.pathRequestsAnswered++;
      for (const a of asks) {
        if (this.o.index.peek(a.model)?.holds(p.id, a.hash)) this.s.pathHashesResolved++;
        // The sender no longer holds it: its eviction is on its way, nothing to resolve.
        else this.s.pathHashesGivenUp++;
      }
    }
    if (p.pathQueue.size > 0) this.markDirty(p);
  }

  private applyPaths(p: Peer, reply: WireMessage): boolean | "stale" {
    const epoch = p.inEpoch;
    if (reply.type !== "route-paths" || reply.ok !== true || reply.id !== p.id || epoch === null || reply.epoch !== epoch) return false;
    if (!isCount(reply.asOf) || typeof reply.data !== "string" || !isStr(reply.sig, 128)) return false;
    if (reply.data.length > this.maxInboundB64) return false;
    const info = this.o.directory.peer(p.id);
    if (!info) return false;
    const data = Buffer.from(reply.data, "base64");
    const signed = signedBytes(PATH_DOMAIN, p.id, epoch, this.o.selfId, this.o.directory.self.epoch, reply.asOf, data);
    if (!verifySignature(info.publicKey, signed, reply.sig)) {
      this.refused.forged++;
      return false;
    }
    // The answer shows the sender's tenancy as of its batch `asOf`; a later batch applied here may
    // have evicted some of it since, and applying the answer now would bring those back as zombies.
    if (p.inSeq > reply.asOf) return "stale";
    const raw = decompress(data, this.config.maxInboundBytes);
    if (!raw.ok) return false;
    const dec = decodeSections(raw.value);
    if (!dec.ok) return false;
    for (const sec of dec.value) {
      if (!this.wantsOf.has(sec.model) || !p.inModels.has(sec.model) || sec.reset || sec.evicts.length > 0) continue;
      // What an answer leaves dangling is not asked for again: the sender answered all it holds.
      if (sec.inserts.length > 0) this.o.index.model(sec.model).insertPath(p.id, sec.inserts);
    }
    return true;
  }

  private onPathRequest(msg: WireMessage, from: NodeId | undefined): WireMessage {
    const id = msg.id;
    if (!isNodeId(id) || !isStr(msg.epoch, 128) || !isStr(msg.toEpoch, 128) || !isList(msg.want, MAX_SECTIONS)) {
      return this.refuse("malformed", "id, epoch, toEpoch and want are required");
    }
    if (from !== id || id === this.o.selfId) return this.refuse("wrong_sender", "the request's id is not the authenticated sender");
    const info = this.o.directory.peer(id);
    if (!info || !live(info.state)) return this.refuse("not_member", "you are not a live member here");
    if (msg.epoch !== info.epoch || msg.toEpoch !== this.o.directory.self.epoch) return this.refuse("stale_epoch", "epoch mismatch");
    // Grouped by model: an answer names each model once.
    const want = new Map<string, string[]>();
    let total = 0;
    for (const w of msg.want) {
      if (!Array.isArray(w) || w.length !== 2 || !isModelName(w[0]) || !isList(w[1], 4 * this.config.pathPerRound)) {
        return this.refuse("malformed", "want is a list of [model, hashes]");
      }
      if (!w[1].every(isPathHash)) return this.refuse("malformed", "a requested hash is not a path hash");
      total += w[1].length;
      want.set(w[0], [...(want.get(w[0]) ?? []), ...(w[1] as string[])]);
    }
    if (total > 4 * this.config.pathPerRound) return this.refuse("too_large", "too many hashes in one request");
    const asOf = this.seq;
    const sections: Section[] = [];
    let used = BATCH_HEADER_BYTES;
    const budget = this.config.batchBytes;
    outer: for (const [model, hashes] of want) {
      const sec: Section = { model, reset: false, syncing: false, evicts: [], inserts: [] };
      used += sectionOverhead(model);
      const seen = new Set<string>();
      let last: string | null = null;
      for (const h of hashes) {
        for (const pair of this.o.own.pathTo(model, h, this.config.pathMaxDepth)) {
          if (seen.has(pair[0])) continue;
          const cost = pair[1] !== null && pair[1] === last ? HASH_SIZE : HASH_SIZE + RUN_HEADER_BYTES;
          if (used + cost > budget) {
            if (sec.inserts.length > 0) sections.push(sec);
            break outer;
          }
          used += cost;
          seen.add(pair[0]);
          sec.inserts.push(pair);
          last = pair[0];
        }
      }
      if (sec.inserts.length > 0) sections.push(sec);
    }
    const data = compress(encodeSections(sections));
    this.s.encodes++;
    const epoch = this.o.directory.self.epoch;
    const sig = this.o.identity.sign(signedBytes(PATH_DOMAIN, this.o.selfId, epoch, id, info.epoch, asOf, data));
    const reply: WireMessage = { type: "route-paths", ok: true, id: this.o.selfId, epoch, asOf, data: data.toString("base64"), sig };
    this.s.bytesSent += wireBytes(reply);
    return reply;
  }

  // ---- peers and interest ------------------------------------------------------------------------

  private peerFor(id: NodeId): Peer | undefined {
    let p = this.peers.get(id);
    if (p) return p;
    if (id === this.o.selfId) return undefined;
    const info = this.o.directory.peer(id);
    if (!info || !live(info.state)) return undefined;
    p = {
      id,
      epoch: info.epoch,
      out: new Map(),
      ops: 0,
      inFlight: null,
      budget: this.config.batchBytes,
      fails: 0,
      retryAt: 0,
      inEpoch: null,
      inSeq: 0,
      ackedAt: 0,
      appliedAt: 0,
      inModels: new Map(),
      pathQueue: new Map(),
      pathInFlight: null,
      burst: 0,
      burstRound: -1,
    };
    this.peers.set(id, p);
    return p;
  }

  // A node down or restarted: its tenancy goes from our index, and what we were sending it is moot.
  private forgetNode(id: NodeId): void {
    this.o.index.dropHolder(id);
    const p = this.peers.get(id);
    if (p) this.s.pathHashesGivenUp += p.pathQueue.size + (p.pathInFlight?.length ?? 0);
    this.peers.delete(id);
    this.dirty.delete(id);
  }

  private ownWantsChanged(ch: WantChange): void {
    // A model no longer wanted: its index goes (the peers' part of it; our own entries are the router's).
    for (const m of ch.removed) {
      const idx = this.o.index.peek(m);
      for (const p of this.peers.values()) {
        if (!p.inModels.has(m)) continue;
        idx?.dropHolder(p.id);
        p.inModels.delete(m);
        for (const [key, a] of p.pathQueue) {
          if (a.model !== m) continue;
          p.pathQueue.delete(key);
          this.s.pathHashesGivenUp++;
        }
      }
    }
    this.armRound();
  }

  private refuse(reason: RefuseReason, message: string): WireMessage {
    this.refused[reason]++;
    return { type: "error", code: reason, message };
  }
}

// Bytes of a message as JSON, without serialising its (large, escape-free) base64 data twice.
function wireBytes(msg: WireMessage): number {
  const data = typeof msg.data === "string" ? msg.data : "";
  return JSON.stringify({ ...msg, data: "" }).length + data.length;
}
