import { describe, expect, test } from "bun:test";
import { LruMap } from "../src/lru";

describe("lru map", () => {
  test("get_and_set_make_an_entry_the_most_recent", () => {
    const m = new LruMap<string, number>();
    m.set("a", 1);
    m.set("b", 2);
    m.set("c", 3);
    m.get("a");
    m.set("b", 20);
    expect([...m.entries()]).toEqual([
      ["c", 3],
      ["a", 1],
      ["b", 20],
    ]);
    expect(m.peek("c")).toBe(3);
    expect(m.oldest()).toEqual(["c", 3]);
  });

  test("shift_and_delete_keep_the_order_consistent", () => {
    const m = new LruMap<number, number>();
    for (let i = 0; i < 5; i++) m.set(i, i);
    expect(m.shift()).toEqual([0, 0]);
    expect(m.delete(3)).toBe(true);
    expect(m.delete(3)).toBe(false);
    expect([...m.entries()].map((e) => e[0])).toEqual([1, 2, 4]);
    for (const [k] of m.entries()) m.delete(k);
    expect(m.size).toBe(0);
    expect(m.shift()).toBeUndefined();
  });

  test("the_bound_and_the_order_hold_under_churn", () => {
    const m = new LruMap<number, number>();
    for (let i = 0; i < 65_536; i++) m.set(i, i);
    let next = 65_536;
    const rounds = 200_000;
    let steps = 0;
    for (let i = 0; i < rounds; i++) {
      m.shift();
      m.set(next++, i);
      steps++;
    }
    expect(steps).toBe(rounds);
    expect(m.size).toBe(65_536);
    expect(m.oldest()?.[0]).toBe(rounds);
  });
});
