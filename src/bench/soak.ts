// `mesh bench soak`: N nodes on loopback form one mesh; agent loops (growing
// conversations) and short chats enter at random live nodes for a set time,
// while every --kill-every seconds one node (in turn) is SIGKILLed and
// restarted on its state dir (it finds the mesh again through the peers it
// remembered). Every request is classified ok / 429 / 5xx / cut (no answer:
// its entry node was the one killed), RSS of every node is sampled, and two
// things are asserted: no 5xx outside the restart window (from a kill until
// the restarted node is ready plus the failure-detection bound), and no node
// process growing its RSS by more than --rss-growth-mib after its warm-up.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";
import { failureDetectionBoundMs } from "../mesh/membership";
import { type AttemptResult, sendChat } from "./client";
import { BenchUsageError } from "./engine";
import { meshCommand } from "./kv-pressure";
import { LlamaServer } from "./llama-server";
import { renderSoakChart } from "./soak-report";
import { pseudoText, rng } from "./workload";

/** Options of a soak run; every one has a default. */
export interface SoakOptions {
  nodes?: number;
  /** Seconds the load runs. */
  durationS?: number;
  /** Seconds between kills (0: never). */
  killEveryS?: number;
  /** GGUF path, or omitted for the tiny generated model. */
  model?: string;
  agentLoops?: number;
  chatLoops?: number;
  ctxSize?: number;
  parallel?: number;
  threads?: number;
  seed?: number;
  /** Largest RSS growth of one node process after its warm-up, MiB. */
  rssGrowthMiB?: number;
  out?: string;
  command?: string;
}

/** Resolved options. */
export type SoakConfig = Required<Omit<SoakOptions, "model" | "out" | "command">> & { model: string | null; out: string; command: string };

/** Counts of one class of outcome. */
export interface SoakCounts {
  ok: number;
  r429: number;
  r5xx: number;
  /** No answer at all: the entry node went away mid-request. */
  cut: number;
  /** 5xx and cuts outside every restart window (the assertion: zero). */
  outsideWindow: number;
}

const MAX_ERROR_KINDS = 20;
// The client checks a stream ended properly by its final usage chunk.
const STREAM_USAGE = { stream_options: { include_usage: true } };

/** One RSS sample. */
export interface RssSample {
  tS: number;
  node: string;
  /** Which start of the node (0 first, then one per restart). */
  life: number;
  rssMiB: number;
}

/** What a soak run measured, and whether it passed. */
export interface SoakReport {
  command: string;
  config: SoakConfig;
  startedAt: string;
  elapsedS: number;
  counts: SoakCounts;
  /** Failed requests by status and error message (at most 20 kinds). */
  errors: Record<string, number>;
  kills: Array<{ node: string; atS: number; readyS: number | null }>;
  /** Seconds a restart window lasts past the restarted node's readiness. */
  windowAfterReadyS: number;
  rss: RssSample[];
  /** Per node process: RSS after warm-up, and at its end, MiB. */
  growth: Array<{ node: string; life: number; fromMiB: number; toMiB: number; growthMiB: number }>;
  failures: string[];
  passed: boolean;
}

const WARMUP_S = 30;
const SAMPLE_EVERY_MS = 5_000;
const REQUEST_TIMEOUT_MS = 120_000;

function num(name: string, v: number | undefined, def: number, min: number, max: number): number {
  const x = v ?? def;
  if (!Number.isInteger(x) || x < min || x > max) throw new BenchUsageError(`--${name} must be an integer in ${min}..${max}, got ${x}`);
  return x;
}

/** Defaults filled in and ranges checked; throws BenchUsageError. */
export function resolveSoakOptions(o: SoakOptions = {}): SoakConfig {
  if (o.model !== undefined && !existsSync(o.model)) throw new BenchUsageError(`model not found: ${o.model}`);
  return {
    nodes: num("nodes", o.nodes, 3, 2, 16),
    durationS: num("duration", o.durationS, 600, 5, 7 * 86400),
    killEveryS: num("kill-every", o.killEveryS, 60, 0, 86400),
    model: o.model ?? null,
    agentLoops: num("agent-loops", o.agentLoops, 2, 0, 256),
    chatLoops: num("chat-loops", o.chatLoops, 2, 0, 256),
    ctxSize: num("ctx-size", o.ctxSize, 4096, 256, 1 << 20),
    parallel: num("parallel", o.parallel, 2, 1, 64),
    threads: num("threads", o.threads, 1, 1, 1024),
    seed: num("seed", o.seed, 1, 0, 0xffffffff),
    rssGrowthMiB: num("rss-growth-mib", o.rssGrowthMiB, 128, 1, 1 << 20),
    out: o.out ?? join("bench-out", `soak-${new Date().toISOString().replace(/[:.]/g, "-")}`),
    command: o.command ?? "mesh bench soak",
  };
}

interface Node {
  name: string;
  stateDir: string;
  proc: LlamaServer | null;
  life: number;
}

