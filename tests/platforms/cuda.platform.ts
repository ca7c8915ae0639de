// dist/mesh-linux-x64-cuda on a machine without a GPU (and without the CUDA
// runtime): it must start, say clearly that no CUDA device was found, and
// serve on the CPU. scripts/gpu-check.sh covers the GPU side.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { builtFile, runFile, type ServingFile, serveFile } from "./file";

const file = builtFile("mesh-linux-x64-cuda", "--cuda-prebuilt");
let node: ServingFile;

beforeAll(async () => {
  node = await serveFile({ file }, ["--n-gpu-layers", "99"]);
});

afterAll(async () => {
  await node?.stop();
});

test("version_names_the_prebuilt_cuda_backend", async () => {
  const r = await runFile({ file }, ["--version"]);
  expect(r.code).toBe(0);
  expect(r.out).toContain("backend   cuda (prebuilt @node-llama-cpp/linux-x64-cuda@");
});

test("without_a_gpu_the_cuda_file_says_no_cuda_device_and_serves_on_the_cpu", async () => {
  // Here the CUDA runtime itself is missing: the log names the library the dynamic linker could not find.
  expect(node.log()).toMatch(
    /CUDA backend not loaded: no CUDA device, serving on the CPU library=libggml-cuda\.so error="lib\w+\.so\.\d+: cannot open/,
  );
  expect(node.log()).toContain('layers placed gpu_layers=0 of=3 note="no GPU device found (--n-gpu-layers 99 asked for GPU layers)');
  const models = (await (await fetch(`${node.url}/v1/models`)).json()) as {
    data: Array<{ backend: string; devices: Array<{ type: string }> }>;
  };
  expect(models.data[0]?.backend).toBe("CPU");
  expect(models.data[0]?.devices.every((d) => d.type === "cpu")).toBe(true);
  const r = await node.client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 4 });
  expect(r.usage?.completion_tokens).toBe(4);
});
