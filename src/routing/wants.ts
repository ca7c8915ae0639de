// Interest: which models' routing index each node wants. A node wants a model
// it routed a client request for within a TTL, or (by default) one it serves.
// Its wanted set is one record of the replicated store, this node's own key
// `route:want` (a sorted JSON array), written only when the set changes, so
// the tenancy sync sends a model's deltas only to the nodes that want them: a
// large mesh is not all-to-all traffic. Peers' sets are read from the store
// and cached here, with the reverse map (model -> nodes wanting it) the sync
// consults on every publish.
import type { Kv } from "../mesh/kv";
import type { NodeId } from "../mesh/wire";
import { isModelName } from "./own";

/** The store key of a node's wanted set. */
export const WANT_KEY = "route:want";
/** Models a peer's record may name, at most, whatever its own settings. */
export const MAX_PEER_WANTS = 256;

/** Tunables of interest; every one has a default. */
export interface WantsConfig {
  /** A routed model stays wanted this long after its last request. */
  wantTtlMs: number;
  /** Whether a model served here is wanted (its index helps route requests that arrive here). */
  wantServed: boolean;
  /** Models wanted at most (served ones first, then the most recently routed). */
  maxWanted: number;
}

/** Defaults: 30 minutes, served models wanted, at most 64 models. */
export const WANTS_DEFAULTS: WantsConfig = { wantTtlMs: 30 * 60_000, wantServed: true, maxWanted: 64 };

/** What changed in one set. */
export interface WantChange {
  added: string[];
  removed: string[];
}

const NONE: ReadonlySet<string> = new Set();

/** This node's wanted set and its peers'. */
export class Wants {
  readonly config: WantsConfig;
  /** Peers' records that did not parse (they count as wanting nothing). */
  malformed = 0;
  /** Routed models past `maxWanted` that pushed the least recently routed one out. */
  displaced = 0;
  private served: string[] = [];
  /** Routed models and when last routed, least recent first (every note moves its model to the end). */
  private readonly routed = new Map<string, number>();
  private mineSet: ReadonlySet<string> = NONE;
  private readonly peers = new Map<NodeId, ReadonlySet<string>>();
  private readonly byModel = new Map<string, Set<NodeId>>();

  constructor(private readonly o: { selfId: NodeId; store: Kv; now: () => number; config?: Partial<WantsConfig> }) {
    this.config = { ...WANTS_DEFAULTS, ...o.config };
  }

  /** This node routed a request for `model`; returns what the wanted set gained (nothing when already wanted). */
  noteRouted(model: string): WantChange | null {
    if (!isModelName(model)) return null;
    const had = this.routed.has(model);
    if (had) this.routed.delete(model);
    this.routed.set(model, this.o.now());
    if (had) return null;
    if (this.routed.size > this.config.maxWanted) {
      this.routed.delete(this.routed.keys().next().value as string);
      this.displaced++;
    }
    return this.recompute();
  }

  /** The models this node serves now (replacing the previous list). */
  setServed(models: readonly string[]): WantChange | null {
    this.served = [...new Set(models.filter(isModelName))].slice(0, this.config.maxWanted);
    return this.recompute();
  }

  /** Drop routed models not routed for `wantTtlMs`; returns what changed, null when nothing did. */
  expire(): WantChange | null {
    const cutoff = this.o.now() - this.config.wantTtlMs;
    let any = false;
    for (const [m, at] of this.routed) {
      if (at > cutoff) break;
      this.routed.delete(m);
      any = true;
    }
    return any ? this.recompute() : null;
  }

  /** When the least recently routed model expires (Infinity when none is routed). */
  get nextExpiry(): number {
    for (const at of this.routed.values()) return at + this.config.wantTtlMs;
    return Number.POSITIVE_INFINITY;
  }

  /** Whether this node wants `model`. */
  has(model: string): boolean {
    return this.mineSet.has(model);
  }

  /** This node's wanted set. */
  mine(): ReadonlySet<string> {
    return this.mineSet;
  }

  /** The value this node's record should hold. */
  record(): string {
    return JSON.stringify([...this.mineSet].sort());
  }

  /** Write this node's record if the store's differs (a change, or an earlier life's record come back); true if written. */
  flush(): boolean {
    const want = this.record();
    const cur = this.o.store.get(this.o.selfId, WANT_KEY);
    if (cur?.value === want || (cur === undefined && this.mineSet.size === 0)) return false;
    return this.o.store.put(WANT_KEY, want).ok;
  }

  /** Whether the store's record of this node differs from its wanted set. */
  get dirty(): boolean {
    const cur = this.o.store.get(this.o.selfId, WANT_KEY);
    return cur === undefined ? this.mineSet.size > 0 : cur.value !== this.record();
  }

  /** What `peer` wants, as its record says. */
  of(peer: NodeId): ReadonlySet<string> {
    if (peer === this.o.selfId) return this.mineSet;
    return this.peers.get(peer) ?? NONE;
  }

  /** Peers that want `model`. */
  wanting(model: string): ReadonlySet<NodeId> {
    return this.byModel.get(model) ?? NONE;
  }

  /** Peers with a non-empty wanted set. */
  peerIds(): NodeId[] {
    return [...this.peers.keys()];
  }

  /** Re-read `peer`'s record from the store; returns what its set gained and lost. */
  refresh(peer: NodeId): WantChange {
    const rec = this.o.store.get(peer, WANT_KEY);
    return this.replace(peer, rec?.value ? this.parse(rec.value) : NONE);
  }

  /** Forget `peer`'s set; returns what it lost. */
  forget(peer: NodeId): WantChange {
    return this.replace(peer, NONE);
  }

  private parse(value: string): ReadonlySet<string> {
    let v: unknown;
    try {
      v = JSON.parse(value);
    } catch {
      v = null;
    }
    if (!Array.isArray(v) || v.length > MAX_PEER_WANTS || !v.every(isModelName)) {
      this.malformed++;
      return NONE;
    }
    return new Set(v as string[]);
  }

  private replace(peer: NodeId, next: ReadonlySet<string>): WantChange {
    const prev = this.peers.get(peer) ?? NONE;
    const added = [...next].filter((m) => !prev.has(m));
    const removed = [...prev].filter((m) => !next.has(m));
    for (const m of removed) {
      const s = this.byModel.get(m);
      s?.delete(peer);
      if (s?.size === 0) this.byModel.delete(m);
    }
    for (const m of added) {
      let s = this.byModel.get(m);
      if (!s) {
        s = new Set();
        this.byModel.set(m, s);
      }
      s.add(peer);
    }
    if (next.size === 0) this.peers.delete(peer);
    else this.peers.set(peer, next);
    return { added, removed };
  }

  private recompute(): WantChange | null {
    const next = new Set<string>();
    if (this.config.wantServed) for (const m of this.served) next.add(m);
    const recent = [...this.routed.keys()].reverse();
    for (const m of recent) {
      if (next.size >= this.config.maxWanted) break;
      next.add(m);
    }
    const prev = this.mineSet;
    const added = [...next].filter((m) => !prev.has(m));
    const removed = [...prev].filter((m) => !next.has(m));
    this.mineSet = next;
    return added.length === 0 && removed.length === 0 ? null : { added, removed };
  }
}
