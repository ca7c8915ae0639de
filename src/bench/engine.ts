// Engine benchmark: mesh's Engine (in-process, engine Worker) against
// llama-server built from the same vendored llama.cpp, on the same GGUF with
// the same threads, context, slots, batch sizes and identical token ids.
//
//   bun run src/bench/engine.ts [--model PATH|bench|tiny] [--threads N] [--ctx N] [--parallel N]
//     [--prompt-tokens N] [--prefix-tokens N] [--gen-tokens N] [--repeats N] [--no-compare] [--json]
//     [--table [--prefixes 2048,8192,16384] [--suffixes 16,256,1024] [--no-dirty] [--busy] [--no-floor] [--http] [--table-only]]
//
// Both targets stay loaded and take turns repeat by repeat (mesh, llama-server,
// mesh, ...), never working at the same time: on a small machine they would
// compete for the same cores, and alternating spreads the machine's drift
// over both instead of landing it on whichever ran second.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  type AttnKernel,
  DEFAULT_ATTN_KERNEL,
  DEFAULT_PLAIN_ATTN,
  describeAttention,
  type PlainAttn,
  parseAttnKernel,
  parsePlainAttn,
} from "../engine/attention";
import { Engine, HOST_CACHE_DEFAULT_MIB } from "../engine/index";
import type { TtftPhases } from "../engine/protocol";
import { ensureModel, GENERATED_MODELS } from "../gguf/models";
import {
  type CachedPrefixTable,
  type CellSamples,
  cellKey,
  emptySamples,
  formatBusyTable,
  formatCachedPrefixTable,
  formatPhaseBreakdown,
  httpTarget,
  measureTableRepeat,
  type TablePrompt,
  type TableRepeatPrompts,
  type TableTarget,
  type TableVariants,
  type TurnResult,
  tableCells,
  tableFigures,
} from "./cached-prefix";
import { measureFloor } from "./floor";
import { meshCommand } from "./kv-pressure";
import { defaultLlamaServerPath, LlamaServer, llamaServerFlags } from "./llama-server";
import { sseLines } from "./sse";
import { median, pairedRatio } from "./stats";

export { median, pairedRatio } from "./stats";

/** What to measure and how the two targets are configured; every field has a default. */
export interface EngineBenchOptions {
  /** GGUF path, or the name of a generated model ("bench", "tiny"). Default: bench. */
  model?: string;
  /** CPU threads for decode and prompt processing (both targets). Default: all cores. */
  threads?: number;
  /** Total KV cells, shared by all slots (unified KV). Default 8192. */
  ctx?: number;
  /** Slots, and the number of concurrent streams of the aggregate figure. Default 4. */
  parallel?: number;
  /** Logical batch (llama-server -b). Default 2048. */
  batch?: number;
  /** Physical batch (llama-server -ub). Default 512. */
  ubatch?: number;
  /** Flash attention on both sides. Default auto. */
  flashAttn?: "on" | "off" | "auto";
  /** mesh's plain-attention window (serve --plain-attn); null: off. Default: mesh's default for the kernel. llama-server has no such setting. */
  plainAttn?: PlainAttn | null;
  /** mesh's CPU flash-attention kernel (serve --attn-kernel). Default mesh. llama-server runs ggml's. */
  attnKernel?: AttnKernel;
  /** Prompt size of the prefill figure. Default 1024. */
  promptTokens?: number;
  /** Shared prefix of the cached time-to-first-token figure. Default 2048. */
  prefixTokens?: number;
  /** New tokens after the cached prefix. Default 16. */
  suffixTokens?: number;
  /** Generated tokens of the decode figures. Default 128. */
  genTokens?: number;
  /** Runs per figure; the median is reported. Default 3. */
  repeats?: number;
  /** Also run llama-server. Default true. */
  compare?: boolean;
  /** Layers on the GPU for both targets (llama-server -ngl); -1 leaves each its default (all that fit). Default -1. */
  gpuLayers?: number;
  /** llama-server executable. Default vendor/llama.cpp/build/cpu/bin/llama-server. */
  llamaServer?: string;
  /** Also measure the cached-prefix table (prefixes x suffixes). Default false. */
  table?: boolean;
  /** Prefix sizes of the table. Default 2048, 8192, 16384. */
  prefixes?: number[];
  /** Suffix sizes of the table. Default 16, 256, 1024. */
  suffixes?: number[];
  /** The table's dirty variant (other streams decode between the prefix and the request). Default true. */
  dirty?: boolean;
  /** The table's busy variant (the request arrives while other streams decode). Default false. */
  busy?: boolean;
  /** The table's floor: the suffix decoded over the prefix through the shim alone. Default true. */
  floor?: boolean;
  /** The table again through HTTP: `mesh serve` against llama-server, /v1/completions, same client. Default false. */
  http?: boolean;
  /** The prefill, decode and single cached-TTFT figures. Default true (false: the table only). */
  figures?: boolean;
  /** Receives progress lines (default: stderr). */
  onProgress?: (line: string) => void;
}

/** The options after defaults, as recorded in the report. */
export type EngineBenchConfig = Required<Omit<EngineBenchOptions, "onProgress" | "model" | "plainAttn">> & {
  model: string;
  /** As given; undefined: the engine's default for the kernel that runs (serve's too). */
  plainAttn: PlainAttn | null | undefined;
};

/** Table defaults: the prefixes and suffixes of an agent's turns. */
export const TABLE_PREFIXES = [2048, 8192, 16384];
export const TABLE_SUFFIXES = [16, 256, 1024];
/** Generated tokens of each stream that dirties the pool in the dirty variant. */
const DIRTY_GEN_TOKENS = 32;
/** Generated tokens of each stream that decodes while the busy variant's request arrives (enough to outlast the turn's prefill). */
const BUSY_GEN_TOKENS = 64;

