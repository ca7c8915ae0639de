// What this node computes on, as /v1/models and /metrics show it: each device
// ggml sees (memory as of the model load), the backend and the GPU layers.
import type { DeviceInfo } from "../engine/devices";
import type { ModelInfo } from "../engine/protocol";
import type { WorkerDevice } from "../mesh/wire";
import { family } from "./metrics";
import type { ServedModel } from "./model";

/** The backend that serves a model, e.g. "Vulkan (Vulkan0)", "CUDA (CUDA0)" or "CPU" when no layer is on a GPU. */
export function backendOf(info: ModelInfo): string {
  const gpus = info.devices.filter((d) => d.type !== "cpu");
  if (info.offload.layers === 0 || gpus.length === 0) return "CPU";
  const backends = [...new Set(gpus.map((d) => d.backend))];
  return `${backends.join("+")} (${gpus.map((d) => d.name).join(", ")})`;
}

/** A device as /v1/models lists it (snake_case, bytes). */
export function deviceEntry(d: DeviceInfo): Record<string, string | number> {
  return {
    name: d.name,
    description: d.description,
    backend: d.backend,
    type: d.type,
    memory_free: d.freeBytes,
    memory_total: d.totalBytes,
  };
}

/** A device as a worker record carries it through the mesh (bounded strings, see worker-info). */
export function wireDevice(d: DeviceInfo): WorkerDevice {
  return { name: d.name.slice(0, 64), backend: d.backend.slice(0, 32), type: d.type, free: d.freeBytes, total: d.totalBytes };
}

// Prometheus label values: backslash, quote and newline escaped.
const esc = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

/** The device families for the loaded models ("" when none has loaded). */
export function renderDeviceMetrics(models: ServedModel[]): string {
  const seen = new Map<string, { backend: string; type: string; free: number; total: number }>();
  const layers: [string, number][] = [];
  const layersOf: [string, number][] = [];
  for (const m of models) {
    const info = m.info;
    if (!info) continue;
    for (const d of info.devices) {
      if (!seen.has(d.name)) seen.set(d.name, { backend: d.backend, type: d.type, free: d.freeBytes, total: d.totalBytes });
    }
    layers.push([`{model="${esc(m.id)}"}`, info.offload.layers]);
    layersOf.push([`{model="${esc(m.id)}"}`, info.offload.of]);
  }
  if (seen.size === 0 && layers.length === 0) return "";
  const label = (name: string, d: { backend: string; type: string }) =>
    `{device="${esc(name)}",backend="${esc(d.backend)}",type="${d.type}"}`;
  const devs = [...seen];
  return `${[
    family(
      "mesh_device_memory_total_bytes",
      "gauge",
      "Memory of each compute device ggml sees (CPU included)",
      devs.map(([n, d]) => [label(n, d), d.total]),
    ),
    family(
      "mesh_device_memory_free_bytes",
      "gauge",
      "Free memory of each compute device after the model and KV cache were placed",
      devs.map(([n, d]) => [label(n, d), d.free]),
    ),
    family("mesh_gpu_layers", "gauge", "Layers of each model offloaded to GPUs (0: all on the CPU)", layers),
    family("mesh_model_layers", "gauge", "Offloadable layers of each model (its blocks and the output layer)", layersOf),
  ].join("\n")}\n`;
}
