// Paired A/B of llama.cpp context settings on the cached-prefix path, through
// the shim alone: one context per setting, each holding the same prefix, and
// repeat by repeat the same suffix decoded (plus one greedy sampling) on each
// in turn, the order rotating, so load on a shared machine falls on all of
// them alike. It answers "does this knob make the agent turn faster?" before
// the knob is worth wiring through the engine, and whether it changes the
// greedy token. Blocks the calling thread: a bench process of its own.
//
//   bun run src/bench/knobs.ts --vary ubatch=512,1024 [--prefixes 2048] [--suffixes 16,256,1024]
//   bun run src/bench/knobs.ts --vary flash=1,0 --prefixes 2048,8192,16384 --repeats 7
//   bun run src/bench/knobs.ts --vary kernel=0,2 --prefixes 2048,8192 --suffixes 1,4,16,256,1024
import type { Pointer } from "bun:ffi";
import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import { DEFAULT_PLAIN_ATTN, FLASH_TILE_QUERIES, parseAttnKernel } from "../engine/attention";
import { findNativeLib } from "../engine/library";
import { closeModel, type OpenedModel, openModel } from "../engine/open";
import type { LoadOptions } from "../engine/protocol";
import { type Cell, cellKey } from "./cached-prefix";
import { resolveModel } from "./engine";
import { chunkedDecoder, type FloorOptions, filler } from "./floor";
import { median, pairedRatio } from "./stats";

/** The settings one variant may change. */
export type KnobKey = "ubatch" | "flash" | "threads" | "plain" | "kernel";

/** Base settings (the floor's) plus the one knob varied. */
export interface KnobsOptions extends FloorOptions {
  /** Pause between two measured decodes, so one context's polling threads have gone idle before the next. */
  pauseMs: number;
  vary: KnobKey;
  values: number[];
}

/** One variant's samples in one cell, with the greedy token each repeat picked. */
export interface KnobSamples {
  ms: number[];
  tokens: number[];
}

/** Per cell key, per variant value: samples. */
export type KnobsResult = Map<string, Map<number, KnobSamples>>;

/** The load options of one variant: the base with the varied knob set. */
export function variantLoad(o: KnobsOptions, value: number): LoadOptions {
  const threads = o.vary === "threads" ? value : o.threads;
  return {
    modelPath: o.modelPath,
    nCtx: o.ctx,
    nBatch: o.batch,
    nUbatch: o.vary === "ubatch" ? value : o.ubatch,
    nParallel: o.parallel,
    threads,
    threadsBatch: threads,
    nGpuLayers: 0,
    flashAttn: (o.vary === "flash" ? value : o.flashAttn) as -1 | 0 | 1,
    // plain=MAX: decodes of DEFAULT min..MAX tokens take the plain path; 0 (and every other knob): flash for all.
    plainAttn: o.vary === "plain" && value > 0 ? { min: DEFAULT_PLAIN_ATTN.min, max: value } : null,
    // kernel=N: mesh's kernel for ubatches of N+ queries, switched per decode (setWindow); 0: ggml's.
    attnKernel: o.vary === "kernel" ? "mesh" : o.attnKernel,
    useMmap: true,
    backendLibs: [],
    modelShape: null,
    queueCapacity: 1,
    queueTimeoutMs: 1000,
    kvBudget: true,
    hostCacheMiB: 0,
  };
}

interface Opened {
  value: number;
  m: OpenedModel;
  control: Int32Array;
  sampler: Pointer;
}

