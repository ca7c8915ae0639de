// Judging a `mesh bench routing` run: per policy, where requests entered and
// where they ran (x-mesh-served-by), cached tokens on follow-up turns, the
// routing counters each node published, and the side-by-side table, Markdown
// and chart. Pure functions of the records and counters: nothing here runs a
// node, so all of it is unit-tested.

import type { RequestRecord } from "./drive";
import { formatColumns, type TargetSummary } from "./report";
import { metricValue, type PromSample } from "./scrape";
import { ratio } from "./stats";
import { escapeXml, niceStep } from "./svg";
import { rng, type WorkloadConfig } from "./workload";

/** How the mesh's nodes route: `mesh serve --routing cache|load`. */
export type RoutingPolicy = "cache" | "load";

/** One node of a policy's mesh. */
export interface BenchNode {
  /** 1-based, in start order; node 1 created the mesh and receives the warm-up and the /metrics samples. */
  index: number;
  name: string;
  /** Its node id, as `x-mesh-served-by` names it. */
  id: string;
  url: string;
}

/** A node's routing counters at one moment (its /metrics); null where the node does not publish one. */
export interface RoutingCounters {
  decisions: { cache: number | null; load: number | null; only: number | null; local: number | null };
  targets: { self: number | null; peer: number | null };
  forwarded: { forwarded: number | null; retried: number | null; failed: number | null };
}

/** What one node did during the loops. */
export interface NodeActivity extends BenchNode {
  /** Requests that entered here. */
  entered: number;
  /** Requests that ran here (successes whose x-mesh-served-by named this node). */
  served: number;
  /** Increase of its routing counters over the loops; null when /metrics could not be read. */
  routing: RoutingCounters | null;
}

/** Cached tokens over a set of successful turns. */
export interface CacheFigure {
  requests: number;
  promptTokens: number;
  cachedTokens: number;
  ratio: number | null;
}

/** One policy's run, as reported. */
export interface PolicySummary {
  policy: RoutingPolicy;
  nodes: NodeActivity[];
  /** Successes whose x-mesh-served-by was missing or named no node of this mesh. */
  servedUnknown: number;
  /** Successes that ran on another node than the one they entered at. */
  servedElsewhere: { count: number; of: number; fraction: number | null };
  /** Turns after each loop's first (turn index >= 1; exact repeats not included). */
  followUp: CacheFigure;
  /** Every node's routing decisions over the loops, summed by reason; null when no node published them. */
  decisions: RoutingCounters | null;
  /** The client-side figures (requests, failures, latency, cached ratio per turn, records), as kv-pressure reports them. */
  target: TargetSummary;
}

/** The entry node (0-based) of every request: per loop, one per turn, then the exact repeat. Seeded apart from the workload, so the same seed gives the same entries to every policy. */
export function entryPlan(seed: number, loops: number, turns: number, nodes: number): number[][] {
  // Its own stream: changing --nodes must not change the requests themselves.
  const next = rng((seed ^ 0x5bd1e995) >>> 0);
  return Array.from({ length: loops }, () => Array.from({ length: turns + 1 }, () => Math.floor(next() * nodes)));
}

/** The entry of one request from a plan (the repeat takes the last column). */
export function entryOf(plan: number[][], loop: number, turn: number, kind: "turn" | "repeat"): number {
  const row = plan[loop] ?? [];
  return row[kind === "repeat" ? row.length - 1 : turn] ?? 0;
}

/** The routing counters in one node's parsed /metrics. */
export function routingCounters(s: PromSample[]): RoutingCounters {
  const d = (by: string) => metricValue(s, "mesh_routing_decisions_total", { by });
  const f = (result: string) => metricValue(s, "mesh_forwarded_requests_total", { result });
  return {
    decisions: { cache: d("cache"), load: d("load"), only: d("only"), local: d("local") },
    targets: {
      self: metricValue(s, "mesh_routing_targets_total", { target: "self" }),
      peer: metricValue(s, "mesh_routing_targets_total", { target: "peer" }),
    },
    forwarded: { forwarded: f("forwarded"), retried: f("retried"), failed: f("failed") },
  };
}

const sub = (a: number | null, b: number | null) => (a === null || b === null ? null : b - a);
const add = (a: number | null, b: number | null) => (a === null ? b : b === null ? a : a + b);

