// Judging a kv-pressure run: per-target counts, latency percentiles, cache
// reuse figures, and the table / Markdown views of the report.

import type { DriveResult, RequestRecord, Sample } from "./drive";
import { delta } from "./scrape";
import { ratio, type Spread, spread } from "./stats";

/** Cached-token figures of one turn index across loops. */
export interface TurnCache {
  turn: number;
  requests: number;
  promptTokens: number;
  cachedTokens: number;
  /** cached / prompt tokens; null when no request of that turn succeeded. */
  ratio: number | null;
}

/** What one target did, as reported. */
export interface TargetSummary {
  /** "mesh", "llama-server" or "endpoint". */
  name: string;
  url: string;
  model: string;
  startedAt: string;
  durationMs: number;
  probePromptTokens: number;
  /** Logical requests (turns plus exact repeats); 429 retries are not extra requests. */
  requests: number;
  /** HTTP requests sent, retries included. */
  attempts: number;
  successes: number;
  /** 429 answers received. */
  status429: number;
  /** Requests still refused with 429 when their retries ran out. */
  gaveUpAfter429: number;
  /** 5xx answers, plus errors that arrived inside a 200 event stream. */
  status5xx: number;
  /** Other 4xx answers (e.g. a prompt longer than the context). */
  status4xx: number;
  /** No HTTP answer at all (refused, reset, timed out). */
  transportErrors: number;
  decodeFailures: {
    /** Failed requests (5xx or an error inside a stream) whose error says KV or a decode step failed, in mesh's or llama-server's words. */
    client: number;
    /** Increase of the node's decode-failure counter over the run; null without mesh /metrics. */
    server: number | null;
  };
  /** Time to first token of streamed requests that succeeded, ms. */
  ttftMs: Spread;
  /** End-to-end latency of every request that succeeded (429 waits included), ms. */
  e2eMs: Spread;
  /** cached / prompt tokens over every successful turn (repeats excluded). */
  cachedRatio: number | null;
  cachedByTurn: TurnCache[];
  samePrefixReuse: {
    minTokens: number;
    /** Successful turns whose reusable prefix (shared system prefix, or the loop's previous prompt) was at least minTokens. */
    eligible: number;
    /** Of those, the turns served at least minTokens from cache. */
    reused: number;
    fraction: number | null;
  };
  exactRepeat: {
    maxSuffixTokens: number;
    attempts: number;
    /** Repeats that succeeded with prompt - cached <= maxSuffixTokens. */
    passed: number;
    /** prompt - cached of each successful repeat. */
    suffixPrefill: number[];
  };
  /** From /metrics over the run; null when the target does not publish them. */
  evictions: { count: number | null; cells: number | null };
  admissions: { admitted: number | null; queued: number | null; rejected: number | null };
  hostCache: { saves: number | null; restores: number | null };
  kvCellsTotal: number | null;
  /** Distinct error messages with counts, most frequent first (at most 8). */
  errors: Array<{ message: string; count: number }>;
  samples: Sample[];
  records: RequestRecord[];
}

/** Judging thresholds. */
export interface JudgeOptions {
  reuseMinTokens: number;
  repeatMaxSuffixTokens: number;
}

// The shared prefix ends a few tokens before the end of the prompt that held
// it (the generation prompt, the start of the next message): give that back.
const PREFIX_SLACK = 32;
// mesh names KV and decode in its errors; llama-server's decode() does not:
// when llama_decode returns 1 (no KV slot) it answers "Context size has been
// exceeded.", -1 "Invalid input batch.", below -1 "Compute error."
// (tools/server/server-context.cpp). Its 400 for a prompt longer than the
// context ("... exceeds the available context size ...") is a refusal, not a
// failed decode, and does not match.
const DECODE_ERROR = /\bkv\b|kv_|kv cache|decode|memory slot|cache space|context size has been exceeded|invalid input batch|compute error/i;

/** True when a failed request's error says the KV cache or a decode step failed. */
export function isDecodeFailure(r: Pick<RequestRecord, "status" | "streamError" | "error" | "ok">): boolean {
  return !r.ok && (r.status >= 500 || r.streamError) && r.error !== null && DECODE_ERROR.test(r.error);
}

function byTurn(records: RequestRecord[], turns: number): TurnCache[] {
  const out: TurnCache[] = Array.from({ length: turns }, (_, turn) => ({
    turn,
    requests: 0,
    promptTokens: 0,
    cachedTokens: 0,
    ratio: null,
  }));
  for (const r of records) {
    const row = out[r.turn];
    if (r.kind !== "turn" || !r.ok || !r.usage || !row) continue;
    row.requests++;
    row.promptTokens += r.usage.promptTokens;
    row.cachedTokens += r.usage.cachedTokens;
  }
  for (const row of out) row.ratio = ratio(row.cachedTokens, row.promptTokens);
  return out;
}

