// Checkpoint hydration on a running node: announces this node's hot sessions
// and their checkpoints as its `ckpt:` record, runs a background hydration
// pass per model after the join and then periodically (best effort: what a
// pass missed, the next one fetches), and hands the app the hydrator whose
// priority lane a session turn that runs here without its checkpoint takes.
import { CKPT_PREFIX, encodeRecord, MAX_ANNOUNCED } from "../hydration/checkpoint-record";
import { CheckpointHydrator } from "../hydration/checkpoints";
import type { LaneClock } from "../hydration/lanes";
import type { Logger } from "../log";
import type { MeshNode } from "./mesh-node";
import type { ServedModel } from "./model";
import type { SessionService } from "./sessions";

/** How often the announcement is refreshed (written only when it changed). */
const ANNOUNCE_EVERY_MS = 2_000;
/** How often a background pass is started (one per model at a time; a running one is not restarted). */
const PASS_EVERY_MS = 5_000;

/** Hydration settings of `mesh serve`. */
export interface HydrationOptions {
  /** Background fetches at once (0: no background pass; requests still fetch their own checkpoint). */
  parallelism: number;
  itemTimeoutMs: number;
}

const realClock: LaneClock = {
  setTimer: (fn, ms) => setTimeout(fn, ms),
  clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

/** A node's hydration: its announcer and its hydrator. */
export class NodeHydration {
  readonly hydrator: CheckpointHydrator;
  private sessions: SessionService | null = null;
  private readonly timers: Array<ReturnType<typeof setInterval>> = [];
  private lastAnnounced = "";
  private announcing = false;

  constructor(
    private readonly node: MeshNode,
    private readonly models: readonly ServedModel[],
    o: HydrationOptions,
    private readonly logger: Logger,
  ) {
    const local = (id: string) => {
      const m = models.find((x) => x.id === id);
      const e = m?.engine;
      const fingerprint = m?.info?.checkpointFingerprint;
      if (m?.status !== "ready" || !e?.hasCheckpoints || !e.importCheckpoint || !fingerprint) return null;
      return { engine: { hasCheckpoints: e.hasCheckpoints.bind(e), importCheckpoint: e.importCheckpoint.bind(e) }, fingerprint };
    };
    const member = (id: string) => node.meshCore?.members().find((m) => m.id === id);
    this.hydrator = new CheckpointHydrator({
      selfId: () => node.hooks.service.nodeId(),
      records: () => {
        const core = node.meshCore;
        if (!core) return [];
        const live = new Set(core.members().flatMap((m) => (m.state === "alive" || m.state === "suspect" ? [m.id] : [])));
        return [...core.store.live(CKPT_PREFIX)].filter((r) => live.has(r.owner));
      },
      servers: (model) => node.servers(model),
      addrOf: (id) => member(id)?.addr ?? null,
      nameOf: (id) => member(id)?.name ?? id.slice(0, 8),
      local,
      models: () => models.filter((m) => m.status === "ready").map((m) => m.id),
      fetchBlob: (addr, id, path, max, signal) => node.peerBytes(addr, id, path, max, signal),
      clock: realClock,
      parallelism: o.parallelism,
      itemTimeoutMs: o.itemTimeoutMs,
      logger,
    });
  }

  /** Announce the sessions of `sessions` (call once, when the server made it). */
  attach(sessions: SessionService): void {
    this.sessions = sessions;
    const t = setInterval(() => void this.announce(), ANNOUNCE_EVERY_MS);
    t.unref();
    this.timers.push(t);
  }

  /** Start the background passes: one now (the node just joined), then periodically. */
  start(): void {
    const run = () =>
      void this.hydrator.passAll().catch((e: unknown) => this.logger.warn("hydration pass failed", { error: (e as Error)?.message }));
    run();
    const t = setInterval(run, PASS_EVERY_MS);
    t.unref();
    this.timers.push(t);
  }

  /** Stop announcing and passing, and abort the fetches running (their timers would keep a stopped node alive). */
  stop(): void {
    for (const t of this.timers.splice(0)) clearInterval(t);
    this.hydrator.close();
  }

  /** Write this node's `ckpt:` record: per model, its most recently used sessions' latest checkpoints. */
  async announce(): Promise<void> {
    const core = this.node.meshCore;
    if (!core || !this.sessions || this.announcing) return;
    this.announcing = true;
    try {
      const recent = this.sessions.store.list().slice(0, MAX_ANNOUNCED);
      const out = [];
      for (const m of this.models) {
        const e = m.engine;
        const fingerprint = m.info?.checkpointFingerprint;
        if (m.status !== "ready" || !e?.describeCheckpoints || !fingerprint) continue;
        // Each session's latest turn on this model (the highest node id: the trie numbers nodes as it makes them).
        const latest = new Map<string, { session: string; lastUsed: number }>();
        for (const s of recent) {
          let best: { id: number; key: string } | null = null;
          for (const n of s.trie.turns()) {
            const key = n.turn?.checkpoint;
            if (key && n.turn?.model === m.id && (!best || n.id > best.id)) best = { id: n.id, key };
          }
          if (best) latest.set(best.key, { session: s.id, lastUsed: Math.floor(s.lastUsedWall / 1000) });
        }
        if (latest.size === 0) continue;
        const described = await e.describeCheckpoints([...latest.keys()]).catch(() => []);
        const checkpoints = described.flatMap((c) => {
          const s = latest.get(c.key);
          return s ? [{ session: s.session, key: c.key, hash: c.hash, tokens: c.tokens, bytes: c.bytes, lastUsed: s.lastUsed }] : [];
        });
        out.push({ model: m.id, fingerprint, checkpoints });
      }
      const text = encodeRecord(out);
      if (text === this.lastAnnounced) return;
      const r = core.store.put(`${CKPT_PREFIX}${core.store.id}`, text);
      if (r.ok) this.lastAnnounced = text;
      else this.logger.warn("cannot announce checkpoints", { code: r.code, error: r.message });
    } finally {
      this.announcing = false;
    }
  }
}
