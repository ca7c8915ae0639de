import { describe, expect, test } from "bun:test";
import { RequestLog, type RequestRecord } from "../../../src/server/console/log";

const rec = (id: string, o: Partial<RequestRecord> = {}): RequestRecord => ({
  id,
  at: Date.now(),
  entry: "a",
  servedBy: "b",
  model: "m",
  api: "/v1/chat/completions",
  stream: false,
  route: "cache",
  promptChars: 100,
  promptHash: "h",
  status: null,
  promptTokens: null,
  cachedTokens: null,
  completionTokens: null,
  predictedCachedTokens: 200,
  prediction: null,
  ttftMs: null,
  tokensPerS: null,
  durationMs: null,
  explanation: null,
  done: false,
  ...o,
});

describe("request log", () => {
  test("holds_at_most_its_cap_dropping_the_oldest_and_forgetting_their_ids", () => {
    const log = new RequestLog(10);
    for (let i = 0; i < 25; i++) log.add(rec(`r${i}`));
    expect(log.length).toBe(10);
    expect(log.get("r14")).toBeUndefined();
    expect(log.get("r15")?.id).toBe("r15");
    expect(log.list({ limit: 100 }).map((r) => r.id)).toEqual(Array.from({ length: 10 }, (_, i) => `r${24 - i}`));
  });

  test("filters_by_model_node_route_and_status_newest_first", () => {
    const log = new RequestLog(100);
    log.add(rec("1", { model: "x", status: 200 }));
    log.add(rec("2", { model: "y", route: "load", status: 429 }));
    log.add(rec("3", { model: "x", servedBy: "c", status: 200 }));
    expect(log.list({ model: "x" }).map((r) => r.id)).toEqual(["3", "1"]);
    expect(log.list({ node: "c" }).map((r) => r.id)).toEqual(["3"]);
    expect(log.list({ route: "load" }).map((r) => r.id)).toEqual(["2"]);
    expect(log.list({ status: "error" }).map((r) => r.id)).toEqual(["2"]);
    expect(log.list({ status: "ok", limit: 1 }).map((r) => r.id)).toEqual(["3"]);
  });

  test("counts_a_cache_route_whose_prefix_was_gone_as_a_misprediction_of_its_node", () => {
    const log = new RequestLog(100);
    log.add(rec("held"));
    log.add(rec("gone"));
    log.add(rec("other", { route: "load", predictedCachedTokens: 0 }));
    expect(log.complete("held", { cachedTokens: 190, status: 200 })?.prediction).toBe("agree");
    expect(log.complete("gone", { cachedTokens: 0, status: 200 })?.prediction).toBe("short");
    log.complete("other", { cachedTokens: 0, status: 200 });
    // Completing again does not count twice.
    log.complete("gone", { status: 200 });
    expect(log.mispredictions()).toEqual({ b: { checked: 2, short: 1 } });
  });

  test("refuses_a_cap_below_one", () => {
    expect(() => new RequestLog(0)).toThrow();
  });
});
