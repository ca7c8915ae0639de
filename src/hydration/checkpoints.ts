// Session checkpoints pulled from peers. Peers announce their hot sessions'
// checkpoints (checkpoint-record.ts); a session is routed to its home node
// among those serving its model (rendezvous), so a node that (re)joins is home
// to its share. A background pass per model pulls the checkpoints of the
// sessions homed here that a peer holds and this node does not, through the
// hydration lanes; a request for such a session takes the priority lane and
// waits only for its own checkpoint. Every blob is checked against the hash
// its holder announced and against this model's fingerprint before the
// engine stores it; a corrupt one is dropped and counted. Best effort
// throughout: a failure leaves the request to a full prefill (or its holder),
// and the next pass tries again.
import type { CheckpointImport } from "../engine/protocol";
import type { Logger } from "../log";
import { LruMap } from "../lru";
import { type AnnouncedCheckpoint, type AnnouncedModel, CKPT_PREFIX, parseRecord, sessionHome } from "./checkpoint-record";
import { HydrationLanes, LANE_DEFAULTS, type LaneClock, type LaneEvent, type LaneOutcome } from "./lanes";

/** What hydration needs of a model's engine. */
export interface HydrationEngine {
  hasCheckpoints(keys: string[]): Promise<string[]>;
  /** Refused as corrupt unless the blob is `key`'s and hashes to `hash`. */
  importCheckpoint(blob: Uint8Array, hash: string, key: string): Promise<CheckpointImport>;
}

/** One checkpoint to pull: which model and session, from whom, and what it must hash to. */
export interface HydrationItem extends AnnouncedCheckpoint {
  model: string;
  /** The node announcing it. */
  from: string;
}

/** Where the hydrator finds peers, records and engines (a node wires the mesh and its models in). */
export interface HydratorDeps {
  selfId(): string;
  /** Live peers' `ckpt:` records as stored (owner, key, JSON value). */
  records(): Iterable<{ owner: string; key: string; value: string | null }>;
  /** Nodes whose ready workers serve `model` (this one included when it does). */
  servers(model: string): string[];
  addrOf(nodeId: string): string | null;
  nameOf(nodeId: string): string;
  /** The engine of a model served here and its checkpoint fingerprint; null when not served here or without checkpoints. */
  local(model: string): { engine: HydrationEngine; fingerprint: string } | null;
  /** Models served here. */
  models(): string[];
  /** GET `path` from the peer `nodeId` at `addr` with mesh credentials: its body, at most `maxBytes`; rejects otherwise. */
  fetchBlob(addr: string, nodeId: string, path: string, maxBytes: number, signal: AbortSignal): Promise<Uint8Array>;
  clock: LaneClock;
  /** Background fetches at once (0: no background pass, requests still fetch theirs). */
  parallelism?: number;
  itemTimeoutMs?: number;
  logger?: Logger;
}

/** Counters beyond the lanes': why imports were refused. */
interface RefusalCounts {
  corrupt: number;
  incompatible: number;
  noRoom: number;
  unreachable: number;
}

/** Where a hydrated checkpoint came from (for the session listing). */
export interface HydratedFrom {
  node: string;
  name: string;
  key: string;
  tokens: number;
}

/** Most sessions whose checkpoint source is remembered. */
const MAX_SOURCES = 1024;
/** A blob's header and token ids beyond its state: JSON header (at most 4 KiB) and 4 bytes a token. */
const blobBound = (c: AnnouncedCheckpoint) => c.bytes + c.tokens * 4 + 8192;
/**
 * Largest blob fetched, whatever a peer announces (the announced sizes are only the peer's word, up to 2^53):
 * what a holder serves at most (MAX_CHECKPOINT_BLOB of the /mesh/checkpoints route). A larger announcement is
 * never wanted, so no peer can make this node buffer more.
 */
export const MAX_BLOB_BYTES = 1024 * 1024 * 1024;

/** An item's identity in the lanes (in-flight dedupe is by it). */
const laneKey = (i: HydrationItem) => `${i.model}\n${i.key}`;

/** A refusal of an import, carried as a value through the lane's rejection. */
class ImportRefused extends Error {
  constructor(readonly code: string) {
    super(`checkpoint import refused: ${code}`);
  }
}

/** Pulls the checkpoints of sessions routed here from the peers holding them. */
export class CheckpointHydrator {
  readonly lanes: HydrationLanes<HydrationItem>;
  private readonly refusals: RefusalCounts = { corrupt: 0, incompatible: 0, noRoom: 0, unreachable: 0 };
  private readonly parsed = new Map<string, { value: string; models: AnnouncedModel[] | null }>();
  private readonly sources = new LruMap<string, HydratedFrom>();
  /** Start time of each running pass (at most one per model), for its log line. */
  private readonly passStarted = new Map<string, number>();
  /**
   * The engine answers one call at a time in order (its Worker), and an import is the costly one (hash and copy
   * of the whole state): background imports go one at a time, and none starts while a request is preparing (but
   * the one of the checkpoint a request waits for: it joined that very fetch), so
   * a request's own calls wait behind at most the one background import already in the engine.
   */
  private backgroundImporting = false;
  /** Requests preparing, by the lane key of the checkpoint each waits for. */
  private readonly preparing = new Map<string, number>();
  private readonly importWaiters: Array<() => void> = [];

