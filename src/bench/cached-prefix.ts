// The cached-prefix table of the engine bench: an agent's turn is a long
// prefix already in the KV cache plus a short new suffix (a tool result), and
// its time to first token is what the user waits for. Each cell (prefix x
// suffix) is measured clean (right after the prefix was computed) and dirty
// (after other streams decoded in the pool in between), and, when asked, busy
// (while other streams are still decoding), on every target.
import type { TtftPhases } from "../engine/protocol";
import { sseLines } from "./sse";
import { median, pairedRatio } from "./stats";

/** One prompt of the table, as token ids (engine-level targets) and as text (HTTP targets). */
export interface TablePrompt {
  ids: number[];
  text: string;
}

/** What one request told: its time to first token and the prompt tokens served from cache. */
export interface TurnResult {
  ttftMs: number;
  cachedTokens: number;
  /** Where the time went inside mesh's engine Worker (mesh's engine-level target only). */
  phases?: TtftPhases;
}

/** A server the table measures: generates greedily from a prompt; `onFirst` runs when its first token arrives. */
export interface TableTarget {
  name: string;
  turn(p: TablePrompt, maxTokens: number, onFirst?: () => void): Promise<TurnResult>;
}

/** One cell: prefix tokens already cached, suffix tokens new. */
export interface Cell {
  prefix: number;
  suffix: number;
}

/** Prompts of one repeat of the table on one target (each repeat has its own, so nothing is reused across repeats). */
export interface TableRepeatPrompts {
  /** By prefix size. */
  prefix: Map<number, TablePrompt>;
  /** By `${prefix}+${suffix}`: the suffix of the clean and of the dirty request. */
  clean: Map<string, TablePrompt>;
  dirty: Map<string, TablePrompt>;
  busy: Map<string, TablePrompt>;
  /** The other streams that dirty the pool before each dirty request (and decode during each busy one). */
  streams: TablePrompt[];
}

/** How the dirty variant dirties the pool (streams decoded between the prefix and the request), and the busy variant's streams. */
export interface DirtyWork {
  /** Generated tokens per stream. */
  genTokens: number;
}

/** The variants measured: dirty and busy each when given. */
export interface TableVariants {
  dirty: DirtyWork | null;
  /** Streams still decoding when the request arrives: each has its first token, and generates this many in all. */
  busy: DirtyWork | null;
}

type Variant = "clean" | "dirty" | "busy";

/** Samples of one cell on one target. */
export interface CellSamples {
  clean: number[];
  dirty: number[];
  busy: number[];
  cleanCached: number[];
  dirtyCached: number[];
  busyCached: number[];
  cleanPhases: TtftPhases[];
  dirtyPhases: TtftPhases[];
  busyPhases: TtftPhases[];
}

/** The figures of one cell: medians, paired ratios against llama-server (> 1 = mesh faster), dirty / clean. */
export interface CellFigures extends Cell {
  /** One decode of the suffix over the prefix through the shim alone (ms, median), when measured. */
  floorMs: number | null;
  mesh: { clean: number; dirty: number | null; busy: number | null; samples: CellSamples };
  llamaServer: { clean: number; dirty: number | null; busy: number | null; samples: CellSamples } | null;
  ratioClean: number | null;
  pairedClean: number | null;
  ratioDirty: number | null;
  pairedDirty: number | null;
  ratioBusy: number | null;
  pairedBusy: number | null;
  /** mesh dirty median / mesh clean median (1 = history does not matter). */
  meshDirtyOverClean: number | null;
  /** mesh busy median / mesh clean median. */
  meshBusyOverClean: number | null;
  /** mesh clean median / floor. */
  meshOverFloor: number | null;
}

/** A table over one layer (engine: in-process engine vs llama-server's /completion; http: `mesh serve` vs llama-server, /v1/completions). */
export interface CachedPrefixTable {
  layer: "engine" | "http";
  cells: CellFigures[];
}

/** `${prefix}+${suffix}` */
export const cellKey = (c: Cell): string => `${c.prefix}+${c.suffix}`;

/** Every cell of prefixes x suffixes, in table order. */
export function tableCells(prefixes: readonly number[], suffixes: readonly number[]): Cell[] {
  return prefixes.flatMap((prefix) => suffixes.map((suffix) => ({ prefix, suffix })));
}

/** Empty samples for every cell. */
export function emptySamples(cells: readonly Cell[]): Map<string, CellSamples> {
  return new Map(
    cells.map((c) => [
      cellKey(c),
      {
        clean: [],
        dirty: [],
        busy: [],
        cleanCached: [],
        dirtyCached: [],
        busyCached: [],
        cleanPhases: [],
        dirtyPhases: [],
        busyPhases: [],
      },
    ]),
  );
}

const join = (a: TablePrompt, b: TablePrompt): TablePrompt => ({ ids: [...a.ids, ...b.ids], text: a.text + b.text });

