// `mesh peers`: who is in the mesh, what they serve, how loaded they are.
import type { PeerRow, PeersReport, RoutingReport } from "../server/mesh-routes";
import { splitLines } from "../split/report";
import { type NodeClientFlags, nodeClient } from "./node-client";
import { UsageError } from "./usage";

/** Options of `mesh peers`. */
export interface PeersOptions extends NodeClientFlags {
  json?: boolean;
  /** true: every 2 s; a string: that many seconds. */
  watch?: boolean | string;
}

function ago(ms: number | null): string {
  if (ms === null) return "-";
  if (ms < 1000) return "now";
  if (ms < 120_000) return `${Math.round(ms / 1000)}s ago`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)}m ago`;
  return `${Math.round(ms / 3_600_000)}h ago`;
}

function kvPercent(r: PeerRow, cells: number): string {
  return r.kv_total > 0 ? `${Math.round((100 * cells) / r.kv_total)}%` : "-";
}

/** A model with the other names it answers to: `qwen (gpt-4o,gpt-4)`. */
function withAliases(id: string, aliases: string[] | undefined): string {
  return aliases && aliases.length > 0 ? `${id} (${aliases.join(",")})` : id;
}

/** The table `mesh peers` prints: one line per member, this node marked with '*'. */
export function formatPeers(report: PeersReport): string {
  const header = ["NODE", "NAME", "ADDRESS", "STATE", "INC", "LAST SEEN", "MODELS", "SLOTS", "KV USED", "CACHED", "RTT"];
  const rows = report.members.map((m) => [
    `${m.id.slice(0, 8)}${m.self ? "*" : ""}`,
    m.name,
    m.addr,
    m.state,
    String(m.incarnation),
    m.self ? "-" : ago(m.last_seen_ms),
    m.models.length > 0 ? m.models.map((id) => withAliases(id, m.aliases?.[id])).join(",") : "-",
    m.slots_total > 0 ? `${m.slots_busy}/${m.slots_total}` : "-",
    kvPercent(m, m.kv_used),
    kvPercent(m, m.kv_cached),
    m.rtt_ms === null ? "-" : `${Math.round(m.rtt_ms)}ms`,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] as string).length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i] as number))
      .join("  ")
      .trimEnd();
  const alive = report.members.filter((m) => m.state === "alive").length;
  return [
    `mesh ${report.mesh_id}: ${alive} of ${report.members.length} members alive`,
    line(header),
    ...rows.map(line),
    ...(report.routing ? routingLines(report.routing) : []),
    ...splitLines(report.stages, report.splits),
  ].join("\n");
}

function bytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

/** What this node's routing did and knows, under the member table. */
function routingLines(r: RoutingReport): string[] {
  const d = r.decisions.byReason;
  const lines = [
    "",
    `routing: ${r.mode === "cache" ? "cache-aware" : "least load"}; decisions by cache ${d.cache}, by load ${d.load}, only candidate ${d.only}, local ${d.local}; ran here ${r.decisions.toSelf}, on peers ${r.decisions.toPeer}`,
  ];
  const index = r.index.map((m) => `${m.model} ${m.entries} prefixes (${bytes(m.bytes)})`);
  lines.push(`index: ${index.length > 0 ? index.join(", ") : "empty"}`);
  if (r.sync) {
    lines.push(
      `sync: ${bytes(r.sync.bytesLastRound)} last round, ${bytes(r.sync.bytesSent)} in all; ${r.sync.unresolved} unresolved hashes; ${r.sync.pendingOps} changes pending`,
    );
  }
  return lines;
}

function watchSeconds(w: boolean | string | undefined): number | null {
  if (w === undefined || w === false) return null;
  if (w === true) return 2;
  const n = Number(w);
  if (!/^\d+(\.\d+)?$/.test(w) || !(n >= 0.5 && n <= 3600)) throw new UsageError(`--watch must be seconds from 0.5 to 3600, got '${w}'`);
  return n;
}

/** Run `mesh peers`; resolves with the exit code. */
export async function peers(o: PeersOptions): Promise<number> {
  const every = watchSeconds(o.watch);
  const node = nodeClient(o);
  const show = async () => {
    const report = (await node.get("/api/peers")) as PeersReport;
    if (o.json) process.stdout.write(`${JSON.stringify(report)}\n`);
    else process.stdout.write(`${every !== null && process.stdout.isTTY ? "\x1b[2J\x1b[H" : ""}${formatPeers(report)}\n`);
  };
  await show(); // a node that is not there fails the command at once, watch or not
  if (every === null) return 0;
  for (;;) {
    await Bun.sleep(every * 1000);
    try {
      await show();
    } catch (e) {
      // While watching, a node that restarts is shown as a line, not the end of the watch.
      process.stderr.write(`mesh: ${(e as Error).message}\n`);
    }
  }
}