  constructor(private readonly d: HydratorDeps) {
    this.lanes = new HydrationLanes<HydrationItem>({
      parallelism: d.parallelism ?? LANE_DEFAULTS.parallelism,
      itemTimeoutMs: d.itemTimeoutMs ?? LANE_DEFAULTS.itemTimeoutMs,
      maxQueue: LANE_DEFAULTS.maxQueue,
      maxPriority: LANE_DEFAULTS.maxPriority,
      maxPasses: LANE_DEFAULTS.maxPasses,
      clock: d.clock,
      keyOf: laneKey,
      fetch: (i, signal, lane) => this.fetch(i, signal, lane),
      filled: async (i) => ((await this.d.local(i.model)?.engine.hasCheckpoints([i.key])) ?? []).length > 0,
      onEvent: (e) => this.log(e),
    });
  }

  /** Checkpoints peers announce for sessions whose home is this node, one per session (the most recently used). */
  wanted(model: string): HydrationItem[] {
    const self = this.d.selfId();
    const servers = this.d.servers(model);
    return [...this.announced(model).values()]
      .filter((i) => sessionHome(i.session, servers) === self)
      .sort((a, b) => b.lastUsed - a.lastUsed);
  }

  /** Every session of `model` whose checkpoint a live peer announces for this model file: the most recently used announcement of each. */
  private announced(model: string): Map<string, HydrationItem> {
    const self = this.d.selfId();
    const local = this.d.local(model);
    const best = new Map<string, HydrationItem>();
    if (!local) return best;
    const mine = new Set<string>();
    for (const [owner, models] of this.peerRecords()) {
      if (owner === self) {
        // Sessions this node announces itself run here already, on checkpoints newer than any peer's.
        for (const m of models) for (const c of m.checkpoints) mine.add(c.session);
        continue;
      }
      for (const m of models) {
        if (m.model !== model || m.fingerprint !== local.fingerprint) continue;
        for (const c of m.checkpoints) {
          if (blobBound(c) > MAX_BLOB_BYTES) continue;
          const had = best.get(c.session);
          if (!had || c.lastUsed > had.lastUsed) best.set(c.session, { ...c, model, from: owner });
        }
      }
    }
    for (const session of mine) best.delete(session);
    return best;
  }

  /** Start a background pass for every model served here (one per model at a time); returns the passes started. */
  async passAll(): Promise<number> {
    let started = 0;
    for (const model of this.d.models()) if (await this.pass(model)) started++;
    return started;
  }

  /** Start a background pass for `model` over what is wanted and missing here; false when none started. */
  async pass(model: string): Promise<boolean> {
    if (this.lanes.running(model)) return this.lanes.trigger(model, []); // counted as deduped
    const want = this.wanted(model);
    const local = this.d.local(model);
    if (!local || want.length === 0) return false;
    const held = new Set(await local.engine.hasCheckpoints(want.map((i) => i.key)).catch(() => [] as string[]));
    const missing = want.filter((i) => !held.has(i.key));
    return missing.length > 0 && this.lanes.trigger(model, missing);
  }

  /**
   * A request for `session` on `model` about to run here, a session this node does not hold: when a
   * peer announces its checkpoint and it is not here yet, fetch it now through the priority lane. True
   * when the checkpoint is here (already, or now); false: the turn prefills in full.
   */
  async prepare(session: string, model: string): Promise<boolean> {
    const item = this.announced(model).get(session);
    const local = this.d.local(model);
    if (!item || !local) return false;
    const key = laneKey(item);
    this.preparing.set(key, (this.preparing.get(key) ?? 0) + 1);
    // A background fetch of this very checkpoint waiting for its import turn may go now (the request joins it).
    this.wakeImports();
    try {
      const held = await local.engine.hasCheckpoints([item.key]).catch(() => [] as string[]);
      if (held.length > 0) return true;
      const outcome: LaneOutcome = await this.lanes.priority(item);
      return outcome === "hydrated" || outcome === "skipped";
    } finally {
      const n = (this.preparing.get(key) ?? 1) - 1;
      if (n > 0) this.preparing.set(key, n);
      else this.preparing.delete(key);
      this.wakeImports();
    }
  }

  /** Wait for the engine to be free of background imports and of requests preparing; the caller then imports, and releases. */
  private async backgroundImportTurn(key: string, signal: AbortSignal): Promise<() => void> {
    while (this.backgroundImporting || (this.preparing.size > 0 && !this.preparing.has(key))) {
      signal.throwIfAborted();
      await new Promise<void>((wake) => {
        const onAbort = () => wake();
        signal.addEventListener("abort", onAbort, { once: true });
        this.importWaiters.push(() => {
          signal.removeEventListener("abort", onAbort);
          wake();
        });
      });
    }
    signal.throwIfAborted();
    this.backgroundImporting = true;
    return () => {
      this.backgroundImporting = false;
      this.wakeImports();
    };
  }

