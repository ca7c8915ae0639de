import { describe, expect, test } from "bun:test";
import {
  AUTH_HEADER,
  forwardProof,
  MeshAuthority,
  meshKeys,
  NonceStore,
  newNonce,
  proofsEqual,
  replyProof,
  requestProof,
} from "../../src/mesh/auth";

const SECRET = "correct horse battery staple, long enough";
const enc = new TextEncoder();

function clock() {
  const c = { t: 1_000_000, now: () => c.t };
  return c;
}

function authority(c = clock(), capacity = 64) {
  return new MeshAuthority(meshKeys(SECRET), { challengeCapacity: capacity, followUpCapacity: capacity, ttlMs: 30_000, now: c.now });
}

const CALLER_NONCE = "cccccccccccccccccccccc";

function signed(o: { nonce: string; secret?: string; body?: string; method?: string; path?: string; nodeId?: string; to?: string }) {
  const body = enc.encode(o.body ?? '{"type":"ping"}');
  const method = o.method ?? "POST";
  const path = o.path ?? "/mesh/rpc";
  const nodeId = o.nodeId ?? "a1b2c3";
  const callerNonce = CALLER_NONCE;
  const proof = requestProof(meshKeys(o.secret ?? SECRET), { nonce: o.nonce, callerNonce, to: o.to, method, path, body, nodeId });
  const headers = new Headers({
    [AUTH_HEADER.node]: nodeId,
    [AUTH_HEADER.nonce]: o.nonce,
    [AUTH_HEADER.callerNonce]: callerNonce,
    [AUTH_HEADER.proof]: proof,
  });
  if (o.to !== undefined) headers.set(AUTH_HEADER.to, o.to);
  return { method, path, headers, body };
}

/** `req` with header `name` set to `value` (or removed for null). */
function withHeader<T extends { headers: Headers }>(req: T, name: string, value: string | null): T {
  const headers = new Headers(req.headers);
  if (value === null) headers.delete(name);
  else headers.set(name, value);
  return { ...req, headers };
}

