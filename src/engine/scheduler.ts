// Continuous batching over llama.cpp sequences. Runs inside the engine Worker
// only: every method may call into llama.cpp and block for a decode step.

import type { Pointer } from "bun:ffi";
import { MESH_FA_MIN_QUERIES, type PlainAttn } from "./attention";
import { saveCheckpoint, toRestorable } from "./checkpoint-state";
import type { Checkpoint, CheckpointStore } from "./checkpoints";
import { shouldCompact } from "./compaction";
import type { EngineErrorValue } from "./errors";
import { HostCache, type HostEntry } from "./host-cache";
import { idleRestoreDelayMs, idleSaveDelayMs } from "./idle-save";
import { type KvUsage, kvUsage, planEviction, reservation, type SlotUsage } from "./kv";
import type { Native } from "./native";
import {
  type EngineStats,
  type FinishReason,
  type GenerateRequest,
  type TenancyDelta,
  TOP_LOGPROBS_MAX,
  type TokenAlternative,
  type TokenEvent,
  type TokenLogprob,
  type TtftPhases,
} from "./protocol";
import { queueRefusals } from "./queue";
import { chooseSlot, commonPrefix, RESTORE_MIN_GAIN } from "./slot-choice";
import { MAX_MARKS, Tenancy, type TokenMark } from "./tenancy";
import { StopMatcher, Utf8Stream } from "./text";

/** The end-of-generation token a reply stopped on (done events carry it). */
type EogToken = NonNullable<Extract<TokenEvent, { kind: "done" }>["eog"]>;

/** A sequence's state saved by the shim in its own host buffer (freed when the cache drops it). */
interface HostState {
  ptr: Pointer;
  /** What the shim allocated: what the cache counts and what freeing must be told. */
  bytes: number;
  /** What llama.cpp wrote, and a restore reads. */
  written: number;
  /** Tokens of the saved sequence. */
  tokens: number;
}

/** Where a finished generation that carried prefix marks left its sequence, so its reply's marks can follow. */
interface Finished {
  /** The slot, while its history still holds the sequence up to `end` unchanged; null once cut below it. */
  slot: Slot | null;
  end: number;
  /** Host-RAM copies of that slot made since, holding at least `end` tokens. */
  saved: HostState[];
}

/** A request that has been accepted by the scheduler. */
interface Active {
  id: number;
  flag: number;
  req: GenerateRequest;
  prompt: number[];
  /** Prefix marks of the prompt, null without any. */
  marks: TokenMark[] | null;
  cached: number;
  slot: Slot;
  sampler: Pointer;
  /** Alternatives to report with each token's log-probability; -1: no logprobs. */
  logprobs: number;
  /** Prompt tokens already in KV (prefill progress). */
  fed: number;
  /** Last sampled token, not yet in KV; -1 while prefilling. */
  pendingToken: number;
  generated: number;
  utf8: Utf8Stream;
  stops: StopMatcher;
  /** Batch index whose logits this request samples from in the current step, -1 if none. */
  logitIndex: number;
  /** KV cells this request may hold in total (its admission reservation, grown when it outlives it). */
  reserve: number;
  /** Worker clock at admission, for the service-time estimate behind Retry-After. */
  startedAt: number;
  /** Where its time to first token went (decode and sample times accrue until its first token). */
  phases: TtftPhases;
}

interface Slot {
  seq: number;
  /** Tokens in this sequence's KV, in position order. */
  history: number[];
  active: Active | null;
  lastUsed: number;
  /** lastUsed when an idle-time save was last tried, so a save that did not fit is not retried. */
  savedAt: number;
  /** When (deps.now) its last generation ended: the idle-time copy waits on it (idle-save.ts). */
  idleAt: number;
}

interface Waiting {
  id: number;
  flag: number;
  req: GenerateRequest;
  prompt: number[];
  marks: TokenMark[] | null;
  enqueuedAt: number;
  /** Counted as queued once it could not be admitted on arrival. */
  queued: boolean;
}

/** What the worker needs from the outside to run steps. */
export interface SchedulerDeps {
  native: Native;
  model: Pointer;
  ctx: Pointer;
  nCtx: number;
  nCtxSeq: number;
  nBatch: number;
  nParallel: number;
  /** Cancel flags set by the main thread, indexed by each request's flag. */
  flags: Int32Array;
  flagsOffset: number;
  /** Requests that may wait for a slot or KV room; more are refused with queue_full. */
  queueCapacity: number;
  /** How long a request may wait before it is refused with queue_timeout. */
  queueTimeoutMs: number;
  /** Reserve KV at admission (on by default; off only to show what happens without it). */
  kvBudget: boolean;
  /** Host RAM for idle sequences' KV state, in bytes; 0 keeps idle prefixes resident in the pool instead. */
  hostCacheBytes: number;
  /** Milliseconds on a monotonic clock. */
  now: () => number;
  /** Session checkpoints (saved at a reply's end, restored before prefill); absent: none. */
  checkpoints?: CheckpointStore | null;
  /** Copy back, once the engine is idle, the conversation an admission moved to host RAM (idle restore); absent: on. */
  idleRestore?: boolean;
  /** KV state bytes per token (F16 K and V of every layer), to plan the idle-time copy by; absent: copies go at the minimum wait. */
  kvBytesPerToken?: number;
  /** Batch sizes the shim may decode with plain attention (as applied at open); the scheduler arms it per step. Absent: none. */
  plainAttn?: PlainAttn | null;
  /**
   * Decode a prompt chunk in a step of its own, not beside other sequences' next tokens, taking turns with them
   * (mesh's attention kernel takes only a batch of one sequence's queries; a mixed one goes to ggml's, 2x slower
   * for a 256-token turn over 8k cached). Absent: off.
   */
  separatePrefill?: boolean;
}

/** Cumulative counters of the scheduler, reported in stats. */
export interface SchedulerCounters {
  decodeSteps: number;
  /** Decode steps whose batch size fell in the plain-attention window (see attention.ts). */
  plainAttnSteps: number;
  /** Decode steps that failed and failed requests with them. */
  decodeFailures: number;
  /** Decode steps llama.cpp refused for lack of KV room (recovered or not). */
  decodeKvFailures: number;
  prefillTokens: number;
  promptTokens: number;
  cachedTokens: number;
  generatedTokens: number;
  admitted: number;
  /** Requests that had to wait before admission (or before being refused). */
  queued: number;
  rejectedQueueFull: number;
  rejectedQueueTimeout: number;
  /** Idle resident prefixes trimmed or dropped from the pool, and the cells freed, per reason (stats adds the totals). */
  evictionsBudget: number;
  evictionsOffload: number;
  evictionsDivergent: number;
  evictionsReplaced: number;
  evictionsRetry: number;
  evictedCellsBudget: number;
  evictedCellsOffload: number;
  evictedCellsDivergent: number;
  evictedCellsReplaced: number;
  evictedCellsRetry: number;
  /** Requests without an explicit max_tokens stopped (length) when they outgrew their reservation and the pool was full. */
  stoppedAtPoolLimit: number;
  /** Idle sequences saved to host RAM, restored from it (and the prompt tokens that saved), and restores llama.cpp refused. */
  hostSaves: number;
  hostRestores: number;
  hostRestoredTokens: number;
  hostRestoreFailures: number;
  /** Displaced conversations copied back into the pool while the engine was idle, and their tokens. */
  hostIdleRestores: number;
  hostIdleRestoredTokens: number;
  /** Times the pool was emptied and a reused prefix copied back from cell 0, and the cells copied. */
  compactions: number;
  compactedCells: number;
  /** Session checkpoints saved at replies' ends, restored into slots (and the prompt tokens that saved). */
  checkpointSaves: number;
  checkpointRestores: number;
  checkpointRestoredTokens: number;
}

/**
 * Why idle cells left the pool: the admission budget or a decode needed room
 * (budget), an idle conversation moved to host RAM when another request was
 * admitted (offload), the part of a reused slot after the shared prefix
 * (divergent), an idle conversation in the slot an unrelated prompt took
 * (replaced), or the last line of defence after a refused decode (retry).
 */
export type EvictionReason = (typeof EVICTION_REASONS)[number];
/** Every eviction reason, in the order /metrics lists them. */
export const EVICTION_REASONS = ["budget", "offload", "divergent", "replaced", "retry"] as const;