function mapCounters(a: RoutingCounters, b: RoutingCounters, f: (x: number | null, y: number | null) => number | null): RoutingCounters {
  return {
    decisions: {
      cache: f(a.decisions.cache, b.decisions.cache),
      load: f(a.decisions.load, b.decisions.load),
      only: f(a.decisions.only, b.decisions.only),
      local: f(a.decisions.local, b.decisions.local),
    },
    targets: { self: f(a.targets.self, b.targets.self), peer: f(a.targets.peer, b.targets.peer) },
    forwarded: {
      forwarded: f(a.forwarded.forwarded, b.forwarded.forwarded),
      retried: f(a.forwarded.retried, b.forwarded.retried),
      failed: f(a.forwarded.failed, b.forwarded.failed),
    },
  };
}

/** after - before for every counter (null where either is unknown); null when either scrape failed. */
export function countersDelta(before: RoutingCounters | null, after: RoutingCounters | null): RoutingCounters | null {
  return before && after ? mapCounters(before, after, sub) : null;
}

/** Counters summed over nodes (a node without a counter adds nothing); null when there is none. */
export function sumCounters(xs: ReadonlyArray<RoutingCounters | null>): RoutingCounters | null {
  const known = xs.filter((x): x is RoutingCounters => x !== null);
  if (known.length === 0) return null;
  return known.slice(1).reduce((acc, x) => mapCounters(acc, x, add), known[0] as RoutingCounters);
}

/** Requests entered at and served by each node, successes served elsewhere than their entry, and successes no node of the mesh claimed. */
export function countByNode(
  records: readonly RequestRecord[],
  nodes: readonly BenchNode[],
): { entered: number[]; served: number[]; unknown: number; elsewhere: number; of: number } {
  const entered = nodes.map(() => 0);
  const served = nodes.map(() => 0);
  const byId = new Map(nodes.map((n, i) => [n.id, i]));
  let unknown = 0;
  let elsewhere = 0;
  let of = 0;
  for (const r of records) {
    if (r.entry !== undefined && r.entry >= 0 && r.entry < nodes.length) entered[r.entry] = (entered[r.entry] ?? 0) + 1;
    if (!r.ok) continue;
    const at = r.servedBy == null ? undefined : byId.get(r.servedBy);
    if (at === undefined) {
      unknown++;
      continue;
    }
    served[at] = (served[at] ?? 0) + 1;
    if (r.entry !== undefined) {
      of++;
      if (r.entry !== at) elsewhere++;
    }
  }
  return { entered, served, unknown, elsewhere, of };
}

/** Cached-token ratio over the successful turns with index >= 1 (a loop's follow-ups; repeats excluded). */
export function followUpCache(records: readonly RequestRecord[]): CacheFigure {
  let requests = 0;
  let promptTokens = 0;
  let cachedTokens = 0;
  for (const r of records) {
    if (r.kind !== "turn" || r.turn < 1 || !r.ok || !r.usage) continue;
    requests++;
    promptTokens += r.usage.promptTokens;
    cachedTokens += r.usage.cachedTokens;
  }
  return { requests, promptTokens, cachedTokens, ratio: ratio(cachedTokens, promptTokens) };
}

/** One policy's summary from its client-side summary, its nodes and each node's counters before and after the loops. */
export function summarizePolicy(
  policy: RoutingPolicy,
  target: TargetSummary,
  nodes: readonly BenchNode[],
  before: ReadonlyArray<RoutingCounters | null>,
  after: ReadonlyArray<RoutingCounters | null>,
): PolicySummary {
  const c = countByNode(target.records, nodes);
  const routing = nodes.map((_, i) => countersDelta(before[i] ?? null, after[i] ?? null));
  return {
    policy,
    nodes: nodes.map((n, i) => ({ ...n, entered: c.entered[i] ?? 0, served: c.served[i] ?? 0, routing: routing[i] ?? null })),
    servedUnknown: c.unknown,
    servedElsewhere: { count: c.elsewhere, of: c.of, fraction: ratio(c.elsewhere, c.of) },
    followUp: followUpCache(target.records),
    decisions: sumCounters(routing),
    target,
  };
}

const ms = (x: number | null) => (x === null ? "-" : x >= 1000 ? `${(x / 1000).toFixed(2)} s` : `${Math.round(x)} ms`);
const pct = (x: number | null) => (x === null ? "-" : `${(x * 100).toFixed(1)}%`);
const num = (x: number | null) => (x === null ? "-" : String(x));

