// The mesh simulation: N MeshCores (100 by default) on an in-process network
// with latency and loss, under virtual time. Measures how long a join takes
// to reach everyone, how long until every live node marks a killed node dead
// (and drops its worker), and the bytes each node sends per round.
//
//   bun run src/bench/mesh-sim.ts [--nodes 100] [--loss 0.01] [--seed 1] [--json]
import { parseArgs } from "node:util";
import { failureDetectionBoundMs, MEMBERSHIP_DEFAULTS } from "../mesh/membership";
import { SimCluster } from "../mesh/sim-cluster";

/** What one simulation run measured (times in virtual ms). */
export interface MeshSimReport {
  nodes: number;
  loss: number;
  latencyMs: [number, number];
  roundMs: number;
  /** From the first join until every node knows every other as alive. */
  formMs: number;
  /** From a new node's join until every node knows it as alive. */
  joinReachMs: number;
  /** ...and until every node routes to its worker. */
  joinWorkerMs: number;
  /** From a kill until the first node suspects it. */
  firstSuspectMs: number;
  /** From a kill until every live node marks it dead. */
  detectAllDeadMs: number;
  /** ...and until no live node routes to its worker. */
  workerGoneMs: number;
  /** Stated worst-case detection bound for this size (no loss). */
  detectBoundMs: number;
  /** Bytes sent per node per round in a quiet mesh: mean and max over nodes. */
  steadyBytesPerNodeRound: { mean: number; max: number };
  /** Same, over the rounds after the kill and the join (churn). */
  churnBytesPerNodeRound: { mean: number; max: number };
  /** Refutations over the whole run: live nodes that were suspected and proved alive (false suspicions). */
  refutations: number;
  /** Live nodes that some live node holds dead at the end (false deaths; should be 0). */
  falseDeaths: number;
  /** Wall-clock seconds the simulation took. */
  wallSeconds: number;
}

/** Options of a run. */
export interface MeshSimOptions {
  nodes: number;
  loss: number;
  seed: number;
  latencyMs?: [number, number];
}

const SPEC = { ctxSize: 4096, slotsTotal: 4, slotsBusy: 0, kvUsed: 0, kvCached: 0, kvTotal: 4096, queueDepth: 0, health: "ready" as const };

function perNodeRound(c: SimCluster, names: string[], rounds: number): { mean: number; max: number } {
  const per = names.map((n) => (c.net.sent.get(c.node(n).addr) ?? 0) / rounds);
  return { mean: Math.round(per.reduce((s, x) => s + x, 0) / per.length), max: Math.round(Math.max(...per)) };
}

async function must(p: Promise<number | null>, what: string): Promise<number> {
  const t = await p;
  if (t === null) throw new Error(`simulation: ${what} did not happen in time`);
  return t;
}

