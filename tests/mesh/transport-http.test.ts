import { afterAll, describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import { AUTH_HEADER, meshKeys, newNonce, proofsEqual, replyProof, requestProof } from "../../src/mesh/auth";
import { MeshClient, type MeshClientError } from "../../src/mesh/client";
import { generateIdentity } from "../../src/mesh/identity";
import { signSelf } from "../../src/mesh/member";
import { MeshCore } from "../../src/mesh/node";
import { HttpTransport } from "../../src/mesh/transport-http";
import type { Clock, WireMessage } from "../../src/mesh/wire";
import { type RunningServer, startServer } from "../../src/server";
import { challengingServer, TEST_MESH_ID, TEST_SECRET, testMeshHooks } from "../helpers/mesh";

const SECRET = TEST_SECRET;
const MESH_ID = TEST_MESH_ID;

/** A node with mesh routes and no model; its handler records what it was sent. */
function node(o: { handle?: (m: WireMessage) => Promise<WireMessage>; ttlMs?: number; nodeId?: string } = {}) {
  const seen: WireMessage[] = [];
  const senders: string[] = [];
  const mesh = testMeshHooks({
    nodeId: o.nodeId ?? "aaaa",
    apiKeyRequired: true,
    ttlMs: o.ttlMs,
    handle: async (m, from) => {
      seen.push(m);
      senders.push(from);
      return o.handle ? o.handle(m) : { type: "ack", echo: m };
    },
  });
  const server = startServer({
    host: "127.0.0.1",
    port: 0,
    models: [],
    apiKeys: ["inference-key"],
    maxBodyBytes: 4 * 1024 * 1024,
    logger: silentLogger,
    mesh,
  });
  servers.push(server);
  return { server, seen, senders, gate: mesh.gate, addr: `127.0.0.1:${server.port}` };
}

const servers: RunningServer[] = [];
afterAll(async () => {
  for (const s of servers) await s.close();
});

function countingFetch() {
  const calls: string[] = [];
  const f = ((input: string | URL | Request, init?: RequestInit) => {
    calls.push(new URL(String(input)).pathname);
    return fetch(input, init);
  }) as typeof fetch;
  return { calls, f };
}

function transport(secret = SECRET, f?: typeof fetch) {
  const keys = meshKeys(secret);
  return new HttpTransport(new MeshClient({ keys, nodeId: "bbbb", fetch: f }), keys);
}

async function rejection(p: Promise<unknown>): Promise<MeshClientError> {
  try {
    await p;
  } catch (e) {
    return e as MeshClientError;
  }
  throw new Error("expected a rejection");
}

describe("HTTP transport", () => {
  test("delivers_a_message_and_returns_the_reply", async () => {
    const n = node();
    const reply = await transport().request(n.addr, { type: "ping", seq: 1 }, 30_000);
    expect(reply).toEqual({ type: "ack", echo: { type: "ping", seq: 1 } });
    expect(n.seen).toEqual([{ type: "ping", seq: 1 }]);
  });

  test("the_handler_is_told_the_authenticated_sender_not_the_id_in_the_body", async () => {
    const n = node();
    await transport().request(n.addr, { type: "kv-sync", id: "cccc" }, 2000);
    // The transport authenticated "bbbb"; what the body claims is the core's to check against it.
    expect(n.senders).toEqual(["bbbb"]);
  });

  test("asks_for_a_challenge_once_then_uses_the_nonces_replies_hand_out", async () => {
    const n = node();
    const { calls, f } = countingFetch();
    const t = transport(SECRET, f);
    for (let i = 0; i < 5; i++) await t.request(n.addr, { type: "ping", i }, 30_000);
    expect(calls.filter((p) => p === "/mesh/challenge").length).toBe(1);
    expect(calls.filter((p) => p === "/mesh/rpc").length).toBe(5);
  });

  test("wrong_secret_is_refused_and_the_node_sees_nothing", async () => {
    const n = node();
    const e = await rejection(transport("somebody else's secret, long enough to pass").request(n.addr, { type: "join" }, 30_000));
    expect(e.code).toBe("unauthorized");
    expect(n.seen).toEqual([]);
    // The refusal says nothing about the mesh.
    const res = await fetch(`http://${n.addr}/mesh/rpc`, { method: "POST", body: "{}", headers: { "x-mesh-proof": "x" } });
    const text = await res.text();
    expect(res.status).toBe(401);
    expect(text).not.toContain(MESH_ID);
    expect(text).not.toContain("aaaa");
  });

  test("mesh_routes_without_credentials_are_401_and_change_nothing", async () => {
    const n = node();
    for (const [method, path] of [
      ["POST", "/mesh/rpc"],
      ["GET", "/mesh/info"],
      ["GET", "/api/peers"],
      ["POST", "/mesh/anything"],
    ] as const) {
      const res = await fetch(`http://${n.addr}${path}`, { method, body: method === "POST" ? '{"type":"join"}' : undefined });
      expect(res.status).toBe(401);
      expect(await res.text()).not.toContain(MESH_ID);
    }
    expect(n.seen).toEqual([]);
  });

  test("a_replayed_request_is_refused", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    const captured: Array<{ url: string; init: RequestInit }> = [];
    const spy = ((input: string, init: RequestInit) => {
      if (input.endsWith("/mesh/rpc")) captured.push({ url: input, init });
      return fetch(input, init);
    }) as typeof fetch;
    await new HttpTransport(new MeshClient({ keys, nodeId: "bbbb", fetch: spy }), keys).request(n.addr, { type: "once" }, 30_000);
    const replay = captured[0] as { url: string; init: RequestInit };
    const res = await fetch(replay.url, { ...replay.init, signal: undefined });
    expect(res.status).toBe(401);
    expect(n.seen.length).toBe(1);
  });

  test("a_pooled_nonce_the_peer_forgot_is_replaced_by_a_fresh_challenge", async () => {
    const n = node({ ttlMs: 300 });
    const { calls, f } = countingFetch();
    const keys = meshKeys(SECRET);
    // The client trusts pooled nonces for far longer than the peer keeps them.
    const client = new MeshClient({ keys, nodeId: "bbbb", fetch: f, now: () => 0 });
    const t = new HttpTransport(client, keys);
    await t.request(n.addr, { type: "one" }, 30_000);
    expect(client.pooled(n.addr)).toBe(1);
    await Bun.sleep(600);
    expect(await t.request(n.addr, { type: "two" }, 30_000)).toMatchObject({ type: "ack" });
    expect(calls).toEqual(["/mesh/challenge", "/mesh/rpc", "/mesh/rpc", "/mesh/challenge", "/mesh/rpc"]);
    expect(n.seen.map((m) => m.type)).toEqual(["one", "two"]);
  });

  test("a_reply_without_the_peers_proof_is_rejected", async () => {
    // Something on the path that answers like a mesh node but does not hold the secret.
    const fake = challengingServer(() => Response.json({ type: "ack", members: ["forged"] }));
    try {
      const e = await rejection(transport().request(`127.0.0.1:${fake.port}`, { type: "ping" }, 30_000));
      expect(e.code).toBe("bad_reply");
    } finally {
      fake.stop(true);
    }
  });

  test("a_message_over_the_size_limit_is_refused_before_the_handler", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    // A client allowing itself bigger messages than the server does.
    const t = new HttpTransport(new MeshClient({ keys, nodeId: "bbbb" }), keys, 8 * 1024 * 1024);
    const e = await rejection(t.request(n.addr, { type: "big", pad: "x".repeat(2 * 1024 * 1024) }, 60_000));
    expect(e.code).toBe("bad_reply");
    expect(e.message).toContain("413");
    expect(n.seen).toEqual([]);
  });

  test("a_reply_over_the_size_limit_is_refused_without_buffering_it", async () => {
    const n = node({ handle: async () => ({ type: "ack", pad: "x".repeat(64 * 1024) }) });
    const keys = meshKeys(SECRET);
    const t = new HttpTransport(new MeshClient({ keys, nodeId: "bbbb" }), keys, 16 * 1024);
    const e = await rejection(t.request(n.addr, { type: "ping" }, 30_000));
    expect(e.code).toBe("bad_reply");
    expect(e.message).toContain("over");
  });

  test("a_peer_that_does_not_answer_in_time_is_a_timeout", async () => {
    const n = node({ handle: () => new Promise(() => {}) });
    const e = await rejection(transport().request(n.addr, { type: "slow" }, 300));
    expect(e.code).toBe("timeout");
  });

  test("an_unreachable_peer_is_unreachable", async () => {
    const probe = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = probe.port;
    probe.stop(true);
    const e = await rejection(transport().request(`127.0.0.1:${port}`, { type: "ping" }, 30_000));
    expect(e.code).toBe("unreachable");
  });

  test("mesh_credentials_open_the_admin_view_without_the_api_key", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    const client = new MeshClient({ keys, nodeId: "cli-test" });
    const { response } = await client.send(n.addr, "GET", "/api/peers", new Uint8Array());
    expect(response.status).toBe(200);
    expect(await response.json()).toMatchObject({ mesh_id: MESH_ID });
    const withKey = await fetch(`http://${n.addr}/api/peers`, { headers: { authorization: "Bearer inference-key" } });
    expect(withKey.status).toBe(200);
    const without = await fetch(`http://${n.addr}/api/peers`);
    expect(without.status).toBe(401);
  });
});

