// `mesh bench kv-pressure`: overlapping agent tool loops against a mesh node
// (started here, or any OpenAI-compatible --url) and, with --compare
// llama-server, the identical workload against llama-server on the same model,
// context and slots. Targets run one after the other, never at once, so each
// has the machine to itself. Writes summary.json, summary.md and chart.svg.

import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { REPO_ROOT } from "../engine/library";
import { GENERATED_MODELS } from "../gguf/models";
import { drive } from "./drive";
import { BenchUsageError, resolveModel } from "./engine";
import { defaultLlamaServerPath, LlamaServer, llamaServerFlags } from "./llama-server";
import { markdownTable, summarize, type TargetSummary } from "./report";
import { renderChart } from "./svg";
import { buildWorkload, estimatePromptTokens, turnsThatFit, type Workload, type WorkloadConfig } from "./workload";

/** Options of a run; every field has a default (CI-sized ones with `tiny`). */
export interface KvPressureOptions {
  /** GGUF path or generated model name (bench, tiny) for targets started here; the model id to request with `url`. */
  model?: string;
  /** An OpenAI-compatible endpoint to drive instead of starting a mesh node. */
  url?: string;
  apiKey?: string;
  /** Also run llama-server on the same model, context and slots. */
  compare?: "llama-server";
  llamaServer?: string;
  ctxSize?: number;
  parallel?: number;
  threads?: number;
  loops?: number;
  /** Turns per loop; default: as many as fit the context (estimated). */
  turns?: number;
  systemTokens?: number;
  toolResultTokens?: number;
  userTokens?: number;
  maxTokens?: number;
  staggerMs?: number;
  seed?: number;
  maxRetries?: number;
  maxRetryWaitS?: number;
  requestTimeoutS?: number;
  sampleIntervalMs?: number;
  reuseMinTokens?: number;
  repeatMaxSuffixTokens?: number;
  /** Extra flags for the mesh node started here (e.g. ["--queue-capacity", "16"]). */
  serveArgs?: string[];
  /** Output directory. Default bench-out/kv-pressure-<timestamp>. */
  out?: string;
  /** The tiny test model with CI-sized defaults. */
  tiny?: boolean;
  /** The command line, recorded in the report. */
  command?: string;
  onProgress?: (line: string) => void;
}

/** The options after defaults. */
export interface KvPressureConfig {
  model: string;
  url: string | null;
  apiKey: string | null;
  compare: "llama-server" | null;
  llamaServer: string;
  ctxSize: number;
  parallel: number;
  threads: number;
  workload: WorkloadConfig;
  maxRetries: number;
  maxRetryWaitS: number;
  requestTimeoutS: number;
  sampleIntervalMs: number;
  reuseMinTokens: number;
  repeatMaxSuffixTokens: number;
  serveArgs: string[];
  out: string;
  tiny: boolean;
}

/** summary.json */
export interface KvPressureReport {
  kind: "mesh-bench-kv-pressure";
  version: 1;
  date: string;
  command: string;
  machine: { cpu: string; cores: number; platform: string; arch: string };
  /** How targets shared the run: one after the other. */
  order: "sequential";
  config: Omit<KvPressureConfig, "apiKey"> & { modelPath: string | null };
  /** Estimated prompt tokens of the last turn (the run is sized with it). */
  estimatedLastPromptTokens: number;
  targets: TargetSummary[];
  /** When the figures were computed again from the stored records (src/bench/rereport.ts); absent for a fresh run. */
  rejudgedAt?: string;
}

const DEFAULTS = {
  model: "bench",
  ctxSize: 8192,
  parallel: 4,
  loops: 8,
  systemTokens: 2500,
  toolResultTokens: 600,
  userTokens: 24,
  maxTokens: 32,
  staggerMs: 2000,
  seed: 1,
  sampleIntervalMs: 1000,
  reuseMinTokens: 2048,
};
// Sized so that the tiny run is under KV pressure, not only under load: all
// loops start at once, one more than there are slots, and from the second turn on
// (~750 prompt tokens) a request's reservation plus any other request's
// (>= ~470) exceeds the 1024-cell pool, so requests wait for KV room and idle
// prefixes are evicted. A tiny request takes milliseconds, so a stagger would
// let each loop finish before the next one starts.
const TINY_DEFAULTS: typeof DEFAULTS = {
  model: "tiny",
  ctxSize: 1024,
  parallel: 2,
  loops: 3,
  systemTokens: 160,
  toolResultTokens: 200,
  userTokens: 12,
  maxTokens: 8,
  staggerMs: 0,
  seed: 1,
  sampleIntervalMs: 250,
  reuseMinTokens: 128,
};

