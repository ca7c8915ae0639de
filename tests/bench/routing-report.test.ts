// The pure parts of `mesh bench routing`: the seeded entry plan, counting
// requests per node from x-mesh-served-by, the follow-up cache figure, routing
// counters from /metrics, and the side-by-side table, Markdown and chart.
import { describe, expect, test } from "bun:test";
import type { RequestRecord } from "../../src/bench/drive";
import { summarize } from "../../src/bench/report";
import {
  type BenchNode,
  countByNode,
  countersDelta,
  entryOf,
  entryPlan,
  followUpCache,
  formatRoutingTable,
  type PolicySummary,
  type RoutingPolicy,
  renderRoutingChart,
  routingCounters,
  routingMarkdownTable,
  routingSummaryMarkdown,
  sumCounters,
  summarizePolicy,
} from "../../src/bench/routing-report";
import { parsePrometheus } from "../../src/bench/scrape";
import { requestRecord as rec } from "../helpers/bench";
import { xmlProblems } from "../helpers/xml";

const NODES: BenchNode[] = [
  { index: 1, name: "node-1", id: "aaa", url: "http://127.0.0.1:1" },
  { index: 2, name: "node-2", id: "bbb", url: "http://127.0.0.1:2" },
  { index: 3, name: "node-3", id: "ccc", url: "http://127.0.0.1:3" },
];
const u = (promptTokens: number, cachedTokens: number) => ({ promptTokens, cachedTokens, completionTokens: 8 });

const metrics = (cache: number, load: number, local: number, forwarded: number) =>
  parsePrometheus(
    [
      "# TYPE mesh_routing_decisions_total counter",
      `mesh_routing_decisions_total{by="cache"} ${cache}`,
      `mesh_routing_decisions_total{by="load"} ${load}`,
      'mesh_routing_decisions_total{by="only"} 0',
      `mesh_routing_decisions_total{by="local"} ${local}`,
      `mesh_routing_targets_total{target="self"} ${local}`,
      `mesh_routing_targets_total{target="peer"} ${forwarded}`,
      `mesh_forwarded_requests_total{result="forwarded"} ${forwarded}`,
      'mesh_forwarded_requests_total{result="retried"} 0',
      'mesh_forwarded_requests_total{result="failed"} 1',
    ].join("\n"),
  );

function policy(p: RoutingPolicy, records: RequestRecord[]): PolicySummary {
  const target = summarize(
    p,
    "http://127.0.0.1:1",
    "m",
    2,
    { startedAt: "2026-01-01T00:00:00.000Z", durationMs: 4000, probePromptTokens: 500, records, samples: [], before: null, after: null },
    { reuseMinTokens: 128, repeatMaxSuffixTokens: 256 },
  );
  const before = NODES.map(() => routingCounters(metrics(1, 1, 1, 1)));
  const after = [routingCounters(metrics(4, 1, 2, 3)), null, routingCounters(metrics(2, 2, 1, 1))];
  return summarizePolicy(p, target, NODES, before, after);
}

// Two loops of two turns and a repeat, entering at nodes 1, 2, 3, ... and served as given.
function records(servedBy: string[], cached: number[]): RequestRecord[] {
  const shape: Array<[number, number, "turn" | "repeat"]> = [
    [0, 0, "turn"],
    [0, 1, "turn"],
    [0, 1, "repeat"],
    [1, 0, "turn"],
    [1, 1, "turn"],
    [1, 1, "repeat"],
  ];
  return shape.map(([loop, turn, kind], i) =>
    rec({ loop, turn, kind, entry: i % 3, servedBy: servedBy[i] ?? null, usage: u(turn === 0 ? 500 : 800, cached[i] ?? 0) }),
  );
}