/**
 * One repeat of the table on one target: per prefix, compute it (one generated token), then per
 * suffix a clean request (nothing ran since the prefix), then, when asked, per suffix: the dirty
 * streams, then the request; then, when asked, per suffix: the busy streams started, the request
 * once each has its first token, then the streams' end. `settle` runs before every clean and dirty
 * request (a busy one arrives while the others decode: nothing settles).
 */
export async function measureTableRepeat(
  t: TableTarget,
  cells: readonly Cell[],
  p: TableRepeatPrompts,
  into: Map<string, CellSamples>,
  variants: TableVariants,
  settle: () => Promise<void>,
  log: (s: string) => void,
): Promise<void> {
  const prefixes = [...new Set(cells.map((c) => c.prefix))];
  const { dirty, busy } = variants;
  const measured: Variant[] = ["clean", ...(dirty ? (["dirty"] as const) : []), ...(busy ? (["busy"] as const) : [])];
  for (const size of prefixes) {
    const prefix = p.prefix.get(size) as TablePrompt;
    await t.turn(prefix, 1);
    const mine = cells.filter((c) => c.prefix === size);
    for (const variant of measured) {
      for (const c of mine) {
        const key = cellKey(c);
        if (variant === "dirty" && dirty) await Promise.all(p.streams.map((s) => t.turn(s, dirty.genTokens)));
        let others: Promise<unknown> = Promise.resolve();
        if (variant === "busy" && busy) {
          const started = p.streams.map(() => Promise.withResolvers<void>());
          const runs = p.streams.map((s, i) => t.turn(s, busy.genTokens, () => started[i]?.resolve()));
          // A stream that ends or fails before a first token it reports must not leave the wait hanging.
          for (const [i, r] of runs.entries()) {
            const ended = () => started[i]?.resolve();
            r.then(ended, ended);
          }
          others = Promise.all(runs);
          await Promise.all(started.map((s) => s.promise));
        } else await settle();
        const r = await t.turn(join(prefix, p[variant].get(key) as TablePrompt), 1);
        await others;
        const s = into.get(key) as CellSamples;
        s[variant].push(r.ttftMs);
        s[`${variant}Cached`].push(r.cachedTokens);
        if (r.phases) s[`${variant}Phases`].push(r.phases);
        log(`${t.name}: ${key} ${variant}: ${r.ttftMs.toFixed(1)} ms (${r.cachedTokens} cached)`);
        if (r.cachedTokens < size / 2) log(`${t.name}: warning: the ${size}-token prefix was not served from cache`);
      }
    }
  }
}

/** The figures of each cell from both targets' samples and the floor (null where not measured). */
export function tableFigures(
  cells: readonly Cell[],
  mesh: Map<string, CellSamples>,
  llama: Map<string, CellSamples> | null,
  floor: Map<string, number> | null,
): CellFigures[] {
  const med = (xs: number[]) => (xs.length > 0 ? median(xs) : null);
  return cells.map((c) => {
    const key = cellKey(c);
    const m = mesh.get(key) as CellSamples;
    const l = llama?.get(key) ?? null;
    const mClean = med(m.clean) ?? Number.NaN;
    const mDirty = med(m.dirty);
    const mBusy = med(m.busy);
    const lClean = l ? med(l.clean) : null;
    const lDirty = l ? med(l.dirty) : null;
    const lBusy = l ? med(l.busy) : null;
    const f = floor?.get(key) ?? null;
    return {
      ...c,
      floorMs: f,
      mesh: { clean: mClean, dirty: mDirty, busy: mBusy, samples: m },
      llamaServer: l ? { clean: lClean ?? Number.NaN, dirty: lDirty, busy: lBusy, samples: l } : null,
      ratioClean: lClean === null ? null : lClean / mClean,
      pairedClean: l ? pairedRatio(m.clean, l.clean, false) : null,
      ratioDirty: lDirty === null || mDirty === null ? null : lDirty / mDirty,
      pairedDirty: l && l.dirty.length > 0 ? pairedRatio(m.dirty, l.dirty, false) : null,
      ratioBusy: lBusy === null || mBusy === null ? null : lBusy / mBusy,
      pairedBusy: l && l.busy.length > 0 ? pairedRatio(m.busy, l.busy, false) : null,
      meshDirtyOverClean: mDirty === null ? null : mDirty / mClean,
      meshBusyOverClean: mBusy === null ? null : mBusy / mClean,
      meshOverFloor: f === null ? null : mClean / f,
    };
  });
}

const ms = (x: number | null) => (x === null || !Number.isFinite(x) ? "-" : x >= 100 ? x.toFixed(0) : x.toFixed(1));
const x2 = (x: number | null) => (x === null || !Number.isFinite(x) ? "-" : `${x.toFixed(2)}x`);

