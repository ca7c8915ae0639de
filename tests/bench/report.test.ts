import { describe, expect, test } from "bun:test";
import type { DriveResult, RequestRecord } from "../../src/bench/drive";
import { formatTable, isDecodeFailure, markdownTable, summarize } from "../../src/bench/report";
import { requestRecord as rec } from "../helpers/bench";

const u = (promptTokens: number, cachedTokens: number) => ({ promptTokens, cachedTokens, completionTokens: 8 });

function run(records: RequestRecord[], probePromptTokens = 2600): DriveResult {
  return {
    startedAt: "2026-01-01T00:00:00.000Z",
    durationMs: 5000,
    probePromptTokens,
    records,
    samples: [{ tMs: 0, inFlight: 0, done: 0, kv: { running: 0, resident: 10, reserved: 0, free: 90, total: 100 } }],
    before: {
      kv: null,
      evictions: 2,
      evictedCells: 100,
      decodeKvFailures: 1,
      admitted: 0,
      queued: 0,
      rejected: 0,
      cachedPromptTokens: 0,
      hostSaves: 1,
      hostRestores: null,
    },
    after: {
      kv: { running: 0, resident: 50, reserved: 0, free: 50, total: 100 },
      evictions: 5,
      evictedCells: 400,
      decodeKvFailures: 1,
      admitted: 9,
      queued: 3,
      rejected: 0,
      cachedPromptTokens: 100,
      hostSaves: 4,
      hostRestores: 2,
    },
  };
}

const JUDGE = { reuseMinTokens: 2048, repeatMaxSuffixTokens: 256 };

