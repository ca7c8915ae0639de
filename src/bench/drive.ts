// Runs a kv-pressure workload against one OpenAI-compatible endpoint: the
// loops start staggered and run concurrently, 429s are retried after their
// Retry-After (a bounded number of times), and /metrics is sampled while they
// run. Everything is recorded; judging the records is report.ts's job.

import { type AttemptResult, type Endpoint, sendChat, type UsageCounts } from "./client";
import { type KvCells, type NodeFigures, scrape } from "./scrape";
import { BoundedSeries } from "./stats";
import { type ChatMessage, type LoopPlan, requestBody, type TurnPlan, turnMessages, type Workload } from "./workload";

/** One logical request (all its 429 retries folded in). */
export interface RequestRecord {
  loop: number;
  /** Turn index; the exact repeat of a loop's last turn has kind "repeat" and that turn's index. */
  turn: number;
  kind: "turn" | "repeat";
  stream: boolean;
  /** Start of the first attempt and end of the last, ms since the run started. */
  startMs: number;
  endMs: number;
  attempts: number;
  /** 429 answers received (each one retried unless the retries ran out). */
  status429: number;
  /** Time spent waiting on Retry-After. */
  waitedMs: number;
  /** Status of the last attempt (0: no response). */
  status: number;
  ok: boolean;
  /** From the first attempt's start to the first token (streams only). */
  ttftMs: number | null;
  /** From the first attempt's start to the end of the last. */
  e2eMs: number;
  usage: UsageCounts | null;
  error: string | null;
  streamError: boolean;
  /** Index of the endpoint the request entered at, when the target has several (DriveOptions.entry). */
  entry?: number;
  /** The node that ran the last attempt (`x-mesh-served-by`); null when the endpoint does not say. */
  servedBy?: string | null;
  /** Why it ran there (`x-mesh-route`); null when the endpoint does not say. */
  route?: string | null;
}

/** The node and the client at one moment of the run. */
export interface Sample {
  tMs: number;
  inFlight: number;
  done: number;
  kv: KvCells | null;
}

/** How to drive one target. */
export interface DriveOptions {
  /** Label in progress lines. */
  name: string;
  endpoint: Endpoint;
  /** The "model" field of every request. */
  model: string;
  /** 429 retries per request before giving up. */
  maxRetries: number;
  /** Longest wait honoured from one Retry-After. */
  maxRetryWaitS: number;
  requestTimeoutMs: number;
  sampleIntervalMs: number;
  /** Most samples kept, at least 3 (the series is thinned past it). */
  maxSamples: number;
  progressIntervalMs: number;
  onProgress: (line: string) => void;
  /**
   * Where each request enters, for a target with several entry points (the nodes of a mesh); the
   * warm-up and /metrics still use `endpoint`. Absent: every request goes to `endpoint`.
   */
  entry?: (loop: number, turn: number, kind: "turn" | "repeat") => { index: number; endpoint: Endpoint };
  /** Pause before each request of a loop after its first: the agent running its tool. Default 0. */
  toolMs?: number;
  /** Runs once the warm-up succeeded, just before the loops start (e.g. to read other nodes' counters). */
  beforeLoops?: () => Promise<void>;
}

/** Everything one target did. */
export interface DriveResult {
  startedAt: string;
  durationMs: number;
  /** Prompt tokens of the warm-up request (system prefix + tools + a short user message). */
  probePromptTokens: number;
  records: RequestRecord[];
  samples: Sample[];
  /** /metrics before and after the loops; null when the target has none. */
  before: NodeFigures | null;
  after: NodeFigures | null;
}

