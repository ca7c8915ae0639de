import { describe, expect, test } from "bun:test";
import { EventHub } from "../../../src/server/console/events";

const dec = new TextDecoder();

async function readEvents(stream: ReadableStream<Uint8Array>, n: number): Promise<string[]> {
  const reader = stream.getReader();
  let text = "";
  const names = () => [...text.matchAll(/^event: (\S+)$/gm)].map((m) => m[1] as string);
  while (names().length < n) {
    const { value, done } = await reader.read();
    if (done) break;
    text += dec.decode(value);
  }
  reader.releaseLock();
  return names();
}

describe("console events", () => {
  test("a_subscriber_gets_its_first_events_then_what_is_published", async () => {
    const hub = new EventHub();
    const s = hub.subscribe([["hello", { node: "a" }]]);
    if (!s) throw new Error("refused");
    hub.publish("request", { id: "1" });
    expect(await readEvents(s, 2)).toEqual(["hello", "request"]);
  });

  test("subscribers_past_the_cap_are_refused", () => {
    const hub = new EventHub({ maxSubscribers: 2 });
    expect(hub.subscribe()).not.toBeNull();
    expect(hub.subscribe()).not.toBeNull();
    expect(hub.subscribe()).toBeNull();
    expect(hub.stats()).toMatchObject({ subscribers: 2, refused: 1 });
  });

  test("a_subscriber_that_stops_reading_is_dropped_once_its_backlog_is_full_never_buffered_without_bound", async () => {
    const hub = new EventHub({ maxBacklog: 16 });
    const slow = hub.subscribe();
    const fast = hub.subscribe();
    if (!slow || !fast) throw new Error("refused");
    const reader = fast.getReader();
    let fastEvents = 0;
    const draining = (async () => {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        fastEvents += (dec.decode(value).match(/^event: /gm) ?? []).length;
      }
    })();
    // Far more than the backlog: the slow one (never read) is dropped, the fast one keeps up.
    for (let i = 0; i < 1000; i++) {
      hub.publish("tick", { i });
      if (i % 8 === 0) await Bun.sleep(0);
    }
    expect(hub.stats()).toMatchObject({ subscribers: 1, dropped: 1 });
    await expect(slow.getReader().read()).rejects.toThrow("too slow");
    hub.close();
    await draining;
    expect(fastEvents).toBe(1000);
    expect(hub.size).toBe(0);
  });

  test("a_subscriber_that_goes_away_leaves_and_the_snapshot_timer_stops_with_the_last", async () => {
    const hub = new EventHub();
    const seen: boolean[] = [];
    hub.onActive = (on) => seen.push(on);
    const s = hub.subscribe();
    if (!s) throw new Error("refused");
    await s.cancel();
    expect(hub.size).toBe(0);
    expect(seen).toEqual([true, false]);
  });
});
