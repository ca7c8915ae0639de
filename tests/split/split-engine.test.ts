// A model split over ggml RPC stage servers (Workers of this process, reached
// through real stage tunnels on loopback) decodes exactly as the whole model.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { collect, Engine } from "../../src/engine/index";
import { BENCH } from "../../src/gguf/generate";
import { ensureModel } from "../../src/gguf/models";
import { startStageServer } from "../../src/split/stage-server";
import { openTunnel, serveTunnel, type TunnelClient, type TunnelServer } from "../../src/split/tunnel";
import { tinyModel } from "../helpers/model";

const SECRET = "split-engine-test-secret";
const greedy = { temperature: 0 };
const opened: Array<TunnelServer | TunnelClient> = [];

afterAll(async () => {
  for (const t of opened) await t.close();
});

// A stage: ggml's RPC server in a Worker on loopback, the tunnel in front, and a head-side tunnel end.
async function stage(): Promise<TunnelClient> {
  const server = await startStageServer({ cacheDir: mkdtempSync(join(tmpdir(), "mesh-stage-cache-")), threads: 1 });
  if ("code" in server) throw new Error(server.message);
  const t = await serveTunnel({ host: "127.0.0.1", port: 0, secret: SECRET, rpcPort: server.port });
  const c = await openTunnel("127.0.0.1", t.port, SECRET);
  opened.push(t, c);
  return c;
}

async function greedyTokens(e: Engine, prompt: string): Promise<number[]> {
  return (await collect(e.generate({ prompt, maxTokens: 24, ignoreEos: true, sampling: greedy }))).tokens;
}

describe("split engine", () => {
  test("decodes_the_same_greedy_tokens_split_over_one_and_two_stages_as_whole", async () => {
    const modelPath = await tinyModel();
    const base = { modelPath, nCtx: 1024, nParallel: 2, nBatch: 256, threads: 1 };
    const prompts = ["The quick brown fox", "Once upon a time in a mesh of machines"];
    const whole = await Engine.load(base);
    const want = await Promise.all(prompts.map((p) => greedyTokens(whole, p)));
    await whole.close();
    expect(want[0]?.length).toBe(24);

    const a = await stage();
    const two = await Engine.load({ ...base, split: { endpoints: [a.endpoint], weights: [2] } });
    expect(two.info.offload.layers).toBe(2);
    expect(await Promise.all(prompts.map((p) => greedyTokens(two, p)))).toEqual(want);
    await two.close();

    const b = await stage();
    const c = await stage();
    const three = await Engine.load({ ...base, split: { endpoints: [b.endpoint, c.endpoint], weights: [1, 1] } });
    expect(await Promise.all(prompts.map((p) => greedyTokens(three, p)))).toEqual(want);
    await three.close();
  }, 120_000);

  test("decodes_the_bench_model_the_same_split_over_two_stages_as_whole", async () => {
    // The bench model has an output matrix of its own (untied): the split keeps it on the head.
    const modelPath = await ensureModel(BENCH);
    const base = { modelPath, nCtx: 1024, nParallel: 1, nBatch: 256, threads: 1 };
    const whole = await Engine.load(base);
    const want = await greedyTokens(whole, "A split model over the mesh");
    await whole.close();
    const a = await stage();
    const b = await stage();
    const split = await Engine.load({ ...base, split: { endpoints: [a.endpoint, b.endpoint], weights: [3, 3] } });
    expect(await greedyTokens(split, "A split model over the mesh")).toEqual(want);
    await split.close();
  }, 180_000);
});
