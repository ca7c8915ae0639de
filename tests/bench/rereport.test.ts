import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { RequestRecord, Sample } from "../../src/bench/drive";
import { type KvPressureReport, resolveKvPressureOptions, writeReport } from "../../src/bench/kv-pressure";
import { summarize } from "../../src/bench/report";
import { rejudge, withReservedCells } from "../../src/bench/rereport";
import { requestRecord } from "../helpers/bench";
import { xmlProblems } from "../helpers/xml";

// Turns that reused most of their prompt, as the stored runs' did.
const rec = (p: Parameters<typeof requestRecord>[0]): RequestRecord =>
  requestRecord({ usage: { promptTokens: 3000, cachedTokens: 2500, completionTokens: 32 }, ...p });

// A sample as reports before reserved cells were recorded stored it.
const oldSample = (tMs: number, running: number, resident: number, free: number) =>
  ({ tMs, inFlight: 1, done: 0, kv: { running, resident, free, total: running + resident + free } }) as unknown as Sample;

/** A stored two-target report as the bench wrote it before llama-server's decode errors were recognised. */
function storedReport(): KvPressureReport {
  const judge = { reuseMinTokens: 2048, repeatMaxSuffixTokens: 256 };
  const error = "Context size has been exceeded.";
  const llama = summarize(
    "llama-server",
    "http://127.0.0.1:2",
    "m",
    6,
    {
      startedAt: "2026-12-02T05:40:00.000Z",
      durationMs: 1000,
      probePromptTokens: 2600,
      records: [
        rec({ loop: 0, turn: 0 }),
        rec({ loop: 1, turn: 0, ok: false, status: 500, usage: null, error }),
        rec({ loop: 2, turn: 0, ok: false, status: 200, stream: true, streamError: true, usage: null, error }),
      ],
      samples: [{ tMs: 0, inFlight: 3, done: 0, kv: null }],
      before: null,
      after: null,
    },
    judge,
  );
  const mesh = summarize(
    "mesh",
    "http://127.0.0.1:1",
    "m",
    6,
    {
      startedAt: "2026-12-02T05:38:00.000Z",
      durationMs: 1000,
      probePromptTokens: 2600,
      records: [rec({ loop: 0, turn: 0 })],
      samples: [oldSample(0, 0, 2881, 5311), oldSample(1000, 3638, 0, 4522), oldSample(2000, 5686, 0, 1584)],
      before: null,
      after: null,
    },
    judge,
  );
  const { apiKey: _k, ...config } = resolveKvPressureOptions({ compare: "llama-server", out: "/tmp/never" });
  return {
    kind: "mesh-bench-kv-pressure",
    version: 1,
    date: "2026-12-02T05:43:04.243Z",
    command: "mesh bench kv-pressure --compare llama-server",
    machine: { cpu: "cpu", cores: 2, platform: "linux", arch: "x64" },
    order: "sequential",
    config: { ...config, modelPath: "/m.gguf" },
    estimatedLastPromptTokens: 7000,
    targets: [
      // What /metrics gave is kept as stored; the old classification counted no decode failure.
      { ...mesh, kvCellsTotal: 8192, evictions: { count: 42, cells: 135444 }, admissions: { admitted: 56, queued: 53, rejected: 0 } },
      { ...llama, decodeFailures: { client: 0, server: null } },
    ],
  };
}

describe("kv-pressure re-report", () => {
  test("old_samples_get_the_pool_as_total_and_the_missing_cells_as_reserved", () => {
    const s = withReservedCells([oldSample(0, 0, 2881, 5311), oldSample(1, 5686, 0, 1584)], 8192);
    expect(s.map((x) => x.kv)).toEqual([
      { running: 0, resident: 2881, reserved: 0, free: 5311, total: 8192 },
      { running: 5686, resident: 0, reserved: 922, free: 1584, total: 8192 },
    ]);
    const current: Sample = { tMs: 0, inFlight: 0, done: 0, kv: { running: 1, resident: 2, reserved: 3, free: 4, total: 10 } };
    expect(withReservedCells([current], 8192)).toEqual([current]);
  });

  test("a_stored_report_is_judged_again_from_its_records", () => {
    const r = rejudge(storedReport(), new Date("2026-12-03T00:00:00.000Z"));
    const [mesh, llama] = r.targets;
    expect(llama?.decodeFailures).toEqual({ client: 2, server: null });
    expect(llama?.status5xx).toBe(2);
    expect(mesh?.evictions).toEqual({ count: 42, cells: 135444 });
    expect(mesh?.admissions).toEqual({ admitted: 56, queued: 53, rejected: 0 });
    expect(mesh?.kvCellsTotal).toBe(8192);
    expect(mesh?.samples.every((s) => s.kv?.total === 8192)).toBe(true);
    expect(r.rejudgedAt).toBe("2026-12-03T00:00:00.000Z");

    const out = mkdtempSync(join(tmpdir(), "mesh-rereport-"));
    try {
      writeReport(out, r);
      const md = readFileSync(join(out, "summary.md"), "utf8");
      expect(md).toContain("| decode failures (client / node) | 0 / - | 2 / - |");
      expect(md).toContain("computed again on 2026-12-03T00:00:00.000Z");
      expect(JSON.parse(readFileSync(join(out, "summary.json"), "utf8"))).toEqual(JSON.parse(JSON.stringify(r)));
      expect(xmlProblems(readFileSync(join(out, "chart.svg"), "utf8"))).toEqual([]);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});