/** The warm-up request failed: the target cannot run the workload (wrong model, bad key, ...). */
export class ProbeError extends Error {
  readonly code = "probe_failed";
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Send one request, retrying 429s after Retry-After; never throws. */
export async function requestWithRetries(
  o: Pick<DriveOptions, "endpoint" | "maxRetries" | "maxRetryWaitS" | "requestTimeoutMs">,
  body: object,
  clock: () => number,
): Promise<Omit<RequestRecord, "loop" | "turn" | "kind" | "stream">> {
  const startMs = clock();
  let attempts = 0;
  let status429 = 0;
  let waitedMs = 0;
  let last: AttemptResult;
  let lastStart = startMs;
  for (;;) {
    lastStart = clock();
    last = await sendChat(o.endpoint, body, o.requestTimeoutMs);
    attempts++;
    if (last.status !== 429) break;
    status429++;
    if (attempts > o.maxRetries) break;
    // A missing or zero Retry-After still gets a short pause: an instant retry would only be refused again.
    const waitMs = Math.min(Math.max(last.retryAfterS ?? 1, 0.05), o.maxRetryWaitS) * 1000;
    waitedMs += waitMs;
    await sleep(waitMs);
  }
  const endMs = clock();
  return {
    startMs,
    endMs,
    attempts,
    status429,
    waitedMs,
    status: last.status,
    ok: last.status === 200 && last.error === null && last.usage !== null,
    ttftMs: last.ttftMs === null ? null : lastStart - startMs + last.ttftMs,
    e2eMs: endMs - startMs,
    usage: last.usage,
    error: last.error,
    streamError: last.streamError,
    servedBy: last.servedBy,
    route: last.route,
  };
}

/** Run the workload against one endpoint. */
export async function drive(w: Workload, o: DriveOptions): Promise<DriveResult> {
  const t0 = performance.now();
  const clock = () => performance.now() - t0;
  const startedAt = new Date().toISOString();

  // Warm-up: the shared prefix with a short question; also proves the model name and key work.
  const probeMessages: ChatMessage[] = [
    { role: "system", content: w.system },
    { role: "user", content: "Reply with one word." },
  ];
  const probe = await requestWithRetries(o, requestBody(w, o.model, probeMessages, false, 1), clock);
  if (!probe.ok || !probe.usage) {
    throw new ProbeError(`${o.name}: the warm-up request failed (HTTP ${probe.status}): ${probe.error ?? "no usage in the answer"}`);
  }

  if (o.beforeLoops) await o.beforeLoops();
  const before = await scrape(o.endpoint.url, o.endpoint.apiKey);
  const total = w.loops.reduce((n, l) => n + l.turns.length + 1, 0);
  const records: RequestRecord[] = [];
  const samples = new BoundedSeries<Sample>(Math.max(2, o.maxSamples - 1));
  let inFlight = 0;
  let finished = false;
  const runStart = clock();
  const since = () => clock() - runStart;

  const lastKv: { kv: KvCells | null } = { kv: null };
  // Only a target that publishes KV cells is scraped while loaded: llama-server
  // answers /metrics from its busy main loop, which would stall the series.
  const scrapeKv = before?.kv != null;
  const sampler = (async () => {
    while (!finished) {
      const f = scrapeKv ? await scrape(o.endpoint.url, o.endpoint.apiKey) : null;
      lastKv.kv = f?.kv ?? null;
      samples.push({ tMs: since(), inFlight, done: records.length, kv: lastKv.kv });
      await sleep(o.sampleIntervalMs);
    }
  })();
  const progress = setInterval(() => {
    const bad = records.filter((r) => r.status >= 500 || r.streamError).length;
    const n429 = records.reduce((n, r) => n + r.status429, 0);
    const kv = lastKv.kv
      ? `, kv running ${lastKv.kv.running} resident ${lastKv.kv.resident} reserved ${lastKv.kv.reserved} free ${lastKv.kv.free}`
      : "";
    o.onProgress(`${o.name}: ${records.length}/${total} done, ${inFlight} in flight, ${n429} x 429, ${bad} x 5xx${kv}`);
  }, o.progressIntervalMs);

  const one = async (loop: LoopPlan, turn: number, kind: "turn" | "repeat") => {
    const plan = loop.turns[turn] as TurnPlan;
    const body = requestBody(w, o.model, turnMessages(w, loop, turn), plan.stream);
    const at = o.entry?.(loop.index, turn, kind);
    inFlight++;
    const r = await requestWithRetries(at ? { ...o, endpoint: at.endpoint } : o, body, since);
    inFlight--;
    records.push({ loop: loop.index, turn, kind, stream: plan.stream, ...(at ? { entry: at.index } : {}), ...r });
  };
  const toolMs = o.toolMs ?? 0;
  const runLoop = async (loop: LoopPlan) => {
    const wait = loop.startMs - since();
    if (wait > 0) await sleep(wait);
    for (let k = 0; k < loop.turns.length; k++) {
      if (k > 0 && toolMs > 0) await sleep(toolMs);
      await one(loop, k, "turn");
    }
    // The identical last request once more: a cache that kept it prefills almost nothing.
    if (loop.turns.length > 0) {
      if (toolMs > 0) await sleep(toolMs);
      await one(loop, loop.turns.length - 1, "repeat");
    }
  };
  try {
    await Promise.all(w.loops.map(runLoop));
  } finally {
    finished = true;
    clearInterval(progress);
    await sampler;
  }
  const after = before ? await scrape(o.endpoint.url, o.endpoint.apiKey) : null;
  // The state after the last request (always kept), so the series ends where the run did.
  const last: Sample = { tMs: since(), inFlight, done: records.length, kv: after?.kv ?? null };
  o.onProgress(`${o.name}: finished ${records.length} requests in ${(since() / 1000).toFixed(1)} s`);
  return {
    startedAt,
    durationMs: since(),
    probePromptTokens: probe.usage.promptTokens,
    records,
    samples: [...samples.values(), last],
    before,
    after,
  };
}
