// SWIM membership: each round probe one member (randomised round-robin), ask
// k others to probe it indirectly when it does not answer, suspect it when
// nobody reaches it, and declare it dead when the suspicion is not refuted in
// time. News rides on the probes (piggyback). A node's own statements (alive,
// left) are signed by it; any member may claim another suspect or dead, signing
// the claim with its own key (a node passing a claim on signs it afresh, so the
// claimer is the sender, whose own record the same message carries and the
// receiver learns first); only the subject can refute, by raising its incarnation.
//
// Detection bound (defaults: round 1 s, 5 suspicion rounds): a killed member
// is probed by some node within n-1 rounds at worst (round-robin), suspected
// at the end of that round, declared dead 5 rounds later by every node that
// heard the suspicion (each runs its own timer), so all live nodes mark it
// dead within about n + 6 rounds in the worst case and about 8 rounds
// typically (first probe of it expected after ~1.6 rounds).
import { createHash } from "node:crypto";
import type { Logger } from "../log";
import { isList, isNodeId, isObject } from "./check";
import type { Identity } from "./identity";
import {
  isSelfRecord,
  type MemberState,
  type MemberUpdate,
  overrides,
  parseUpdate,
  type SelfRecord,
  type SignedClaim,
  signClaim,
  signSelf,
  verifyClaim,
  verifySelf,
} from "./member";
import { Piggyback } from "./piggyback";
import type { Clock, NodeId, Transport, WireMessage } from "./wire";

/** Tunables of the failure detector; every one has a default. */
export interface MembershipConfig {
  /** One probe per round. */
  roundMs: number;
  /** Wait for a direct ack this long before asking others; the rest of the round is for indirect probes. */
  probeTimeoutMs: number;
  /** How many members probe indirectly for us. */
  indirectK: number;
  /** A suspect not refuted within this many rounds is declared dead. */
  suspicionRounds: number;
  /** Each update is gossiped retransmitMult * ceil(log10(n + 1)) times. */
  retransmitMult: number;
  /** Updates per message. */
  piggybackPerMessage: number;
  /** Updates waiting for gossip, at most. */
  maxPiggyback: number;
  /** Members remembered, at most (dead and left ones are evicted first). */
  maxMembers: number;
  /** Dead and left members are forgotten after this many rounds. */
  forgetAfterRounds: number;
  /** Every this many rounds, try to reach one dead member (heals partitions) or, when alone, the seeds. */
  reconnectEveryRounds: number;
  /** Every this many rounds, compare member tables with one random member (push-pull) and swap them if they differ. */
  syncEveryRounds: number;
  /** Indirect probes this node runs for others at once, at most. */
  maxRelays: number;
  joinTimeoutMs: number;
}

/** Defaults: 1 s rounds, 400 ms direct timeout, k = 3, 5 suspicion rounds. */
export const MEMBERSHIP_DEFAULTS: MembershipConfig = {
  roundMs: 1000,
  probeTimeoutMs: 400,
  indirectK: 3,
  suspicionRounds: 5,
  retransmitMult: 4,
  piggybackPerMessage: 8,
  maxPiggyback: 256,
  maxMembers: 512,
  forgetAfterRounds: 60,
  reconnectEveryRounds: 10,
  syncEveryRounds: 5,
  maxRelays: 32,
  joinTimeoutMs: 3000,
};

/**
 * Worst case, without message loss, from a kill until every live node marks the member dead: up to n - 1
 * rounds before some node probes it (randomised round-robin), one round for the direct and indirect probe,
 * about log2(n) + 1 rounds to gossip the suspicion, the suspicion timeout, and one round of timer granularity.
 */
export function failureDetectionBoundMs(n: number, config: Partial<MembershipConfig> = {}): number {
  const c = { ...MEMBERSHIP_DEFAULTS, ...config };
  const rounds = n - 1 + 1 + Math.ceil(Math.log2(n + 1)) + 1 + c.suspicionRounds + 1;
  return rounds * c.roundMs;
}

