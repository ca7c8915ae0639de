import { describe, expect, test } from "bun:test";
import { delta, MAX_METRICS_BYTES, MAX_METRICS_LINES, metricValue, nodeFigures, parsePrometheus, scrape } from "../../src/bench/scrape";
import { type GaugeValues, Metrics } from "../../src/server/metrics";

// Engine figures as /metrics renders them: the ones given, every other one 0
// (so the engine can gain figures without this test listing them).
function stats(given: Partial<GaugeValues>): GaugeValues {
  return new Proxy(given, { get: (t, k) => (t as Record<string | symbol, unknown>)[k] ?? 0 }) as GaugeValues;
}

const NEW_NAMES = `mesh_kv_cells_total 1024
# HELP mesh_kv_cells KV cells by state
# TYPE mesh_kv_cells gauge
mesh_kv_cells{state="running"} 300
mesh_kv_cells{state="resident"} 200
mesh_kv_cells{state="reserved"} 124
mesh_kv_cells{state="free"} 400
mesh_admissions_total{result="admitted"} 10
mesh_admissions_total{result="queued"} 4
mesh_admissions_total{result="rejected"} 1
mesh_kv_evictions_total 3
mesh_kv_evicted_cells_total 700
mesh_decode_kv_failures_total 0
mesh_prompt_tokens_cached_total 12345
mesh_host_cache_operations_total{op="save"} 6
mesh_host_cache_operations_total{op="restore"} 5
mesh_http_requests_total{route="/v1/chat/completions",status="200"} 9
mesh_http_requests_total{route="/v1/chat/completions",status="429"} 2
`;

const OLD_NAMES = `mesh_kv_cells_used 500
mesh_kv_cells_running 300
mesh_kv_cells_total 1024
mesh_decode_failures 2
mesh_cached_prompt_tokens_total 77
`;

describe("metrics scrape", () => {
  test("parses_labels_and_sums_matching_series", () => {
    const s = parsePrometheus(NEW_NAMES);
    expect(metricValue(s, "mesh_http_requests_total")).toBe(11);
    expect(metricValue(s, "mesh_http_requests_total", { status: "429" })).toBe(2);
    expect(metricValue(s, "mesh_nothing")).toBeNull();
    expect(parsePrometheus('x{a="q\\"uote"} 1')[0]?.labels.a).toBe('q"uote');
  });

  test("reads_kv_cells_and_admissions_from_the_current_names", () => {
    const f = nodeFigures(parsePrometheus(NEW_NAMES));
    // The pool is mesh_kv_cells_total, reserved cells included (running + resident + free is only 900).
    expect(f.kv).toEqual({ running: 300, resident: 200, reserved: 124, free: 400, total: 1024 });
    expect(f).toMatchObject({
      evictions: 3,
      evictedCells: 700,
      decodeKvFailures: 0,
      admitted: 10,
      queued: 4,
      rejected: 1,
      cachedPromptTokens: 12345,
      hostSaves: 6,
      hostRestores: 5,
    });
  });

  test("the_pool_is_what_mesh_serve_publishes_as_mesh_kv_cells_total", () => {
    const g = stats({ kvCellsRunning: 3000, kvCellsResident: 1000, kvCellsReserved: 2500, kvCellsFree: 1692, kvCellsTotal: 8192 });
    const f = nodeFigures(parsePrometheus(new Metrics().render(g)));
    expect(f.kv).toEqual({ running: 3000, resident: 1000, reserved: 2500, free: 1692, total: 8192 });
  });

  test("without_mesh_kv_cells_total_the_pool_is_every_state_added_up", () => {
    const f = nodeFigures(parsePrometheus(NEW_NAMES.replace("mesh_kv_cells_total 1024\n", "")));
    expect(f.kv?.total).toBe(1024);
  });

  test("reads_kv_cells_from_the_first_generation_of_names", () => {
    const f = nodeFigures(parsePrometheus(OLD_NAMES));
    expect(f.kv).toEqual({ running: 300, resident: 200, reserved: 0, free: 524, total: 1024 });
    expect(f.decodeKvFailures).toBe(2);
    expect(f.cachedPromptTokens).toBe(77);
    expect(f.evictions).toBeNull();
  });

  test("a_target_without_mesh_metrics_has_no_figures", () => {
    const f = nodeFigures(parsePrometheus("llamacpp:requests_processing 2\nnot a metric line\n"));
    expect(f.kv).toBeNull();
    expect(f.decodeKvFailures).toBeNull();
  });

  test("parsing_stops_at_the_line_cap", () => {
    const text = Array.from({ length: MAX_METRICS_LINES + 5000 }, (_, i) => `m{i="${i}"} 1`).join("\n");
    expect(parsePrometheus(text)).toHaveLength(MAX_METRICS_LINES);
  });

  test("scrape_reads_at_most_the_byte_cap_of_a_huge_metrics_page", async () => {
    const filler = "x".repeat(100);
    const padding = Array.from({ length: Math.ceil((MAX_METRICS_BYTES * 2) / 120) }, (_, i) => `pad_${i} 1 # ${filler}`).join("\n");
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        const path = new URL(req.url).pathname;
        if (path === "/metrics") return new Response(`${NEW_NAMES}${padding}\nmesh_kv_evictions_total 999\n`);
        return new Response("not found", { status: 404 });
      },
    });
    try {
      const f = await scrape(`http://127.0.0.1:${server.port}`);
      expect(f?.kv).toEqual({ running: 300, resident: 200, reserved: 124, free: 400, total: 1024 });
      // The line past the cap was never read.
      expect(f?.evictions).toBe(3);
      const none = await scrape(`http://127.0.0.1:${server.port}/nothing-here`);
      expect(none).toBeNull();
    } finally {
      server.stop(true);
    }
  });

  test("delta_is_unknown_when_either_side_is", () => {
    expect(delta(3, 10)).toBe(7);
    expect(delta(null, 10)).toBeNull();
    expect(delta(3, undefined)).toBeNull();
  });
});
