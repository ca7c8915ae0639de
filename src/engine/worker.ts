// The engine Worker: the only place llama.cpp is called. It loads one model,
// then loops: take messages, run one scheduler step, post that step's events.

import type { Pointer } from "bun:ffi";
import { type CheckpointStore, openCheckpoints } from "./checkpoints";
import type { EngineErrorValue } from "./errors";
import { HostLedger, readHostLedger, trackHostBuffers } from "./host-ledger";
import { IDLE_SAVE_MIN_MS } from "./idle-save";
import { openNative } from "./native";
import { closeModel, type OpenedModel, openModel, schedulerDeps } from "./open";
import { CONTROL_FLAGS_OFFSET, type FromWorker, type LoadOptions, type NativeHandles, type TokenEvent, type ToWorker } from "./protocol";
import { Scheduler } from "./scheduler";
import { type TokenMark, tokenMarks } from "./tenancy";

declare const self: Worker;

let opened: OpenedModel | null = null;
let scheduler: Scheduler | null = null;
let checkpoints: CheckpointStore | null = null;
let running = false;
let closing = false;
const inbox: ToWorker[] = [];

const post = (m: FromWorker) => self.postMessage(m);

function load(
  libPath: string,
  o: LoadOptions,
  progress: SharedArrayBuffer,
  ctl: SharedArrayBuffer,
  hostLedger: SharedArrayBuffer,
  logLevel: number,
): void {
  const control = new Int32Array(ctl);
  const m = openModel(libPath, o, new Float32Array(progress), control, logLevel);
  if (!("ctx" in m)) {
    post({ type: "load_failed", error: m });
    return;
  }
  opened = m;
  checkpoints = openCheckpoints(m.info, o);
  // Host buffers are allocated and freed through the ledger, so a reaper can free them if this Worker dies.
  const tracked = { ...m, native: trackHostBuffers(m.native, new HostLedger(hostLedger)) };
  scheduler = new Scheduler({ ...schedulerDeps(tracked, o, control, CONTROL_FLAGS_OFFSET), checkpoints });
  // Peers compare it before fetching one of this model's checkpoints (hydration).
  const info = checkpoints?.portable ? { ...m.info, checkpointFingerprint: checkpoints.portable } : m.info;
  post({ type: "loaded", info, handles: { model: Number(m.model), ctx: Number(m.ctx) } });
}

// This Worker was started only to free what a dead one left: the context (and its thread pools) and the model.
function reap(libPath: string, h: NativeHandles, hostLedger: SharedArrayBuffer): void {
  const n = openNative(libPath);
  const { buffers, untracked } = readHostLedger(hostLedger);
  let hostBytes = 0;
  for (const b of buffers) {
    n.mesh_host_free(b.ptr as Pointer, b.size);
    hostBytes += b.size;
  }
  n.mesh_context_free(h.ctx as Pointer);
  n.mesh_model_free(h.model as Pointer);
  post({ type: "reaped", report: { hostBuffers: buffers.length, hostBytes, untracked } });
}

// This Worker serves the node's device to a split model's head (through the
// mesh's tunnel only: the endpoint is loopback). ggml's server loop never
// returns, so the Worker lives as long as the process.
function stageServe(m: Extract<ToWorker, { type: "stage_serve" }>): void {
  const n = openNative(m.libPath);
  n.mesh_init(m.logLevel);
  post({ type: "stage_serving" });
  const cache = m.cacheDir ? Buffer.from(`${m.cacheDir}\0`, "utf8") : null;
  n.mesh_rpc_serve(Buffer.from(`${m.endpoint}\0`, "utf8"), cache, m.threads);
  post({ type: "stage_failed", message: `could not serve stages on ${m.endpoint}` });
}

function tokenize(text: string, addSpecial: boolean, parseSpecial: boolean): number[] {
  const { native: n, model } = opened as OpenedModel;
  const bytes = Buffer.from(text, "utf8");
  let out = new Int32Array(bytes.length + 8);
  let count = n.mesh_tokenize(model, bytes, bytes.length, out, out.length, addSpecial ? 1 : 0, parseSpecial ? 1 : 0);
  if (count < 0) {
    out = new Int32Array(-count);
    count = n.mesh_tokenize(model, bytes, bytes.length, out, out.length, addSpecial ? 1 : 0, parseSpecial ? 1 : 0);
  }
  return Array.from(out.subarray(0, Math.max(0, count)));
}

function detokenize(tokens: number[]): string {
  return Buffer.from(detokenizeBytes(tokens)).toString("utf8");
}

function detokenizeBytes(tokens: number[]): Uint8Array {
  const { native: n, model } = opened as OpenedModel;
  const ids = new Int32Array(tokens);
  let buf = new Uint8Array(tokens.length * 8 + 16);
  let len = n.mesh_detokenize(model, ids, ids.length, buf, buf.length);
  if (len < 0) {
    buf = new Uint8Array(-len);
    len = n.mesh_detokenize(model, ids, ids.length, buf, buf.length);
  }
  return buf.subarray(0, Math.max(0, len));
}

const pieceBuf = new Uint8Array(256);

