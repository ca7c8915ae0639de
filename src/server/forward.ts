// Forwarding: a request routing sent to a peer (routing/ decides which, and
// in what order to fall back) goes there as mesh traffic, and its answer (SSE
// included) streams back unchanged. A peer that fails before answering is
// replaced once by the next on another node; a client that goes away aborts
// the upstream request.
// Nothing is relayed without the peer's forward proof (src/mesh/auth.ts): a
// process that took over a dead peer's port, without the mesh secret, gets the
// request but cannot answer in the peer's name, nor pass it on to a live node
// and relay that node's proven answer (the request names the node it is for).

import type { Logger } from "../log";
import { LruMap } from "../lru";
import { AUTH_HEADER, forwardProof, type MeshKeys, proofsEqual } from "../mesh/auth";
import type { MeshClient } from "../mesh/client";
import type { NodeId, WorkerInfo } from "../mesh/wire";
import { SSE_KEEPALIVE_MS } from "./openai/run";

/** Why a request could not be forwarded. */
export type ForwardErrorCode = "no_route" | "upstream_failed" | "cancelled";

/** A forwarding failure; src/server/errors.ts turns it into an HTTP answer. */
export class ForwardError extends Error {
  constructor(
    readonly code: ForwardErrorCode,
    message: string,
    readonly model: string,
  ) {
    super(message);
    this.name = "ForwardError";
  }
}

/** An error the forwarder answers with itself. */
export interface ErrorFields {
  status: number;
  type: string;
  message: string;
  code: string;
}

/** The words of those answers on one route: its API's error body, and the SSE event that ends a stream with an error. */
export interface ForwardShape {
  json(e: ErrorFields): unknown;
  sse(e: ErrorFields): string;
}

/** OpenAI's shapes: the default. */
const OPENAI_SHAPE: ForwardShape = {
  json: (e) => ({ error: { message: e.message, type: e.type, param: null, code: e.code } }),
  sse: (e) => `data: ${JSON.stringify({ error: { message: e.message, type: e.type, param: null, code: e.code } })}\n\n`,
};

/** What the forwarder needs from the node. */
export interface ForwarderOptions {
  client: MeshClient;
  /** The keys `client` signs with; a peer's answer is relayed only with a valid forward proof under them. */
  keys: MeshKeys;
  selfId: NodeId;
  /**
   * Longest wait for a peer's first byte. A non-streaming answer sends
   * nothing until it is complete, so this must be long; a peer that dies is
   * noticed sooner through `peerAlive`.
   */
  headersTimeoutMs: number;
  /** Whether membership still considers a node alive; a forward to a node that stops being alive is abandoned. */
  peerAlive?: (nodeId: string) => boolean;
  logger: Logger;
  /** Told when a worker could not be reached, so the registry stops routing to it for a while. */
  onPeerFailure?: (workerId: string) => void;
  /**
   * Longest silence of a peer's answer once it streams (default STREAM_IDLE_MS): past it, the answer is
   * abandoned with an error, since a cut link may deliver nothing at all, not even a reset.
   */
  streamIdleMs?: number;
  /** Told when a request to a worker starts and ends, so routing counts it in the worker's load until its figures catch up. */
  inflight?: { begin(workerId: string): void; end(workerId: string): void };
}

/** Counters of the forwarder. */
export interface ForwardStats {
  forwarded: number;
  retried: number;
  failed: number;
  active: number;
  /**
   * Peer answers refused for a missing or wrong forward proof, whatever their
   * status (each then retried or failed like any failure before the first
   * byte); a 413 is not counted, since an honest peer's gate cannot prove it.
   * Absent in reports of nodes that predate the proof.
   */
  unproven?: number;
  /** Requests that ran on this node after the peers ranked before it failed or refused them. */
  ranHere?: number;
}

// Statuses of proven answers after which another peer may well succeed: the
// peer's auth state, its stale worker record (404), overload, or its own failure.
const RETRYABLE = new Set([401, 404, 429, 500, 502, 503, 504]);
// Hop-by-hop and mesh headers stay on this hop.
const PASSED_HEADERS = ["content-type", "cache-control", "retry-after", "x-accel-buffering", "x-mesh-served-by", "x-mesh-node"];
const enc = new TextEncoder();

