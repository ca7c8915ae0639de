// Worker registry sync: this node's workers (origin Local) are published to
// the replicated store under `worker:{id}`, every other node's (origin Mesh)
// are imported from it. The fixes the seed's review found are built in:
// - origin is part of the entry from its creation, never a separate map that a
//   reader could see missing; ids embed the owner's node id, so an import can
//   never collide with (or claim) a local worker;
// - only Local workers are published and tombstoned; imports never are;
// - the inbound side re-reads the store's current value for a key instead of
//   trusting a queued event's snapshot, so delivery order does not matter;
// - a tombstone (or stale value) for a Local worker, arriving from the mesh, is
//   refused and the worker re-asserted with a newer clock;
// - a periodic reconcile compares registry and store both ways and repairs
//   missed puts, missed tombstones and lost publishes;
// - a mesh worker that fails here stays registered but unroutable (its owner
//   manages its lifecycle); a stale record cannot re-promote it, only a newer one.
import type { Logger } from "../log";
import { compareHlc, type Hlc } from "./hlc";
import type { Kv } from "./kv";
import type { KvRecord } from "./kv-record";
import type { Clock, NodeId, WorkerInfo } from "./wire";
import { checkSpec, type LocalWorkerSpec, parseWorker, serializeWorker, WORKER_PREFIX, workerIdOf, workerKey } from "./worker-info";

/** Who owns a worker as seen from this node. */
export type WorkerOrigin = "local" | "mesh";

/** A worker in the registry. */
export interface WorkerEntry {
  info: WorkerInfo;
  origin: WorkerOrigin;
  /** Whether routing may send it requests: healthy, a valid record, and not failing here. */
  routable: boolean;
  /** Why an import is not usable: its record did not check out, or requests to it failed here. */
  problem?: "bad_record" | "unreachable";
}

/** A change in the registry. */
export interface WorkerEvent {
  kind: "added" | "updated" | "removed";
  worker: WorkerEntry;
}

/** Pacing and bounds of the registry sync. */
export interface WorkersConfig {
  reconcileMs: number;
  /** Load-only changes (slots busy, KV used, queue) are published at most this often; health changes at once. */
  loadPublishMs: number;
  /** Store changes waiting to be applied, at most; beyond, they are dropped (counted) and reconcile repairs them. */
  maxPending: number;
  /** A mesh worker reported failing stays unroutable this long, unless its owner publishes a newer record. */
  quarantineMs: number;
  maxListeners: number;
}

/** Defaults: reconcile every 30 s, load published at most once a second. */
export const WORKERS_DEFAULTS: WorkersConfig = {
  reconcileMs: 30_000,
  loadPublishMs: 1000,
  maxPending: 1024,
  quarantineMs: 30_000,
  maxListeners: 64,
};

/** Why a registry call was refused. */
export type WorkersErrorCode = "bad_worker" | "not_found" | "not_owner" | "publish_failed" | "too_many_workers";

/** A registry call's result. */
export type WorkersResult = { ok: true; value: WorkerInfo } | { ok: false; code: WorkersErrorCode; message: string };

/** Counters for metrics. */
export interface WorkersStats {
  local: number;
  mesh: number;
  published: number;
  publishFailures: number;
  tombstoned: number;
  imports: number;
  badRecords: number;
  removedImports: number;
  reasserted: number;
  staleOwnTombstoned: number;
  pendingDropped: number;
  reconcileRepairs: number;
  /** Records published under a worker id that another node owns. */
  impostors: number;
}

interface Entry {
  info: WorkerInfo;
  origin: WorkerOrigin;
  owner: NodeId;
  /** Mesh: the record version imported. */
  hlc?: Hlc;
  badRecord: boolean;
  quarantine?: { until: number; hlc: Hlc | undefined };
  /** Local: the value last written to the store. */
  published?: string;
  lastPublish: number;
  loadTimer?: unknown;
}

const LOAD_FIELDS = new Set(["slotsBusy", "kvUsed", "kvCached", "queueDepth"]);

/** Options of a registry. */
export interface WorkersOptions {
  kv: Kv;
  self: NodeId;
  clock: Clock;
  log: Logger;
  config?: Partial<WorkersConfig>;
}

