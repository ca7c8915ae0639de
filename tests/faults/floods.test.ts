// Two `mesh serve` processes behind the fault proxy: a forwarded stream cut
// mid-answer, a stranger flooding the mesh routes, and a client flood.
// Bounds: a cut peer is declared dead within failureDetectionBoundMs(2) (11 s),
// after which the forwarder ends the stream; memory growth under a flood is
// bounded by 64 MiB of RSS (the nonce stores, key caches and queues are all
// bounded far below that; a leak per request would pass it).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { connect } from "node:net";
import OpenAI from "openai";
import { failureDetectionBoundMs } from "../../src/mesh/membership";
import { modelsOf, type NodeProc, peersOf, waitFor } from "../helpers/cluster";
import { deathsOf, type FaultMesh, startFaultMesh } from "../helpers/fault-mesh";

const SLACK_MS = 20_000;
const RSS_GROWTH_BOUND = 64 * 1024 * 1024;
const QUEUE = 4;
const SLOTS = 2;

let mesh: FaultMesh;
let a: NodeProc;
let b: NodeProc;

function client(n: NodeProc): OpenAI {
  return new OpenAI({ baseURL: `${n.url}/v1`, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
}

/** Resident memory of a node's process, in bytes. */
async function rssOf(n: NodeProc): Promise<number> {
  const status = await Bun.file(`/proc/${n.proc.pid}/status`).text();
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
}

// Each node lists the other's model.
function formed(): Promise<boolean> {
  return waitFor(
    "a and b to see each other's models",
    60_000 + SLACK_MS,
    async () => (await modelsOf(a)).has("beta") && (await modelsOf(b)).has("alpha"),
    250,
  );
}

beforeAll(async () => {
  mesh = await startFaultMesh([
    { name: "a", model: "alpha", args: ["--queue-capacity", String(QUEUE)] },
    { name: "b", model: "beta" },
  ]);
  [a, b] = [mesh.node("a"), mesh.node("b")];
  await formed();
});

afterAll(async () => {
  await mesh?.stop();
});

describe("faults at the edges of a node", () => {
  test("a_forwarded_stream_whose_link_is_cut_mid_answer_ends_with_an_error_event_within_the_detection_bound", async () => {
    // b's answers to a pass 1500 bytes, then the b -> a link goes silent (no reset, nothing).
    mesh.proxy.set("b", "a", { cutAfterBytes: 1500 });
    const t0 = Date.now();
    const res = await fetch(`${a.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "beta",
        messages: [{ role: "user", content: "Tell a long story." }],
        stream: true,
        max_tokens: 1500,
        ignore_eos: true,
      }),
    });
    expect(res.status).toBe(200);
    const text = await res.text();
    const took = Date.now() - t0;
    expect(text).toContain("chat.completion.chunk");
    expect(text).toContain("upstream_failed");
    expect(text).not.toContain("[DONE]");
    expect(took).toBeLessThan(failureDetectionBoundMs(2) + SLACK_MS);
    mesh.proxy.heal();
    await formed();
  }, 180_000);

  test("a_strangers_flood_of_challenges_and_unauthenticated_mesh_calls_leaves_forwards_and_probes_working_and_memory_bounded", async () => {
    const before = await deathsOf([a, b]);
    const rss0 = await rssOf(a);
    const failedBefore = (await peersOf(b))?.forwarding.failed ?? 0;
    let stop = false;
    let sent = 0;
    // A stranger (no secret) at full speed: challenges, and made-up signed calls to /mesh/rpc.
    const flood = async () => {
      while (!stop) {
        sent++;
        await fetch(`${a.url}/mesh/challenge`)
          .then((r) => r.arrayBuffer())
          .catch(() => {});
        await fetch(`${a.url}/mesh/rpc`, {
          method: "POST",
          headers: {
            "x-mesh-node": "stranger",
            "x-mesh-nonce": "A".repeat(22),
            "x-mesh-caller-nonce": "B".repeat(22),
            "x-mesh-proof": "C".repeat(43),
          },
          body: "x".repeat(1024),
        })
          .then((r) => r.arrayBuffer())
          .catch(() => {});
      }
    };
    const flooders = Array.from({ length: 16 }, flood);
    // Meanwhile honest traffic: b forwards alpha requests to a, and the two keep probing each other.
    const answers: Array<string | null> = [];
    for (let i = 0; i < 6; i++) {
      const r = await client(b).chat.completions.create({
        model: "alpha",
        messages: [{ role: "user", content: `hi ${i}` }],
        max_tokens: 4,
      });
      answers.push(r.choices[0]?.finish_reason ?? null);
    }
    await Bun.sleep(5_000);
    stop = true;
    await Promise.all(flooders);
    expect(sent).toBeGreaterThan(100);
    expect(answers.every((x) => x !== null)).toBe(true);
    expect(await deathsOf([a, b])).toBe(before);
    expect((await peersOf(b))?.forwarding.failed ?? 0).toBe(failedBefore);
    expect((await rssOf(a)) - rss0).toBeLessThan(RSS_GROWTH_BOUND);
  }, 180_000);

  test("a_client_flood_gets_every_admitted_request_answered_or_a_clean_429_and_memory_stays_bounded", async () => {
    const rss0 = await rssOf(a);
    const port = a.port;
    // Clients that send headers and stall, and clients that disconnect mid-body.
    const stalled = Array.from({ length: 16 }, () => {
      const s = connect(port, "127.0.0.1");
      s.on("error", () => {});
      s.write(
        `POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"model":`,
      );
      return s;
    });
    for (let i = 0; i < 16; i++) {
      const s = connect(port, "127.0.0.1");
      s.on("error", () => {});
      s.write(
        `POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"model":"alpha","mes`,
      );
      setTimeout(() => s.destroy(), 50);
    }
    // Far more requests than slots plus queue, half of them streams read slowly.
    const N = 8 * (SLOTS + QUEUE);
    const outcomes = await Promise.all(
      Array.from({ length: N }, async (_, i) => {
        const stream = i % 2 === 0;
        const res = await fetch(`${a.url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: "alpha", messages: [{ role: "user", content: `flood ${i}` }], max_tokens: 16, stream }),
        });
        if (res.status === 429) {
          const body = (await res.json()) as { error?: { type?: string } };
          return body.error?.type ? "429" : "bad 429";
        }
        if (res.status !== 200) return `status ${res.status}`;
        if (!stream) {
          const body = (await res.json()) as { choices?: Array<{ finish_reason?: string }> };
          return body.choices?.[0]?.finish_reason ? "ok" : "unfinished";
        }
        // A slow reader: one chunk at a time, with pauses.
        const reader = (res.body as ReadableStream<Uint8Array>).getReader();
        let text = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          text += new TextDecoder().decode(value);
          await Bun.sleep(20);
        }
        return text.includes("[DONE]") && !text.includes('"error"') ? "ok" : "unfinished stream";
      }),
    );
    for (const s of stalled) s.destroy();
    const counts = new Map<string, number>();
    for (const o of outcomes) counts.set(o, (counts.get(o) ?? 0) + 1);
    expect([...counts.keys()].filter((k) => k !== "ok" && k !== "429")).toEqual([]);
    expect(counts.get("ok") ?? 0).toBeGreaterThanOrEqual(SLOTS + QUEUE);
    expect(counts.get("429") ?? 0).toBeGreaterThan(0);
    expect((await rssOf(a)) - rss0).toBeLessThan(RSS_GROWTH_BOUND);
    // Still serving afterwards.
    const r = await client(a).chat.completions.create({ model: "alpha", messages: [{ role: "user", content: "after" }], max_tokens: 4 });
    expect(r.choices[0]?.finish_reason).toBeDefined();
  }, 180_000);
});