/** One figure over its repeats. */
export interface Samples {
  median: number;
  samples: number[];
}

/** Everything measured on one target. */
export interface TargetResult {
  /** Uncached prompt tokens per second over time to first token. */
  prefillTokensPerSecond: Samples;
  /** One stream, tokens after the first per second. */
  decodeTokensPerSecond: Samples;
  /** `parallel` concurrent streams, all their tokens per second. */
  aggregateDecodeTokensPerSecond: Samples;
  /** Time to first token of a request whose prefix is in the KV cache, milliseconds. */
  cachedTtftMs: Samples;
  /** Prompt tokens the target reported as served from cache in each cached request. */
  cachedTokens: number[];
  /** llama-server's own timings (prompt_per_second of the prefill runs, predicted_per_second of the decode runs). */
  serverTimings?: { promptPerSecond: Samples; predictedPerSecond: Samples };
}

/** Keys of the compared figures. */
export type FigureKey = "prefill" | "decode" | "aggregateDecode" | "cachedTtft";

/** One row of the comparison table. */
export interface BenchFigure {
  key: FigureKey;
  label: string;
  unit: "tok/s" | "ms";
  higherIsBetter: boolean;
  mesh: number;
  llamaServer: number | null;
  /** > 1 means mesh is better: mesh/llama-server for rates, llama-server/mesh for times (ratio of the medians). */
  ratio: number | null;
  /** The median of the per-repeat ratios (each repeat ran back to back on both targets); same direction. */
  pairedRatio: number | null;
}

/** The benchmark's result. */
export interface EngineBenchReport {
  date: string;
  machine: { cpu: string; cores: number; platform: string; arch: string };
  model: { path: string; name: string; nParams: number; sizeBytes: number };
  config: EngineBenchConfig;
  figures: BenchFigure[];
  mesh: TargetResult;
  llamaServer: TargetResult | null;
  /** The cached-prefix tables (engine level, then HTTP when asked); empty without --table. */
  tables: CachedPrefixTable[];
}

/** A bad option or a missing tool: the CLI prints its message on one line and exits with 2. */
export class BenchUsageError extends Error {
  override readonly name = "BenchUsageError";
}

// Prompt of the decode figures: short, so attention over it is negligible.
const DECODE_PROMPT_TOKENS = 32;

/** Defaults applied and checked; throws BenchUsageError on impossible sizes. */
export function resolveEngineBenchOptions(o: EngineBenchOptions = {}): EngineBenchConfig {
  const c: EngineBenchConfig = {
    model: o.model ?? "bench",
    threads: o.threads ?? Math.max(1, availableParallelism()),
    ctx: o.ctx ?? 8192,
    parallel: o.parallel ?? 4,
    batch: o.batch ?? 2048,
    ubatch: o.ubatch ?? 512,
    flashAttn: o.flashAttn ?? "auto",
    attnKernel: o.attnKernel ?? DEFAULT_ATTN_KERNEL,
    plainAttn: o.plainAttn,
    promptTokens: o.promptTokens ?? 1024,
    prefixTokens: o.prefixTokens ?? 2048,
    suffixTokens: o.suffixTokens ?? 16,
    genTokens: o.genTokens ?? 128,
    repeats: o.repeats ?? 3,
    compare: o.compare ?? true,
    gpuLayers: o.gpuLayers ?? -1,
    llamaServer: o.llamaServer ?? defaultLlamaServerPath(),
    table: o.table ?? false,
    prefixes: o.prefixes ?? TABLE_PREFIXES,
    suffixes: o.suffixes ?? TABLE_SUFFIXES,
    dirty: o.dirty ?? true,
    busy: o.busy ?? false,
    floor: o.floor ?? true,
    http: o.http ?? false,
    figures: o.figures ?? true,
  };
  // The table's longest prompt, and the dirty streams beside it, must fit; an unset --ctx grows to it.
  const tableNeed = c.table
    ? Math.max(...c.prefixes) +
      Math.max(...c.suffixes) +
      1 +
      c.parallel * (DECODE_PROMPT_TOKENS + (c.busy ? BUSY_GEN_TOKENS : DIRTY_GEN_TOKENS))
    : 0;
  if (o.ctx === undefined && tableNeed > c.ctx) c.ctx = Math.ceil(tableNeed / 1024) * 1024;
  const ints: Array<[string, number, number]> = [
    ["threads", c.threads, 1],
    ["ctx", c.ctx, 64],
    ["parallel", c.parallel, 1],
    ["batch", c.batch, 1],
    ["ubatch", c.ubatch, 1],
    ["prompt-tokens", c.promptTokens, 2],
    ["prefix-tokens", c.prefixTokens, 2],
    ["suffix-tokens", c.suffixTokens, 1],
    // The decode rate is measured after the first token: at least one more is needed.
    ["gen-tokens", c.genTokens, 2],
    ["repeats", c.repeats, 1],
  ];
  for (const [name, v, min] of ints) {
    if (!Number.isInteger(v) || v < min) throw new BenchUsageError(`--${name} must be a whole number >= ${min} (got ${v})`);
  }
  for (const [name, xs] of [
    ["prefixes", c.prefixes],
    ["suffixes", c.suffixes],
  ] as const) {
    if (xs.length === 0 || xs.some((v) => !Number.isInteger(v) || v < 1)) {
      throw new BenchUsageError(`--${name} takes a comma-separated list of whole numbers >= 1`);
    }
  }
  if (c.table && tableNeed > c.ctx) throw new BenchUsageError(`the table needs --ctx >= ${tableNeed} (got ${c.ctx})`);
  if (!c.table && (c.http || o.figures === false)) throw new BenchUsageError("--http and --table-only need --table");
  if (!["on", "off", "auto"].includes(c.flashAttn)) throw new BenchUsageError(`--flash-attn must be on, off or auto (got ${c.flashAttn})`);
  if (c.ubatch > c.batch) throw new BenchUsageError("--ubatch cannot exceed --batch");
  // With unified KV every slot may use the whole context, but the streams of
  // the aggregate figure share it, and one more token must fit after each prompt.
  if (c.promptTokens + 1 >= c.ctx) throw new BenchUsageError(`--prompt-tokens ${c.promptTokens} does not fit --ctx ${c.ctx}`);
  if (c.prefixTokens + c.suffixTokens + 1 >= c.ctx) {
    throw new BenchUsageError(`--prefix-tokens + suffix (${c.prefixTokens + c.suffixTokens}) does not fit --ctx ${c.ctx}`);
  }
  if (c.parallel * (DECODE_PROMPT_TOKENS + c.genTokens) >= c.ctx) {
    throw new BenchUsageError(`${c.parallel} streams of ${DECODE_PROMPT_TOKENS}+${c.genTokens} tokens do not fit --ctx ${c.ctx}`);
  }
  return c;
}