/** The registry of every worker in the mesh, as this node sees it. */
export class WorkerRegistry {
  readonly config: WorkersConfig;
  readonly stats: WorkersStats = {
    local: 0,
    mesh: 0,
    published: 0,
    publishFailures: 0,
    tombstoned: 0,
    imports: 0,
    badRecords: 0,
    removedImports: 0,
    reasserted: 0,
    staleOwnTombstoned: 0,
    pendingDropped: 0,
    reconcileRepairs: 0,
    impostors: 0,
  };
  private readonly entries = new Map<string, Entry>();
  private readonly pending = new Map<string, { owner: NodeId; key: string }>();
  private readonly listeners = new Set<(e: WorkerEvent) => void>();
  private flushing = false;
  private timer: unknown = null;

  constructor(private readonly o: WorkersOptions) {
    this.config = { ...WORKERS_DEFAULTS, ...o.config };
  }

  /** Start the periodic reconcile. */
  start(): void {
    if (this.timer !== null) return;
    const tick = () => {
      this.timer = this.o.clock.setTimer(() => {
        this.reconcile();
        tick();
      }, this.config.reconcileMs);
    };
    tick();
  }

  /** Stop the reconcile and pending load publishes. */
  stop(): void {
    if (this.timer !== null) this.o.clock.clearTimer(this.timer);
    this.timer = null;
    for (const e of this.entries.values()) {
      if (e.loadTimer === undefined) continue;
      this.o.clock.clearTimer(e.loadTimer);
      // The load it held back is published by the next update or reconcile.
      e.loadTimer = undefined;
    }
  }

  /** Register (or replace) one of this node's workers and publish it; its id is derived from node, model and address. */
  register(spec: LocalWorkerSpec): WorkersResult {
    const problem = checkSpec(spec);
    if (problem) return { ok: false, code: "bad_worker", message: problem };
    const id = workerIdOf(this.o.self, spec.models[0] as string, spec.addr);
    if (!this.entries.has(id) && this.stats.local >= this.o.kv.config.maxKeysPerOwner) {
      return { ok: false, code: "too_many_workers", message: `this node already has ${this.stats.local} workers` };
    }
    const info: WorkerInfo = JSON.parse(serializeWorker({ ...spec, id, nodeId: this.o.self }));
    const prev = this.entries.get(id);
    const entry: Entry = prev ?? { info, origin: "local", owner: this.o.self, badRecord: false, lastPublish: Number.NEGATIVE_INFINITY };
    entry.info = info;
    const published = this.publish(entry);
    if (!prev) this.add(id, entry);
    this.emit(prev ? "updated" : "added", entry);
    return published
      ? { ok: true, value: info }
      : { ok: false, code: "publish_failed", message: "registered here, but the store refused it; reconcile retries" };
  }

  /** Change a local worker's status or load, e.g. `update(id, { slotsBusy: 3 })`; health changes publish at once. */
  update(id: string, patch: Partial<Omit<LocalWorkerSpec, "models" | "addr">>): WorkersResult {
    const e = this.entries.get(id);
    if (!e) return { ok: false, code: "not_found", message: `no worker ${id}` };
    if (e.origin !== "local") return { ok: false, code: "not_owner", message: `worker ${id} belongs to node ${e.owner.slice(0, 8)}` };
    const next = { ...e.info, ...patch, id: e.info.id, nodeId: e.info.nodeId, models: e.info.models, addr: e.info.addr };
    const problem = checkSpec(next);
    if (problem) return { ok: false, code: "bad_worker", message: problem };
    const changed = Object.keys(patch).filter(
      (k) => (patch as Record<string, unknown>)[k] !== (e.info as unknown as Record<string, unknown>)[k],
    );
    if (changed.length === 0) return { ok: true, value: e.info };
    e.info = JSON.parse(serializeWorker(next));
    this.emit("updated", e);
    const loadOnly = changed.every((k) => LOAD_FIELDS.has(k));
    const wait = e.lastPublish + this.config.loadPublishMs - this.o.clock.now();
    if (!loadOnly || wait <= 0) this.publish(e);
    else if (e.loadTimer === undefined) {
      e.loadTimer = this.o.clock.setTimer(() => {
        e.loadTimer = undefined;
        if (this.entries.get(id) === e) this.publish(e);
      }, wait);
    }
    return { ok: true, value: e.info };
  }

