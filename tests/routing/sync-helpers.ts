// Helpers for the routing sync tests: simulated mesh nodes, each with a
// RoutingIndex, an OwnTenancy and a RouteSync plugged into its MeshCore.
import { silentLogger } from "../../src/log";
import type { Identity } from "../../src/mesh/identity";
import { generateIdentity } from "../../src/mesh/identity";
import type { MeshCore } from "../../src/mesh/node";
import { seededRandom } from "../../src/mesh/sim";
import { SimCluster } from "../../src/mesh/sim-cluster";
import type { WireMessage } from "../../src/mesh/wire";
import { hashFromBytes } from "../../src/routing/key";
import { OwnTenancy, type TenancyDelta } from "../../src/routing/own";
import { INDEX_DEFAULTS, type IndexConfig, RoutingIndex } from "../../src/routing/radix";
import { RouteSync, type RouteSyncConfig } from "../../src/routing/sync";
import { compress, encodeSections, type Section, signedBytes } from "../../src/routing/sync-wire";

/** One simulated node with the routing sync. */
export interface RouteNode {
  name: string;
  addr: string;
  id: string;
  identity: Identity;
  core: MeshCore;
  sync: RouteSync;
  index: RoutingIndex;
  own: OwnTenancy;
  /** Signatures the sync made (an idle mesh makes none). */
  signs: { n: number };
}

/** Options of one node. */
export interface NodeOptions {
  identity?: Identity;
  config?: Partial<RouteSyncConfig>;
  index?: Partial<IndexConfig>;
}

/** Simulated nodes on one network and clock. */
export class RouteMesh {
  readonly c: SimCluster;
  readonly nodes = new Map<string, RouteNode>();
  /** Every message the network carried (requests and replies), with its ends. */
  readonly seen: Array<{ from: string; to: string; msg: WireMessage }> = [];
  /** Return true to drop a message (on top of recording it). */
  drop: ((from: string, to: string, msg: WireMessage) => boolean) | null = null;
  /** Stands between a node's sync and the network: `send` makes the real request (a test may hold its reply). */
  intercept: ((node: string, msg: WireMessage, send: () => Promise<WireMessage>) => Promise<WireMessage>) | null = null;
  private readonly rnd: () => number;

  constructor(seed = 1) {
    this.c = new SimCluster({ seed, network: { latencyMs: [1, 10] } });
    this.rnd = seededRandom(seed + 1000);
    this.c.net.dropIf = (from, to, msg) => {
      if (msg.type.startsWith("route")) this.seen.push({ from, to, msg });
      return this.drop?.(from, to, msg) ?? false;
    };
  }

  /** Start (or restart, given its identity) node `name` with its sync. */
  add(name: string, o: NodeOptions = {}): RouteNode {
    const sim = this.c.add(name, o.identity ?? generateIdentity());
    const index = new RoutingIndex({ ...INDEX_DEFAULTS, ...o.index });
    const own = new OwnTenancy();
    const signs = { n: 0 };
    const base = this.c.net.transport(sim.addr);
    const identity: Identity = {
      id: sim.identity.id,
      publicKey: sim.identity.publicKey,
      sign: (d) => {
        signs.n++;
        return sim.identity.sign(d);
      },
    };
    const sync = new RouteSync({
      selfId: sim.identity.id,
      identity,
      directory: sim.core.directory,
      store: sim.core.store,
      transport: {
        request: (addr, msg, timeoutMs, to) => {
          const send = () => base.request(addr, msg, timeoutMs, to);
          return this.intercept ? this.intercept(name, msg, send) : send();
        },
      },
      clock: this.c.clock,
      index,
      own,
      config: o.config,
      log: silentLogger,
    });
    sim.core.extend(sync);
    const node: RouteNode = { name, addr: sim.addr, id: sim.identity.id, identity: sim.identity, core: sim.core, sync, index, own, signs };
    this.nodes.set(name, node);
    return node;
  }

  /** Join `name` through `via`; with `settle`, wait until every running node sees every other alive. */
  async join(name: string, via: string, settle = true): Promise<void> {
    await this.c.join(name, via);
    if (settle && (await this.c.clock.until(() => this.c.converged(), 60_000)) === null) throw new Error("membership did not converge");
  }