/** Timestamps (performance.now(), ms) and counts of one generation. */
interface Timing {
  start: number;
  /** When the first generated token reached the caller. */
  firstToken: number;
  /** How many tokens had been generated when firstToken was observed (1 unless a chunk was held back). */
  firstIndex: number;
  end: number;
  completionTokens: number;
  cachedTokens: number;
  server?: { promptPerSecond: number; predictedPerSecond: number };
  /** mesh only: where the time to first token went inside the engine Worker. */
  phases?: TtftPhases;
}

/** A thing that generates from token ids, greedily, ignoring end-of-generation tokens. */
interface Target {
  /** `onFirst` runs when the first token arrives. */
  generate(prompt: number[], maxTokens: number, onFirst?: () => void): Promise<Timing>;
}

function meshTarget(engine: Engine): Target {
  return {
    async generate(prompt, maxTokens, onFirst) {
      const start = performance.now();
      let first = -1;
      let firstIndex = 0;
      let count = 0;
      for await (const e of engine.generate({ prompt, maxTokens, sampling: { temperature: 0 }, ignoreEos: true })) {
        if (e.kind === "text" && e.tokens.length > 0) {
          count += e.tokens.length;
          if (first < 0) {
            first = performance.now();
            firstIndex = count;
            onFirst?.();
          }
        } else if (e.kind === "done") {
          const end = performance.now();
          const t: Timing = {
            start,
            firstToken: first < 0 ? end : first,
            firstIndex: first < 0 ? e.completionTokens : firstIndex,
            end,
            completionTokens: e.completionTokens,
            cachedTokens: e.cachedTokens,
          };
          if (e.phases) t.phases = e.phases;
          return t;
        }
      }
      throw new Error("mesh: generation ended without a done event");
    },
  };
}

interface ServerChunk {
  error?: { message?: string } | string;
  tokens?: number[];
  content?: string;
  stop?: boolean;
  tokens_predicted?: number;
  timings?: { cache_n?: number; prompt_per_second?: number; predicted_per_second?: number; predicted_n?: number };
}

function llamaTarget(url: string): Target {
  return {
    async generate(prompt, maxTokens, onFirst) {
      const body = JSON.stringify({
        prompt,
        n_predict: maxTokens,
        ignore_eos: true,
        temperature: 0,
        cache_prompt: true,
        stream: true,
      });
      const start = performance.now();
      // A fresh connection per request: a pooled one that the server has
      // meanwhile closed fails with ECONNRESET (seen after long streams).
      const res = await fetch(`${url}/completion`, {
        method: "POST",
        headers: { "content-type": "application/json", connection: "close" },
        body,
        keepalive: false,
      });
      if (!res.ok || !res.body) throw new Error(`llama-server answered ${res.status}: ${(await res.text()).slice(0, 300)}`);
      let first = -1;
      let firstIndex = 0;
      let final: ServerChunk | null = null;
      let end = 0;
      for await (const { field, payload, at } of sseLines(res.body)) {
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload) as ServerChunk;
        if (field === "error" || chunk.error) {
          const err = chunk.error ?? chunk;
          throw new Error(`llama-server: ${typeof err === "string" ? err : ((err as { message?: string }).message ?? payload)}`);
        }
        // A chunk carries a token once its text is complete UTF-8; the count
        // tells how many tokens had been generated by then.
        if (first < 0 && ((chunk.tokens?.length ?? 0) > 0 || (chunk.content ?? "") !== "")) {
          first = at;
          firstIndex = chunk.tokens_predicted ?? 1;
          onFirst?.();
        }
        if (chunk.stop === true) {
          final = chunk;
          end = at;
        }
      }
      if (!final) throw new Error("llama-server: the stream ended without a final chunk");
      const completionTokens = final.tokens_predicted ?? final.timings?.predicted_n ?? 0;
      return {
        start,
        firstToken: first < 0 ? end : first,
        firstIndex: first < 0 ? completionTokens : firstIndex,
        end,
        completionTokens,
        cachedTokens: final.timings?.cache_n ?? 0,
        server: {
          promptPerSecond: final.timings?.prompt_per_second ?? Number.NaN,
          predictedPerSecond: final.timings?.predicted_per_second ?? Number.NaN,
        },
      };
    },
  };
}

const samples = (xs: number[]): Samples => ({ median: median(xs), samples: xs });

/** Token ids for every run, built once and sent identically to both targets. */
interface PromptSet {
  warmup: number[];
  prefill: number[][];
  decode: number[][];
  aggregate: number[][][];
  prefix: number[][];
  suffix: number[][];
  /** The table's prompts per repeat: engine level, and HTTP (its own, so nothing cached by the other layer is reused). */
  table: TableRepeatPrompts[];
  tableHttp: TableRepeatPrompts[];
}

