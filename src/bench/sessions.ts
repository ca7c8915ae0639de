// Best-of-N fan-out from a long agent history: N sibling requests continue
// the same 4k-token history (its first reply included) with different seeds,
// after other traffic has taken every slot. With session checkpoints the
// history's KV state is restored into each slot and only the new tokens are
// prefilled; without them every sibling prefills the whole history. The host
// RAM tier is off in both, so the only difference is the checkpoint. With
// --llama-server, llama-server (same vendored source, same GGUF, threads and
// slots) runs the same fan-out with its slot save/restore: the history's slot
// is saved to a file after the first reply, and restored into each of the N
// slots (one POST /slots/{id}?action=restore per slot) before its sibling is
// sent there; TTFT counts from the fan-out's start, restores included.
//
//   bun run src/bench/sessions.ts [--model bench|tiny|PATH] [--history 4096] [--fanout 8] [--threads N] [--repeats 1] [--modes checkpoints,none] [--llama-server [--llama-server-path PATH]]
import { execSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { collect, Engine } from "../engine/index";
import { BENCH, TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";
import { defaultLlamaServerPath, LlamaServer, llamaServerFlags } from "./llama-server";

// Deterministic token ids: no prompt of one seed shares a prefix with another's.
function tokens(seed: number, n: number): number[] {
  let x = seed;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 100 + (x % 30000);
  });
}

const uptimeLoad = () =>
  execSync("uptime")
    .toString()
    .trim()
    .replace(/.*load average: /, "");

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0
    ? 0
    : s.length % 2
      ? (s[(s.length - 1) / 2] as number)
      : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2;
};

interface Row {
  mode: "checkpoints" | "none" | "llama-server";
  repeat: number;
  prefillTokens: number;
  cachedTokens: number;
  restores: number;
  ttftMedianMs: number;
  ttftMaxMs: number;
  load: string;
}

/** One fan-out: history turn, other traffic in every slot, then `fanout` siblings at once. */
async function measure(
  modelPath: string,
  mode: Row["mode"],
  repeat: number,
  o: { history: number; fanout: number; threads: number },
): Promise<Row> {
  const gen = 16;
  const suffix = 32;
  const e = await Engine.load({
    modelPath,
    nCtx: o.fanout * (o.history + gen + suffix + 64),
    nParallel: o.fanout,
    threads: o.threads,
    hostCacheMiB: 0,
    checkpointRamMiB: mode === "checkpoints" ? 8192 : 0,
    checkpointDiskMiB: 0,
  });
  try {
    const seed = 1000 * (repeat + 1) + (mode === "checkpoints" ? 1 : 2);
    const history = tokens(seed, o.history);
    const first = await collect(
      e.generate({ prompt: history, maxTokens: gen, sampling: { temperature: 0 }, ignoreEos: true, checkpoint: { save: "history" } }),
    );
    // Other conversations take every slot: the history's KV is no longer resident anywhere.
    await Promise.all(
      // Twice as many as slots, each decoding a while, so that they overlap and every slot is taken.
      Array.from({ length: 2 * o.fanout }, (_, i) =>
        collect(e.generate({ prompt: tokens(seed * 31 + i, 256), maxTokens: 32, sampling: { temperature: 0 }, ignoreEos: true })),
      ),
    );
    const before = await e.stats();
    const ttfts = await Promise.all(
      Array.from({ length: o.fanout }, async (_, i) => {
        const prompt = [...history, ...first.tokens, ...tokens(seed * 77 + i, suffix)];
        const t0 = performance.now();
        let ttft = 0;
        for await (const ev of e.generate({
          prompt,
          maxTokens: gen,
          sampling: { temperature: 1, seed: i + 1 },
          ignoreEos: true,
          checkpoint: { restore: "history" },
        })) {
          if (ev.kind === "text" && ttft === 0) ttft = performance.now() - t0;
        }
        return ttft;
      }),
    );
    const after = await e.stats();
    return {
      mode,
      repeat,
      prefillTokens: after.prefillTokens - before.prefillTokens,
      cachedTokens: after.cachedTokens - before.cachedTokens,
      restores: after.checkpointRestores - before.checkpointRestores,
      ttftMedianMs: Math.round(median(ttfts)),
      ttftMaxMs: Math.round(Math.max(...ttfts)),
      load: execSync("uptime")
        .toString()
        .trim()
        .replace(/.*load average: /, ""),
    };
  } finally {
    await e.close();
  }
}

/** POST JSON to llama-server; the parsed answer (throws on a non-200). */
async function post(url: string, body: object): Promise<Record<string, unknown>> {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  if (r.status !== 200) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return (await r.json()) as Record<string, unknown>;
}