function rssMiB(pid: number | undefined): number | null {
  if (pid === undefined) return null;
  try {
    const kb = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
    return kb === undefined ? null : Number(kb) / 1024;
  } catch {
    return null;
  }
}

async function inviteToken(node: LlamaServer): Promise<string> {
  for (let i = 0; i < 300; i++) {
    const m = /mesh serve --join (\S+)/.exec(readFileSync(node.logFile, "utf8"));
    if (m) return m[1] as string;
    await Bun.sleep(100);
  }
  throw new Error(`the first node printed no invite token:\n${node.logTail(20)}`);
}

/** Run the soak; resolves with the report (also written, with rss.svg, to the out dir). */
export async function runSoak(
  o: SoakOptions = {},
  progress: (line: string) => void = () => {},
): Promise<{ report: SoakReport; outDir: string }> {
  const c = resolveSoakOptions(o);
  const modelPath = c.model ?? (await ensureModel(TINY));
  const root = mkdtempSync(join(tmpdir(), "mesh-bench-soak-"));
  const nodes: Node[] = Array.from({ length: c.nodes }, (_, i) => ({
    name: `node-${i + 1}`,
    stateDir: join(root, `node-${i + 1}`),
    proc: null,
    life: 0,
  }));
  const [binary, ...pre] = meshCommand();
  const start = (n: Node, join: string | null) =>
    LlamaServer.start({
      name: n.name,
      binary: binary as string,
      startupTimeoutMs: 300_000,
      args: [
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
        "--state-dir",
        n.stateDir,
        "--node-name",
        n.name,
        "--shutdown-grace",
        "1",
        ...(join ? ["--join", join] : []),
      ],
    });
  const windowAfterReadyS = Math.ceil(failureDetectionBoundMs(c.nodes) / 1000) + 10;
  const counts: SoakCounts = { ok: 0, r429: 0, r5xx: 0, cut: 0, outsideWindow: 0 };
  const kills: SoakReport["kills"] = [];
  const errors: Record<string, number> = {};
  const rss: RssSample[] = [];
  const t0 = Date.now();
  const nowS = () => (Date.now() - t0) / 1000;
  const inWindow = (tS: number) => kills.some((k) => tS >= k.atS && tS <= (k.readyS ?? Number.POSITIVE_INFINITY) + windowAfterReadyS);
  const random = rng(c.seed);
  let stopping = false;
  try {
    const first = nodes[0] as Node;
    first.proc = await start(first, null);
    const token = await inviteToken(first.proc);
    for (const n of nodes.slice(1)) n.proc = await start(n, token);
    progress(`${c.nodes} nodes up; soaking for ${c.durationS} s, ${c.killEveryS > 0 ? `a kill every ${c.killEveryS} s` : "no kills"}`);
    const model = await modelIdOf(first.proc.url);
    const entry = () => {
      const live = nodes.filter((n) => n.proc !== null);
      return (live[Math.floor(random() * live.length)] as Node).proc as LlamaServer;
    };
    const record = (r: AttemptResult, sentS: number) => {
      if (r.status === 200 && !r.streamError && r.error === null) counts.ok++;
      else if (r.status === 429) counts.r429++;
      else {
        const kind = `${r.status} ${(r.error ?? "").slice(0, 100)}`;
        if (kind in errors || Object.keys(errors).length < MAX_ERROR_KINDS) errors[kind] = (errors[kind] ?? 0) + 1;
        if (r.status === 0) counts.cut++;
        else counts.r5xx++;
        if (!inWindow(sentS) && !inWindow(nowS())) counts.outsideWindow++;
      }
    };
    const system = pseudoText(rng(c.seed + 1), 400);
    const agent = async (k: number) => {
      const next = rng(c.seed * 1000 + k);
      while (!stopping) {
        const history: Array<{ role: string; content: string }> = [{ role: "system", content: system }];
        for (let turn = 0; turn < 6 && !stopping; turn++) {
          history.push({ role: "user", content: pseudoText(next, 40) });
          const sent = nowS();
          const stream = turn % 2 === 0;
          const body = { model, messages: history, max_tokens: 16, stream, ...(stream ? STREAM_USAGE : {}), ignore_eos: true };
          const r = await sendChat({ url: entry().url }, body, REQUEST_TIMEOUT_MS);
          record(r, sent);
          if (r.status === 429) await Bun.sleep(1000);
          history.push({ role: "assistant", content: pseudoText(next, 16) });
        }
      }
    };
    const chat = async (k: number) => {
      const next = rng(c.seed * 7919 + k);
      while (!stopping) {
        const sent = nowS();
        const stream = next() < 0.5;
        const body = {
          model,
          messages: [{ role: "user", content: pseudoText(next, 12) }],
          max_tokens: 8,
          stream,
          ...(stream ? STREAM_USAGE : {}),
        };
        const r = await sendChat({ url: entry().url }, body, REQUEST_TIMEOUT_MS);
        record(r, sent);
        await Bun.sleep(r.status === 429 ? 1000 : 200);
      }
    };
    const sample = () => {
      for (const n of nodes) {
        const m = rssMiB(n.proc?.pid);
        if (m !== null) rss.push({ tS: nowS(), node: n.name, life: n.life, rssMiB: Math.round(m * 10) / 10 });
      }
    };
    sample();
    const sampler = setInterval(sample, SAMPLE_EVERY_MS);
    const clients = [
      ...Array.from({ length: c.agentLoops }, (_, k) => agent(k)),
      ...Array.from({ length: c.chatLoops }, (_, k) => chat(k)),
    ];
    let victim = 0;
    const end = t0 + c.durationS * 1000;
    let nextKill = c.killEveryS > 0 ? Date.now() + c.killEveryS * 1000 : Number.POSITIVE_INFINITY;
    while (Date.now() < end) {
      await Bun.sleep(Math.max(0, Math.min(end, nextKill) - Date.now()));
      if (Date.now() < nextKill || Date.now() >= end) continue;
      const n = nodes[victim++ % nodes.length] as Node;
      const kill = { node: n.name, atS: nowS(), readyS: null as number | null };
      kills.push(kill);
      const proc = n.proc as LlamaServer;
      n.proc = null;
      process.kill(proc.pid as number, "SIGKILL");
      await proc.stop(0);
      progress(`${kill.atS.toFixed(0)} s: killed ${n.name}; restarting it`);
      // Without --join: it finds the mesh through the peers it remembered.
      n.proc = await start(n, null);
      n.life++;
      kill.readyS = nowS();
      nextKill = Date.now() + c.killEveryS * 1000;
    }
    stopping = true;
    await Promise.all(clients);
    clearInterval(sampler);
    sample();
  } finally {
    stopping = true;
    await Promise.all(nodes.map((n) => n.proc?.stop(2_000)));
    rmSync(root, { recursive: true, force: true });
  }
  const growth = growthOf(rss);
  const failures: string[] = [];
  if (counts.outsideWindow > 0) failures.push(`${counts.outsideWindow} requests failed (5xx or no answer) outside every restart window`);
  for (const g of growth)
    if (g.growthMiB > c.rssGrowthMiB)
      failures.push(`${g.node} (start ${g.life}) grew ${g.growthMiB} MiB after warm-up (bound ${c.rssGrowthMiB})`);
  if (counts.ok === 0) failures.push("no request succeeded");
  const report: SoakReport = {
    command: c.command,
    config: c,
    startedAt: new Date(t0).toISOString(),
    elapsedS: Math.round(nowS()),
    counts,
    errors,
    kills,
    windowAfterReadyS,
    rss,
    growth,
    failures,
    passed: failures.length === 0,
  };
  mkdirSync(c.out, { recursive: true });
  writeFileSync(join(c.out, "summary.json"), `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(join(c.out, "rss.svg"), renderSoakChart(report));
  return { report, outDir: c.out };
}

/** Per node process (node and life): RSS at the first sample after warm-up (or its first) and at its last sample. */
export function growthOf(rss: RssSample[]): SoakReport["growth"] {
  const lives = new Map<string, RssSample[]>();
  for (const s of rss) {
    const k = `${s.node}#${s.life}`;
    lives.set(k, [...(lives.get(k) ?? []), s]);
  }
  return [...lives.values()].map((xs) => {
    const first = xs[0] as RssSample;
    const from = xs.find((s) => s.tS - first.tS >= WARMUP_S) ?? first;
    const to = xs[xs.length - 1] as RssSample;
    return {
      node: first.node,
      life: first.life,
      fromMiB: from.rssMiB,
      toMiB: to.rssMiB,
      growthMiB: Math.round((to.rssMiB - from.rssMiB) * 10) / 10,
    };
  });
}