function reuse(records: RequestRecord[], probePromptTokens: number, minTokens: number): TargetSummary["samePrefixReuse"] {
  const loops = new Map<number, RequestRecord[]>();
  for (const r of records) {
    if (r.kind !== "turn") continue;
    const turns = loops.get(r.loop);
    if (turns) turns.push(r);
    else loops.set(r.loop, [r]);
  }
  let eligible = 0;
  let reused = 0;
  for (const turns of loops.values()) {
    turns.sort((a, b) => a.turn - b.turn);
    let reusable = probePromptTokens - PREFIX_SLACK;
    for (const r of turns) {
      if (r.ok && r.usage) {
        if (reusable >= minTokens) {
          eligible++;
          if (r.usage.cachedTokens >= minTokens) reused++;
        }
        // The next turn extends this prompt, so all of it could be served from cache.
        reusable = Math.max(reusable, r.usage.promptTokens - PREFIX_SLACK);
      }
    }
  }
  return { minTokens, eligible, reused, fraction: ratio(reused, eligible) };
}

function topErrors(records: RequestRecord[]): Array<{ message: string; count: number }> {
  const counts = new Map<string, number>();
  for (const r of records) {
    if (r.ok || r.error === null) continue;
    // Digits vary per request (token counts, ids): fold them so one cause is one row.
    const key = `${r.status > 0 ? `HTTP ${r.status}: ` : ""}${r.error.replace(/\d+/g, "N").slice(0, 200)}`;
    if (counts.has(key) || counts.size < 64) counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts.entries()]
    .map(([message, count]) => ({ message, count }))
    .sort((a, b) => b.count - a.count)
    .slice(0, 8);
}

/** Summarize one target's run. */
export function summarize(name: string, url: string, model: string, turns: number, d: DriveResult, j: JudgeOptions): TargetSummary {
  const rs = d.records;
  const ok = rs.filter((r) => r.ok);
  const turnOk = ok.filter((r) => r.kind === "turn" && r.usage);
  const prompt = turnOk.reduce((n, r) => n + (r.usage?.promptTokens ?? 0), 0);
  const cached = turnOk.reduce((n, r) => n + (r.usage?.cachedTokens ?? 0), 0);
  const repeats = rs.filter((r) => r.kind === "repeat");
  const suffixPrefill = repeats.flatMap((r) => (r.ok && r.usage ? [r.usage.promptTokens - r.usage.cachedTokens] : []));
  const kvTotal = d.after?.kv?.total ?? d.samples.find((s) => s.kv)?.kv?.total ?? null;
  return {
    name,
    url,
    model,
    startedAt: d.startedAt,
    durationMs: Math.round(d.durationMs),
    probePromptTokens: d.probePromptTokens,
    requests: rs.length,
    attempts: rs.reduce((n, r) => n + r.attempts, 0),
    successes: ok.length,
    status429: rs.reduce((n, r) => n + r.status429, 0),
    gaveUpAfter429: rs.filter((r) => r.status === 429).length,
    status5xx: rs.filter((r) => !r.ok && (r.status >= 500 || r.streamError)).length,
    status4xx: rs.filter((r) => r.status >= 400 && r.status < 500 && r.status !== 429).length,
    transportErrors: rs.filter((r) => r.status === 0).length,
    decodeFailures: { client: rs.filter(isDecodeFailure).length, server: delta(d.before?.decodeKvFailures, d.after?.decodeKvFailures) },
    ttftMs: spread(ok.flatMap((r) => (r.stream && r.ttftMs !== null ? [r.ttftMs] : []))),
    e2eMs: spread(ok.map((r) => r.e2eMs)),
    cachedRatio: ratio(cached, prompt),
    cachedByTurn: byTurn(rs, turns),
    samePrefixReuse: reuse(rs, d.probePromptTokens, j.reuseMinTokens),
    exactRepeat: {
      maxSuffixTokens: j.repeatMaxSuffixTokens,
      attempts: repeats.length,
      passed: suffixPrefill.filter((n) => n <= j.repeatMaxSuffixTokens).length,
      suffixPrefill,
    },
    evictions: { count: delta(d.before?.evictions, d.after?.evictions), cells: delta(d.before?.evictedCells, d.after?.evictedCells) },
    admissions: {
      admitted: delta(d.before?.admitted, d.after?.admitted),
      queued: delta(d.before?.queued, d.after?.queued),
      rejected: delta(d.before?.rejected, d.after?.rejected),
    },
    hostCache: { saves: delta(d.before?.hostSaves, d.after?.hostSaves), restores: delta(d.before?.hostRestores, d.after?.hostRestores) },
    kvCellsTotal: kvTotal,
    errors: topErrors(rs),
    samples: d.samples,
    records: rs,
  };
}

