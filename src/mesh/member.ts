// Membership records: what a node says about itself (signed) and what others
// may claim about it (suspect, dead), with the SWIM precedence between them.
import { isCount, isNodeId, isObject, isStr } from "./check";
import { type Identity, nodeIdOf, verifySignature } from "./identity";
import type { NodeId } from "./wire";

/** A member's state as one node sees it. */
export type MemberState = "alive" | "suspect" | "dead" | "left";

/** A node's own statement about itself (alive, or a graceful leave), signed with its key. */
export interface SelfRecord {
  id: NodeId;
  name: string;
  addr: string;
  publicKey: string;
  /** Changes at every start and whenever the node drops replicated state: peers then resend it everything. */
  epoch: string;
  inc: number;
  state: "alive" | "left";
  sig: string;
}

/** A claim by anyone that a member is suspect or dead at an incarnation; only the member can refute it. */
export interface ClaimRecord {
  id: NodeId;
  publicKey: string;
  inc: number;
  state: "suspect" | "dead";
}

/** One membership update as it travels between nodes. */
export type MemberUpdate = SelfRecord | ClaimRecord;

const RANK: Record<MemberState, number> = { alive: 0, suspect: 1, dead: 2, left: 3 };
const MAX_NAME = 128;
const MAX_ADDR = 300;
const MAX_EPOCH = 64;
const MAX_KEY_B64 = 64;
const MAX_SIG_B64 = 128;

function selfPayload(r: Omit<SelfRecord, "sig">): Uint8Array {
  return new TextEncoder().encode(`mesh/member/v1\n${JSON.stringify([r.id, r.name, r.addr, r.publicKey, r.epoch, r.inc, r.state])}`);
}

/** Sign a node's statement about itself. */
export function signSelf(identity: Identity, r: Omit<SelfRecord, "sig" | "id" | "publicKey">): SelfRecord {
  const unsigned = {
    id: identity.id,
    publicKey: identity.publicKey,
    name: r.name,
    addr: r.addr,
    epoch: r.epoch,
    inc: r.inc,
    state: r.state,
  };
  return { ...unsigned, sig: identity.sign(selfPayload(unsigned)) };
}

/** Whether a self record is signed by the key it carries (the id is checked by `parseUpdate`). */
export function verifySelf(r: SelfRecord): boolean {
  return verifySignature(r.publicKey, selfPayload(r), r.sig);
}

/** Whether `u` is a node's own (signed) statement. */
export function isSelfRecord(u: MemberUpdate): u is SelfRecord {
  return u.state === "alive" || u.state === "left";
}

/** Why an update was refused before any state was touched. */
export type UpdateRefusal = "malformed" | "unsigned" | "id_mismatch";

/** Check the shape of an untrusted update; signatures are checked later, only when the update would change something. */
export function parseUpdate(v: unknown): { ok: true; value: MemberUpdate } | { ok: false; reason: UpdateRefusal } {
  if (!isObject(v) || !isNodeId(v.id) || !isStr(v.publicKey, MAX_KEY_B64) || !isCount(v.inc)) return { ok: false, reason: "malformed" };
  if (nodeIdOf(v.publicKey) !== v.id) return { ok: false, reason: "id_mismatch" };
  if (v.state === "suspect" || v.state === "dead")
    return { ok: true, value: { id: v.id, publicKey: v.publicKey, inc: v.inc, state: v.state } };
  if (v.state !== "alive" && v.state !== "left") return { ok: false, reason: "malformed" };
  if (!isStr(v.name, MAX_NAME) || !isStr(v.addr, MAX_ADDR) || !isStr(v.epoch, MAX_EPOCH)) return { ok: false, reason: "malformed" };
  if (!isStr(v.sig, MAX_SIG_B64)) return { ok: false, reason: "unsigned" };
  return {
    ok: true,
    value: { id: v.id, name: v.name, addr: v.addr, publicKey: v.publicKey, epoch: v.epoch, inc: v.inc, state: v.state, sig: v.sig },
  };
}

/** SWIM precedence: a higher incarnation wins; at equal incarnation alive < suspect < dead < left. */
export function overrides(next: { inc: number; state: MemberState }, cur: { inc: number; state: MemberState }): boolean {
  return next.inc > cur.inc || (next.inc === cur.inc && RANK[next.state] > RANK[cur.state]);
}