const WORDS = (
  "the of and to in is was for on that with as by at from this it be are or an have which not but had were " +
  "river mountain engine harbor lantern garden winter market signal copper orbit meadow canyon falcon velvet " +
  "quartz meridian compass thunder silver island pepper marble tunnel beacon glacier hollow ember cobalt"
).split(" ");

// Every prompt starts with its own serial and nonce, so no target can reuse a
// previous prompt's KV beyond its first token or two (BOS, a leading space
// piece); the rest is varied filler.
async function buildPrompts(engine: Engine, c: EngineBenchConfig): Promise<PromptSet> {
  const nonce = Math.floor(Math.random() * 0xffffff)
    .toString(16)
    .padStart(6, "0");
  let serial = 0;
  let seed = 0x2545f491;
  const word = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return WORDS[(seed >>> 0) % WORDS.length] as string;
  };
  const words = (n: number) => Array.from({ length: n }, word).join(" ");
  const prompt = async (n: number): Promise<number[]> => {
    // Every word is at least one token, so n words give at least n tokens.
    const ids = await engine.tokenize(`${++serial}${nonce} ${words(n)}`);
    return ids.slice(0, n);
  };
  const suffix = async (): Promise<number[]> => {
    const ids = await engine.tokenize(` then ${++serial} ${words(c.suffixTokens)}`, { addSpecial: false });
    return ids.slice(0, c.suffixTokens);
  };
  // Text for the HTTP table: what the token ids spell (a server tokenizes it back to about as many).
  const asText = async (ids: number[]): Promise<TablePrompt> => ({ ids, text: await engine.detokenize(ids) });
  const tableRepeat = async (): Promise<TableRepeatPrompts> => {
    const t: TableRepeatPrompts = { prefix: new Map(), clean: new Map(), dirty: new Map(), busy: new Map(), streams: [] };
    for (const size of c.prefixes) t.prefix.set(size, await asText(await prompt(size)));
    for (const cell of tableCells(c.prefixes, c.suffixes)) {
      for (const m of c.busy ? [t.clean, t.dirty, t.busy] : [t.clean, t.dirty]) {
        const ids = (await engine.tokenize(` then ${++serial} ${words(cell.suffix)}`, { addSpecial: false })).slice(0, cell.suffix);
        // Detokenizing drops the leading space of the first piece; the suffix follows the prefix after one.
        m.set(cellKey(cell), { ids, text: ` ${await engine.detokenize(ids)}` });
      }
    }
    for (let k = 0; k < Math.max(1, c.parallel - 1); k++) t.streams.push(await asText(await prompt(DECODE_PROMPT_TOKENS)));
    return t;
  };
  const runs = Array.from({ length: c.repeats }, (_, i) => i);
  const set: PromptSet = {
    warmup: await prompt(Math.min(256, c.promptTokens)),
    prefill: [],
    decode: [],
    aggregate: [],
    prefix: [],
    suffix: [],
    table: [],
    tableHttp: [],
  };
  for (const _ of runs) {
    set.prefill.push(await prompt(c.promptTokens));
    set.decode.push(await prompt(DECODE_PROMPT_TOKENS));
    const streams: number[][] = [];
    for (let s = 0; s < c.parallel; s++) streams.push(await prompt(DECODE_PROMPT_TOKENS));
    set.aggregate.push(streams);
    set.prefix.push(await prompt(c.prefixTokens));
    set.suffix.push(await suffix());
    if (c.table) {
      set.table.push(await tableRepeat());
      if (c.http) set.tableHttp.push(await tableRepeat());
    }
  }
  return set;
}

const seconds = (ms: number) => Math.max(ms, 1e-3) / 1000;
const fmt = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));

/** Samples of one target, filled one repeat at a time. */
interface Collected {
  prefill: number[];
  promptPerSecond: number[];
  decode: number[];
  predictedPerSecond: number[];
  aggregate: number[];
  ttft: number[];
  cached: number[];
}

const collected = (): Collected => ({
  prefill: [],
  promptPerSecond: [],
  decode: [],
  predictedPerSecond: [],
  aggregate: [],
  ttft: [],
  cached: [],
});

async function warmUp(name: string, t: Target, p: PromptSet, c: EngineBenchConfig, log: (s: string) => void): Promise<void> {
  log(`${name}: warm-up`);
  await t.generate(p.warmup, Math.min(16, c.genTokens));
}

// Before each measured request: collect this process's garbage (the SSE
// parsing of the other target's turn) so the collector's threads do not run
// beside the mesh engine's compute threads on a small machine, and leave a
// gap like a client between turns (250 ms), in which each server may finish
// its after-work (mesh copies finished conversations to host RAM once idle
// for 100 ms; llama-server does that when the next request starts). Done for
// both targets alike.
async function settle(): Promise<void> {
  Bun.gc(true);
  await Bun.sleep(250);
}

