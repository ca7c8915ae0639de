// `mesh bench routing`: N real `mesh serve` nodes on loopback forming one mesh,
// the kv-pressure agent-loop workload entering at nodes drawn from the seed,
// once with cache-aware routing and once with least-load routing (a fresh mesh
// each, one after the other, so each has the machine to itself). Reports per
// policy where requests ran and how much of their prompts came from cache, side
// by side; writes summary.json, summary.md and chart.svg.

import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { GENERATED_MODELS } from "../gguf/models";
import { sendChat } from "./client";
import { drive } from "./drive";
import { BenchUsageError, resolveModel } from "./engine";
import { meshCommand } from "./kv-pressure";
import { LlamaServer } from "./llama-server";
import { summarize } from "./report";
import {
  type BenchNode,
  entryOf,
  entryPlan,
  type PolicySummary,
  type RoutingCounters,
  type RoutingPolicy,
  renderRoutingChart,
  routingCounters,
  routingSummaryMarkdown,
  summarizePolicy,
} from "./routing-report";
import { metricValue, scrapeSamples } from "./scrape";
import {
  buildWorkload,
  type ChatMessage,
  estimatePromptTokens,
  requestBody,
  turnsThatFit,
  type Workload,
  type WorkloadConfig,
} from "./workload";

/** Options of a run; every field has a default (CI-sized ones with `tiny`). */
export interface RoutingBenchOptions {
  /** Nodes of the mesh (at least 2). */
  nodes?: number;
  /** GGUF path or generated model name (bench, tiny); every node serves the same file. */
  model?: string;
  ctxSize?: number;
  parallel?: number;
  /** CPU threads of each node; default: this machine's cores shared among the nodes. */
  threads?: number;
  loops?: number;
  /** Turns per loop; default: as many as fit the context (estimated). */
  turns?: number;
  systemTokens?: number;
  toolResultTokens?: number;
  userTokens?: number;
  maxTokens?: number;
  staggerMs?: number;
  /** Pause before each follow-up request of a loop: the agent running its tool. */
  toolMs?: number;
  seed?: number;
  /** Policies to run, in this order. Default cache, then load. */
  policies?: RoutingPolicy[];
  maxRetries?: number;
  requestTimeoutS?: number;
  /** Extra flags for every node (e.g. ["--cache-ram", "0"]); the bench sets routing, state, join and address itself. */
  serveArgs?: string[];
  /** Output directory. Default bench-out/routing-<timestamp>. */
  out?: string;
  /** The tiny test model with CI-sized defaults. */
  tiny?: boolean;
  /** The command line, recorded in the report. */
  command?: string;
  onProgress?: (line: string) => void;
}

/** The options after defaults. */
export interface RoutingBenchConfig {
  nodes: number;
  model: string;
  ctxSize: number;
  parallel: number;
  threads: number;
  /** True when --threads was not given and the cores were shared among the nodes. */
  threadsDefaulted: boolean;
  workload: WorkloadConfig;
  toolMs: number;
  policies: RoutingPolicy[];
  maxRetries: number;
  maxRetryWaitS: number;
  requestTimeoutS: number;
  reuseMinTokens: number;
  repeatMaxSuffixTokens: number;
  serveArgs: string[];
  out: string;
  tiny: boolean;
}

/** summary.json */
export interface RoutingBenchReport {
  kind: "mesh-bench-routing";
  version: 1;
  date: string;
  command: string;
  machine: { cpu: string; cores: number; platform: string; arch: string };
  /** How the policies shared the run: one after the other, each on a fresh mesh. */
  order: "sequential";
  config: RoutingBenchConfig & { modelPath: string };
  /** The model id every node served. */
  model: string;
  /** Entry node (0-based) of every request: per loop, one per turn, then the exact repeat; the same for every policy. */
  entryPlan: number[][];
  policies: PolicySummary[];
}

