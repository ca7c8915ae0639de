// A simulated inference engine for the routing simulation and soak: slots, a
// KV capacity in tokens, and sequences (prompt + reply) that stay resident
// after their request until least-recently-used eviction makes room. It keeps
// its prefix marks with the engine's own bookkeeping (engine/tenancy.ts), so
// what it reports to routing is exactly what a real engine would report: a
// hash is inserted when the prefill (or the reply) that covers it finishes,
// and evicted when the last sequence holding it goes.

import type { TenancyDelta } from "../engine/protocol";
import { Tenancy, type TokenMark } from "../engine/tenancy";
import { LruMap } from "../lru";
import type { Clock } from "../mesh/wire";
import type { RouteKey } from "../routing/key";

/** Size and speed of one simulated engine. */
export interface EngineShape {
  slots: number;
  /** KV capacity in tokens: resident sequences beyond it are evicted, least recently used first. */
  kvTokens: number;
  /** Characters per token, to turn a key's characters into tokens. */
  charsPerToken: number;
  prefillMsPerToken: number;
  decodeMsPerToken: number;
}

/** One request as the engine sees it. */
export interface EngineJob {
  key: RouteKey;
  /** The reply's blocks ([hash, parent], from RouteKeyer.extend): held once the reply is generated. */
  reply: ReadonlyArray<readonly [string, string | null]>;
  replyTokens: number;
  /** Called when the last token is out. */
  done(r: JobResult): void;
}

/** What one request cost. */
export interface JobResult {
  promptTokens: number;
  /** Prompt tokens found in KV at admission (not prefilled again). */
  cachedTokens: number;
  /** Virtual ms from submit to admission, and from admission to the first token. */
  queuedMs: number;
  prefillMs: number;
}

/** Counters of one engine. */
export interface EngineCounts {
  admitted: number;
  /** Sequences evicted to make room. */
  evictedSeqs: number;
  /** Admissions that found no idle sequence left to evict (every resident one is running). */
  overcommits: number;
  /** Slot-milliseconds spent running requests. */
  busyMs: number;
}

interface Seq {
  tokens: number;
  /** The last hash it holds: the next turn of its conversation extends it in place. */
  tip: string | null;
  running: boolean;
}

/** One simulated engine on a virtual clock. */
export class SimEngine {
  readonly counts: EngineCounts = { admitted: 0, evictedSeqs: 0, overcommits: 0, busyMs: 0 };
  private readonly tenancy = new Tenancy<Seq>();
  /** Resident sequences not running, least recently used first. */
  private readonly idle = new LruMap<Seq, true>();
  private readonly tips = new Map<string, Seq>();
  private queue: Array<{ job: EngineJob; at: number }> = [];
  private head = 0;
  private running = 0;
  private used = 0;
  /** Tokens of running requests (prompt and reply): what a real node publishes as KV use. */
  private committed = 0;

  constructor(
    readonly shape: EngineShape,
    private readonly clock: Clock,
    /** Where held-mark changes go (Router.onTenancy on the engine's node); null: nowhere. */
    private readonly report: ((delta: TenancyDelta) => void) | null,
  ) {}

  /** Whether some resident sequence holds `hash`. */
  holds(hash: string): boolean {
    return this.tenancy.holds(hash);
  }

  /** Distinct hashes held now. */
  get heldHashes(): number {
    return this.tenancy.heldCount;
  }

  /** The load figures a worker record publishes. */
  load(): { slotsBusy: number; queueDepth: number; kvUsed: number; kvCached: number; kvTotal: number } {
    return {
      slotsBusy: this.running,
      queueDepth: this.queue.length - this.head,
      kvUsed: this.committed,
      kvCached: this.used,
      kvTotal: this.shape.kvTokens,
    };
  }

  /** Queue a request; it runs when a slot and KV room free (as `mesh serve` admits: first in, first out). */
  submit(job: EngineJob): void {
    this.queue.push({ job, at: this.clock.now() });
    this.pump();
  }