// One token's text as bytes; `special` renders control tokens (otherwise they are empty).
function piece(token: number, special: boolean): Uint8Array {
  const { native: n, model } = opened as OpenedModel;
  let buf = pieceBuf;
  let len = n.mesh_token_to_piece(model, token, buf, buf.length, special ? 1 : 0);
  if (len < 0) {
    buf = new Uint8Array(-len);
    len = n.mesh_token_to_piece(model, token, buf, buf.length, special ? 1 : 0);
  }
  return buf.slice(0, Math.max(0, len));
}

function pieces(tokens: number[]): Uint8Array[] {
  return tokens.map((t) => piece(t, true));
}

// Text with control tokens rendered: each run of other tokens is detokenized as llama.cpp does (an
// SPM tokenizer's leading space dropped: it puts one before the text at the start and after every
// control token), each control token is its text. A tokenized prompt comes back as it was written.
function detokenizeSpecial(tokens: number[]): string {
  const parts: Uint8Array[] = [];
  let start = 0;
  const run = (end: number) => {
    if (end > start) parts.push(detokenizeBytes(tokens.slice(start, end)));
  };
  const { native: n, model } = opened as OpenedModel;
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i] as number;
    // Not a control token: it has text without `special` (a negative length says it has more than fits).
    if (n.mesh_token_to_piece(model, t, pieceBuf, pieceBuf.length, 0) !== 0) continue;
    const text = piece(t, true);
    if (text.length === 0) continue;
    run(i);
    parts.push(text);
    start = i + 1;
  }
  run(tokens.length);
  return Buffer.concat(parts).toString("utf8");
}

// Where each prompt token ends in the prompt text (UTF-8 bytes), in one FFI call.
function byteEnds(tokens: number[]): Int32Array {
  const { native: n, model } = opened as OpenedModel;
  const ends = new Int32Array(tokens.length);
  if (tokens.length > 0) n.mesh_token_byte_ends(model, new Int32Array(tokens), tokens.length, ends);
  return ends;
}

// An out-of-range id would fail a whole batch in llama_decode, or throw
// std::out_of_range through the C boundary in detokenize (killing the process).
function invalidTokens(tokens: unknown): string | null {
  if (!Array.isArray(tokens)) return "a prompt must be text or an array of token ids";
  const n = opened?.info.nVocab ?? 0;
  for (const t of tokens) {
    if (!Number.isInteger(t) || (t as number) < 0 || (t as number) >= n) return `token ids must be integers from 0 to ${n - 1}`;
  }
  return null;
}

/** The strings of a message's key list (anything else is ignored). */
function stringsOf(keys: unknown): string[] {
  return Array.isArray(keys) ? keys.filter((k): k is string => typeof k === "string") : [];
}

function badRequest(message: string): EngineErrorValue {
  return { code: "invalid_request", message };
}

function handle(m: ToWorker, events: TokenEvent[]): void {
  switch (m.type) {
    case "load":
      load(m.libPath, m.options, m.progress, m.control, m.hostLedger, m.logLevel);
      return;
    case "shutdown":
      closing = true;
      return;
    case "reap":
      reap(m.libPath, m.handles, m.hostLedger);
      return;
    case "stage_serve":
      stageServe(m);
      return;
  }
  if (!scheduler) {
    const error: EngineErrorValue = { code: "engine_closed", message: "no model is loaded" };
    if (m.type === "generate") events.push({ id: m.id, kind: "error", error });
    else if (m.type !== "cancel" && m.type !== "marks" && m.type !== "clear_marks" && m.type !== "release_checkpoints")
      post({ type: "reply_error", rid: m.rid, error });
    return;
  }
  switch (m.type) {
    case "tokenize":
      post({ type: "reply", rid: m.rid, value: tokenize(m.text, m.addSpecial, m.parseSpecial) });
      return;
    case "detokenize": {
      const bad = invalidTokens(m.tokens);
      if (bad) post({ type: "reply_error", rid: m.rid, error: badRequest(bad) });
      else post({ type: "reply", rid: m.rid, value: m.special ? detokenizeSpecial(m.tokens) : detokenize(m.tokens) });
      return;
    }
    case "pieces": {
      const bad = invalidTokens(m.tokens);
      if (bad) post({ type: "reply_error", rid: m.rid, error: badRequest(bad) });
      else post({ type: "reply", rid: m.rid, value: pieces(m.tokens) });
      return;
    }
    case "stats":
      post({ type: "reply", rid: m.rid, value: scheduler.stats() });
      return;
    case "cancel":
      scheduler.cancel(m.id, events);
      return;
    case "marks":
      if (Array.isArray(m.marks)) scheduler.addMarks(m.id, m.marks);
      return;
    case "clear_marks":
      // The evicts go out with this loop iteration's flush.
      scheduler.clearMarks();
      return;
    case "release_checkpoints":
      if (Array.isArray(m.keys)) checkpoints?.release(m.keys.filter((k) => typeof k === "string"));
      return;
    case "checkpoint_describe":
      post({ type: "reply", rid: m.rid, value: checkpoints?.describe(stringsOf(m.keys)) ?? [] });
      return;
    case "checkpoint_has":
      post({ type: "reply", rid: m.rid, value: checkpoints?.has(stringsOf(m.keys)) ?? [] });
      return;
    case "checkpoint_export":
      post({ type: "reply", rid: m.rid, value: typeof m.key === "string" ? (checkpoints?.exportBlob(m.key) ?? null) : null });
      return;
    case "checkpoint_import": {
      const ok = m.blob instanceof Uint8Array && typeof m.hash === "string" && typeof m.key === "string";
      const value = !checkpoints
        ? { ok: false, code: "disabled" }
        : ok
          ? checkpoints.importBlob(m.blob, m.hash, m.key)
          : { ok: false, code: "corrupt" };
      post({ type: "reply", rid: m.rid, value });
      return;
    }
    case "generate": {
      const p = m.request.prompt;
      const bad = typeof p === "string" ? null : invalidTokens(p);
      if (bad) {
        events.push({ id: m.id, kind: "error", error: badRequest(bad) });
        return;
      }
      const prompt = typeof p === "string" ? tokenize(p, true, true) : p;
      // Byte offsets mean something only in a text prompt.
      const given = m.request.marks;
      let marks: TokenMark[] | null = null;
      if (typeof p === "string" && Array.isArray(given) && given.length > 0) marks = tokenMarks(given, byteEnds(prompt));
      scheduler.submit(m.id, m.flag, m.request, prompt, events, marks);
      return;
    }
  }
}

