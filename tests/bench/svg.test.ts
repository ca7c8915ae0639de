import { describe, expect, test } from "bun:test";
import type { RequestRecord, Sample } from "../../src/bench/drive";
import type { TargetSummary } from "../../src/bench/report";
import { nodeFigures, parsePrometheus } from "../../src/bench/scrape";
import { escapeXml, niceStep, renderChart } from "../../src/bench/svg";
import { xmlProblems } from "../helpers/xml";

function target(name: string, withKv: boolean): TargetSummary {
  const samples: Sample[] = Array.from({ length: 20 }, (_, i) => ({
    tMs: i * 500,
    inFlight: i % 4,
    done: i,
    kv: withKv
      ? { running: 100 * (i % 5), resident: 50 * (i % 3), reserved: 20 * (i % 5), free: 1024 - 120 * (i % 5) - 50 * (i % 3), total: 1024 }
      : null,
  }));
  const records = Array.from(
    { length: 12 },
    (_, i) =>
      ({
        loop: i % 3,
        turn: i % 4,
        kind: "turn",
        stream: i % 2 === 0,
        startMs: i * 700,
        endMs: i * 700 + 900,
        attempts: 1,
        status429: 0,
        waitedMs: 0,
        status: i === 5 ? 503 : 200,
        ok: i !== 5,
        ttftMs: i % 2 === 0 ? 120 : null,
        e2eMs: 900,
        usage: null,
        error: i === 5 ? "kv" : null,
        streamError: false,
      }) satisfies RequestRecord,
  );
  return { name, url: "http://127.0.0.1:1", samples, records, durationMs: 10_000 } as TargetSummary;
}

describe("kv-pressure chart", () => {
  test("chart_is_well_formed_svg_with_a_block_per_target", () => {
    const svg = renderChart([target("mesh <&> 'x'", true), target("llama-server", false)], 'title "quoted" & <b>');
    expect(xmlProblems(svg)).toEqual([]);
    expect(svg).toStartWith('<?xml version="1.0"');
    expect(svg).toContain('<svg xmlns="http://www.w3.org/2000/svg"');
    expect(svg).toContain("mesh &lt;&amp;&gt; &apos;x&apos;");
    expect(svg).toContain("no KV metrics from this target");
    // Stacked KV areas (running, resident, reserved) for the target that publishes them, one failure mark.
    expect(svg.match(/<polygon /g)?.length).toBe(3);
    expect(svg.match(/stroke="#c53030"/g)?.length).toBe(2);
    expect(svg).not.toContain("NaN");
  });

  test("the_pool_line_stays_at_the_pool_size_while_cells_are_reserved", () => {
    // Samples as the bench reads them from mesh's /metrics, with cells promised to running requests.
    const samples: Sample[] = [0, 300, 700, 200].map((reserved, i) => {
      const running = 200 + 100 * i;
      const text = [
        "mesh_kv_cells_total 1024",
        `mesh_kv_cells{state="running"} ${running}`,
        'mesh_kv_cells{state="resident"} 100',
        `mesh_kv_cells{state="reserved"} ${reserved}`,
        `mesh_kv_cells{state="free"} ${Math.max(0, 1024 - running - 100 - reserved)}`,
      ].join("\n");
      return { tMs: i * 1000, inFlight: 1, done: i, kv: nodeFigures(parsePrometheus(text)).kv };
    });
    const svg = renderChart([{ ...target("mesh", true), samples }], "t");
    const pool = /<polyline points="([^"]+)" fill="none" stroke="#444" stroke-dasharray/.exec(svg)?.[1];
    if (!pool) throw new Error("no pool line");
    const ys = new Set(pool.split(" ").map((pt) => pt.split(",")[1]));
    expect(ys.size).toBe(1);
    expect(svg).toContain("reserved (growth)");
  });

  test("empty_targets_still_give_a_valid_chart", () => {
    const empty = { ...target("mesh", true), samples: [], records: [], durationMs: 0 };
    const svg = renderChart([empty], "t");
    expect(xmlProblems(svg)).toEqual([]);
    expect(svg).not.toContain("NaN");
    expect(svg).not.toContain("Infinity");
  });

  test("the_well_formedness_check_catches_broken_markup", () => {
    expect(xmlProblems("<svg><g></svg>")).not.toEqual([]);
    expect(xmlProblems("<svg><text>a & b</text></svg>")).not.toEqual([]);
    expect(xmlProblems("<svg/><svg/>")).not.toEqual([]);
  });

  test("escapes_and_nice_steps", () => {
    expect(escapeXml(`<a href="x">&'`)).toBe("&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
    expect(niceStep(1000)).toBe(500);
    expect(niceStep(7)).toBe(2);
    expect(niceStep(0)).toBe(1);
  });
});
