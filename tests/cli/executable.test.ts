import { afterAll, beforeAll, expect, test } from "bun:test";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import { compileExecutable, executableName } from "../../build";
import type { KvPressureReport } from "../../src/bench/kv-pressure";

let work: string;
let built: string;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "mesh-exe-"));
  built = await compileExecutable({ variant: "cpu", portable: false, withLlamaServer: false, jobs: cpus().length }, join(work, "dist"));
});

afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

/** The executable alone in an empty directory with a fresh HOME: no repo, no node_modules. */
function isolated(name: string): { exe: string; run: string; home: string; env: Record<string, string> } {
  const run = join(work, `run-${name}`);
  const home = join(work, `home-${name}`);
  mkdirSync(run);
  mkdirSync(home);
  const exe = join(run, "mesh");
  copyFileSync(built, exe);
  return { exe, run, home, env: { PATH: "/usr/bin:/bin", HOME: home } };
}

/** Read a process's stderr until `marker` appears; returns what was read and the reader, still open. */
async function until(proc: { stderr: ReadableStream<Uint8Array> }, marker: string): Promise<string> {
  const reader = proc.stderr.getReader();
  let log = "";
  while (!log.includes(marker)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`exited early: ${log}`);
    log += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  return log;
}

test("compiled_executable_reports_its_llama_cpp_commit_backend_and_build_flags", () => {
  const { exe, run, env } = isolated("version");
  const r = Bun.spawnSync([exe, "version", "--json"], { cwd: run, env, stdout: "pipe", stderr: "pipe" });
  expect(r.exitCode).toBe(0);
  const info = JSON.parse(r.stdout.toString());
  expect(info).toMatchObject({
    target: `${process.platform}-${process.arch}`,
    backend: process.platform === "darwin" ? "metal + cpu" : "cpu",
  });
  expect(info.llamaCpp.commit).toMatch(/^[0-9a-f]{40}$/);
  // What the file was compiled with, not the source tree's placeholder.
  expect(info.buildFlags).toContain("GGML_NATIVE=ON");
});

test("compiled_executable_serves_the_demo_model_from_an_empty_directory", async () => {
  expect(built.endsWith(executableName("cpu"))).toBe(true);
  const { exe, run, home, env } = isolated("one");
  const proc = Bun.spawn([exe, "serve", "--port", "0", "--ctx-size", "1024", "--parallel", "1"], {
    cwd: run,
    env,
    stderr: "pipe",
    stdout: "pipe",
  });
  try {
    const log = await until(proc, "ready: POST");
    expect(log).toContain("RANDOM WEIGHTS");
    const url = /listening on (http:\/\/[^\s]+)/.exec(log)?.[1] as string;
    const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "x", maxRetries: 0 });
    const r = await client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 3 });
    expect(r.usage?.completion_tokens).toBe(3);
    // The console page is inside the file: served from an empty directory, with nothing to fetch elsewhere.
    const page = await fetch(`${url}/`);
    expect(page.status).toBe(200);
    expect(page.headers.get("x-mesh-node")).toBeString();
    const html = await page.text();
    expect(html).toContain("<title>mesh console</title>");
    expect(html).toContain(".uplot"); // the chart library's styles, inline
    expect(html).not.toMatch(/<script[^>]+src=|<link[^>]+href=/);
    proc.kill("SIGTERM");
    expect(await proc.exited).toBe(0);
    // The native library went to the user's cache dir, not the working directory.
    expect(await Bun.file(join(run, "libmeshllama.so")).exists()).toBe(false);
    expect(new Bun.Glob("**/libmeshllama.so").scanSync({ cwd: join(home, ".cache", "mesh", "native") }).next().value).toBeString();
  } finally {
    proc.kill("SIGKILL");
  }
});

// Routing keys hash with BLAKE3 (@napi-rs/blake-hash) and the index sync compresses with LZ4 (lz4-napi):
// both are native addons, which must load from inside the single file as they do from node_modules.
test("compiled_executable_keys_and_syncs_the_routing_index_between_two_nodes", async () => {
  const first = isolated("a");
  const second = isolated("b");
  const args = ["serve", "--port", "0", "--ctx-size", "1024", "--parallel", "1"];
  const a = Bun.spawn([first.exe, ...args, "--node-name", "a"], { cwd: first.run, env: first.env, stderr: "pipe", stdout: "pipe" });
  let b: ReturnType<typeof Bun.spawn> | null = null;
  try {
    const logA = await until(a, "ready: POST");
    const urlA = /listening on (http:\/\/[^\s]+)/.exec(logA)?.[1] as string;
    const token = /mesh serve --join (\S+)/.exec(logA)?.[1] as string;
    b = Bun.spawn([second.exe, ...args, "--node-name", "b", "--join", token], {
      cwd: second.run,
      env: second.env,
      stderr: "pipe",
      stdout: "pipe",
    });
    const logB = await until(b as { stderr: ReadableStream<Uint8Array> }, "ready: POST");
    const urlB = /listening on (http:\/\/[^\s]+)/.exec(logB)?.[1] as string;
    const system = "You are a careful agent. ".repeat(40);
    const client = new OpenAI({ baseURL: `${urlA}/v1`, apiKey: "x", maxRetries: 0 });
    const applied = async () => {
      const text = await (await fetch(`${urlB}/metrics`)).text();
      const line = text.split("\n").find((l) => l.startsWith('mesh_routing_sync_ops_total{op="insert",dir="applied"} '));
      return Number(line?.split(" ")[1] ?? 0);
    };
    const deadline = Date.now() + 60_000;
    // B learns A's cached prefixes through the sync (an LZ4 batch of BLAKE3 path hashes) once it sees A as a member.
    while ((await applied()) === 0) {
      if (Date.now() > deadline) throw new Error("B never applied A's routing index");
      await client.chat.completions.create({
        model: "mesh-tiny",
        messages: [
          { role: "system", content: system },
          { role: "user", content: `question ${Date.now()}` },
        ],
        max_tokens: 2,
      });
      await Bun.sleep(500);
    }
    expect(await applied()).toBeGreaterThan(0);
  } finally {
    a.kill("SIGKILL");
    b?.kill("SIGKILL");
  }
});