/** The stats fields counting one reason's evictions and evicted cells. */
export function evictionFields(r: EvictionReason): {
  count: `evictions${Capitalize<EvictionReason>}`;
  cells: `evictedCells${Capitalize<EvictionReason>}`;
} {
  const c = `${r[0]?.toUpperCase()}${r.slice(1)}` as Capitalize<EvictionReason>;
  return { count: `evictions${c}`, cells: `evictedCells${c}` };
}

/** Shorter idle sequences are dropped rather than saved: prefilling them again costs about as much as the copy. */
const HOST_MIN_TOKENS = 32;
/** Finished generations remembered for their reply marks; the server sends those right after done, so a few per slot is plenty. */
const MAX_FINISHED = 256;

/** Every counter at zero. */
/**
 * A plain-attention step may attend over at most NUM/DEN times the cells its own sequence holds
 * (the rest are other sequences' cells, or holes, that flash attention would skip).
 */
const PLAIN_SPAN_NUM = 9;
const PLAIN_SPAN_DEN = 8;

export function zeroCounters(): SchedulerCounters {
  return {
    decodeSteps: 0,
    plainAttnSteps: 0,
    decodeFailures: 0,
    decodeKvFailures: 0,
    prefillTokens: 0,
    promptTokens: 0,
    cachedTokens: 0,
    generatedTokens: 0,
    admitted: 0,
    queued: 0,
    rejectedQueueFull: 0,
    rejectedQueueTimeout: 0,
    evictionsBudget: 0,
    evictionsOffload: 0,
    evictionsDivergent: 0,
    evictionsReplaced: 0,
    evictionsRetry: 0,
    evictedCellsBudget: 0,
    evictedCellsOffload: 0,
    evictedCellsDivergent: 0,
    evictedCellsReplaced: 0,
    evictedCellsRetry: 0,
    stoppedAtPoolLimit: 0,
    hostSaves: 0,
    hostRestores: 0,
    hostRestoredTokens: 0,
    hostRestoreFailures: 0,
    hostIdleRestores: 0,
    hostIdleRestoredTokens: 0,
    compactions: 0,
    compactedCells: 0,
    checkpointSaves: 0,
    checkpointRestores: 0,
    checkpointRestoredTokens: 0,
  };
}

/** Owns slots, the waiting queue and one decode per step for all live sequences. */
export class Scheduler {
  private readonly slots: Slot[];
  private waiting: Waiting[] = [];
  private readonly tokens: Int32Array;
  private readonly pos: Int32Array;
  private readonly seq: Int32Array;
  private readonly logits: Int8Array;
  private readonly pieceBuf = new Uint8Array(256);
  private clock = 0;
  /** Smoothed time a request holds a slot, for Retry-After. */
  private serviceMs = 1000;
  private readonly counters: SchedulerCounters = zeroCounters();

  private readonly host: HostCache<HostState>;
  private readonly savedSize = new BigUint64Array(2);
  /** Which prefix marks each slot and host-RAM entry holds. */
  private readonly tenancy = new Tenancy<Slot | HostState>();
  /** Finished generations that carried marks, by id, oldest first. */
  private readonly finished = new Map<number, Finished>();
  /**
   * Upper bound of the highest KV cell in use + 1: cells placed since the pool was last emptied
   * (llama.cpp attends over every cell up to the highest in use, and its API does not tell where
   * that is). Tightened when a lone compact sequence is trimmed.
   */
  private placed = 0;
  /** Whether the shim's plain-attention window is armed (openModel arms it wherever one applies). */
  private plainArmed = true;
  /** With separatePrefill, whether the last step that had both prompt chunks and next tokens to decode took the chunk. */
  private prefillTurn = false;
  // The shim's attention-op counts (mesh kernel, ggml kernel), read at each stats call.
  private readonly attnOps = new BigInt64Array(2);
  /** Milliseconds spent saving to host RAM since the current admission began. */
  private saveMs = 0;
  /**
   * The conversation the latest admission that displaced one moved to host RAM (the most recently
   * used of those it moved), and that conversation's lastUsed: copied back once the engine is idle.
   */
  private displaced: { entry: HostEntry<HostState>; lastUsed: number; admission: number } | null = null;
  /**
   * The slot the last idle restore filled, and the bound of placed cells before and after it: when
   * that slot is emptied before anything else was placed, the bound goes back (its cells were the
   * highest), so the conversation below it is not compacted for cells that are gone.
   */
  private idleRestored: { slot: Slot; placedBefore: number; placedAfter: number } | null = null;
  /** Admissions begun, so displacements of the same one can be told from a later one's. */
  private admissions = 0;

  constructor(private readonly d: SchedulerDeps) {
    this.slots = Array.from({ length: d.nParallel }, (_, seq) => ({ seq, history: [], active: null, lastUsed: 0, savedAt: -1, idleAt: 0 }));
    this.tokens = new Int32Array(d.nBatch);
    this.pos = new Int32Array(d.nBatch);
    this.seq = new Int32Array(d.nBatch);
    this.logits = new Int8Array(d.nBatch);
    // Start in step with plainArmed, whatever an earlier user of the context left armed.
    if (d.plainAttn) d.native.mesh_set_plain_attn(d.ctx, d.plainAttn.min, d.plainAttn.max);
    this.host = new HostCache<HostState>(d.hostCacheBytes, undefined, (st) => {
      this.tenancy.release(st);
      if (this.finished.size > 0) this.forgetSaved(st);
      d.native.mesh_host_free(st.ptr, st.bytes);
    });
    if (d.checkpoints) d.checkpoints.onDrop = (c) => this.dropCheckpoint(c);
  }

  /** True when there is work for another step. */
  hasWork(): boolean {
    return this.waiting.length > 0 || this.slots.some((s) => s.active !== null);
  }

  /** Queue a request (with its prompt's prefix marks, if any); an impossible one is answered at once with an error event. */
  submit(id: number, flag: number, req: GenerateRequest, prompt: number[], out: TokenEvent[], marks: TokenMark[] | null = null): void {
    if (prompt.length === 0) {
      out.push({ id, kind: "error", error: { code: "invalid_request", message: "the prompt is empty" } });
      return;
    }
    if (prompt.length >= this.d.nCtxSeq) {
      out.push({
        id,
        kind: "error",
        error: {
          code: "context_length_exceeded",
          message: `the prompt has ${prompt.length} tokens but the context holds ${this.d.nCtxSeq} (room must be left for at least one generated token)`,
        },
      });
      return;
    }
    this.waiting.push({ id, flag, req, prompt, marks: marks && marks.length > 0 ? marks : null, enqueuedAt: this.d.now(), queued: false });
  }

  /** Mark a request cancelled; it is finished at the start of the next step. */
  cancel(id: number, out: TokenEvent[]): void {
    const w = this.waiting.findIndex((x) => x.id === id);
    if (w >= 0) {
      const [gone] = this.waiting.splice(w, 1);
      if (gone) out.push(doneEvent(gone.id, "cancelled", gone.prompt.length, 0, 0));
      return;
    }
    for (const s of this.slots) if (s.active?.id === id) this.finish(s.active, "cancelled", out);
  }

  /** Run one step: admit, build one batch, decode once, sample every sequence that has logits. */
  step(out: TokenEvent[]): void {
    this.collectCancelled(out);
    // Running requests grow first: a new admission must not take the room a
    // running request without max_tokens is about to need.
    if (this.d.kvBudget) this.growReservations(out);
    this.admit(out);
    this.expireQueue(out);
    this.countQueued();
    let n = this.buildBatch();
    if (n === 0) return;
    this.makeRoom(n);
    let rc = this.decode(n);
    if (rc === 1) {
      // Last line of defence: the budget should make this unreachable, so
      // count it, drop every idle resident prefix and retry the step once;
      // then shed the newest requests of the batch until the rest fits.
      this.counters.decodeKvFailures++;
      this.clearFailedPlacement(n);
      if (this.evictIdle() > 0) rc = this.decode(n);
      while (rc === 1) {
        this.clearFailedPlacement(n);
        if (!this.shedNewest(n, out)) break;
        // The same turn again (chunk or next tokens), less what was shed: the retry must not swap the batch.
        n = this.buildBatch(false);
        if (n === 0) return;
        rc = this.decode(n);
      }
    }
    if (rc !== 0 && rc !== 1 && rc !== 2) {
      this.isolateFailure(n, out);
      return;
    }
    if (rc !== 0) {
      this.failBatch(n, rc, out);
      return;
    }
    this.commitBatch(n);
    this.sample(out);
  }

