// Mesh authentication: challenge-response with one-time nonces, keyed by the
// mesh secret. Pure: no sockets, no timers; time comes from `now`.
//
// Why challenge-response rather than a timestamped MAC: a timestamp needs the
// machines' clocks to agree within the acceptance window, and a mesh of home
// machines and laptops is exactly where they do not. A server-issued nonce needs
// no clock agreement, and replay protection is exact (a nonce verifies once).
// Its cost, an extra round trip, is paid only once per peer: every
// authenticated reply hands the caller the nonce for its next request.
//
// Both sides pick a nonce. The server's nonce makes a request verify once; the
// caller's own fresh random nonce makes a reply fit one request only: without
// it, whoever recorded an exchange (traffic is not encrypted) could later hand
// out the recorded server nonce as its challenge and send back the recorded
// reply and proof, which would verify as a fresh answer.
//
// A caller proves HMAC-SHA256(k_req, "mesh-req-v2" | nonce | callerNonce | to |
// METHOD | path | sha256(body) | nodeId), where `to` is the node id it means to
// reach ("" for a bare address, as in a join): a server refuses a request
// addressed to another node, so a request cannot be passed on to a node it was
// not meant for and answered there in the intended node's name. The server
// answers with HMAC-SHA256(k_rep, "mesh-rep-v2" | nonce | callerNonce | status |
// sha256(body)), bound to that one request: it can be neither forged nor
// replayed for another.
//
// A forwarded inference answer may be a stream whose body is unknown when its
// headers leave, so its proof, HMAC-SHA256(k_rep, "mesh-fwd-v2" | nonce |
// callerNonce | status), covers only the request's two nonces and the status. It
// travels in its own header and under its own label, so a body-less forward
// proof can never stand in for a /mesh reply proof, nor a reply proof for a
// forward proof.
import { createHash, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { LruMap } from "../lru";

/** Header names of the mesh authentication. */
export const AUTH_HEADER = {
  node: "x-mesh-node",
  nonce: "x-mesh-nonce",
  /** The caller's own fresh nonce: every reply proof is bound to it. */
  callerNonce: "x-mesh-caller-nonce",
  /** The node id the caller means to reach; absent only when it does not know it (a bare address). */
  to: "x-mesh-to",
  proof: "x-mesh-proof",
  nextNonce: "x-mesh-next-nonce",
  nextNonceTtl: "x-mesh-next-nonce-ttl-ms",
  replyProof: "x-mesh-reply-proof",
  forwardProof: "x-mesh-forward-proof",
} as const;

/** Why a request was refused; only logged, never told to the caller. */
export type AuthFailure = "missing" | "malformed" | "unknown_nonce" | "bad_proof" | "wrong_node";

/** The outcome of verifying a request. */
export type AuthResult = ({ ok: true; nodeId: string; to: string | null } & Exchange) | { ok: false; code: AuthFailure };

/** The two nonces of one request: the server's (used up by it) and the caller's (which binds the reply to it). */
export interface Exchange {
  nonce: string;
  callerNonce: string;
}

/** A request as the verifier sees it. */
export interface SignedRequest {
  method: string;
  /** Path with query, e.g. "/mesh/rpc". */
  path: string;
  headers: Headers;
  body: Uint8Array;
}

/** The two keys derived from a mesh secret, so request and reply proofs can never be swapped. */
export interface MeshKeys {
  request: Buffer;
  reply: Buffer;
}

const NONCE = /^[A-Za-z0-9_-]{22}$/;
const PROOF = /^[A-Za-z0-9_-]{43}$/;
/** Node ids of members (hex) and of tools such as `mesh peers` ("cli-…"). */
const NODE_ID = /^[a-z0-9-]{1,64}$/;

/** Derive the request and reply keys from a mesh secret. */
export function meshKeys(secret: string): MeshKeys {
  const k = (label: string) => createHmac("sha256", secret).update(label).digest();
  return { request: k("mesh-request-key-v1"), reply: k("mesh-reply-key-v1") };
}

/** Hex SHA-256 of a body (empty body included). */
export function bodyHash(body: Uint8Array): string {
  return createHash("sha256").update(body).digest("hex");
}

/** A fresh random nonce (16 bytes, base64url), as servers issue and callers add to each request. */
export function newNonce(): string {
  return randomBytes(16).toString("base64url");
}

/** The proof a caller sends with a request; `to` is the node it means to reach (null or absent when unknown). */
export function requestProof(
  keys: MeshKeys,
  p: Exchange & { method: string; path: string; body: Uint8Array; nodeId: string; to?: string | null },
): string {
  const text = ["mesh-req-v2", p.nonce, p.callerNonce, p.to ?? "", p.method.toUpperCase(), p.path, bodyHash(p.body), p.nodeId].join("\n");
  return createHmac("sha256", keys.request).update(text).digest("base64url");
}

/** The proof a server sends with its reply to the request of exchange `p`. */
export function replyProof(keys: MeshKeys, p: Exchange & { status: number; body: Uint8Array }): string {
  const text = ["mesh-rep-v2", p.nonce, p.callerNonce, String(p.status), bodyHash(p.body)].join("\n");
  return createHmac("sha256", keys.reply).update(text).digest("base64url");
}

/** The proof a server sends with its answer to the forwarded request of exchange `p` (headers only: the body may still be streaming). */
export function forwardProof(keys: MeshKeys, p: Exchange & { status: number }): string {
  const text = ["mesh-fwd-v2", p.nonce, p.callerNonce, String(p.status)].join("\n");
  return createHmac("sha256", keys.reply).update(text).digest("base64url");
}

/** Constant-time equality of two base64url proofs (false for malformed ones). */
export function proofsEqual(a: string, b: string): boolean {
  if (!PROOF.test(a) || !PROOF.test(b)) return false;
  return timingSafeEqual(Buffer.from(a, "base64url"), Buffer.from(b, "base64url"));
}

/** Bounds of a nonce store. */
export interface NonceStoreOptions {
  /** Most nonces held; issuing past it evicts the oldest. */
  capacity: number;
  ttlMs: number;
  now: () => number;
}

/** One-time nonces with a time to live, oldest evicted first when full. */
export class NonceStore {
  // Issue order: the first entry is always the oldest (an LruMap, since a Map's first key slows down after many deletes).
  private readonly expires = new LruMap<string, number>();

  constructor(private readonly o: NonceStoreOptions) {}

  /** A fresh random nonce (16 bytes, base64url), remembered until used, expired or evicted. */
  issue(): string {
    this.sweep();
    while (this.expires.size >= this.o.capacity) this.expires.shift();
    const nonce = newNonce();
    this.expires.set(nonce, this.o.now() + this.o.ttlMs);
    return nonce;
  }

  /** Whether `nonce` was issued, is unused and has not expired; changes nothing. */
  has(nonce: string): boolean {
    const exp = this.expires.peek(nonce);
    return exp !== undefined && exp > this.o.now();
  }

  /** Use `nonce` up: true once, for a live nonce. */
  take(nonce: string): boolean {
    const ok = this.has(nonce);
    this.expires.delete(nonce);
    return ok;
  }

  /** How many nonces are held. */
  get size(): number {
    return this.expires.size;
  }

  private sweep(): void {
    const now = this.o.now();
    for (let e = this.expires.oldest(); e !== undefined && e[1] <= now; e = this.expires.oldest()) this.expires.shift();
  }
}

const CHALLENGE_TAG_BYTES = 6;

/**
 * Challenges that cost nothing to hand out: a challenge is its issue time, 4 random bytes and a tag (a
 * truncated HMAC under a key of this process), so a flood of GET /mesh/challenge stores nothing and can
 * evict nothing, least of all the challenge a forwarding peer fetched a moment ago. Replay protection
 * stays exact: a challenge is used up by the first request that verifies with it (only requests that
 * carry a valid proof, so only mesh members, add to what is remembered), and when more are used within
 * a time to live than the bound holds, the oldest is forgotten and every challenge issued no later than
 * it is refused from then on. A restart changes the key: challenges of the previous process are refused.
 */
export class ChallengeMint {
  private readonly key = randomBytes(32);
  // Used challenges by use order, with their issue times.
  private readonly used = new LruMap<string, number>();
  private floor = Number.NEGATIVE_INFINITY;

  constructor(private readonly o: NonceStoreOptions) {}

  /** A challenge (16 bytes, base64url); nothing is stored. */
  issue(): string {
    const b = Buffer.alloc(16);
    b.writeUIntBE(Math.max(0, Math.floor(this.o.now())), 0, 6);
    randomBytes(16 - 6 - CHALLENGE_TAG_BYTES).copy(b, 6);
    this.tag(b.subarray(0, 16 - CHALLENGE_TAG_BYTES)).copy(b, 16 - CHALLENGE_TAG_BYTES);
    return b.toString("base64url");
  }

  /** Whether `nonce` is a challenge this process issued, live and unused; changes nothing. */
  has(nonce: string): boolean {
    const t = this.issuedAt(nonce);
    if (t === null || t <= this.floor || this.used.has(nonce)) return false;
    const now = this.o.now();
    // An issue time ahead of now means the clock stepped back: allowed within a time to live.
    return t > now - this.o.ttlMs && t < now + this.o.ttlMs;
  }

  /** Use `nonce` up: true once, for a live challenge. */
  take(nonce: string): boolean {
    const t = this.issuedAt(nonce);
    if (t === null || !this.has(nonce)) return false;
    const now = this.o.now();
    for (let e = this.used.oldest(); e !== undefined && e[1] <= now - this.o.ttlMs; e = this.used.oldest()) this.used.shift();
    while (this.used.size >= this.o.capacity) {
      const [, at] = this.used.shift() as [string, number];
      this.floor = Math.max(this.floor, at);
    }
    this.used.set(nonce, t);
    return true;
  }

  /** Used challenges remembered (the only state challenges cost). */
  get size(): number {
    return this.used.size;
  }

  private issuedAt(nonce: string): number | null {
    const b = Buffer.from(nonce, "base64url");
    if (b.length !== 16) return null;
    const head = b.subarray(0, 16 - CHALLENGE_TAG_BYTES);
    if (!timingSafeEqual(this.tag(head), b.subarray(16 - CHALLENGE_TAG_BYTES))) return null;
    return b.readUIntBE(0, 6);
  }

  private tag(head: Uint8Array): Buffer {
    return createHmac("sha256", this.key).update(head).digest().subarray(0, CHALLENGE_TAG_BYTES);
  }
}

/** Bounds of the verifier. */
export interface AuthorityOptions {
  /** Used challenges remembered (challenges handed to anyone who asks, GET /mesh/challenge, cost nothing until used). */
  challengeCapacity: number;
  /** Nonces handed out with authenticated replies, for the caller's next request. */
  followUpCapacity: number;
  ttlMs: number;
  now: () => number;
}

/** Default bounds: 4096 nonces per store, each valid 30 s. */
export const DEFAULT_AUTHORITY: Omit<AuthorityOptions, "now"> = { challengeCapacity: 4096, followUpCapacity: 4096, ttlMs: 30_000 };

/**
 * The server side: issues nonces and verifies proofs. Anonymous challenges are
 * stateless (ChallengeMint) and follow-up nonces live in their own store, so a
 * flood of anonymous challenge requests costs no memory and evicts nothing.
 */
export class MeshAuthority {
  private readonly challenges: ChallengeMint;
  private readonly followUps: NonceStore;

  constructor(
    readonly keys: MeshKeys,
    private readonly o: AuthorityOptions,
  ) {
    this.challenges = new ChallengeMint({ capacity: o.challengeCapacity, ttlMs: o.ttlMs, now: o.now });
    this.followUps = new NonceStore({ capacity: o.followUpCapacity, ttlMs: o.ttlMs, now: o.now });
  }

  /** A nonce for anyone; proves nothing until answered with the secret. */
  challenge(): { nonce: string; ttlMs: number } {
    return { nonce: this.challenges.issue(), ttlMs: this.o.ttlMs };
  }

  /** A nonce for the next request of a caller that just authenticated. */
  followUp(): { nonce: string; ttlMs: number } {
    return { nonce: this.followUps.issue(), ttlMs: this.o.ttlMs };
  }

  /** Cheap checks before a body is read: well-formed headers and a nonce we issued. Changes nothing. */
  precheck(headers: Headers): AuthFailure | null {
    const h = authHeaders(headers);
    if (typeof h === "string") return h;
    return this.challenges.has(h.nonce) || this.followUps.has(h.nonce) ? null : "unknown_nonce";
  }

  /** Verify a request; on success its nonce is used up, on failure nothing changes. */
  verify(r: SignedRequest): AuthResult {
    const h = authHeaders(r.headers);
    if (typeof h === "string") return { ok: false, code: h };
    const { nodeId, nonce, callerNonce, to, proof } = h;
    const store = this.challenges.has(nonce) ? this.challenges : this.followUps.has(nonce) ? this.followUps : null;
    if (!store) return { ok: false, code: "unknown_nonce" };
    const expected = requestProof(this.keys, { nonce, callerNonce, to, method: r.method, path: r.path, body: r.body, nodeId });
    if (!proofsEqual(expected, proof)) return { ok: false, code: "bad_proof" };
    store.take(nonce);
    return { ok: true, nodeId, nonce, callerNonce, to };
  }

  /** The proof to send with the reply to a verified request. */
  replyProof(exchange: Exchange, status: number, body: Uint8Array): string {
    return replyProof(this.keys, { ...exchange, status, body });
  }

  /** The proof to send with the answer to a verified forwarded request, before its body is known. */
  forwardProof(exchange: Exchange, status: number): string {
    return forwardProof(this.keys, { ...exchange, status });
  }

  /** Nonces held: used challenges remembered, and follow-ups handed out (for tests and metrics). */
  get sizes(): { challenges: number; followUps: number } {
    return { challenges: this.challenges.size, followUps: this.followUps.size };
  }
}

/** The authentication headers of a request, checked for form only, or why they are unusable. */
function authHeaders(
  headers: Headers,
): { nodeId: string; nonce: string; callerNonce: string; to: string | null; proof: string } | "missing" | "malformed" {
  const nodeId = headers.get(AUTH_HEADER.node);
  const nonce = headers.get(AUTH_HEADER.nonce);
  const callerNonce = headers.get(AUTH_HEADER.callerNonce);
  const proof = headers.get(AUTH_HEADER.proof);
  const to = headers.get(AUTH_HEADER.to);
  if (nodeId === null || nonce === null || callerNonce === null || proof === null) return "missing";
  if (!NODE_ID.test(nodeId) || !NONCE.test(nonce) || !NONCE.test(callerNonce) || !PROOF.test(proof)) return "malformed";
  if (to !== null && !NODE_ID.test(to)) return "malformed";
  return { nodeId, nonce, callerNonce, to, proof };
}

/** Whether a request carries mesh authentication headers at all. */
export function claimsMeshAuth(headers: Headers): boolean {
  return headers.has(AUTH_HEADER.proof);
}