async function modelIdOf(url: string): Promise<string> {
  const res = await fetch(`${url}/v1/models`, { signal: AbortSignal.timeout(30_000) });
  const id = ((await res.json()) as { data?: Array<{ id?: unknown }> }).data?.[0]?.id;
  if (typeof id !== "string") throw new Error(`${url}/v1/models lists no model`);
  return id;
}

/** The report as a table for a terminal. */
export function formatSoakTable(r: SoakReport): string {
  const c = r.counts;
  const lines = [
    `soak: ${r.config.nodes} nodes, ${r.elapsedS} s, ${r.kills.length} kills (every ${r.config.killEveryS} s), restart window: kill .. ready + ${r.windowAfterReadyS} s`,
    `requests: ok ${c.ok}  429 ${c.r429}  5xx ${c.r5xx}  no answer ${c.cut}  failed outside a restart window ${c.outsideWindow}`,
    ...Object.entries(r.errors).map(([k, n]) => `  ${n} x ${k}`),
    "RSS per node process (MiB, after warm-up -> end):",
    ...r.growth.map((g) => `  ${g.node} start ${g.life}: ${g.fromMiB} -> ${g.toMiB} (${g.growthMiB >= 0 ? "+" : ""}${g.growthMiB})`),
    r.passed ? "PASSED" : `FAILED:\n${r.failures.map((f) => `  ${f}`).join("\n")}`,
  ];
  return lines.join("\n");
}
