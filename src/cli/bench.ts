// `mesh bench kv-pressure` and `mesh bench engine`: parse flags, run the
// benchmark, print its table (or JSON) on stdout; progress goes to stderr.
import { type Command, Option } from "commander";
import {
  BenchUsageError,
  type EngineBenchOptions,
  formatEngineBenchTable,
  resolveEngineBenchOptions,
  runEngineBench,
} from "../bench/engine";
import { type KvPressureOptions, runKvPressure } from "../bench/kv-pressure";
import { formatTable } from "../bench/report";
import { parsePolicies, type RoutingBenchOptions, runRoutingBench } from "../bench/routing";
import { formatRoutingTable } from "../bench/routing-report";
import { formatSoakTable, resolveSoakOptions, runSoak, type SoakOptions } from "../bench/soak";
import { DEFAULT_PLAIN_ATTN } from "../engine/attention";
import { attnKernelOption, intOption, plainAttnOption, UsageError } from "./usage";

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

// Benchmark modules report bad options as their own error type; the CLI's is UsageError (exit 2).
async function asUsage<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    if (e instanceof BenchUsageError) throw new UsageError(e.message);
    throw e;
  }
}

const KV_HELP = `
Each loop is an agent: a long system prefix shared by all loops, then turns of
user message -> model reply (tools offered, fixed length) -> our tool call and a
large tool result, growing towards the context limit. Loops start staggered and
overlap; streaming and non-streaming requests are mixed; 429s are retried after
Retry-After. The same seed gives byte-identical requests to every target.

Reports per target: requests, successes, 429s, 5xx, decode failures, TTFT and
end-to-end p50/p95, cached-token ratio per turn, same-prefix reuse, exact-repeat
reuse, evictions; writes summary.json, summary.md and chart.svg to --out.

Examples:
  mesh bench kv-pressure                            # mesh node on the bench model, ctx 8192, 4 slots, 8 loops
  mesh bench kv-pressure --compare llama-server     # the same workload on llama-server, one after the other
  mesh bench kv-pressure --tiny --out /tmp/kv       # CI-sized run on the tiny test model (seconds)
  mesh bench kv-pressure --url http://10.0.0.5:9337 --api-key "$KEY" --loops 16
  mesh bench kv-pressure --model ./qwen2.5-7b-q4_k_m.gguf --ctx-size 32768 --parallel 8 --turns 10
  mesh bench kv-pressure --serve-arg=--queue-capacity --serve-arg=16   # extra flags for the mesh node`;

const ROUTING_HELP = `
Starts N mesh serve nodes on 127.0.0.1 that form one mesh (the first node's
invite token; a fresh state dir each; the same model file), runs the
kv-pressure agent loops with every request entering at a node drawn from the
seed, and records which node served it (x-mesh-served-by) and its cached
tokens. Then stops them and does the same on a fresh mesh with --routing load.
Policies never overlap; the same seed gives byte-identical requests entering
at the same nodes under both. A pause before each follow-up turn (--tool-ms)
stands for the agent running its tool.

Reports per policy, side by side: requests, 429s/5xx, cached-token ratio
(overall, follow-up turns, per turn), TTFT and end-to-end p50/p95, requests
served and entered per node, the share served on another node than the entry,
routing decisions by reason (every node's mesh_routing_decisions_total);
writes summary.json, summary.md and chart.svg to --out.

Nodes share this machine: --threads defaults to the cores divided among the
nodes (at least 1 each), so 3 nodes on 2 cores get 1 thread each.

Examples:
  mesh bench routing                                # 3 nodes, bench model, 8 loops, cache then load
  mesh bench routing --tiny --out /tmp/routing      # CI-sized, tiny model (under a minute)
  mesh bench routing --nodes 4 --loops 12 --turns 4 --json > routing.json
  mesh bench routing --policies load,cache          # least-load first
  mesh bench routing --model ./qwen2.5-7b-q4_k_m.gguf --ctx-size 32768 --threads 4
  mesh bench routing --serve-arg=--cache-ram --serve-arg=0   # extra flags for every node`;

