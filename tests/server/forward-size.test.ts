// A 413 from a peer cannot be proven (a gate refuses an oversized body before it
// can check who sent it), so the forwarder must neither trust it as final nor let
// whatever answers 413 to everything keep receiving prompts.
import { afterAll, describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import { AUTH_HEADER, forwardProof, meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { Forwarder } from "../../src/server/forward";
import { ANY_NONCE, closedPort, exchangeOf, TEST_SECRET, workerRecord } from "../helpers/mesh";

const closeAfter: Array<() => unknown> = [];
afterAll(async () => {
  for (const c of closeAfter) await c();
});
const keys = meshKeys(TEST_SECRET);

/** A server at a worker address answering `status`, with a valid forward proof when `proven` (it holds the secret). */
function peer(status: number, proven: boolean) {
  let seen = 0;
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: async (r) => {
      if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: ANY_NONCE, ttl_ms: 30000 });
      await r.text();
      seen++;
      const headers: Record<string, string> = proven
        ? { [AUTH_HEADER.forwardProof]: forwardProof(keys, { ...exchangeOf(r), status }) }
        : {};
      return Response.json({ error: { message: `status ${status}` } }, { status, headers });
    },
  });
  closeAfter.push(() => server.stop(true));
  return { addr: `127.0.0.1:${server.port}`, seen: () => seen };
}

// The order routing would give: each test lists its workers best first.
const orderOf = new WeakMap<Forwarder, ReturnType<typeof workerRecord>[]>();

function forwarder(workers: ReturnType<typeof workerRecord>[]) {
  const f = new Forwarder({
    client: new MeshClient({ keys, nodeId: "aaaa" }),
    keys,
    selfId: "aaaa",
    headersTimeoutMs: 10_000,
    logger: silentLogger,
  });
  orderOf.set(f, workers);
  return f;
}

const body = new TextEncoder().encode(JSON.stringify({ model: "mesh-tiny", messages: [{ role: "user", content: "hi" }] }));

/** The status the client gets, or the forward error's code. */
async function outcome(f: Forwarder, b: Uint8Array = body): Promise<number | string> {
  try {
    const r = await f.forward(orderOf.get(f) ?? [], "mesh-tiny", "/v1/chat/completions", b, new AbortController().signal);
    if (!r) return "ran_here";
    await r.response.arrayBuffer();
    return r.response.status;
  } catch (e) {
    return (e as { code?: string }).code ?? String(e);
  }
}

describe("an unprovable 413 from a peer", () => {
  test("a_413_first_and_an_unreachable_second_is_upstream_failed_not_413", async () => {
    const fake = peer(413, false);
    const f = forwarder([
      workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr }),
      workerRecord({ id: "w-down", nodeId: "dddd", addr: `127.0.0.1:${await closedPort()}`, slotsBusy: 1 }),
    ]);
    expect(await outcome(f)).toBe("upstream_failed");
  });

  test("a_proven_503_then_an_unproven_413_is_not_turned_into_a_413", async () => {
    const busy = peer(503, true);
    const fake = peer(413, false);
    const f = forwarder([
      workerRecord({ id: "w-busy", nodeId: "bbbb", addr: busy.addr }),
      workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr, slotsBusy: 1 }),
    ]);
    expect(await outcome(f)).toBe("upstream_failed");
  });

  test("only_when_every_node_refused_the_size_is_it_a_413", async () => {
    const f = forwarder([
      workerRecord({ id: "w-small1", nodeId: "1111", addr: peer(413, false).addr }),
      workerRecord({ id: "w-small2", nodeId: "2222", addr: peer(413, false).addr, slotsBusy: 1 }),
    ]);
    expect(await outcome(f)).toBe(413);
    // Both refused this size lately: the next body as large is answered here, without sending it anywhere.
    expect(await outcome(f)).toBe(413);
  });

  test("whatever_answers_413_to_everything_gets_one_prompt_of_a_size_not_every_prompt", async () => {
    const fake = peer(413, false);
    const good = peer(200, true);
    const f = forwarder([
      workerRecord({ id: "w-fake", nodeId: "ffff", addr: fake.addr }),
      workerRecord({ id: "w-good", nodeId: "bbbb", addr: good.addr, slotsBusy: 1 }),
    ]);
    for (let i = 0; i < 5; i++) expect(await outcome(f)).toBe(200);
    expect(fake.seen()).toBe(1);
    expect(good.seen()).toBe(5);
    // A smaller body may still fit a node whose limit is only smaller: it is tried again.
    expect(await outcome(f, body.subarray(0, body.length - 8))).toBe(200);
    expect(fake.seen()).toBe(2);
  });
});
