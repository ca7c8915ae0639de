// What a holder sends is never taken on its word: a chunk longer or shorter
// than asked for is refused without buffering past the chunk's length.
import { describe, expect, test } from "bun:test";
import { meshFetcher } from "../../../src/hydration/files/fetcher";
import { meshKeys } from "../../../src/mesh/auth";
import { MeshClient } from "../../../src/mesh/client";

/** A client whose "network" answers every chunk request with `body`, and counts the bytes it was made to produce. */
function clientSending(body: () => Uint8Array | ReadableStream<Uint8Array>): MeshClient {
  const fakeFetch = (async (url: string | URL | Request) => {
    const u = String(url);
    if (u.endsWith("/mesh/challenge")) return Response.json({ nonce: "n".repeat(22), ttl_ms: 1000 });
    return new Response(body(), { status: 200 });
  }) as typeof fetch;
  return new MeshClient({ keys: meshKeys("s".repeat(40)), nodeId: "cli-test", fetch: fakeFetch });
}

const src = { id: "a".repeat(32), addr: "127.0.0.1:1", name: "a" };

describe("meshFetcher", () => {
  test("takes_a_chunk_of_exactly_the_asked_length", async () => {
    const f = meshFetcher(clientSending(() => new Uint8Array(100).fill(1)));
    expect((await f.chunk(src, "h", 0, 100, AbortSignal.timeout(5000))).byteLength).toBe(100);
  });

  test("refuses_a_short_chunk", async () => {
    const f = meshFetcher(clientSending(() => new Uint8Array(99)));
    await expect(f.chunk(src, "h", 0, 100, AbortSignal.timeout(5000))).rejects.toThrow("sent 99 of chunk 0's 100 bytes");
  });

  test("stops_reading_an_endless_chunk_past_its_length", async () => {
    let produced = 0;
    const endless = () =>
      new ReadableStream<Uint8Array>({
        pull(c) {
          produced += 64 * 1024;
          c.enqueue(new Uint8Array(64 * 1024));
        },
      });
    const f = meshFetcher(clientSending(endless));
    await expect(f.chunk(src, "h", 0, 100_000, AbortSignal.timeout(5000))).rejects.toThrow("more than 100000 bytes");
    expect(produced).toBeLessThan(1024 * 1024);
  });
});
