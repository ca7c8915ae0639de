// How split models and stage offers show: /v1/models' `split`, /metrics'
// mesh_split_* families, and the lines `mesh peers` prints.
import { family } from "../server/metrics";
import { SplitEngine, type SplitReport } from "./head";
import type { StageOffer } from "./offer";

export type { SplitReport } from "./head";

/** A stage offer as /api/peers lists it. */
export interface StageOfferRow {
  node_id: string;
  tunnel: string;
  budget: number;
  device: string;
  in_use: boolean;
}

/** The split of an engine that is a split head; null for any other engine. */
export function splitReportOf(engine: unknown): SplitReport | null {
  return engine instanceof SplitEngine ? engine.report() : null;
}

/** Offers as /api/peers lists them. */
export function offerRows(offers: StageOffer[]): StageOfferRow[] {
  return offers.map((o) => ({ node_id: o.nodeId, tunnel: o.tunnel, budget: o.budget, device: o.device.name, in_use: o.inUse }));
}

const esc = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

/** The mesh_split_* metric families of the split models this node heads ("" when none). */
export function renderSplitMetrics(reports: SplitReport[]): string {
  if (reports.length === 0) return "";
  const stageRows = (f: (s: SplitReport["stages"][number]) => number): [string, number][] =>
    reports.flatMap((r) =>
      r.stages.map((s): [string, number] => [`{model="${esc(r.model)}",node="${esc(s.node_id)}",role="${s.role}"}`, f(s)]),
    );
  const byModel = (f: (r: SplitReport) => number): [string, number][] => reports.map((r) => [`{model="${esc(r.model)}"}`, f(r)]);
  return `${[
    family(
      "mesh_split_stage_layers",
      "gauge",
      "Layers of a split model each node holds (the last stage's include the output slot).",
      stageRows((s) => s.layers),
    ),
    family(
      "mesh_split_stage_bytes",
      "gauge",
      "Estimated bytes of a split model each node holds (weights and KV).",
      stageRows((s) => s.bytes),
    ),
    family(
      "mesh_split_serving",
      "gauge",
      "1 while a split model serves over its stages, 0 while it re-plans or runs whole here.",
      byModel((r) => (r.state === "split" ? 1 : 0)),
    ),
    family(
      "mesh_split_stages_lost_total",
      "counter",
      "Stages of a split model lost (died, left or closed the tunnel).",
      byModel((r) => r.stages_lost),
    ),
    family(
      "mesh_split_replans_total",
      "counter",
      "Re-plans of a split model completed after a lost stage.",
      byModel((r) => r.replans),
    ),
  ].join("\n")}\n`;
}

const MiB = 1024 * 1024;

/** The lines `mesh peers` prints about stage offers and the splits this node heads. */
export function splitLines(offers: StageOfferRow[] | undefined, splits: SplitReport[] | undefined): string[] {
  const lines: string[] = [];
  if (offers && offers.length > 0) {
    lines.push(
      "",
      `stage offers: ${offers.map((o) => `${o.node_id.slice(0, 8)} ${Math.round(o.budget / MiB)} MiB ${o.device}${o.in_use ? " (in use)" : ""}`).join(", ")}`,
    );
  }
  for (const r of splits ?? []) {
    const stages = r.stages.map(
      (s) => `${s.node_id.slice(0, 8)} layers ${s.first_layer}-${s.first_layer + s.layers - 1} (${Math.round(s.bytes / MiB)} MiB)`,
    );
    lines.push(
      `split ${r.model} [${r.state}]: ${stages.length > 0 ? stages.join(" -> ") : "whole on this node"}; stages lost ${r.stages_lost}, re-plans ${r.replans}`,
    );
  }
  return lines;
}