describe("a message is for one node and one reply", () => {
  test("a_message_addressed_to_the_node_there_is_delivered_and_one_for_another_node_is_refused", async () => {
    const n = node();
    const t = transport();
    expect(await t.request(n.addr, { type: "ping", n: 1 }, 30_000, "aaaa")).toMatchObject({ type: "ack" });
    const e = await rejection(t.request(n.addr, { type: "ping", n: 2 }, 30_000, "ffff"));
    expect(e.code).toBe("unauthorized");
    expect(n.seen).toEqual([{ type: "ping", n: 1 }]);
  });

  test("a_request_addressed_to_another_node_is_refused_and_leaves_its_nonce_usable", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    const { nonce } = (await (await fetch(`http://${n.addr}/mesh/challenge`)).json()) as { nonce: string };
    const body = new TextEncoder().encode('{"type":"ping"}');
    const post = (to: string) => {
      const callerNonce = newNonce();
      const proof = requestProof(keys, { nonce, callerNonce, to, method: "POST", path: "/mesh/rpc", body, nodeId: "bbbb" });
      return fetch(`http://${n.addr}/mesh/rpc`, {
        method: "POST",
        body,
        headers: {
          [AUTH_HEADER.node]: "bbbb",
          [AUTH_HEADER.nonce]: nonce,
          [AUTH_HEADER.callerNonce]: callerNonce,
          [AUTH_HEADER.to]: to,
          [AUTH_HEADER.proof]: proof,
        },
      });
    };
    // Correctly signed by a member, but for another node (passed on by whatever took that node's address).
    const refused = await post("ffff");
    expect(refused.status).toBe(401);
    expect(refused.headers.has(AUTH_HEADER.replyProof)).toBe(false);
    expect(n.seen).toEqual([]);
    // The refusal used nothing up: the same nonce still opens the door for a request meant for this node.
    const accepted = await post("aaaa");
    expect(accepted.status).toBe(200);
    expect(n.seen).toEqual([{ type: "ping" }]);
  });

  test("a_recorded_reply_replayed_under_its_recorded_nonce_is_rejected", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    // One genuine exchange, as anyone on the network could record it (traffic is not encrypted).
    const tape: { nonce?: string; body?: string; proof?: string } = {};
    const sniff = (async (input: string | URL | Request, init?: RequestInit) => {
      const r = await fetch(input, init);
      const nonce = new Headers(init?.headers).get(AUTH_HEADER.nonce);
      if (nonce && String(input).endsWith("/mesh/rpc")) {
        Object.assign(tape, { nonce, body: await r.clone().text(), proof: r.headers.get(AUTH_HEADER.replyProof) ?? "" });
      }
      return r;
    }) as typeof fetch;
    const first = await new HttpTransport(new MeshClient({ keys, nodeId: "cccc", fetch: sniff }), keys).request(
      n.addr,
      { type: "ping" },
      30_000,
    );
    expect(first).toMatchObject({ type: "ack" });
    expect(tape.proof).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // The node is gone; something without the secret hands out the recorded nonce and sends back the recorded reply.
    const replayer = challengingServer(
      () => new Response(tape.body, { headers: { "content-type": "application/json", [AUTH_HEADER.replyProof]: tape.proof as string } }),
      tape.nonce,
    );
    try {
      const e = await rejection(transport().request(`127.0.0.1:${replayer.port}`, { type: "ping" }, 30_000));
      expect(e.code).toBe("bad_reply");
      expect(e.message).toContain("without a valid mesh proof");
    } finally {
      replayer.stop(true);
    }
  });

  test("a_reply_proof_is_bound_to_the_requests_own_caller_nonce", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    const { response, nonce, callerNonce } = await new MeshClient({ keys, nodeId: "bbbb" }).send(
      n.addr,
      "POST",
      "/mesh/rpc",
      new TextEncoder().encode('{"type":"ping"}'),
      { to: "aaaa" },
    );
    const body = new Uint8Array(await response.arrayBuffer());
    const proof = response.headers.get(AUTH_HEADER.replyProof) ?? "";
    expect(proofsEqual(proof, replyProof(keys, { nonce, callerNonce, status: 200, body }))).toBe(true);
    expect(proofsEqual(proof, replyProof(keys, { nonce, callerNonce: newNonce(), status: 200, body }))).toBe(false);
  });
});

