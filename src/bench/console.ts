// The console's costs, measured (docs/benchmarks.md): the page's size, its
// load time from a node that has just started, and the latency of inference
// requests with a console open on the node vs none, interleaved in blocks so
// both see the same machine load. Needs a Chromium (the system's) and
// puppeteer-core: a developer's tool, not part of the executable.
//
//   bun run src/bench/console.ts [--exe dist/mesh-linux-x64] [--blocks 6] [--per-block 40] [--cold 3]
import { mkdtempSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer, { type Browser } from "puppeteer-core";
import { buildConsolePage } from "../server/console/page";
import { percentile } from "./stats";

interface Args {
  exe: string | null;
  blocks: number;
  perBlock: number;
  cold: number;
  chromium: string;
}

function parse(argv: string[]): Args {
  const a: Args = { exe: null, blocks: 6, perBlock: 40, cold: 3, chromium: process.env.MESH_TEST_CHROMIUM ?? "/usr/bin/chromium" };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = argv[i + 1];
    if (k === "--exe" && v) a.exe = v;
    else if (k === "--blocks" && v) a.blocks = Number(v);
    else if (k === "--per-block" && v) a.perBlock = Number(v);
    else if (k === "--cold" && v) a.cold = Number(v);
    else if (k === "--chromium" && v) a.chromium = v;
    else {
      process.stderr.write(`unknown argument '${k}'\n`);
      process.exit(2);
    }
    i++;
  }
  return a;
}

interface Node {
  url: string;
  proc: ReturnType<typeof Bun.spawn>;
  log: () => string;
}

async function spawn(a: Args, dir: string, name: string, extra: string[] = []): Promise<Node> {
  const cmd = a.exe ? [a.exe] : [process.execPath, join(import.meta.dir, "..", "cli", "main.ts")];
  const proc = Bun.spawn(
    [
      ...cmd,
      "serve",
      "--port",
      "0",
      "--ctx-size",
      "2048",
      "--parallel",
      "2",
      "--threads",
      "1",
      "--state-dir",
      join(dir, name),
      "--node-name",
      name,
      ...extra,
    ],
    { stdout: "ignore", stderr: "pipe" },
  );
  let log = "";
  void (async () => {
    const dec = new TextDecoder();
    for await (const c of proc.stderr as ReadableStream<Uint8Array>) log += dec.decode(c);
  })();
  const deadline = Date.now() + 120_000;
  while (!log.includes("ready: POST")) {
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error(`node ${name} did not start:\n${log}`);
    await Bun.sleep(20);
  }
  return { url: /listening on (http:\/\/\S+)/.exec(log)?.[1] as string, proc, log: () => log };
}

const body = (i: number) =>
  JSON.stringify({
    model: "mesh-tiny",
    messages: [{ role: "user", content: `Request ${i}: say something short.` }],
    max_tokens: 8,
    temperature: 0,
  });

