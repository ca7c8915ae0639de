// Split-model benchmark: prefill and decode tokens per second of the bench
// model served whole by one `mesh serve`, split over 2 and 3 local `mesh
// serve` processes (--split, --offer-stage: through the stage tunnels), and,
// with --llama-server, llama-server --rpc over llama.cpp's own ggml-rpc-server
// processes on exactly the same split. Every target stays up and the repeats
// are interleaved (one request per target in turn), so machine load hits all
// alike. Each request is a fresh prompt (no cached prefix), greedy, EOS ignored.
//
//   bun run src/bench/split.ts [--threads 1] [--repeats 5] [--prompt-words 400] [--gen 64] [--llama-server]
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { connect } from "node:net";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { nativeBuildDir } from "../engine/library";
import { BENCH, TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";
import { defaultLlamaServerPath, freePort, LlamaServer } from "./llama-server";
import { sseLines } from "./sse";
import { median } from "./stats";

const MAIN = join(import.meta.dir, "..", "cli", "main.ts");

interface Args {
  threads: number;
  repeats: number;
  promptWords: number;
  gen: number;
  llamaServer: boolean;
}

function fail(message: string): never {
  process.stderr.write(
    `split bench: ${message}\nusage: bun run src/bench/split.ts [--threads N] [--repeats N] [--prompt-words N] [--gen N] [--llama-server]\n`,
  );
  process.exit(2);
}

function parseArgs(argv: string[]): Args {
  const a: Args = { threads: 1, repeats: 5, promptWords: 400, gen: 64, llamaServer: false };
  const num = (k: string, v: string | undefined, min: number) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) fail(`${k} needs a whole number of at least ${min}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i] as string;
    if (k === "--llama-server") a.llamaServer = true;
    else if (k === "--threads") a.threads = num(k, argv[++i], 1);
    else if (k === "--repeats") a.repeats = num(k, argv[++i], 1);
    else if (k === "--prompt-words") a.promptWords = num(k, argv[++i], 1);
    else if (k === "--gen") a.gen = num(k, argv[++i], 2);
    else fail(`unknown option ${k}`);
  }
  return a;
}

/** One measured request: prompt tokens per second until the first token, generated tokens per second after it. */
interface Sample {
  prefill: number;
  decode: number;
}

// A prompt no earlier request shares a prefix with: the repeat's number leads.
function promptOf(repeat: number, target: number, words: number): string {
  const vocab = ["mesh", "layer", "stage", "tunnel", "token", "decode", "prefill", "node", "split", "model", "cache", "route"];
  const out = [`Request ${repeat}-${target}.`];
  let s = (repeat * 7919 + target * 104729) >>> 0 || 1;
  for (let i = 0; i < words; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out.push(vocab[(s >>> 0) % vocab.length] as string);
  }
  return out.join(" ");
}

async function measure(url: string, model: string, prompt: string, gen: number): Promise<Sample> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model,
      messages: [{ role: "user", content: prompt }],
      max_tokens: gen,
      temperature: 0,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  if (!res.ok || !res.body) throw new Error(`${url}: HTTP ${res.status} ${await res.text()}`);
  let first = 0;
  let last = 0;
  let usage = null as { prompt_tokens: number; completion_tokens: number } | null;
  for await (const line of sseLines(res.body)) {
    if (line.field === "error") throw new Error(`${url}: stream error ${line.payload}`);
    if (line.payload === "[DONE]") break;
    const chunk = JSON.parse(line.payload) as {
      choices?: Array<{ delta?: { content?: string } }>;
      usage?: { prompt_tokens: number; completion_tokens: number };
    };
    if (chunk.usage) usage = chunk.usage;
    if (chunk.choices?.[0]?.delta?.content) {
      last = line.at;
      if (first === 0) first = last;
    }
  }
  if (!usage || first === 0) throw new Error(`${url}: no tokens or no usage in the stream`);
  return { prefill: usage.prompt_tokens / ((first - t0) / 1000), decode: (usage.completion_tokens - 1) / ((last - first) / 1000) };
}

const servers: LlamaServer[] = [];
const children: ChildProcess[] = [];

async function meshNode(name: string, model: string, threads: number, args: string[]): Promise<LlamaServer> {
  const state = mkdtempSync(join(tmpdir(), `mesh-split-bench-${name}-`));
  const s = await LlamaServer.start({
    binary: process.execPath,
    name: `mesh ${name}`,
    args: [
      MAIN,
      "serve",
      "--model",
      model,
      "--ctx-size",
      "2048",
      "--parallel",
      "1",
      "--threads",
      String(threads),
      "--state-dir",
      state,
      "--node-name",
      name,
      ...args,
    ],
    startupTimeoutMs: 300_000,
  });
  servers.push(s);
  return s;
}

const tokenOf = (s: LlamaServer) => {
  const m = /mesh serve --join (\S+)/.exec(readFileSync(s.logFile, "utf8"));
  if (!m) throw new Error(`no invite token in ${s.logFile}`);
  return m[1] as string;
};

// A mesh of `stages` --offer-stage nodes and a head serving the bench model split over all of them.
async function meshSplit(nodes: number, bench: string, filler: string, threads: number): Promise<{ url: string; weights: number[] }> {
  const first = await meshNode(`s${nodes}a`, filler, threads, ["--offer-stage"]);
  const token = tokenOf(first);
  for (let i = 1; i < nodes - 1; i++)
    await meshNode(`s${nodes}${String.fromCharCode(97 + i)}`, filler, threads, ["--offer-stage", "--join", token]);
  const head = await meshNode(`head${nodes}`, bench, threads, ["--join", token, "--split", String(nodes)]);
  const models = (await (await fetch(`${head.url}/v1/models`)).json()) as {
    data: Array<{ split?: { stages: Array<{ role: string; layers: number }> } }>;
  };
  const split = models.data.find((m) => m.split)?.split;
  if (!split) throw new Error("the head reports no split");
  return { url: head.url, weights: split.stages.filter((s) => s.role === "stage").map((s) => s.layers) };
}

async function rpcServer(threads: number): Promise<string> {
  const bin = join(nativeBuildDir("cpu"), "bin", "ggml-rpc-server");
  if (!existsSync(bin)) throw new Error(`${bin} not found: run 'bun run build.ts native --with-llama-server'`);
  const port = await freePort();
  const child = spawn(bin, ["-H", "127.0.0.1", "-p", String(port), "-t", String(threads)], { stdio: "ignore" });
  children.push(child);
  for (let i = 0; i < 200; i++) {
    const up = await new Promise<boolean>((r) => {
      const s = connect({ host: "127.0.0.1", port }, () => {
        s.destroy();
        r(true);
      });
      s.once("error", () => r(false));
    });
    if (up) return `127.0.0.1:${port}`;
    await Bun.sleep(100);
  }
  throw new Error("ggml-rpc-server did not start");
}

async function llamaSplit(bench: string, weights: number[], threads: number): Promise<string> {
  const eps: string[] = [];
  for (const _ of weights) eps.push(await rpcServer(threads));
  const s = await LlamaServer.start({
    binary: defaultLlamaServerPath(),
    args: [
      "-m",
      bench,
      ...(weights.length > 0
        ? ["--rpc", eps.join(","), "-ngl", String(weights.reduce((a, b) => a + b, 0)), "--tensor-split", weights.join(",")]
        : ["-ngl", "0"]),
      ...["-c", "2048", "-np", "1", "-t", String(threads), "-tb", String(threads), "--no-webui"],
    ],
    startupTimeoutMs: 300_000,
  });
  servers.push(s);
  return s.url;
}

async function run(a: Args): Promise<void> {
  const bench = await ensureModel(BENCH);
  const filler = await ensureModel(TINY);
  const model = "mesh-bench";
  const targets: Array<{ name: string; url: string; model: string }> = [];
  targets.push({ name: "mesh solo", url: (await meshNode("solo", bench, a.threads, [])).url, model });
  const two = await meshSplit(2, bench, filler, a.threads);
  targets.push({ name: `mesh split 2 (${two.weights.join("+")} layers on stages)`, url: two.url, model });
  const three = await meshSplit(3, bench, filler, a.threads);
  targets.push({ name: `mesh split 3 (${three.weights.join("+")} layers on stages)`, url: three.url, model });
  if (a.llamaServer) {
    targets.push({ name: "llama-server solo", url: await llamaSplit(bench, [], a.threads), model });
    targets.push({ name: `llama-server --rpc 2 (${two.weights.join("+")})`, url: await llamaSplit(bench, two.weights, a.threads), model });
    targets.push({
      name: `llama-server --rpc 3 (${three.weights.join("+")})`,
      url: await llamaSplit(bench, three.weights, a.threads),
      model,
    });
  }
  const live = targets.filter((t) => t.url !== "");
  // One warm-up request each (first-touch of weights), then interleaved repeats.
  for (const [i, t] of live.entries()) await measure(t.url, t.model, promptOf(0, i, 32), 4);
  const samples = live.map(() => [] as Sample[]);
  const loads: number[] = [];
  for (let r = 1; r <= a.repeats; r++) {
    for (const [i, t] of live.entries()) samples[i]?.push(await measure(t.url, t.model, promptOf(r, i, a.promptWords), a.gen));
    loads.push(loadavg()[0] as number);
    process.stderr.write(`repeat ${r}/${a.repeats} done (load ${loads.at(-1)?.toFixed(2)})\n`);
  }
  const solo = (k: keyof Sample, llama: boolean) =>
    median((samples[live.findIndex((t) => t.name === (llama ? "llama-server solo" : "mesh solo"))] ?? []).map((s) => s[k]));
  const lines = [
    `split bench: ${BENCH.name} (${BENCH.nLayer} blocks), --threads ${a.threads} per process, prompt ~${a.promptWords} words, ${a.gen} tokens, ${a.repeats} interleaved repeats, 1-min load ${Math.min(...loads).toFixed(2)}-${Math.max(...loads).toFixed(2)}`,
    "",
    "| target | prefill tok/s | decode tok/s | prefill vs solo | decode vs solo |",
    "|---|---|---|---|---|",
  ];
  for (const [i, t] of live.entries()) {
    const p = median((samples[i] ?? []).map((s) => s.prefill));
    const d = median((samples[i] ?? []).map((s) => s.decode));
    const llama = t.name.startsWith("llama");
    lines.push(
      `| ${t.name} | ${p.toFixed(1)} | ${d.toFixed(1)} | ${(p / solo("prefill", llama)).toFixed(2)}x | ${(d / solo("decode", llama)).toFixed(2)}x |`,
    );
  }
  // mesh against llama.cpp's own on the same split: the median of per-repeat ratios (the pair ran back to back).
  if (a.llamaServer) {
    lines.push("", "| split | mesh / llama-server prefill | mesh / llama-server decode |", "|---|---|---|");
    for (const [label, m, l] of [
      ["solo", 0, 3],
      ["2 nodes", 1, 4],
      ["3 nodes", 2, 5],
    ] as const) {
      const pair = (k: keyof Sample) => median((samples[m] ?? []).map((s, r) => s[k] / ((samples[l] ?? [])[r]?.[k] ?? Number.NaN)));
      lines.push(`| ${label} | ${pair("prefill").toFixed(2)}x | ${pair("decode").toFixed(2)}x |`);
    }
  }
  process.stdout.write(`${lines.join("\n")}\n`);
}

const args = parseArgs(process.argv.slice(2));
try {
  await run(args);
} finally {
  await Promise.all(servers.map((s) => s.stop()));
  for (const c of children) c.kill("SIGKILL");
}