const ENGINE_HELP = `
Loads mesh's engine in-process and llama-server (built from the same vendored
llama.cpp) side by side, on the same GGUF, threads, context, slots and batch
sizes, and alternates their repeats (mesh, llama-server, mesh, ...) so machine
drift lands on both. Reports per-figure medians and mesh/llama-server ratios
(> 1 means mesh is better).

Examples:
  bun run build.ts native --with-llama-server       # once
  mesh bench engine                                 # bench model, 3 repeats, table on stdout
  mesh bench engine --repeats 5 --json > engine.json
  mesh bench engine --model tiny --no-compare       # mesh only, seconds

Cached-prefix table (an agent's turn: a long prefix already in KV plus a new
suffix; time to first token, clean and after other streams dirtied the pool,
against the floor: the suffix decoded over the prefix through the shim alone):
  mesh bench engine --table --table-only --repeats 7                    # 2k/8k/16k x 16/256/1024
  mesh bench engine --table --table-only --prefixes 2048 --suffixes 16  # one cell
  mesh bench engine --table --table-only --http                         # also mesh serve vs llama-server over HTTP`;

/** Register `mesh bench` and its subcommands on the program. */
export function registerBench(p: Command): void {
  const bench = p
    .command("bench")
    .description(
      "benchmarks: agent loops under KV pressure, cache-aware vs least-load routing across nodes, the engine against llama-server, a soak with node kills",
    )
    .addHelpText(
      "after",
      `
Examples:
  mesh bench kv-pressure --help
  mesh bench kv-pressure --compare llama-server
  mesh bench routing --tiny
  mesh bench engine --repeats 5
  mesh bench soak --duration 60 --kill-every 20`,
    );

  bench
    .command("kv-pressure")
    .description("drive overlapping agent tool loops against a node and report KV reuse, 429s and failures")
    .option(
      "-m, --model <path|name>",
      "GGUF file or generated model (bench, tiny) for targets started here; with --url, the model id to request",
    )
    .option("--url <url>", "drive this OpenAI-compatible endpoint instead of starting a mesh node")
    .option("--api-key <key>", "bearer key for --url")
    .addOption(new Option("--compare <server>", "also run the workload on llama-server (same model, ctx, slots)").choices(["llama-server"]))
    .option("--llama-server <path>", "llama-server executable (default: vendor/llama.cpp/build/cpu/bin/llama-server)")
    .option("-c, --ctx-size <n>", "KV cells of each started server (default 8192)", intOption("--ctx-size", 64))
    .option("-n, --parallel <n>", "slots of each started server (default 4)", intOption("--parallel", 1, 256))
    .option("-t, --threads <n>", "CPU threads of each started server (default: all cores)", intOption("--threads", 1, 1024))
    .option("--loops <n>", "agent loops at once (default 8)", intOption("--loops", 1, 256))
    .option("--turns <n>", "turns per loop (default: as many as fit the context)", intOption("--turns", 1, 256))
    .option("--system-tokens <n>", "shared system prefix, approx. tokens (default 2500)", intOption("--system-tokens", 1))
    .option("--tool-result-tokens <n>", "each tool result, approx. tokens (default 600)", intOption("--tool-result-tokens", 1))
    .option("--user-tokens <n>", "each user message, approx. tokens (default 24)", intOption("--user-tokens", 1))
    .option("--max-tokens <n>", "tokens generated per request, end-of-generation ignored (default 32)", intOption("--max-tokens", 1))
    .option("--stagger-ms <n>", "delay between loop starts (default 2000)", intOption("--stagger-ms", 0))
    .option("--seed <n>", "workload seed (default 1)", intOption("--seed", 0, 0xffffffff))
    .option("--max-retries <n>", "429 retries per request (default 20)", intOption("--max-retries", 0, 1000))
    .option("--request-timeout <s>", "give up on one request after this long (default 900)", intOption("--request-timeout", 1))
    .option("--reuse-min-tokens <n>", "cached tokens that count as same-prefix reuse (default 2048)", intOption("--reuse-min-tokens", 1))
    .option("--serve-arg <arg>", "extra flag for the mesh node started here (repeatable)", collect, [])
    .option("--out <dir>", "output directory (default: bench-out/kv-pressure-<timestamp>)")
    .option("--json", "print summary.json on stdout instead of the table")
    .option("--tiny", "tiny test model with CI-sized defaults (ctx 1024, 2 slots, 3 loops, small prompts)")
    .addHelpText("after", KV_HELP)
    .action(async (opts) => {
      const o: KvPressureOptions = {
        model: opts.model,
        url: opts.url,
        apiKey: opts.apiKey,
        compare: opts.compare,
        llamaServer: opts.llamaServer,
        ctxSize: opts.ctxSize,
        parallel: opts.parallel,
        threads: opts.threads,
        loops: opts.loops,
        turns: opts.turns,
        systemTokens: opts.systemTokens,
        toolResultTokens: opts.toolResultTokens,
        userTokens: opts.userTokens,
        maxTokens: opts.maxTokens,
        staggerMs: opts.staggerMs,
        seed: opts.seed,
        maxRetries: opts.maxRetries,
        requestTimeoutS: opts.requestTimeout,
        reuseMinTokens: opts.reuseMinTokens,
        serveArgs: opts.serveArg,
        out: opts.out,
        tiny: opts.tiny === true,
        command: ["mesh", ...process.argv.slice(process.argv.indexOf("bench"))].join(" "),
      };
      for (const k of Object.keys(o) as Array<keyof KvPressureOptions>) if (o[k] === undefined) delete o[k];
      const { report, outDir } = await asUsage(() => runKvPressure(o));
      process.stdout.write(json(opts) ? `${JSON.stringify(report, null, 2)}\n` : `${formatTable(report.targets)}\nreport: ${outDir}\n`);
    });

  bench
    .command("routing")
    .description("N nodes on loopback, agent loops entering at random nodes: cache-aware vs least-load routing, side by side")
    .option("--nodes <n>", "mesh serve nodes (default 3)", intOption("--nodes", 2, 32))
    .option("-m, --model <path|name>", "GGUF file or generated model (bench, tiny) every node serves (default bench)")
    .option("-c, --ctx-size <n>", "KV cells of each node (default 8192)", intOption("--ctx-size", 64))
    .option("-n, --parallel <n>", "slots of each node (default 4)", intOption("--parallel", 1, 256))
    .option(
      "-t, --threads <n>",
      "CPU threads of each node (default: the cores divided among the nodes, at least 1)",
      intOption("--threads", 1, 1024),
    )
    .option("--loops <n>", "agent loops at once (default 8)", intOption("--loops", 1, 256))
    .option("--turns <n>", "turns per loop (default: as many as fit the context)", intOption("--turns", 1, 256))
    .option("--system-tokens <n>", "shared system prefix, approx. tokens (default 2500)", intOption("--system-tokens", 1))
    .option("--tool-result-tokens <n>", "each tool result, approx. tokens (default 600)", intOption("--tool-result-tokens", 1))
    .option("--user-tokens <n>", "each user message, approx. tokens (default 24)", intOption("--user-tokens", 1))
    .option("--max-tokens <n>", "tokens generated per request, end-of-generation ignored (default 32)", intOption("--max-tokens", 1))
    .option("--stagger-ms <n>", "delay between loop starts (default 2000)", intOption("--stagger-ms", 0))
    .option(
      "--tool-ms <n>",
      "pause before each follow-up turn: the agent running its tool (default 1000)",
      intOption("--tool-ms", 0, 600_000),
    )
    .option("--seed <n>", "workload and entry-node seed (default 1)", intOption("--seed", 0, 0xffffffff))
    .option("--policies <list>", "routing policies to run, in order (default cache,load)")
    .option("--max-retries <n>", "429 retries per request (default 20)", intOption("--max-retries", 0, 1000))
    .option("--request-timeout <s>", "give up on one request after this long (default 900)", intOption("--request-timeout", 1))
    .option("--serve-arg <arg>", "extra flag for every node (repeatable)", collect, [])
    .option("--out <dir>", "output directory (default: bench-out/routing-<timestamp>)")
    .option("--json", "print summary.json on stdout instead of the table")
    .option("--tiny", "tiny test model with CI-sized defaults (ctx 4096, 2 slots, 4 loops x 4 turns, small prompts)")
    .addHelpText("after", ROUTING_HELP)
    .action(async (opts) => {
      const o: RoutingBenchOptions = {
        nodes: opts.nodes,
        model: opts.model,
        ctxSize: opts.ctxSize,
        parallel: opts.parallel,
        threads: opts.threads,
        loops: opts.loops,
        turns: opts.turns,
        systemTokens: opts.systemTokens,
        toolResultTokens: opts.toolResultTokens,
        userTokens: opts.userTokens,
        maxTokens: opts.maxTokens,
        staggerMs: opts.staggerMs,
        toolMs: opts.toolMs,
        seed: opts.seed,
        maxRetries: opts.maxRetries,
        requestTimeoutS: opts.requestTimeout,
        serveArgs: opts.serveArg,
        out: opts.out,
        tiny: opts.tiny === true,
        command: ["mesh", ...process.argv.slice(process.argv.indexOf("bench"))].join(" "),
      };
      if (opts.policies !== undefined) o.policies = await asUsage(async () => parsePolicies(opts.policies));
      for (const k of Object.keys(o) as Array<keyof RoutingBenchOptions>) if (o[k] === undefined) delete o[k];
      const { report, outDir } = await asUsage(() => runRoutingBench(o));
      process.stdout.write(
        json(opts) ? `${JSON.stringify(report, null, 2)}\n` : `${formatRoutingTable(report.policies)}\nreport: ${outDir}\n`,
      );
    });

  bench
    .command("engine")
    .description("mesh's engine against llama-server: prefill, decode, aggregate decode, cached-prefix TTFT")
    .option("-m, --model <path|name>", "GGUF file or generated model: bench (default), tiny")
    .option("-t, --threads <n>", "CPU threads on both sides (default: all cores)", intOption("--threads", 1, 1024))
    .option("-c, --ctx <n>", "total KV cells, unified (default 8192)", intOption("--ctx", 64))
    .option("-n, --parallel <n>", "slots, and streams of the aggregate figure (default 4)", intOption("--parallel", 1, 256))
    .option("--batch <n>", "logical batch, -b (default 2048)", intOption("--batch", 1))
    .option("--ubatch <n>", "physical batch, -ub (default 512)", intOption("--ubatch", 1))
    .addOption(new Option("--flash-attn <mode>", "flash attention (default auto)").choices(["on", "off", "auto"]))
    .option("--attn-kernel <mesh|ggml>", "mesh only: the CPU flash-attention kernel (default mesh)", attnKernelOption)
    .option(
      "--plain-attn <min:max|off>",
      `mesh only: decodes of MIN..MAX tokens use matrix-product attention (default off with the mesh kernel, ${DEFAULT_PLAIN_ATTN.min}:${DEFAULT_PLAIN_ATTN.max} with ggml's)`,
      plainAttnOption,
    )
    .option("--prompt-tokens <n>", "prompt of the prefill figure (default 1024)", intOption("--prompt-tokens", 2))
    .option("--prefix-tokens <n>", "cached prefix of the TTFT figure (default 2048)", intOption("--prefix-tokens", 2))
    .option("--suffix-tokens <n>", "new tokens after the cached prefix (default 16)", intOption("--suffix-tokens", 1))
    .option("--gen-tokens <n>", "generated tokens of the decode figures (default 128)", intOption("--gen-tokens", 2))
    .option("--repeats <n>", "runs per figure, the median is reported (default 3)", intOption("--repeats", 1))
    .option("--no-compare", "measure mesh only (no llama-server)")
    .option("--llama-server <path>", "llama-server executable (default: vendor/llama.cpp/build/cpu/bin/llama-server)")
    .option("--json", "print the report as JSON instead of a table")
    .option("--table", "also measure the cached-prefix table (ctx grows to fit it unless given)")
    .option("--prefixes <list>", "table prefix sizes, comma-separated (default 2048,8192,16384)", intList("--prefixes"))
    .option("--suffixes <list>", "table suffix sizes, comma-separated (default 16,256,1024)", intList("--suffixes"))
    .option("--no-dirty", "skip the table's dirty variant")
    .option("--busy", "also the table's busy variant: each turn arrives while other streams decode")
    .option("--no-floor", "skip the table's floor")
    .option("--http", "the table again over HTTP: mesh serve vs llama-server, /v1/completions")
    .option("--table-only", "skip the prefill, decode and single cached-TTFT figures")
    .addHelpText("after", ENGINE_HELP)
    .action(async (opts) => {
      const o: EngineBenchOptions = {
        model: opts.model,
        threads: opts.threads,
        ctx: opts.ctx,
        parallel: opts.parallel,
        batch: opts.batch,
        ubatch: opts.ubatch,
        flashAttn: opts.flashAttn,
        plainAttn: opts.plainAttn,
        attnKernel: opts.attnKernel,
        promptTokens: opts.promptTokens,
        prefixTokens: opts.prefixTokens,
        suffixTokens: opts.suffixTokens,
        genTokens: opts.genTokens,
        repeats: opts.repeats,
        compare: opts.compare !== false,
        llamaServer: opts.llamaServer,
        table: opts.table === true ? true : undefined,
        prefixes: opts.prefixes,
        suffixes: opts.suffixes,
        dirty: opts.dirty === false ? false : undefined,
        busy: opts.busy === true ? true : undefined,
        floor: opts.floor === false ? false : undefined,
        http: opts.http === true ? true : undefined,
        figures: opts.tableOnly === true ? false : undefined,
      };
      for (const k of Object.keys(o) as Array<keyof EngineBenchOptions>) if (o[k] === undefined) delete o[k];
      await asUsage(async () => resolveEngineBenchOptions(o));
      const report = await asUsage(() => runEngineBench(o));
      process.stdout.write(json(opts) ? `${JSON.stringify(report, null, 2)}\n` : formatEngineBenchTable(report));
    });

  bench
    .command("soak")
    .description(
      "N nodes on loopback under mixed agent loops and short chats, one node killed and restarted every minute; ok/429/5xx and RSS over time",
    )
    .option("--nodes <n>", "mesh serve nodes (default 3)", intOption("--nodes", 2, 16))
    .option("--duration <s>", "seconds of load (default 600)", intOption("--duration", 5))
    .option("--kill-every <s>", "seconds between node kills, 0 for none (default 60)", intOption("--kill-every", 0))
    .option("-m, --model <path>", "GGUF file every node serves (default: the tiny generated model)")
    .option("--agent-loops <n>", "growing conversations at once (default 2)", intOption("--agent-loops", 0, 256))
    .option("--chat-loops <n>", "short chat loops at once (default 2)", intOption("--chat-loops", 0, 256))
    .option("-c, --ctx-size <n>", "KV cells of each node (default 4096)", intOption("--ctx-size", 256))
    .option("-n, --parallel <n>", "slots of each node (default 2)", intOption("--parallel", 1, 64))
    .option("-t, --threads <n>", "CPU threads of each node (default 1)", intOption("--threads", 1, 1024))
    .option("--seed <n>", "workload and entry-node seed (default 1)", intOption("--seed", 0, 0xffffffff))
    .option(
      "--rss-growth-mib <n>",
      "most RSS a node process may grow after its 30 s warm-up (default 128)",
      intOption("--rss-growth-mib", 1),
    )
    .option("--out <dir>", "output directory (default: bench-out/soak-<timestamp>)")
    .option("--json", "print summary.json on stdout instead of the table")
    .addHelpText("after", SOAK_HELP)
    .action(async (opts) => {
      const o: SoakOptions = {
        nodes: opts.nodes,
        durationS: opts.duration,
        killEveryS: opts.killEvery,
        model: opts.model,
        agentLoops: opts.agentLoops,
        chatLoops: opts.chatLoops,
        ctxSize: opts.ctxSize,
        parallel: opts.parallel,
        threads: opts.threads,
        seed: opts.seed,
        rssGrowthMiB: opts.rssGrowthMib,
        out: opts.out,
        command: ["mesh", ...process.argv.slice(process.argv.indexOf("bench"))].join(" "),
      };
      for (const k of Object.keys(o) as Array<keyof SoakOptions>) if (o[k] === undefined) delete o[k];
      await asUsage(async () => resolveSoakOptions(o));
      const { report, outDir } = await asUsage(() => runSoak(o, (line) => process.stderr.write(`${line}\n`)));
      process.stdout.write(json(opts) ? `${JSON.stringify(report, null, 2)}\n` : `${formatSoakTable(report)}\nreport: ${outDir}\n`);
      // A failed assertion is the benchmark's verdict: exit 1, as a failed test would.
      if (!report.passed) process.exitCode = 1;
    });
}

