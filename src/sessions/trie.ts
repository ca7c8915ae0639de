// One session's conversations as a prefix trie of canonical messages. Every
// request walks it from the root; the messages it shares with an earlier
// request are shared nodes, the rest become pending nodes until the reply is
// committed as an assistant node carrying the turn's token ids and the key of
// its KV checkpoint. Pure data: no engine, no timers, no I/O.
import { messageKey, type SessionMessage, storedMessage } from "./key";

/** Limits of one session; past them begin() refuses (session_full, session_busy). */
export interface TrieLimits {
  /** Most branches (leaf nodes, pending ones included). */
  maxBranches: number;
  /** Most bytes of stored messages and token ids. */
  maxBytes: number;
  /** Most requests in flight at once. */
  maxPending: number;
}

/** Defaults: room for a long agent run with wide best-of-N fan-outs. */
export const DEFAULT_TRIE_LIMITS: TrieLimits = { maxBranches: 1024, maxBytes: 64 * 1024 * 1024, maxPending: 64 };

/** An error value with a code, raised at this module's boundary. */
export class SessionError extends Error {
  constructor(
    readonly code: "session_full" | "session_busy" | "invalid_session" | "session_not_found" | "too_many_sessions",
    message: string,
  ) {
    super(message);
  }
}

/** What a generated assistant turn records (token ids as the server's own tokenizer and sampler produced them). */
export interface TurnInput {
  /** The whole prompt of the turn, as the engine tokenized it. */
  promptIds: readonly number[];
  /** The sampled tokens of the reply. */
  responseIds: readonly number[];
  /** Log-probability of each sampled token, when the request asked for logprobs. */
  logprobs: readonly number[] | null;
  /** The end-of-generation token the reply stopped on (sampled, never in responseIds), with its log-probability when logprobs were asked; absent: it ended otherwise. */
  eog?: { token: number; logprob?: number } | null;
  finishReason: string;
  /** toolsKey() of the request's tools: a checkpoint is reused only under the same tools. */
  toolsKey: string;
  /** The engine checkpoint holding this turn's KV state, or null. */
  checkpoint: string | null;
  /** The model that produced it (checkpoints belong to its engine). */
  model: string;
}

/** A committed turn as stored: its prompt as the tokens past the turn it extends, so a long linear run costs O(tokens), not O(turns x tokens). */
export interface Turn {
  /** The nearest earlier turn whose prompt+response this prompt extends token for token; null: this prompt starts a trajectory. */
  prev: TrieNode | null;
  /** Prompt tokens after prev's sequence (all of them when prev is null). */
  promptTail: Int32Array;
  response: Int32Array;
  logprobs: Float32Array | null;
  /** The end-of-generation token it stopped on, -1: none; not in response (a later prompt has it only where its template renders that token). */
  eog: number;
  /** Its log-probability (0 without logprobs). */
  eogLogprob: number;
  finishReason: string;
  toolsKey: string;
  checkpoint: string | null;
  model: string;
  /** Length of prompt + response (what a later turn extending it starts with). */
  length: number;
}

/** A node: one message on the path from the root. */
export interface TrieNode {
  readonly id: number;
  readonly key: string;
  message: SessionMessage | null;
  readonly parent: TrieNode | null;
  readonly children: Map<string, TrieNode>;
  /** The generated turn ending here (assistant nodes this session produced). */
  turn: Turn | null;
  /** Requests in flight that hold this node while it is not committed. */
  pending: number;
  /** Part of a committed path (false while only pending requests made it). */
  committed: boolean;
  bytes: number;
}

/** A request in flight: the nodes it holds, and where its reply goes. */
export interface PendingBranch {
  readonly id: number;
  /** The last prompt node; the reply becomes its child. */
  readonly parent: TrieNode;
  /** Uncommitted nodes on its path it holds (made or found). */
  readonly held: TrieNode[];
  /** The nearest generated turn on the path with a checkpoint under the same tools, or null. */
  readonly nearest: TrieNode | null;
  /** Messages of the request already in the trie before it. */
  readonly matched: number;
  done: boolean;
}

/** Bytes a stored message costs. */
function messageBytes(m: SessionMessage | null): number {
  return m ? 64 + 2 * JSON.stringify(m).length : 64;
}

/** Bytes a turn costs. */
function turnBytes(t: Turn): number {
  return 4 * (t.promptTail.length + t.response.length) + (t.logprobs ? 4 * t.logprobs.length : 0) + 128;
}

/** Whether `seq` starts with every token of `head`. */
function startsWith(seq: ArrayLike<number>, head: ArrayLike<number>): boolean {
  if (head.length > seq.length) return false;
  for (let i = 0; i < head.length; i++) if (seq[i] !== head[i]) return false;
  return true;
}

