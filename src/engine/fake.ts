// A deterministic stand-in for Engine, with no native code and no Worker, so
// server and routing tests can run requests through app.handle() in
// milliseconds. It keeps the real engine's contract: the same event shapes
// and order (start, text*, done), the same EngineError codes, cachedTokens
// from a prefix cache, and tenancy deltas for prefix marks.
//
// What it models: tokenization as one token per UTF-8 byte (ids 0-255; so a
// mark's tokenEnd is its byteEnd), a reply that is a fixed text or a function
// of the prompt, maxTokens, stop strings, the context limit, cancellation (by
// signal, cancel() or close()), a per-token delay, and a bounded set of
// recent sequences (prompt + reply) for prefix reuse and mark tenancy.
// What it does not: sampling (temperature, seeds, penalties change nothing),
// special tokens (chat markers are plain bytes; there is no BOS or EOS in a
// tokenized text), slots and the admission queue (every request starts at
// once, up to maxInFlight), KV pressure, the host-RAM tier, and timings.
import { EngineError } from "./errors";
import { type EngineLike, type GenerateOptions, Generation, type GenerationEvent } from "./index";
import type { EngineStats, FinishReason, ModelInfo, TenancyDelta } from "./protocol";
import { zeroCounters } from "./scheduler";
import { commonPrefix } from "./slot-choice";
import { MAX_MARKS, Tenancy, TenancyFeed, type TokenMark, tokenMarks } from "./tenancy";
import { StopMatcher, Utf8Stream } from "./text";

/** How a FakeEngine behaves; everything has a default. */
export interface FakeEngineOptions {
  /** Model facts to report over the defaults (4096-token context, 4 slots, no chat template); nCtxSeq follows nCtx. */
  info?: Partial<ModelInfo>;
  /** The reply: a fixed text, or a function of the prompt text; fakeReply by default. */
  reply?: string | ((prompt: string) => string);
  /** Milliseconds between tokens (default 0: one event-loop turn). */
  tokenDelayMs?: number;
  /** Generations in flight before generate() throws engine_busy (default 64). */
  maxInFlight?: number;
  /** Sequences kept for prefix reuse, running ones included (default info.nParallel). */
  cacheSequences?: number;
}

/** Token ids the fake reserves beyond the 256 byte values. */
const BOS = 256;
const EOS = 257;

const WORDS = "the a mesh node routes each prompt to where its prefix lives in cache and streams tokens back quickly".split(" ");

/** The default reply: 24 words picked by a hash of the prompt, so equal prompts get equal replies and different ones usually differ. */
export function fakeReply(prompt: string): string {
  let h = 2166136261;
  for (let i = 0; i < prompt.length; i++) h = Math.imul(h ^ prompt.charCodeAt(i), 16777619) >>> 0;
  const out: string[] = [];
  for (let i = 0; i < 24; i++) {
    h = Math.imul(h ^ (h >>> 15), 2246822507) >>> 0;
    out.push(WORDS[h % WORDS.length] as string);
  }
  return `${out.join(" ")}.`;
}

/** A sequence as the fake's "KV" holds it. */
interface Seq {
  id: number;
  tokens: number[];
  busy: boolean;
  lastUsed: number;
}

interface Running {
  gen: Generation;
  cancelled: boolean;
  unlisten?: () => void;
  ended: Promise<void>;
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Engine without llama.cpp: deterministic text, the real event and error contract. */
export class FakeEngine implements EngineLike {
  readonly info: ModelInfo;
  private readonly reply: (prompt: string) => string;
  private readonly delayMs: number;
  private readonly maxInFlight: number;
  private readonly cacheSize: number;
  private readonly running = new Map<number, Running>();
  private readonly seqs: Seq[] = [];
  private readonly tenancy = new Tenancy<Seq>();
  private readonly feed = new TenancyFeed();
  /** Finished generations that carried marks: where their sequence ended, for reply marks. */
  private readonly finished = new Map<number, { seq: Seq; end: number }>();
  /** Counts clearMarks calls: a generation admitted before one gets no reply marks. */
  private markEpoch = 0;
  private nextId = 1;
  private nextSeq = 0;
  private clock = 0;
  private flushing = false;
  private closed = false;
  private readonly counters = { prompt: 0, cached: 0, generated: 0, admitted: 0 };

