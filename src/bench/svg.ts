// chart.svg of a kv-pressure run, written by hand (no plotting dependency):
// per target, KV cells over time (running, resident and reserved, stacked,
// against the pool) and request latency over time (end-to-end, time to first token,
// failures), on one time axis shared by all targets.

import type { TargetSummary } from "./report";

const W = 1000;
const PANEL_H = 170;
const GAP = 34;
const LEFT = 70;
const RIGHT = 150;
const TITLE_H = 28;
const COLORS = {
  running: "#2b6cb0",
  resident: "#dd8a2e",
  reserved: "#a0aec0",
  total: "#444",
  e2e: "#2f855a",
  ttft: "#805ad5",
  failed: "#c53030",
};

/** Text safe inside an SVG element or attribute. */
export function escapeXml(s: string): string {
  return s.replace(/[<>&"']/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&apos;" })[c] as string);
}

/** A round step for about `count` axis ticks up to `max`. */
export function niceStep(max: number, count = 4): number {
  if (!(max > 0)) return 1;
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
}

const f1 = (x: number) => (Math.round(x * 10) / 10).toString();

interface Panel {
  x0: number;
  y0: number;
  w: number;
  h: number;
  xMax: number;
  yMax: number;
}

const px = (p: Panel, t: number) => p.x0 + (Math.min(t, p.xMax) / p.xMax) * p.w;
const py = (p: Panel, v: number) => p.y0 + p.h - (Math.min(v, p.yMax) / p.yMax) * p.h;

function axes(p: Panel, yLabel: string, yFmt: (v: number) => string): string[] {
  const out = [`<rect x="${p.x0}" y="${p.y0}" width="${p.w}" height="${p.h}" fill="#fafafa" stroke="#ccc"/>`];
  const ys = niceStep(p.yMax);
  for (let v = 0; v <= p.yMax + 1e-9; v += ys) {
    const y = f1(py(p, v));
    out.push(`<line x1="${p.x0}" y1="${y}" x2="${p.x0 + p.w}" y2="${y}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${p.x0 - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${escapeXml(yFmt(v))}</text>`);
  }
  const xs = niceStep(p.xMax / 1000, 8) * 1000;
  for (let t = 0; t <= p.xMax + 1e-9; t += xs) {
    const x = f1(px(p, t));
    out.push(`<line x1="${x}" y1="${p.y0 + p.h}" x2="${x}" y2="${p.y0 + p.h + 4}" stroke="#888"/>`);
    out.push(`<text x="${x}" y="${p.y0 + p.h + 15}" text-anchor="middle">${f1(t / 1000)} s</text>`);
  }
  out.push(`<text transform="translate(${p.x0 - 52} ${p.y0 + p.h / 2}) rotate(-90)" text-anchor="middle">${escapeXml(yLabel)}</text>`);
  return out;
}

function legend(x: number, y: number, items: Array<[string, string]>): string[] {
  return items.flatMap(([color, label], i) => [
    `<rect x="${x}" y="${y + i * 18}" width="12" height="12" fill="${color}"/>`,
    `<text x="${x + 18}" y="${y + i * 18 + 10}">${escapeXml(label)}</text>`,
  ]);
}

function inFlightPanel(t: TargetSummary, p: Panel): string[] {
  const out = axes(p, "in flight", (v) => String(Math.round(v)));
  // A step line: the count holds until the next sample.
  const pts = t.samples.flatMap((s, i) => {
    const prev = t.samples[i - 1];
    const here = `${f1(px(p, s.tMs))},${f1(py(p, s.inFlight))}`;
    return prev ? [`${f1(px(p, s.tMs))},${f1(py(p, prev.inFlight))}`, here] : [here];
  });
  out.push(`<polyline points="${pts.join(" ")}" fill="none" stroke="${COLORS.running}" stroke-width="1.5"/>`);
  out.push(
    `<text x="${p.x0 + p.w / 2}" y="${p.y0 + 14}" text-anchor="middle" fill="#777">no KV metrics from this target: requests in flight (client side)</text>`,
  );
  out.push(...legend(p.x0 + p.w + 12, p.y0, [[COLORS.running, "requests in flight"]]));
  return out;
}

