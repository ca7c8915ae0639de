import { describe, expect, test } from "bun:test";
import { compareHlc, HlcClock } from "../../src/mesh/hlc";

describe("hybrid logical clock", () => {
  test("ticks_strictly_increase_even_when_the_wall_clock_stands_still_or_goes_back", () => {
    let wall = 1000;
    const clock = new HlcClock("a", () => wall);
    const seen = [clock.tick(), clock.tick()];
    wall = 500;
    seen.push(clock.tick());
    wall = 2000;
    seen.push(clock.tick());
    for (let i = 1; i < seen.length; i++) expect(compareHlc(seen[i] as never, seen[i - 1] as never)).toBeGreaterThan(0);
    expect(seen[3]).toEqual({ w: 2000, l: 0, n: "a" });
  });

  test("observing_a_remote_time_orders_later_ticks_after_it", () => {
    const clock = new HlcClock("a", () => 1000);
    expect(clock.observe({ w: 1500, l: 7, n: "b" })).toBe(true);
    expect(compareHlc(clock.tick(), { w: 1500, l: 7, n: "b" })).toBeGreaterThan(0);
  });

  test("remote_time_beyond_the_drift_bound_is_refused_and_ignored", () => {
    const clock = new HlcClock("a", () => 1000, 100);
    expect(clock.observe({ w: 5000, l: 0, n: "b" })).toBe(false);
    expect(clock.tick().w).toBe(1000);
  });

  test("node_id_breaks_ties", () => {
    expect(compareHlc({ w: 1, l: 1, n: "a" }, { w: 1, l: 1, n: "b" })).toBeLessThan(0);
    expect(compareHlc({ w: 1, l: 2, n: "a" }, { w: 1, l: 1, n: "b" })).toBeGreaterThan(0);
  });
});
