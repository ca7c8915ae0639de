// Idle sequences' KV state kept in host RAM. In a unified KV pool every
// ubatch attends over all cells up to the highest one in use, so idle
// resident prefixes tax every running prefill; moving them here clears the
// pool while keeping them reusable: a later prompt that shares a long prefix
// with an entry gets the state copied back instead of prefilled again.
// Pure bookkeeping: the scheduler does the llama.cpp state copies.

/** One saved sequence: the token ids in its KV and llama.cpp's state blob for them. */
export interface HostEntry {
  tokens: Int32Array;
  state: Uint8Array;
  lastUsed: number;
}

/** Sizes and cumulative counts, for stats and /metrics. */
export interface HostCacheStats {
  entries: number;
  bytes: number;
  capacityBytes: number;
  /** Entries dropped (least recently used first) to stay within capacity. */
  evictions: number;
}

/** Bytes an entry costs against the capacity: its state plus its token ids. */
export function entryBytes(tokens: number, stateBytes: number): number {
  return stateBytes + tokens * 4;
}

/** Length of the common prefix of a saved token array and a prompt. */
function sharedPrefix(a: Int32Array, b: readonly number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** A byte- and count-bounded LRU store of saved sequences, matched by longest shared prefix. */
export class HostCache {
  private readonly entries: HostEntry[] = [];
  private bytes = 0;
  private clock = 0;
  private evictions = 0;

  constructor(
    readonly capacityBytes: number,
    readonly maxEntries = 256,
  ) {}

  /** False when the cache is off (capacity 0). */
  get enabled(): boolean {
    return this.capacityBytes > 0 && this.maxEntries > 0;
  }

  /**
   * The entry sharing the longest prefix with prompt (the shortest such one:
   * the least to copy back and then trim), and that length; null when none
   * shares a token.
   */
  best(prompt: readonly number[]): { entry: HostEntry; lcp: number } | null {
    let found: HostEntry | null = null;
    let bestLcp = 0;
    for (const e of this.entries) {
      const lcp = sharedPrefix(e.tokens, prompt);
      if (lcp > bestLcp || (lcp === bestLcp && found && e.tokens.length < found.tokens.length)) {
        bestLcp = lcp;
        found = e;
      }
    }
    return found ? { entry: found, lcp: bestLcp } : null;
  }

  /** True when an entry already holds these tokens or more: restoring it serves the same prompts. */
  covers(tokens: readonly number[]): boolean {
    for (const e of this.entries) {
      if (e.tokens.length >= tokens.length && sharedPrefix(e.tokens, tokens) === tokens.length) return true;
    }
    return false;
  }

  /**
   * Make room for a sequence of `tokens` tokens and `stateBytes` of state
   * before its buffer is allocated, so the bound holds at every moment:
   * entries it extends go first, then the least recently used. False (and
   * nothing dropped) when it cannot fit at all or is already covered.
   */
  reserve(tokens: readonly number[], stateBytes: number): boolean {
    const cost = entryBytes(tokens.length, stateBytes);
    if (!this.enabled || cost > this.capacityBytes || this.covers(tokens)) return false;
    for (let i = this.entries.length - 1; i >= 0; i--) {
      const e = this.entries[i] as HostEntry;
      if (e.tokens.length <= tokens.length && sharedPrefix(e.tokens, tokens) === e.tokens.length) this.remove(i);
    }
    while (this.entries.length > 0 && (this.bytes + cost > this.capacityBytes || this.entries.length >= this.maxEntries)) {
      let coldest = 0;
      for (let i = 1; i < this.entries.length; i++) {
        if ((this.entries[i] as HostEntry).lastUsed < (this.entries[coldest] as HostEntry).lastUsed) coldest = i;
      }
      this.remove(coldest);
      this.evictions++;
    }
    return true;
  }

  /** Store a saved sequence (after reserve() made room for it); false when it does not fit. */
  put(tokens: readonly number[], state: Uint8Array): boolean {
    if (!this.reserve(tokens, state.length)) return false;
    this.entries.push({ tokens: Int32Array.from(tokens), state, lastUsed: ++this.clock });
    this.bytes += entryBytes(tokens.length, state.length);
    return true;
  }

  /**
   * Mark an entry used (it was restored). It stays: the request may keep only
   * part of it (a shared system prompt), and the conversation it holds may
   * still come back; a later save that extends it replaces it.
   */
  touch(entry: HostEntry): void {
    entry.lastUsed = ++this.clock;
  }

  /** Current sizes and counts. */
  stats(): HostCacheStats {
    return { entries: this.entries.length, bytes: this.bytes, capacityBytes: this.capacityBytes, evictions: this.evictions };
  }

  private remove(i: number): void {
    const [e] = this.entries.splice(i, 1);
    if (e) this.bytes -= entryBytes(e.tokens.length, e.state.length);
  }
}