/** A peer's SSE answer is never silent for longer than its keep-alive (15 s): twice that, plus margin, means the link is gone. */
export const STREAM_IDLE_MS = 2 * SSE_KEEPALIVE_MS + 5_000;

/** How long a worker's 413 keeps bodies that large away from it, and how many workers are remembered. */
const SIZE_REFUSAL_TTL_MS = 10 * 60_000;
const MAX_SIZE_REFUSALS = 1024;

/** This node's own 413 for a body a peer serving `model` refused (its refusal cannot be proven, so none of it is relayed). */
function tooLarge(model: string, bytes: number, shape: ForwardShape): Response {
  const message = `a node serving '${model}' refused the request body size (${bytes} bytes)`;
  const body = shape.json({ status: 413, message, type: "invalid_request_error", code: "request_too_large" });
  return new Response(JSON.stringify(body), { status: 413, headers: { "content-type": "application/json" } });
}

/** Forwards requests to peers. */
export class Forwarder {
  // Bounded: an entry exists only while a request to that worker is unfinished.
  private readonly inflight = new Map<string, number>();
  private readonly counts = { forwarded: 0, retried: 0, failed: 0, unproven: 0, ranHere: 0 };
  /**
   * The smallest body each worker refused with an (unprovable) 413, and when: it is not sent bodies that
   * large again for a while, so whatever answers 413 to everything soon gets nothing, while an honest
   * node with a smaller body limit keeps getting what it can take. Bounded; entries expire.
   */
  private readonly sizeRefused = new LruMap<string, { bytes: number; at: number }>();

  constructor(private readonly o: ForwarderOptions) {}