  private wakeImports(): void {
    for (const wake of this.importWaiters.splice(0)) wake();
  }

  /** Stop: running fetches are aborted, no pass or request fetches anything any more. */
  close(): void {
    this.lanes.close();
  }

  /** Where the checkpoint a session was hydrated with came from, if it was. */
  sourceOf(session: string): HydratedFrom | undefined {
    return this.sources.peek(session);
  }

  /** Counters and current load. */
  stats() {
    return { ...this.lanes.stats(), ...this.refusals };
  }

  /** The hydration figures in Prometheus text. */
  renderMetrics(): string {
    const s = this.stats();
    let routed = 0;
    for (const m of this.d.models()) routed += this.wanted(m).length;
    const rows: Array<[string, number]> = [
      ['{outcome="hydrated"}', s.hydrated],
      ['{outcome="skipped"}', s.skipped],
      ['{outcome="failed"}', s.failed],
      ['{outcome="timeout"}', s.timeouts],
      ['{outcome="dropped"}', s.dropped],
      ['{outcome="corrupt"}', s.corrupt],
      ['{outcome="incompatible"}', s.incompatible],
    ];
    const line = (name: string, type: string, help: string, v: Array<[string, number]>) =>
      [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...v.map(([l, x]) => `${name}${l} ${x}`)].join("\n");
    return [
      line(
        "mesh_hydration_checkpoints_total",
        "counter",
        "Session checkpoints pulled from peers by outcome (failed includes corrupt and incompatible)",
        rows,
      ),
      line("mesh_hydration_priority_total", "counter", "Checkpoint fetches a waiting request started (priority lane)", [["", s.priority]]),
      line("mesh_hydration_passes_total", "counter", "Background hydration passes started", [["", s.passes]]),
      line("mesh_hydration_routed_here", "gauge", "Sessions routed to this node whose checkpoint a peer announces", [["", routed]]),
      line("mesh_hydration_in_flight", "gauge", "Checkpoint fetches running", [["", s.inFlight]]),
      line("mesh_hydration_queue_depth", "gauge", "Checkpoints queued in background passes", [["", s.queued]]),
    ].join("\n");
  }

  /** Fetch one checkpoint's blob from its holder and import it; rejects (a value with a code) on any failure. */
  private async fetch(i: HydrationItem, signal: AbortSignal, lane: "background" | "priority"): Promise<void> {
    const local = this.d.local(i.model);
    const addr = this.d.addrOf(i.from);
    if (!local || !addr) {
      this.refusals.unreachable++;
      throw new ImportRefused("unreachable");
    }
    const path = `/mesh/checkpoints/${encodeURIComponent(i.model)}/${i.key}`;
    let blob: Uint8Array;
    try {
      blob = await this.d.fetchBlob(addr, i.from, path, blobBound(i), signal);
    } catch (e) {
      this.refusals.unreachable++;
      throw e;
    }
    const release = lane === "background" ? await this.backgroundImportTurn(laneKey(i), signal) : () => {};
    let r: Awaited<ReturnType<HydrationEngine["importCheckpoint"]>>;
    try {
      r = await local.engine.importCheckpoint(blob, i.hash, i.key);
    } finally {
      release();
    }
    if (!r.ok) {
      if (r.code === "corrupt") this.refusals.corrupt++;
      else if (r.code === "incompatible") this.refusals.incompatible++;
      else this.refusals.noRoom++;
      this.d.logger?.warn("checkpoint from peer refused", { from: this.d.nameOf(i.from), model: i.model, code: r.code });
      throw new ImportRefused(r.code);
    }
    this.sources.set(i.session, { node: i.from, name: this.d.nameOf(i.from), key: i.key, tokens: r.tokens });
    while (this.sources.size > MAX_SOURCES) this.sources.shift();
  }

  /** Peers' parsed records, reparsed only when their value changed (a bad one is ignored whole). */
  private peerRecords(): Array<[string, AnnouncedModel[]]> {
    const out: Array<[string, AnnouncedModel[]]> = [];
    const seen = new Set<string>();
    for (const r of this.d.records()) {
      if (r.value === null || r.key !== `${CKPT_PREFIX}${r.owner}`) continue;
      seen.add(r.owner);
      let p = this.parsed.get(r.owner);
      if (!p || p.value !== r.value) {
        p = { value: r.value, models: parseRecord(r.value) };
        this.parsed.set(r.owner, p);
      }
      if (p.models) out.push([r.owner, p.models]);
    }
    for (const owner of [...this.parsed.keys()]) if (!seen.has(owner)) this.parsed.delete(owner);
    return out;
  }

  private log(e: LaneEvent): void {
    if (e.kind === "pass_start") this.passStarted.set(e.pass, performance.now());
    if (e.kind !== "pass_end") return;
    const t0 = this.passStarted.get(e.pass);
    this.passStarted.delete(e.pass);
    const ms = t0 === undefined ? undefined : Math.round(performance.now() - t0);
    this.d.logger?.info("checkpoint hydration pass", { model: e.pass, hydrated: e.hydrated, skipped: e.skipped, failed: e.failed, ms });
  }
}
