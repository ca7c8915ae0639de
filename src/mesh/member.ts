// Membership records: what a node says about itself and what another member
// claims about it (suspect, dead), each signed by the node that says it, with
// the SWIM precedence between them.
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

/** What a claim says: member `id` is suspect or dead at incarnation `inc`; only the member can refute it. */
export interface ClaimRecord {
  id: NodeId;
  publicKey: string;
  inc: number;
  state: "suspect" | "dead";
}

/** A claim as it travels: made by member `by` and signed with the key `by` is known by. */
export interface SignedClaim extends ClaimRecord {
  by: NodeId;
  sig: string;
}

/** One membership update as it travels between nodes. */
export type MemberUpdate = SelfRecord | SignedClaim;

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

// The subject's key is left out: the subject id already names it (the id is a hash of the key).
// Another domain than self records, so neither signature can pass for the other.
function claimPayload(c: { id: NodeId; inc: number; state: ClaimRecord["state"]; by: NodeId }): Uint8Array {
  return new TextEncoder().encode(`mesh/claim/v1\n${JSON.stringify([c.id, c.inc, c.state, c.by])}`);
}

/** Sign `claimer`'s claim about another member; the signature covers subject, incarnation, state and claimer. */
export function signClaim(claimer: Identity, c: ClaimRecord): SignedClaim {
  const unsigned = { id: c.id, publicKey: c.publicKey, inc: c.inc, state: c.state, by: claimer.id };
  return { ...unsigned, sig: claimer.sign(claimPayload(unsigned)) };
}

/**
 * Whether `c` is signed by `claimerKey`, the key its claimer is known by. Replaying a valid claim is
 * harmless: it says again what its claimer said, which is idempotent once applied and outranked once
 * the subject refutes at a higher incarnation; it cannot be moved to another subject, state or claimer.
 */
export function verifyClaim(c: SignedClaim, claimerKey: string): boolean {
  return nodeIdOf(claimerKey) === c.by && verifySignature(claimerKey, claimPayload(c), c.sig);
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
  if (v.state === "suspect" || v.state === "dead") {
    if (!isStr(v.sig, MAX_SIG_B64)) return { ok: false, reason: "unsigned" };
    if (!isNodeId(v.by)) return { ok: false, reason: "malformed" };
    return { ok: true, value: { id: v.id, publicKey: v.publicKey, inc: v.inc, state: v.state, by: v.by, sig: v.sig } };
  }
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