  /**
   * Forward a POST of `body` to `path` on the first of `order` (the workers serving `model`, best
   * first, as routing ordered them), falling back once to the next one on another node. When this
   * node's own worker is in `order`, only the peers ranked before it are tried, and instead of
   * relaying a refusal or failing, the answer is null: run it here. Returns the answer and the
   * worker that gave it (null for this node's own 413); throws ForwardError. `shape` words the answers
   * this node makes itself in the route's API (OpenAI's by default).
   */
  async forward(
    order: readonly WorkerInfo[],
    model: string,
    path: string,
    body: Uint8Array,
    client: AbortSignal,
    shape: ForwardShape = OPENAI_SHAPE,
  ): Promise<{ response: Response; worker: WorkerInfo | null } | null> {
    const self = order.findIndex((w) => w.nodeId === this.o.selfId);
    const here = self >= 0;
    const all = here ? order.slice(0, self) : order;
    if (all.length === 0) {
      if (here) return null;
      throw new ForwardError("no_route", `The model '${model}' does not exist`, model);
    }
    const ranked = all.filter((w) => !this.refusesSize(w.id, body.byteLength));
    const first = ranked[0];
    // Every node serving the model refused a body this large lately.
    if (!first) return here ? null : { response: tooLarge(model, body.byteLength, shape), worker: null };
    // The retry goes to another node: a second worker on a node that just failed would likely fail too.
    const second = ranked.find((w) => w.nodeId !== first.nodeId);
    const targets = second ? [first, second] : [first];
    let lastError = "";
    let sizeRefusals = 0;
    for (let i = 0; i < targets.length; i++) {
      const w = targets[i] as WorkerInfo;
      const last = i === targets.length - 1;
      if (client.aborted) break;
      if (i > 0) this.counts.retried++;
      const upstream = new AbortController();
      const onAbort = () => upstream.abort();
      client.addEventListener("abort", onAbort, { once: true });
      const deadline = Date.now() + this.o.headersTimeoutMs;
      const timer = setInterval(
        () => {
          const dead = this.o.peerAlive && !this.o.peerAlive(w.nodeId);
          if (dead || Date.now() >= deadline)
            upstream.abort(new DOMException(dead ? "the peer left the mesh" : "no answer in time", "TimeoutError"));
        },
        Math.min(1000, this.o.headersTimeoutMs),
      );
      this.begin(w.id);
      try {
        const { response, nonce, callerNonce } = await this.o.client.send(w.addr, "POST", path, body, {
          signal: upstream.signal,
          headers: { "content-type": "application/json" },
          // Only that node may answer: whatever took its address cannot pass the request on to another node.
          to: w.nodeId,
        });
        clearInterval(timer);
        const status = response.status;
        const drop = async () => {
          await response.body?.cancel().catch(() => {});
          this.end(w.id);
          client.removeEventListener("abort", onAbort);
        };
        // Checked first, on the headers, before a single byte is relayed: whoever answers at a peer's address without the
        // mesh secret (a process that took over a dead peer's port) is a peer that failed before answering, whatever its status.
        const proof = response.headers.get(AUTH_HEADER.forwardProof) ?? "";
        if (!proofsEqual(proof, forwardProof(this.o.keys, { nonce, callerNonce, status }))) {
          await drop();
          if (status === 413) {
            // A peer's gate answers an oversized body before it can verify this node (verifying needs the body), so an
            // honest peer's 413 is never proven. Neither blamed nor shunned, but not final either (whatever answers 413
            // to everything must not hide the other node): the other node is tried, and only when every one refused
            // the size does the client get this node's own 413 (nothing of a peer's answer goes through).
            this.o.logger.info("a peer refused a forwarded request's size", { model, node: w.nodeId, bytes: body.byteLength });
            this.noteSizeRefusal(w.id, body.byteLength);
            sizeRefusals++;
            continue;
          }
          this.counts.unproven++;
          lastError =
            status === 401
              ? "a peer refused this node's mesh credentials: a node of another mesh, or not the node it was taken for"
              : "a peer answered without a valid mesh proof";
          this.o.logger.warn("a peer's answer has no valid mesh proof; not relayed", { model, node: w.nodeId, addr: w.addr, status });
          this.o.onPeerFailure?.(w.id);
          continue;
        }
        // A proven 401 is the peer refusing this node's mesh credentials, not the client's key: never relay it.
        // With this node serving the model, no refusal is relayed: it runs here instead.
        if (RETRYABLE.has(status) && (!last || here || status === 401)) {
          lastError = `a peer answered HTTP ${status}`;
          this.o.logger.warn("peer refused a forwarded request; trying another", { model, node: w.nodeId, status });
          await drop();
          continue;
        }
        this.counts.forwarded++;
        return {
          response: this.relay(response, w, upstream, () => client.removeEventListener("abort", onAbort), shape, client),
          worker: w,
        };
      } catch (e) {
        clearInterval(timer);
        this.end(w.id);
        client.removeEventListener("abort", onAbort);
        // The client hears what kind of failure it was; the log keeps the detail
        // (it names the peer's address, which is not the client's business).
        const detail = (e as Error)?.message ?? String(e);
        lastError = (e as Error)?.name === "TimeoutError" ? `a peer: ${detail}` : "a peer could not be reached";
        if (!client.aborted) {
          this.o.logger.warn("forwarding to a peer failed", { model, node: w.nodeId, error: detail });
          this.o.onPeerFailure?.(w.id);
        }
      }
    }
    if (client.aborted) throw new ForwardError("cancelled", "the client went away", model);
    if (here) {
      this.counts.ranHere++;
      return null;
    }
    // A 413 only when every node tried refused the size; any other failure among them is a failure to answer.
    if (sizeRefusals === targets.length) return { response: tooLarge(model, body.byteLength, shape), worker: null };
    this.counts.failed++;
    throw new ForwardError("upstream_failed", `no peer serving '${model}' could take the request (${lastError})`, model);
  }

  private refusesSize(workerId: string, bytes: number): boolean {
    const r = this.sizeRefused.peek(workerId);
    if (!r) return false;
    if (Date.now() - r.at > SIZE_REFUSAL_TTL_MS) {
      this.sizeRefused.delete(workerId);
      return false;
    }
    return bytes >= r.bytes;
  }

