// How much idle resident KV slows a fresh prefill in mesh's unified pool:
// prefill a 1024-token prompt in a clean pool, then again with the other
// slots holding idle 2000-token prefixes.
//
//   bun run src/bench/idle-kv.ts [--threads N]
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { collect, Engine } from "../engine/index";
import { BENCH } from "../gguf/generate";
import { ensureModel } from "../gguf/models";

// Deterministic distinct token ids, so no prompt shares a prefix with another.
function tokens(seed: number, n: number): number[] {
  let x = seed;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 100 + (x % 30000);
  });
}

/** Print prefill tokens/s in a clean pool and with idle resident prefixes in the other slots. */
export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { threads: { type: "string" } } });
  const threads = Number(values.threads ?? cpus().length);
  const e = await Engine.load({ modelPath: await ensureModel(BENCH), nCtx: 8192, nParallel: 4, threads });
  try {
    const prefill = async (seed: number) => {
      const t0 = performance.now();
      await collect(e.generate({ prompt: tokens(seed, 1024), maxTokens: 1, sampling: { temperature: 0 }, ignoreEos: true }));
      return Math.round(1024 / ((performance.now() - t0) / 1000));
    };
    console.log(`clean pool: ${await prefill(1)} then ${await prefill(2)} tok/s`);
    await Promise.all([10, 11, 12].map((s) => collect(e.generate({ prompt: tokens(s, 2000), maxTokens: 1, ignoreEos: true }))));
    const idle = (await e.stats()).kvCellsResident;
    console.log(`with ${idle} idle resident cells: ${await prefill(3)} then ${await prefill(4)} tok/s`);
  } finally {
    await e.close();
  }
}

if (import.meta.main) await main(process.argv.slice(2));