/** Measure every cell on every variant, interleaved; every context is freed before it returns. */
export function measureKnobs(o: KnobsOptions, cells: readonly Cell[], log: (s: string) => void): KnobsResult {
  const lib = findNativeLib();
  if (!lib) throw new Error("the native library is not built: run 'bun run build.ts native'");
  const opened: Opened[] = [];
  const picked = new Int32Array(1);
  const decodeIds = chunkedDecoder(o.batch);
  const decode = (v: Opened, ids: number[], at: number): number => decodeIds(v.m, ids, at, `knobs: ${o.vary}=${v.value}`);
  const out: KnobsResult = new Map();
  // The plain-attention window and the attention kernel are switched per decode on one context:
  // the variants then decode over the very same cells, and no second thread pool competes.
  const shared = o.vary === "plain" || o.vary === "kernel";
  // Within the window the context applied (capped by its memory bound, as the engine's).
  const setWindow = (v: Opened) => {
    if (o.vary === "kernel" && v.m.native.mesh_set_attn_kernel(v.m.ctx, v.value, 1) !== v.value)
      throw new Error(`knobs: mesh's attention kernel does not run this model (or is not built): kernel=${v.value} would measure ggml's`);
    if (o.vary !== "plain") return;
    const max = Math.min(v.value, v.m.info.plainAttn?.max ?? 0);
    v.m.native.mesh_set_plain_attn(v.m.ctx, max > 0 ? DEFAULT_PLAIN_ATTN.min : 0, max);
  };
  try {
    for (const value of shared ? [Math.max(...o.values)] : o.values) {
      // The shim keeps a pointer to the abort flag for the context's life: it lives in `opened`.
      const control = new Int32Array(2);
      const m = openModel(lib, variantLoad(o, value), new Float32Array(1), control, 0);
      if (!("ctx" in m)) throw new Error(`knobs: ${o.vary}=${value}: ${m.message}`);
      const sampler = m.native.mesh_sampler_new(
        m.model,
        new Float32Array([0, 1, 0, 1, 0, 0]),
        new Int32Array([40, 0, 0]),
        null,
      ) as Pointer | null;
      if (!sampler) {
        closeModel(m);
        throw new Error("knobs: could not build a sampler");
      }
      opened.push({ value, m, control, sampler });
    }
    if (shared) {
      const one = opened[0] as Opened;
      opened.splice(0, 1, ...o.values.map((value) => ({ ...one, value })));
    }
    for (const size of [...new Set(cells.map((c) => c.prefix))]) {
      for (const v of shared ? opened.slice(0, 1) : opened) {
        v.m.native.mesh_memory_clear(v.m.ctx, 1);
        decode(v, filler(1, size), 0);
      }
      for (const c of cells.filter((x) => x.prefix === size)) {
        const byValue = new Map<number, KnobSamples>(opened.map((v) => [v.value, { ms: [], tokens: [] }]));
        for (let r = 0; r < o.repeats; r++) {
          const suffix = filler(100 + r, c.suffix);
          for (let k = 0; k < opened.length; k++) {
            const v = opened[(r + k) % opened.length] as Opened;
            setWindow(v);
            Bun.sleepSync(o.pauseMs);
            const t0 = performance.now();
            const idx = decode(v, suffix, size);
            const n = v.m.native;
            n.mesh_sample_many(
              v.m.ctx,
              new BigUint64Array([BigInt(v.sampler as unknown as number)]),
              new Int32Array([idx]),
              new Int32Array([-1]),
              picked,
              new Int32Array(1),
              new Float32Array(1),
              1,
            );
            const ms = performance.now() - t0;
            n.mesh_seq_rm(v.m.ctx, 0, size, -1);
            const s = byValue.get(v.value) as KnobSamples;
            s.ms.push(ms);
            s.tokens.push(picked[0] as number);
          }
        }
        out.set(cellKey(c), byValue);
        log(`knobs: ${cellKey(c)}: ${[...byValue].map(([value, s]) => `${o.vary}=${value} ${median(s.ms).toFixed(1)} ms`).join(", ")}`);
      }
    }
  } finally {
    for (const v of shared ? opened.slice(0, 1) : opened) {
      v.m.native.mesh_sampler_free(v.sampler);
      closeModel(v.m);
      v.control.fill(0);
    }
  }
  return out;
}