  constructor(o: FakeEngineOptions = {}) {
    const nCtx = o.info?.nCtx ?? 4096;
    this.info = {
      path: "fake",
      nVocab: 258,
      bos: BOS,
      eos: EOS,
      addBos: false,
      nCtxTrain: nCtx,
      nEmbd: 0,
      nLayer: 0,
      nHead: 0,
      nHeadKv: 0,
      nParams: 0,
      sizeBytes: 0,
      nCtx,
      nCtxSeq: nCtx,
      nParallel: 4,
      nBatch: 512,
      name: "fake",
      architecture: "fake",
      chatTemplate: null,
      randomWeights: false,
      bosText: "",
      eosText: "",
      systemInfo: "fake engine (no native code)",
      backends: [],
      devices: [],
      offload: { requested: 0, layers: 0, of: 0, note: "fake engine" },
      plainAttn: null,
      attnKernel: "ggml",
      flashAttn: true,
      ...o.info,
    };
    const r = o.reply ?? fakeReply;
    this.reply = typeof r === "string" ? () => r : r;
    this.delayMs = o.tokenDelayMs ?? 0;
    this.maxInFlight = o.maxInFlight ?? 64;
    this.cacheSize = Math.max(1, o.cacheSequences ?? this.info.nParallel);
  }

  /** One token per UTF-8 byte; options are accepted and ignored (there are no special tokens). */
  tokenize(text: string, _opts: { addSpecial?: boolean; parseSpecial?: boolean } = {}): Promise<number[]> {
    if (this.closed) return Promise.reject(new EngineError("engine_closed", "the engine is closed"));
    return Promise.resolve(Array.from(enc.encode(text)));
  }

  /** Byte tokens back to text (BOS and EOS render as nothing, `special` or not: the fake has no special text). */
  detokenize(tokens: number[], _opts: { special?: boolean } = {}): Promise<string> {
    if (this.closed) return Promise.reject(new EngineError("engine_closed", "the engine is closed"));
    const bad = this.invalidTokens(tokens);
    return bad ? Promise.reject(new EngineError("invalid_request", bad)) : Promise.resolve(textOf(tokens));
  }

  /** Each token's byte (BOS and EOS: none). */
  pieces(tokens: number[]): Promise<Uint8Array[]> {
    if (this.closed) return Promise.reject(new EngineError("engine_closed", "the engine is closed"));
    const bad = this.invalidTokens(tokens);
    if (bad) return Promise.reject(new EngineError("invalid_request", bad));
    return Promise.resolve(tokens.map((t) => (t < 256 ? Uint8Array.of(t) : new Uint8Array(0))));
  }

  /** Figures in the real shape: cells are the cached sequences' tokens; no queue, no host tier. */
  stats(): Promise<EngineStats> {
    if (this.closed) return Promise.reject(new EngineError("engine_closed", "the engine is closed"));
    let running = 0;
    let resident = 0;
    for (const s of this.seqs) {
      if (s.busy) running += s.tokens.length;
      else resident += s.tokens.length;
    }
    const c = this.counters;
    return Promise.resolve({
      slotsTotal: this.info.nParallel,
      slotsBusy: Math.min(this.info.nParallel, this.running.size),
      waiting: 0,
      queueCapacity: 0,
      kvCellsUsed: running + resident,
      kvCellsRunning: running,
      kvCellsResident: resident,
      kvCellsReserved: 0,
      kvCellsFree: Math.max(0, this.info.nCtx - running - resident),
      kvCellsTotal: this.info.nCtx,
      hostCacheEntries: 0,
      hostCacheBytes: 0,
      hostCacheCapacityBytes: 0,
      checkpoints: 0,
      checkpointRamBytes: 0,
      checkpointDiskBytes: 0,
      checkpointSpills: 0,
      checkpointDrops: 0,
      hostCacheEvictions: 0,
      evictions: 0,
      evictedCells: 0,
      attnOpsMesh: 0,
      attnOpsGgml: 0,
      ...zeroCounters(),
      decodeSteps: c.generated,
      prefillTokens: c.prompt - c.cached,
      promptTokens: c.prompt,
      cachedTokens: c.cached,
      generatedTokens: c.generated,
      admitted: c.admitted,
    });
  }

  /** Start generating; throws as the real engine does (engine_closed, invalid_request, engine_busy), later errors come from the iterator. */
  generate(opts: GenerateOptions): Generation {
    if (this.closed) throw new EngineError("engine_closed", "the engine is closed");
    if (opts.maxTokens !== undefined && !(Number.isFinite(opts.maxTokens) && opts.maxTokens >= 1)) {
      throw new EngineError("invalid_request", "maxTokens must be a finite number of at least 1");
    }
    if (this.running.size >= this.maxInFlight) throw new EngineError("engine_busy", "too many requests in flight on this engine");
    const id = this.nextId++;
    const gen = new Generation(id, () => this.cancel(id));
    const r: Running = { gen, cancelled: false, ended: Promise.resolve() };
    this.running.set(id, r);
    const signal = opts.signal;
    if (signal) {
      if (signal.aborted) r.cancelled = true;
      else {
        const onAbort = () => this.cancel(id);
        signal.addEventListener("abort", onAbort, { once: true });
        r.unlisten = () => signal.removeEventListener("abort", onAbort);
      }
    }
    r.ended = this.run(id, r, opts).finally(() => {
      r.unlisten?.();
      this.running.delete(id);
    });
    return gen;
  }

