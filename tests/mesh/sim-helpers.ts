// Helpers for the mesh tests: a small simulated cluster with one worker per node.
import { generateIdentity, type Identity } from "../../src/mesh/identity";
import { signSelf } from "../../src/mesh/member";
import type { MeshConfig } from "../../src/mesh/node";
import { SimCluster } from "../../src/mesh/sim-cluster";
import type { WireMessage } from "../../src/mesh/wire";
import type { LocalWorkerSpec } from "../../src/mesh/worker-info";

/** A worker spec for node `name`. */
export function spec(name: string, over: Partial<LocalWorkerSpec> = {}): LocalWorkerSpec {
  return {
    models: [`model-${name}`],
    addr: `${name}:8080`,
    ctxSize: 4096,
    slotsTotal: 4,
    slotsBusy: 0,
    kvUsed: 0,
    kvCached: 0,
    kvTotal: 4096,
    queueDepth: 0,
    health: "ready",
    ...over,
  };
}

/** Start `names` as one mesh (all joined through the first), each with one worker, and wait until all agree. */
export async function meshOf(
  names: string[],
  o: { config?: MeshConfig; seed?: number; latencyMs?: [number, number] } = {},
): Promise<SimCluster> {
  const c = new SimCluster({ config: o.config, seed: o.seed ?? 1, network: { latencyMs: o.latencyMs ?? [1, 10] } });
  for (const n of names) c.add(n);
  for (const n of names.slice(1)) await c.join(n, names[0] as string);
  for (const n of names) {
    const r = c.node(n).core.workers.register(spec(n));
    if (!r.ok) throw new Error(r.message);
  }
  const t = await c.clock.until(() => c.converged() && names.every((n) => c.node(n).core.workers.list().length === names.length), 60_000);
  if (t === null) throw new Error("the cluster did not converge");
  return c;
}

/** Incarnation `observer` holds for `subject`. */
export function incarnationOf(c: SimCluster, observer: string, subject: string): number | undefined {
  const id = c.node(subject).identity.id;
  return c
    .node(observer)
    .core.members()
    .find((m) => m.id === id)?.incarnation;
}

/** The signed alive record of a node nobody knows yet: a message from it introduces it. */
export function strangerRecord(identity: Identity = generateIdentity()) {
  return signSelf(identity, { name: "f", addr: "f:1", epoch: "e", inc: 0, state: "alive" });
}

/** Deliver `updates` to node `to` in a ping `from` a record (a stranger's by default); resolves with the reply. */
export function pingWith(c: SimCluster, to: string, updates: unknown[], from: unknown = strangerRecord()): Promise<WireMessage> {
  const n = c.node(to);
  return c.wait(n.core.handle({ type: "ping", from, to: n.identity.id, updates }));
}