async function timed(url: string, i: number): Promise<number> {
  const t = performance.now();
  const r = await fetch(`${url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: body(i) });
  await r.arrayBuffer();
  if (r.status !== 200) throw new Error(`request ${i}: ${r.status}`);
  return performance.now() - t;
}

async function coldLoad(a: Args, browser: Browser, dir: string, i: number) {
  const n = await spawn(a, dir, `cold-${i}`);
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 1000 });
    const t0 = performance.now();
    await page.goto(`${n.url}/`, { waitUntil: "domcontentloaded" });
    const dom = performance.now() - t0;
    await page.waitForSelector('[data-testid="member"][data-state="alive"]', { timeout: 30_000 });
    const data = performance.now() - t0;
    await page.close();
    // The first GET / of another fresh node alone: the server's part.
    return { dom, data };
  } finally {
    n.proc.kill("SIGKILL");
  }
}

async function firstGet(a: Args, dir: string, i: number): Promise<{ ms: number; bytes: number }> {
  const n = await spawn(a, dir, `get-${i}`);
  try {
    const t = performance.now();
    const r = await fetch(`${n.url}/`, { headers: { "accept-encoding": "gzip" } });
    await r.arrayBuffer();
    const bytes = Number(r.headers.get("content-length") ?? 0);
    return { ms: performance.now() - t, bytes };
  } finally {
    n.proc.kill("SIGKILL");
  }
}

async function sizes() {
  const html = await buildConsolePage();
  const gz = Bun.gzipSync(new TextEncoder().encode(html)).byteLength;
  // Each library alone, minified as the page bundles it.
  const lib = async (code: string) => {
    const dir = mkdtempSync(join(tmpdir(), "mesh-lib-"));
    const entry = join(dir, "e.js");
    await Bun.write(entry, code);
    const out = await Bun.build({ entrypoints: [entry], target: "browser", minify: true, root: join(import.meta.dir, "..", "..") });
    const text = (await out.outputs[0]?.text()) ?? "";
    return { min: text.length, gzip: Bun.gzipSync(new TextEncoder().encode(text)).byteLength };
  };
  const nm = join(import.meta.dir, "..", "..", "node_modules");
  return {
    page: { bytes: html.length, gzip: gz },
    preactHtm: await lib(
      `import { h, render } from "${nm}/preact/dist/preact.mjs"; import htm from "${nm}/htm/dist/htm.mjs"; import * as hooks from "${nm}/preact/hooks/dist/hooks.mjs"; globalThis.x = [h, render, htm, hooks];`,
    ),
    uplot: await lib(`import uPlot from "${nm}/uplot/dist/uPlot.esm.js"; globalThis.x = uPlot;`),
  };
}

async function main() {
  const a = parse(process.argv.slice(2));
  const dir = mkdtempSync(join(tmpdir(), "mesh-bench-console-"));
  const load = () =>
    loadavg()
      .map((x) => x.toFixed(2))
      .join(" ");
  const out: Record<string, unknown> = { exe: a.exe ?? "source (bun run)", loadBefore: load() };
  out.size = await sizes();
  const browser = await puppeteer.launch({
    executablePath: a.chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const gets = [];
    const loads = [];
    for (let i = 0; i < a.cold; i++) {
      gets.push(await firstGet(a, dir, i));
      loads.push(await coldLoad(a, browser, dir, i));
    }
    out.cold = {
      firstGetMs: gets.map((g) => Math.round(g.ms)),
      gzipBytes: gets[0]?.bytes,
      domContentLoadedMs: loads.map((l) => Math.round(l.dom)),
      firstMembersShownMs: loads.map((l) => Math.round(l.data)),
    };

    // Two nodes, requests entering at A; blocks rotate: no console; a script reading /api/events (the
    // server's cost alone); a browser on A's Requests view (adds the browser's own CPU on this machine).
    const n1 = await spawn(a, dir, "lat-a");
    const token = /mesh serve --join (\S+)/.exec(n1.log())?.[1] as string;
    const n2 = await spawn(a, dir, "lat-b", ["--join", token]);
    try {
      for (let i = 0; i < 10; i++) await timed(n1.url, -i); // warm up
      const modes = ["closed", "events", "browser"] as const;
      const samples: Record<(typeof modes)[number], number[]> = { closed: [], events: [], browser: [] };
      let k = 0;
      for (let b = 0; b < a.blocks * modes.length; b++) {
        const mode = modes[b % modes.length] as (typeof modes)[number];
        const page = mode === "browser" ? await browser.newPage() : null;
        if (page) {
          await page.goto(`${n1.url}/#requests`);
          await page.waitForSelector('[data-testid="status"][data-status="live"]', { timeout: 30_000 });
        }
        const sub = mode === "events" ? new AbortController() : null;
        if (sub) {
          const r = await fetch(`${n1.url}/api/events`, { signal: sub.signal });
          void (async () => {
            try {
              for await (const _ of r.body as ReadableStream<Uint8Array>);
            } catch {
              // aborted at the block's end
            }
          })();
        }
        for (let i = 0; i < a.perBlock; i++) samples[mode].push(await timed(n1.url, k++));
        sub?.abort();
        await page?.close();
      }
      const p = (xs: number[], q: number) => Math.round((percentile(xs, q) ?? 0) * 100) / 100;
      const of = (xs: number[]) => ({ n: xs.length, p50: p(xs, 50), p90: p(xs, 90), p99: p(xs, 99) });
      out.latency = {
        closedMs: of(samples.closed),
        eventsMs: of(samples.events),
        browserMs: of(samples.browser),
        eventsP50Ratio: Math.round((p(samples.events, 50) / p(samples.closed, 50)) * 1000) / 1000,
        browserP50Ratio: Math.round((p(samples.browser, 50) / p(samples.closed, 50)) * 1000) / 1000,
      };
    } finally {
      n1.proc.kill("SIGKILL");
      n2.proc.kill("SIGKILL");
    }
  } finally {
    await browser.close();
  }
  out.loadAfter = load();
  process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
}

if (import.meta.main) await main();
