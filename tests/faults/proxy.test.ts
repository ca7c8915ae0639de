// The fault proxy itself: each fault does what the fault suite relies on.
import { afterAll, describe, expect, test } from "bun:test";
import { FaultProxy } from "../helpers/fault-proxy";

let hits = 0;
const target = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  fetch: (req) => {
    hits++;
    if (new URL(req.url).pathname === "/stream") {
      let i = 0;
      const body = new ReadableStream<Uint8Array>({
        pull: async (c) => {
          await Bun.sleep(20);
          if (i++ >= 50) return c.close();
          c.enqueue(new TextEncoder().encode("0123456789"));
        },
      });
      return new Response(body, { headers: { "content-type": "text/event-stream" } });
    }
    return new Response(`hello ${req.method}`);
  },
});
const addr = `127.0.0.1:${target.port}`;
const proxy = new FaultProxy();
proxy.register(addr, "b");

afterAll(async () => {
  await proxy.stop();
  target.stop(true);
});

function get(path = "/", ms = 5_000): Promise<Response> {
  return fetch(`http://${addr}${path}`, { proxy: proxy.proxyUrl("a"), signal: AbortSignal.timeout(ms) });
}

describe("fault proxy", () => {
  test("a_healthy_link_passes_requests_and_answers", async () => {
    const r = await get();
    expect(await r.text()).toBe("hello GET");
  });

  test("a_cut_link_holds_the_request_silently_until_the_sender_gives_up", async () => {
    proxy.set("a", "b", { cut: true });
    const before = hits;
    await expect(get("/", 300)).rejects.toThrow();
    expect(hits).toBe(before);
    proxy.heal();
    expect(await (await get()).text()).toBe("hello GET");
  });

  test("a_cut_answer_direction_delivers_the_request_but_not_the_answer", async () => {
    proxy.set("b", "a", { cut: true });
    const before = hits;
    await expect(get("/", 300)).rejects.toThrow();
    expect(hits).toBe(before + 1);
    proxy.heal();
  });

  test("delay_holds_each_message_back", async () => {
    proxy.set("a", "b", { delayMs: 150 });
    const t0 = performance.now();
    await (await get()).text();
    expect(performance.now() - t0).toBeGreaterThanOrEqual(140);
    proxy.heal();
  });

  test("duplicate_sends_the_request_twice", async () => {
    proxy.set("a", "b", { duplicate: 1 });
    const before = hits;
    await (await get()).text();
    await Bun.sleep(100);
    expect(hits).toBe(before + 2);
    proxy.heal();
  });

  test("cut_after_bytes_stops_a_streaming_answer_midway_and_stays_silent", async () => {
    proxy.set("b", "a", { cutAfterBytes: 100 });
    const r = await get("/stream", 1_500);
    const reader = (r.body as ReadableStream<Uint8Array>).getReader();
    let got = 0;
    let failed = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        got += value.byteLength;
      }
    } catch {
      failed = true;
    }
    expect(failed).toBe(true);
    expect(got).toBeGreaterThan(0);
    expect(got).toBeLessThanOrEqual(100);
    expect(proxy.faults("b", "a").cut).toBe(true);
    proxy.heal();
  });

  test("loss_of_every_message_is_counted_and_bounded_by_the_senders_timeout", async () => {
    proxy.set("a", "b", { drop: 1 });
    const lost = proxy.stats.lost;
    await expect(get("/", 200)).rejects.toThrow();
    expect(proxy.stats.lost).toBe(lost + 1);
    proxy.heal();
    await Bun.sleep(50);
    expect(proxy.stats.active).toBe(0);
  });
});