const DEFAULTS = {
  nodes: 3,
  model: "bench",
  ctxSize: 8192,
  parallel: 4,
  loops: 8,
  systemTokens: 2500,
  toolResultTokens: 600,
  userTokens: 24,
  maxTokens: 32,
  staggerMs: 2000,
  toolMs: 1000,
  seed: 1,
  sampleIntervalMs: 1000,
  reuseMinTokens: 2048,
};
// CI-sized: requests take milliseconds, so the pause before each follow-up is
// what gives the entry node time to learn (index sync rounds of 1 s) where the
// loop's previous turn ran; without it the bench would measure the sync's
// latency, not the routing. No KV pressure wanted here: ctx fits both slots'
// loops. Four turns, because a follow-up can reuse at most its loop's previous
// prompt (the model's reply is never fed back), so what routing wins grows turn by turn.
const TINY_DEFAULTS: typeof DEFAULTS = {
  nodes: 3,
  model: "tiny",
  ctxSize: 4096,
  parallel: 2,
  loops: 4,
  systemTokens: 160,
  toolResultTokens: 200,
  userTokens: 12,
  maxTokens: 8,
  staggerMs: 0,
  toolMs: 2500,
  seed: 1,
  sampleIntervalMs: 250,
  reuseMinTokens: 128,
};
const TINY_TURNS = 4;
const POLICIES: readonly RoutingPolicy[] = ["cache", "load"];
// Flags the bench itself gives each node; a --serve-arg repeating one would make nodes of another mesh or policy.
const MANAGED_FLAGS = [
  "--routing",
  "--state-dir",
  "--join",
  "--host",
  "--port",
  "-p",
  "--model",
  "-m",
  "--mesh-secret",
  "--mesh-secret-file",
  "--advertise",
];
// SIGTERM first (nodes get --shutdown-grace 1), SIGKILL after this.
const STOP_GRACE_MS = 5000;
const MESH_READY_TIMEOUT_MS = 180_000;
const SETTLE_MAX_MS = 30_000;
const SETTLE_QUIET_MS = 2500;
const LOG_TAIL_LINES = 15;

function check(name: string, v: number, min: number, max: number): number {
  if (!Number.isInteger(v) || v < min || v > max)
    throw new BenchUsageError(`--${name} must be a whole number from ${min} to ${max} (got ${v})`);
  return v;
}

function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
}

/** Threads per node when not given: the cores shared among the nodes, at least one each. */
export function defaultThreads(nodes: number, cores = availableParallelism()): number {
  return Math.max(1, Math.floor(cores / Math.max(1, nodes)));
}

/** Parse a --policies list ("cache,load"); throws BenchUsageError on anything else. */
export function parsePolicies(s: string): RoutingPolicy[] {
  const list = s
    .split(",")
    .map((x) => x.trim())
    .filter((x) => x !== "");
  if (list.length === 0) throw new BenchUsageError("--policies needs at least one of cache, load");
  for (const p of list)
    if (!POLICIES.includes(p as RoutingPolicy)) throw new BenchUsageError(`--policies takes cache and/or load (got '${p}')`);
  if (new Set(list).size !== list.length) throw new BenchUsageError(`--policies names a policy twice ('${s}')`);
  return list as RoutingPolicy[];
}

