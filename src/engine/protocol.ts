import type { AttnKernel, PlainAttn } from "./attention";
// Messages between the main thread and the engine Worker. Plain data only.
import type { BackendLoad, DeviceInfo, Offload } from "./devices";
import type { EngineErrorValue } from "./errors";
import type { SchedulerCounters } from "./scheduler";

/** How to load a model and size its context. */
export interface LoadOptions {
  modelPath: string;
  /** Total KV cells shared by all slots (unified pool). */
  nCtx: number;
  nBatch: number;
  nUbatch: number;
  /** Parallel sequences (slots). */
  nParallel: number;
  threads: number;
  threadsBatch: number;
  nGpuLayers: number;
  /** Prebuilt GPU backend libraries to load into ggml before the model (see findBackendLibs). */
  backendLibs: string[];
  /** Block count and tensor bytes from the GGUF header, for fitting layers to GPU memory; null when unknown. */
  modelShape: { nLayer: number; weightBytes: number } | null;
  /** -1 auto, 0 off, 1 on. */
  flashAttn: -1 | 0 | 1;
  /** Batch sizes that take the plain attention path on a CPU-only flash context (see attention.ts); null: never. Absent: the default for the kernel that runs. */
  plainAttn?: PlainAttn | null;
  /** CPU flash-attention kernel (see attention.ts), the context's own; absent: mesh's. */
  attnKernel?: AttnKernel;
  useMmap: boolean;
  /** Requests that may wait for a slot or KV room before 429 (queue_full). */
  queueCapacity: number;
  /** Longest wait in the queue before 429 (queue_timeout), in milliseconds. */
  queueTimeoutMs: number;
  /** Reserve KV at admission; false only to demonstrate running without protection. */
  kvBudget: boolean;
  /** Host RAM (MiB) for idle sequences' KV state; 0 keeps idle prefixes resident in the pool. */
  hostCacheMiB: number;
  /** Copy a conversation an admission moved to host RAM back into the pool once the engine is idle; absent: on. */
  idleRestore?: boolean;
  /** Session checkpoints: RAM (MiB) and disk (MiB) budgets, and the directory spilled ones go to (null: RAM only). */
  checkpointRamMiB?: number;
  checkpointDiskMiB?: number;
  checkpointDir?: string | null;
  /** Split by layers over stage servers (ggml RPC endpoints, reached through the mesh's tunnels); absent or null: load whole. */
  split?: SplitLoad | null;
}

/** Where the layers of a split model go: the first stay local, then each endpoint's share in order (see src/split/plan.ts). */
export interface SplitLoad {
  /** "127.0.0.1:port" of each stage's local tunnel port, in pipeline order. */
  endpoints: string[];
  /** Offloaded slots per endpoint (layers, the last endpoint's share includes the output layer). */
  weights: number[];
}

/** Sampling settings; undefined fields take the defaults in DEFAULT_SAMPLING. */
export interface SamplingOptions {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  seed: number;
  repeatPenalty: number;
  frequencyPenalty: number;
  presencePenalty: number;
  penaltyLastN: number;
}

/** Defaults close to llama-server's, so the same request behaves alike on both. */
export const DEFAULT_SAMPLING: SamplingOptions = {
  temperature: 0.8,
  topK: 40,
  topP: 0.95,
  minP: 0.05,
  seed: 0xffffffff,
  repeatPenalty: 1,
  frequencyPenalty: 0,
  presencePenalty: 0,
  penaltyLastN: 64,
};

/** A prefix hash the server attaches to a prompt: the block ending `byteEnd` bytes (UTF-8) into the prompt text is held once the KV holds the tokens that cover those bytes. `parent` is the mark before it in the chain (null for the first). Opaque strings to the engine. */
export interface PrefixMark {
  hash: string;
  parent: string | null;
  byteEnd: number;
}

/** What the engine's KV started or stopped holding since the last report: inserts as [hash, parent], in chain order (a parent before its children); evicts as hashes. */
export interface TenancyDelta {
  inserts: Array<[string, string | null]>;
  evicts: string[];
}

/** One generation request as the worker sees it. */
export interface GenerateRequest {
  /** Text (tokenized with special tokens parsed) or token ids. */
  prompt: string | number[];
  maxTokens: number;
  /** Output tokens the KV reservation allows for: maxTokens when the caller set it, else the engine's default allowance. */
  reserveOutput: number;
  sampling: SamplingOptions;
  stop: string[];
  ignoreEos: boolean;
  /** Prefix marks of a text prompt (ignored for token ids); at most MAX_MARKS are used. */
  marks?: PrefixMark[];
  /** GBNF (rule `root`) every generated token must keep the output within; absent: unconstrained. */
  grammar?: string;
  /** Report each generated token's log-probability and this many (0..20) most probable alternatives; absent: none. */
  logprobs?: number;
  /** Session checkpoints: restore `restore` (when it still exists and fits the prompt) before prefill; save the sequence as `save` when the reply ends. */
  checkpoint?: { save?: string; restore?: string };
}

