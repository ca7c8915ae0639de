// Best-of-N fan-out from a long agent history: N sibling requests continue
// the same 4k-token history (its first reply included) with different seeds,
// after other traffic has taken every slot. With session checkpoints the
// history's KV state is restored into each slot and only the new tokens are
// prefilled; without them every sibling prefills the whole history. The host
// RAM tier is off in both, so the only difference is the checkpoint.
//
//   bun run src/bench/sessions.ts [--model bench|tiny|PATH] [--history 4096] [--fanout 8] [--threads N] [--repeats 1]
import { execSync } from "node:child_process";
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { collect, Engine } from "../engine/index";
import { BENCH, TINY } from "../gguf/generate";
import { ensureModel } from "../gguf/models";

// Deterministic token ids: no prompt of one seed shares a prefix with another's.
function tokens(seed: number, n: number): number[] {
  let x = seed;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 100 + (x % 30000);
  });
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0
    ? 0
    : s.length % 2
      ? (s[(s.length - 1) / 2] as number)
      : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2;
};

interface Row {
  mode: "checkpoints" | "none";
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
    },
  });
  const model = values.model ?? "bench";
  const modelPath = model === "bench" ? await ensureModel(BENCH) : model === "tiny" ? await ensureModel(TINY) : model;
  const o = {
    history: Number(values.history ?? 4096),
    fanout: Number(values.fanout ?? 8),
    threads: Number(values.threads ?? cpus().length),
  };
  const repeats = Number(values.repeats ?? 1);
  const rows: Row[] = [];
  for (let r = 0; r < repeats; r++) {
    for (const mode of ["checkpoints", "none"] as const) {
      process.stderr.write(`repeat ${r + 1}/${repeats}: ${mode}\n`);
      rows.push(await measure(modelPath, mode, r, o));
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