/** The token sequence (prompt then response) of the turn at `node`, rebuilt along its prev chain. */
export function turnSequence(node: TrieNode): Int32Array {
  const chain: Turn[] = [];
  for (let t = node.turn; t; t = t.prev?.turn ?? null) chain.push(t);
  const total = chain[0]?.length ?? 0;
  const out = new Int32Array(total);
  let at = 0;
  for (let i = chain.length - 1; i >= 0; i--) {
    const t = chain[i] as Turn;
    out.set(t.promptTail, at);
    at += t.promptTail.length;
    out.set(t.response, at);
    at += t.response.length;
  }
  return out;
}

/** A session's prefix trie. */
export class SessionTrie {
  readonly root: TrieNode;
  private nextId = 1;
  private leaves = 0;
  private nodes = 0;
  private bytesUsed = 0;
  private readonly inFlight = new Set<PendingBranch>();

  constructor(readonly limits: TrieLimits = DEFAULT_TRIE_LIMITS) {
    this.root = this.node("", null, null);
  }

  /** Figures for the API. */
  stats(): { nodes: number; branches: number; bytes: number; pending: number } {
    return { nodes: this.nodes, branches: this.leaves, bytes: this.bytesUsed, pending: this.inFlight.size };
  }

  /**
   * Walk a request's messages from the root: shared ones are matched, the rest become pending nodes.
   * Refuses (session_full, session_busy) before changing anything when the session would exceed a bound.
   */
  begin(messages: readonly SessionMessage[], tools: string): PendingBranch {
    if (this.inFlight.size >= this.limits.maxPending) {
      throw new SessionError(
        "session_busy",
        `the session already has ${this.inFlight.size} requests in flight (limit ${this.limits.maxPending})`,
      );
    }
    let node = this.root;
    let nearest: TrieNode | null = null;
    let i = 0;
    const held: TrieNode[] = [];
    for (; i < messages.length; i++) {
      const child = node.children.get(messageKey(messages[i] as SessionMessage));
      if (!child) break;
      node = child;
      if (!child.committed) held.push(child);
      if (child.turn?.checkpoint && child.turn.toolsKey === tools) nearest = child;
    }
    const matched = i;
    // Check every bound for what this request adds (its new messages and its reply) before adding any of it.
    const rest = messages.slice(i).map(storedMessage);
    const addBytes = rest.reduce((n, m) => n + messageBytes(m), 0) + messageBytes(null);
    const addLeaves = node === this.root || node.children.size > 0 ? 1 : 0;
    if (this.leaves + addLeaves > this.limits.maxBranches) {
      throw new SessionError("session_full", `the session has ${this.leaves} branches; the limit is ${this.limits.maxBranches}`);
    }
    if (this.bytesUsed + addBytes > this.limits.maxBytes) {
      throw new SessionError(
        "session_full",
        `the session holds ${this.bytesUsed} bytes; this request would pass its limit of ${this.limits.maxBytes}`,
      );
    }
    for (const m of rest) {
      const child = this.node(messageKey(m), m, node);
      held.push(child);
      node = child;
    }
    for (const n of held) n.pending++;
    const branch: PendingBranch = { id: this.nextId++, parent: node, held, nearest, matched, done: false };
    this.inFlight.add(branch);
    return branch;
  }

  /**
   * The reply arrived: store it as the assistant child of the branch's last prompt node (the same reply
   * again, an idempotent retry, replaces that node's turn instead of adding a sibling) and commit the path.
   * Returns the checkpoint keys the replaced turn held, for the caller to release.
   */
  commit(branch: PendingBranch, reply: SessionMessage, input: TurnInput): string[] {
    if (branch.done) return input.checkpoint ? [input.checkpoint] : [];
    this.settle(branch);
    const released: string[] = [];
    const stored = storedMessage(reply);
    const key = messageKey(stored);
    let child = branch.parent.children.get(key);
    if (child) {
      this.bytesUsed -= child.bytes;
      child.message = stored;
      child.bytes = messageBytes(stored);
      this.bytesUsed += child.bytes;
      if (child.turn) {
        this.bytesUsed -= turnBytes(child.turn);
        if (child.turn.checkpoint && child.turn.checkpoint !== input.checkpoint) released.push(child.turn.checkpoint);
      }
    } else child = this.node(key, stored, branch.parent);
    const before = child.turn ? turnSequence(child) : null;
    // Replaced whole, never merged: nothing of a previous reply's turn survives on the node.
    child.turn = this.turnOf(branch.parent, input);
    this.bytesUsed += turnBytes(child.turn);
    if (before) this.rebase(child, before);
    for (let n: TrieNode | null = child; n && !n.committed; n = n.parent) n.committed = true;
    return released;
  }

  /** The request failed, was cancelled or its client left: drop the nodes only it was holding. Idempotent. */
  abandon(branch: PendingBranch): void {
    if (branch.done) return;
    this.settle(branch);
    for (let i = branch.held.length - 1; i >= 0; i--) {
      const n = branch.held[i] as TrieNode;
      if (!n.committed && n.pending === 0 && n.children.size === 0 && !n.turn) this.remove(n);
    }
  }

