// A node's place in the mesh, assembled: the mesh core over the authenticated
// HTTP transport, the gate and routes the server mounts, the forwarder, and
// the publisher that keeps this node's worker record in step with its engine.

import type { Logger } from "../log";
import { DEFAULT_AUTHORITY, MeshAuthority, meshKeys } from "../mesh/auth";
import { readLimited } from "../mesh/body";
import { MeshClient } from "../mesh/client";
import type { Identity } from "../mesh/identity";
import type { MeshCredentials } from "../mesh/invite";
import type { JoinResult } from "../mesh/membership";
import { type MeshConfig, MeshCore } from "../mesh/node";
import { HttpTransport } from "../mesh/transport-http";
import type { Clock, WorkerDevice, WorkerInfo } from "../mesh/wire";
import { MAX_DEVICES } from "../mesh/worker-info";
import { RouteKeyer, Router, type RoutingMode } from "../routing";
import { OwnTenancy } from "../routing/own";
import { RouteSync } from "../routing/sync";
import { offersOf, STAGE_PREFIX, type StageOffer } from "../split/offer";
import { offerRows, type SplitReport } from "../split/report";
import { wireDevice } from "./devices";
import { Forwarder } from "./forward";
import type { MeshHooks } from "./mesh";
import { MeshGate } from "./mesh-gate";
import type { MeshInfo, PeerRow, PeersReport, RoutingReport } from "./mesh-routes";
import type { ServedModel } from "./model";

/** How to run a node's mesh side. */
export interface MeshNodeOptions {
  identity: Identity;
  creds: MeshCredentials;
  name: string;
  logger: Logger;
  /** Whether the inference API requires a key (then /api/peers accepts it too). */
  apiKeyRequired: boolean;
  /** Largest body of a mesh-authenticated request (a forwarded inference request included). */
  maxBodyBytes: number;
  config?: MeshConfig;
  /** How long a peer may take to start answering a forwarded request before another is tried. */
  forwardHeadersTimeoutMs?: number;
  /** How often engine stats are read into this node's worker record. */
  statsEveryMs?: number;
  /** Cache-aware (default) or least-load routing. */
  routing?: RoutingMode;
}

