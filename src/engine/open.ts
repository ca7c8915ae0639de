// Opening a model and its context through the shim. Called by the engine
// Worker (and by tests that drive a Scheduler directly): it blocks for as
// long as llama.cpp takes to load the file.
import type { Pointer } from "bun:ffi";
import { type AttnKernel, DEFAULT_ATTN_KERNEL, defaultPlainAttn, MESH_FA_MIN_QUERIES, type PlainAttn, plainAttnWindow } from "./attention";
import { type BackendLoad, type DeviceInfo, fitGpuLayers, listDevices, loadBackends, type Offload } from "./devices";
import type { EngineErrorValue } from "./errors";
import { kvBytesPerToken } from "./kv";
import { type Native, openNative } from "./native";
import { CONTROL_ABORT, CONTROL_STAGE_LOST, type LoadOptions, type ModelInfo, type SplitLoad } from "./protocol";
import type { SchedulerDeps } from "./scheduler";

/** A loaded model and its context. */
export interface OpenedModel {
  native: Native;
  model: Pointer;
  ctx: Pointer;
  info: ModelInfo;
}

const cstr = (s: string) => Buffer.from(`${s}\0`, "utf8");

/** The shim's last error message, or fallback when it has none. */
export function lastError(n: Native, fallback: string): string {
  const buf = new Uint8Array(512);
  const len = n.mesh_last_error(buf, buf.length);
  return len > 0 ? Buffer.from(buf.subarray(0, len)).toString("utf8") : fallback;
}

/** Read a string the shim writes into a caller buffer, growing it once when too small; null when absent. */
export function readString(fn: (buf: Uint8Array, cap: number) => number, cap = 256): string | null {
  let buf = new Uint8Array(cap);
  let n = fn(buf, buf.length);
  if (n < 0) return null;
  if (n >= buf.length) {
    buf = new Uint8Array(n + 1);
    n = fn(buf, buf.length);
  }
  return Buffer.from(buf.subarray(0, n)).toString("utf8");
}

/**
 * Load the library, the model and a context. control holds the abort flag at
 * CONTROL_ABORT; progress gets the load fraction. A failure is an error
 * value, with nothing left allocated.
 */
export function openModel(
  libPath: string,
  o: LoadOptions,
  progress: Float32Array,
  control: Int32Array,
  logLevel: number,
): OpenedModel | EngineErrorValue {
  let n: Native;
  try {
    n = openNative(libPath);
  } catch (e) {
    return { code: "model_load_failed", message: `cannot load the native library: ${(e as Error).message}` };
  }
  n.mesh_init(logLevel);
  const backends = loadBackends(n, o.backendLibs);
  const devices = listDevices(n);
  // A whole model after a split one (a head re-planned onto itself): nobody watches a lost-stage
  // flag for it, so a ggml abort must end the process again rather than park a thread unseen.
  if (!o.split) n.mesh_stage_abort_flag(null);
  const offload = o.split ? splitOffload(o.split) : fitGpuLayers(o.nGpuLayers, o.modelShape, devices);
  if ("code" in offload) return offload;
  const model = o.split
    ? loadSplit(n, o.modelPath, o.useMmap, progress, control, o.split)
    : (n.mesh_model_load(cstr(o.modelPath), offload.layers, o.useMmap ? 1 : 0, progress) as Pointer | null);
  if (!model) return { code: "model_load_failed", message: lastError(n, `llama.cpp could not load ${o.modelPath}`) };
  const params = new Int32Array([o.nCtx, o.nBatch, o.nUbatch, o.nParallel, o.threads, o.threadsBatch, 1, o.flashAttn, 1]);
  const ctx = n.mesh_context_new(model, params, control.subarray(CONTROL_ABORT, CONTROL_ABORT + 1)) as Pointer | null;
  if (!ctx) {
    n.mesh_model_free(model);
    return { code: "context_create_failed", message: lastError(n, `could not create a context of ${o.nCtx} tokens`) };
  }
  // Memory as it stands with the weights and KV placed: what the mesh plans with.
  const attnKernel = applyAttnKernel(n, ctx, o.attnKernel ?? DEFAULT_ATTN_KERNEL);
  const info = modelInfo(n, model, ctx, o.modelPath, { backends, devices: listDevices(n), offload, plainAttn: null, attnKernel });
  info.plainAttn = applyPlainAttn(n, ctx, o, info);
  return { native: n, model, ctx, info };
}

// The context's own setting. A build without mesh's kernel (no --wrap in the platform's linker)
// answers -1, a model whose attention it does not compute (head sizes, ALiBi, soft-capping,
// sinks) 0: ggml's kernel runs, and the plain-attention default with it.
function applyAttnKernel(n: Native, ctx: Pointer, want: AttnKernel): AttnKernel {
  const r = n.mesh_set_attn_kernel(ctx, want === "mesh" ? MESH_FA_MIN_QUERIES : 0, 1);
  return r > 0 ? "mesh" : "ggml";
}

// Only where every layer and the cache are on the CPU: the window was measured
// there, and a split's stages or a GPU have kernels of their own.
function applyPlainAttn(n: Native, ctx: Pointer, o: LoadOptions, info: ModelInfo): PlainAttn | null {
  const cpuOnly = !o.split && info.offload.layers === 0;
  const want = o.plainAttn === undefined ? defaultPlainAttn(info.attnKernel) : o.plainAttn;
  const w = plainAttnWindow(want, { ...info, cpuOnly });
  if (!w) return null;
  return n.mesh_set_plain_attn(ctx, w.min, w.max) === 1 ? w : null;
}