  private pump(): void {
    while (this.running < this.shape.slots && this.head < this.queue.length) {
      const q = this.queue[this.head] as { job: EngineJob; at: number };
      // Running requests' cells cannot be evicted: a request that does not fit beside them waits for one to end.
      const need = Math.max(1, Math.ceil(q.job.key.chars / this.shape.charsPerToken)) + q.job.replyTokens;
      if (this.running > 0 && this.committed + need > this.shape.kvTokens) break;
      this.head++;
      this.admit(q.job, q.at);
    }
    // Compact now and then rather than shift() per request (O(n) each).
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }

  private admit(job: EngineJob, submittedAt: number): void {
    const s = this.shape;
    const key = job.key;
    const promptTokens = Math.max(1, Math.ceil(key.chars / s.charsPerToken));
    // The deepest block some resident sequence holds: prefixes are prefix-closed, so walk back from the end.
    let depth = key.length - 1;
    while (depth >= 0 && !this.tenancy.holds(key.hash(depth))) depth--;
    const cachedTokens = depth < 0 ? 0 : Math.min(promptTokens - 1, Math.floor((key.ends[depth] as number) / s.charsPerToken));
    // A conversation's next turn extends its sequence in place; anything else starts a new one (copying the cached prefix).
    const tip = depth < 0 ? undefined : this.tips.get(key.hash(depth));
    let seq: Seq;
    if (tip && !tip.running) {
      seq = tip;
      this.idle.delete(seq);
      if (seq.tip !== null) this.tips.delete(seq.tip);
    } else seq = { tokens: 0, tip: null, running: false };
    seq.running = true;
    const total = promptTokens + job.replyTokens;
    this.used += total - seq.tokens;
    seq.tokens = total;
    while (this.used > s.kvTokens) {
      const victim = this.idle.oldest();
      if (!victim) {
        this.counts.overcommits++;
        break;
      }
      this.evict(victim[0]);
    }
    this.running++;
    this.committed += total;
    this.counts.admitted++;
    this.flush();
    const prefillMs = (promptTokens - cachedTokens) * s.prefillMsPerToken;
    const decodeMs = job.replyTokens * s.decodeMsPerToken;
    const startedAt = this.clock.now();
    this.clock.setTimer(() => {
      this.tenancy.hold(seq, promptTokens, promptMarks(key, s.charsPerToken, promptTokens));
      this.flush();
      this.clock.setTimer(() => {
        const end = promptTokens + job.replyTokens;
        this.tenancy.hold(
          seq,
          end,
          job.reply.map(([hash, parent]) => ({ hash, parent, tokenEnd: end })),
        );
        const last =
          job.reply.length > 0 ? (job.reply[job.reply.length - 1] as readonly [string, string | null])[0] : key.hash(key.length - 1);
        seq.tip = last;
        this.tips.set(last, seq);
        seq.running = false;
        this.idle.set(seq, true);
        this.running--;
        this.committed -= total;
        this.counts.busyMs += this.clock.now() - startedAt;
        this.flush();
        job.done({ promptTokens, cachedTokens, queuedMs: startedAt - submittedAt, prefillMs });
        this.pump();
      }, decodeMs);
    }, prefillMs);
  }

  private evict(seq: Seq): void {
    this.idle.delete(seq);
    if (seq.tip !== null && this.tips.get(seq.tip) === seq) this.tips.delete(seq.tip);
    this.tenancy.release(seq);
    this.used -= seq.tokens;
    this.counts.evictedSeqs++;
  }

  private flush(): void {
    const d = this.tenancy.drain();
    if (d && this.report) this.report(d);
  }
}

/** A key's blocks as marks: block i is held once the tokens covering its characters are in KV. */
function promptMarks(key: RouteKey, charsPerToken: number, promptTokens: number): TokenMark[] {
  const out: TokenMark[] = [];
  for (let i = 0; i < key.length; i++) {
    const tokenEnd = Math.max(1, Math.min(promptTokens, Math.ceil((key.ends[i] as number) / charsPerToken)));
    out.push({ hash: key.hash(i), parent: i > 0 ? key.hash(i - 1) : null, tokenEnd });
  }
  return out;
}