/** The rows of the side-by-side table: a label and one cell per policy. */
export function routingRows(ps: readonly PolicySummary[]): Array<[string, ...string[]]> {
  const row = (label: string, f: (p: PolicySummary) => string): [string, ...string[]] => [label, ...ps.map(f)];
  const t = (f: (t: TargetSummary) => string) => (p: PolicySummary) => f(p.target);
  const nodes = Math.max(0, ...ps.map((p) => p.nodes.length));
  return [
    row(
      "requests (attempts)",
      t((x) => `${x.requests} (${x.attempts})`),
    ),
    row(
      "successes",
      t((x) => String(x.successes)),
    ),
    row(
      "429 answers (gave up)",
      t((x) => `${x.status429} (${x.gaveUpAfter429})`),
    ),
    row(
      "5xx / other 4xx / no answer",
      t((x) => `${x.status5xx} / ${x.status4xx} / ${x.transportErrors}`),
    ),
    row(
      "cached-token ratio, all turns",
      t((x) => pct(x.cachedRatio)),
    ),
    row("cached-token ratio, follow-up turns", (p) => pct(p.followUp.ratio)),
    row(
      "cached ratio by turn",
      t((x) => x.cachedByTurn.map((c) => pct(c.ratio)).join(" ")),
    ),
    row(
      "exact repeat served from cache",
      t((x) => `${x.exactRepeat.passed}/${x.exactRepeat.attempts}`),
    ),
    row(
      "TTFT p50 / p95 (streams)",
      t((x) => `${ms(x.ttftMs.p50)} / ${ms(x.ttftMs.p95)}`),
    ),
    row(
      "end-to-end p50 / p95",
      t((x) => `${ms(x.e2eMs.p50)} / ${ms(x.e2eMs.p95)}`),
    ),
    ...Array.from({ length: nodes }, (_, i) =>
      row(`node ${i + 1}: served / entered`, (p) => {
        const n = p.nodes[i];
        return n ? `${n.served} / ${n.entered}` : "-";
      }),
    ),
    row("served by no known node", (p) => String(p.servedUnknown)),
    row("served on another node than entry", (p) =>
      p.servedElsewhere.of === 0 ? "-" : `${p.servedElsewhere.count}/${p.servedElsewhere.of} (${pct(p.servedElsewhere.fraction)})`,
    ),
    row("decisions cache / load / only / local", (p) => {
      const d = p.decisions?.decisions;
      return d ? `${num(d.cache)} / ${num(d.load)} / ${num(d.only)} / ${num(d.local)}` : "-";
    }),
    row("forwarded (retried / failed)", (p) => {
      const f = p.decisions?.forwarded;
      return f ? `${num(f.forwarded)} (${num(f.retried)} / ${num(f.failed)})` : "-";
    }),
    row(
      "duration",
      t((x) => ms(x.durationMs)),
    ),
  ];
}

/** A fixed-width table for the terminal, one column per policy. */
export function formatRoutingTable(ps: readonly PolicySummary[]): string {
  return formatColumns(
    ps.map((p) => `--routing ${p.policy}`),
    routingRows(ps),
  );
}

const mdCell = (s: string) => s.replaceAll("|", "\\|");