// Repeat i of every figure on one target: one sample each.
async function measureRepeat(
  name: string,
  t: Target,
  p: PromptSet,
  c: EngineBenchConfig,
  i: number,
  into: Collected,
  log: (s: string) => void,
): Promise<void> {
  const n = `${i + 1}/${c.repeats}`;
  const prompt = p.prefill[i] as number[];
  await settle();
  let r = await t.generate(prompt, 1);
  // With one token to generate, time to first token is the prefill (plus one sampling).
  const pf = (prompt.length - r.cachedTokens) / seconds(r.firstToken - r.start);
  into.prefill.push(pf);
  if (r.server) into.promptPerSecond.push(r.server.promptPerSecond);
  log(`${name}: prefill ${n}: ${fmt(pf)} tok/s (${prompt.length - r.cachedTokens} tokens uncached)`);

  await settle();
  r = await t.generate(p.decode[i] as number[], c.genTokens);
  const dv = (r.completionTokens - r.firstIndex) / seconds(r.end - r.firstToken);
  into.decode.push(dv);
  if (r.server) into.predictedPerSecond.push(r.server.predictedPerSecond);
  log(`${name}: decode ${n}: ${fmt(dv)} tok/s (${r.completionTokens} tokens)`);

  await settle();
  const rs = await Promise.all((p.aggregate[i] as number[][]).map((q) => t.generate(q, c.genTokens)));
  const tokens = rs.reduce((sum, x) => sum + x.completionTokens - x.firstIndex, 0);
  const window = Math.max(...rs.map((x) => x.end)) - Math.min(...rs.map((x) => x.firstToken));
  const ag = tokens / seconds(window);
  into.aggregate.push(ag);
  log(`${name}: ${c.parallel}-stream decode ${n}: ${fmt(ag)} tok/s`);

  const prefix = p.prefix[i] as number[];
  await t.generate(prefix, 1);
  await settle();
  r = await t.generate([...prefix, ...(p.suffix[i] as number[])], 1);
  const ms = r.firstToken - r.start;
  into.ttft.push(ms);
  into.cached.push(r.cachedTokens);
  log(`${name}: cached-prefix TTFT ${n}: ${fmt(ms)} ms (${r.cachedTokens} of ${prefix.length + (p.suffix[i]?.length ?? 0)} cached)`);
  if (r.cachedTokens < prefix.length / 2) log(`${name}: warning: the prefix was not served from cache`);
}

function result(x: Collected): TargetResult {
  const out: TargetResult = {
    prefillTokensPerSecond: samples(x.prefill),
    decodeTokensPerSecond: samples(x.decode),
    aggregateDecodeTokensPerSecond: samples(x.aggregate),
    cachedTtftMs: samples(x.ttft),
    cachedTokens: x.cached,
  };
  if (x.promptPerSecond.length > 0) {
    out.serverTimings = { promptPerSecond: samples(x.promptPerSecond), predictedPerSecond: samples(x.predictedPerSecond) };
  }
  return out;
}

function llamaServerArgs(c: EngineBenchConfig, modelPath: string): string[] {
  const known = llamaServerFlags(c.llamaServer);
  for (const f of ["--kv-unified", "--flash-attn", "--parallel", "--cache-prompt"]) {
    // An older or foreign build: the comparison would not use the same settings.
    if (!known.has(f)) {
      throw new BenchUsageError(`${c.llamaServer} does not know ${f}: rebuild it with 'bun run build.ts native --with-llama-server'`);
    }
  }
  const t = String(c.threads);
  const args = ["-m", modelPath, "-t", t, "-tb", t, "-c", String(c.ctx), "-np", String(c.parallel)];
  args.push("-b", String(c.batch), "-ub", String(c.ubatch), "--kv-unified", "--flash-attn", c.flashAttn, "--cache-prompt");
  // Both sides move idle slots' KV to a host-RAM cache of the same size.
  if (known.has("--cache-ram")) args.push("--cache-ram", String(HOST_CACHE_DEFAULT_MIB));
  if (known.has("--cache-idle-slots")) args.push("--cache-idle-slots");
  if (known.has("--no-webui")) args.push("--no-webui");
  if (c.gpuLayers >= 0) args.push("-ngl", String(c.gpuLayers));
  return args;
}

const FLASH_ATTN = { auto: -1, off: 0, on: 1 } as const;

/** Resolve a --model value: a generated model's name (generated on first use) or a GGUF path. */
export async function resolveModel(model: string): Promise<string> {
  const spec = GENERATED_MODELS[model];
  if (spec) return ensureModel(spec);
  if (!existsSync(model)) throw new BenchUsageError(`model not found: ${model}`);
  return model;
}