function flush(events: TokenEvent[]): void {
  if (events.length > 0) post({ type: "step", events });
  flushTenancy();
}

// After the step's events, so a request's done arrives before the marks its end changed.
function flushTenancy(): void {
  const delta = scheduler?.drainTenancy();
  if (delta) post({ type: "tenancy", delta });
}

// Yielding to the event loop between steps lets messages (new requests,
// cancels) arrive; the step itself runs synchronously.
const yieldToLoop = () => new Promise<void>((r) => setImmediate(r));

async function run(): Promise<void> {
  if (running) return;
  running = true;
  try {
    while (!closing) {
      const events: TokenEvent[] = [];
      while (inbox.length > 0) {
        const m = inbox.shift() as ToWorker;
        try {
          handle(m, events);
        } catch (e) {
          // One bad message fails itself, never the Worker and its other requests.
          const error = badRequest(`request rejected: ${(e as Error)?.message ?? String(e)}`);
          if (m.type === "generate") events.push({ id: m.id, kind: "error", error });
          else if ("rid" in m) post({ type: "reply_error", rid: m.rid, error });
        }
      }
      if (closing) {
        flush(events);
        break;
      }
      if (scheduler?.hasWork()) {
        scheduler.step(events);
        lastStepAt = performance.now();
      }
      flush(events);
      if (!scheduler?.hasWork() && inbox.length === 0) break;
      await yieldToLoop();
    }
  } finally {
    running = false;
  }
  if (closing) shutdown();
  else idleSaveSoon();
}

// Once the engine has been idle a while, copy finished conversations' KV to
// host RAM, one per tick so a new request waits for at most one copy; the
// next admission then only has to clear them. Not right away: a client's next
// turn often follows within milliseconds and would wait behind the copy, and
// a long conversation waits longer still (the scheduler says when each is due,
// see idle-save.ts). Before those saves, the conversation an admission moved
// out to make room comes back into the pool (Scheduler.restoreIdle).
const IDLE_SAVE_AFTER_MS = IDLE_SAVE_MIN_MS;
let idleTimer: ReturnType<typeof setTimeout> | null = null;
let lastStepAt = 0;

function idleSaveSoon(): void {
  if (idleTimer || closing) return;
  // Counted from the latest decode step; stats and tokenize calls do not count as activity.
  const due = scheduler?.nextIdleWorkInMs();
  if (due === null) return;
  const wait = Math.max(0, lastStepAt + IDLE_SAVE_AFTER_MS - performance.now(), due ?? 0);
  idleTimer = setTimeout(() => {
    idleTimer = null;
    if (closing || !scheduler) return;
    if (running || inbox.length > 0 || scheduler.hasWork()) return; // run() re-arms when it ends
    if (performance.now() - lastStepAt < IDLE_SAVE_AFTER_MS) idleSaveSoon();
    else {
      // Optional work: a failure here must never take the Worker down.
      let again = false;
      try {
        again = scheduler.idleWork() || scheduler.nextIdleWorkInMs() !== null;
      } catch {}
      flushTenancy();
      if (again) idleSaveSoon();
    }
  }, wait);
}

function shutdown(): void {
  if (idleTimer) clearTimeout(idleTimer);
  idleTimer = null;
  const events: TokenEvent[] = [];
  scheduler?.cancelAll(events);
  scheduler?.dispose();
  flush(events);
  if (opened) closeModel(opened);
  opened = null;
  scheduler = null;
  checkpoints = null;
  post({ type: "closed" });
}

self.onmessage = (e: MessageEvent<ToWorker>) => {
  inbox.push(e.data);
  void run();
};
