// Main-thread face of the engine: an async API over one engine Worker per
// model. Nothing here calls llama.cpp; the Worker does, so the event loop
// never waits on a decode.
import { cpus } from "node:os";
import { CHECKPOINT_DEFAULTS, type CheckpointSummary } from "./checkpoints";
import { readModelShape } from "./devices";
import { EngineError } from "./errors";
import { hostLedgerBytes } from "./host-ledger";
import { engineWorkerUrl, findBackendLibs, findNativeLib } from "./library";
import {
  type CheckpointImport,
  CONTROL_ABORT,
  CONTROL_FLAGS_OFFSET,
  CONTROL_STAGE_LOST,
  DEFAULT_SAMPLING,
  type EngineStats,
  type FromWorker,
  type GenerateRequest,
  type LoadOptions,
  type ModelInfo,
  type NativeHandles,
  type PrefixMark,
  type ReapReport,
  type SamplingOptions,
  type TenancyDelta,
  TOP_LOGPROBS_MAX,
  type TokenEvent,
  type ToWorker,
} from "./protocol";
import { MAX_MARKS, TenancyFeed } from "./tenancy";

export type { EngineErrorCode } from "./errors";
export { EngineError } from "./errors";
export type {
  EngineStats,
  FinishReason,
  LoadOptions,
  ModelInfo,
  PrefixMark,
  SamplingOptions,
  TenancyDelta,
  TokenAlternative,
  TokenLogprob,
} from "./protocol";
export { TOP_LOGPROBS_MAX } from "./protocol";
export { MAX_MARKS, TenancyFeed } from "./tenancy";

/** Options for Engine.load; everything but modelPath has a default. */
export interface EngineOptions extends Partial<LoadOptions> {
  modelPath: string;
  /** Path of the native library; found automatically when omitted. */
  libPath?: string;
  /** Most requests in flight (running + waiting) at once; more are refused with engine_busy. */
  maxInFlight?: number;
  /** llama.cpp log level passed through to stderr: 0 none, 3 warnings, 4 errors (default). */
  logLevel?: number;
  /** Called with load progress in [0, 1]. */
  onProgress?: (fraction: number) => void;
  /** Output tokens a request without max_tokens reserves KV for (it may grow past it into free room). */
  defaultReserveOutput?: number;
}

/** How often a split model's owner checks for a lost stage server (the bound on noticing it, beside TCP's own). */
export const STAGE_WATCH_MS = 100;

/** Defaults of the KV admission budget and queue. */
export const QUEUE_DEFAULTS = { capacity: 64, timeoutMs: 120_000, reserveOutput: 512 } as const;

/** Host RAM (MiB) for idle sequences' KV state by default; llama-server's --cache-ram default is the same. */
export const HOST_CACHE_DEFAULT_MIB = 8192;

/** What a caller passes to generate(). */
export interface GenerateOptions {
  prompt: string | number[];
  maxTokens?: number;
  sampling?: Partial<SamplingOptions>;
  stop?: string[];
  ignoreEos?: boolean;
  signal?: AbortSignal;
  /** Prefix marks of a text prompt, reported through onTenancy as the KV comes to hold them (ignored for token ids; at most MAX_MARKS). */
  marks?: PrefixMark[];
  /** GBNF (start rule `root`) constraining the output; a grammar that does not parse fails the request (invalid_request). */
  grammar?: string;
  /** Log-probability of each generated token plus this many (0..20) most probable alternatives, on its text event. */
  logprobs?: number;
  /** Session checkpoints: restore `restore` before prefill when it still exists; save the sequence as `save` when the reply ends (keys: 1-128 of [A-Za-z0-9_-]). */
  checkpoint?: { save?: string; restore?: string };
}

/** Longest grammar text generate() accepts. */
export const MAX_GRAMMAR_CHARS = 256 * 1024;