  /** Every node that carries a turn, in one pass (depth first). */
  *turns(): Generator<TrieNode> {
    const stack: TrieNode[] = [this.root];
    while (stack.length > 0) {
      const n = stack.pop() as TrieNode;
      if (n.turn) yield n;
      for (const c of n.children.values()) stack.push(c);
    }
  }

  /**
   * Terminal turns: those with no turn below them (a continued branch is represented by its deepest
   * turn, rejected best-of-N siblings by their own). One iterative post-order pass: O(nodes).
   */
  terminals(): TrieNode[] {
    const out: TrieNode[] = [];
    const below = new Map<TrieNode, boolean>();
    const stack: Array<[TrieNode, boolean]> = [[this.root, false]];
    while (stack.length > 0) {
      const [n, expanded] = stack.pop() as [TrieNode, boolean];
      if (!expanded) {
        stack.push([n, true]);
        for (const c of n.children.values()) stack.push([c, false]);
        continue;
      }
      let any = false;
      for (const c of n.children.values()) {
        if (below.get(c)) any = true;
        below.delete(c);
      }
      if (n.turn && !any) out.push(n);
      below.set(n, any || n.turn !== null);
    }
    return out;
  }

  /** Every checkpoint key the trie holds (to release them all when the session goes). */
  checkpoints(): Array<{ key: string; model: string }> {
    const out: Array<{ key: string; model: string }> = [];
    for (const n of this.turns()) if (n.turn?.checkpoint) out.push({ key: n.turn.checkpoint, model: n.turn.model });
    return out;
  }

  /** Copies of the messages from the root to `node`: a caller may change them freely. */
  messages(node: TrieNode): SessionMessage[] {
    const path: SessionMessage[] = [];
    for (let n: TrieNode | null = node; n?.message; n = n.parent) path.push(structuredClone(n.message));
    return path.reverse();
  }

  private settle(branch: PendingBranch): void {
    branch.done = true;
    this.inFlight.delete(branch);
    for (const n of branch.held) n.pending--;
  }

  // A retry replaced `node`'s turn, whose tokens were `before`: the turns stored against those tokens are
  // stored again against the new ones, or, where their prompt no longer starts with them, as the start of a
  // trajectory of their own. Their whole prompt (and length) is what it was; only where it is cut changes.
  private rebase(node: TrieNode, before: Int32Array): void {
    const after = turnSequence(node);
    if (startsWith(before, after) && before.length === after.length) return;
    const stack = [...node.children.values()];
    while (stack.length > 0) {
      const n = stack.pop() as TrieNode;
      const t = n.turn;
      if (!t) {
        for (const c of n.children.values()) stack.push(c);
        continue;
      }
      // Turns below this one were stored against this one's tokens, which do not change.
      if (t.prev !== node) continue;
      const prompt = new Int32Array(before.length + t.promptTail.length);
      prompt.set(before);
      prompt.set(t.promptTail, before.length);
      this.bytesUsed -= turnBytes(t);
      const still = startsWith(prompt, after);
      t.prev = still ? node : null;
      t.promptTail = still ? prompt.slice(after.length) : prompt;
      this.bytesUsed += turnBytes(t);
    }
  }

  private turnOf(parent: TrieNode, t: TurnInput): Turn {
    // The nearest generated turn above: this prompt extends it when it starts with its exact tokens.
    let prev: TrieNode | null = null;
    for (let n: TrieNode | null = parent; n; n = n.parent) {
      if (n.turn) {
        prev = n;
        break;
      }
    }
    let start = 0;
    if (prev?.turn) {
      const seq = turnSequence(prev);
      if (startsWith(t.promptIds, seq)) start = seq.length;
      else prev = null;
    }
    const promptTail = Int32Array.from(t.promptIds.slice(start));
    const response = Int32Array.from(t.responseIds);
    return {
      prev,
      promptTail,
      response,
      logprobs: t.logprobs ? Float32Array.from(t.logprobs) : null,
      eog: t.eog ? t.eog.token : -1,
      eogLogprob: t.eog?.logprob ?? 0,
      finishReason: t.finishReason,
      toolsKey: t.toolsKey,
      checkpoint: t.checkpoint,
      model: t.model,
      length: start + promptTail.length + response.length,
    };
  }

  private node(key: string, message: SessionMessage | null, parent: TrieNode | null): TrieNode {
    const n: TrieNode = {
      id: this.nextId++,
      key,
      message,
      parent,
      children: new Map(),
      turn: null,
      pending: 0,
      committed: parent === null,
      bytes: messageBytes(message),
    };
    if (parent) {
      if (parent === this.root || parent.children.size > 0) this.leaves++;
      parent.children.set(key, n);
      this.nodes++;
      this.bytesUsed += n.bytes;
    }
    return n;
  }

  private remove(n: TrieNode): void {
    const parent = n.parent;
    if (!parent || parent.children.get(n.key) !== n) return;
    parent.children.delete(n.key);
    if (parent === this.root || parent.children.size > 0) this.leaves--;
    this.nodes--;
    this.bytesUsed -= n.bytes + (n.turn ? turnBytes(n.turn) : 0);
  }
}
