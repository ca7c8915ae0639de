// A mesh of separate `mesh serve` processes whose peer traffic all passes
// through one FaultProxy (see fault-proxy.ts), plus what the fault scenarios
// read from it: each node's view of the membership and the worker table.

import { clusterDir, metricOf, modelsOf, type NodeProc, peersOf, spawnNode, tokenOf } from "./cluster";
import { FaultProxy } from "./fault-proxy";

/** Nodes started through one fault proxy; stop() ends everything, also after a failed test. */
export interface FaultMesh {
  proxy: FaultProxy;
  nodes: NodeProc[];
  dir: string;
  /** The node named `name`. */
  node(name: string): NodeProc;
  stop(): Promise<void>;
}

/** Start one node per entry (the first creates the mesh, the rest join it through the proxy). */
export async function startFaultMesh(specs: Array<{ name: string; model: string; args?: string[] }>): Promise<FaultMesh> {
  const proxy = new FaultProxy();
  const dir = clusterDir();
  const nodes: NodeProc[] = [];
  const mesh: FaultMesh = {
    proxy,
    nodes,
    dir,
    node: (name) => {
      const n = nodes.find((x) => x.name === name);
      if (!n) throw new Error(`no node ${name}`);
      return n;
    },
    stop: async () => {
      for (const n of nodes) n.proc.kill("SIGKILL");
      await Promise.all(nodes.map((n) => n.proc.exited));
      await proxy.stop();
    },
  };
  const spawn = async (s: (typeof specs)[number], extra: string[]) => {
    const n = await spawnNode({ name: s.name, dir, model: s.model, args: [...extra, ...(s.args ?? [])], env: proxy.env(s.name) });
    proxy.register(n.addr, n.name);
    nodes.push(n);
    return n;
  };
  try {
    const [first, ...rest] = specs;
    if (!first) return mesh;
    const token = tokenOf(await spawn(first, []));
    // Two at a time: five model loads at once would starve a 2-core machine.
    for (let i = 0; i < rest.length; i += 2) await Promise.all(rest.slice(i, i + 2).map((s) => spawn(s, ["--join", token])));
  } catch (e) {
    await mesh.stop();
    throw e;
  }
  return mesh;
}

/** What one node believes: member name -> state, and model -> sorted node names serving it. */
export interface NodeView {
  members: Map<string, string>;
  models: Map<string, string[]>;
}

/** `n`'s current view, or null when it does not answer. */
export async function viewOf(n: NodeProc): Promise<NodeView | null> {
  const peers = await peersOf(n);
  if (!peers) return null;
  const nameOf = new Map(peers.members.map((m) => [m.id, m.name]));
  let models: Map<string, string[]>;
  try {
    models = new Map(
      [...(await modelsOf(n))].map(([id, ns]) => [id, ns.map((x) => nameOf.get(x.node_id) ?? x.node_id.slice(0, 8)).sort()]),
    );
  } catch {
    return null;
  }
  return { members: new Map(peers.members.map((m) => [m.name, m.state])), models };
}

/** A view as one comparable line: live members and the worker table. */
export function viewKey(v: NodeView): string {
  const live = [...v.members].filter(([, s]) => s === "alive").map(([n]) => n);
  const models = [...v.models].map(([m, ns]) => `${m}:${ns.join(",")}`);
  return `alive=${live.sort().join(",")} models=${models.sort().join(" ")}`;
}

/** Views of every node in `ns` (null entries for nodes that did not answer). */
export function viewsOf(ns: NodeProc[]): Promise<Array<NodeView | null>> {
  return Promise.all(ns.map((n) => viewOf(n)));
}

/** Deaths each node declared and times it was declared dead itself (summed over `ns`). */
export async function deathsOf(ns: NodeProc[]): Promise<number> {
  const per = await Promise.all(
    ns.map(
      async (n) =>
        (await metricOf(n, 'mesh_membership_events_total{event="death"}')) +
        (await metricOf(n, 'mesh_membership_events_total{event="self_reset"}')),
    ),
  );
  return per.reduce((a, b) => a + b, 0);
}