describe("mesh authentication", () => {
  test("a_correct_proof_passes_once", () => {
    const a = authority();
    const { nonce } = a.challenge();
    const req = signed({ nonce });
    expect(a.verify(req)).toEqual({ ok: true, nodeId: "a1b2c3", nonce, callerNonce: CALLER_NONCE, to: null });
    // Remembered as used (the only state a challenge ever costs), so it never verifies again.
    expect(a.sizes.challenges).toBe(1);
    expect(a.verify(req).ok).toBe(false);
  });

  test("replay_is_rejected", () => {
    const a = authority();
    const req = signed({ nonce: a.challenge().nonce });
    expect(a.verify(req).ok).toBe(true);
    expect(a.verify(req)).toEqual({ ok: false, code: "unknown_nonce" });
  });

  test("wrong_secret_is_rejected_and_leaves_the_nonce_usable", () => {
    const a = authority();
    const { nonce } = a.challenge();
    expect(a.verify(signed({ nonce, secret: "another mesh's secret, also long enough" }))).toEqual({ ok: false, code: "bad_proof" });
    // A failed attempt uses nothing up: an attacker who sees a nonce in flight cannot burn it.
    expect(a.sizes.challenges).toBe(0);
    expect(a.verify(signed({ nonce })).ok).toBe(true);
  });

  test("tampered_body_method_path_node_caller_nonce_or_target_is_rejected", () => {
    const a = authority();
    const { nonce } = a.challenge();
    const good = signed({ nonce, to: "d0d0" });
    const tampered = [
      { ...good, body: enc.encode('{"type":"ping","x":1}') },
      { ...good, method: "PUT" },
      { ...good, path: "/mesh/other" },
      withHeader(good, AUTH_HEADER.node, "someone-else"),
      withHeader(good, AUTH_HEADER.callerNonce, "dddddddddddddddddddddd"),
      // The target is part of what the caller signed: it can be neither changed nor dropped on the way.
      withHeader(good, AUTH_HEADER.to, "e0e0"),
      withHeader(good, AUTH_HEADER.to, null),
    ];
    for (const t of tampered) expect(a.verify(t)).toEqual({ ok: false, code: "bad_proof" });
    expect(a.verify(good).ok).toBe(true);
  });

  test("expired_challenge_is_rejected", () => {
    const c = clock();
    const a = authority(c);
    const { nonce } = a.challenge();
    c.t += 30_001;
    expect(a.verify(signed({ nonce }))).toEqual({ ok: false, code: "unknown_nonce" });
  });

  test("made_up_nonce_and_missing_or_malformed_headers_are_rejected", () => {
    const a = authority();
    expect(a.verify(signed({ nonce: "AAAAAAAAAAAAAAAAAAAAAA" }))).toEqual({ ok: false, code: "unknown_nonce" });
    expect(a.verify({ method: "POST", path: "/", headers: new Headers(), body: new Uint8Array() })).toEqual({ ok: false, code: "missing" });
    const bad = signed({ nonce: a.challenge().nonce });
    bad.headers.set(AUTH_HEADER.proof, "short");
    expect(a.verify(bad)).toEqual({ ok: false, code: "malformed" });
    bad.headers.set(AUTH_HEADER.node, "UPPER CASE");
    expect(a.verify(bad)).toEqual({ ok: false, code: "malformed" });
    const good = signed({ nonce: a.challenge().nonce });
    expect(a.verify(withHeader(good, AUTH_HEADER.callerNonce, null))).toEqual({ ok: false, code: "missing" });
    expect(a.verify(withHeader(good, AUTH_HEADER.callerNonce, "short"))).toEqual({ ok: false, code: "malformed" });
    expect(a.verify(withHeader(good, AUTH_HEADER.to, "Not A Node"))).toEqual({ ok: false, code: "malformed" });
    expect(a.verify(good).ok).toBe(true);
  });

  test("a_request_addressed_to_a_node_verifies_and_reports_its_target", () => {
    const a = authority();
    const { nonce } = a.challenge();
    expect(a.verify(signed({ nonce, to: "d0d0" }))).toEqual({ ok: true, nodeId: "a1b2c3", nonce, callerNonce: CALLER_NONCE, to: "d0d0" });
  });

  test("follow_up_nonces_authenticate_like_challenges", () => {
    const a = authority();
    const { nonce } = a.followUp();
    expect(a.verify(signed({ nonce })).ok).toBe(true);
    expect(a.verify(signed({ nonce })).ok).toBe(false);
  });

  test("challenge_flood_evicts_neither_follow_up_nonces_nor_an_outstanding_challenge_and_stores_nothing", () => {
    const a = authority(clock(), 16);
    const held = a.followUp().nonce;
    // A forwarder fetched this challenge; a stranger then asks for a flood of them before the forwarder signs.
    const early = a.challenge().nonce;
    for (let i = 0; i < 10_000; i++) a.challenge();
    expect(a.sizes.challenges).toBe(0);
    expect(a.verify(signed({ nonce: early })).ok).toBe(true);
    expect(a.verify(signed({ nonce: held })).ok).toBe(true);
  });

  test("a_challenge_made_up_or_from_another_process_is_refused", () => {
    const a = authority();
    const other = authority();
    expect(a.verify(signed({ nonce: other.challenge().nonce })).ok).toBe(false);
    const real = Buffer.from(a.challenge().nonce, "base64url");
    real[15] = (real[15] as number) ^ 1;
    expect(a.verify(signed({ nonce: real.toString("base64url") })).ok).toBe(false);
  });

  test("used_challenges_are_bounded_and_every_challenge_older_than_a_forgotten_one_is_refused", () => {
    const c = clock();
    const a = authority(c, 4);
    const old = a.challenge().nonce;
    c.t += 1;
    const used: string[] = [];
    for (let i = 0; i < 10; i++) {
      const req = signed({ nonce: a.challenge().nonce });
      c.t += 1;
      expect(a.verify(req).ok).toBe(true);
      used.push(req.headers.get(AUTH_HEADER.nonce) as string);
    }
    expect(a.sizes.challenges).toBe(4);
    // Forgotten ones are not replayable: everything issued up to the newest forgotten one is refused.
    for (const n of used) expect(a.verify(signed({ nonce: n })).ok).toBe(false);
    expect(a.verify(signed({ nonce: old })).ok).toBe(false);
    expect(a.verify(signed({ nonce: a.challenge().nonce })).ok).toBe(true);
  });

  test("reply_proof_binds_both_nonces_status_and_body", () => {
    const keys = meshKeys(SECRET);
    const body = enc.encode('{"type":"ack"}');
    const x = { nonce: "n1", callerNonce: "c1" };
    const p = replyProof(keys, { ...x, status: 200, body });
    expect(proofsEqual(p, replyProof(keys, { ...x, status: 200, body }))).toBe(true);
    expect(proofsEqual(p, replyProof(keys, { ...x, nonce: "n2", status: 200, body }))).toBe(false);
    expect(proofsEqual(p, replyProof(keys, { ...x, callerNonce: "c2", status: 200, body }))).toBe(false);
    expect(proofsEqual(p, replyProof(keys, { ...x, status: 500, body }))).toBe(false);
    expect(proofsEqual(p, replyProof(keys, { ...x, status: 200, body: enc.encode("{}") }))).toBe(false);
    // A request proof over the same fields never passes as a reply proof (separate keys).
    expect(proofsEqual(p, requestProof(keys, { ...x, method: "200", path: "", body, nodeId: "" }))).toBe(false);
  });

  test("a_recorded_reply_never_verifies_for_a_new_request_even_under_the_recorded_server_nonce", () => {
    // Whoever recorded an exchange can hand out its server nonce again as a challenge; the caller's fresh nonce still differs.
    const keys = meshKeys(SECRET);
    const body = enc.encode('{"type":"ack"}');
    const recorded = { nonce: "n1", callerNonce: newNonce() };
    const replay = { nonce: "n1", callerNonce: newNonce() };
    expect(replay.callerNonce).not.toBe(recorded.callerNonce);
    expect(proofsEqual(replyProof(keys, { ...recorded, status: 200, body }), replyProof(keys, { ...replay, status: 200, body }))).toBe(
      false,
    );
    expect(proofsEqual(forwardProof(keys, { ...recorded, status: 200 }), forwardProof(keys, { ...replay, status: 200 }))).toBe(false);
  });
});