  /** Cancel a generation by id; it ends with finishReason "cancelled" at its next token. */
  cancel(id: number): void {
    const r = this.running.get(id);
    if (r) r.cancelled = true;
  }

  /** Number of generations not yet finished. */
  get inFlight(): number {
    return this.running.size;
  }

  /** Cancel everything and report every held mark evicted; later calls fail with engine_closed. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.feed.end();
    const ends = [...this.running.values()].map((r) => {
      r.cancelled = true;
      return r.ended;
    });
    await Promise.all(ends);
  }

  /** Attach a reply's marks at the end of the sequence generation `id` left, if it is still cached unchanged up to there. */
  addMarks(id: number, marks: Array<[string, string | null]>): void {
    const f = this.finished.get(id);
    if (this.closed || !f) return;
    this.finished.delete(id);
    if (!this.seqs.includes(f.seq) || f.seq.tokens.length < f.end) return;
    // As in the real engine: the reply extends a chain this sequence must hold.
    const parent = marks[0]?.[1] ?? null;
    if (parent !== null && !this.tenancy.heldBy(f.seq, parent, f.end)) return;
    const held: TokenMark[] = marks.slice(0, MAX_MARKS).map(([hash, parent]) => ({ hash, parent, tokenEnd: f.end }));
    this.tenancy.hold(f.seq, f.seq.tokens.length, held);
    this.flushSoon();
  }

  /** Forget every mark (held, of running generations, awaiting reply marks) and report the held ones evicted; the cache stays. */
  clearMarks(): void {
    if (this.closed) return;
    this.tenancy.clear();
    this.finished.clear();
    this.markEpoch++;
    this.flushSoon();
  }

  /** Listen for the prefix marks the fake's cached sequences start or stop holding. */
  onTenancy(listener: (delta: TenancyDelta) => void): () => void {
    return this.feed.listen(listener);
  }

  private async run(id: number, r: Running, opts: GenerateOptions): Promise<void> {
    // As with the Worker, nothing arrives before generate() has returned.
    await this.tick();
    const push = (e: GenerationEvent | EngineError) => r.gen.push(e);
    const prompt = typeof opts.prompt === "string" ? Array.from(enc.encode(opts.prompt)) : opts.prompt;
    const bad = typeof opts.prompt === "string" ? null : this.invalidTokens(opts.prompt);
    if (bad) return push(new EngineError("invalid_request", bad));
    if (prompt.length === 0) return push(new EngineError("invalid_request", "the prompt is empty"));
    const nCtxSeq = this.info.nCtxSeq;
    if (prompt.length >= nCtxSeq) {
      return push(
        new EngineError(
          "context_length_exceeded",
          `the prompt has ${prompt.length} tokens but the context holds ${nCtxSeq} (room must be left for at least one generated token)`,
        ),
      );
    }
    if (r.cancelled)
      return push({ kind: "done", finishReason: "cancelled", promptTokens: prompt.length, cachedTokens: 0, completionTokens: 0 });
    const marks =
      typeof opts.prompt === "string" && opts.marks && opts.marks.length > 0
        ? tokenMarks(
            opts.marks,
            prompt.map((_, i) => i + 1),
          )
        : null;
    const { seq, cached } = this.admit(prompt, marks);
    const epoch = this.markEpoch;
    this.counters.admitted++;
    this.counters.prompt += prompt.length;
    this.counters.cached += cached;
    push({ kind: "start", promptTokens: prompt.length, cachedTokens: cached, slot: seq.id % this.info.nParallel, waitedMs: 0 });
    const maxTokens = Math.max(1, Math.floor(opts.maxTokens ?? nCtxSeq));
    const reply = Array.from(enc.encode(this.reply(typeof opts.prompt === "string" ? opts.prompt : textOf(prompt))));
    const utf8 = new Utf8Stream();
    const stops = new StopMatcher((opts.stop ?? []).filter((s) => s.length > 0));
    let generated = 0;
    let pending = -1;
    let reason: FinishReason = "stop";
    let flush = true;
    let eog = false;
    for (;;) {
      if (generated > 0) await this.tick();
      if (r.cancelled) {
        reason = "cancelled";
        flush = false;
        break;
      }
      // As in the real engine, a sampled token enters the KV only when the next one is decoded.
      if (pending >= 0) seq.tokens.push(pending);
      const token = reply[generated];
      if (token === undefined) {
        // The reply is over: the end-of-generation token, reported as the engine does (never under ignoreEos,
        // where the engine would not stop on it; the fake has nothing more to say and ends anyway).
        eog = opts.ignoreEos !== true;
        break;
      }
      generated++;
      this.counters.generated++;
      const out = stops.push(utf8.push(Uint8Array.of(token)));
      push({ kind: "text", text: out.text, tokens: [token] });
      if (out.stopped) {
        flush = false;
        break;
      }
      pending = token;
      if (generated >= maxTokens || seq.tokens.length + 1 >= nCtxSeq) {
        reason = "length";
        break;
      }
    }
    if (flush) {
      const out = stops.push(utf8.flush());
      const tail = out.stopped ? out.text : out.text + stops.flush();
      if (tail.length > 0) push({ kind: "text", text: tail, tokens: [] });
    }
    seq.busy = false;
    seq.lastUsed = ++this.clock;
    // A cancelled generation's sequence ends short of the reply the server marks.
    if (marks && reason !== "cancelled" && epoch === this.markEpoch) this.remember(id, seq);
    this.shrink();
    const done = {
      kind: "done" as const,
      finishReason: reason,
      promptTokens: prompt.length,
      cachedTokens: cached,
      completionTokens: generated,
      ...(eog ? { eog: { token: EOS } } : {}),
    };
    push(reason === "stop" && stops.matched !== null ? { ...done, stopSequence: stops.matched } : done);
  }

