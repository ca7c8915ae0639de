// The soak's chart: RSS of every node process over time (one line per node
// start), with the kills marked, as a standalone SVG.

import type { SoakReport } from "./soak";
import { escapeXml, niceStep } from "./svg";

const W = 900;
const H = 420;
const PAD = { left: 70, right: 160, top: 40, bottom: 50 };
const COLORS = ["#2b6cb0", "#2f855a", "#c05621", "#6b46c1", "#b7791f", "#319795", "#9b2c2c", "#4a5568"];

const f1 = (x: number) => (Math.round(x * 10) / 10).toString();

/** An SVG line chart of `r.rss`: MiB over seconds, kills as dashed lines. */
export function renderSoakChart(r: SoakReport): string {
  const w = W - PAD.left - PAD.right;
  const h = H - PAD.top - PAD.bottom;
  const xMax = Math.max(1, r.elapsedS, ...r.rss.map((s) => s.tS));
  const yMax = Math.max(1, ...r.rss.map((s) => s.rssMiB)) * 1.1;
  const x = (t: number) => f1(PAD.left + (t / xMax) * w);
  const y = (v: number) => f1(PAD.top + h - (v / yMax) * h);
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<text x="${PAD.left}" y="22" font-size="15">${escapeXml(`RSS per node over a ${r.elapsedS} s soak (${r.kills.length} kills)`)}</text>`,
    `<rect x="${PAD.left}" y="${PAD.top}" width="${w}" height="${h}" fill="#fafafa" stroke="#ccc"/>`,
  ];
  const ys = niceStep(yMax);
  for (let v = 0; v <= yMax; v += ys) {
    out.push(`<line x1="${PAD.left}" y1="${y(v)}" x2="${PAD.left + w}" y2="${y(v)}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${PAD.left - 6}" y="${y(v)}" text-anchor="end" dominant-baseline="middle">${f1(v)}</text>`);
  }
  const xs = niceStep(xMax, 8);
  for (let t = 0; t <= xMax; t += xs) out.push(`<text x="${x(t)}" y="${PAD.top + h + 16}" text-anchor="middle">${f1(t)}</text>`);
  out.push(`<text x="${PAD.left + w / 2}" y="${H - 10}" text-anchor="middle">seconds</text>`);
  out.push(`<text x="16" y="${PAD.top + h / 2}" transform="rotate(-90 16 ${PAD.top + h / 2})" text-anchor="middle">RSS (MiB)</text>`);
  for (const k of r.kills) {
    out.push(`<line x1="${x(k.atS)}" y1="${PAD.top}" x2="${x(k.atS)}" y2="${PAD.top + h}" stroke="#c53030" stroke-dasharray="4 3"/>`);
  }
  const names = [...new Set(r.rss.map((s) => s.node))];
  names.forEach((name, i) => {
    const color = COLORS[i % COLORS.length] as string;
    const lives = new Set(r.rss.filter((s) => s.node === name).map((s) => s.life));
    for (const life of lives) {
      const pts = r.rss.filter((s) => s.node === name && s.life === life).map((s) => `${x(s.tS)},${y(s.rssMiB)}`);
      out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${pts.join(" ")}"/>`);
    }
    const ly = PAD.top + 14 + i * 18;
    out.push(`<line x1="${PAD.left + w + 12}" y1="${ly}" x2="${PAD.left + w + 32}" y2="${ly}" stroke="${color}" stroke-width="2"/>`);
    out.push(`<text x="${PAD.left + w + 38}" y="${ly}" dominant-baseline="middle">${escapeXml(name)}</text>`);
  });
  const ly = PAD.top + 14 + names.length * 18;
  out.push(`<line x1="${PAD.left + w + 12}" y1="${ly}" x2="${PAD.left + w + 32}" y2="${ly}" stroke="#c53030" stroke-dasharray="4 3"/>`);
  out.push(`<text x="${PAD.left + w + 38}" y="${ly}" dominant-baseline="middle">kill + restart</text>`);
  out.push("</svg>");
  return `${out.join("\n")}\n`;
}