function check(name: string, v: number, min: number, max: number): number {
  if (!Number.isInteger(v) || v < min || v > max)
    throw new BenchUsageError(`--${name} must be a whole number from ${min} to ${max} (got ${v})`);
  return v;
}

function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
}

/** Defaults applied and checked; throws BenchUsageError on impossible values. */
export function resolveKvPressureOptions(o: KvPressureOptions = {}): KvPressureConfig {
  const d = o.tiny ? TINY_DEFAULTS : DEFAULTS;
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
  const turns = check("turns", o.turns ?? turnsThatFit(sizes, ctxSize), 1, 256);
  if (o.url !== undefined && !/^https?:\/\/[^\s/]+/.test(o.url)) throw new BenchUsageError(`--url must be an http(s) URL (got '${o.url}')`);
  if (o.compare !== undefined && o.compare !== "llama-server") {
    throw new BenchUsageError(`--compare takes 'llama-server' (got '${String(o.compare)}')`);
  }
  if (o.url !== undefined && o.compare !== undefined) {
    throw new BenchUsageError("--compare llama-server starts both targets itself on --model; it cannot be combined with --url");
  }
  if (o.apiKey !== undefined && o.apiKey.trim() === "") throw new BenchUsageError("--api-key must not be empty");
  return {
    model: o.model ?? (o.url !== undefined ? "" : d.model),
    url: o.url?.replace(/\/+$/, "").replace(/\/v1$/, "") ?? null,
    apiKey: o.apiKey ?? null,
    compare: o.compare ?? null,
    llamaServer: o.llamaServer ?? defaultLlamaServerPath(),
    ctxSize,
    parallel: check("parallel", o.parallel ?? d.parallel, 1, 256),
    threads: check("threads", o.threads ?? Math.max(1, availableParallelism()), 1, 1024),
    workload: {
      seed: check("seed", o.seed ?? d.seed, 0, 0xffffffff),
      loops: check("loops", o.loops ?? d.loops, 1, 256),
      turns,
      ...sizes,
      staggerMs: check("stagger-ms", o.staggerMs ?? d.staggerMs, 0, 600_000),
    },
    maxRetries: check("max-retries", o.maxRetries ?? 20, 0, 1000),
    maxRetryWaitS: check("max-retry-wait", o.maxRetryWaitS ?? 30, 1, 3600),
    requestTimeoutS: check("request-timeout", o.requestTimeoutS ?? 900, 1, 86_400),
    sampleIntervalMs: check("sample-interval-ms", o.sampleIntervalMs ?? d.sampleIntervalMs, 50, 60_000),
    reuseMinTokens: check("reuse-min-tokens", o.reuseMinTokens ?? d.reuseMinTokens, 1, 1 << 22),
    repeatMaxSuffixTokens: check("repeat-max-suffix", o.repeatMaxSuffixTokens ?? 256, 0, 1 << 22),
    serveArgs: o.serveArgs ?? [],
    out: o.out ?? join("bench-out", `kv-pressure-${timestamp()}`),
    tiny: o.tiny === true,
  };
}

/** How to run `mesh serve` from here: this Bun on the source tree, or this very executable when compiled. */
export function meshCommand(): string[] {
  const main = join(REPO_ROOT, "src", "cli", "main.ts");
  const isBun = /^bun(-debug)?(\.exe)?$/.test(basename(process.execPath));
  return isBun && existsSync(main) ? [process.execPath, "run", main] : [process.execPath];
}

/** The served model id (first of /v1/models). */
async function modelId(url: string, apiKey: string | null): Promise<string> {
  const res = await fetch(`${url}/v1/models`, {
    headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
    signal: AbortSignal.timeout(30_000),
  });
  if (!res.ok) throw new Error(`${url}/v1/models answered HTTP ${res.status}`);
  const id = ((await res.json()) as { data?: Array<{ id?: unknown }> }).data?.[0]?.id;
  if (typeof id !== "string") throw new Error(`${url}/v1/models lists no model`);
  return id;
}