  /**
   * Idle-time work: copy one finished conversation's KV to host RAM ahead of
   * need, leaving it resident. The next admission then only clears it, so
   * the copy is not on that request's time to first token. True when it did
   * something (call again after letting messages in).
   */
  saveIdle(): boolean {
    if (!this.host.enabled || this.waiting.length > 0) return false;
    const now = this.d.now();
    for (const s of this.slots) {
      if (!this.idleSaveCandidate(s) || now < this.idleSaveDue(s)) continue;
      s.savedAt = s.lastUsed;
      if (this.host.covers(s.history)) continue;
      // Ahead of need, only into free room: never push out a conversation that lives only in host RAM.
      this.offload(s, false, false);
      return true;
    }
    return false;
  }

  /** Idle-time work, one copy per call: a displaced conversation back first (restoreIdle), else a save ahead of need (saveIdle). */
  idleWork(): boolean {
    return this.restoreIdle() || this.saveIdle();
  }

  /** Milliseconds until idleWork has something due (0: now), or null when nothing is waiting. */
  nextIdleWorkInMs(): number | null {
    const back = this.idleRestoreInMs();
    const save = this.nextIdleSaveInMs();
    if (back === null) return save;
    return save === null ? back : Math.min(back, save);
  }

  /** Milliseconds until saveIdle has a conversation due (0: now), or null when none is waiting for its copy. */
  nextIdleSaveInMs(): number | null {
    if (!this.host.enabled || this.waiting.length > 0) return null;
    let due = Number.POSITIVE_INFINITY;
    for (const s of this.slots) if (this.idleSaveCandidate(s)) due = Math.min(due, this.idleSaveDue(s));
    return Number.isFinite(due) ? Math.max(0, due - this.d.now()) : null;
  }

  private idleSaveCandidate(s: Slot): boolean {
    return !s.active && s.savedAt !== s.lastUsed && s.history.length >= HOST_MIN_TOKENS;
  }

  private idleSaveDue(s: Slot): number {
    return s.idleAt + idleSaveDelayMs(s.history.length * (this.d.kvBytesPerToken ?? 0));
  }

  /** Load figures for /metrics and routing. */
  stats(): EngineStats {
    const kv = this.usage();
    const host = this.host.stats();
    this.d.native.mesh_fa_counts(this.attnOps);
    return {
      slotsTotal: this.slots.length,
      slotsBusy: this.slots.filter((s) => s.active !== null).length,
      waiting: this.waiting.length,
      queueCapacity: this.d.queueCapacity,
      kvCellsUsed: kv.running + kv.resident,
      kvCellsRunning: kv.running,
      kvCellsResident: kv.resident,
      kvCellsReserved: kv.reserved,
      kvCellsFree: kv.free,
      kvCellsTotal: kv.total,
      hostCacheEntries: host.entries,
      hostCacheBytes: host.bytes,
      hostCacheCapacityBytes: host.capacityBytes,
      hostCacheEvictions: host.evictions,
      ...(this.d.checkpoints?.stats() ?? {
        checkpoints: 0,
        checkpointRamBytes: 0,
        checkpointDiskBytes: 0,
        checkpointSpills: 0,
        checkpointDrops: 0,
      }),
      ...this.counters,
      evictions: EVICTION_REASONS.reduce((sum, r) => sum + this.counters[evictionFields(r).count], 0),
      evictedCells: EVICTION_REASONS.reduce((sum, r) => sum + this.counters[evictionFields(r).cells], 0),
      attnOpsMesh: Number(this.attnOps[0]),
      attnOpsGgml: Number(this.attnOps[1]),
    };
  }

  /** Seconds a refused client should wait: about one slot's turnover per queued request ahead of it. */
  retryAfterSeconds(): number {
    const s = (this.serviceMs / 1000) * ((1 + this.waiting.length) / this.slots.length);
    return Math.min(60, Math.max(1, Math.ceil(s)));
  }

  private slotUsage(): SlotUsage[] {
    return this.slots.map((s) => ({
      seq: s.seq,
      cells: s.history.length,
      running: s.active !== null,
      reserved: s.active && this.d.kvBudget ? Math.max(0, s.active.reserve - s.history.length) : 0,
      lastUsed: s.lastUsed,
    }));
  }

  private usage(): KvUsage {
    return kvUsage(this.d.nCtx, this.slotUsage());
  }

  /** Apply a plan's trims; returns the cells freed. */
  private evict(evictions: readonly { seq: number; keep: number }[], reason: EvictionReason = "budget"): number {
    let freed = 0;
    for (const e of evictions) {
      const s = this.slots[e.seq] as Slot;
      const before = s.history.length;
      // A just-finished conversation keeps its whole history in host RAM before its tail goes.
      if (this.host.enabled && !s.active && before - e.keep > 0) this.offload(s, false);
      this.truncate(s, e.keep);
      const cells = before - s.history.length;
      freed += cells;
      this.countEviction(reason, cells);
    }
    return freed;
  }

  private countEviction(reason: EvictionReason, cells: number): void {
    if (cells <= 0) return;
    const f = evictionFields(reason);
    this.counters[f.count]++;
    this.counters[f.cells] += cells;
  }

  /** Free every state saved in host RAM (shutdown); nothing holds a mark after it. */
  dispose(): void {
    this.host.clear();
    this.d.checkpoints?.clearRam();
    for (const s of this.slots) this.tenancy.release(s);
    this.finished.clear();
  }

  /**
   * Attach the marks of the reply generation `id` produced at the end of the
   * sequence it left, where that is still held intact (its slot, or host-RAM
   * copies of it); otherwise, or when `id` carried no marks, drop them.
   */
  addMarks(id: number, pairs: ReadonlyArray<readonly [string, string | null]>): void {
    const f = this.finished.get(id);
    if (!f) return;
    this.finished.delete(id);
    const marks: TokenMark[] = [];
    for (const p of pairs) {
      if (marks.length >= MAX_MARKS) break;
      if (Array.isArray(p) && typeof p[0] === "string" && (p[1] === null || typeof p[1] === "string")) {
        marks.push({ hash: p[0], parent: p[1], tokenEnd: f.end });
      }
    }
    if (marks.length === 0) return;
    // The reply's hashes stand for the prefix its first parent stands for plus the reply: a holder
    // that does not hold that parent within the sequence does not hold the chain they extend.
    const parent = (marks[0] as TokenMark).parent;
    const extendsHeld = (holder: Slot | HostState) => parent === null || this.tenancy.heldBy(holder, parent, f.end);
    if (f.slot && f.slot.history.length >= f.end && extendsHeld(f.slot)) this.tenancy.hold(f.slot, f.slot.history.length, marks);
    for (const st of f.saved) if (extendsHeld(st)) this.tenancy.hold(st, st.tokens, marks);
  }

  /**
   * Forget every mark, keeping the KV: those slots and host-RAM copies hold
   * (each reported evicted at the next drain), those of running and queued
   * prompts not yet held, and finished generations still waiting for their
   * reply's marks. The server calls it when prompts it already marked would
   * now render differently, so none of them may be claimed any more.
   */
  clearMarks(): void {
    this.tenancy.clear();
    this.finished.clear();
    // Given before the clear: they may describe the old rendering too.
    for (const s of this.slots) if (s.active) s.active.marks = null;
    for (const w of this.waiting) w.marks = null;
  }

  /** What the KV started or stopped holding since the last call; null when nothing changed. */
  drainTenancy(): TenancyDelta | null {
    return this.tenancy.drain();
  }

  /** Cancel everything (shutdown). */
  cancelAll(out: TokenEvent[]): void {
    for (const w of this.waiting.splice(0)) out.push(doneEvent(w.id, "cancelled", w.prompt.length, 0, 0));
    for (const s of this.slots) if (s.active) this.finish(s.active, "cancelled", out);
  }

