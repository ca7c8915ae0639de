// Every session of a node: created on first use, bounded in count, expired
// after an idle TTL. The clock is passed in, so expiry is tested without
// timers; the server calls sweep() periodically and releases the checkpoints
// of what expired.
import { DEFAULT_TRIE_LIMITS, SessionError, SessionTrie, type TrieLimits } from "./trie";

/** Bounds and expiry of a node's sessions. */
export interface SessionStoreOptions {
  /** Most sessions at once; a new one past it is refused (too_many_sessions). */
  maxSessions: number;
  /** Idle time after which a session expires, in milliseconds. */
  ttlMs: number;
  /** Bytes all sessions together may hold; past it a turn that would add any is refused (too_many_sessions). */
  maxTotalBytes: number;
  limits: TrieLimits;
  /** Milliseconds on any monotonic clock. */
  now: () => number;
}

/** Defaults: a day of idleness, 1024 sessions, 1 GiB of messages and token ids in all. */
export const SESSION_DEFAULTS = { maxSessions: 1024, ttlMs: 24 * 3600 * 1000, maxTotalBytes: 1024 * 1024 * 1024 } as const;

/** Characters a session id may use (it travels in a header and a URL path). */
const ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;

/** One session: its trie and when it was made and last used (ms on the store's clock, and wall time). */
export interface Session {
  readonly id: string;
  readonly trie: SessionTrie;
  readonly createdAt: number;
  lastUsed: number;
  lastUsedWall: number;
}

/** A refusal for an id that cannot name a session. */
export function checkSessionId(id: string): void {
  if (!ID_PATTERN.test(id)) {
    throw new SessionError("invalid_session", "a session id must be 1 to 128 characters of letters, digits and . _ : -");
  }
}

/** The sessions of a node. */
export class SessionStore {
  private readonly sessions = new Map<string, Session>();
  readonly options: SessionStoreOptions;

  constructor(o: Partial<SessionStoreOptions> = {}) {
    this.options = {
      maxSessions: o.maxSessions ?? SESSION_DEFAULTS.maxSessions,
      ttlMs: o.ttlMs ?? SESSION_DEFAULTS.ttlMs,
      maxTotalBytes: o.maxTotalBytes ?? SESSION_DEFAULTS.maxTotalBytes,
      limits: o.limits ?? DEFAULT_TRIE_LIMITS,
      now: o.now ?? (() => performance.now()),
    };
  }

  /** Sessions held. */
  get size(): number {
    return this.sessions.size;
  }

  /** Refuse an id that cannot name a session (before anything else is done with the request). */
  check(id: string): void {
    checkSessionId(id);
  }

  /** The session `id`, created when new; refuses an invalid id, or a new one past maxSessions. */
  use(id: string): Session {
    checkSessionId(id);
    const now = this.options.now();
    const found = this.sessions.get(id);
    if (found) {
      found.lastUsed = now;
      found.lastUsedWall = Date.now();
      return found;
    }
    if (this.sessions.size >= this.options.maxSessions) {
      throw new SessionError(
        "too_many_sessions",
        `this node holds ${this.sessions.size} sessions, its limit: delete one or wait for one to expire`,
      );
    }
    const s: Session = { id, trie: new SessionTrie(this.options.limits), createdAt: Date.now(), lastUsed: now, lastUsedWall: Date.now() };
    this.sessions.set(id, s);
    return s;
  }

  /** The session `id` if held (not marking it used). */
  peek(id: string): Session | undefined {
    return this.sessions.get(id);
  }

  /** Every session, most recently used first. */
  list(): Session[] {
    return [...this.sessions.values()].sort((a, b) => b.lastUsed - a.lastUsed);
  }

  /** Bytes every session holds together (a scan of at most maxSessions). */
  totalBytes(): number {
    let n = 0;
    for (const s of this.sessions.values()) n += s.trie.stats().bytes;
    return n;
  }

  /** Refuse a new turn when the sessions together already hold their byte budget. */
  checkRoom(): void {
    const total = this.totalBytes();
    if (total >= this.options.maxTotalBytes) {
      throw new SessionError(
        "too_many_sessions",
        `sessions on this node hold ${total} bytes, the limit of ${this.options.maxTotalBytes}: delete some or wait for them to expire`,
      );
    }
  }

  /** Remove a session; returns it (its checkpoints are the caller's to release), or undefined. */
  delete(id: string): Session | undefined {
    const s = this.sessions.get(id);
    if (s) this.sessions.delete(id);
    return s;
  }

  /** Remove and return the sessions idle longer than the TTL (none with a request in flight). */
  sweep(): Session[] {
    const now = this.options.now();
    const gone: Session[] = [];
    // A scan of at most maxSessions entries, run every few seconds at most.
    for (const s of this.sessions.values()) {
      if (now - s.lastUsed > this.options.ttlMs && s.trie.stats().pending === 0) gone.push(s);
    }
    for (const s of gone) this.sessions.delete(s.id);
    return gone;
  }
}