/** Run the benchmark: mesh's engine and (unless compare is false) llama-server, both loaded, alternating repeat by repeat. */
export async function runEngineBench(opts: EngineBenchOptions = {}): Promise<EngineBenchReport> {
  const c = resolveEngineBenchOptions(opts);
  const log = opts.onProgress ?? ((s: string) => process.stderr.write(`[bench] ${s}\n`));
  // Fail before minutes of measuring, not after.
  if (c.compare && !existsSync(c.llamaServer)) {
    throw new BenchUsageError(
      `llama-server not found at ${c.llamaServer}: run 'bun run build.ts native --with-llama-server' (or pass --no-compare)`,
    );
  }
  if (GENERATED_MODELS[c.model]) log(`model '${c.model}': generated on first use, then cached (some seconds)`);
  const modelPath = await resolveModel(c.model);
  const serverArgs = c.compare ? llamaServerArgs(c, modelPath) : [];
  const cells = c.table ? tableCells(c.prefixes, c.suffixes) : [];
  // Before anything is loaded or served: the floor blocks this thread while it measures.
  const floor =
    c.table && c.floor
      ? measureFloor(
          {
            modelPath,
            ctx: c.ctx,
            parallel: c.parallel,
            batch: c.batch,
            ubatch: c.ubatch,
            threads: c.threads,
            flashAttn: FLASH_ATTN[c.flashAttn],
            plainAttn: c.plainAttn,
            attnKernel: c.attnKernel,
            repeats: c.repeats,
          },
          cells,
          log,
        )
      : null;

  log(`mesh: loading ${modelPath} (threads ${c.threads}, ctx ${c.ctx}, parallel ${c.parallel}, batch ${c.batch}/${c.ubatch})`);
  const engine = await Engine.load({
    modelPath,
    nCtx: c.ctx,
    nParallel: c.parallel,
    nBatch: c.batch,
    nUbatch: c.ubatch,
    threads: c.threads,
    threadsBatch: c.threads,
    flashAttn: FLASH_ATTN[c.flashAttn],
    plainAttn: c.plainAttn,
    attnKernel: c.attnKernel,
    hostCacheMiB: HOST_CACHE_DEFAULT_MIB,
    nGpuLayers: c.gpuLayers,
  });
  const info = engine.info;
  const a = describeAttention(info);
  log(`mesh: flash attention ${a.flash}, attention kernel ${a.kernel}, plain attention for ${a.plain_for_tokens} new tokens`);
  const meshSamples = collected();
  const llamaSamples = collected();
  const meshTable = emptySamples(cells);
  const llamaTable = emptySamples(cells);
  const meshHttp = emptySamples(cells);
  const llamaHttp = emptySamples(cells);
  let server: LlamaServer | null = null;
  try {
    const prompts = await buildPrompts(engine, c);
    const sides: Array<{ name: string; target: Target; into: Collected; table: Map<string, CellSamples> }> = [
      { name: "mesh", target: meshTarget(engine), into: meshSamples, table: meshTable },
    ];
    if (c.compare) {
      // Both stay loaded for the whole run; only one of them works at any moment.
      log(`llama-server: starting ${c.llamaServer}`);
      server = await LlamaServer.start({ binary: c.llamaServer, args: serverArgs });
      log(`llama-server: ready at ${server.url} (pid ${server.pid})`);
      sides.push({ name: "llama-server", target: llamaTarget(server.url), into: llamaSamples, table: llamaTable });
    }
    for (const s of sides) await warmUp(s.name, s.target, prompts, c, log);
    const variants = tableVariants(c);
    // Alternate the targets repeat by repeat, so drift of the machine lands on both.
    for (let i = 0; i < c.repeats; i++) {
      for (const s of sides) {
        if (c.figures) await measureRepeat(s.name, s.target, prompts, c, i, s.into, log);
        if (c.table) {
          const t = tableTarget(s.name, s.target);
          await measureTableRepeat(t, cells, prompts.table[i] as TableRepeatPrompts, s.table, variants, settle, log);
        }
      }
    }
    if (c.http && server) await measureHttpTable(c, modelPath, server, cells, prompts.tableHttp, meshHttp, llamaHttp, log);
    // Where mesh's copies went over the whole run: the phase table shows each turn's, this the rest.
    const st = await engine.stats();
    log(
      `mesh: host tier: ${st.hostSaves} saves, ${st.hostRestores} restores at admission, ${st.hostIdleRestores} idle restores (${st.hostIdleRestoredTokens} tokens), ${st.compactions} compactions`,
    );
  } catch (e) {
    // The log goes away with the server: keep its end for the error report.
    throw server ? new Error(`${(e as Error).message}\nllama-server log (last lines):\n${server.logTail()}`) : e;
  } finally {
    await server?.stop();
    await engine.close();
  }
  const mesh = result(meshSamples);
  const llama = c.compare ? result(llamaSamples) : null;
  const tables: CachedPrefixTable[] = [];
  if (c.table) {
    tables.push({ layer: "engine", cells: tableFigures(cells, meshTable, c.compare ? llamaTable : null, floor) });
    if (c.http && c.compare) tables.push({ layer: "http", cells: tableFigures(cells, meshHttp, llamaHttp, floor) });
  }

  const figure = (key: FigureKey, label: string, unit: "tok/s" | "ms", pick: (r: TargetResult) => Samples): BenchFigure => {
    const higherIsBetter = unit === "tok/s";
    const m = pick(mesh).median;
    const l = llama ? pick(llama).median : null;
    const ratio = l === null ? null : higherIsBetter ? m / l : l / m;
    const paired = llama ? pairedRatio(pick(mesh).samples, pick(llama).samples, higherIsBetter) : null;
    return { key, label, unit, higherIsBetter, mesh: m, llamaServer: l, ratio, pairedRatio: paired };
  };
  return {
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model.trim() ?? "unknown", cores: availableParallelism(), platform: process.platform, arch: process.arch },
    model: { path: modelPath, name: info.name, nParams: info.nParams, sizeBytes: info.sizeBytes },
    config: c,
    figures: !c.figures
      ? []
      : [
          figure("prefill", `prefill, ${c.promptTokens}-token prompt`, "tok/s", (r) => r.prefillTokensPerSecond),
          figure("decode", `decode, 1 stream, ${c.genTokens} tokens`, "tok/s", (r) => r.decodeTokensPerSecond),
          figure("aggregateDecode", `decode, ${c.parallel} streams, aggregate`, "tok/s", (r) => r.aggregateDecodeTokensPerSecond),
          figure("cachedTtft", `TTFT, ${c.prefixTokens}-token cached prefix + ${c.suffixTokens}`, "ms", (r) => r.cachedTtftMs),
        ],
    mesh,
    llamaServer: llama,
    tables,
  };
}

/** The table's variants beside clean, as configured. */
function tableVariants(c: EngineBenchConfig): TableVariants {
  return { dirty: c.dirty ? { genTokens: DIRTY_GEN_TOKENS } : null, busy: c.busy ? { genTokens: BUSY_GEN_TOKENS } : null };
}

// The engine-level targets seen as table targets (prompts as token ids).
function tableTarget(name: string, t: Target): TableTarget {
  return {
    name,
    async turn(p, maxTokens, onFirst) {
      const r = await t.generate(p.ids, maxTokens, onFirst);
      const out: TurnResult = { ttftMs: r.firstToken - r.start, cachedTokens: r.cachedTokens };
      if (r.phases) out.phases = r.phases;
      return out;
    },
  };
}

