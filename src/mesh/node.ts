// MeshCore: one node's membership, replicated store and worker registry,
// wired together. Pure logic: it talks through a Transport and keeps time
// with a Clock, so the same code runs over HTTP and in the 100-node simulation.
import type { Logger } from "../log";
import { silentLogger } from "../log";
import { isObject } from "./check";
import type { Identity } from "./identity";
import { Kv, type KvConfig, type KvStats } from "./kv";
import { KvSync, type KvSyncConfig, type KvSyncStats } from "./kv-sync";
import type { MemberState } from "./member";
import {
  type JoinResult,
  Membership,
  type MembershipConfig,
  type MembershipEvent,
  type MembershipStats,
  type MemberView,
} from "./membership";
import type { Clock, NodeId, Transport, WireMessage } from "./wire";
import { WorkerRegistry, type WorkersConfig, type WorkersStats } from "./workers";

/** Tunables of every part; anything left out takes its default. */
export interface MeshConfig {
  membership?: Partial<MembershipConfig>;
  kv?: Partial<KvConfig>;
  sync?: Partial<KvSyncConfig>;
  workers?: Partial<WorkersConfig>;
}

/** What a node is made of. */
export interface MeshCoreOptions {
  identity: Identity;
  /** Name shown to operators and the address ("host:port") peers reach this node at; never 0.0.0.0. */
  self: { name: string; addr: string };
  transport: Transport;
  clock: Clock;
  config?: MeshConfig;
  log?: Logger;
  /** Random numbers in [0, 1); simulations pass a seeded one. */
  random?: () => number;
}

/**
 * Another protocol riding on this node (cache-aware routing's index sync): its
 * message types reach `handle` after the transport authenticated them, and it
 * hears every membership change. Registered before start; started and stopped
 * with the node.
 */
export interface MeshExtension {
  /** Message types it answers; must not clash with the core's own. */
  readonly types: readonly string[];
  handle(msg: WireMessage, from?: NodeId): WireMessage | Promise<WireMessage>;
  onMembership?(e: MembershipEvent): void;
  /** A record of the replicated store changed (owner's key): read it with `store.get(owner, key)`. */
  onStoreChange?(owner: NodeId, key: string): void;
  start?(): void;
  stop?(): void;
}

/** Who is in the mesh, as an extension needs it (implemented by Membership). */
export interface MeshDirectory {
  readonly id: NodeId;
  readonly self: { epoch: string };
  liveIds(): NodeId[];
  peer(id: NodeId): { publicKey: string; addr: string; epoch: string; state: string } | undefined;
}

/** Every counter of the node, for /metrics. */
export interface MeshStats {
  members: Record<"alive" | "suspect" | "dead" | "left", number>;
  membership: MembershipStats;
  kv: KvStats;
  sync: KvSyncStats;
  workers: WorkersStats;
  piggybackQueued: number;
  badMessages: number;
}

/** One node of the mesh. */
export class MeshCore {
  readonly id: NodeId;
  readonly workers: WorkerRegistry;
  private readonly membership: Membership;
  private readonly kv: Kv;
  private readonly sync: KvSync;
  private readonly log: Logger;
  private badMessages = 0;
  private running = false;
  private readonly extensions: MeshExtension[] = [];
  private readonly extensionTypes = new Map<string, MeshExtension>();

  constructor(o: MeshCoreOptions) {
    this.id = o.identity.id;
    this.log = o.log ?? silentLogger;
    const roundMs = o.config?.membership?.roundMs;
    this.membership = new Membership({
      identity: o.identity,
      self: o.self,
      transport: o.transport,
      clock: o.clock,
      config: o.config?.membership,
      log: this.log,
      random: o.random,
      onEvent: (e) => this.onMembership(e),
    });
    this.kv = new Kv({
      identity: o.identity,
      directory: this.membership,
      clock: o.clock,
      log: this.log,
      config: o.config?.kv,
      onChange: (owner, key) => {
        this.workers.onStoreChange(owner, key);
        for (const x of this.extensions) x.onStoreChange?.(owner, key);
      },
    });
    this.sync = new KvSync({
      kv: this.kv,
      directory: this.membership,
      transport: o.transport,
      clock: o.clock,
      log: this.log,
      random: o.random,
      config: { ...(roundMs ? { syncMs: roundMs } : {}), ...o.config?.sync },
    });
    this.workers = new WorkerRegistry({ kv: this.kv, self: this.id, clock: o.clock, log: this.log, config: o.config?.workers });
  }