  private collectCancelled(out: TokenEvent[]): void {
    const { flags, flagsOffset } = this.d;
    for (const s of this.slots) {
      const a = s.active;
      if (a && Atomics.load(flags, flagsOffset + a.flag) !== 0) this.finish(a, "cancelled", out);
    }
    for (let i = this.waiting.length - 1; i >= 0; i--) {
      const w = this.waiting[i] as Waiting;
      if (Atomics.load(flags, flagsOffset + w.flag) !== 0) {
        this.waiting.splice(i, 1);
        out.push(doneEvent(w.id, "cancelled", w.prompt.length, 0, 0));
      }
    }
  }

  // FIFO admission into idle slots; each request takes the idle slot whose
  // history shares the longest prefix with its prompt (then the coldest), or
  // a saved sequence from host RAM when that shares clearly more, and only
  // when its KV reservation fits, after trimming cold resident prefixes.
  // With the host cache on, every other idle slot is saved and cleared, so
  // the pool holds only what runs (idle cells would tax every ubatch).
  // The head of the queue blocks the rest, so a large request cannot starve.
  private admit(out: TokenEvent[]): void {
    try {
      this.admitEach(out);
    } finally {
      this.host.pin(null);
    }
  }

  private admitEach(out: TokenEvent[]): void {
    while (this.waiting.length > 0) {
      this.host.pin(null);
      const free = this.slots.filter((s) => s.active === null);
      if (free.length === 0) break;
      const w = this.waiting[0] as Waiting;
      const admitStart = this.d.now();
      this.admissions++;
      this.saveMs = 0;
      let restoreMs = 0;
      const hostBest = this.host.enabled ? this.host.best(w.prompt) : null;
      // A session checkpoint competes with the host tier on the same terms: the longer shared prefix wins.
      const ckpt = this.checkpointFor(w, hostBest?.lcp ?? 0);
      const saved = ckpt ?? hostBest;
      const choice = chooseSlot(free, w.prompt, saved?.lcp ?? null);
      const best = choice.reuse;
      let keep = choice.keep;
      let target = best;
      let restore: HostEntry<HostState> | null = null;
      if (saved && choice.restoreInto) {
        restore = saved.entry;
        // The saves below must not drop (and free) the state about to be copied back (a checkpoint is not the cache's).
        if (!ckpt) {
          this.host.touch(restore);
          this.host.pin(restore);
        }
        target = choice.restoreInto;
      }
      if (this.host.enabled) for (const s of free) if (s !== target && s !== best) this.displace(s);
      // At least one prompt token must be decoded to get logits to sample from.
      const reserve = this.d.kvBudget ? reservation(w.prompt.length, w.req.reserveOutput, this.d.nCtxSeq) : this.d.nCtxSeq;
      if (this.d.kvBudget) {
        // The chosen slot counts as already trimmed to its reusable prefix and
        // is protected: evicting the prefix this request reuses frees nothing.
        // A restore first needs room for the whole saved sequence; when there
        // is none, the request takes the resident path as without the cache.
        let plan: ReturnType<typeof planEviction> | null = null;
        if (restore) {
          const slot = target;
          const view = this.slotUsage().map((u) => (u.seq === slot.seq ? { ...u, cells: 0 } : u));
          plan = planEviction(this.d.nCtx, view, Math.max(reserve, restore.tokens.length), new Set([slot.seq]));
          if (!plan.fits) {
            restore = null;
            plan = null;
          }
        }
        if (!restore) {
          target = best;
          const view = this.slotUsage().map((u) => (u.seq === best.seq ? { ...u, cells: keep } : u));
          plan = planEviction(this.d.nCtx, view, reserve - keep, new Set([best.seq]));
        }
        if (!plan?.fits) break;
        this.evict(plan.evictions);
      }
      if (this.host.enabled) for (const s of free) if (s !== target) this.displace(s);
      this.waiting.shift();
      if (restore) {
        const t = this.d.now();
        this.restoreInto(target, restore);
        restoreMs += this.d.now() - t;
        keep = Math.min(commonPrefix(target.history, w.prompt), w.prompt.length - 1);
        const restored = target.history.length;
        this.truncate(target, keep);
        this.countEviction("divergent", restored - target.history.length);
        if (ckpt && restored > 0) {
          this.counters.hostRestores--; // counted by restoreInto; it was a checkpoint
          this.counters.checkpointRestores++;
          this.counters.checkpointRestoredTokens += target.history.length;
        } else this.counters.hostRestoredTokens += target.history.length;
      } else {
        // The divergent tail about to be dropped may be another conversation's next turn.
        if (this.host.enabled && target.history.length - keep >= HOST_MIN_TOKENS) this.displace(target, false);
        const before = target.history.length;
        this.truncate(target, keep);
        this.countEviction(keep > 0 ? "divergent" : "replaced", before - target.history.length);
      }
      // The reused prefix alone in a pool whose cells were placed high: move it to the start.
      if (!restore && this.compactionPays(target, w)) {
        const t = this.d.now();
        this.compact(target);
        restoreMs += this.d.now() - t;
      }
      // An empty pool: start placing cells from the first one again, so the
      // attention window (up to the highest cell in use) is as short as it can be.
      if (this.slots.every((x) => x.history.length === 0)) this.clearPool();
      const cached = target.history.length;
      const { sampling } = w.req;
      const grammar = w.req.grammar ? Buffer.from(`${w.req.grammar}\0`) : null;
      const sampler = this.d.native.mesh_sampler_new(
        this.d.model,
        new Float32Array([
          sampling.temperature,
          sampling.topP,
          sampling.minP,
          sampling.repeatPenalty,
          sampling.frequencyPenalty,
          sampling.presencePenalty,
        ]),
        new Int32Array([sampling.topK, sampling.penaltyLastN, sampling.seed | 0]),
        grammar,
      ) as Pointer | null;
      if (!sampler) {
        const why = grammar ? `the grammar could not be used: ${this.lastError() || "it does not parse"}` : "could not build the sampler";
        out.push({ id: w.id, kind: "error", error: { code: "invalid_request", message: why } });
        continue;
      }
      if (sampling.penaltyLastN !== 0) {
        const tail = w.prompt.slice(-Math.max(1, sampling.penaltyLastN < 0 ? w.prompt.length : sampling.penaltyLastN));
        this.d.native.mesh_sampler_accept(sampler, new Int32Array(tail), tail.length);
      }
      const a: Active = {
        id: w.id,
        flag: w.flag,
        req: w.req,
        prompt: w.prompt,
        marks: w.marks,
        cached,
        slot: target,
        sampler,
        logprobs: w.req.logprobs === undefined ? -1 : Math.max(0, Math.min(TOP_LOGPROBS_MAX, Math.floor(w.req.logprobs))),
        fed: cached,
        pendingToken: -1,
        generated: 0,
        utf8: new Utf8Stream(),
        stops: new StopMatcher(w.req.stop),
        logitIndex: -1,
        reserve,
        startedAt: this.d.now(),
        phases: { queuedMs: 0, admitMs: 0, restoreMs, saveMs: this.saveMs, decodeMs: 0, sampleMs: 0 },
      };
      a.phases.queuedMs = Math.max(0, admitStart - w.enqueuedAt);
      a.phases.admitMs = a.startedAt - admitStart;
      target.active = a;
      target.lastUsed = ++this.clock;
      // Its turn came: it is used now, and its cells grow.
      if (this.idleRestored?.slot === target) this.idleRestored = null;
      // Held as prefill puts their tokens in the KV; the reused prefix already has.
      if (w.marks) this.tenancy.hold(target, cached, w.marks);
      this.counters.admitted++;
      this.counters.promptTokens += w.prompt.length;
      this.counters.cachedTokens += cached;
      const waitedMs = Math.max(0, a.startedAt - w.enqueuedAt);
      out.push({ id: w.id, kind: "start", promptTokens: w.prompt.length, cachedTokens: cached, slot: target.seq, waitedMs });
    }
  }

  // After expireQueue, so a request refused on arrival counts as rejected only.
  private countQueued(): void {
    for (const w of this.waiting) {
      if (!w.queued) {
        w.queued = true;
        this.counters.queued++;
      }
    }
  }