// The table through HTTP: a `mesh serve` process beside the running llama-server, the same
// /v1/completions request from the same client, alternating repeat by repeat.
async function measureHttpTable(
  c: EngineBenchConfig,
  modelPath: string,
  llama: LlamaServer,
  cells: ReturnType<typeof tableCells>,
  prompts: TableRepeatPrompts[],
  meshInto: Map<string, CellSamples>,
  llamaInto: Map<string, CellSamples>,
  log: (s: string) => void,
): Promise<void> {
  const [binary, ...pre] = meshCommand();
  const state = mkdtempSync(join(tmpdir(), "mesh-bench-state-"));
  const args = [...pre, "serve", "--model", modelPath, "--ctx-size", String(c.ctx), "--parallel", String(c.parallel)];
  args.push("--threads", String(c.threads), "--shutdown-grace", "1", "--state-dir", state);
  args.push("--attn-kernel", c.attnKernel);
  if (c.plainAttn !== undefined) args.push("--plain-attn", c.plainAttn ? `${c.plainAttn.min}:${c.plainAttn.max}` : "off");
  log(`mesh serve: starting (${args.slice(pre.length).join(" ")})`);
  let node: LlamaServer | null = null;
  try {
    node = await LlamaServer.start({ name: "mesh serve", binary: binary as string, args, startupTimeoutMs: 600_000 });
    const model = await servedModel(node.url);
    const sides = [
      { t: httpTarget("mesh serve", node.url, model), into: meshInto },
      { t: httpTarget("llama-server (http)", llama.url, model), into: llamaInto },
    ];
    const variants = tableVariants(c);
    const warm = prompts[0]?.streams[0];
    if (warm) for (const s of sides) await s.t.turn(warm, 4);
    for (let i = 0; i < c.repeats; i++) {
      for (const s of sides) await measureTableRepeat(s.t, cells, prompts[i] as TableRepeatPrompts, s.into, variants, settle, log);
    }
  } catch (e) {
    throw node ? new Error(`${(e as Error).message}\nmesh serve log (last lines):\n${node.logTail()}`) : e;
  } finally {
    await node?.stop();
    rmSync(state, { recursive: true, force: true });
  }
}

/** The first model id a server lists at /v1/models. */
async function servedModel(url: string): Promise<string> {
  const res = await fetch(`${url}/v1/models`, { signal: AbortSignal.timeout(30_000) });
  const id = ((await res.json()) as { data?: Array<{ id?: unknown }> }).data?.[0]?.id;
  if (typeof id !== "string") throw new Error(`${url}/v1/models lists no model`);
  return id;
}

/** The report as a Markdown table (figure | mesh | llama-server | ratio, >1 = mesh better). */
export function formatEngineBenchTable(r: EngineBenchReport): string {
  const rows = [
    "| figure | mesh | llama-server | mesh vs llama-server | paired ratio |",
    "| --- | ---: | ---: | ---: | ---: |",
    ...r.figures.map(
      (f) =>
        `| ${f.label} (${f.unit}) | ${fmt(f.mesh)} | ${f.llamaServer === null ? "-" : fmt(f.llamaServer)} | ${
          f.ratio === null ? "-" : `${f.ratio.toFixed(2)}x`
        } | ${f.pairedRatio === null ? "-" : `${f.pairedRatio.toFixed(2)}x`} |`,
    ),
  ];
  const c = r.config;
  const tables = r.tables.flatMap((t) =>
    ["", formatCachedPrefixTable(t), formatBusyTable(t), formatPhaseBreakdown(t)].filter((x) => x !== ""),
  );
  return [
    ...(r.figures.length > 0 ? rows : []),
    ...tables,
    "",
    "ratio > 1 means mesh is better (tok/s: mesh / llama-server; ms: llama-server / mesh): of the medians, and the median of " +
      `the per-repeat ratios (paired); ${c.repeats} run(s) each, alternating targets; threads ${c.threads}, ctx ${c.ctx}, parallel ${c.parallel}, batch ${c.batch}/${c.ubatch}, flash-attn ${c.flashAttn}, mesh attn-kernel ${c.attnKernel}, mesh plain-attn ${c.plainAttn === undefined ? "default" : c.plainAttn ? `${c.plainAttn.min}:${c.plainAttn.max}` : "off"}` +
      (r.tables.length > 0
        ? `; table: TTFT in ms, clean = right after the prefix, dirty = after ${Math.max(1, c.parallel - 1)} other stream(s) of ${DECODE_PROMPT_TOKENS}+${DIRTY_GEN_TOKENS} tokens${c.busy ? `, busy = while as many of ${DECODE_PROMPT_TOKENS}+${BUSY_GEN_TOKENS} tokens decode (each past its first token)` : ""}, floor = suffix decode + greedy sample through the shim alone`
        : ""),
    "",
  ].join("\n");
}

const USAGE = `usage: bun run src/bench/engine.ts [options]

Compares mesh's engine with llama-server (same llama.cpp, model, threads, context, slots, batch).

  --model PATH|NAME    GGUF file, or a generated model: bench (default), tiny
  --threads N          CPU threads on both sides (default: all cores)
  --ctx N              total KV cells, unified (default 8192)
  --parallel N         slots, and streams of the aggregate figure (default 4)
  --batch N            logical batch, -b (default 2048)
  --ubatch N           physical batch, -ub (default 512)
  --flash-attn MODE    on, off or auto (default auto)
  --attn-kernel K      mesh only: mesh (default) or ggml, the CPU flash-attention kernel
  --plain-attn MIN:MAX mesh only: decodes of MIN..MAX tokens use matrix-product attention (default off with
                       the mesh kernel, ${DEFAULT_PLAIN_ATTN.min}:${DEFAULT_PLAIN_ATTN.max} with ggml's; off)
  --prompt-tokens N    prompt of the prefill figure (default 1024)
  --prefix-tokens N    cached prefix of the TTFT figure (default 2048)
  --suffix-tokens N    new tokens after the cached prefix (default 16)
  --gen-tokens N       generated tokens of the decode figures (default 128)
  --repeats N          runs per figure, the median is reported (default 3)
  --no-compare         measure mesh only (no llama-server)
  --n-gpu-layers N     layers on the GPU for both (llama-server -ngl); default: each one's own (all that fit)
  --llama-server PATH  llama-server executable (default vendor/llama.cpp/build/cpu/bin/llama-server)
  --json               print the report as JSON instead of a table

Cached-prefix table (an agent's turn: long prefix in KV + new suffix; time to first token):
  --table              also measure the table (ctx grows to fit it unless --ctx is given)
  --prefixes LIST      prefix sizes, comma-separated (default 2048,8192,16384)
  --suffixes LIST      suffix sizes, comma-separated (default 16,256,1024)
  --no-dirty           skip the dirty variant (other streams decode between prefix and turn)
  --busy               also the busy variant (the turn arrives while other streams decode)
  --no-floor           skip the floor (suffix decode over the prefix through the shim alone)
  --http               the table again through HTTP: mesh serve vs llama-server, /v1/completions
  --table-only         skip the prefill, decode and single cached-TTFT figures

  e.g. --table --table-only --repeats 7                     (all 9 cells, engine level)
       --table --table-only --prefixes 2048 --suffixes 16   (one cell, about a minute)
`;

