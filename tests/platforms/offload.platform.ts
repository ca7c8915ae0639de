// The guard of a GPU test run: with MESH_EXPECT_GPU=Vulkan (or CUDA) the
// engine must find that backend's first device and put every layer on it, so
// the engine tests run beside this one really ran on the GPU and not quietly
// on the CPU. Used by npm run test:platforms (Vulkan on lavapipe) and
// scripts/gpu-check.sh (CUDA).
import { expect, test } from "bun:test";
import { Engine } from "../../src/engine/index";
import { tinyModel } from "../helpers/model";

const backend = process.env.MESH_EXPECT_GPU;
if (!backend) throw new Error("set MESH_EXPECT_GPU to the backend the engine must offload to (Vulkan or CUDA)");

test("every_layer_goes_to_the_expected_gpu_and_greedy_decoding_runs_there", async () => {
  const e = await Engine.load({ modelPath: await tinyModel(), nCtx: 1024, nParallel: 2, threads: 2 });
  try {
    const gpu = e.info.devices.find((d) => d.name === `${backend}0`);
    expect(gpu?.type).toBe("gpu");
    expect(e.info.offload.of).toBeGreaterThan(0);
    expect(e.info.offload.layers).toBe(e.info.offload.of);
    const run = async () => {
      const tokens: number[] = [];
      for await (const ev of e.generate({ prompt: "Hello", maxTokens: 12, sampling: { temperature: 0 } })) {
        if (ev.kind === "text") tokens.push(...ev.tokens);
      }
      return tokens;
    };
    const first = await run();
    expect(first).toHaveLength(12);
    // Greedy on one device is deterministic, from a cold prompt and from the cached one.
    expect(await run()).toEqual(first);
  } finally {
    await e.close();
  }
});
