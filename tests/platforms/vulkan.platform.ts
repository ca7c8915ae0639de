// dist/mesh-linux-x64-vulkan on Mesa's software Vulkan device (lavapipe):
// every layer on Vulkan0, the log and /v1/models saying so, greedy output
// equal to the same file's CPU path except after a near-tied choice.
//
// Run by `npm run test:platforms` (needs mesa-vulkan-drivers and libvulkan1).
// GGML_VK_VISIBLE_DEVICES=0 makes ggml use lavapipe, which it skips otherwise
// because it is a CPU-type device; without it the file finds no Vulkan device
// and runs on the CPU: the reference the greedy output is compared with. Both
// runs use the one CPU library this file ships (the same build as
// mesh-linux-x64's), so only the device differs.
import { afterAll, beforeAll, expect, test } from "bun:test";
import type OpenAI from "openai";
import { builtFile, runFile, type ServingFile, serveFile } from "./file";

const file = builtFile("mesh-linux-x64-vulkan", "--vulkan");
/** Below this gap (nats) between the two most probable tokens, the devices' rounding may pick either. */
const NEAR_TIE = 0.1;

let vk: ServingFile;
let cpu: ServingFile;

beforeAll(async () => {
  [vk, cpu] = await Promise.all([serveFile({ file, env: { GGML_VK_VISIBLE_DEVICES: "0" } }), serveFile({ file })]);
});

afterAll(async () => {
  await Promise.all([vk?.stop(), cpu?.stop()]);
});

test("version_names_the_prebuilt_vulkan_backend_and_the_llama_cpp_commit", async () => {
  const r = await runFile({ file }, ["version", "--json"]);
  expect(r.code).toBe(0);
  const info = JSON.parse(r.out);
  expect(info.backend).toStartWith("vulkan (prebuilt @node-llama-cpp/linux-x64-vulkan@");
  expect(info.llamaCpp.commit).toMatch(/^[0-9a-f]{40}$/);
});

test("every_layer_is_on_the_lavapipe_device_and_the_log_and_models_list_say_so", async () => {
  expect(vk.log()).toMatch(/device name=Vulkan0 description="llvmpipe[^"]*" backend=Vulkan type=gpu/);
  expect(vk.log()).toMatch(/layers placed gpu_layers=(\d+) of=\1 /);
  const models = (await (await fetch(`${vk.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> };
  const m = models.data[0] as { backend: string; gpu_layers: number; devices: Array<{ name: string; type: string }> };
  expect(m.backend).toBe("Vulkan (Vulkan0)");
  expect(m.gpu_layers).toBeGreaterThan(0);
  expect(m.devices.map((d) => d.name)).toContain("Vulkan0");
  const metrics = await (await fetch(`${vk.url}/metrics`)).text();
  expect(metrics).toMatch(/^mesh_gpu_layers\{model="mesh-tiny"\} [1-9]/m);
  expect(metrics).toContain('mesh_device_memory_total_bytes{device="Vulkan0",backend="Vulkan",type="gpu"}');
});

test("without_a_visible_vulkan_device_the_file_says_so_and_serves_on_the_cpu", async () => {
  expect(cpu.log()).toContain("no Vulkan device found: serving on the CPU");
  expect(cpu.log()).toMatch(/layers placed gpu_layers=0 /);
  const models = (await (await fetch(`${cpu.url}/v1/models`)).json()) as { data: Array<{ backend: string }> };
  expect(models.data[0]?.backend).toBe("CPU");
});

type Step = { token: string; top: Array<{ token: string; logprob: number }> };

async function greedy(client: OpenAI, prompt: string): Promise<Step[]> {
  const r = await client.chat.completions.create({
    model: "mesh-tiny",
    messages: [{ role: "user", content: prompt }],
    max_tokens: 24,
    temperature: 0,
    logprobs: true,
    top_logprobs: 2,
  });
  return (r.choices[0]?.logprobs?.content ?? []).map((c) => ({ token: c.token, top: c.top_logprobs }));
}

/** Gap between the two most probable tokens at a step; Infinity when only one was listed. */
const gap = (s: Step) => (s.top.length < 2 ? Number.POSITIVE_INFINITY : (s.top[0]?.logprob ?? 0) - (s.top[1]?.logprob ?? 0));

test("greedy_output_matches_the_cpu_path_up_to_the_first_near_tied_choice", async () => {
  const prompts = ["Hello", "Tell me a story about a lighthouse.", "1, 2, 3, 4,", "Wie geht es dir heute?", "def add(a, b):"];
  let compared = 0;
  let total = 0;
  for (const p of prompts) {
    const [a, b] = await Promise.all([greedy(vk.client, p), greedy(cpu.client, p)]);
    expect(a.length).toBe(24);
    expect(b.length).toBe(24);
    total += a.length;
    for (let i = 0; i < a.length; i++) {
      const x = a[i] as Step;
      const y = b[i] as Step;
      if (x.token !== y.token) {
        // A different pick is only acceptable where the two best were nearly tied on either device;
        // after it the texts differ, so the comparison of this prompt ends there.
        const tie = Math.min(gap(x), gap(y));
        if (tie >= NEAR_TIE)
          throw new Error(`prompt '${p}' step ${i}: Vulkan chose '${x.token}', CPU '${y.token}', top-2 gap ${tie.toFixed(3)}`);
        break;
      }
      compared++;
    }
  }
  console.log(`greedy Vulkan vs CPU: ${compared} of ${total} steps equal before the first near tie (if any)`);
  // Most steps must have been compared: a test that stops at step 0 everywhere would show nothing.
  expect(compared).toBeGreaterThan(total / 2);
});

test("a_streamed_answer_on_vulkan_carries_every_token", async () => {
  const stream = await vk.client.chat.completions.create({
    model: "mesh-tiny",
    messages: [{ role: "user", content: "stream please" }],
    max_tokens: 8,
    stream: true,
    stream_options: { include_usage: true },
  });
  let chunks = 0;
  let usage = 0;
  for await (const c of stream) {
    if (c.choices[0]?.delta?.content) chunks++;
    if (c.usage) usage = c.usage.completion_tokens;
  }
  expect(usage).toBe(8);
  expect(chunks).toBeGreaterThan(0);
});

test("a_vulkan_device_index_that_does_not_exist_is_reported_and_the_file_serves_on_the_cpu", async () => {
  const bad = await serveFile({ file, env: { GGML_VK_VISIBLE_DEVICES: "5" } });
  try {
    expect(bad.log()).toContain("Vulkan backend not loaded: no Vulkan device, serving on the CPU");
    expect(bad.log()).toMatch(/layers placed gpu_layers=0 /);
    const r = await bad.client.chat.completions.create({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }], max_tokens: 2 });
    expect(r.usage?.completion_tokens).toBe(2);
  } finally {
    await bad.stop();
  }
});
