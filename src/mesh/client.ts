// The caller's side of mesh authentication over HTTP: keeps a few nonces per
// peer (each authenticated reply brings the next one), fetches a challenge when
// it has none, signs, and retries once with a fresh challenge when a pooled
// nonce was refused (expired or evicted on the peer; a 401 changed nothing).
// Every request also carries a fresh nonce of the caller's own, to which the
// peer's reply proof is bound, and, when the caller knows it, the node id it
// means to reach.

import { LruMap } from "../lru";
import { AUTH_HEADER, type Exchange, type MeshKeys, newNonce, requestProof } from "./auth";
import { readLimited } from "./body";

/** Bounds and identity of a client. */
export interface MeshClientOptions {
  keys: MeshKeys;
  /** Sent as x-mesh-node; bound into every proof. */
  nodeId: string;
  now?: () => number;
  /** Most peers with pooled nonces (least recently used dropped first). */
  maxPeers?: number;
  /** Most nonces kept per peer. */
  poolSize?: number;
  fetch?: typeof fetch;
}

/** A signed request's response and the nonces it used (to check the reply's proof). */
export interface SentRequest extends Exchange {
  response: Response;
}

/** Options of one signed request. */
export interface SendOptions {
  signal?: AbortSignal;
  headers?: Record<string, string>;
  /** The node id meant to answer, when known: any other node refuses the request, so it cannot be passed on and answered elsewhere. */
  to?: string;
}

/** Why a request could not be sent. */
export type ClientErrorCode = "unreachable" | "timeout" | "aborted" | "unauthorized" | "bad_reply";

/** A failure of the client, with a code. */
export class MeshClientError extends Error {
  constructor(
    readonly code: ClientErrorCode,
    message: string,
  ) {
    super(message);
    this.name = "MeshClientError";
  }
}

interface Pooled {
  nonce: string;
  expiresAt: number;
}

const CHALLENGE_MAX_BYTES = 1024;

/** Map a fetch failure to a client error code. */
export function clientError(e: unknown, signal: AbortSignal | undefined, addr: string): MeshClientError {
  if (e instanceof MeshClientError) return e;
  if (signal?.aborted) {
    const timeout = (signal.reason as { name?: string } | undefined)?.name === "TimeoutError";
    return new MeshClientError(timeout ? "timeout" : "aborted", timeout ? `${addr} did not answer in time` : "request aborted");
  }
  return new MeshClientError("unreachable", `${addr} is unreachable: ${(e as Error)?.message ?? String(e)}`);
}

/** Signs requests to peers with the mesh secret. */
export class MeshClient {
  // Least recently used peer first (an LruMap: a Map's first key slows down after many deletes).
  private readonly pools = new LruMap<string, Pooled[]>();
  private readonly now: () => number;
  private readonly maxPeers: number;
  private readonly poolSize: number;
  private readonly fetchFn: typeof fetch;

  constructor(private readonly o: MeshClientOptions) {
    this.now = o.now ?? Date.now;
    this.maxPeers = o.maxPeers ?? 1024;
    this.poolSize = o.poolSize ?? 8;
    this.fetchFn = o.fetch ?? fetch;
  }

  /** The node id this client signs as. */
  get nodeId(): string {
    return this.o.nodeId;
  }

  /** Send one signed request to `addr` ("host:port"); the caller reads (or cancels) the response body. */
  async send(addr: string, method: string, path: string, body: Uint8Array, o: SendOptions = {}): Promise<SentRequest> {
    try {
      const pooled = this.takePooled(addr);
      const first = await this.attempt(addr, method, path, body, pooled ?? (await this.challenge(addr, o.signal)), o);
      if (first.response.status !== 401 || pooled === null) return first;
      // The pooled nonce may have expired or been evicted on the peer: one retry with a fresh challenge.
      await first.response.body?.cancel();
      return await this.attempt(addr, method, path, body, await this.challenge(addr, o.signal), o);
    } catch (e) {
      throw clientError(e, o.signal, addr);
    }
  }

  /** Nonces pooled for `addr` (for tests). */
  pooled(addr: string): number {
    return this.pools.peek(addr)?.length ?? 0;
  }

  /** Peers with pooled nonces (for tests). */
  get peers(): number {
    return this.pools.size;
  }

  private async attempt(addr: string, method: string, path: string, body: Uint8Array, nonce: string, o: SendOptions): Promise<SentRequest> {
    // Fresh for every attempt: a reply proven for one request never passes for another.
    const callerNonce = newNonce();
    const proof = requestProof(this.o.keys, { nonce, callerNonce, to: o.to, method, path, body, nodeId: this.o.nodeId });
    const headers: Record<string, string> = {
      ...o.headers,
      [AUTH_HEADER.node]: this.o.nodeId,
      [AUTH_HEADER.nonce]: nonce,
      [AUTH_HEADER.callerNonce]: callerNonce,
      [AUTH_HEADER.proof]: proof,
    };
    if (o.to !== undefined) headers[AUTH_HEADER.to] = o.to;
    const response = await this.fetchFn(`http://${addr}${path}`, {
      method,
      headers,
      body: method === "GET" || method === "HEAD" ? undefined : body,
      signal: o.signal,
    });
    this.absorb(addr, response.headers);
    return { response, nonce, callerNonce };
  }

  private async challenge(addr: string, signal: AbortSignal | undefined): Promise<string> {
    const res = await this.fetchFn(`http://${addr}/mesh/challenge`, { signal });
    // Whoever answers at a stale address must not make us buffer an unbounded body.
    const bytes = res.status === 200 ? await readLimited(res.body, CHALLENGE_MAX_BYTES) : null;
    if (bytes === null) {
      await res.body?.cancel().catch(() => {});
      throw new MeshClientError("bad_reply", `${addr} gave no mesh challenge (HTTP ${res.status}); is it a mesh node?`);
    }
    let nonce: unknown;
    try {
      nonce = (JSON.parse(new TextDecoder().decode(bytes)) as { nonce?: unknown } | null)?.nonce;
    } catch {
      nonce = undefined;
    }
    if (typeof nonce !== "string") throw new MeshClientError("bad_reply", `${addr} gave a malformed mesh challenge`);
    return nonce;
  }

  private takePooled(addr: string): string | null {
    const pool = this.pools.peek(addr);
    if (!pool) return null;
    const now = this.now();
    let next: Pooled | undefined = pool.shift();
    while (next && next.expiresAt <= now) next = pool.shift();
    if (pool.length === 0) this.pools.delete(addr);
    return next?.nonce ?? null;
  }

  private absorb(addr: string, headers: Headers): void {
    const nonce = headers.get(AUTH_HEADER.nextNonce);
    if (!nonce) return;
    const ttl = Number(headers.get(AUTH_HEADER.nextNonceTtl) ?? 0);
    // Use it well before the peer forgets it: the time to reach the peer counts too.
    const life = Number.isFinite(ttl) && ttl > 0 ? Math.min(ttl, 300_000) / 2 : 5_000;
    const pool = this.pools.get(addr) ?? [];
    pool.push({ nonce, expiresAt: this.now() + life });
    while (pool.length > this.poolSize) pool.shift();
    this.pools.set(addr, pool); // the most recent peer now
    while (this.pools.size > this.maxPeers) this.pools.shift();
  }
}