/** Events of one generation, in order: start, text*, done (the Worker's events without their request id). Errors are thrown from the iterator. */
export type GenerationEvent = TokenEvent extends infer E ? (E extends { kind: "error" } ? never : Omit<E, "id">) : never;

/** A running generation: iterate it for events, or cancel it. */
export class Generation implements AsyncIterable<GenerationEvent> {
  private readonly queue: Array<GenerationEvent | EngineError> = [];
  private wake: (() => void) | null = null;
  private ended = false;

  constructor(
    readonly id: number,
    private readonly onCancel: () => void,
  ) {}

  /** Deliver a worker event (engine internal). */
  push(e: GenerationEvent | EngineError): void {
    if (this.ended) return;
    this.queue.push(e);
    if (e instanceof EngineError || e.kind === "done") this.ended = true;
    this.wake?.();
  }

  /** Stop generating; the iterator ends with finishReason "cancelled". */
  cancel(): void {
    if (!this.ended) this.onCancel();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<GenerationEvent> {
    let finished = false;
    try {
      for (;;) {
        while (this.queue.length === 0) await new Promise<void>((r) => (this.wake = r));
        this.wake = null;
        const e = this.queue.shift() as GenerationEvent | EngineError;
        if (e instanceof EngineError) {
          finished = true;
          throw e;
        }
        yield e;
        if (e.kind === "done") {
          finished = true;
          return;
        }
      }
    } finally {
      // A consumer that stops early (break, throw, disconnect) cancels the work.
      if (!finished) this.cancel();
    }
  }
}

/**
 * What the server uses of an engine: the real one (llama.cpp in a Worker) or
 * FakeEngine (engine/fake.ts) in tests that need HTTP behaviour only.
 */
export interface EngineLike {
  readonly info: ModelInfo;
  /** Text to token ids (special tokens in the text are parsed when parseSpecial). */
  tokenize(text: string, opts?: { addSpecial?: boolean; parseSpecial?: boolean }): Promise<number[]>;
  /**
   * Token ids to text. With `special`, control tokens (BOS, chat markers) render as their text, so
   * a tokenized prompt comes back whole; otherwise they render as nothing.
   */
  detokenize(tokens: number[], opts?: { special?: boolean }): Promise<string>;
  /** Each token's text (control tokens rendered) as UTF-8 bytes: a piece may be part of a character. */
  pieces(tokens: number[]): Promise<Uint8Array[]>;
  /** Current load: slots, queue, KV cells. */
  stats(): Promise<EngineStats>;
  /** Start generating; iterate the result for events. Throws engine_busy when too many are in flight. */
  generate(opts: GenerateOptions): Generation;
  /** Cancel a generation by id. */
  cancel(id: number): void;
  /** Number of generations not yet finished. */
  readonly inFlight: number;
  /** Cancel everything and free the model. */
  close(): Promise<void>;
  /** Attach the marks of the reply generation `id` produced to the end of its KV sequence, if that is still held (fire and forget). */
  addMarks(id: number, marks: Array<[string, string | null]>): void;
  /** Forget every prefix mark the KV holds or was told of, reporting the held ones evicted, and keep the KV (fire and forget): prompts marked so far would now render differently. */
  clearMarks(): void;
  /** Listen for changes in the prefix marks the KV holds; returns the unsubscribe function. */
  onTenancy(listener: (delta: TenancyDelta) => void): () => void;
  /** Listen for the engine dying without close() (engines that cannot die, like FakeEngine, omit it). */
  onFailure?(listener: (e: EngineError) => void): void;
  /** Drop session checkpoints by key, in RAM and on disk (fire and forget); absent on engines without checkpoints. */
  releaseCheckpoints?(keys: string[]): void;
  /** Hash and sizes of the checkpoints held under `keys` (what a node announces); absent on engines without checkpoints. */
  describeCheckpoints?(keys: string[]): Promise<CheckpointSummary[]>;
  /** Which of `keys` are held. */
  hasCheckpoints?(keys: string[]): Promise<string[]>;
  /** A checkpoint as a blob for a peer, or null when not held. */
  exportCheckpoint?(key: string): Promise<Uint8Array | null>;
  /** Store a peer's checkpoint blob, checked against `hash`, the announced `key` and this model. */
  importCheckpoint?(blob: Uint8Array, hash: string, key: string): Promise<CheckpointImport>;
}

type WithoutRid<T> = T extends unknown ? Omit<T, "rid"> : never;

// Concurrent dlopen from freshly started Workers has crashed Bun: start them one at a time.
let startLock: Promise<unknown> = Promise.resolve();

/** One loaded model in its own Worker. */
export class Engine implements EngineLike {
  private nextId = 1;
  private nextRid = 1;
  private readonly replies = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private readonly gens = new Map<number, { gen: Generation; flag: number; unlisten?: () => void }>();
  private readonly freeFlags: number[];
  private readonly control: Int32Array;
  private closed = false;
  private closing: Promise<void> | null = null;
  private onClosed: (() => void) | null = null;
  private readonly tenancy = new TenancyFeed();
  private readonly failureListeners: Array<(e: EngineError) => void> = [];
  /** The library and native handles of the loaded model, for freeing them if the Worker dies. */
  private native: { libPath: string; handles: NativeHandles; hostLedger: SharedArrayBuffer } | null = null;
  private reaped: ReapReport | null = null;
  private freed = false;
  private reaping = false;
  private workerGone = false;
  private onReleased: () => void = () => {};
  private readonly released = new Promise<void>((resolve) => {
    this.onReleased = resolve;
  });

