// Idle sequences' KV state kept in host RAM. In a unified KV pool every
// ubatch attends over all cells up to the highest one in use, so idle
// resident prefixes tax every running prefill; moving them here clears the
// pool while keeping them reusable: a later prompt that shares a long prefix
// with an entry gets the state copied back instead of prefilled again.
// Bookkeeping only: the scheduler does the llama.cpp state copies, and the
// cache calls `release` for every state it drops.

/** A saved state as the cache sees it: its size, and whatever owns the bytes. */
export interface SavedState {
  readonly bytes: number;
}

/** One saved sequence: the token ids in its KV and llama.cpp's state for them. */
export interface HostEntry<S extends SavedState = SavedState> {
  tokens: Int32Array;
  state: S;
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

/** True when `a` is a prefix of `b` (or equal to it). */
function isPrefixOf(a: Int32Array, b: readonly number[]): boolean {
  return a.length <= b.length && sharedPrefix(a, b) === a.length;
}

/** A byte- and count-bounded LRU store of saved sequences, matched by longest shared prefix. */
export class HostCache<S extends SavedState = SavedState> {
  private readonly entries: HostEntry<S>[] = [];
  private bytes = 0;
  private clock = 0;
  private evictions = 0;
  private pinned: HostEntry<S> | null = null;

  constructor(
    readonly capacityBytes: number,
    readonly maxEntries = 256,
    private readonly release: (state: S) => void = () => {},
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
  best(prompt: readonly number[]): { entry: HostEntry<S>; lcp: number } | null {
    let found: HostEntry<S> | null = null;
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
    return this.covering(tokens) !== null;
  }

  /** The shortest entry holding these tokens or more, or null. */
  covering(tokens: readonly number[]): HostEntry<S> | null {
    let found: HostEntry<S> | null = null;
    for (const e of this.entries) {
      if (e.tokens.length < tokens.length || (found && e.tokens.length >= found.tokens.length)) continue;
      if (sharedPrefix(e.tokens, tokens) === tokens.length) found = e;
    }
    return found;
  }

  /**
   * Make room for a sequence of `tokens` tokens and `stateBytes` of state
   * before its buffer is allocated, so the bound holds at every moment:
   * entries it extends go first, then (when `evict`) the least recently used,
   * never the pinned one. False, with nothing dropped, when it is already
   * covered or cannot fit (or, without `evict`, does not fit in free room).
   */
  reserve(tokens: readonly number[], stateBytes: number, evict = true): boolean {
    const cost = entryBytes(tokens.length, stateBytes);
    if (!this.enabled || this.covers(tokens)) return false;
    const pinned = this.pinned ? entryBytes(this.pinned.tokens.length, this.pinned.state.bytes) : 0;
    if (cost + pinned > this.capacityBytes || (this.pinned && this.maxEntries < 2)) return false;
    // The entries this one extends go first, and their room counts as free.
    const extended = this.entries.filter((e) => e !== this.pinned && isPrefixOf(e.tokens, tokens));
    const freed = extended.reduce((n, e) => n + entryBytes(e.tokens.length, e.state.bytes), 0);
    const fitsFree = this.bytes - freed + cost <= this.capacityBytes && this.entries.length - extended.length < this.maxEntries;
    if (!evict && !fitsFree) return false;
    for (const e of extended) this.remove(this.entries.indexOf(e));
    while (this.bytes + cost > this.capacityBytes || this.entries.length >= this.maxEntries) {
      let coldest = -1;
      for (let i = 0; i < this.entries.length; i++) {
        const e = this.entries[i] as HostEntry<S>;
        if (e !== this.pinned && (coldest < 0 || e.lastUsed < (this.entries[coldest] as HostEntry<S>).lastUsed)) coldest = i;
      }
      if (coldest < 0) return false; // unreachable: checked above that it fits beside the pinned entry
      this.remove(coldest);
      this.evictions++;
    }
    return true;
  }

  /** Reserve room and store a saved sequence; false when it does not fit (the caller still owns the state). */
  put(tokens: readonly number[], state: S, evict = true): boolean {
    if (!this.reserve(tokens, state.bytes, evict)) return false;
    this.add(tokens, state);
    return true;
  }

  /** Store a saved sequence in the room a successful reserve() just made for it; the new entry. */
  add(tokens: readonly number[], state: S): HostEntry<S> {
    const e = { tokens: Int32Array.from(tokens), state, lastUsed: ++this.clock };
    this.entries.push(e);
    this.bytes += entryBytes(tokens.length, state.bytes);
    return e;
  }

  /** True while the cache still holds this entry (it was not dropped or replaced by a longer save). */
  has(entry: HostEntry<S>): boolean {
    return this.entries.includes(entry);
  }

  /** Keep one entry from being dropped (it is about to be restored); null unpins. */
  pin(entry: HostEntry<S> | null): void {
    this.pinned = entry;
  }

  /** Drop every entry, releasing its state (shutdown). */
  clear(): void {
    this.pinned = null;
    while (this.entries.length > 0) this.remove(this.entries.length - 1);
  }

  /**
   * Mark an entry used (it was restored). It stays: the request may keep only
   * part of it (a shared system prompt), and the conversation it holds may
   * still come back; a later save that extends it replaces it.
   */
  touch(entry: HostEntry<S>): void {
    entry.lastUsed = ++this.clock;
  }

  /** Current sizes and counts. */
  stats(): HostCacheStats {
    return { entries: this.entries.length, bytes: this.bytes, capacityBytes: this.capacityBytes, evictions: this.evictions };
  }

  private remove(i: number): void {
    const [e] = this.entries.splice(i, 1);
    if (!e) return;
    this.bytes -= entryBytes(e.tokens.length, e.state.bytes);
    if (e === this.pinned) this.pinned = null;
    this.release(e.state);
  }
}
