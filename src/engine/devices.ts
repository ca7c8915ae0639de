// Compute devices: loading prebuilt GPU backends into ggml's registry, listing
// every device ggml sees (CPU included), and deciding how many layers to put
// on the GPUs before llama.cpp tries (and, out of device memory, crashes).
import { statSync } from "node:fs";
import { basename } from "node:path";
import { readGgufHeader } from "../gguf/read";
import { GgufValueType } from "../gguf/types";
import type { EngineErrorValue } from "./errors";
import type { Native } from "./native";

/** One device ggml can run on. */
export interface DeviceInfo {
  /** ggml's device name, e.g. "CPU", "Vulkan0", "CUDA0". */
  name: string;
  description: string;
  /** The backend that owns it, e.g. "CPU", "Vulkan", "CUDA". */
  backend: string;
  type: "cpu" | "gpu" | "igpu" | "accel";
  freeBytes: number;
  totalBytes: number;
}

/** How loading one backend library went. */
export interface BackendLoad {
  /** File name of the library, e.g. libggml-vulkan.so. */
  library: string;
  /** Devices it brought; 0 when it loaded but found none. */
  devices: number;
  /** Why it did not load (e.g. a missing libcudart.so.13), else null. */
  error: string | null;
}

/** How many layers went to GPUs, and why. */
export interface Offload {
  /** --n-gpu-layers as asked (-1: all that fit). */
  requested: number;
  /** Layers given to llama.cpp (0: CPU only). */
  layers: number;
  /** Offloadable layers of the model (its blocks plus the output layer). */
  of: number;
  /** One sentence for the log: where the layers went and why. */
  note: string;
}

const TYPES: DeviceInfo["type"][] = ["cpu", "gpu", "igpu", "accel"];
const cstr = (s: string) => Buffer.from(`${s}\0`, "utf8");

/** Load each backend library into ggml's registry; a failure is reported, never thrown. */
export function loadBackends(n: Native, paths: string[]): BackendLoad[] {
  return paths.map((p) => {
    const err = new Uint8Array(1024);
    const devices = n.mesh_backend_load(cstr(p), err, err.length);
    const msg = Buffer.from(err.subarray(0, Math.max(0, err.indexOf(0)))).toString("utf8");
    return { library: basename(p), devices: Math.max(0, devices), error: devices < 0 ? msg || "could not be loaded" : null };
  });
}

/** Every device in ggml's registry, with its memory now. */
export function listDevices(n: Native): DeviceInfo[] {
  const out: DeviceInfo[] = [];
  const count = n.mesh_device_count();
  const buf = new Uint8Array(1024);
  const nums = new BigInt64Array(3);
  for (let i = 0; i < count; i++) {
    const len = n.mesh_device_info(i, buf, buf.length, nums);
    if (len < 0) continue;
    const [name = "", description = "", backend = ""] = Buffer.from(buf.subarray(0, Math.min(len, buf.length - 1)))
      .toString("utf8")
      .split("\t");
    out.push({
      name,
      description,
      backend,
      type: TYPES[Number(nums[0])] ?? "accel",
      freeBytes: Number(nums[1]),
      totalBytes: Number(nums[2]),
    });
  }
  return out;
}

/** A model's block count and tensor bytes from its GGUF header (main thread; reads the header only); null when unreadable. */
export async function readModelShape(path: string): Promise<{ nLayer: number; weightBytes: number } | null> {
  try {
    const h = await readGgufHeader(path);
    const arch = h.metadata.get("general.architecture");
    const blocks = arch?.type === GgufValueType.STRING ? h.metadata.get(`${arch.value}.block_count`) : undefined;
    const nLayer = blocks && typeof blocks.value === "number" ? blocks.value : 0;
    return nLayer > 0 ? { nLayer, weightBytes: statSync(path).size - h.dataOffset } : null;
  } catch {
    // Not ours to report: llama.cpp's load says what is wrong with the file.
    return null;
  }
}

const GiB = 1024 ** 3;
/** Device memory kept free beside the weights for the KV cache and compute buffers: this share of free memory, at least HEADROOM_MIN. */
export const HEADROOM_SHARE = 0.1;
export const HEADROOM_MIN = 256 * 1024 * 1024;

/** Bytes in GiB with one decimal, for messages. */
function gib(b: number): string {
  return `${(b / GiB).toFixed(1)} GiB`;
}

/**
 * Decide how many layers go to GPUs. With no GPU device every layer stays on
 * the CPU (said in the note, not an error). -1 asks for all that fit: the
 * weights are split evenly per layer and layers are offloaded while they fit
 * in the GPUs' free memory less a headroom (an estimate: the KV cache and
 * compute buffers come on top). An explicit count that does not fit is an
 * error naming the count that would.
 */
export function fitGpuLayers(
  requested: number,
  model: { nLayer: number; weightBytes: number } | null,
  devices: DeviceInfo[],
): Offload | EngineErrorValue {
  const gpus = devices.filter((d) => d.type !== "cpu");
  if (requested === 0) return { requested, layers: 0, of: model ? model.nLayer + 1 : 0, note: "--n-gpu-layers 0: every layer on the CPU" };
  if (gpus.length === 0) {
    const asked = requested > 0 ? ` (--n-gpu-layers ${requested} asked for GPU layers)` : "";
    return { requested, layers: 0, of: model ? model.nLayer + 1 : 0, note: `no GPU device found${asked}: every layer on the CPU` };
  }
  const names = gpus.map((d) => d.name).join(", ");
  // Unknown layer count (the header could not be read): let llama.cpp decide, as asked.
  if (!model || model.nLayer <= 0)
    return { requested, layers: requested, of: 0, note: `layers offloaded to ${names} as llama.cpp places them` };
  const of = model.nLayer + 1;
  const perLayer = model.weightBytes / of;
  const free = gpus.reduce((s, d) => s + d.freeBytes, 0);
  const usable = Math.max(0, free - Math.max(HEADROOM_MIN, free * HEADROOM_SHARE));
  const fit = perLayer > 0 ? Math.min(of, Math.floor(usable / perLayer)) : of;
  const want = requested < 0 ? of : Math.min(requested, of);
  if (want <= fit) return { requested, layers: want, of, note: `${want} of ${of} layers on ${names} (${gib(free)} free)` };
  if (requested < 0) {
    return {
      requested,
      layers: fit,
      of,
      note: `automatic fit: ${fit} of ${of} layers on ${names}, the rest on the CPU (about ${gib(perLayer * of)} of weights, ${gib(free)} free on the GPUs)`,
    };
  }
  return {
    code: "model_load_failed",
    message: `--n-gpu-layers ${requested} does not fit: about ${gib(perLayer * want)} of weights for ${want} layers, ${gib(free)} free on ${names}; at most ${fit} layers fit (pass --n-gpu-layers ${fit}, or -1 to fit automatically)`,
  };
}