  private constructor(
    private readonly worker: Worker,
    readonly info: ModelInfo,
    controlBuf: SharedArrayBuffer,
    maxInFlight: number,
    private readonly defaultReserveOutput: number,
    split = false,
  ) {
    this.control = new Int32Array(controlBuf);
    this.freeFlags = Array.from({ length: maxInFlight }, (_, i) => maxInFlight - 1 - i);
    worker.onmessage = (e: MessageEvent<FromWorker>) => this.onMessage(e.data);
    worker.onerror = (e) => this.died(`engine worker failed: ${e.message}`);
    // Terminated or exited without close() (a crash, or whoever force-terminated it): the same as an error.
    worker.addEventListener("close", () => {
      this.workerGone = true;
      if (!this.closing) this.died("engine worker stopped");
    });
    if (split) this.watchStages();
  }

  // A split model's Worker parks for good when a stage server is lost (see
  // loadSplit in open.ts): poll the flag the native library raises and fail
  // everything in flight within STAGE_WATCH_MS, instead of hanging.
  private watchStages(): void {
    const timer = setInterval(() => {
      if (this.closed) clearInterval(timer);
      else if (Atomics.load(this.control, CONTROL_STAGE_LOST) !== 0) {
        clearInterval(timer);
        this.died("a stage server of this split model was lost");
      }
    }, STAGE_WATCH_MS);
    timer.unref();
  }

  /** Listen for the Worker dying without close() (crash, force-termination); the engine is closed by then. */
  onFailure(listener: (e: EngineError) => void): void {
    this.failureListeners.push(listener);
  }

  // A dead Worker answers nothing: close the engine so every caller settles now and later calls fail fast.
  private died(message: string): void {
    if (this.closed) return;
    this.closed = true;
    this.worker.terminate();
    this.tenancy.end();
    const err = new EngineError("engine_closed", message);
    this.fail(err);
    for (const l of this.failureListeners.splice(0)) l(err);
    this.reap();
    // A close() under way waits for a "closed" that a dead Worker never sends: it is over now.
    this.onClosed?.();
  }

  /** Start a Worker and load a model in it; rejects with an EngineError on failure. */
  static load(opts: EngineOptions): Promise<Engine> {
    const run = startLock.then(() => Engine.start(opts));
    startLock = run.catch(() => undefined);
    return run;
  }