// The bench model borrows llama.cpp's llama-spm tokenizer: the file must carry it, since an empty
// directory has no llama.cpp source tree to take it from.
test("compiled_executable_runs_the_kv_pressure_bench_on_the_bench_model_from_an_empty_directory", async () => {
  const { exe, run, home, env } = isolated("bench");
  const out = join(run, "out");
  const proc = Bun.spawn(
    [
      exe,
      "bench",
      "kv-pressure",
      "--ctx-size",
      "2048",
      "--parallel",
      "2",
      "--loops",
      "2",
      "--turns",
      "2",
      "--system-tokens",
      "300",
      "--tool-result-tokens",
      "60",
      "--max-tokens",
      "4",
      "--stagger-ms",
      "0",
      "--json",
      "--out",
      out,
    ],
    { cwd: run, env, stderr: "pipe", stdout: "pipe" },
  );
  const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  if (code !== 0) throw new Error(`bench exited ${code}: ${stderr.slice(-2000)}`);
  const summary = JSON.parse(stdout) as KvPressureReport;
  expect(summary.kind).toBe("mesh-bench-kv-pressure");
  expect(summary.config.modelPath).toEndWith("mesh-bench.gguf");
  // The generated model went to the fresh HOME's cache, not the working directory.
  expect(summary.config.modelPath?.startsWith(join(home, ".cache", "mesh"))).toBe(true);
  const t = summary.targets[0] as KvPressureReport["targets"][number];
  // Two loops of two turns plus one exact repeat each.
  expect(t).toMatchObject({ name: "mesh", model: "mesh-bench", requests: 6, successes: 6, status5xx: 0, transportErrors: 0 });
  expect(await Bun.file(join(out, "summary.json")).exists()).toBe(true);
}, 600_000);

// Model hydration from the single file: BLAKE3 per chunk (@napi-rs/blake-hash inside the executable), `mesh models`,
// `mesh pull`, and `mesh serve --model <name>` pulling the model a peer serves into an empty HOME, then serving it.
test("compiled_executable_pulls_a_model_by_name_from_a_peer_and_serves_it", async () => {
  const first = isolated("hydrate-a");
  const second = isolated("hydrate-b");
  const args = ["serve", "--port", "0", "--ctx-size", "1024", "--parallel", "1"];
  const a = Bun.spawn([first.exe, ...args, "--node-name", "a", "--file-chunk-size", "65536"], {
    cwd: first.run,
    env: first.env,
    stderr: "pipe",
    stdout: "pipe",
  });
  let b: ReturnType<typeof Bun.spawn> | null = null;
  try {
    const logA = await until(a, "model file announced");
    const token = /mesh serve --join (\S+)/.exec(logA)?.[1] as string;
    const run = (cmd: string[]) => Bun.spawnSync([first.exe, ...cmd], { cwd: first.run, env: first.env, stdout: "pipe", stderr: "pipe" });
    const listed = run(["models", "--json"]);
    expect(listed.exitCode).toBe(0);
    const report = JSON.parse(listed.stdout.toString()) as { mesh: Array<{ name: string; hash: string; size: number }> };
    const tiny = report.mesh.find((m) => m.name === "mesh-tiny");
    expect(tiny?.hash).toMatch(/^[0-9a-f]{64}$/);
    const pulled = run(["pull", "mesh-tiny", "--dir", join(first.run, "pulled"), "--json"]);
    expect(pulled.exitCode).toBe(0);
    expect(pulled.stdout.toString()).toContain('"event":"done"');
    expect((await Bun.file(join(first.run, "pulled", "mesh-tiny.gguf")).bytes()).length).toBe(tiny?.size as number);
    b = Bun.spawn([second.exe, ...args, "--node-name", "b", "--model", "mesh-tiny", "--join", token], {
      cwd: second.run,
      env: second.env,
      stderr: "pipe",
      stdout: "pipe",
    });
    const logB = await until(b as { stderr: ReadableStream<Uint8Array> }, "ready: POST");
    expect(logB).toContain("pulling mesh-tiny.gguf");
    const file = join(second.home, ".local", "share", "mesh", "models", "mesh-tiny.gguf");
    expect(Bun.hash(await Bun.file(file).bytes())).toBe(Bun.hash(await Bun.file(join(first.run, "pulled", "mesh-tiny.gguf")).bytes()));
  } finally {
    a.kill("SIGKILL");
    b?.kill("SIGKILL");
  }
}, 300_000);
