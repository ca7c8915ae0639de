// Model hydration throughput: a ~1 GB GGUF pulled between local nodes with
// `mesh pull`, from one holder and from two, against `curl` of the same file
// from a local static server (python3 -m http.server) as the ceiling (plain,
// and followed by an fsync, as a pull makes its file durable before the
// rename). Rounds are interleaved, the order rotated each round, so that load
// from whatever else runs on the machine falls on every method alike; the
// load average is recorded with each measurement.
//
//   bun run src/bench/hydrate.ts [--rounds 3] [--json]
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { cacheDir } from "../dirs";
import { generateModel, type ModelSpec } from "../gguf/generate";
import { vocabPath } from "../gguf/models";

/** ~492 M parameters in F16: 984 MB on disk. */
const HYDRATE_1G: ModelSpec = {
  name: "mesh-hydrate-1g",
  nEmbd: 2048,
  nLayer: 8,
  nHead: 16,
  nHeadKv: 4,
  nFf: 5632,
  nCtxTrain: 4096,
  seed: 3,
  tiedOutput: false,
};

const MAIN = join(import.meta.dir, "..", "cli", "main.ts");

interface Row {
  method: string;
  round: number;
  seconds: number;
  mbPerSec: number;
  load1: number;
}

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : def;
}

async function model(): Promise<string> {
  const path = join(cacheDir(), "models", "v2", `${HYDRATE_1G.name}.gguf`);
  if (existsSync(path)) return path;
  const vocab = vocabPath("llama-spm");
  if (!vocab) throw new Error("the llama-spm vocabulary is missing: run 'bun run build.ts native' first");
  mkdirSync(join(cacheDir(), "models", "v2"), { recursive: true });
  process.stderr.write(`generating ${path}...\n`);
  await generateModel(HYDRATE_1G, vocab, path);
  return path;
}

function spawnNode(
  name: string,
  file: string,
  stateDir: string,
  extra: string[],
): { proc: ReturnType<typeof Bun.spawn>; log: () => string } {
  const proc = Bun.spawn(
    [process.execPath, MAIN, "serve", "--model", file, "--port", "0", "--ctx-size", "512", "--parallel", "1", "--threads", "1"].concat([
      "--state-dir",
      stateDir,
      "--node-name",
      name,
      ...extra,
    ]),
    { stdout: "ignore", stderr: "pipe" },
  );
  let log = "";
  void (async () => {
    for await (const c of proc.stderr as ReadableStream<Uint8Array>) log += new TextDecoder().decode(c);
  })();
  return { proc, log: () => log };
}

async function until(what: string, check: () => boolean, ms = 300_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(100);
  }
}

async function timed(cmd: string[]): Promise<number> {
  const t0 = performance.now();
  const p = Bun.spawn(cmd, { stdout: "pipe", stderr: "pipe" });
  const [code, err] = await Promise.all([p.exited, new Response(p.stderr).text()]);
  if (code !== 0) throw new Error(`${cmd.join(" ")} exited ${code}: ${err.slice(-500)}`);
  return (performance.now() - t0) / 1000;
}

async function main(): Promise<void> {
  const rounds = arg("--rounds", 3);
  const file = await model();
  const size = statSync(file).size;
  const work = mkdtempSync(join(tmpdir(), "mesh-hydrate-bench-"));
  const procs: Array<ReturnType<typeof Bun.spawn>> = [];
  try {
    // The ceiling: a static file server and curl.
    const port = 20000 + Math.floor(Math.random() * 20000);
    const http = Bun.spawn(["python3", "-m", "http.server", String(port), "--bind", "127.0.0.1", "--directory", join(file, "..")], {
      stdout: "ignore",
      stderr: "ignore",
    });
    procs.push(http);
    const a = spawnNode("a", file, join(work, "a"), []);
    procs.push(a.proc);
    await until("a to announce its file", () => a.log().includes("model file announced"));
    const token = /mesh serve --join (\S+)/.exec(a.log())?.[1] as string;
    const b = spawnNode("b", file, join(work, "b"), ["--join", token]);
    procs.push(b.proc);
    await until("b to announce its file", () => b.log().includes("model file announced"));
    await Bun.sleep(2000); // b's record reaches a
    const url = `http://127.0.0.1:${port}/${HYDRATE_1G.name}.gguf`;
    const out = join(work, "out");
    const pull = (from: string[]) =>
      timed([
        process.execPath,
        MAIN,
        "pull",
        HYDRATE_1G.name,
        "--state-dir",
        join(work, "a"),
        "--dir",
        out,
        ...from.flatMap((f) => ["--from", f]),
      ]);
    const rows: Row[] = [];
    const record = (method: string, round: number, seconds: number) => {
      rows.push({ method, round, seconds, mbPerSec: size / 1e6 / seconds, load1: loadavg()[0] as number });
      rmSync(out, { recursive: true, force: true });
    };
    const methods: Array<[string, () => Promise<number>]> = [
      ["curl (static server)", () => timed(["curl", "-sf", "-o", join(out, "curl.gguf"), url])],
      // The same, made durable: mesh pull fsyncs the file before renaming it into place.
      ["curl + fsync", () => timed(["sh", "-c", `curl -sf -o '${join(out, "curl.gguf")}' '${url}' && sync '${join(out, "curl.gguf")}'`])],
      ["mesh pull, 1 source", () => pull(["a"])],
      ["mesh pull, 2 sources", () => pull(["a", "b"])],
    ];
    for (let r = 1; r <= rounds; r++) {
      // Rotated each round, so writeback left by one method falls on each of them in turn.
      for (let k = 0; k < methods.length; k++) {
        const [method, run] = methods[(k + r - 1) % methods.length] as [string, () => Promise<number>];
        mkdirSync(out, { recursive: true });
        record(method, r, await run());
      }
    }
    const by = new Map<string, Row[]>();
    for (const row of rows) by.set(row.method, [...(by.get(row.method) ?? []), row]);
    const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)] as number;
    const ceiling = median((by.get("curl + fsync") ?? []).map((r) => r.mbPerSec));
    if (process.argv.includes("--json")) process.stdout.write(`${JSON.stringify({ size, rows })}\n`);
    process.stdout.write(`file: ${HYDRATE_1G.name}.gguf, ${size} bytes; ${rounds} interleaved rounds\n`);
    process.stdout.write("| method | median MB/s | min..max MB/s | vs curl + fsync | load1 during |\n|---|---|---|---|---|\n");
    for (const [method, rs] of by) {
      const mbs = rs.map((r) => r.mbPerSec);
      process.stdout.write(
        `| ${method} | ${median(mbs).toFixed(0)} | ${Math.min(...mbs).toFixed(0)}..${Math.max(...mbs).toFixed(0)} | ${(median(mbs) / ceiling).toFixed(2)}x | ${rs.map((r) => r.load1.toFixed(1)).join(", ")} |\n`,
      );
    }
  } finally {
    for (const p of procs) p.kill("SIGKILL");
    rmSync(work, { recursive: true, force: true });
  }
}

if (import.meta.main) await main();