  private noteSizeRefusal(workerId: string, bytes: number): void {
    const r = this.sizeRefused.peek(workerId);
    this.sizeRefused.delete(workerId);
    // Oldest first out (an LruMap: a Map's first key slows down after many deletes).
    if (this.sizeRefused.size >= MAX_SIZE_REFUSALS) this.sizeRefused.shift();
    this.sizeRefused.set(workerId, { bytes: Math.min(bytes, r?.bytes ?? bytes), at: Date.now() });
  }

  /** Counters (forwarded, retried, failed) and requests still streaming. */
  stats(): ForwardStats {
    let active = 0;
    for (const n of this.inflight.values()) active += n;
    return { ...this.counts, active };
  }

  private begin(id: string): void {
    this.inflight.set(id, (this.inflight.get(id) ?? 0) + 1);
    this.o.inflight?.begin(id);
  }

  private end(id: string): void {
    const n = (this.inflight.get(id) ?? 1) - 1;
    if (n <= 0) this.inflight.delete(id);
    else this.inflight.set(id, n);
    this.o.inflight?.end(id);
  }

  // Streams the peer's answer through; ends the in-flight count exactly once however the stream ends. While it
  // streams, the peer is watched: an answer whose peer stops being alive, or that stays silent longer than a peer's
  // keep-alives allow (a link cut without a reset sends nothing, not even an error), is abandoned with an error.
  private relay(
    upstream: Response,
    w: WorkerInfo,
    ctrl: AbortController,
    detach: () => void,
    shape: ForwardShape,
    client: AbortSignal,
  ): Response {
    let done = false;
    // When the pending read of the peer's answer began (null: none pending; a slow client is not the peer's silence).
    let waiting: number | null = null;
    const idleMs = this.o.streamIdleMs ?? STREAM_IDLE_MS;
    const watch = setInterval(
      () => {
        const dead = this.o.peerAlive && !this.o.peerAlive(w.nodeId);
        if (dead || (waiting !== null && Date.now() - waiting > idleMs))
          ctrl.abort(new DOMException(dead ? "the peer left the mesh" : "the peer went silent mid-answer", "TimeoutError"));
      },
      Math.min(1000, idleMs),
    );
    const finish = () => {
      if (done) return;
      done = true;
      clearInterval(watch);
      this.end(w.id);
      detach();
    };
    const headers = new Headers();
    for (const h of PASSED_HEADERS) {
      const v = upstream.headers.get(h);
      if (v !== null) headers.set(h, v);
    }
    const sse = (headers.get("content-type") ?? "").startsWith("text/event-stream");
    const reader = upstream.body?.getReader();
    if (!reader) {
      finish();
      return new Response(null, { status: upstream.status, headers });
    }
    const body = new ReadableStream<Uint8Array>({
      pull: async (c) => {
        try {
          waiting = Date.now();
          const { value, done: end } = await reader.read();
          waiting = null;
          if (end) {
            finish();
            c.close();
          } else c.enqueue(value);
        } catch (e) {
          finish();
          // The client went away: nobody reads on, but the stream still ends (never left pending).
          if (client.aborted) return c.close();
          const why = ctrl.signal.aborted ? ((ctrl.signal.reason as Error | undefined)?.message ?? "aborted") : (e as Error)?.message;
          this.o.logger.warn("peer broke off a forwarded answer", { node: w.nodeId, error: why });
          this.o.onPeerFailure?.(w.id);
          // Cut short mid-answer: an SSE client gets an error event (and no [DONE]), never a stream that looks finished.
          if (sse) {
            const message = "the peer serving this request failed mid-answer";
            c.enqueue(enc.encode(shape.sse({ status: 502, message, type: "server_error", code: "upstream_failed" })));
            c.close();
          } else c.error(e);
        }
      },
      cancel: () => {
        finish();
        ctrl.abort();
        reader.cancel().catch(() => {});
      },
    });
    return new Response(body, { status: upstream.status, headers });
  }
}
