// Sessions on the HTTP side: which request belongs to which session (the
// X-Session-Id header or a `session` body field), one turn's life (begin in
// the trie, checkpoint keys for the engine, commit or abandon), expiry, and
// the /v1/sessions routes' answers. The trie and export live in sessions/.
import { randomBytes } from "node:crypto";
import type { Logger } from "../log";
import {
  digest,
  exportTrajectories,
  type PendingBranch,
  type Session,
  SessionError,
  type SessionMessage,
  SessionStore,
  type SessionStoreOptions,
  type Trajectory,
  type TurnInput,
  toJsonl,
  toolsKey,
} from "../sessions";
import { badRequest } from "./errors";
import type { ServedModel } from "./model";

/** The header naming a request's session. */
export const SESSION_HEADER = "x-session-id";

/**
 * The session a request names: its header, else a `session` query parameter (how a forwarding node passes it on:
 * the path is covered by the mesh request proof), else its body's `session` field; null when none.
 */
export function sessionIdOf(request: Request, body: object): string | null {
  const header = request.headers.get(SESSION_HEADER);
  if (header !== null) return header;
  const query = new URL(request.url).searchParams.get("session");
  if (query !== null) return query;
  const field = (body as { session?: unknown }).session;
  if (field === undefined || field === null) return null;
  if (typeof field !== "string") throw badRequest("session must be a string (a session id)", "session");
  return field;
}

/** One request's turn in a session: the checkpoint keys it gives the engine, then its commit or abandonment. */
export class SessionTurn {
  private finished = false;
  /** Checkpoint keys for the engine: save this turn's KV as `save`, restore `restore` first. */
  readonly checkpoint: { save: string; restore?: string };
  /** The prompt's token ids as the engine tokenizes them (set by the caller before commit). */
  promptIds: number[] | null = null;

  constructor(
    private readonly service: SessionService,
    readonly session: Session,
    private readonly branch: PendingBranch,
    private readonly model: ServedModel,
    private readonly tools: string,
  ) {
    const restore = branch.nearest?.turn?.model === model.id ? (branch.nearest.turn.checkpoint ?? undefined) : undefined;
    this.checkpoint = { save: digest(`${session.id}:${branch.id}:${randomBytes(8).toString("hex")}`), ...(restore ? { restore } : {}) };
  }

  /** The reply ended: store it with its token ids (and the end-of-generation token it stopped on); the replaced turn's checkpoint (an idempotent retry) is released. */
  commit(
    reply: SessionMessage,
    finishReason: string,
    responseIds: number[],
    logprobs: number[] | null,
    eog: TurnInput["eog"] = null,
  ): void {
    if (this.finished) return;
    this.finished = true;
    if (!this.promptIds) {
      this.abandonNow();
      return;
    }
    const released = this.session.trie.commit(this.branch, reply, {
      promptIds: this.promptIds,
      responseIds,
      logprobs,
      eog,
      finishReason,
      toolsKey: this.tools,
      checkpoint: this.checkpoint.save,
      model: this.model.id,
    });
    this.service.release(released.map((key) => ({ key, model: this.model.id })));
  }

  /** Cancelled, disconnected or failed: the pending branch goes, and so does any checkpoint the engine saved for it. Idempotent. */
  abandon(): void {
    if (this.finished) return;
    this.finished = true;
    this.abandonNow();
  }

  private abandonNow(): void {
    this.session.trie.abandon(this.branch);
    this.service.release([{ key: this.checkpoint.save, model: this.model.id }]);
  }
}

/** A session as GET /v1/sessions lists it. */
function summary(s: Session) {
  const st = s.trie.stats();
  return {
    id: s.id,
    object: "session",
    created: Math.floor(s.createdAt / 1000),
    last_used: Math.floor(s.lastUsedWall / 1000),
    nodes: st.nodes,
    branches: st.branches,
    turns: [...s.trie.turns()].length,
    pending: st.pending,
    bytes: st.bytes,
  };
}

/** A node's sessions, bound to the models whose engines hold their checkpoints. */
export class SessionService {
  readonly store: SessionStore;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(
    private readonly models: () => readonly ServedModel[],
    options: Partial<SessionStoreOptions> = {},
    private readonly logger: Logger | null = null,
  ) {
    this.store = new SessionStore(options);
    // Expiry is checked at a fraction of the TTL (at most every 30 s); the timer never keeps the process alive.
    const every = Math.max(50, Math.min(30_000, Math.floor(this.store.options.ttlMs / 4)));
    this.timer = setInterval(() => this.sweep(), every);
    (this.timer as { unref?: () => void }).unref?.();
  }

  /** Start a turn of session `id` (created on first use) for a chat body on `model`. */
  turn(id: string, model: ServedModel, body: { messages: readonly unknown[]; tools?: unknown }): SessionTurn {
    this.store.checkRoom();
    const session = this.store.use(id);
    const tools = toolsKey(body.tools);
    const branch = session.trie.begin(body.messages as SessionMessage[], tools);
    return new SessionTurn(this, session, branch, model, tools);
  }

  /** Expire idle sessions now (the timer calls it), releasing their checkpoints. */
  sweep(): void {
    for (const s of this.store.sweep()) {
      this.release(s.trie.checkpoints());
      this.logger?.info("session expired", { session: s.id });
    }
  }

  /** Tell each model's engine to drop these checkpoints. */
  release(keys: ReadonlyArray<{ key: string; model: string }>): void {
    if (keys.length === 0) return;
    for (const m of this.models()) {
      const mine = keys.filter((k) => k.model === m.id).map((k) => k.key);
      if (mine.length > 0) m.engine?.releaseCheckpoints?.(mine);
    }
  }

  /** GET /v1/sessions */
  list() {
    return { object: "list", data: this.store.list().map(summary) };
  }

  /** GET /v1/sessions/{id}: the summary and each branch's turns. */
  get(id: string) {
    const s = this.find(id);
    const terminals = s.trie.terminals().sort((a, b) => a.id - b.id);
    return {
      ...summary(s),
      ttl_seconds: Math.round(this.store.options.ttlMs / 1000),
      terminal_nodes: terminals.map((n) => ({ node_id: n.id, finish_reason: n.turn?.finishReason ?? null, model: n.turn?.model ?? null })),
    };
  }

  /** DELETE /v1/sessions/{id}: the session and its checkpoints go. */
  delete(id: string) {
    const s = this.store.delete(id);
    if (!s) throw notFound(id);
    this.release(s.trie.checkpoints());
    return { id, object: "session.deleted", deleted: true };
  }

  /** GET /v1/sessions/{id}/trajectories */
  trajectories(id: string, all: boolean): Trajectory[] {
    return exportTrajectories(this.find(id).trie, all);
  }

  /** The JSONL download of trajectories(). */
  jsonl(id: string, all: boolean): Response {
    const body = toJsonl(this.trajectories(id, all));
    return new Response(body, {
      headers: { "content-type": "application/x-ndjson", "content-disposition": `attachment; filename="${id}.trajectories.jsonl"` },
    });
  }

  /** Stop the expiry timer (server shutdown). */
  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private find(id: string): Session {
    const s = this.store.peek(id);
    if (!s) throw notFound(id);
    return s;
  }
}

function notFound(id: string): SessionError {
  return new SessionError("session_not_found", `Session with id '${id.slice(0, 128)}' not found.`);
}

/** The path a peer is sent a session's request on (`path` for none): the session rides in the query, which the mesh proof signs. */
export function forwardedPath(path: string, sessionId: string | null): string {
  return sessionId === null ? path : `${path}?session=${encodeURIComponent(sessionId)}`;
}
