// drive() with several entry points (the nodes of a mesh): each request goes
// to the endpoint its entry function picks, the record keeps that entry and the
// x-mesh-served-by / x-mesh-route the answer carried, and follow-ups wait the
// tool pause. Real HTTP servers on 127.0.0.1 stand in for the nodes.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { drive } from "../../src/bench/drive";
import { buildWorkload } from "../../src/bench/workload";

const servers: Array<ReturnType<typeof Bun.serve>> = [];
const hits = [0, 0, 0];

beforeAll(() => {
  for (let i = 0; i < 3; i++) {
    servers.push(
      Bun.serve({
        hostname: "127.0.0.1",
        port: 0,
        async fetch(req) {
          if (new URL(req.url).pathname === "/metrics") return new Response("mesh_requests_total 1\n");
          await req.text();
          hits[i] = (hits[i] ?? 0) + 1;
          // Node i hands every request to node (i + 1) % 3, as a router sending work to a peer would.
          const usage = { prompt_tokens: 100, completion_tokens: 2, prompt_tokens_details: { cached_tokens: 10 * i } };
          return Response.json(
            { choices: [{ message: { content: "x" } }], usage },
            { headers: { "x-mesh-served-by": `node-${(i + 1) % 3}`, "x-mesh-route": "cache" } },
          );
        },
      }),
    );
  }
});

afterAll(() => {
  for (const s of servers) s.stop(true);
});

describe("drive with entry points", () => {
  test("each_request_enters_where_the_entry_function_says_and_records_who_served_it", async () => {
    const w = buildWorkload({
      seed: 5,
      loops: 2,
      turns: 2,
      systemTokens: 20,
      toolResultTokens: 10,
      userTokens: 4,
      maxTokens: 2,
      staggerMs: 0,
    });
    const urls = servers.map((s) => `http://127.0.0.1:${s.port}`);
    hits.fill(0);
    let before = 0;
    const d = await drive(w, {
      name: "mesh",
      endpoint: { url: urls[0] as string },
      model: "m",
      maxRetries: 0,
      maxRetryWaitS: 1,
      requestTimeoutMs: 30_000,
      sampleIntervalMs: 50,
      maxSamples: 100,
      progressIntervalMs: 60_000,
      onProgress: () => {},
      // Turn k of loop l enters at node (l + k) % 3; the repeat at node 2.
      entry: (loop, turn, kind) => {
        const index = kind === "repeat" ? 2 : (loop + turn) % 3;
        return { index, endpoint: { url: urls[index] as string } };
      },
      toolMs: 30,
      beforeLoops: async () => {
        before = hits.reduce((a, b) => a + b, 0);
      },
    });
    // The warm-up went to `endpoint` (node 0) before beforeLoops ran.
    expect(before).toBe(1);
    expect(d.records).toHaveLength(6);
    for (const r of d.records) {
      const entry = r.kind === "repeat" ? 2 : (r.loop + r.turn) % 3;
      expect(r.entry).toBe(entry);
      expect(r.servedBy).toBe(`node-${(entry + 1) % 3}`);
      expect(r.route).toBe("cache");
      expect(r.usage?.cachedTokens).toBe(10 * entry);
    }
    // loop 0: 0, 1, repeat 2; loop 1: 1, 2, repeat 2; plus the warm-up at 0.
    expect(hits).toEqual([2, 2, 3]);
    // Follow-ups waited the tool pause after the previous answer.
    for (const loop of [0, 1]) {
      const mine = d.records.filter((r) => r.loop === loop).sort((a, b) => a.startMs - b.startMs);
      for (let i = 1; i < mine.length; i++) expect((mine[i]?.startMs ?? 0) - (mine[i - 1]?.endMs ?? 0)).toBeGreaterThanOrEqual(29);
    }
  });
});