function kvPanel(t: TargetSummary, p: Panel): string[] {
  const pts = t.samples.filter((s) => s.kv !== null);
  if (pts.length === 0) return inFlightPanel(t, { ...p, yMax: Math.max(1, ...t.samples.map((s) => s.inFlight)) * 1.1 });
  const out = axes(p, "KV cells", (v) => String(Math.round(v)));
  const base = py(p, 0);
  const poly = (vals: Array<[number, number]>, lower: Array<[number, number]>) =>
    [...vals, ...lower.reverse()].map(([x, y]) => `${f1(x)},${f1(y)}`).join(" ");
  const running = pts.map((s) => [px(p, s.tMs), py(p, s.kv?.running ?? 0)] as [number, number]);
  const stacked = pts.map((s) => [px(p, s.tMs), py(p, (s.kv?.running ?? 0) + (s.kv?.resident ?? 0))] as [number, number]);
  const promised = pts.map(
    (s) => [px(p, s.tMs), py(p, (s.kv?.running ?? 0) + (s.kv?.resident ?? 0) + (s.kv?.reserved ?? 0))] as [number, number],
  );
  const floor = pts.map((s) => [px(p, s.tMs), base] as [number, number]);
  out.push(`<polygon points="${poly(promised, [...stacked])}" fill="${COLORS.reserved}" fill-opacity="0.6"/>`);
  out.push(`<polygon points="${poly(stacked, [...running])}" fill="${COLORS.resident}" fill-opacity="0.7"/>`);
  out.push(`<polygon points="${poly(running, floor)}" fill="${COLORS.running}" fill-opacity="0.8"/>`);
  const total = pts.map((s) => `${f1(px(p, s.tMs))},${f1(py(p, s.kv?.total ?? 0))}`).join(" ");
  out.push(`<polyline points="${total}" fill="none" stroke="${COLORS.total}" stroke-dasharray="4 3"/>`);
  out.push(
    ...legend(p.x0 + p.w + 12, p.y0, [
      [COLORS.running, "running"],
      [COLORS.resident, "resident prefixes"],
      [COLORS.reserved, "reserved (growth)"],
      [COLORS.total, "pool (dashed)"],
    ]),
  );
  return out;
}

function latencyPanel(t: TargetSummary, p: Panel): string[] {
  const out = axes(p, "latency", (v) => (p.yMax < 2000 ? `${Math.round(v)} ms` : `${f1(v / 1000)} s`));
  for (const r of t.records) {
    if (r.ok) {
      out.push(`<circle cx="${f1(px(p, r.endMs))}" cy="${f1(py(p, r.e2eMs))}" r="2.5" fill="${COLORS.e2e}"/>`);
      if (r.ttftMs !== null) {
        const x = f1(px(p, r.startMs + r.ttftMs));
        const y = py(p, r.ttftMs);
        out.push(`<rect x="${x}" y="${f1(y - 2)}" width="4" height="4" fill="${COLORS.ttft}"/>`);
      }
    } else {
      const x = px(p, r.endMs);
      const y = py(p, r.e2eMs);
      out.push(
        `<path d="M${f1(x - 3)},${f1(y - 3)} L${f1(x + 3)},${f1(y + 3)} M${f1(x - 3)},${f1(y + 3)} L${f1(x + 3)},${f1(y - 3)}" stroke="${COLORS.failed}" stroke-width="1.5"/>`,
      );
    }
  }
  out.push(
    ...legend(p.x0 + p.w + 12, p.y0, [
      [COLORS.e2e, "end-to-end"],
      [COLORS.ttft, "first token (streams)"],
      [COLORS.failed, "failed request"],
    ]),
  );
  return out;
}

/** The chart as an SVG document. */
export function renderChart(targets: TargetSummary[], title: string): string {
  const xMax = Math.max(1000, ...targets.map((t) => t.durationMs), ...targets.flatMap((t) => t.records.map((r) => r.endMs)));
  const blockH = TITLE_H + PANEL_H * 2 + GAP * 2;
  const h = 40 + targets.length * blockH;
  const pw = W - LEFT - RIGHT;
  const body: string[] = [`<text x="${W / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">${escapeXml(title)}</text>`];
  // One scale per panel kind across targets, so targets compare at a glance.
  const kvMax = Math.max(
    1,
    ...targets.flatMap((t) => t.samples.map((s) => (s.kv ? Math.max(s.kv.total, s.kv.running + s.kv.resident + s.kv.reserved) : 0))),
  );
  const latMax = Math.max(1, ...targets.flatMap((t) => t.records.map((r) => r.e2eMs)));
  targets.forEach((t, i) => {
    const top = 40 + i * blockH;
    body.push(`<text x="${LEFT}" y="${top + 18}" font-size="14" font-weight="bold">${escapeXml(`${t.name} (${t.url})`)}</text>`);
    body.push(...kvPanel(t, { x0: LEFT, y0: top + TITLE_H, w: pw, h: PANEL_H, xMax, yMax: kvMax * 1.05 }));
    body.push(...latencyPanel(t, { x0: LEFT, y0: top + TITLE_H + PANEL_H + GAP, w: pw, h: PANEL_H, xMax, yMax: latMax * 1.05 }));
  });
  return [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${h}" viewBox="0 0 ${W} ${h}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${h}" fill="white"/>`,
    ...body,
    "</svg>",
    "",
  ].join("\n");
}