  // Refuse what waited too long, then what overflows the queue (newest first,
  // so the oldest keep their place).
  private expireQueue(out: TokenEvent[]): void {
    const now = this.d.now();
    const { timedOut, overflow } = queueRefusals(
      this.waiting.map((w) => w.enqueuedAt),
      now,
      this.d.queueCapacity,
      this.d.queueTimeoutMs,
    );
    if (timedOut.length + overflow.length === 0) return;
    const refused = new Set([...timedOut, ...overflow]);
    const waiting = this.waiting;
    this.waiting = waiting.filter((_, i) => !refused.has(i));
    for (const i of timedOut) {
      const w = waiting[i] as Waiting;
      this.counters.rejectedQueueTimeout++;
      out.push({
        id: w.id,
        kind: "error",
        error: {
          code: "queue_timeout",
          message: `waited ${Math.round((now - w.enqueuedAt) / 1000)} s for a slot and KV room (queue timeout ${Math.round(this.d.queueTimeoutMs / 1000)} s)`,
          retryAfter: this.retryAfterSeconds(),
        },
      });
    }
    for (const i of overflow) {
      const w = waiting[i] as Waiting;
      this.counters.rejectedQueueFull++;
      out.push({
        id: w.id,
        kind: "error",
        error: {
          code: "queue_full",
          message: `all ${this.slots.length} slots are busy and the queue is full (${this.d.queueCapacity} waiting)`,
          retryAfter: this.retryAfterSeconds(),
        },
      });
    }
  }

  // A request that reaches the end of its reservation (only possible without
  // an explicit max_tokens) grows by another output allowance, or by what is
  // left, into free room, trimming cold resident prefixes if needed; when not
  // even one cell is left it ends with "length", as at the end of a context,
  // instead of failing a decode.
  private growReservations(out: TokenEvent[]): void {
    for (const s of this.slots) {
      const a = s.active;
      if (!a || a.pendingToken < 0 || s.history.length < a.reserve) continue;
      const block = Math.max(1, Math.min(a.req.reserveOutput, this.d.nCtxSeq - a.reserve));
      let grown = false;
      for (const step of block > 1 ? [block, 1] : [1]) {
        const plan = planEviction(this.d.nCtx, this.slotUsage(), step);
        if (!plan.fits) continue;
        this.evict(plan.evictions);
        a.reserve += step;
        grown = true;
        break;
      }
      if (grown) continue;
      this.counters.stoppedAtPoolLimit++;
      this.finish(a, "length", out);
    }
  }

  // The batch's cells must be free before decode. Within reservations they
  // are; this also covers running without the budget, on every path.
  private makeRoom(n: number): void {
    const used = this.slots.reduce((sum, s) => sum + s.history.length, 0);
    const shortfall = n - (this.d.nCtx - used);
    if (shortfall <= 0) return;
    const view = this.slotUsage().map((u) => ({ ...u, reserved: 0 }));
    const plan = planEviction(this.d.nCtx, view, n);
    if (plan.fits) this.evict(plan.evictions);
  }

  // After a refused decode, cells llama.cpp placed for earlier ubatches of the
  // batch are not in any history: drop them so histories match the KV.
  private clearFailedPlacement(n: number): void {
    const seqs = new Set<number>();
    for (let i = 0; i < n; i++) seqs.add(this.seq[i] as number);
    for (const seq of seqs) {
      const slot = this.slots[seq] as Slot;
      this.truncate(slot, slot.history.length, true);
    }
  }

  // Fail the most recently admitted request of the batch (it has the least
  // invested) and free its cells; false when no request is left to shed.
  private shedNewest(n: number, out: TokenEvent[]): boolean {
    let victim: Active | null = null;
    for (let i = 0; i < n; i++) {
      const a = (this.slots[this.seq[i] as number] as Slot).active;
      if (a && (!victim || a.slot.lastUsed > victim.slot.lastUsed)) victim = a;
    }
    if (!victim) return false;
    this.counters.decodeFailures++;
    this.d.native.mesh_sampler_free(victim.sampler);
    victim.slot.active = null;
    this.truncate(victim.slot, 0);
    out.push({
      id: victim.id,
      kind: "error",
      error: {
        code: "kv_exhausted",
        message: "the KV cache had no room for this request's next step",
        retryAfter: this.retryAfterSeconds(),
      },
    });
    return true;
  }

  /** Copy an idle slot's KV state into a new host-RAM entry (dropping others to make room when `evict`); the entry, or null when it did not fit. */
  private save(s: Slot, evict: boolean): HostEntry<HostState> | null {
    let saved: HostEntry<HostState> | null = null;
    const { native, ctx } = this.d;
    const t = this.d.now();
    const size = Number(native.mesh_state_seq_size(ctx, s.seq));
    // Room is made before the buffer exists, so the bound holds at every moment.
    if (size > 0 && this.host.reserve(s.history, size, evict)) {
      const ptr = native.mesh_state_seq_save(ctx, s.seq, this.savedSize) as Pointer | null;
      const written = Number(this.savedSize[0]);
      const bytes = Number(this.savedSize[1]);
      // reserve() made the room and nothing has touched the cache since: storing cannot fail.
      if (ptr && written > 0) {
        const state: HostState = { ptr, bytes, written, tokens: s.history.length };
        saved = this.host.add(s.history, state);
        this.counters.hostSaves++;
        // The copy holds what the slot holds, for as long as the cache keeps it.
        if (this.tenancy.active) this.tenancy.hold(state, state.tokens, this.tenancy.marks(s));
        if (this.finished.size > 0) {
          for (const f of this.finished.values()) if (f.slot === s && f.end <= state.tokens) f.saved.push(state);
        }
      }
    }
    this.saveMs += this.d.now() - t;
    return saved;
  }

  /**
   * Save an idle slot's KV state to host RAM (when long enough and not already there), then clear it
   * unless told to keep it. The entry holding exactly its tokens afterwards (saved now or before), or null.
   */
  private offload(s: Slot, clear = true, evict = true): HostEntry<HostState> | null {
    let held: HostEntry<HostState> | null = null;
    if (s.history.length >= HOST_MIN_TOKENS && this.host.enabled) {
      held = this.host.covering(s.history);
      if (held && held.tokens.length !== s.history.length) held = null;
      else if (!held) held = this.save(s, evict);
    }
    if (clear) this.clearOffloaded(s);
    return held;
  }

  /** Empty an idle slot whose conversation went to host RAM (or was too short to keep). */
  private clearOffloaded(s: Slot): void {
    const before = s.history.length;
    this.truncate(s, 0);
    this.countEviction("offload", before);
  }

  /**
   * Offload an idle slot at an admission (see offload), remembering its conversation for the
   * idle-time copy back when it is the most recently used one this admission moved out.
   */
  private displace(s: Slot, clear = true): void {
    const lastUsed = s.lastUsed;
    const held = this.offload(s, false);
    // A conversation copied back in idle time and displaced again unused is not copied back again.
    if (held && this.d.idleRestore !== false && this.idleRestored?.slot !== s) {
      const d = this.displaced;
      // A new admission's displacement replaces the last one's; within one, the most recent use wins.
      if (!d || d.admission !== this.admissions || lastUsed > d.lastUsed)
        this.displaced = { entry: held, lastUsed, admission: this.admissions };
    }
    if (clear) this.clearOffloaded(s);
  }

  /**
   * Idle-time work: copy back into an empty slot the conversation the latest displacing admission
   * moved to host RAM, once what displaced it has finished and the engine has been idle for
   * idleRestoreDelayMs, so its next turn finds it resident. Only into free room (nothing is evicted
   * for it) and only once per displacement; its host copy stays, so the next admission that does
   * not continue it only clears it again. True when it copied (or tried).
   */
  restoreIdle(): boolean {
    const d = this.displaced;
    if (!d || this.idleRestoreInMs() !== 0) return false;
    this.displaced = null;
    const e = d.entry;
    if (!this.host.has(e)) return false;
    const n = e.tokens.length;
    // Already back (its turn came), or a slot holds nearly all of it: the copy would gain nothing.
    if (this.slots.some((s) => commonPrefix(s.history, e.tokens) + RESTORE_MIN_GAIN > n)) return false;
    const slot = this.slots.find((s) => s.history.length === 0 && s.active === null);
    // Without the admission budget there is no free room to check against: nothing is guessed.
    if (!slot || !this.d.kvBudget) return false;
    const plan = planEviction(this.d.nCtx, this.slotUsage(), n);
    if (!plan.fits || plan.evictions.length > 0) return false;
    const placedBefore = this.slots.every((x) => x.history.length === 0) ? 0 : this.placed;
    if (!this.restoreInto(slot, e, false)) return true;
    // A bound clamped at the context's end no longer says where the copy's cells went.
    this.idleRestored = placedBefore + n <= this.d.nCtx ? { slot, placedBefore, placedAfter: this.placed } : null;
    this.counters.hostIdleRestores++;
    this.counters.hostIdleRestoredTokens += n;
    // It keeps its place in the LRU order, and its host copy covers it: no idle-time save is due.
    slot.lastUsed = d.lastUsed;
    slot.savedAt = slot.lastUsed;
    slot.idleAt = this.d.now();
    return true;
  }