/** What a split load offloads: every slot the stage servers take (the head's CPU keeps the rest). */
function splitOffload(split: SplitLoad): Offload | EngineErrorValue {
  const ok =
    split.endpoints.length > 0 &&
    split.endpoints.length === split.weights.length &&
    split.weights.every((w) => Number.isInteger(w) && w > 0);
  if (!ok) return { code: "model_load_failed", message: "a split needs one positive whole layer count per stage endpoint" };
  const layers = split.weights.reduce((a, b) => a + b, 0);
  return {
    requested: layers,
    layers,
    of: layers,
    note: `split: ${split.weights.join("+")} layers over ${split.endpoints.length} stage server(s), the rest on this node's CPU`,
  };
}

// A lost stage must not end the process (ggml's RPC client aborts): the shim
// raises CONTROL_STAGE_LOST instead, which the engine's owner watches.
function loadSplit(
  n: Native,
  path: string,
  useMmap: boolean,
  progress: Float32Array,
  control: Int32Array,
  split: SplitLoad,
): Pointer | null {
  n.mesh_stage_abort_flag(control.subarray(CONTROL_STAGE_LOST, CONTROL_STAGE_LOST + 1));
  const weights = new Float32Array(split.weights);
  const layers = split.weights.reduce((a, b) => a + b, 0);
  return n.mesh_model_load_split(
    cstr(path),
    useMmap ? 1 : 0,
    progress,
    cstr(split.endpoints.join("\n")),
    weights,
    split.endpoints.length,
    layers,
  ) as Pointer | null;
}

/** What a Scheduler over an opened model needs; the per-request cancel flags sit in control after flagsOffset. */
export function schedulerDeps(m: OpenedModel, o: LoadOptions, control: Int32Array, flagsOffset: number): SchedulerDeps {
  return {
    native: m.native,
    model: m.model,
    ctx: m.ctx,
    nCtx: m.info.nCtx,
    nCtxSeq: m.info.nCtxSeq,
    nBatch: m.info.nBatch,
    plainAttn: m.info.plainAttn,
    kvBytesPerToken: kvBytesPerToken(m.info),
    nParallel: m.info.nParallel,
    flags: control,
    flagsOffset,
    queueCapacity: o.queueCapacity,
    queueTimeoutMs: o.queueTimeoutMs,
    kvBudget: o.kvBudget,
    hostCacheBytes: Math.max(0, Math.floor(o.hostCacheMiB * 1024 * 1024)),
    idleRestore: o.idleRestore ?? true,
    // Only where mesh's kernel computes every layer's attention: elsewhere a step of its own gains nothing.
    separatePrefill: m.info.flashAttn && m.info.attnKernel === "mesh" && m.info.offload.layers === 0 && !o.split,
    now: () => performance.now(),
  };
}

/** Free what openModel allocated (the context, then the model). */
export function closeModel(m: OpenedModel): void {
  m.native.mesh_context_free(m.ctx);
  m.native.mesh_model_free(m.model);
}

function modelInfo(
  n: Native,
  model: Pointer,
  ctx: Pointer,
  path: string,
  placed: { backends: BackendLoad[]; devices: DeviceInfo[]; offload: Offload; plainAttn: PlainAttn | null; attnKernel: AttnKernel },
): ModelInfo {
  const mi = new Int32Array(9);
  n.mesh_model_info(model, mi);
  const sizes = new BigUint64Array(2);
  n.mesh_model_sizes(model, sizes);
  const ci = new Int32Array(4);
  n.mesh_context_info(ctx, ci);
  const meta = (key: string) => readString((b, c) => n.mesh_model_meta(model, cstr(key), b, c));
  return {
    path,
    nVocab: mi[0] as number,
    bos: mi[1] as number,
    eos: mi[2] as number,
    addBos: mi[3] === 1,
    nCtxTrain: mi[4] as number,
    nEmbd: mi[5] as number,
    nLayer: mi[6] as number,
    nHead: mi[7] as number,
    nHeadKv: mi[8] as number,
    nParams: Number(sizes[0]),
    sizeBytes: Number(sizes[1]),
    nCtx: ci[0] as number,
    nCtxSeq: ci[1] as number,
    nParallel: ci[2] as number,
    nBatch: ci[3] as number,
    name: meta("general.name") ?? "",
    architecture: meta("general.architecture") ?? "",
    chatTemplate: readString((b, c) => n.mesh_model_chat_template(model, b, c), 4096),
    randomWeights: meta("mesh.random_weights") === "true",
    bosText: tokenText(n, model, mi[1] as number),
    eosText: tokenText(n, model, mi[2] as number),
    systemInfo: String(n.mesh_system_info()),
    flashAttn: n.mesh_attn_is_flash(ctx) === 1,
    ...placed,
  };
}

/** The text of a special token (e.g. "<s>"), "" for none. */
function tokenText(n: Native, m: Pointer, token: number): string {
  if (token < 0) return "";
  const buf = new Uint8Array(64);
  const len = n.mesh_token_to_piece(m, token, buf, buf.length, 1);
  return len > 0 ? Buffer.from(buf.subarray(0, len)).toString("utf8") : "";
}
