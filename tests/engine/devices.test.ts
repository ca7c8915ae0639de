// Fitting --n-gpu-layers to the devices ggml reports, and reading devices
// through the real shim (the CPU is always one).
import { expect, test } from "bun:test";
import { type DeviceInfo, fitGpuLayers, HEADROOM_MIN, listDevices, loadBackends, readModelShape } from "../../src/engine/devices";
import { findNativeLib } from "../../src/engine/library";
import { openNative } from "../../src/engine/native";
import { tinyModel } from "../helpers/model";

const GiB = 1024 ** 3;
const cpu: DeviceInfo = { name: "CPU", description: "x", backend: "CPU", type: "cpu", freeBytes: 64 * GiB, totalBytes: 64 * GiB };
const gpu = (free: number): DeviceInfo => ({
  name: "CUDA0",
  description: "y",
  backend: "CUDA",
  type: "gpu",
  freeBytes: free,
  totalBytes: 24 * GiB,
});
// 32 blocks + output = 33 layers of 0.25 GiB each.
const model = { nLayer: 32, weightBytes: 33 * 0.25 * GiB };

test("without_a_gpu_every_layer_stays_on_the_cpu_and_the_note_says_so_even_when_layers_were_asked_for", () => {
  const r = fitGpuLayers(99, model, [cpu]);
  expect(r).toMatchObject({ layers: 0, of: 33 });
  expect("note" in r && r.note).toContain("no GPU device found (--n-gpu-layers 99");
  expect(fitGpuLayers(-1, model, [cpu])).toMatchObject({ layers: 0 });
});

test("all_layers_go_to_the_gpu_when_they_fit", () => {
  expect(fitGpuLayers(-1, model, [cpu, gpu(20 * GiB)])).toMatchObject({ layers: 33, of: 33 });
  // More than the model has is all of them, as llama.cpp reads it.
  expect(fitGpuLayers(1000, model, [cpu, gpu(20 * GiB)])).toMatchObject({ layers: 33 });
  expect(fitGpuLayers(10, model, [cpu, gpu(20 * GiB)])).toMatchObject({ layers: 10 });
  expect(fitGpuLayers(0, model, [cpu, gpu(20 * GiB)])).toMatchObject({ layers: 0 });
});

test("all_layers_asked_with_minus_one_fit_automatically_and_the_note_states_the_fit", () => {
  // 4 GiB free less 10 % headroom = 3.6 GiB: 14 layers of 0.25 GiB.
  const r = fitGpuLayers(-1, model, [cpu, gpu(4 * GiB)]);
  expect(r).toMatchObject({ layers: 14, of: 33 });
  expect("note" in r && r.note).toStartWith("automatic fit: 14 of 33 layers on CUDA0");
});

test("an_explicit_layer_count_beyond_device_memory_is_an_error_naming_the_count_that_fits", () => {
  const r = fitGpuLayers(33, model, [cpu, gpu(4 * GiB)]);
  expect(r).toMatchObject({ code: "model_load_failed" });
  expect("message" in r && r.message).toContain("--n-gpu-layers 33 does not fit");
  expect("message" in r && r.message).toContain("at most 14 layers fit");
});

test("headroom_is_never_below_its_minimum_so_a_tiny_device_takes_no_layers", () => {
  const r = fitGpuLayers(-1, model, [cpu, gpu(HEADROOM_MIN)]);
  expect(r).toMatchObject({ layers: 0 });
});

test("memory_of_several_gpus_adds_up", () => {
  const two = [cpu, gpu(4 * GiB), { ...gpu(4 * GiB), name: "CUDA1" }];
  // 8 GiB less 0.8 GiB headroom = 7.2 GiB: 28 layers.
  expect(fitGpuLayers(-1, model, two)).toMatchObject({ layers: 28 });
});

test("an_unknown_model_shape_passes_the_request_to_llama_cpp_unchanged", () => {
  expect(fitGpuLayers(7, null, [cpu, gpu(4 * GiB)])).toMatchObject({ layers: 7 });
});

test("the_model_shape_is_read_from_the_gguf_header_and_a_file_that_is_not_gguf_gives_none", async () => {
  const shape = await readModelShape(await tinyModel());
  expect(shape?.nLayer).toBe(2);
  expect(shape?.weightBytes).toBeGreaterThan(0);
  expect(await readModelShape(import.meta.path)).toBeNull();
});

test("the_shim_lists_the_cpu_device_and_a_backend_that_cannot_load_is_reported_not_thrown", () => {
  const n = openNative(findNativeLib() as string);
  n.mesh_init(0);
  const devices = listDevices(n);
  expect(devices.find((d) => d.type === "cpu")?.totalBytes).toBeGreaterThan(0);
  const [bad] = loadBackends(n, ["/nonexistent/libggml-cuda.so"]);
  expect(bad).toMatchObject({ library: "libggml-cuda.so", devices: 0 });
  expect(bad?.error).toContain("/nonexistent/libggml-cuda.so");
  // A failed load adds no device.
  expect(listDevices(n)).toHaveLength(devices.length);
});