/** What the rest of the core hears about membership changes. */
export type MembershipEvent =
  /** A member appeared, or came back from dead or left. */
  | { kind: "up"; id: NodeId; back: boolean }
  /** A member restarted or dropped its replicated state: it needs everything again. */
  | { kind: "epoch"; id: NodeId }
  /** A member was declared dead or left: its keys go. */
  | { kind: "down"; id: NodeId; state: "dead" | "left" }
  /** A dead or left member was removed from the table. */
  | { kind: "forgotten"; id: NodeId }
  /** This node was declared dead by the mesh: it drops what others wrote and resends its own. */
  | { kind: "self-reset" };

/** A member as shown to operators (`mesh peers`). */
export interface MemberView {
  id: NodeId;
  name: string;
  addr: string;
  publicKey: string;
  state: MemberState;
  incarnation: number;
  /** Clock ms of the last message from it (for self: now). */
  lastSeen: number;
  /** Smoothed round-trip time of direct probes; null until one succeeded. */
  rttMs: number | null;
  self: boolean;
}

/** Counters for metrics. */
export interface MembershipStats {
  probes: number;
  directProbeFailures: number;
  indirectProbes: number;
  indirectSaves: number;
  suspicions: number;
  deaths: number;
  refutations: number;
  /** Refutations of a death: this node dropped what others wrote and took a new epoch. */
  selfResets: number;
  /** Members that outranked their death without resetting, kept dead until they hear of it. */
  unresetReturns: number;
  forgedRecords: number;
  unsignedRecords: number;
  malformedRecords: number;
  membersRejectedFull: number;
  membersForgotten: number;
  piggybackDropped: number;
  relaysRefused: number;
  /** Messages whose `from` record named another node than the one the transport authenticated. */
  wrongSender: number;
}

interface Member {
  id: NodeId;
  publicKey: string;
  name: string;
  addr: string;
  epoch: string;
  state: MemberState;
  inc: number;
  since: number;
  lastSeen: number;
  rttMs: number | null;
  record: SelfRecord;
  /** This node's own signed claim about the member's current suspect/dead state, made once per state. */
  claim: SignedClaim | null;
}

/** What a membership needs from its node. */
export interface MembershipOptions {
  identity: Identity;
  self: { name: string; addr: string };
  transport: Transport;
  clock: Clock;
  config?: Partial<MembershipConfig>;
  log: Logger;
  /** Random numbers in [0, 1); simulations pass a seeded one. */
  random?: () => number;
  onEvent?: (e: MembershipEvent) => void;
}

/** A failed join, with a message for a person. */
export type JoinResult = { ok: true; value: { reached: number } } | { ok: false; code: "join_failed" | "bad_seeds"; message: string };

const MEMBER_TYPES = new Set(["ping", "ping-req", "join", "leave", "sync", "sync-push"]);
const MAX_SEEDS = 32;
const RTT_WEIGHT = 0.3;
// A direct probe waits this many smoothed RTTs of its target (never less than probeTimeoutMs).
const RTT_TIMEOUT_FACTOR = 2;

/** One node's SWIM failure detector and member table. */
export class Membership {
  readonly config: MembershipConfig;
  readonly stats: MembershipStats = {
    probes: 0,
    directProbeFailures: 0,
    indirectProbes: 0,
    indirectSaves: 0,
    suspicions: 0,
    deaths: 0,
    refutations: 0,
    selfResets: 0,
    unresetReturns: 0,
    forgedRecords: 0,
    unsignedRecords: 0,
    malformedRecords: 0,
    membersRejectedFull: 0,
    membersForgotten: 0,
    piggybackDropped: 0,
    relaysRefused: 0,
    wrongSender: 0,
  };
  private readonly members = new Map<NodeId, Member>();
  private readonly piggyback: Piggyback<MemberUpdate>;
  private readonly random: () => number;
  private record: SelfRecord;
  private order: NodeId[] = [];
  private orderPos = 0;
  private rounds = 0;
  private timer: unknown = null;
  private running = false;
  private probing = false;
  private relays = 0;
  private isolated = false;
  private lastRound: number | null = null;
  private seeds: string[] = [];