  /** Start probing, syncing and reconciling. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.membership.start();
    this.sync.start();
    this.workers.start();
    for (const x of this.extensions) x.start?.();
  }

  /** Plug in another protocol (see MeshExtension); throws on a message type already taken. */
  extend(x: MeshExtension): void {
    for (const t of x.types) {
      if (t === "kv-sync" || this.membership.handles(t) || this.extensionTypes.has(t)) throw new Error(`mesh message type ${t} is taken`);
    }
    for (const t of x.types) this.extensionTypes.set(t, x);
    this.extensions.push(x);
    if (this.running) x.start?.();
  }

  /** Live members and their addresses and epochs, for extensions. */
  get directory(): MeshDirectory {
    return this.membership;
  }

  /** Stop every timer; the node stops answering. */
  stop(): void {
    this.running = false;
    this.membership.stop();
    this.sync.stop();
    this.workers.stop();
    for (const x of this.extensions) x.stop?.();
  }

  /** Tell the mesh this node leaves (its workers disappear everywhere at once), then stop. */
  async leave(): Promise<void> {
    this.sync.stop();
    this.workers.stop();
    for (const x of this.extensions) x.stop?.();
    await this.membership.leave();
    this.running = false;
  }

  /** Join through seed addresses ("host:port"); ok once one seed answered with its member list. */
  join(seedAddrs: string[]): Promise<JoinResult> {
    return this.membership.join(seedAddrs);
  }

  /**
   * Answer one inbound message (already authenticated by the transport); never throws. `from` is the
   * node id the transport authenticated the message as coming from; kv-sync is refused without it.
   */
  async handle(msg: WireMessage, from?: NodeId): Promise<WireMessage> {
    if (!isObject(msg) || typeof msg.type !== "string") return this.bad("bad_message", "a message is an object with a string type");
    if (!this.running) return { type: "error", code: "stopped", message: "this node is not running" };
    try {
      if (this.membership.handles(msg.type)) return await this.membership.handle(msg, from);
      if (msg.type === "kv-sync") return this.sync.handle(msg, from);
      const x = this.extensionTypes.get(msg.type);
      if (x) return await x.handle(msg, from);
      return this.bad("unknown_type", `unknown message type ${msg.type.slice(0, 40)}`);
    } catch (e) {
      this.log.error("mesh message handler failed", { type: msg.type.slice(0, 40), error: (e as Error).message });
      return { type: "error", code: "internal", message: "the node could not handle this message" };
    }
  }

  /** Whether the node runs (started, not stopped or left). */
  get isRunning(): boolean {
    return this.running;
  }

  /** The state and incarnation this node holds for member `id` (undefined if unknown or self). */
  memberState(id: NodeId): { state: MemberState; incarnation: number } | undefined {
    return this.membership.stateOf(id);
  }

  /** Every known member, this node first. */
  members(): MemberView[] {
    return this.membership.list();
  }

  /** Counters for metrics. */
  stats(): MeshStats {
    const members = { alive: 0, suspect: 0, dead: 0, left: 0 };
    for (const m of this.membership.list()) if (!m.self) members[m.state]++;
    return {
      members,
      membership: { ...this.membership.stats },
      kv: { ...this.kv.stats },
      sync: { ...this.sync.stats },
      workers: { ...this.workers.stats },
      piggybackQueued: this.membership.piggybackSize,
      badMessages: this.badMessages,
    };
  }

  /** The replicated store (for tests and diagnostics). */
  get store(): Kv {
    return this.kv;
  }

  private onMembership(e: MembershipEvent): void {
    for (const x of this.extensions) x.onMembership?.(e);
    switch (e.kind) {
      case "up":
      case "epoch":
        this.sync.resetPeer(e.id, true);
        break;
      case "down":
        this.kv.dropOwner(e.id);
        break;
      case "forgotten":
        this.sync.forgetPeer(e.id);
        break;
      case "self-reset":
        this.kv.purgeForeign();
        this.sync.resetAll();
        break;
    }
  }

  private bad(code: string, message: string): WireMessage {
    this.badMessages++;
    return { type: "error", code, message };
  }
}