/** The result as a markdown table: medians per variant, paired ratio of each against the first (> 1 = faster than the first), same greedy tokens or not. */
export function knobsTable(o: KnobsOptions, r: KnobsResult): string {
  const [base, ...rest] = o.values;
  const head = [
    "prefix + suffix",
    ...o.values.map((v) => `${o.vary}=${v} (ms)`),
    ...rest.map((v) => `${o.vary}=${v} vs ${base} (paired)`),
    "same greedy tokens",
  ];
  const lines = [
    `| ${head.join(" | ")} |`,
    `| --- | ${head
      .slice(1)
      .map(() => "---:")
      .join(" | ")} |`,
  ];
  for (const [key, byValue] of r) {
    const b = byValue.get(base as number) as KnobSamples;
    const meds = o.values.map((v) => median((byValue.get(v) as KnobSamples).ms).toFixed(1));
    const ratios = rest.map((v) => {
      const s = byValue.get(v) as KnobSamples;
      const med = median(b.ms) / median(s.ms);
      const paired = pairedRatio(s.ms, b.ms, false);
      return `${med.toFixed(2)}x (${paired === null ? "-" : paired.toFixed(2)}x)`;
    });
    const same = o.values.every((v) => (byValue.get(v) as KnobSamples).tokens.every((t, i) => t === b.tokens[i]));
    lines.push(`| ${key.replace("+", " + ")} | ${[...meds, ...ratios, same ? "yes" : "no"].join(" | ")} |`);
  }
  return lines.join("\n");
}

const HELP = `Paired A/B of one llama.cpp context setting on the cached-prefix path (shim only).

  bun run src/bench/knobs.ts --vary KEY=V1,V2[,...] [options]

  --vary KEY=VALUES    ubatch=512,1024 | flash=1,0 (1 on, 0 off, -1 auto) | threads=1,2
                       | plain=0,63 (decodes of ${DEFAULT_PLAIN_ATTN.min}..N tokens with matrix-product attention; 0: flash for all)
                       | kernel=0,2 (mesh's flash-attention kernel for ubatches of N+ queries; 0: ggml's)
  --prefixes LIST      cached prefix sizes (default 2048)
  --suffixes LIST      new tokens per turn (default 16,256,1024)
  --repeats N          samples per cell and variant (default 7)
  --threads N          threads (default: all cores)
  --ubatch N           base ubatch (default 512); --batch N (default 2048)
  --flash-attn MODE    base: on, off, auto (default auto)
  --attn-kernel K      base: mesh (default) or ggml, the CPU flash-attention kernel
  --model PATH|bench   GGUF or generated model (default bench)
  --pause-ms N         idle time before each measured decode (default 100)
  --json               the samples as JSON instead of the table`;

class UsageError extends Error {}

function list(name: string, s: string): number[] {
  const xs = s.split(",").map((x) => Number(x.trim()));
  if (xs.length === 0 || xs.some((x) => !Number.isInteger(x)))
    throw new UsageError(`--${name} must be a comma-separated list of integers, got '${s}'`);
  return xs;
}

function positive(name: string, s: string | undefined, dflt: number): number {
  if (s === undefined) return dflt;
  const n = Number(s);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`--${name} must be a positive integer, got '${s}'`);
  return n;
}