  constructor(private readonly o: MembershipOptions) {
    this.config = { ...MEMBERSHIP_DEFAULTS, ...o.config };
    this.random = o.random ?? Math.random;
    this.piggyback = new Piggyback<MemberUpdate>(this.config.maxPiggyback);
    this.record = signSelf(o.identity, { name: o.self.name, addr: o.self.addr, epoch: this.newEpoch(), inc: 0, state: "alive" });
  }

  /** This node's id. */
  get id(): NodeId {
    return this.o.identity.id;
  }

  /** This node's current signed record (what it says about itself). */
  get self(): SelfRecord {
    return this.record;
  }

  /** Start probing, one round every `roundMs`. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.schedule();
  }

  /** Stop all timers; in-flight probes are ignored when they settle. */
  stop(): void {
    this.running = false;
    if (this.timer !== null) this.o.clock.clearTimer(this.timer);
    this.timer = null;
  }

  /** Public key and address of a known member. */
  peer(id: NodeId): { publicKey: string; addr: string; epoch: string; state: MemberState } | undefined {
    const m = this.members.get(id);
    return m && { publicKey: m.publicKey, addr: m.addr, epoch: m.epoch, state: m.state };
  }

  /** Ids of live members other than this node. */
  liveIds(): NodeId[] {
    const out: NodeId[] = [];
    for (const m of this.members.values()) if (m.state === "alive" || m.state === "suspect") out.push(m.id);
    return out;
  }

  /** One member's state as seen here (undefined if unknown). */
  stateOf(id: NodeId): { state: MemberState; incarnation: number } | undefined {
    const m = this.members.get(id);
    return m && { state: m.state, incarnation: m.inc };
  }

  /** Every known member, this node first. */
  list(): MemberView[] {
    const me: MemberView = {
      id: this.id,
      name: this.record.name,
      addr: this.record.addr,
      publicKey: this.record.publicKey,
      state: this.record.state,
      incarnation: this.record.inc,
      lastSeen: this.o.clock.now(),
      rttMs: null,
      self: true,
    };
    const rest = [...this.members.values()].map((m) => ({
      id: m.id,
      name: m.name,
      addr: m.addr,
      publicKey: m.publicKey,
      state: m.state,
      incarnation: m.inc,
      lastSeen: m.lastSeen,
      rttMs: m.rttMs,
      self: false,
    }));
    return [me, ...rest];
  }

  /** Number of updates waiting for gossip (bounded by maxPiggyback). */
  get piggybackSize(): number {
    return this.piggyback.size;
  }

  /** Contact seeds ("host:port") and merge their member lists; ok if at least one answered. */
  async join(seedAddrs: string[]): Promise<JoinResult> {
    const seeds = seedAddrs.filter((a) => a !== this.record.addr).slice(0, MAX_SEEDS);
    if (seeds.length === 0) return { ok: false, code: "bad_seeds", message: "no seed address to join (other than this node's own)" };
    this.seeds = seeds;
    const replies = await Promise.all(seeds.map((addr) => this.joinOne(addr)));
    const reached = replies.filter(Boolean).length;
    if (reached === 0) return { ok: false, code: "join_failed", message: `no seed answered: ${seeds.join(", ")}` };
    return { ok: true, value: { reached } };
  }

  /** Announce a graceful leave to every live member and stop probing. */
  async leave(): Promise<void> {
    this.record = signSelf(this.o.identity, { ...this.record, state: "left" });
    this.stop();
    const msg = { type: "leave", from: this.record };
    const targets = [...this.members.values()].filter((m) => m.state === "alive" || m.state === "suspect");
    await Promise.allSettled(targets.map((m) => this.o.transport.request(m.addr, msg, this.config.joinTimeoutMs, m.id)));
  }

  /** Whether `type` is a membership message this class answers. */
  handles(type: string): boolean {
    return MEMBER_TYPES.has(type);
  }

  /** Learn from the sender's own record carried in `from`; returns its id, or null if the record was refused. */
  observeSender(from: unknown): NodeId | null {
    const p = parseUpdate(from);
    if (!p.ok || !isSelfRecord(p.value)) {
      this.refused(p.ok ? "malformed" : p.reason);
      return null;
    }
    if (p.value.id === this.id) return null;
    this.apply(p.value);
    const m = this.members.get(p.value.id);
    if (m && m.epoch === p.value.epoch) m.lastSeen = this.o.clock.now();
    return p.value.id;
  }