/** Most alternatives a generated token's logprobs can list (MESH_TOP_MAX in the shim). */
export const TOP_LOGPROBS_MAX = 20;

/** One alternative of a generated token: its id, bytes (UTF-8, maybe part of a character) and log-probability. */
export interface TokenAlternative {
  token: number;
  bytes: number[];
  logprob: number;
}

/**
 * A generated token's log-probability and its most probable alternatives (most probable first):
 * log-softmax of the model's logits over the tokens the grammar allows (all without a grammar),
 * before penalties, temperature and top-k/top-p/min-p.
 */
export interface TokenLogprob extends TokenAlternative {
  top: TokenAlternative[];
}

/** Facts about the loaded model and context. */
export interface ModelInfo {
  path: string;
  nVocab: number;
  bos: number;
  eos: number;
  addBos: boolean;
  nCtxTrain: number;
  nEmbd: number;
  nLayer: number;
  nHead: number;
  nHeadKv: number;
  nParams: number;
  sizeBytes: number;
  nCtx: number;
  nCtxSeq: number;
  nParallel: number;
  nBatch: number;
  name: string;
  architecture: string;
  chatTemplate: string | null;
  randomWeights: boolean;
  /** Text of the BOS / EOS tokens, for chat templates. */
  bosText: string;
  eosText: string;
  systemInfo: string;
  /** GPU backend libraries loaded at start (empty when the build links its backends in). */
  backends: BackendLoad[];
  /** Every device ggml could use (CPU included), memory as of the load. */
  devices: DeviceInfo[];
  /** Layers on GPUs and why. */
  offload: Offload;
  /** Batch sizes that decode with the plain attention path, as applied; null: flash (or plain) attention for all. */
  plainAttn: PlainAttn | null;
  /** The CPU flash-attention kernel that runs (ggml's where mesh's is not built or does not compute this model's attention). */
  attnKernel: AttnKernel;
  /** Whether the context computes attention with flash attention (llama.cpp's "auto" as resolved at load); off: matrix products for every decode, and neither kernel runs. */
  flashAttn: boolean;
  /** The portable fingerprint session checkpoints of this model carry between nodes; absent without checkpoints. */
  checkpointFingerprint?: string;
}

/** Engine load at a moment, plus the scheduler's cumulative counters. */
export interface EngineStats extends SchedulerCounters {
  slotsTotal: number;
  slotsBusy: number;
  waiting: number;
  queueCapacity: number;
  /** KV cells held (running + idle resident), counted per slot history. */
  kvCellsUsed: number;
  kvCellsRunning: number;
  kvCellsResident: number;
  /** Cells promised to running requests and not yet used. */
  kvCellsReserved: number;
  kvCellsFree: number;
  kvCellsTotal: number;
  /** Idle sequences saved in host RAM, their bytes (state + token ids), the bound, and entries dropped to stay within it. */
  hostCacheEntries: number;
  hostCacheBytes: number;
  hostCacheCapacityBytes: number;
  hostCacheEvictions: number;
  /** Session checkpoints held, their bytes in RAM and on disk, and how many were spilled to disk or dropped. */
  checkpoints: number;
  checkpointRamBytes: number;
  checkpointDiskBytes: number;
  checkpointSpills: number;
  checkpointDrops: number;
  /** Evictions and evicted cells over every reason. */
  evictions: number;
  evictedCells: number;
  /** CPU flash-attention ops computed by mesh's kernel and by ggml's, in this process (every context). */
  attnOpsMesh: number;
  attnOpsGgml: number;
}

export type FinishReason = "stop" | "length" | "cancelled";

/**
 * Where a request's time to first token went inside the engine Worker, in milliseconds: what the
 * caller sees beyond their sum is messaging, tokenization and delivery.
 */
export interface TtftPhases {
  /** Waiting for a slot or KV room. */
  queuedMs: number;
  /** Its admission: slot choice, saving other idle slots to host RAM, evictions, restore. */
  admitMs: number;
  /** Of admitMs: copying a saved sequence back from host RAM (or compacting the pool). */
  restoreMs: number;
  /** Of admitMs: saving idle sequences to host RAM. */
  saveMs: number;
  /** llama_decode calls from admission until its first token's logits (shared with the steps' other sequences). */
  decodeMs: number;
  /** Sampling its first token (with every other sequence sampled in that step). */
  sampleMs: number;
}