/** The same rows as a Markdown table. */
export function routingMarkdownTable(ps: readonly PolicySummary[]): string {
  return [
    `| figure | ${ps.map((p) => `\`--routing ${p.policy}\``).join(" | ")} |`,
    `| --- | ${ps.map(() => "---:").join(" | ")} |`,
    ...routingRows(ps).map((r) => `| ${r.map(mdCell).join(" | ")} |`),
  ].join("\n");
}

/** What the Markdown summary needs of the run besides the policies. */
export interface RoutingRunInfo {
  date: string;
  command: string;
  machine: { cpu: string; cores: number; platform: string; arch: string };
  model: string;
  nodes: number;
  ctxSize: number;
  parallel: number;
  threads: number;
  threadsDefaulted: boolean;
  toolMs: number;
  workload: WorkloadConfig;
}

/** summary.md: settings, the side-by-side table, the ratio per turn, errors, the chart. */
export function routingSummaryMarkdown(info: RoutingRunInfo, ps: readonly PolicySummary[]): string {
  const w = info.workload;
  const lines = [
    "# mesh bench routing",
    "",
    `- date: ${info.date}`,
    `- command: \`${info.command}\``,
    `- machine: ${info.machine.cores} cores, ${info.machine.cpu}, ${info.machine.platform}/${info.machine.arch}`,
    `- mesh: ${info.nodes} \`mesh serve\` nodes on 127.0.0.1, each: ${info.model}, ctx ${info.ctxSize}, ${info.parallel} slots, ${info.threads} thread${info.threads === 1 ? "" : "s"}${info.threadsDefaulted ? ` (the cores shared among the nodes)` : ""}`,
    `- workload: ${w.loops} agent loops started ${w.staggerMs} ms apart, ${w.turns} turns each + 1 exact repeat, ${info.toolMs} ms of tool time before each follow-up; system prefix ~${w.systemTokens} tokens, tool results ~${w.toolResultTokens}, user messages ~${w.userTokens}, ${w.maxTokens} tokens generated per request; seed ${w.seed}`,
    "- every request enters at a node drawn from the seed (the same node for the same request under every policy); policies ran one after the other, each on a fresh mesh, never at the same time",
    "",
    routingMarkdownTable(ps),
    "",
    "## Cached-token ratio per turn",
    "",
    `| turn | ${ps.map((p) => p.policy).join(" | ")} |`,
    `| ---: | ${ps.map(() => "---:").join(" | ")} |`,
    ...Array.from({ length: w.turns }, (_, k) => {
      const cells = ps.map((p) => {
        const row = p.target.cachedByTurn[k];
        return row && row.ratio !== null ? `${(row.ratio * 100).toFixed(1)}% (${row.cachedTokens}/${row.promptTokens})` : "-";
      });
      return `| ${k + 1} | ${cells.join(" | ")} |`;
    }),
    "",
    "## Nodes",
    "",
    ...ps.flatMap((p) => [`- ${p.policy}: ${p.nodes.map((n) => `${n.name} = ${n.id} (${n.url})`).join(", ")}`]),
    "",
  ];
  for (const p of ps) {
    if (p.target.errors.length === 0) continue;
    lines.push(`## Errors under ${p.policy}`, "", ...p.target.errors.map((e) => `- ${e.count} x ${e.message.replaceAll("\n", " ")}`), "");
  }
  lines.push("![cached-token ratio per turn, requests per node, latency](chart.svg)", "");
  return lines.join("\n");
}

// ---- chart.svg ----

const W = 1000;
const LEFT = 70;
const RIGHT = 150;
const PANEL_H = 190;
const GAP = 60;
const POLICY_COLORS: Record<RoutingPolicy, string> = { cache: "#2b6cb0", load: "#dd8a2e" };
const f1 = (x: number) => (Math.round(x * 10) / 10).toString();

interface BarSeries {
  name: string;
  color: string;
  values: Array<number | null>;
}

/** Grouped bars: one group per label, one bar per series; a missing value leaves its slot empty. */
function barPanel(
  y0: number,
  title: string,
  groups: string[],
  series: BarSeries[],
  yMax: number,
  yFmt: (v: number) => string,
  valueFmt: (v: number) => string,
): string[] {
  const w = W - LEFT - RIGHT;
  const out = [
    `<text x="${LEFT}" y="${y0 - 10}" font-size="13" font-weight="bold">${escapeXml(title)}</text>`,
    `<rect x="${LEFT}" y="${y0}" width="${w}" height="${PANEL_H}" fill="#fafafa" stroke="#ccc"/>`,
  ];
  const py = (v: number) => y0 + PANEL_H - (Math.min(Math.max(v, 0), yMax) / yMax) * PANEL_H;
  const step = niceStep(yMax);
  for (let v = 0; v <= yMax + 1e-9; v += step) {
    const y = f1(py(v));
    out.push(`<line x1="${LEFT}" y1="${y}" x2="${LEFT + w}" y2="${y}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${LEFT - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${escapeXml(yFmt(v))}</text>`);
  }
  const gw = w / Math.max(1, groups.length);
  const bw = Math.min(40, (gw * 0.8) / Math.max(1, series.length));
  groups.forEach((g, gi) => {
    const gx = LEFT + gi * gw + (gw - bw * series.length) / 2;
    series.forEach((s, si) => {
      const v = s.values[gi];
      if (v === null || v === undefined) return;
      const x = gx + si * bw;
      const y = py(v);
      out.push(`<rect x="${f1(x)}" y="${f1(y)}" width="${f1(bw - 2)}" height="${f1(y0 + PANEL_H - y)}" fill="${s.color}"/>`);
      out.push(`<text x="${f1(x + (bw - 2) / 2)}" y="${f1(y - 3)}" text-anchor="middle" font-size="9">${escapeXml(valueFmt(v))}</text>`);
    });
    out.push(`<text x="${f1(LEFT + gi * gw + gw / 2)}" y="${y0 + PANEL_H + 15}" text-anchor="middle">${escapeXml(g)}</text>`);
  });
  series.forEach((s, i) => {
    out.push(`<rect x="${LEFT + w + 12}" y="${y0 + i * 18}" width="12" height="12" fill="${s.color}"/>`);
    out.push(`<text x="${LEFT + w + 30}" y="${y0 + i * 18 + 10}">${escapeXml(s.name)}</text>`);
  });
  return out;
}