  /** Milliseconds until restoreIdle has a conversation due (0: now), or null when none is waiting to come back. */
  private idleRestoreInMs(): number | null {
    const d = this.displaced;
    if (!d || !this.host.enabled || this.waiting.length > 0 || this.slots.some((s) => s.active !== null)) return null;
    const idleSince = this.slots.reduce((t, s) => Math.max(t, s.idleAt), 0);
    return Math.max(0, idleSince + idleRestoreDelayMs(d.entry.state.bytes) - this.d.now());
  }

  /** Copy a saved sequence back into an idle slot; on failure the slot is left empty (the prompt is prefilled) and false returned. */
  private restoreInto(s: Slot, entry: HostEntry<HostState>, forRequest = true): boolean {
    const { native, ctx } = this.d;
    if (s.history.length > 0) this.displace(s);
    // Into an empty pool: from cell 0, so the attention window is the sequence itself.
    if (this.slots.every((x) => x.history.length === 0)) this.clearPool();
    // Used now: more recent than the slot's own old conversation just saved (an idle-time copy back is a guess, not a use).
    if (forRequest) this.host.touch(entry);
    const got = Number(native.mesh_state_seq_set(ctx, entry.state.ptr, entry.state.written, s.seq));
    this.place(entry.tokens.length);
    this.cut(s, 0);
    if (got > 0 && native.mesh_seq_pos_max(ctx, s.seq) === entry.tokens.length - 1) {
      s.history = Array.from(entry.tokens);
      if (forRequest) this.counters.hostRestores++;
      // The slot now holds what the entry holds (the caller trims it to what the prompt keeps).
      if (this.tenancy.active) this.tenancy.hold(s, s.history.length, this.tenancy.marks(entry.state));
      return true;
    }
    // llama.cpp found no contiguous room (or the blob did not fit this context).
    this.counters.hostRestoreFailures++;
    native.mesh_seq_rm(ctx, s.seq, -1, -1);
    s.history = [];
    return false;
  }

  /** Empty the pool's bookkeeping (every slot must already be empty): placement starts from cell 0 again. */
  private clearPool(): void {
    this.d.native.mesh_memory_clear(this.d.ctx, 0);
    this.placed = 0;
    this.idleRestored = null;
  }

  /** Cells were placed somewhere in the pool: the bound of the highest one grows. */
  private place(cells: number): void {
    this.placed = Math.min(this.d.nCtx, this.placed + cells);
  }

  // The target, trimmed to the prefix it reuses, is the only sequence left in the pool (others
  // were saved and cleared at admission, none runs), and moving it to cell 0 pays for its copy.
  private compactionPays(target: Slot, w: Waiting): boolean {
    if (!this.host.enabled || target.history.length < HOST_MIN_TOKENS) return false;
    if (this.slots.some((x) => x !== target && (x.active !== null || x.history.length > 0))) return false;
    const keep = target.history.length;
    return shouldCompact({ placed: this.placed, keep, newTokens: w.prompt.length - keep + Math.max(1, w.req.reserveOutput) });
  }

  /**
   * Move an idle slot's sequence to the start of an empty pool: from its host-RAM copy (saved now
   * if there is none), after emptying the pool. Its tokens and marks stay what they were; when the
   * copy cannot be made or put back, it is left as it was or, failing the restore, empty.
   */
  private compact(s: Slot): void {
    const { native, ctx } = this.d;
    const keep = s.history.length;
    if (!this.host.covers(s.history)) this.offload(s, false);
    const found = this.host.best(s.history);
    if (!found || found.lcp < keep) return;
    const entry = found.entry;
    this.host.touch(entry);
    // Bookkeeping only: the slot's cells are the only ones, and the copy brings them back.
    native.mesh_memory_clear(ctx, 0);
    this.placed = 0;
    const got = Number(native.mesh_state_seq_set(ctx, entry.state.ptr, entry.state.written, s.seq));
    this.place(entry.tokens.length);
    if (got > 0 && native.mesh_seq_pos_max(ctx, s.seq) === entry.tokens.length - 1) {
      if (entry.tokens.length > keep) native.mesh_seq_rm(ctx, s.seq, keep, -1);
      this.placed = keep;
      this.counters.compactions++;
      this.counters.compactedCells += keep;
      return;
    }
    this.counters.hostRestoreFailures++;
    native.mesh_seq_rm(ctx, s.seq, -1, -1);
    s.history = [];
    this.cut(s, 0);
  }

  /**
   * A checkpoint holds the prefix marks of the sequence it saved (and, through `finished`, its reply's), so the
   * routing index keeps sending the session here while it lives, wherever the slot's KV went; dropped with it.
   */
  private holdCheckpoint(a: Active, ckpt: Checkpoint): void {
    if (!this.tenancy.active) return;
    const holder: HostState = { ptr: 0 as unknown as Pointer, bytes: 0, written: 0, tokens: ckpt.tokens.length };
    ckpt.tag = holder;
    this.tenancy.hold(holder, holder.tokens, this.tenancy.marks(a.slot, holder.tokens));
    this.finished.get(a.id)?.saved.push(holder);
  }

  /** A checkpoint was dropped: the marks it held go with it. */
  private dropCheckpoint(ckpt: Checkpoint): void {
    const holder = ckpt.tag as HostState | null;
    if (!holder) return;
    this.tenancy.release(holder);
    if (this.finished.size > 0) this.forgetSaved(holder);
  }

  /** The request's session checkpoint (or the best stored one) as a restorable entry, when it beats `than` prompt tokens; else null. */
  private checkpointFor(w: Waiting, than: number): { entry: HostEntry<HostState>; lcp: number } | null {
    const store = this.d.checkpoints;
    if (!store?.enabled) return null;
    const found = store.find(w.req.checkpoint?.restore, w.prompt);
    // Read (maybe from disk) only what could be restored: chooseSlot restores nothing shorter than RESTORE_MIN_GAIN.
    if (!found || found.lcp <= than || found.lcp < RESTORE_MIN_GAIN) return null;
    const state = store.load(found.entry);
    return state ? { entry: toRestorable(found.entry.tokens, state, this.clock), lcp: found.lcp } : null;
  }

  /** Drop every idle slot's resident KV; returns the cells freed. */
  private evictIdle(): number {
    const all = this.slots.filter((s) => !s.active && s.history.length > 0).map((s) => ({ seq: s.seq, keep: 0 }));
    return this.evict(all, "retry");
  }

  /** Drop a slot's KV from position keep on. */
  private truncate(s: Slot, keep: number, force = false): boolean {
    if (keep >= s.history.length && !force) {
      // An empty history holds nothing, whatever marks were left waiting on it (a request shed or
      // failed before any of its tokens reached the KV): without this, the slot's next prompt would
      // hold them as its own prefill went past their ends.
      if (s.history.length === 0) this.cut(s, 0);
      return true;
    }
    const before = s.history.length;
    // A lone sequence filling the pool from cell 0 without holes frees its top cells.
    const lone = this.placed === before && this.slots.every((x) => x === s || x.history.length === 0);
    if (this.d.native.mesh_seq_rm(this.d.ctx, s.seq, keep, -1) !== 0) {
      s.history.length = keep;
      if (lone) this.placed = keep;
      this.unplaceIdleRestored(s, before, keep);
      // A forced call at the same length only clears stray cells: a running prompt keeps its marks.
      if (keep < before) this.cut(s, keep);
      return true;
    }
    // Some memories cannot drop part of a sequence; dropping all of it never fails.
    this.d.native.mesh_seq_rm(this.d.ctx, s.seq, -1, -1);
    s.history.length = 0;
    this.cut(s, 0);
    return false;
  }