describe("forward proof", () => {
  test("binds_both_nonces_and_status_under_the_mesh_secret", () => {
    const keys = meshKeys(SECRET);
    const x = { nonce: "n1", callerNonce: "c1" };
    const p = forwardProof(keys, { ...x, status: 200 });
    expect(proofsEqual(p, forwardProof(keys, { ...x, status: 200 }))).toBe(true);
    expect(proofsEqual(p, forwardProof(keys, { ...x, nonce: "n2", status: 200 }))).toBe(false);
    expect(proofsEqual(p, forwardProof(keys, { ...x, callerNonce: "c2", status: 200 }))).toBe(false);
    expect(proofsEqual(p, forwardProof(keys, { ...x, status: 400 }))).toBe(false);
    expect(proofsEqual(p, forwardProof(meshKeys("another mesh's secret, also long enough"), { ...x, status: 200 }))).toBe(false);
    // The server side signs with the same function.
    expect(proofsEqual(authority().forwardProof(x, 200), p)).toBe(true);
  });

  test("a_mesh_reply_proof_never_passes_as_a_forward_proof_nor_the_reverse", () => {
    const keys = meshKeys(SECRET);
    // Same key, same nonce and status: only the label (and the body hash) tell them apart.
    for (const status of [200, 400, 500]) {
      for (const body of [new Uint8Array(), enc.encode('{"type":"ack"}')]) {
        const x = { nonce: "n1", callerNonce: "c1" };
        const reply = replyProof(keys, { ...x, status, body });
        const forward = forwardProof(keys, { ...x, status });
        // What the forwarder compares a forward-proof header against, given a reply proof ...
        expect(proofsEqual(reply, forwardProof(keys, { ...x, status }))).toBe(false);
        // ... and what HttpTransport compares a reply-proof header against, given a forward proof.
        expect(proofsEqual(forward, replyProof(keys, { ...x, status, body }))).toBe(false);
      }
    }
    // They travel in different headers too.
    expect(AUTH_HEADER.forwardProof).not.toBe(AUTH_HEADER.replyProof);
  });
});

describe("nonce store", () => {
  test("is_bounded_when_pushed_past_capacity_and_evicts_the_oldest", () => {
    const c = clock();
    const s = new NonceStore({ capacity: 100, ttlMs: 1000, now: c.now });
    const first = s.issue();
    const issued = [first];
    for (let i = 0; i < 10_000; i++) issued.push(s.issue());
    expect(s.size).toBe(100);
    expect(s.has(first)).toBe(false);
    expect(s.has(issued[issued.length - 1] as string)).toBe(true);
  });

  test("forgets_expired_nonces_when_issuing", () => {
    const c = clock();
    const s = new NonceStore({ capacity: 100, ttlMs: 1000, now: c.now });
    for (let i = 0; i < 50; i++) s.issue();
    c.t += 1001;
    s.issue();
    expect(s.size).toBe(1);
  });

  test("take_is_one_time", () => {
    const s = new NonceStore({ capacity: 4, ttlMs: 1000, now: Date.now });
    const n = s.issue();
    expect(s.take(n)).toBe(true);
    expect(s.take(n)).toBe(false);
    expect(s.take("never-issued")).toBe(false);
  });
});

describe("review findings", () => {
  test("precheck_refuses_an_unknown_nonce_before_any_body_is_read_and_consumes_nothing", () => {
    const a = authority();
    const { nonce } = a.challenge();
    // A stranger's guess: refused on headers alone, so the gate never buffers its body.
    expect(a.precheck(signed({ nonce: "0".repeat(nonce.length) }).headers)).toBe("unknown_nonce");
    expect(a.precheck(new Headers())).toBe("missing");
    // A real nonce passes the precheck and stays usable for the full verification.
    const req = signed({ nonce });
    expect(a.precheck(req.headers)).toBeNull();
    expect(a.sizes.challenges).toBe(0);
    expect(a.verify(req).ok).toBe(true);
  });
});