describe("kv-pressure report", () => {
  test("classifies_kv_and_decode_errors_as_decode_failures", () => {
    const base = { ok: false, streamError: false };
    expect(isDecodeFailure({ ...base, status: 503, error: "kv_exhausted: the server ran out of KV cache space" })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "llama_decode failed (code -3)" })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "failed to find a memory slot for batch of size 512" })).toBe(true);
    expect(isDecodeFailure({ ok: false, streamError: true, status: 200, error: "decode_failed: boom" })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "internal server error" })).toBe(false);
    expect(isDecodeFailure({ ...base, status: 429, error: "server_busy: retry" })).toBe(false);
    expect(isDecodeFailure({ ...base, status: 400, error: "context_length_exceeded: the prompt has 9000 tokens (kv)" })).toBe(false);
  });

  test("llama_server_decode_errors_are_decode_failures", () => {
    const base = { ok: false, streamError: false };
    // The texts llama-server's decode() sends for llama_decode returning 1, -1 and < -1.
    expect(isDecodeFailure({ ...base, status: 500, error: "Context size has been exceeded." })).toBe(true);
    expect(isDecodeFailure({ ok: false, streamError: true, status: 200, error: "Context size has been exceeded." })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "Invalid input batch." })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "Compute error." })).toBe(true);
    expect(isDecodeFailure({ ...base, status: 500, error: "decode() failed: Compute error." })).toBe(true);
    // Its refusal of a prompt longer than the context is not a failed decode, whatever the status.
    const tooLong = "request (9000 tokens) exceeds the available context size (8192 tokens), try increasing it";
    expect(isDecodeFailure({ ...base, status: 400, error: tooLong })).toBe(false);
    expect(isDecodeFailure({ ...base, status: 500, error: tooLong })).toBe(false);
    expect(isDecodeFailure({ ...base, status: 500, error: "got exception: boom" })).toBe(false);
  });

  test("a_run_failed_by_llama_server_context_errors_counts_them_as_decode_failures", () => {
    // The shape of the 2026-12-02 acceptance run: 500s, errors inside 200 streams, and a reset connection.
    const error = "Context size has been exceeded.";
    const records = [
      rec({ loop: 0, turn: 0, usage: u(2620, 2571) }),
      ...Array.from({ length: 33 }, (_, i) => rec({ loop: i, turn: 1, ok: false, status: 500, usage: null, error })),
      ...Array.from({ length: 21 }, (_, i) =>
        rec({ loop: i, turn: 2, ok: false, status: 200, stream: true, streamError: true, usage: null, error }),
      ),
      rec({ loop: 0, turn: 3, ok: false, status: 0, usage: null, error: "ECONNRESET: The socket connection was closed unexpectedly." }),
    ];
    const s = summarize("llama-server", "u", "m", 4, { ...run(records), before: null, after: null }, JUDGE);
    expect(s).toMatchObject({ successes: 1, status5xx: 54, transportErrors: 1, decodeFailures: { client: 54, server: null } });
    expect(markdownTable([s])).toContain("| decode failures (client / node) | 54 / - |");
  });

  test("counts_statuses_and_judges_cache_reuse", () => {
    const records = [
      // loop 0: turn 0 reuses the shared prefix, turn 1 reuses the whole previous prompt.
      rec({ loop: 0, turn: 0, usage: u(3000, 2500), stream: true, ttftMs: 50 }),
      rec({ loop: 0, turn: 1, usage: u(4000, 2990), e2eMs: 300 }),
      rec({ loop: 0, turn: 1, kind: "repeat", usage: u(4000, 3999) }),
      // loop 1: turn 0 misses the cache; turn 1 waited out two 429s; the repeat prefilled too much.
      rec({ loop: 1, turn: 0, usage: u(3000, 0) }),
      rec({ loop: 1, turn: 1, usage: u(4000, 2048), attempts: 3, status429: 2 }),
      rec({ loop: 1, turn: 1, kind: "repeat", usage: u(4000, 3000) }),
      // loop 2: a KV failure, a request refused to the end, and one with no answer.
      rec({ loop: 2, turn: 0, ok: false, status: 503, usage: null, error: "kv_exhausted: no KV cache space left 12" }),
      rec({ loop: 2, turn: 1, ok: false, status: 429, usage: null, attempts: 21, status429: 21, error: "server_busy" }),
      rec({ loop: 2, turn: 1, kind: "repeat", ok: false, status: 0, usage: null, error: "ECONNRESET" }),
    ];
    const s = summarize("mesh", "http://x", "m", 2, run(records), JUDGE);
    expect(s).toMatchObject({
      requests: 9,
      attempts: 9 + 2 + 20,
      successes: 6,
      status429: 23,
      gaveUpAfter429: 1,
      status5xx: 1,
      status4xx: 0,
      transportErrors: 1,
      decodeFailures: { client: 1, server: 0 },
      evictions: { count: 3, cells: 300 },
      admissions: { admitted: 9, queued: 3, rejected: 0 },
      hostCache: { saves: 3, restores: null },
      kvCellsTotal: 100,
    });
    expect(s.cachedByTurn).toEqual([
      { turn: 0, requests: 2, promptTokens: 6000, cachedTokens: 2500, ratio: 2500 / 6000 },
      { turn: 1, requests: 2, promptTokens: 8000, cachedTokens: 5038, ratio: 5038 / 8000 },
    ]);
    expect(s.cachedRatio).toBeCloseTo((2500 + 5038) / 14000, 10);
    // Four successful turns, all with >= 2048 reusable tokens; three were served >= 2048 from cache.
    expect(s.samePrefixReuse).toEqual({ minTokens: 2048, eligible: 4, reused: 3, fraction: 0.75 });
    expect(s.exactRepeat).toEqual({ maxSuffixTokens: 256, attempts: 3, passed: 1, suffixPrefill: [1, 1000] });
    expect(s.ttftMs).toEqual({ n: 1, p50: 50, p95: 50 });
    expect(s.e2eMs.n).toBe(6);
    expect(s.errors.map((e) => e.message)).toContain("HTTP 503: kv_exhausted: no KV cache space left N");
  });

  test("a_short_shared_prefix_makes_no_turn_eligible", () => {
    const s = summarize("x", "u", "m", 1, run([rec({ loop: 0, turn: 0, usage: u(500, 400) })], 450), JUDGE);
    expect(s.samePrefixReuse).toEqual({ minTokens: 2048, eligible: 0, reused: 0, fraction: null });
    expect(formatTable([s])).toContain("no eligible turn");
  });

  test("error_list_is_bounded", () => {
    const records = Array.from({ length: 500 }, (_, i) =>
      rec({ loop: i, turn: 0, ok: false, status: 500, usage: null, error: `cause ${String.fromCharCode(65 + (i % 26))}${i % 7}` }),
    );
    const s = summarize("x", "u", "m", 1, run(records), JUDGE);
    expect(s.errors.length).toBeLessThanOrEqual(8);
    expect(s.errors[0]?.count).toBeGreaterThan(1);
  });

  test("table_and_markdown_have_one_column_per_target", () => {
    const a = summarize("mesh", "u", "m", 1, run([rec({ loop: 0, turn: 0 })]), JUDGE);
    const b = summarize("llama-server", "u", "m", 1, run([rec({ loop: 0, turn: 0 })]), JUDGE);
    const md = markdownTable([a, b]).split("\n");
    expect(md[0]).toBe("| figure | mesh | llama-server |");
    for (const line of md) expect(line.split(" | ")).toHaveLength(3);
    const table = formatTable([a, b]).trimEnd().split("\n");
    expect(table[0]).toContain("mesh");
    expect(table[0]).toContain("llama-server");
    expect(new Set(table.map((l) => l.length)).size).toBe(1);
  });
});
