import { describe, expect, test } from "bun:test";
import { BoundedSeries, percentile, ratio, spread } from "../../src/bench/stats";

describe("bench arithmetic", () => {
  test("percentile_interpolates_between_closest_ranks", () => {
    const xs = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5];
    expect(percentile(xs, 50)).toBe(5.5);
    expect(percentile(xs, 95)).toBeCloseTo(9.55, 10);
    expect(percentile(xs, 0)).toBe(1);
    expect(percentile(xs, 100)).toBe(10);
    expect(percentile([42], 95)).toBe(42);
    // The input is not reordered.
    expect(xs[0]).toBe(10);
  });

  test("percentile_of_nothing_is_null_and_out_of_range_is_an_error", () => {
    expect(percentile([], 50)).toBeNull();
    expect(() => percentile([1], 101)).toThrow(RangeError);
    expect(() => percentile([1], Number.NaN)).toThrow(RangeError);
  });

  test("ratio_of_a_zero_denominator_is_unknown", () => {
    expect(ratio(3, 4)).toBe(0.75);
    expect(ratio(0, 4)).toBe(0);
    expect(ratio(3, 0)).toBeNull();
  });

  test("spread_reports_size_p50_and_p95", () => {
    expect(spread([])).toEqual({ n: 0, p50: null, p95: null });
    const s = spread([100, 200, 300, 400, 500]);
    expect(s.n).toBe(5);
    expect(s.p50).toBe(300);
    expect(s.p95).toBeCloseTo(480, 10);
  });

  test("bounded_series_never_exceeds_its_cap_and_still_spans_the_run", () => {
    const s = new BoundedSeries<number>(100);
    for (let i = 0; i < 100_000; i++) {
      s.push(i);
      expect(s.length).toBeLessThanOrEqual(100);
    }
    const v = s.values();
    expect(v[0]).toBe(0);
    // Kept points are in order and reach the last part of the run.
    for (let i = 1; i < v.length; i++) expect(v[i] as number).toBeGreaterThan(v[i - 1] as number);
    expect(v.at(-1) as number).toBeGreaterThan(100_000 * 0.9);
    expect(v.length).toBeGreaterThan(40);
  });

  test("bounded_series_keeps_everything_below_its_cap", () => {
    const s = new BoundedSeries<number>(10);
    for (let i = 0; i < 10; i++) s.push(i);
    expect(s.values()).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(() => new BoundedSeries(1)).toThrow(RangeError);
  });
});