/** Real time for the core. */
export const realClock: Clock = {
  now: () => Date.now(),
  setTimer: (fn, ms) => setTimeout(fn, ms),
  clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

// An invite lists a few addresses to try, not the whole mesh.
const MAX_INFO_ADDRS = 8;

/** The mesh side of a node. Create it before the server listens (the server mounts its hooks); start it once the address is known. */
export class MeshNode {
  readonly hooks: MeshHooks;
  readonly router: Router;
  private core: MeshCore | null = null;
  private routeSync: RouteSync | null = null;
  private readonly served = new Set<string>();
  private readonly transport: HttpTransport;
  private readonly publishers = new Set<ReturnType<typeof setInterval>>();
  private readonly leaving: Array<() => void> = [];
  private readonly client: MeshClient;
  /** The split models this node heads, for /api/peers (set by `mesh serve --split`). */
  splitReports: () => SplitReport[] = () => [];

  constructor(private readonly o: MeshNodeOptions) {
    const keys = meshKeys(o.creds.secret);
    const client = new MeshClient({ keys, nodeId: o.identity.id });
    this.client = client;
    this.transport = new HttpTransport(client, keys);
    this.router = new Router({
      selfId: o.identity.id,
      workers: () => this.routableWorkers(),
      rtt: (id) => this.core?.members().find((m) => m.id === id)?.rttMs ?? null,
      mode: o.routing,
    });
    const forwarder = new Forwarder({
      client,
      keys,
      selfId: o.identity.id,
      inflight: this.router,
      // Non-streaming answers arrive whole, after the full generation: wait
      // long, and give up early only when membership says the peer is gone.
      headersTimeoutMs: o.forwardHeadersTimeoutMs ?? 30 * 60_000,
      peerAlive: (id) => this.peerAlive(id),
      logger: o.logger,
      onPeerFailure: (id) => this.core?.workers.reportFailure(id),
    });
    this.hooks = {
      gate: new MeshGate(new MeshAuthority(keys, { ...DEFAULT_AUTHORITY, now: Date.now }), o.maxBodyBytes, o.logger),
      apiKeyRequired: o.apiKeyRequired,
      forwarder,
      router: this.router,
      keyer: new RouteKeyer(o.creds.secret),
      figures: () => (this.core ? { mesh: this.core.stats(), forwarding: forwarder.stats(), routing: this.routingReport() } : null),
      peerGet: (addr, path, timeoutMs) => peerGet(client, addr, path, timeoutMs),
      syncPeers: () => this.routeSync?.peerStates() ?? [],
      service: {
        nodeId: () => o.identity.id,
        workers: () => this.liveWorkers().map((e) => e.info),
        handler: () => {
          const core = this.core;
          return core ? (m, from) => core.handle(m, from) : null;
        },
        info: () => this.info(),
        peers: () => this.peers(),
      },
    };
  }

  /** Start the core at `addr` ("host:port", never 0.0.0.0). */
  start(addr: string): MeshCore {
    if (this.core) return this.core;
    this.core = new MeshCore({
      identity: this.o.identity,
      self: { name: this.o.name, addr },
      transport: this.transport,
      clock: realClock,
      config: this.o.config,
      log: this.o.logger,
    });
    // The routing index's sync rides on the core: it learns members and wants from it and talks over the same transport.
    const own = new OwnTenancy();
    this.routeSync = new RouteSync({
      selfId: this.o.identity.id,
      identity: this.o.identity,
      directory: this.core.directory,
      store: this.core.store,
      transport: this.transport,
      clock: realClock,
      index: this.router.index,
      own,
      log: this.o.logger,
    });
    this.core.extend(this.routeSync);
    this.router.connect(own, this.routeSync);
    // A member that died, left or restarted holds none of what this node's leases say it does.
    this.core.extend({
      types: [],
      handle: () => ({ type: "error", code: "unknown_type", message: "no such message" }),
      onMembership: (e) => {
        if (e.kind === "down" || e.kind === "epoch") this.router.dropNode(e.id);
      },
    });
    this.core.start();
    return this.core;
  }

  /** Join through seed addresses; a failure leaves the node running alone (the core keeps retrying the seeds). */
  async join(seeds: string[]): Promise<JoinResult> {
    if (!this.core) throw new Error("start the mesh node before joining");
    return this.core.join(seeds);
  }

  /**
   * Publish `model` as a Local worker at `addr`, then keep its load figures
   * current from the engine (read every second, published only on change).
   */
  serveModel(model: ServedModel, addr: string, shape: { ctxSize: number; slotsTotal: number }): void {
    const core = this.core;
    if (!core) throw new Error("start the mesh node before serving a model");
    const reg = core.workers.register({
      addr,
      models: [model.id, ...model.aliases],
      ctxSize: shape.ctxSize,
      slotsTotal: shape.slotsTotal,
      slotsBusy: 0,
      kvUsed: 0,
      kvCached: 0,
      kvTotal: 0,
      queueDepth: 0,
      health: "loading",
    });
    if (!reg.ok) {
      this.o.logger.error("cannot publish the model to the mesh", { model: model.id, code: reg.code, error: reg.message });
      return;
    }
    const id = reg.value.id;
    this.served.add(model.id);
    this.routeSync?.setServed([...this.served]);
    let last = "";
    let busy = false;
    const publish = async () => {
      if (busy || !this.core) return;
      busy = true;
      try {
        const patch = await loadOf(model);
        const key = JSON.stringify(patch);
        if (key === last) return;
        const r = core.workers.update(id, patch);
        if (r.ok) last = key;
        else this.o.logger.warn("cannot update the model's mesh record", { code: r.code, error: r.message });
      } finally {
        busy = false;
      }
    };
    void model.ready.then(() => {
      // What the engine's KV holds feeds the routing index here and, through the sync, everywhere.
      model.engine?.onTenancy((d) => this.router.onTenancy(model.id, d));
      // Devices are published once, as of the load: peers (and stage planning) see what each node computes on.
      const devices = model.info?.devices;
      if (devices && devices.length > 0) core.workers.update(id, { devices: devices.slice(0, MAX_DEVICES).map(wireDevice) });
      return publish();
    });
    this.publishers.add(setInterval(() => void publish(), this.o.statsEveryMs ?? 1000));
  }

  /**
   * GET `path` from the peer `nodeId` at `addr` with mesh credentials (addressed to it, so no other node
   * answers): its body, at most `maxBytes`. Rejects on anything but a 200 within the bound.
   */
  async peerBytes(addr: string, nodeId: string, path: string, maxBytes: number, signal: AbortSignal): Promise<Uint8Array> {
    const { response } = await this.client.send(addr, "GET", path, new Uint8Array(), { signal, to: nodeId });
    if (response.status !== 200) {
      await response.body?.cancel();
      throw new Error(`peer answered ${response.status}`);
    }
    const bytes = await readLimited(response.body, maxBytes);
    if (!bytes) throw new Error(`peer sent more than ${maxBytes} bytes`);
    return bytes;
  }

  /** Nodes whose ready workers serve `model` (this one included), each once. */
  servers(model: string): string[] {
    const ids = this.liveWorkers().flatMap((e) => (e.info.health === "ready" && e.info.models[0] === model ? [e.info.nodeId] : []));
    return [...new Set(ids)];
  }

  /** Stage offers of members not known to be gone (--offer-stage nodes), this node's own included. */
  stageOffers(): StageOffer[] {
    const core = this.core;
    if (!core) return [];
    const alive = new Set(core.members().flatMap((m) => (m.state === "alive" || m.state === "suspect" ? [m.id] : [])));
    return offersOf(core.store.live(STAGE_PREFIX)).filter((o) => alive.has(o.nodeId));
  }

  /** The core, once started. */
  get meshCore(): MeshCore | null {
    return this.core;
  }

  /** Run `fn` just before this node leaves the mesh (e.g. to save what it knows). */
  onLeave(fn: () => void): void {
    this.leaving.push(fn);
  }

  /** Tell the mesh this node leaves (peers drop its workers at once), then stop. */
  async leave(): Promise<void> {
    for (const fn of this.leaving.splice(0)) fn();
    this.stopPublishing();
    await this.core?.leave();
  }

  /** Stop without telling anyone (peers will detect it). */
  stop(): void {
    this.stopPublishing();
    this.core?.stop();
  }

  private stopPublishing(): void {
    for (const t of this.publishers) clearInterval(t);
    this.publishers.clear();
  }

  /** What routing did and holds: decisions, the index per model, the sync. */
  routingReport(): RoutingReport {
    const r = this.router.stats();
    const idx = this.router.index.stats();
    return {
      mode: this.router.mode,
      decisions: r,
      index: Object.entries(idx.models).map(([model, m]) => ({
        model,
        entries: m.entries,
        bytes: m.bytes,
        budget_evictions: m.budgetEvictions,
      })),
      sync: this.routeSync?.stats() ?? null,
    };
  }

  // Suspect still counts as alive: it may refute, and the forward may yet finish.
  private peerAlive(nodeId: string): boolean {
    const m = this.core?.members().find((x) => x.id === nodeId);
    return m !== undefined && (m.state === "alive" || m.state === "suspect");
  }

  private routableWorkers(): WorkerInfo[] {
    return this.liveWorkers().flatMap((e) => (e.routable ? [e.info] : []));
  }

  /**
   * Workers whose owner membership does not know to be gone. A peer that has not yet heard of a
   * node's leave can gossip its worker record back for a moment after this node dropped it; a
   * request must not be sent to it (or answered "loading") meanwhile.
   */
  private liveWorkers(): ReturnType<MeshCore["workers"]["list"]> {
    const core = this.core;
    if (!core) return [];
    const gone = new Set(core.members().flatMap((m) => (m.state === "left" || m.state === "dead" ? [m.id] : [])));
    const all = core.workers.list();
    return gone.size === 0 ? all : all.filter((e) => !gone.has(e.info.nodeId));
  }

  private info(): MeshInfo {
    const members = this.core?.members() ?? [];
    const self = members.find((m) => m.self);
    const others = members.filter((m) => !m.self && m.state === "alive").map((m) => m.addr);
    return {
      mesh_id: this.o.creds.meshId,
      node_id: this.o.identity.id,
      name: this.o.name,
      addrs: [...(self ? [self.addr] : []), ...others].slice(0, MAX_INFO_ADDRS),
    };
  }

  private peers(): PeersReport {
    const core = this.core;
    const now = Date.now();
    const byNode = new Map<string, WorkerInfo[]>();
    for (const e of core?.workers.list() ?? []) {
      const list = byNode.get(e.info.nodeId) ?? [];
      list.push(e.info);
      byNode.set(e.info.nodeId, list);
    }
    const members: PeerRow[] = (core?.members() ?? []).map((m) => {
      const ws = byNode.get(m.id) ?? [];
      const sum = (f: (w: WorkerInfo) => number) => ws.reduce((s, w) => s + f(w), 0);
      return {
        id: m.id,
        name: m.name,
        addr: m.addr,
        state: m.state,
        incarnation: m.incarnation,
        last_seen_ms: m.self ? null : Math.max(0, now - m.lastSeen),
        rtt_ms: m.rttMs,
        self: m.self,
        models: ws.map((w) => w.models[0] as string),
        aliases: Object.fromEntries(ws.filter((w) => w.models.length > 1).map((w) => [w.models[0], w.models.slice(1)])),
        slots_busy: sum((w) => w.slotsBusy),
        slots_total: sum((w) => w.slotsTotal),
        kv_used: sum((w) => w.kvUsed),
        kv_cached: sum((w) => w.kvCached),
        kv_total: sum((w) => w.kvTotal),
        queue_depth: sum((w) => w.queueDepth),
        workers: ws.map((w) => w.id),
        devices: nodeDevices(ws),
      };
    });
    return {
      mesh_id: this.o.creds.meshId,
      node_id: this.o.identity.id,
      members,
      forwarding: this.hooks.forwarder.stats(),
      routing: this.routingReport(),
      stages: offerRows(this.stageOffers()),
      splits: this.splitReports(),
    };
  }
}

type LoadPatch = Parameters<MeshCore["workers"]["update"]>[1];

/** A node's devices: those its workers report, each named once. */
function nodeDevices(ws: WorkerInfo[]): WorkerDevice[] {
  const byName = new Map<string, WorkerDevice>();
  for (const w of ws) for (const d of w.devices ?? []) if (!byName.has(d.name)) byName.set(d.name, d);
  return [...byName.values()];
}

// A peer's console figures are a few KiB; anything much larger is not what was asked for.
const MAX_PEER_JSON = 1024 * 1024;

/** GET `path` of the member at `addr` with mesh credentials: its JSON, or null on any failure. */
async function peerGet(client: MeshClient, addr: string, path: string, timeoutMs: number): Promise<unknown> {
  try {
    const { response } = await client.send(addr, "GET", path, new Uint8Array(), { signal: AbortSignal.timeout(timeoutMs) });
    if (response.status !== 200) {
      await response.body?.cancel();
      return null;
    }
    const bytes = await readLimited(response.body, MAX_PEER_JSON);
    return bytes ? (JSON.parse(new TextDecoder().decode(bytes)) as unknown) : null;
  } catch {
    return null;
  }
}

/** A model's load figures for its worker record. */
async function loadOf(model: ServedModel): Promise<LoadPatch> {
  if (model.status !== "ready" || !model.engine) return { health: model.status };
  const s = await model.engine.stats().catch(() => null);
  if (!s) return { health: "failed" };
  return {
    health: "ready",
    slotsTotal: s.slotsTotal,
    slotsBusy: s.slotsBusy,
    // Cells committed to running requests (held or promised): idle cached prefixes are freed as needed, so a node
    // whose KV is full of cache is not full for routing's load gate.
    kvUsed: s.kvCellsRunning + s.kvCellsReserved,
    kvCached: s.kvCellsUsed,
    kvTotal: s.kvCellsTotal,
    queueDepth: s.waiting,
    ...(model.info ? { ctxSize: model.info.nCtxSeq } : {}),
  };
}