const SOAK_HELP = `
Starts N mesh serve nodes on 127.0.0.1 (the first creates the mesh, the others
join with its invite token). Agent loops (a shared system prompt, conversations
growing for 6 turns) and short chats send requests to random live nodes. Every
--kill-every seconds one node, in turn, is SIGKILLed and restarted on its state
dir without --join (it finds the mesh through the peers it remembered).

Each request is ok, 429, 5xx, or no answer (its entry node was the one killed).
The restart window runs from a kill until the restarted node is ready plus the
failure-detection bound and 10 s. Passes when no request failed (5xx or no
answer) outside every restart window and no node process grew its RSS by more
than --rss-growth-mib after its warm-up; exits 1 otherwise. Writes summary.json
and rss.svg (RSS of every node over time, kills marked) to --out.

Examples:
  mesh bench soak                                   # 3 nodes, 10 minutes, a kill a minute
  mesh bench soak --duration 60 --kill-every 20     # CI-sized
  mesh bench soak --model ./qwen2.5-0.5b-q4_k_m.gguf --threads 2 --json > soak.json`;

const json = (opts: { json?: boolean }) => opts.json === true;

/** Parse a comma-separated list of whole numbers >= 1, or throw a UsageError naming the flag. */
function intList(flag: string): (v: string) => number[] {
  return (v: string) => {
    if (!/^\d+(,\d+)*$/.test(v.trim())) throw new UsageError(`${flag} takes comma-separated whole numbers, e.g. 2048,8192 (got '${v}')`);
    const xs = v.trim().split(",").map(Number);
    if (xs.some((x) => x < 1)) throw new UsageError(`${flag} values must be at least 1 (got '${v}')`);
    return xs;
  };
}