describe("routing bench report", () => {
  test("the_entry_plan_is_seeded_and_the_same_for_every_policy", () => {
    const a = entryPlan(7, 8, 6, 3);
    expect(a).toEqual(entryPlan(7, 8, 6, 3));
    expect(a).toHaveLength(8);
    for (const row of a) {
      expect(row).toHaveLength(7);
      for (const e of row) expect(e >= 0 && e < 3 && Number.isInteger(e)).toBe(true);
    }
    // Every node gets entries, and another seed gives another plan.
    expect(new Set(a.flat())).toEqual(new Set([0, 1, 2]));
    expect(entryPlan(8, 8, 6, 3)).not.toEqual(a);
    expect(entryOf(a, 2, 3, "turn")).toBe(a[2]?.[3] as number);
    expect(entryOf(a, 2, 5, "repeat")).toBe(a[2]?.[6] as number);
  });

  test("requests_are_counted_per_node_by_entry_and_by_x_mesh_served_by", () => {
    const rs = records(["aaa", "aaa", "ccc", "bbb", "zzz", "bbb"], []);
    rs.push(rec({ loop: 2, turn: 0, entry: 2, ok: false, status: 503, usage: null, servedBy: null }));
    const c = countByNode(rs, NODES);
    // Entries cycle 0,1,2,0,1,2 then the failure at 2.
    expect(c.entered).toEqual([2, 2, 3]);
    // The failure is served nowhere; "zzz" is no node of this mesh.
    expect(c.served).toEqual([2, 2, 1]);
    expect(c.unknown).toBe(1);
    // Served vs entered: aaa@0 same, aaa@1 other, ccc@2 same, bbb@0 other, bbb@2 other.
    expect({ elsewhere: c.elsewhere, of: c.of }).toEqual({ elsewhere: 3, of: 5 });
  });

  test("the_follow_up_ratio_counts_successful_turns_after_the_first_only", () => {
    const rs = [
      rec({ loop: 0, turn: 0, usage: u(500, 400) }),
      rec({ loop: 0, turn: 1, usage: u(800, 500) }),
      rec({ loop: 0, turn: 2, usage: u(1000, 800) }),
      rec({ loop: 0, turn: 2, kind: "repeat", usage: u(1000, 999) }),
      rec({ loop: 1, turn: 1, ok: false, status: 500, usage: null }),
    ];
    expect(followUpCache(rs)).toEqual({ requests: 2, promptTokens: 1800, cachedTokens: 1300, ratio: 1300 / 1800 });
    expect(followUpCache([rec({ loop: 0, turn: 0 })]).ratio).toBeNull();
  });

  test("routing_counters_come_from_metrics_as_increases_summed_over_nodes", () => {
    const before = routingCounters(metrics(1, 2, 3, 4));
    const after = routingCounters(metrics(5, 2, 4, 9));
    const d = countersDelta(before, after);
    expect(d).toEqual({
      decisions: { cache: 4, load: 0, only: 0, local: 1 },
      targets: { self: 1, peer: 5 },
      forwarded: { forwarded: 5, retried: 0, failed: 0 },
    });
    expect(countersDelta(before, null)).toBeNull();
    // A node without the series (an older node) has nulls, which add nothing.
    const none = routingCounters(parsePrometheus("mesh_requests_total 3\n"));
    expect(none.decisions.cache).toBeNull();
    expect(sumCounters([d, null, d])?.decisions).toEqual({ cache: 8, load: 0, only: 0, local: 2 });
    expect(sumCounters([none, d])?.decisions.cache).toBe(4);
    expect(sumCounters([null, null])).toBeNull();
  });

  test("a_policy_summary_puts_nodes_counts_and_figures_together", () => {
    const s = policy("cache", records(["aaa", "aaa", "aaa", "bbb", "bbb", "bbb"], [450, 500, 799, 450, 500, 799]));
    expect(s.policy).toBe("cache");
    expect(s.nodes.map((n) => [n.name, n.entered, n.served])).toEqual([
      ["node-1", 2, 3],
      ["node-2", 2, 3],
      ["node-3", 2, 0],
    ]);
    expect(s.nodes[1]?.routing).toBeNull();
    expect(s.nodes[0]?.routing?.decisions.cache).toBe(3);
    // Summed over the nodes whose counters were read: node 1 (+3) and node 3 (+1).
    expect(s.decisions?.decisions).toEqual({ cache: 4, load: 1, only: 0, local: 1 });
    expect(s.followUp).toEqual({ requests: 2, promptTokens: 1600, cachedTokens: 1000, ratio: 1000 / 1600 });
    // Entered at 1,2,3,1,2,3 and served on 1,1,1,2,2,2: only the first and fifth ran where they entered.
    expect(s.servedElsewhere).toEqual({ count: 4, of: 6, fraction: 4 / 6 });
    expect(s.target.requests).toBe(6);
    expect(s.target.exactRepeat.passed).toBe(2);
  });

  test("table_markdown_and_chart_show_the_policies_side_by_side", () => {
    const cache = policy("cache", records(["aaa", "aaa", "aaa", "bbb", "bbb", "bbb"], [450, 500, 799, 450, 500, 799]));
    const load = policy("load", records(["aaa", "bbb", "ccc", "aaa", "bbb", "ccc"], [450, 450, 450, 450, 450, 450]));
    const table = formatRoutingTable([cache, load]).trimEnd().split("\n");
    expect(table[0]).toContain("--routing cache");
    expect(table[0]).toContain("--routing load");
    expect(new Set(table.map((l) => l.length)).size).toBe(1);
    expect(table.some((l) => l.startsWith("node 3: served / entered"))).toBe(true);
    expect(table.find((l) => l.startsWith("cached-token ratio, follow-up turns"))).toMatch(/62\.5%\s+56\.3%$/);

    const md = routingMarkdownTable([cache, load]).split("\n");
    expect(md[0]).toBe("| figure | `--routing cache` | `--routing load` |");
    for (const line of md) expect(line.split(" | ")).toHaveLength(3);

    const summary = routingSummaryMarkdown(
      {
        date: "2026-01-01T00:00:00.000Z",
        command: "mesh bench routing --tiny",
        machine: { cpu: "cpu", cores: 2, platform: "linux", arch: "x64" },
        model: "m (m.gguf)",
        nodes: 3,
        ctxSize: 4096,
        parallel: 2,
        threads: 1,
        threadsDefaulted: true,
        toolMs: 2500,
        workload: { seed: 1, loops: 2, turns: 2, systemTokens: 10, toolResultTokens: 10, userTokens: 5, maxTokens: 8, staggerMs: 0 },
      },
      [cache, load],
    );
    expect(summary).toStartWith("# mesh bench routing");
    expect(summary).toContain("## Cached-token ratio per turn");
    expect(summary).toContain("| 2 | 62.5% (1000/1600) | 56.3% (900/1600) |");
    expect(summary).toContain("(chart.svg)");

    const svg = renderRoutingChart([cache, load], 'routing <&> "x"');
    expect(xmlProblems(svg)).toEqual([]);
    expect(svg).toContain("routing &lt;&amp;&gt; &quot;x&quot;");
    expect(svg).toContain("--routing cache");
    expect(svg).toContain("requests served per node");
    expect(svg).not.toContain("NaN");
    // The cache policy's bars: per turn (2) + follow-ups + repeat, 3 nodes (one of them 0), no TTFT (no streams) but
    // 2 end-to-end figures; and its legend swatch in each of the 3 panels.
    expect(svg.match(/<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="[\d.]+" fill="#2b6cb0"\/>/g)?.length).toBe(4 + 3 + 2 + 3);
  });
});