const ms = (x: number | null) => (x === null ? "-" : x >= 1000 ? `${(x / 1000).toFixed(2)} s` : `${Math.round(x)} ms`);
const pct = (x: number | null) => (x === null ? "-" : `${(x * 100).toFixed(1)}%`);
const num = (x: number | null) => (x === null ? "-" : String(x));

/** The rows shared by the terminal table and summary.md: a label and one cell per target. */
export function tableRows(ts: TargetSummary[]): Array<[string, ...string[]]> {
  const row = (label: string, f: (t: TargetSummary) => string): [string, ...string[]] => [label, ...ts.map(f)];
  return [
    row("requests (attempts)", (t) => `${t.requests} (${t.attempts})`),
    row("successes", (t) => String(t.successes)),
    row("429 answers (gave up)", (t) => `${t.status429} (${t.gaveUpAfter429})`),
    row("5xx", (t) => String(t.status5xx)),
    row("other 4xx", (t) => String(t.status4xx)),
    row("no answer", (t) => String(t.transportErrors)),
    row("decode failures (client / node)", (t) => `${t.decodeFailures.client} / ${num(t.decodeFailures.server)}`),
    row("TTFT p50 / p95 (streams)", (t) => `${ms(t.ttftMs.p50)} / ${ms(t.ttftMs.p95)}`),
    row("end-to-end p50 / p95", (t) => `${ms(t.e2eMs.p50)} / ${ms(t.e2eMs.p95)}`),
    row("cached-token ratio", (t) => pct(t.cachedRatio)),
    row("cached ratio by turn", (t) => t.cachedByTurn.map((c) => pct(c.ratio)).join(" ")),
    row(`same-prefix reuse (>= ${ts[0]?.samePrefixReuse.minTokens ?? 2048} tokens)`, (t) =>
      t.samePrefixReuse.eligible === 0
        ? "no eligible turn"
        : `${t.samePrefixReuse.reused}/${t.samePrefixReuse.eligible} (${pct(t.samePrefixReuse.fraction)})`,
    ),
    row(
      `exact repeat (suffix <= ${ts[0]?.exactRepeat.maxSuffixTokens ?? 256})`,
      (t) => `${t.exactRepeat.passed}/${t.exactRepeat.attempts}`,
    ),
    row("evictions (cells)", (t) => (t.evictions.count === null ? "-" : `${t.evictions.count} (${num(t.evictions.cells)})`)),
    row("admissions queued / rejected", (t) =>
      t.admissions.queued === null && t.admissions.rejected === null ? "-" : `${num(t.admissions.queued)} / ${num(t.admissions.rejected)}`,
    ),
    row("host-RAM saves / restores", (t) =>
      t.hostCache.saves === null && t.hostCache.restores === null ? "-" : `${num(t.hostCache.saves)} / ${num(t.hostCache.restores)}`,
    ),
    row("duration", (t) => ms(t.durationMs)),
  ];
}

/** A fixed-width table for the terminal. */
export function formatTable(ts: TargetSummary[]): string {
  return formatColumns(
    ts.map((t) => t.name),
    tableRows(ts),
  );
}

/** Rows of a label and one cell per column, laid out fixed-width under `heads` (one per column). */
export function formatColumns(heads: readonly string[], cells: ReadonlyArray<readonly string[]>): string {
  const rows: string[][] = [["", ...heads], ...cells.map((r) => [...r])];
  const widths = rows[0]?.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? "").length))) ?? [];
  const line = (r: string[]) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c] ?? 0) : cell.padStart(widths[c] ?? 0))).join("  ");
  const [head, ...body] = rows;
  return [line(head ?? []), widths.map((w) => "-".repeat(w)).join("  "), ...body.map(line), ""].join("\n");
}

const mdCell = (s: string) => s.replaceAll("|", "\\|");

/** A Markdown table of the same rows. */
export function markdownTable(ts: TargetSummary[]): string {
  const rows = tableRows(ts);
  return [
    `| figure | ${ts.map((t) => mdCell(t.name)).join(" | ")} |`,
    `| --- | ${ts.map(() => "---:").join(" | ")} |`,
    ...rows.map((r) => `| ${r.map(mdCell).join(" | ")} |`),
  ].join("\n");
}