  /**
   * Answer a membership message (ping, ping-req, join, leave); the transport has authenticated the mesh
   * secret and, when `authenticated` is given, the sender's node id, which the `from` record must match
   * (so a replayed record of another node cannot refresh or speak for it). Refused before any state change.
   */
  async handle(msg: WireMessage, authenticated?: NodeId): Promise<WireMessage> {
    if (!this.running) return fail("stopped", "this node is not running");
    if (authenticated !== undefined) {
      const claimed = isObject(msg.from) ? msg.from.id : undefined;
      if (claimed !== authenticated) {
        this.stats.wrongSender++;
        return fail("wrong_sender", "the message's from record is not the authenticated sender's");
      }
    }
    const sender = this.observeSender(msg.from);
    if (sender === null) return fail("bad_sender", "the message's from record is missing, malformed, forged or our own");
    this.applyAll(msg.updates);
    switch (msg.type) {
      case "ping":
        if (msg.to !== this.id) return { type: "nack", code: "wrong_node", from: this.record };
        return { type: "ack", from: this.record, updates: this.outgoing(sender) };
      case "ping-req":
        return this.relay(sender, msg.target);
      case "join":
        return { type: "join-ack", from: this.record, members: this.snapshot() };
      case "sync":
        if (msg.digest === this.digest()) return { type: "sync-ack", from: this.record, same: true };
        return { type: "sync-ack", from: this.record, same: false, members: this.snapshot() };
      case "sync-push":
        this.applyAll(msg.members, this.config.maxMembers * 2 + 1);
        return { type: "ack", from: this.record, updates: [] };
      case "leave":
        return { type: "ack", from: this.record, updates: [] };
      default:
        return fail("unknown_type", `not a membership message: ${msg.type}`);
    }
  }

  /** Called at the start of every periodic task: notices that this node was frozen (see below). */
  awake(): void {
    if (!this.running) return;
    const now = this.o.clock.now();
    // Frozen (SIGSTOP, a suspended VM, a stopped core) longer than a suspicion timeout: the mesh has
    // likely declared us dead, dropped our keys and collected tombstones we never saw, yet may have
    // forgotten us by now and would never tell us. Our copy of others' state is suspect: reset.
    const gap = this.lastRound === null ? 0 : now - this.lastRound;
    this.lastRound = now;
    if (gap > (this.config.suspicionRounds + 1) * this.config.roundMs) {
      this.o.log.warn("mesh node was frozen; dropping replicated state of others", { frozenMs: gap });
      this.refute(this.record.inc, true);
    }
  }

  private schedule(): void {
    if (!this.running) return;
    this.timer = this.o.clock.setTimer(() => {
      this.timer = null;
      this.round();
      this.schedule();
    }, this.config.roundMs);
  }

  private round(): void {
    this.rounds++;
    const now = this.o.clock.now();
    this.awake();
    this.expire(now);
    if (!this.probing) {
      const target = this.nextTarget();
      if (target) {
        this.probing = true;
        void this.probe(target).finally(() => {
          this.probing = false;
        });
      }
    }
    if (this.rounds % this.config.reconnectEveryRounds === 0) void this.reconnect();
    if (this.rounds % this.config.syncEveryRounds === 0) void this.pushPull();
  }

  // Suspicion timeouts and forgetting run once per round: a granularity of one round is part of the stated bound.
  private expire(now: number): void {
    const suspicionMs = this.config.suspicionRounds * this.config.roundMs;
    const forgetMs = this.config.forgetAfterRounds * this.config.roundMs;
    for (const m of [...this.members.values()]) {
      if (m.state === "suspect" && now - m.since >= suspicionMs) {
        this.stats.deaths++;
        this.o.log.info("mesh member declared dead", { node: m.id.slice(0, 8), name: m.name, incarnation: m.inc });
        this.apply(signClaim(this.o.identity, { id: m.id, publicKey: m.publicKey, inc: m.inc, state: "dead" }), true);
      } else if ((m.state === "dead" || m.state === "left") && now - m.since >= forgetMs) {
        this.forget(m.id);
      }
    }
  }