  /**
   * The slot an idle restore filled lost its last `before - keep` positions: with nothing placed
   * since the copy, those sat in the highest cells (llama.cpp places a sequence's cells in position
   * order, into holes and then above the rest), so the bound comes down by as much, never below
   * where it was before the copy. Without this the turn that reuses only the prefix of the copied
   * conversation was compacted for cells that were gone.
   */
  private unplaceIdleRestored(s: Slot, before: number, keep: number): void {
    const r = this.idleRestored;
    if (!r || r.slot !== s) return;
    if (this.placed !== r.placedAfter) {
      this.idleRestored = null;
      return;
    }
    this.placed = Math.max(r.placedBefore, r.placedAfter - Math.max(0, before - keep));
    r.placedAfter = this.placed;
    if (keep === 0) this.idleRestored = null;
  }

  /** A slot's sequence is now at most keep tokens: its marks past keep, and finished sequences longer than that, are gone from it. */
  private cut(s: Slot, keep: number): void {
    if (this.tenancy.active) this.tenancy.trim(s, keep);
    if (this.finished.size === 0) return;
    for (const [id, f] of this.finished) {
      if (f.slot !== s || f.end <= keep) continue;
      f.slot = null;
      if (f.saved.length === 0) this.finished.delete(id);
    }
  }

  /** A host-RAM copy was dropped: finished sequences it held live on only where else they are. */
  private forgetSaved(st: HostState): void {
    for (const [id, f] of this.finished) {
      const i = f.saved.indexOf(st);
      if (i < 0) continue;
      f.saved.splice(i, 1);
      if (!f.slot && f.saved.length === 0) this.finished.delete(id);
    }
  }

  /** A slot's request ended: marks whose tokens never reached its KV (cancelled or failed in prefill) are not its to hold later. */
  private settle(s: Slot): void {
    if (this.tenancy.active) this.tenancy.trim(s, s.history.length);
  }

  /**
   * Remember where a generation that carried marks left its sequence, for its reply's marks; only
   * one whose whole prompt reached the KV and that ended on its own: a cancelled one's sequence ends
   * short of the reply the server marks (or of the prompt that reply extends, when cancelled in prefill).
   */
  private rememberFinished(a: Active, reason: FinishReason): void {
    if (!a.marks || reason === "cancelled" || a.fed < a.prompt.length) return;
    this.finished.set(a.id, { slot: a.slot, end: a.slot.history.length, saved: [] });
    if (this.finished.size > MAX_FINISHED) {
      const oldest = this.finished.keys().next().value as number;
      this.finished.delete(oldest);
    }
  }

  // One token per decoding sequence first (decode latency), then prefill
  // chunks in admission order until the batch is full. With separatePrefill,
  // a step that would have both takes one of them, in turn (`flip`: this is
  // a new step, not a retry of this one): the oldest chunk of 2+ tokens
  // alone, then the next tokens (with any prompt's last single token).
  private buildBatch(flip = true): number {
    let n = 0;
    const cap = this.d.nBatch;
    const actives: Active[] = [];
    for (const s of this.slots) if (s.active) actives.push(s.active);
    const split = this.d.separatePrefill === true && splitStep(actives);
    if (split && flip) this.prefillTurn = !this.prefillTurn;
    const chunkTurn = split && this.prefillTurn;
    for (const a of actives) {
      a.logitIndex = -1;
      if (chunkTurn) continue;
      if (a.pendingToken >= 0 && n < cap) {
        this.put(n, a.pendingToken, a.slot.history.length, a.slot.seq, 1);
        a.logitIndex = n++;
      }
    }
    actives.sort((x, y) => x.slot.lastUsed - y.slot.lastUsed);
    for (const a of actives) {
      if (a.pendingToken >= 0 || n >= cap) continue;
      const left = a.prompt.length - a.fed;
      // The chunk's step holds one sequence's chunk of 2+ tokens only (the kernel's case); the next tokens' step
      // takes prompts' last single tokens, which are next tokens in all but name.
      if (chunkTurn && (n > 0 || left < MESH_FA_MIN_QUERIES)) continue;
      if (split && !chunkTurn && left >= MESH_FA_MIN_QUERIES) continue;
      const take = Math.min(a.prompt.length - a.fed, cap - n);
      const start = a.slot.history.length;
      for (let k = 0; k < take; k++) {
        const last = a.fed + k === a.prompt.length - 1;
        this.put(n, a.prompt[a.fed + k] as number, start + k, a.slot.seq, last ? 1 : 0);
        if (last) a.logitIndex = n;
        n++;
      }
    }
    return n;
  }

  private put(i: number, token: number, pos: number, seq: number, logits: number): void {
    this.tokens[i] = token;
    this.pos[i] = pos;
    this.seq[i] = seq;
    this.logits[i] = logits;
  }

  private decode(n: number): number {
    this.counters.decodeSteps++;
    if (this.plainStep(n)) this.counters.plainAttnSteps++;
    const t = this.d.now();
    const rc = this.d.native.mesh_decode(this.d.ctx, this.tokens, this.pos, this.seq, this.logits, n);
    // A refused or failed decode may still have placed cells for its earlier ubatches.
    this.place(n);
    const ms = this.d.now() - t;
    for (const s of this.slots) if (s.active && s.active.generated === 0) s.active.phases.decodeMs += ms;
    return rc;
  }

  // The plain path multiplies every query with every cell up to the highest in use, other
  // sequences' cells included, where flash attention skips the cells a query may not see: it
  // wins only for one sequence's batch over a pool that holds little else (an idle prefix or
  // a dozen streams each decoding a token made it several times slower). Arms the shim's
  // window for such a step, disarms it for any other; returns whether the step is plain.
  private plainStep(n: number): boolean {
    const w = this.d.plainAttn;
    if (!w) return false;
    let plain = n >= w.min && n <= w.max;
    const seq = this.seq[0] as number;
    for (let i = 1; plain && i < n; i++) plain = this.seq[i] === seq;
    if (plain) {
      const own = (this.slots[seq] as Slot).history.length + n;
      const span = Math.min(this.d.nCtx, this.placed + n);
      plain = span * PLAIN_SPAN_DEN <= own * PLAIN_SPAN_NUM;
    }
    if (plain !== this.plainArmed) {
      this.d.native.mesh_set_plain_attn(this.d.ctx, plain ? w.min : 0, plain ? w.max : 0);
      this.plainArmed = plain;
    }
    return plain;
  }

  // Tokens of the batch are now in KV: extend each slot's history.
  private commitBatch(n: number): void {
    for (let i = 0; i < n; i++) {
      const slot = this.slots[this.seq[i] as number] as Slot;
      slot.history.push(this.tokens[i] as number);
      const a = slot.active;
      if (a && a.pendingToken < 0) {
        a.fed++;
        this.counters.prefillTokens++;
      }
    }
    for (const s of this.slots) if (s.active && s.active.pendingToken >= 0 && s.active.logitIndex >= 0) s.active.pendingToken = -1;
    if (this.tenancy.active) {
      for (const s of this.slots) if (s.active && this.tenancy.waiting(s)) this.tenancy.hold(s, s.history.length);
    }
  }

  private sample(out: TokenEvent[]): void {
    const ready: Active[] = [];
    for (const s of this.slots) if (s.active && s.active.logitIndex >= 0) ready.push(s.active);
    if (ready.length === 0) return;
    const samplers = new BigUint64Array(ready.length);
    const idx = new Int32Array(ready.length);
    const nTop = new Int32Array(ready.length);
    const picked = new Int32Array(ready.length);
    const stride = 1 + TOP_LOGPROBS_MAX;
    const wantLogprobs = ready.some((a) => a.logprobs >= 0);
    // Only requests that asked get entries; the others' rows stay unread.
    const lpIds = new Int32Array(wantLogprobs ? ready.length * stride : 1);
    const lpVals = new Float32Array(wantLogprobs ? ready.length * stride : 1);
    ready.forEach((a, k) => {
      samplers[k] = BigInt(a.sampler as unknown as number);
      idx[k] = a.logitIndex;
      nTop[k] = wantLogprobs ? a.logprobs : -1;
    });
    const t = this.d.now();
    this.d.native.mesh_sample_many(this.d.ctx, samplers, idx, nTop, picked, lpIds, lpVals, ready.length);
    const ms = this.d.now() - t;
    for (const a of ready) if (a.generated === 0) a.phases.sampleMs += ms;
    ready.forEach((a, k) => {
      const token = picked[k] as number;
      if (token < 0) {
        // The grammar leaves no token the vocabulary can write here (or sampling failed): end it rather than write past the grammar.
        this.counters.decodeFailures++;
        a.logitIndex = -1;
        this.failSlot(
          a.slot,
          {
            code: "decode_failed",
            message: "no token the model can generate continues the constrained output (grammar dead end)",
          },
          out,
        );
        return;
      }
      this.accept(a, token, out, a.logprobs >= 0 ? this.logprobEntry(lpIds, lpVals, k * stride, a.logprobs) : undefined);
    });
  }

