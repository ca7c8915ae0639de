// A forwarded stream whose peer goes silent (a link cut without a reset delivers nothing, not even an error) or
// stops being alive mid-answer ends with an error event instead of hanging (found by the fault suite: tests/faults).
import { afterAll, describe, expect, test } from "bun:test";
import { silentLogger } from "../../src/log";
import { forwardProof, meshKeys } from "../../src/mesh/auth";
import { MeshClient } from "../../src/mesh/client";
import { Forwarder } from "../../src/server/forward";
import { ANY_NONCE, exchangeOf, TEST_SECRET, workerRecord } from "../helpers/mesh";

const FIRST = 'data: {"id":"x","object":"chat.completion.chunk","choices":[]}\n\n';
let cancelled = 0;
// Proven SSE answer: one event, then silence until the forwarder gives up.
const silent = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  idleTimeout: 0,
  fetch: (r) => {
    if (new URL(r.url).pathname === "/mesh/challenge") return Response.json({ nonce: ANY_NONCE, ttl_ms: 30000 });
    const proof = forwardProof(meshKeys(TEST_SECRET), { ...exchangeOf(r), status: 200 });
    let sent = false;
    const body = new ReadableStream<Uint8Array>({
      async pull(c) {
        if (sent) return new Promise(() => {});
        sent = true;
        c.enqueue(new TextEncoder().encode(FIRST));
      },
      cancel() {
        cancelled++;
      },
    });
    return new Response(body, { headers: { "content-type": "text/event-stream", "x-mesh-forward-proof": proof } });
  },
});
afterAll(() => silent.stop(true));

function forwarder(o: { streamIdleMs?: number; peerAlive?: () => boolean; failures?: string[] }): Forwarder {
  const keys = meshKeys(TEST_SECRET);
  return new Forwarder({
    client: new MeshClient({ keys, nodeId: "aaaa" }),
    keys,
    selfId: "aaaa",
    headersTimeoutMs: 60_000,
    streamIdleMs: o.streamIdleMs,
    peerAlive: o.peerAlive,
    logger: silentLogger,
    onPeerFailure: (id) => o.failures?.push(id),
  });
}

async function relayed(f: Forwarder): Promise<string> {
  const worker = workerRecord({ id: "w-silent", nodeId: "ssss", addr: `127.0.0.1:${silent.port}` });
  const r = await f.forward([worker], "mesh-tiny", "/v1/chat/completions", new TextEncoder().encode("{}"), new AbortController().signal);
  if (!r) throw new Error("the forwarder asked to run it here");
  return await r.response.text();
}

describe("a forwarded stream that stalls", () => {
  test("a_peer_silent_past_the_idle_bound_ends_the_stream_with_an_error_event_not_a_hang", async () => {
    const failures: string[] = [];
    const f = forwarder({ streamIdleMs: 300, failures });
    const text = await relayed(f);
    expect(text).toStartWith(FIRST);
    expect(text).toContain("upstream_failed");
    expect(text).not.toContain("[DONE]");
    expect(failures).toEqual(["w-silent"]);
    expect(f.stats().active).toBe(0);
  });

  test("a_peer_that_stops_being_alive_mid_answer_ends_the_stream_with_an_error_event", async () => {
    let alive = true;
    const f = forwarder({ peerAlive: () => alive });
    setTimeout(() => {
      alive = false;
    }, 200);
    const text = await relayed(f);
    expect(text).toContain("upstream_failed");
    expect(f.stats().active).toBe(0);
    // The upstream request was given up, not left open.
    await Bun.sleep(100);
    expect(cancelled).toBeGreaterThanOrEqual(1);
  });
});
