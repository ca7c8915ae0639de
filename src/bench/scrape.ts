// Reading a target's Prometheus /metrics: a small text parser and the KV and
// admission figures the kv-pressure report needs, from either generation of
// mesh's metric names (a target without them simply has none).

/** One sample line: name, labels, value. */
export interface PromSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Largest /metrics body read. */
export const MAX_METRICS_BYTES = 1024 * 1024;
/** Most sample lines kept from one scrape. */
export const MAX_METRICS_LINES = 10_000;

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** Parse Prometheus text exposition; comments and unreadable lines are skipped, at most MAX_METRICS_LINES samples. */
export function parsePrometheus(text: string): PromSample[] {
  const out: PromSample[] = [];
  for (const raw of text.split("\n")) {
    if (out.length >= MAX_METRICS_LINES) break;
    const l = raw.trim();
    if (l === "" || l.startsWith("#")) continue;
    const m = LINE.exec(l);
    if (!m) continue;
    const value = Number(m[3]);
    if (Number.isNaN(value)) continue;
    const labels: Record<string, string> = {};
    for (const lm of (m[2] ?? "").matchAll(LABEL)) labels[lm[1] as string] = (lm[2] as string).replace(/\\(.)/g, "$1");
    out.push({ name: m[1] as string, labels, value });
  }
  return out;
}

/** Sum of the samples named `name` whose labels include `match`; null when there is none. */
export function metricValue(samples: PromSample[], name: string, match: Record<string, string> = {}): number | null {
  let found = false;
  let sum = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (!Object.entries(match).every(([k, v]) => s.labels[k] === v)) continue;
    found = true;
    sum += s.value;
  }
  return found ? sum : null;
}

/** KV cells of a node at one moment. */
export interface KvCells {
  running: number;
  resident: number;
  /** Promised to running requests and not yet used (0 where the target does not publish it). */
  reserved: number;
  free: number;
  /** The pool's size. */
  total: number;
}

/** The figures of one scrape the report uses; null where the target does not publish them. */
export interface NodeFigures {
  kv: KvCells | null;
  evictions: number | null;
  evictedCells: number | null;
  decodeKvFailures: number | null;
  admitted: number | null;
  queued: number | null;
  rejected: number | null;
  cachedPromptTokens: number | null;
  /** Idle conversations saved to / restored from host RAM (mesh's --cache-ram tier). */
  hostSaves: number | null;
  hostRestores: number | null;
}

/** Extract the report's figures from parsed /metrics. */
export function nodeFigures(s: PromSample[]): NodeFigures {
  let kv: KvCells | null = null;
  const running = metricValue(s, "mesh_kv_cells", { state: "running" });
  const resident = metricValue(s, "mesh_kv_cells", { state: "resident" });
  const free = metricValue(s, "mesh_kv_cells", { state: "free" });
  if (running !== null && resident !== null && free !== null) {
    const reserved = metricValue(s, "mesh_kv_cells", { state: "reserved" }) ?? 0;
    // The node's own pool size: adding up the states would depend on knowing every state.
    const total = metricValue(s, "mesh_kv_cells_total") ?? running + resident + reserved + free;
    kv = { running, resident, reserved, free, total };
  } else {
    // The first generation of names: used (running + resident), running, total.
    const used = metricValue(s, "mesh_kv_cells_used");
    const run = metricValue(s, "mesh_kv_cells_running");
    const total = metricValue(s, "mesh_kv_cells_total");
    if (used !== null && run !== null && total !== null) {
      kv = { running: run, resident: Math.max(0, used - run), reserved: 0, free: Math.max(0, total - used), total };
    }
  }
  return {
    kv,
    evictions: metricValue(s, "mesh_kv_evictions_total"),
    evictedCells: metricValue(s, "mesh_kv_evicted_cells_total"),
    decodeKvFailures: metricValue(s, "mesh_decode_kv_failures_total") ?? metricValue(s, "mesh_decode_failures"),
    admitted: metricValue(s, "mesh_admissions_total", { result: "admitted" }),
    queued: metricValue(s, "mesh_admissions_total", { result: "queued" }),
    rejected: metricValue(s, "mesh_admissions_total", { result: "rejected" }),
    cachedPromptTokens: metricValue(s, "mesh_prompt_tokens_cached_total") ?? metricValue(s, "mesh_cached_prompt_tokens_total"),
    hostSaves: metricValue(s, "mesh_host_cache_operations_total", { op: "save" }),
    hostRestores: metricValue(s, "mesh_host_cache_operations_total", { op: "restore" }),
  };
}

/** Fetch a target's /metrics as parsed samples, reading at most MAX_METRICS_BYTES; null when it has none (404, unreachable). */
export async function scrapeSamples(url: string, apiKey?: string, timeoutMs = 5000): Promise<PromSample[] | null> {
  try {
    const res = await fetch(`${url}/metrics`, {
      headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
      signal: AbortSignal.timeout(timeoutMs),
    });
    if (!res.ok || !res.body) {
      await res.body?.cancel();
      return null;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      if (text.length > MAX_METRICS_BYTES) {
        await reader.cancel();
        // Drop the line cut in half.
        text = text.slice(0, text.lastIndexOf("\n") + 1);
        break;
      }
    }
    return parsePrometheus(text);
  } catch {
    return null;
  }
}

/** Fetch and parse a target's /metrics into its figures; null when it has none (404, not Prometheus, unreachable). */
export async function scrape(url: string, apiKey?: string, timeoutMs = 5000): Promise<NodeFigures | null> {
  const samples = await scrapeSamples(url, apiKey, timeoutMs);
  return samples ? nodeFigures(samples) : null;
}

/** b - a for counters, null when either side is unknown. */
export function delta(a: number | null | undefined, b: number | null | undefined): number | null {
  return a == null || b == null ? null : b - a;
}