/** Run the simulation once. */
export async function runMeshSim(o: MeshSimOptions): Promise<MeshSimReport> {
  const wall = performance.now();
  const latencyMs = o.latencyMs ?? [1, 20];
  const round = MEMBERSHIP_DEFAULTS.roundMs;
  const c = new SimCluster({ seed: o.seed, network: { latencyMs, loss: o.loss } });
  const names = Array.from({ length: o.nodes }, (_, i) => `n${i}`);
  for (const n of names) c.add(n);
  const t0 = c.clock.now();
  // Everyone joins through a few seeds, as invite tokens carry a few addresses.
  const seeds = names.slice(0, 3).map((n) => c.node(n).addr);
  await Promise.all(names.slice(1).map((n) => c.wait(c.node(n).core.join(seeds.filter((s) => s !== c.node(n).addr)))));
  for (const n of names) c.node(n).core.workers.register({ ...SPEC, models: [`m-${n}`], addr: `${n}:8080` });
  await must(
    c.clock.until(() => c.converged(), 600_000, round / 4),
    "forming the mesh",
  );
  const formMs = c.clock.now() - t0;
  await must(
    c.clock.until(() => names.every((n) => c.node(n).core.workers.list().length === o.nodes), 600_000, round / 4),
    "spreading every worker",
  );
  // Quiet mesh: once gossip buffers have drained and every pair has swapped store vectors once,
  // only probes and empty pulls remain.
  await c.clock.advance(Math.max(30, 2 * o.nodes) * round);
  c.net.resetCounters();
  const quietRounds = 30;
  await c.clock.advance(quietRounds * round);
  const steady = perNodeRound(c, names, quietRounds);

  c.net.resetCounters();
  const churnStart = c.clock.now();
  const victim = names[names.length - 1] as string;
  const observers = names.slice(0, -1);
  c.kill(victim);
  const firstSuspectMs = await must(
    c.clock.until(() => observers.some((n) => c.stateOf(n, victim) === "suspect"), 600_000, round / 10),
    "first suspicion",
  );
  await must(
    c.clock.until(() => c.allSee(victim, "dead", observers), 600_000, round / 10),
    "detection",
  );
  const detectAllDeadMs = c.clock.now() - churnStart;
  await must(
    c.clock.until(() => observers.every((n) => c.node(n).core.workers.routable(`m-${victim}`).length === 0), 600_000, round / 10),
    "worker removal",
  );
  const workerGoneMs = c.clock.now() - churnStart;

  const joinStart = c.clock.now();
  const late = "late";
  c.add(late);
  await c.wait(c.node(late).core.join(seeds));
  c.node(late).core.workers.register({ ...SPEC, models: ["m-late"], addr: "late:8080" });
  const everyone = [...observers, late];
  await must(
    c.clock.until(() => c.allSee(late, "alive", observers), 600_000, round / 10),
    "join reaching everyone",
  );
  const joinReachMs = c.clock.now() - joinStart;
  await must(
    c.clock.until(() => observers.every((n) => c.node(n).core.workers.routable("m-late").length === 1), 600_000, round / 10),
    "new worker reaching everyone",
  );
  const joinWorkerMs = c.clock.now() - joinStart;
  const churnRounds = Math.max(1, Math.round((c.clock.now() - churnStart) / round));
  const churn = perNodeRound(c, everyone, churnRounds);
  const refutations = everyone.reduce((sum, n) => sum + c.node(n).core.stats().membership.refutations, 0);
  const falseDeaths = everyone.filter((s) => everyone.some((o) => o !== s && c.stateOf(o, s) === "dead")).length;
  for (const n of everyone) c.node(n).core.stop();
  return {
    nodes: o.nodes,
    loss: o.loss,
    latencyMs,
    roundMs: round,
    formMs,
    joinReachMs,
    joinWorkerMs,
    firstSuspectMs,
    detectAllDeadMs,
    workerGoneMs,
    detectBoundMs: failureDetectionBoundMs(o.nodes),
    steadyBytesPerNodeRound: steady,
    churnBytesPerNodeRound: churn,
    refutations,
    falseDeaths,
    wallSeconds: Math.round((performance.now() - wall) / 100) / 10,
  };
}

function table(r: MeshSimReport): string {
  const s = (ms: number) => `${(ms / 1000).toFixed(1)} s (${Math.round(ms / r.roundMs)} rounds)`;
  const rows: [string, string][] = [
    ["nodes", String(r.nodes)],
    ["message loss", `${(r.loss * 100).toFixed(1)} %`],
    ["one-way latency", `${r.latencyMs[0]}-${r.latencyMs[1]} ms`],
    ["mesh formed (all see all alive)", s(r.formMs)],
    ["join reaches every node", s(r.joinReachMs)],
    ["joined node's worker routable everywhere", s(r.joinWorkerMs)],
    ["kill -> first suspicion", s(r.firstSuspectMs)],
    ["kill -> every live node marks it dead", s(r.detectAllDeadMs)],
    ["kill -> its worker gone everywhere", s(r.workerGoneMs)],
    ["stated detection bound (no loss)", s(r.detectBoundMs)],
    ["bytes/node/round, quiet (mean / max)", `${r.steadyBytesPerNodeRound.mean} / ${r.steadyBytesPerNodeRound.max}`],
    ["bytes/node/round, kill + join (mean / max)", `${r.churnBytesPerNodeRound.mean} / ${r.churnBytesPerNodeRound.max}`],
    ["false suspicions refuted / false deaths", `${r.refutations} / ${r.falseDeaths}`],
    ["wall time", `${r.wallSeconds} s`],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      nodes: { type: "string", default: "100" },
      loss: { type: "string", default: "0" },
      seed: { type: "string", default: "1" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log("usage: bun run src/bench/mesh-sim.ts [--nodes 100] [--loss 0.01] [--seed 1] [--json]");
    process.exit(0);
  }
  const nodes = Number(values.nodes);
  const loss = Number(values.loss);
  const seed = Number(values.seed);
  if (!Number.isInteger(nodes) || nodes < 3 || nodes > 1000) {
    console.error("--nodes must be an integer from 3 to 1000");
    process.exit(2);
  }
  if (!(loss >= 0 && loss < 0.5)) {
    console.error("--loss must be a fraction from 0 to 0.5");
    process.exit(2);
  }
  if (!Number.isInteger(seed)) {
    console.error("--seed must be an integer");
    process.exit(2);
  }
  try {
    const r = await runMeshSim({ nodes, loss, seed });
    console.log(values.json ? JSON.stringify(r, null, 2) : table(r));
  } catch (e) {
    console.error((e as Error).message);
    process.exit(1);
  }
}