  private static async start(opts: EngineOptions): Promise<Engine> {
    const libPath = opts.libPath ?? findNativeLib();
    if (!libPath) {
      const env = process.env.MESH_NATIVE_LIB;
      throw new EngineError(
        "model_load_failed",
        env
          ? `MESH_NATIVE_LIB is ${env}, which does not exist`
          : "the native llama.cpp library is not built: run 'bun run build.ts native' first",
      );
    }
    const threads = opts.threads ?? Math.max(1, cpus().length);
    const nParallel = opts.nParallel ?? 4;
    const options: LoadOptions = {
      modelPath: opts.modelPath,
      nCtx: opts.nCtx ?? 4096 * nParallel,
      // A step holds one token per decoding slot: a smaller batch would starve slots.
      nBatch: Math.max(opts.nBatch ?? 2048, nParallel),
      nUbatch: opts.nUbatch ?? 512,
      nParallel,
      threads,
      threadsBatch: opts.threadsBatch ?? threads,
      nGpuLayers: opts.nGpuLayers ?? -1,
      backendLibs: opts.backendLibs ?? findBackendLibs(),
      modelShape: opts.modelShape !== undefined ? opts.modelShape : await readModelShape(opts.modelPath),
      flashAttn: opts.flashAttn ?? -1,
      plainAttn: opts.plainAttn,
      attnKernel: opts.attnKernel,
      useMmap: opts.useMmap ?? true,
      queueCapacity: opts.queueCapacity ?? QUEUE_DEFAULTS.capacity,
      queueTimeoutMs: opts.queueTimeoutMs ?? QUEUE_DEFAULTS.timeoutMs,
      kvBudget: opts.kvBudget ?? true,
      hostCacheMiB: opts.hostCacheMiB ?? HOST_CACHE_DEFAULT_MIB,
      idleRestore: opts.idleRestore ?? true,
      checkpointRamMiB: opts.checkpointRamMiB ?? CHECKPOINT_DEFAULTS.ramMiB,
      checkpointDiskMiB: opts.checkpointDiskMiB ?? CHECKPOINT_DEFAULTS.diskMiB,
      checkpointDir: opts.checkpointDir ?? null,
      split: opts.split ?? null,
    };
    // Cancel flags must outlast the queue: the queue, not this, refuses load.
    const maxInFlight = opts.maxInFlight ?? Math.max(1024, 2 * (options.queueCapacity + nParallel));
    const progress = new SharedArrayBuffer(4);
    const control = new SharedArrayBuffer(4 * (CONTROL_FLAGS_OFFSET + maxInFlight));
    const hostLedger = new SharedArrayBuffer(hostLedgerBytes());
    const worker = new Worker(engineWorkerUrl());
    const progressView = new Float32Array(progress);
    let last = -1;
    const timer = opts.onProgress
      ? setInterval(() => {
          const p = progressView[0] as number;
          if (p !== last) {
            last = p;
            opts.onProgress?.(p);
          }
        }, 100)
      : null;
    try {
      const { info, handles } = await new Promise<{ info: ModelInfo; handles: NativeHandles }>((resolve, reject) => {
        worker.onmessage = (e: MessageEvent<FromWorker>) => {
          const m = e.data;
          if (m.type === "loaded") resolve({ info: m.info, handles: m.handles });
          else if (m.type === "load_failed") reject(EngineError.from(m.error));
        };
        worker.onerror = (e) => reject(new EngineError("model_load_failed", `engine worker failed: ${e.message}`));
        if (options.split) {
          const view = new Int32Array(control);
          const watch = setInterval(() => {
            if (Atomics.load(view, CONTROL_STAGE_LOST) === 0) return;
            clearInterval(watch);
            reject(new EngineError("model_load_failed", "a stage server was lost while the split model loaded"));
          }, STAGE_WATCH_MS);
          const stop = () => clearInterval(watch);
          worker.addEventListener("message", stop, { once: true });
          worker.addEventListener("error", stop, { once: true });
        }
        const msg: ToWorker = { type: "load", libPath, options, progress, control, hostLedger, logLevel: opts.logLevel ?? 4 };
        worker.postMessage(msg);
      });
      if (last !== 1) opts.onProgress?.(1);
      const engine = new Engine(
        worker,
        info,
        control,
        maxInFlight,
        opts.defaultReserveOutput ?? QUEUE_DEFAULTS.reserveOutput,
        !!options.split,
      );
      engine.native = { libPath, handles, hostLedger };
      return engine;
    } catch (e) {
      worker.terminate();
      throw e;
    } finally {
      if (timer) clearInterval(timer);
    }
  }

