// The server's door for mesh traffic: refuses a request addressed to another
// node, verifies a request's mesh proof before any route runs, remembers who
// passed (per request), and signs replies: /mesh replies over their whole body,
// forwarded answers over the request's nonces and status.

import type { Logger } from "../log";
import { AUTH_HEADER, type AuthResult, claimsMeshAuth, type Exchange, type MeshAuthority } from "../mesh/auth";
import { readLimited } from "../mesh/body";
import { ApiError } from "./errors";

/** A request that passed mesh authentication. */
export interface MeshCaller extends Exchange {
  nodeId: string;
  /** The request body as verified (routes use it instead of reading the body again). */
  body: Uint8Array;
}

/** The one 401 for every mesh authentication failure: it says nothing about the mesh or why. */
export function meshUnauthorized(): ApiError {
  return new ApiError(401, "authentication_error", "mesh authentication required", null, "mesh_unauthorized");
}

/** Verifies and remembers mesh-authenticated requests. */
export class MeshGate {
  private readonly callers = new WeakMap<Request, MeshCaller>();
  private failures = 0;
  private self: (() => string) | null = null;

  constructor(
    readonly authority: MeshAuthority,
    /** Largest body a mesh-authenticated request may carry (the proof covers all of it). */
    private readonly maxBodyBytes: number,
    private readonly logger: Logger,
  ) {}

  /**
   * Name the node this gate guards: a request addressed to any other node id is
   * refused. Until it is named, every addressed request is refused, so a gate
   * nobody named fails closed.
   */
  guard(nodeId: () => string): void {
    this.self = nodeId;
  }

  /** Whether the request carries mesh credentials (then they must verify, whatever the route). */
  claims(request: Request): boolean {
    return claimsMeshAuth(request.headers);
  }

  /**
   * Verify the request's mesh proof, reading a copy of its body; null when it
   * passed, else the ApiError to answer. A failure changes nothing.
   */
  async check(request: Request): Promise<ApiError | null> {
    const url = new URL(request.url);
    // A request meant for another node (passed on by whatever took that node's address) is refused before its
    // nonce is used up, so this node never answers, in its own name, a request it was not meant to get.
    const to = request.headers.get(AUTH_HEADER.to);
    // Refuse a request with no usable nonce before buffering its body: a stranger must not make us read anything.
    const early = to !== null && to !== this.self?.() ? "wrong_node" : this.authority.precheck(request.headers);
    if (early) {
      this.failures++;
      this.logger.debug("mesh auth refused", { reason: early, path: url.pathname });
      return meshUnauthorized();
    }
    // A declared length over the limit is refused before the body is touched. Reading part of a clone and
    // answering left the rest of a large body unread behind the clone's tee: the sender blocked writing it and
    // never read the 413, and the connection hung until the idle timeout (a forwarding node then saw a 502).
    const declared = Number(request.headers.get("content-length") ?? Number.NaN);
    const body = declared > this.maxBodyBytes ? null : await readLimited(request.clone().body, this.maxBodyBytes);
    if (body === null) {
      return new ApiError(413, "invalid_request_error", `the request body is over ${this.maxBodyBytes} bytes`, null, "request_too_large");
    }
    const r: AuthResult = this.authority.verify({
      method: request.method,
      path: url.pathname + url.search,
      headers: request.headers,
      body,
    });
    if (!r.ok) {
      this.failures++;
      this.logger.debug("mesh auth refused", { reason: r.code, path: url.pathname });
      return meshUnauthorized();
    }
    this.callers.set(request, { nodeId: r.nodeId, nonce: r.nonce, callerNonce: r.callerNonce, body });
    return null;
  }

  /** The verified caller of `request`, if it passed check(). */
  caller(request: Request): MeshCaller | undefined {
    return this.callers.get(request);
  }

  /** Headers that hand a verified caller its next nonce (and, for a full body, prove the reply). */
  replyHeaders(request: Request, status: number, body?: Uint8Array): Record<string, string> {
    const c = this.callers.get(request);
    if (!c) return {};
    const next = this.authority.followUp();
    const h: Record<string, string> = { [AUTH_HEADER.nextNonce]: next.nonce, [AUTH_HEADER.nextNonceTtl]: String(next.ttlMs) };
    if (body) h[AUTH_HEADER.replyProof] = this.authority.replyProof(c, status, body);
    return h;
  }

  /**
   * `response` as sent to the verified caller of `request`, with its next nonce
   * and, unless a /mesh route already proved the whole body, a forward proof
   * over its nonces and status: a forwarding node relays nothing without it. Any
   * other request's response is returned as is.
   */
  signAnswer(request: Request, response: Response): Response {
    const c = this.callers.get(request);
    if (!c || response.headers.has(AUTH_HEADER.replyProof)) return response;
    const headers = new Headers(response.headers);
    if (!headers.has(AUTH_HEADER.nextNonce)) {
      const next = this.authority.followUp();
      headers.set(AUTH_HEADER.nextNonce, next.nonce);
      headers.set(AUTH_HEADER.nextNonceTtl, String(next.ttlMs));
    }
    headers.set(AUTH_HEADER.forwardProof, this.authority.forwardProof(c, response.status));
    // A new Response: the one given may have immutable headers; its body stream passes through untouched.
    return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
  }

  /** Requests refused so far. */
  get refused(): number {
    return this.failures;
  }
}
