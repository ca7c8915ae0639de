// The upload cap: rates parse as an operator writes them, and parallel
// uploads share one timeline (asserted on reserved delays, not wall time).
import { describe, expect, test } from "bun:test";
import { parseRate, RateLimiter } from "../../../src/hydration/files/limiter";

describe("parseRate", () => {
  test("reads_plain_and_suffixed_rates", () => {
    expect(parseRate("1048576")).toBe(1048576);
    expect(parseRate("500k")).toBe(500 * 1024);
    expect(parseRate("20M")).toBe(20 * 1024 * 1024);
    expect(parseRate("1.5G")).toBe(1.5 * 1024 ** 3);
    expect(parseRate("20MB/s")).toBe(20 * 1024 * 1024);
    expect(parseRate("0")).toBe(0);
  });

  test("refuses_what_is_not_a_rate", () => {
    for (const v of ["", "fast", "-1M", "1T", "1 2"]) expect(parseRate(v)).toBeNull();
  });
});

describe("RateLimiter", () => {
  test("parallel_reservations_queue_on_one_timeline", () => {
    const now = 1000;
    const l = new RateLimiter(1000, 0, () => now); // 1000 bytes/s, no burst
    expect(l.reserve(500)).toBe(500);
    expect(l.reserve(500)).toBe(1000); // the second upload waits behind the first
    expect(l.reserve(1000)).toBe(2000);
  });

  test("a_burst_goes_at_once_and_idle_time_is_not_banked", () => {
    let now = 0;
    const l = new RateLimiter(1000, 100, () => now);
    expect(l.reserve(100)).toBe(0);
    now = 60_000; // a minute idle buys no more than the burst
    expect(l.reserve(100)).toBe(0);
    expect(l.reserve(1000)).toBe(900); // one second of bytes, less the 100 ms burst
  });

  test("no_cap_never_waits", () => {
    expect(new RateLimiter(0).reserve(1 << 30)).toBe(0);
  });
});
