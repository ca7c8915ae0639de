import { describe, expect, test } from "bun:test";
import { kvUsage, planEviction, reservation, type SlotUsage } from "../../src/engine/kv";

const idle = (seq: number, cells: number, lastUsed: number): SlotUsage => ({ seq, cells, running: false, reserved: 0, lastUsed });
const running = (seq: number, cells: number, reserved: number, lastUsed = 100): SlotUsage => ({
  seq,
  cells,
  running: true,
  reserved,
  lastUsed,
});

describe("kv accounting", () => {
  test("usage_splits_cells_into_running_resident_reserved_and_free", () => {
    const u = kvUsage(1000, [running(0, 200, 50), idle(1, 300, 1), idle(2, 0, 2)]);
    expect(u).toEqual({ total: 1000, running: 200, resident: 300, reserved: 50, free: 450 });
  });

  test("reservation_is_prompt_plus_output_capped_by_the_sequence_capacity", () => {
    expect(reservation(100, 50, 1000)).toBe(150);
    expect(reservation(900, 500, 1000)).toBe(1000);
    // A request always reserves room for at least one generated token.
    expect(reservation(10, 0, 1000)).toBe(11);
  });
});

describe("eviction plan", () => {
  test("fits_without_evicting_when_free_cells_suffice", () => {
    const plan = planEviction(1000, [idle(0, 400, 1)], 600);
    expect(plan).toEqual({ fits: true, evictions: [], cells: 0 });
  });

  test("exact_fit_evicts_nothing", () => {
    const plan = planEviction(1000, [running(0, 300, 100), idle(1, 200, 1)], 400);
    expect(plan).toEqual({ fits: true, evictions: [], cells: 0 });
  });

  test("evicts_the_coldest_resident_prefix_first_and_only_the_shortfall", () => {
    const slots = [idle(0, 300, 5), idle(1, 300, 2), idle(2, 300, 9)];
    const plan = planEviction(1000, slots, 150);
    // free = 100, shortfall = 50: trimmed from the tail of the coldest (seq 1), keeping its head.
    expect(plan).toEqual({ fits: true, evictions: [{ seq: 1, keep: 250, cells: 50 }], cells: 50 });
  });

  test("spills_to_the_next_coldest_when_one_prefix_is_not_enough", () => {
    const slots = [idle(0, 300, 5), idle(1, 300, 2), idle(2, 300, 9)];
    const plan = planEviction(1000, slots, 500);
    expect(plan).toEqual({
      fits: true,
      evictions: [
        { seq: 1, keep: 0, cells: 300 },
        { seq: 0, keep: 200, cells: 100 },
      ],
      cells: 400,
    });
  });

  test("never_evicts_a_running_sequence_even_if_it_is_coldest", () => {
    const slots = [running(0, 400, 0, 0), idle(1, 400, 7)];
    const plan = planEviction(1000, slots, 500);
    expect(plan.fits).toBe(true);
    if (plan.fits) expect(plan.evictions.map((e) => e.seq)).toEqual([1]);
    // Reserved-but-unused cells of running requests are not free either.
    const tight = planEviction(1000, [running(0, 400, 300, 0), idle(1, 200, 7)], 400);
    expect(tight).toEqual({ fits: false, shortBy: 100 });
  });

  test("never_evicts_a_protected_slot", () => {
    const plan = planEviction(1000, [idle(0, 600, 1), idle(1, 300, 2)], 400, new Set([0]));
    expect(plan).toEqual({ fits: true, evictions: [{ seq: 1, keep: 0, cells: 300 }], cells: 300 });
    expect(planEviction(1000, [idle(0, 600, 1), idle(1, 300, 2)], 500, new Set([0]))).toEqual({ fits: false, shortBy: 100 });
  });

  test("oversize_need_evicts_nothing_and_reports_the_shortfall", () => {
    const slots = [idle(0, 300, 1), running(1, 300, 0)];
    expect(planEviction(1000, slots, 1200)).toEqual({ fits: false, shortBy: 500 });
  });
});