  /** Remove a local worker and tombstone its record. */
  remove(id: string): WorkersResult {
    const e = this.entries.get(id);
    if (!e) return { ok: false, code: "not_found", message: `no worker ${id}` };
    if (e.origin !== "local") return { ok: false, code: "not_owner", message: `worker ${id} belongs to node ${e.owner.slice(0, 8)}` };
    this.drop(id, e);
    if (e.loadTimer !== undefined) this.o.clock.clearTimer(e.loadTimer);
    this.tombstone(id);
    this.emit("removed", e);
    return { ok: true, value: e.info };
  }

  /** One worker by id. */
  get(id: string): WorkerEntry | undefined {
    const e = this.entries.get(id);
    return e && this.view(e);
  }

  /** Every worker, local and imported, routable or not. */
  list(): WorkerEntry[] {
    return [...this.entries.values()].map((e) => this.view(e));
  }

  /** Healthy workers serving `model`, anywhere in the mesh (this node's included). */
  routable(model: string): WorkerInfo[] {
    const out: WorkerInfo[] = [];
    for (const e of this.entries.values()) if (e.info.models.includes(model) && this.isRoutable(e)) out.push(e.info);
    return out;
  }

  /** Requests to a mesh worker failed here: keep it registered but unroutable until its owner publishes news or the quarantine ends. */
  reportFailure(id: string): void {
    const e = this.entries.get(id);
    if (e?.origin !== "mesh") return;
    e.quarantine = { until: this.o.clock.now() + this.config.quarantineMs, hlc: e.hlc };
    this.emit("updated", e);
  }