  /** Text to token ids (special tokens in the text are parsed when parseSpecial). */
  tokenize(text: string, opts: { addSpecial?: boolean; parseSpecial?: boolean } = {}): Promise<number[]> {
    return this.call({ type: "tokenize", text, addSpecial: opts.addSpecial ?? true, parseSpecial: opts.parseSpecial ?? true }) as Promise<
      number[]
    >;
  }

  /** Token ids to text; with `special`, control tokens render as their text. */
  detokenize(tokens: number[], opts: { special?: boolean } = {}): Promise<string> {
    return this.call({ type: "detokenize", tokens, special: opts.special ?? false }) as Promise<string>;
  }

  /** Each token's text (control tokens rendered) as UTF-8 bytes. */
  pieces(tokens: number[]): Promise<Uint8Array[]> {
    return this.call({ type: "pieces", tokens }) as Promise<Uint8Array[]>;
  }

  /** Current load: slots, queue, KV cells. */
  stats(): Promise<EngineStats> {
    return this.call({ type: "stats" }) as Promise<EngineStats>;
  }

  /** Start generating; iterate the result for events. Throws engine_busy when too many are in flight. */
  generate(opts: GenerateOptions): Generation {
    if (this.closed) throw new EngineError("engine_closed", "the engine is closed");
    // NaN would poison the KV arithmetic inside the worker step.
    if (opts.maxTokens !== undefined && !(Number.isFinite(opts.maxTokens) && opts.maxTokens >= 1)) {
      throw new EngineError("invalid_request", "maxTokens must be a finite number of at least 1");
    }
    if (opts.logprobs !== undefined && !(Number.isInteger(opts.logprobs) && opts.logprobs >= 0 && opts.logprobs <= TOP_LOGPROBS_MAX)) {
      throw new EngineError("invalid_request", `logprobs must be an integer from 0 to ${TOP_LOGPROBS_MAX}`);
    }
    if (opts.grammar !== undefined && opts.grammar.length > MAX_GRAMMAR_CHARS) {
      throw new EngineError("invalid_request", `the grammar is longer than ${MAX_GRAMMAR_CHARS} characters`);
    }
    const flag = this.freeFlags.pop();
    if (flag === undefined) throw new EngineError("engine_busy", "too many requests in flight on this engine");
    const id = this.nextId++;
    Atomics.store(this.control, CONTROL_FLAGS_OFFSET + flag, 0);
    const gen = new Generation(id, () => this.cancel(id));
    this.gens.set(id, { gen, flag });
    const maxTokens = Math.max(1, Math.floor(opts.maxTokens ?? this.info.nCtxSeq));
    const request: GenerateRequest = {
      prompt: opts.prompt,
      maxTokens,
      reserveOutput: opts.maxTokens === undefined ? Math.min(maxTokens, this.defaultReserveOutput) : maxTokens,
      sampling: { ...DEFAULT_SAMPLING, ...opts.sampling },
      stop: (opts.stop ?? []).filter((s) => s.length > 0),
      ignoreEos: opts.ignoreEos ?? false,
    };
    if (opts.marks && opts.marks.length > 0 && typeof opts.prompt === "string") request.marks = opts.marks.slice(0, MAX_MARKS);
    if (opts.grammar) request.grammar = opts.grammar;
    if (opts.logprobs !== undefined) request.logprobs = opts.logprobs;
    if (opts.checkpoint) request.checkpoint = { ...opts.checkpoint };
    this.post({ type: "generate", id, flag, request });
    const signal = opts.signal;
    if (signal) {
      if (signal.aborted) this.cancel(id);
      else {
        const onAbort = () => this.cancel(id);
        signal.addEventListener("abort", onAbort, { once: true });
        // A long-lived signal shared by many generations must not collect listeners.
        const entry = this.gens.get(id);
        if (entry) entry.unlisten = () => signal.removeEventListener("abort", onAbort);
      }
    }
    return gen;
  }