/** The same fan-out on llama-server with its slot save/restore. */
async function measureLlamaServer(
  binary: string,
  modelPath: string,
  repeat: number,
  o: { history: number; fanout: number; threads: number },
): Promise<Row> {
  const gen = 16;
  const suffix = 32;
  const saveDir = mkdtempSync(join(tmpdir(), "mesh-bench-slots-"));
  const known = llamaServerFlags(binary);
  const t = String(o.threads);
  const args = ["-m", modelPath, "-t", t, "-tb", t, "-c", String(o.fanout * (o.history + gen + suffix + 64)), "-np", String(o.fanout)];
  args.push("-b", "2048", "-ub", "512", "--slot-save-path", saveDir, "--no-webui");
  if (known.has("--kv-unified")) args.push("--kv-unified");
  // No host-RAM prompt cache either: only the saved slot brings the history back.
  if (known.has("--cache-ram")) args.push("--cache-ram", "0");
  const server = await LlamaServer.start({ binary, args, startupTimeoutMs: 300_000 });
  try {
    const seed = 1000 * (repeat + 1) + 3;
    const history = tokens(seed, o.history);
    const first = await post(`${server.url}/completion`, {
      prompt: history,
      n_predict: gen,
      temperature: 0,
      ignore_eos: true,
      id_slot: 0,
      cache_prompt: true,
      return_tokens: true,
    });
    const reply = (first.tokens as number[] | undefined) ?? [];
    await post(`${server.url}/slots/0?action=save`, { filename: "history.bin" });
    await Promise.all(
      Array.from({ length: 2 * o.fanout }, (_, i) =>
        post(`${server.url}/completion`, { prompt: tokens(seed * 31 + i, 256), n_predict: 32, temperature: 0, ignore_eos: true }),
      ),
    );
    let prefill = 0;
    let cached = 0;
    const t0 = performance.now();
    const ttfts = await Promise.all(
      Array.from({ length: o.fanout }, async (_, i) => {
        await post(`${server.url}/slots/${i}?action=restore`, { filename: "history.bin" });
        const prompt = [...history, ...reply, ...tokens(seed * 77 + i, suffix)];
        const r = await fetch(`${server.url}/completion`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({
            prompt,
            n_predict: gen,
            temperature: 1,
            seed: i + 1,
            ignore_eos: true,
            id_slot: i,
            cache_prompt: true,
            stream: true,
          }),
        });
        let ttft = 0;
        let buf = "";
        const dec = new TextDecoder();
        for await (const chunk of r.body as ReadableStream<Uint8Array>) {
          buf += dec.decode(chunk, { stream: true });
          let nl = buf.indexOf("\n");
          while (nl >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            nl = buf.indexOf("\n");
            if (!line.startsWith("data: ")) continue;
            const ev = JSON.parse(line.slice(6)) as {
              content?: string;
              tokens?: number[];
              timings?: { prompt_n?: number; cache_n?: number };
            };
            if (ttft === 0 && ((ev.tokens?.length ?? 0) > 0 || (ev.content ?? "").length > 0)) ttft = performance.now() - t0;
            if (ev.timings) {
              prefill += ev.timings.prompt_n ?? 0;
              cached += ev.timings.cache_n ?? 0;
            }
          }
        }
        return ttft;
      }),
    );
    return {
      mode: "llama-server",
      repeat,
      prefillTokens: prefill,
      cachedTokens: cached,
      restores: o.fanout,
      ttftMedianMs: Math.round(median(ttfts)),
      ttftMaxMs: Math.round(Math.max(...ttfts)),
      load: uptimeLoad(),
    };
  } finally {
    await server.stop();
    rmSync(saveDir, { recursive: true, force: true });
  }
}

/** Run the fan-out with and without checkpoints, alternating repeat by repeat, and print a table (or JSON). */
export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: "string" },
      history: { type: "string" },
      fanout: { type: "string" },
      threads: { type: "string" },
      repeats: { type: "string" },
      json: { type: "boolean" },
      "llama-server": { type: "boolean" },
      "llama-server-path": { type: "string" },
      modes: { type: "string" },
    },
  });
  // `none` prefills the whole history eight times over: minutes on 2 cores, so a run can leave it out.
  const modes = (values.modes ?? "checkpoints,none").split(",").map((m) => m.trim());
  for (const m of modes) {
    if (m !== "checkpoints" && m !== "none") {
      process.stderr.write(`sessions bench: --modes takes checkpoints and/or none, not '${m}'\n`);
      process.exit(2);
    }
  }
  const model = values.model ?? "bench";
  const modelPath = model === "bench" ? await ensureModel(BENCH) : model === "tiny" ? await ensureModel(TINY) : model;
  const o = {
    history: Number(values.history ?? 4096),
    fanout: Number(values.fanout ?? 8),
    threads: Number(values.threads ?? cpus().length),
  };
  const repeats = Number(values.repeats ?? 1);
  const rows: Row[] = [];
  // Each row goes to stderr as soon as it is measured, so a long run that is stopped still leaves its figures.
  const done = (r: Row) => {
    rows.push(r);
    process.stderr.write(`${JSON.stringify(r)}\n`);
  };
  const llama = values["llama-server"] ? (values["llama-server-path"] ?? defaultLlamaServerPath()) : null;
  if (llama !== null && !existsSync(llama))
    throw new Error(`no llama-server at ${llama}: run 'bun run build.ts native --with-llama-server'`);
  for (let r = 0; r < repeats; r++) {
    for (const mode of ["checkpoints", "none"] as const) {
      if (!modes.includes(mode)) continue;
      process.stderr.write(`repeat ${r + 1}/${repeats}: ${mode}\n`);
      done(await measure(modelPath, mode, r, o));
    }
    if (llama) {
      process.stderr.write(`repeat ${r + 1}/${repeats}: llama-server\n`);
      done(await measureLlamaServer(llama, modelPath, r, o));
    }
  }
  if (values.json) {
    console.log(JSON.stringify({ options: { model, ...o, repeats }, rows }, null, 2));
    return;
  }
  console.log(`best-of-${o.fanout} from a ${o.history}-token history (${model} model, ${o.threads} threads)`);
  console.log(
    "| mode | repeat | prefill tokens | cached tokens | checkpoint restores | TTFT median (ms) | TTFT max (ms) | load avg after |",
  );
  console.log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
  for (const r of rows) {
    console.log(
      `| ${r.mode} | ${r.repeat + 1} | ${r.prefillTokens} | ${r.cachedTokens} | ${r.restores} | ${r.ttftMedianMs} | ${r.ttftMaxMs} | ${r.load} |`,
    );
  }
}

if (import.meta.main) await main(process.argv.slice(2));