/** Defaults applied and checked; throws BenchUsageError on impossible values. */
export function resolveRoutingOptions(o: RoutingBenchOptions = {}): RoutingBenchConfig {
  const d = o.tiny ? TINY_DEFAULTS : DEFAULTS;
  const nodes = check("nodes", o.nodes ?? d.nodes, 2, 32);
  const ctxSize = check("ctx-size", o.ctxSize ?? d.ctxSize, 64, 1 << 22);
  const sizes = {
    systemTokens: check("system-tokens", o.systemTokens ?? d.systemTokens, 1, 1 << 20),
    toolResultTokens: check("tool-result-tokens", o.toolResultTokens ?? d.toolResultTokens, 1, 1 << 20),
    userTokens: check("user-tokens", o.userTokens ?? d.userTokens, 1, 1 << 16),
    maxTokens: check("max-tokens", o.maxTokens ?? d.maxTokens, 1, 1 << 16),
  };
  if (estimatePromptTokens(sizes, 0) + sizes.maxTokens >= ctxSize) {
    throw new BenchUsageError(
      `the first turn alone (~${estimatePromptTokens(sizes, 0)} prompt tokens + ${sizes.maxTokens}) does not fit --ctx-size ${ctxSize}: lower --system-tokens`,
    );
  }
  const turns = check("turns", o.turns ?? (o.tiny ? TINY_TURNS : turnsThatFit(sizes, ctxSize)), 1, 256);
  const policies = o.policies ?? [...POLICIES];
  parsePolicies(policies.join(","));
  const serveArgs = o.serveArgs ?? [];
  for (const a of serveArgs) {
    const flag = a.split("=")[0] as string;
    if (MANAGED_FLAGS.includes(flag)) throw new BenchUsageError(`--serve-arg ${flag}: the bench sets ${flag} on every node itself`);
  }
  return {
    nodes,
    model: o.model ?? d.model,
    ctxSize,
    parallel: check("parallel", o.parallel ?? d.parallel, 1, 256),
    threads: check("threads", o.threads ?? defaultThreads(nodes), 1, 1024),
    threadsDefaulted: o.threads === undefined,
    workload: {
      seed: check("seed", o.seed ?? d.seed, 0, 0xffffffff),
      loops: check("loops", o.loops ?? d.loops, 1, 256),
      turns,
      ...sizes,
      staggerMs: check("stagger-ms", o.staggerMs ?? d.staggerMs, 0, 600_000),
    },
    toolMs: check("tool-ms", o.toolMs ?? d.toolMs, 0, 600_000),
    policies,
    maxRetries: check("max-retries", o.maxRetries ?? 20, 0, 1000),
    maxRetryWaitS: 30,
    requestTimeoutS: check("request-timeout", o.requestTimeoutS ?? 900, 1, 86_400),
    reuseMinTokens: d.reuseMinTokens,
    repeatMaxSuffixTokens: 256,
    serveArgs,
    out: o.out ?? join("bench-out", `routing-${timestamp()}`),
    tiny: o.tiny === true,
  };
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A node's routing counters now; null when its /metrics cannot be read. */
async function countersOf(url: string): Promise<RoutingCounters | null> {
  const s = await scrapeSamples(url);
  return s ? routingCounters(s) : null;
}

/** The N processes of one policy's mesh, and their scratch state. */
interface MeshProcs {
  procs: LlamaServer[];
  /** Last lines of every node's log (stdout and stderr), for error messages. */
  logTails(): string;
  /** SIGTERM every node, SIGKILL after a grace period, remove their state dirs. */
  stop(): Promise<void>;
}

/** Start `n` nodes the way a user would: the first creates the mesh, the others join with its invite token. */
async function startMesh(c: RoutingBenchConfig, policy: RoutingPolicy, modelPath: string): Promise<MeshProcs> {
  // One scratch dir for the nodes' state: the default state dir may hold the user's own node, which refuses a second.
  const root = mkdtempSync(join(tmpdir(), "mesh-bench-routing-"));
  const removeRoot = () => rmSync(root, { recursive: true, force: true });
  // An interrupted run: llama-server.ts kills the nodes on exit or signal; this removes their state with them.
  process.on("exit", removeRoot);
  const procs: LlamaServer[] = [];
  // Names beside procs: a node that failed to start leaves no entry, so positions are not names.
  const names: string[] = [];
  const stop = async () => {
    await Promise.all(procs.map((p) => p.stop(STOP_GRACE_MS)));
    removeRoot();
    process.off("exit", removeRoot);
  };
  const logTails = () => procs.map((p, i) => `${names[i]} log (last lines):\n${p.logTail(LOG_TAIL_LINES)}`).join("\n");
  const [binary, ...pre] = meshCommand();
  const args = (i: number, token: string | null) => [
    ...pre,
    "serve",
    "--model",
    modelPath,
    "--ctx-size",
    String(c.ctxSize),
    "--parallel",
    String(c.parallel),
    "--threads",
    String(c.threads),
    "--routing",
    policy,
    "--state-dir",
    join(root, `node-${i}`),
    "--node-name",
    `node-${i}`,
    "--shutdown-grace",
    "1",
    ...(token ? ["--join", token] : []),
    ...c.serveArgs,
  ];
  const start = (i: number, token: string | null) =>
    LlamaServer.start({ name: `node-${i}`, binary: binary as string, args: args(i, token), startupTimeoutMs: 600_000 });
  try {
    const first = await start(1, null);
    procs.push(first);
    names.push("node-1");
    const token = await inviteToken(first);
    const rest = await Promise.allSettled(Array.from({ length: c.nodes - 1 }, (_, k) => start(k + 2, token)));
    rest.forEach((r, k) => {
      if (r.status !== "fulfilled") return;
      procs.push(r.value);
      names.push(`node-${k + 2}`);
    });
    const failed = rest.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    return { procs, logTails, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** The invite token the first node printed (`mesh serve --join <token>`). */
async function inviteToken(node: LlamaServer): Promise<string> {
  // The line comes once the node has joined its own new mesh, which may be just after /health turned 200.
  for (let i = 0; i < 100; i++) {
    let text = "";
    try {
      text = readFileSync(node.logFile, "utf8");
    } catch {
      // Not written yet.
    }
    const m = /mesh serve --join (\S+)/.exec(text);
    if (m) return m[1] as string;
    await sleep(100);
  }
  throw new Error(`node-1 printed no invite token:\n${node.logTail(LOG_TAIL_LINES)}`);
}

interface ModelsAnswer {
  data?: Array<{ id?: string; nodes?: Array<{ node_id?: string; status?: string; local?: boolean }> }>;
}

/** Wait until every node lists every node's worker as ready; returns the nodes (with their ids) and the model id. */
async function waitForMesh(procs: LlamaServer[]): Promise<{ nodes: BenchNode[]; model: string }> {
  const deadline = Date.now() + MESH_READY_TIMEOUT_MS;
  for (;;) {
    const views = await Promise.all(
      procs.map(async (p) => {
        try {
          const res = await fetch(`${p.url}/v1/models`, { signal: AbortSignal.timeout(5000) });
          return res.ok ? ((await res.json()) as ModelsAnswer) : null;
        } catch {
          return null;
        }
      }),
    );
    const seen = views.map((v) => {
      // The model this node serves itself: every node serves the same file, so the same id.
      const m = v?.data?.find((x) => x.nodes?.some((n) => n.local));
      const self = m?.nodes?.find((n) => n.local)?.node_id;
      const ready = new Set((m?.nodes ?? []).filter((n) => n.status === "ready").map((n) => n.node_id));
      return { id: m?.id, self, ready: ready.size };
    });
    const model = seen[0]?.id;
    if (model && seen.every((s) => s.id === model && s.self && s.ready === procs.length)) {
      return { nodes: procs.map((p, i) => ({ index: i + 1, name: `node-${i + 1}`, id: seen[i]?.self as string, url: p.url })), model };
    }
    if (Date.now() > deadline) {
      const state = seen.map((s, i) => `node-${i + 1} sees ${s.ready}/${procs.length} ready workers`).join(", ");
      throw new Error(`the mesh did not form within ${MESH_READY_TIMEOUT_MS / 1000} s: ${state}`);
    }
    await sleep(250);
  }
}

/**
 * One warm-up request entering at every node in turn (the drive's own warm-up goes to node 1 only):
 * each node then has routed the model once, so it subscribes to the model's routing index, and holds
 * the shared system prefix, as the nodes of a mesh serving agents for a while would. Returns who served each.
 */
async function warmUp(w: Workload, model: string, nodes: BenchNode[]): Promise<string[]> {
  const messages: ChatMessage[] = [
    { role: "system", content: w.system },
    { role: "user", content: "Reply with one word." },
  ];
  const byId = new Map(nodes.map((n) => [n.id, n.name]));
  const served: string[] = [];
  for (const n of nodes) {
    const r = await sendChat({ url: n.url }, requestBody(w, model, messages, false, 1), 600_000);
    if (r.status !== 200 || r.error !== null) throw new Error(`the warm-up request at ${n.name} failed (HTTP ${r.status}): ${r.error}`);
    served.push(r.servedBy === null ? "?" : (byId.get(r.servedBy) ?? r.servedBy));
  }
  return served;
}

/**
 * Wait until the routing index sync goes quiet (nothing sent or applied for a few rounds), so the
 * loops start with every node knowing what the warm-up left where; false when it is still busy after SETTLE_MAX_MS.
 */
async function settle(nodes: BenchNode[]): Promise<boolean> {
  const start = Date.now();
  let last = Number.NaN;
  let quietSince = start;
  for (;;) {
    const all = await Promise.all(nodes.map((n) => scrapeSamples(n.url)));
    const traffic = all.reduce(
      (s, m) => s + (m ? (metricValue(m, "mesh_routing_sync_ops_total") ?? 0) + (metricValue(m, "mesh_routing_sync_bytes_total") ?? 0) : 0),
      0,
    );
    const now = Date.now();
    if (traffic !== last) {
      last = traffic;
      quietSince = now;
    } else if (now - quietSince >= SETTLE_QUIET_MS) {
      return true;
    }
    if (now - start >= SETTLE_MAX_MS) return false;
    await sleep(250);
  }
}

/** Run the benchmark; returns the report and the directory it was written to. */
export async function runRoutingBench(o: RoutingBenchOptions = {}): Promise<{ report: RoutingBenchReport; outDir: string }> {
  const c = resolveRoutingOptions(o);
  const log = o.onProgress ?? ((s: string) => process.stderr.write(`[routing] ${s}\n`));
  if (GENERATED_MODELS[c.model]) log(`model '${c.model}': generated on first use, then cached`);
  const modelPath = await resolveModel(c.model);
  const w = buildWorkload(c.workload);
  const lastPrompt = estimatePromptTokens(c.workload, c.workload.turns - 1);
  if (lastPrompt + c.workload.maxTokens > c.ctxSize) {
    log(`warning: the last turns (~${lastPrompt} prompt tokens) may not fit --ctx-size ${c.ctxSize}; expect context-length errors`);
  }
  const plan = entryPlan(c.workload.seed, c.workload.loops, c.workload.turns, c.nodes);
  const outDir = resolve(c.out);
  mkdirSync(outDir, { recursive: true });
  const cores = availableParallelism();
  log(
    `${c.nodes} nodes x ${c.threads} thread${c.threads === 1 ? "" : "s"}${c.threadsDefaulted ? ` (${cores} cores shared among ${c.nodes} nodes; --threads to change)` : ""}, ctx ${c.ctxSize}, ${c.parallel} slots each; policies ${c.policies.join(", ")}, one after the other`,
  );

  const summaries: PolicySummary[] = [];
  let model = "";
  for (const policy of c.policies) {
    log(`${policy}: starting ${c.nodes} nodes with --routing ${policy}`);
    const mesh = await startMesh(c, policy, modelPath);
    try {
      const formed = await waitForMesh(mesh.procs);
      model = formed.model;
      const nodes = formed.nodes;
      log(`${policy}: mesh of ${nodes.length} ready (${nodes.map((n) => `${n.name} ${n.url}`).join(", ")}), model '${model}'`);
      const warm = await warmUp(w, model, nodes);
      log(`${policy}: warm-up entering at each node ran on ${warm.join(", ")}`);
      if (!(await settle(nodes)))
        log(`${policy}: warning: the routing index sync did not settle; routing starts with what each node knows`);
      log(`${policy}: ${c.workload.loops} loops x ${c.workload.turns} turns (+1 repeat each), entering at seeded random nodes`);
      let before: Array<RoutingCounters | null> = [];
      const d = await drive(w, {
        name: policy,
        endpoint: { url: (nodes[0] as BenchNode).url },
        model,
        maxRetries: c.maxRetries,
        maxRetryWaitS: c.maxRetryWaitS,
        requestTimeoutMs: c.requestTimeoutS * 1000,
        sampleIntervalMs: c.tiny ? TINY_DEFAULTS.sampleIntervalMs : DEFAULTS.sampleIntervalMs,
        maxSamples: 2000,
        progressIntervalMs: c.tiny ? 2000 : 10_000,
        onProgress: log,
        entry: (loop, turn, kind) => {
          const index = entryOf(plan, loop, turn, kind);
          return { index, endpoint: { url: (nodes[index] as BenchNode).url } };
        },
        toolMs: c.toolMs,
        beforeLoops: async () => {
          before = await Promise.all(nodes.map((n) => countersOf(n.url)));
        },
      });
      const after = await Promise.all(nodes.map((n) => countersOf(n.url)));
      const target = summarize(policy, (nodes[0] as BenchNode).url, model, c.workload.turns, d, {
        reuseMinTokens: c.reuseMinTokens,
        repeatMaxSuffixTokens: c.repeatMaxSuffixTokens,
      });
      const s = summarizePolicy(policy, target, nodes, before, after);
      summaries.push(s);
      const pctOf = (x: number | null) => (x === null ? "-" : `${(x * 100).toFixed(1)}%`);
      log(
        `${policy}: ${target.successes}/${target.requests} succeeded; follow-up cached ${pctOf(s.followUp.ratio)}; served per node ${s.nodes.map((n) => n.served).join("/")}`,
      );
    } catch (e) {
      throw new Error(`${policy}: ${(e as Error).message}\n${mesh.logTails()}`);
    } finally {
      // Free the cores and memory before the next policy's mesh starts.
      log(`${policy}: stopping the nodes`);
      await mesh.stop();
    }
  }

  const report: RoutingBenchReport = {
    kind: "mesh-bench-routing",
    version: 1,
    date: new Date().toISOString(),
    command: o.command ?? "mesh bench routing",
    machine: { cpu: cpus()[0]?.model.trim() ?? "unknown", cores, platform: process.platform, arch: process.arch },
    order: "sequential",
    config: { ...c, modelPath },
    model,
    entryPlan: plan,
    policies: summaries,
  };
  writeRoutingReport(outDir, report);
  log(`wrote ${join(outDir, "summary.json")}, summary.md and chart.svg`);
  return { report, outDir };
}

/** Write summary.json, summary.md and chart.svg of a report into `outDir`. */
export function writeRoutingReport(outDir: string, r: RoutingBenchReport): void {
  mkdirSync(outDir, { recursive: true });
  const c = r.config;
  const info = {
    date: r.date,
    command: r.command,
    machine: r.machine,
    model: `${r.model} (${c.modelPath})`,
    nodes: c.nodes,
    ctxSize: c.ctxSize,
    parallel: c.parallel,
    threads: c.threads,
    threadsDefaulted: c.threadsDefaulted,
    toolMs: c.toolMs,
    workload: c.workload,
  };
  const title = `routing: ${c.nodes} nodes, ${c.workload.loops} loops x ${c.workload.turns} turns, entering at random nodes; ${r.policies.map((p) => p.policy).join(" vs ")}`;
  writeFileSync(join(outDir, "summary.json"), `${JSON.stringify(r, null, 2)}\n`);
  writeFileSync(join(outDir, "summary.md"), routingSummaryMarkdown(info, r.policies));
  writeFileSync(join(outDir, "chart.svg"), renderRoutingChart(r.policies, title));
}