  /** Cancel a generation by id; its slot is freed within one step. */
  cancel(id: number): void {
    const g = this.gens.get(id);
    if (!g) return;
    Atomics.store(this.control, CONTROL_FLAGS_OFFSET + g.flag, 1);
    this.post({ type: "cancel", id });
  }

  /** Number of generations not yet finished. */
  get inFlight(): number {
    return this.gens.size;
  }

  /** Attach the marks of the reply generation `id` produced to the end of the KV sequence it left, if still held intact (fire and forget). */
  addMarks(id: number, marks: Array<[string, string | null]>): void {
    if (this.closing || marks.length === 0) return;
    this.post({ type: "marks", id, marks: marks.slice(0, MAX_MARKS) });
  }

  /** Forget every prefix mark (held, of running and queued prompts, awaiting reply marks) and report the held ones evicted; the KV stays (fire and forget). */
  clearMarks(): void {
    if (this.closing) return;
    this.post({ type: "clear_marks" });
  }

  /** Drop session checkpoints by key, in RAM and on disk (fire and forget). */
  releaseCheckpoints(keys: string[]): void {
    if (this.closing || keys.length === 0) return;
    this.post({ type: "release_checkpoints", keys });
  }

  /** Hash and sizes of the checkpoints held under `keys` (hashing runs in the Worker). */
  describeCheckpoints(keys: string[]): Promise<CheckpointSummary[]> {
    return this.call({ type: "checkpoint_describe", keys }) as Promise<CheckpointSummary[]>;
  }

  /** Which of `keys` are held. */
  hasCheckpoints(keys: string[]): Promise<string[]> {
    return this.call({ type: "checkpoint_has", keys }) as Promise<string[]>;
  }

  /** A checkpoint as a blob for a peer (read back from disk if spilled), or null when not held. */
  exportCheckpoint(key: string): Promise<Uint8Array | null> {
    return this.call({ type: "checkpoint_export", key }) as Promise<Uint8Array | null>;
  }

  /** Store a peer's checkpoint blob (verified in the Worker: hash, model fingerprint). */
  importCheckpoint(blob: Uint8Array, hash: string, key: string): Promise<CheckpointImport> {
    return this.call({ type: "checkpoint_import", blob, hash, key }) as Promise<CheckpointImport>;
  }

  /** Listen for the prefix marks the KV starts or stops holding; a closed engine sends one last delta evicting all. */
  onTenancy(listener: (delta: TenancyDelta) => void): () => void {
    return this.tenancy.listen(listener);
  }

  /** Cancel everything, free the model and stop the Worker. */
  close(): Promise<void> {
    if (this.closing) return this.closing;
    // Already dead (died()): nothing answers a shutdown, and everything has settled.
    if (this.closed) {
      this.closing = Promise.resolve();
      return this.closing;
    }
    // Routing must stop sending this node prompts for what it is about to free.
    this.tenancy.end();
    this.closing = new Promise<void>((resolve) => {
      this.onClosed = resolve;
      Atomics.store(this.control, CONTROL_ABORT, 1);
      this.post({ type: "shutdown" });
      // A Worker stuck in native code still ends: terminate after a grace period.
      setTimeout(() => resolve(), 10_000).unref();
    }).then(() => {
      this.closed = true;
      this.worker.terminate();
      this.fail(new EngineError("engine_closed", "the engine is closed"));
      // Stuck past the grace period, the Worker never freed what it held.
      if (this.freed) this.onReleased();
      else this.reap();
    });
    return this.closing;
  }

