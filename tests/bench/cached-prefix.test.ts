// The engine bench's cached-prefix table: its arithmetic, its flags, and one
// real run on the tiny model, mesh only (llama-server is not built in CI).
// Checks what was measured and reported; never how fast anything is.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { type CellSamples, cellKey, formatBusyTable, formatPhaseBreakdown, tableCells, tableFigures } from "../../src/bench/cached-prefix";
import { formatEngineBenchTable, parseEngineBenchArgs, runEngineBench } from "../../src/bench/engine";
import { TINY } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";

const ROOT = join(import.meta.dir, "..", "..");

function cli(...args: string[]) {
  const r = Bun.spawnSync([process.execPath, "run", "src/bench/engine.ts", ...args], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  return { code: r.exitCode, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

const samples = (clean: number[], dirty: number[], busy: number[] = []): CellSamples => ({
  clean,
  dirty,
  busy,
  cleanCached: clean.map(() => 100),
  dirtyCached: dirty.map(() => 100),
  busyCached: busy.map(() => 100),
  cleanPhases: [],
  dirtyPhases: [],
  busyPhases: [],
});

describe("cached-prefix table", () => {
  test("cells_cross_every_prefix_with_every_suffix_in_table_order", () => {
    expect(tableCells([2048, 8192], [16, 256]).map(cellKey)).toEqual(["2048+16", "2048+256", "8192+16", "8192+256"]);
  });

  test("figures_are_medians_paired_ratios_in_mesh_favour_and_dirty_over_clean", () => {
    const cells = tableCells([100], [10]);
    const mesh = new Map([["100+10", samples([10, 20, 30], [40, 40, 40])]]);
    const llama = new Map([["100+10", samples([20, 20, 90], [40, 80, 20])]]);
    const [f] = tableFigures(cells, mesh, llama, new Map([["100+10", 5]]));
    expect(f?.mesh.clean).toBe(20);
    expect(f?.llamaServer?.clean).toBe(20);
    expect(f?.ratioClean).toBe(1);
    // Per repeat: 20/10, 20/20, 90/30 -> 2, 1, 3: median 2.
    expect(f?.pairedClean).toBe(2);
    // Per repeat: 1, 2, 0.5 -> median 1.
    expect(f?.pairedDirty).toBe(1);
    expect(f?.meshDirtyOverClean).toBe(2);
    expect(f?.meshOverFloor).toBe(4);
  });

  test("busy_figures_are_medians_and_paired_ratios_and_the_busy_table_lists_only_measured_cells", () => {
    const cells = tableCells([100], [10, 20]);
    const mesh = new Map([
      ["100+10", samples([10, 20, 30], [], [30, 40, 50])],
      ["100+20", samples([10], [])],
    ]);
    const llama = new Map([
      ["100+10", samples([20, 20, 90], [], [60, 40, 100])],
      ["100+20", samples([10], [])],
    ]);
    const figures = tableFigures(cells, mesh, llama, null);
    expect(figures[0]).toMatchObject({ ratioBusy: 60 / 40, pairedBusy: 2, meshBusyOverClean: 2 });
    expect(figures[0]?.mesh.busy).toBe(40);
    expect(figures[1]).toMatchObject({ ratioBusy: null, pairedBusy: null, meshBusyOverClean: null });
    const text = formatBusyTable({ layer: "engine", cells: figures });
    expect(text).toContain("| 100 + 10 | 20.0 | 40.0 | 20.0 | 60.0 | 1.50x (2.00x) | 2.00x |");
    expect(text).not.toContain("| 100 + 20 |");
    expect(formatBusyTable({ layer: "engine", cells: figures.slice(1) })).toBe("");
  });

  test("flags_parse_lists_and_reject_bad_ones", () => {
    const { options } = parseEngineBenchArgs(["--table", "--prefixes", "2048,4096", "--suffixes", "16", "--no-dirty", "--table-only"]);
    expect(options).toMatchObject({ table: true, prefixes: [2048, 4096], suffixes: [16], dirty: false, figures: false });
    expect(parseEngineBenchArgs(["--table", "--busy"]).options).toMatchObject({ busy: true });
    expect(parseEngineBenchArgs(["--table"]).options.busy).toBeUndefined();
    expect(() => parseEngineBenchArgs(["--table", "--prefixes", "2k"])).toThrow(/--prefixes takes comma-separated whole numbers/);
    expect(() => parseEngineBenchArgs(["--table-only"])).toThrow(/need --table/);
    // The context grows to fit the largest cell unless it was given.
    expect(() => parseEngineBenchArgs(["--table", "--ctx", "4096"])).toThrow(/needs --ctx >=/);
  });

  test("cli_rejects_a_bad_suffix_list_with_one_line_and_exit_2", () => {
    const r = cli("--table", "--suffixes", "16,,256");
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toContain("--suffixes");
  });

  test("tiny_table_run_without_compare_measures_clean_dirty_busy_floor_and_phases", async () => {
    const lines: string[] = [];
    const report = await runEngineBench({
      model: await ensureModel(TINY),
      compare: false,
      threads: 1,
      parallel: 2,
      genTokens: 4,
      repeats: 1,
      table: true,
      figures: false,
      prefixes: [96],
      suffixes: [8],
      busy: true,
      onProgress: (s) => lines.push(s),
    });
    expect(report.figures).toEqual([]);
    expect(report.tables.map((t) => t.layer)).toEqual(["engine"]);
    const [cell] = report.tables[0]?.cells ?? [];
    expect(cell).toMatchObject({ prefix: 96, suffix: 8, llamaServer: null, ratioClean: null });
    expect(cell?.mesh.samples.clean).toHaveLength(1);
    expect(cell?.mesh.samples.dirty).toHaveLength(1);
    // The prefix came from cache both times: clean (still resident) and dirty (saved while others ran).
    expect(cell?.mesh.samples.cleanCached[0]).toBeGreaterThanOrEqual(96);
    expect(cell?.mesh.samples.dirtyCached[0]).toBeGreaterThanOrEqual(96);
    // Busy: the turn arrived while the other stream decoded, and still found its prefix.
    expect(cell?.mesh.samples.busy).toHaveLength(1);
    expect(cell?.mesh.samples.busyCached[0]).toBeGreaterThanOrEqual(96);
    expect(lines.some((l) => l.startsWith("mesh: 96+8 busy:"))).toBe(true);
    expect(cell?.mesh.samples.cleanPhases).toHaveLength(1);
    expect(typeof cell?.floorMs).toBe("number");
    expect(lines.some((l) => l.startsWith("floor: 96+8:"))).toBe(true);
    const text = formatEngineBenchTable(report);
    expect(text).toContain("| 96 + 8 |");
    expect(formatPhaseBreakdown(report.tables[0] as never)).toContain("| 96 + 8 | dirty |");
    expect(formatPhaseBreakdown(report.tables[0] as never)).toContain("| 96 + 8 | busy |");
    expect(text).toContain("| engine, busy: prefix + suffix |");
  });
});