/** Parse the command line; throws UsageError with a one-line reason. */
export function parseKnobsArgs(argv: string[]): { o: Omit<KnobsOptions, "modelPath">; model: string; cells: Cell[]; json: boolean } {
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      options: {
        vary: { type: "string" },
        prefixes: { type: "string" },
        suffixes: { type: "string" },
        repeats: { type: "string" },
        threads: { type: "string" },
        ubatch: { type: "string" },
        batch: { type: "string" },
        "flash-attn": { type: "string" },
        "attn-kernel": { type: "string" },
        model: { type: "string" },
        "pause-ms": { type: "string" },
        json: { type: "boolean" },
        help: { type: "boolean" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values as Record<string, string | boolean | undefined>;
  if (v.help) throw new UsageError(HELP);
  const vary = typeof v.vary === "string" ? v.vary : "";
  const m = /^(ubatch|flash|threads|plain|kernel)=(.+)$/.exec(vary);
  if (!m) throw new UsageError("--vary KEY=V1,V2 is required (KEY: ubatch, flash, threads, plain, kernel)");
  const key = m[1] as KnobKey;
  const values = list("vary", m[2] as string);
  if (values.length < 2) throw new UsageError("--vary needs at least two values to compare");
  // plain=N opens the window DEFAULT min..N: N below min would be an empty window (flash for all,
  // silently labelled as plain), N from 64 past the tiled kernel (clamped, labelled as N).
  const badPlain = values.find((x) => x !== 0 && (x < DEFAULT_PLAIN_ATTN.min || x >= FLASH_TILE_QUERIES));
  if (key === "plain" && badPlain !== undefined)
    throw new UsageError(
      `--vary plain takes 0 (flash for all) or a window top from ${DEFAULT_PLAIN_ATTN.min} to ${FLASH_TILE_QUERIES - 1}, got ${badPlain}`,
    );
  if (key === "kernel" && values.some((x) => x < 0))
    throw new UsageError("--vary kernel takes 0 (ggml's kernel) or the smallest ubatch mesh's kernel takes");
  const ak = parseAttnKernel((v["attn-kernel"] as string | undefined) ?? "mesh");
  if (typeof ak === "object") throw new UsageError(`--attn-kernel: ${ak.error}`);
  const prefixes = list("prefixes", (v.prefixes as string | undefined) ?? "2048");
  const suffixes = list("suffixes", (v.suffixes as string | undefined) ?? "16,256,1024");
  const fa = (v["flash-attn"] as string | undefined) ?? "auto";
  const flashAttn = ({ on: 1, off: 0, auto: -1 } as Record<string, -1 | 0 | 1>)[fa];
  if (flashAttn === undefined) throw new UsageError(`--flash-attn must be on, off or auto, got '${fa}'`);
  const batch = positive("batch", v.batch as string | undefined, 2048);
  const longest = Math.max(...prefixes) + Math.max(...suffixes);
  const cells = prefixes.flatMap((prefix) => suffixes.map((suffix) => ({ prefix, suffix })));
  return {
    o: {
      // Room for the longest cell, padded like llama.cpp pads a context (256).
      ctx: Math.ceil((longest + 256) / 256) * 256,
      parallel: 1,
      batch,
      ubatch: positive("ubatch", v.ubatch as string | undefined, 512),
      threads: positive("threads", v.threads as string | undefined, availableParallelism()),
      flashAttn,
      plainAttn: null,
      attnKernel: ak,
      repeats: positive("repeats", v.repeats as string | undefined, 7),
      pauseMs: positive("pause-ms", v["pause-ms"] as string | undefined, 100),
      vary: key,
      values,
    },
    model: (v.model as string | undefined) ?? "bench",
    cells,
    json: v.json === true,
  };
}

async function main(): Promise<number> {
  let args: ReturnType<typeof parseKnobsArgs>;
  try {
    args = parseKnobsArgs(process.argv.slice(2));
  } catch (e) {
    const help = (e as Error).message === HELP;
    (help ? process.stdout : process.stderr).write(`${help ? "" : "knobs: "}${(e as Error).message}\n`);
    return help ? 0 : 2;
  }
  try {
    const o: KnobsOptions = { ...args.o, modelPath: await resolveModel(args.model) };
    const r = measureKnobs(o, args.cells, (s) => process.stderr.write(`${s}\n`));
    if (args.json) {
      const cells = Object.fromEntries([...r].map(([k, byValue]) => [k, Object.fromEntries(byValue)]));
      process.stdout.write(`${JSON.stringify({ options: o, cells }, null, 2)}\n`);
    } else {
      process.stdout.write(`${knobsTable(o, r)}\n`);
    }
    return 0;
  } catch (e) {
    process.stderr.write(`knobs: ${(e as Error).message}\n`);
    return 1;
  }
}

if (import.meta.main) process.exitCode = await main();
