// How much idle resident KV slows a fresh prefill in mesh's unified pool:
// prefill a 1024-token prompt in a clean pool, then again with the other
// slots holding idle 2000-token prefixes; once with them kept in the pool
// (--cache-ram 0) and once with the host RAM tier moving them out.
//
//   bun run src/bench/idle-kv.ts [--threads N] [--cache-ram MiB]
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import { collect, Engine, HOST_CACHE_DEFAULT_MIB } from "../engine/index";
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

/** Prefill tokens/s in a clean pool, then with idle 2000-token prefixes in the other slots, for one host-cache size. */
async function measure(threads: number, hostCacheMiB: number): Promise<string> {
  const e = await Engine.load({ modelPath: await ensureModel(BENCH), nCtx: 8192, nParallel: 4, threads, hostCacheMiB });
  try {
    const prefill = async (seed: number) => {
      const t0 = performance.now();
      await collect(e.generate({ prompt: tokens(seed, 1024), maxTokens: 1, sampling: { temperature: 0 }, ignoreEos: true }));
      return Math.round(1024 / ((performance.now() - t0) / 1000));
    };
    const clean = [await prefill(1), await prefill(2)];
    await Promise.all([10, 11, 12].map((s) => collect(e.generate({ prompt: tokens(s, 2000), maxTokens: 1, ignoreEos: true }))));
    const idle = (await e.stats()).kvCellsResident;
    const after = [await prefill(3), await prefill(4)];
    const s = await e.stats();
    const mode = hostCacheMiB > 0 ? `host cache ${hostCacheMiB} MiB` : "resident (--cache-ram 0)";
    return `| ${mode} | ${clean.join(", ")} | ${idle} | ${after.join(", ")} | ${s.hostSaves} |`;
  } finally {
    await e.close();
  }
}

/** Print prefill tokens/s with idle prefixes kept in the pool, then with them moved to host RAM. */
export async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { threads: { type: "string" }, "cache-ram": { type: "string" } } });
  const threads = Number(values.threads ?? cpus().length);
  const cacheRam = Number(values["cache-ram"] ?? HOST_CACHE_DEFAULT_MIB);
  const rows = [await measure(threads, 0), await measure(threads, cacheRam)];
  console.log(
    "| idle prefixes | clean pool (tok/s) | idle cells after the 3 x 2000-token requests | prefill next to them (tok/s) | saved to host |",
  );
  console.log("| --- | ---: | ---: | ---: | ---: |");
  for (const r of rows) console.log(r);
}

if (import.meta.main) await main(process.argv.slice(2));
