// `mesh models`: the model files of this node and of the mesh: where each
// lives, its size and BLAKE3 hash, and how far a pull has got.
import { formatBytes } from "../hydration/files/limiter";
import type { FilesReport } from "../hydration/files/service";
import { type NodeClientFlags, nodeClient } from "./node-client";

/** Options of `mesh models`. */
export interface ModelsOptions extends NodeClientFlags {
  json?: boolean;
}

/** The table `mesh models` prints: one line per model file, this node's copies and pulls included. */
export function formatModels(r: FilesReport): string {
  const header = ["MODEL", "SIZE", "BLAKE3", "WHERE", "STATUS"];
  const rows: string[][] = [];
  const shown = new Set<string>();
  for (const f of r.mesh) {
    const here = f.holders.some((h) => h.self);
    shown.add(f.hash);
    const names = f.aliases.length > 0 ? `${f.name} (${f.aliases.join(",")})` : f.name;
    const where = f.holders.map((h) => (h.self ? `${h.name}*` : h.name)).join(",");
    rows.push([names, formatBytes(f.size), f.hash.slice(0, 16), where || "-", here ? "here" : "in the mesh"]);
  }
  for (const l of r.local) {
    if (l.state === "announced" && l.hash !== null && shown.has(l.hash)) continue;
    const p = l.progress;
    const status =
      l.state === "hydrating" && p
        ? `pulling ${Math.floor((100 * p.done_bytes) / Math.max(1, p.total_bytes))}% from ${p.sources} source${p.sources === 1 ? "" : "s"}`
        : l.state === "failed"
          ? `failed: ${l.error ?? "?"}`
          : l.state;
    rows.push([l.name, l.size === null ? "-" : formatBytes(l.size), l.hash?.slice(0, 16) ?? "-", l.path, status]);
  }
  if (rows.length === 0) return "no model files in the mesh yet";
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((x) => (x[i] as string).length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i] as number))
      .join("  ")
      .trimEnd();
  return [line(header), ...rows.map(line), "(* this node)"].join("\n");
}

/** Run `mesh models`; resolves with the exit code. */
export async function models(o: ModelsOptions): Promise<number> {
  const c = nodeClient(o);
  const report = (await c.get("/api/files")) as FilesReport;
  process.stdout.write(o.json ? `${JSON.stringify(report)}\n` : `${formatModels(report)}\n`);
  return 0;
}
