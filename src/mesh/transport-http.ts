// The mesh core's Transport over HTTP: each message is one authenticated
// POST /mesh/rpc, and the reply is accepted only with the peer's reply proof,
// which is bound to this request's own fresh nonce (a recorded reply never
// passes for a new request).
import { AUTH_HEADER, type MeshKeys, proofsEqual, replyProof } from "./auth";
import { readLimited } from "./body";
import { type MeshClient, MeshClientError } from "./client";
import type { NodeId, Transport, WireMessage } from "./wire";

/** Largest message either way: gossip is small, and anything past this is a bug or an attack. */
export const MAX_MESSAGE_BYTES = 1024 * 1024;

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Whether `v` looks like a WireMessage (a JSON object with a string `type`). */
export function isWireMessage(v: unknown): v is WireMessage {
  return typeof v === "object" && v !== null && !Array.isArray(v) && typeof (v as { type?: unknown }).type === "string";
}

/** Transport over authenticated HTTP. */
export class HttpTransport implements Transport {
  constructor(
    private readonly client: MeshClient,
    private readonly keys: MeshKeys,
    private readonly maxBytes = MAX_MESSAGE_BYTES,
  ) {}

  /**
   * Send `msg` to `addr`, addressed to node `to` when known (any other node there refuses it);
   * rejects with a MeshClientError (timeout, unreachable, unauthorized, bad_reply).
   */
  async request(addr: string, msg: WireMessage, timeoutMs: number, to?: NodeId): Promise<WireMessage> {
    const body = enc.encode(JSON.stringify(msg));
    if (body.byteLength > this.maxBytes) throw new MeshClientError("bad_reply", `message of ${body.byteLength} bytes is over the limit`);
    const signal = AbortSignal.timeout(timeoutMs);
    const { response, nonce, callerNonce } = await this.client.send(addr, "POST", "/mesh/rpc", body, {
      signal,
      headers: { "content-type": "application/json" },
      to,
    });
    let reply: Uint8Array | null;
    try {
      reply = await readLimited(response.body, this.maxBytes);
    } catch (e) {
      throw new MeshClientError(signal.aborted ? "timeout" : "unreachable", `${addr} broke off its reply: ${(e as Error).message}`);
    }
    if (response.status === 401) {
      const unlike = to === undefined ? "" : ` (or is not node ${to.slice(0, 8)})`;
      throw new MeshClientError("unauthorized", `${addr} refused the mesh credentials${unlike}`);
    }
    if (reply === null) throw new MeshClientError("bad_reply", `${addr} sent a reply over ${this.maxBytes} bytes`);
    const proof = response.headers.get(AUTH_HEADER.replyProof) ?? "";
    // A reply without a valid proof may come from anyone on the path: it is dropped, whatever its status.
    if (!proofsEqual(proof, replyProof(this.keys, { nonce, callerNonce, status: response.status, body: reply }))) {
      throw new MeshClientError("bad_reply", `${addr} sent a reply without a valid mesh proof (HTTP ${response.status})`);
    }
    if (response.status !== 200)
      throw new MeshClientError("bad_reply", `${addr} answered HTTP ${response.status}: ${dec.decode(reply).slice(0, 200)}`);
    let parsed: unknown;
    try {
      parsed = JSON.parse(dec.decode(reply));
    } catch {
      throw new MeshClientError("bad_reply", `${addr} sent a reply that is not JSON`);
    }
    if (!isWireMessage(parsed)) throw new MeshClientError("bad_reply", `${addr} sent a reply that is not a mesh message`);
    return parsed;
  }
}