/** Parse command-line arguments into options; throws BenchUsageError on a bad flag or value. */
export function parseEngineBenchArgs(argv: string[]): { options: EngineBenchOptions; json: boolean; help: boolean } {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        model: { type: "string" },
        threads: { type: "string" },
        ctx: { type: "string" },
        parallel: { type: "string" },
        batch: { type: "string" },
        ubatch: { type: "string" },
        "flash-attn": { type: "string" },
        "plain-attn": { type: "string" },
        "attn-kernel": { type: "string" },
        "prompt-tokens": { type: "string" },
        "prefix-tokens": { type: "string" },
        "suffix-tokens": { type: "string" },
        "gen-tokens": { type: "string" },
        repeats: { type: "string" },
        "no-compare": { type: "boolean" },
        "n-gpu-layers": { type: "string" },
        "llama-server": { type: "string" },
        json: { type: "boolean" },
        table: { type: "boolean" },
        prefixes: { type: "string" },
        suffixes: { type: "string" },
        "no-dirty": { type: "boolean" },
        busy: { type: "boolean" },
        "no-floor": { type: "boolean" },
        http: { type: "boolean" },
        "table-only": { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    // parseArgs messages can span lines; the CLI promises one.
    throw new BenchUsageError(((e as Error).message.split("\n")[0] ?? "bad arguments").trim());
  }
  const int = (name: string): number | undefined => {
    const v = values[name];
    if (v === undefined) return undefined;
    if (typeof v !== "string" || !/^\d+$/.test(v)) throw new BenchUsageError(`--${name} takes a whole number (got '${String(v)}')`);
    return Number(v);
  };
  const list = (name: string): number[] | undefined => {
    const v = values[name];
    if (v === undefined) return undefined;
    if (typeof v !== "string" || !/^\d+(,\d+)*$/.test(v)) {
      throw new BenchUsageError(`--${name} takes comma-separated whole numbers, e.g. 2048,8192 (got '${String(v)}')`);
    }
    return v.split(",").map(Number);
  };
  const fa = values["flash-attn"];
  if (fa !== undefined && fa !== "on" && fa !== "off" && fa !== "auto") {
    throw new BenchUsageError(`--flash-attn takes on, off or auto (got '${String(fa)}')`);
  }
  const pa = values["plain-attn"];
  const plainAttn = typeof pa === "string" ? parsePlainAttn(pa) : undefined;
  if (typeof plainAttn === "string") throw new BenchUsageError(`--plain-attn: ${plainAttn}`);
  const ak = values["attn-kernel"];
  const attnKernel = typeof ak === "string" ? parseAttnKernel(ak) : undefined;
  if (typeof attnKernel === "object") throw new BenchUsageError(`--attn-kernel: ${attnKernel.error}`);
  const options: EngineBenchOptions = {
    model: values.model as string | undefined,
    plainAttn,
    attnKernel,
    threads: int("threads"),
    ctx: int("ctx"),
    parallel: int("parallel"),
    batch: int("batch"),
    ubatch: int("ubatch"),
    flashAttn: fa,
    promptTokens: int("prompt-tokens"),
    prefixTokens: int("prefix-tokens"),
    suffixTokens: int("suffix-tokens"),
    genTokens: int("gen-tokens"),
    repeats: int("repeats"),
    compare: values["no-compare"] !== true,
    gpuLayers: int("n-gpu-layers"),
    llamaServer: values["llama-server"] as string | undefined,
    table: values.table === true ? true : undefined,
    prefixes: list("prefixes"),
    suffixes: list("suffixes"),
    dirty: values["no-dirty"] === true ? false : undefined,
    busy: values.busy === true ? true : undefined,
    floor: values["no-floor"] === true ? false : undefined,
    http: values.http === true ? true : undefined,
    figures: values["table-only"] === true ? false : undefined,
  };
  // Drop unset fields so defaults apply.
  for (const k of Object.keys(options) as Array<keyof EngineBenchOptions>) if (options[k] === undefined) delete options[k];
  resolveEngineBenchOptions(options);
  return { options, json: values.json === true, help: values.help === true };
}

/** CLI entry: run the benchmark, print a table (or JSON) on stdout; returns the exit code (2 = usage). */
export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  try {
    const { options, json, help } = parseEngineBenchArgs(argv);
    if (help) {
      process.stdout.write(USAGE);
      return 0;
    }
    const report = await runEngineBench(options);
    process.stdout.write(json ? `${JSON.stringify(report, null, 2)}\n` : formatEngineBenchTable(report));
    return 0;
  } catch (e) {
    const usage = e instanceof BenchUsageError;
    process.stderr.write(`bench: ${(e as Error).message}\n`);
    return usage ? 2 : 1;
  }
}

// exitCode rather than exit(): a large JSON report on a pipe must be flushed first.
if (import.meta.main) process.exitCode = await main();