  /** Subscribe to registry changes; returns the unsubscribe function. */
  on(listener: (e: WorkerEvent) => void): () => void {
    if (this.listeners.size >= this.config.maxListeners) throw new Error(`more than ${this.config.maxListeners} worker listeners: a leak`);
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Called by the store when (owner, key) may have changed; applied soon from the store's current value. */
  onStoreChange(owner: NodeId, key: string): void {
    if (!key.startsWith(WORKER_PREFIX)) return;
    const pk = `${owner}/${key}`;
    if (!this.pending.has(pk)) {
      if (this.pending.size >= this.config.maxPending) {
        this.stats.pendingDropped++;
        return;
      }
      this.pending.set(pk, { owner, key });
    }
    if (!this.flushing) {
      this.flushing = true;
      queueMicrotask(() => this.flush());
    }
  }

  /** Compare registry and store both ways and repair what notifications missed; returns the number of repairs. */
  reconcile(): number {
    let repairs = 0;
    const kv = this.o.kv;
    for (const [id, e] of [...this.entries]) {
      if (e.origin === "local") {
        const rec = kv.get(this.o.self, workerKey(id));
        if (!rec || rec.value !== serializeWorker(e.info)) {
          if (e.loadTimer === undefined) {
            this.publish(e);
            repairs++;
          }
        }
      } else {
        const rec = kv.get(e.owner, workerKey(id));
        if (!rec || rec.value === null || !sameHlc(rec.hlc, e.hlc)) {
          this.syncKey(e.owner, workerKey(id));
          repairs++;
        }
      }
    }
    for (const rec of [...kv.live(WORKER_PREFIX)]) {
      const e = this.entries.get(rec.key.slice(WORKER_PREFIX.length));
      const stale = e?.origin === "mesh" && (e.owner === rec.owner ? !sameHlc(rec.hlc, e.hlc) : e.badRecord);
      if (!e || stale) {
        this.syncKey(rec.owner, rec.key);
        repairs++;
      }
    }
    this.stats.reconcileRepairs += repairs;
    if (repairs > 0) this.o.log.info("mesh worker reconcile repaired", { repairs });
    return repairs;
  }

  private flush(): void {
    this.flushing = false;
    const batch = [...this.pending.values()];
    this.pending.clear();
    for (const { owner, key } of batch) this.syncKey(owner, key);
  }

  // The one place a store record turns into registry state: it reads the store's value now.
  private syncKey(owner: NodeId, key: string): void {
    const id = key.slice(WORKER_PREFIX.length);
    const rec = this.o.kv.get(owner, key);
    let e = this.entries.get(id);
    if (owner === this.o.self) {
      this.syncOwn(id, rec, e);
      return;
    }
    if (e && e.origin === "local") return;
    const info = rec?.value ? parseWorker(rec.value, owner, id) : null;
    if (e && e.owner !== owner) {
      // Two nodes publish under one id: only a record whose id binding checks out (so it is the real
      // owner's) may displace an entry, and only an entry that did not check out itself.
      if (!info || !e.badRecord) {
        this.stats.impostors++;
        return;
      }
      this.drop(id, e);
      this.emit("removed", e);
      e = undefined;
    }
    if (!rec || rec.value === null) {
      if (e) {
        this.drop(id, e);
        this.stats.removedImports++;
        this.emit("removed", e);
      }
      return;
    }
    if (e && sameHlc(rec.hlc, e.hlc)) return;
    if (!info) {
      this.stats.badRecords++;
      this.o.log.warn("mesh worker record does not check out; kept unroutable", { owner: owner.slice(0, 8), worker: id.slice(0, 8) });
    }
    const entry: Entry = e ?? { info: info ?? placeholder(id, owner), origin: "mesh", owner, badRecord: false, lastPublish: 0 };
    entry.hlc = rec.hlc;
    entry.badRecord = info === null;
    if (info) entry.info = info;
    if (entry.quarantine && !sameHlc(entry.quarantine.hlc, rec.hlc)) entry.quarantine = undefined;
    if (!e) {
      this.add(id, entry);
      this.stats.imports++;
    }
    this.emit(e ? "updated" : "added", entry);
  }

  // A record of our own key that differs from what we serve came from the mesh: an echo of an earlier
  // life, or a tombstone. Our registry is the truth; re-assert it (newer clock) or delete the leftover.
  private syncOwn(id: string, rec: KvRecord | undefined, e: Entry | undefined): void {
    if (e) {
      if (!rec || rec.value !== serializeWorker(e.info)) {
        if (e.loadTimer !== undefined) return;
        this.stats.reasserted++;
        this.o.log.info("mesh re-asserted a local worker", { worker: id.slice(0, 8), tombstone: rec?.value === null });
        this.publish(e);
      }
    } else if (rec && rec.value !== null) {
      this.stats.staleOwnTombstoned++;
      this.tombstone(id);
    }
  }

  private publish(e: Entry): boolean {
    const value = serializeWorker(e.info);
    const r = this.o.kv.put(workerKey(e.info.id), value);
    e.lastPublish = this.o.clock.now();
    if (!r.ok) {
      this.stats.publishFailures++;
      this.o.log.warn("mesh could not publish a local worker", { worker: e.info.id.slice(0, 8), code: r.code });
      return false;
    }
    e.published = value;
    this.stats.published++;
    return true;
  }

  private tombstone(id: string): void {
    const r = this.o.kv.delete(workerKey(id));
    if (r.ok) this.stats.tombstoned++;
  }

  private isRoutable(e: Entry): boolean {
    if (e.info.health !== "ready" || e.badRecord) return false;
    return !(e.quarantine && this.o.clock.now() < e.quarantine.until);
  }

  private view(e: Entry): WorkerEntry {
    const v: WorkerEntry = { info: e.info, origin: e.origin, routable: this.isRoutable(e) };
    if (e.badRecord) v.problem = "bad_record";
    else if (e.quarantine && this.o.clock.now() < e.quarantine.until) v.problem = "unreachable";
    return v;
  }

  private add(id: string, e: Entry): void {
    this.entries.set(id, e);
    this.stats[e.origin]++;
  }

  private drop(id: string, e: Entry): void {
    this.entries.delete(id);
    this.stats[e.origin]--;
  }

  private emit(kind: WorkerEvent["kind"], e: Entry): void {
    const event = { kind, worker: this.view(e) };
    for (const l of [...this.listeners]) {
      try {
        l(event);
      } catch (err) {
        this.o.log.warn("mesh worker listener failed", { error: (err as Error).message });
      }
    }
  }
}

function sameHlc(a: Hlc | undefined, b: Hlc | undefined): boolean {
  return a !== undefined && b !== undefined && compareHlc(a, b) === 0;
}

function placeholder(id: string, owner: NodeId): WorkerInfo {
  return {
    id,
    nodeId: owner,
    addr: "",
    models: [],
    ctxSize: 0,
    slotsTotal: 0,
    slotsBusy: 0,
    kvUsed: 0,
    kvCached: 0,
    kvTotal: 0,
    queueDepth: 0,
    health: "failed",
  };
}
