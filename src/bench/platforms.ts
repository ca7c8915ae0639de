// Platform files side by side: each built file (dist/mesh-*) serves the same
// model with the same threads, and one streamed completion at a time is
// timed on each in turn (round-robin, never two at once), so the machine's
// drift lands on all of them alike.
//
//   bun run src/bench/platforms.ts --file dist/mesh-linux-x64 --file dist/mesh-linux-x64-vulkan \
//     [--env dist/mesh-linux-x64-vulkan:GGML_VK_VISIBLE_DEVICES=0] [--file dist/mesh-linux-arm64]
//     [--model PATH] [--threads N] [--gen-tokens N] [--rounds N] [--json]
//
// A linux-arm64 file on an x64 host runs under qemu-aarch64-static (the
// figure is the emulator's speed, not an arm64 machine's).
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { availableParallelism, loadavg, tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { LlamaServer } from "./llama-server";
import { percentile } from "./stats";

/** One file to measure: how to run it and its extra environment. */
export interface PlatformTarget {
  label: string;
  /** Command before `serve ...` (the file, or an emulator and the file). */
  command: string[];
  env: Record<string, string>;
}

/** Medians of one target over the rounds. */
export interface PlatformResult {
  label: string;
  /** Milliseconds from request to the first streamed token. */
  ttftMs: number | null;
  /** Tokens per second after the first token. */
  decodeTokS: number | null;
  /** Decode rate of each round. */
  samples: number[];
  /** What the node logged about where the layers went. */
  placement: string;
}

/** The report: settings, machine load before and after, a result per target. */
export interface PlatformReport {
  config: { model: string; threads: number; genTokens: number; rounds: number };
  loadBefore: number;
  loadAfter: number;
  results: PlatformResult[];
}

const EM_AARCH64 = 183;

/** How to run a file on this host: directly, or under qemu when it is an arm64 file on x64. */
export function targetFor(path: string, env: Record<string, string> = {}): PlatformTarget {
  const file = resolve(path);
  if (!existsSync(file)) throw new Error(`${path} does not exist (build it with bun run build.ts compile ...)`);
  const head = readFileSync(file).subarray(0, 20);
  const arm64 = head[0] === 0x7f && head[1] === 0x45 && (head[18] as number) + ((head[19] as number) << 8) === EM_AARCH64;
  let command = [file];
  if (arm64 && process.arch !== "arm64") {
    const qemu = Bun.which("qemu-aarch64-static");
    if (!qemu)
      throw new Error(
        `${path} is an arm64 file: running it here needs qemu-aarch64-static (apt-get install qemu-user-static libc6-arm64-cross)`,
      );
    command = [qemu, "-L", "/usr/aarch64-linux-gnu", file];
  }
  return { label: basename(file) + (command.length > 1 ? " (qemu)" : ""), command, env };
}

/** The id of the model a node serves (the demo model is mesh-tiny, a file is named after its path). */
async function modelId(url: string): Promise<string> {
  const r = (await (await fetch(`${url}/v1/models`)).json()) as { data: Array<{ id: string }> };
  return r.data[0]?.id ?? "mesh-tiny";
}

async function streamOnce(url: string, model: string, genTokens: number): Promise<{ ttftMs: number; decodeTokS: number | null }> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model,
      messages: [{ role: "user", content: "Write a long story about a lighthouse keeper." }],
      max_tokens: genTokens,
      ignore_eos: true,
      temperature: 0,
      stream: true,
    }),
  });
  if (!res.ok || !res.body) throw new Error(`${url} answered ${res.status}: ${await res.text()}`);
  let first: number | null = null;
  let last = 0;
  let tokens = 0;
  const decoder = new TextDecoder();
  let buf = "";
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, { stream: true });
    let i = buf.indexOf("\n\n");
    while (i >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      i = buf.indexOf("\n\n");
      if (!ev.startsWith("data: {")) continue;
      const content = (JSON.parse(ev.slice(6)) as { choices: Array<{ delta?: { content?: string } }> }).choices[0]?.delta?.content;
      if (!content) continue;
      const now = performance.now();
      first ??= now;
      last = now;
      tokens++;
    }
  }
  if (first === null) throw new Error(`${url} streamed no token`);
  return { ttftMs: first - t0, decodeTokS: tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null };
}