/** chart.svg: cached-token ratio per turn, requests served per node and latency percentiles, every policy side by side. */
export function renderRoutingChart(ps: readonly PolicySummary[], title: string): string {
  const color = (p: PolicySummary, i: number) => POLICY_COLORS[p.policy] ?? ["#2f855a", "#805ad5"][i % 2];
  const turns = Math.max(0, ...ps.map((p) => p.target.cachedByTurn.length));
  const turnLabels = [...Array.from({ length: turns }, (_, k) => `turn ${k + 1}`), "follow-ups", "repeat"];
  const cacheSeries = ps.map((p, i) => ({
    name: `--routing ${p.policy}`,
    color: color(p, i),
    values: [
      ...Array.from({ length: turns }, (_, k) => p.target.cachedByTurn[k]?.ratio ?? null),
      p.followUp.ratio,
      (() => {
        const rs = p.target.records.filter((r) => r.kind === "repeat" && r.ok && r.usage);
        const prompt = rs.reduce((n, r) => n + (r.usage?.promptTokens ?? 0), 0);
        return ratio(
          rs.reduce((n, r) => n + (r.usage?.cachedTokens ?? 0), 0),
          prompt,
        );
      })(),
    ],
  }));
  const nodes = Math.max(0, ...ps.map((p) => p.nodes.length));
  const nodeLabels = [
    ...Array.from({ length: nodes }, (_, i) => `node ${i + 1}`),
    ...(ps.some((p) => p.servedUnknown > 0) ? ["unknown"] : []),
  ];
  const nodeSeries = ps.map((p, i) => ({
    name: `--routing ${p.policy}`,
    color: color(p, i),
    values: [
      ...Array.from({ length: nodes }, (_, n) => p.nodes[n]?.served ?? null),
      ...(nodeLabels.length > nodes ? [p.servedUnknown] : []),
    ],
  }));
  const served = Math.max(1, ...nodeSeries.flatMap((s) => s.values.map((v) => v ?? 0)));
  const latSeries = ps.map((p, i) => ({
    name: `--routing ${p.policy}`,
    color: color(p, i),
    values: [p.target.ttftMs.p50, p.target.ttftMs.p95, p.target.e2eMs.p50, p.target.e2eMs.p95],
  }));
  const lat = Math.max(1, ...latSeries.flatMap((s) => s.values.map((v) => v ?? 0)));
  const secs = (v: number) => (lat < 2000 ? `${Math.round(v)} ms` : `${f1(v / 1000)} s`);
  const top = 70;
  const body = [
    `<text x="${W / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${escapeXml(title)}</text>`,
    ...barPanel(
      top,
      "cached-token ratio (cached / prompt tokens of successful requests)",
      turnLabels,
      cacheSeries,
      1,
      (v) => `${Math.round(v * 100)}%`,
      (v) => `${Math.round(v * 100)}%`,
    ),
    ...barPanel(
      top + PANEL_H + GAP,
      "requests served per node (x-mesh-served-by)",
      nodeLabels,
      nodeSeries,
      served * 1.15,
      (v) => String(Math.round(v)),
      (v) => String(v),
    ),
    ...barPanel(
      top + 2 * (PANEL_H + GAP),
      "latency of successful requests",
      ["TTFT p50 (streams)", "TTFT p95 (streams)", "end-to-end p50", "end-to-end p95"],
      latSeries,
      lat * 1.15,
      secs,
      secs,
    ),
  ];
  const h = top + 3 * (PANEL_H + GAP);
  return [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${h}" viewBox="0 0 ${W} ${h}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${h}" fill="white"/>`,
    ...body,
    "</svg>",
    "",
  ].join("\n");
}