  /** The logprobs row at `at`: the picked token, then up to `n` alternatives (the shim ends a short list with id -1). */
  private logprobEntry(ids: Int32Array, vals: Float32Array, at: number, n: number): TokenLogprob {
    const alt = (i: number): TokenAlternative => {
      const token = ids[i] as number;
      return { token, bytes: Array.from(this.piece(token)), logprob: vals[i] as number };
    };
    const top: TokenAlternative[] = [];
    for (let j = 1; j <= n && (ids[at + j] as number) >= 0; j++) top.push(alt(at + j));
    return { ...alt(at), top };
  }

  private lastError(): string {
    const buf = new Uint8Array(512);
    const n = this.d.native.mesh_last_error(buf, buf.length);
    return Buffer.from(buf.subarray(0, Math.max(0, Math.min(n, buf.length)))).toString("utf8");
  }

  private accept(a: Active, token: number, out: TokenEvent[], logprob?: TokenLogprob): void {
    a.logitIndex = -1;
    a.generated++;
    this.counters.generatedTokens++;
    if (!a.req.ignoreEos && this.d.native.mesh_token_is_eog(this.d.model, token) !== 0) {
      // A session's trajectory counts it as sampled (the model's choice to stop), so it is reported.
      this.finish(a, "stop", out, true, logprob ? { token, logprob: logprob.logprob } : { token });
      return;
    }
    const r = a.stops.push(a.utf8.push(this.piece(token)));
    const event: TokenEvent = { id: a.id, kind: "text", text: r.text, tokens: [token] };
    if (logprob) event.logprobs = [logprob];
    out.push(event);
    if (r.stopped) {
      // Text after a stop string is never emitted, so nothing is flushed.
      this.finish(a, "stop", out, false);
      return;
    }
    a.pendingToken = token;
    // The context must have room for the pending token to be decoded next step.
    if (a.generated >= a.req.maxTokens || a.slot.history.length + 1 >= this.d.nCtxSeq) {
      this.finish(a, "length", out);
    }
  }

  private piece(token: number): Uint8Array {
    let n = this.d.native.mesh_token_to_piece(this.d.model, token, this.pieceBuf, this.pieceBuf.length, 0);
    if (n < 0) {
      const big = new Uint8Array(-n);
      n = this.d.native.mesh_token_to_piece(this.d.model, token, big, big.length, 0);
      return big.subarray(0, Math.max(0, n));
    }
    return this.pieceBuf.slice(0, n);
  }

  private finish(a: Active, reason: FinishReason, out: TokenEvent[], flush = reason !== "cancelled", eog: EogToken | null = null): void {
    if (flush) {
      const r = a.stops.push(a.utf8.flush());
      const tail = r.stopped ? r.text : r.text + a.stops.flush();
      if (tail.length > 0) out.push({ id: a.id, kind: "text", text: tail, tokens: [] });
    }
    // A reply that ended on its own, its whole prompt in the KV: the session's checkpoint of this turn.
    const save = a.req.checkpoint?.save;
    let ckpt: Checkpoint | null = null;
    if (save && reason !== "cancelled" && a.fed >= a.prompt.length && this.d.checkpoints?.enabled) {
      ckpt = saveCheckpoint(this.d.native, this.d.ctx, a.slot.seq, a.slot.history, save, this.d.checkpoints);
      if (ckpt) this.counters.checkpointSaves++;
    }
    this.d.native.mesh_sampler_free(a.sampler);
    a.slot.active = null;
    a.slot.lastUsed = ++this.clock;
    a.slot.idleAt = this.d.now();
    this.settle(a.slot);
    this.rememberFinished(a, reason);
    if (ckpt) this.holdCheckpoint(a, ckpt);
    if (reason !== "cancelled") this.serviceMs = 0.8 * this.serviceMs + 0.2 * (this.d.now() - a.startedAt);
    const done = doneEvent(a.id, reason, a.prompt.length, a.cached, a.generated, reason === "stop" ? a.stops.matched : null, a.phases);
    if (eog && done.kind === "done") done.eog = eog;
    out.push(done);
  }

  // The decode failed: nothing of this batch is in KV. Drop what llama.cpp may
  // have placed, then fail only the requests that were in the batch.
  private failBatch(n: number, rc: number, out: TokenEvent[]): void {
    this.counters.decodeFailures++;
    const seqs = new Set<number>();
    for (let i = 0; i < n; i++) seqs.add(this.seq[i] as number);
    for (const seq of seqs) this.failSlot(this.slots[seq] as Slot, decodeError(rc), out);
  }

  // llama_decode failed for a reason other than KV room or abort, and its
  // code cannot say which sequence caused it. Decode each sequence's part of
  // the step alone, so a failure fails only the request whose own part fails
  // and the others go on as if nothing happened.
  private isolateFailure(n: number, out: TokenEvent[]): void {
    this.clearFailedPlacement(n);
    let failed = false;
    const tokens = this.tokens.slice(0, n);
    const pos = this.pos.slice(0, n);
    const seq = this.seq.slice(0, n);
    const logits = this.logits.slice(0, n);
    const parts = new Map<number, number[]>();
    for (let i = 0; i < n; i++) {
      const s = seq[i] as number;
      const part = parts.get(s);
      if (part) part.push(i);
      else parts.set(s, [i]);
    }
    // Only the part being decoded may be sampled.
    for (const s of parts.keys()) {
      const a = (this.slots[s] as Slot).active;
      if (a) a.logitIndex = -1;
    }
    for (const [s, part] of parts) {
      const slot = this.slots[s] as Slot;
      let logitIndex = -1;
      part.forEach((i, k) => {
        this.put(k, tokens[i] as number, pos[i] as number, s, logits[i] as number);
        if (logits[i]) logitIndex = k;
      });
      if (slot.active) slot.active.logitIndex = logitIndex;
      const r = this.decode(part.length);
      if (r === 0) {
        this.commitBatch(part.length);
        this.sample(out);
        continue;
      }
      this.clearFailedPlacement(part.length);
      this.failSlot(slot, decodeError(r), out);
      // Counted once per step, and only when a request failed: a step that every part survives alone is not a failure.
      if (!failed) this.counters.decodeFailures++;
      failed = true;
    }
  }

  private failSlot(slot: Slot, error: EngineErrorValue, out: TokenEvent[]): void {
    // Earlier ubatches of the failed batch may have left cells past the history.
    this.truncate(slot, slot.history.length, true);
    const a = slot.active;
    if (!a) return;
    this.d.native.mesh_sampler_free(a.sampler);
    slot.active = null;
    this.settle(slot);
    out.push({ id: a.id, kind: "error", error });
  }
}

function decodeError(rc: number): EngineErrorValue {
  if (rc === 1) return { code: "kv_exhausted", message: "no KV cache space left for this request" };
  if (rc === 2) return { code: "engine_closed", message: "the engine is shutting down" };
  return { code: "decode_failed", message: `llama_decode failed (code ${rc})` };
}

/** Whether a step would put a prompt chunk of 2+ tokens beside other sequences' next tokens. */
export function splitStep(actives: ReadonlyArray<{ pendingToken: number; fed: number; prompt: ArrayLike<number> }>): boolean {
  let decoding = false;
  let chunk = false;
  for (const a of actives) {
    if (a.pendingToken >= 0) decoding = true;
    else if (a.prompt.length - a.fed >= MESH_FA_MIN_QUERIES) chunk = true;
  }
  return decoding && chunk;
}

function doneEvent(
  id: number,
  finishReason: FinishReason,
  promptTokens: number,
  cachedTokens: number,
  completionTokens: number,
  stopSequence: string | null = null,
  phases?: TtftPhases,
): TokenEvent {
  const done: TokenEvent = { id, kind: "done", finishReason, promptTokens, cachedTokens, completionTokens };
  if (phases) done.phases = phases;
  return stopSequence === null ? done : { ...done, stopSequence };
}