  /** The node called `name`. */
  node(name: string): RouteNode {
    const n = this.nodes.get(name);
    if (!n) throw new Error(`no node ${name}`);
    return n;
  }

  /** What an engine's report does on node `name` (as Router.onTenancy): its index, its own tenancy, then the sync. */
  report(name: string, model: string, delta: TenancyDelta): void {
    const n = this.node(name);
    const m = n.index.model(model);
    for (const h of delta.evicts) m.evict(n.id, h);
    if (delta.inserts.length > 0) m.insertPath(n.id, delta.inserts);
    n.own.apply(model, delta);
    n.sync.publish(model, delta);
  }

  /** A fresh random path hash. */
  hash(): string {
    const b = new Uint8Array(8);
    for (let i = 0; i < 8; i++) b[i] = Math.floor(this.rnd() * 256);
    return hashFromBytes(b, 0);
  }

  /** A chain of `n` new hashes below `parent`, as [hash, parent] pairs. */
  chain(n: number, parent: string | null = null): Array<[string, string | null]> {
    const out: Array<[string, string | null]> = [];
    let p = parent;
    for (let i = 0; i < n; i++) {
      const h = this.hash();
      out.push([h, p]);
      p = h;
    }
    return out;
  }

  /** Whether `observer`'s index holds exactly what `holder`'s own tenancy holds of `universe` for `model`. */
  mirrors(observer: string, holder: string, model: string, universe: Iterable<string>): boolean {
    const o = this.node(observer);
    const h = this.node(holder);
    const idx = o.index.peek(model);
    for (const x of universe) if ((idx?.holds(h.id, x) ?? false) !== h.own.has(model, x)) return false;
    return true;
  }

  /** Whether `a`'s sync knows that `b` wants `model` (its record reached `a`). */
  knowsWant(a: string, b: string, model: string): boolean {
    return this.node(a).sync.wants(this.node(b).id).has(model);
  }

  /** Route-sync requests from `from` to `to` (by node name) seen so far. */
  batches(from: string, to: string): WireMessage[] {
    const f = this.node(from).addr;
    const t = this.node(to).addr;
    return this.seen.filter((s) => s.from === f && s.to === t && s.msg.type === "route-sync").map((s) => s.msg);
  }

  /** Advance virtual time by `ms`. */
  advance(ms: number): Promise<void> {
    return this.c.clock.advance(ms);
  }

  /** Advance until `pred` holds; false after `maxMs`. */
  async until(pred: () => boolean, maxMs = 60_000): Promise<boolean> {
    return (await this.c.clock.until(pred, maxMs, 100)) !== null;
  }
}

/** Start `names` as one mesh, every node joined through the first. */
export async function routeMesh(
  names: string[],
  o: { seed?: number; per?: Record<string, NodeOptions>; all?: NodeOptions } = {},
): Promise<RouteMesh> {
  const m = new RouteMesh(o.seed ?? 1);
  for (const n of names) m.add(n, { ...o.all, ...o.per?.[n], config: { ...o.all?.config, ...o.per?.[n]?.config } });
  for (const n of names.slice(1)) await m.join(n, names[0] as string, false);
  if (!(await m.until(() => m.c.converged()))) throw new Error("membership did not converge");
  return m;
}

/** A batch signed as `from` would send it to `to` (for hand-made and forged messages). */
export function signedBatch(
  signer: Identity,
  o: { id: string; epoch: string; to: string; toEpoch: string; seq: number; sections?: Section[]; data?: Uint8Array },
): WireMessage {
  const data = o.data ?? compress(encodeSections(o.sections ?? []));
  const sig = signer.sign(signedBytes("mesh/route-sync/v1", o.id, o.epoch, o.to, o.toEpoch, o.seq, data));
  return { type: "route-sync", id: o.id, epoch: o.epoch, toEpoch: o.toEpoch, seq: o.seq, data: Buffer.from(data).toString("base64"), sig };
}

/** The epoch `node` runs under. */
export function epochOf(n: RouteNode): string {
  return n.core.directory.self.epoch;
}