function llamaServerArgs(c: KvPressureConfig, modelPath: string): string[] {
  const known = llamaServerFlags(c.llamaServer);
  for (const f of ["--kv-unified", "--parallel", "--metrics"]) {
    if (!known.has(f))
      throw new BenchUsageError(`${c.llamaServer} does not know ${f}: rebuild it with 'bun run build.ts native --with-llama-server'`);
  }
  const t = String(c.threads);
  // The same batch sizes as mesh serve's defaults (2048 logical, 512 physical).
  const args = ["-m", modelPath, "-t", t, "-tb", t, "-c", String(c.ctxSize), "-np", String(c.parallel), "-b", "2048", "-ub", "512"];
  args.push("--kv-unified", "--metrics");
  if (known.has("--cache-prompt")) args.push("--cache-prompt");
  if (known.has("--jinja")) args.push("--jinja");
  if (known.has("--no-webui")) args.push("--no-webui");
  return args;
}

interface Target {
  name: string;
  start(): Promise<{ url: string; stop(): Promise<void>; logTail(): string }>;
}

/** Run the benchmark; returns the report and the directory it was written to. */
export async function runKvPressure(o: KvPressureOptions = {}): Promise<{ report: KvPressureReport; outDir: string }> {
  const c = resolveKvPressureOptions(o);
  const log = o.onProgress ?? ((s: string) => process.stderr.write(`[kv-pressure] ${s}\n`));
  // Fail before minutes of measuring, not after.
  if (c.compare && !existsSync(c.llamaServer)) {
    throw new BenchUsageError(`llama-server not found at ${c.llamaServer}: run 'bun run build.ts native --with-llama-server'`);
  }
  let modelPath: string | null = null;
  if (c.url === null) {
    if (GENERATED_MODELS[c.model]) log(`model '${c.model}': generated on first use, then cached`);
    modelPath = await resolveModel(c.model);
  }
  const serverArgs = c.compare && modelPath ? llamaServerArgs(c, modelPath) : [];
  const w: Workload = buildWorkload(c.workload);
  const lastPrompt = estimatePromptTokens(c.workload, c.workload.turns - 1);
  if (lastPrompt + c.workload.maxTokens > c.ctxSize) {
    log(`warning: the last turns (~${lastPrompt} prompt tokens) may not fit --ctx-size ${c.ctxSize}; expect context-length errors`);
  }
  const outDir = resolve(c.out);
  mkdirSync(outDir, { recursive: true });

  const targets: Target[] = [];
  if (c.url !== null) {
    const url = c.url;
    targets.push({ name: "endpoint", start: async () => ({ url, stop: async () => {}, logTail: () => "" }) });
  } else {
    const path = modelPath as string;
    targets.push({
      name: "mesh",
      start: async () => {
        const [binary, ...pre] = meshCommand();
        const args = [...pre, "serve", "--model", path, "--ctx-size", String(c.ctxSize), "--parallel", String(c.parallel)];
        args.push("--threads", String(c.threads), "--shutdown-grace", "1", ...c.serveArgs);
        // A scratch state dir: the default one may belong to the user's own running node, which refuses a second.
        const scratch = c.serveArgs.some((a) => a.startsWith("--state-dir")) ? null : mkdtempSync(join(tmpdir(), "mesh-bench-state-"));
        if (scratch) args.push("--state-dir", scratch);
        const node = await LlamaServer.start({ name: "mesh", binary: binary as string, args, startupTimeoutMs: 600_000 }).catch((e) => {
          if (scratch) rmSync(scratch, { recursive: true, force: true });
          throw e;
        });
        return {
          url: node.url,
          logTail: () => node.logTail(),
          stop: async () => {
            await node.stop();
            if (scratch) rmSync(scratch, { recursive: true, force: true });
          },
        };
      },
    });
  }
  if (c.compare) {
    targets.push({
      name: "llama-server",
      start: () => LlamaServer.start({ binary: c.llamaServer, args: serverArgs, startupTimeoutMs: 600_000 }),
    });
  }

  const summaries: TargetSummary[] = [];
  for (const t of targets) {
    log(`${t.name}: starting`);
    const server = await t.start();
    try {
      const model = c.url !== null && c.model !== "" ? c.model : await modelId(server.url, c.apiKey);
      log(`${t.name}: ready at ${server.url}, model '${model}'; ${c.workload.loops} loops x ${c.workload.turns} turns (+1 repeat each)`);
      const d = await drive(w, {
        name: t.name,
        endpoint: { url: server.url, ...(c.apiKey ? { apiKey: c.apiKey } : {}) },
        model,
        maxRetries: c.maxRetries,
        maxRetryWaitS: c.maxRetryWaitS,
        requestTimeoutMs: c.requestTimeoutS * 1000,
        sampleIntervalMs: c.sampleIntervalMs,
        maxSamples: 2000,
        progressIntervalMs: c.tiny ? 2000 : 10_000,
        onProgress: log,
      });
      summaries.push(
        summarize(t.name, server.url, model, c.workload.turns, d, {
          reuseMinTokens: c.reuseMinTokens,
          repeatMaxSuffixTokens: c.repeatMaxSuffixTokens,
        }),
      );
    } catch (e) {
      const tail = server.logTail();
      throw new Error(`${(e as Error).message}${tail ? `\n${t.name} log (last lines):\n${tail}` : ""}`);
    } finally {
      // Free the cores and memory before the next target starts.
      await server.stop();
    }
  }

  const { apiKey: _key, ...config } = c;
  const report: KvPressureReport = {
    kind: "mesh-bench-kv-pressure",
    version: 1,
    date: new Date().toISOString(),
    command: o.command ?? "mesh bench kv-pressure",
    machine: { cpu: cpus()[0]?.model.trim() ?? "unknown", cores: availableParallelism(), platform: process.platform, arch: process.arch },
    order: "sequential",
    config: { ...config, modelPath },
    estimatedLastPromptTokens: lastPrompt,
    targets: summaries,
  };
  writeReport(outDir, report);
  log(`wrote ${join(outDir, "summary.json")}, summary.md and chart.svg`);
  return { report, outDir };
}