/** Per-request events, grouped per step into one message. */
export type TokenEvent =
  | { id: number; kind: "start"; promptTokens: number; cachedTokens: number; slot: number; waitedMs: number }
  | { id: number; kind: "text"; text: string; tokens: number[]; logprobs?: TokenLogprob[] }
  | {
      id: number;
      kind: "done";
      finishReason: FinishReason;
      promptTokens: number;
      cachedTokens: number;
      completionTokens: number;
      /** The stop string that ended it (finishReason "stop"); absent when it ended otherwise. */
      stopSequence?: string;
      /** The end-of-generation token that ended it (finishReason "stop"; not in any text event, never decoded), with its log-probability when the request asked for logprobs; absent when it ended otherwise (a stop string, length, cancelled, or ignoreEos). */
      eog?: { token: number; logprob?: number };
      /** Where its time to first token went inside the engine Worker; absent when it never got a slot. */
      phases?: TtftPhases;
    }
  | { id: number; kind: "error"; error: EngineErrorValue };

export type ToWorker =
  | {
      type: "load";
      libPath: string;
      options: LoadOptions;
      progress: SharedArrayBuffer;
      control: SharedArrayBuffer;
      /** Where the Worker records its host-RAM buffers, so a reaper can free them if it dies (host-ledger.ts). */
      hostLedger: SharedArrayBuffer;
      logLevel: number;
    }
  | { type: "tokenize"; rid: number; text: string; addSpecial: boolean; parseSpecial: boolean }
  /** `special`: render control tokens as their text (as llama-server's /detokenize does); otherwise they render as nothing. */
  | { type: "detokenize"; rid: number; tokens: number[]; special?: boolean }
  /** Each token's text, control tokens rendered, as UTF-8 bytes (replies Uint8Array[]). */
  | { type: "pieces"; rid: number; tokens: number[] }
  | { type: "generate"; id: number; flag: number; request: GenerateRequest }
  | { type: "cancel"; id: number }
  | { type: "stats"; rid: number }
  /** Marks of the reply generation `id` produced, attached at the end of the sequence it left, if that is still held intact. */
  | { type: "marks"; id: number; marks: Array<[string, string | null]> }
  /** Forget every mark of every holder (slots, host-RAM copies, running and queued prompts), reporting the held ones evicted; the KV stays. */
  | { type: "clear_marks" }
  /** Drop session checkpoints (RAM and disk): their session ended. */
  | { type: "release_checkpoints"; keys: string[] }
  /** Summaries (hash, sizes) of the session checkpoints held under these keys (replies CheckpointSummary[]). */
  | { type: "checkpoint_describe"; rid: number; keys: string[] }
  /** Which of these checkpoint keys are held (replies string[]). */
  | { type: "checkpoint_has"; rid: number; keys: string[] }
  /** A checkpoint as a blob a peer can import (replies Uint8Array, or null when not held). */
  | { type: "checkpoint_export"; rid: number; key: string }
  /** Store a peer's checkpoint blob if it is `key`'s, hashes to `hash` and fits this model (replies CheckpointImport). */
  | { type: "checkpoint_import"; rid: number; blob: Uint8Array; hash: string; key: string }
  | { type: "shutdown" }
  /** Sent to a fresh Worker after the engine's own one died: free the model and context it left behind. */
  | { type: "reap"; libPath: string; handles: NativeHandles; hostLedger: SharedArrayBuffer }
  /** Sent to a fresh Worker to serve this node's device to ggml RPC clients on a loopback endpoint; it blocks there for good. */
  | { type: "stage_serve"; libPath: string; endpoint: string; cacheDir: string | null; threads: number; logLevel: number };

/** What importing a peer's checkpoint blob did. */
export type CheckpointImport =
  | { ok: true; key: string; tokens: number }
  | { ok: false; code: "corrupt" | "incompatible" | "no_room" | "disabled" };

/** Addresses of what a loaded engine holds natively (so a dead Worker's leftovers can be freed by another). */
export interface NativeHandles {
  model: number;
  ctx: number;
}

export type FromWorker =
  | { type: "loaded"; info: ModelInfo; handles: NativeHandles }
  | { type: "load_failed"; error: EngineErrorValue }
  | { type: "reply"; rid: number; value: unknown }
  | { type: "reply_error"; rid: number; error: EngineErrorValue }
  | { type: "step"; events: TokenEvent[] }
  /** Held marks changed; one per loop iteration at most, never empty. */
  | { type: "tenancy"; delta: TenancyDelta }
  | { type: "closed" }
  | { type: "reaped"; report: ReapReport }
  /** A stage_serve Worker is about to serve (sent before it blocks), or could not. */
  | { type: "stage_serving" }
  | { type: "stage_failed"; message: string };

/** What a reaper freed of a dead Worker's host-RAM buffers (untracked: never recorded, the ledger was full). */
export interface ReapReport {
  hostBuffers: number;
  hostBytes: number;
  untracked: number;
}

/** Layout of the control SharedArrayBuffer: [0] abort-decode flag, then one cancel flag per in-flight request. */
export const CONTROL_ABORT = 0;
/** Raised by the native library when a split model lost a stage server (the Worker is stuck for good then). */
export const CONTROL_STAGE_LOST = 1;
export const CONTROL_FLAGS_OFFSET = 2;
