// `mesh bench routing --tiny` end to end: real `mesh serve` processes on
// 127.0.0.1 forming a mesh, once per policy, the agent loops entering at
// seeded random nodes. Asserts what must hold whatever the machine's speed:
// every request ran under both policies, cache-aware routing served follow-up
// turns more from cache than least-load, requests ran on more than one node,
// the report is complete; never how fast anything was. Also the options and
// the command line.
import { describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { BenchUsageError } from "../../src/bench/engine";
import { defaultThreads, parsePolicies, type RoutingBenchReport, resolveRoutingOptions, runRoutingBench } from "../../src/bench/routing";
import { MAIN } from "../helpers/cluster";
import { xmlProblems } from "../helpers/xml";

describe("mesh bench routing", () => {
  test("tiny_run_serves_every_request_under_both_policies_and_cache_routing_reuses_more", async () => {
    const out = mkdtempSync(join(tmpdir(), "mesh-routing-"));
    try {
      const lines: string[] = [];
      const { report, outDir } = await runRoutingBench({ tiny: true, out, onProgress: (l) => lines.push(l) });
      expect(outDir).toBe(out);
      expect(lines.some((l) => l.startsWith("cache: mesh of 3 ready"))).toBe(true);
      expect(lines.some((l) => l.startsWith("load: mesh of 3 ready"))).toBe(true);

      const json = JSON.parse(readFileSync(join(out, "summary.json"), "utf8")) as RoutingBenchReport;
      expect(json).toEqual(JSON.parse(JSON.stringify(report)));
      expect(json).toMatchObject({ kind: "mesh-bench-routing", version: 1, order: "sequential", model: "mesh-tiny" });
      expect(json.config).toMatchObject({ nodes: 3, ctxSize: 4096, parallel: 2, tiny: true, policies: ["cache", "load"] });
      expect(json.config.threads).toBe(defaultThreads(3));
      expect(json.config.modelPath).toEndWith("mesh-tiny.gguf");
      const w = json.config.workload;
      const requests = w.loops * (w.turns + 1);
      expect(json.policies.map((p) => p.policy)).toEqual(["cache", "load"]);

      const [cache, load] = json.policies;
      if (!cache || !load) throw new Error("a policy is missing");
      for (const p of [cache, load]) {
        expect(p.target).toMatchObject({
          requests,
          successes: requests,
          status5xx: 0,
          status4xx: 0,
          transportErrors: 0,
          gaveUpAfter429: 0,
        });
        // Every success names the node that ran it, and that node belongs to this mesh.
        expect(p.servedUnknown).toBe(0);
        expect(p.nodes).toHaveLength(3);
        expect(new Set(p.nodes.map((n) => n.id)).size).toBe(3);
        expect(p.nodes.reduce((n, x) => n + x.served, 0)).toBe(requests);
        expect(p.nodes.reduce((n, x) => n + x.entered, 0)).toBe(requests);
        // Served on more than one node.
        expect(p.nodes.filter((n) => n.served > 0).length).toBeGreaterThan(1);
        // Each node decided for the requests that entered it (the routed ones) and ran what peers sent it.
        const d = p.decisions?.decisions;
        expect((d?.cache ?? 0) + (d?.load ?? 0) + (d?.only ?? 0)).toBe(requests);
        expect(d?.local).toBe(p.servedElsewhere.count);
        expect(p.followUp.requests).toBe(w.loops * (w.turns - 1));
        expect(p.followUp.ratio).not.toBeNull();
      }
      // The same requests entered at the same nodes under both policies.
      const entries = (p: typeof cache) => p.target.records.map((r) => `${r.loop}/${r.kind}/${r.turn}@${r.entry}`).sort();
      expect(entries(cache)).toEqual(entries(load));
      expect(cache.nodes.map((n) => n.entered)).toEqual(load.nodes.map((n) => n.entered));
      // Each policy decided by its own reason.
      expect(cache.decisions?.decisions.load).toBe(0);
      expect(load.decisions?.decisions.cache).toBe(0);
      // What the bench is for: a follow-up runs where its conversation is cached.
      expect(cache.followUp.ratio as number).toBeGreaterThan(load.followUp.ratio as number);

      const md = readFileSync(join(out, "summary.md"), "utf8");
      expect(md).toStartWith("# mesh bench routing");
      expect(md).toContain("| figure | `--routing cache` | `--routing load` |");
      expect(md).toContain("(chart.svg)");
      const svg = readFileSync(join(out, "chart.svg"), "utf8");
      expect(xmlProblems(svg)).toEqual([]);
      expect(svg).not.toContain("NaN");
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
    // Generous: two meshes of three processes start and stop; on a loaded machine that takes a while, and speed is not under test.
  }, 300_000);

  test("defaults_share_the_cores_among_the_nodes_and_tiny_is_ci_sized", () => {
    expect(defaultThreads(3, 2)).toBe(1);
    expect(defaultThreads(2, 8)).toBe(4);
    expect(defaultThreads(3, 16)).toBe(5);
    const d = resolveRoutingOptions({});
    expect(d).toMatchObject({ nodes: 3, model: "bench", ctxSize: 8192, parallel: 4, toolMs: 1000, policies: ["cache", "load"] });
    expect(d.threads).toBe(Math.max(1, Math.floor(availableParallelism() / 3)));
    expect(d.threadsDefaulted).toBe(true);
    expect(d.workload.loops).toBe(8);
    expect(d.out).toMatch(/^bench-out\/routing-\d{8}-\d{6}$/);
    expect(resolveRoutingOptions({ threads: 2, nodes: 4 })).toMatchObject({ threads: 2, threadsDefaulted: false, nodes: 4 });
    const t = resolveRoutingOptions({ tiny: true });
    expect(t).toMatchObject({ model: "tiny", ctxSize: 4096, parallel: 2 });
    expect(t.workload).toMatchObject({ loops: 4, turns: 4, staggerMs: 0 });
    expect(resolveRoutingOptions({ policies: ["load"] }).policies).toEqual(["load"]);
  });

  test("impossible_options_are_usage_errors_and_start_nothing", () => {
    const out = join(tmpdir(), `mesh-routing-never-${process.pid}`);
    const bad = [
      { nodes: 1 },
      { nodes: 33 },
      { loops: 0 },
      { ctxSize: 100 },
      { turns: 1000 },
      { toolMs: -1 },
      { policies: [] },
      { policies: ["cache", "cache"] as Array<"cache" | "load"> },
      { policies: ["random" as "cache"] },
      { serveArgs: ["--routing", "load"] },
      { serveArgs: ["--state-dir=/tmp/x"] },
    ];
    for (const o of bad) expect(() => resolveRoutingOptions({ ...o, out })).toThrow(BenchUsageError);
    expect(existsSync(out)).toBe(false);
    expect(parsePolicies("load, cache")).toEqual(["load", "cache"]);
    expect(() => parsePolicies("cache,")).not.toThrow();
    expect(() => parsePolicies(",")).toThrow(BenchUsageError);
  });

  test("the_command_line_teaches_with_examples_and_refuses_bad_flags_with_exit_2", () => {
    const run = (args: string[]) =>
      Bun.spawnSync([process.execPath, MAIN, "bench", "routing", ...args], { stdout: "pipe", stderr: "pipe" });
    const help = run(["--help"]);
    expect(help.exitCode).toBe(0);
    const text = help.stdout.toString();
    for (const flag of [
      "--nodes",
      "--model",
      "--ctx-size",
      "--parallel",
      "--threads",
      "--loops",
      "--turns",
      "--seed",
      "--out",
      "--tiny",
      "--json",
    ]) {
      expect(text).toContain(flag);
    }
    expect(text).toContain("Examples:");
    expect(text).toContain("mesh bench routing --tiny");
    for (const args of [
      ["--nodes", "1"],
      ["--policies", "cache,random"],
      ["--threads", "zero"],
      ["--no-such-flag"],
      ["--serve-arg=--join"],
    ]) {
      const r = run(args);
      expect(r.exitCode).toBe(2);
      const err = r.stderr.toString().trim();
      expect(err.split("\n")).toHaveLength(1);
      expect(r.stdout.toString()).toBe("");
    }
  });
});