  private forget(id: NodeId): void {
    this.members.delete(id);
    this.stats.membersForgotten++;
    this.o.onEvent?.({ kind: "forgotten", id });
  }

  private nextTarget(): Member | undefined {
    for (let tries = 0; tries < 2; tries++) {
      while (this.orderPos < this.order.length) {
        const m = this.members.get(this.order[this.orderPos++] as NodeId);
        if (m && (m.state === "alive" || m.state === "suspect")) return m;
      }
      this.order = this.shuffle(this.liveIds());
      this.orderPos = 0;
    }
    return undefined;
  }

  private shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [xs[i], xs[j]] = [xs[j] as T, xs[i] as T];
    }
    return xs;
  }

  // The direct ping keeps running for the whole round: an ack that arrives after the direct timeout, while the
  // indirect probes run, still counts (on a slow link, say 200 ms each way, every direct ack would otherwise
  // come "late" and every member would be suspected in turn). Each ack also feeds the member's smoothed RTT,
  // from which the direct and indirect timeouts grow on slow links.
  private async probe(target: Member): Promise<void> {
    this.stats.probes++;
    const inc = target.inc;
    const t0 = this.o.clock.now();
    const direct = this.timeoutFor(target);
    const round = Math.max(this.config.roundMs, 2 * direct);
    const acked = this.ping(target, round);
    if (await this.within(acked, direct)) return;
    if (!this.running) return;
    this.stats.directProbeFailures++;
    const relays = this.shuffle(this.liveIds().filter((id) => id !== target.id)).slice(0, this.config.indirectK);
    const wait = Math.max(round - (this.o.clock.now() - t0), direct);
    this.stats.indirectProbes += relays.length;
    const results = await Promise.all([...relays.map((id) => this.pingReq(id, target.id, wait)), acked]);
    if (!this.running) return;
    if (results.some(Boolean)) {
      if (results.slice(0, -1).some(Boolean)) this.stats.indirectSaves++;
      return;
    }
    const cur = this.members.get(target.id);
    if (cur && cur.state === "alive" && cur.inc === inc) {
      this.stats.suspicions++;
      this.o.log.info("mesh member suspected", { node: cur.id.slice(0, 8), name: cur.name, incarnation: cur.inc });
      this.apply(signClaim(this.o.identity, { id: cur.id, publicKey: cur.publicKey, inc: cur.inc, state: "suspect" }), true);
    }
  }

  /** The direct probe timeout for `m`: the configured one, or more on a link whose measured RTT is long (at most a round). */
  private timeoutFor(m: Member): number {
    const byRtt = m.rttMs === null ? 0 : Math.min(RTT_TIMEOUT_FACTOR * m.rttMs, this.config.roundMs);
    return Math.max(this.config.probeTimeoutMs, byRtt);
  }

  // Whether `p` resolves true within `ms` (it keeps running either way).
  private within(p: Promise<boolean>, ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const timer = this.o.clock.setTimer(() => resolve(false), ms);
      void p.then((ok) => {
        this.o.clock.clearTimer(timer);
        resolve(ok);
      });
    });
  }

  private async ping(target: Member, timeoutMs: number): Promise<boolean> {
    const msg = { type: "ping", from: this.record, to: target.id, updates: this.outgoing(target.id) };
    const t0 = this.o.clock.now();
    try {
      const reply = await this.o.transport.request(target.addr, msg, timeoutMs, target.id);
      if (!this.running || reply.type !== "ack") return false;
      if (this.observeSender(reply.from) !== target.id) return false;
      this.applyAll(reply.updates);
      const rtt = this.o.clock.now() - t0;
      target.rttMs = target.rttMs === null ? rtt : target.rttMs + RTT_WEIGHT * (rtt - target.rttMs);
      return true;
    } catch {
      return false;
    }
  }

  private async pingReq(relayId: NodeId, target: NodeId, timeoutMs: number): Promise<boolean> {
    const relay = this.members.get(relayId);
    if (!relay) return false;
    const msg = { type: "ping-req", from: this.record, target, updates: this.outgoing(relayId) };
    try {
      const reply = await this.o.transport.request(relay.addr, msg, timeoutMs, relayId);
      if (!this.running || reply.type !== "ping-req-ack") return false;
      if (this.observeSender(reply.from) !== relayId) return false;
      this.applyAll(reply.updates);
      return reply.ok === true;
    } catch {
      return false;
    }
  }

  private async relay(sender: NodeId, targetId: unknown): Promise<WireMessage> {
    const target = isNodeId(targetId) ? this.members.get(targetId) : undefined;
    let ok = false;
    if (target && targetId !== sender && this.relays < this.config.maxRelays) {
      this.relays++;
      try {
        ok = await this.ping(target, this.timeoutFor(target));
      } finally {
        this.relays--;
      }
    } else if (target) {
      this.stats.relaysRefused++;
    }
    return { type: "ping-req-ack", from: this.record, ok, updates: this.outgoing(sender) };
  }

  // A seed is a bare address: which node answers there is only learnt from its reply, so the join names nobody.
  private async joinOne(addr: string): Promise<boolean> {
    try {
      const reply = await this.o.transport.request(addr, { type: "join", from: this.record }, this.config.joinTimeoutMs);
      if (reply.type !== "join-ack" || this.observeSender(reply.from) === null) return false;
      this.applyAll(reply.members, this.config.maxMembers * 2 + 1);
      return true;
    } catch {
      return false;
    }
  }

  // Alone (every member dead or forgotten), a node keeps knocking on the seeds; otherwise it retries one
  // dead member now and then, so two halves of a healed partition find each other again.
  // Gossip alone spreads a burst of news (a mass join) slowly, since every update competes for a few
  // slots per message; comparing whole tables now and then settles it in one exchange. A converged
  // mesh has equal digests, so a quiet exchange costs two small messages.
  private async pushPull(): Promise<void> {
    const live = this.liveIds();
    const id = live[Math.floor(this.random() * live.length)];
    const peer = id === undefined ? undefined : this.members.get(id);
    if (!peer) return;
    try {
      const reply = await this.o.transport.request(
        peer.addr,
        { type: "sync", from: this.record, digest: this.digest() },
        this.config.joinTimeoutMs,
        peer.id,
      );
      if (!this.running || reply.type !== "sync-ack" || this.observeSender(reply.from) !== peer.id || reply.same === true) return;
      this.applyAll(reply.members, this.config.maxMembers * 2 + 1);
      await this.o.transport.request(
        peer.addr,
        { type: "sync-push", from: this.record, members: this.snapshot() },
        this.config.joinTimeoutMs,
        peer.id,
      );
    } catch {
      // Next time, with another member.
    }
  }

  // Live members and their incarnations, this node included: equal on every node of a converged mesh.
  private digest(): string {
    const rows = [`${this.id}:${this.record.inc}`];
    for (const m of this.members.values()) if (m.state === "alive" || m.state === "suspect") rows.push(`${m.id}:${m.inc}`);
    return createHash("sha256").update(rows.sort().join(",")).digest("base64").slice(0, 22);
  }

  private async reconnect(): Promise<void> {
    if (this.liveIds().length === 0 && this.seeds.length > 0) {
      await Promise.all(this.seeds.map((a) => this.joinOne(a)));
      return;
    }
    const dead = [...this.members.values()].filter((m) => m.state === "dead");
    const m = dead[Math.floor(this.random() * dead.length)];
    if (m) await this.ping(m, this.config.probeTimeoutMs);
  }

  private snapshot(): MemberUpdate[] {
    const out: MemberUpdate[] = [this.record];
    for (const m of this.members.values()) {
      // A dead member's claim only matters to the member itself (a restarted node outranks it);
      // others cannot add a member from a claim.
      if (m.state !== "dead") out.push(m.record);
      if (m.state === "suspect" || m.state === "dead") out.push(this.claimAbout(m));
    }
    return out;
  }

  // The receiver's own record comes first when we think it suspect or dead: that is how it learns to refute.
  private outgoing(to: NodeId): MemberUpdate[] {
    const n = this.liveIds().length + 1;
    const limit = this.config.retransmitMult * Math.max(1, Math.ceil(Math.log10(n + 1)));
    const out: MemberUpdate[] = [];
    const m = this.members.get(to);
    if (m && m.state !== "alive" && m.state !== "left") out.push(this.claimAbout(m));
    out.push(...this.piggyback.take(this.config.piggybackPerMessage - out.length, limit));
    this.stats.piggybackDropped = this.piggyback.dropped;
    return out;
  }

  private applyAll(updates: unknown, max = this.config.piggybackPerMessage * 4): void {
    if (!isList(updates, max)) {
      if (updates !== undefined) this.refused("malformed");
      return;
    }
    for (const u of updates) {
      const p = parseUpdate(u);
      if (p.ok) this.apply(p.value);
      else this.refused(p.reason);
    }
  }

  private refused(reason: "malformed" | "unsigned" | "id_mismatch" | "forged"): void {
    if (reason === "unsigned") this.stats.unsignedRecords++;
    else if (reason === "forged" || reason === "id_mismatch") this.stats.forgedRecords++;
    else this.stats.malformedRecords++;
  }

  // `own`: a claim this node just signed, which needs no checking.
  private apply(u: MemberUpdate, own = false): void {
    if (u.id === this.id) {
      this.applyToSelf(u);
      return;
    }
    const now = this.o.clock.now();
    const cur = this.members.get(u.id);
    if (!cur) {
      // Only a member's own signed alive record may introduce it.
      if (u.state !== "alive") return;
      if (!verifySelf(u)) {
        this.refused("forged");
        return;
      }
      if (!this.makeRoom()) {
        this.stats.membersRejectedFull++;
        return;
      }
      this.members.set(u.id, { ...fromRecord(u), since: now, lastSeen: now, rttMs: null, claim: null });
      this.order.splice(this.orderPos + Math.floor(this.random() * (this.order.length - this.orderPos + 1)), 0, u.id);
      this.piggyback.add(u);
      this.o.log.info("mesh member joined", { node: u.id.slice(0, 8), name: u.name, addr: u.addr });
      this.up(u.id, false);
      return;
    }
    // Only a node raises its own incarnation: a suspect/dead claim by anyone
    // else at a higher one would force a refutation past any bound.
    if (!isSelfRecord(u) && u.inc > cur.inc) {
      // A member's valid claim can be ahead of us honestly (a peer keeping a node dead at the
      // incarnation it refuted with, which has not reached us yet): refused, but not counted as forged.
      if (!this.verifiedClaim(u)) this.refused("forged");
      return;
    }
    if (!overrides(u, cur)) {
      if (u.inc === cur.inc && u.state === cur.state) this.piggyback.heard(u);
      return;
    }
    if (isSelfRecord(u) ? !verifySelf(u) : !own && !this.verifiedClaim(u)) {
      this.refused("forged");
      return;
    }
    if (isSelfRecord(u) && u.state !== "left" && cur.state === "dead" && u.epoch === cur.epoch) {
      // It outranks its death with its own record but kept its epoch: it never reset, having
      // refuted an older suspicion (a node frozen, thawed briefly, frozen again) without ever
      // hearing it was declared dead. It may still hold keys whose tombstones the mesh has
      // collected since. It stays dead here, at its new incarnation, until it hears so (the
      // claim about it goes first in everything sent to it) and comes back with a new epoch.
      cur.inc = u.inc;
      cur.lastSeen = now;
      this.stats.unresetReturns++;
      this.piggyback.add(this.claimAbout(cur));
      return;
    }
    const prev = cur.state;
    const prevEpoch = cur.epoch;
    cur.inc = u.inc;
    cur.state = u.state;
    cur.since = now;
    if (isSelfRecord(u)) Object.assign(cur, fromRecord(u));
    // A claim goes on under this node's signature: whoever hears it from us knows our key.
    this.piggyback.add(isSelfRecord(u) ? u : this.claimAbout(cur, own ? u : null));
    const wasDown = prev === "dead" || prev === "left";
    if ((u.state === "dead" || u.state === "left") && !wasDown) {
      this.o.log.info(u.state === "left" ? "mesh member left" : "mesh member dead", { node: u.id.slice(0, 8), name: cur.name });
      if (this.liveIds().length === 0) this.isolated = true;
      this.o.onEvent?.({ kind: "down", id: u.id, state: u.state });
    } else if ((u.state === "alive" || u.state === "suspect") && wasDown) {
      this.o.log.info("mesh member back", { node: u.id.slice(0, 8), name: cur.name, incarnation: u.inc });
      this.up(u.id, true);
    } else if (cur.epoch !== prevEpoch && !wasDown) {
      this.o.onEvent?.({ kind: "epoch", id: u.id });
    }
  }

  private up(id: NodeId, back: boolean): void {
    this.o.onEvent?.({ kind: "up", id, back });
    // A node that lost every peer cannot know what the mesh deleted meanwhile (tombstones may have
    // been collected once it was declared dead), so on first contact it resets as if declared dead.
    if (this.isolated) {
      this.isolated = false;
      this.refute(this.record.inc, true);
    }
  }

  private applyToSelf(u: MemberUpdate): void {
    if (u.inc < this.record.inc || this.record.state === "left") return;
    if (isSelfRecord(u)) {
      // Our own record echoed back is no news; a record of ours from an earlier life (another epoch)
      // at our incarnation or above must be outranked, or peers would keep the old one.
      if (u.epoch === this.record.epoch) return;
      if (!verifySelf(u)) {
        this.refused("forged");
        return;
      }
      this.refute(u.inc, false);
      return;
    }
    // A forged dead claim would otherwise make us drop everything others wrote (self-reset).
    if (!this.verifiedClaim(u)) {
      this.refused("forged");
      return;
    }
    this.refute(u.inc, u.state === "dead");
  }

  // A claim counts only when signed by its claimer with the key the claimer is known by here;
  // a claimer this node has never heard of cannot be checked, so its claim is refused too.
  private verifiedClaim(c: SignedClaim): boolean {
    const key = c.by === this.id ? this.o.identity.publicKey : this.members.get(c.by)?.publicKey;
    return key !== undefined && verifyClaim(c, key);
  }

  // This node's claim about `m`'s current suspect/dead state, signed once per state and reused.
  private claimAbout(m: Member, signed: SignedClaim | null = null): SignedClaim {
    const state = m.state === "dead" ? "dead" : "suspect";
    if (m.claim && m.claim.inc === m.inc && m.claim.state === state) return m.claim;
    m.claim = signed ?? signClaim(this.o.identity, { id: m.id, publicKey: m.publicKey, inc: m.inc, state });
    return m.claim;
  }

  private refute(inc: number, declaredDead: boolean): void {
    this.stats.refutations++;
    if (declaredDead) {
      this.stats.selfResets++;
      // Others have dropped our keys and may have collected tombstones we never saw: our copy of
      // their state can no longer be trusted, so it goes, and a new epoch makes everyone resend.
      this.o.onEvent?.({ kind: "self-reset" });
    }
    const epoch = declaredDead ? this.newEpoch() : this.record.epoch;
    this.record = signSelf(this.o.identity, { ...this.record, epoch, inc: inc + 1, state: "alive" });
    this.piggyback.add(this.record);
    this.o.log.info("mesh refuted suspicion", { incarnation: this.record.inc, declaredDead });
  }

  private makeRoom(): boolean {
    if (this.members.size < this.config.maxMembers) return true;
    let oldest: Member | undefined;
    for (const m of this.members.values()) {
      if ((m.state === "dead" || m.state === "left") && (!oldest || m.since < oldest.since)) oldest = m;
    }
    if (!oldest) return false;
    this.forget(oldest.id);
    return true;
  }

  private newEpoch(): string {
    const part = () =>
      Math.floor(this.random() * 2 ** 32)
        .toString(16)
        .padStart(8, "0");
    return `${part()}${part()}`;
  }
}

function fromRecord(r: SelfRecord): Omit<Member, "since" | "lastSeen" | "rttMs" | "claim"> {
  return { id: r.id, publicKey: r.publicKey, name: r.name, addr: r.addr, epoch: r.epoch, state: r.state, inc: r.inc, record: r };
}

function fail(code: string, message: string): WireMessage {
  return { type: "error", code, message };
}