/** Start every target, time `rounds` streamed completions on each in turn, stop them; the report. */
export async function runPlatformBench(
  targets: PlatformTarget[],
  o: { model?: string; threads?: number; genTokens?: number; rounds?: number; onProgress?: (s: string) => void } = {},
): Promise<PlatformReport> {
  const threads = o.threads ?? availableParallelism();
  const genTokens = o.genTokens ?? 64;
  const rounds = o.rounds ?? 5;
  const log = o.onProgress ?? ((s: string) => process.stderr.write(`${s}\n`));
  const loadBefore = loadavg()[0] as number;
  const servers: LlamaServer[] = [];
  // Each node its own state dir (a node refuses one another node uses), removed afterwards.
  const state = mkdtempSync(join(tmpdir(), "mesh-bench-platforms-"));
  try {
    for (const [i, t] of targets.entries()) {
      log(`starting ${t.label}`);
      const args = ["serve", "--ctx-size", "2048", "--parallel", "1", "--threads", String(threads), "--state-dir", join(state, String(i))];
      if (o.model) args.push("--model", o.model);
      servers.push(
        await LlamaServer.start({
          binary: t.command[0] as string,
          args: [...t.command.slice(1), ...args],
          name: t.label,
          env: t.env,
          startupTimeoutMs: 600_000,
        }),
      );
    }
    const ttft: number[][] = targets.map(() => []);
    const rate: number[][] = targets.map(() => []);
    // One warm-up each (first-use costs: shader compilation on Vulkan, page-ins under qemu).
    const ids = await Promise.all(servers.map((s) => modelId(s.url)));
    for (const [i, s] of servers.entries()) await streamOnce(s.url, ids[i] as string, 4);
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < servers.length; k++) {
        const i = (r + k) % servers.length;
        const m = await streamOnce((servers[i] as LlamaServer).url, ids[i] as string, genTokens);
        ttft[i]?.push(m.ttftMs);
        if (m.decodeTokS !== null) rate[i]?.push(m.decodeTokS);
        log(`round ${r + 1}/${rounds} ${targets[i]?.label}: ${m.decodeTokS?.toFixed(1) ?? "-"} tok/s`);
      }
    }
    return {
      config: { model: o.model ?? "built-in demo model", threads, genTokens, rounds },
      loadBefore,
      loadAfter: loadavg()[0] as number,
      results: targets.map((t, i) => ({
        label: t.label,
        ttftMs: percentile(ttft[i] as number[], 50),
        decodeTokS: percentile(rate[i] as number[], 50),
        samples: rate[i] as number[],
        placement: /layers placed (.*)/.exec((servers[i] as LlamaServer).logTail(200))?.[1] ?? "",
      })),
    };
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
    rmSync(state, { recursive: true, force: true });
  }
}

/** The report as a table, each target's decode rate also as a ratio to the first's. */
export function formatPlatformReport(r: PlatformReport): string {
  const base = r.results[0]?.decodeTokS ?? null;
  const rows = r.results.map((x) => [
    x.label,
    x.decodeTokS === null ? "-" : x.decodeTokS.toFixed(1),
    base && x.decodeTokS ? `${(x.decodeTokS / base).toFixed(2)}x` : "-",
    x.ttftMs === null ? "-" : x.ttftMs.toFixed(0),
    x.placement,
  ]);
  const header = ["file", "decode tok/s", "vs first", "ttft ms", "placement"];
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((row) => (row[i] as string).length)));
  const line = (c: string[]) =>
    c
      .map((x, i) => x.padEnd(w[i] as number))
      .join("  ")
      .trimEnd();
  return [
    `${r.config.model}, ${r.config.threads} threads, ${r.config.genTokens} tokens x ${r.config.rounds} rounds (medians); load ${r.loadBefore.toFixed(2)} -> ${r.loadAfter.toFixed(2)}`,
    line(header),
    ...rows.map(line),
  ].join("\n");
}

/** CLI entry; returns the exit code (2: bad arguments). */
export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  let values: Record<string, unknown>;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      options: {
        file: { type: "string", multiple: true },
        env: { type: "string", multiple: true },
        model: { type: "string" },
        threads: { type: "string" },
        "gen-tokens": { type: "string" },
        rounds: { type: "string" },
        json: { type: "boolean" },
      },
    }));
  } catch (e) {
    process.stderr.write(`bench platforms: ${((e as Error).message.split("\n")[0] ?? "").trim()}\n`);
    return 2;
  }
  const files = (values.file as string[] | undefined) ?? [];
  const int = (k: string) => (values[k] === undefined ? undefined : Number(values[k]));
  for (const k of ["threads", "gen-tokens", "rounds"]) {
    const v = int(k);
    if (v !== undefined && !(Number.isInteger(v) && v > 0)) {
      process.stderr.write(`bench platforms: --${k} takes a positive whole number\n`);
      return 2;
    }
  }
  if (files.length === 0) {
    process.stderr.write("bench platforms: name at least one --file dist/mesh-...\n");
    return 2;
  }
  const envs = new Map<string, Record<string, string>>();
  for (const e of (values.env as string[] | undefined) ?? []) {
    const m = /^(.+):([A-Z_][A-Z0-9_]*)=(.*)$/.exec(e);
    if (!m) {
      process.stderr.write(`bench platforms: --env takes FILE:NAME=VALUE, got '${e}'\n`);
      return 2;
    }
    const key = resolve(m[1] as string);
    envs.set(key, { ...envs.get(key), [m[2] as string]: m[3] as string });
  }
  let targets: PlatformTarget[];
  try {
    targets = files.map((f) => targetFor(f, envs.get(resolve(f)) ?? {}));
  } catch (e) {
    process.stderr.write(`bench platforms: ${(e as Error).message}\n`);
    return 2;
  }
  let report: PlatformReport;
  try {
    report = await runPlatformBench(targets, {
      model: values.model as string | undefined,
      threads: int("threads"),
      genTokens: int("gen-tokens"),
      rounds: int("rounds"),
    });
  } catch (e) {
    process.stderr.write(`bench platforms: ${(e as Error).message}\n`);
    return 1;
  }
  process.stdout.write(values.json ? `${JSON.stringify(report)}\n` : `${formatPlatformReport(report)}\n`);
  return 0;
}

if (import.meta.main) process.exit(await main());