const wallClock: Clock = {
  now: () => Date.now(),
  setTimer: (fn, ms) => setTimeout(fn, ms),
  clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

describe("membership names the member it means", () => {
  test("a_leave_sent_over_http_reaches_the_member_at_an_address_and_is_refused_for_another_member_listed_there", async () => {
    const host = generateIdentity();
    // A stale record of another member that gave the same address (it is gone; the host took its port).
    const gone = generateIdentity();
    let addr = "";
    const n = node({
      nodeId: host.id,
      handle: async (m) =>
        m.type === "join"
          ? {
              type: "join-ack",
              from: signSelf(host, { name: "host", addr, epoch: "e1", inc: 0, state: "alive" }),
              members: [signSelf(gone, { name: "gone", addr, epoch: "e2", inc: 0, state: "alive" })],
            }
          : { type: "ack", from: signSelf(host, { name: "host", addr, epoch: "e1", inc: 0, state: "alive" }), updates: [] },
    });
    addr = n.addr;
    const me = generateIdentity();
    const keys = meshKeys(SECRET);
    const core = new MeshCore({
      identity: me,
      self: { name: "me", addr: "127.0.0.1:1" },
      transport: new HttpTransport(new MeshClient({ keys, nodeId: me.id }), keys),
      clock: wallClock,
    });
    // A join goes to a bare address: it names nobody, and whichever node is there answers.
    expect(await core.join([addr])).toMatchObject({ ok: true });
    expect(core.members().map((m) => m.id)).toEqual([me.id, host.id, gone.id]);
    const refusedBefore = n.gate.refused;
    await core.leave();
    // Both members were told, at the same address: the host took its own leave and its gate refused the other's.
    expect(n.seen.map((m) => m.type)).toEqual(["join", "leave"]);
    expect(n.senders).toEqual([me.id, me.id]);
    expect(n.gate.refused).toBe(refusedBefore + 1);
  });
});

describe("mesh client bounds", () => {
  test("keeps_nonces_for_a_bounded_number_of_peers", async () => {
    const n = node();
    const keys = meshKeys(SECRET);
    const client = new MeshClient({ keys, nodeId: "bbbb", maxPeers: 2, poolSize: 3 });
    const t = new HttpTransport(client, keys);
    for (let i = 0; i < 6; i++) await t.request(n.addr, { type: "ping" }, 30_000);
    expect(client.pooled(n.addr)).toBeLessThanOrEqual(3);
    // Same node under three names: only the two most recently used are remembered.
    for (const host of ["127.0.0.1", "localhost", "127.0.0.1"]) await t.request(`${host}:${n.server.port}`, { type: "ping" }, 30_000);
    expect(client.peers).toBeLessThanOrEqual(2);
  });
});