  // The idle sequence sharing the longest prefix is continued (cut to what
  // is shared); with none, a new one, dropping the least recently used
  // beyond the bound. At least one prompt token is always "computed".
  private admit(prompt: number[], marks: TokenMark[] | null): { seq: Seq; cached: number } {
    let best: Seq | null = null;
    let bestLcp = 0;
    for (const s of this.seqs) {
      if (s.busy) continue;
      const lcp = commonPrefix(s.tokens, prompt);
      if (lcp > bestLcp) {
        best = s;
        bestLcp = lcp;
      }
    }
    const cached = Math.min(bestLcp, prompt.length - 1);
    let seq = best;
    if (seq) this.cut(seq, cached);
    else {
      seq = { id: this.nextSeq++, tokens: [], busy: false, lastUsed: 0 };
      this.seqs.push(seq);
    }
    seq.busy = true;
    seq.tokens = prompt.slice();
    this.shrink();
    if (marks) this.tenancy.hold(seq, seq.tokens.length, marks);
    this.flushSoon();
    return { seq, cached };
  }

  private cut(seq: Seq, keep: number): void {
    seq.tokens.length = Math.min(seq.tokens.length, keep);
    this.tenancy.trim(seq, keep);
    for (const [id, f] of this.finished) if (f.seq === seq && f.end > keep) this.finished.delete(id);
  }

  /** Drop the least recently used idle sequences beyond the bound. */
  private shrink(): void {
    while (this.seqs.length > this.cacheSize) {
      let coldest = -1;
      for (let i = 0; i < this.seqs.length; i++) {
        const s = this.seqs[i] as Seq;
        if (!s.busy && (coldest < 0 || s.lastUsed < (this.seqs[coldest] as Seq).lastUsed)) coldest = i;
      }
      if (coldest < 0) return;
      const [gone] = this.seqs.splice(coldest, 1);
      if (gone) this.cut(gone, 0);
      this.flushSoon();
    }
  }

  private remember(id: number, seq: Seq): void {
    this.finished.set(id, { seq, end: seq.tokens.length });
    if (this.finished.size > 256) this.finished.delete(this.finished.keys().next().value as number);
  }

  // Coalesce a burst of changes into one delta, as the Worker does per loop iteration.
  private flushSoon(): void {
    if (this.flushing) return;
    this.flushing = true;
    queueMicrotask(() => {
      this.flushing = false;
      const d = this.tenancy.drain();
      if (d) this.feed.emit(d);
    });
  }

  private tick(): Promise<void> {
    return new Promise((resolve) => (this.delayMs > 0 ? setTimeout(resolve, this.delayMs) : setImmediate(resolve)));
  }

  private invalidTokens(tokens: unknown): string | null {
    if (!Array.isArray(tokens)) return "a prompt must be text or an array of token ids";
    const n = this.info.nVocab;
    for (const t of tokens) {
      if (!Number.isInteger(t) || (t as number) < 0 || (t as number) >= n) return `token ids must be integers from 0 to ${n - 1}`;
    }
    return null;
  }
}

function textOf(tokens: readonly number[]): string {
  return dec.decode(Uint8Array.from(tokens.filter((t) => t < 256)));
}
