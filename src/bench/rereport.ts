// Judging a stored kv-pressure run again with the current report code, without
// running anything: every figure that comes from the stored request records
// and samples is computed again, and summary.json, summary.md and chart.svg are
// rewritten. What came from a target's /metrics counters (evictions,
// admissions, host-RAM operations, the node's decode failures) cannot be
// recomputed (only their increase was stored) and is kept as it was.
//
//   bun run src/bench/rereport.ts <run dir or summary.json> [--out DIR]

import { readFileSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { Sample } from "./drive";
import { type KvPressureReport, writeReport } from "./kv-pressure";
import { summarize, type TargetSummary } from "./report";

/**
 * Samples of reports written before reserved cells were recorded: their total
 * was running + resident + free, short by the reserved cells. A node's pool
 * does not change size while it runs, so the pool is the largest total seen
 * (the last scrape, with nothing running, has none reserved) and the cells
 * missing from a sample were the reserved ones.
 */
export function withReservedCells(samples: Sample[], kvCellsTotal: number | null): Sample[] {
  const pool = Math.max(kvCellsTotal ?? 0, ...samples.map((s) => s.kv?.total ?? 0));
  return samples.map((s) => {
    if (!s.kv || typeof (s.kv as { reserved?: unknown }).reserved === "number") return s;
    const { running, resident, free } = s.kv;
    return { ...s, kv: { running, resident, reserved: Math.max(0, pool - running - resident - free), free, total: pool } };
  });
}

/** One target's summary computed again from its stored records and samples; /metrics-derived figures kept. */
export function rejudgeTarget(
  t: TargetSummary,
  turns: number,
  judge: { reuseMinTokens: number; repeatMaxSuffixTokens: number },
): TargetSummary {
  const samples = withReservedCells(t.samples, t.kvCellsTotal);
  const fresh = summarize(
    t.name,
    t.url,
    t.model,
    turns,
    {
      startedAt: t.startedAt,
      durationMs: t.durationMs,
      probePromptTokens: t.probePromptTokens,
      records: t.records,
      samples,
      before: null,
      after: null,
    },
    judge,
  );
  return {
    ...fresh,
    decodeFailures: { client: fresh.decodeFailures.client, server: t.decodeFailures.server },
    evictions: t.evictions,
    admissions: t.admissions,
    hostCache: t.hostCache,
    kvCellsTotal: t.kvCellsTotal,
  };
}

/** A stored report judged again by the current code, stamped with when. */
export function rejudge(r: KvPressureReport, now = new Date()): KvPressureReport {
  const judge = { reuseMinTokens: r.config.reuseMinTokens, repeatMaxSuffixTokens: r.config.repeatMaxSuffixTokens };
  return { ...r, targets: r.targets.map((t) => rejudgeTarget(t, r.config.workload.turns, judge)), rejudgedAt: now.toISOString() };
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: { out: { type: "string" } }, allowPositionals: true });
  const from = positionals[0];
  if (!from || positionals.length > 1) {
    process.stderr.write("usage: bun run src/bench/rereport.ts <run dir or summary.json> [--out DIR]\n");
    return 2;
  }
  const file = statSync(from).isDirectory() ? join(from, "summary.json") : from;
  const report = JSON.parse(readFileSync(file, "utf8")) as KvPressureReport;
  if (report.kind !== "mesh-bench-kv-pressure") throw new Error(`${file} is not a kv-pressure summary.json`);
  const out = resolve(values.out ?? dirname(file));
  writeReport(out, rejudge(report));
  process.stderr.write(`wrote ${join(out, "summary.json")}, summary.md and chart.svg\n`);
  return 0;
}

if (import.meta.main) process.exitCode = await main(process.argv.slice(2));