/** Write summary.json, summary.md and chart.svg of a report into `outDir`. */
export function writeReport(outDir: string, report: KvPressureReport): void {
  mkdirSync(outDir, { recursive: true });
  writeFileSync(join(outDir, "summary.json"), `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(join(outDir, "summary.md"), summaryMarkdown(report));
  writeFileSync(join(outDir, "chart.svg"), renderChart(report.targets, chartTitle(report)));
}

function chartTitle(r: KvPressureReport): string {
  const c = r.config;
  return `kv-pressure: ${c.workload.loops} loops x ${c.workload.turns} turns, ctx ${c.ctxSize}, ${c.parallel} slots`;
}

/** summary.md: settings, the results table, cached ratio per turn, errors. */
export function summaryMarkdown(r: KvPressureReport): string {
  const c = r.config;
  const w = c.workload;
  const lines = [
    "# mesh bench kv-pressure",
    "",
    `- date: ${r.date}`,
    ...(r.rejudgedAt
      ? [`- figures computed again on ${r.rejudgedAt} from this run's stored requests and samples (src/bench/rereport.ts)`]
      : []),
    `- command: \`${r.command}\``,
    `- machine: ${r.machine.cores} cores, ${r.machine.cpu}, ${r.machine.platform}/${r.machine.arch}`,
    `- model: ${c.modelPath ?? c.model}; ctx ${c.ctxSize}, ${c.parallel} parallel slots, ${c.threads} threads`,
    `- workload: ${w.loops} loops started ${w.staggerMs} ms apart, ${w.turns} turns each + 1 exact repeat; system prefix ~${w.systemTokens} tokens, tool results ~${w.toolResultTokens}, user messages ~${w.userTokens}, ${w.maxTokens} tokens generated per request; seed ${w.seed}`,
    `- targets ran one after the other (${r.targets.map((t) => t.name).join(", ")}), each alone on the machine`,
    "",
    markdownTable(r.targets),
    "",
    "## Cached-token ratio per turn",
    "",
    `| turn | ${r.targets.map((t) => t.name).join(" | ")} |`,
    `| ---: | ${r.targets.map(() => "---:").join(" | ")} |`,
    ...Array.from({ length: w.turns }, (_, k) => {
      const cells = r.targets.map((t) => {
        const row = t.cachedByTurn[k];
        return row && row.ratio !== null ? `${(row.ratio * 100).toFixed(1)}% (${row.cachedTokens}/${row.promptTokens})` : "-";
      });
      return `| ${k + 1} | ${cells.join(" | ")} |`;
    }),
    "",
  ];
  for (const t of r.targets) {
    if (t.errors.length === 0) continue;
    lines.push(`## Errors from ${t.name}`, "", ...t.errors.map((e) => `- ${e.count} x ${e.message.replaceAll("\n", " ")}`), "");
  }
  lines.push("![KV cells and latency over time](chart.svg)", "");
  return lines.join("\n");
}