  private post(m: ToWorker): void {
    if (!this.closed) this.worker.postMessage(m);
  }

  private call(m: WithoutRid<Extract<ToWorker, { rid: number }>>): Promise<unknown> {
    if (this.closed || this.closing) return Promise.reject(new EngineError("engine_closed", "the engine is closed"));
    const rid = this.nextRid++;
    return new Promise((resolve, reject) => {
      this.replies.set(rid, { resolve, reject });
      this.post({ ...m, rid } as ToWorker);
    });
  }

  private onMessage(m: FromWorker): void {
    switch (m.type) {
      case "step":
        for (const e of m.events) this.deliver(e);
        return;
      case "reply":
      case "reply_error": {
        const r = this.replies.get(m.rid);
        if (!r) return;
        this.replies.delete(m.rid);
        if (m.type === "reply") r.resolve(m.value);
        else r.reject(EngineError.from(m.error));
        return;
      }
      case "tenancy":
        this.tenancy.emit(m.delta);
        return;
      case "closed":
        this.freed = true;
        this.onClosed?.();
        return;
    }
  }

  /** What the reaper freed of a dead Worker's host-RAM buffers; null unless a reaper ran. */
  reapReport(): ReapReport | null {
    return this.reaped;
  }

  /** Settles once what the Worker held natively is freed: by the Worker on close(), or by a reaper after it died. */
  whenReleased(): Promise<void> {
    return this.released;
  }

  // A Worker that died (or was terminated stuck) never freed its model, context and thread pools: once its
  // thread is gone, so nothing can be running on them, a fresh Worker frees them (llama.cpp stays off this thread).
  private reap(): void {
    const n = this.native;
    if (this.freed || this.reaping || !n) return;
    this.reaping = true;
    const start = () => {
      const reaper = new Worker(engineWorkerUrl());
      const done = () => {
        reaper.terminate();
        this.freed = true;
        this.onReleased();
      };
      reaper.onmessage = (e: MessageEvent<FromWorker>) => {
        if (e.data.type === "reaped") {
          this.reaped = e.data.report;
          done();
        }
      };
      reaper.onerror = done;
      reaper.postMessage({ type: "reap", libPath: n.libPath, handles: n.handles, hostLedger: n.hostLedger } satisfies ToWorker);
    };
    if (this.workerGone) start();
    else this.worker.addEventListener("close", start, { once: true });
  }

  private deliver(e: TokenEvent): void {
    const g = this.gens.get(e.id);
    if (!g) return;
    if (e.kind === "error") {
      this.release(e.id);
      g.gen.push(EngineError.from(e.error));
      return;
    }
    const { id: _, ...event } = e;
    if (e.kind === "done") this.release(e.id);
    g.gen.push(event as GenerationEvent);
  }

  private release(id: number): void {
    const g = this.gens.get(id);
    if (!g) return;
    this.gens.delete(id);
    g.unlisten?.();
    this.freeFlags.push(g.flag);
  }

  private fail(err: EngineError): void {
    for (const [id, g] of this.gens) {
      this.release(id);
      g.gen.push(err);
    }
    for (const r of this.replies.values()) r.reject(err);
    this.replies.clear();
  }
}

/** Collect a whole generation: its text, tokens and final counts. */
export async function collect(
  gen: Generation,
): Promise<{ text: string; tokens: number[]; done: Extract<GenerationEvent, { kind: "done" }> }> {
  let text = "";
  const tokens: number[] = [];
  for await (const e of gen) {
    if (e.kind === "text") {
      text += e.text;
      tokens.push(...e.tokens);
    } else if (e.kind === "done") return { text, tokens, done: e };
  }
  throw new EngineError("engine_closed", "generation ended without a result");
}