/** The table as Markdown: one row per cell; ratios > 1 mean mesh is faster. */
export function formatCachedPrefixTable(t: CachedPrefixTable): string {
  const what = t.layer === "engine" ? "engine" : "HTTP";
  return [
    `| ${what}: prefix + suffix | floor (ms) | mesh clean | llama-server clean | ratio (paired) | mesh dirty | llama-server dirty | ratio (paired) | mesh dirty / clean | mesh / floor |`,
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...t.cells.map(
      (c) =>
        `| ${c.prefix} + ${c.suffix} | ${ms(c.floorMs)} | ${ms(c.mesh.clean)} | ${ms(c.llamaServer?.clean ?? null)} | ${x2(c.ratioClean)} (${x2(c.pairedClean)}) | ${ms(
          c.mesh.dirty,
        )} | ${ms(c.llamaServer?.dirty ?? null)} | ${x2(c.ratioDirty)} (${x2(c.pairedDirty)}) | ${x2(c.meshDirtyOverClean)} | ${x2(c.meshOverFloor)} |`,
    ),
    "",
  ].join("\n");
}

/** The busy variant as Markdown (empty when it was not measured): the turn while other streams decode, against clean. */
export function formatBusyTable(t: CachedPrefixTable): string {
  const rows = t.cells.filter((c) => c.mesh.busy !== null);
  if (rows.length === 0) return "";
  const what = t.layer === "engine" ? "engine" : "HTTP";
  return [
    `| ${what}, busy: prefix + suffix | mesh clean | mesh busy | llama-server clean | llama-server busy | ratio busy (paired) | mesh busy / clean |`,
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...rows.map(
      (c) =>
        `| ${c.prefix} + ${c.suffix} | ${ms(c.mesh.clean)} | ${ms(c.mesh.busy)} | ${ms(c.llamaServer?.clean ?? null)} | ${ms(
          c.llamaServer?.busy ?? null,
        )} | ${x2(c.ratioBusy)} (${x2(c.pairedBusy)}) | ${x2(c.meshBusyOverClean)} |`,
    ),
    "",
  ].join("\n");
}

const PHASES = ["queuedMs", "admitMs", "saveMs", "restoreMs", "decodeMs", "sampleMs"] as const;

/**
 * Where mesh's time to first token went, per cell and variant (medians, ms): inside the engine
 * Worker by phase, and the rest (messages between threads, delivery to the caller) as what the
 * caller saw beyond their sum. Empty when no phases were recorded.
 */
export function formatPhaseBreakdown(t: CachedPrefixTable): string {
  const rows: string[] = [];
  for (const c of t.cells) {
    for (const v of ["clean", "dirty", "busy"] as const) {
      const ps = c.mesh.samples[`${v}Phases`];
      const ttft = c.mesh.samples[v];
      if (ps.length === 0 || ttft.length === 0) continue;
      const med = PHASES.map((k) => median(ps.map((p) => p[k])));
      // Save and restore are parts of the admission.
      const inside = (med[0] as number) + (med[1] as number) + (med[4] as number) + (med[5] as number);
      const total = median(ttft);
      rows.push(
        `| ${c.prefix} + ${c.suffix} | ${v} | ${ms(total)} | ${med.map((x) => ms(x)).join(" | ")} | ${ms(total - inside)} | ${ms(c.floorMs)} |`,
      );
    }
  }
  if (rows.length === 0) return "";
  return [
    "| mesh: prefix + suffix | pool | TTFT | queued | admission | of it: save | of it: restore/compact | decode | sample | rest (messages, delivery) | floor |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...rows,
    "",
  ].join("\n");
}

interface OaiChunk {
  choices?: Array<{ text?: string }>;
  usage?: { prompt_tokens_details?: { cached_tokens?: number } } | null;
  timings?: { cache_n?: number };
  error?: { message?: string } | string;
}

/**
 * A target over HTTP: POST /v1/completions with the prompt as text, streamed, greedy. The same
 * client and the same request for `mesh serve` and llama-server, so the server layers' cost shows.
 */
export function httpTarget(name: string, url: string, model: string): TableTarget {
  return {
    name,
    async turn(p, maxTokens, onFirst) {
      const body = JSON.stringify({
        model,
        prompt: p.text,
        max_tokens: maxTokens,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
        cache_prompt: true,
      });
      const start = performance.now();
      const res = await fetch(`${url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", connection: "close" },
        body,
        keepalive: false,
      });
      if (!res.ok || !res.body) throw new Error(`${name} answered ${res.status}: ${(await res.text()).slice(0, 300)}`);
      let first = -1;
      let cached = 0;
      let end = start;
      for await (const { field, payload, at } of sseLines(res.body)) {
        end = at;
        if (field !== "data" || payload === "[DONE]") continue;
        const chunk = JSON.parse(payload) as OaiChunk;
        if (chunk.error) throw new Error(`${name}: ${typeof chunk.error === "string" ? chunk.error : (chunk.error.message ?? payload)}`);
        if (first < 0 && (chunk.choices?.[0]?.text ?? "") !== "") {
          first = at;
          onFirst?.();
        }
        const c = chunk.usage?.prompt_tokens_details?.cached_tokens ?? chunk.timings?.cache_n;
        if (typeof c === "number") cached = c;
      }
      // A first token without text (an end-of-generation token) is seen only when the stream ends.
      return { ttftMs: (first < 0 ? end : first) - start, cachedTokens: cached };
    },
  };
}
